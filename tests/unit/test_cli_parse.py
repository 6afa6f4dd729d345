"""The command shell's parsing: tokens -> API request, help, completion, session file."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from nimbostack.cli import main
from nimbostack.cli.completion import CliCompleter
from nimbostack.cli.parse import (
    Request,
    UsageError,
    hash_password,
    parse_command,
    split_condition,
    split_line,
    split_list,
)
from nimbostack.cli.session import SessionStore
from nimbostack.cli.shell import redact
from nimbostack.cli.spec import ApiSpec, load_spec

UUID = "1a8236f7e3c14a9d9d38b8ef1b0e2c5f"


@pytest.fixture(scope="module")
def spec() -> ApiSpec:
    return load_spec()


@pytest.fixture(autouse=True)
def cli_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "clihome"
    monkeypatch.setenv("NIMBOSTACK_CLI_HOME", str(home))
    monkeypatch.delenv("NIMBOSTACK_HOST", raising=False)
    monkeypatch.delenv("NIMBOSTACK_PORT", raising=False)
    return home


def parse(spec: ApiSpec, line: str) -> Request:
    return parse_command(spec, split_line(line))


def conditions(spec: ApiSpec, line: str) -> list[dict[str, str]]:
    return parse(spec, line).params["conditions"]


# --- the table -------------------------------------------------------------------------------


def test_spec_commands(spec: ApiSpec) -> None:
    vm = spec.get("CreateVmInstance")
    assert vm is not None
    assert vm.full_name == "org.zstack.header.vm.APICreateVmInstanceMsg"
    assert vm.fields["l3NetworkUuids"].is_list and vm.fields["l3NetworkUuids"].mandatory
    assert vm.fields["type"].valid_values == ("UserVm", "ApplianceVm")
    assert not vm.is_query
    assert spec.get("QueryL3Network").is_query  # type: ignore[union-attr]
    assert spec.get("CreateVmInstanceReply") is None  # replies are not commands
    assert spec.get("APICreateVmInstanceMsg") is None


# --- plain parameters ------------------------------------------------------------------------


def test_list_split_and_trailing_comma(spec: ApiSpec) -> None:
    req = parse(spec, "CreateVmInstance name=vm1 instanceOfferingUuid=io imageUuid=img l3NetworkUuids=a,b,")
    assert req.params == {
        "name": "vm1",
        "instanceOfferingUuid": "io",
        "imageUuid": "img",
        "l3NetworkUuids": ["a", "b"],
    }
    assert req.full_name == "org.zstack.header.vm.APICreateVmInstanceMsg"


def test_split_list() -> None:
    assert split_list("a,b,") == ["a", "b"]
    assert split_list(",a,,b") == ["a", "b"]
    assert split_list("") == []
    assert split_list(r"x\,y,z") == ["x,y", "z"]
    assert split_list(r"userdata::a\nb") == [r"userdata::a\nb"]


def test_quoted_backslash_n_is_kept(spec: ApiSpec) -> None:
    line = (
        "CreateVmInstance name=v instanceOfferingUuid=i imageUuid=m l3NetworkUuids=l "
        r"systemTags='userdata::a\nb'"
    )
    tags = parse(spec, line).params["systemTags"]
    assert tags == ["userdata::a\\nb"]
    assert len(tags[0]) == len("userdata::a") + 3  # backslash and n, not a newline
    assert split_line(r'x desc="a\nb"') == ["x", "desc=a\\nb"]


def test_json_map_and_python_literal(spec: ApiSpec) -> None:
    req = parse(spec, """AttachNetworkServiceToL3Network l3NetworkUuid=l3 networkServices='{"p1":["DHCP"]}'""")
    assert req.params == {"l3NetworkUuid": "l3", "networkServices": {"p1": ["DHCP"]}}
    req = parse(spec, """AttachNetworkServiceToL3Network l3NetworkUuid=l3 networkServices="{'p1':['Eip']}" """)
    assert req.params["networkServices"] == {"p1": ["Eip"]}


def test_map_needs_json_object(spec: ApiSpec) -> None:
    with pytest.raises(UsageError, match="JSON object"):
        parse(spec, "AttachNetworkServiceToL3Network l3NetworkUuid=l3 networkServices=DHCP")


def test_json_list_value(spec: ApiSpec) -> None:
    req = parse(
        spec,
        """AddSecurityGroupRule securityGroupUuid=sg rules='[{"type":"Ingress","startPort":22}]'""",
    )
    assert req.params["rules"] == [{"type": "Ingress", "startPort": 22}]
    with pytest.raises(UsageError, match="not valid JSON"):
        parse(spec, "AddSecurityGroupRule securityGroupUuid=sg rules='[oops'")


def test_scalar_starting_with_brace_stays_string(spec: ApiSpec) -> None:
    assert parse(spec, "CreateZone name=z 'description={not json'").params["description"] == "{not json"


def test_numbers_and_booleans(spec: ApiSpec) -> None:
    req = parse(spec, "CreateInstanceOffering name=o cpuNum=2 cpuSpeed=1 memorySize=1073741824")
    assert req.params == {"name": "o", "cpuNum": 2, "cpuSpeed": 1, "memorySize": 1073741824}
    req = parse(spec, "AddKVMHost name=h managementIp=1.2.3.4 username=root password=pw clusterUuid=c")
    assert req.params["password"] == "pw"  # SSH password: sent as given, not hashed
    req = parse(spec, "CreateL3Network name=n l2NetworkUuid=l2 system=true")
    assert req.params["system"] is True
    assert parse(spec, "CreateZone name=123").params["name"] == "123"  # names stay strings
    assert parse(spec, "CreateZone name=z timeout=60000").params["timeout"] == 60000


def test_valid_values(spec: ApiSpec) -> None:
    assert parse(spec, "ChangeZoneState uuid=z stateEvent=disable").params["stateEvent"] == "disable"
    with pytest.raises(UsageError, match="valid values: enable, disable; did you mean enable"):
        parse(spec, "ChangeZoneState uuid=z stateEvent=enabel")


def test_repeated_list_parameter_accumulates(spec: ApiSpec) -> None:
    req = parse(spec, "CreateZone name=z systemTags=a::1 systemTags=b::2,c::3")
    assert req.params["systemTags"] == ["a::1", "b::2", "c::3"]


def test_system_tag_values_keep_their_commas(spec: ApiSpec) -> None:
    # the release notes' own userdata example holds "[foo,bar]"
    req = parse(spec, "CreateZone name=z systemTags='userdata::a: [foo,bar]\\n,sshkey::ssh-rsa AAA k'")
    assert req.params["systemTags"] == ["userdata::a: [foo,bar]\\n", "sshkey::ssh-rsa AAA k"]


def test_body_carries_session(spec: ApiSpec) -> None:
    req = parse(spec, "CreateZone name=z")
    assert req.body("s1") == {"org.zstack.header.zone.APICreateZoneMsg": {"name": "z", "session": {"uuid": "s1"}}}
    assert req.body(None) == {"org.zstack.header.zone.APICreateZoneMsg": {"name": "z"}}
    login = parse(spec, "LogInByAccount accountName=admin password=password")
    assert "session" not in login.body("s1")["org.zstack.header.identity.APILogInByAccountMsg"]


def test_defaults_fill_missing(spec: ApiSpec) -> None:
    assert parse_command(spec, ["LogOut"], {"sessionUuid": "s1"}).params == {"sessionUuid": "s1"}
    assert parse_command(spec, ["LogOut", "sessionUuid=x"], {"sessionUuid": "s1"}).params == {"sessionUuid": "x"}


# --- passwords -------------------------------------------------------------------------------


def test_password_hashing(spec: ApiSpec) -> None:
    digest = hashlib.sha512(b"password").hexdigest()
    assert hash_password("password") == digest
    assert len(digest) == 128
    req = parse(spec, "LogInByAccount accountName=admin password=password")
    assert req.params == {"accountName": "admin", "password": digest}
    assert parse(spec, "LogInByUser userName=u password=password").params["password"] == digest
    assert parse(spec, "CreateAccount name=a password=password").params["password"] == digest
    assert parse(spec, "UpdateAccount uuid=a password=password").params["password"] == digest
    assert "password" not in parse(spec, "UpdateAccount uuid=a name=b").params


def test_history_redacts_passwords() -> None:
    assert redact("LogInByAccount accountName=admin password=secret") == ("LogInByAccount accountName=admin password=")
    assert redact("LogInByAccount password='a b c' accountName=x") == "LogInByAccount password= accountName=x"
    assert redact("CreateZone name=password") == "CreateZone name=password"


# --- query commands --------------------------------------------------------------------------


def test_query_spec_example(spec: ApiSpec) -> None:
    req = parse(spec, f"QueryL3Network fields=l2NetworkUuid, uuid={UUID}")
    assert req.params == {
        "fields": ["l2NetworkUuid"],
        "conditions": [{"name": "uuid", "op": "=", "value": UUID}],
    }
    req = parse(spec, "QuerySystemTag resourceUuid=303b tag~=userdata%")
    assert req.params["conditions"] == [
        {"name": "resourceUuid", "op": "=", "value": "303b"},
        {"name": "tag", "op": "like", "value": "userdata%"},
    ]


@pytest.mark.parametrize(
    ("token", "op", "value"),
    [
        ("name=a", "=", "a"),
        ("name!=a", "!=", "a"),
        ("name>a", ">", "a"),
        ("name<a", "<", "a"),
        ("name>=a", ">=", "a"),
        ("name<=a", "<=", "a"),
        ("name?=a,b", "in", "a,b"),
        ("name!?=a,b", "not in", "a,b"),
        ("name~=a%", "like", "a%"),
        ("name!~=a%", "not like", "a%"),
        ("name~=web", "like", "%web%"),  # zstack-cli adds wildcards to a bare pattern
        ("name!~=web", "not like", "%web%"),
        ("name=a=b", "=", "a=b"),  # only the first operator splits
        ("name=", "=", ""),
    ],
)
def test_every_query_op(spec: ApiSpec, token: str, op: str, value: str) -> None:
    assert conditions(spec, f"QueryZone {token}") == [{"name": "name", "op": op, "value": value}]


def test_null_ops(spec: ApiSpec) -> None:
    assert conditions(spec, "QueryL3Network dnsDomain=null") == [{"name": "dnsDomain", "op": "is null"}]
    assert conditions(spec, "QueryL3Network dnsDomain!=null") == [{"name": "dnsDomain", "op": "is not null"}]


def test_split_condition_longest_op_first() -> None:
    assert split_condition("a!?=x") == ("a", "!?=", "x")
    assert split_condition("a?=x") == ("a", "?=", "x")
    assert split_condition("a!~=x") == ("a", "!~=", "x")
    assert split_condition("a>=x") == ("a", ">=", "x")
    with pytest.raises(UsageError):
        split_condition("noop")
    with pytest.raises(UsageError):
        split_condition("=x")


def test_query_own_fields(spec: ApiSpec) -> None:
    req = parse(
        spec,
        "QueryVmInstance count=true limit=10 start=5 replyWithCount=false sortBy=name sortDirection=desc",
    )
    assert req.params == {
        "count": True,
        "limit": 10,
        "start": 5,
        "replyWithCount": False,
        "sortBy": "name",
        "sortDirection": "desc",
        "conditions": [],
    }


def test_query_without_conditions_sends_empty_list(spec: ApiSpec) -> None:
    assert parse(spec, "QueryZone").params == {"conditions": []}


def test_query_nested_and_tag_fields(spec: ApiSpec) -> None:
    assert conditions(spec, "QueryL3Network l2Network.zone.name=z1 __systemTag__~=a%") == [
        {"name": "l2Network.zone.name", "op": "=", "value": "z1"},
        {"name": "__systemTag__", "op": "like", "value": "a%"},
    ]


def test_query_raw_conditions(spec: ApiSpec) -> None:
    line = """QueryZone conditions='[{"name":"uuid","op":"=","value":"x"}]' name=z"""
    assert conditions(spec, line) == [
        {"name": "uuid", "op": "=", "value": "x"},
        {"name": "name", "op": "=", "value": "z"},
    ]


def test_query_unknown_field(spec: ApiSpec) -> None:
    with pytest.raises(UsageError, match="'nme' is neither a parameter nor a queryable field; did you mean name"):
        parse(spec, "QueryZone nme=z")
    with pytest.raises(UsageError, match="did you mean l2Network.zone"):
        parse(spec, "QueryL3Network l2Network.zon.name=z")
    with pytest.raises(UsageError, match="cannot parse"):
        parse(spec, "QueryZone justaword")


def test_query_with_other_mandatory_field(spec: ApiSpec) -> None:
    with pytest.raises(UsageError, match="missing mandatory parameter resourceName"):
        parse(spec, "QueryResourcePrice")
    assert parse(spec, "QueryResourcePrice resourceName=cpu").params == {
        "resourceName": "cpu",
        "conditions": [],
    }


# --- usage errors ----------------------------------------------------------------------------


def test_unknown_command_suggests(spec: ApiSpec) -> None:
    with pytest.raises(UsageError, match="unknown command 'CreateVmInstanse'; did you mean CreateVmInstance"):
        parse(spec, "CreateVmInstanse name=a")
    with pytest.raises(UsageError, match="did you mean CreateZone"):
        parse(spec, "createzone name=a")


def test_missing_mandatory(spec: ApiSpec) -> None:
    with pytest.raises(UsageError, match="missing mandatory parameters instanceOfferingUuid, imageUuid"):
        parse(spec, "CreateVmInstance name=a")


def test_unknown_param(spec: ApiSpec) -> None:
    with pytest.raises(UsageError, match="unknown parameter 'nam' for CreateZone; did you mean name"):
        parse(spec, "CreateZone nam=a")
    with pytest.raises(UsageError, match="parameters are key=value"):
        parse(spec, "CreateZone zone1")


def test_unparsable_line() -> None:
    with pytest.raises(UsageError, match="cannot parse line"):
        split_line("CreateZone name='unterminated")
    assert split_line("   # a comment") == []


def test_main_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    # nothing listens on port 9 of 127.0.0.1: these must fail before any request
    assert main(["--port", "9", "CreateVmInstanse", "name=a"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'CreateVmInstanse'; did you mean CreateVmInstance" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["--port", "9", "CreateVmInstance", "name=a"]) == 2
    assert "missing mandatory parameters" in capsys.readouterr().err
    assert main(["--port", "9", "CreateZone", "nam=a"]) == 2
    assert "did you mean name" in capsys.readouterr().err
    assert main(["--port", "notaport"]) == 2
    assert main(["--port", "9", "CreateZone", "name=a", "--host", "x"]) == 2
    assert "go before the command" in capsys.readouterr().err
    assert main(["--port", "9", "-f", "x", "CreateZone"]) == 2


def test_help_lists_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["help", "CreateVmInstance"]) == 0
    out = capsys.readouterr().out
    assert "org.zstack.header.vm.APICreateVmInstanceMsg" in out
    assert "* l3NetworkUuids" in out and "list: a,b,c" in out
    assert "one of: UserVm, ApplianceVm" in out
    assert main(["CreateVmInstance", "--help"]) == 0
    assert "* imageUuid" in capsys.readouterr().out
    assert main(["QueryL3Network", "-h"]) == 0
    out = capsys.readouterr().out
    assert "queryable fields" in out and "l2NetworkUuid" in out and "l2Network." in out
    assert main(["help", "Nope"]) == 2
    assert main(["help"]) == 0
    assert "CreateVmInstance" in capsys.readouterr().out


def test_program_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for example in ("l3NetworkUuids=UUID1,UUID2", "networkServices='{", "?=", "~=", "LogInByAccount"):
        assert example in out


# --- completion ------------------------------------------------------------------------------


def test_complete_command_names(spec: ApiSpec) -> None:
    c = CliCompleter(spec)
    assert "CreateVmInstance" in c.candidates("CreateVm")
    assert all(w.lower().startswith("createvm") for w in c.candidates("createvm"))
    assert "exit" in c.candidates("ex")
    assert "QueryZone" in c.candidates("help QueryZ")


def test_complete_parameters(spec: ApiSpec) -> None:
    c = CliCompleter(spec)
    words = c.candidates("CreateVmInstance ")
    assert "name=" in words and "l3NetworkUuids=" in words
    assert "name=" not in c.candidates("CreateVmInstance name=x ")
    assert c.candidates("CreateVmInstance type=U") == ["type=UserVm"]
    assert c.candidates("Nope ") == []


def test_complete_query_fields(spec: ApiSpec) -> None:
    c = CliCompleter(spec)
    words = c.candidates("QueryL3Network ")
    assert "l2NetworkUuid=" in words and "l2Network." in words and "limit=" in words
    assert "conditions=" not in words
    assert set(c.candidates("QueryL3Network l2Network.zo")) == {"l2Network.zone.", "l2Network.zoneUuid="}
    assert "l2Network.zone.name=" in c.candidates("QueryL3Network l2Network.zone.")
    fields = c.candidates("QueryL3Network fields=uuid,l2")
    assert fields == ["fields=uuid,l2NetworkUuid"]


# --- session file ----------------------------------------------------------------------------


def test_session_store(cli_home: Path) -> None:
    store = SessionStore()
    assert store.path == cli_home / "cli-session.json"
    assert store.get("127.0.0.1", 8080) is None
    store.set("127.0.0.1", 8080, "s1", accountName="admin")
    store.set("10.0.0.2", 8080, "s2")
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert json.loads(store.path.read_text()) == {
        "127.0.0.1:8080": {"uuid": "s1", "accountName": "admin"},
        "10.0.0.2:8080": {"uuid": "s2"},
    }
    assert SessionStore().get("127.0.0.1", 8080) == "s1"
    assert store.get("127.0.0.1", 8081) is None
    store.clear("127.0.0.1", 8080)
    assert store.get("127.0.0.1", 8080) is None
    assert store.get("10.0.0.2", 8080) == "s2"
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600


def test_session_store_corrupt_file(cli_home: Path) -> None:
    cli_home.mkdir()
    (cli_home / "cli-session.json").write_text("{not json")
    store = SessionStore()
    assert store.get("127.0.0.1", 8080) is None
    store.set("127.0.0.1", 8080, "s1")
    assert store.get("127.0.0.1", 8080) == "s1"


def test_help_examples_parse(spec: ApiSpec) -> None:
    from nimbostack.cli.helptext import USAGE_EXAMPLES

    text = USAGE_EXAMPLES.replace("\\\n", " ")
    examples = [line.split() for line in text.splitlines() if line.startswith("    ")]
    examples = [line for line in examples if line and spec.get(line[0]) is not None]
    assert len(examples) >= 8
    for line in text.splitlines():
        tokens = split_line(line) if line.startswith("    ") else []
        if tokens and spec.get(tokens[0]) is not None:
            parse_command(spec, tokens)  # raises on a broken example


@pytest.mark.parametrize(
    ("line", "field"),
    [
        (f"RecoverVmInstance vmInstanceUuid={UUID}", "uuid"),  # the release notes' spelling
        (f"RecoverVmInstance uuid={UUID}", "uuid"),  # the API table's
        (f"ExpungeImage uuid={UUID}", "imageUuid"),
        (f"RecoverDataVolume volumeUuid={UUID}", "uuid"),
    ],
)
def test_the_shell_accepts_every_spelling_the_server_accepts(spec: ApiSpec, line: str, field: str) -> None:
    assert parse_command(spec, split_line(line)).params == {field: UUID}
