"""Secret files (the admin token): made once, 0600 whatever the umask, reused; others' eyes refused."""

from __future__ import annotations

import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from appconnector.config import ConfigError
from appconnector.secrets_file import ensure_secret_file, read_secret_file

KEY = "http.admin_token_file"


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_made_private_once_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "admin.token"
    old = os.umask(0)  # the widest umask: the file is 0600 anyway
    try:
        token = ensure_secret_file(KEY, path)
    finally:
        os.umask(old)
    assert _mode(path) == 0o600
    assert len(token) >= 40, "about 256 random bits"
    assert ensure_secret_file(KEY, path) == token, "a restart reuses the token"
    assert read_secret_file(KEY, path) == token
    assert sorted(p.name for p in tmp_path.iterdir()) == ["admin.token"], "no temporary file left behind"
    assert ensure_secret_file(KEY, tmp_path / "other.token") != token


def _make(path: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    out.put(ensure_secret_file(KEY, Path(path)))


def test_concurrent_first_starts_agree_on_one_token(tmp_path: Path) -> None:
    path = tmp_path / "admin.token"
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_make, args=(str(path), out)) for _ in range(8)]
    for p in procs:
        p.start()
    tokens = {out.get(timeout=30) for _ in procs}
    for p in procs:
        p.join(30)
    assert tokens == {path.read_text().strip()}, "every process uses the one file that won"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o622])
def test_a_file_group_or_others_can_read_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "admin.token"
    path.write_text("s3cret\n")
    path.chmod(mode)
    for fn in (read_secret_file, ensure_secret_file):
        with pytest.raises(ConfigError) as e:
            fn(KEY, path)
        assert e.value.key == KEY and "chmod 600" in str(e.value)
    assert path.read_text() == "s3cret\n", "the operator's file is left as it was"


def test_empty_or_missing_or_not_a_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    with pytest.raises(ConfigError, match="non-empty"):
        read_secret_file(KEY, empty)
    with pytest.raises(ConfigError, match="readable file"):
        read_secret_file(KEY, tmp_path / "absent")
    with pytest.raises(ConfigError, match="can create"):
        ensure_secret_file(KEY, tmp_path / "no-such-dir" / "admin.token")
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="regular file"):
        read_secret_file(KEY, d)
