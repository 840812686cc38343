"""The expert service (a DeepSpeed job behind gRPC) against the in-process MoE, on CPU.

    python3 bench/experts.py [--quick] [--checkpoint DIR] [--out bench/results/experts.json]

One run starts two expert pools from temporary deployments, of 1 and 2 ranks (gloo), and loads
the same checkpoint in this process. `model.threads: 1`, and this process also runs torch on one
thread: every rank and the in-process reference then compute on one core each, and the 2 ranks
together fill a 2-core machine. Rows are random hidden rows routed by each layer's own router;
the MoE layers take turns. Every path sees the same rows, and the paths take turns within each
repeat (3 repeats, 1 with --quick) so that load from other processes hits all of them.

Each pool is called over three transports: `grpc` (one Compute call through rank 0, which
scatters and gathers with the job's collectives: the old path), `tcp` (the data plane: rows
straight to each rank over ZeroMQ, services/experts/dataplane.py) and `shm` (the data plane
with the rows in shared memory, the socket only the doorbell: what a caller on the pool's host
uses), and `shm+poll`: shared memory with `expert_busy_poll_us: 500` (ranks and this caller
spin 500 us for the next frames before sleeping; a separate pool of each size).

1. Per-layer call, batch B in 1, 32, 256: the in-process routed experts (`LocalExperts`) against
   one `ExpertsClient.compute` call per batch to each pool and transport. Latency = median over
   the calls; rows/s = B / latency; hop = remote - in-process latency at the same batch: what
   one MoE layer pays for the transport, any collectives and the (de)serialisation.
2. Batching across callers: C threads (one shared channel) each send batch-1 calls; rows/s over
   all of them, mean call latency and calls per collective round (Experts.Stats). C = 1 is the
   unbatched baseline: this is what the pool's per-round batching recovers.
3. Decode step: generate() over B sequences (64-token prompts, 16 new tokens) with the model's
   routed experts in-process or remote; median step time over the decode steps (the prefill step
   is left out); per-layer overhead = (remote - local) / MoE layers.
"""

from __future__ import annotations

import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench.common import checkpoint_bench_main, format_table  # noqa: E402
from k2model import K2Model, generate, load_model  # noqa: E402
from k2model.generation import GenerationRequest  # noqa: E402
from services.deployment import Deployment  # noqa: E402
from services.experts.client import (  # noqa: E402
    ExpertsClient,
    RemoteExperts,
    SubmittedRemoteExperts,
)
from services.launcher import Suite  # noqa: E402

