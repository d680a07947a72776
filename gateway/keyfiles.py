"""The gateway's signing key files (SPEC §3 `assertion:`, `audit:`; §10 `gateway keys generate`).

Two keys, each a private PEM (PKCS#8, mode 0600) with its public half beside it
(SubjectPublicKeyInfo, 0644):

    assertion-es256.pem / .pub.pem    ES256 (P-256): the identity assertion sent upstream (§7)
    audit-ed25519.pem / .pub.pem      Ed25519: the audit log's checkpoints (§8)

    generate(dir) -> [GeneratedKey]           all four files, or none (never overwrites)
    load_private_key(path, kind)              a signing key, or KeyFileError
    load_public_key(path, kind=None)          a public PEM, or the public half of a private one
    key_id(public_key) -> str                 the RFC 7638 JWK thumbprint (JWKS kid, audit key_id)
    public_jwk(public_key) -> dict            the key's required JWK members (RFC 7518, RFC 8037)

Every problem with a file is a `KeyFileError` whose message is one line naming the file. A
private key file that group or others may read is refused, like ssh refuses one. Loading is
blocking file I/O: call it at start-up or from a thread (STYLE 16).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

Kind = Literal["es256", "ed25519"]
PrivateKey = ec.EllipticCurvePrivateKey | Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | Ed25519PublicKey

_FILES: dict[Kind, str] = {"es256": "assertion-es256", "ed25519": "audit-ed25519"}
_NAMES: dict[Kind, str] = {"es256": "ES256 (P-256)", "ed25519": "Ed25519"}
_P256_SIZE = 32


class KeyFileError(Exception):
    """A key file that cannot be used; the message is one line naming the file."""


@dataclass(frozen=True, slots=True)
class GeneratedKey:
    path: Path
    kind: Kind
    private: bool
    key_id: str

    def describe(self) -> str:
        half = "private key" if self.private else "public key"
        return f"{self.path}  {_NAMES[self.kind]} {half}, key id {self.key_id}"


# -- key ids -----------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def public_jwk(public_key: PublicKey) -> dict[str, str]:
    """The JWK members RFC 7638 hashes: EC `crv kty x y`, Ed25519 `crv kty x` (RFC 8037)."""
    if isinstance(public_key, Ed25519PublicKey):
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"crv": "Ed25519", "kty": "OKP", "x": _b64url(raw)}
    numbers = public_key.public_numbers()
    return {
        "crv": "P-256",
        "kty": "EC",
        "x": _b64url(numbers.x.to_bytes(_P256_SIZE, "big")),
        "y": _b64url(numbers.y.to_bytes(_P256_SIZE, "big")),
    }


def key_id(public_key: PublicKey) -> str:
    """The RFC 7638 thumbprint: SHA-256 of the sorted, spaceless JWK, base64url unpadded."""
    canonical = json.dumps(public_jwk(public_key), sort_keys=True, separators=(",", ":"))
    return _b64url(hashlib.sha256(canonical.encode("ascii")).digest())


# -- generating --------------------------------------------------------------------------------


def _new_key(kind: Kind) -> PrivateKey:
    return (
        ec.generate_private_key(ec.SECP256R1()) if kind == "es256" else Ed25519PrivateKey.generate()
    )


def _planned(directory: Path) -> list[tuple[Path, Kind, bool]]:
    planned: list[tuple[Path, Kind, bool]] = []
    for kind, stem in _FILES.items():
        planned += [
            (directory / f"{stem}.pem", kind, True),
            (directory / f"{stem}.pub.pem", kind, False),
        ]
    return planned


def generate(directory: Path) -> list[GeneratedKey]:
    """Write both key pairs into `directory` (made 0700 if missing); never overwrite a file."""
    planned = _planned(directory)
    for path, _, _ in planned:
        if path.exists() or path.is_symlink():
            raise KeyFileError(f"{path}: already exists; not overwriting any key file")
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise KeyFileError(f"{directory}: cannot create the directory: {err.strerror}") from None
    keys = {kind: _new_key(kind) for kind in _FILES}
    written: list[GeneratedKey] = []
    try:
        for path, kind, private in planned:
            _write_new(path, _pem(keys[kind], private), private)
            written.append(GeneratedKey(path, kind, private, key_id(keys[kind].public_key())))
    except OSError as err:
        for done in written:  # all four or none: a half-made set is worse than none
            done.path.unlink(missing_ok=True)
        raise KeyFileError(f"{err.filename or directory}: cannot write: {err.strerror}") from None
    return written


def _pem(key: PrivateKey, private: bool) -> bytes:
    if private:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _write_new(path: Path, data: bytes, private: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    # SECURITY: created 0600 and exclusively (O_EXCL): the key is never readable by others, not
    # even for the moment between writing and a chmod, and no planted file or symlink is reused.
    fd = os.open(path, flags, 0o600 if private else 0o644)
    try:
        if not private:
            os.fchmod(fd, 0o644)  # a public half is for sharing, whatever the umask
        with os.fdopen(fd, "wb", closefd=False) as file:
            file.write(data)
        os.fsync(fd)
    except OSError:
        path.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


# -- loading -----------------------------------------------------------------------------------


def _read(path: Path) -> tuple[bytes, int]:
    """The file's bytes and its mode, from one open file (no race between stat and read)."""
    try:
        # O_NONBLOCK: a FIFO in the key's place must not hang start-up; it fails S_ISREG below.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file") from None
    except OSError as err:
        raise KeyFileError(f"{path}: cannot read the key file: {err.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise KeyFileError(f"{path}: not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as file:
            return file.read(), mode
    finally:
        os.close(fd)


def _private_from(path: Path, data: bytes, mode: int) -> PrivateKey:
    if mode & 0o077:
        # SECURITY: a signing key others can read lets them forge assertions or audit
        # checkpoints; refuse it rather than sign with a key that may be known.
        raise KeyFileError(
            f"{path}: private key file is readable by group or others "
            f"(mode {stat.S_IMODE(mode):04o}); run chmod 600 on it"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography: "Password was not given but private key is encrypted"
        raise KeyFileError(f"{path}: the key is encrypted; give an unencrypted PEM") from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"{path}: not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | Ed25519PrivateKey):
        raise KeyFileError(f"{path}: a {type(key).__name__}, not an ES256 or Ed25519 key")
    return key


def _public_from(path: Path, data: bytes) -> PublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"{path}: not a PEM public or private key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey | Ed25519PublicKey):
        raise KeyFileError(f"{path}: a {type(key).__name__}, not an ES256 or Ed25519 key")
    return key


def _check_kind(path: Path, key: PublicKey, kind: Kind | None) -> None:
    if kind == "ed25519" and not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 key")
    if kind == "es256" and not (
        isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    ):
        raise KeyFileError(f"{path}: not an ES256 key (an EC key on curve P-256)")
    if isinstance(key, ec.EllipticCurvePublicKey) and not isinstance(key.curve, ec.SECP256R1):
        raise KeyFileError(f"{path}: EC curve {key.curve.name}; only P-256 (ES256) is used")


@overload
def load_private_key(path: Path, kind: Literal["es256"]) -> ec.EllipticCurvePrivateKey: ...
@overload
def load_private_key(path: Path, kind: Literal["ed25519"]) -> Ed25519PrivateKey: ...
def load_private_key(path: Path, kind: Kind) -> PrivateKey:
    """The private key in `path`, which must be of `kind` and readable by its owner only."""
    data, mode = _read(path)
    key = _private_from(path, data, mode)
    _check_kind(path, key.public_key(), kind)
    return key


@overload
def load_public_key(path: Path, kind: Literal["es256"]) -> ec.EllipticCurvePublicKey: ...
@overload
def load_public_key(path: Path, kind: Literal["ed25519"]) -> Ed25519PublicKey: ...
@overload
def load_public_key(path: Path, kind: None = None) -> PublicKey: ...
def load_public_key(path: Path, kind: Kind | None = None) -> PublicKey:
    """A public key from a public PEM, or the public half of a private PEM (a previous key)."""
    data, mode = _read(path)
    if b"PRIVATE KEY-----" in data:
        key = _private_from(path, data, mode).public_key()
    else:
        key = _public_from(path, data)
    _check_kind(path, key, kind)
    return key
