"""Where the ranks of an expert job meet: a TCPStore that node 0's supervisor hosts.

The store outlives the jobs it serves, so a restarted job can meet in it again. Before starting
its ranks, node 0's supervisor publishes a new *generation*; every rank of that job (on any node)
initialises torch.distributed under a key prefix of its generation, so the ranks of a dying job
and of its successor never mix. The supervisors of the other nodes follow the generation: they
start their ranks into each new one and end them when it is replaced (a joint restart), which is
how a pool spanning nodes restarts as one job.

Who can reach it: torch.distributed's store (like its gloo and NCCL collectives) has no
authentication, so it is bound to node 0's pool address only (torch's TCPStore would listen on
every interface: it is handed a socket bound here instead) and must sit on the deployment's
private network. The compose files never publish it (README, "Threat model").
"""

from __future__ import annotations

import fcntl
import socket
import struct
import uuid
from datetime import timedelta

import torch.distributed as dist

GENERATION = "k2/generation"
GENERATION_ENV = "K2_EXPERTS_GENERATION"  # a rank's generation, set by its supervisor
CONNECT_S = 5.0


class Rendezvous:
    def __init__(self, store: dist.TCPStore, hosting: bool) -> None:
        self.store, self.hosting = store, hosting
        self._token, self._count = uuid.uuid4().hex[:12], 0

    @classmethod
    def host(cls, address: str, port: int) -> Rendezvous:
        """Node 0: serve the store on `address:port` (node 0's pool address) and nowhere else."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((socket.gethostbyname(address), port))
            listener.listen(1024)
        except OSError:
            listener.close()
            raise
        store = dist.TCPStore(
            address,
            port,
            is_master=True,
            wait_for_workers=False,
            timeout=_s(CONNECT_S),
            master_listen_fd=listener.detach(),  # the store owns the socket from here on
        )
        return cls(store, hosting=True)

    @classmethod
    def connect(cls, address: str, port: int) -> Rendezvous:
        """Another node: a client of node 0's store (raises if it is not up within CONNECT_S)."""
        return cls(dist.TCPStore(address, port, is_master=False, timeout=_s(CONNECT_S)), False)

    def publish(self) -> str:
        """Node 0: a new generation, unique across restarts of this supervisor too."""
        self._count += 1
        generation = f"{self._token}.{self._count}"
        self.store.set(GENERATION, generation)
        return generation

    def current(self) -> str | None:
        """The generation node 0 published last, or None before the first."""
        if not self.store.check([GENERATION]):
            return None
        return self.store.get(GENERATION).decode()


def job_store(address: str, port: int, generation: str, timeout_s: float) -> dist.Store:
    """A rank's view of the store: the keys of its own generation only."""
    store = dist.TCPStore(address, port, is_master=False, timeout=_s(timeout_s))
    return dist.PrefixStore(f"k2/job/{generation}/", store)


def _s(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def interface_for(address: str) -> str | None:
    """The name of this machine's network interface that holds `address` (a name or an IP),
    or None. The ranks' collectives must listen there: gloo otherwise picks the interface of the
    machine's hostname, or loopback when that does not resolve (as in a container or a network
    namespace), and peers on other nodes cannot reach loopback."""
    try:
        ip = socket.inet_aton(socket.gethostbyname(address))
    except OSError:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                ifreq = fcntl.ioctl(
                    s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15])
                )
            except OSError:  # no IPv4 address on this interface
                continue
            if ifreq[20:24] == ip:
                return name
    return None


_SIOCGIFADDR = 0x8915
