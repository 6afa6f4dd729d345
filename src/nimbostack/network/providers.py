"""Network service providers: each declares its services and what implements them, and an L3
network's service is served by the provider attached to it for that service, found here by the
L3's NetworkServiceL3NetworkRef (never by a provider's name)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Select, bindparam, select, union
from sqlalchemy.ext.asyncio import AsyncSession

from nimbostack.db import models as m

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

# (platform, l3 uuid, the hosts that carry the L3 network: hosts_carrying, read before a delete)
L3Hook = Callable[["Platform", str, frozenset[str]], Awaitable[None]]


class EipBackend(Protocol):
    """How a provider serves the EIPs of the L3 networks it is attached to for ``Eip``."""

    async def nic_changed(self, p: Platform, nic_uuid: str) -> None:
        """The EIP of this NIC was created, attached, detached, deleted or changed state (or its
        VIP did): serve what the database now says, where the NIC's VM runs."""
        ...


@dataclass(frozen=True)
class ServiceProvider:
    """A NetworkServiceProvider row's type with its services (seeded on start), and the parts a
    provider implements. A provider listed without them (its plugin not yet written) can be
    attached, but an EIP on it is refused."""

    type: str
    name: str
    services: tuple[str, ...]
    eip: EipBackend | None = None
    # after an L3 network is deleted, and after services are attached to or detached from one
    l3_deleted: tuple[L3Hook, ...] = field(default_factory=tuple)
    l3_services_changed: tuple[L3Hook, ...] = field(default_factory=tuple)


PROVIDERS: dict[str, ServiceProvider] = {}


def register(provider: ServiceProvider) -> None:
    PROVIDERS[provider.type] = provider


def unregister(provider_type: str) -> None:
    PROVIDERS.pop(provider_type, None)


def _attachments(*columns: Any) -> Select[Any]:
    """``columns`` of each (L3 network, service, provider) attachment."""
    return select(*columns).select_from(m.NetworkServiceL3NetworkRef).join(
        m.NetworkServiceProvider,
        m.NetworkServiceProvider.uuid == m.NetworkServiceL3NetworkRef.networkServiceProviderUuid,
    )


# built once (db/engine.py, "Statements built once")
_PROVIDER_OF = _attachments(m.NetworkServiceProvider.type).where(
    m.NetworkServiceL3NetworkRef.l3NetworkUuid == bindparam("l3"),
    m.NetworkServiceL3NetworkRef.networkServiceType == bindparam("service"),
)


def l3s_served_by(provider_type: str, service: str) -> Select[Any]:
    """A subquery of the L3 networks that take ``service`` from providers of ``provider_type``."""
    return _attachments(m.NetworkServiceL3NetworkRef.l3NetworkUuid).where(
        m.NetworkServiceProvider.type == provider_type, m.NetworkServiceL3NetworkRef.networkServiceType == service
    )


async def attached_type(s: AsyncSession, l3_uuid: str, service: str) -> str | None:
    """The type of the provider attached to the L3 network for ``service``; None if none is."""
    return (await s.execute(_PROVIDER_OF, {"l3": l3_uuid, "service": service})).scalars().first()


async def provider_for(s: AsyncSession, l3_uuid: str, service: str) -> ServiceProvider | None:
    """The provider serving ``service`` on the L3 network, if one is attached and registered."""
    kind = await attached_type(s, l3_uuid, service)
    return PROVIDERS.get(kind) if kind else None


# The hosts whose network services an L3 network's change can touch: those of VMs with a NIC on
# it, and those of VMs whose EIP takes its VIP from it. A VM with a host (hostUuid is kept from
# Starting to Stopped) in any state: a superset is harmless, every push is the desired state.
# Both legs go through an index (VmNic.l3NetworkUuid, Vip.l3NetworkUuid), so the work follows
# the L3's VMs, never the platform's hosts.
_HOSTS_CARRYING = union(
    select(m.VmInstance.hostUuid)
    .join(m.VmNic, m.VmNic.vmInstanceUuid == m.VmInstance.uuid)
    .where(m.VmNic.l3NetworkUuid == bindparam("l3"), m.VmInstance.hostUuid.is_not(None)),
    select(m.VmInstance.hostUuid)
    .join(m.VmNic, m.VmNic.vmInstanceUuid == m.VmInstance.uuid)
    .join(m.Eip, m.Eip.vmNicUuid == m.VmNic.uuid)
    .join(m.Vip, m.Vip.uuid == m.Eip.vipUuid)
    .where(m.Vip.l3NetworkUuid == bindparam("l3"), m.VmInstance.hostUuid.is_not(None)),
)


async def hosts_carrying(s: AsyncSession, l3_uuid: str) -> frozenset[str]:
    """The hosts that carry the L3 network (see _HOSTS_CARRYING). A delete reads them before
    the L3's VIPs and EIPs go with it."""
    return frozenset(h for h in (await s.execute(_HOSTS_CARRYING, {"l3": l3_uuid})).scalars() if h)


async def l3_deleted(p: Platform, l3_uuid: str, hosts: frozenset[str]) -> None:
    for provider in list(PROVIDERS.values()):
        for hook in provider.l3_deleted:
            await hook(p, l3_uuid, hosts)


async def l3_services_changed(p: Platform, l3_uuid: str, hosts: frozenset[str]) -> None:
    for provider in list(PROVIDERS.values()):
        for hook in provider.l3_services_changed:
            await hook(p, l3_uuid, hosts)
