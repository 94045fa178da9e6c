"""Which apps a source may use (pure): ``[[apps]]`` domains, grants, static rules.

Grants arrive as ``NodeInfo.granted``: the app names the whois ``CapMap`` gives the source under
``tailnet.capability`` (read by :func:`appconnector.tailnet.nodeinfo.granted_apps`, which says the
schema). With ``[[apps]]`` configured a name covered by no app is refused; without ``[[apps]]`` nothing
here applies.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from appconnector.config import AppConfig
from appconnector.dns.policy import DomainAllowList
from appconnector.tailnet.api import NodeInfo

NO_APP = "(none)"  # the metric label of names no app covers (app names cannot hold parentheses)


class AppAccess:
    """The ``[[apps]]`` table and its static rules, for one configuration."""

    def __init__(self, apps: Sequence[AppConfig]) -> None:
        self.apps = tuple(apps)
        # one matcher per app, the one dns.domains uses (every app has at least one pattern)
        self._domains = [(a.name, DomainAllowList(a.domains)) for a in apps]
        self._users = {a.name: frozenset(a.users) for a in apps}
        self._tags = {a.name: frozenset(a.tags) for a in apps}
        self._sources = {a.name: [ipaddress.ip_network(s, strict=False) for s in a.sources] for a in apps}

    @property
    def active(self) -> bool:
        """True when ``[[apps]]`` exist: access is then checked for every name."""
        return bool(self.apps)

    def apps_for(self, domain: str) -> tuple[str, ...]:
        """The apps covering ``domain`` (normalised), in config order."""
        return tuple(name for name, matcher in self._domains if matcher.allows(domain))

    def allowed_apps(self, info: NodeInfo, ip: str) -> frozenset[str]:
        """Apps ``info`` (asking from ``ip``) may use: its grants plus the static rules that match it."""
        allowed = set(info.granted)
        address = _address(ip)
        for app in self.apps:
            if ((info.login and info.login in self._users[app.name])
                    or any(t in self._tags[app.name] for t in info.tags)
                    or (address is not None and any(address in net for net in self._sources[app.name]))):
                allowed.add(app.name)
        return frozenset(allowed)

    def refused_app(self, domain: str, allowed: Iterable[str]) -> str | None:
        """None when a source allowed ``allowed`` may use ``domain``; else the app to count the refusal
        under (``NO_APP`` when no app covers the name)."""
        if not self.active:
            return None
        covering = self.apps_for(domain)
        if not covering:
            return NO_APP
        allowed_set = allowed if isinstance(allowed, frozenset | set) else set(allowed)
        if any(name in allowed_set for name in covering):
            return None
        return covering[0]


def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(ip)
    except ValueError:
        return None
