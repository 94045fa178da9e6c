"""A FUSE filesystem for power-cut tests: it forgets everything that was not synced (as Jepsen's lazyfs).

    python -m tests.powercut.lazyfs MOUNTPOINT --image IMAGE

Every write, create, rename and unlink lands in memory and is visible at once, as in a page cache. What
survives a power cut is only what was made durable:

* a file's contents (and size) as of its last ``fsync``/``fdatasync`` (``msync(MS_SYNC)`` of a shared
  mapping reaches FUSE as the dirty pages' writes and then an fsync, so pysyncobj's mmap'ed journal is
  covered); a file never synced comes back empty;
* a directory's entries (creates, renames, unlinks) as of its last ``fsync`` of the directory itself:
  a new file whose directory was not synced is gone, a rename not followed by a directory sync is undone.

It reads JSON lines on stdin and answers one line each on stdout (the first line is ``{"event": "ready"}``
once mounted): ``{"op": "cut"}`` drops everything unsynced and refuses every later change with EIO (the
machine is off; kill its processes first), ``{"op": "stats"}`` counts operations, ``{"op": "watch",
"name": "dump"}`` makes the next rename onto that name send ``{"event": "renamed", ...}``, and
``{"op": "unmount"}`` unmounts. On the way out the durable state is written to ``IMAGE`` (after a cut:
only what was synced; after a clean unmount: everything, as a real unmount syncs), and a later mount
with the same ``IMAGE`` starts from it. :class:`LazyMount` drives one from a test.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[2]


class File:
    __slots__ = ("data", "ino", "mode", "mtime", "synced")

    def __init__(self, ino: int, mode: int, data: bytes = b"", synced: bytes | None = None) -> None:
        self.ino = ino
        self.mode = mode
        self.data = bytearray(data)
        self.synced = synced  # contents at the last fsync; None: never synced (comes back empty)
        self.mtime = time.time()


class Dir:
    __slots__ = ("entries", "ino", "mode", "mtime", "synced")

    def __init__(self, ino: int, mode: int) -> None:
        self.ino = ino
        self.mode = mode
        self.entries: dict[str, File | Dir] = {}
        self.synced: dict[str, File | Dir] = {}  # entries at the last fsync of this directory
        self.mtime = time.time()


Node = File | Dir


def _eio() -> OSError:
    return OSError(errno.EIO, "power cut: the filesystem refuses changes")


class LazyFS:
    """The in-memory tree (pure: no FUSE here, so the rules are testable without a mount)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._next_ino = 1
        self.root = Dir(self._ino(), 0o755)
        self.handles: dict[int, File] = {}  # open file handle → file (unlinked files stay writable)
        self._next_fh = 1
        self.cut_done = False
        self.counts: dict[str, int] = {}
        self.watched: set[str] = set()
        self.on_event: Callable[[dict[str, Any]], None] = lambda event: None
        self.trace: Callable[[str], None] = lambda line: None  # names and directory syncs (--trace)

    def _ino(self) -> int:
        self._next_ino += 1
        return self._next_ino - 1

    def _count(self, op: str) -> None:
        self.counts[op] = self.counts.get(op, 0) + 1

    # --- lookup ---

    def node(self, path: str) -> Node:
        node: Node = self.root
        for part in (p for p in path.split("/") if p):
            if not isinstance(node, Dir) or part not in node.entries:
                raise OSError(errno.ENOENT, path)
            node = node.entries[part]
        return node

    def parent(self, path: str) -> tuple[Dir, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        parent = self.node(head or "/")
        if not isinstance(parent, Dir):
            raise OSError(errno.ENOTDIR, head)
        return parent, name

    def file_for(self, path: str | None, fh: int | None) -> File:
        if fh and fh in self.handles:
            return self.handles[fh]
        if path is None:
            raise OSError(errno.EBADF, "no such handle")
        node = self.node(path)
        if not isinstance(node, File):
            raise OSError(errno.EISDIR, path)
        return node

    def _change(self, op: str) -> None:
        if self.cut_done:
            self._count("refused")
            raise _eio()
        self._count(op)

    # --- changes (visible at once, durable only once synced) ---

    def create(self, path: str, mode: int) -> int:
        self._change("create")
        self.trace(f"create {path}")
        parent, name = self.parent(path)
        existing = parent.entries.get(name)
        if isinstance(existing, Dir):
            raise OSError(errno.EISDIR, path)
        f = existing or File(self._ino(), stat.S_IMODE(mode))
        parent.entries[name] = f
        parent.mtime = time.time()
        return self.open_handle(f)

    def open_handle(self, f: File) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = f
        return fh

    def release(self, fh: int) -> None:
        self.handles.pop(fh, None)

    def mkdir(self, path: str, mode: int) -> None:
        self._change("mkdir")
        self.trace(f"mkdir {path}")
        parent, name = self.parent(path)
        if name in parent.entries:
            raise OSError(errno.EEXIST, path)
        parent.entries[name] = Dir(self._ino(), stat.S_IMODE(mode))

    def unlink(self, path: str) -> None:
        self._change("unlink")
        self.trace(f"unlink {path}")
        parent, name = self.parent(path)
        node = parent.entries.get(name)
        if node is None:
            raise OSError(errno.ENOENT, path)
        if isinstance(node, Dir):
            raise OSError(errno.EISDIR, path)
        del parent.entries[name]

    def rmdir(self, path: str) -> None:
        self._change("rmdir")
        parent, name = self.parent(path)
        node = parent.entries.get(name)
        if not isinstance(node, Dir):
            raise OSError(errno.ENOTDIR if node else errno.ENOENT, path)
        if node.entries:
            raise OSError(errno.ENOTEMPTY, path)
        del parent.entries[name]

    def rename(self, old: str, new: str) -> None:
        self._change("rename")
        self.trace(f"rename {old} {new}")
        src_dir, src_name = self.parent(old)
        dst_dir, dst_name = self.parent(new)
        node = src_dir.entries.get(src_name)
        if node is None:
            raise OSError(errno.ENOENT, old)
        target = dst_dir.entries.get(dst_name)
        if isinstance(target, Dir) and target.entries:
            raise OSError(errno.ENOTEMPTY, new)
        del src_dir.entries[src_name]
        dst_dir.entries[dst_name] = node
        if dst_name in self.watched:
            self.watched.discard(dst_name)
            self.on_event({"event": "renamed", "old": old, "new": new})

    def write(self, f: File, data: bytes, offset: int) -> int:
        self._change("write")
        end = offset + len(data)
        if end > len(f.data):
            f.data.extend(b"\0" * (end - len(f.data)))
        f.data[offset:end] = data
        f.mtime = time.time()
        return len(data)

    def truncate(self, f: File, length: int) -> None:
        self._change("truncate")
        if length < len(f.data):
            del f.data[length:]
        else:
            f.data.extend(b"\0" * (length - len(f.data)))
        f.mtime = time.time()

    def fsync(self, f: File) -> None:
        self._change("fsync")
        f.synced = bytes(f.data)

    def fsyncdir(self, d: Dir) -> None:
        self._change("fsyncdir")
        self.trace(f"fsyncdir {d.ino} {sorted(d.entries)}")
        d.synced = dict(d.entries)

    # --- the power cut ---

    def cut(self) -> dict[str, int]:
        """Forget everything unsynced and refuse further changes; returns how many files and directory
        entries went back to their last synced state."""
        dropped = {"files": 0, "entries": 0}
        seen: set[int] = set()

        def restore(d: Dir) -> None:
            dropped["entries"] += len(set(d.entries.items()) ^ set(d.synced.items()))
            d.entries = dict(d.synced)
            for child in d.entries.values():
                if child.ino in seen:
                    continue
                seen.add(child.ino)
                if isinstance(child, Dir):
                    restore(child)
                    continue
                kept = child.synced or b""
                if child.data != kept:
                    dropped["files"] += 1
                    child.data = bytearray(kept)

        restore(self.root)
        self.trace(f"cut {dropped}")
        self.handles.clear()
        self.cut_done = True
        return dropped

    def sync_all(self) -> None:
        """A clean unmount: everything becomes durable."""
        def walk(d: Dir) -> None:
            d.synced = dict(d.entries)
            for child in d.entries.values():
                if isinstance(child, Dir):
                    walk(child)
                else:
                    child.synced = bytes(child.data)
        walk(self.root)

    # --- the image (what a later mount starts from) ---

    def durable_image(self) -> dict[str, Any]:
        def dump(d: Dir) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for name, child in d.synced.items():
                if isinstance(child, Dir):
                    out[name] = {"dir": dump(child), "mode": child.mode}
                else:
                    out[name] = {"data": base64.b64encode(child.synced or b"").decode(), "mode": child.mode}
            return out
        return {"root": dump(self.root)}

    def load_image(self, image: dict[str, Any]) -> None:
        def load(d: Dir, doc: dict[str, Any]) -> None:
            for name, entry in doc.items():
                child: Node
                if "dir" in entry:
                    child = Dir(self._ino(), int(entry["mode"]))
                    load(child, entry["dir"])
                else:
                    data = base64.b64decode(entry["data"])
                    child = File(self._ino(), int(entry["mode"]), data, synced=data)
                d.entries[name] = child
            d.synced = dict(d.entries)
        load(self.root, image["root"])

    def attrs(self, node: Node) -> dict[str, Any]:
        now = node.mtime
        if isinstance(node, Dir):
            return {"st_mode": stat.S_IFDIR | node.mode, "st_nlink": 2, "st_size": 4096, "st_ino": node.ino,
                    "st_mtime": now, "st_ctime": now, "st_atime": now}
        return {"st_mode": stat.S_IFREG | node.mode, "st_nlink": 1, "st_size": len(node.data), "st_ino": node.ino,
                "st_mtime": now, "st_ctime": now, "st_atime": now, "st_blocks": (len(node.data) + 511) // 512}


def _operations(fs: LazyFS) -> Any:
    """The FUSE callbacks over ``fs`` (mfusepy's high-level API), one lock around each."""
    import mfusepy  # type: ignore[import-untyped]

    class Ops(mfusepy.Operations):  # type: ignore[misc]
        use_ns = True

        def _locked(self, fn: Callable[[], Any]) -> Any:
            with fs.lock:
                return fn()

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            def go() -> dict[str, Any]:
                node: Node = fs.handles[fh] if fh and fh in fs.handles else fs.node(path)
                return fs.attrs(node)
            result: dict[str, Any] = self._locked(go)
            return result

        def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
            def go() -> list[tuple[str, dict[str, int], int]]:
                node = fs.node(path)
                if not isinstance(node, Dir):
                    raise OSError(errno.ENOTDIR, path)
                # with use_ino an entry needs its inode number: readdir(3) skips entries whose d_ino is 0
                here = {"st_mode": stat.S_IFDIR, "st_ino": node.ino}
                return [(".", here, 0), ("..", here, 0),
                        *((name, {"st_mode": fs.attrs(child)["st_mode"], "st_ino": child.ino}, 0)
                          for name, child in node.entries.items())]
            result: list[tuple[str, dict[str, int], int]] = self._locked(go)
            return result

        def create(self, path: str, mode: int, fi: Any = None) -> int:
            result: int = self._locked(lambda: fs.create(path, mode))
            return result

        def open(self, path: str, flags: int) -> int:
            def go() -> int:
                node = fs.node(path)
                if not isinstance(node, File):
                    raise OSError(errno.EISDIR, path)
                if flags & os.O_TRUNC and flags & (os.O_WRONLY | os.O_RDWR):
                    fs.truncate(node, 0)
                return fs.open_handle(node)
            result: int = self._locked(go)
            return result

        def release(self, path: str, fh: int) -> int:
            self._locked(lambda: fs.release(fh))
            return 0

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            def go() -> bytes:
                f = fs.file_for(path, fh)
                return bytes(f.data[offset:offset + size])
            result: bytes = self._locked(go)
            return result

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            result: int = self._locked(lambda: fs.write(fs.file_for(path, fh), data, offset))
            return result

        def truncate(self, path: str, length: int, fh: int | None = None) -> int:
            self._locked(lambda: fs.truncate(fs.file_for(path, fh), length))
            return 0

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            self._locked(lambda: fs.fsync(fs.file_for(path, fh)))
            return 0

        def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
            def go() -> None:
                node = fs.node(path)
                if not isinstance(node, Dir):
                    raise OSError(errno.ENOTDIR, path)
                fs.fsyncdir(node)
            self._locked(go)
            return 0

        def mkdir(self, path: str, mode: int) -> int:
            self._locked(lambda: fs.mkdir(path, mode))
            return 0

        def unlink(self, path: str) -> int:
            self._locked(lambda: fs.unlink(path))
            return 0

        def rmdir(self, path: str) -> int:
            self._locked(lambda: fs.rmdir(path))
            return 0

        def rename(self, old: str, new: str) -> int:
            self._locked(lambda: fs.rename(old, new))
            return 0

        def chmod(self, path: str, mode: int) -> int:
            def go() -> None:
                if fs.cut_done:
                    raise _eio()
                fs.node(path).mode = stat.S_IMODE(mode)
            self._locked(go)
            return 0

        def chown(self, path: str, uid: int, gid: int) -> int:
            return 0

        def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
            return 0

        def statfs(self, path: str) -> dict[str, int]:
            return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": 1 << 22, "f_bfree": 1 << 21,
                    "f_bavail": 1 << 21, "f_files": 1 << 20, "f_ffree": 1 << 19, "f_namemax": 255}

    return Ops()


def main(argv: list[str] | None = None) -> int:
    import mfusepy

    p = argparse.ArgumentParser(prog="python -m tests.powercut.lazyfs", description=__doc__.split("\n")[0])
    p.add_argument("mountpoint")
    p.add_argument("--image", required=True, help="durable state: read at mount, written at unmount")
    p.add_argument("--trace", action="store_true", help="log every change of a name and directory sync to stderr")
    args = p.parse_args(argv)
    fs = LazyFS()
    if args.trace:
        fs.trace = lambda line: print(f"{time.time():.6f} {line}", file=sys.stderr, flush=True)
    image = Path(args.image)
    if image.exists():
        fs.load_image(json.loads(image.read_text()))
    out_lock = threading.Lock()

    def send(msg: dict[str, Any]) -> None:
        with out_lock:
            sys.stdout.write(json.dumps(msg) + "\n")
            sys.stdout.flush()

    fs.on_event = send

    def unmount() -> None:
        # lazily: a process killed a moment ago may still be releasing its files
        subprocess.run(["fusermount3", "-u", "-z", args.mountpoint], check=False, capture_output=True)

    def save_image() -> None:
        tmp = image.with_name(image.name + ".tmp")
        tmp.write_text(json.dumps(fs.durable_image()))
        os.replace(tmp, image)

    def control() -> None:
        for line in sys.stdin:
            req = json.loads(line)
            op = req.get("op")
            with fs.lock:
                if op == "cut":
                    resp: dict[str, Any] = {"ok": True, "dropped": fs.cut()}
                    save_image()  # what the next mount starts from is fixed now, however this one ends
                elif op == "stats":
                    resp = {"ok": True, "counts": dict(fs.counts), "cut": fs.cut_done}
                elif op == "watch":
                    fs.watched.add(str(req["name"]))
                    resp = {"ok": True}
                elif op == "unmount":
                    resp = {"ok": True}
                else:
                    resp = {"ok": False, "error": f"unknown op {op!r}"}
            send({"id": req.get("id"), **resp})
            if op == "unmount":
                break
        fs.trace("unmount")
        unmount()  # asked to, or the test that drives us is gone (stdin closed)

    ops = _operations(fs)
    original_init = getattr(ops, "init", None)

    def init(path: str) -> None:
        if original_init is not None:
            original_init(path)
        threading.Thread(target=control, daemon=True).start()
        send({"event": "ready", "pid": os.getpid()})

    ops.init = init
    mfusepy.FUSE(ops, args.mountpoint, foreground=True, nothreads=True, hard_remove=True, use_ino=True,
                 fsname="lazyfs", default_permissions=True, attr_timeout=0, entry_timeout=0)
    with fs.lock:
        fs.trace(f"unmounted {fs.counts}")
        if not fs.cut_done:
            fs.sync_all()
        save_image()
    return 0


# --- the driver side (tests) ---------------------------------------------------------------------------


class LazyMount:
    """One lazyfs process mounted at ``mountpoint``, its durable state in ``image``."""

    def __init__(self, mountpoint: Path, image: Path, log_path: Path) -> None:
        self.mountpoint = mountpoint
        self.image = image
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.connection: int | None = None
        self._reader: threading.Thread | None = None
        self._ids = iter(range(1, 1 << 62))
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._responses: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._log: IO[bytes] | None = None

    def mount(self, timeout: float = 20.0) -> LazyMount:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.events = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.powercut.lazyfs", str(self.mountpoint), "--image", str(self.image),
             *(["--trace"] if os.environ.get("LAZYFS_TRACE") == "1" else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, cwd=REPO, start_new_session=True)
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        self.wait_event("ready", timeout)
        if not os.path.ismount(self.mountpoint):
            raise RuntimeError(f"lazyfs said ready but {self.mountpoint} is not a mount point")
        self.connection = os.minor(os.stat(self.mountpoint).st_dev)  # its name under /sys/fs/fuse/connections
        return self

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            with contextlib.suppress(ValueError), self._cond:
                msg = json.loads(raw)
                if "event" in msg:
                    self.events.append(msg)
                else:
                    self._responses[msg.get("id")] = msg
                self._cond.notify_all()
        with self._cond:
            self.events.append({"event": "exit"})
            self._cond.notify_all()

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events:
                    if e["event"] == name:
                        return e
                    if e["event"] == "exit":
                        raise RuntimeError(f"lazyfs at {self.mountpoint} exited (see {self.log_path})")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"lazyfs at {self.mountpoint}: no {name!r} event in {timeout}s")
                self._cond.wait(left)

    def has_event(self, name: str) -> bool:
        with self._lock:
            return any(e["event"] == name for e in self.events)

    def call(self, op: str, timeout: float = 20.0, **kw: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        with self._lock:
            rid = next(self._ids)
            self.proc.stdin.write((json.dumps({"id": rid, "op": op, **kw}) + "\n").encode())
            self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        with self._cond:
            while rid not in self._responses:
                left = deadline - time.monotonic()
                if left <= 0 or any(e["event"] == "exit" for e in self.events):
                    raise TimeoutError(f"lazyfs at {self.mountpoint}: no answer to {op}")
                self._cond.wait(left)
            resp = self._responses.pop(rid)
        if not resp.get("ok"):
            raise RuntimeError(f"lazyfs {op}: {resp}")
        return resp

    def cut(self) -> dict[str, int]:
        """Drop every unsynced change and refuse more (kill the processes using it first)."""
        dropped: dict[str, int] = self.call("cut")["dropped"]
        return dropped

    def unmount(self, timeout: float = 10.0) -> None:
        """Unmount (lazily) and wait for the process to write its image and exit. If it does not exit in
        time (a killed process may keep the detached mount referenced), abort the FUSE connection, as a
        disk that is gone: every pending request fails, and the process returns from its loop and exits."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(TimeoutError, BrokenPipeError, OSError):
                self.call("unmount", timeout=5)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.abort()
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=10)
        subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False, capture_output=True)
        if self._reader is not None:  # its "exit" must not land among the next mount's events
            self._reader.join(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        self.proc = None

    def abort(self) -> None:
        """Abort this mount's FUSE connection (through fusectl, mounted here if nothing mounted it)."""
        conns = Path("/sys/fs/fuse/connections")
        if not os.path.ismount(conns):
            subprocess.run(["mount", "-t", "fusectl", "fusectl", str(conns)], check=False, capture_output=True)
        with contextlib.suppress(OSError):
            (conns / str(self.connection) / "abort").write_text("1")

    def remount(self) -> LazyMount:
        self.unmount()
        return self.mount()


@contextlib.contextmanager
def mounted(root: Path, name: str) -> Iterator[LazyMount]:
    """A lazyfs at ``root/name`` (image and log beside it), unmounted at the end whatever happens."""
    m = LazyMount(root / name, root / f"{name}.image.json", root / f"{name}.lazyfs.log")
    try:
        yield m.mount()
    finally:
        m.unmount()


if __name__ == "__main__":
    sys.exit(main())
