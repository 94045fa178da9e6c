"""Secret files and the state directory (issue 9.3): a secret others can read is refused by ``run`` and
``check-config`` (exit 2, the key named); the state directory is private (0700) whoever creates it.
The helpers' own cases (creation once, races, every mode) are in tests/config/test_secrets_file.py."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from appconnector.config import ConfigError
from appconnector.secrets_file import prepare_state_dir
from tests.ops.helpers import cli, free_port
from tests.ops.test_run import standalone_config


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_secret_file_others_can_read_is_refused_by_run_and_check_config(tmp_path: Path, mode: int) -> None:
    secret = tmp_path / "secret"
    secret.write_text("shared-secret\n")
    secret.chmod(mode)
    cfg = standalone_config(tmp_path, free_port(), free_port(), free_port())
    env = {"APPCONNECTOR_CLUSTER_PEERS": f"127.0.0.1:{free_port()}", "APPCONNECTOR_CLUSTER_SECRET_FILE": str(secret)}
    check = cli("check-config", "--config", str(cfg), env=env)
    assert check.returncode == 2 and "cluster.secret_file" in check.stderr and "chmod 600" in check.stderr
    run = cli("run", "--config", str(cfg), env=env, timeout=60)
    assert run.returncode == 2 and "cluster.secret_file" in run.stderr
    assert not (tmp_path / "state").exists(), "nothing started"
    secret.chmod(0o600)
    assert cli("check-config", "--config", str(cfg), env=env).returncode == 0


def test_the_state_directory_is_created_private_and_an_open_one_is_tightened(tmp_path: Path) -> None:
    old = os.umask(0o022)  # as a shell outside systemd (whose unit sets UMask=0077)
    try:
        fresh = tmp_path / "a" / "state"
        prepare_state_dir(fresh)
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
        opened = tmp_path / "open"
        opened.mkdir(mode=0o755)
        opened.chmod(0o755)
        prepare_state_dir(opened)
        assert stat.S_IMODE(opened.stat().st_mode) == 0o700
    finally:
        os.umask(old)


def test_a_shared_state_directory_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "tmp-like"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(ConfigError) as ei:
        prepare_state_dir(shared)
    assert ei.value.key == "cluster.state_dir"
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777, "a shared directory is left as it is"
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ConfigError) as ei:
        prepare_state_dir(a_file)
    assert ei.value.key == "cluster.state_dir"
