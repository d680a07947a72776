"""Access reviews and the HITRUST reports, from a real run (SPEC §10, §11; docs/reports.md).

One scenario runs once for the module: the dev IdP, a gateway with the admin API and a SQLite
record store, logins of five users with different groups (one of them 3 days ago, one with
hostile names), accesses, an MFA enrollment, a policy reload, an admin disable, and two
attestations through `gateway review attest` (keep, revoke). The gateway then stops (its chain
closed) and the reports are made by the real command line. The tests read what it made; the
HTML pages are opened in Debian's headless Chromium (as tests/test_demo.py does), screenshots
in tests/artifacts/. The review endpoint's own rules run against a gateway of their own.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jsonschema import Draft202012Validator

from gateway.devidp import DevClient, DevIdP, DevUser
from gateway.evidence_log import read
from gateway.keyfiles import generate, key_id, load_public_key
from gateway.policy import compile_policies
from gateway.reports import csv_cell, parse_date
from gateway.server import listen
from gateway.settings import load_settings
from tests.conftest import IN_CI, REPO, echo_app, start_server
from tests.test_admin import TOKENS, gateway_cli, tokens_file
from tests.test_demo import ARTIFACTS, CHROMIUM, CHROMIUM_FLAGS
from tests.test_login import SECRET, Clock, Env, follow, free_port, submit_login
from tests.test_mfa import (
    MfaEnv,
    capture_events,
    close_browsers,
    enroll,
    mfa_config,
    running,
    visit,
)

SCHEMAS = REPO / "docs" / "schemas"
HOSTILE_EMAIL = "=cmd|' /C calc'!A0@example.org"
USERS = {
    "alice": DevUser("alice", "alice-pw", groups=("sre", "platform-admins")),
    "bob": DevUser("bob", "bob-pw", groups=("finance",)),
    "carol": DevUser("carol", "carol-pw", groups=("engineering",)),
    "dave": DevUser("dave", "dave-pw", groups=("sre",)),
    "mallory": DevUser("mallory", "mallory-pw", email=HOSTILE_EMAIL, groups=("@evil", "sre")),
}


def routes_for(upstream: str, records_groups: list[str]) -> list[dict[str, Any]]:
    """Two routes beside test_mfa's: an admin console, and a PHI store (GET only)."""
    admin = {"allow": [{"groups": ["platform-admins"]}]}
    records = {"allow": [{"groups": records_groups, "methods": ["GET"]}]}
    return [
        {"id": "admin-console", "path": "/admin-console", "upstream": upstream, "policy": admin},
        {
            "id": "records",
            "path": "/records",
            "upstream": upstream,
            "classification": "phi",
            "policy": records,
        },
    ]


@dataclass
class Made:
    """What the scenario left behind: the config, and the reports the CLI made from it."""

    config: Path
    out: Path  # the access reviews: review.html, review.csv, review.json
    bundle: Path
    audit_key: Path  # the audit key's public half, as `gateway keys generate` wrote it
    cli: dict[str, tuple[int, str, str]]  # what each command printed
    refused_login: int  # the status of dave's login after the revoke
    dave_session_after: int  # dave's old session after the revoke


def validator(name: str) -> Draft202012Validator:
    schema = orjson.loads((SCHEMAS / name).read_bytes())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Made:
    tmp = tmp_path_factory.mktemp("reports")
    return asyncio.run(scenario(tmp))


