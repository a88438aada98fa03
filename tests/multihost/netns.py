"""Several hosts on one machine: Linux network namespaces joined by a bridge (iproute2).

    with Network(hosts=("w1", "w2", "web")) as net:
        net.forward(5432)                      # PostgreSQL, reached at net.gateway:5432
        net.hosts["w1"].prefix                 # ["ip", "netns", "exec", <ns>]: run a process there
        net.hosts["w2"].cut()                  # `ip link set <veth> down`: the host is gone

Layout (one /24 of 10.231.0.0/16 per run, the first one no interface on the machine uses):

    root namespace = the "data" host                 namespace pushsvc-<tag>-<host>
      bridge psv<tag>br   10.231.K.1/24  <--veth-->  psv<tag><host>n  10.231.K.(10+i)/24, lo up
      socat forwarders:   10.231.K.1:<port> -> 127.0.0.1:<port>

PostgreSQL and Redis listen on 127.0.0.1 only (shared services, not reconfigured), so the data
host reaches them through a `socat` forwarder per port, bound to the bridge address: a worker on
another host opens a TCP connection over its veth, as it would over a network. socat rather than
a forwarder of our own in Python: it is a C process per connection (`fork`), so it costs the
2-core machine little next to the workers, and it sets TCP keepalive and TCP_USER_TIMEOUT on the
hosts' side, standing in for what a data host's kernel would do (PostgreSQL's tcp_keepalives_*,
Redis' tcp-keepalive): a connection from a host whose link was cut is closed ~5 s later, idle or
with an answer unacknowledged, and with it the PostgreSQL session and any transaction it held.

Names carry a random tag, so two runs never collide; each run writes what it made to a state file
under STATE_DIR before making it, with its own pid and start time. A run that was killed leaves
its state file behind: the next run deletes what it lists (namespaces with the processes in them,
links, forwarders by pid and start time) when its owner is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SUPERNET = ipaddress.ip_network("10.231.0.0/16")
STATE_DIR = (
    Path("/run/pushsvc-multihost")
    if Path("/run").is_dir()
    else Path(tempfile.gettempdir()) / "pushsvc-multihost"
)
NS_PREFIX = "pushsvc-"
# A dead peer is noticed in ~5 s: idle (keepalive probes) or with data unacknowledged (TCP_USER_TIMEOUT).
KEEPALIVE = "keepalive,keepidle=2,keepintvl=1,keepcnt=3,setsockopt-int=6:18:5000"


class Unavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no iproute2 or socat, no CAP_NET_ADMIN)."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def unavailable_reason() -> str | None:
    """Why this machine cannot run the multi-host tests, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, a bridge)"
    for tool in ("ip", "socat", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2, socat, util-linux)"
    probe = f"{NS_PREFIX}probe-{secrets.token_hex(3)}"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` fails: {made.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


# --- processes: started by us, ended by pid (and start time, so a reused pid is left alone) -------
def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: a killed test run takes its forwarders along


def _kill_group(pid: int, started: str | None) -> None:
    if started is None or _start_time(pid) != started:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # the forwarder and its per-connection children


def _kill_namespace_processes(ns: str) -> None:
    """Processes left in one of our namespaces (everything in it is ours)."""
    out = ip("netns", "pids", ns, check=False).stdout.split()
    for pid in out:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


@dataclass
class Host:
    name: str
    ns: str
    address: str
    veth_root: str  # the bridge's end, in the root namespace
    veth_host: str  # the host's end, in its namespace

    @property
    def prefix(self) -> list[str]:
        """Run a command on this host: its network namespace, and a hostname of its own (a UTS
        namespace named after the host), so what processes record about themselves names it, e.g.
        a shard lease's owner token `host:pid:random`. Every step execs: the pid is the command's."""
        return ["ip", "netns", "exec", self.ns, *self.uts_prefix]

    @property
    def uts_prefix(self) -> list[str]:
        return ["unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', self.ns]

    def run(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.prefix, *cmd], capture_output=True, text=True, check=False)

    def cut(self) -> None:
        """The host's link goes down: nothing it sends arrives, nothing reaches it, no FIN, no RST."""
        ip("link", "set", self.veth_root, "down")

    def restore(self) -> None:
        ip("link", "set", self.veth_root, "up")

    @property
    def is_cut(self) -> bool:
        return "UP" not in ip("-br", "link", "show", self.veth_root, check=False).stdout.split()


@dataclass
class Network:
    hosts_wanted: tuple[str, ...] = ("w1", "w2", "web")
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    hosts: dict[str, Host] = field(default_factory=dict)
    subnet: ipaddress.IPv4Network | None = None
    gateway: str = ""
    bridge: str = ""
    forwarders: list[tuple[int, str | None]] = field(default_factory=list)

    @property
    def state_file(self) -> Path:
        return STATE_DIR / f"{self.tag}.json"

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> Network:
        reason = unavailable_reason()
        if reason:
            raise Unavailable(reason)
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        with open(STATE_DIR / ".lock", "w") as lock:  # subnet choice and bridge address, one run at a time
            fcntl.flock(lock, fcntl.LOCK_EX)
            cleanup_leftovers()
            self.subnet = _free_subnet()
            self.gateway = str(self.subnet.network_address + 1)
            self.bridge = f"psv{self.tag}br"
            for i, name in enumerate(self.hosts_wanted):
                self.hosts[name] = Host(
                    name=name,
                    ns=f"{NS_PREFIX}{self.tag}-{name}",
                    address=str(self.subnet.network_address + 10 + i),
                    veth_root=f"psv{self.tag}{name}"[:15],
                    veth_host=f"psv{self.tag}{name}n"[:15],
                )
            self._save()
            try:
                ip("link", "add", self.bridge, "type", "bridge")
                ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
                ip("link", "set", self.bridge, "up")
            except BaseException:
                self.stop()
                raise
        try:
            for host in self.hosts.values():
                self._make_host(host)
        except BaseException:
            self.stop()
            raise
        return self

    def _make_host(self, host: Host) -> None:
        ip("netns", "add", host.ns)
        ip("link", "add", host.veth_root, "type", "veth", "peer", "name", host.veth_host)
        ip("link", "set", host.veth_host, "netns", host.ns)
        ip("link", "set", host.veth_root, "master", self.bridge)
        ip("link", "set", host.veth_root, "up")
        assert self.subnet is not None
        ip("-n", host.ns, "link", "set", "lo", "up")
        ip("-n", host.ns, "addr", "add", f"{host.address}/{self.subnet.prefixlen}", "dev", host.veth_host)
        ip("-n", host.ns, "link", "set", host.veth_host, "up")

    def forward(self, port: int, target: str = "127.0.0.1", target_port: int | None = None) -> str:
        """A forwarder on the data host: gateway:port -> target:target_port. Returns "gateway:port"."""
        cmd = [
            "socat",
            f"TCP-LISTEN:{port},bind={self.gateway},fork,reuseaddr,{KEEPALIVE}",
            f"TCP:{target}:{target_port or port},nodelay",
        ]
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own group: teardown kills it with its connections
            preexec_fn=_die_with_parent,
        )
        self.forwarders.append((proc.pid, _start_time(proc.pid)))
        self._save()
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((self.gateway, port), timeout=1).close()
                return f"{self.gateway}:{port}"
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"forwarder {' '.join(cmd)} did not start ({proc.poll()})") from None
                time.sleep(0.05)

    def stop(self) -> None:
        _remove(self._state())
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()

    def __enter__(self) -> Network:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- state, for the cleanup of a run that was killed ----------------------------------------
    def _state(self) -> dict:
        return {
            "owner": os.getpid(),
            "owner_started": _start_time(os.getpid()),
            "namespaces": [h.ns for h in self.hosts.values()],
            "links": [h.veth_root for h in self.hosts.values()] + ([self.bridge] if self.bridge else []),
            "forwarders": self.forwarders,
        }

    def _save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state()))
        tmp.replace(self.state_file)


def _remove(state: dict) -> None:
    for pid, started in state.get("forwarders", []):
        _kill_group(int(pid), started)
    existing = set(ip("netns", "list", check=False).stdout.split())
    for ns in state.get("namespaces", []):
        if ns in existing:
            _kill_namespace_processes(ns)
            ip("netns", "del", ns, check=False)  # takes its veth end, and so the pair, along
    for link in state.get("links", []):
        if ip("link", "show", link, check=False).returncode == 0:
            ip("link", "del", link, check=False)


def cleanup_leftovers() -> list[str]:
    """Remove what runs that were killed left behind (their owner is gone). Returns their tags."""
    removed = []
    for path in STATE_DIR.glob("*.json"):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        owner = int(state.get("owner", 0))
        if owner and _start_time(owner) == state.get("owner_started"):
            continue  # a live run
        _remove(state)
        path.unlink(missing_ok=True)
        removed.append(path.stem)
    return removed


def _free_subnet() -> ipaddress.IPv4Network:
    used = []
    for line in ip("-o", "-4", "addr", "show").stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            used.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    for line in ip("-4", "route", "show").stdout.splitlines():
        first = line.split()[0]
        if first != "default":
            with contextlib.suppress(ValueError):
                used.append(ipaddress.ip_network(first, strict=False))
    for candidate in SUPERNET.subnets(new_prefix=24):
        if candidate.network_address == SUPERNET.network_address:
            continue
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    raise RuntimeError(f"no free /24 left in {SUPERNET}")
