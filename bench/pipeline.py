"""The served pipeline (prefill + decode processes over gRPC) against the in-process engine, on CPU.

    python3 bench/pipeline.py [--quick] [--checkpoint DIR] [--out bench/results/pipeline.json]

One run starts a suite of 1 prefill + 1 decode process (services.launcher.Suite, temporary
deployment on free ports) and loads the same checkpoint, dtype and fp8 setting in this process.
At each concurrency C in LEVELS the same 2*C random prompts (C with --quick; 64-128 random
in-vocabulary ids each) are generated greedily for NEW_TOKENS tokens, with no stop ids, by:

- services: C client tasks on one gRPC channel, each streaming Decode.Generate for one prompt at
  a time until the prompts run out (C requests always in flight);
- in-process: k2model.generation.generate over the prompts in batches of C, one batch after another,
  on one worker thread, as the services' engines run their model steps (see `InProcess`).

Per path and level: output tok/s = generated tokens / wall time of the level; TTFT = submit ->
first token (in-process: batch start -> the first step's events, which the whole batch shares);
inter-token latency = (last token - first token) / (tokens - 1) per request, averaged.
The two paths take turns, level by level and repeat by repeat (5 repeats, 1 with --quick), so a
burst of load from other processes on the shared cores hits both; each reported number is the
median over the repeats. Both paths are warmed up once with short generations first.

KV transfer: bytes per prompt token = the growth of Prefill.Stats kv_bytes_sent over a level /
that level's prompt tokens (the expected value, layers * kv_cache_dim * element size, is printed
beside it). Transfer MB/s is an approximation: those bytes / the time during which at least one
request was between submission and its first token. That window also holds queueing, the prefill
compute and the decode side's writes into its cache, so it is a lower bound on the link's speed.

Target: services >= 70% of the in-process output tok/s at concurrency 32.
"""

from __future__ import annotations

import asyncio
import math
import random
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import grpc
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench.common import checkpoint_bench_main, format_table  # noqa: E402
from k2model import GenerationRequest, K2Model, generate, load_model  # noqa: E402
from services.deployment import Deployment  # noqa: E402
from services.launcher import Suite  # noqa: E402
from services.pb.k2.v1 import (  # noqa: E402
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2_grpc,
)

LEVELS = (1, 8, 32)
NEW_TOKENS = 32
PROMPT_LEN = (64, 128)  # inclusive range of prompt lengths
REQUESTS_PER_SLOT = 2  # requests per level = this * concurrency (1 * with --quick)
REPEATS = 5  # 1 with --quick
WARMUP_NEW_TOKENS = 4
TARGET_C32 = 0.70  # services / in-process output tok/s at concurrency 32
SEED = 0
GREEDY = common_pb2.SamplingParams(temperature=0.0)
PATHS = ("services", "in-process")


@dataclass(frozen=True)
class Trace:
    """One request on the perf_counter clock; tokens are its generated ids in order."""

    submit: float
    first: float
    last: float
    tokens: list[int]


@dataclass(frozen=True)
class Level:
    """One timed pass of a path over a level's prompts; traces are in prompt order."""

    traces: list[Trace]
    wall_s: float


@dataclass(frozen=True)
class Row:
    path: str
    concurrency: int
    requests: int
    output_tok_s: float
    ttft_mean_ms: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_mean_ms: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_deployment(path: Path, checkpoint: str) -> Path:
    # The deployment format requires a tokenizer entry; only prefill-0 and decode-0 are started.
    # 1024 blocks of 16 hold 32 * (128 + 32) tokens many times over: no preemption in the bench.
    spec = {
        "checkpoint": checkpoint,
        "hosts": {"local": "127.0.0.1"},
        "tokenizer": [{"name": "tokenizer-0", "port": free_port()}],
        "prefill": [{"name": "prefill-0", "port": free_port(), "kv_blocks": 1024}],
        "decode": [{"name": "decode-0", "port": free_port(), "kv_blocks": 1024}],
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def random_prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(*PROMPT_LEN))] for _ in range(n)]


def summarize(path: str, concurrency: int, run: Level) -> Row:
    ttft = [1e3 * (t.first - t.submit) for t in run.traces]
    itl = [1e3 * (t.last - t.first) / (len(t.tokens) - 1) for t in run.traces if len(t.tokens) > 1]
    # numpy's default percentile (linear between closest ranks); one value is its own p99
    p99 = statistics.quantiles(ttft if len(ttft) > 1 else ttft * 2, n=100, method="inclusive")[98]
    tok_s = sum(len(t.tokens) for t in run.traces) / run.wall_s
    ttfts = (statistics.fmean(ttft), statistics.median(ttft), p99)
    return Row(
        path, concurrency, len(run.traces), tok_s, *ttfts, statistics.fmean(itl or [math.nan])
    )