BATCHES = (1, 32, 256)
CALLS = {1: 60, 32: 30, 256: 10}  # per path, batch and repeat (a third with --quick)
CALLERS = (1, 8, 32)
CALLS_PER_CALLER = 20
DECODE_BATCHES = (1, 32)
PROMPT_LEN, NEW_TOKENS = 64, 16
RANKS = (1, 2)
# name -> (ExpertsClient transport, shared memory): through rank 0's rounds (the old path),
# straight to the ranks over TCP, straight to the ranks through shared memory
TRANSPORTS = {"grpc": ("grpc", False), "tcp": ("dataplane", False), "shm": ("dataplane", True)}
BUSY_POLL_US = 500  # the shm+poll path's expert_busy_poll_us
HOP_TARGET_MS = 0.3  # the data plane's hop at batch 32 on loopback (issue 17)
REPEATS = 3
SEED = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_deployment(path: Path, checkpoint: str, ranks: int, busy_poll_us: int = 0) -> Path:
    """Only experts-0 is started; the format requires the other kinds to be listed."""
    spec = {
        "checkpoint": checkpoint,
        "model": {"threads": 1},
        "tokenizer": [{"port": free_port()}],
        "prefill": [{"port": free_port()}],
        "decode": [{"port": free_port()}],
        "experts": "remote",
        "expert_busy_poll_us": busy_poll_us,
        "expert_pool": [
            {"name": "experts-0", "port": free_port(), "ranks": ranks, "master_port": free_port()}
        ],
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def routed_batches(model: K2Model, batch: int, count: int, seed: int) -> list[tuple]:
    """`count` calls of `batch` rows: (layer, x, ids, weights), layers in turn."""
    gen = torch.Generator().manual_seed(seed)
    moes = model.moe_layers()
    layers = list(moes)
    out = []
    for k in range(count):
        layer = layers[k % len(layers)]
        x = torch.randn(batch, model.cfg.hidden_size, generator=gen, dtype=model.dtype)
        out.append((layer, x, *moes[layer].router(x)))
    return out


def time_calls(fn, calls: list[tuple]) -> list[float]:
    times = []
    for call in calls:
        start = time.perf_counter()
        fn(*call)
        times.append(time.perf_counter() - start)
    return times


def per_layer(model: K2Model, clients: dict[str, ExpertsClient], quick: bool, repeats: int):
    moes = model.moe_layers()
    paths = {"in-process": lambda layer, x, ids, w: moes[layer].experts(x, ids, w)}
    paths |= {name: client.compute for name, client in clients.items()}
    rows = []
    for batch in BATCHES:
        count = max(3, CALLS[batch] // (3 if quick else 1))
        samples: dict[str, list[float]] = {p: [] for p in paths}
        for r in range(repeats):
            calls = routed_batches(model, batch, count, SEED + r)
            for name, fn in paths.items():
                fn(*calls[0])  # warm-up
                samples[name] += time_calls(fn, calls)
        local = statistics.median(samples["in-process"])
        for name, times in samples.items():
            lat = statistics.median(times)
            rows.append(
                {
                    "path": name,
                    "batch": batch,
                    "latency_ms": 1e3 * lat,
                    "rows_per_s": batch / lat,
                    "hop_ms": 1e3 * (lat - local) if name != "in-process" else None,
                }
            )
        print(f"  per-layer batch {batch} done", flush=True)
    return rows


def callers(model: K2Model, name: str, client: ExpertsClient, repeats: int) -> list[dict]:
    rows = []
    for c in CALLERS:
        walls, lats, calls, rounds = [], [], 0, 0
        for r in range(repeats):
            work = [
                routed_batches(model, 1, CALLS_PER_CALLER, SEED + 100 * r + k) for k in range(c)
            ]
            before = client.stats()
            with ThreadPoolExecutor(c) as pool:
                start = time.perf_counter()
                per_thread = list(pool.map(lambda w: time_calls(client.compute, w), work))
                walls.append(time.perf_counter() - start)
            after = client.stats()
            lats += [t for ts in per_thread for t in ts]
            calls += after.calls - before.calls
            rounds += after.rounds - before.rounds
        wall = statistics.median(walls)
        rows.append(
            {
                "pool": name,
                "callers": c,
                "rows_per_s": c * CALLS_PER_CALLER / wall,
                "mean_latency_ms": 1e3 * statistics.fmean(lats),
                "calls_per_round": calls / rounds if rounds else None,  # gRPC's rounds only
            }
        )
    print(f"  callers on {name} done", flush=True)
    return rows


def use(model: K2Model, client: ExpertsClient | None) -> None:
    """Route every MoE layer to the pool behind `client`, or back in-process for None."""
    for layer, moe in model.moe_layers().items():
        if client is None:
            moe.remote = None
        else:
            remote = SubmittedRemoteExperts if client.transport == "dataplane" else RemoteExperts
            moe.remote = remote(client, layer)


def step_times(model: K2Model, batch: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(model.cfg.vocab_size, (batch, PROMPT_LEN), generator=gen).tolist()
    times, last = [], time.perf_counter()
    for _ in generate(model, [GenerationRequest(p, NEW_TOKENS) for p in prompts]):
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times[1:]  # the first step is the prompts' prefill


def decode_steps(model: K2Model, clients: dict[str, ExpertsClient], repeats: int) -> list[dict]:
    paths: dict[str, ExpertsClient | None] = {"in-process": None, **clients}
    n_moe = len(model.moe_layers())
    rows = []
    for batch in DECODE_BATCHES:
        samples: dict[str, list[float]] = {p: [] for p in paths}
        for r in range(repeats):
            for name, client in paths.items():
                use(model, client)
                samples[name] += step_times(model, batch, SEED + r)
        use(model, None)
        local = statistics.median(samples["in-process"])
        for name, times in samples.items():
            step = statistics.median(times)
            extra = (step - local) / n_moe if name != "in-process" else None
            rows.append(
                {
                    "path": name,
                    "batch": batch,
                    "step_ms": 1e3 * step,
                    "overhead_per_moe_layer_ms": None if extra is None else 1e3 * extra,
                }
            )
        print(f"  decode batch {batch} done", flush=True)
    return rows


def bench(checkpoint: str, quick: bool) -> dict[str, Any]:
    repeats = 1 if quick else REPEATS
    torch.set_num_threads(1)
    suites: list[Suite] = []
    clients: dict[str, ExpertsClient] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for ranks in RANKS:
                for poll in (0, BUSY_POLL_US):
                    path = write_deployment(
                        Path(tmp) / f"d{ranks}{poll}.yaml", checkpoint, ranks, poll
                    )
                    print(f"starting an expert pool of {ranks} rank(s) ...", flush=True)
                    suite = Suite(path)
                    suites.append(suite)
                    suite.start(names=["experts-0"])
                    target = suite.deployment.instance("experts-0").target
                    suffix = f"{ranks} rank{'s' * (ranks > 1)}"
                    if poll:
                        clients[f"shm+poll {suffix}"] = ExpertsClient(
                            target, busy_poll_s=poll / 1e6
                        )
                        continue
                    for transport, (kind, shared) in TRANSPORTS.items():
                        clients[f"{transport} {suffix}"] = ExpertsClient(
                            target, transport=kind, shared_memory=shared
                        )
            dep = Deployment.load(path)
            model = load_model(dep.checkpoint, dep.torch_dtype(), dep.fp8_resident)
            result = {
                "per_layer": per_layer(model, clients, quick, repeats),
                "callers": [
                    row
                    for name, client in clients.items()
                    for row in callers(model, name, client, repeats)
                ],
                "decode": decode_steps(model, clients, repeats),
            }
        finally:
            for client in clients.values():
                client.close()
            for suite in suites:
                suite.stop()
    result["meta"] = {
        "checkpoint": str(dep.checkpoint),
        "dtype": str(model.dtype),
        "moe_layers": len(model.moe_layers()),
        "experts": model.cfg.n_routed_experts,
        "top_k": model.cfg.num_experts_per_tok,
        "hidden_size": model.cfg.hidden_size,
        "torch_threads_here_and_per_rank": 1,
        "repeats": repeats,
    }
    return result


def summary(result: dict[str, Any]) -> list[str]:
    lat = {(r["path"], r["batch"]): r["latency_ms"] for r in result["per_layer"]}
    lines = []
    for name in [p for p in dict.fromkeys(r["path"] for r in result["per_layer"])][1:]:
        hop1 = lat[name, 1] - lat["in-process", 1]
        one_by_one = 32 * lat[name, 1]
        lines.append(
            f"{name}: the hop costs {hop1:.2f} ms per MoE layer at batch 1; one batch-32 call "
            f"takes {lat[name, 32]:.2f} ms against {one_by_one:.1f} ms for 32 batch-1 calls "
            f"({one_by_one / lat[name, 32]:.0f}x)"
        )
    by = {(r["pool"], r["callers"]): r for r in result["callers"]}
    for pool in dict.fromkeys(r["pool"] for r in result["callers"]):
        one, many = by[pool, CALLERS[0]], by[pool, CALLERS[-1]]
        per_round = many["calls_per_round"]
        lines.append(
            f"{pool}: {many['callers']} concurrent batch-1 callers get "
            f"{many['rows_per_s'] / one['rows_per_s']:.1f}x the rows/s of one caller"
            + (f" ({per_round:.1f} calls per round)" if per_round else "")
        )
    hop = {(r["path"], r["batch"]): r["hop_ms"] for r in result["per_layer"]}
    for ranks in RANKS:
        suffix = f"{ranks} rank{'s' * (ranks > 1)}"
        old, tcp, shm, spin = (hop[f"{t} {suffix}", 32] for t in (*TRANSPORTS, "shm+poll"))
        met = "met" if min(tcp, shm, spin) <= HOP_TARGET_MS else "NOT met"
        lines.append(
            f"{suffix}: hop at batch 32 {old:.2f} ms over gRPC, {tcp:.2f} ms over the data plane's "
            f"TCP, {shm:.2f} ms through its shared memory, {spin:.2f} ms busy-polling; target "
            f"<= {HOP_TARGET_MS} ms {met}"
        )
    return lines


def print_report(result: dict[str, Any]) -> None:
    for key in ("per_layer", "callers", "decode"):
        table = result[key]
        cells = [["-" if v is None else v for v in r.values()] for r in table]
        print(f"\n{key}\n{format_table(list(table[0]), cells)}")
    print("\n" + "\n".join(summary(result)))


def main() -> None:
    checkpoint_bench_main(
        __doc__,
        "a third of the calls, one repeat",
        Path("bench/results/experts.json"),
        bench,
        print_report,
    )


if __name__ == "__main__":
    main()
