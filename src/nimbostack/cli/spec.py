"""The API table the shell knows commands from (``nimbostack/core/zstack-1.2-api.json``).

A *command* is an API message name without its ``API`` prefix and ``Msg`` suffix:
``APICreateVmInstanceMsg`` is the command ``CreateVmInstance``.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from nimbostack.core.spec import TABLE

TABLE_PATH = TABLE

# Every ZStack API message inherits these from APIMessage / NeedReplyMessage, even where the
# generated table does not list them per message.
COMMON_FIELDS: tuple[tuple[str, str | None], ...] = (
    ("systemTags", "list"),
    ("userTags", "list"),
    ("timeout", None),
)

# Parameters a Query message owns itself; any other ``key<op>value`` is a condition.
QUERY_OWN_FIELDS = frozenset(
    {"conditions", "limit", "start", "count", "replyWithCount", "sortBy", "sortDirection", "fields"}
)


@dataclass(frozen=True)
class Field:
    name: str
    mandatory: bool = False
    type: str | None = None  # "list", "map" or None (scalar)
    valid_values: tuple[str, ...] = ()
    common: bool = False  # inherited by every message rather than declared by this one

    @property
    def is_list(self) -> bool:
        return self.type == "list"

    @property
    def is_map(self) -> bool:
        return self.type == "map"


@dataclass(frozen=True)
class Command:
    name: str  # e.g. CreateVmInstance
    message: str  # e.g. APICreateVmInstanceMsg
    full_name: str  # e.g. org.zstack.header.vm.APICreateVmInstanceMsg
    fields: dict[str, Field] = field(default_factory=dict)
    query_object: str | None = None  # e.g. QueryObjectVmInstanceInventory

    @property
    def is_query(self) -> bool:
        return self.name.startswith("Query") and "conditions" in self.fields

    @property
    def mandatory(self) -> list[str]:
        return [f.name for f in self.fields.values() if f.mandatory]


@dataclass(frozen=True)
class QueryObject:
    name: str
    primitive_fields: tuple[str, ...]
    expanded_fields: tuple[str, ...]
    object_map: dict[str, str]


class ApiSpec:
    """Commands, their parameters and the queryable objects of the API table."""

    def __init__(self, table: dict[str, Any]) -> None:
        self.query_objects: dict[str, QueryObject] = {
            name: QueryObject(
                name=name,
                primitive_fields=tuple(obj.get("primitiveFields", ())),
                expanded_fields=tuple(obj.get("expandedFields", ())),
                object_map=dict(obj.get("queryObjectMap", {})),
            )
            for name, obj in table.get("queryObjects", {}).items()
        }
        query_map: dict[str, str] = table.get("queryMessageInventoryMap", {})
        self.commands: dict[str, Command] = {}
        for message, body in table.get("messages", {}).items():
            if not (message.startswith("API") and message.endswith("Msg")):
                continue  # replies, events and abstract bases are not commands
            fields: dict[str, Field] = {}
            for raw in body.get("fields", ()):
                fields[raw["name"]] = Field(
                    name=raw["name"],
                    mandatory=bool(raw.get("mandatory", False)),
                    type=raw.get("type"),
                    valid_values=tuple(raw.get("validValues", ())),
                )
            for name, ftype in COMMON_FIELDS:
                fields.setdefault(name, Field(name=name, type=ftype, common=True))
            name = message[3:-3]
            self.commands[name] = Command(
                name=name,
                message=message,
                full_name=body.get("fullName", message),
                fields=fields,
                query_object=query_map.get(message),
            )
        self.query_operators: dict[str, str] = dict(table.get("queryOperators", {}))

    @property
    def command_names(self) -> list[str]:
        return sorted(self.commands)

    def get(self, name: str) -> Command | None:
        return self.commands.get(name)

    def suggest_commands(self, name: str, limit: int = 3) -> list[str]:
        return suggest(name, self.commands, limit)

    def query_object_for(self, command: Command) -> QueryObject | None:
        if command.query_object is None:
            return None
        return self.query_objects.get(command.query_object)

    def resolve_path(self, root: QueryObject, path: list[str]) -> QueryObject | None:
        """Follow expanded fields ``path`` from ``root``; None when a step is not expandable."""
        current: QueryObject | None = root
        for step in path:
            if current is None or step not in current.object_map:
                return None
            current = self.query_objects.get(current.object_map[step])
        return current


def suggest(word: str, candidates: Any, limit: int = 5) -> list[str]:
    """Close matches for ``word``: case-insensitive equality, then fuzzy, then substring."""
    names = sorted(candidates)
    lowered = {n.lower(): n for n in names}
    out: list[str] = []
    if word.lower() in lowered:
        out.append(lowered[word.lower()])
    for match in difflib.get_close_matches(word.lower(), list(lowered), n=limit, cutoff=0.6):
        if lowered[match] not in out:
            out.append(lowered[match])
    if len(word) >= 3:
        for n in names:
            if word.lower() in n.lower() and n not in out:
                out.append(n)
    return out[:limit]


@lru_cache(maxsize=4)
def load_spec(path: str | None = None) -> ApiSpec:
    with open(path or TABLE_PATH, encoding="utf-8") as f:
        return ApiSpec(json.load(f))
