"""Publishing what the state machine reports: metrics and log lines, on the member that applied it.

:class:`~appconnector.pool.state.PoolState` neither counts nor logs (it is the deterministic core, the
same on every member); each applied command's :class:`~appconnector.pool.api.Report` comes back with its
``Changes`` and both replicas (``RaftReplica``, ``LocalPool``) hand it here.
"""

from __future__ import annotations

import logging

from appconnector import metrics
from appconnector.pool.api import CHECKOUT_RESULTS, Report

log = logging.getLogger("appconnector.pool.state")  # the name operators' filters and the status page know

_CHECKOUTS = [metrics.POOL_CHECKOUTS.labels(r) for r in CHECKOUT_RESULTS]
_EXHAUSTED = CHECKOUT_RESULTS.index("exhausted")


def publish(report: Report) -> None:
    """Count ``report`` in the pool metrics and log its lines."""
    for counter, n in zip(_CHECKOUTS, report.checkouts, strict=True):
        if n:
            counter.inc(n)
    if report.checkouts[_EXHAUSTED]:
        metrics.POOL_EXHAUSTED.inc(report.checkouts[_EXHAUSTED])
    if report.invalid:
        metrics.POOL_INVALID_COMMANDS.inc(report.invalid)
    if report.clock_skew:
        metrics.POOL_CLOCK_SKEW.inc(report.clock_skew)
    for template, args in report.warnings:
        log.warning(template, *args)
    for template, args in report.infos:
        log.info(template, *args)


def publish_stats(stats: dict[str, int | float]) -> None:
    """Set the pool gauges from ``PoolState.stats()`` (O(nodes): periodically, not per command)."""
    metrics.POOL_MAPPINGS.set(stats["mappings"])
    metrics.POOL_NODES.set(stats["nodes"])
    metrics.POOL_NODE_USE.set(stats["max_node_use_ratio"])
    metrics.POOL_SIZE.set(stats["pool_size"])
