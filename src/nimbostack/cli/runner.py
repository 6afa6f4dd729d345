"""Running one command line: help, parse, call, print, remember the session.

Exit statuses: 0 success, 1 API error or no reply, 2 bad usage.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from nimbostack.cli.client import ApiClient, ClientError, Reply
from nimbostack.cli.helptext import command_help, general_help
from nimbostack.cli.parse import LOGIN_COMMANDS, UsageError, parse_command
from nimbostack.cli.session import SessionStore
from nimbostack.cli.spec import ApiSpec

EXIT_OK = 0
EXIT_API_ERROR = 1
EXIT_USAGE = 2

HELP_WORDS = ("help", "?")
HELP_FLAGS = ("--help", "-h")
SESSION_UUID_COMMANDS = ("LogOut", "ValidateSession")
LOGIN_EXAMPLE = "LogInByAccount accountName=admin password=..."


def format_json(obj: Any) -> str:
    return json.dumps(obj, indent=4, sort_keys=True, ensure_ascii=False)


class Runner:
    def __init__(
        self,
        spec: ApiSpec,
        client: ApiClient,
        store: SessionStore,
        out: TextIO | None = None,
        err: TextIO | None = None,
    ) -> None:
        self.spec = spec
        self.client = client
        self.store = store
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        if client.on_progress is None:
            client.on_progress = lambda line: print(f"... {line}", file=self.err, flush=True)

    @property
    def session_uuid(self) -> str | None:
        return self.store.get(self.client.host, self.client.port)

    def _error(self, message: str) -> None:
        print(f"error: {message}", file=self.err)

    def help(self, topic: str | None = None) -> int:
        if topic is None:
            print(general_help(self.spec), file=self.out)
            return EXIT_OK
        command = self.spec.get(topic)
        if command is None:
            close = self.spec.suggest_commands(topic)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            self._error(f"unknown command '{topic}'{hint}")
            return EXIT_USAGE
        print(command_help(self.spec, command), file=self.out)
        return EXIT_OK

    def run(self, tokens: list[str]) -> int:
        if not tokens:
            return EXIT_OK
        if tokens[0] in HELP_WORDS:
            if len(tokens) > 2:
                self._error("usage: help [COMMAND]")
                return EXIT_USAGE
            return self.help(tokens[1] if len(tokens) == 2 else None)
        if any(t in HELP_FLAGS for t in tokens[1:]):
            return self.help(tokens[0])
        stray = [t for t in tokens[1:] if t.startswith("--") and "=" not in t]
        if stray:
            self._error(f"options such as {stray[0]} go before the command: nimbostack cli [OPTIONS] COMMAND ...")
            return EXIT_USAGE
        session = self.session_uuid
        defaults = {"sessionUuid": session} if tokens[0] in SESSION_UUID_COMMANDS else None
        try:
            request = parse_command(self.spec, tokens, defaults)
        except UsageError as e:
            self._error(str(e))
            return EXIT_USAGE
        try:
            reply = self.client.call(request.body(session))
        except ClientError as e:
            self._error(str(e))
            return EXIT_API_ERROR
        print(format_json(reply.body), file=self.out)
        self._after(request.command.name, request.params, reply, session)
        return EXIT_OK if reply.success else EXIT_API_ERROR

    def _after(self, command: str, params: dict[str, Any], reply: Reply, session: str | None) -> None:
        host, port = self.client.host, self.client.port
        if command in LOGIN_COMMANDS and reply.success:
            inventory = reply.body.get("inventory")
            uuid = inventory.get("uuid") if isinstance(inventory, dict) else None
            if isinstance(uuid, str) and uuid:
                self.store.set(
                    host,
                    port,
                    uuid,
                    accountName=str(params.get("accountName") or ""),
                    userName=str(params.get("userName") or ""),
                )
            else:
                self._error("the login reply carries no inventory.uuid; no session was stored")
        elif command == "LogOut" and (reply.success or reply.is_session_error):
            if params.get("sessionUuid") in (None, self.session_uuid):
                self.store.clear(host, port)
        elif reply.is_session_error:
            if session is None:
                print(f"hint: not logged in to {host}:{port}; log in first: {LOGIN_EXAMPLE}", file=self.err)
            else:
                self.store.clear(host, port)
                print(f"hint: the session expired or is invalid; log in again: {LOGIN_EXAMPLE}", file=self.err)
