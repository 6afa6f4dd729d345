"""The nftables file the security group agent writes: what each rule becomes, what the chains
always let through, and that nothing but validated values reaches the file."""

from __future__ import annotations

from typing import Any

import pytest

from nimbostack.plugins.security_group.host import render

NIC = "ab12cd34" + "0" * 24
VM = "11" * 16
TAP = "vnicab12cd34"


def body(**nic: Any) -> dict[str, Any]:
    entry = {"nicUuid": NIC, "vmUuid": VM, "ingress": [], "egress": [], **nic}
    return {"hostUuid": "h" * 32, "nics": [entry]}


def rule(protocol: str, start: int, end: int, cidr: str = "0.0.0.0/0") -> dict[str, Any]:
    return {"protocol": protocol, "startPort": start, "endPort": end, "allowedCidr": cidr}


def chain(text: str, name: str) -> list[str]:
    prefix = f"add rule bridge t {name} "
    return [line[len(prefix):] for line in text.splitlines() if line.startswith(prefix)]


def test_ingress_is_default_deny_and_each_rule_is_one_return() -> None:
    a = render.parse(body(ingress=[
        rule("TCP", 22, 22, "198.18.0.7/24"),
        rule("UDP", 5000, 5100),
        rule("ICMP", 8, -1),
        rule("ICMP", 3, 4, "198.18.1.0/24"),
        rule("ICMP", -1, -1),
        rule("ALL", -1, -1, "198.19.0.0/16"),
        rule("ALL", -1, -1),
    ]))
    text = render.render("t", a.nics, a.remove, full=False, stateful=False)
    assert chain(text, f"in_{TAP}") == [
        "ether type arp return",
        "tcp flags & (syn | ack) != syn return",
        "icmp type { echo-reply, destination-unreachable, time-exceeded, parameter-problem } return",
        "udp sport 67 udp dport 68 return",
        "ip saddr 198.18.0.0/24 tcp dport 22 return",  # the CIDR as its network
        "udp dport 5000-5100 return",
        "icmp type 8 return",
        "ip saddr 198.18.1.0/24 icmp type 3 icmp code 4 return",
        "ip protocol icmp return",
        "ip saddr 198.19.0.0/16 return",
        "ether type ip return",
        "drop",
    ]
    # no egress rule: the guest sends what it likes
    assert chain(text, f"out_{TAP}") == ["return"]
    assert f'add element bridge t ingress {{ "{TAP}" : jump in_{TAP} }}' in text
    assert f'add element bridge t egress {{ "{TAP}" : jump out_{TAP} }}' in text
    # the hooks: frames to a guest meet its ingress chain, from it its egress chain
    assert "add rule bridge t forward iifname vmap @egress" in text
    assert "add rule bridge t forward oifname vmap @ingress" in text
    assert "add rule bridge t output oifname vmap @ingress" in text
    assert "add rule bridge t input iifname vmap @egress" in text


def test_egress_rules_make_egress_default_deny_but_dhcp_and_metadata_pass() -> None:
    a = render.parse(body(egress=[rule("TCP", 443, 443, "198.18.0.0/15")]))
    text = render.render("t", a.nics, a.remove, full=False, stateful=True)
    assert chain(text, f"out_{TAP}") == [
        "ether type arp return",
        "ct state established,related return",
        "ct state invalid drop",
        "udp sport 68 udp dport 67 return",
        "ip daddr 169.254.169.254 tcp dport 80 return",
        "ip daddr 198.18.0.0/15 tcp dport 443 return",
        "drop",
    ]


def test_full_replaces_the_table_and_removal_deletes_whatever_is_there() -> None:
    a = render.parse(body())
    full = render.render("t", a.nics, (), full=True, stateful=False)
    assert full.splitlines()[:2] == ["add table bridge t", "delete table bridge t"]
    nothing = render.render("t", (), (), full=True, stateful=False)
    assert nothing.splitlines() == ["add table bridge t", "delete table bridge t"]
    other = render.parse({"hostUuid": "h" * 32, "remove": ["cd" * 16]})
    text = render.render("t", other.nics, other.remove, full=False, stateful=False)
    tap = "vniccdcdcdcd"
    # made to exist, then deleted: one transaction that succeeds whether or not they were there
    assert text.splitlines()[-5:] == [
        f"add chain bridge t out_{tap}",
        f'add element bridge t egress {{ "{tap}" : jump out_{tap} }}',
        f'delete element bridge t egress {{ "{tap}" }}',
        f"flush chain bridge t out_{tap}",
        f"delete chain bridge t out_{tap}",
    ]
    assert "delete table" not in text


def test_the_same_rule_from_two_groups_is_one_line() -> None:
    a = render.parse(body(ingress=[rule("TCP", 80, 80), rule("TCP", 80, 80)]))
    assert len(a.nics[0].ingress) == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"nics": [{"nicUuid": "x; flush ruleset", "vmUuid": VM}]},
        {"nics": [{"nicUuid": NIC, "vmUuid": VM, "ingress": [rule("TCP", 1, 2, "0.0.0.0/0 accept")]}]},
        {"nics": [{"nicUuid": NIC, "vmUuid": VM, "ingress": [rule("TCP", 1, 2, '1.2.3.4/8"\n}')]}]},
        {"nics": [{"nicUuid": NIC, "vmUuid": VM, "ingress": [rule("tcp", 1, 2)]}]},
        {"nics": [{"nicUuid": NIC, "vmUuid": VM, "ingress": [rule("TCP", 2, 1)]}]},
        {"nics": [{"nicUuid": NIC, "vmUuid": VM, "ingress": [rule("TCP", -1, -1)]}]},
        {"nics": [{"nicUuid": NIC, "vmUuid": VM, "ingress": [rule("ALL", 1, 1)]}]},
        {"nics": [{"nicUuid": NIC, "vmUuid": VM, "ingress": [rule("ICMP", -1, 3)]}]},
        {"nics": [{"nicUuid": NIC, "vmUuid": VM, "ingress": [{**rule("TCP", 1, 1), "startPort": "1"}]}]},
        {"nics": [{"nicUuid": NIC, "vmUuid": VM}, {"nicUuid": NIC, "vmUuid": VM}]},
        {"remove": ["../../etc"]},
        {"vmUuids": "all"},
    ],
)
def test_anything_malformed_is_refused_before_a_line_is_written(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        render.parse({"hostUuid": "h" * 32, **bad})


def test_a_table_name_cannot_carry_syntax() -> None:
    with pytest.raises(ValueError):
        render.render("t; flush ruleset", (), (), full=True, stateful=False)


def test_nft_accepts_the_rendered_file() -> None:
    """``nft -c`` (check only: the kernel validates the transaction, nothing is changed)."""
    import os
    import shutil
    import subprocess

    nft = shutil.which("nft", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if nft is None or os.geteuid() != 0:
        pytest.skip("needs root and nft (apt-get install nftables)")
    every = [rule("TCP", 22, 22, "198.18.0.0/24"), rule("UDP", 53, 53), rule("ICMP", 8, 0), rule("ICMP", -1, -1),
             rule("ALL", -1, -1, "198.19.0.0/16"), rule("ALL", -1, -1)]
    a = render.parse(body(ingress=every, egress=every))
    for full in (True, False):
        text = render.render("nbsgunit", a.nics, ("vnic99999999",), full=full, stateful=False)
        r = subprocess.run([nft, "-c", "-f", "-"], input=text, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
