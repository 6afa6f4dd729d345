"""Deploying a KVM host's agent over SSH (AddKVMHost, ReconnectHost), as ZStack's deployer does.

The node logs in to the host (asyncssh: a password or a private key, never kept) and runs its
tasks in order, each logged before and after it: check the OS (Debian 12), install the packages the
agent needs (dpkg is asked first: a host that has them all is not touched, no network needed),
install the node's own release of nimbostack into a venv (``/opt/nimbostack-agent/releases/ID``:
the node ships the files of the distributions it runs itself, built once per release, so the host
needs no index), configure libvirtd's TCP listener (the live migration's ``qemu+tcp://IP/system``),
install the node's SSH key (ReconnectHost redeploys with it: the password is not kept), hand over
the agent's mutual-TLS bundle (``STATE_DIR/agent.pem``), install the agent's systemd unit and
(re)start it — as a daemon where systemd is not PID 1 — and wait for its first ping.

The log: every line goes to the node's log, to ``DATA_DIR/logs/deploy/<managementIp>.log`` and, while
the API runs, to its job's progress (``GET /zstack/api/result/<job>``). A failure names its task and
the task's output, and the caller rolls the host back (compute/host.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shlex
import sys
import tarfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import asyncssh
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from nimbostack.core.errors import HOST_DEPLOY_FAILED, ApiError, invalid
from nimbostack.wire import VERSION, pki

if TYPE_CHECKING:
    from nimbostack.core.platform import Platform

log = logging.getLogger(__name__)
# asyncssh logs every channel at INFO; what matters is in the deploy log
logging.getLogger("asyncssh").setLevel(logging.WARNING)

# What the agent needs on a host: libvirt and QEMU (scripts/libvirt-packages.txt), the Flat
# network's dnsmasq and nftables (scripts/network-packages.txt), and Python for its venv.
HOST_PACKAGES = [
    "libvirt-daemon-system", "libvirt-clients", "qemu-system-x86", "qemu-utils",
    "dnsmasq-base", "nftables", "iproute2", "python3", "python3-venv",
]
AGENT_HOME = "/opt/nimbostack-agent"
STATE_DIR = "/var/lib/nimbostack-agent"
LIBVIRTD_CONF = "/etc/libvirt/libvirtd.conf"
# what the live migration expects of a destination (compute/migrate.py: qemu+tcp://IP/system)
LIBVIRTD_SETTINGS = ['listen_tls = 0', 'listen_tcp = 1', 'auth_tcp = "none"']
FIRST_PING_SECONDS = 60.0
PROBE_SECONDS = 5.0
# the longest output of a task that a failure quotes
OUTPUT_CHARS = 2000


@dataclass(frozen=True)
class Login:
    """How to reach a host over SSH; the secret lives only as long as the API call."""

    ip: str
    port: int
    username: str
    # kept out of repr: no traceback or log line shows them
    password: str | None = field(default=None, repr=False)
    key: asyncssh.SSHKey | None = field(default=None, repr=False)
    node_key: bool = False  # the node's own key (ReconnectHost): a refusal is no deploy failure


class TaskFailed(Exception):
    def __init__(self, output: str) -> None:
        super().__init__(output)
        self.output = output


def node_ssh_key(data_dir: Path) -> asyncssh.SSHKey:
    """The node's own SSH key (``DATA_DIR/pki/ssh_ed25519``), made on first use; a deployment
    authorises it on the host, so that ReconnectHost can redeploy without the password."""
    path = data_dir / "pki" / "ssh_ed25519"
    if path.exists():
        return asyncssh.read_private_key(str(path))
    key = asyncssh.generate_private_key("ssh-ed25519", comment="nimbostack-node")
    pki.write_private(path, key.export_private_key())
    return key


def parse_private_key(text: str) -> asyncssh.SSHKey:
    try:
        return asyncssh.import_private_key(text)
    except Exception as err:  # noqa: BLE001  (whatever the parser says of a caller's text is a bad argument)
        raise invalid(f"sshPrivateKey is not a private key asyncssh can read (OpenSSH or PEM, unencrypted): "
                      f"{err}") from None


# ---- the node's release, as files for a host's venv ---------------------------------------------

def _runtime() -> list[metadata.Distribution]:
    """nimbostack (with its libvirt extra) and every distribution it requires, as installed here."""
    out: dict[str, metadata.Distribution] = {}
    todo: list[tuple[str, set[str]]] = [("nimbostack", {"libvirt"})]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if key in out:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional requirement this node lacks (e.g. libvirt-python): the host lacks it too
        out[key] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append((req.name, set(req.extras)))
    return list(out.values())


def _files() -> list[tuple[Path, str]]:
    """(file on this machine, its path in site-packages) of the node's runtime."""
    files: list[tuple[Path, str]] = []
    for dist in _runtime():
        if canonicalize_name(dist.metadata["Name"]) == "nimbostack":
            # the running package (maybe an editable install): its sources, and metadata naming its version
            pkg = Path(__file__).resolve().parents[1]
            files += [(p, f"nimbostack/{p.relative_to(pkg)}") for p in sorted(pkg.rglob("*"))
                      if p.is_file() and "__pycache__" not in p.parts]
            info = f"nimbostack-{dist.version}.dist-info"
            # the installed dist-info, not an egg-info a source checkout on sys.path may hold
            # (setuptools leaves one beside an editable install's sources)
            for candidate in metadata.distributions(name="nimbostack"):
                found = [(Path(str(candidate.locate_file(f"{info}/{n}"))), f"{info}/{n}")
                         for n in ("METADATA", "entry_points.txt")]
                found = [(path, rel) for path, rel in found if path.is_file()]
                if found:
                    files += found
                    break
            continue
        for f in dist.files or []:
            rel = str(f)
            if rel.startswith("..") or "__pycache__" in f.parts or rel.endswith(".pyc"):
                continue  # console scripts outside site-packages; caches the host's Python remakes
            path = Path(str(f.locate()))
            if path.is_file():
                files.append((path, rel))
    return files


