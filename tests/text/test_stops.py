"""StopMatcher: stop strings are found however the text is split into deltas, held-back text is
released only when settled, and the stop string itself is never emitted."""

import itertools

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from k2model.text.stops import MAX_STOP_CHARS, StopMatcher


def _reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """Brute force: the stop string that completes first (earliest end, then earliest start)."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if text[:end].endswith(s)]
        if starts:
            return text[: min(starts)], True
    return text, False


def _run(text: str, stops: list[str], cuts: list[int]) -> tuple[list[str], bool]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    matcher = StopMatcher(stops)
    out: list[str] = []
    for a, b in itertools.pairwise(points):
        emitted, stopped = matcher.push(text[a:b])
        out.append(emitted)
        if stopped:
            return out, True
    out.append(matcher.flush())
    return out, False


small_text = st.text(st.sampled_from("ab c中"), max_size=40)
stop_lists = st.lists(st.text(st.sampled_from("ab c中"), min_size=1, max_size=5), max_size=4)


@settings(max_examples=500, deadline=None)
@given(text=small_text, stops=stop_lists, cuts=st.lists(st.integers(0, 50), max_size=40))
@example(text="xxabcd", stops=["abcd", "bc"], cuts=[3])
@example(text="aab", stops=["ab", "aab"], cuts=[1, 2])
def test_emitted_text_is_text_before_first_stop_for_every_split(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    deltas, stopped = _run(text, stops, cuts)
    assert ("".join(deltas), stopped) == _reference(text, stops)


@settings(max_examples=300, deadline=None)
@given(text=small_text, stops=stop_lists, cuts=st.lists(st.integers(0, 50), max_size=40))
def test_emitted_text_never_ends_inside_a_possible_stop(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    """Anything emitted before the stop is final: it is a prefix of the reference output."""
    deltas, _ = _run(text, stops, cuts)
    expected, _ = _reference(text, stops)
    emitted = ""
    for d in deltas:
        emitted += d
        assert expected.startswith(emitted)


def test_partial_match_is_held_then_released() -> None:
    matcher = StopMatcher(["</end>"])
    assert matcher.push("answer </e") == ("answer ", False)
    assert matcher.push("nvelope>") == ("</envelope>", False)
    assert matcher.push(" </en") == (" ", False)
    assert matcher.flush() == "</en"


def test_match_across_three_deltas_drops_stop_and_rest() -> None:
    matcher = StopMatcher(["STOP", "never"])
    assert matcher.push("go S") == ("go ", False)
    assert matcher.push("T") == ("", False)
    assert matcher.push("OP and more") == ("", True)
    assert matcher.push("later") == ("", True)
    assert matcher.flush() == ""


def test_no_stops_passes_everything_through() -> None:
    matcher = StopMatcher([])
    assert matcher.push("<|im_end|>") == ("<|im_end|>", False)
    assert matcher.flush() == ""


@pytest.mark.parametrize(
    "stops",
    [["a", "b", "c", "d", "e"], [""], ["x" * (MAX_STOP_CHARS + 1)]],
)
def test_invalid_stop_lists_are_rejected(stops: list[str]) -> None:
    with pytest.raises(ValueError):
        StopMatcher(stops)


def test_a_bare_string_is_rejected() -> None:
    with pytest.raises(TypeError):
        StopMatcher("stop")  # type: ignore[arg-type]
