"""Served throughput with the routed experts remote against local, through the gateway, in one run.

    python3 bench/experts_served.py [--quick] [--duration 15] [--out bench/results/experts_served.json]

For each way the experts can run - `local` (in prefill's and decode's own processes), and on a
2-rank expert pool over `grpc` (one Compute call per layer through rank 0), `dataplane-tcp`
(straight to each rank over TCP) and `dataplane` (straight to each rank, through shared memory:
what a suite on one host uses) - one suite on the embedded checkpoint (bench/load.py's
`_local_suite`: every process at one torch thread) takes concurrency 1, 16 and 64 of streaming
clients for `duration` seconds each. Reported per concurrency: output tokens/s, ITL and TTFT
p50, and each remote way's tokens/s as a ratio of local's at the same concurrency. The suites
run one after another on the same machine, so the ratios compare like with like.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench.common import format_table, write_json  # noqa: E402
from bench.load import _local_suite, run_load  # noqa: E402

WAYS = ("local", "grpc", "dataplane-tcp", "dataplane")
CONCURRENCY = (1, 16, 64)
TARGET = 0.7  # remote tokens/s over local's at concurrency 16 and 64 (issue 17)
KEY, MODEL, MAX_TOKENS = "sk-k2serve-dev-key", "kimi-k2-instruct", 32


def measure(way: str, duration_s: float) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        suite = _local_suite(Path(tmp), way)
        try:
            url = f"http://{suite.deployment.of_kind('gateway')[0].target}"
            for clients in CONCURRENCY:
                asyncio.run(run_load(url, KEY, clients, 0.0, MAX_TOKENS, MODEL))  # warm-up
                r = asyncio.run(run_load(url, KEY, clients, duration_s, MAX_TOKENS, MODEL))
                rows.append(
                    {
                        "experts": way,
                        "clients": clients,
                        "tokens_per_s": r.tokens / r.duration_s,
                        "itl_p50_ms": r.itl_p50_ms,
                        "ttft_p50_ms": r.ttft_p50_ms,
                        "served": r.served,
                        "errors": sum(r.errors.values()),
                    }
                )
                print(f"  {way} c={clients}: {rows[-1]['tokens_per_s']:.0f} tok/s", flush=True)
        finally:
            suite.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per concurrency")
    ap.add_argument("--quick", action="store_true", help="5 s per concurrency")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/experts_served.json")
    args = ap.parse_args()
    duration = 5.0 if args.quick else args.duration
    rows = [row for way in WAYS for row in measure(way, duration)]
    local = {r["clients"]: r["tokens_per_s"] for r in rows if r["experts"] == "local"}
    for r in rows:
        r["vs_local"] = r["tokens_per_s"] / local[r["clients"]]
    print(format_table(list(rows[0]), [list(r.values()) for r in rows]))
    for way in WAYS[1:]:
        ratios = {r["clients"]: r["vs_local"] for r in rows if r["experts"] == way}
        met = all(ratios[c] >= TARGET for c in (16, 64))
        shown = ", ".join(f"c={c} {v:.2f}x" for c, v in ratios.items())
        print(f"{way}: {shown} of local; >= {TARGET}x at 16 and 64 {'met' if met else 'NOT met'}")
    write_json(args.out, {"duration_s": duration, "rows": rows})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