@asynccontextmanager
async def gateway_run(tmp: Path, clock: Clock) -> AsyncIterator[MfaEnv]:
    """The gateway of the scenario: SQLite records, the audit key, two extra routes."""
    port, admin_port = free_port(), free_port()
    client = DevClient(
        "gateway", SECRET, redirect_uris=(f"http://127.0.0.1:{port}/.gateway/callback",)
    )
    async with AsyncExitStack() as stack:
        idp = DevIdP(dict(USERS), [client], clock=clock)
        issuer = await idp.start()
        stack.push_async_callback(idp.stop)
        upstream = await start_server(echo_app())
        stack.push_async_callback(upstream.runner.cleanup)
        settings = mfa_config(port, issuer, upstream.url, tmp, "invite")
        settings["routes"][-1:-1] = routes_for(upstream.url, ["sre"])  # before the public "open"
        settings["admin"] = {
            "listen": f"127.0.0.1:{admin_port}",
            "tokens_file": str(tokens_file(tmp / "admin-tokens")),
        }
        settings["state"]["records"] = f"sqlite:///{tmp}/state.db"
        generate(tmp / "keys")
        settings["audit"]["signing_key_file"] = str(tmp / "keys" / "audit-ed25519.pem")
        path = tmp / "gateway.yaml"
        path.write_text(yaml.safe_dump(settings))
        events: list[dict[str, Any]] = []
        stack.enter_context(capture_events(events))
        gateway = await listen(load_settings(path), shutdown_timeout=2, clock=clock)
        stack.push_async_callback(gateway.stop)
        base = f"http://127.0.0.1:{port}"
        env = Env(gateway, idp, upstream, clock, base, f"http://localhost:{port}", events)
        stack.push_async_callback(close_browsers, env)
        yield MfaEnv(env, f"http://127.0.0.1:{admin_port}", path)


async def scenario(tmp: Path) -> Made:
    clock = Clock()
    now = clock.now
    clock.now = now - 3 * 86400  # carol's only login: three days ago
    cli: dict[str, tuple[int, str, str]] = {}
    async with gateway_run(tmp, clock) as m:
        await visit(m, m.base + "/app/x", "carol")
        await written(tmp / "audit", "carol@example.org")  # stamped while the clock is back
        clock.now = now - 60
        alice, _secret, _codes = await enroll(m, "alice")  # and alice's own session has MFA
        for path in ("/app/x", "/secure/x", "/records/x"):
            assert (await follow(alice, m.base + path)).status == 200, path
        for user in ("bob", "dave", "mallory"):
            _, page = await visit(m, m.base + "/app/x", user)
            assert page.status == 200, (user, await page.text())
        dave = m.env.browsers[-2]
        # a reload that widens access to the PHI route: a policy.reloaded and a privilege change
        settings = yaml.safe_load(m.config.read_text())
        upstream = m.env.upstream.url
        settings["routes"] = [
            r for r in settings["routes"] if r["id"] not in ("admin-console", "records")
        ]
        settings["routes"][-1:-1] = routes_for(upstream, ["sre", "finance"])
        m.config.write_text(yaml.safe_dump(settings))
        status, answer = await m.call("POST", "/reload", "operate")
        assert status == 200 and answer["reloaded"], answer
        status, answer = await m.call("POST", "/users/bob%40example.org/disable", "operate")
        assert status == 200 and answer["ended"] == 1, answer
        config = str(m.config)
        attest = ("review", "attest", "-c", config, "--decision")
        cli["keep"] = await gateway_cli(
            *attest, "keep", "--user", "alice@example.org", "--note", "on call for the PHI store"
        )
        cli["revoke"] = await gateway_cli(
            *attest, "revoke", "--user", "DAVE@example.org", "--note", "left the team"
        )
        after = await dave.get(
            m.base + "/app/x", headers={"Accept": "application/json"}, allow_redirects=False
        )
        browser = m.env.browser()
        page = await follow(browser, m.base + "/app/x")
        refused = await follow(browser, await submit_login(browser, page, "dave", "dave-pw"))
    audit_key = tmp / "keys" / "audit-ed25519.pub.pem"
    out = tmp / "out"
    out.mkdir()
    review = ("report", "access-review", "-c", config, "--since", "1d", "--out")
    for kind in ("html", "csv", "json"):
        cli[kind] = run(*review, str(out / f"review.{kind}"))
    today = datetime.fromtimestamp(now, UTC).date()
    period = ("--since", (today - timedelta(days=1)).isoformat(), "--until", today.isoformat())
    cli["evidence"] = run("report", "evidence", "-c", config, *period, "--out", str(tmp / "bundle"))
    return Made(Path(config), out, tmp / "bundle", audit_key, cli, refused.status, after.status)


