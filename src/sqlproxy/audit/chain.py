"""The HMAC-SHA256 hash chain over audit records, and the chain key.

``hash = HMAC(key, prev_hash || canonical_json(record without hash))``; the first record's
``prev_hash`` is 64 zeros and its seq is 1. Without the key, no one can change, insert or
remove a record and recompute the hashes that follow.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlproxy.audit.record import GENESIS_HASH, AuditRecord, attach_json, encode_linked, set_chain

log = logging.getLogger(__name__)

MIN_KEY_BYTES = 16


@dataclass(frozen=True, slots=True)
class ChainState:
    """The head of a chain: the last seq written and its hash (seq 0 = empty chain)."""

    seq: int
    head_hash: str

    @classmethod
    def genesis(cls) -> ChainState:
        return cls(0, GENESIS_HASH)


def compute_hash(key: bytes, record: AuditRecord) -> str:
    """The hash ``record`` must carry, given its own ``prev_hash`` and content."""
    mac = hmac.new(key, record.prev_hash.encode("ascii"), hashlib.sha256)
    mac.update(record.canonical())
    return mac.hexdigest()


_TRANS_36 = bytes(x ^ 0x36 for x in range(256))
_TRANS_5C = bytes(x ^ 0x5C for x in range(256))


class KeyedMac:
    """HMAC-SHA256 (RFC 2104) with one key, as ``hmac.new(key, msg, hashlib.sha256)``: the
    inner and outer hashes are keyed once and copied per message, all in C (``hmac.HMAC.copy``
    is Python code and keys nothing ahead; this is twice as fast per record)."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        block = hashlib.sha256().block_size
        if len(key) > block:
            key = hashlib.sha256(key).digest()
        key = key.ljust(block, b"\0")
        self._inner = hashlib.sha256(key.translate(_TRANS_36))
        self._outer = hashlib.sha256(key.translate(_TRANS_5C))

    def hexdigest(self, msg: bytes) -> str:
        inner = self._inner.copy()
        inner.update(msg)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()


def seal(key: bytes, record: AuditRecord, state: ChainState, *, in_place: bool = False) -> AuditRecord:
    """``record`` appended after ``state``: next seq, linked and hashed. The sealed record keeps
    the JSON text that was hashed, so the sinks write it without serializing the record again.

    ``in_place`` seals ``record`` itself instead of a copy, for a caller that owns a record no
    one else holds (the audit writer's ``enqueue``); it must not have been sealed before."""
    return _seal(KeyedMac(key), record, state.seq + 1, state.head_hash, in_place)


def _seal(mac: KeyedMac, record: AuditRecord, seq: int, prev_hash: str, in_place: bool) -> AuditRecord:
    # What compute_hash(key, linked) covers, built from each field's JSON text once: the
    # canonical bytes are json.dumps(sort_keys=True) of the linked record without its hash.
    if in_place and record.hash:
        raise ValueError("audit record is sealed already")
    head, tail, row = encode_linked(record, seq, prev_hash)
    digest = mac.hexdigest(b"".join((prev_hash.encode("ascii"), head, b",", tail)))
    if in_place:
        sealed = record
        set_chain(sealed, seq, prev_hash, digest)
    else:
        sealed = record.with_chain(seq, prev_hash, digest)
    attach_json(sealed, head, tail, row)
    return sealed


class Chain:
    """A chain being appended to. Not thread-safe; the writer calls it from one event loop."""

    def __init__(self, key: bytes, state: ChainState | None = None) -> None:
        self._mac = KeyedMac(key)
        state = state or ChainState.genesis()
        self._seq = state.seq
        self._head = state.head_hash

    @property
    def state(self) -> ChainState:
        return ChainState(self._seq, self._head)

    @state.setter
    def state(self, state: ChainState) -> None:
        self._seq = state.seq
        self._head = state.head_hash

    @property
    def seq(self) -> int:
        """The last seq appended (0 for an empty chain)."""
        return self._seq

    def append(self, record: AuditRecord, *, in_place: bool = False) -> AuditRecord:
        sealed = _seal(self._mac, record, self._seq + 1, self._head, in_place)
        self._seq = sealed.seq
        self._head = sealed.hash
        return sealed


# -- the key --------------------------------------------------------------------------------------


def _decode_key(text: str, where: str) -> bytes:
    text = text.strip()
    if not text:
        raise ValueError(f"audit HMAC key from {where} is empty")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        # Not hex: a passphrase-style key is used as its UTF-8 bytes.
        key = text.encode("utf-8")
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"audit HMAC key from {where} is shorter than {MIN_KEY_BYTES} bytes")
    return key


def load_or_create_key(
    *,
    env_var: str | None,
    key_file: Path | None,
    default_path: Path,
    env: Mapping[str, str] | None = None,
) -> bytes:
    """The chain key: from ``env_var`` if named, else ``key_file`` if given, else the key in
    ``default_path``, generated there (32 random bytes, hex, mode 0600) on first use.

    A named variable or file that is missing is an error, never a reason to generate a key: a
    fresh key would make the whole existing chain fail verification.
    """
    environ = os.environ if env is None else env
    if env_var:
        value = environ.get(env_var)
        if value is None:
            raise ValueError(f"audit.hmac_key_env: environment variable {env_var} is not set")
        return _decode_key(value, f"environment variable {env_var}")
    if key_file is not None:
        try:
            text = key_file.read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"audit.hmac_key_file: cannot read {key_file}: {e.strerror}") from e
        _warn_if_readable_by_others(key_file)
        return _decode_key(text, str(key_file))
    return _load_or_generate(default_path)


def _warn_if_readable_by_others(path: Path) -> None:
    with contextlib.suppress(OSError):
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            log.warning("audit key file %s is accessible to group/others; chmod 600 it", path)


def _load_or_generate(path: Path) -> bytes:
    if path.exists():
        _warn_if_readable_by_others(path)
        return _decode_key(path.read_text(encoding="utf-8"), str(path))
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Written to a private temporary name and hard-linked into place: a crash never leaves an
    # empty key file, and two processes starting at once agree on one key (link is exclusive).
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask can only remove bits, but be explicit
        os.write(fd, (secrets.token_hex(32) + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process won the race; use its key
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return _decode_key(path.read_text(encoding="utf-8"), str(path))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
