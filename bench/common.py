"""Helpers shared by the bench scripts: median wall-clock timing, a plain-text table, JSON output."""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """(seconds, result) of one call, on the monotonic high-resolution clock."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def free_port() -> int:
    """A port nothing on this host listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def median_ms(fn: Callable[[], object], runs: int = 5) -> float:
    """Milliseconds of the median of `runs` calls, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned text columns; floats get 1 decimal (2 below 10) so ratios stay readable."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def checkpoint_bench_main(
    doc: str,
    quick_help: str,
    default_out: Path,
    bench: Callable[[str, bool], dict[str, Any]],
    report: Callable[[dict[str, Any]], None],
) -> None:
    """The command line of a bench over a served checkpoint: --quick, --checkpoint, --out."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--checkpoint", default="embedded", help="checkpoint directory")
    p.add_argument("--out", type=Path, default=default_out)
    args = p.parse_args()
    checkpoint = (
        "embedded" if args.checkpoint == "embedded" else str(Path(args.checkpoint).resolve())
    )
    start = time.perf_counter()
    result = bench(checkpoint, args.quick)
    result["meta"]["bench_wall_s"] = time.perf_counter() - start
    report(result)
    write_json(args.out, result)
    print(f"\nwrote {args.out} ({result['meta']['bench_wall_s']:.0f} s)")
