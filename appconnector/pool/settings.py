"""What the pool depends on, derived once from the config at start (docs/design.md, the parts).

``PoolSettings.from_config`` and ``RaftSettings.from_config`` are the only places the pool reads
``Config``: ``RaftReplica(pool, raft)`` and the rest of ``pool/`` take these, so a constructor's
signature says what it depends on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from appconnector.config import Config, ConfigError

WRITE_DEADLINE = 15.0
"""Seconds before a write that was not applied fails with ReplicaUnavailable (a checkout has its own,
shorter ``pool.checkout_timeout``)."""


@dataclass(frozen=True)
class PoolSettings:
    prefixes: tuple[str, ...]      # pool.prefixes
    reuse_after: float             # pool.reuse_after
    checkout_timeout: float        # pool.checkout_timeout: a checkout not applied by then fails (SERVFAIL)
    max_queued_checkouts: int      # pool.max_queued_checkouts: more waiting are refused at once

    @classmethod
    def from_config(cls, cfg: Config) -> PoolSettings:
        p = cfg.pool
        return cls(prefixes=tuple(p.prefixes), reuse_after=p.reuse_after, checkout_timeout=p.checkout_timeout,
                   max_queued_checkouts=p.max_queued_checkouts)


@dataclass(frozen=True)
class RaftSettings:
    """One Raft member: where it keeps its state, who it is and who its partners are."""

    state_dir: str                           # cluster.state_dir
    self_address: str                        # this member's Raft address (ip:port)
    partners: tuple[str, ...]                # the other members' Raft addresses
    secret: str | None = field(default=None, repr=False)  # cluster.secret_file's content; None: a lone member's own
    bind_address: str | None = None          # listen here instead of self_address (a proxy in front)
    dynamic_membership: bool = False         # members change through Raft (tailscale mode), the stored list wins
    write_deadline: float = WRITE_DEADLINE
    fsync: bool = True                       # cluster.fsync: durable before acknowledged

    def __post_init__(self) -> None:
        if any(p != self.self_address for p in self.partners) and not self.secret:
            raise ConfigError("cluster.secret_file", "", "a secret file: required when the cluster has more "
                              "than one member (pysyncobj pickles its messages)")

    @classmethod
    def from_config(cls, cfg: Config, self_address: str, partners: Sequence[str], *,
                    dynamic_membership: bool = False) -> RaftSettings:
        """``self_address`` and ``partners`` come from the mode (standalone: the config; tailscale mode:
        the tailnet's membership); the secret file is read here, once."""
        return cls(state_dir=cfg.cluster.state_dir, self_address=self_address, partners=tuple(partners),
                   secret=cfg.read_secret(), dynamic_membership=dynamic_membership,
                   fsync=cfg.cluster.fsync)
