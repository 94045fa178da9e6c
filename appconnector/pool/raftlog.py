"""The journal guard: holds pysyncobj 0.3.17 followers to Raft's log-matching rules.

Why (docs/design.md §6): when a follower gets an ``append_entries`` whose ``prevLogIdx`` is behind the end of
its log, pysyncobj deletes every entry after ``prevLogIdx`` and appends what the message carried, whatever
the terms say. After a connection reset the leader resends from a stale next-index, capped at
``appendEntriesBatchSizeBytes``, so the follower cuts entries it had already acknowledged and applied
("truncating already-applied log entries … may have diverged"); if the leader dies in that window a
committed write is lost. It then sets its commit index to min(leader commit, last log index), which is
only safe because of that truncation.

Raft (§5.3, receiver rules 3-5) says instead: delete an existing entry only when it conflicts with a new
one (same index, different term), append only what is missing, and set the commit index to
min(leader commit, index of the last new entry). Both halves are enforced here, in front of pysyncobj's
own handling and without changing it:

1. :func:`plan_append` rewrites each incoming ``append_entries`` before pysyncobj sees it: entries the log
   already holds (same index and term) are dropped from the message and ``prevLogIdx`` advanced past them,
   so pysyncobj's truncation can only happen at the first real term conflict. When every carried entry is
   already present and the log goes further, the entries after the last carried one are held out of sight
   for the duration of that one message (:meth:`GuardedJournal.hold_tail`), so pysyncobj sees nothing to
   cut; they are back as soon as the message is handled. The message's ``commit_index`` becomes
   min(leader commit, last index the message carried) — the second half: with the tail kept, pysyncobj's
   min(leader commit, last log index) could otherwise commit stale entries past what the leader vouched for.
2. :class:`GuardedJournal` wraps pysyncobj's journal as a last line of defence: inside an append, a
   ``deleteEntriesFrom`` is only remembered; an ``add`` bringing an entry the log already holds with the
   same term keeps it, the first ``add`` whose term differs truncates there, and a remembered truncation
   that no conflicting ``add`` confirmed is refused (``appconnector_raft_truncations_refused``). With (1)
   in place it should never refuse anything; a non-zero count means (1) missed a case.
3. Durability (``cluster.fsync``, :class:`~appconnector.pool.storage.Durability`): every change marks the
   journal dirty, and :meth:`GuardedJournal.sync` makes it durable; the engine calls it before every
   outgoing answer or vote and after every tick, so nothing is acknowledged or counted for a majority unsynced
   (one sync covers all the entries a message or a tick brought). A term/vote change is synced before it
   returns (pysyncobj sends the vote after), the full dump before the journal is trimmed to it.
4. :class:`DivergenceWatch` listens to pysyncobj's logger for its "may have diverged" line, which after (1)
   only fires for a real conflict over applied entries: a Raft safety violation, counted in
   ``appconnector_raft_diverged`` and logged loudly.

Either kind of divergence (the guard's own conflict over applied entries, or pysyncobj's line) calls
``on_diverged``: the engine then fail-stops the member (it marks its state untrusted and exits, see
:mod:`appconnector.pool.storage`), as etcd does, instead of serving state the cluster does not have.

Chunked transfers (single commands ≥ ``appendEntriesBatchSizeBytes``) are not rewritten: the replica keeps
every command below that size, so the leader never chunks (see replica.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from appconnector.metrics import RAFT_DIVERGED, RAFT_TRUNCATIONS_REFUSED
from appconnector.pool.storage import Durability

log = logging.getLogger(__name__)

Entry = tuple[bytes, int, int]
"""A pysyncobj log entry: (command bytes, index, term)."""

DIVERGED_MARKER = "may have diverged"
"""The words pysyncobj logs when it truncates applied entries; tests and the watch look for them."""


@dataclass(frozen=True, slots=True)
class AppendPlan:
    """How to hand one ``append_entries`` to pysyncobj."""

    message: dict[str, Any]
    """The (possibly rewritten) message."""
    hold_after: int | None
    """Hold the log entries after this index out of sight while pysyncobj handles the message."""
    last_carried: int
    """The last index the leader's message vouched for (its last entry, else prevLogIdx)."""
    dropped: int
    """Leading entries dropped because the log already held them."""


def _term_at(log: Sequence[Entry] | Any, first: int, index: int) -> int:
    return int(log[index - first][2])


