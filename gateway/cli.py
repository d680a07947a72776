"""The `gateway` command (SPEC §10). Thin: it parses arguments and calls the modules.

Bad input is one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, NoReturn

from gateway import __version__

if TYPE_CHECKING:
    from gateway.settings import Admin

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"gateway: {message} (see 'gateway --help')\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gateway", description="An authenticating reverse proxy.")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    run = commands.add_parser("run", help="serve, with the config file given")
    run.add_argument("-c", "--config", required=True, metavar="FILE")
    # Given by the parent of server.workers > 1 to each worker it starts (gateway.supervisor).
    run.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    run.add_argument("--port", type=_port, help=argparse.SUPPRESS)
    run.add_argument("--admin-port", type=_port, help=argparse.SUPPRESS)
    run.set_defaults(func=_run)
    check = commands.add_parser("check-config", help="validate a config file and summarize it")
    check.add_argument("-c", "--config", required=True, metavar="FILE")
    check.set_defaults(func=_check_config)
    explain = commands.add_parser(
        "explain",
        help="would this request be allowed? (nothing is started or contacted)",
        description="Prints ALLOW or DENY, the reason and the route; exit 0 ALLOW, 1 DENY. "
        "Assumed unless given: the email is the user when it contains '@', verified; "
        "signed in just now; no second factor; no client address.",
    )
    explain.add_argument("-c", "--config", required=True, metavar="FILE")
    explain.add_argument("--user", required=True, metavar="U", help="the user_claim value")
    explain.add_argument("--groups", default="", metavar="A,B", help="the caller's groups")
    explain.add_argument("--mfa", action="store_true", help="the session has a second factor")
    explain.add_argument(
        "--ip", metavar="A", help="the client address; without it no source_ips rule can hold"
    )
    explain.add_argument("--client", metavar="C", help="a service client's id (a bearer token)")
    explain.add_argument("--email", metavar="E", help="default: the user, if it contains '@'")
    explain.add_argument("method", metavar="METHOD")
    explain.add_argument("url", metavar="URL", help="/path (on public_url's host) or a full URL")
    explain.set_defaults(func=_explain)
    sessions = commands.add_parser(
        "sessions", help="list or end sessions, through the running gateway's admin API"
    )
    sessions.add_argument("action", choices=["list", "revoke"])
    sessions.add_argument("-c", "--config", required=True, metavar="FILE")
    which = sessions.add_mutually_exclusive_group()
    which.add_argument("--user", metavar="U", help="a user_claim value, or ISS|SUB")
    which.add_argument("--id", dest="handle", metavar="HANDLE", help="one session's handle")
    which.add_argument("--all", action="store_true", help="every session")
    sessions.add_argument("--json", action="store_true", help="list as JSON")
    sessions.set_defaults(func=_sessions)
    users = commands.add_parser(
        "users", help="disable, enable, MFA links and resets, through the admin API"
    )
    users.add_argument("action", choices=["disable", "enable", "enroll-link", "reset-mfa"])
    users.add_argument("-c", "--config", required=True, metavar="FILE")
    users.add_argument("user", metavar="USER", help="a user_claim value, or ISS|SUB")
    users.set_defaults(func=_users)
    keys = commands.add_parser("keys", help="make the assertion and audit signing keys")
    keys.add_argument("action", choices=["generate"])
    keys.add_argument("dir", metavar="DIR", help="where to write them (made 0700 if missing)")
    keys.set_defaults(func=_keys)
    _add_audit(commands)
    _add_reports(commands)
    demo = commands.add_parser(
        "demo", help="a dev IdP, a sample app and the gateway, on loopback (Ctrl-C stops)"
    )
    demo.add_argument("-c", "--config", metavar="FILE", help="default: config/demo.yaml")
    demo.add_argument("--users", metavar="FILE", help="default: config/devidp-users.yaml")
    demo.add_argument("--port", type=_port, default=8080, help="gateway (8080); 0: free ports")
    demo.add_argument("--idp-port", type=_port, help="dev IdP (8090; 0 with --port 0)")
    demo.add_argument("--whoami-port", type=_port, help="whoami app (8091; 0 with --port 0)")
    demo.set_defaults(func=_demo)
    return parser


def _add_audit(commands: argparse._SubParsersAction[_Parser]) -> None:
    """`gateway audit ACTION`: the audit log's commands, one sub-parser each (docs/audit-log.md)."""
    audit = commands.add_parser("audit", help="verify the audit log")
    actions = audit.add_subparsers(
        dest="audit_action", required=True, metavar="ACTION", parser_class=_Parser
    )
    verify = actions.add_parser(
        "verify",
        help="check every hash link and signature against pinned public keys",
        description="Prints OK or FAIL for each origin (a FAIL names the first bad seq and "
        "what is wrong); exit 0 when every origin is OK, 1 when one is not, 2 for bad input.",
    )
    verify.add_argument("dirs", nargs="*", metavar="DIR", help="segment directories (audit.dir)")
    verify.add_argument(
        "--key",
        dest="keys",
        action="extend",
        nargs="+",
        default=[],
        metavar="PUBKEY",
        help="a trusted Ed25519 public key file (audit-ed25519.pub.pem); required",
    )
    verify.add_argument(
        "--live",
        action="store_true",
        help="the gateway still writes the log: an open last chain is a warning, not a failure",
    )
    verify.set_defaults(func=_audit_verify)
    _add_audit_tail(actions)


