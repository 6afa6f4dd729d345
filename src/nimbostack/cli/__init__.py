"""``nimbostack cli``: the ``>>>`` command shell, a client of the ZStack-compatible HTTP API.

Modules: ``spec`` (the API table), ``parse`` (tokens -> request), ``client`` (HTTP, polling),
``session`` (session store), ``runner`` (one command: call, print, exit status), ``helptext``,
``completion`` and ``shell`` (interactive prompt, command files).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from nimbostack.cli.client import DEFAULT_WAIT, ApiClient
from nimbostack.cli.helptext import USAGE_EXAMPLES
from nimbostack.cli.runner import EXIT_USAGE, Runner
from nimbostack.cli.session import SessionStore
from nimbostack.cli.shell import interactive, run_lines
from nimbostack.cli.spec import load_spec

__all__ = ["main"]

HOST_ENV = "NIMBOSTACK_HOST"
PORT_ENV = "NIMBOSTACK_PORT"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"port out of range: {port}")
    return port


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nimbostack cli",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Command shell of the nimbostack management node (ZStack-compatible API).\n"
            "Without COMMAND it opens an interactive >>> prompt (history in ~/.nimbostack/cli-history,\n"
            "Tab completes); with COMMAND it runs that one command and prints the reply as JSON."
        ),
        epilog=(
            "from the shell:\n"
            "  nimbostack cli LogInByAccount accountName=admin password=password\n"
            "  nimbostack cli QueryZone name~=zone%\n"
            "  nimbostack cli -f setup.zcli   (a command a line, '#' comments; stops at the first failure)\n"
            "\n"
            f"{USAGE_EXAMPLES}\n\n"
            f"environment: {HOST_ENV}, {PORT_ENV} (server), NIMBOSTACK_CLI_HOME (instead of ~/.nimbostack)"
        ),
    )
    parser.add_argument(
        "--host",
        default=os.environ.get(HOST_ENV) or DEFAULT_HOST,
        help=f"management node address (default ${HOST_ENV} or {DEFAULT_HOST})",
    )
    parser.add_argument(
        "--port",
        type=_port,
        default=None,
        help=f"management node API port (default ${PORT_ENV} or {DEFAULT_PORT})",
    )
    parser.add_argument("-f", "--file", metavar="FILE", help="run the commands in FILE ('-' for stdin)")
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_WAIT,
        metavar="SECONDS",
        help=f"how long to wait for a reply (default {DEFAULT_WAIT:g})",
    )
    parser.add_argument("command", nargs="?", metavar="COMMAND", help="API command, e.g. CreateZone")
    parser.add_argument("params", nargs=argparse.REMAINDER, metavar="key=value", help="its parameters")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        port = args.port
        if port is None:
            port = _port(os.environ[PORT_ENV]) if os.environ.get(PORT_ENV) else DEFAULT_PORT
    except argparse.ArgumentTypeError as e:
        print(f"nimbostack cli: error: ${PORT_ENV}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:  # --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.file and args.command:
        print("nimbostack cli: error: give either -f FILE or a COMMAND, not both", file=sys.stderr)
        return EXIT_USAGE

    spec = load_spec()
    with ApiClient(args.host, port, wait=args.timeout) as client:
        runner = Runner(spec, client, SessionStore())
        try:
            if args.command:
                return runner.run([args.command, *args.params])
            if args.file:
                return _run_file(runner, args.file)
            return interactive(runner)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130


def _run_file(runner: Runner, path: str) -> int:
    if path == "-":
        return run_lines(runner, sys.stdin, "<stdin>")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as e:
        print(f"nimbostack cli: error: cannot read {path}: {e.strerror}", file=sys.stderr)
        return EXIT_USAGE
    return run_lines(runner, lines, path)
