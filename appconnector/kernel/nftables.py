"""The one module that talks to nftables: libnftables' JSON API, loaded with ctypes. Both the NAT
table (:mod:`appconnector.nat`) and the Raft-port filter (:mod:`appconnector.tailnet.cluster`) go
through it; what they put in their tables is rendered (purely) by each of them.

Why this way (docs/design.md §5, measured here):

- pyroute2's nftables module is a prototype: no maps, set calls raise, every call its own transaction.
  We need a concatenated-key map, a timed set the kernel fills, and one atomic transaction per change.
- libnftables (Debian ``libnftables1``, ``libnftables.so.1``) takes a JSON batch and commits it as ONE
  netlink transaction: all or nothing, so the kernel never sees half a change. Debian's
  ``python3-nftables`` is only a thin ctypes wrapper over the same library and cannot be imported from
  our own Python (it lives in Debian's dist-packages), so we call the library directly with ctypes.
- The alternative, ``nft -j -f -``, speaks the same JSON but costs a process per call (454 calls/s
  here); the library does a batch of 250 map elements in 0.8 ms and 100,000 in ~0.5 s, in-process.
  It stays as :func:`nft_cli_apply`, the fallback of :func:`transaction_runner` for the small Raft-port
  filter (and the way tests apply a batch inside a namespace they do not run in).

The library runs in the network namespace of the calling process. A context is not thread-safe, so
every call goes through one lock. Errors come back as :class:`NftError` with libnftables' message.

One read bypasses the library: :func:`dump_set_keys` asks the kernel for a set's elements over a raw
netfilter netlink socket (:mod:`appconnector.kernel.netlink`) and decodes only the keys. libnftables'
``list set`` builds its whole cache and output first (measured here: 5-7 s, superlinear, for 100,000
``seen`` elements); the kernel dump decoded with ``struct`` is linear and ~6x cheaper there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Any

from appconnector.kernel import netlink

log = logging.getLogger(__name__)

LIBRARY = "libnftables.so.1"
_OUTPUT_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON: JSON output, and JSON input is tried first

Command = dict[str, Any]
"""One libnftables JSON command, e.g. ``{"add": {"table": {...}}}``."""


class NftError(Exception):
    """libnftables refused a batch (nothing of it was applied) or could not list an object."""


class NftUnavailable(NftError):
    """libnftables is not installed or cannot be loaded (install Debian's ``libnftables1``)."""


class Nftables:
    """A libnftables context with JSON input and output. Safe to share between threads."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("nftables") or LIBRARY)
        except OSError as e:
            raise NftUnavailable(f"cannot load {LIBRARY} ({e}); install Debian's libnftables1") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        ctx = lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT
        if not ctx:
            raise NftUnavailable("nft_ctx_new failed")
        lib.nft_ctx_output_set_flags(ctx, _OUTPUT_JSON)
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        self._lib = lib
        self._ctx: int | None = ctx
        self._lock = threading.Lock()

    def _run(self, text: str) -> str:
        with self._lock:
            if self._ctx is None:
                raise NftError("nftables context is closed")
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, text.encode())
            out = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
            err = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
        if rc != 0:
            message = " ".join(line for line in err.decode(errors="replace").splitlines() if line.strip())
            raise NftError(message or f"libnftables returned {rc}")
        return out.decode()

    def run(self, commands: Sequence[Command]) -> None:
        """Apply ``commands`` as one transaction: all of them or, on error, none."""
        if commands:
            self._run(json.dumps({"nftables": list(commands)}, separators=(",", ":")))

    def list(self, what: str) -> list[dict[str, Any]]:
        """``list <what>`` (e.g. ``"set inet appconnector seen"``) as JSON objects, metainfo dropped."""
        out = self._run(f"list {what}")
        if not out.strip():
            return []
        objects: list[dict[str, Any]] = json.loads(out).get("nftables", [])
        return [o for o in objects if "metainfo" not in o]

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None


def nft_cli_apply(commands: Sequence[Command], prefix: Sequence[str] = ()) -> None:
    """Apply with ``nft -j -f -`` (one transaction). ``prefix`` e.g. ``["ip", "netns", "exec", NS]``."""
    doc = json.dumps({"nftables": list(commands)})
    res = subprocess.run([*prefix, "nft", "-j", "-f", "-"], input=doc, text=True, capture_output=True,
                         timeout=30, check=False)
    if res.returncode != 0:
        raise NftError(f"nft failed: {res.stderr.strip()}")


def transaction_runner() -> Callable[[Sequence[Command]], None]:
    """What applies one batch: :meth:`Nftables.run` when libnftables loads, else :func:`nft_cli_apply`
    (saying why once)."""
    try:
        nft = Nftables()
    except NftUnavailable as e:
        log.info("nftables through `nft -j -f -` (%s)", e)
        return nft_cli_apply
    return nft.run


# ---- raw netlink read of a set's keys (see netlink.py for why) ----------------------------------------
_NFT_MSG_GETSETELEM = (10 << 8) | 13  # NFNL_SUBSYS_NFTABLES, NFT_MSG_GETSETELEM
_NFPROTO = {"inet": 1, "ip": 2}
_LIST_TABLE, _LIST_SET, _LIST_ELEMENTS = 1, 2, 3  # NFTA_SET_ELEM_LIST_*
_ELEM_KEY, _DATA_VALUE = 1, 1                      # NFTA_SET_ELEM_KEY, NFTA_DATA_VALUE


def dump_set_keys(family: str, table: str, name: str) -> list[bytes]:
    """Every element key of set ``family table name`` as raw bytes (a concatenation of ipv4_addr
    fields is 4 network-order bytes per field). Raises NftError (e.g. when the set is missing)."""
    payload = (netlink.attr(_LIST_TABLE, table.encode() + b"\0")
               + netlink.attr(_LIST_SET, name.encode() + b"\0"))
    keys: list[bytes] = []
    try:
        for buf, start, end in netlink.dump(_NFT_MSG_GETSETELEM, _NFPROTO[family], payload):
            _collect_keys(buf, start, end, keys)
    except OSError as e:
        raise NftError(f"list set {family} {table} {name}: {e.strerror or e}") from None
    return keys


def _collect_keys(buf: bytes, start: int, end: int, keys: list[bytes]) -> None:
    """Append each element's NFTA_DATA_VALUE key (a hot loop: no generators per element)."""
    unpack = netlink.NLATTR.unpack_from
    mask = netlink.NLA_TYPE_MASK
    elements = netlink.find(buf, start, end, _LIST_ELEMENTS)
    if elements is None:
        return
    e, b = elements
    while e + 4 <= b:
        elen, _ = unpack(buf, e)  # NFTA_LIST_ELEM
        if elen < 4:
            break
        f, f_end = e + 4, e + elen
        while f + 4 <= f_end:
            flen, fkind = unpack(buf, f)
            if flen < 4:
                break
            if fkind & mask == _ELEM_KEY:
                vlen, vkind = unpack(buf, f + 4)
                if vkind & mask == _DATA_VALUE and vlen >= 4:
                    keys.append(buf[f + 8:f + 4 + vlen])
                break
            f += (flen + 3) & ~3
        e += (elen + 3) & ~3
