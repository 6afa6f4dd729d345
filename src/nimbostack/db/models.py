"""The schema. Column names are the spec's inventory field names (camelCase) on purpose:
an inventory is then a projection of a row, and a query condition names a column directly."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

UUID = String(32)


class Base(DeclarativeBase):
    pass


class Stamped:
    createDate: Mapped[datetime] = mapped_column(DateTime, server_default=func.now(), default=datetime.utcnow)
    lastOpDate: Mapped[datetime] = mapped_column(
        DateTime, server_default=func.now(), default=datetime.utcnow, onupdate=datetime.utcnow
    )


class Resource(Stamped):
    uuid: Mapped[str] = mapped_column(UUID, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), default="", index=True)
    description: Mapped[str | None] = mapped_column(String(2048), nullable=True)


# --- identity -----------------------------------------------------------------------------


class Account(Base, Resource):
    __tablename__ = "account"
    type: Mapped[str] = mapped_column(String(32), default="Normal")
    passwordHash: Mapped[str] = mapped_column(String(255))
    __table_args__ = (UniqueConstraint("name"),)


class Session(Base):
    __tablename__ = "session"
    uuid: Mapped[str] = mapped_column(UUID, primary_key=True)
    accountUuid: Mapped[str] = mapped_column(UUID, ForeignKey("account.uuid", ondelete="CASCADE"), index=True)
    userUuid: Mapped[str] = mapped_column(UUID)
    expiredDate: Mapped[datetime] = mapped_column(DateTime, index=True)
    createDate: Mapped[datetime] = mapped_column(DateTime, default=datetime.utcnow)


class AccountResourceRef(Base, Stamped):
    __tablename__ = "account_resource_ref"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    accountUuid: Mapped[str] = mapped_column(UUID, index=True)
    ownerAccountUuid: Mapped[str] = mapped_column(UUID)
    resourceUuid: Mapped[str] = mapped_column(UUID, unique=True)
    resourceType: Mapped[str] = mapped_column(String(64))
    permission: Mapped[int] = mapped_column(Integer, default=2)
    isShared: Mapped[bool] = mapped_column(Boolean, default=False)
    __table_args__ = (Index("ix_arr_account_type", "accountUuid", "resourceType"),)


# --- core ---------------------------------------------------------------------------------


class GlobalConfig(Base):
    __tablename__ = "global_config"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    category: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(128))
    description: Mapped[str] = mapped_column(String(2048), default="")
    defaultValue: Mapped[str] = mapped_column(Text)
    value: Mapped[str] = mapped_column(Text)
    __table_args__ = (UniqueConstraint("category", "name"),)


class SystemTag(Base, Stamped):
    __tablename__ = "system_tag"
    uuid: Mapped[str] = mapped_column(UUID, primary_key=True)
    resourceUuid: Mapped[str] = mapped_column(UUID, index=True)
    resourceType: Mapped[str] = mapped_column(String(64))
    tag: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(32), default="System")
    inherent: Mapped[bool] = mapped_column(Boolean, default=False)


class UserTag(Base, Stamped):
    __tablename__ = "user_tag"
    uuid: Mapped[str] = mapped_column(UUID, primary_key=True)
    resourceUuid: Mapped[str] = mapped_column(UUID, index=True)
    resourceType: Mapped[str] = mapped_column(String(64))
    tag: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(32), default="User")


class Job(Base):
    """An API call accepted as Processing; its result stays queryable after it is Done."""

    __tablename__ = "job"
    uuid: Mapped[str] = mapped_column(UUID, primary_key=True)
    apiName: Mapped[str] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16), index=True)  # Processing | Done
    result: Mapped[str | None] = mapped_column(Text, nullable=True)
    progress: Mapped[str | None] = mapped_column(String(64), nullable=True)  # e.g. "42%" while downloading
    createDate: Mapped[datetime] = mapped_column(DateTime, default=datetime.utcnow)
    deadline: Mapped[datetime] = mapped_column(DateTime)
    # the uuid of what a creation makes (its resourceUuid): recovery answers a job a dead node left
    # by what became of that resource
    resourceUuid: Mapped[str | None] = mapped_column(UUID, nullable=True)


class GarbageCollector(Base, Stamped):
    """Host-side work a user operation could not finish because the agent was unreachable
    (destroy a domain, delete a file); re-run when the host reconnects or by the periodic poll."""

    __tablename__ = "garbage_collector"
    uuid: Mapped[str] = mapped_column(UUID, primary_key=True)
    name: Mapped[str] = mapped_column(String(255))  # e.g. destroy-vm, delete-volume-file
    # the agent to call: a host, or a backup storage kept by an agent
    hostUuid: Mapped[str] = mapped_column(UUID, index=True)
    resourceUuid: Mapped[str | None] = mapped_column(UUID, nullable=True, index=True)
    path: Mapped[str] = mapped_column(String(255))  # agent command, e.g. /vm/destroy
    body: Mapped[str] = mapped_column(Text)  # JSON body of the command
    status: Mapped[str] = mapped_column(String(16), default="Pending", index=True)  # Pending | Done
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)  # why deferred; then the last failure
    attempts: Mapped[int] = mapped_column(Integer, default=0)


class ManagementNode(Base):
    """A management node on this database: its row is written when it starts, its heartBeat
    renewed while it runs, and the row removed when it stops (or, by the others, when it stops
    beating)."""

    __tablename__ = "management_node"
    uuid: Mapped[str] = mapped_column(UUID, primary_key=True)
    hostName: Mapped[str] = mapped_column(String(255))
    joinDate: Mapped[datetime] = mapped_column(DateTime, default=datetime.utcnow)
    heartBeat: Mapped[datetime] = mapped_column(DateTime, default=datetime.utcnow, index=True)


class ConsoleProxyAgent(Base, Stamped):
    """A management node's console proxy (its /console/ws route), as QueryConsoleProxyAgent shows
    it. The uuid comes from the address the browsers reach the proxy at, so a node that restarts
    finds its row again."""

    __tablename__ = "console_proxy_agent"
    uuid: Mapped[str] = mapped_column(UUID, primary_key=True)
    managementIp: Mapped[str] = mapped_column(String(255))
    description: Mapped[str] = mapped_column(String(2048), default="")
    type: Mapped[str] = mapped_column(String(64), default="ManagementServerConsoleProxy")
    state: Mapped[str] = mapped_column(String(32), default="Enabled")
    status: Mapped[str] = mapped_column(String(32), default="Connecting")


class ConsoleProxy(Base, Stamped):
    """One console access RequestConsoleAccess granted: only the SHA-256 of its one-time token is
    kept (a reader of the database gets no working token), with the VM it opens and when it
    expires. ``status`` is Active until the token's first use turns it Used."""

    __tablename__ = "console_proxy"
    uuid: Mapped[str] = mapped_column(UUID, primary_key=True)
    vmInstanceUuid: Mapped[str] = mapped_column(UUID, index=True)
    tokenHash: Mapped[str] = mapped_column(String(64), unique=True)
    agentUuid: Mapped[str] = mapped_column(UUID)
    status: Mapped[str] = mapped_column(String(32), default="Active")
    expireDate: Mapped[datetime] = mapped_column(DateTime, index=True)


