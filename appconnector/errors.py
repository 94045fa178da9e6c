"""The error a bad configuration value raises, wherever it is found (the config loader, a secret file,
a control-API credential). In a module of its own so that ``config.py`` and the readers it uses
(``secrets_file.py``) need not import each other; ``appconnector.config.ConfigError`` is this class."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is wrong. ``key`` is the dotted key (``pool.reuse_after``)."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"{key} = {value!r}: {allowed}")