def _add_audit_tail(actions: argparse._SubParsersAction[_Parser]) -> None:
    tail = actions.add_parser(
        "tail",
        help="print the audit log as it is written, every origin merged, its chain checked",
        description="The last N records of each origin, merged by time; with -f, every new "
        "record within a second. Each hash link and seq is checked (signatures: audit verify): "
        "a break prints '!! CHAIN BROKEN' (on stderr with --json) and makes the exit status 1.",
    )
    tail.add_argument("dir", metavar="DIR", help="the segment directory (audit.dir)")
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    tail.add_argument("-n", type=int, default=20, metavar="N", help="records of each origin first")
    tail.add_argument("--json", action="store_true", help="the stored lines, byte for byte")
    tail.add_argument("--user", metavar="U", help="user, subject or actor (an email: any case)")
    tail.add_argument("--route", metavar="R", help="a route id")
    tail.add_argument("--decision", choices=["allow", "deny", "would-deny"])
    tail.add_argument("--type", metavar="T", help="a record type, or a prefix: 'auth.*'")
    tail.set_defaults(func=_audit_tail)


def _add_reports(commands: argparse._SubParsersAction[_Parser]) -> None:
    """`gateway report ...` and `gateway review attest` (docs/reports.md)."""
    report = commands.add_parser("report", help="access review and HITRUST evidence reports")
    kinds = report.add_subparsers(
        dest="report_kind", required=True, metavar="REPORT", parser_class=_Parser
    )
    review = kinds.add_parser(
        "access-review",
        help="who can reach which route now, with last use, MFA, flags and attestations",
        description="Reads the config's record store (nothing is changed). The format "
        "follows --out: .html, .csv or .json.",
    )
    review.add_argument("-c", "--config", required=True, metavar="FILE")
    review.add_argument("--since", default="90d", metavar="DURATION", help="window (90d)")
    review.add_argument("--out", required=True, metavar="FILE", help="FILE.html|.csv|.json")
    review.set_defaults(func=_report_access_review)
    evidence = kinds.add_parser(
        "evidence",
        help="a signed bundle of evidence per HITRUST CSF control over a period",
        description="Verifies the audit log, then writes index.html, evidence.json, the audit "
        "public key, SHA256SUMS and its Ed25519 signature into a new directory. Exit 1 when "
        "an origin of the log fails verification (the bundle is still written).",
    )
    evidence.add_argument("-c", "--config", required=True, metavar="FILE")
    evidence.add_argument("--since", required=True, metavar="DATE", help="2026-01-01 (UTC)")
    evidence.add_argument("--until", required=True, metavar="DATE", help="inclusive day")
    evidence.add_argument(
        "--audit",
        action="extend",
        nargs="+",
        default=[],
        metavar="DIR",
        help="audit directories, one per replica (default: audit.dir)",
    )
    evidence.add_argument("--out", required=True, metavar="DIR", help="a new directory")
    evidence.set_defaults(func=_report_evidence)
    reviews = commands.add_parser("review", help="record access review decisions (admin API)")
    actions = reviews.add_subparsers(
        dest="review_action", required=True, metavar="ACTION", parser_class=_Parser
    )
    attest = actions.add_parser(
        "attest",
        help="keep or revoke a user's access (operate role; revoke disables the user)",
        description="The reviewer recorded is the name of the token in GATEWAY_ADMIN_TOKEN.",
    )
    attest.add_argument("-c", "--config", required=True, metavar="FILE")
    attest.add_argument("--user", required=True, metavar="U", help="user_claim value or ISS|SUB")
    attest.add_argument("--decision", required=True, choices=["keep", "revoke"])
    attest.add_argument("--note", default="", metavar="TEXT", help="why (kept with the decision)")
    attest.set_defaults(func=_review_attest)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


