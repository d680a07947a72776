"""The state keys (`state.keys`) and everything derived from them.

One `Keyring` holds the operator's 32-byte keys: the first seals and signs, all of them open
and verify, so a new key is prepended to rotate without losing what was sealed before. No
key is used directly: each purpose gets its own sub-key, HKDF-SHA256 of a key with the
purpose's label as `info`, so a session-id HMAC can never be confused with a sealed record
or a CSRF token.

    keyring.derive(label)          the current sub-key (from the first key)
    keyring.derive_all(label)      the sub-keys of every key, current first (verifying)
    keyring.hmac(label, data)      HMAC-SHA256 under the current sub-key (session-id HMACs)
    keyring.hmac_all(label, data)  the same under every key, current first (lookups after rotation)
    keyring.sealer(label)          a `Sealer` for records of one purpose

A sealed blob is `key id (4) || nonce (12) || AES-GCM ciphertext and tag`, where the key id
is the first 4 bytes of SHA-256 of the sub-key, so `open()` goes straight to the right key,
and the associated data is `kind NUL key`: a record copied to another kind or key no longer
opens. `open()` returns None for anything it cannot open and never raises on bad input, so a
tampered store reads as an absent record.
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_SIZE = 32
_KEY_ID_SIZE = 4
_NONCE_SIZE = 12
_TAG_SIZE = 16
_HEADER_SIZE = _KEY_ID_SIZE + _NONCE_SIZE


def _hkdf(key: bytes, label: str) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=label.encode())
    return hkdf.derive(key)


def key_id(key: bytes) -> bytes:
    """The short public id of a (sub-)key: the first 4 bytes of its SHA-256."""
    return hashlib.sha256(key).digest()[:_KEY_ID_SIZE]


class Keyring:
    """The state keys; the first seals and signs, all open and verify."""

    __slots__ = ("_derived", "_keys")

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("a keyring needs at least one key (state.keys)")
        if any(len(key) != KEY_SIZE for key in keys):
            raise ValueError(f"every state key must be {KEY_SIZE} bytes")
        self._keys = tuple(bytes(key) for key in keys)
        self._derived: dict[str, tuple[bytes, ...]] = {}

    def __repr__(self) -> str:
        # SECURITY: a keyring reaches tracebacks and debug logs; never print key material.
        return f"Keyring(<{len(self._keys)} keys hidden>)"

    def derive_all(self, label: str) -> tuple[bytes, ...]:
        """The sub-keys for `label` under every key, the current one first."""
        derived = self._derived.get(label)
        if derived is None:
            derived = self._derived[label] = tuple(_hkdf(key, label) for key in self._keys)
        return derived

    def derive(self, label: str) -> bytes:
        """The current sub-key for `label`: HKDF-SHA256 of the first key, `label` as info."""
        return self.derive_all(label)[0]

    def hmac(self, label: str, data: bytes) -> bytes:
        """HMAC-SHA256 of `data` under the current sub-key for `label`."""
        return _hmac.digest(self.derive(label), data, "sha256")

    def hmac_all(self, label: str, data: bytes) -> tuple[bytes, ...]:
        """HMAC-SHA256 of `data` under every key's sub-key, current first (after rotation)."""
        return tuple(_hmac.digest(key, data, "sha256") for key in self.derive_all(label))

    def sealer(self, label: str) -> Sealer:
        """A sealer whose keys are the sub-keys for `label`."""
        return Sealer(self.derive_all(label), label=label)


def _associated_data(kind: str, key: str) -> bytes:
    # "surrogatepass" keeps the encoding total and one-to-one for any str a caller hands in.
    return kind.encode("utf-8", "surrogatepass") + b"\0" + key.encode("utf-8", "surrogatepass")


class Sealer:
    """AES-GCM sealing of store records, bound to their kind and key."""

    __slots__ = ("_by_id", "_label", "_sealing")

    def __init__(self, keys: Sequence[bytes], *, label: str = "") -> None:
        if not keys or any(len(key) != KEY_SIZE for key in keys):
            raise ValueError(f"a sealer needs one or more {KEY_SIZE}-byte keys")
        self._label = label
        self._sealing = (key_id(keys[0]), AESGCM(keys[0]))
        self._by_id: dict[bytes, list[AESGCM]] = {}
        for key in keys:
            # A 4-byte id may collide: keep every key under its id and try each.
            self._by_id.setdefault(key_id(key), []).append(AESGCM(key))

    def __repr__(self) -> str:
        # SECURITY: never print key material.
        return f"Sealer({self._label!r}, <{sum(map(len, self._by_id.values()))} keys hidden>)"

    def seal(self, kind: str, key: str, plaintext: bytes) -> bytes:
        """`plaintext` encrypted and authenticated under the current key, bound to kind + key."""
        if "\0" in kind:
            # SECURITY: a NUL in kind would make `kind NUL key` ambiguous between two records.
            raise ValueError("a record kind must not contain NUL")
        kid, aead = self._sealing
        # SECURITY: a fresh random 96-bit nonce per record; never reuse a nonce under one key.
        nonce = os.urandom(_NONCE_SIZE)
        return kid + nonce + aead.encrypt(nonce, plaintext, _associated_data(kind, key))

    def open(self, kind: str, key: str, blob: bytes | None) -> bytes | None:
        """The plaintext of a blob sealed for this kind and key; None if absent or not opening.

        None is accepted (and returned) so a store read can be opened directly.
        """
        if not isinstance(blob, bytes | bytearray | memoryview) or "\0" in kind:
            return None
        blob = bytes(blob)
        if len(blob) < _HEADER_SIZE + _TAG_SIZE:
            return None
        candidates = self._by_id.get(blob[:_KEY_ID_SIZE])
        if candidates is None:
            return None
        nonce, sealed = blob[_KEY_ID_SIZE:_HEADER_SIZE], blob[_HEADER_SIZE:]
        return _decrypt(candidates, nonce, sealed, _associated_data(kind, key))


def _decrypt(candidates: list[AESGCM], nonce: bytes, sealed: bytes, ad: bytes) -> bytes | None:
    for aead in candidates:
        try:
            # SECURITY: the tag covers kind and key: a record moved to another key fails here.
            return aead.decrypt(nonce, sealed, ad)
        except (InvalidTag, ValueError, OverflowError):
            continue
    return None
