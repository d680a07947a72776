"""Key files: `gateway keys generate`, RFC 7638 key ids, and loading that refuses bad files."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.cli import main
from gateway.keyfiles import (
    KeyFileError,
    generate,
    key_id,
    load_private_key,
    load_public_key,
)

NAMES = [
    "assertion-es256.pem",
    "assertion-es256.pub.pem",
    "audit-ed25519.pem",
    "audit-ed25519.pub.pem",
]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def private_pem(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_private(path: Path, data: bytes, file_mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(file_mode)
    return path


def thumbprint(jwk: dict[str, str], members: tuple[str, ...]) -> str:
    """RFC 7638 §3, written out again: required members, sorted, no whitespace, SHA-256."""
    text = "{" + ",".join(f'"{name}":"{jwk[name]}"' for name in sorted(members)) + "}"
    digest = hashlib.sha256(text.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


# -- generate ----------------------------------------------------------------------------------


def test_generate_writes_four_files_with_their_modes(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    written = generate(directory)
    assert [key.path.name for key in written] == NAMES
    assert sorted(p.name for p in directory.iterdir()) == sorted(NAMES)
    assert mode(directory) == 0o700
    assert [mode(directory / name) for name in NAMES] == [0o600, 0o644, 0o600, 0o644]
    es256 = load_private_key(directory / NAMES[0], "es256")
    ed25519 = load_private_key(directory / NAMES[2], "ed25519")
    assert written[0].key_id == written[1].key_id == key_id(es256.public_key())
    assert written[2].key_id == written[3].key_id == key_id(ed25519.public_key())
    assert load_public_key(directory / NAMES[1]) == es256.public_key()
    assert load_public_key(directory / NAMES[3], "ed25519") == ed25519.public_key()
    assert (directory / NAMES[0]).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert (directory / NAMES[1]).read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")


def test_generate_private_files_stay_private_under_a_lax_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        generate(tmp_path)
    finally:
        os.umask(old)
    assert [mode(tmp_path / name) for name in NAMES] == [0o600, 0o644, 0o600, 0o644]


@pytest.mark.parametrize("existing", NAMES)
def test_generate_refuses_to_overwrite_and_writes_nothing(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).write_text("keep me")
    with pytest.raises(KeyFileError) as caught:
        generate(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / existing}: already exists")
    assert [p.name for p in tmp_path.iterdir()] == [existing]
    assert (tmp_path / existing).read_text() == "keep me"


def test_generate_refuses_a_dangling_symlink(tmp_path: Path) -> None:
    (tmp_path / NAMES[2]).symlink_to(tmp_path / "elsewhere.pem")
    with pytest.raises(KeyFileError, match="already exists"):
        generate(tmp_path)
    assert not (tmp_path / "elsewhere.pem").exists()


def test_generated_keys_differ_each_time(tmp_path: Path) -> None:
    first, second = generate(tmp_path / "a"), generate(tmp_path / "b")
    assert {k.key_id for k in first}.isdisjoint(k.key_id for k in second)


# -- key ids -----------------------------------------------------------------------------------


def test_es256_key_id_is_the_rfc7638_thumbprint() -> None:
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public))  # an independent JWK encoder
    assert key_id(public) == thumbprint(jwk, ("crv", "kty", "x", "y"))


def test_ed25519_key_id_matches_rfc8037_appendix_a3() -> None:
    x = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"  # RFC 8037 A.2's public key
    public = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(x + "="))
    assert key_id(public) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    assert key_id(public) == thumbprint(
        {"crv": "Ed25519", "kty": "OKP", "x": x}, ("crv", "kty", "x")
    )


# -- loading -----------------------------------------------------------------------------------


def assert_one_line_naming(err: pytest.ExceptionInfo[KeyFileError], path: Path, text: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert text in message


def test_load_private_refuses_the_wrong_kind(tmp_path: Path) -> None:
    ed = write_private(tmp_path / "ed.pem", private_pem(Ed25519PrivateKey.generate()))
    with pytest.raises(KeyFileError) as caught:
        load_private_key(ed, "es256")
    assert_one_line_naming(caught, ed, "not an ES256 key")
    es = write_private(tmp_path / "es.pem", private_pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(KeyFileError) as caught:
        load_private_key(es, "ed25519")
    assert_one_line_naming(caught, es, "not an Ed25519 key")


def test_load_private_refuses_another_curve_and_rsa(tmp_path: Path) -> None:
    p384 = write_private(
        tmp_path / "p384.pem", private_pem(ec.generate_private_key(ec.SECP384R1()))
    )
    with pytest.raises(KeyFileError) as caught:
        load_private_key(p384, "es256")
    assert_one_line_naming(caught, p384, "P-256")
    with pytest.raises(KeyFileError) as caught:
        load_public_key(p384)
    assert_one_line_naming(caught, p384, "secp384r1")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_file = write_private(tmp_path / "rsa.pem", private_pem(rsa_key))
    with pytest.raises(KeyFileError) as caught:
        load_private_key(rsa_file, "es256")
    assert_one_line_naming(caught, rsa_file, "not an ES256 or Ed25519 key")


@pytest.mark.parametrize("file_mode", [0o640, 0o604, 0o644, 0o660])
def test_load_private_refuses_a_file_others_can_read(tmp_path: Path, file_mode: int) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = write_private(tmp_path / "k.pem", private_pem(key), file_mode)
    with pytest.raises(KeyFileError) as caught:
        load_private_key(path, "es256")
    assert_one_line_naming(caught, path, f"readable by group or others (mode 0{file_mode:o})")
    with pytest.raises(KeyFileError, match="readable by group or others"):
        load_public_key(path)  # a private file is a private file, whatever it is loaded for
    path.chmod(0o400)
    assert load_private_key(path, "es256").private_numbers() == key.private_numbers()


def test_load_refuses_garbage_missing_and_encrypted_files(tmp_path: Path) -> None:
    garbage = write_private(tmp_path / "garbage.pem", b"-----BEGIN PRIVATE KEY-----\nnope\n")
    with pytest.raises(KeyFileError) as caught:
        load_private_key(garbage, "es256")
    assert_one_line_naming(caught, garbage, "not a PEM private key")
    text = write_private(tmp_path / "text.pem", b"hello\n", 0o644)
    with pytest.raises(KeyFileError) as caught:
        load_public_key(text)
    assert_one_line_naming(caught, text, "not a PEM public or private key")
    missing = tmp_path / "missing.pem"
    with pytest.raises(KeyFileError) as caught:
        load_private_key(missing, "ed25519")
    assert_one_line_naming(caught, missing, "no such key file")
    encrypted_pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    encrypted = write_private(tmp_path / "enc.pem", encrypted_pem)
    with pytest.raises(KeyFileError) as caught:
        load_private_key(encrypted, "ed25519")
    assert_one_line_naming(caught, encrypted, "encrypted")
    with pytest.raises(KeyFileError) as caught:
        load_private_key(tmp_path, "ed25519")
    assert_one_line_naming(caught, tmp_path, "not a regular file")
    fifo = tmp_path / "fifo.pem"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(KeyFileError) as caught:
        load_private_key(fifo, "ed25519")  # returns at once: no writer is waited for
    assert_one_line_naming(caught, fifo, "not a regular file")


def test_load_public_accepts_a_public_or_a_private_pem(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    private = write_private(tmp_path / "old.pem", private_pem(key))
    public = tmp_path / "old.pub.pem"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    assert load_public_key(private, "es256") == key.public_key()
    assert load_public_key(public, "es256") == key.public_key()
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        load_public_key(public, "ed25519")


# -- the command -------------------------------------------------------------------------------


def test_keys_generate_command_prints_each_file_and_its_key_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "keys"
    assert main(["keys", "generate", str(directory)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert len(lines) == 4
    es256 = key_id(load_public_key(directory / NAMES[1], "es256"))
    ed25519 = key_id(load_public_key(directory / NAMES[3], "ed25519"))
    for line, name, kid in zip(lines, NAMES, [es256, es256, ed25519, ed25519], strict=True):
        assert line.startswith(f"{directory / name}  ")
        assert line.endswith(f"key id {kid}")
    assert "ES256 (P-256) private key" in lines[0]
    assert "Ed25519 public key" in lines[3]


def test_keys_generate_command_error_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "generate", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["keys", "generate", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"gateway: {tmp_path / NAMES[0]}: already exists; not overwriting any key file\n"


def test_keys_command_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["keys"], ["keys", "generate"], ["keys", "rotate", "/tmp/x"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
