"""Turning ``Command key=value ...`` tokens into an API request, the way zstack-cli does.

* The line is split shell-like (:func:`split_line`); nothing is un-escaped beyond that, so
  ``systemTags='userdata::a\\nb'`` keeps the two characters backslash and ``n``.
* A ``list`` field splits on commas (``\\,`` is a literal comma; empty items are dropped).
* A ``map`` field, or any value starting with ``{`` / ``[``, is sent as JSON (Python-literal
  syntax with single quotes, as zstack-cli users write it, is accepted too).
* Query commands turn every ``key<op>value`` that is not one of the message's own fields into a
  condition ``{"name", "op", "value"}``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nimbostack.cli.spec import ApiSpec, Command, Field, QueryObject, suggest
from nimbostack.core.spec import ALIASES
from nimbostack.core.tagsplit import join_tag_pieces

# Commands whose ``password`` travels as its SHA-512 hex digest.
HASHED_PASSWORD_COMMANDS = frozenset(
    {"LogInByAccount", "LogInByUser", "CreateAccount", "CreateUser", "UpdateAccount", "UpdateUser"}
)
# Commands sent without a session.
NO_SESSION_COMMANDS = frozenset({"LogInByAccount", "LogInByUser"})
LOGIN_COMMANDS = NO_SESSION_COMMANDS

BOOL_FIELDS = frozenset({"count", "replyWithCount", "system", "isDefault", "all", "toPublic", "isRecreate"})
INT_FIELDS = frozenset(
    """limit start timeout cpuNum cpuSpeed memorySize diskSize port sshport vlan sortKey dateStart dateEnd
    instancePort loadBalancerPort privatePortStart privatePortEnd vipPortStart vipPortEnd
    availableCapacity totalCapacity cpuCapacity memoryCapacity""".split()
)
INT_SUFFIXES = ("Size", "Port", "PortStart", "PortEnd", "Capacity", "Num")
FLOAT_FIELDS = frozenset({"price"})

# Query operators as typed on the command line, longest first so ``!?=`` wins over ``?=``.
QUERY_OPS: tuple[tuple[str, str], ...] = (
    ("!?=", "not in"),
    ("?=", "in"),
    ("!~=", "not like"),
    ("~=", "like"),
    ("!=", "!="),
    (">=", ">="),
    ("<=", "<="),
    (">", ">"),
    ("<", "<"),
    ("=", "="),
)
NULL_OPS = {"=": "is null", "!=": "is not null"}
_KEY_RE = re.compile(r"[^!?~=<>]+")
_INT_RE = re.compile(r"-?\d+")


class UsageError(Exception):
    """Bad input detected locally; its message is one line, fit for stderr (exit status 2)."""


@dataclass
class Request:
    command: Command
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def full_name(self) -> str:
        return self.command.full_name

    @property
    def needs_session(self) -> bool:
        return self.command.name not in NO_SESSION_COMMANDS

    def body(self, session_uuid: str | None = None) -> dict[str, Any]:
        params = dict(self.params)
        if session_uuid and self.needs_session:
            params["session"] = {"uuid": session_uuid}
        return {self.full_name: params}


def hash_password(password: str) -> str:
    return hashlib.sha512(password.encode("utf-8")).hexdigest()


def split_line(line: str) -> list[str]:
    """Shell-like split of one command line; ``#`` at the start makes it a comment (no tokens)."""
    if line.lstrip().startswith("#"):
        return []
    try:
        return shlex.split(line)
    except ValueError as e:
        raise UsageError(f"cannot parse line: {e}") from None


def split_list(value: str) -> list[str]:
    """``a,b,`` -> ``["a", "b"]``; ``\\,`` keeps a comma inside an item; other backslashes stay."""
    items: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value) and value[i + 1] == ",":
            cur.append(",")
            i += 2
            continue
        if ch == ",":
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    items.append("".join(cur))
    return [item.strip() for item in items if item.strip()]