def plan_append(message: dict[str, Any], log: Sequence[Entry] | Any) -> AppendPlan | None:
    """Rewrite an ``append_entries`` so pysyncobj follows Raft's rules; None = hand it over unchanged.

    Unchanged when it is not a regular append (chunked transfer, snapshot install), when the consistency
    check on ``prevLogIdx``/``prevLogTerm`` fails (pysyncobj rejects it without touching the log), or when
    its entries are not the contiguous run after ``prevLogIdx`` that a leader sends.
    """
    if message.get("type") != "append_entries" or "prevLogIdx" not in message:
        return None
    if message.get("transmission") is not None:
        return None
    prev_idx = message["prevLogIdx"]
    prev_term = message["prevLogTerm"]
    entries: list[Entry] = list(message.get("entries") or [])
    if not isinstance(prev_idx, int) or len(log) == 0:
        return None
    first = int(log[0][1])
    last = int(log[-1][1])
    if prev_idx < first or prev_idx > last or _term_at(log, first, prev_idx) != prev_term:
        return None
    for k, entry in enumerate(entries):
        if entry[1] != prev_idx + 1 + k:
            return None
    last_carried = entries[-1][1] if entries else prev_idx

    kept = 0  # leading entries the log already holds with the same term
    for entry in entries:
        idx, term = entry[1], entry[2]
        if idx > last or _term_at(log, first, idx) != term:
            break
        kept += 1
    new_prev_idx, new_prev_term = (entries[kept - 1][1], entries[kept - 1][2]) if kept else (prev_idx, prev_term)
    remaining = entries[kept:]
    # Nothing left to append but the log goes further: those later entries do not conflict with anything
    # the leader said, so Raft keeps them. Hide them from pysyncobj for this one message.
    hold_after = new_prev_idx if not remaining and last > new_prev_idx else None

    rewritten = dict(message)
    rewritten["prevLogIdx"] = new_prev_idx
    rewritten["prevLogTerm"] = new_prev_term
    rewritten["entries"] = remaining
    rewritten["commit_index"] = min(int(message["commit_index"]), last_carried)
    return AppendPlan(rewritten, hold_after, last_carried, kept)


