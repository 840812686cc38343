"""Non-streaming parse of complete K2 outputs: content, tool calls, ids, and reported errors."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2model.text.pieces import Marker
from k2model.text.tool_parser import ParsedToolCall, ToolCallError, parse_output
from tests.text.pieces_helpers import parse

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


def tool_call(call_id: str, args: str) -> str:
    return f"{CB}{call_id}{AB}{args}{CE}"


def test_plain_content() -> None:
    out = parse("Hello there.\n")
    assert (out.content, out.tool_calls, out.errors) == ("Hello there.\n", (), ())
    assert out.finish_reason == "stop"
    assert out.reasoning_content is None


def test_content_then_two_calls() -> None:
    text = (
        "Let me check."
        + SB
        + tool_call("functions.get_weather:0", '{"city": "Beijing"}')
        + tool_call("functions.search:1", '{"q": "天气"}')
        + SE
    )
    out = parse(text)
    assert out.content == "Let me check."
    assert out.tool_calls == (
        ParsedToolCall("functions.get_weather:0", "get_weather", '{"city": "Beijing"}', 0),
        ParsedToolCall("functions.search:1", "search", '{"q": "天气"}', 1),
    )
    assert out.errors == ()
    assert out.finish_reason == "tool_calls"


def test_singular_section_markers_and_whitespace() -> None:
    text = (
        "<|tool_call_section_begin|>\n "
        + tool_call(" functions.get_weather:3 \n", '\n {"city": "Rome"}  \n')
        + "\n<|tool_call_section_end|>"
    )
    out = parse(text)
    assert out.content == ""
    assert out.tool_calls == (
        ParsedToolCall("functions.get_weather:3", "get_weather", '{"city": "Rome"}', 0),
    )


def test_name_is_text_up_to_last_colon() -> None:
    out = parse(SB + tool_call("functions.ns.tool:v2:7", "{}") + SE)
    assert out.tool_calls[0].name == "ns.tool:v2"
    assert out.tool_calls[0].id == "functions.ns.tool:v2:7"


@pytest.mark.parametrize(
    ("model_id", "name"),
    [
        ("get_weather:0", "get_weather"),
        ("functions.get_weather", "get_weather"),
        ("lookup", "lookup"),
    ],
)
def test_malformed_ids_are_reissued_with_global_index(model_id: str, name: str) -> None:
    text = SB + tool_call("functions.a:5", "{}") + tool_call(model_id, "{}") + SE
    out = parse(text, history_calls=5)
    assert [c.id for c in out.tool_calls] == ["functions.a:5", f"functions.{name}:6"]
    assert out.tool_calls[1].name == name


@pytest.mark.parametrize("model_id", ["", "functions.:0", "two words:1", ":3"])
def test_unrecoverable_ids_are_errors(model_id: str) -> None:
    out = parse(SB + tool_call(model_id, "{}") + SE)
    assert out.tool_calls == ()
    assert out.errors[0].reason.startswith("malformed tool-call id")
    assert out.finish_reason == "stop"


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ('{"city": "Par', "not valid JSON"),
        ("", "not valid JSON"),
        ('["a"]', "not a JSON object"),
        ('{"x": NaN}', "not valid JSON"),
        ('{"a": 1} trailing', "not valid JSON"),
    ],
)
def test_bad_arguments_are_reported_not_passed_off(args: str, reason: str) -> None:
    call = tool_call("functions.f:0", args)
    good = tool_call("functions.g:1", '{"ok": true}')
    out = parse(SB + call + good + SE)
    assert out.errors == (ToolCallError(0, call, out.errors[0].reason),)
    assert reason in out.errors[0].reason
    assert [c.name for c in out.tool_calls] == ["g"]
    assert out.tool_calls[0].index == 1


def test_undeclared_tool_is_an_error_only_with_a_declared_set() -> None:
    text = SB + tool_call("functions.rm_rf:0", "{}") + tool_call("functions.ls:1", "{}") + SE
    declared = parse(text, declared={"ls"})
    assert [c.name for c in declared.tool_calls] == ["ls"]
    assert declared.errors[0].reason == "undeclared tool 'rm_rf'"
    assert len(parse(text).tool_calls) == 2


def test_cut_short_calls() -> None:
    missing_args = f"{CB}functions.f:0{CE}"
    interrupted = f"{CB}functions.g:1{AB}" + '{"a": 1}'
    unterminated = f"{CB}functions.h:2{AB}" + '{"b": 2}'
    out = parse(SB + missing_args + interrupted + SE + "after" + SB + unterminated)
    assert [(e.index, e.raw) for e in out.errors] == [
        (0, missing_args),
        (1, interrupted),
        (2, unterminated),
    ]
    assert "missing <|tool_call_argument_begin|>" in out.errors[0].reason
    assert "unterminated" in out.errors[1].reason
    assert out.content == "after"  # text after a section is content again
    assert out.tool_calls == ()


def test_call_without_section_and_stray_markers() -> None:
    text = f"a{SE}b{AB}c{CE}d" + tool_call("functions.f:0", "{}") + "junk between" + SE + "tail"
    out = parse(text)
    assert out.content == "abcdtail"
    assert [c.id for c in out.tool_calls] == ["functions.f:0"]


def test_arguments_keep_model_text() -> None:
    args = '{\n  "b": [1, 2],\n  "a": "ü"\n}'
    out = parse(SB + tool_call("functions.f:0", args) + SE)
    assert out.tool_calls[0].arguments == args
    assert json.loads(out.tool_calls[0].arguments) == {"b": [1, 2], "a": "ü"}


def test_think_tags_are_text_without_reasoning() -> None:
    assert parse("<think>x</think>y").content == "<think>x</think>y"


def test_think_tag_inside_call_cuts_it_with_reasoning() -> None:
    out = parse("</think>" + SB + f"{CB}functions.f:0{AB}{{}}<think>" + SE, reasoning=True)
    assert out.errors[0].reason.startswith("unterminated")
    assert out.content == ""


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from([SB, SE, CB, AB, CE, "<think>", "</think>", "<|tool_call_section_begin|>"])
        | st.text(max_size=6),
        max_size=12,
    ).map("".join),
    st.booleans(),
    st.none() | st.frozensets(st.sampled_from(["f", "g"])),
)
def test_parse_never_raises(text: str, reasoning: bool, declared: frozenset[str] | None) -> None:
    out = parse(text, reasoning=reasoning, declared=declared)
    for call in out.tool_calls:
        assert isinstance(json.loads(call.arguments), dict)
        assert declared is None or call.name in declared
    indices = sorted([c.index for c in out.tool_calls] + [e.index for e in out.errors])
    assert indices == list(range(len(indices)))


def test_marker_text_written_with_ordinary_tokens_is_text() -> None:
    """Regression: markers were found in decoded text, so a model writing
    about `<|tool_call_end|>` inside JSON arguments cut its call short, and "use the <think>
    tag" lost content. Only control ids (Marker pieces) are structure."""
    args = '{"note": "ends with <|tool_call_end|> and <|tool_calls_section_end|>"}'
    pieces = [
        "Use the <think> tag, then ",
        Marker(SB),
        Marker(CB),
        "functions.f:0",
        Marker(AB),
        args,
        Marker(CE),
        Marker(SE),
        " and </think> too.",
    ]
    out = parse_output(pieces, reasoning=False)
    assert out.content == "Use the <think> tag, then  and </think> too."
    assert [(c.name, c.arguments) for c in out.tool_calls] == [("f", args)]
    thinking = parse_output(
        ["I said <think> and </think> in text", Marker("</think>"), "ok"], reasoning=True
    )
    assert (thinking.reasoning_content, thinking.content) == (
        "I said <think> and </think> in text",
        "ok",
    )
    spelled = parse_output([SB + CB + "functions.f:0" + AB + "{}" + CE + SE])
    assert spelled.content == SB + CB + "functions.f:0" + AB + "{}" + CE + SE
    assert spelled.tool_calls == ()


def test_singular_markers_are_read_only_next_to_structure() -> None:
    """The singular section markers are text in every vocabulary; a singular begin is dropped
    only right before a call, a singular end only between calls."""
    prose = "The docs call it <|tool_call_section_begin|> sometimes."
    assert parse_output([prose]).content == prose
    assert (
        parse_output(["x <|tool_call_section_begin|>"]).content == "x <|tool_call_section_begin|>"
    )