async def written(audit: Path, user: str) -> None:
    """Wait until the writer has put an allowed access of `user` on disk (it stamps records
    with the clock of when it writes them)."""
    for _ in range(100):
        for record in read([audit]):
            if record.get("type") == "access" and record.get("user") == user:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no access record of {user} was written")


def run(*args: str) -> tuple[int, str, str]:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stdout, done.stderr


# -- review attest -----------------------------------------------------------------------------


def test_review_attest_prints_one_line_and_revoke_disables(made: Made) -> None:
    code, out, err = made.cli["keep"]
    assert code == 0, err
    [line] = out.splitlines()
    assert line.startswith("attested keep for alice@example.org (http://127.0.0.1:")
    assert " as ops; policy sha256:" in line
    code, out, err = made.cli["revoke"]
    assert code == 0, err
    assert "attested revoke for dave@example.org" in out and "; disabled, ended 1 session;" in out
    assert made.dave_session_after == 401  # the session dave had ended at once
    assert made.refused_login == 403  # and the IdP's yes does not bring him back


# -- the access review ------------------------------------------------------------------------


def review_json(made: Made) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads((made.out / "review.json").read_bytes())
    return data


def rows_by_user(made: Made) -> dict[str, dict[str, Any]]:
    return {row["user"]: row for row in review_json(made)["rows"]}


def test_the_access_review_json_validates_against_its_schema(made: Made) -> None:
    for kind in ("html", "csv", "json"):
        code, out, err = made.cli[kind]
        assert code == 0 and out.startswith("access review of 5 identities written to"), err
    data = review_json(made)
    errors = [e.message for e in validator("access-review.schema.json").iter_errors(data)]
    assert errors == []
    assert [c["ref"] for c in data["controls"]] == ["01.e", "01.c", "02.i"]
    assert data["policy_hash"].startswith("sha256:") and data["window"]["since"] == "1d"


def test_report_files_are_readable_by_their_owner_only(made: Made) -> None:
    files = [*made.out.glob("review.*"), *made.bundle.iterdir()]
    assert len(files) == 9  # three reviews, six bundle files
    assert {f.name: f.stat().st_mode & 0o777 for f in files} == {f.name: 0o600 for f in files}


def test_the_access_review_shows_access_flags_mfa_and_attestations(made: Made) -> None:
    rows = rows_by_user(made)
    assert set(rows) == {f"{u}@example.org" for u in ("alice", "bob", "carol", "dave")} | {
        HOSTILE_EMAIL
    }
    alice = rows["alice@example.org"]
    access = {a["route"]: a for a in alice["access"]}
    assert access["records"]["reachable"] and access["records"]["limited"]  # GET only
    [rule] = compile_policies(load_settings(made.config))["records"].allow
    assert access["records"]["rules"] == [rule.id] and not rule.every_request
    assert access["records"]["last_access"] is not None
    assert "phi-route" in access["records"]["flags"]
    assert access["admin-console"]["last_access"] is None
    assert access["admin-console"]["flags"] == ["admin-route", "unused-access"]
    assert alice["flags"] == ["unused-access", "phi-route", "mfa-route", "admin-route"]
    assert alice["mfa"] == {"state": "enrolled", "recovery_codes_left": 10}
    assert alice["review"]["decision"] == "keep" and alice["review"]["reviewer"] == "ops"
    assert alice["review"]["note"] == "on call for the PHI store"
    carol = rows["carol@example.org"]
    assert carol["flags"][0] == "stale" and carol["mfa"]["state"] == "none"
    assert [a["route"] for a in carol["access"] if a["reachable"]] == ["app", "other", "short"]
    bob = rows["bob@example.org"]
    assert bob["disabled"]["actor"] == "ops" and bob["review"] is None
    assert "unreviewed" in bob["flags"]
    assert "records" in [a["route"] for a in bob["access"] if a["reachable"]]  # the reload
    dave = rows["dave@example.org"]
    assert dave["review"]["decision"] == "revoke" and dave["disabled"] is not None
    assert dave["disabled"]["reason"] == "access review by ops: left the team"


