"""The real-tailnet tier: every test here is marked ``realnet`` and skips (saying why) when the peers
are not built (``./dev peers``) or the run is not root. Each module brings up its own tailnet once
(``tests.realnet.tailnet.running``) and shares it between its tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.realnet import peers
from tests.realnet.tailnet import MEASURED, OTHER_ROUTE, SERVED, Tailnet, running


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/realnet/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.realnet)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in MEASURED:
        terminalreporter.write_line(f"realnet measured: {line}")


@pytest.fixture(scope="package", autouse=True)
def _peers_present() -> None:
    if (reason := peers.missing()) is not None:
        pytest.skip(reason)


@pytest.fixture(scope="package")
def shared(_peers_present: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tailnet]:
    """One tailnet for the non-destructive tests: three tagged connectors started together (c3 with
    tailscaled's own DNS, --accept-dns=true, and a route of its own), clients cl1 (alice) and cl2 (bob)."""
    with running(tmp_path_factory.mktemp("realnet"), "sh") as net:
        net.serve_origin(SERVED)
        conns = [net.connector("c1"), net.connector("c2"), net.connector("c3", accept_dns=True,
                                                                          advertise=[OTHER_ROUTE])]
        net.client("cl1", user="alice")
        net.client("cl2", user="bob")
        net.wait_online()
        for c in conns:  # together: exactly one of them may bootstrap
            c.start_appconnector(wait=False)
        for c in conns:
            c.wait_connector_ready()
        yield net
