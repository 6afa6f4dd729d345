"""The <interface> XML the libvirt driver hot-plugs (AttachL3NetworkToVm on a running VM) and how
it finds a plugged NIC again to unplug it."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from nimbostack.agent.drivers.libvirt.domain_xml import build_domain_xml, find_interface, interface_xml
from nimbostack.wire import NicSpec, VmSpec

NIC = NicSpec(
    uuid="0123456789abcdef0123456789abcdef",
    mac="fa:16:3e:00:00:07",
    bridge="br_eth0_100",
    device_id=1,
    ip="198.18.0.7",
    l3_uuid="f" * 32,
    physical_interface="eth0",
    vlan=100,
)


def test_the_hot_plugged_interface_is_a_virtio_nic_on_the_l2_bridge() -> None:
    el = ET.fromstring(interface_xml(NIC))
    assert el.tag == "interface" and el.get("type") == "bridge"
    assert el.find("mac").get("address") == NIC.mac  # type: ignore[union-attr]
    assert el.find("source").get("bridge") == "br_eth0_100"  # type: ignore[union-attr]
    assert el.find("model").get("type") == "virtio"  # type: ignore[union-attr]
    # the tap is named from the NIC uuid, as at a start, so firewall rules find it either way
    assert el.find("target").get("dev") == "vnic01234567"  # type: ignore[union-attr]


def test_a_nic_plugged_live_is_the_device_a_restart_defines() -> None:
    spec = VmSpec(uuid="0" * 31 + "1", name="v", cpu_num=1, memory=64 << 20, disks=[], nics=[NIC])
    domain = ET.fromstring(build_domain_xml(spec, "qemu"))
    defined = find_interface(domain, NIC.mac)
    assert defined is not None
    assert ET.tostring(defined, encoding="unicode") == interface_xml(NIC)


def test_find_interface_matches_the_mac_whatever_its_case() -> None:
    other = NicSpec(uuid="a" * 32, mac="fa:16:3e:00:00:08", bridge="br_eth0", device_id=0)
    spec = VmSpec(uuid="0" * 31 + "2", name="v", cpu_num=1, memory=64 << 20, disks=[], nics=[other, NIC])
    domain = ET.fromstring(build_domain_xml(spec, "qemu"))
    found = find_interface(domain, NIC.mac.upper())
    assert found is not None and found.find("source").get("bridge") == "br_eth0_100"  # type: ignore[union-attr]
    assert find_interface(domain, "fa:16:3e:00:00:09") is None


def test_names_in_the_interface_are_escaped_not_interpreted() -> None:
    hostile = NicSpec(uuid="b" * 32, mac="fa:16:3e:00:00:0a", bridge='br"><evil/>', device_id=2)
    el = ET.fromstring(interface_xml(hostile))
    assert el.find("source").get("bridge") == 'br"><evil/>'  # type: ignore[union-attr]
    assert el.find(".//evil") is None