def median_row(rows: list[Row]) -> Row:
    """Each numeric field's median over the repeats (so fields may come from different runs)."""
    first = rows[0]
    numeric = {
        f.name: statistics.median(getattr(r, f.name) for r in rows)
        for f in fields(Row)
        if isinstance(getattr(first, f.name), float)
    }
    return Row(**{**asdict(first), **numeric})


def waiting_window_s(traces: list[Trace]) -> float:
    """Length of the union of [submit, first token] intervals: time some prefill was pending."""
    total, end = 0.0, -math.inf
    for t in sorted(traces, key=lambda t: t.submit):
        start = max(t.submit, end)
        if t.first > start:
            total += t.first - start
        end = max(end, t.first)
    return total


class InProcess:
    """generate() on one worker thread, as the services' engines run their model steps.

    Not the main thread: there torch's OpenMP threads (2 on 2 cores) slowed bmm/index/softmax
    10-50x whenever other processes shared the cores. Measured while writing this bench, 32
    prompts x 32 tokens: 4.3 s on the main thread, 1.0 s on a worker thread, 0.9 s on the main
    thread with torch.set_num_threads(1); the worker thread used about one core.
    """

    def __init__(self, model: K2Model) -> None:
        self.model = model
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="in-process-model")

    def close(self) -> None:
        self.pool.shutdown()

    async def level(
        self, prompts: list[list[int]], concurrency: int, new_tokens: int = NEW_TOKENS
    ) -> Level:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self._level, prompts, concurrency, new_tokens)

    def _level(self, prompts: list[list[int]], concurrency: int, new_tokens: int) -> Level:
        traces: list[Trace] = []
        start = time.perf_counter()
        for b in range(0, len(prompts), concurrency):
            traces += self._batch(prompts[b : b + concurrency], new_tokens)
        return Level(traces, time.perf_counter() - start)

    def _batch(self, batch: list[list[int]], new_tokens: int) -> list[Trace]:
        submit = time.perf_counter()
        first: list[float | None] = [None] * len(batch)
        last = [submit] * len(batch)
        tokens: list[list[int]] = [[] for _ in batch]
        for events in generate(self.model, [GenerationRequest(p, new_tokens) for p in batch]):
            now = time.perf_counter()
            for e in events:
                first[e.request] = first[e.request] or now
                last[e.request] = now
                tokens[e.request].append(e.token_id)
        return [
            Trace(submit, f or submit, t, ids)
            for f, t, ids in zip(first, last, tokens, strict=True)
        ]


class Served:
    """Clients of the running suite: streamed generations and the prefill's KV byte counter."""

    def __init__(self, dep: Deployment) -> None:
        self.decode = dep.instance("decode-0").target
        self.prefill = dep.instance("prefill-0").target

    async def level(
        self, prompts: list[list[int]], concurrency: int, new_tokens: int = NEW_TOKENS
    ) -> Level:
        """C workers share one channel and one prompt iterator: C requests always in flight."""
        todo = iter(enumerate(prompts))
        traces: list[Trace | None] = [None] * len(prompts)
        async with grpc.aio.insecure_channel(self.decode) as channel:
            stub = decode_pb2_grpc.DecodeStub(channel)

            async def worker() -> None:
                for i, prompt in todo:
                    traces[i] = await self._request(stub, prompt, new_tokens)

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            wall = time.perf_counter() - start
        return Level([t for t in traces if t is not None], wall)

    @staticmethod
    async def _request(
        stub: decode_pb2_grpc.DecodeStub, prompt: list[int], new_tokens: int
    ) -> Trace:
        request = decode_pb2.GenerateRequest(
            prompt_ids=prompt, max_new_tokens=new_tokens, sampling=GREEDY
        )
        submit = time.perf_counter()
        first = last = 0.0
        tokens: list[int] = []
        reason = ""
        async for event in stub.Generate(request, timeout=300):
            last = time.perf_counter()
            first = first or last
            tokens += [t.token_id for t in event.tokens]
            reason = event.finish_reason or reason
        if reason != "length" or len(tokens) != new_tokens:
            raise RuntimeError(f"decode ended with {reason!r} after {len(tokens)} tokens")
        return Trace(submit, first, last, tokens)

    async def kv_bytes_sent(self) -> int:
        async with grpc.aio.insecure_channel(self.prefill) as channel:
            stub = prefill_pb2_grpc.PrefillStub(channel)
            return (await stub.Stats(common_pb2.StatsRequest(), timeout=5)).kv_bytes_sent


