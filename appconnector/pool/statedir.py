"""A member's state directory beyond pysyncobj's files: the untrusted-state marker, the run lock, reset.

* The marker (``untrusted``, JSON: reason, time) is written, synced, before a member exits because its
  state can no longer be trusted (a journal conflict over applied entries, a snapshot from the leader that
  would not install). A member that finds it at start does not load its state and does not serve: DNS
  answers REFUSED, ``/readyz`` is unready, no routes, no NAT (app.py) until an operator resets the state.
* The run lock (``lock``, ``flock``) is held by the running member, so :func:`reset` can refuse while it
  runs; the kernel drops it when the process dies, even by SIGKILL.
* :func:`reset` removes the Raft data (journal, the full dump, a half-received snapshot) and the marker.
  It keeps the current term and the vote of the meta file (Raft forbids a member to forget whom it voted
  for in a term: it could vote twice and let two leaders be elected), and the membership record, so a member
  of a multi-member cluster starts empty as the same member and the leader sends it a fresh snapshot (the
  reseed); a single member starts with an empty pool.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pickle
import time
from pathlib import Path

from appconnector.pool.engine import StateError

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
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(member_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
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
    os.replace(tmp, meta)
    return True
