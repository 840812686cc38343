"""`k2serve demo`: load a checkpoint (the embedded one by default) and stream a generation in-process."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from k2model import EMBEDDED_CHECKPOINT, GenerationRequest, SamplingParams, generate, load_model


def demo(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    model = load_model(args.checkpoint, fp8_resident=args.fp8_resident)
    cfg = model.cfg
    print(
        f"loaded {args.checkpoint} ({cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts, "
        f"vocab {cfg.vocab_size}) in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )
    tokenizer = _tokenizer(args.checkpoint)
    prompt = tokenizer.encode(args.prompt) if tokenizer else [cfg.bos_token_id or 0]
    params = SamplingParams(temperature=args.temperature, seed=args.seed)
    req = GenerationRequest(prompt, args.max_new_tokens, params)
    t0, n = time.perf_counter(), 0
    for events in generate(model, [req]):
        for e in events:
            n += 1
            piece = tokenizer.decode([e.token_id]) if tokenizer else f"{e.token_id} "
            print(piece, end="", flush=True)
    dt = time.perf_counter() - t0
    print(f"\n[{n} tokens in {dt:.2f}s, {n / dt:.1f} tokens/s]", file=sys.stderr)


def _tokenizer(path: Path):
    if not (path / "tiktoken.model").is_file():
        return None
    from k2model.text.tokenizer import Tokenizer

    return Tokenizer.from_dir(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="k2serve", description="Kimi K2 serving suite")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="stream an in-process generation")
    d.add_argument("--checkpoint", type=Path, default=EMBEDDED_CHECKPOINT)
    d.add_argument("--prompt", default="Hello! Who are you?")
    d.add_argument("--max-new-tokens", type=int, default=32)
    d.add_argument("--temperature", type=float, default=0.6)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--fp8-resident", action="store_true", help="keep fp8 weights, dequantise per layer"
    )
    args = ap.parse_args(argv)
    if args.command == "demo":
        demo(args)


if __name__ == "__main__":
    main()