def release_bundle(cache: Path) -> tuple[str, Path]:
    """(release id, tar.gz) of the node's runtime, built once per release into ``cache``."""
    files = _files()
    digest = hashlib.sha256()
    for path, rel in files:
        st = path.stat()
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    release = f"{VERSION}-{digest.hexdigest()[:12]}"
    out = cache / f"nimbostack-agent-{release}.tar.gz"
    if out.exists():
        return release, out
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w:gz", compresslevel=1) as tar:
        for path, rel in files:
            tar.add(path, arcname=rel, recursive=False)
    os.replace(tmp, out)
    for old in cache.glob("nimbostack-agent-*.tar.gz"):
        if old != out:
            old.unlink(missing_ok=True)
    return release, out


# ---- the deployment --------------------------------------------------------------------------------

class Deployer:
    """One deployment to one host: its tasks, its log, and what to undo on the host if it fails."""

    def __init__(self, platform: Platform, host_uuid: str, url: str, login: Login, job_uuid: str | None) -> None:
        self.p, self.host_uuid, self.url, self.login, self.job = platform, host_uuid, url, login, job_uuid
        self.port = urlsplit(url).port or platform.settings.agent_port
        self.log_file = platform.settings.data_dir / "logs" / "deploy" / f"{login.ip}.log"
        self.conn: asyncssh.SSHClientConnection | None = None
        self.release = ""
        self.systemd = False
        self.started = False

    async def note(self, line: str, progress: str | None = None) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        log.info("deploy %s: %s", self.login.ip, line)
        await asyncio.to_thread(self._append, f"{stamp} {line}\n")
        if self.job:
            await self.p.jobs.set_progress(self.job, (progress or line)[:64])

    def _append(self, text: str) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.log_file, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(text)

    async def sh(self, script: str, timeout: float = 600) -> str:
        """Run ``script`` on the host; its output, or TaskFailed with it."""
        assert self.conn is not None
        try:
            done = await self.conn.run(script, timeout=timeout)
        except asyncssh.ProcessError as err:  # the timeout
            raise TaskFailed(f"no answer in {timeout:g} s: {err}") from None
        out = f"{done.stdout or ''}{done.stderr or ''}".strip()
        if done.exit_status != 0:
            raise TaskFailed(f"exit status {done.exit_status}: {out[-OUTPUT_CHARS:]}")
        return out

    async def run(self) -> None:
        tasks = [
            ("connect over SSH", self.connect),
            ("check the OS", self.check_os),
            ("install packages", self.packages),
            ("install the agent", self.install_agent),
            ("configure libvirtd", self.libvirtd),
            ("authorise the node's SSH key", self.authorise_key),
            ("hand over the agent's credentials", self.credentials),
            ("start the agent", self.start_agent),
            ("wait for the agent's first ping", self.first_ping),
        ]
        await self.note(f"--- deploying nimbostack {VERSION} to {self.login.username}@{self.login.ip}:"
                        f"{self.login.port} (host {self.host_uuid}, agent {self.url})")
        try:
            for n, (name, task) in enumerate(tasks, 1):
                head = f"task {n}/{len(tasks)} {name}"
                await self.note(f"{head}: start")
                began = time.monotonic()
                try:
                    try:
                        said = await task()
                    except (asyncssh.Error, OSError) as err:  # the connection lost, a channel refused
                        raise TaskFailed(f"{type(err).__name__}: {err}") from None
                except TaskFailed as err:
                    await self.note(f"{head}: FAILED after {time.monotonic() - began:.1f} s: {err.output}",
                                    f"{head}: FAILED")
                    await self.undo()
                    raise ApiError(HOST_DEPLOY_FAILED, f"Deploying the agent failed at task '{name}'",
                                   f"{err.output} (deploy log: {self.log_file})") from None
                await self.note(f"{head}: done in {time.monotonic() - began:.1f} s{': ' + said if said else ''}",
                                f"{head}: done")
            await self.note("--- deployed")
        finally:
            if self.conn is not None:
                self.conn.close()

    async def connect(self) -> str:
        lg = self.login
        try:
            self.conn = await asyncssh.connect(
                lg.ip, port=lg.port, username=lg.username, password=lg.password,
                client_keys=[lg.key] if lg.key is not None else None,
                # like ZStack's deployer: a new host's key is not known yet (its fingerprint is logged)
                known_hosts=None, agent_path=None, config=None, connect_timeout=15, login_timeout=30,
            )
        except asyncssh.PermissionDenied:
            raise TaskFailed(f"{lg.username}@{lg.ip}:{lg.port} refused the "
                             f"{'password' if lg.password else 'key'}: permission denied") from None
        except (OSError, asyncssh.Error, TimeoutError) as err:
            raise TaskFailed(f"cannot open SSH to {lg.ip}:{lg.port}: {err or type(err).__name__}") from None
        key = self.conn.get_server_host_key()
        return f"host key {key.get_fingerprint() if key else 'unknown'}"

    async def check_os(self) -> str:
        fields = dict(line.split("=", 1) for line in (await self.sh("cat /etc/os-release")).splitlines() if "=" in line)
        name = fields.get("PRETTY_NAME", "?").strip('"')
        if fields.get("ID", "").strip('"') != "debian" or fields.get("VERSION_ID", "").strip('"') != "12":
            raise TaskFailed(f"the host runs {name}; the agent is deployed to Debian 12 only")
        if self.login.username != "root":
            raise TaskFailed(f"logged in as {self.login.username}: the agent is installed and runs as root")
        return name

    async def packages(self) -> str:
        pkgs = " ".join(HOST_PACKAGES)
        return await self.sh(f"""
set -e
missing=""
for p in {pkgs}; do
  [ "$(dpkg-query -W -f='${{Status}}' "$p" 2>/dev/null)" = "install ok installed" ] || missing="$missing $p"
done
if [ -z "$missing" ]; then echo "all {len(HOST_PACKAGES)} packages are installed"; exit 0; fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends $missing >/tmp/nimbostack-apt.log 2>&1 || {{
  apt-get update -q >>/tmp/nimbostack-apt.log 2>&1
  apt-get install -y -q --no-install-recommends $missing >>/tmp/nimbostack-apt.log 2>&1 || {{
    tail -n 20 /tmp/nimbostack-apt.log; exit 1; }}
}}
echo "installed:$missing"
""")

    async def install_agent(self) -> str:
        assert self.conn is not None
        ours = f"{sys.version_info[0]}.{sys.version_info[1]}"
        theirs = await self.sh("python3 -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'")
        if theirs != ours:
            raise TaskFailed(f"the host's python3 is {theirs}; this node runs and ships its agent for {ours}")
        self.release, bundle = await asyncio.to_thread(release_bundle, self.p.settings.data_dir / "deploy")
        rel = f"{AGENT_HOME}/releases/{self.release}"
        if "present" in await self.sh(f"test -x {rel}/bin/nimbostack && echo present || true"):
            await self.sh(f"ln -sfn {rel} {AGENT_HOME}/current")
            return f"release {self.release} is installed already"
        remote = f"/tmp/nimbostack-agent-{self.release}.tar.gz"
        try:
            async with self.conn.start_sftp_client() as sftp:
                await sftp.put(str(bundle), remote)
        except (OSError, asyncssh.Error) as err:
            raise TaskFailed(f"copying {bundle.name} to the host failed: {err}") from None
        launcher = f"#!{rel}/bin/python\nimport sys\nfrom nimbostack.main import main\nsys.exit(main())\n"
        await self.sh(f"""
set -e
rm -rf {rel}.new
mkdir -p {AGENT_HOME}/releases
python3 -m venv --without-pip {rel}.new
site=$({rel}.new/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
tar xzf {remote} -C "$site"
rm -f {remote}
printf '%s' {shlex.quote(launcher)} > {rel}.new/bin/nimbostack
chmod 755 {rel}.new/bin/nimbostack
mv {rel}.new {rel}
ln -sfn {rel} {AGENT_HOME}/current
# the releases before this one and the one before it go
ls -1dt {AGENT_HOME}/releases/*/ | tail -n +3 | xargs -r rm -rf
{rel}/bin/python -c 'import nimbostack.agent.server, nimbostack.wire; print(nimbostack.wire.VERSION)'
""")
        return f"release {self.release} in {rel}"

    async def libvirtd(self) -> str:
        sets = " ".join(shlex.quote(s) for s in LIBVIRTD_SETTINGS)
        uri = f"qemu+tcp://{self.login.ip}/system"
        return await self.sh(f"""
set -e
conf={LIBVIRTD_CONF}
changed=""
for kv in {sets}; do
  k=${{kv%% *}}
  if ! grep -qxF "$kv" "$conf"; then
    sed -i "/^[[:space:]]*$k[[:space:]]*=/d" "$conf"; echo "$kv" >> "$conf"; changed="$changed $k"
  fi
done
listening() {{ virsh -c {uri} version >/dev/null 2>&1; }}
if [ -z "$changed" ] && listening; then echo "libvirtd listens at {uri} already"; exit 0; fi
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
  systemctl stop libvirtd.service >/dev/null 2>&1 || true
  systemctl enable libvirtd-tcp.socket >/dev/null 2>&1
  systemctl restart libvirtd-tcp.socket
  systemctl start libvirtd.service
else
  # no systemd: the daemon itself, listening (-l) as the configuration says. Only a libvirtd of this
  # host's own mount and network namespaces is stopped: a container (or a test machine) may see
  # another's pid file
  ns() {{ echo "$(readlink /proc/$1/ns/mnt 2>/dev/null) $(readlink /proc/$1/ns/net 2>/dev/null)"; }}
  for f in /run/libvirt/libvirtd.pid /run/libvirtd.pid; do
    pid=$(cat "$f" 2>/dev/null || true)
    [ -n "$pid" ] && [ "$(ns "$pid")" = "$(ns self)" ] || continue
    if kill "$pid" 2>/dev/null; then
      # gone, or a zombie its parent has not reaped yet (it holds no socket any more)
      n=0
      while kill -0 "$pid" 2>/dev/null && [ "$(cut -d' ' -f3 /proc/$pid/stat 2>/dev/null)" != Z ] && [ $n -lt 100 ]; do
        sleep 0.1; n=$((n+1))
      done
    fi
  done
  pgrep -x virtlogd >/dev/null || virtlogd -d
  mkdir -p /run/libvirt
  libvirtd -d -l -p /run/libvirt/libvirtd.pid
fi
n=0
until listening; do
  n=$((n+1)); [ $n -lt 100 ] || {{ echo "libvirtd does not answer at {uri}"; exit 1; }}; sleep 0.1
done
echo "set${{changed:- nothing}}; libvirtd listens at {uri}"
""")

    async def authorise_key(self) -> str:
        key = (await asyncio.to_thread(node_ssh_key, self.p.settings.data_dir)).export_public_key().decode().strip()
        return await self.sh(f"""
set -e
umask 077
mkdir -p ~/.ssh
touch ~/.ssh/authorized_keys
if grep -qxF {shlex.quote(key)} ~/.ssh/authorized_keys; then echo "authorised already"
else echo {shlex.quote(key)} >> ~/.ssh/authorized_keys; echo "added to ~/.ssh/authorized_keys"; fi
""")

    async def credentials(self) -> str:
        assert self.conn is not None
        bundle = self.p.pki.issue(pki.AGENT, pki.agent_name(self.url), [urlsplit(self.url).hostname or ""])
        await self.sh(f"install -d -m 700 {STATE_DIR}")
        path = f"{STATE_DIR}/agent.pem"
        try:
            async with self.conn.start_sftp_client() as sftp:
                async with sftp.open(path + ".new", "wb", asyncssh.SFTPAttrs(permissions=0o600)) as f:
                    await f.write(bundle)
                await sftp.chmod(path + ".new", 0o600)
                await sftp.posix_rename(path + ".new", path)
        except (OSError, asyncssh.Error) as err:
            raise TaskFailed(f"writing {path} failed: {err}") from None
        return f"{path} (0600) for agent {pki.agent_name(self.url)}"

    def _agent_argv(self) -> list[str]:
        return [f"{AGENT_HOME}/releases/{self.release}/bin/nimbostack", "agent", "--driver", "libvirt",
                "--port", str(self.port), "--host-ip", self.login.ip, "--state-dir", STATE_DIR]

    async def start_agent(self) -> str:
        nimbo = f"{AGENT_HOME}/releases/{self.release}/bin/nimbostack"
        out = await self.sh(f"{nimbo} install-service agent --state-dir {STATE_DIR} --port {self.port} "
                            f"--host-ip {shlex.quote(self.login.ip)}")
        self.systemd = "systemd does not run" not in out
        self.started = True
        if self.systemd:
            # enable --now started it if it was stopped; a running agent of another release restarts
            await self.sh("systemctl restart nimbostack-agent.service")
            return "systemd unit nimbostack-agent.service (re)started"
        await self.note("systemd is not PID 1 on this host: the unit is written, and the agent starts as a "
                        f"daemon instead (log {STATE_DIR}/agent.log; nothing restarts it after a crash or reboot)",
                        "systemd absent: starting the agent as a daemon")
        pid = await self.sh(f"""
set -e
pidf={STATE_DIR}/agent.pid
if [ -s "$pidf" ] && kill "$(cat "$pidf")" 2>/dev/null; then
  n=0; while kill -0 "$(cat "$pidf" 2>/dev/null)" 2>/dev/null && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
fi
cd {STATE_DIR}
setsid {shlex.join(self._agent_argv())} </dev/null >>{STATE_DIR}/agent.log 2>&1 &
echo $! > "$pidf"
cat "$pidf"
""")
        return f"daemon pid {pid}"

    async def first_ping(self) -> str:
        end = time.monotonic() + FIRST_PING_SECONDS
        why = ""
        while time.monotonic() < end:
            try:
                reply = await self.p.agents.call(self.url, "/host/ping", {"hostUuid": self.host_uuid}, timeout=3)
                if reply.get("version") == VERSION:
                    return f"the agent answers at {self.url}, version {VERSION}"
                why = f"it answers with version {reply.get('version', '(none)')}, not {VERSION}"
            except ApiError as err:
                why = f"{err.description}: {err.details}"
            await asyncio.sleep(0.3)
        tail = await self._agent_log()
        raise TaskFailed(f"no ping in {FIRST_PING_SECONDS:g} s ({why}); the agent's log:\n{tail}")

    async def _agent_log(self) -> str:
        with contextlib.suppress(TaskFailed, asyncssh.Error, OSError):
            if self.systemd:
                return await self.sh("journalctl -u nimbostack-agent.service -n 30 --no-pager")
            return await self.sh(f"tail -n 30 {STATE_DIR}/agent.log")
        return "(unreadable)"

    async def undo(self) -> None:
        """The host as the node found it, as far as running goes: an agent this deployment started
        is stopped (the files stay, so that the next try is fast)."""
        if not self.started or self.conn is None:
            return
        with contextlib.suppress(TaskFailed, asyncssh.Error, OSError):
            if self.systemd:
                await self.sh("systemctl disable --now nimbostack-agent.service")
            else:
                await self.sh(f"kill \"$(cat {STATE_DIR}/agent.pid)\" 2>/dev/null; rm -f {STATE_DIR}/agent.pid")
            await self.note("rolled back: the agent this deployment started is stopped")