def _check_config(args: argparse.Namespace) -> int:
    from gateway.settings import ConfigError, load_settings, summary

    try:
        settings = load_settings(args.config)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return EXIT_USAGE
    print(summary(settings))
    return 0


def _explain(args: argparse.Namespace) -> int:
    import time

    from gateway.explain import Question, explain
    from gateway.settings import ConfigError, load_settings

    try:
        question = Question.parse(
            args.method,
            args.url,
            args.user,
            groups=args.groups,
            mfa=args.mfa,
            ip=args.ip,
            client=args.client,
            email=args.email,
        )
    except ValueError as err:
        return _usage(str(err))
    try:
        settings = load_settings(args.config)
        answer = explain(settings, question, time.time())
    except ConfigError as err:
        print(err, file=sys.stderr)
        return EXIT_USAGE
    except ValueError as err:  # a policy that does not compile (the same rule twice)
        return _usage(f"{args.config}: {err}")
    print(answer.text())
    return 0 if answer.allowed else 1


def _run(args: argparse.Namespace) -> int:
    from gateway.admin import TokensFileError
    from gateway.breakglass_accounts import AccountsFileError
    from gateway.events import configure_logging
    from gateway.keyfiles import KeyFileError
    from gateway.server import new_event_loop, serve
    from gateway.settings import ConfigError, load_settings
    from gateway.supervisor import Worker, supervise, worker_logs

    configure_logging()
    if args.worker is not None:
        worker_logs(args.worker)
    try:
        settings = load_settings(args.config)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return EXIT_USAGE
    log = logging.getLogger("gateway")
    for warning in settings.warnings if args.worker is None else ():  # the parent's to say
        log.warning(warning)
    loop = new_event_loop()
    try:
        if args.worker is None and settings.server.workers > 1:
            return loop.run_until_complete(supervise(settings))
        worker = (
            Worker(args.worker, args.port, args.admin_port) if args.worker is not None else None
        )
        loop.run_until_complete(serve(settings, worker))
    except OSError as err:  # the port is taken, a TLS file is unreadable, ...
        print(f"gateway: cannot serve: {err}", file=sys.stderr)
        return 1
    except (TokensFileError, KeyFileError, AccountsFileError) as err:
        print(f"gateway: {err}", file=sys.stderr)  # FILE[:LINE]: what is wrong
        return EXIT_USAGE
    finally:
        loop.close()
    return 0


def _port(value: str) -> int:
    """An argparse type: a TCP port, 0 meaning any free one."""
    port = int(value)  # argparse turns the ValueError into a usage error
    if not 0 <= port <= 65535:
        raise ValueError(value)
    return port


_port.__name__ = "port"  # argparse names the type in its message: "invalid port value: '70000'"


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gateway import demo

    options = demo.Options(
        config=Path(args.config) if args.config else demo.DEFAULT_CONFIG,
        users=Path(args.users) if args.users else demo.DEFAULT_USERS,
        port=args.port,
        idp_port=args.idp_port,
        whoami_port=args.whoami_port,
    )
    return demo.main(options)


