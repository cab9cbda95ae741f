"""Hosts on one machine: network namespaces behind one bridge, and the faults that happen
between real hosts (a pulled cable, a silent or one-way firewall, a lossy link, a frozen host, a
crashed host).

Each host is a namespace with one interface (`eth0`) cabled to a bridge that lives in a switch
namespace of its own, an address in a private range that exists only inside these namespaces,
and no default route: nothing a test starts can leave the machine, and nothing outside can reach
in. Processes share the machine's PID space and file system (so a host's PIDs are the ones
`ip netns pids` lists), not its network.

Names carry this process's PID (`pxm-<pid>-<host>`): `sweep_stale` removes what a crashed run
left, and teardown kills every process in each namespace before deleting it. Needs root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "pxm"
SUBNET = "10.213.7"  # /24, only inside the namespaces
FREEZER = Path("/sys/fs/cgroup/freezer")


class HostsUnavailable(Exception):
    """This machine cannot make hosts (no root, no iproute2): the reason says which."""


def why_not() -> str | None:
    """None when this machine can make hosts; else why not, for a skip that says so."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    for tool in ("ip", "iptables", "socat", "redis-server"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            return f"{tool} is not installed (scripts/setup installs it)"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def sh(*argv: str, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    if check and done.returncode:
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def namespace_pids(ns: str) -> list[int]:
    out = sh("ip", "netns", "pids", ns, check=False)
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace(ns: str) -> None:
    """Every process in `ns` gets SIGKILL, until none is left (a dying parent may fork)."""
    for _ in range(50):
        pids = namespace_pids(ns)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)  # the kernel reaps them; nothing to await from here