def _parse_structured(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ValueError("not valid JSON") from None


def _is_int_field(name: str) -> bool:
    return name in INT_FIELDS or name.endswith(INT_SUFFIXES)


def convert_value(command: Command, fld: Field, value: str) -> Any:
    """The wire value of ``fld=value`` (see the module docstring)."""
    if fld.is_map or value.lstrip().startswith(("{", "[")):
        try:
            parsed = _parse_structured(value)
        except ValueError:
            parsed = None
        if fld.is_map and not isinstance(parsed, dict):
            raise UsageError(
                f"{command.name}: parameter '{fld.name}' needs a JSON object, "
                f'e.g. {fld.name}=\'{{"key": ["value"]}}\'; got {value!r}'
            )
        if isinstance(parsed, dict | list):
            return parsed
        if fld.is_list:
            raise UsageError(
                f"{command.name}: parameter '{fld.name}' is not valid JSON: {value!r} "
                f'(write a comma list a,b or a JSON array \'["a", "b"]\')'
            )
    if fld.name == "systemTags":
        return join_tag_pieces(value.split(","))
    if fld.is_list:
        return split_list(value)
    if fld.valid_values and value not in fld.valid_values:
        close = suggest(value, fld.valid_values, limit=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise UsageError(
            f"{command.name}: invalid value {value!r} for '{fld.name}', "
            f"valid values: {', '.join(fld.valid_values)}{hint}"
        )
    if fld.name in BOOL_FIELDS and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if _is_int_field(fld.name) and _INT_RE.fullmatch(value):
        return int(value)
    if fld.name in FLOAT_FIELDS:
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _unknown_parameter(command: Command, key: str) -> UsageError:
    close = suggest(key, command.fields, limit=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return UsageError(f"unknown parameter '{key}' for {command.name}{hint} (see 'help {command.name}')")


def split_condition(token: str) -> tuple[str, str, str]:
    """``name!?=a,b`` -> ``("name", "!?=", "a,b")``; raises UsageError without an operator."""
    m = _KEY_RE.match(token)
    key = m.group(0) if m else ""
    rest = token[len(key) :]
    for op, _ in QUERY_OPS:
        if rest.startswith(op):
            if not key:
                break
            return key, op, rest[len(op) :]
    raise UsageError(
        f"cannot parse {token!r}: expected key=value or a query condition key<op>value "
        f"with op one of {' '.join(op for op, _ in QUERY_OPS)}"
    )


def _add_param(command: Command, params: dict[str, Any], fld: Field, value: str) -> None:
    converted = convert_value(command, fld, value)
    if fld.is_list and isinstance(converted, list) and isinstance(params.get(fld.name), list):
        params[fld.name] = params[fld.name] + converted  # repeated list parameters accumulate
    else:
        params[fld.name] = converted


def _check_condition_name(spec: ApiSpec, command: Command, root: QueryObject | None, name: str) -> None:
    """Reject a condition on a field the table does not know; nested names are walked by dots."""
    *path, last = name.split(".")
    obj = root
    for i, step in enumerate(path):
        if obj is None:
            return  # deeper than the table describes: the server judges
        if step not in obj.expanded_fields:
            raise _unknown_field(command, obj, step, prefix=".".join(path[:i]))
        obj = spec.query_objects.get(obj.object_map.get(step, ""))
    if obj is not None and last not in obj.primitive_fields and last not in obj.expanded_fields:
        raise _unknown_field(command, obj, last, prefix=".".join(path))


def _unknown_field(command: Command, obj: QueryObject, key: str, prefix: str = "") -> UsageError:
    close = suggest(key, list(obj.primitive_fields) + list(obj.expanded_fields), limit=3)
    if prefix:
        close = [f"{prefix}.{c}" for c in close]
        key = f"{prefix}.{key}"
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return UsageError(
        f"{command.name}: '{key}' is neither a parameter nor a queryable field{hint} (see 'help {command.name}')"
    )


def _parse_query(spec: ApiSpec, command: Command, tokens: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    conditions: list[dict[str, Any]] = []
    root = spec.query_object_for(command)
    for token in tokens:
        key, op, value = split_condition(token)
        fld = command.fields.get(key)
        if op == "=" and fld is not None and key == "conditions":
            try:
                extra = _parse_structured(value)
            except ValueError:
                extra = None
            if not isinstance(extra, list) or not all(isinstance(c, dict) for c in extra):
                raise UsageError(
                    f"{command.name}: conditions must be a JSON array of objects, "
                    f'e.g. conditions=\'[{{"name": "uuid", "op": "=", "value": "..."}}]\''
                )
            conditions.extend(extra)
        elif op == "=" and fld is not None:
            # the message's own fields (limit, start, count, fields, sortBy, ... and timeout)
            _add_param(command, params, fld, value)
        else:
            _check_condition_name(spec, command, root, key)
            if value == "null" and op in NULL_OPS:
                conditions.append({"name": key, "op": NULL_OPS[op]})
                continue
            sql_op = dict(QUERY_OPS)[op]
            if sql_op in ("like", "not like") and "%" not in value and "_" not in value:
                value = f"%{value}%"  # zstack-cli: a pattern without wildcards matches substrings
            conditions.append({"name": key, "op": sql_op, "value": value})
    params["conditions"] = conditions
    return params


def _parse_plain(command: Command, tokens: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise UsageError(
                f"{command.name}: cannot parse {token!r}, parameters are key=value (see 'help {command.name}')"
            )
        fld = command.fields.get(key) or command.fields.get(ALIASES.get(command.name, {}).get(key, ""))
        if fld is None:
            raise _unknown_parameter(command, key)
        _add_param(command, params, fld, value)
    return params


def parse_command(spec: ApiSpec, tokens: list[str], defaults: Mapping[str, Any] | None = None) -> Request:
    """``["CreateZone", "name=z1"]`` -> Request. ``defaults`` fill fields the user left out."""
    if not tokens:
        raise UsageError("empty command")
    name, args = tokens[0], tokens[1:]
    command = spec.get(name)
    if command is None:
        close = spec.suggest_commands(name)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UsageError(f"unknown command '{name}'{hint} (type 'help' for the list)")
    params = _parse_query(spec, command, args) if command.is_query else _parse_plain(command, args)
    for key, value in (defaults or {}).items():
        if key in command.fields and key not in params and value is not None:
            params[key] = value
    missing = [f for f in command.mandatory if f not in params]
    if missing:
        raise UsageError(
            f"{command.name}: missing mandatory parameter{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)} (see 'help {command.name}')"
        )
    if command.name in HASHED_PASSWORD_COMMANDS and isinstance(params.get("password"), str):
        params["password"] = hash_password(params["password"])
    return Request(command=command, params=params)
