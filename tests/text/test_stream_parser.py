"""Streaming parser: for every way of cutting an output into deltas, the aggregated events equal
the non-streaming parse; markers are whole pieces (control ids), and text that spells one, or a
fragment of one, is text."""

from collections.abc import Collection, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2model.text.pieces import Piece, text_of
from k2model.text.stream_parser import (
    ContentDelta,
    Event,
    ReasoningDelta,
    StreamParser,
    ToolCallArgsDelta,
    ToolCallDone,
    ToolCallStart,
    aggregate,
)
from k2model.text.tool_parser import TOOL_MARKERS, ToolCallError, parse_output
from tests.text.pieces_helpers import P, cut, units_of

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
MARKERS = sorted(TOOL_MARKERS | {"<think>", "</think>"})

FRAGMENTS = [
    *MARKERS,
    "<|tool_",
    "<|tool_call_be",
    "<thi",
    "</th",
    "<",
    "<|",
    "|>",
    "functions.f:0",
    "functions.g:1",
    " g:7 ",
    "bad id",
    '{"a": 1}',
    ' {"x": [1, "<|y|>"]} \n',
    "{bad",
    "[]",
    " ",
    "\n",
    "hello",
    "ü日本🚀",
]
WHITESPACE = st.sampled_from(["", " ", "\n", " \n\t"])
well_formed_call = st.builds(
    lambda ws1, call_id, ws2, args, ws3: f"{CB}{ws1}{call_id}{AB}{ws2}{args}{ws3}{CE}",
    WHITESPACE,
    st.sampled_from(["functions.f:0", "functions.g:2", "f:1", "functions.h"]),
    WHITESPACE,
    st.sampled_from(['{"a": 1}', '{"s": "<|x"}', "{}", '{"n": [1, {"m": null}]}', "{oops"]),
    WHITESPACE,
)
outputs = st.lists(
    st.sampled_from(FRAGMENTS) | st.text(max_size=4) | well_formed_call, max_size=16
).map("".join)


def stream(
    chunks: Sequence[Sequence[Piece]],
    *,
    reasoning: bool = False,
    declared: Collection[str] | None = None,
    history_calls: int = 0,
) -> list[Event]:
    parser = StreamParser(reasoning=reasoning, declared=declared, history_calls=history_calls)
    events: list[Event] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.finish()


def check_call_events(events: list[Event]) -> None:
    """OpenAI order: start (id, name) first, then argument fragments, then done or error."""
    started: dict[int, ToolCallStart] = {}
    args: dict[int, str] = {}
    finished: set[int] = set()
    for event in events:
        if isinstance(event, ToolCallStart):
            assert event.index not in started and event.index not in finished
            started[event.index] = event
            args[event.index] = ""
        elif isinstance(event, ToolCallArgsDelta):
            assert event.index in started and event.index not in finished
            assert event.text
            args[event.index] += event.text
        elif isinstance(event, ToolCallDone):
            start = started[event.call.index]
            assert (start.id, start.name) == (event.call.id, event.call.name)
            assert args[event.call.index] == event.call.arguments
            finished.add(event.call.index)
        elif isinstance(event, ToolCallError):
            assert event.index not in finished
            finished.add(event.index)
        else:
            assert event.text
    assert set(started) <= finished


def assert_stream_matches(text: str, chunks: list[list[Piece]], **kw) -> None:
    assert text_of(p for c in chunks for p in c) == text
    events = stream(chunks, **kw)
    check_call_events(events)
    expected = parse_output(P(text), **kw)
    assert aggregate(events, reasoning=kw.get("reasoning", False)) == expected


@settings(max_examples=400, deadline=None)
@given(
    outputs,
    st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    st.booleans(),
    st.none() | st.just(frozenset({"f"})),
)
def test_streaming_equals_non_streaming_for_any_split(
    text: str, points: list[int], reasoning: bool, declared: frozenset[str] | None
) -> None:
    assert_stream_matches(
        text, cut(text, points), reasoning=reasoning, declared=declared, history_calls=3
    )


