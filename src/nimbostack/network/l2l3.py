"""L2 and L3 networks, IP ranges, DNS, network service providers and their attachment."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from sqlalchemy import Row, delete, func, select

from nimbostack.core import query
from nimbostack.core.context import ApiContext, api
from nimbostack.core.errors import invalid, not_allowed, not_found
from nimbostack.core.resources import (
    Scope,
    add_creation_tags,
    capacity_scope,
    change_state,
    disown,
    inv,
    load,
    new_uuid,
    own,
    register_queries,
    update_fields,
)
from nimbostack.db import models as m
from nimbostack.network import providers

# the L2 network types, each made by its CreateL2<Type> API (GetL2NetworkTypes)
L2_NO_VLAN = "L2NoVlanNetwork"
L2_VLAN = "L2VlanNetwork"
L2_NETWORK_TYPES = (L2_NO_VLAN, L2_VLAN)

# --- inventories with composite fields ---------------------------------------------------------


async def _l2_extra(s: Any, rows: Any, invs: list[dict[str, Any]]) -> None:
    uuids = [r.uuid for r in rows]
    refs = (
        await s.execute(select(m.L2NetworkClusterRef).where(m.L2NetworkClusterRef.l2NetworkUuid.in_(uuids)))
    ).scalars()
    by: dict[str, list[str]] = {}
    for ref in refs:
        by.setdefault(ref.l2NetworkUuid, []).append(ref.clusterUuid)
    for row, out in zip(rows, invs, strict=True):
        out["attachedClusterUuids"] = by.get(row.uuid, [])
        if row.type == L2_VLAN:
            out["vlan"] = row.vlan
        else:
            out.pop("vlan", None)


async def _l3_extra(s: Any, rows: Any, invs: list[dict[str, Any]]) -> None:
    uuids = [r.uuid for r in rows]
    dns: dict[str, list[str]] = {}
    for d in (
        await s.execute(
            select(m.L3NetworkDns).where(m.L3NetworkDns.l3NetworkUuid.in_(uuids)).order_by(m.L3NetworkDns.id)
        )
    ).scalars():
        dns.setdefault(d.l3NetworkUuid, []).append(d.dns)
    ranges: dict[str, list[dict[str, Any]]] = {}
    ipr_rows = (await s.execute(select(m.IpRange).where(m.IpRange.l3NetworkUuid.in_(uuids)))).scalars().all()
    for r, out in zip(
        ipr_rows, await query.inventories(s, query.TARGETS["QueryObjectIpRangeInventory"], ipr_rows), strict=True
    ):
        ranges.setdefault(r.l3NetworkUuid, []).append(out)
    services: dict[str, list[dict[str, Any]]] = {}
    for ref in (
        await s.execute(
            select(m.NetworkServiceL3NetworkRef)
            .where(m.NetworkServiceL3NetworkRef.l3NetworkUuid.in_(uuids))
            .order_by(m.NetworkServiceL3NetworkRef.id)
        )
    ).scalars():
        services.setdefault(ref.l3NetworkUuid, []).append(_service_ref(ref))
    for row, out in zip(rows, invs, strict=True):
        out["dns"] = dns.get(row.uuid, [])
        out["ipRanges"] = ranges.get(row.uuid, [])
        out["networkServices"] = services.get(row.uuid, [])


def _service_ref(ref: m.NetworkServiceL3NetworkRef) -> dict[str, Any]:
    return {
        "l3NetworkUuid": ref.l3NetworkUuid,
        "networkServiceProviderUuid": ref.networkServiceProviderUuid,
        "networkServiceType": ref.networkServiceType,
    }


async def _nsp_extra(s: Any, rows: Any, invs: list[dict[str, Any]]) -> None:
    uuids = [r.uuid for r in rows]
    types: dict[str, list[str]] = {}
    for t in (
        await s.execute(
            select(m.NetworkServiceType)
            .where(m.NetworkServiceType.networkServiceProviderUuid.in_(uuids))
            .order_by(m.NetworkServiceType.id)
        )
    ).scalars():
        types.setdefault(t.networkServiceProviderUuid, []).append(t.type)
    l2s: dict[str, list[str]] = {}
    for ref in (
        await s.execute(
            select(m.NetworkServiceProviderL2NetworkRef).where(
                m.NetworkServiceProviderL2NetworkRef.networkServiceProviderUuid.in_(uuids)
            )
        )
    ).scalars():
        l2s.setdefault(ref.networkServiceProviderUuid, []).append(ref.l2NetworkUuid)
    for row, out in zip(rows, invs, strict=True):
        out["networkServiceTypes"] = types.get(row.uuid, [])
        out["attachedL2NetworkUuids"] = l2s.get(row.uuid, [])


_NSP_FIELDS = ["uuid", "name", "description", "type", "createDate", "lastOpDate"]


class _NspTarget(query.QueryTarget):
    def fields(self) -> list[str]:
        return _NSP_FIELDS


query.register(
    query.QueryTarget(
        "QueryObjectL2NetworkInventory",
        m.L2Network,
        "L2VlanNetworkInventory",
        scope="public",
        extra=_l2_extra,
        joins={
            "zone": query.Join("zoneUuid", "QueryObjectZoneInventory", "uuid"),
            "l3Network": query.Join("uuid", "QueryObjectL3NetworkInventory", "l2NetworkUuid"),
        },
    )
)
query.register(
    query.QueryTarget(
        "QueryObjectL2VlanNetworkInventory",
        m.L2Network,
        "L2VlanNetworkInventory",
        scope="public",
        extra=_l2_extra,
        base_filter=lambda: m.L2Network.type == L2_VLAN,
        joins={"zone": query.Join("zoneUuid", "QueryObjectZoneInventory", "uuid")},
    )
)
query.register(
    query.QueryTarget(
        "QueryObjectL3NetworkInventory",
        m.L3Network,
        "L3NetworkInventory",
        scope="public",
        extra=_l3_extra,
        joins={
            "zone": query.Join("zoneUuid", "QueryObjectZoneInventory", "uuid"),
            "l2Network": query.Join("l2NetworkUuid", "QueryObjectL2NetworkInventory", "uuid"),
            "ipRanges": query.Join("uuid", "QueryObjectIpRangeInventory", "l3NetworkUuid"),
            "networkServices": query.Join("uuid", "QueryObjectNetworkServiceL3NetworkRefInventory", "l3NetworkUuid"),
            "vmNic": query.Join("uuid", "QueryObjectVmNicInventory", "l3NetworkUuid"),
        },
    )
)
query.register(
    query.QueryTarget(
        "QueryObjectIpRangeInventory",
        m.IpRange,
        "IpRangeInventory",
        scope="public",
        joins={"l3Network": query.Join("l3NetworkUuid", "QueryObjectL3NetworkInventory", "uuid")},
    )
)
query.register(
    _NspTarget("QueryObjectNetworkServiceProviderInventory", m.NetworkServiceProvider, scope="public", extra=_nsp_extra)
)
query.register(
    query.QueryTarget(
        "QueryObjectNetworkServiceL3NetworkRefInventory",
        m.NetworkServiceL3NetworkRef,
        scope="public",
        joins={
            "l3Network": query.Join("l3NetworkUuid", "QueryObjectL3NetworkInventory", "uuid"),
            "serviceProvider": query.Join(
                "networkServiceProviderUuid", "QueryObjectNetworkServiceProviderInventory", "uuid"
            ),
        },
    )
)
register_queries(
    "QueryL2Network",
    "QueryL2VlanNetwork",
    "QueryL3Network",
    "QueryIpRange",
    "QueryNetworkServiceProvider",
    "QueryNetworkServiceL3NetworkRef",
)

# --- providers ---------------------------------------------------------------------------------

# Providers whose plugins are not written yet: their rows exist (ZStack lists them), attaching them
# is recorded, and what needs their implementation (an EIP) is refused.
providers.register(
    providers.ServiceProvider(
        "VirtualRouter", "VirtualRouter", ("DHCP", "DNS", "SNAT", "PortForwarding", "Eip", "LoadBalancer")
    )
)
providers.register(providers.ServiceProvider("SecurityGroup", "SecurityGroup", ("SecurityGroup",)))


async def seed_providers(db: Any) -> None:
    """A NetworkServiceProvider row for each registered provider (plugins register theirs)."""
    async with db.tx() as s:
        have = set((await s.execute(select(m.NetworkServiceProvider.type))).scalars())
        for ptype, provider in providers.PROVIDERS.items():
            if ptype in have:
                continue
            uuid = new_uuid()
            s.add(m.NetworkServiceProvider(uuid=uuid, name=provider.name, description=provider.name, type=ptype))
            for t in provider.services:
                s.add(m.NetworkServiceType(networkServiceProviderUuid=uuid, type=t))


@api("GetNetworkServiceTypes")
async def get_network_service_types(ctx: ApiContext) -> dict[str, Any]:
    """Each network service type, and the types of the providers that serve it."""
    async with ctx.p.db.tx() as s:
        rows = (
            await s.execute(
                select(m.NetworkServiceType.type, m.NetworkServiceProvider.type)
                .join(m.NetworkServiceProvider,
                      m.NetworkServiceProvider.uuid == m.NetworkServiceType.networkServiceProviderUuid)
                .order_by(m.NetworkServiceType.id)
            )
        ).all()
    out: dict[str, list[str]] = {}
    for service, provider in rows:
        out.setdefault(service, []).append(provider)
    return {"serviceAndProviderTypes": out}


# --- L2 ----------------------------------------------------------------------------------------

_IFNAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def _interface(name: str) -> str:
    # reaches `ip link` and bridge names on hosts: keep it to what Linux allows, nothing a shell would read
    if not name or len(name) > 15 or not set(name) <= _IFNAME_OK:
        raise invalid(f"physicalInterface {name!r} must be a Linux interface name (1-15 of [A-Za-z0-9_.-])")
    return name


async def _create_l2(ctx: ApiContext, type_: str, vlan: int | None) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        zone = await load(s, m.Zone, ctx.req("zoneUuid"), ctx, "Zone")
        row = m.L2Network(
            uuid=new_uuid(ctx),
            name=ctx.req("name"),
            description=ctx.str("description"),
            zoneUuid=zone.uuid,
            physicalInterface=_interface(ctx.req("physicalInterface")),
            type=type_,
            vlan=vlan,
        )
        s.add(row)
        await add_creation_tags(s, ctx, row.uuid, "L2NetworkVO")
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectL2NetworkInventory", row)}


@api("CreateL2NoVlanNetwork", admin=True)
async def create_l2_novlan(ctx: ApiContext) -> dict[str, Any]:
    return await _create_l2(ctx, L2_NO_VLAN, None)


@api("CreateL2VlanNetwork", admin=True)
async def create_l2_vlan(ctx: ApiContext) -> dict[str, Any]:
    vlan = ctx.int("vlan", minimum=1)
    if vlan is None or vlan > 4094:
        raise invalid("vlan must be between 1 and 4094")
    return await _create_l2(ctx, L2_VLAN, vlan)


@api("GetL2NetworkTypes")
async def get_l2_network_types(ctx: ApiContext) -> dict[str, Any]:
    return {"l2NetworkTypes": list(L2_NETWORK_TYPES)}


@api("AttachL2NetworkToCluster", admin=True)
async def attach_l2_to_cluster(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        l2 = await load(s, m.L2Network, ctx.req("l2NetworkUuid"), ctx, "L2Network")
        cluster = await load(s, m.Cluster, ctx.req("clusterUuid"), ctx, "Cluster")
        if l2.zoneUuid != cluster.zoneUuid:
            raise invalid("the L2 network and the cluster are in different zones")
        exists = (
            await s.execute(
                select(m.L2NetworkClusterRef).where(
                    m.L2NetworkClusterRef.l2NetworkUuid == l2.uuid, m.L2NetworkClusterRef.clusterUuid == cluster.uuid
                )
            )
        ).first()
        if not exists:
            s.add(m.L2NetworkClusterRef(l2NetworkUuid=l2.uuid, clusterUuid=cluster.uuid))
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectL2NetworkInventory", l2)}


@api("DetachL2NetworkFromCluster", admin=True)
async def detach_l2_from_cluster(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        l2 = await load(s, m.L2Network, ctx.req("l2NetworkUuid"), ctx, "L2Network")
        await s.execute(
            delete(m.L2NetworkClusterRef).where(
                m.L2NetworkClusterRef.l2NetworkUuid == l2.uuid,
                m.L2NetworkClusterRef.clusterUuid == ctx.req("clusterUuid"),
            )
        )
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectL2NetworkInventory", l2)}


@api("DeleteL2Network", admin=True)
async def delete_l2(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        l2 = await load(s, m.L2Network, ctx.req("uuid"), ctx, "L2Network")
        n = (
            await s.execute(select(func.count()).select_from(m.L3Network).where(m.L3Network.l2NetworkUuid == l2.uuid))
        ).scalar_one()
        if n:
            raise not_allowed(f"L2 network {l2.uuid} still has {n} L3 networks; delete them first")
        await s.delete(l2)
        await disown(s, [l2.uuid])
    return {}


# --- L3 ----------------------------------------------------------------------------------------

_DOMAIN = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def _dns_domain(value: str | None) -> str | None:
    # handed to DHCP servers on hosts (dnsmasq's domain option): a DNS name and nothing else
    if value and (len(value) > 253 or not _DOMAIN.fullmatch(value)):
        raise invalid(f"dnsDomain {value[:80]!r} is not a DNS domain name")
    return value


@api("CreateL3Network")
async def create_l3(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        l2 = await load(s, m.L2Network, ctx.req("l2NetworkUuid"), ctx, "L2Network")
        row = m.L3Network(
            uuid=new_uuid(ctx),
            name=ctx.req("name"),
            description=ctx.str("description"),
            type=ctx.str("type", "L3BasicNetwork"),
            zoneUuid=l2.zoneUuid,
            l2NetworkUuid=l2.uuid,
            dnsDomain=_dns_domain(ctx.str("dnsDomain")),
            system=ctx.bool("system"),
        )
        s.add(row)
        await own(s, ctx, row.uuid, "L3NetworkVO")
        await add_creation_tags(s, ctx, row.uuid, "L3NetworkVO")
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectL3NetworkInventory", row)}


@api("UpdateL3Network")
async def update_l3(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        row = await load(s, m.L3Network, ctx.req("uuid"), ctx, "L3Network", owned=True)
        _dns_domain(ctx.str("dnsDomain"))
        update_fields(row, ctx)
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectL3NetworkInventory", row)}


@api("ChangeL3NetworkState")
async def change_l3_state(ctx: ApiContext) -> dict[str, Any]:
    return await change_state(ctx, m.L3Network, "L3Network", "QueryObjectL3NetworkInventory")


@api("DeleteL3Network")
async def delete_l3(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        row = await load(s, m.L3Network, ctx.req("uuid"), ctx, "L3Network", owned=True)
        n = (
            await s.execute(select(func.count()).select_from(m.VmNic).where(m.VmNic.l3NetworkUuid == row.uuid))
        ).scalar_one()
        if n:
            raise not_allowed(f"L3 network {row.uuid} still has {n} VM NICs; destroy those VMs first")
        hosts = await providers.hosts_carrying(s, row.uuid)  # before its VIPs and EIPs go with it
        await s.execute(delete(m.UsedIp).where(m.UsedIp.l3NetworkUuid == row.uuid))
        await s.delete(row)
        await disown(s, [row.uuid])
    await providers.l3_deleted(ctx.p, row.uuid, hosts)
    return {}


def _ip(name: str, value: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:
        raise invalid(f"{name} {value!r} is not an IPv4 address") from None


def _check_range(start: str, end: str, netmask: str, gateway: str) -> str:
    a, b, gw = _ip("startIp", start), _ip("endIp", end), _ip("gateway", gateway)
    try:
        net = ipaddress.IPv4Network(f"{start}/{netmask}", strict=False)
    except ValueError:
        raise invalid(f"netmask {netmask!r} is not a valid IPv4 netmask") from None
    if a > b:
        raise invalid(f"startIp {start} is after endIp {end}")
    if b not in net or gw not in net:
        raise invalid(f"endIp {end} and gateway {gateway} must be in the network {net}")
    if a == net.network_address or b == net.broadcast_address:
        raise invalid(f"the range must not include the network ({net.network_address}) or broadcast address")
    return str(net)


async def _add_range(ctx: ApiContext, start: str, end: str, netmask: str, gateway: str) -> dict[str, Any]:
    cidr = _check_range(start, end, netmask, gateway)
    async with ctx.p.db.tx() as s:
        l3 = await load(s, m.L3Network, ctx.req("l3NetworkUuid"), ctx, "L3Network", owned=True)
        lo, hi = int(_ip("startIp", start)), int(_ip("endIp", end))
        for r in (await s.execute(select(m.IpRange).where(m.IpRange.l3NetworkUuid == l3.uuid))).scalars():
            if lo <= int(ipaddress.IPv4Address(r.endIp)) and int(ipaddress.IPv4Address(r.startIp)) <= hi:
                raise invalid(f"the range {start}-{end} overlaps the range {r.name} ({r.startIp}-{r.endIp})")
            if r.gateway != gateway or r.netmask != netmask:
                raise invalid(
                    f"every range of L3 network {l3.uuid} must share gateway {r.gateway} and netmask {r.netmask}"
                )
        row = m.IpRange(
            uuid=new_uuid(ctx),
            name=ctx.req("name"),
            description=ctx.str("description"),
            l3NetworkUuid=l3.uuid,
            startIp=start,
            endIp=end,
            netmask=netmask,
            gateway=gateway,
            networkCidr=cidr,
        )
        s.add(row)
        await own(s, ctx, row.uuid, "IpRangeVO")
        await add_creation_tags(s, ctx, row.uuid, "IpRangeVO")
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectIpRangeInventory", row)}


@api("AddIpRange")
async def add_ip_range(ctx: ApiContext) -> dict[str, Any]:
    return await _add_range(ctx, ctx.req("startIp"), ctx.req("endIp"), ctx.req("netmask"), ctx.req("gateway"))


@api("AddIpRangeByNetworkCidr")
async def add_ip_range_by_cidr(ctx: ApiContext) -> dict[str, Any]:
    try:
        net = ipaddress.IPv4Network(ctx.req("networkCidr"), strict=False)
    except ValueError:
        raise invalid(f"networkCidr {ctx.req('networkCidr')!r} is not an IPv4 CIDR") from None
    if net.num_addresses < 4:
        raise invalid("networkCidr must hold at least 4 addresses")
    hosts = list(net.hosts()) if net.num_addresses <= 1024 else None
    first = hosts[0] if hosts else net.network_address + 1
    last = hosts[-1] if hosts else net.broadcast_address - 1
    return await _add_range(ctx, str(first + 1), str(last), str(net.netmask), str(first))


@api("DeleteIpRange")
async def delete_ip_range(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        row = await load(s, m.IpRange, ctx.req("uuid"), ctx, "IpRange", owned=True)
        used = (
            await s.execute(select(func.count()).select_from(m.UsedIp).where(m.UsedIp.ipRangeUuid == row.uuid))
        ).scalar_one()
        if used:
            raise not_allowed(f"{used} IPs of range {row.uuid} are in use; destroy those VMs first")
        await s.delete(row)
        await disown(s, [row.uuid])
    return {}


IP_CAPACITY_SCOPES = {
    "zoneUuids": Scope(m.Zone, "Zone", lambda uuids: m.IpRange.l3NetworkUuid.in_(
        select(m.L3Network.uuid).where(m.L3Network.zoneUuid.in_(uuids))
    )),
    "l3NetworkUuids": Scope(m.L3Network, "L3Network", lambda uuids: m.IpRange.l3NetworkUuid.in_(uuids), owned=True),
    "ipRangeUuids": Scope(m.IpRange, "IpRange", lambda uuids: m.IpRange.uuid.in_(uuids), owned=True),
}


@api("GetIpAddressCapacity")
async def ip_address_capacity(ctx: ApiContext) -> dict[str, Any]:
    """Addresses in the IP ranges of some L3 networks, ranges or zones (or ``all``), and how many
    of them are free."""
    async with ctx.p.db.tx() as s:
        ranges = select(m.IpRange).where(*await capacity_scope(s, ctx, IP_CAPACITY_SCOPES))
        rows = (await s.execute(ranges)).scalars().all()
        total = sum(int(ipaddress.ip_address(r.endIp)) - int(ipaddress.ip_address(r.startIp)) + 1 for r in rows)
        used = 0
        if rows:
            used = (
                await s.execute(
                    select(func.count()).select_from(m.UsedIp).where(m.UsedIp.ipRangeUuid.in_([r.uuid for r in rows]))
                )
            ).scalar_one()
    return {"totalCapacity": total, "availableCapacity": total - used}


@api("AddDnsToL3Network")
async def add_dns(ctx: ApiContext) -> dict[str, Any]:
    dns = str(_ip("dns", ctx.req("dns")))
    async with ctx.p.db.tx() as s:
        l3 = await load(s, m.L3Network, ctx.req("l3NetworkUuid"), ctx, "L3Network", owned=True)
        if not (
            await s.execute(
                select(m.L3NetworkDns).where(m.L3NetworkDns.l3NetworkUuid == l3.uuid, m.L3NetworkDns.dns == dns)
            )
        ).first():
            s.add(m.L3NetworkDns(l3NetworkUuid=l3.uuid, dns=dns))
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectL3NetworkInventory", l3)}


@api("RemoveDnsFromL3Network")
async def remove_dns(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        l3 = await load(s, m.L3Network, ctx.req("l3NetworkUuid"), ctx, "L3Network", owned=True)
        await s.execute(
            delete(m.L3NetworkDns).where(m.L3NetworkDns.l3NetworkUuid == l3.uuid, m.L3NetworkDns.dns == ctx.req("dns"))
        )
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectL3NetworkInventory", l3)}


# --- network services --------------------------------------------------------------------------


@api("AttachNetworkServiceProviderToL2Network", admin=True)
async def attach_provider_to_l2(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        nsp = await load(
            s, m.NetworkServiceProvider, ctx.req("networkServiceProviderUuid"), ctx, "NetworkServiceProvider"
        )
        l2 = await load(s, m.L2Network, ctx.req("l2NetworkUuid"), ctx, "L2Network")
        if not (
            await s.execute(
                select(m.NetworkServiceProviderL2NetworkRef).where(
                    m.NetworkServiceProviderL2NetworkRef.networkServiceProviderUuid == nsp.uuid,
                    m.NetworkServiceProviderL2NetworkRef.l2NetworkUuid == l2.uuid,
                )
            )
        ).first():
            s.add(m.NetworkServiceProviderL2NetworkRef(networkServiceProviderUuid=nsp.uuid, l2NetworkUuid=l2.uuid))
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectNetworkServiceProviderInventory", nsp)}


@api("DetachNetworkServiceProviderFromL2Network", admin=True)
async def detach_provider_from_l2(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        nsp = await load(
            s, m.NetworkServiceProvider, ctx.req("networkServiceProviderUuid"), ctx, "NetworkServiceProvider"
        )
        await s.execute(
            delete(m.NetworkServiceProviderL2NetworkRef).where(
                m.NetworkServiceProviderL2NetworkRef.networkServiceProviderUuid == nsp.uuid,
                m.NetworkServiceProviderL2NetworkRef.l2NetworkUuid == ctx.req("l2NetworkUuid"),
            )
        )
        await s.flush()
        return {"inventory": await inv(s, "QueryObjectNetworkServiceProviderInventory", nsp)}


async def _services(s: Any, ctx: ApiContext) -> dict[str, list[str]]:
    raw = ctx.dict("networkServices")
    out: dict[str, list[str]] = {}
    for provider_uuid, types in raw.items():
        nsp = await s.get(m.NetworkServiceProvider, provider_uuid)
        if nsp is None:
            raise not_found("NetworkServiceProvider", provider_uuid)
        types = [types] if isinstance(types, str) else types
        offered = set(
            (
                await s.execute(
                    select(m.NetworkServiceType.type).where(m.NetworkServiceType.networkServiceProviderUuid == nsp.uuid)
                )
            ).scalars()
        )
        bad = [t for t in types if t not in offered]
        if bad:
            raise invalid(
                f"provider {nsp.name} does not offer {', '.join(map(str, bad))}; it offers {', '.join(sorted(offered))}"
            )
        out[nsp.uuid] = [str(t) for t in types]
    return out


@api("AttachNetworkServiceToL3Network")
async def attach_services(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        l3 = await load(s, m.L3Network, ctx.req("l3NetworkUuid"), ctx, "L3Network", owned=True)
        for provider_uuid, types in (await _services(s, ctx)).items():
            attached = (
                await s.execute(
                    select(m.NetworkServiceProviderL2NetworkRef).where(
                        m.NetworkServiceProviderL2NetworkRef.networkServiceProviderUuid == provider_uuid,
                        m.NetworkServiceProviderL2NetworkRef.l2NetworkUuid == l3.l2NetworkUuid,
                    )
                )
            ).first()
            if not attached:
                raise not_allowed(
                    f"provider {provider_uuid} is not attached to L2 network {l3.l2NetworkUuid}; "
                    "call AttachNetworkServiceProviderToL2Network first"
                )
            for t in types:
                current = (
                    await s.execute(
                        select(m.NetworkServiceL3NetworkRef).where(
                            m.NetworkServiceL3NetworkRef.l3NetworkUuid == l3.uuid,
                            m.NetworkServiceL3NetworkRef.networkServiceType == t,
                        )
                    )
                ).scalar_one_or_none()
                if current is not None and current.networkServiceProviderUuid != provider_uuid:
                    raise not_allowed(
                        f"service {t} of L3 network {l3.uuid} is provided by "
                        f"{current.networkServiceProviderUuid}; detach it first"
                    )
                if current is None:
                    s.add(
                        m.NetworkServiceL3NetworkRef(
                            l3NetworkUuid=l3.uuid, networkServiceProviderUuid=provider_uuid, networkServiceType=t
                        )
                    )
        await s.flush()
        out = {"inventory": await inv(s, "QueryObjectL3NetworkInventory", l3)}
        hosts = await providers.hosts_carrying(s, l3.uuid)
    await providers.l3_services_changed(ctx.p, l3.uuid, hosts)
    return out


@api("DetachNetworkServiceFromL3Network")
async def detach_services(ctx: ApiContext) -> dict[str, Any]:
    async with ctx.p.db.tx() as s:
        l3 = await load(s, m.L3Network, ctx.req("l3NetworkUuid"), ctx, "L3Network", owned=True)
        for provider_uuid, types in (await _services(s, ctx)).items():
            await s.execute(
                delete(m.NetworkServiceL3NetworkRef).where(
                    m.NetworkServiceL3NetworkRef.l3NetworkUuid == l3.uuid,
                    m.NetworkServiceL3NetworkRef.networkServiceProviderUuid == provider_uuid,
                    m.NetworkServiceL3NetworkRef.networkServiceType.in_(types),
                )
            )
        await s.flush()
        out = {"inventory": await inv(s, "QueryObjectL3NetworkInventory", l3)}
        hosts = await providers.hosts_carrying(s, l3.uuid)
    await providers.l3_services_changed(ctx.p, l3.uuid, hosts)
    return out


@api("QueryVirtualRouterVm")
async def query_virtual_router_vm(ctx: ApiContext) -> dict[str, Any]:
    # The virtual router appliance is not built yet, so there is never one to list.
    return {"inventories": [], **({"total": 0} if ctx.bool("count") or ctx.bool("replyWithCount") else {})}


BRIDGE_PREFIX = "bridge::"


def bridge_name(l2: m.L2Network | Row[Any], tags: list[str]) -> str:
    """The Linux bridge an L2 network's NICs join on a host: ``bridge::NAME``, else br_IF[_VLAN].
    ``l2``: the network, or a row with its physicalInterface and vlan."""
    return bridge_of(l2, next((t for t in tags if t.startswith(BRIDGE_PREFIX)), None))


def bridge_of(l2: m.L2Network | Row[Any], bridge_tag: str | None) -> str:
    """``bridge_name`` given the network's ``bridge::`` tag alone (BRIDGE_TAG), not all its tags."""
    explicit = bridge_tag[len(BRIDGE_PREFIX) :] if bridge_tag else None
    if explicit:
        return explicit
    name = f"br_{l2.physicalInterface}" + (f"_{l2.vlan}" if l2.vlan else "")
    return name[:15]


# An L2 network's bridge:: tag (None without one), as a column of a statement that selects from
# l2_network: every VM start reads it with the network, not by a statement of its own.
BRIDGE_TAG = (
    select(m.SystemTag.tag)
    .where(
        m.SystemTag.resourceUuid == m.L2Network.uuid,
        func.substr(m.SystemTag.tag, 1, len(BRIDGE_PREFIX)) == BRIDGE_PREFIX,
    )
    .limit(1)
    .scalar_subquery()
    .label("bridgeTag")
)