def test_the_access_review_csv_neutralises_formulas(made: Made) -> None:
    text = (made.out / "review.csv").read_text(encoding="utf-8")
    header, *rows = list(csv.reader(io.StringIO(text)))
    assert header[:3] == ["user", "identity", "email"]
    [hostile] = [row for row in rows if "cmd|" in row[0]]
    assert hostile[0] == "'" + HOSTILE_EMAIL and hostile[2] == "'" + HOSTILE_EMAIL
    assert hostile[3] == "'@evil; sre"
    for row in rows:
        for cell in row:
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell
    assert len(rows) == 5


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("=1+1", "'=1+1"),
        ("+SUM(A1)", "'+SUM(A1)"),
        ("-2+3", "'-2+3"),
        ("@evil", "'@evil"),
        ("\t=x", "'\t=x"),
        ("\r=x", "'\r=x"),
        ("alice=bob", "alice=bob"),
        (None, ""),
    ],
)
def test_csv_cells_that_a_spreadsheet_would_run_get_a_quote(value: str | None, shown: str) -> None:
    assert csv_cell(value) == shown


def test_the_access_review_renders_in_chromium(made: Made, page: Any) -> None:
    page.goto((made.out / "review.html").as_uri())
    assert page.title().startswith("Access review")
    users = page.locator("#review tbody strong.user").all_inner_texts()
    assert sorted(users) == sorted(rows_by_user(made))
    hostile = page.locator(f'#review tr[data-identity$="{USERS["mallory"].sub}"]')
    assert HOSTILE_EMAIL in hostile.inner_text()  # shown as text
    assert page.locator("script").count() == 0
    decisions = page.locator("#review strong.decision").all_inner_texts()
    assert sorted(decisions) == ["keep", "revoke"]
    page.screenshot(path=ARTIFACTS / "reports-1-access-review.png", full_page=True)


# -- the evidence bundle -----------------------------------------------------------------------


def evidence(made: Made) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads((made.bundle / "evidence.json").read_bytes())
    return data


def section(made: Made, ident: str) -> dict[str, Any]:
    return next(s for s in evidence(made)["sections"] if s["id"] == ident)


def rows_of(part: dict[str, Any], name: str) -> list[dict[str, Any]]:
    found = next(t for t in part["tables"] if t["name"] == name)
    return [dict(zip(found["columns"], row, strict=True)) for row in found["rows"]]


def documented_command(bundle: Path) -> str:
    """The openssl line VERIFY.txt tells an auditor to run."""
    lines = (bundle / "VERIFY.txt").read_text().splitlines()
    return next(line.strip() for line in lines if line.strip().startswith("openssl "))