# --- compute ------------------------------------------------------------------------------


class Zone(Base, Resource):
    __tablename__ = "zone"
    state: Mapped[str] = mapped_column(String(32), default="Enabled")
    type: Mapped[str] = mapped_column(String(32), default="zstack")


class Cluster(Base, Resource):
    __tablename__ = "cluster"
    zoneUuid: Mapped[str] = mapped_column(UUID, ForeignKey("zone.uuid"), index=True)
    state: Mapped[str] = mapped_column(String(32), default="Enabled")
    hypervisorType: Mapped[str] = mapped_column(String(32))
    type: Mapped[str] = mapped_column(String(32), default="zstack")


class Host(Base, Resource):
    __tablename__ = "host"
    zoneUuid: Mapped[str] = mapped_column(UUID, ForeignKey("zone.uuid"), index=True)
    clusterUuid: Mapped[str] = mapped_column(UUID, ForeignKey("cluster.uuid"), index=True)
    managementIp: Mapped[str] = mapped_column(String(255))
    hypervisorType: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(32), default="Enabled")
    status: Mapped[str] = mapped_column(String(32), default="Connecting", index=True)
    totalCpuCapacity: Mapped[int] = mapped_column(BigInteger, default=0)
    availableCpuCapacity: Mapped[int] = mapped_column(BigInteger, default=0, index=True)
    totalMemoryCapacity: Mapped[int] = mapped_column(BigInteger, default=0)
    availableMemoryCapacity: Mapped[int] = mapped_column(BigInteger, default=0, index=True)
    # KVM
    username: Mapped[str | None] = mapped_column(String(255), nullable=True)
    password: Mapped[str | None] = mapped_column(String(255), nullable=True)
    sshPort: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # where the host's agent listens; derived at add time, kept so it can change per host
    agentUrl: Mapped[str] = mapped_column(String(512), default="")
    cpuNum: Mapped[int] = mapped_column(Integer, default=0)
    cpuSpeed: Mapped[int] = mapped_column(Integer, default=0)
    # capacity declared by AddSimulatorHost
    simCpuCapacity: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    simMemoryCapacity: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # the CPU model the agent reported at connect; live migration compares it (kvm vm.cpuMode)
    cpuModel: Mapped[str | None] = mapped_column(String(255), nullable=True)


