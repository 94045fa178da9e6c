"""A member's files in ``cluster.state_dir/raft-<address>/``: their format, validation, repair and reset.

One module with one job (docs/design.md §6): everything that reads, writes, syncs or removes the files of
a member lives here, behind the engine seam (:mod:`appconnector.pool.engine`).

* The Raft files are pysyncobj 0.3.17's: the journal (``journal``, memory-mapped by pysyncobj), its meta
  file (``journal.meta``: term, vote, commit index) and the full dump (``dump``). :func:`validate_state_dir`
  reads them as pysyncobj would and refuses (:class:`StateError`, naming the file) what pysyncobj would
  only log before starting empty; :func:`repair_interrupted_compaction` trims a journal a kill left
  untrimmed after a compaction.
* :class:`Durability` syncs them where Raft's safety depends on it (``cluster.fsync``): the journal before
  entries are acknowledged, the term/vote record before a vote is answered, the dump and its directory
  before the journal is trimmed.
* The state inside the full dump is ``PoolState.to_bytes()`` behind our own format number
  (:data:`STATE_FORMAT`, :class:`_DumpedState`).
* The untrusted-state marker (``untrusted``, JSON: reason, time) is written, synced, before a member exits
  because its state can no longer be trusted (a journal conflict over applied entries, a snapshot from the
  leader that would not install). A member that finds it at start does not load its state and does not
  serve: DNS answers REFUSED, ``/readyz`` is unready, no routes, no NAT (app.py) until an operator resets
  the state.
* The run lock (``lock``, ``flock``) is held by the running member, so :func:`reset` can refuse while it
  runs; the kernel drops it when the process dies, even by SIGKILL.
* :func:`reset` (``appconnector state reset``) removes the Raft data (journal, the full dump, a
  half-received snapshot) and the marker. It keeps the current term and the vote of the meta file (Raft
  forbids a member to forget whom it voted for in a term: it could vote twice and let two leaders be
  elected), and the membership record, so a member of a multi-member cluster starts empty as the same
  member and the leader sends it a fresh snapshot (the reseed); a single member starts with an empty pool.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import json
import logging
import os
import pickle
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from appconnector.metrics import STORAGE_SYNC_SECONDS

log = logging.getLogger(__name__)

PYSYNCOBJ_VERSION = "0.3.17"
"""The pysyncobj whose file formats these are (written into a repaired journal's header)."""
STATE_FORMAT = 1
"""Version of what the engine puts into pysyncobj's full dump (bump when the layout changes)."""


class StateError(RuntimeError):
    """The state directory cannot be used (corrupt dump, journal or meta file). The message names it."""


class _Snapshottable(Protocol):
    def to_bytes(self) -> bytes: ...


@dataclass(frozen=True)
class StatePaths:
    """One member's files inside ``cluster.state_dir``."""

    dir: Path

    @classmethod
    def for_member(cls, state_dir: str | Path, self_address: str) -> StatePaths:
        safe = self_address.replace("[", "").replace("]", "").replace(":", "_")
        return cls(Path(state_dir) / f"raft-{safe}")

    @property
    def journal(self) -> Path:
        return self.dir / "journal"

    @property
    def meta(self) -> Path:
        return self.dir / "journal.meta"

    @property
    def dump(self) -> Path:
        return self.dir / "dump"


# --- the state inside pysyncobj's full dump ------------------------------------------------------------


class _DumpedState:
    """Pickles as (format, PoolState bytes). Built in the parent, pickled in pysyncobj's forked writer."""

    __slots__ = ("data", "format", "state")

    def __init__(self, fmt: int, data: bytes | None = None, state: _Snapshottable | None = None) -> None:
        self.format = fmt
        self.data = data
        self.state = state

    def __reduce__(self) -> tuple[Any, tuple[int, bytes]]:
        data = self.data if self.data is not None else self.state.to_bytes()  # type: ignore[union-attr]
        return (_DumpedState, (self.format, data))


# --- validating the files before pysyncobj opens them -------------------------------------------------

_JOURNAL_NAME = b"PYSYNCOBJ"
_JOURNAL_HEADER = 24 + 8 + 4 + 4  # name, version, format, last-record offset


def read_journal(path: Path) -> list[tuple[int, int, bytes]]:
    """(index, term, command) of every record in a pysyncobj journal file; StateError when corrupt."""
    raw = path.read_bytes()
    if len(raw) < _JOURNAL_HEADER or not raw[:24].startswith(_JOURNAL_NAME):
        raise StateError(f"{path}: not a pysyncobj journal (bad header)")
    fmt, end = struct.unpack_from("<II", raw, 32)
    if fmt != 1:
        raise StateError(f"{path}: journal format {fmt}, expected 1")
    if not _JOURNAL_HEADER <= end <= len(raw):
        raise StateError(f"{path}: journal end offset {end} outside the file ({len(raw)} bytes)")
    out: list[tuple[int, int, bytes]] = []
    pos = _JOURNAL_HEADER
    while pos < end:
        if pos + 4 > end:
            raise StateError(f"{path}: truncated record at offset {pos}")
        (size,) = struct.unpack_from("<I", raw, pos)
        if size < 17 or pos + 8 + size > end:
            raise StateError(f"{path}: record at offset {pos} has a bad length {size}")
        (trailer,) = struct.unpack_from("<I", raw, pos + 4 + size)
        if trailer != size:
            raise StateError(f"{path}: record at offset {pos}: length {size} but trailer {trailer}")
        idx, term = struct.unpack_from("<QQ", raw, pos + 4)
        command = raw[pos + 20:pos + 4 + size]
        if out and (idx != out[-1][0] + 1 or term < out[-1][1]):
            raise StateError(f"{path}: record at offset {pos}: index {idx} term {term} does not follow "
                             f"index {out[-1][0]} term {out[-1][1]}")
        if command[0] > 3:
            raise StateError(f"{path}: record {idx}: unknown command type {command[0]}")
        if command[0] == 0:
            try:
                pickle.loads(command[1:])
            except Exception as e:
                raise StateError(f"{path}: record {idx}: command does not decode ({e!r})") from None
        out.append((idx, term, command))
        pos += 8 + size
    return out


def read_dump(path: Path) -> tuple[Any, tuple[bytes, int, int], tuple[bytes, int, int], Any]:
    """The (data, last entry, entry before it, cluster) tuple of a full dump; StateError when corrupt."""
    try:
        with gzip.open(path, "rb") as f:
            dump = pickle.load(f)
    except Exception as e:
        raise StateError(f"{path}: full dump does not decode ({e!r})") from None
    if not (isinstance(dump, tuple) and len(dump) == 4 and isinstance(dump[0], list) and len(dump[0]) == 2):
        raise StateError(f"{path}: full dump has an unexpected layout")
    consumer = dump[0][1]
    if not isinstance(consumer, dict) or not isinstance(consumer.get("pool"), _DumpedState):
        raise StateError(f"{path}: full dump holds no pool state")
    if consumer["pool"].format != STATE_FORMAT:
        raise StateError(f"{path}: pool state format {consumer['pool'].format}, this version reads {STATE_FORMAT}")
    return dump


def write_journal(path: Path, records: Sequence[tuple[int, int, bytes]]) -> None:
    """Write (index, term, command) records as a pysyncobj journal file, atomically (tmp + rename)."""
    body = bytearray()
    for idx, term, command in records:
        size = 16 + len(command)
        body += struct.pack("<IQQ", size, idx, term) + command + struct.pack("<I", size)
    header = (_JOURNAL_NAME.ljust(24, b"\0") + PYSYNCOBJ_VERSION.encode().ljust(8, b"\0")
              + struct.pack("<II", 1, _JOURNAL_HEADER + len(body)))
    tmp = path.with_name(path.name + ".repair")
    with open(tmp, "wb") as f:
        f.write(header + body)
    durable_replace(tmp, path)


def repair_interrupted_compaction(paths: StatePaths) -> int:
    """Trim a journal that still starts before the full dump; returns the entries trimmed.

    pysyncobj writes the dump in a forked child, and only on a later tick rewrites the journal to start
    at the dump's last two entries. Killed in between, it finds a journal that does not start with those
    two and *clears* it down to them, dropping every entry after the dump that the journal held (on all
    members at once if they compacted together, which they tend to: same log length). Trimming the
    front instead keeps those entries.
    """
    if not (paths.dump.exists() and paths.journal.exists()):
        return 0
    dump = read_dump(paths.dump)
    last, before = (dump[1][1], dump[1][2], bytes(dump[1][0])), (dump[2][1], dump[2][2], bytes(dump[2][0]))
    records = read_journal(paths.journal)
    if len(records) >= 2 and records[0] == before and records[1] == last:
        return 0
    for k in range(1, len(records) - 1):
        if records[k] == before and records[k + 1] == last:
            write_journal(paths.journal, records[k:])
            log.warning("raft: %s still started %d entries before the full dump (compaction interrupted); "
                        "trimmed them, kept the %d after it", paths.journal, k, len(records) - k - 2)
            return k
    return 0


def validate_state_dir(paths: StatePaths, restore: Callable[[bytes], object]) -> dict[str, object]:
    """Read the dump, journal and meta file as pysyncobj would and refuse (StateError) if any is corrupt.

    Returns what was found (for the start-up log line): entries, dump index, stored cluster members.
    """
    found: dict[str, object] = {"journal_entries": 0, "dump_index": None, "dump_members": None}
    if paths.dump.exists():
        dump = read_dump(paths.dump)
        try:
            restore(dump[0][1]["pool"].data)
        except Exception as e:
            raise StateError(f"{paths.dump}: pool state does not restore ({e!r})") from None
        found["dump_index"] = dump[1][1]
        found["dump_members"] = sorted(str(getattr(n, "address", n)) for n in dump[3])
    if paths.journal.exists():
        found["journal_entries"] = len(read_journal(paths.journal))
    if paths.dump.exists() and paths.journal.exists():
        found["journal_trimmed"] = repair_interrupted_compaction(paths)
    if paths.meta.exists():
        try:
            meta = pickle.loads(paths.meta.read_bytes())
        except Exception as e:
            raise StateError(f"{paths.meta}: journal meta file does not decode ({e!r})") from None
        if not isinstance(meta, dict):
            raise StateError(f"{paths.meta}: journal meta file holds {type(meta).__name__}, not a dict")
        found["term"] = meta.get("currentTerm")
    return found


# --- durability (cluster.fsync) ---------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    """Flush a file's data (written through any descriptor: the page cache is the inode's) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_replace(tmp: str | Path, path: str | Path) -> None:
    """Rename a fully written ``tmp`` over ``path`` so a power cut leaves the old file or the new one,
    never a durable name over unsynced contents: the contents synced before the rename, the directory
    after it."""
    fsync_path(Path(tmp))
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def fsync_dir(path: Path) -> None:
    """Make the names in a directory durable (a rename into it, a new file)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Durability:
    """Makes a member's Raft files durable where Raft's safety depends on it (``cluster.fsync``).

    The engine calls it at those points (docs/design.md §6): :meth:`journal` before this member
    acknowledges entries or counts itself in a majority for them (one call covers every entry written
    since the last), :meth:`meta` after the term or vote changed and before any message reflecting it,
    :meth:`dump` before the journal is trimmed to the full dump. Disabled, every call returns at once: a
    kill -9 then still loses nothing (the page cache survives the process), a power cut may.
    """

    def __init__(self, paths: StatePaths, enabled: bool) -> None:
        self.paths = paths
        self.enabled = enabled
        self.syncs = 0

    def _timed(self, what: str, sync: Callable[[], None]) -> None:
        started = time.monotonic()
        sync()
        self.syncs += 1
        STORAGE_SYNC_SECONDS.labels(what).observe(time.monotonic() - started)

    def _file_and_dir(self, path: Path) -> None:
        fsync_path(path)
        fsync_dir(path.parent)

    def journal(self, flush: Callable[[], None]) -> None:
        """``flush`` makes the journal's written pages durable: for pysyncobj's mmapped file the engine
        passes an fdatasync of the file (the mapping's dirty pages and a grown size, without the GIL)."""
        if self.enabled:
            self._timed("journal", flush)

    def meta(self) -> None:
        """pysyncobj writes the meta file to a temporary name and renames it, unsynced: sync both."""
        if self.enabled:
            self._timed("meta", lambda: self._file_and_dir(self.paths.meta))

    def replace(self, tmp: str | Path, path: str | Path) -> None:
        """pysyncobj's own renames (the meta file, the full dump, a received snapshot) come here:
        :func:`durable_replace` when enabled, a plain rename otherwise."""
        if self.enabled:
            durable_replace(tmp, path)
        else:
            os.replace(tmp, path)

    def dump(self) -> None:
        """The full dump, written (and renamed into place) by pysyncobj's forked child or received from the
        leader, unsynced: sync it and the directory holding its name."""
        if self.enabled and self.paths.dump.exists():
            self._timed("dump", lambda: self._file_and_dir(self.paths.dump))


# --- beyond pysyncobj's files: the marker, the run lock, reset -------------------------------------

MARKER = "untrusted"
LOCK = "lock"
RAFT_DATA = ("journal", "journal.meta.tmp", "journal.repair", "dump", "dump.tmp", "dump.1.tmp")
META = "journal.meta"
_KEPT_META = ("currentTerm", "votedForNodeId")
"""pysyncobj's files in a member directory (and ours around them: a journal repair, a snapshot being received)."""


class UntrustedState(StateError):
    """The member directory holds the marker: the message is the reason recorded in it."""


class StateInUse(RuntimeError):
    """Another process holds this member directory (the message says which)."""


def mark_untrusted(member_dir: Path, reason: str) -> Path:
    """Persist the marker (tmp file, fsync, rename, fsync of the directory): it must outlive a crash."""
    member_dir.mkdir(parents=True, exist_ok=True)
    path = member_dir / MARKER
    tmp = path.with_name(MARKER + ".tmp")
    body = json.dumps({"reason": reason, "at": time.time(), "pid": os.getpid()}).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, body + b"\n")
    finally:
        os.close(fd)
    durable_replace(tmp, path)
    return path


def untrusted_reason(member_dir: Path) -> str | None:
    """Why this member's state is untrusted, or None when there is no marker."""
    path = member_dir / MARKER
    try:
        raw = path.read_text(errors="replace")
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw)
        reason = doc.get("reason") if isinstance(doc, dict) else None
    except ValueError:
        reason = None
    # a marker that does not parse still means "untrusted": it was written on the way out
    return str(reason) if reason else f"{path} exists"


