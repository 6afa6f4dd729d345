"""What a handler is given and how it is registered: the caller, the parsed message, typed access
to its parameters, and the table of handlers by API name. Services register into it; the wire
layer (api/dispatch.py) looks handlers up in it."""

from __future__ import annotations

import json
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nimbostack.core import spec
from nimbostack.core.auth import Caller
from nimbostack.core.errors import invalid
from nimbostack.core.tagsplit import join_tag_pieces

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform


INT64 = 1 << 63  # bounds of a database integer column: -INT64 <= n < INT64


@dataclass
class ApiContext:
    p: Platform
    msg: spec.MessageSpec
    params: dict[str, Any]
    caller: Caller
    api_uuid: str = field(default_factory=lambda: uuidlib.uuid4().hex)
    source: str = ""  # the client's address, as the API's server saw it
    # what a creation names what it makes: the client's resourceUuid, or one the dispatcher chose
    resource_uuid: str | None = None

    # --- typed access to parameters; every failure is an INVALID_ARGUMENT with the field name
    def get(self, name: str, default: Any = None) -> Any:
        value = self.params.get(name)
        return default if value is None else value

    def str(self, name: str, default: str | None = None) -> str | None:
        value = self.params.get(name)
        if value is None:
            return default
        if isinstance(value, dict | list):
            raise invalid(f"{name} must be a string")
        return str(value)

    def req(self, name: str) -> str:
        value = self.str(name)
        if value is None or value == "":
            raise invalid(f"missing mandatory field {name}")
        return value

    def int(self, name: str, default: int | None = None, minimum: int | None = None) -> int | None:
        value = self.params.get(name)
        if value is None or value == "":
            return default
        if isinstance(value, bool):
            raise invalid(f"{name} must be an integer, got {value!r}")
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise invalid(f"{name} must be an integer, got {value!r}") from None
        if minimum is not None and number < minimum:
            raise invalid(f"{name} must be at least {minimum}, got {number}")
        if not -INT64 <= number < INT64:  # what a database integer column holds
            raise invalid(f"{name} is out of range, got {number}")
        return number

    def bool(self, name: str, default: bool = False) -> bool:
        value = self.params.get(name)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "false"):
            return str(value).lower() == "true"
        raise invalid(f"{name} must be true or false, got {value!r}")

    def list(self, name: str) -> list[Any]:
        value = self.params.get(name)
        if value is None:
            return []
        if isinstance(value, str):
            if name == "systemTags":
                return join_tag_pieces(value.split(","))
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            if name == "systemTags" and all(isinstance(v, str) for v in value):
                # ZStack's CLI splits a list parameter at every comma, a tag's value's too
                return join_tag_pieces(value)
            return value
        raise invalid(f"{name} must be a list")

    def dict(self, name: str) -> dict[str, Any]:
        value = self.params.get(name)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise invalid(f"{name} must be a JSON object") from None
        if not isinstance(value, dict):
            raise invalid(f"{name} must be a map")
        return value


Handler = Callable[[ApiContext], Awaitable[dict[str, Any]]]


@dataclass
class Route:
    handler: Handler
    public: bool = False  # no session needed (login)
    admin: bool = False  # admin accounts only


ROUTES: dict[str, Route] = {}


def api(name: str, *, public: bool = False, admin: bool = False) -> Callable[[Handler], Handler]:
    if name not in spec.messages():
        raise ValueError(f"{name} is not in the API table")

    def register(fn: Handler) -> Handler:
        ROUTES[name] = Route(fn, public, admin)
        return fn

    return register
