"""Shared-memory segments for the expert data plane between processes on one host.

A caller that shares a host (and a user) with a rank writes a layer's rows, pairs and weights
into a segment it created under /dev/shm, and the rank computes from it in place and writes the
partial sums back into it: over the socket only the header and the segment's name cross (the
socket stays the doorbell, so a rank's death or a partition is seen exactly as over TCP).
bench/transport.py measured this against TCP loopback: about half the round trip at K2's widest
rows.

A segment is named `k2ex-` and 32 hex digits and begins with a 16-byte nonce that the caller
also sends with every request: a rank maps only names of that form, and only when the nonce
matches. Segments are allocated once per caller and reused; each is a file with mode 0600 under
/dev/shm, its pages reserved when it is made (a /dev/shm too small for it is an OSError there,
and that step's rows go as bytes), that its caller holds a shared `flock` on for as long as it
lives. The caller deletes it
on close; one whose caller died without closing (SIGKILL) is deleted by the next `sweep` (every
caller and rank runs one when it starts): its lock is gone, so an exclusive one succeeds.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import mmap
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch

SHM_DIR = Path("/dev/shm")
PREFIX = "k2ex-"
NAME_BYTES = len(PREFIX) + 32
NONCE_BYTES = 16
_NAME = re.compile(rf"{PREFIX}[0-9a-f]{{32}}")
_ALIGN = 64
MAPPED = 32  # segments a rank keeps mapped (least recently used first out)
REFUSAL = "segment: "  # how a rank's refusal of a segment begins
SMALLEST = 4 * 2**20  # bytes; only the pages written are backed, and segments rarely regrow


def available() -> bool:
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class Layout:
    """Where one request's tensors lie in a segment (both sides derive it from the header)."""

    x: int
    pairs: int
    weights: int
    out: int
    end: int

    @classmethod
    def of(cls, rows: int, pairs: int, hidden: int, itemsize: int) -> Layout:
        x = _align(NONCE_BYTES)
        p = x + _align(rows * hidden * itemsize)
        w = p + _align(pairs * 2 * 4)
        out = w + _align(pairs * 4)
        return cls(x, p, w, out, out + _align(rows * hidden * itemsize))


def view(buf: mmap.mmap, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor over the segment's bytes (no copy); empty shapes get their own."""
    count = 1
    for n in shape:
        count *= n
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=count, offset=offset).view(shape)


class Segment:
    """The caller's side: one segment it created, reused for request after request."""

    def __init__(self, size: int) -> None:
        self.size = max(size, _ALIGN)
        self.name = PREFIX + secrets.token_hex(16)
        self.nonce = secrets.token_bytes(NONCE_BYTES)
        self.path = SHM_DIR / self.name
        # made under a name `sweep` ignores and renamed once locked: it never sees it unlocked
        making = SHM_DIR / f"{PREFIX}new-{self.name[len(PREFIX) :]}"
        fd = os.open(making, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # held for life: `sweep` leaves a live segment alone
            # reserved now: a write past a full /dev/shm (docker's is 64 MiB) would be a SIGBUS
            os.posix_fallocate(fd, 0, self.size)
            self.buf = mmap.mmap(fd, self.size)
            os.rename(making, self.path)
        except BaseException:
            os.close(fd)
            making.unlink(missing_ok=True)
            raise
        self._fd = fd
        self.buf[:NONCE_BYTES] = self.nonce

    def close(self) -> None:
        self.path.unlink(missing_ok=True)
        with contextlib.suppress(BufferError):  # a tensor over it lives: the mapping goes with it
            self.buf.close()
        os.close(self._fd)


class Mappings:
    """The rank's side: the segments its callers named, mapped on first use (nonce checked),
    at most MAPPED of them, least recently used unmapped first."""

    def __init__(self, capacity: int = MAPPED, root: Path = SHM_DIR) -> None:
        self.capacity, self.root = capacity, root
        self._maps: collections.OrderedDict[str, mmap.mmap] = collections.OrderedDict()

    def get(self, name: str, nonce: bytes, need: int) -> mmap.mmap:
        """The mapping of segment `name`, at least `need` bytes; ValueError naming what is wrong."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"{REFUSAL}{name!r} is not a data-plane segment name")
        buf = self._maps.get(name)
        if buf is None:
            buf = self._map(name)
        self._maps.move_to_end(name)
        if buf[:NONCE_BYTES] != nonce:
            raise ValueError(f"{REFUSAL}its nonce does not match the request's")
        if buf.size() < need:
            raise ValueError(f"{REFUSAL}{buf.size()} bytes, the request needs {need}")
        return buf

    def _map(self, name: str) -> mmap.mmap:
        try:
            fd = os.open(self.root / name, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as exc:
            raise ValueError(f"{REFUSAL}cannot open {name} here ({exc.strerror})") from exc
        try:
            buf = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        self._maps[name] = buf
        while len(self._maps) > self.capacity:
            self._drop(next(iter(self._maps)))
        return buf

    def _drop(self, name: str) -> None:
        buf = self._maps.pop(name, None)
        if buf is not None:
            with contextlib.suppress(BufferError):  # a tensor over it lives: it goes with it
                buf.close()

    def close(self) -> None:
        for name in list(self._maps):
            self._drop(name)


def sweep() -> int:
    """Deletes the segments of callers that died without closing them; how many."""
    if not available():
        return 0
    removed = 0
    for path in SHM_DIR.glob(f"{PREFIX}*"):
        if not _NAME.fullmatch(path.name):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its caller lives
        else:
            path.unlink(missing_ok=True)
            removed += 1
        finally:
            os.close(fd)
    return removed
