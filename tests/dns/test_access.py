"""The pure access core: whois CapMap → granted apps, [[apps]] domain matching, static rules, and the
config keys' validation (errors name the key)."""

from __future__ import annotations

from pathlib import Path

import pytest

from appconnector.config import AppConfig, ConfigError, load
from appconnector.dns.access import NO_APP, AppAccess
from appconnector.tailnet.api import NodeInfo
from appconnector.tailnet.nodeinfo import granted_apps

CAP = "appconnector.example/cap/apps"


@pytest.mark.parametrize(("capmap", "apps"), [
    (None, set()),                                                     # tailscaled's "CapMap": null
    ({}, set()),
    ({"other.example/cap/x": [{"apps": ["web"]}]}, set()),             # another capability
    ({CAP: [{"apps": ["web", "wiki"]}]}, {"web", "wiki"}),
    ({CAP: [{"apps": ["web"]}, {"apps": ["wiki"]}]}, {"web", "wiki"}),  # two grants: the union
    ({CAP: [{"apps": "web"}, 7, None, {"app": ["x"]}, {"apps": [1, "wiki"]}]}, {"wiki"}),  # junk skipped
    ({CAP: {"apps": ["web"]}}, set()),                                 # not an array: nothing
    ([CAP], set()),
])
def test_granted_apps_from_capmap(capmap: object, apps: set[str]) -> None:
    assert granted_apps(capmap, CAP) == apps


ACCESS = AppAccess([
    AppConfig("web", ("app.example", "*.app.example")),
    AppConfig("deep", ("*.deep.app.example",), tags=("tag:ci",)),
    AppConfig("wiki", ("wiki.example",), users=("alice@example.com",)),
    AppConfig("lan", ("lan.example",), sources=("10.1.0.0/16",)),
])


def node(**kw: object) -> NodeInfo:
    return NodeInfo(node="n1", name="n1", ipv4=("100.64.0.5",), **kw)  # type: ignore[arg-type]


def test_apps_for_matches_exact_names_and_wildcards() -> None:
    assert ACCESS.apps_for("app.example") == ("web",)
    assert ACCESS.apps_for("x.deep.app.example") == ("web", "deep")
    assert ACCESS.apps_for("deep.app.example") == ("web",)   # "*." is below the name, not the name
    assert ACCESS.apps_for("notapp.example") == ()


def test_refusal_by_grant_static_rule_and_uncovered_name() -> None:
    nobody = ACCESS.allowed_apps(node(), "100.64.0.5")
    assert nobody == frozenset()
    assert ACCESS.refused_app("app.example", nobody) == "web"
    assert ACCESS.refused_app("elsewhere.example", nobody) == NO_APP
    granted = ACCESS.allowed_apps(node(granted=frozenset({"web"})), "100.64.0.5")
    assert ACCESS.refused_app("a.app.example", granted) is None
    assert ACCESS.refused_app("x.deep.app.example", granted) is None  # covered by web too
    assert ACCESS.refused_app("wiki.example", granted) == "wiki"
    assert ACCESS.allowed_apps(node(login="alice@example.com"), "100.64.0.5") == {"wiki"}
    assert ACCESS.allowed_apps(node(tags=("tag:ci",)), "100.64.0.5") == {"deep"}
    assert ACCESS.allowed_apps(node(), "10.1.2.3") == {"lan"}
    assert AppAccess([]).refused_app("anything.example", frozenset()) is None  # no [[apps]]: no check


def _load(tmp_path: Path, text: str) -> None:
    (tmp_path / "c.toml").write_text(text)
    load(tmp_path / "c.toml", env={})


@pytest.mark.parametrize(("text", "key"), [
    ('[[apps]]\nname = "web"\n', "apps[0].domains"),
    ('[[apps]]\nname = "w b"\ndomains = ["a.example"]\n', "apps[0].name"),
    ('[[apps]]\nname = "w"\ndomains = ["a.example"]\n[[apps]]\nname = "w"\ndomains = ["b.example"]\n',
     "apps[1].name"),
    ('[[apps]]\nname = "w"\ndomains = ["bad domain"]\n', "apps[0].domains"),
    ('[[apps]]\nname = "w"\ndomains = ["a.example"]\nsources = ["10.0.0.0/8"]\n', "apps[0].sources"),
    ('[[apps]]\nname = "w"\ndomains = ["a.example"]\ntags = ["ci"]\n', "apps[0].tags"),
    ('[[apps]]\nname = "w"\ndomains = ["a.example"]\ncolour = 1\n', "apps[0].colour"),
    ('[tailnet]\nmode = "standalone"\n[[apps]]\nname = "w"\ndomains = ["a.example"]\nusers = ["a@b"]\n',
     "apps[0].users"),
    ('[tailnet]\ncapability = ""\n', "tailnet.capability"),
    ('[tailnet]\naccess_recheck = "0s"\n', "tailnet.access_recheck"),
    ('apps = "web"\n', "apps"),
])
def test_bad_apps_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, text)
    assert e.value.key == key


def test_apps_config_loads(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('[[apps]]\nname = "github"\ndomains = ["github.com", "*.github.com"]\n'
                                     'tags = ["tag:ci"]\nusers = ["alice@example.com"]\n')
    cfg = load(tmp_path / "c.toml", env={})
    assert cfg.apps == (AppConfig("github", ("github.com", "*.github.com"), ("alice@example.com",), ("tag:ci",)),)
    assert cfg.tailnet.capability == CAP
