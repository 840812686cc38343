"""The REST gateway against calling the chat pipeline directly: requests/s and added latency.

    python3 bench/gateway.py [--quick] [--checkpoint DIR] [--out bench/results/gateway.json]

One run starts a suite (services.launcher.Suite, temporary deployment on free ports): tokenizer,
prefill and decode processes and the gateway process (`python -m gateway`, the deployment's
`gateway` entry). The same prompts, greedy, MAX_TOKENS each, model kimi-k2-instruct (thinking
off), go three ways:

- direct: `TokenizerBackend.chat` in this process (the gateway's own ChatService: the tokenizer's
  Chat RPC, same deployment);
- gateway JSON: POST /v1/chat/completions over HTTP/1.1 keep-alive (httpx), stream=false;
- gateway SSE: the same with stream=true (and include_usage), read to `data: [DONE]`.

At each concurrency C in LEVELS, C client tasks take prompts until max(MIN_REQUESTS, 2*C) are
done (C requests always in flight). Per path: requests/s = requests / wall time of the level;
latency = submit -> last byte (direct: the last event); TTFT = submit -> first content
(JSON: none, the whole body arrives at once). Added latency = gateway p50 - direct p50 of the
same level and repeat. The paths take turns (their order rotates every repeat, REPEATS
repeats, 1 with --quick) so load drift hits all three; each number is the median over repeats.
Every path must produce the same text per prompt (greedy): the bench fails otherwise.
CPU per request: this process's CPU time (direct: the pipeline; gateway: the HTTP client) and
the gateway process's (from /proc/PID/stat, 10 ms ticks), over the level / its requests.

On a small CPU the gateway process, this client and the model processes share the cores, so
"added latency" includes the gateway's CPU time taken from the model, not only its own work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench.common import format_table, free_port, median, write_json  # noqa: E402
from gateway.backend import TokenizerBackend  # noqa: E402
from k2model.sampling_params import SamplingParams  # noqa: E402
from k2model.text.messages import Message  # noqa: E402
from services.chat.types import ChatRequest  # noqa: E402
from services.deployment import Deployment  # noqa: E402
from services.launcher import Suite  # noqa: E402

LEVELS = (1, 64)
MAX_TOKENS = 16
MIN_REQUESTS = 16
REPEATS = 5  # 1 with --quick
MODEL = "kimi-k2-instruct"
KEY = "sk-bench-gateway-key"
PATHS = ("direct", "gateway JSON", "gateway SSE")
GATEWAY_CONFIG = {
    "keys": [{"name": "bench", "key": KEY, "profile": "bench"}],
    "profiles": {"bench": {"models": [MODEL], "default_model": MODEL}},
    "registry": {"models": [{"id": MODEL, "local": {"thinking": False}}]},
}


@dataclass(frozen=True)
class Trace:
    start: float
    first: float | None  # first content; None when it all arrived at once
    end: float
    text: str


@dataclass(frozen=True)
class Row:
    path: str
    concurrency: int
    requests: int
    requests_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    ttft_p50_ms: float | None
    added_p50_ms: float | None  # this path's p50 latency - direct's, same level and repeat
    bench_cpu_ms: float  # per request, this process
    gateway_cpu_ms: float  # per request, the gateway process


def prompts(n: int) -> list[str]:
    return [f"Request {i}: tell me about the number {i * 37 % 1000}, briefly." for i in range(n)]


def write_suite(tmp: Path, checkpoint: str) -> Path:
    (tmp / "gateway.yaml").write_text(yaml.safe_dump(GATEWAY_CONFIG))
    spec = {
        "checkpoint": checkpoint,
        "tokenizer": [{"name": "tokenizer-0", "port": free_port()}],
        "prefill": [{"name": "prefill-0", "port": free_port(), "kv_blocks": 1024}],
        "decode": [{"name": "decode-0", "port": free_port(), "kv_blocks": 1024}],
        "gateway": [{"name": "gateway-0", "port": free_port(), "config": "gateway.yaml"}],
    }
    path = tmp / "deployment.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


async def direct(pipeline: TokenizerBackend, prompt: str) -> Trace:
    request = ChatRequest(
        model=MODEL,
        messages=(Message("user", prompt),),
        max_tokens=MAX_TOKENS,
        sampling=SamplingParams(temperature=0.0),
        thinking=False,
    )
    start, first, text = time.perf_counter(), None, []
    async for event in pipeline.chat(request):
        if event.content and first is None:
            first = time.perf_counter()
        text.append(event.content)
    return Trace(start, first, time.perf_counter(), "".join(text))


def body(prompt: str, stream: bool) -> dict[str, Any]:
    out = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
    }
    return (out | {"stream": True, "stream_options": {"include_usage": True}}) if stream else out


async def gateway_json(client: httpx.AsyncClient, prompt: str) -> Trace:
    start = time.perf_counter()
    response = await client.post("/v1/chat/completions", json=body(prompt, False))
    response.raise_for_status()
    text = response.json()["choices"][0]["message"]["content"]
    return Trace(start, None, time.perf_counter(), text)


async def gateway_sse(client: httpx.AsyncClient, prompt: str) -> Trace:
    start, first, text = time.perf_counter(), None, []
    async with client.stream("POST", "/v1/chat/completions", json=body(prompt, True)) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                content = choice["delta"].get("content") or ""
                if content and first is None:
                    first = time.perf_counter()
                text.append(content)
    return Trace(start, first, time.perf_counter(), "".join(text))


async def level(
    call: Callable[[str], Awaitable[Trace]], texts: list[str], concurrency: int
) -> tuple[float, list[Trace]]:
    """(wall seconds, traces in prompt order) with `concurrency` requests in flight."""
    traces: list[Trace | None] = [None] * len(texts)
    todo = iter(range(len(texts)))

    async def worker() -> None:
        for i in todo:
            traces[i] = await call(texts[i])

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    done = [t for t in traces if t is not None]
    return time.perf_counter() - start, done


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process; after the ")" closing its name they are fields 12 and 13."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measured(
    call: Callable[[str], Awaitable[Trace]], texts: list[str], concurrency: int, gateway_pid: int
) -> dict[str, Any]:
    cpu, gateway_cpu = time.process_time(), process_cpu_s(gateway_pid)
    wall, traces = await level(call, texts, concurrency)
    return {
        "wall": wall,
        "traces": traces,
        "bench_cpu": (time.process_time() - cpu) / len(traces),
        "gateway_cpu": (process_cpu_s(gateway_pid) - gateway_cpu) / len(traces),
    }


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


async def bench(
    deployment: Deployment, gateway_pid: int, repeats: int
) -> tuple[list[Row], dict[str, Any]]:
    pipeline = TokenizerBackend([t.target for t in deployment.of_kind("tokenizer")])
    client = httpx.AsyncClient(
        base_url=f"http://{deployment.of_kind('gateway')[0].target}",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=300,
        # Idle connections are dropped after 1 s, before uvicorn's 5 s keep-alive timeout: a
        # request sent on a connection the server is closing fails with ReadError.
        limits=httpx.Limits(
            max_connections=256, max_keepalive_connections=256, keepalive_expiry=1.0
        ),
        trust_env=False,
    )
    calls: dict[str, Callable[[str], Awaitable[Trace]]] = {
        "direct": lambda t: direct(pipeline, t),
        "gateway JSON": lambda t: gateway_json(client, t),
        "gateway SSE": lambda t: gateway_sse(client, t),
    }
    try:
        for path in PATHS:  # warm-up: channels, connections, first-step allocations
            await level(calls[path], prompts(8), 8)
        samples: dict[tuple[str, int], list[dict[str, float]]] = {}
        texts_agree = True
        for concurrency in LEVELS:
            texts = prompts(max(MIN_REQUESTS, 2 * concurrency))
            for r in range(repeats):
                order = PATHS[r % 3 :] + PATHS[: r % 3]
                runs = {
                    path: await measured(calls[path], texts, concurrency, gateway_pid)
                    for path in order
                }
                outputs = {tuple(t.text for t in run["traces"]) for run in runs.values()}
                texts_agree = texts_agree and len(outputs) == 1
                direct_p50 = median([t.end - t.start for t in runs["direct"]["traces"]])
                for path, run in runs.items():
                    samples.setdefault((path, concurrency), []).append(stats(run, direct_p50))
        rows = [
            summarize(path, concurrency, samples[(path, concurrency)])
            for concurrency in LEVELS
            for path in PATHS
        ]
        return rows, {"texts_agree": texts_agree}
    finally:
        await client.aclose()
        await pipeline.close()


def stats(run: dict[str, Any], direct_p50: float) -> dict[str, float]:
    wall, traces = run["wall"], run["traces"]
    latency = [t.end - t.start for t in traces]
    ttft = [t.first - t.start for t in traces if t.first is not None]
    return {
        "requests": len(traces),
        "requests_s": len(traces) / wall,
        "p50": median(latency),
        "p99": p99(latency),
        "ttft": median(ttft) if ttft else float("nan"),
        "added": median(latency) - direct_p50,
        "bench_cpu": run["bench_cpu"],
        "gateway_cpu": run["gateway_cpu"],
    }


def summarize(path: str, concurrency: int, runs: list[dict[str, float]]) -> Row:
    def mid(key: str) -> float:
        return median([r[key] for r in runs])

    ttft = mid("ttft")
    return Row(
        path=path,
        concurrency=concurrency,
        requests=int(runs[0]["requests"]),
        requests_s=mid("requests_s"),
        latency_p50_ms=1e3 * mid("p50"),
        latency_p99_ms=1e3 * mid("p99"),
        ttft_p50_ms=None if ttft != ttft else 1e3 * ttft,
        added_p50_ms=None if path == "direct" else 1e3 * mid("added"),
        bench_cpu_ms=1e3 * mid("bench_cpu"),
        gateway_cpu_ms=1e3 * mid("gateway_cpu"),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 repeat instead of 5")
    ap.add_argument("--checkpoint", default="embedded")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gateway.json")
    args = ap.parse_args()
    repeats = 1 if args.quick else REPEATS
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        deployment = write_suite(Path(tmp), args.checkpoint)
        suite = Suite(deployment)
        suite.start()
        try:
            pid = suite.procs["gateway-0"].pid
            rows, checks = asyncio.run(bench(suite.deployment, pid, repeats))
        finally:
            suite.stop()
    headers = ["path", "C", "requests", "req/s", "p50 ms", "p99 ms", "TTFT p50 ms", "added p50 ms"]
    headers += ["bench CPU ms/req", "gateway CPU ms/req"]
    print(format_table(headers, [[_show(v) for v in asdict(r).values()] for r in rows]))
    print(f"same text on every path: {checks['texts_agree']}")
    meta = {
        "checkpoint": args.checkpoint,
        "model": MODEL,
        "max_tokens": MAX_TOKENS,
        "levels": list(LEVELS),
        "repeats": repeats,
        "cpu_count": os.cpu_count(),
        "bench_wall_s": time.perf_counter() - started,
        **checks,
    }
    write_json(args.out, {"meta": meta, "rows": [asdict(r) for r in rows]})
    if not checks["texts_agree"]:
        sys.exit("the paths produced different texts for the same greedy prompts")


def _show(value: Any) -> Any:
    return "-" if value is None else value


if __name__ == "__main__":
    main()
