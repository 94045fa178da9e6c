"""Files that hold secrets, and the state directory that holds them (and the per-node pool data).

* :func:`read_secret_file` reads a secret the operator configured (``cluster.secret_file``,
  ``tailnet.api_key_file``, ``tailnet.oauth_secret_file``) and refuses one that group or others may read:
  a secret that has leaked cannot be trusted, so ``run`` and ``check-config`` exit 2 naming the key.
* :func:`member_secret` is a member's own Raft secret when no ``cluster.secret_file`` is configured:
  pysyncobj unpickles what arrives on the Raft port, so it always runs with a password, and a one-member
  cluster gets a random one (``<state_dir>/member-secret``, 0600, created atomically, reused on restart).
* :func:`prepare_state_dir` creates ``cluster.state_dir`` 0700, tightens an existing directory of ours
  that group or others may enter (with a warning), and refuses a shared one (sticky bit, e.g. ``/tmp``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from pathlib import Path

from appconnector.config import ConfigError

log = logging.getLogger(__name__)

MEMBER_SECRET_FILE = "member-secret"
_OTHERS = 0o077  # group and other permission bits


def read_secret_file(key: str, path: str | Path) -> str:
    """The stripped contents of the secret file ``path`` (config key ``key``); ConfigError naming the key
    when it is missing, empty or readable by anyone but its owner."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(key, str(path), f"a readable file ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:  # the mode of the file read, not of whatever the name points at later
        mode = os.fstat(f.fileno()).st_mode
        if mode & _OTHERS:
            raise ConfigError(key, str(path), f"a file only its owner can read (mode {stat.S_IMODE(mode):04o}; "
                                              f"run: chmod 600 {path})")
        value = f.read().decode("utf-8", "replace").strip()
    if not value:
        raise ConfigError(key, str(path), "a file holding a non-empty secret")
    return value


def member_secret(state_dir: str | Path) -> str:
    """This member's own Raft secret in ``state_dir``, created on first use. Creation is atomic: the
    secret is written to a private temporary file that is then hard-linked to its name, so the name never
    holds a partial secret and two starts racing agree on one (the loser reads the winner's)."""
    path = Path(state_dir) / MEMBER_SECRET_FILE
    if not path.exists():
        tmp = path.with_name(f".{MEMBER_SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_urlsafe(32).encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
                _fsync_dir(path.parent)
                log.info("raft: no cluster.secret_file: created this member's own Raft secret %s", path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return read_secret_file("cluster.state_dir", path)


def prepare_state_dir(path: str | Path) -> None:
    """Create ``cluster.state_dir`` private (0700), or make an existing one private. ConfigError when it is
    not a directory, or is a shared one (sticky bit) that must not be narrowed."""
    p = Path(path)
    try:
        p.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = p.stat()
    except OSError as e:
        raise ConfigError("cluster.state_dir", str(path), f"a directory this process can create ({e.strerror or e})") \
            from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError("cluster.state_dir", str(path), "a directory")
    mode = stat.S_IMODE(st.st_mode)
    if not mode & _OTHERS:
        return
    if mode & stat.S_ISVTX or st.st_uid != os.geteuid():
        raise ConfigError("cluster.state_dir", str(path),
                          f"a directory of this connector's own (this one is shared: mode {mode:04o}, owner uid "
                          f"{st.st_uid}); it holds the Raft secret and every node's pool data")
    os.chmod(p, mode & ~_OTHERS)
    log.warning("cluster.state_dir %s was open to group/others (mode %04o): made it %04o (it holds the Raft "
                "secret and every node's pool data)", path, mode, mode & ~_OTHERS)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
