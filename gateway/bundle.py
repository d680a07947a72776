"""`gateway report evidence` (SPEC §10, docs/reports.md): the evidence bundle, made and signed.

    main(config, since, until, audit_dirs, out) -> int    the command (0; 1 when an origin
                                                          of the log fails verification)
    sha256sums(directory, names) -> bytes                 the `sha256sum -c` file

The bundle is a new directory:

    index.html         one section per control (printable: no script, no external asset)
    evidence.json      the same data (docs/schemas/evidence.schema.json)
    audit-ed25519.pub  the public half of the audit signing key, PEM; its key id is in both
    VERIFY.txt         how to check the bundle
    SHA256SUMS         "<sha-256 hex>  <name>" for each file above, as `sha256sum` writes it
    SHA256SUMS.sig     the Ed25519 signature (64 raw bytes) of SHA256SUMS by the audit key

Every origin of the log is verified in-process (`gateway.audit.verify`) against the public
halves of `audit.signing_key_file` and `audit.previous_signing_key_files`, in `--live` mode:
a chain the running gateway still writes is reported open, not failed. A failed origin is
evidence too: the bundle is still written, and the exit status is 1.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.audit.verify import OriginReport, VerifyError, verify
from gateway.evidence import Inputs, section_json
from gateway.evidence_access import access_sections
from gateway.evidence_log import LogTally, after_disable, read
from gateway.evidence_operations import operations_sections
from gateway.keyfiles import KeyFileError, key_id, load_private_key, load_public_key
from gateway.reports import (
    ReportError,
    load_config,
    open_sources,
    parse_date,
    render,
    utc,
    write_private,
)
from gateway.settings import Settings

PUBLIC_KEY = "audit-ed25519.pub"
SUMS, SIGNATURE = "SHA256SUMS", "SHA256SUMS.sig"
VERIFY_COMMAND = (
    f"openssl pkeyutl -verify -pubin -inkey {PUBLIC_KEY} -rawin -in {SUMS} -sigfile {SIGNATURE}"
)


def main(config: str, since: str, until: str, audit_dirs: Sequence[str], out: str) -> int:
    try:
        start, end = parse_date(since), parse_date(until, end=True)
    except ValueError as err:
        raise ReportError(str(err)) from None
    if end <= start:
        raise ReportError(f"--until {until} is not after --since {since}")
    settings = load_config(config)
    signer = _signing_key(settings)
    dirs = [Path(d) for d in audit_dirs] or [settings.audit.dir]
    target = _new_directory(Path(out))
    pinned = [signer.public_key(), *_previous_keys(settings)]
    try:
        reports = verify(dirs, pinned, live=True)
    except VerifyError as err:
        raise ReportError(str(err)) from None
    tally = LogTally(start, end)
    for record in read(dirs):
        tally.take(record)
    disables = tally.disables()
    allowed = after_disable(read(dirs), disables, tally.end) if disables else []
    inputs = asyncio.run(_inputs(settings, tally, tuple(reports), tuple(allowed), start, end))
    document = evidence_json(inputs, dirs, signer.public_key())
    write(target, document, signer)
    failed = [r.origin for r in reports if not r.ok]
    print(f"evidence bundle for {utc(start)} to {utc(end)} written to {target}")
    if failed:
        print(f"gateway: the audit log FAILED verification: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _signing_key(settings: Settings) -> Ed25519PrivateKey:
    path = settings.audit.signing_key_file
    if path is None:
        raise ReportError(
            f"{settings.source}: audit.signing_key_file is not set: nothing can sign the bundle "
            "or anchor the log's verification (make one with `gateway keys generate DIR`)"
        )
    try:
        return load_private_key(path, "ed25519")
    except KeyFileError as err:
        raise ReportError(str(err)) from None


def _previous_keys(settings: Settings) -> list[Ed25519PublicKey]:
    try:
        return [load_public_key(p, "ed25519") for p in settings.audit.previous_signing_key_files]
    except KeyFileError as err:
        raise ReportError(str(err)) from None


def _new_directory(path: Path) -> Path:
    """The bundle's directory: made now, or one that exists and is empty (never mixed)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ReportError(f"--out {path}: exists and is not an empty directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportError(f"--out {path}: cannot make it: {err.strerror}", status=1) from None
    return path