class GuardedJournal:
    """A pysyncobj journal (``FileJournal``/``MemoryJournal``) with lazy, term-checked truncation.

    Outside :meth:`begin_append`/:meth:`end_append` it behaves exactly like the journal it wraps, plus the
    syncs of ``durability``. All calls come from the one thread that ticks pysyncobj; ``lock`` only guards
    readers on other threads.
    """

    def __init__(self, inner: Any, last_applied: Callable[[], int],
                 on_diverged: Callable[[str], None] | None = None, durability: Durability | None = None,
                 trim: Callable[[Any, int], Any] | None = None,
                 flush: Callable[[Any], None] | None = None) -> None:
        """``trim(inner, position)``, when given, replaces pysyncobj's in-place trim of the front: it
        returns the journal holding ``inner[position:]`` (written aside and renamed over the old one).
        ``flush(inner)`` makes the journal's written pages durable (default: the journal's own ``flush``,
        msync of its mapping)."""
        self._inner = inner
        self._flush = flush or (lambda journal: journal.flush())
        self._durability = durability
        self._trim = trim
        self.dirty = False  # changed since the last sync
        self._last_applied = last_applied
        self._on_diverged = on_diverged
        self._limit: int | None = None  # while holding a tail: how many entries are visible
        self._in_append = False
        self._pending_from: int | None = None  # a deferred deleteEntriesFrom (list position)
        self.refused = 0
        self.truncated_applied = 0
        self.lock = threading.Lock()

    # --- the guard's own controls ------------------------------------------------------------------

    def hold_tail(self, after_index: int) -> None:
        """Show only the entries up to ``after_index`` until :meth:`release_tail`."""
        first = self._inner[0][1]
        self._limit = after_index - first + 1

    def release_tail(self) -> None:
        self._limit = None

    def begin_append(self) -> None:
        self._in_append = True
        self._pending_from = None

    def end_append(self) -> None:
        if self._pending_from is not None:
            # pysyncobj asked to cut entries, but no new entry conflicted with them: Raft keeps them.
            self.refused += 1
            RAFT_TRUNCATIONS_REFUSED.inc()
            log.warning("journal guard: refused to truncate matching entries from log position %d",
                        self._pending_from)
        self._pending_from = None
        self._in_append = False

    def last_index(self) -> int:
        """The real last index (ignores a held tail)."""
        return int(self._inner[-1][1])

    def sync(self) -> None:
        """Make every change since the last sync durable (one sync for all of them; none when clean)."""
        if self.dirty:
            self.dirty = False
            if self._durability is not None:
                self._durability.journal(lambda: self._flush(self._inner))

    # --- pysyncobj's journal interface ---------------------------------------------------------------

    def add(self, command: bytes, idx: int, term: int) -> None:
        if self._limit is not None:
            # plan_append only holds a tail when nothing is left to append; if pysyncobj appends anyway,
            # show the whole log again: the term checks below still keep matching entries.
            log.critical("journal guard: append while a tail is held (index %d); releasing it", idx)
            self._limit = None
        n = len(self._inner)
        if n and self._in_append:
            pos = idx - self._inner[0][1]
            if 0 <= pos < n:
                if self._inner[pos][2] == term:
                    return  # already there with the same term: keep it (Raft rule 4)
                self._truncate(pos)  # first conflict: now truncation is right (Raft rule 3)
            elif pos != n:
                raise ValueError(f"journal guard: entry {idx} does not follow the log end {self.last_index()}")
        self._pending_from = None
        with self.lock:
            self._inner.add(command, idx, term)
        self.dirty = True

    def _truncate(self, pos: int) -> None:
        idx = self._inner[0][1] + pos
        applied = self._last_applied()
        with self.lock:
            self._inner.deleteEntriesFrom(pos)
        self.dirty = True
        if idx <= applied:
            self.truncated_applied += 1
            RAFT_DIVERGED.inc()
            log.critical("journal guard: term conflict at index %d at or below the last applied %d: "
                         "truncating applied entries, state %s", idx, applied, DIVERGED_MARKER)
            if self._on_diverged is not None:  # fail-stop: the applied state is not the cluster's
                self._on_diverged(f"journal conflict at index {idx}, at or below the last applied {applied}: "
                                  f"this member's state {DIVERGED_MARKER} from the cluster's")

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        if self._in_append:
            if self._limit is not None:
                self._pending_from = min(entryFrom, self._limit)
            else:
                self._pending_from = entryFrom
            return
        self._truncate(entryFrom)

    def deleteEntriesTo(self, entryTo: int) -> None:
        # pysyncobj trims the front once its forked child wrote the full dump: that dump must be durable
        # first, or a power cut could leave neither the trimmed entries nor the dump holding them
        self._sync_dump()
        with self.lock:
            if self._trim is not None:
                self._inner = self._trim(self._inner, entryTo)
            else:
                self._inner.deleteEntriesTo(entryTo)
        self.dirty = self._trim is None

    def clear(self) -> None:
        self._sync_dump()  # a snapshot from the leader replaces the journal: it is on disk first
        self._limit = None
        self._pending_from = None
        with self.lock:
            self._inner.clear()
        self.dirty = True

    def _sync_dump(self) -> None:
        if self._durability is not None:
            self._durability.dump()

    def __getitem__(self, item: Any) -> Any:
        if self._limit is None:
            return self._inner[item]
        if isinstance(item, slice):
            return self._inner[0:self._limit][item]
        if item < 0:
            item += self._limit
        if not 0 <= item < self._limit:
            raise IndexError(item)
        return self._inner[item]

    def __len__(self) -> int:
        return len(self._inner) if self._limit is None else self._limit

    def _destroy(self) -> None:
        self._inner._destroy()

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        self._inner.setRaftCommitIndex(raftCommitIndex)

    def getRaftCommitIndex(self) -> int:
        return int(self._inner.getRaftCommitIndex())

    def setCurrentTerm(self, term: int, votedForNodeId: Any) -> None:
        # pysyncobj stores the meta file here (unsynced) and sends the vote or request afterwards
        self._inner.setCurrentTerm(term, votedForNodeId)
        if self._durability is not None:
            self._durability.meta()

    def getCurrentTerm(self) -> int:
        return int(self._inner.getCurrentTerm())

    def getVotedForNodeId(self) -> Any:
        return self._inner.getVotedForNodeId()

    def onOneSecondTimer(self) -> None:
        self._inner.onOneSecondTimer()

    def flush(self) -> None:
        flush = getattr(self._inner, "flush", None)
        if flush is not None:
            flush()


class DivergenceWatch(logging.Handler):
    """Counts pysyncobj's "may have diverged" lines (a Raft safety violation) and repeats them loudly."""

    def __init__(self, on_diverged: Callable[[str], None] | None = None) -> None:
        super().__init__(level=logging.CRITICAL)
        self.count = 0
        self._on_diverged = on_diverged

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a broken record must not break the tick thread
            return
        if DIVERGED_MARKER not in text:
            return
        self.count += 1
        RAFT_DIVERGED.inc()
        log.critical("RAFT SAFETY: pysyncobj truncated applied entries (%s); this member's state %s.",
                     text, DIVERGED_MARKER)
        if self._on_diverged is not None:
            self._on_diverged(f"pysyncobj truncated applied entries ({text})")
