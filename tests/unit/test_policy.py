"""Policy statements and how their action patterns match an API (core/policy.py)."""

from __future__ import annotations

import pytest

from nimbostack.core import policy, spec
from nimbostack.core.errors import ApiError

CREATE_VM = "instance:APICreateVmInstanceMsg"


@pytest.mark.parametrize(
    ("pattern", "hit"),
    [
        ("*", True), (".*", True), ("instance:*", True), ("instance:.*", True), (CREATE_VM, True),
        ("instance:CreateVmInstance", True), ("CreateVm*", True), ("APICreateVmInstanceMsg", True),
        ("volume:*", False), ("instance:APIStopVmInstanceMsg", False), ("*:APIQuery*", False),
        ("instance", False), ("(a+)+$", False),
    ],
)
def test_patterns(pattern: str, hit: bool) -> None:
    assert policy.matches(pattern, CREATE_VM) is hit


def test_actions_are_named_by_zstack_category() -> None:
    assert policy.action(spec.messages()["CreateVmInstance"]) == CREATE_VM
    assert policy.action(spec.messages()["CreateL3Network"]) == "l3Network:APICreateL3NetworkMsg"
    assert policy.action(spec.messages()["CreateUser"]) == "identity:APICreateUserMsg"


def test_deny_wins_and_nothing_is_allowed_by_default() -> None:
    allow = policy.Statement("a", policy.ALLOW, ("*",))
    deny = policy.Statement("d", policy.DENY, ("instance:APICreate*",))
    assert policy.decide([], CREATE_VM)[0] == policy.DENY
    assert policy.decide([("p", allow)], CREATE_VM)[0] == policy.ALLOW
    effect, why = policy.decide([("p", allow), ("q", deny)], CREATE_VM)
    assert effect == policy.DENY and "q" in why


@pytest.mark.parametrize(
    "bad",
    [None, [], "[", 5, [5], [{"effect": "allow", "actions": ["*"]}], [{"effect": "Allow"}],
     [{"effect": "Allow", "actions": [""]}], [{"effect": "Allow", "actions": ["*"], "extra": 1}],
     [{"effect": "Allow", "actions": [["*"]]}], [{"effect": "Allow", "actions": ["*"], "name": 3}]],
)
def test_bad_statements_are_invalid_arguments(bad: object) -> None:
    with pytest.raises(ApiError) as err:
        policy.parse_statements(bad)
    assert err.value.code == "SYS.1007"


def test_statements_round_trip_through_their_json() -> None:
    text = '[{"actions": "instance:*", "effect": "Deny"}]'
    (st,) = policy.parse_statements(text)
    assert st == policy.Statement("statement0", policy.DENY, ("instance:*",))
    assert policy.load_statements(policy.dump_statements([st])) == [st]
