"""Secret files and the state directory (issue 9.3): a secret others can read is refused (exit 2, the key
named), the state directory is private (0700) whoever creates it, a member's own secret is created once."""

from __future__ import annotations

import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from appconnector.config import ConfigError
from appconnector.secretfiles import MEMBER_SECRET_FILE, member_secret, prepare_state_dir, read_secret_file
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


def test_read_secret_file_names_the_key(tmp_path: Path) -> None:
    f = tmp_path / "k"
    f.write_text("  \n")
    f.chmod(0o600)
    with pytest.raises(ConfigError, match="non-empty") as ei:
        read_secret_file("tailnet.oauth_secret_file", f)
    assert ei.value.key == "tailnet.oauth_secret_file"
    f.write_text("tok\n")
    assert read_secret_file("tailnet.oauth_secret_file", f) == "tok"


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


def _member_secret(state_dir: str) -> str:
    return member_secret(state_dir)


def test_members_starting_together_agree_on_one_secret(tmp_path: Path) -> None:
    state = tmp_path / "state"
    prepare_state_dir(state)
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        secrets = pool.map(_member_secret, [str(state)] * 12)
    assert len(set(secrets)) == 1 and len(secrets[0]) >= 32
    assert sorted(p.name for p in state.iterdir()) == [MEMBER_SECRET_FILE], "no temporary file is left"
    assert stat.S_IMODE((state / MEMBER_SECRET_FILE).stat().st_mode) == 0o600
    assert member_secret(state) == secrets[0]


def test_a_member_secret_others_can_read_is_refused(tmp_path: Path) -> None:
    prepare_state_dir(tmp_path / "s")
    member_secret(tmp_path / "s")
    (tmp_path / "s" / MEMBER_SECRET_FILE).chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600") as ei:
        member_secret(tmp_path / "s")
    assert ei.value.key == "cluster.state_dir"
