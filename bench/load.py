"""Bounded load through the REST gateway: concurrent streaming clients for a fixed time.

    python3 bench/load.py [--clients 8] [--duration 30] [--max-tokens 32] [--out FILE]
                          [--experts local|grpc|dataplane|dataplane-tcp]
    python3 bench/load.py --url http://HOST:8000 --key KEY [--pids gateway-0=PID,...]

Without --url it starts a suite on this machine (services.launcher.Suite on a temporary
deployment with free ports: tokenizer, prefill, decode and the gateway on the embedded
checkpoint, experts in-process) and measures the memory of its processes.

Each client streams one chat completion after another (greedy, `max_tokens` tokens, logprobs on
so every token is counted) until the time is up; a request still running then finishes. Reported:
requests served, errors by kind (`http_<status>`, `stream_<error code>` for an error frame after
the headers, `transport` for a connection that failed), p50/p99 time to first token (request
sent -> first chunk with a token) and inter-token latency (gap between chunks / tokens in the
later chunk), and each service's RSS (with its child processes) when idle before the load (after
one warm-up request per client) and when idle again after it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench.common import format_table, write_json  # noqa: E402

PROMPTS = [
    "Hello there, who are you?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "What is the capital of France?",
]


@dataclass
class StreamResult:
    """One streamed chat completion as the client saw it."""

    status: int = 0
    pieces: dict[int, list[bytes]] = field(default_factory=dict)  # choice -> tokens' bytes
    finish_reason: dict[int, str] = field(default_factory=dict)  # choice -> its reason
    error: dict[str, Any] | None = None  # the error body (HTTP error) or mid-stream error frame
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def error_kind(self) -> str | None:
        if self.status != 200:
            return f"http_{self.status}" if self.status else "transport"
        if self.error is not None:
            return f"stream_{self.error.get('code') or self.error.get('type')}"
        return None


def chat_body(prompt: str, max_tokens: int, model: str, n: int = 1) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": True,
        "stream": True,
        "n": n,
    }


async def stream_chat(
    client: httpx.AsyncClient, url: str, key: str, body: dict[str, Any]
) -> StreamResult:
    """POST a streaming chat completion and read it to the end."""
    out = StreamResult()
    start = last = time.perf_counter()
    try:
        async with client.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers=_auth(key)
        ) as response:
            out.status = response.status_code
            if response.status_code != 200:
                out.error = json.loads(await response.aread()).get("error")
                return out
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                frame = json.loads(line.removeprefix("data: "))
                if "error" in frame:
                    out.error = frame["error"]
                    continue
                now = time.perf_counter()
                got = _take(out, frame)
                if got:
                    if out.ttft_s is None:
                        out.ttft_s = now - start
                    else:
                        out.itl_s += [(now - last) / got] * got
                    last = now
    except httpx.TransportError:
        out.status = 0
    finally:
        out.elapsed_s = time.perf_counter() - start
    return out


def _take(out: StreamResult, frame: dict[str, Any]) -> int:
    """Record each choice's tokens and finish reason from one chunk; the number of tokens."""
    got = 0
    for choice in frame.get("choices", []):
        pieces = out.pieces.setdefault(choice["index"], [])
        for lp in (choice.get("logprobs") or {}).get("content") or []:
            pieces.append(bytes(lp["bytes"]))
            got += 1
        if choice.get("finish_reason"):
            out.finish_reason[choice["index"]] = choice["finish_reason"]
    return got


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class LoadReport:
    clients: int
    duration_s: float
    served: int
    errors: dict[str, int]
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    tokens: int
    rss_before_mib: dict[str, float] = field(default_factory=dict)
    rss_after_mib: dict[str, float] = field(default_factory=dict)


