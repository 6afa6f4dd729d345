"""The wire's answer to an API: a JSON string ``result`` holding {reply name: body}, and the same
shape for an error. Jobs store it, the dispatcher answers it, recovery writes it for jobs a dead
node left unanswered."""

from __future__ import annotations

from typing import Any

from nimbostack.core import spec
from nimbostack.core.errors import ApiError
from nimbostack.core.jobs import dumps


def wrap(msg_full_name: str, body: dict[str, Any]) -> str:
    """The wire's ``result``: a JSON string holding {reply name: body}, with no ``null`` anywhere:
    ZStack's server (Gson) omits unset fields, and zstacklib's JSON parser raises on a null."""
    return dumps({msg_full_name: without_nulls(body)})


def without_nulls(value: Any) -> Any:
    """``value`` with every None field of every object (nested ones too) left out, and None list
    items dropped."""
    if isinstance(value, dict):
        return {k: without_nulls(v) if isinstance(v, dict | list) else v for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) if isinstance(v, dict | list) else v for v in value if v is not None]
    return value


def error_result(msg: spec.MessageSpec | None, err: ApiError) -> str:
    name = spec.reply_name(msg) if msg else "org.zstack.header.message.APIReply"
    return wrap(name, {"success": False, "error": err.to_dict()})


def reply_for_api(api_name: str, err: ApiError) -> str:
    return error_result(spec.messages().get(api_name), err)