class InstanceOffering(Base, Resource):
    __tablename__ = "instance_offering"
    cpuNum: Mapped[int] = mapped_column(Integer)
    cpuSpeed: Mapped[int] = mapped_column(Integer)
    memorySize: Mapped[int] = mapped_column(BigInteger)
    type: Mapped[str] = mapped_column(String(32), default="UserVm")
    allocatorStrategy: Mapped[str] = mapped_column(String(64), default="DefaultHostAllocatorStrategy")
    sortKey: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(32), default="Enabled")


class DiskOffering(Base, Resource):
    __tablename__ = "disk_offering"
    diskSize: Mapped[int] = mapped_column(BigInteger)
    sortKey: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(32), default="Enabled")
    type: Mapped[str] = mapped_column(String(32), default="zstack")
    allocatorStrategy: Mapped[str] = mapped_column(String(64), default="DefaultPrimaryStorageAllocationStrategy")


class VmInstance(Base, Resource):
    __tablename__ = "vm_instance"
    zoneUuid: Mapped[str | None] = mapped_column(UUID, nullable=True, index=True)
    clusterUuid: Mapped[str | None] = mapped_column(UUID, nullable=True, index=True)
    imageUuid: Mapped[str] = mapped_column(UUID, index=True)
    hostUuid: Mapped[str | None] = mapped_column(UUID, nullable=True, index=True)
    lastHostUuid: Mapped[str | None] = mapped_column(UUID, nullable=True)
    instanceOfferingUuid: Mapped[str] = mapped_column(UUID, index=True)
    rootVolumeUuid: Mapped[str | None] = mapped_column(UUID, nullable=True)
    platform: Mapped[str] = mapped_column(String(32), default="Linux")
    defaultL3NetworkUuid: Mapped[str | None] = mapped_column(UUID, nullable=True)
    type: Mapped[str] = mapped_column(String(32), default="UserVm")
    hypervisorType: Mapped[str | None] = mapped_column(String(32), nullable=True)
    memorySize: Mapped[int] = mapped_column(BigInteger)
    cpuNum: Mapped[int] = mapped_column(Integer)
    cpuSpeed: Mapped[int] = mapped_column(Integer)
    allocatorStrategy: Mapped[str] = mapped_column(String(64), default="DefaultHostAllocatorStrategy")
    state: Mapped[str] = mapped_column(String(32), index=True)
    internalId: Mapped[int] = mapped_column(BigInteger, default=0)
    # "HardDisk,CdRom"; CdRom first for VMs created from an ISO until they reboot after install
    bootOrder: Mapped[str] = mapped_column(String(64), default="HardDisk")
    isoUuid: Mapped[str | None] = mapped_column(UUID, nullable=True)
    # when the VM was destroyed, for the expunger
    destroyDate: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # a Destroyed VM's NICs as JSON [{l3NetworkUuid, ip, mac, deviceId}]: RecoverVmInstance rebuilds them
    destroyedNics: Mapped[str | None] = mapped_column(Text, nullable=True)
    # "the Running VMs of a host" (queries, capacity, Flat): with only the one-column indexes SQLite
    # read every VM in that state (all of them, in a busy cloud) to find one host's
    __table_args__ = (Index("ix_vm_instance_host_state", "hostUuid", "state"),)


