"""What the SecurityGroup plugin gives the management node: the security group API (``api.py``),
the SecurityGroup network service provider and the hooks that keep hosts' rules right."""

from __future__ import annotations

from nimbostack.core import hooks
from nimbostack.network.providers import ServiceProvider
from nimbostack.plugins.loader import Plugin
from nimbostack.plugins.security_group import api, service

__all__ = ["PLUGIN", "api"]

PLUGIN = Plugin(
    name="security_group",
    network_providers=(
        ServiceProvider(
            service.PROVIDER_TYPE,
            "SecurityGroup",
            (service.SERVICE,),
            l3_services_changed=(service.on_l3_services_changed,),
        ),
    ),
    vm_start=(hooks.VmStartExtension("security group rules", service.before_start, service.release),),
    host_connect=(service.on_host_connect,),
    nic_change=(service.on_nic_change,),
)
