"""DetokenizeSession on the embedded tokenizer: the streamed result does not depend on how the ids
are batched and equals the non-streaming parse of the whole decode; stop strings cut the content
only; tool calls and reasoning come out structured, never as raw markers."""

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2model import EMBEDDED_CHECKPOINT
from k2model.text.chat_format import control_tokens
from k2model.text.opaque import split_control
from k2model.text.pieces import decode_pieces
from k2model.text.tokenizer import Tokenizer
from k2model.text.tool_parser import markers_for, parse_output
from services.common.errors import InvalidArgument
from services.tokenizer.detokenize_session import DetokenizeOptions, DetokenizeSession, Output

TOKENIZER = Tokenizer.from_dir(EMBEDDED_CHECKPOINT)
CONTROLS = control_tokens("k2-thinking")
SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
MARKERS = markers_for(True)


def model_ids(text: str) -> list[int]:
    """Ids as the model would generate them: each marker is one control id."""
    return TOKENIZER.encode_segments(split_control(text, CONTROLS))


def batches(ids: list[int], cuts: Sequence[int]) -> list[list[int]]:
    points = sorted({c % (len(ids) + 1) for c in cuts} | {0, len(ids)})
    return [ids[a:b] for a, b in itertools.pairwise(points)]


@dataclass
class Collected:
    content: str = ""
    reasoning: str = ""
    calls: dict[int, dict[str, str]] = field(default_factory=dict)
    stopped: bool = False
    outputs: list[Output] = field(default_factory=list)


def stream(options: DetokenizeOptions, ids: list[int], cuts: Sequence[int] = ()) -> Collected:
    session = DetokenizeSession(TOKENIZER, options)
    outputs = [session.push(batch) for batch in batches(ids, cuts)] + [session.finish()]
    got = Collected(outputs=outputs)
    for out in outputs:
        got.content += out.content
        got.reasoning += out.reasoning
        got.stopped = got.stopped or out.stopped
        for d in out.tool_calls:
            call = got.calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            if d.id or d.name:
                assert not call["id"], "id and name come only on a call's first delta"
                call.update(id=d.id, name=d.name)
            call["arguments"] += d.arguments
            if d.error:
                call["error"] = d.error
    return got


FRAGMENTS = [
    *sorted(MARKERS),
    "functions.f:0",
    "functions.g:1",
    "bad id",
    '{"a": 1}',
    ' {"x": [1, "<|y|>"]} \n',
    "{bad",
    "hello",
    " ",
    "\n",
    "ü日本🚀",
]
outputs_text = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=14).map("".join)
parse_flags = st.sampled_from([(True, False), (True, True), (False, True)])


@settings(max_examples=150, deadline=None)
@given(text=outputs_text, flags=parse_flags, cuts=st.lists(st.integers(0, 200), max_size=12))
def test_parsed_stream_equals_whole_output_parse(
    text: str, flags: tuple[bool, bool], cuts: list[int]
) -> None:
    tools, reasoning = flags
    ids = model_ids(text)
    got = stream(DetokenizeOptions(parse_tool_calls=tools, parse_reasoning=reasoning), ids, cuts)
    want = parse_output(
        decode_pieces(TOKENIZER, ids, markers_for(reasoning)),
        reasoning=reasoning,
        declared=None if tools else frozenset(),
    )
    assert got.content == want.content
    assert got.reasoning == (want.reasoning_content or "")
    valid = {c.index: c for c in want.tool_calls}
    assert {i for i, c in got.calls.items() if "error" not in c} == set(valid)
    for index, call in valid.items():
        assert got.calls[index] == {"id": call.id, "name": call.name, "arguments": call.arguments}
    assert {e.index for e in want.errors} == {i for i, c in got.calls.items() if "error" in c}
    parsed_markers = markers_for(reasoning)
    for out in got.outputs:
        assert not any(m in out.content or m in out.reasoning for m in parsed_markers)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=60), cuts=st.lists(st.integers(0, 200), max_size=12))