async def probe(platform: Platform, host_uuid: str, url: str) -> tuple[bool, ApiError | None]:
    """(the agent at ``url`` answers with this node's version, the error when it does not answer)."""
    try:
        reply = await platform.agents.call(url, "/host/ping", {"hostUuid": host_uuid}, timeout=PROBE_SECONDS)
    except ApiError as err:
        return False, err
    return reply.get("version") == VERSION, None


async def ensure_agent(platform: Platform, host_uuid: str, url: str, login: Login | None,
                       job_uuid: str | None, hand_managed: bool) -> None:
    """Deploy over SSH unless the host's agent answers with this node's release.

    A ``hand_managed`` host (an ``agentPort::`` tag: several agents on one machine, the all-in-one,
    the tests), or one without a ``login``, is never deployed: it is connected as it is."""
    if hand_managed or login is None:
        return
    current, err = await probe(platform, host_uuid, url)
    if current:
        log.info("host %s: the agent at %s runs %s already: no deployment", host_uuid, url, VERSION)
        return
    deployer = Deployer(platform, host_uuid, url, login, job_uuid)
    if err is None:
        await deployer.note(f"the agent at {url} runs another release than {VERSION}: upgrading it")
    else:
        await deployer.note(f"the agent at {url} does not answer ({err.details or err.description}): deploying it")
    try:
        await deployer.run()
    except ApiError as failed:
        if login.node_key and err is not None and "task 'connect over SSH'" in failed.description:
            # a host this node never deployed (or one whose SSH is down): the agent's own error says more
            raise ApiError(err.code, err.description,
                           f"{err.details}; and no redeployment: {failed.details}") from None
        raise


def login_of(ip: str, port: int, username: str, password: str | None, key_text: str | None) -> Login:
    return Login(ip, port, username, password or None, parse_private_key(key_text) if key_text else None)


def node_login(platform: Platform, ip: str, port: int, username: str) -> Login:
    return Login(ip, port, username, key=node_ssh_key(platform.settings.data_dir), node_key=True)
