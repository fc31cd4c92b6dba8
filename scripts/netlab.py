"""An emulated internet in network namespaces (root only): a hub bridge for "the internet", hosts with a public
address on it, and hosts behind a home router that masquerades them (iptables NAT: they can dial out, nobody can
dial in). Links can be shaped with tc tbf. Used by scripts/rehearsal.py and the NAT tests.

Everything lives in namespaces named `<prefix><pid>...`; `down()` removes them (and kills what runs inside), and
`sweep_stale()` removes those of an earlier run that was SIGKILLed. No traffic leaves the namespaces.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass

PUBLIC_SUBNET = "10.78.0"  # "public" addresses, only inside the lab's namespaces
HOME_SUBNET = "10.79"  # 10.79.<router>.0/24 behind router <router>
CMD_TIMEOUT_S = 10.0


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=CMD_TIMEOUT_S)


def unavailable_reason() -> str | None:
    """None if this machine can build the lab (root, ip, tc, iptables with NAT); otherwise why not."""
    if os.geteuid() != 0:
        return "needs root (ip netns, iptables)"
    for tool in ("ip", "tc", "iptables"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (apt-get install iproute2 iptables)"
    probe = f"dlprobe{os.getpid()}"
    try:
        sh("ip", "netns", "add", probe)
        sh("ip", "netns", "exec", probe, "iptables", "-t", "nat", "-A", "POSTROUTING", "-j", "MASQUERADE")
        sh("ip", "-n", probe, "link", "add", "probe_a", "type", "veth", "peer", "name", "probe_b")
        sh("ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "probe_a", "root", "tbf",
           "rate", "10mbit", "burst", "32kb", "latency", "50ms")  # fmt: skip
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        return f"`{' '.join(e.cmd)}` failed: {getattr(e, 'stderr', '') or e}".strip()
    finally:
        sh("ip", "netns", "del", probe, check=False)
    return None


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str
    """Its own address: public, or private behind its router."""
    public_address: str
    """The address others see it come from (its router's, behind NAT)."""
    behind_nat: bool
    hub_link: str
    """The hub-side end of the link that carries its traffic (to shape its download)."""
    link: str
    """Its own interface (to shape its upload)."""


class Netlab:
    """The lab; call up() hosts with add_public()/add_behind_nat(), down() at the end (also on signals)."""

    def __init__(self, prefix: str = "dln"):
        self.tag = f"{prefix}{os.getpid()}"
        self.prefix = prefix
        self.hub = f"{self.tag}hub"
        self.created: list[str] = []
        self.hosts: dict[str, Host] = {}
        self._next_public = 1
        self._next_router = 1

    def _namespace(self, name: str) -> str:
        sh("ip", "netns", "add", name)
        self.created.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def up(self) -> Netlab:
        self.sweep_stale(self.prefix)
        self._namespace(self.hub)
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        return self

    def _link_to_hub(self, namespace: str, device: str) -> tuple[str, str]:
        """A veth from the namespace to the hub bridge, with the next public address; returns (address, hub end)."""
        index = self._next_public
        self._next_public += 1
        hub_end = f"h{index}"
        sh(
            "ip",
            "-n",
            self.hub,
            "link",
            "add",
            hub_end,
            "type",
            "veth",
            "peer",
            "name",
            device,
            "netns",
            namespace,
        )
        sh("ip", "-n", self.hub, "link", "set", hub_end, "master", "br0")
        sh("ip", "-n", self.hub, "link", "set", hub_end, "up")
        address = f"{PUBLIC_SUBNET}.{index}"
        sh("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", device)
        sh("ip", "-n", namespace, "link", "set", device, "up")
        return address, hub_end

    def add_public(self, name: str) -> Host:
        namespace = self._namespace(f"{self.tag}{name}")
        address, hub_end = self._link_to_hub(namespace, "eth0")
        host = Host(namespace, address, address, False, hub_end, "eth0")
        self.hosts[name] = host
        return host

    def add_behind_nat(self, name: str) -> Host:
        """A host behind its own home router: the router masquerades it on the public side, drops what comes in."""
        router_index = self._next_router
        self._next_router += 1
        router = self._namespace(f"{self.tag}{name}r")
        namespace = self._namespace(f"{self.tag}{name}")
        public, hub_end = self._link_to_hub(router, "wan0")
        lan = f"{HOME_SUBNET}.{router_index}"
        sh(
            "ip",
            "-n",
            router,
            "link",
            "add",
            "lan0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            namespace,
        )
        sh("ip", "-n", router, "addr", "add", f"{lan}.1/24", "dev", "lan0")
        sh("ip", "-n", router, "link", "set", "lan0", "up")
        sh("ip", "-n", namespace, "addr", "add", f"{lan}.2/24", "dev", "eth0")
        sh("ip", "-n", namespace, "link", "set", "eth0", "up")
        sh("ip", "-n", namespace, "route", "add", "default", "via", f"{lan}.1")
        in_router = ("ip", "netns", "exec", router)
        sh(*in_router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh(
            *in_router,
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            f"{lan}.0/24",
            "-o",
            "wan0",
            "-j",
            "MASQUERADE",
        )
        # a home router: replies to our connections come back in, nothing else does
        sh(*in_router, "iptables", "-A", "FORWARD", "-i", "wan0", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")  # fmt: skip
        sh(*in_router, "iptables", "-A", "FORWARD", "-i", "wan0", "-j", "DROP")
        host = Host(namespace, f"{lan}.2", public, True, hub_end, "eth0")
        self.hosts[name] = host
        return host

    def shape(self, name: str, rate_mbit: float) -> None:
        """A token bucket on the host's link, both directions (its upload and its download) at rate_mbit."""
        host = self.hosts[name]
        rate_bytes_s = rate_mbit * 1e6 / 8
        burst = max(128 * 1024, int(rate_bytes_s / 100))  # >= a 64 KiB GSO segment; <= 10 ms at line rate
        upload_ns = f"{host.namespace}r" if host.behind_nat else host.namespace
        upload_dev = "wan0" if host.behind_nat else host.link
        for ns, dev in ((upload_ns, upload_dev), (self.hub, host.hub_link)):
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
               "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "100ms")  # fmt: skip

    def command(self, name: str, *argv: str) -> list[str]:
        """argv run inside the host's namespace."""
        return ["ip", "netns", "exec", self.hosts[name].namespace, *argv]

    def down(self) -> None:
        for name in reversed(self.created):
            delete_namespace(name)
        self.created.clear()

    @staticmethod
    def sweep_stale(prefix: str) -> None:
        """Remove namespaces of an earlier lab of this prefix whose process is gone (it was SIGKILLed)."""
        listing = sh("ip", "netns", "list", check=False).stdout
        for name, pid in re.findall(rf"^({prefix}(\d+)\w*)", listing, flags=re.M):
            if not _pid_alive(int(pid)):
                delete_namespace(name)


def delete_namespace(name: str) -> None:
    """Kill what runs inside (the lab started it), then delete the namespace and its links."""
    for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    sh("ip", "netns", "del", name, check=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