async def _inputs(
    settings: Settings,
    tally: LogTally,
    reports: tuple[OriginReport, ...],
    allowed: tuple[int, ...],
    start: float,
    end: float,
) -> Inputs:
    async with open_sources(settings) as sources:
        entries = tuple([entry async for entry in sources.directory.entries()])
        factors = {}
        for entry in entries:
            factor = await sources.mfa.factor(entry.identity)
            if factor is not None:
                factors[entry.identity] = factor
        made = [a async for a in sources.reviews.every() if start <= a.at < end]
        return Inputs(
            settings,
            sources.policies,
            tally,
            entries,
            factors,
            tuple(made),
            reports,
            allowed,
            start,
            end,
        )


def evidence_json(inputs: Inputs, dirs: Sequence[Path], public: Ed25519PublicKey) -> dict[str, Any]:
    start, end = inputs.start, inputs.end
    sections = access_sections(inputs) + operations_sections(inputs)
    return {
        "report": "evidence",
        "version": 1,
        "generated_at": utc(time.time()),
        "config": str(inputs.settings.source),
        "period": {"since": utc(start), "until": utc(end)},
        "policy_hash": inputs.policies.hash,
        "audit_dirs": [str(d) for d in dirs],
        "signing_key": {"key_id": key_id(public), "file": PUBLIC_KEY, "algorithm": "Ed25519"},
        "verification": [_verification(report) for report in inputs.verification],
        "sections": [section_json(section, start, end) for section in sections],
    }


def _verification(report: OriginReport) -> dict[str, Any]:
    failure = report.failure
    return {
        "origin": report.origin,
        "ok": report.ok,
        "records": report.records,
        "checkpoints": report.checkpoints,
        "last_signed_seq": report.last_signed_seq,
        "unsigned": report.unsigned,
        "still_open": report.still_open,
        "failure": None
        if failure is None
        else {"seq": failure.seq, "kind": failure.kind, "detail": failure.detail},
        "lines": report.lines(),
    }


# -- writing and signing -----------------------------------------------------------------------


def write(target: Path, document: dict[str, Any], signer: Ed25519PrivateKey) -> None:
    public = signer.public_key()
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    files = {
        "index.html": render("report_evidence.html", report=document, verify=VERIFY_COMMAND),
        "evidence.json": orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n",
        PUBLIC_KEY: pem.decode("ascii"),
        "VERIFY.txt": _instructions(document),
    }
    try:
        for name, text in files.items():
            write_private(target / name, text.encode("utf-8"))
        sums = sha256sums(target, sorted(files))
        write_private(target / SUMS, sums)
        write_private(target / SIGNATURE, signer.sign(sums))
    except OSError as err:
        raise ReportError(
            f"cannot write the bundle in {target}: {err.strerror}", status=1
        ) from None


def sha256sums(directory: Path, names: Sequence[str]) -> bytes:
    """`sha256sum` text mode output: "<hex>  <name>" per line (names without spaces)."""
    lines = []
    for name in names:
        digest = hashlib.sha256((directory / name).read_bytes()).hexdigest()
        lines.append(f"{digest}  {name}\n")
    return "".join(lines).encode("ascii")


def _instructions(document: dict[str, Any]) -> str:
    key = document["signing_key"]["key_id"]
    return f"""Evidence bundle made by `gateway report evidence` at {document["generated_at"]}
for {document["period"]["since"]} to {document["period"]["until"]}, from {document["config"]}.

To check it, in this directory:

    sha256sum -c {SUMS}
    {VERIFY_COMMAND}

The first proves every file is the one that was summed; the second that {SUMS} was signed
by the audit signing key whose public half is {PUBLIC_KEY}. That copy of the key proves
nothing on its own: compare its key id, {key}, with the audit key id you pinned (printed by
`gateway keys generate`, and the key `gateway audit verify --key` trusts).
"""
