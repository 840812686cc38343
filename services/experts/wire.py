"""The expert data plane's messages: raw tensor buffers behind a small checked header.

A caller sends each expert rank the rows routed to it; the rank answers with their partial sums.
Everything that is not a raw buffer (endpoints, errors of the pool as a whole, stats) stays
protobuf on the gRPC control plane (experts.proto).

Request, as ZeroMQ multipart frames:
    header | rows x [R, D] (dtype) | pairs int32 [P, 2] (row in x, expert local to the rank) |
    weights fp32 [P]
Reply: header | partial sums [R, D] (the request's dtype); or an error header | UTF-8 message.
Between processes on one host the tensors lie in a shared-memory segment of the caller's
(segment.py, at the offsets `segment.Layout` derives from the header) and only
    header (kind SHM_REQUEST) | segment name (ASCII) + its 16-byte nonce
crosses, answered by a lone header of kind SHM_REPLY once the partial sums are in the segment.

Header (little-endian, 44 bytes): magic "K2EX", version, kind, dtype, layer, rows, pairs, step
(the caller's sequence number: a reply to an earlier, abandoned step is recognised and dropped)
and the pool's 16-byte token (issued on the authenticated control plane: a frame without it is
refused). `decode_request` checks every size against the header and the pool's shape before a
byte is used as a tensor.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

MAGIC, VERSION = b"K2EX", 1
REQUEST, REPLY, ERROR, SHM_REQUEST, SHM_REPLY = 1, 2, 3, 4, 5
_KINDS = (REQUEST, REPLY, ERROR, SHM_REQUEST, SHM_REPLY)
TOKEN_BYTES = 16
_HEADER = struct.Struct("<4sHBBIIIQ16s")
HEADER_BYTES = _HEADER.size
_DTYPES = {0: torch.float32, 1: torch.bfloat16}
_CODES = {v: k for k, v in _DTYPES.items()}
Frame = bytes | bytearray | memoryview


class WireError(ValueError):
    """A frame set that does not fit the header or the pool (the message names what)."""


@dataclass(frozen=True)
class Header:
    kind: int
    dtype: torch.dtype
    layer: int
    rows: int
    pairs: int
    step: int
    token: bytes

    def encode(self) -> bytes:
        code = _CODES[self.dtype]
        return _HEADER.pack(
            MAGIC,
            VERSION,
            self.kind,
            code,
            self.layer,
            self.rows,
            self.pairs,
            self.step,
            self.token,
        )

    @classmethod
    def decode(cls, frame: Frame) -> Header:
        if len(frame) != HEADER_BYTES:
            raise WireError(f"header: {len(frame)} bytes, expected {HEADER_BYTES}")
        magic, version, kind, code, layer, rows, pairs, step, token = _HEADER.unpack(frame)
        if magic != MAGIC or version != VERSION:
            raise WireError(f"header: not a version-{VERSION} expert frame ({magic!r} v{version})")
        if kind not in _KINDS or code not in _DTYPES:
            raise WireError(f"header: unknown kind {kind} or dtype code {code}")
        return cls(kind, _DTYPES[code], layer, rows, pairs, step, token)


@dataclass(frozen=True)
class Request:
    header: Header
    x: torch.Tensor  # [rows, D]
    pairs: torch.Tensor  # [pairs, 2] int32: row, local expert
    weights: torch.Tensor  # [pairs] fp32


def _tensor(frame: Frame, dtype: torch.dtype, shape: tuple[int, ...], what: str) -> torch.Tensor:
    want = dtype.itemsize
    for n in shape:
        want *= n
    if len(frame) != want:
        raise WireError(f"{what}: {len(frame)} bytes, expected {want} for {list(shape)} {dtype}")
    if want == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(frame, dtype=dtype).view(shape)


def encode_request(
    layer: int,
    step: int,
    token: bytes,
    x: torch.Tensor,
    pairs: torch.Tensor,
    weights: torch.Tensor,
) -> list[Frame]:
    header = Header(REQUEST, x.dtype, layer, x.shape[0], pairs.shape[0], step, token)
    return [header.encode(), *(_bytes(t) for t in (x, pairs.to(torch.int32), weights.float()))]


def decode_header(frames: list[Frame], token: bytes, layers: frozenset[int]) -> Header:
    """A request's header (REQUEST or SHM_REQUEST, its frame count checked), or WireError. An
    SHM_REQUEST of no rows is a segment's offer (segment.py): its layer is not looked at."""
    if not frames:
        raise WireError("request: no frames")
    header = Header.decode(frames[0])
    offer = header.kind == SHM_REQUEST and header.rows == header.pairs == 0
    want = {REQUEST: 4, SHM_REQUEST: 2}.get(header.kind)
    if want is None:
        raise WireError(f"request: kind {header.kind}")
    if len(frames) != want:
        raise WireError(f"request: {len(frames)} frames, expected {want}")
    if header.token != token:
        raise WireError("request: wrong pool token (endpoints are stale: the pool restarted)")
    if header.layer not in layers and not offer:
        raise WireError(f"layer: {header.layer} is not an MoE layer")
    return header


