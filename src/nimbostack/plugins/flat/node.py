"""What the Flat plugin gives the management node."""

from __future__ import annotations

from nimbostack.core import hooks
from nimbostack.network.providers import ServiceProvider
from nimbostack.plugins.flat import eip, service
from nimbostack.plugins.loader import Plugin

service.ENTRY_EXTRAS.append(eip.public_ips)

PLUGIN = Plugin(
    name="flat",
    network_providers=(
        ServiceProvider(
            service.PROVIDER_TYPE,
            "Flat Network Service Provider",
            ("DHCP", "Userdata", "Eip"),
            eip=eip.FlatEip(),
            l3_deleted=(service.on_l3_delete, eip.on_l3_changed),
            l3_services_changed=(service.on_services_changed, eip.on_l3_services_changed),
        ),
    ),
    vm_start=(hooks.VmStartExtension("Flat DHCP, userdata and EIP", eip.on_flat_vm_start, eip.on_flat_vm_stop),),
    host_connect=(service.on_host_connect, eip.on_host_connect),
    tag_change=(service.on_tag_change,),
    nic_change=(service.on_nic_change,),
)
