"""The keyring: derived sub-keys, HMACs, and sealing that only ever opens what it sealed."""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.keyring import Keyring, Sealer

OLD, NEW = os.urandom(32), os.urandom(32)


def sealed(keyring: Keyring, kind: str = "session", key: str = "k1", text: bytes = b"x") -> bytes:
    return keyring.sealer("records").seal(kind, key, text)


def test_round_trip() -> None:
    sealer = Keyring([NEW]).sealer("records")
    blob = sealer.seal("session", "abc", b"the record")
    assert sealer.open("session", "abc", blob) == b"the record"
    assert sealer.open("session", "abc", sealer.seal("session", "abc", b"")) == b""


def test_each_seal_uses_a_fresh_nonce() -> None:
    sealer = Keyring([NEW]).sealer("records")
    assert sealer.seal("session", "abc", b"same") != sealer.seal("session", "abc", b"same")


def test_blob_starts_with_the_key_id_of_the_derived_key() -> None:
    keyring = Keyring([NEW])
    blob = sealed(keyring)
    assert blob[:4] == hashlib.sha256(keyring.derive("records")).digest()[:4]
    assert len(blob) == 4 + 12 + 1 + 16


def test_rotation_opens_records_sealed_under_an_older_key() -> None:
    blob = sealed(Keyring([OLD]))
    rotated = Keyring([NEW, OLD]).sealer("records")
    assert rotated.open("session", "k1", blob) == b"x"
    fresh = rotated.seal("session", "k1", b"y")
    assert fresh[:4] != blob[:4]  # new records are sealed under the new first key
    assert Keyring([NEW]).sealer("records").open("session", "k1", fresh) == b"y"
    assert Keyring([OLD]).sealer("records").open("session", "k1", fresh) is None


def test_a_removed_key_no_longer_opens() -> None:
    assert Keyring([NEW]).sealer("records").open("session", "k1", sealed(Keyring([OLD]))) is None


def test_tampering_with_any_byte_fails() -> None:
    sealer = Keyring([NEW]).sealer("records")
    blob = sealer.seal("session", "k1", b"a session record")
    for index in range(len(blob)):
        for flip in (0x01, 0x80):
            tampered = bytearray(blob)
            tampered[index] ^= flip
            assert sealer.open("session", "k1", bytes(tampered)) is None, index


@pytest.mark.parametrize(
    ("kind", "key"),
    [
        ("session", "k2"),  # moved to another key
        ("login", "k1"),  # moved to another kind
        ("session", "k1\0"),
        ("session\0k1", ""),  # the kind/key boundary cannot be shifted
        ("sessio", "n\0k1"),
        ("session", "K1"),
    ],
)
def test_a_record_moved_to_another_kind_or_key_does_not_open(kind: str, key: str) -> None:
    keyring = Keyring([NEW])
    assert keyring.sealer("records").open(kind, key, sealed(keyring)) is None


def test_a_kind_with_nul_cannot_be_sealed() -> None:
    with pytest.raises(ValueError, match="NUL"):
        Keyring([NEW]).sealer("records").seal("a\0b", "c", b"x")


def test_truncated_and_garbage_blobs_read_as_none() -> None:
    keyring = Keyring([NEW])
    sealer = keyring.sealer("records")
    blob = sealed(keyring)
    for length in range(len(blob)):
        assert sealer.open("session", "k1", blob[:length]) is None
    assert sealer.open("session", "k1", blob + b"\0") is None
    for garbage in (b"", b"\0" * 64, os.urandom(200), blob[:4] + os.urandom(40), None):
        assert sealer.open("session", "k1", garbage) is None
    assert sealer.open("session", "k1", "not bytes") is None  # type: ignore[arg-type]


def test_a_blob_sealed_under_another_label_does_not_open() -> None:
    keyring = Keyring([NEW])
    blob = keyring.sealer("records").seal("session", "k1", b"x")
    assert keyring.sealer("login-cookie").open("session", "k1", blob) is None


def test_labels_give_independent_keys() -> None:
    keyring = Keyring([NEW])
    labels = ["records", "session-id", "login-cookie", "csrf"]
    derived = [keyring.derive(label) for label in labels]
    assert len(set(derived)) == len(labels)
    assert all(len(key) == 32 and key != NEW for key in derived)
    assert keyring.derive("records") == keyring.derive("records")


def test_derive_is_hkdf_sha256_of_the_first_key_with_the_label_as_info() -> None:
    expected = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"csrf").derive(NEW)
    assert Keyring([NEW, OLD]).derive("csrf") == expected


def test_derive_all_lists_every_key_current_first() -> None:
    keyring = Keyring([NEW, OLD])
    assert keyring.derive_all("csrf") == (
        Keyring([NEW]).derive("csrf"),
        Keyring([OLD]).derive("csrf"),
    )


def test_hmac_is_under_the_derived_key() -> None:
    keyring = Keyring([NEW, OLD])
    expected = hmac.digest(keyring.derive("session-id"), b"id", "sha256")
    assert keyring.hmac("session-id", b"id") == expected
    assert keyring.hmac("session-id", b"id") != keyring.hmac("handle", b"id")
    assert keyring.hmac_all("session-id", b"id")[0] == expected
    assert keyring.hmac_all("session-id", b"id")[1] == Keyring([OLD]).hmac("session-id", b"id")


def test_repr_hides_key_material() -> None:
    keyring = Keyring([NEW, OLD])
    sealer = keyring.sealer("records")
    for text in (repr(keyring), str(keyring), repr(sealer)):
        assert NEW.hex() not in text and repr(NEW) not in text
        assert keyring.derive("records").hex() not in text
        assert "hidden" in text


@pytest.mark.parametrize("keys", [[], [b"short"], [NEW, b"\0" * 31]])
def test_keys_must_be_32_bytes(keys: list[bytes]) -> None:
    with pytest.raises(ValueError):
        Keyring(keys)
    with pytest.raises(ValueError):
        Sealer(keys)