def sweep_stale() -> list[str]:
    """Delete the namespaces (and freezer groups) of earlier runs whose process is gone."""
    swept = []
    for line in sh("ip", "netns", "list", check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != PREFIX or not parts[1].isdigit():
            continue
        if _alive(int(parts[1])) and int(parts[1]) != os.getpid():
            continue
        _thaw_group(FREEZER / name)
        _kill_namespace(name)
        sh("ip", "netns", "delete", name, check=False)
        with contextlib.suppress(OSError):
            (FREEZER / name).rmdir()
        shutil.rmtree(Path("/tmp") / f"{PREFIX}-{parts[1]}", ignore_errors=True)
        swept.append(name)
    return swept


def _thaw_group(group: Path) -> None:
    with contextlib.suppress(OSError):
        (group / "freezer.state").write_text("THAWED")


@dataclass
class Host:
    name: str
    ns: str
    ip: str
    port: str  # its cable's end at the bridge (in the switch namespace)
    root: Path  # its own folder: Ray's temp dir, its PROXIFIER_HOME, its logs
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def pids(self) -> list[int]:
        return namespace_pids(self.ns)


class Hosts:
    """The namespaces of one test run and the faults between them."""

    def __init__(self, names: Sequence[str], root: Path) -> None:
        self.prefix = f"{PREFIX}-{os.getpid()}"
        self.switch = f"{self.prefix}-sw"
        self.root = root
        # Ray's per-node temp dirs: short, for the socket paths in them (107 bytes at most).
        self.short = Path("/tmp") / self.prefix
        self.hosts = {
            name: Host(name, f"{self.prefix}-{name}", f"{SUBNET}.{10 + i}", f"p{i}", root / name)
            for i, name in enumerate(names)
        }

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def temp_dir(self, host: str) -> Path:
        return self.short / host

    # ------------------------------------------------------------------ up and down
    def up(self) -> None:
        sweep_stale()
        sh("ip", "netns", "add", self.switch)
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        for host in self.hosts.values():
            host.root.mkdir(parents=True, exist_ok=True)
            sh("ip", "netns", "add", host.ns)
            sh("ip", "-n", host.ns, "link", "set", "lo", "up")
            # One cable: eth0 in the host, its other end a port of the bridge.
            sh(
                "ip", "link", "add", "eth0", "netns", host.ns, "type", "veth",
                "peer", "name", host.port, "netns", self.switch,
            )  # fmt: skip
            sh("ip", "-n", self.switch, "link", "set", host.port, "master", "br0", "up")
            sh("ip", "-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            sh("ip", "-n", host.ns, "link", "set", "eth0", "up")
            if sh("ip", "-n", host.ns, "route", "show", "default").strip():
                raise RuntimeError(f"{host.ns} has a default route: traffic could leave")

    def down(self) -> None:
        for host in self.hosts.values():
            self.thaw(host.name)
            for proc in host.procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            _kill_namespace(host.ns)
            for proc in host.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
            sh("ip", "netns", "delete", host.ns, check=False)
            with contextlib.suppress(OSError):
                (FREEZER / host.ns).rmdir()
        sh("ip", "netns", "delete", self.switch, check=False)
        shutil.rmtree(self.short, ignore_errors=True)

    # ------------------------------------------------------------------ processes
    def start(
        self,
        host: str,
        argv: Sequence[str],
        log: str,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Run `argv` inside the host (its network only), output to a log in its folder."""
        h = self.hosts[host]
        out = open(h.root / log, "ab")  # noqa: SIM115 - the child holds it
        proc = subprocess.Popen(
            ["ip", "netns", "exec", h.ns, *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        out.close()
        h.procs.append(proc)
        return proc

    def run(self, host: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
        """Run `argv` inside the host to the end; its output (it must succeed)."""
        done = subprocess.run(
            ["ip", "netns", "exec", self.hosts[host].ns, *argv],
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
        )
        if done.returncode:
            raise RuntimeError(f"{host}: {' '.join(argv)}: exit {done.returncode}\n{done.stderr}")
        return done.stdout

    def processes(self, host: str, marker: str) -> list[int]:
        """The host's processes whose command line contains `marker`."""
        found = []
        for pid in self.hosts[host].pids():
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                if marker.encode() in cmdline:
                    found.append(pid)
        return found

    # ------------------------------------------------------------------ faults
    def unplug(self, host: str) -> None:
        """Pull the host's cable: its link goes down at the bridge (connects time out)."""
        sh("ip", "-n", self.switch, "link", "set", self.hosts[host].port, "down")

    def plug(self, host: str) -> None:
        sh("ip", "-n", self.switch, "link", "set", self.hosts[host].port, "up")

    def drop(self, host: str, peer: str | None = None, inbound: bool = True,
             outbound: bool = True, probability: float | None = None) -> None:  # fmt: skip
        """Silently drop the host's traffic (to and from `peer`, else everyone): a firewall
        that says nothing, one way or both, or only a share of the packets (a lossy link)."""
        match = ["-s", self.hosts[peer].ip] if peer else []
        match_out = ["-d", self.hosts[peer].ip] if peer else []
        chance = (
            ["-m", "statistic", "--mode", "random", "--probability", str(probability)]
            if probability is not None
            else []
        )
        ns = self.hosts[host].ns
        if inbound:
            sh("ip", "netns", "exec", ns, "iptables", "-A", "INPUT", "-i", "eth0",
               *match, *chance, "-j", "DROP")  # fmt: skip
        if outbound:
            sh("ip", "netns", "exec", ns, "iptables", "-A", "OUTPUT", "-o", "eth0",
               *match_out, *chance, "-j", "DROP")  # fmt: skip

    def block(self, host: str, port: int) -> None:
        """A firewall on the host that silently drops connections to one TCP port only: the
        host, its Ray and its other ports stay reachable."""
        sh("ip", "netns", "exec", self.hosts[host].ns, "iptables", "-A", "INPUT", "-i", "eth0",
           "-p", "tcp", "--dport", str(port), "-j", "DROP")  # fmt: skip

    def heal(self, host: str) -> None:
        """Every rule `drop` added goes, the cable is in, the host thawed."""
        ns = self.hosts[host].ns
        sh("ip", "netns", "exec", ns, "iptables", "-F")
        self.plug(host)
        self.thaw(host)

    def freeze(self, host: str) -> None:
        """The host hangs: every process in it is stopped by the cgroup freezer (written from
        outside the namespace: inside `ip netns exec`, /sys/fs/cgroup is empty)."""
        group = FREEZER / self.hosts[host].ns
        group.mkdir(exist_ok=True)
        for pid in self.hosts[host].pids():
            with contextlib.suppress(OSError):
                (group / "cgroup.procs").write_text(str(pid))
        (group / "freezer.state").write_text("FROZEN")

    def thaw(self, host: str) -> None:
        _thaw_group(FREEZER / self.hosts[host].ns)

    def crash(self, host: str) -> None:
        """The host dies at once: SIGKILL to every process in it."""
        _kill_namespace(self.hosts[host].ns)


@contextlib.contextmanager
def hosts(names: Sequence[str], root: Path) -> Iterator[Hosts]:
    made = Hosts(names, root)
    try:
        made.up()
        yield made
    finally:
        made.down()
