"""Several "hosts" on one machine: network namespaces joined by a bridge (docs/reliability.md section 6).

`Network` builds, as root:
- a switch namespace holding a bridge, and one namespace per host, each wired to the bridge with
  a veth pair (eth0 inside the host, an address on one private /24);
- a veth from the test process's own namespace to the bridge, so tests reach every host by address
  (host names resolve only inside the hosts: /etc/netns/<ns>/hosts, read by `ip netns exec`);
- faults: a partition (iptables DROP both ways between two hosts), random loss (iptables
  statistic), each undone by `heal()`.

It ends only the processes it started, by pid, and removes everything it created in `close()`.
`unavailable()` says why namespaces cannot be used here (None when they can).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.common.processes import terminate

ETC_NETNS = Path("/etc/netns")
TOOLS = ("ip", "iptables")


def _sh(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"not installed: {missing} (apt-get install iproute2 iptables nftables)"
    probe = f"k2probe{os.getpid()}"
    try:
        _sh("ip", "netns", "add", probe)
        _sh("ip", "netns", "exec", probe, "iptables", "-L", "OUTPUT")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns add` / iptables not permitted here: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 under 10.213.0.0/16 that no route of this machine overlaps."""
    used = [
        ipaddress.ip_network(word, strict=False)
        for line in _sh("ip", "-4", "route").splitlines()
        for word in line.split()[:1]
        if word[0].isdigit()
    ]
    for net in ipaddress.ip_network("10.213.0.0/16").subnets(new_prefix=24):
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free 10.213.x.0/24 subnet")


@dataclass(frozen=True)
class Host:
    name: str  # the host name other hosts resolve
    ns: str  # its network namespace
    ip: str


@dataclass
class Network:
    hosts: dict[str, Host]
    tag: str
    switch: str
    procs: list[subprocess.Popen] = field(default_factory=list)
    _rules: list[tuple[str, list[str]]] = field(default_factory=list)
    _throttled: list[str] = field(default_factory=list)  # namespaces with a rate limit
    _links: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, names: Sequence[str]) -> Network:
        tag = f"k2{os.getpid() % 100000}"
        net = _free_subnet()
        ips = [str(ip) for ip in net.hosts()]
        hosts = {name: Host(name, f"{tag}-{name}", ips[i]) for i, name in enumerate(names, start=1)}
        self = cls(hosts, tag, f"{tag}-switch")
        try:
            self._wire(ips[-1], net.prefixlen)
        except BaseException:
            self.close()
            raise
        return self

    def _wire(self, tester_ip: str, prefix: int) -> None:
        _sh("ip", "netns", "add", self.switch)
        _sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        hosts_file = "127.0.0.1 localhost\n" + "".join(
            f"{h.ip} {h.name}\n" for h in self.hosts.values()
        )
        for i, host in enumerate(self.hosts.values()):
            _sh("ip", "netns", "add", host.ns)
            (ETC_NETNS / host.ns).mkdir(parents=True, exist_ok=True)
            (ETC_NETNS / host.ns / "hosts").write_text(hosts_file)
            self._plug(f"{self.tag}h{i}", host.ns, "eth0", f"{host.ip}/{prefix}")
            _sh("ip", "-n", host.ns, "link", "set", "lo", "up")
        # The tester's own end stays in this namespace: its name is the link to delete at close.
        tester = f"{self.tag}t"
        _sh("ip", "link", "add", tester, "type", "veth", "peer", "name", f"{tester}p")
        self._links.append(tester)
        _sh("ip", "link", "set", f"{tester}p", "netns", self.switch)
        _sh("ip", "-n", self.switch, "link", "set", f"{tester}p", "master", "br0", "up")
        _sh("ip", "addr", "add", f"{tester_ip}/{prefix}", "dev", tester)
        _sh("ip", "link", "set", tester, "up")

    def _plug(self, link: str, ns: str, inner: str, cidr: str) -> None:
        """A veth from the bridge to `inner` inside ns."""
        _sh("ip", "link", "add", link, "type", "veth", "peer", "name", inner, "netns", ns)
        _sh("ip", "link", "set", link, "netns", self.switch)
        _sh("ip", "-n", self.switch, "link", "set", link, "master", "br0", "up")
        _sh("ip", "-n", ns, "addr", "add", cidr, "dev", inner)
        _sh("ip", "-n", ns, "link", "set", inner, "up")

    def spawn(self, host: str, cmd: Sequence[str], log: Path) -> subprocess.Popen:
        """Run cmd inside host's namespace (`ip netns exec` execs it: the pid is cmd's own)."""
        with log.open("ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.hosts[host].ns, *cmd],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def _rule(self, host: str, rule: list[str]) -> None:
        ns = self.hosts[host].ns
        _sh("ip", "netns", "exec", ns, "iptables", "-A", *rule)
        self._rules.append((ns, rule))

    def partition(self, a: str, b: str) -> None:
        """Drop every packet between hosts a and b (both directions, at a)."""
        peer = self.hosts[b].ip
        self._rule(a, ["OUTPUT", "-d", peer, "-j", "DROP"])
        self._rule(a, ["INPUT", "-s", peer, "-j", "DROP"])

    def lose(self, a: str, b: str, probability: float) -> None:
        """Drop each packet between a and b with this probability, in both directions."""
        peer = self.hosts[b].ip
        rand = ["-m", "statistic", "--mode", "random", "--probability", f"{probability}"]
        self._rule(a, ["OUTPUT", "-d", peer, *rand, "-j", "DROP"])
        self._rule(a, ["INPUT", "-s", peer, *rand, "-j", "DROP"])

    def throttle(self, host: str, toward: str, rate: str) -> None:
        """Cap what `host` sends to `toward` (a token bucket for that destination alone, e.g.
        rate "2mbit"), so a transfer between them takes long enough for a fault to land in its
        middle while everything else `host` sends (its Stats replies) goes at full speed."""
        ns, dev = self.hosts[host].ns, ["dev", "eth0"]
        tc = ["ip", "netns", "exec", ns, "tc"]
        _sh(*tc, "qdisc", "add", *dev, "root", "handle", "1:", "htb", "default", "10")
        for classid, cap in (("1:10", "10gbit"), ("1:20", rate)):
            _sh(*tc, "class", "add", *dev, "parent", "1:", "classid", classid, "htb", "rate", cap)
        match = ["u32", "match", "ip", "dst", f"{self.hosts[toward].ip}/32", "flowid", "1:20"]
        _sh(*tc, "filter", "add", *dev, "parent", "1:", "protocol", "ip", "prio", "1", *match)
        self._throttled.append(ns)

    def dropped(self, host: str) -> int:
        """Packets the fault rules at this host have dropped so far."""
        table = _sh("ip", "netns", "exec", self.hosts[host].ns, "iptables", "-L", "-v", "-n", "-x")
        return sum(int(line.split()[0]) for line in table.splitlines() if " DROP " in line)

    def heal(self) -> None:
        while self._rules:
            ns, rule = self._rules.pop()
            _sh("ip", "netns", "exec", ns, "iptables", "-D", *rule)
        while self._throttled:
            _sh(
                "ip",
                "netns",
                "exec",
                self._throttled.pop(),
                "tc",
                "qdisc",
                "del",
                "dev",
                "eth0",
                "root",
            )

    def close(self, grace_s: float = 10.0) -> None:
        terminate(self.procs, grace_s)
        for host in self.hosts.values():
            subprocess.run(["ip", "netns", "del", host.ns], capture_output=True)
            shutil.rmtree(ETC_NETNS / host.ns, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True)
        for link in self._links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)
