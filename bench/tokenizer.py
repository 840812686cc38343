"""Chat-format, tokenizer and output-parser costs on CPU.

    python3 bench/tokenizer.py [--quick] [--out bench/results/tokenizer.json]

(a) render: conversations/s and output chars/s of the native segment renderer vs the Jinja
    renderer (our sandbox) on the same conversations, per flavor. The Jinja side renders
    templates/k2_instruct.jinja and, when ../shared is beside the repo, the K2-Thinking HF
    template.
(b) encode: our Tokenizer (k2model/embedded/) vs tiktoken's own Encoding.encode on the same
    ranks and text: plain text, and a rendered prompt (encode_segments(render(...)) vs
    Encoding.encode(render_text(...), allowed_special="all"), which must give the same ids).
    The ratio is our time / tiktoken's time. The text stays under the 400,000-char chunk that
    tokenization_kimi.py (and so our encode) cuts at, so both produce the same ids.
(c) stream parse: us per token of StreamParser.feed over a K2-Thinking-style output (reasoning,
    content, two tool calls) cut at the embedded tokenizer's token boundaries, vs only
    concatenating the same deltas.
Every number is the median of the repeats after one warm-up run.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tiktoken

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from k2model.text.chat_format import Flavor, control_tokens, render, render_text  # noqa: E402
from k2model.text.jinja_template import JinjaChatTemplate  # noqa: E402
from k2model.text.messages import Message, TextPart, Tool, ToolCall  # noqa: E402
from k2model.text.opaque import split_control  # noqa: E402
from k2model.text.pieces import Piece, PieceDecoder, marker_ids, text_of  # noqa: E402
from k2model.text.stream_parser import StreamParser  # noqa: E402
from k2model.text.tokenizer import Tokenizer  # noqa: E402
from k2model.text.tool_parser import markers_for  # noqa: E402

EMBEDDED = ROOT / "k2model" / "embedded"
OUR_TEMPLATE = ROOT / "k2model" / "text" / "templates" / "k2_instruct.jinja"
THINKING_TEMPLATE = ROOT.parent / "shared" / "reference" / "k2_thinking_hf_latest.jinja"

WORDS = [
    "the",
    "model",
    "serves",
    "tokens",
    "quickly",
    "while",
    "experts",
    "route",
    "hidden",
    "states",
    "across",
    "layers",
    "weather",
    "Paris",
    "Beijing",
    "北京",
    "天气",
    "数据",
    "模型",
    "naïve",
    "café",
    "résumé",
    "def",
    "return",
    "{}",
    "[]",
    "()",
    "12",
    "345",
    "6789",
]


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def conversation(rng: random.Random, turns: int) -> list[Message]:
    messages = [Message("system", sentence(rng, 20))]
    n_calls = 0
    for _ in range(turns):
        messages.append(Message("user", sentence(rng, rng.randint(5, 60))))
        if rng.random() < 0.4:
            call = ToolCall(
                f"call_{n_calls}", "get_weather", json.dumps({"city": rng.choice(WORDS)})
            )
            n_calls += 1
            messages.append(
                Message("assistant", "", tool_calls=(call,), reasoning_content=sentence(rng, 15))
            )
            messages.append(Message("tool", sentence(rng, 30), tool_call_id=call.id))
        content = (TextPart(sentence(rng, 30)), TextPart(sentence(rng, 10)))
        messages.append(Message("assistant", content, reasoning_content=sentence(rng, 20)))
    messages.append(Message("user", sentence(rng, 20)))
    return messages


TOOLS = (
    Tool(
        "get_weather",
        "Get weather information.",
        {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}},
    ),
    Tool("search", "Search the web.", {"type": "object", "properties": {"q": {"type": "string"}}}),
)


def bench_render(n_conversations: int, repeats: int) -> list[dict[str, Any]]:
    rng = random.Random(0)
    convs = [conversation(rng, rng.randint(1, 8)) for _ in range(n_conversations)]
    templates: list[tuple[Flavor, Path]] = [("k2-instruct", OUR_TEMPLATE)]
    if THINKING_TEMPLATE.is_file():
        templates.append(("k2-thinking", THINKING_TEMPLATE))
    rows = []
    for flavor, path in templates:
        jinja = JinjaChatTemplate(
            path.read_text(encoding="utf-8"), control_tokens=control_tokens(flavor)
        )
        chars = sum(len(render_text(c, TOOLS, flavor=flavor)) for c in convs)
        for c in convs:  # the two renderers must agree before their speed means anything
            assert jinja.render(c, TOOLS) == render(c, TOOLS, flavor=flavor)
        for name, fn in (
            ("native segments", lambda f=flavor: [render(c, TOOLS, flavor=f) for c in convs]),
            ("jinja text", lambda j=jinja: [j.render_text(c, TOOLS) for c in convs]),
            ("jinja segments", lambda j=jinja: [j.render(c, TOOLS) for c in convs]),
        ):
            seconds = median_seconds(fn, repeats)
            rows.append(
                {
                    "flavor": flavor,
                    "renderer": name,
                    "conversations_per_s": n_conversations / seconds,
                    "chars_per_s": chars / seconds,
                }
            )
    return rows


def bench_encode(n_chars: int, repeats: int) -> dict[str, Any] | None:
    try:
        from k2model.text.tokenizer import PAT_STR, Tokenizer, load_ranks
    except ImportError:
        return None
    tok = Tokenizer.from_dir(EMBEDDED)
    special = {name: tok.special_id(name) for name in control_tokens("k2-thinking")}
    reference = tiktoken.Encoding(
        "k2_reference",
        pat_str=PAT_STR,
        mergeable_ranks=load_ranks(EMBEDDED / "tiktoken.model"),
        special_tokens=special,
    )
    rng = random.Random(1)
    text = ""
    while len(text) < n_chars:
        text += sentence(rng, 50) + rng.choice([". ", ".\n", "\n\n", "! "])
    assert tok.encode(text) == reference.encode(text, disallowed_special=())
    ours = median_seconds(lambda: tok.encode(text), repeats)
    theirs = median_seconds(lambda: reference.encode(text, disallowed_special=()), repeats)

    prompt = conversation(random.Random(2), 40)
    segments = render(prompt, TOOLS, flavor="k2-thinking")
    prompt_text = "".join(t for t, _ in segments)
    assert tok.encode_segments(segments) == reference.encode(prompt_text, allowed_special="all")
    ours_prompt = median_seconds(lambda: tok.encode_segments(segments), repeats)
    theirs_prompt = median_seconds(
        lambda: reference.encode(prompt_text, allowed_special="all"), repeats
    )
    n_tokens = len(tok.encode(text))
    return {
        "vocab": f"embedded, {tok.n_base} base ranks",
        "text_chars": len(text),
        "text_tokens": n_tokens,
        "ours_tokens_per_s": n_tokens / ours,
        "tiktoken_tokens_per_s": n_tokens / theirs,
        "text_overhead_ratio": ours / theirs,
        "prompt_chars": len(prompt_text),
        "prompt_segments": len(segments),
        "ours_prompt_ms": ours_prompt * 1e3,
        "tiktoken_prompt_ms": theirs_prompt * 1e3,
        "prompt_overhead_ratio": ours_prompt / theirs_prompt,
    }


def model_output(rng: random.Random) -> str:
    args = [json.dumps({"city": rng.choice(WORDS), "days": i}) for i in range(2)]
    calls = "".join(
        f"<|tool_call_begin|>functions.get_weather:{i}<|tool_call_argument_begin|>{a}"
        "<|tool_call_end|>"
        for i, a in enumerate(args)
    )
    return (
        f"<think>{sentence(rng, 300)}</think>{sentence(rng, 200)}"
        f"<|tool_calls_section_begin|>{calls}<|tool_calls_section_end|>"
    )


def token_deltas(text: str) -> tuple[list[list[Piece]], str]:
    """The output's pieces one token at a time, as the Detokenize stream decodes them."""
    tok = Tokenizer.from_dir(EMBEDDED)
    # Markers are single tokens in a real vocabulary; keep them whole here too.
    ids = tok.encode_segments(split_control(text, control_tokens("k2-thinking")))
    decoder = PieceDecoder(tok, marker_ids(tok, markers_for(True)))
    return [decoder.push([i]) for i in ids], "embedded tokenizer tokens"