class VmNic(Base, Stamped):
    __tablename__ = "vm_nic"
    uuid: Mapped[str] = mapped_column(UUID, primary_key=True)
    vmInstanceUuid: Mapped[str] = mapped_column(UUID, ForeignKey("vm_instance.uuid", ondelete="CASCADE"), index=True)
    l3NetworkUuid: Mapped[str] = mapped_column(UUID, index=True)
    ip: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    mac: Mapped[str] = mapped_column(String(17), unique=True)
    netmask: Mapped[str | None] = mapped_column(String(64), nullable=True)
    gateway: Mapped[str | None] = mapped_column(String(64), nullable=True)
    metaData: Mapped[str | None] = mapped_column(String(255), nullable=True)
    deviceId: Mapped[int] = mapped_column(Integer, default=0)
    usedIpUuid: Mapped[str | None] = mapped_column(UUID, nullable=True)


# --- storage ------------------------------------------------------------------------------


class PrimaryStorage(Base, Resource):
    __tablename__ = "primary_storage"
    zoneUuid: Mapped[str] = mapped_column(UUID, ForeignKey("zone.uuid"), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    type: Mapped[str] = mapped_column(String(64))
    mountPath: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    state: Mapped[str] = mapped_column(String(32), default="Enabled")
    status: Mapped[str] = mapped_column(String(32), default="Connected")
    totalCapacity: Mapped[int] = mapped_column(BigInteger, default=0)
    availableCapacity: Mapped[int] = mapped_column(BigInteger, default=0)
    totalPhysicalCapacity: Mapped[int] = mapped_column(BigInteger, default=0)
    availablePhysicalCapacity: Mapped[int] = mapped_column(BigInteger, default=0)
    systemUsedCapacity: Mapped[int] = mapped_column(BigInteger, default=0)


class PrimaryStorageClusterRef(Base, Stamped):
    __tablename__ = "primary_storage_cluster_ref"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    primaryStorageUuid: Mapped[str] = mapped_column(
        UUID, ForeignKey("primary_storage.uuid", ondelete="CASCADE"), index=True
    )
    clusterUuid: Mapped[str] = mapped_column(UUID, ForeignKey("cluster.uuid", ondelete="CASCADE"), index=True)
    __table_args__ = (UniqueConstraint("primaryStorageUuid", "clusterUuid"),)


class LocalStorageHostRef(Base, Stamped):
    """Capacity of one host's share of a LocalStorage primary storage."""

    __tablename__ = "local_storage_host_ref"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    primaryStorageUuid: Mapped[str] = mapped_column(
        UUID, ForeignKey("primary_storage.uuid", ondelete="CASCADE"), index=True
    )
    hostUuid: Mapped[str] = mapped_column(UUID, ForeignKey("host.uuid", ondelete="CASCADE"), index=True)
    totalCapacity: Mapped[int] = mapped_column(BigInteger, default=0)
    availableCapacity: Mapped[int] = mapped_column(BigInteger, default=0)
    totalPhysicalCapacity: Mapped[int] = mapped_column(BigInteger, default=0)
    availablePhysicalCapacity: Mapped[int] = mapped_column(BigInteger, default=0)
    __table_args__ = (UniqueConstraint("primaryStorageUuid", "hostUuid"),)


class LocalStorageResourceRef(Base, Stamped):
    __tablename__ = "local_storage_resource_ref"
    resourceUuid: Mapped[str] = mapped_column(UUID, primary_key=True)
    primaryStorageUuid: Mapped[str] = mapped_column(UUID, index=True)
    hostUuid: Mapped[str] = mapped_column(UUID, index=True)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    resourceType: Mapped[str] = mapped_column(String(64))


class PrimaryStorageResourceRef(Base, Stamped):
    """Capacity a volume or snapshot holds on a pooled primary storage (SharedMountPoint): one
    pool for every host, unlike LocalStorageResourceRef's per-host shares."""

    __tablename__ = "primary_storage_resource_ref"
    resourceUuid: Mapped[str] = mapped_column(UUID, primary_key=True)
    primaryStorageUuid: Mapped[str] = mapped_column(UUID, index=True)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    resourceType: Mapped[str] = mapped_column(String(64))


class VolumeSnapshotTree(Base, Stamped):
    __tablename__ = "volume_snapshot_tree"
    uuid: Mapped[str] = mapped_column(UUID, primary_key=True)
    volumeUuid: Mapped[str] = mapped_column(UUID, index=True)
    current: Mapped[bool] = mapped_column(Boolean, default=True)


class VolumeSnapshot(Base, Resource):
    """A qcow2 snapshot: the file the volume was written to until the snapshot was taken (the
    volume then continues in a new overlay on top of it). ``latest``: the volume's current
    file is backed by this snapshot."""

    __tablename__ = "volume_snapshot"
    volumeUuid: Mapped[str] = mapped_column(UUID, index=True)
    treeUuid: Mapped[str | None] = mapped_column(UUID, nullable=True)
    parentUuid: Mapped[str | None] = mapped_column(UUID, nullable=True)
    primaryStorageUuid: Mapped[str | None] = mapped_column(UUID, nullable=True, index=True)
    primaryStorageInstallPath: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    volumeType: Mapped[str] = mapped_column(String(16))
    format: Mapped[str] = mapped_column(String(16), default="qcow2")
    type: Mapped[str] = mapped_column(String(32), default="Hypervisor")
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    state: Mapped[str] = mapped_column(String(32), default="Enabled")
    status: Mapped[str] = mapped_column(String(32), default="Ready")
    latest: Mapped[bool] = mapped_column(Boolean, default=False)


class BackupStorage(Base, Resource):
    __tablename__ = "backup_storage"
    url: Mapped[str] = mapped_column(String(2048))
    type: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(32), default="Enabled")
    status: Mapped[str] = mapped_column(String(32), default="Connected")
    totalCapacity: Mapped[int] = mapped_column(BigInteger, default=0)
    availableCapacity: Mapped[int] = mapped_column(BigInteger, default=0)
    hostname: Mapped[str | None] = mapped_column(String(255), nullable=True)
    username: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # the agent that keeps this store's files (empty for the simulator store)
    agentUrl: Mapped[str] = mapped_column(String(512), default="")


