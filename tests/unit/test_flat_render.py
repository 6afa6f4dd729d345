"""The Flat provider's pure parts: validation, dnsmasq/nftables rendering, metadata answers."""

from __future__ import annotations

import copy

import pytest

from nimbostack.agent.drivers.libvirt.domain_xml import nic_target
from nimbostack.plugins.flat.host import metadata, render
from nimbostack.wire import NicSpec
from nimbostack.wire import validate as v

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIUnitTestKey alice@example"
BODY = {
    "hostUuid": "a" * 32,
    "l3": {
        "uuid": "b" * 32,
        "bridge": "br_eth0",
        "physicalInterface": "eth0",
        "vlan": 100,
        "dhcpServerIp": "198.18.0.2",
        "netmask": "255.255.252.0",
        "gateway": "198.18.0.1",
        "dns": ["198.18.0.1"],
        "dnsDomain": "example.org",
    },
    "vms": [
        {
            "vmUuid": "c" * 32,
            "nicUuid": "d" * 32,
            "mac": "FA:00:00:00:00:01",
            "ip": "198.18.0.5",
            "hostname": "web-1.example.org",
            "isDefault": True,
            "userdata": "#cloud-config\nfoo: 1\n",
            "sshKeys": [KEY],
        },
        {
            "vmUuid": "e" * 32,
            "nicUuid": "f" * 32,
            "mac": "fa:00:00:00:00:02",
            "ip": "198.18.0.6",
            "hostname": "db",
            "isDefault": False,
        },
    ],
}


def test_render_dnsmasq_and_rules() -> None:
    d = render.parse(BODY)
    assert d.l3.uplink == "eth0.100" and d.l3.prefix == 22
    hosts = render.render_dhcp_hosts(d.vms)
    assert hosts == (
        "fa:00:00:00:00:01,set:nimbodef,198.18.0.5,web-1,infinite\nfa:00:00:00:00:02,198.18.0.6,db,infinite\n"
    )
    conf = render.render_dnsmasq_conf(d.l3, "nbdhcp0", "/run/x/hosts", "/run/x/pid", "nobody", "nogroup")
    assert "dhcp-range=set:nimbo,198.18.0.0,static,255.255.252.0,infinite" in conf
    assert "dhcp-option=tag:nimbodef,option:router,198.18.0.1" in conf and "port=0" in conf
    assert "dhcp-option=tag:!nimbodef,option:router" in conf
    nft = render.render_nft("nimbo_bbbbbbbbbb", d, "nfouter", "02:00:00:00:00:09")
    assert 'iifname vmap { "vnicdddddddd" : jump vm_vnicdddddddd, "vnicffffffff" : jump vm_vnicffffffff }' in nft
    assert "ether saddr != fa:00:00:00:00:01 drop" in nft and "ip saddr != 198.18.0.6 drop" in nft
    assert 'iifname "eth0.100" oifname "nfouter" drop' in nft
    assert "ip daddr 169.254.169.254 ether daddr set 02:00:00:00:00:09" in nft


@pytest.mark.parametrize(
    "path,value",
    [
        (("vms", 0, "hostname"), "a\nb"),
        (("vms", 0, "hostname"), "a;b"),
        (("vms", 0, "hostname"), "$(id)"),
        (("vms", 0, "mac"), "fa:00:00:00:00:01,set:x"),
        (("vms", 0, "mac"), "01:00:00:00:00:01"),
        (("vms", 0, "ip"), "198.18.0.5 accept"),
        (("vms", 0, "ip"), "10.0.0.5"),  # outside the L3 network
        (("vms", 0, "ip"), "198.18.0.2"),  # the DHCP server's own
        (("vms", 1, "mac"), "fa:00:00:00:00:01"),  # twice
        (("vms", 0, "sshKeys"), ["ssh-rsa AAAA a\nssh-rsa BBBB b"]),
        (("vms", 0, "vmUuid"), "../../etc"),
        (("l3", "bridge"), 'br0" accept'),
        (("l3", "physicalInterface"), "eth0 $(reboot)"),
        (("l3", "dnsDomain"), "x.org\ndhcp-option=3,1.2.3.4"),
        (("l3", "dns"), ["1.1.1.1,2.2.2.2"]),
        (("l3", "vlan"), 5000),
        (("l3", "netmask"), "255.0.255.0"),
        (("l3", "services"), ["DHCP", "Shell"]),
    ],
)
def test_parse_refuses_what_could_inject(path: tuple, value: object) -> None:
    body = copy.deepcopy(BODY)
    node = body
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    with pytest.raises(ValueError):
        render.parse(body)


def test_safe_hostname_and_tap_name() -> None:
    assert v.safe_hostname('My VM "1";$(reboot)\n', "vm-x") == "my-vm-1-reboot"
    assert v.safe_hostname("!!!", "vm-12345678") == "vm-12345678"
    assert v.safe_hostname("a" * 80, "x") == "a" * 63
    assert v.tap_name("1552683a" + "0" * 24) == "vnic1552683a"
    nic = "0123abcd" + "e" * 24
    assert v.tap_name(nic) == nic_target(NicSpec(nic, "fa:00:00:00:00:01", "br0", 0))


def _crawl(vm: dict, url: str) -> dict:
    """cloud-init's ec2_utils.MetadataMaterializer, in short."""
    status, body = metadata.answer(vm, url)
    assert status == 200, url
    out: dict = {}
    for field in body.splitlines():
        field = field.strip()
        if field.endswith("/"):
            out[field[:-1]] = _crawl(vm, url + field)
            continue
        resource = name = field
        if "=" in field:
            ident, name = field.split("=", 1)
            resource = f"{int(ident)}/openssh-key"
        status, leaf = metadata.answer(vm, url + resource)
        assert status == 200, url + resource
        out[name] = leaf
    return out


def test_metadata_both_styles() -> None:
    d = render.parse(BODY)
    state = render.metadata_state(d)
    vm = state["vms"]["198.18.0.5"]
    tree = _crawl(vm, "/latest/meta-data/")
    assert tree["instance-id"] == "c" * 32 and tree["local-ipv4"] == "198.18.0.5"
    assert tree["local-hostname"] == "web-1.example.org"
    assert tree["public-keys"] == {"alice@example": KEY + "\n"}
    assert _crawl(vm, "/2009-04-04/meta-data/")["instance-id"] == "c" * 32
    assert metadata.answer(vm, "/latest/user-data") == (200, "#cloud-config\nfoo: 1\n")
    # CloudStack style keys (no trailing slash) and short paths
    assert metadata.answer(vm, "/latest/meta-data/public-keys") == (200, KEY + "\n")
    assert metadata.answer(vm, "/latest/instance-id") == (200, "c" * 32)
    assert "latest" in metadata.answer(vm, "/")[1].splitlines()
    # a VM without userdata or keys
    other = state["vms"]["198.18.0.6"]
    assert metadata.answer(other, "/latest/user-data")[0] == 404
    assert "public-keys/" not in metadata.answer(other, "/latest/meta-data/")[1]
    assert metadata.answer(other, "/latest/meta-data/public-keys")[0] == 404
    # an unknown caller gets nothing
    assert metadata.answer(None, "/latest/meta-data/instance-id")[0] == 404
    assert metadata.answer(vm, "/latest/meta-data/../../etc/passwd")[0] == 404
