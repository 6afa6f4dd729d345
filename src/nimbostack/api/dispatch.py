"""From a ZStack wire message to a handler: parse, validate against the API table, authenticate,
then answer at once (replies) or run as a job (events)."""

from __future__ import annotations

import asyncio
import difflib
import logging
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nimbostack.api import spec
from nimbostack.core import deadline
from nimbostack.core.errors import (
    INTERNAL,
    TIMEOUT,
    UNKNOWN_API,
    ApiError,
    invalid,
)
from nimbostack.core.jobs import dumps
from nimbostack.core.tagsplit import join_tag_pieces

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

log = logging.getLogger(__name__)

# Fields every message may carry besides its own (ZStack's APIMessage base).
COMMON_FIELDS = {"session", "timeout", "id", "serviceId", "creatingAccountUuid", "systemTags", "userTags"}

# The release notes name some parameters differently from the API table; accept both.
ALIASES: dict[str, dict[str, str]] = {
    "RecoverVmInstance": {"vmInstanceUuid": "uuid"},
    "ExpungeVmInstance": {"vmInstanceUuid": "uuid"},
    "RecoverImage": {"uuid": "imageUuid"},
    "ExpungeImage": {"uuid": "imageUuid"},
    "RecoverDataVolume": {"volumeUuid": "uuid"},
    "ExpungeDataVolume": {"volumeUuid": "uuid"},
}


@dataclass
class Caller:
    account_uuid: str
    is_admin: bool
    session_uuid: str | None = None


@dataclass
class ApiContext:
    p: Platform
    msg: spec.MessageSpec
    params: dict[str, Any]
    caller: Caller
    api_uuid: str = field(default_factory=lambda: uuidlib.uuid4().hex)

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
            return value
        raise invalid(f"{name} must be a list")

    def dict(self, name: str) -> dict[str, Any]:
        value = self.params.get(name)
        if isinstance(value, str):
            import json

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


def wrap(msg_full_name: str, body: dict[str, Any]) -> str:
    """The wire's ``result``: a JSON string holding {reply name: body}."""
    return dumps({msg_full_name: body})


def error_result(msg: spec.MessageSpec | None, err: ApiError) -> str:
    name = spec.reply_name(msg) if msg else "org.zstack.header.message.APIReply"
    return wrap(name, {"success": False, "error": err.to_dict()})


def reply_for_api(api_name: str, err: ApiError) -> str:
    return error_result(spec.messages().get(api_name), err)


def parse(body: Any) -> tuple[spec.MessageSpec, dict[str, Any]]:
    if not isinstance(body, dict) or len(body) != 1:
        raise invalid('the body must be one JSON object {"<API message name>": {fields...}}')
    ((key, params),) = body.items()
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise invalid(f"the fields of {key} must be a JSON object")
    msg = spec.by_full_name().get(key)
    if msg is None:
        short = key.rsplit(".", 1)[-1]
        short = short[3:-3] if short.startswith("API") and short.endswith("Msg") else short
        msg = spec.messages().get(short)
    if msg is None:
        close = difflib.get_close_matches(
            key.rsplit(".", 1)[-1], [m.full_name.rsplit(".", 1)[-1] for m in spec.messages().values()], 3
        )
        raise ApiError(
            UNKNOWN_API,
            "Unknown API message",
            f"{key} is not an API message" + (f"; did you mean {', '.join(close)}?" if close else ""),
        )
    return msg, dict(params)


def validate(msg: spec.MessageSpec, params: dict[str, Any]) -> None:
    for alias, real in ALIASES.get(msg.name, {}).items():
        if alias in params and real not in params:
            params[real] = params.pop(alias)
    unknown = [k for k in params if k not in msg.fields and k not in COMMON_FIELDS]
    if unknown:
        raise invalid(
            f"{msg.name} has no parameter {', '.join(sorted(unknown))}; "
            f"its parameters are {', '.join(sorted(msg.fields))}"
        )
    for f in msg.fields.values():
        value = params.get(f.name)
        if f.mandatory and (value is None or value == "" or value == []) and f.name != "conditions":
            raise invalid(f"missing mandatory field {f.name} of {msg.name}")
        if f.valid_values and value is not None:
            values = value if isinstance(value, list) else [value]
            if f.type == "list" and isinstance(value, str):
                values = [v for v in value.split(",") if v]
            bad = [v for v in values if str(v) not in f.valid_values]
            if bad:
                raise invalid(f"{f.name}: {', '.join(map(str, bad))} is not one of {', '.join(f.valid_values)}")
    if "conditions" in msg.fields and params.get("conditions") is None:
        params["conditions"] = []


class Dispatcher:
    def __init__(self, platform: Platform, quick_wait: float = 0.2) -> None:
        self.p = platform
        self.quick_wait = quick_wait

    async def handle(self, body: Any) -> dict[str, Any]:
        """Answer one POST /zstack/api body with the wire's ``{"state", "result"|"uuid"}``."""
        msg: spec.MessageSpec | None = None
        try:
            msg, params = parse(body)
            route = ROUTES.get(msg.name)
            if route is None:
                raise ApiError(UNKNOWN_API, "API not supported", f"{msg.name} is not implemented by nimbostack yet")
            validate(msg, params)
            caller = await self.p.auth.caller(params.get("session"), route)
            ctx = ApiContext(self.p, msg, params, caller)
            timeout = self._timeout(msg, params)
        except ApiError as err:
            return {"state": "Done", "result": error_result(msg, err)}

        if spec.is_synchronous(msg):
            return {"state": "Done", "result": await self._run(ctx, route, timeout)}
        task = await self.p.jobs.start(ctx.api_uuid, msg.name, timeout, lambda: self._run(ctx, route, timeout))
        if self.quick_wait > 0:
            done, _ = await asyncio.wait({task}, timeout=self.quick_wait)
            if done:
                return {"state": "Done", "result": task.result()}
        return {"state": "Processing", "uuid": ctx.api_uuid}

    def _timeout(self, msg: spec.MessageSpec, params: dict[str, Any]) -> float:
        raw = params.get("timeout")
        if raw in (None, "", -1, "-1"):
            return self.p.timeouts.get(msg.name)
        try:
            ms = int(raw)
        except (TypeError, ValueError):
            raise invalid(f"timeout must be milliseconds, got {raw!r}") from None
        if ms <= 0:
            raise invalid("timeout must be positive milliseconds")
        return ms / 1000.0

    async def _run(self, ctx: ApiContext, route: Route, timeout: float) -> str:
        assert ctx.msg is not None
        deadline.set_deadline(timeout)
        try:
            async with asyncio.timeout(timeout):
                body = await route.handler(ctx)
            return wrap(spec.reply_name(ctx.msg), {"success": True, **body})
        except ApiError as err:
            return error_result(ctx.msg, err)
        except TimeoutError:
            return error_result(
                ctx.msg,
                ApiError(
                    TIMEOUT,
                    "The API timed out",
                    f"{ctx.msg.name} did not finish within {timeout:g} s; it was rolled back",
                ),
            )
        except Exception as err:  # an unexpected failure is still an answer, never a 500
            log.exception("API %s failed", ctx.msg.name)
            return error_result(ctx.msg, ApiError(INTERNAL, "Internal error", f"{type(err).__name__}: {err}"))
