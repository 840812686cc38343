"""K2-Thinking reasoning split: <think>...</think>, implicit end at tool calls, never closed."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2model.text.reasoning import split_reasoning
from k2model.text.stream_parser import ReasoningDelta, StreamParser, aggregate
from tests.text.pieces_helpers import P, cut, parse

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL = '<|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{"a": 1}<|tool_call_end|>'


@pytest.mark.parametrize(
    ("text", "reasoning", "rest"),
    [
        ("<think>plan</think>answer", "plan", "answer"),
        ("plan</think>answer", "plan", "answer"),  # the opening tag is optional
        ("<think></think>answer", "", "answer"),
        ("<think>still thinking", "still thinking", ""),  # never closed: all reasoning
        ("no tags at all", "no tags at all", ""),
        ("<think>need a tool" + SB + CALL + SE, "need a tool", SB + CALL + SE),  # implicit end
        ("<think>x" + CALL, "x", CALL),  # a bare call begin ends it too
        ("<think>a<think>b<|tool_call_end|>c</think>d</think>e", "abc", "d</think>e"),
        ("<think>" + SE + "x</think>", "x", ""),  # stray markers never reach reasoning
    ],
)
def test_split_reasoning(text: str, reasoning: str, rest: str) -> None:
    assert split_reasoning(P(text)) == (reasoning, P(rest))


def test_parse_output_with_reasoning_and_tool_call() -> None:
    out = parse("<think>weather needs a tool</think>Checking." + SB + CALL + SE, reasoning=True)
    assert out.reasoning_content == "weather needs a tool"
    assert out.content == "Checking."
    assert [c.name for c in out.tool_calls] == ["f"]
    assert out.finish_reason == "tool_calls"


def test_tool_call_without_closing_think_is_not_swallowed() -> None:
    """vLLM PR #32216: a call emitted before </think> was lost inside the reasoning."""
    out = parse("<think>I will call f" + SB + CALL + SE + "</think>", reasoning=True)
    assert out.reasoning_content == "I will call f"
    assert len(out.tool_calls) == 1
    assert out.content == ""  # the late </think> is a stray marker, dropped


def test_stream_reasoning_deltas_before_close() -> None:
    parser = StreamParser(reasoning=True)
    assert parser.feed(P("<think>step one, ")) == [ReasoningDelta("step one, ")]
    assert parser.feed(P("step two")) == [ReasoningDelta("step two")]
    events = parser.feed(P("</think>done")) + parser.finish()
    out = aggregate(events, reasoning=True)
    assert (out.reasoning_content, out.content) == ("", "done")


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(["<think>", "</think>", SB, SE, CALL, "<|tool_call_end|>", "<thi", "</"])
        | st.text(max_size=5),
        max_size=10,
    ).map("".join),
    st.integers(min_value=0, max_value=200),
)
def test_split_reasoning_matches_stream(text: str, at: int) -> None:
    parser = StreamParser(reasoning=True)
    events = [e for chunk in cut(text, [at]) for e in parser.feed(chunk)] + parser.finish()
    reasoning, _ = split_reasoning(P(text))
    assert aggregate(events, reasoning=True).reasoning_content == reasoning