class BackupStorageZoneRef(Base, Stamped):
    __tablename__ = "backup_storage_zone_ref"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    backupStorageUuid: Mapped[str] = mapped_column(
        UUID, ForeignKey("backup_storage.uuid", ondelete="CASCADE"), index=True
    )
    zoneUuid: Mapped[str] = mapped_column(UUID, ForeignKey("zone.uuid", ondelete="CASCADE"), index=True)
    __table_args__ = (UniqueConstraint("backupStorageUuid", "zoneUuid"),)


class Image(Base, Resource):
    __tablename__ = "image"
    state: Mapped[str] = mapped_column(String(32), default="Enabled")
    status: Mapped[str] = mapped_column(String(32), default="Downloading")
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    actualSize: Mapped[int] = mapped_column(BigInteger, default=0)
    md5Sum: Mapped[str | None] = mapped_column(String(255), nullable=True)
    url: Mapped[str] = mapped_column(String(2048))
    mediaType: Mapped[str] = mapped_column(String(32), default="RootVolumeTemplate")
    guestOsType: Mapped[str | None] = mapped_column(String(255), nullable=True)
    type: Mapped[str] = mapped_column(String(32), default="zstack")
    platform: Mapped[str] = mapped_column(String(32), default="Linux")
    format: Mapped[str] = mapped_column(String(32), default="qcow2")
    system: Mapped[bool] = mapped_column(Boolean, default=False)
    deleteDate: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class ImageBackupStorageRef(Base, Stamped):
    __tablename__ = "image_backup_storage_ref"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    imageUuid: Mapped[str] = mapped_column(UUID, ForeignKey("image.uuid", ondelete="CASCADE"), index=True)
    backupStorageUuid: Mapped[str] = mapped_column(UUID, ForeignKey("backup_storage.uuid"), index=True)
    installPath: Mapped[str] = mapped_column(String(2048), default="")
    status: Mapped[str] = mapped_column(String(32), default="Downloading")
    __table_args__ = (UniqueConstraint("imageUuid", "backupStorageUuid"),)


class Volume(Base, Resource):
    __tablename__ = "volume"
    primaryStorageUuid: Mapped[str | None] = mapped_column(UUID, nullable=True, index=True)
    vmInstanceUuid: Mapped[str | None] = mapped_column(UUID, nullable=True, index=True)
    diskOfferingUuid: Mapped[str | None] = mapped_column(UUID, nullable=True)
    rootImageUuid: Mapped[str | None] = mapped_column(UUID, nullable=True)
    installPath: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    type: Mapped[str] = mapped_column(String(16))  # Root | Data
    format: Mapped[str] = mapped_column(String(16), default="qcow2")
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    actualSize: Mapped[int] = mapped_column(BigInteger, default=0)
    deviceId: Mapped[int | None] = mapped_column(Integer, nullable=True)
    state: Mapped[str] = mapped_column(String(32), default="Enabled")
    status: Mapped[str] = mapped_column(String(32), default="NotInstantiated", index=True)
    hostUuid: Mapped[str | None] = mapped_column(UUID, nullable=True)  # local storage placement
    deleteDate: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