def decode_request(header: Header, frames: list[Frame], hidden: int, n_local: int) -> Request:
    """A REQUEST's tensors (views of its frames; its header from `decode_header`), or WireError
    naming the first thing that does not fit."""
    if header.kind != REQUEST:
        raise WireError(f"request: kind {header.kind}")
    x = _tensor(frames[1], header.dtype, (header.rows, hidden), "rows")
    pairs = _tensor(frames[2], torch.int32, (header.pairs, 2), "pairs")
    weights = _tensor(frames[3], torch.float32, (header.pairs,), "weights")
    return checked(Request(header, x, pairs, weights), n_local)


def checked(request: Request, n_local: int) -> Request:
    """The request, once every pair names one of its rows and one of the rank's experts."""
    if request.header.pairs:
        low, high = (v.tolist() for v in torch.aminmax(request.pairs, dim=0))
        if low[0] < 0 or high[0] >= request.header.rows:
            raise WireError(f"pairs: a row index outside [0, {request.header.rows})")
        if low[1] < 0 or high[1] >= n_local:
            raise WireError(f"pairs: an expert outside this rank's [0, {n_local})")
    return request


def encode_shm_request(
    layer: int,
    step: int,
    token: bytes,
    dtype: torch.dtype,
    rows: int,
    pairs: int,
    name: str,
    nonce: bytes,
) -> list[Frame]:
    header = Header(SHM_REQUEST, dtype, layer, rows, pairs, step, token)
    return [header.encode(), name.encode("ascii") + nonce]


def decode_segment(frame: Frame, nonce_bytes: int) -> tuple[str, bytes]:
    """(segment name, nonce) of an SHM_REQUEST's second frame."""
    raw = bytes(frame)
    if len(raw) <= nonce_bytes:
        raise WireError(f"segment: {len(raw)} bytes, too short for a name and a nonce")
    return raw[:-nonce_bytes].decode("ascii", errors="replace"), raw[-nonce_bytes:]


def encode_shm_reply(request: Header) -> list[Frame]:
    header = Header(
        SHM_REPLY, request.dtype, request.layer, request.rows, 0, request.step, request.token
    )
    return [header.encode()]


def encode_reply(request: Header, out: torch.Tensor) -> list[Frame]:
    header = Header(REPLY, out.dtype, request.layer, out.shape[0], 0, request.step, request.token)
    return [header.encode(), _bytes(out)]


def encode_error(step: int, message: str) -> list[Frame]:
    header = Header(ERROR, torch.float32, 0, 0, 0, step, bytes(TOKEN_BYTES))
    return [header.encode(), message.encode()]


def decode_reply(
    frames: list[Frame], rows: int, hidden: int, dtype: torch.dtype
) -> tuple[int, torch.Tensor | str | None]:
    """(step, partial sums [rows, D]), (step, the rank's error message) or, for an SHM_REPLY,
    (step, None): the partial sums are in the caller's segment."""
    header = Header.decode(frames[0])
    if header.kind == ERROR:
        return header.step, bytes(frames[1]).decode(errors="replace")
    if (header.kind, len(frames)) not in ((REPLY, 2), (SHM_REPLY, 1)):
        raise WireError(f"reply: kind {header.kind}, {len(frames)} frames")
    if header.dtype != dtype or header.rows != rows:
        raise WireError(f"reply: {header.rows} rows of {header.dtype}, expected {rows} of {dtype}")
    if header.kind == SHM_REPLY:
        return header.step, None
    return header.step, _tensor(frames[1], dtype, (rows, hidden), "partial sums")


def _bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order, without a copy when it already is (a one-element
    view can be "contiguous" with any stride: it is copied)."""
    if t.numel() == 0:
        return memoryview(b"")
    flat = t.detach().cpu().reshape(-1)
    if flat.stride(0) != 1:
        flat = torch.empty(flat.shape, dtype=flat.dtype).copy_(flat)
    return memoryview(flat.view(torch.uint8).numpy())