REALISTIC = [
    "Plain answer with a < sign and <|not a marker|>.",
    "Let me check."
    + SB
    + f"{CB}functions.get_weather:0{AB}"
    + '{"city": "Beijing"}'
    + CE
    + f"{CB} search:1 {AB}"
    + ' {"q": "k2 <|tool"} '
    + CE
    + SE,
    "<think>The user wants weather. I'll call the tool.</think>On it."
    + "<|tool_call_section_begin|>"
    + f"{CB}functions.get_weather:4{AB}"
    + '{"city": "Paris"}'
    + CE
    + "<|tool_call_section_end|>",
    "thinking without tags" + SB + f"{CB}functions.f:0{AB}{{bad{CE}{CB}functions.f:1{AB}" + "{}",
]


@pytest.mark.parametrize("text", REALISTIC)
@pytest.mark.parametrize("reasoning", [False, True])
def test_every_single_cut_and_char_by_char(text: str, reasoning: bool) -> None:
    for i in range(len(text) + 1):
        assert_stream_matches(text, cut(text, [i]), reasoning=reasoning)
    assert_stream_matches(text, units_of(text), reasoning=reasoning)


@pytest.mark.parametrize("reasoning", [False, True])
def test_spelled_markers_and_fragments_are_text(reasoning: bool) -> None:
    """Regression: text spelling a marker, whole or in part, is text as soon
    as it arrives; nothing is held back for it (only the singular section begin is)."""
    for marker in sorted(TOOL_MARKERS | {"<think>", "</think>"}):
        for k in (1, len(marker) // 2, len(marker)):
            if "<|tool_call_section_begin|>".startswith(marker[:k]):
                continue  # could still become the singular begin: held (next test)
            parser = StreamParser(reasoning=reasoning)
            events = parser.feed(["Hi " + marker[:k]])
            kind = ReasoningDelta if reasoning else ContentDelta
            assert events == [kind("Hi " + marker[:k])]


def test_a_held_singular_begin_is_decided_by_the_next_piece() -> None:
    singular = "<|tool_call_section_begin|>"
    parser = StreamParser()
    assert parser.feed(["a <|tool_ca"]) == [ContentDelta("a ")]
    assert parser.feed(["t"]) == [ContentDelta("<|tool_cat")]
    assert parser.feed([singular[:5]]) == []
    assert parser.feed([singular[5:] + " \n"]) == []
    assert parser.feed(["x"]) == [ContentDelta(singular + " \nx")]  # not before a call: text
    assert parser.feed([singular]) == []
    events = parser.feed(P(f"{CB}functions.f:0{AB}{{}}{CE}")) + parser.finish()
    assert not [e for e in events if isinstance(e, ContentDelta)]  # before a call: dropped
    assert [type(e).__name__ for e in events] == [
        "ToolCallStart",
        "ToolCallArgsDelta",
        "ToolCallDone",
    ]


def test_arguments_stream_before_the_call_ends() -> None:
    args = '{"query": "a fairly long search string", "limit": 10}'
    text = SB + f"{CB}functions.search:0{AB} " + args + " " + CE + SE
    events = stream(units_of(text))
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "ToolCallStart"
    assert kinds[-1] == "ToolCallDone"
    deltas = [e.text for e in events if isinstance(e, ToolCallArgsDelta)]
    assert len(deltas) > 10 and "".join(deltas) == args


def test_undeclared_call_gets_no_start_and_bad_json_is_retracted() -> None:
    text = SB + f"{CB}functions.rm:0{AB}{{}}{CE}{CB}functions.f:1{AB}{{oops{CE}" + SE
    events = stream([P(text)], declared={"f"})
    assert [type(e).__name__ for e in events] == [
        "ToolCallError",
        "ToolCallStart",
        "ToolCallArgsDelta",
        "ToolCallError",
    ]
    assert events[1] == ToolCallStart(1, "functions.f:1", "f")


def test_reasoning_stream() -> None:
    events = stream([P("<think>"), P("step 1"), P("</think>answer")], reasoning=True)
    assert aggregate(events, reasoning=True).reasoning_content == "step 1"
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == "answer"
    assert all(isinstance(e, ReasoningDelta) for e in events[:1])