# --- network ------------------------------------------------------------------------------


class L2Network(Base, Resource):
    __tablename__ = "l2_network"
    zoneUuid: Mapped[str] = mapped_column(UUID, ForeignKey("zone.uuid"), index=True)
    physicalInterface: Mapped[str] = mapped_column(String(1024))
    type: Mapped[str] = mapped_column(String(32))  # L2NoVlanNetwork | L2VlanNetwork
    vlan: Mapped[int | None] = mapped_column(Integer, nullable=True)


class L2NetworkClusterRef(Base, Stamped):
    __tablename__ = "l2_network_cluster_ref"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    l2NetworkUuid: Mapped[str] = mapped_column(UUID, ForeignKey("l2_network.uuid", ondelete="CASCADE"), index=True)
    clusterUuid: Mapped[str] = mapped_column(UUID, ForeignKey("cluster.uuid", ondelete="CASCADE"), index=True)
    __table_args__ = (UniqueConstraint("l2NetworkUuid", "clusterUuid"),)


class L3Network(Base, Resource):
    __tablename__ = "l3_network"
    type: Mapped[str] = mapped_column(String(32), default="L3BasicNetwork")
    zoneUuid: Mapped[str] = mapped_column(UUID, index=True)
    l2NetworkUuid: Mapped[str] = mapped_column(UUID, ForeignKey("l2_network.uuid"), index=True)
    state: Mapped[str] = mapped_column(String(32), default="Enabled")
    dnsDomain: Mapped[str | None] = mapped_column(String(255), nullable=True)
    system: Mapped[bool] = mapped_column(Boolean, default=False)


class L3NetworkDns(Base, Stamped):
    __tablename__ = "l3_network_dns"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    l3NetworkUuid: Mapped[str] = mapped_column(UUID, ForeignKey("l3_network.uuid", ondelete="CASCADE"), index=True)
    dns: Mapped[str] = mapped_column(String(255))
    __table_args__ = (UniqueConstraint("l3NetworkUuid", "dns"),)


class IpRange(Base, Resource):
    __tablename__ = "ip_range"
    l3NetworkUuid: Mapped[str] = mapped_column(UUID, ForeignKey("l3_network.uuid", ondelete="CASCADE"), index=True)
    startIp: Mapped[str] = mapped_column(String(64))
    endIp: Mapped[str] = mapped_column(String(64))
    netmask: Mapped[str] = mapped_column(String(64))
    gateway: Mapped[str] = mapped_column(String(64))
    networkCidr: Mapped[str | None] = mapped_column(String(64), nullable=True)


class UsedIp(Base, Stamped):
    __tablename__ = "used_ip"
    uuid: Mapped[str] = mapped_column(UUID, primary_key=True)
    ipRangeUuid: Mapped[str] = mapped_column(UUID, ForeignKey("ip_range.uuid", ondelete="CASCADE"), index=True)
    l3NetworkUuid: Mapped[str] = mapped_column(UUID, index=True)
    ip: Mapped[str] = mapped_column(String(64))
    ipInLong: Mapped[int] = mapped_column(BigInteger)
    netmask: Mapped[str] = mapped_column(String(64))
    gateway: Mapped[str] = mapped_column(String(64))
    usedFor: Mapped[str] = mapped_column(String(64), default="VmNic")
    # The only guard against handing one IP to two NICs under concurrency.
    __table_args__ = (
        UniqueConstraint("l3NetworkUuid", "ipInLong"),
        # every VM start looks up its L3 network's DHCP server IP: without this the lookup read
        # every used IP of the network (one per VM)
        Index("ix_used_ip_l3_used_for", "l3NetworkUuid", "usedFor"),
    )


class NetworkServiceProvider(Base, Resource):
    __tablename__ = "network_service_provider"
    type: Mapped[str] = mapped_column(String(64), unique=True)