async def measure(
    served: Served, local: InProcess, levels: dict[int, list[list[int]]], repeats: int
) -> tuple[dict[tuple[str, int], list[Level]], dict[int, int]]:
    """Per (path, level) its repeats; per level the KV bytes prefill sent over all its repeats."""
    warm = next(iter(levels.values()))[:2]
    await local.level(warm, 2, WARMUP_NEW_TOKENS)
    await served.level(warm, 2, WARMUP_NEW_TOKENS)
    runs: dict[tuple[str, int], list[Level]] = {}
    kv: dict[int, int] = {}
    for c, prompts in levels.items():
        before = await served.kv_bytes_sent()
        for _ in range(repeats):
            runs.setdefault(("in-process", c), []).append(await local.level(prompts, c))
            runs.setdefault(("services", c), []).append(await served.level(prompts, c))
        kv[c] = await served.kv_bytes_sent() - before
        print(f"  concurrency {c:<3d} done", flush=True)
    return runs, kv


def kv_row(model: K2Model, c: int, prompts: list[list[int]], runs: list[Level], sent: int) -> dict:
    """KV moved during one level's service runs (all repeats), against the expected size."""
    cfg = model.cfg
    n = sum(len(p) for p in prompts) * len(runs)
    window = sum(waiting_window_s(run.traces) for run in runs)
    return {
        "concurrency": c,
        "prompt_tokens": n,
        "kv_bytes": sent,
        "bytes_per_prompt_token": sent / n,
        "expected_bytes_per_prompt_token": (
            cfg.num_hidden_layers * cfg.kv_cache_dim * model.dtype.itemsize
        ),
        "transfer_mb_s_approx": sent / window / 1e6,
    }


def ratio_row(rows: list[Row], runs: dict[tuple[str, int], list[Level]], c: int) -> dict:
    tok_s = {(r.path, r.concurrency): r.output_tok_s for r in rows}
    served, local = runs["services", c][0].traces, runs["in-process", c][0].traces
    same = sum(x.tokens == y.tokens for x, y in zip(served, local, strict=True))
    return {
        "concurrency": c,
        "services_over_in_process": tok_s["services", c] / tok_s["in-process", c],
        "target": TARGET_C32 if c == 32 else None,
        "greedy_outputs_identical": f"{same}/{len(served)}",
    }


def bench(checkpoint: str, quick: bool) -> dict[str, Any]:
    per_slot, repeats = (1, 1) if quick else (REQUESTS_PER_SLOT, REPEATS)
    with tempfile.TemporaryDirectory() as tmp:
        dep_path = write_deployment(Path(tmp) / "deployment.yaml", checkpoint)
        dep = Deployment.load(dep_path)
        model = load_model(dep.checkpoint, dep.torch_dtype(), dep.fp8_resident)
        levels = {c: random_prompts(per_slot * c, model.cfg.vocab_size, SEED + c) for c in LEVELS}
        suite, local = Suite(dep_path), InProcess(model)
        try:
            print("starting prefill-0 and decode-0 ...", flush=True)
            suite.start(names=["prefill-0", "decode-0"])
            runs, kv = asyncio.run(measure(Served(dep), local, levels, repeats))
        finally:
            suite.stop()
            local.close()
    rows = [
        median_row([summarize(path, c, run) for run in runs[path, c]])
        for path in PATHS
        for c in LEVELS
    ]
    return {
        "meta": {
            "checkpoint": str(dep.checkpoint),
            "dtype": str(model.dtype),
            "torch_threads": torch.get_num_threads(),
            "in_process_engine": "generate() on one worker thread of this process",
            "new_tokens": NEW_TOKENS,
            "prompt_len": list(PROMPT_LEN),
            "requests_per_level": {c: len(p) for c, p in levels.items()},
            "repeats": repeats,
        },
        "rows": [asdict(r) for r in rows],
        "ratios": [ratio_row(rows, runs, c) for c in LEVELS],
        "kv": [kv_row(model, c, levels[c], runs["services", c], kv[c]) for c in LEVELS],
    }


def print_report(result: dict[str, Any]) -> None:
    for key in ("rows", "ratios", "kv"):
        table = result[key]
        print(f"\n{format_table(list(table[0]), [[_show(v) for v in r.values()] for r in table])}")
    print("(transfer MB/s: KV bytes / time some request awaited its first token; a lower bound)")


def _show(v: Any) -> Any:
    return "-" if v is None else v


def main() -> None:
    checkpoint_bench_main(
        __doc__,
        "C requests per level, one repeat",
        Path("bench/results/pipeline.json"),
        bench,
        print_report,
    )


if __name__ == "__main__":
    main()