async def run_load(
    url: str, key: str, clients: int, duration_s: float, max_tokens: int, model: str
) -> LoadReport:
    """`clients` concurrent streaming clients, each starting requests until duration_s is up."""
    results: list[StreamResult] = []
    end = time.monotonic() + duration_s

    async def client_loop(i: int, client: httpx.AsyncClient) -> None:
        k = i
        while time.monotonic() < end:
            body = chat_body(PROMPTS[k % len(PROMPTS)], max_tokens, model)
            results.append(await stream_chat(client, url, key, body))
            k += clients

    timeout = httpx.Timeout(duration_s + 120.0)
    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
        start = time.monotonic()
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
        took = time.monotonic() - start
    ttft = [r.ttft_s for r in results if r.ttft_s is not None]
    itl = [t for r in results for t in r.itl_s]
    return LoadReport(
        clients=clients,
        duration_s=took,
        served=sum(r.error_kind is None for r in results),
        errors=dict(Counter(r.error_kind for r in results if r.error_kind is not None)),
        ttft_p50_ms=_ms(percentile(ttft, 50)),
        ttft_p99_ms=_ms(percentile(ttft, 99)),
        itl_p50_ms=_ms(percentile(itl, 50)),
        itl_p99_ms=_ms(percentile(itl, 99)),
        tokens=sum(len(p) for r in results for p in r.pieces.values()),
    )


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100)
    return ordered[int(rank) - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def rss_mib(pids: dict[str, int]) -> dict[str, float]:
    """Resident memory of each named process plus its descendants (an expert job's ranks)."""
    return {name: round(sum(map(_rss_kib, _tree(pid))) / 1024, 1) for name, pid in pids.items()}


def _tree(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [pid, *(p for kid in kids for p in _tree(int(kid)))]


def _rss_kib(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    line = next((s for s in status.splitlines() if s.startswith("VmRSS:")), "VmRSS: 0 kB")
    return int(line.split()[1])


async def measured_load(
    url: str,
    key: str,
    pids: dict[str, int],
    clients: int,
    duration_s: float,
    max_tokens: int,
    model: str,
    settle_s: float = 2.0,
) -> LoadReport:
    """run_load between two idle RSS readings: the first after one warm-up request per client
    (first-use allocations are not growth), the second settle_s after the load ended."""
    await run_load(url, key, clients, 0.0, max_tokens, model)
    await asyncio.sleep(settle_s)
    before = rss_mib(pids)
    report = await run_load(url, key, clients, duration_s, max_tokens, model)
    await asyncio.sleep(settle_s)
    report.rss_before_mib, report.rss_after_mib = before, rss_mib(pids)
    return report


def print_report(report: LoadReport) -> None:
    print(
        format_table(
            [
                "clients",
                "seconds",
                "served",
                "errors",
                "tokens",
                "TTFT p50/p99 ms",
                "ITL p50/p99 ms",
            ],
            [
                [
                    report.clients,
                    report.duration_s,
                    report.served,
                    json.dumps(report.errors) if report.errors else "none",
                    report.tokens,
                    f"{report.ttft_p50_ms} / {report.ttft_p99_ms}",
                    f"{report.itl_p50_ms} / {report.itl_p99_ms}",
                ]
            ],
        )
    )
    rows = [
        [name, before, report.rss_after_mib.get(name), report.rss_after_mib.get(name, 0) - before]
        for name, before in report.rss_before_mib.items()
    ]
    if rows:
        print(format_table(["service", "RSS before MiB", "RSS after MiB", "growth MiB"], rows))


def _local_suite(folder: Path, experts: str = "local") -> Any:
    """tokenizer, prefill, decode and gateway on this machine (free ports), all healthy; with
    experts grpc, dataplane or dataplane-tcp, the routed experts on a 2-rank pool over that
    transport (a deployment's expert_transport)."""
    from bench.common import free_port
    from services.launcher import Suite

    spec: dict[str, Any] = {
        "checkpoint": "embedded",
        "model": {"threads": 1},
        "tokenizer": [{"name": "tokenizer-0", "port": free_port()}],
        "prefill": [{"name": "prefill-0", "port": free_port(), "kv_blocks": 512}],
        "decode": [{"name": "decode-0", "port": free_port(), "kv_blocks": 512}],
        "gateway": [
            {"name": "gateway-0", "port": free_port(), "config": str(ROOT / "deploy/gateway.yaml")}
        ],
    }
    if experts != "local":
        pool = {"name": "experts-0", "port": free_port(), "ranks": 2, "master_port": free_port()}
        spec |= {"experts": "remote", "expert_transport": experts, "expert_pool": [pool]}
    path = folder / "deployment.yaml"
    path.write_text(yaml.safe_dump(spec))
    suite = Suite(path)
    suite.start()
    return suite


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running gateway (default: start a local suite)")
    ap.add_argument("--key", default="sk-k2serve-dev-key")
    ap.add_argument("--pids", default="", help="name=pid,... whose RSS to report (with --url)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--model", default="kimi-k2-thinking")
    ap.add_argument(
        "--experts",
        choices=["local", "grpc", "dataplane", "dataplane-tcp"],
        default="local",
        help="local suite: routed experts in-process, or on a 2-rank pool over this transport",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/load.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        suite = None if args.url else _local_suite(Path(tmp), args.experts)
        try:
            if suite is None:
                url = args.url
                pids = {n: int(p) for n, p in (kv.split("=") for kv in args.pids.split(",") if kv)}
            else:
                url = f"http://{suite.deployment.of_kind('gateway')[0].target}"
                pids = {name: proc.pid for name, proc in suite.procs.items()}
            report = asyncio.run(
                measured_load(
                    url, args.key, pids, args.clients, args.duration, args.max_tokens, args.model
                )
            )
        finally:
            if suite is not None:
                suite.stop()
    print_report(report)
    write_json(args.out, asdict(report))


if __name__ == "__main__":
    main()