class NetworkServiceType(Base):
    __tablename__ = "network_service_type"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    networkServiceProviderUuid: Mapped[str] = mapped_column(
        UUID, ForeignKey("network_service_provider.uuid", ondelete="CASCADE"), index=True
    )
    type: Mapped[str] = mapped_column(String(64))


class NetworkServiceProviderL2NetworkRef(Base, Stamped):
    __tablename__ = "network_service_provider_l2_network_ref"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    networkServiceProviderUuid: Mapped[str] = mapped_column(UUID, index=True)
    l2NetworkUuid: Mapped[str] = mapped_column(UUID, ForeignKey("l2_network.uuid", ondelete="CASCADE"), index=True)
    __table_args__ = (UniqueConstraint("networkServiceProviderUuid", "l2NetworkUuid"),)


class NetworkServiceL3NetworkRef(Base, Stamped):
    __tablename__ = "network_service_l3_network_ref"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    l3NetworkUuid: Mapped[str] = mapped_column(UUID, ForeignKey("l3_network.uuid", ondelete="CASCADE"), index=True)
    networkServiceProviderUuid: Mapped[str] = mapped_column(UUID, index=True)
    networkServiceType: Mapped[str] = mapped_column(String(64))
    __table_args__ = (UniqueConstraint("l3NetworkUuid", "networkServiceType"),)


class Vip(Base, Resource):
    """A virtual IP taken from a (public) L3 network; an EIP maps it onto a VM NIC's IP."""

    __tablename__ = "vip"
    l3NetworkUuid: Mapped[str] = mapped_column(UUID, ForeignKey("l3_network.uuid", ondelete="CASCADE"), index=True)
    ip: Mapped[str] = mapped_column(String(64), index=True)
    netmask: Mapped[str] = mapped_column(String(64))
    gateway: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(32), default="Enabled")
    serviceProvider: Mapped[str | None] = mapped_column(String(64), nullable=True)
    peerL3NetworkUuid: Mapped[str | None] = mapped_column(UUID, nullable=True)
    useFor: Mapped[str | None] = mapped_column(String(64), nullable=True)  # "Eip" while an EIP holds it
    usedIpUuid: Mapped[str | None] = mapped_column(UUID, nullable=True)


class Eip(Base, Resource):
    __tablename__ = "eip"
    vipUuid: Mapped[str] = mapped_column(UUID, ForeignKey("vip.uuid", ondelete="CASCADE"), unique=True)
    vmNicUuid: Mapped[str | None] = mapped_column(UUID, nullable=True, index=True)
    vipIp: Mapped[str] = mapped_column(String(64))
    guestIp: Mapped[str | None] = mapped_column(String(64), nullable=True)
    state: Mapped[str] = mapped_column(String(32), default="Enabled")


# --- security groups (plugins/security_group) -------------------------------------------------


class SecurityGroup(Base, Resource):
    __tablename__ = "security_group"
    state: Mapped[str] = mapped_column(String(32), default="Enabled")
    internalId: Mapped[int] = mapped_column(BigInteger, unique=True)


class SecurityGroupRule(Base, Stamped):
    __tablename__ = "security_group_rule"
    uuid: Mapped[str] = mapped_column(UUID, primary_key=True)
    securityGroupUuid: Mapped[str] = mapped_column(
        UUID, ForeignKey("security_group.uuid", ondelete="CASCADE"), index=True
    )
    type: Mapped[str] = mapped_column(String(16))  # Ingress, Egress
    protocol: Mapped[str] = mapped_column(String(16))  # TCP, UDP, ICMP, ALL
    startPort: Mapped[int] = mapped_column(Integer)
    endPort: Mapped[int] = mapped_column(Integer)
    allowedCidr: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(32), default="Enabled")


class SecurityGroupL3NetworkRef(Base, Stamped):
    __tablename__ = "security_group_l3_network_ref"
    uuid: Mapped[str] = mapped_column(UUID, primary_key=True)
    securityGroupUuid: Mapped[str] = mapped_column(
        UUID, ForeignKey("security_group.uuid", ondelete="CASCADE"), index=True
    )
    l3NetworkUuid: Mapped[str] = mapped_column(UUID, ForeignKey("l3_network.uuid", ondelete="CASCADE"), index=True)
    __table_args__ = (UniqueConstraint("securityGroupUuid", "l3NetworkUuid"),)


