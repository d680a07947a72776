"""The `gateway` command (SPEC §10). Thin: it parses arguments and calls the modules.

Bad input is one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from gateway import __version__

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
    run.set_defaults(func=_run)
    check = commands.add_parser("check-config", help="validate a config file and summarize it")
    check.add_argument("-c", "--config", required=True, metavar="FILE")
    check.set_defaults(func=_check_config)
    return parser


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


def _run(args: argparse.Namespace) -> int:
    from gateway.events import configure_logging
    from gateway.server import new_event_loop, serve
    from gateway.settings import ConfigError, load_settings

    configure_logging()
    try:
        settings = load_settings(args.config)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return EXIT_USAGE
    log = logging.getLogger("gateway")
    for warning in settings.warnings:
        log.warning(warning)
    loop = new_event_loop()
    try:
        loop.run_until_complete(serve(settings))
    except OSError as err:  # the port is taken, a TLS file is unreadable, ...
        print(f"gateway: cannot serve: {err}", file=sys.stderr)
        return 1
    finally:
        loop.close()
    return 0