def test_the_bundle_passes_sha256sum_and_its_signature_verifies(made: Made) -> None:
    code, out, err = made.cli["evidence"]
    assert code == 0 and out.startswith("evidence bundle for "), err
    names = sorted(p.name for p in made.bundle.iterdir())
    assert names == [
        "SHA256SUMS",
        "SHA256SUMS.sig",
        "VERIFY.txt",
        "audit-ed25519.pub",
        "evidence.json",
        "index.html",
    ]
    checked = subprocess.run(
        ["sha256sum", "-c", "SHA256SUMS"], cwd=made.bundle, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count(": OK") == 4
    sums = (made.bundle / "SHA256SUMS").read_bytes()
    pinned = load_public_key(made.audit_key, "ed25519")
    pinned.verify((made.bundle / "SHA256SUMS.sig").read_bytes(), sums)  # raises if not
    shipped = load_pem_public_key((made.bundle / "audit-ed25519.pub").read_bytes())
    assert key_id(shipped) == key_id(pinned) == evidence(made)["signing_key"]["key_id"]  # type: ignore[arg-type]
    if shutil.which("openssl") is None:
        return  # the signature verified with cryptography above; the command needs OpenSSL 3
    command = documented_command(made.bundle)
    assert command.startswith("openssl pkeyutl -verify -pubin -inkey audit-ed25519.pub -rawin")
    verified = subprocess.run(command.split(), cwd=made.bundle, capture_output=True, text=True)
    assert verified.returncode == 0 and "Signature Verified Successfully" in verified.stdout


def test_a_tampered_bundle_fails_the_checks(made: Made, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(made.bundle, copy)
    data = (copy / "evidence.json").read_text().replace('"disables": 2', '"disables": 0')
    (copy / "evidence.json").write_text(data)
    checked = subprocess.run(
        ["sha256sum", "-c", "SHA256SUMS"], cwd=copy, capture_output=True, text=True
    )
    assert checked.returncode == 1 and "evidence.json: FAILED" in checked.stdout
    # summing the changed file again breaks the signature instead
    sums = (copy / "SHA256SUMS").read_text().splitlines()
    fixed = hashlib.sha256((copy / "evidence.json").read_bytes()).hexdigest()
    (copy / "SHA256SUMS").write_text(
        "\n".join(f"{fixed}  evidence.json" if s.endswith("  evidence.json") else s for s in sums)
        + "\n"
    )
    assert (
        subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=copy, capture_output=True).returncode
        == 0
    )
    pinned = load_public_key(made.audit_key, "ed25519")
    with pytest.raises(InvalidSignature):
        pinned.verify((copy / "SHA256SUMS.sig").read_bytes(), (copy / "SHA256SUMS").read_bytes())
    if shutil.which("openssl"):
        command = documented_command(copy).split()
        assert subprocess.run(command, cwd=copy, capture_output=True).returncode != 0


def test_a_tampered_log_is_evidence_too_and_exits_1(made: Made, tmp_path: Path) -> None:
    audit = tmp_path / "audit"
    shutil.copytree(made.config.parent / "audit", audit)
    [segment] = sorted(audit.glob("*.jsonl"))
    lines = segment.read_bytes().split(b"\n")
    at = next(i for i, line in enumerate(lines) if b'"user.disabled"' in line)
    lines[at] = lines[at].replace(b"bob@example.org", b"eve@example.org")
    segment.write_bytes(b"\n".join(lines))
    today = datetime.now(UTC).date().isoformat()
    args = ("-c", str(made.config), "--since", today, "--until", today, "--audit", str(audit))
    code, out, err = run("report", "evidence", *args, "--out", str(tmp_path / "bundle"))
    assert code == 1 and out.startswith("evidence bundle for ")
    assert err.startswith("gateway: the audit log FAILED verification: ")
    [origin] = orjson.loads((tmp_path / "bundle" / "evidence.json").read_bytes())["verification"]
    assert origin["ok"] is False and origin["failure"]["kind"] == "modified"
    assert origin["failure"]["seq"] == orjson.loads(lines[at])["seq"]
    checked = subprocess.run(
        ["sha256sum", "-c", "SHA256SUMS"], cwd=tmp_path / "bundle", capture_output=True
    )
    assert checked.returncode == 0  # the bundle itself is whole: it reports the failure


def test_evidence_json_validates_and_cites_every_control(made: Made) -> None:
    data = evidence(made)
    errors = [e.message for e in validator("evidence.schema.json").iter_errors(data)]
    assert errors == []
    cited = {c["ref"] for s in data["sections"] for c in s["controls"]}
    assert cited == {
        "01.a",
        "01.b",
        "01.c",
        "01.e",
        "01.j",
        "01.q",
        "01.t",
        "01.u",
        "02.i",
        "09.aa",
        "09.ab",
        "09.ac",
        "09.ad",
    }
    for part in data["sections"]:
        assert part["period"] == data["period"] and len(part["measured"]) > 40
    assert [v["ok"] for v in data["verification"]] == [True]
    assert data["verification"][0]["still_open"] is False  # the gateway stopped: chain closed


def test_evidence_measures_the_run(made: Made) -> None:
    policy = section(made, "01.a")
    assert policy["summary"]["reloads"] == 1 and policy["summary"]["hashes_seen"] >= 1
    [reload] = rows_of(policy, "reloads")
    assert reload["actor"] == "ops" and reload["before"] != reload["after"]
    registration = section(made, "01.b")["summary"]
    assert registration["identities"] == 5 and registration["new_in_period"] == 4  # not carol
    assert registration["logins_refused"] == 1  # dave, after the revoke
    changes = rows_of(section(made, "01.c"), "privilege_changes")
    assert [c["cause"] for c in changes] == ["policy-reload"]
    reviews = section(made, "01.e")["summary"]
    assert (
        reviews["attestations"],
        reviews["attestation_events"],
        reviews["kept"],
        reviews["revoked"],
    ) == (2, 2, 1, 1)
    mfa = {row["user"]: row for row in rows_of(section(made, "01.j"), "users")}
    assert set(mfa) == {"alice@example.org", "bob@example.org", "dave@example.org", HOSTILE_EMAIL}
    assert mfa["alice@example.org"]["gateway_factor"] and mfa["alice@example.org"]["mfa_seen"]
    assert not mfa["bob@example.org"]["covered"]
    assert section(made, "01.j")["summary"]["coverage_percent"] == 25.0
    sessions = section(made, "01.t")["summary"]
    assert sessions["idle_timeout_seconds"] == 900 and sessions["max_lifetime_seconds"] == 43200
    removal = section(made, "02.i")
    disables = {row["user"]: row for row in rows_of(removal, "disables")}
    assert set(disables) == {"bob@example.org", "dave@example.org"}
    for row in disables.values():
        assert row["actor"] == "ops" and row["sessions_ended"] == 1 and row["allowed_after"] == 0
        assert 0 <= row["seconds_to_last_end"] < 1
    assert removal["summary"]["review_revokes"] == 1
    calls = rows_of(section(made, "09.ad"), "calls")
    attested = [c for c in calls if c["action"] == "admin.review_attested"]
    assert [(c["actor"], c["status"]) for c in attested] == [("ops", 200), ("ops", 200)]
    logging = section(made, "09.aa")
    types = {row["type"]: row["count"] for row in rows_of(logging, "types")}
    assert logging["summary"]["records"] == sum(types.values())
    assert types["review.attested"] == 2 and types["auth.login"] == 4 and types["access"] >= 6
    assert logging["summary"]["origins_ok"] == logging["summary"]["origins"] == 1
    assert section(made, "break-glass")["summary"]["configured"] is False


def test_the_evidence_index_renders_in_chromium(made: Made, page: Any) -> None:
    page.goto((made.bundle / "index.html").as_uri())
    assert page.title().startswith("Evidence")
    headings = page.locator("main section h2").all_inner_texts()
    assert headings[0].startswith("01.a") and any(h.startswith("02.i") for h in headings)
    assert len(headings) == len(evidence(made)["sections"])
    assert "OK" in page.locator("#verification").inner_text()
    assert page.locator("script").count() == 0
    assert page.locator('[data-table="02.i.disables"] tbody tr').count() == 2
    page.screenshot(path=ARTIFACTS / "reports-2-evidence.png", full_page=True)


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Any]:
    """A page in Debian's headless Chromium; the network is not needed (file:// pages)."""
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is absent (Debian package chromium; .ci/run installs it)"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            opened = context.new_page()
            opened.set_default_timeout(10_000)
            yield opened
        finally:
            browser.close()