def _keys(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gateway.keyfiles import KeyFileError, generate

    try:
        written = generate(Path(args.dir))
    except KeyFileError as err:
        return _usage(str(err))
    for key in written:
        print(key.describe())
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gateway.audit.verify import VerifyError, verify
    from gateway.keyfiles import KeyFileError, load_public_key

    if not args.keys:
        return _usage(
            "audit verify needs --key PUBKEY, the audit public key you trust: "
            "a log that names its own key proves nothing"
        )
    if not args.dirs:  # `--key K DIR`: --key takes every file after it
        return _usage("audit verify needs DIR... before --key PUBKEY...")
    try:
        keys = [load_public_key(Path(path), "ed25519") for path in args.keys]
        reports = verify([Path(path) for path in args.dirs], keys, live=args.live)
    except (KeyFileError, VerifyError) as err:
        return _usage(str(err))
    for report in reports:
        print("\n".join(report.lines()))
    return 0 if all(report.ok for report in reports) else 1


def _audit_tail(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gateway.audit.tail import Filter, Options, command

    if args.n < 0:
        return _usage("-n needs a count, 0 or more")
    wanted = Filter(user=args.user, route=args.route, decision=args.decision, type=args.type)
    return command(Options(Path(args.dir), args.follow, args.json, args.n, wanted))


def _sessions(args: argparse.Namespace) -> int:
    from gateway.adminclient import Selection, sessions_command

    if args.action == "revoke" and not (args.user or args.handle or args.all):
        return _usage("sessions revoke needs --user U, --id HANDLE or --all")
    if "" in (args.user, args.handle):
        return _usage("--user and --id need a value")
    selection = Selection(args.user, args.handle, args.all)
    return _admin_call(
        args.config,
        lambda admin, token, env: sessions_command(
            admin, token, args.action, selection, env, args.json
        ),
    )


def _users(args: argparse.Namespace) -> int:
    from gateway.adminclient import users_command

    if not args.user.strip():
        return _usage("USER needs a value: a user_claim value, or ISS|SUB")
    return _admin_call(
        args.config,
        lambda admin, token, env: users_command(admin, token, args.action, args.user, env),
    )


def _report_access_review(args: argparse.Namespace) -> int:
    from gateway import access_review
    from gateway.reports import ReportError

    try:
        return access_review.main(args.config, args.since, args.out)
    except ReportError as err:
        print(f"gateway: {err}", file=sys.stderr)
        return err.status


def _report_evidence(args: argparse.Namespace) -> int:
    from gateway import bundle
    from gateway.reports import ReportError

    try:
        return bundle.main(args.config, args.since, args.until, args.audit, args.out)
    except ReportError as err:
        print(f"gateway: {err}", file=sys.stderr)
        return err.status


def _review_attest(args: argparse.Namespace) -> int:
    from gateway.adminclient import review_command

    if not args.user.strip():
        return _usage("--user needs a value: a user_claim value, or ISS|SUB")
    return _admin_call(
        args.config,
        lambda admin, token, env: review_command(
            admin, token, args.user, args.decision, args.note, env
        ),
    )


def _admin_call(config: str, call: Callable[[Admin, str, Mapping[str, str]], str]) -> int:
    """Run one admin API client command: what it prints, or one line on stderr and 1."""
    import os

    from gateway.adminclient import CallFailed

    target = _admin_target(config)
    if isinstance(target, int):
        return target
    admin, token = target
    try:
        print(call(admin, token, os.environ))
    except CallFailed as failed:
        print(f"gateway: {failed}", file=sys.stderr)
        return 1
    return 0


def _admin_target(config: str) -> tuple[Admin, str] | int:
    """The config's admin API and the token from GATEWAY_ADMIN_TOKEN, or an exit status."""
    import os

    from gateway.settings import ConfigError, load_settings

    token = os.environ.get("GATEWAY_ADMIN_TOKEN", "").strip()
    if not (token and token.isascii() and token.isprintable()):
        return _usage("set GATEWAY_ADMIN_TOKEN to an admin API token (see docs/admin-api.md)")
    try:
        settings = load_settings(config)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return EXIT_USAGE
    if settings.admin is None:
        return _usage(f"{config} has no admin: section, so there is no admin API to call")
    return settings.admin, token


def _usage(message: str) -> int:
    print(f"gateway: {message}", file=sys.stderr)
    return EXIT_USAGE