class VmNicSecurityGroupRef(Base, Stamped):
    __tablename__ = "vm_nic_security_group_ref"
    uuid: Mapped[str] = mapped_column(UUID, primary_key=True)
    vmNicUuid: Mapped[str] = mapped_column(UUID, ForeignKey("vm_nic.uuid", ondelete="CASCADE"), index=True)
    securityGroupUuid: Mapped[str] = mapped_column(
        UUID, ForeignKey("security_group.uuid", ondelete="CASCADE"), index=True
    )
    vmInstanceUuid: Mapped[str] = mapped_column(UUID, index=True)
    __table_args__ = (UniqueConstraint("vmNicUuid", "securityGroupUuid"),)


# --- identity: users, groups, policies, quotas, sharing (issue 13 item 9) -------------------


class User(Base, Resource):
    """A member of an account; logs in with LogInByUser and may do only what its policies allow."""

    __tablename__ = "identity_user"
    accountUuid: Mapped[str] = mapped_column(UUID, ForeignKey("account.uuid", ondelete="CASCADE"), index=True)
    passwordHash: Mapped[str] = mapped_column(String(255))
    __table_args__ = (UniqueConstraint("accountUuid", "name"),)


class UserGroup(Base, Resource):
    __tablename__ = "identity_user_group"
    accountUuid: Mapped[str] = mapped_column(UUID, ForeignKey("account.uuid", ondelete="CASCADE"), index=True)


class UserGroupUserRef(Base, Stamped):
    __tablename__ = "identity_user_group_user_ref"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    userUuid: Mapped[str] = mapped_column(UUID, ForeignKey("identity_user.uuid", ondelete="CASCADE"), index=True)
    groupUuid: Mapped[str] = mapped_column(
        UUID, ForeignKey("identity_user_group.uuid", ondelete="CASCADE"), index=True
    )
    __table_args__ = (UniqueConstraint("userUuid", "groupUuid"),)


class Policy(Base, Resource):
    __tablename__ = "identity_policy"
    accountUuid: Mapped[str] = mapped_column(UUID, ForeignKey("account.uuid", ondelete="CASCADE"), index=True)
    # JSON: [{"name", "effect": "Allow"|"Deny", "actions": [pattern, ...]}]
    statements: Mapped[str] = mapped_column(Text)


class UserPolicyRef(Base, Stamped):
    __tablename__ = "identity_user_policy_ref"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    userUuid: Mapped[str] = mapped_column(UUID, ForeignKey("identity_user.uuid", ondelete="CASCADE"), index=True)
    policyUuid: Mapped[str] = mapped_column(UUID, ForeignKey("identity_policy.uuid", ondelete="CASCADE"), index=True)
    __table_args__ = (UniqueConstraint("userUuid", "policyUuid"),)


class UserGroupPolicyRef(Base, Stamped):
    __tablename__ = "identity_user_group_policy_ref"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    groupUuid: Mapped[str] = mapped_column(
        UUID, ForeignKey("identity_user_group.uuid", ondelete="CASCADE"), index=True
    )
    policyUuid: Mapped[str] = mapped_column(UUID, ForeignKey("identity_policy.uuid", ondelete="CASCADE"), index=True)
    __table_args__ = (UniqueConstraint("groupUuid", "policyUuid"),)


class Quota(Base, Stamped):
    """One limit of one account (``identityUuid``): ``vm.num``, ``volume.capacity``, ..."""

    __tablename__ = "identity_quota"
    uuid: Mapped[str] = mapped_column(UUID, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    identityUuid: Mapped[str] = mapped_column(UUID, ForeignKey("account.uuid", ondelete="CASCADE"), index=True)
    identityType: Mapped[str] = mapped_column(String(32), default="AccountVO")
    value: Mapped[int] = mapped_column(BigInteger)
    __table_args__ = (UniqueConstraint("identityUuid", "name"),)


class SharedResource(Base, Stamped):
    """A resource its owner lets another account (or, ``toPublic``, every account) see and use."""

    __tablename__ = "identity_shared_resource"
    uuid: Mapped[str] = mapped_column(UUID, primary_key=True)
    ownerAccountUuid: Mapped[str] = mapped_column(UUID, index=True)
    receiverAccountUuid: Mapped[str | None] = mapped_column(UUID, nullable=True, index=True)
    toPublic: Mapped[bool] = mapped_column(Boolean, default=False)
    resourceType: Mapped[str] = mapped_column(String(64))
    resourceUuid: Mapped[str] = mapped_column(UUID, index=True)