# -- the review endpoint -----------------------------------------------------------------------


@pytest.fixture
async def review_env(tmp_path: Path) -> AsyncIterator[MfaEnv]:
    async with running(tmp_path, {}) as env:
        yield env


async def test_the_review_endpoint_needs_the_operate_role(review_env: MfaEnv) -> None:
    await visit(review_env, review_env.base + "/app/x", "alice")
    body = {"user": "alice@example.org", "decision": "keep"}
    assert await post_review(review_env, body, "read") == (403, "insufficient-role")
    assert await post_review(review_env, body, None) == (401, "no-token")
    status, _ = await post_review(review_env, body, "operate")
    assert status == 200
    refused = [e for e in review_env.events_of("admin.review_attested") if e["status"] == 403]
    assert refused[0]["actor"] == "auditor"
    [attested] = review_env.events_of("review.attested")
    assert (attested["reviewer"], attested["decision"], attested["user"]) == (
        "ops",
        "keep",
        "alice@example.org",
    )


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (
            {"user": "alice@example.org", "decision": "keep", "reviewer": "someone-else"},
            400,
            "reviewer",
        ),
        ({"user": "alice@example.org", "decision": "maybe"}, 400, "keep or revoke"),
        ({"decision": "keep"}, 400, "'user'"),
        ({"user": "alice@example.org", "decision": "keep", "note": "x" * 1001}, 400, "1000"),
        ({"user": "alice@example.org", "decision": "keep", "extra": 1}, 400, "unknown field"),
        ({"user": "nobody@example.org", "decision": "keep"}, 404, "no user"),
    ],
)
async def test_a_bad_review_is_refused_and_nothing_is_attested(
    review_env: MfaEnv, body: dict[str, Any], status: int, message: str
) -> None:
    await visit(review_env, review_env.base + "/app/x", "alice")
    got, detail = await post_review(review_env, body, "operate", detail=True)
    assert got == status and message in detail
    assert review_env.events_of("review.attested") == []


