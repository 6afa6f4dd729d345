"""The interactive ``>>>`` shell (prompt_toolkit) and the line-by-line runner for files."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from typing import TextIO

from prompt_toolkit import PromptSession
from prompt_toolkit.history import FileHistory
from prompt_toolkit.input import Input
from prompt_toolkit.output import Output

from nimbostack.cli.completion import CliCompleter
from nimbostack.cli.parse import UsageError, split_line
from nimbostack.cli.runner import EXIT_OK, EXIT_USAGE, Runner
from nimbostack.cli.session import HISTORY_FILE, cli_home, ensure_home

PROMPT = ">>>"
EXIT_WORDS = ("exit", "quit")
BANNER = (
    "nimbostack command shell: Tab completes commands and parameters, 'help' lists commands,\n"
    "'help COMMAND' shows a command's parameters, exit/quit/Ctrl-D leaves."
)
_PASSWORD_RE = re.compile(r"""(?<![\w.])((?:\w*[pP]assword)=)('[^']*'|"(?:[^"\\]|\\.)*"|\S*)""")


def redact(line: str) -> str:
    """Drop password values so they never reach the history file: ``password=x`` -> ``password=``."""
    return _PASSWORD_RE.sub(r"\1", line)


class RedactingFileHistory(FileHistory):
    def append_string(self, string: str) -> None:
        super().append_string(redact(string))


def run_lines(runner: Runner, lines: Iterable[str], source: str, err: TextIO | None = None) -> int:
    """Run commands one a line (``#`` comments); stop at the first failure with its status."""
    err = err or sys.stderr
    for lineno, raw in enumerate(lines, 1):
        line = raw.rstrip("\n")
        try:
            tokens = split_line(line)
        except UsageError as e:
            print(f"{source}:{lineno}: error: {e}", file=err)
            return EXIT_USAGE
        if not tokens:
            continue
        if tokens[0] in EXIT_WORDS:
            return EXIT_OK
        status = runner.run(tokens)
        if status != EXIT_OK:
            print(f"{source}:{lineno}: stopped, exit status {status}: {redact(line.strip())}", file=err)
            return status
    return EXIT_OK


def interactive(runner: Runner, pt_input: Input | None = None, pt_output: Output | None = None) -> int:
    """The ``>>>`` prompt; a failing command reports and the shell goes on.

    ``pt_input``/``pt_output`` replace the terminal (tests); without them and without a
    terminal on stdin, the lines of stdin run like ``-f -``.
    """
    if pt_input is None and not sys.stdin.isatty():
        return run_lines(runner, sys.stdin, "<stdin>", runner.err)
    history = RedactingFileHistory(str(ensure_home(cli_home()) / HISTORY_FILE))
    session: PromptSession[str] = PromptSession(
        history=history,
        completer=CliCompleter(runner.spec),
        complete_while_typing=False,
        input=pt_input,
        output=pt_output,
    )
    print(BANNER, file=runner.out)
    while True:
        try:
            line = session.prompt(PROMPT)
        except KeyboardInterrupt:
            continue
        except EOFError:
            return EXIT_OK
        try:
            if _run_interactive_line(runner, line) is None:
                return EXIT_OK
        except KeyboardInterrupt:
            print("interrupted (a job already sent keeps running on the server)", file=runner.err)


def _run_interactive_line(runner: Runner, line: str) -> int | None:
    """Status of one line, or None when it asks to leave."""
    try:
        tokens = split_line(line)
    except UsageError as e:
        print(f"error: {e}", file=runner.err)
        return EXIT_USAGE
    if tokens and tokens[0] in EXIT_WORDS:
        return None
    return runner.run(tokens)
