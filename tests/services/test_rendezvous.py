"""The expert pool's rendezvous store listens on node 0's pool address only.

Regression: the store (torch's TCPStore, which has no authentication) was
served on 0.0.0.0, every interface of node 0, whatever the deployment named."""

from __future__ import annotations

import socket
from pathlib import Path

from services.experts.rendezvous import Rendezvous
from tests.e2e.suite_fixtures import free_port


def listening(port: int) -> set[str]:
    """The IPv4 addresses something listens on at `port`, from /proc/net/tcp."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            out.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return out


def test_the_store_listens_on_the_pool_address_only() -> None:
    port = free_port()
    rendezvous = Rendezvous.host("127.0.0.1", port)
    assert listening(port) == {"127.0.0.1"}
    generation = rendezvous.publish()
    assert Rendezvous.connect("127.0.0.1", port).current() == generation


def test_a_name_is_resolved_to_the_address_it_binds() -> None:
    port = free_port()
    rendezvous = Rendezvous.host("localhost", port)  # held: the store closes with it
    assert rendezvous.hosting
    assert listening(port) == {socket.gethostbyname("localhost")}