async def test_the_cli_reports_a_refused_review_in_one_line(review_env: MfaEnv) -> None:
    await visit(review_env, review_env.base + "/app/x", "alice")
    args = ("review", "attest", "-c", str(review_env.config), "--user", "alice@example.org")
    code, _, err = await gateway_cli(*args, "--decision", "keep", token=TOKENS["read"])
    assert code == 1 and err.startswith("gateway: the admin API refused this call (403)")
    assert len(err.strip().splitlines()) == 1
    code, _, err = await gateway_cli(*args, "--decision", "perhaps")
    assert code == 2 and "invalid choice" in err


async def post_review(
    m: MfaEnv, body: dict[str, Any], role: str | None, detail: bool = False
) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {TOKENS[role]}"} if role else {}
    async with (
        aiohttp.ClientSession() as client,
        client.post(m.admin + "/reviews", json=body, headers=headers) as resp,
    ):
        answer = await resp.json()
        return resp.status, str(answer.get("detail" if detail else "reason", ""))


def test_dates_are_whole_days_or_rfc3339_with_an_offset() -> None:
    start, end = parse_date("2026-01-31"), parse_date("2026-01-31", end=True)
    assert end - start == 86400
    assert parse_date("2026-01-31T00:00:00Z") == start
    for bad in ("31/01/2026", "2026-01-31T00:00:00", "yesterday"):
        with pytest.raises(ValueError):
            parse_date(bad)


def test_report_mistakes_are_one_line(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    routes = [{"id": "app", "path": "/", "upstream": "http://127.0.0.1:9", "public": True}]
    state = {"sessions": "memory://", "records": "memory://"}
    config.write_text(
        yaml.safe_dump(
            {"server": {"public_url": "http://gw.test"}, "state": state, "routes": routes}
        )
    )
    for args, message in [
        (("access-review", "--out", "x.pdf"), "name a .html, .csv or .json file"),
        (("access-review", "--since", "soon", "--out", "x.csv"), "--since"),
        (("access-review", "--out", str(tmp_path / "x.csv")), "nothing durable"),
        (("evidence", "--since", "2026-02-01", "--until", "2026-01-01", "--out", "b"), "not after"),
        (
            ("evidence", "--since", "2026-01-01", "--until", "2026-01-31", "--out", "b"),
            "audit.signing_key_file",
        ),
    ]:
        code, _, err = run("report", args[0], "-c", str(config), *args[1:])
        assert code == 2 and err.startswith("gateway: ") and message in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
