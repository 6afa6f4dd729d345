"""ZStack 1.2's API table (``zstack-1.2-api.json``): message names, fields and valid values."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

TABLE = Path(__file__).with_name("zstack-1.2-api.json")
# the table names each inventory's fields but not their types: those come from ZStack's Java classes
INVENTORY_TYPES = Path(__file__).with_name("zstack-1.2-inventory-types.json")
# an inventory's dates as ZStack 1.2 sends them: Gson's default for java.sql.Timestamp (Java 7/8's
# US DateFormat.DEFAULT), "Apr 30, 2014 6:11:47 PM"
DATE_PATTERN = (
    r"^(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) ([1-9]|[12][0-9]|3[01]), [0-9]{4} "
    r"([1-9]|1[0-2]):[0-5][0-9]:[0-5][0-9] (AM|PM)$"
)


@dataclass(frozen=True)
class FieldSpec:
    name: str
    mandatory: bool = False
    type: str | None = None
    valid_values: tuple[str, ...] | None = None


@dataclass(frozen=True)
class MessageSpec:
    name: str  # short: CreateVmInstance
    full_name: str  # org.zstack.header.vm.APICreateVmInstanceMsg
    fields: dict[str, FieldSpec] = field(default_factory=dict)

    @property
    def package(self) -> str:
        return self.full_name.rsplit(".", 1)[0]


@cache
def table() -> dict[str, Any]:
    return json.loads(TABLE.read_text())


@cache
def messages() -> dict[str, MessageSpec]:
    """Short name → spec, for every API message (not replies)."""
    out: dict[str, MessageSpec] = {}
    for key, raw in table()["messages"].items():
        if not (key.startswith("API") and key.endswith("Msg")):
            continue
        fields = {
            f["name"]: FieldSpec(
                f["name"],
                bool(f.get("mandatory")),
                f.get("type"),
                tuple(f["validValues"]) if f.get("validValues") else None,
            )
            for f in raw["fields"]
        }
        short = key[3:-3]
        fields.update(EXTENSIONS.get(short, {}))
        out[short] = MessageSpec(short, raw["fullName"], fields)
    return out


# nimbostack's own fields beyond the table: AddKVMHost logs in with a private key instead of a
# password (one of the two is required: compute/host.py), as ZStack's later releases do
EXTENSIONS: dict[str, dict[str, FieldSpec]] = {
    "AddKVMHost": {"password": FieldSpec("password"), "sshPrivateKey": FieldSpec("sshPrivateKey")},
}


@cache
def by_full_name() -> dict[str, MessageSpec]:
    return {m.full_name: m for m in messages().values()}


# replies the table names otherwise than API<Name>Reply
REPLY_NAMES = {"LocalStorageGetVolumeMigratableHosts": "APILocalStorageGetVolumeMigratableReply"}


def reply_name(msg: MessageSpec) -> str:
    """ZStack answers synchronous APIs with ``API<Name>Reply`` and the others with ``API<Name>Event``."""
    reply = REPLY_NAMES.get(msg.name, f"API{msg.name}Reply")
    if msg.name.startswith("LogIn"):
        reply = "APILogInReply"
    if reply in table()["messages"]:
        return table()["messages"][reply]["fullName"]
    return f"{msg.package}.API{msg.name}Event"


def is_synchronous(msg: MessageSpec) -> bool:
    """Replies come at once; events mean the work may take long and runs as a job."""
    return (
        msg.name.startswith(("Query", "Get", "LogIn"))
        or msg.name in REPLY_NAMES
        or f"API{msg.name}Reply" in table()["messages"]
    )


# query messages the table's map leaves out (ZStack's @AutoQuery names their inventory)
QUERY_OBJECTS = {"APIQueryVmNicInSecurityGroupMsg": "QueryObjectVmNicSecurityGroupRefInventory"}


def query_object(query_msg: str) -> str | None:
    """``QueryVmInstance`` → ``QueryObjectVmInstanceInventory``."""
    key = f"API{query_msg}Msg"
    return table()["queryMessageInventoryMap"].get(key) or QUERY_OBJECTS.get(key)


def query_object_spec(name: str) -> dict[str, Any]:
    return table()["queryObjects"][name]


def inventory_fields(name: str) -> list[str]:
    return list(table()["inventories"].get(name, []))


@cache
def inventory_types() -> dict[str, Any]:
    return json.loads(INVENTORY_TYPES.read_text())


def inventory_parent(name: str) -> str | None:
    """The inventory class ``name``'s Java class extends (KVMHostInventory → HostInventory)."""
    parent: str | None = inventory_types()["extends"].get(name)
    return parent


def inventory_field_types(name: str) -> dict[str, str]:
    """Field → type (string, int, long, boolean, timestamp, object, list<X>, X) of inventory
    ``name``, inherited fields first; {} for an inventory the type table does not know."""
    parent = inventory_parent(name)
    own: dict[str, str] = inventory_types()["inventories"].get(name, {})
    return {**(inventory_field_types(parent) if parent else {}), **own}


def inherited_inventory_fields(name: str) -> list[str]:
    """The table's fields of inventory ``name`` with those of the classes it extends, inherited
    first, as Gson writes them."""
    parent = inventory_parent(name)
    return (inherited_inventory_fields(parent) if parent else []) + inventory_fields(name)


def inventory_subtypes(name: str) -> list[str]:
    """The inventories that extend ``name``, directly or not: a query of hosts answers KVM hosts."""
    children = [c for c, p in inventory_types()["extends"].items() if p == name]
    return children + [g for c in children for g in inventory_subtypes(c)]


# The release notes name some parameters differently from the API table; the server and the shell
# accept both (the notes' examples must work as written).
ALIASES: dict[str, dict[str, str]] = {
    "RecoverVmInstance": {"vmInstanceUuid": "uuid"},
    "ExpungeVmInstance": {"vmInstanceUuid": "uuid"},
    "RecoverImage": {"uuid": "imageUuid"},
    "ExpungeImage": {"uuid": "imageUuid"},
    "RecoverDataVolume": {"volumeUuid": "uuid"},
    "ExpungeDataVolume": {"volumeUuid": "uuid"},
    "AddKVMHost": {"sshPort": "port"},
}
