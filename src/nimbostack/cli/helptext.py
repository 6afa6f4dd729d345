"""Help texts: the program's usage, the command list, and one command's parameters."""

from __future__ import annotations

import shutil

from nimbostack.cli.spec import QUERY_OWN_FIELDS, ApiSpec, Command

USAGE_EXAMPLES = """\
Each command is an API message name without API/Msg (APICreateZoneMsg -> CreateZone),
followed by key=value parameters; quote values the way a shell does.

examples:
  log in (the password is sent as its SHA-512 digest; the session is remembered per host:port):
    LogInByAccount accountName=admin password=password
  plain parameters:
    CreateZone name=zone1 description='first zone'
  list parameters take a comma list (a trailing comma is fine):
    CreateVmInstance name=vm1 instanceOfferingUuid=UUID imageUuid=UUID l3NetworkUuids=UUID1,UUID2 \\
        systemTags='userdata::I2Nsb3VkLWNvbmZpZw=='
  map parameters, or any value starting with { or [, are JSON:
    AttachNetworkServiceToL3Network l3NetworkUuid=UUID networkServices='{"PROVIDER_UUID": ["DHCP", "Eip"]}'
  query conditions are key<op>value with op one of
      =  !=  >  <  >=  <=  ?= (in a,b)  !?= (not in)  ~= (like, % wildcard)  !~= (not like)
      key=null (is null)  key!=null (is not null); nested fields use dots (vmNics.ip=10.0.0.5);
      a like pattern without % or _ matches substrings (name~=web is name like %web%)
    QueryVmInstance state=Running name~=web% memorySize>=1073741824 fields=uuid,name, limit=10
    QueryVmInstance vmNics.ip=10.0.0.5 zone.name?=zone1,zone2
    QueryL3Network l2NetworkUuid?=UUID1,UUID2 dnsDomain=null sortBy=createDate sortDirection=desc
    QueryVmInstance count=true state!=Destroyed
    QuerySystemTag resourceUuid=UUID tag~=userdata%
  help:
    help                      this text and the list of commands
    help CreateVmInstance     parameters of one command (same as: CreateVmInstance --help)
  leave the interactive shell with exit, quit or Ctrl-D.

exit status: 0 success, 1 API error (the reply is printed) or server unreachable, 2 bad usage."""


def _columns(words: list[str], width: int) -> str:
    if not words:
        return ""
    col = max(len(w) for w in words) + 2
    per_line = max(1, width // col)
    lines = []
    for i in range(0, len(words), per_line):
        lines.append("  " + "".join(w.ljust(col) for w in words[i : i + per_line]).rstrip())
    return "\n".join(lines)


def general_help(spec: ApiSpec, width: int | None = None) -> str:
    width = width or min(shutil.get_terminal_size((100, 24)).columns, 160)
    return f"{USAGE_EXAMPLES}\n\ncommands ({len(spec.commands)}):\n{_columns(spec.command_names, width - 2)}"


def command_help(spec: ApiSpec, command: Command, width: int | None = None) -> str:
    width = width or min(shutil.get_terminal_size((100, 24)).columns, 160)
    lines = [f"{command.name}    ({command.full_name})", "", "parameters (* = mandatory):"]
    own = [f for f in command.fields.values() if not f.common]
    common = [f for f in command.fields.values() if f.common]
    if command.is_query:
        own = [f for f in own if f.name != "conditions"]
    name_width = max((len(f.name) for f in command.fields.values()), default=4) + 2
    for fld in own + common:
        notes = []
        if fld.is_list:
            notes.append("list: a,b,c")
        if fld.is_map:
            notes.append("map: JSON object")
        if fld.valid_values:
            notes.append("one of: " + ", ".join(fld.valid_values))
        if fld.common:
            notes.append("accepted by every command" + (" (milliseconds)" if fld.name == "timeout" else ""))
        mark = "*" if fld.mandatory else " "
        lines.append(f"  {mark} {fld.name.ljust(name_width)}{'; '.join(notes)}".rstrip())
    if command.is_query:
        lines += [
            "",
            "any other key<op>value is a query condition; op is one of",
            "  =  !=  >  <  >=  <=  ?= (in a,b)  !?= (not in)  ~= (like, %)  !~= (not like)",
            "  key=null (is null), key!=null (is not null); conditions='[{...}]' adds raw conditions",
            f"own parameters: {', '.join(sorted(QUERY_OWN_FIELDS - {'conditions'}))}; "
            "count=true returns only the number of matches",
        ]
        obj = spec.query_object_for(command)
        if obj is not None:
            lines += ["", "queryable fields:", _columns(sorted(obj.primitive_fields), width - 2)]
            if obj.expanded_fields:
                lines += [
                    "expandable (use a dot: field.subfield):",
                    _columns(sorted(f + "." for f in obj.expanded_fields), width - 2),
                ]
        lines += ["", f"example: {command.name} uuid=UUID", f"         {command.name} name~=web% limit=10"]
    else:
        example = " ".join(f"{name}=..." for name in command.mandatory)
        lines += ["", f"example: {command.name} {example}".rstrip()]
    return "\n".join(lines)
