"""Agent frameworks and client libraries, unchanged, against the real suite: the openai-agents
SDK's default model (the Responses API) with a strict function tool, LangChain's ChatOpenAI
(`with_structured_output` by its default method, `bind_tools`), and LiteLLM.

The embedded checkpoint has random weights: what is checked is that each library's own request
shapes are served and its own parsing succeeds (a forced or strict call arrives schema-valid,
structured output parses into the pydantic model)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import litellm
import pytest
from agents import (
    Agent,
    ModelSettings,
    Runner,
    function_tool,
    set_default_openai_api,
    set_default_openai_client,
    set_tracing_disabled,
)
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from openai import AsyncOpenAI
from pydantic import BaseModel, Field

from tests.gateway.conftest import RunningSuite
from tests.gateway.rest_fakes import ORDINARY_KEY

MODEL = "kimi-k2-instruct"


class Forecast(BaseModel):
    city: str = Field(max_length=16)
    days: int = Field(ge=1, le=7)


def test_openai_agents_default_model_calls_a_strict_tool(real_suite: RunningSuite) -> None:
    calls: list[tuple[str, int]] = []

    @function_tool
    def get_weather(city: Annotated[str, Field(max_length=16)], days: int) -> str:
        """Get the weather for a city over some days."""
        calls.append((city, days))
        return "sunny"

    async def run() -> object:
        client = AsyncOpenAI(base_url=f"{real_suite.base}/v1", api_key=ORDINARY_KEY, max_retries=0)
        set_default_openai_client(client, use_for_tracing=False)
        set_default_openai_api("responses")
        set_tracing_disabled(True)
        agent = Agent(
            name="Weather",
            instructions="Answer with the weather.",
            model=MODEL,
            tools=[get_weather],
            model_settings=ModelSettings(tool_choice="required", max_tokens=200, temperature=0.6),
            # the tool's result is the answer: a random-weight model's own reply may not end
            tool_use_behavior="stop_on_first_tool",
        )
        return await Runner.run(agent, "What's the weather in Paris?", max_turns=4)

    result = asyncio.run(run())
    assert len(calls) == 1 and isinstance(calls[0][0], str) and isinstance(calls[0][1], int)
    assert result.final_output == "sunny"
    assert [item.type for item in result.new_items] == ["tool_call_item", "tool_call_output_item"]


@pytest.fixture(scope="module")
def chat_model(real_suite: RunningSuite) -> ChatOpenAI:
    return ChatOpenAI(
        model=MODEL,
        base_url=f"{real_suite.base}/v1",
        api_key=ORDINARY_KEY,
        max_tokens=120,
        max_retries=0,
        temperature=0.6,
    )


def test_langchain_with_structured_output_default_method(chat_model) -> None:
    structured = chat_model.with_structured_output(Forecast)
    answer = structured.invoke("Forecast for Paris, please.")
    assert isinstance(answer, Forecast)


class City(BaseModel):
    city: str = Field(max_length=16)  # a random model's unbounded string may not close in time


def test_langchain_bind_tools_gives_tool_calls(chat_model) -> None:
    @tool(args_schema=City)
    def get_weather(city: str) -> str:
        """Get the weather for a city."""
        return "sunny"

    message = chat_model.bind_tools([get_weather], tool_choice="get_weather").invoke(
        "Weather in Paris?"
    )
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)


def test_litellm_completion_and_stream(real_suite: RunningSuite) -> None:
    fields = {
        "model": f"openai/{MODEL}",
        "api_base": f"{real_suite.base}/v1",
        "api_key": ORDINARY_KEY,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    reply = litellm.completion(**fields)
    streamed = "".join(
        c.choices[0].delta.content or "" for c in litellm.completion(**fields, stream=True)
    )
    assert reply.choices[0].message.content == streamed
    assert reply.usage.completion_tokens <= 8


def test_responses_parse_and_a_streamed_agent_run(real_suite: RunningSuite) -> None:
    calls: list[str] = []

    @function_tool
    def lookup(city: Annotated[str, Field(max_length=16)]) -> str:
        """Look a city up."""
        calls.append(city)
        return "found"

    async def run() -> tuple[object, list[str]]:
        client = AsyncOpenAI(base_url=f"{real_suite.base}/v1", api_key=ORDINARY_KEY, max_retries=0)
        parsed = await client.responses.parse(
            model=MODEL, input="Forecast for Paris.", text_format=Forecast, max_output_tokens=200
        )
        set_default_openai_client(client, use_for_tracing=False)
        set_default_openai_api("responses")
        set_tracing_disabled(True)
        agent = Agent(
            name="Lookup",
            model=MODEL,
            tools=[lookup],
            model_settings=ModelSettings(tool_choice="required", max_tokens=200),
            tool_use_behavior="stop_on_first_tool",
        )
        streamed = Runner.run_streamed(agent, "Find Paris.")
        kinds = [event.type async for event in streamed.stream_events()]
        assert streamed.final_output == "found"
        return parsed, kinds

    parsed, kinds = asyncio.run(run())
    assert isinstance(parsed.output_parsed, Forecast)
    assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
    assert len(calls) == 1
