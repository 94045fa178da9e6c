"""The power-cut filesystem itself, through a real FUSE mount: after a cut and a remount only what was
synced is there (file contents by fsync/fdatasync/msync, directory entries by an fsync of the directory)."""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from appconnector.pool.storage import fsync_dir
from tests.powercut.lazyfs import LazyMount, mounted

pytestmark = pytest.mark.root


@pytest.fixture
def lazy(tmp_path: Path) -> Iterator[LazyMount]:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    with mounted(tmp_path, "mnt") as m:
        yield m


def _write(path: Path, data: bytes, sync: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())


def test_unsynced_write_is_gone_and_synced_write_kept_after_a_cut(lazy: LazyMount) -> None:
    d = lazy.mountpoint
    _write(d / "kept", b"synced bytes", sync=True)
    _write(d / "lost", b"never synced", sync=False)
    fsync_dir(d)  # both names are durable; only one file's contents are
    with open(d / "kept", "ab") as f:
        f.write(b" and an unsynced tail")
    assert (d / "lost").read_bytes() == b"never synced"  # visible before the cut, as in a page cache
    lazy.cut()
    lazy.remount()
    assert (d / "kept").read_bytes() == b"synced bytes"
    assert (d / "lost").read_bytes() == b""


def test_fdatasync_counts_as_a_sync(lazy: LazyMount) -> None:
    d = lazy.mountpoint
    with open(d / "f", "wb") as f:
        f.write(b"data")
        f.flush()
        os.fdatasync(f.fileno())
    fsync_dir(d)
    lazy.cut()
    lazy.remount()
    assert (d / "f").read_bytes() == b"data"


def test_new_file_and_rename_without_a_directory_sync_are_undone(lazy: LazyMount) -> None:
    d = lazy.mountpoint
    _write(d / "old", b"first", sync=True)
    fsync_dir(d)
    _write(d / "new.tmp", b"second", sync=True)  # contents synced, its name not
    os.replace(d / "new.tmp", d / "old")  # the replace is not durable either
    _write(d / "created", b"x", sync=True)
    assert sorted(os.listdir(d)) == ["created", "old"]
    lazy.cut()
    lazy.remount()
    assert sorted(os.listdir(d)) == ["old"]
    assert (d / "old").read_bytes() == b"first"


def test_rename_followed_by_a_directory_sync_survives(lazy: LazyMount) -> None:
    d = lazy.mountpoint
    os.mkdir(d / "sub")
    fsync_dir(d)
    _write(d / "sub" / "dump.tmp", b"snapshot", sync=True)
    os.replace(d / "sub" / "dump.tmp", d / "sub" / "dump")
    fsync_dir(d / "sub")
    lazy.cut()
    lazy.remount()
    assert os.listdir(d / "sub") == ["dump"]
    assert (d / "sub" / "dump").read_bytes() == b"snapshot"


def test_msync_of_a_shared_mapping_is_a_sync_and_dirty_pages_without_it_are_lost(lazy: LazyMount) -> None:
    # pysyncobj's journal is a shared writable mmap: its writes reach FUSE only as page writeback
    d = lazy.mountpoint
    _write(d / "journal", b"\0" * 8192, sync=True)
    fsync_dir(d)
    with open(d / "journal", "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        mm[0:6] = b"synced"
        mm.flush()  # msync(MS_SYNC)
        mm[4096:4101] = b"dirty"
        lazy.cut()
    lazy.remount()
    data = (d / "journal").read_bytes()
    assert data[0:6] == b"synced"
    assert data[4096:4101] == b"\0" * 5


def test_after_a_cut_every_change_is_refused_until_the_remount(lazy: LazyMount) -> None:
    d = lazy.mountpoint
    _write(d / "f", b"synced", sync=True)
    fsync_dir(d)
    fd = os.open(d / "f", os.O_WRONLY)
    try:
        lazy.cut()
        with pytest.raises(OSError) as e:
            os.write(fd, b"after the power went")
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        (d / "g").write_bytes(b"new file")
    lazy.remount()
    assert os.listdir(d) == ["f"]
    (d / "g").write_bytes(b"writable again")  # a remount is a machine that booted again


def test_a_clean_unmount_keeps_everything(lazy: LazyMount) -> None:
    d = lazy.mountpoint
    _write(d / "f", b"written, never synced", sync=False)
    lazy.remount()
    assert (d / "f").read_bytes() == b"written, never synced"
