"""Secret files: read one only when no one but its owner can read it; create one 0600, atomically, once.
And the state directory that holds them (and every node's pool data): private, 0700.

Errors are :class:`ConfigError` naming the config key that points at the file, so ``run`` exits 2
(bad config) and ``check-config`` says which key and what to do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from pathlib import Path

from appconnector.errors import ConfigError

log = logging.getLogger(__name__)

MEMBER_SECRET_FILE = "member-secret"
"""A lone member's own Raft secret in ``cluster.state_dir`` when ``cluster.secret_file`` is empty."""
TOKEN_BYTES = 32  # 256 bits, URL-safe base64: fits an Authorization header as is


def _refuse_shared(key: str, path: Path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise ConfigError(key, str(path), "a regular file")
    if mode & 0o077:
        raise ConfigError(key, str(path), f"a file only its owner can read: it is mode {stat.S_IMODE(mode):04o}, "
                                          f"readable by group/others (chmod 600 {path})")


def read_secret_file(key: str, path: Path) -> str:
    """The secret in ``path`` (surrounding whitespace dropped); refused when group or others may read or
    write it. The mode checked is the one of the file read (fstat), not of whatever the name points at later."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(key, str(path), f"a readable file ({e.strerror})") from None
    try:
        _refuse_shared(key, path, os.fstat(fd).st_mode)
    except ConfigError:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        try:
            secret = f.read().decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(key, str(path), f"a readable text file ({e})") from None
    if not secret:
        raise ConfigError(key, str(path), "a file holding a non-empty secret")
    return secret


def ensure_secret_file(key: str, path: Path) -> str:
    """The secret in ``path``; when there is none yet, a new random one written there first.

    Written to a private temporary file, fsynced, then hard-linked into place: the link fails when
    another process made the file first (then its secret is used), and no reader ever sees a partial
    file. The file is 0600 from its creation, whatever the umask."""
    if path.exists():
        return read_secret_file(key, path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, (secrets.token_urlsafe(TOKEN_BYTES) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):  # made by another process meanwhile: use that one
            os.link(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise ConfigError(key, str(path), f"a file this process can create ({e.strerror})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return read_secret_file(key, path)


def prepare_state_dir(path: str | Path) -> None:
    """Create ``cluster.state_dir`` private (0700), or make an existing one of ours private (logged).
    ConfigError when it is not a directory, or is shared (sticky bit, e.g. /tmp, or another owner's)."""
    p = Path(path)
    try:
        p.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = p.stat()
    except OSError as e:
        raise ConfigError("cluster.state_dir", str(path), f"a directory this process can create ({e.strerror})") \
            from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError("cluster.state_dir", str(path), "a directory")
    mode = stat.S_IMODE(st.st_mode)
    if not mode & 0o077:
        return
    if mode & stat.S_ISVTX or st.st_uid != os.geteuid():
        raise ConfigError("cluster.state_dir", str(path),
                          f"a directory of this connector's own (this one is shared: mode {mode:04o}, owner uid "
                          f"{st.st_uid}); it holds the secrets and every node's pool data")
    os.chmod(p, mode & ~0o077)
    log.warning("cluster.state_dir %s was open to group/others (mode %04o): made it %04o (it holds the secrets "
                "and every node's pool data)", path, mode, mode & ~0o077)