def bench_stream(repeats: int) -> list[dict[str, Any]]:
    text = model_output(random.Random(3))
    deltas, unit = token_deltas(text)
    assert text_of(p for d in deltas for p in d) == text

    def concat() -> str:
        out = ""
        for d in deltas:
            out += text_of(d)
        return out

    def parse(reasoning: bool) -> None:
        parser = StreamParser(reasoning=reasoning, declared={"get_weather"})
        for d in deltas:
            parser.feed(d)
        parser.finish()

    rows = []
    base = median_seconds(concat, repeats)
    for name, fn in (
        ("concatenate only", concat),
        ("StreamParser", lambda: parse(False)),
        ("StreamParser reasoning=True", lambda: parse(True)),
    ):
        seconds = base if fn is concat else median_seconds(fn, repeats)
        rows.append(
            {
                "method": name,
                "deltas": len(deltas),
                "delta_unit": unit,
                "us_per_token": seconds / len(deltas) * 1e6,
                "ratio_to_concat": seconds / base,
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    headers = list(rows[0])
    cells = [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in r.values()] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer conversations and repeats")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tokenizer.json")
    args = p.parse_args()
    repeats = 3 if args.quick else 7
    render_rows = bench_render(50 if args.quick else 200, repeats)
    encode = bench_encode(100_000 if args.quick else 300_000, repeats)
    stream_rows = bench_stream(repeats)

    print("(a) render\n" + table(render_rows))
    if encode is None:
        print("\n(b) encode: skipped, k2model/text/tokenizer.py not available")
    else:
        print("\n(b) encode\n" + table([{"metric": k, "value": v} for k, v in encode.items()]))
    print("\n(c) stream parse\n" + table(stream_rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"render": render_rows, "encode": encode, "stream": stream_rows}
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
