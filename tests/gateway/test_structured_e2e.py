"""Structured output and the generation-length controls through the real suite, with the
official openai SDK: `chat.completions.parse` with a pydantic model, `pydantic_function_tool`
(strict) in auto mode, json_object, and vLLM's min_tokens / ignore_eos.

The embedded checkpoint has random weights, so where the model would rarely do the thing under
test on its own, a logit_bias makes it want to (open a tool-call section, end its turn at once);
the constraint then decides what it may write."""

from __future__ import annotations

import json
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from k2model import EMBEDDED_CHECKPOINT
from k2model.text import chat_tokens as tok
from k2model.text.tokenizer import Tokenizer
from tests.gateway.conftest import RunningSuite, openai_client
from tests.gateway.rest_fakes import ORDINARY_KEY

MODEL = "kimi-k2-instruct"
TOKENIZER = Tokenizer.from_dir(EMBEDDED_CHECKPOINT)
SECTION_BEGIN = TOKENIZER.special_id(tok.SECTION_BEGIN)
IM_END = TOKENIZER.special_id(tok.IM_END)
ASK = [{"role": "user", "content": "What's the weather in Paris for the next days?"}]


class Forecast(BaseModel):
    city: str = Field(max_length=16)
    unit: Literal["celsius", "fahrenheit"]
    days: int = Field(ge=1, le=7)


class GetWeather(BaseModel):
    """Get the weather for a city."""

    city: str = Field(max_length=16)
    days: int = Field(ge=1, le=7)


@pytest.fixture(scope="module")
def client(real_suite: RunningSuite) -> openai.OpenAI:
    return openai_client(real_suite.base, ORDINARY_KEY)


@pytest.mark.parametrize("seed", [0, 1])
def test_parse_with_a_pydantic_model_gives_that_model(client, seed) -> None:
    completion = client.chat.completions.parse(
        model=MODEL, messages=ASK, response_format=Forecast, max_tokens=200, seed=seed
    )
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Forecast)
    assert Forecast.model_validate_json(message.content) == message.parsed


def test_json_object_mode_answers_with_an_object(client) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Answer in JSON."}],
        response_format={"type": "json_object"},
        max_tokens=300,
        temperature=0,
        logit_bias={str(IM_END): 5},  # a random model's objects close sooner
    )
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:  # cut by max_tokens: still a JSON prefix, never prose
        assert reply.choices[0].message.content.startswith("{")


def test_a_strict_tool_in_auto_mode_is_called_with_schema_valid_arguments(client) -> None:
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=ASK,
        tools=[openai.pydantic_function_tool(GetWeather)],
        logit_bias={str(SECTION_BEGIN): 100},  # the model opens a section at once
        max_tokens=200,
        temperature=0.7,
        seed=3,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls  # as many as the model makes (parallel_tool_calls)
    for call in choice.message.tool_calls:
        assert call.function.name == "GetWeather" and call.id.startswith("functions.GetWeather:")
        assert isinstance(call.function.parsed_arguments, GetWeather)


def test_parallel_tool_calls_false_allows_one_call(client) -> None:
    tools = [openai.pydantic_function_tool(GetWeather)]
    for seed in range(3):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=tools,
            parallel_tool_calls=False,
            logit_bias={str(SECTION_BEGIN): 100},
            max_tokens=300,
            seed=seed,
        )
        assert reply.choices[0].finish_reason == "tool_calls"
        assert len(reply.choices[0].message.tool_calls) == 1


def test_min_tokens_holds_the_end_of_turn_back(client) -> None:
    wants_to_stop = {"logit_bias": {str(IM_END): 100}, "max_tokens": 12, "temperature": 0}
    plain = client.chat.completions.create(model=MODEL, messages=ASK, **wants_to_stop)
    held = client.chat.completions.create(
        model=MODEL, messages=ASK, extra_body={"min_tokens": 6}, **wants_to_stop
    )
    assert plain.usage.completion_tokens == 1 and plain.choices[0].finish_reason == "stop"
    assert held.usage.completion_tokens == 7 and held.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_ignore_eos_generates_exactly_max_tokens(client, route) -> None:
    fields = {"logit_bias": {str(IM_END): 100}, "max_tokens": 9, "extra_body": {"ignore_eos": True}}
    if route == "chat":
        reply = client.chat.completions.create(model=MODEL, messages=ASK, **fields)
    else:
        reply = client.completions.create(model=MODEL, prompt="Once upon a time", **fields)
    assert reply.usage.completion_tokens == 9 and reply.choices[0].finish_reason == "length"


def test_continuous_usage_stats_count_up_to_the_final_usage(client) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
    )
    counts = [c.usage.completion_tokens for c in chunks if c.choices]
    final = chunks[-1].usage
    assert counts == sorted(counts) and counts[-1] == final.completion_tokens <= 10
    assert {c.usage.prompt_tokens for c in chunks} == {final.prompt_tokens}
