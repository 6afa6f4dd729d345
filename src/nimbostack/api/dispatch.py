"""From a ZStack wire message to a handler: parse, validate against the API table, authenticate,
then answer at once (replies) or run as a job (events)."""

from __future__ import annotations

import asyncio
import difflib
import logging
import uuid as uuidlib
from typing import TYPE_CHECKING, Any

from sqlalchemy import String
from sqlalchemy.exc import IntegrityError

from nimbostack.core import deadline, events, policy, quota, spec
from nimbostack.core.context import ROUTES, ApiContext, Route
from nimbostack.core.envelope import error_result, wrap
from nimbostack.core.errors import (
    INTERNAL,
    TIMEOUT,
    UNKNOWN_API,
    ApiError,
    invalid,
    storage_full,
)
from nimbostack.core.resources import check_visible, wanted_uuid
from nimbostack.core.spec import ALIASES
from nimbostack.db.engine import StorageFull
from nimbostack.db.models import Base

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

log = logging.getLogger(__name__)

# Fields every message may carry besides its own (ZStack's APIMessage base).
COMMON_FIELDS = {"session", "timeout", "id", "serviceId", "creatingAccountUuid", "systemTags", "userTags"}



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


def _column_lengths() -> dict[str, int]:
    """For each column name, the longest any column of that name holds: a value longer than that
    fits in none of them (PostgreSQL refuses it, SQLite would store it)."""
    out: dict[str, int] = {}
    for mapper in Base.registry.mappers:
        for col in mapper.columns:
            if isinstance(col.type, String) and col.type.length:
                out[col.name] = max(out.get(col.name, 0), col.type.length)
    return out


# The longest a value may be: what the columns of its name hold, and for any other string what a
# userdata system tag may carry (1 MiB) with room for its prefix.
MAX_LENGTH = {**_column_lengths(), "name": 255, "description": 2048}
MAX_STRING = (1 << 20) + 4096
MAX_DEPTH = 8  # conditions and networkServices nest two or three levels; nothing needs more
# lists whose elements are objects, not strings
OBJECT_LISTS = {"conditions", "rules"}  # rules: AddSecurityGroupRule's
# lists of objects of other shapes, each checked by its handler (CreatePolicy's statements)
FREE_OBJECT_LISTS = {"statements"}
# the longest a call may be given: a job's deadline must be a date the database can store, and no
# API runs for a month
MAX_TIMEOUT_MS = 30 * 24 * 3600 * 1000


def _check_value(where: str, value: Any, depth: int = 0) -> None:
    """Shapes no handler should see: NUL bytes (invalid in libvirt XML, C strings, PostgreSQL
    text), strings past any column, structures nested past any message's."""
    if depth > MAX_DEPTH:
        raise invalid(f"{where} is nested too deeply")
    if isinstance(value, str):
        if "\x00" in value:
            raise invalid(f"{where} must not contain NUL characters")
        if len(value) > MAX_STRING:
            raise invalid(f"{where} is longer than {MAX_STRING} characters")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_value(f"{where}.{k}", k, depth + 1)
            _check_value(f"{where}.{k}", v, depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_value(f"{where}[{i}]", v, depth + 1)


def validate(msg: spec.MessageSpec, params: dict[str, Any]) -> None:
    for name, value in params.items():
        _check_value(name, value)
        limit = MAX_LENGTH.get(name[:-1] if name.endswith("Uuids") else name)
        # a list comes as a JSON array or, from ZStack's CLI, as one comma-separated string
        values = value if isinstance(value, list) else [value]
        if isinstance(value, str) and name.endswith("Uuids"):
            values = value.split(",")
        if limit is not None and any(isinstance(v, str) and len(v) > limit for v in values):
            raise invalid(f"{name} is longer than {limit} characters")
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
        if f.type == "list" and f.name not in OBJECT_LISTS | FREE_OBJECT_LISTS and isinstance(value, list):
            if any(isinstance(v, dict | list) for v in value):
                raise invalid(f"{f.name} must be a list of strings")
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


def _resource_of(msg: spec.MessageSpec, params: dict[str, Any]) -> str | None:
    """The uuid a creation will give what it makes — the client's ``resourceUuid``, or one
    decided now — so that the job records it: recovery answers a job a dead node left by what
    became of that resource. (Not put into the parameters: a client's resourceUuid also means
    "this may be a retry", which costs a creation a read.)"""
    if "resourceUuid" not in msg.fields:
        return None
    given = params.get("resourceUuid")
    return wanted_uuid(str(given)) if given else uuidlib.uuid4().hex


class Dispatcher:
    def __init__(self, platform: Platform, quick_wait: float = 0.2) -> None:
        self.p = platform
        self.quick_wait = quick_wait

    async def handle(self, body: Any, source: str = "") -> dict[str, Any]:
        """Answer one POST /zstack/api body with the wire's ``{"state", "result"|"uuid"}``;
        ``source``: the client's address."""
        msg: spec.MessageSpec | None = None
        try:
            msg, params = parse(body)
            route = ROUTES.get(msg.name)
            if route is None:
                raise ApiError(UNKNOWN_API, "API not supported", f"{msg.name} is not implemented by nimbostack yet")
            validate(msg, params)
            caller = await self.p.auth.caller(params.get("session"), route)
            if caller.user_uuid or not caller.is_admin:
                async with self.p.db.tx() as s:
                    if caller.user_uuid:  # a user's session: its policies say what it may call
                        await policy.check(s, caller.user_uuid, msg, params)
                    if not caller.is_admin:
                        await check_visible(s, msg, params, caller)
                        await quota.check(s, caller.account_uuid, msg.name, params)
            ctx = ApiContext(self.p, msg, params, caller, source=source, resource_uuid=_resource_of(msg, params))
            timeout = self._timeout(msg, params)
        except ApiError as err:
            return {"state": "Done", "result": error_result(msg, err)}

        if spec.is_synchronous(msg):
            return {"state": "Done", "result": await self._run(ctx, route, timeout)}
        try:
            task = await self.p.jobs.start(
                ctx.api_uuid, msg.name, timeout, lambda: self._run(ctx, route, timeout), ctx.resource_uuid
            )
        except StorageFull as err:  # the job's own record: the first write of every asynchronous API
            return {"state": "Done", "result": error_result(msg, storage_full(str(err)))}
        # the web UI's open pages learn of the change (core/events.py)
        events.announce_job(self.p.events, msg.name, events.subject(params, ctx.resource_uuid),
                            ctx.caller.account_uuid, task)
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
        if not 0 < ms <= MAX_TIMEOUT_MS:
            raise invalid(f"timeout must be positive milliseconds, at most {MAX_TIMEOUT_MS} (30 days)")
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
        except IntegrityError as err:  # a unique name or uuid taken by a concurrent or earlier call
            log.info("API %s conflicted: %s", ctx.msg.name, err.orig)
            return error_result(ctx.msg, invalid("the request conflicts with an existing resource (a uuid or a "
                                                  "name that must be unique is taken)"))
        except StorageFull as err:
            return error_result(ctx.msg, storage_full(str(err)))
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