def test_plain_text_streams_back_exactly(text: str, cuts: list[int]) -> None:
    got = stream(DetokenizeOptions(), TOKENIZER.encode(text), cuts)
    assert got.content == text
    assert not got.stopped


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Brute force: where the kept text ends, for the stop string that completes first (the
    longest, i.e. earliest-starting, among those completing at the same character)."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            return end - max(len(s) for s in hits)
    return None


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="ab c.🚀", max_size=40),
    stops=st.lists(st.text(alphabet="ab c.🚀", min_size=1, max_size=4), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 200), max_size=12),
)
def test_stop_strings_cut_the_content_at_the_first_completed_match(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    got = stream(DetokenizeOptions(stop=tuple(stops)), TOKENIZER.encode(text), cuts)
    cut = first_stop(text, stops)
    assert got.content == (text if cut is None else text[:cut])
    assert got.stopped == (cut is not None)


def test_stop_string_across_token_boundaries_stops_and_is_not_emitted() -> None:
    text = "The weather is sunny. END of report"
    ids = TOKENIZER.encode(text)
    pieces = [TOKENIZER.decode([i]) for i in ids]
    assert not any("y. END" in p for p in pieces), "the stop string must span several tokens"
    session = DetokenizeSession(TOKENIZER, DetokenizeOptions(stop=("y. END",)))
    outputs = [session.push([i]) for i in ids]
    content = "".join(o.content for o in outputs)
    assert content == "The weather is sunn"
    stopped_at = next(k for k, o in enumerate(outputs) if o.stopped)
    assert all(o.stopped and o == Output(stopped=True) for o in outputs[stopped_at + 1 :])
    assert session.finish() == Output(stopped=True)


CALL = f'{CB}functions.get_weather:0{AB}{{"city": "Paris", "note": "}}"}}{CE}'
WEATHER_OUTPUT = f"Let me check.{SB}{CALL}{SE}"


def test_tool_call_is_structured_deltas_never_content() -> None:
    options = DetokenizeOptions(parse_tool_calls=True, tool_names=("get_weather",))
    session = DetokenizeSession(TOKENIZER, options)
    outputs = [session.push([i]) for i in model_ids(WEATHER_OUTPUT)] + [session.finish()]
    deltas = [d for o in outputs for d in o.tool_calls]
    assert "".join(o.content for o in outputs) == "Let me check."
    first = deltas[0]
    assert (first.index, first.id, first.name) == (0, "functions.get_weather:0", "get_weather")
    assert len(deltas) > 2, "token-by-token pushes must stream argument fragments"
    assert all(d.index == 0 and not d.id and not d.name and not d.error for d in deltas[1:])
    arguments = "".join(d.arguments for d in deltas)
    assert json.loads(arguments) == {"city": "Paris", "note": "}"}


def test_stop_strings_are_not_matched_in_arguments_or_reasoning() -> None:
    options = DetokenizeOptions(stop=("}", "Paris"), parse_tool_calls=True, parse_reasoning=True)
    got = stream(options, model_ids(f"<think>Paris? {{x}}</think>{WEATHER_OUTPUT}"), range(200))
    assert not got.stopped
    assert got.reasoning == "Paris? {x}"
    assert got.content == "Let me check."
    assert json.loads(got.calls[0]["arguments"]) == {"city": "Paris", "note": "}"}


def test_held_content_is_released_before_a_tool_call_and_a_stop_never_spans_one() -> None:
    options = DetokenizeOptions(stop=("check.ab",), parse_tool_calls=True)
    ids = model_ids(f"Let me check.a{SB}{CALL}{SE}b")
    session = DetokenizeSession(TOKENIZER, options)
    outputs = [session.push([i]) for i in ids] + [session.finish()]
    first_call = next(k for k, o in enumerate(outputs) if o.tool_calls)
    assert "".join(o.content for o in outputs[: first_call + 1]) == "Let me check.a"
    assert "".join(o.content for o in outputs) == "Let me check.ab"
    assert not any(o.stopped for o in outputs)


def test_after_a_stop_later_tool_calls_are_dropped() -> None:
    options = DetokenizeOptions(stop=("check",), parse_tool_calls=True)
    for cuts in ([], range(100)):  # stopped within one push, and in an earlier push
        got = stream(options, model_ids(WEATHER_OUTPUT), cuts)
        assert (got.content, got.calls, got.stopped) == ("Let me ", {}, True)


def test_reasoning_is_split_off_the_content() -> None:
    text = "<think>The user wants 2+2.</think>It is 4."
    got = stream(DetokenizeOptions(parse_reasoning=True), model_ids(text), range(100))
    assert (got.reasoning, got.content) == ("The user wants 2+2.", "It is 4.")


def test_reasoning_without_tool_parsing_reports_calls_as_errors_not_content() -> None:
    got = stream(DetokenizeOptions(parse_reasoning=True), model_ids(f"<think>hm</think>{CALL}"))
    assert got.content == ""
    assert got.calls[0]["id"] == "" and "undeclared tool 'get_weather'" in got.calls[0]["error"]


def test_undeclared_tool_is_an_error_delta() -> None:
    options = DetokenizeOptions(parse_tool_calls=True, tool_names=("search",))
    got = stream(options, model_ids(WEATHER_OUTPUT))
    assert got.calls == {0: {"id": "", "name": "", "arguments": "", "error": got.calls[0]["error"]}}
    assert "get_weather" in got.calls[0]["error"]


def test_skip_special_tokens_drops_control_ids_only_when_asked() -> None:
    ids = [*TOKENIZER.encode("done"), TOKENIZER.special_id("<|im_end|>")]
    assert stream(DetokenizeOptions(skip_special_tokens=True), ids).content == "done"
    assert stream(DetokenizeOptions(), ids).content == "done<|im_end|>"


@pytest.mark.parametrize(
    "options",
    [
        DetokenizeOptions(stop=("a", "b", "c", "d", "e")),
        DetokenizeOptions(stop=("",)),
        DetokenizeOptions(stop=("x" * 257,)),
        DetokenizeOptions(tool_names=("f",)),
        DetokenizeOptions(parse_tool_calls=True, tool_names=("f", "f")),
        DetokenizeOptions(parse_tool_calls=True, tool_names=("bad name",)),
    ],
)
def test_bad_start_options_are_invalid_argument(options: DetokenizeOptions) -> None:
    with pytest.raises(InvalidArgument):
        DetokenizeSession(TOKENIZER, options)


def test_out_of_vocabulary_id_is_invalid_argument() -> None:
    session = DetokenizeSession(TOKENIZER, DetokenizeOptions())
    with pytest.raises(InvalidArgument, match="out of range"):
        session.push([TOKENIZER.vocab_size])


def test_markers_spelled_with_ordinary_tokens_stay_text() -> None:
    """Regression: the session parsed decoded text, so arguments that mention
    `<|tool_call_end|>` cut the call short, and content saying "use the <think> tag" lost text.
    Here the model writes the markers' characters with ordinary tokens; only its control ids
    are structure, streamed and whole alike."""
    args = (
        '{"doc": "a call ends with <|tool_call_end|>, a section with <|tool_calls_section_end|>"}'
    )
    prose = "Use the <think> tag, or </think>, and "
    ids = (
        TOKENIZER.encode(prose)
        + model_ids(f"{SB}{CB}functions.f:0{AB}")
        + TOKENIZER.encode(args)
        + model_ids(f"{CE}{SE}")
    )
    assert TOKENIZER.decode(ids).count(CE) == 2  # a text parser saw two call ends here
    options = DetokenizeOptions(parse_tool_calls=True, parse_reasoning=False, tool_names=("f",))
    for cuts in ([], list(range(len(ids)))):
        got = stream(options, ids, cuts)
        assert got.content == prose
        assert got.calls == {0: {"id": "functions.f:0", "name": "f", "arguments": args}}
    thinking = DetokenizeOptions(parse_reasoning=True)
    ids = TOKENIZER.encode("I write <think> and </think> as text") + model_ids("</think>done")
    for cuts in ([], list(range(len(ids)))):
        got = stream(thinking, ids, cuts)
        assert (got.reasoning, got.content) == ("I write <think> and </think> as text", "done")
