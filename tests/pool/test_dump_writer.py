"""pysyncobj's forked full-dump writer, as the engine sets it up (docs/design.md §6).

At a million mappings the writer is seconds of CPU, and the three members fork theirs within moments of
each other: at normal priority they took the cores from the members' tick threads and answers stalled
(bench/README.md, "scale"). So a child forked from a tick thread runs at the lowest priority, holds none
of the member's descriptors (a kept listening socket would outlive a kill -9 of the member, kept pipes
would hold a supervisor's stdout open) and dies with the tick thread that forked it (a writer outliving
its member could rename an old dump over the one a restarted member writes).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable

from appconnector.pool import pysyncobj_engine as engine

_OPEN, _STDOUT_KEPT = 32, 64


def _fork_from(tick_thread: bool, child: Callable[[socket.socket], int], *, thread_waits: bool = True) -> int:
    """Fork from a fresh thread (registered as a tick thread or not); the child runs ``child(listener)``
    and exits with its result. The forking thread waits for the child, or (``thread_waits=False``) ends
    as soon as the child is set up (at nice 19: the engine's hook renices last). Returns the wait status."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def body() -> None:
        me = threading.get_ident()
        if tick_thread:
            engine._TICK_THREADS.add(me)
        try:
            pid = os.fork()
        finally:
            engine._TICK_THREADS.discard(me)
        if pid == 0:
            try:
                os._exit(child(listener))
            finally:
                os._exit(255)
        if thread_waits:
            statuses.append(os.waitpid(pid, 0)[1])
            return
        pids.append(pid)
        deadline = time.monotonic() + 20
        while os.getpriority(os.PRIO_PROCESS, pid) != 19 and time.monotonic() < deadline:
            time.sleep(0.01)

    pids: list[int] = []
    statuses: list[int] = []
    t = threading.Thread(target=body)
    t.start()
    t.join(timeout=60)
    listener.close()
    if thread_waits:
        assert statuses, "the child did not finish"
        return statuses[0]
    assert pids, "fork failed"
    return os.waitpid(pids[0], 0)[1]


def _report(listener: socket.socket) -> int:
    """niceness + _OPEN if the listener is still open + _STDOUT_KEPT if stdout is not /dev/null."""
    code = os.nice(0)
    try:
        os.fstat(listener.fileno())
        code += _OPEN
    except OSError:
        pass
    null = os.stat(os.devnull)
    out = os.fstat(1)
    if (out.st_dev, out.st_ino) != (null.st_dev, null.st_ino):
        code += _STDOUT_KEPT
    return code


def test_a_dump_writer_yields_the_cpu_and_holds_no_descriptor_of_the_member() -> None:
    code = os.waitstatus_to_exitcode(_fork_from(True, _report))
    assert code != 255, "the child failed to report"
    assert code & 31 == 19, "not at nice 19"
    assert not code & _OPEN, "the member's listening socket is still open in the writer"
    assert not code & _STDOUT_KEPT, "the writer holds the member's stdout"


def test_a_dump_writer_dies_with_the_tick_thread_that_forked_it() -> None:
    def outlive(listener: socket.socket) -> int:
        time.sleep(30)  # the forking thread returned at once: the writer must not get this far
        return 0

    status = _fork_from(True, outlive, thread_waits=False)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_other_forks_keep_their_descriptors_and_priority() -> None:
    code = os.waitstatus_to_exitcode(_fork_from(False, _report))
    assert code & 31 == os.nice(0) and code & _OPEN
