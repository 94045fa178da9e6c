"""Domain-name normalisation: the one spelling of a domain the pool, DNS and NAT agree on.

DNS names compare case-insensitively (RFC 4343, ASCII only), and ``github.com.`` and ``github.com`` are
the same name, so both must map to the same pool address (upstream natc keys on the name as asked: a
bug). Internationalised names arrive in their ASCII (``xn--``) form on the wire.
"""

from __future__ import annotations

MAX_NAME_LENGTH = 253
"""Longest name in text form without the trailing dot (255 wire octets)."""

MAX_LABEL_LENGTH = 63

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def normalise_domain(name: str) -> str:
    """``name`` lower-cased (ASCII), without one trailing dot; ``ValueError`` saying why if invalid.

    Valid: 1..253 characters, labels of 1..63 characters, printable ASCII only (no spaces or controls).
    """
    if not isinstance(name, str):
        raise ValueError(f"domain name must be text, not {type(name).__name__}")
    text = name[:-1] if name.endswith(".") else name
    if not text:
        raise ValueError(f"domain name {name!r} is empty (the root is not an app domain)")
    if len(text) > MAX_NAME_LENGTH:
        raise ValueError(f"domain name {name[:40]!r}... is {len(text)} characters long (at most {MAX_NAME_LENGTH})")
    for ch in text:
        if not "!" <= ch <= "~":
            raise ValueError(f"domain name {name!r} contains {ch!r} (printable ASCII only, no spaces)")
    for label in text.split("."):
        if not label:
            raise ValueError(f"domain name {name!r} has an empty label")
        if len(label) > MAX_LABEL_LENGTH:
            raise ValueError(
                f"domain name {name!r} has a label of {len(label)} characters (at most {MAX_LABEL_LENGTH})"
            )
    return text.translate(_ASCII_LOWER)