class RunLock:
    """An exclusive ``flock`` on ``<member dir>/lock`` for as long as the member runs."""

    def __init__(self, member_dir: Path) -> None:
        self.path = member_dir / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StateInUse(f"{self.path.parent} is in use by a running connector (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def member_dirs(state_dir: Path) -> list[Path]:
    """The member directories (``raft-<address>``) under ``cluster.state_dir``."""
    return sorted(p for p in state_dir.glob("raft-*") if p.is_dir())


def reset(member_dir: Path) -> list[str]:
    """Remove the Raft data and the marker of a member that is not running; returns what was removed.
    Raises :class:`StateInUse` while the member runs."""
    lock = RunLock(member_dir)
    lock.acquire()
    try:
        removed = []
        for name in (*RAFT_DATA, MARKER):
            with contextlib.suppress(FileNotFoundError):
                (member_dir / name).unlink()
                removed.append(name)
        if _keep_only_vote(member_dir / META):
            removed.append(f"{META} (all but the term and vote)")
        return removed
    finally:
        lock.release()


def _keep_only_vote(meta: Path) -> bool:
    """Rewrite pysyncobj's meta file (a pickled dict, written by this member itself) with only the term and
    the vote: its commit index would point past the now empty journal. False when there is none."""
    try:
        raw = meta.read_bytes()
    except FileNotFoundError:
        return False
    try:
        old = pickle.loads(raw)  # our own file in a 0700 directory, as pysyncobj itself reads it
    except Exception:
        old = {}
    kept = {k: old[k] for k in _KEPT_META if isinstance(old, dict) and k in old}
    tmp = meta.with_name(meta.name + ".reset")
    tmp.write_bytes(pickle.dumps(kept))
    durable_replace(tmp, meta)
    return True

