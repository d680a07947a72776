"""Break-glass accounts (`break_glass.accounts_file`): the file, and its password hashes.

The file is YAML, readable by its owner only (any permission for group or others refuses it):

    accounts:
      - name: bg-oncall-1                   # letters, digits, '.', '_', '-', '@'; at most 64
        password_hash: scrypt$ln=15,r=8,p=1$SALT$HASH    # or pbkdf2-sha256$i=N$SALT$HASH
        totp_secret: JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP   # base32, at least 80 bits
        groups: [break-glass]               # what policies see of the account
        email: oncall@example.org           # optional

    load_accounts(path) -> Accounts          or AccountsFileError (.issues: FILE:LINE:COL lines)
    hash_password(password) -> str           an scrypt hash for the file (hashlib, random salt)
    PasswordHash.matches(password) -> bool   constant-time; CPU-bound: call it in a thread

SALT and HASH are base64. Parameters are bounded both ways: below them a stolen file is
cheap to crack, above them one login attempt would stall a CPU for seconds.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.configfile import ConfigError, Problem, load_model

SCRYPT_LN, SCRYPT_R, SCRYPT_P = 15, 8, 1  # what hash_password makes: 32 MiB, about 0.1 s
_SCRYPT_LN = range(14, 21)
_SCRYPT_MAX_MEMORY = 256 * 2**20  # bytes (128 * r * 2**ln)
_PBKDF2_ITERATIONS = range(200_000, 10_000_001)
_MIN_SALT, _DIGEST_SIZES = 16, range(16, 65)
_MIN_SECRET_BITS = 80
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_SCRYPT = re.compile(r"scrypt\$ln=(\d+),r=(\d+),p=(\d+)\$([^$]+)\$([^$]+)")
_PBKDF2 = re.compile(r"pbkdf2-sha256\$i=(\d+)\$([^$]+)\$([^$]+)")


class AccountsFileError(Exception):
    """The accounts file cannot be used; `issues` says where and why, one line each."""

    def __init__(self, issues: list[str]) -> None:
        super().__init__("\n".join(issues))
        self.issues = issues


@dataclass(frozen=True, slots=True)
class PasswordHash:
    scheme: str  # scrypt | pbkdf2-sha256
    params: tuple[int, ...]  # scrypt: (ln, r, p); pbkdf2-sha256: (iterations,)
    salt: bytes = field(repr=False)
    digest: bytes = field(repr=False)

    def matches(self, password: str) -> bool:
        derived = _derive(self.scheme, self.params, self.salt, password, len(self.digest))
        return hmac.compare_digest(derived, self.digest)


@dataclass(frozen=True, slots=True)
class Account:
    name: str
    password: PasswordHash = field(repr=False)
    totp_secret: str = field(repr=False)  # base32, upper case, no padding
    groups: tuple[str, ...] = ()
    email: str | None = None


class Accounts:
    """The accounts of one file, found by name in any ASCII case."""

    def __init__(self, accounts: Iterable[Account]) -> None:
        self._by_name = {fold(a.name): a for a in accounts}

    def __len__(self) -> int:
        return len(self._by_name)

    def get(self, name: str) -> Account | None:
        return self._by_name.get(fold(name))

    def password_ok(self, name: str, password: str) -> Account | None:
        """The named account if `password` is its password. An unknown name costs as much as
        a known one (a hash is derived either way), so timing does not tell names apart."""
        account = self.get(name)
        stand_in = account or next(iter(self._by_name.values()))
        # SECURITY: the same work for unknown names: no enumeration of accounts by timing.
        matched = stand_in.password.matches(password)
        return account if matched and account is not None else None


def hash_password(password: str) -> str:
    """An scrypt hash of `password` (random 16-byte salt) as the accounts file holds it."""
    salt = secrets.token_bytes(16)
    params = (SCRYPT_LN, SCRYPT_R, SCRYPT_P)
    digest = _derive("scrypt", params, salt, password, 32)
    return f"scrypt$ln={SCRYPT_LN},r={SCRYPT_R},p={SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def parse_hash(text: str) -> PasswordHash:
    """A password hash of the file; ValueError saying what is wrong with it."""
    if m := _SCRYPT.fullmatch(text):
        ln, r, p = int(m[1]), int(m[2]), int(m[3])
        if ln not in _SCRYPT_LN or not 1 <= p <= 16 or not 1 <= r <= 64:
            raise ValueError("scrypt parameters out of range (ln 14-20, r 1-64, p 1-16)")
        if 128 * r * 2**ln > _SCRYPT_MAX_MEMORY:
            raise ValueError("scrypt parameters need more than 256 MiB per attempt")
        return _checked("scrypt", (ln, r, p), m[4], m[5])
    if m := _PBKDF2.fullmatch(text):
        if int(m[1]) not in _PBKDF2_ITERATIONS:
            raise ValueError("pbkdf2-sha256 iterations must be 200000 to 10000000")
        return _checked("pbkdf2-sha256", (int(m[1]),), m[2], m[3])
    raise ValueError(
        "expected scrypt$ln=N,r=N,p=N$SALT$HASH or pbkdf2-sha256$i=N$SALT$HASH "
        "(see docs/break-glass.md to make one)"
    )


def _checked(scheme: str, params: tuple[int, ...], salt: str, digest: str) -> PasswordHash:
    raw_salt, raw_digest = _unb64(salt, "salt"), _unb64(digest, "hash")
    if len(raw_salt) < _MIN_SALT:
        raise ValueError(f"the salt must be at least {_MIN_SALT} bytes")
    if len(raw_digest) not in _DIGEST_SIZES:
        raise ValueError("the hash must be 16 to 64 bytes")
    return PasswordHash(scheme, params, raw_salt, raw_digest)


def _derive(scheme: str, params: tuple[int, ...], salt: bytes, password: str, size: int) -> bytes:
    secret = password.encode("utf-8", "surrogatepass")
    if scheme == "scrypt":
        ln, r, p = params
        memory = 128 * r * 2**ln
        return hashlib.scrypt(
            secret, salt=salt, n=2**ln, r=r, p=p, maxmem=2 * memory + 2**20, dklen=size
        )
    return hashlib.pbkdf2_hmac("sha256", secret, salt, params[0], size)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the {what} is not base64") from None


def totp_secret(text: str) -> str:
    """A base32 TOTP secret, normalized (upper case, no spaces or padding); ValueError if not."""
    secret = text.replace(" ", "").rstrip("=").upper()
    try:
        raw = base64.b32decode(secret + "=" * (-len(secret) % 8))
    except (binascii.Error, ValueError):
        raise ValueError("must be base32 (A-Z and 2-7)") from None
    if len(raw) * 8 < _MIN_SECRET_BITS:
        raise ValueError(f"must hold at least {_MIN_SECRET_BITS} bits (16 base32 characters)")
    return secret


def fold(text: str) -> str:
    """ASCII case folding (str.lower would map the Kelvin sign to "k")."""
    return text.translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


# -- the file ----------------------------------------------------------------------------------


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    password_hash: PasswordHash
    totp_secret: str
    groups: tuple[str, ...] = ()
    email: str | None = Field(default=None, min_length=3)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError("use letters, digits, '.', '_', '-', '@' (at most 64)")
        return value

    @field_validator("password_hash", mode="before")
    @classmethod
    def _hash(cls, value: object) -> PasswordHash:
        if not isinstance(value, str):
            raise ValueError("expected a password hash string")
        return parse_hash(value)

    @field_validator("totp_secret")
    @classmethod
    def _secret(cls, value: str) -> str:
        return totp_secret(value)


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    accounts: tuple[_Entry, ...] = Field(min_length=1)


def _unique(loaded: _File) -> Iterator[Problem]:
    seen: set[str] = set()
    for i, entry in enumerate(loaded.accounts):
        if fold(entry.name) in seen:
            yield Problem(f"accounts: {entry.name!r} is listed twice", (("accounts", i, "name"),))
        seen.add(fold(entry.name))


def load_accounts(path: Path, env: Mapping[str, str] | None = None) -> Accounts:
    """Read and check the accounts file (blocking: call it in a thread on a running loop)."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        raise AccountsFileError([f"{path}: cannot read: {err.strerror or err}"]) from None
    if mode & 0o077:
        # SECURITY: password hashes and TOTP secrets: a file others can read is already leaked.
        raise AccountsFileError(
            [f"{path}: readable by others (mode {mode & 0o777:04o}); chmod 600 it"]
        )
    try:
        loaded = load_model(
            path, os.environ if env is None else env, _File, secret_files=_none, checks=_unique
        )
    except ConfigError as err:
        raise AccountsFileError([str(issue) for issue in err.issues]) from None
    return Accounts(
        Account(e.name, e.password_hash, e.totp_secret, e.groups, e.email) for e in loaded.accounts
    )


def _none(_: object) -> tuple[()]:
    return ()
