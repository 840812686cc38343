"""Chat-completion bodies in the shapes popular clients send, from their public docs and code.

Each client function yields (name, body) pairs: what that client puts on the wire for the common
calls (plain, streamed, tools, history replayed after a tool call, structured output), with the
defaults it adds on its own; all of them must be accepted. Shapes:
- OpenAI Python SDK: `chat.completions.create` / `.parse` / `pydantic_function_tool`, stream
  with `stream_options.include_usage`, history with the SDK's own message objects dumped back
  (`refusal`, `annotations`, `audio`, `function_call` as null; tool calls without `index`);
- openai-agents (its Chat Completions model): `store`, `parallel_tool_calls`, `reasoning_effort`,
  `verbosity`, `top_logprobs`, tools with `strict: true` (its default for function tools);
- LangChain `ChatOpenAI`: `n`, `stream_options` on streams, `bind_tools` (no strict),
  `with_structured_output` (json_schema strict), streamed history keeping `tool_calls[].index`;
- LiteLLM: Anthropic-style `cache_control` on messages, content parts and tools, `user`,
  `metadata`;
- Vercel AI SDK (openai-compatible provider): `max_tokens`, `seed`, `stop`, `response_format`
  text, tools with `strict` omitted or false;
- coding agents (Cline / Roo, Continue, Aider, OpenCode): long system prompts, temperature 0,
  `prompt_cache_key`, `parallel_tool_calls: false`, `max_completion_tokens` beside `max_tokens`;
- Kimi's own clients (Kimi CLI): `thinking`, `reasoning_effort`, `max_tokens` 32000.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

Body = dict[str, Any]
MODEL = "kimi-k2-instruct"
SYSTEMS = ["You are a helpful assistant.", "You are Cline, a highly skilled engineer. " * 40]
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "2 + 2 = ?"]
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city"],
}
READ_FILE = {
    "type": "object",
    "properties": {"path": {"type": "string", "description": "the file's path"}},
    "required": ["path"],
    "additionalProperties": False,
}
ANSWER = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}},
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}


def tool(name: str, schema: Body, **function: Any) -> Body:
    return {
        "type": "function",
        "function": {"name": name, "description": f"{name} tool", "parameters": schema, **function},
    }


def sdk_assistant_turn(text: str | None, call: bool) -> Body:
    """An assistant reply as the OpenAI SDK dumps a ChatCompletionMessage back into history."""
    turn: Body = {
        "role": "assistant",
        "content": text,
        "refusal": None,
        "annotations": [],
        "audio": None,
        "function_call": None,
    }
    if call:
        turn["tool_calls"] = [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ]
    return turn


def tool_history(question: str, assistant: Body) -> list[Body]:
    return [
        {"role": "user", "content": question},
        assistant,
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]


def openai_sdk() -> Iterator[tuple[str, Body]]:
    for q, stream in itertools.product(QUESTIONS, (False, True)):
        base: Body = {"model": MODEL, "messages": [{"role": "user", "content": q}]}
        if stream:
            base |= {"stream": True, "stream_options": {"include_usage": True}}
        yield "plain", base
        yield "sampling", base | {"temperature": 0.2, "top_p": 0.9, "seed": 7, "stop": ["\n\n"]}
        yield "logprobs", base | {"logprobs": True, "top_logprobs": 3, "n": 2}
        yield "max_completion_tokens", base | {"max_completion_tokens": 64}
        yield "store+metadata", base | {"store": True, "metadata": {"purpose": "eval"}}
        yield "service_tier", base | {"service_tier": "auto", "user": "user-1234"}
        yield "prompt_cache_key", base | {"prompt_cache_key": "conv-1", "safety_identifier": "h1"}
        yield "tools auto", base | {"tools": [tool("get_weather", WEATHER)], "tool_choice": "auto"}
        yield (
            "tools required",
            base | {"tools": [tool("get_weather", WEATHER)], "tool_choice": "required"},
        )
        yield (
            "pydantic_function_tool",
            base | {"tools": [tool("get_weather", WEATHER, strict=True)]},
        )
        yield (
            "parse",
            base
            | {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "Answer", "schema": ANSWER, "strict": True},
                }
            },
        )
        yield "reasoning_effort", base | {"reasoning_effort": "low"}
        yield "modalities", base | {"modalities": ["text"]}
        yield "prediction", base | {"prediction": {"type": "content", "content": q}}
        history = tool_history(q, sdk_assistant_turn(None, call=True))
        yield "tool result", base | {"messages": history, "tools": [tool("get_weather", WEATHER)]}


def openai_agents() -> Iterator[tuple[str, Body]]:
    for q, stream, strict in itertools.product(QUESTIONS, (False, True), (True, False)):
        base: Body = {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "You are a helpful agent."},
                {"role": "user", "content": q},
            ],
            "tools": [tool("read_file", READ_FILE, strict=strict)],
            "parallel_tool_calls": True,
        }
        if stream:
            base |= {"stream": True, "stream_options": {"include_usage": True}}
        yield "agent turn", base
        yield "agent settings", base | {"temperature": 0.3, "store": False, "top_logprobs": None}
        yield "agent reasoning", base | {"reasoning_effort": "medium", "verbosity": "low"}
        yield (
            "agent no tools",
            {k: v for k, v in base.items() if k not in ("tools",)} | {"parallel_tool_calls": None},
        )


def langchain() -> Iterator[tuple[str, Body]]:
    for q, stream in itertools.product(QUESTIONS, (False, True)):
        base: Body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": q}],
            "n": 1,
            "temperature": 0.7,
            "stream": stream,
        }
        if stream:
            base["stream_options"] = {"include_usage": True}
        yield "invoke", base
        yield "bind_tools", base | {"tools": [tool("get_weather", WEATHER)]}
        yield (
            "bind_tools forced",
            base
            | {
                "tools": [tool("get_weather", WEATHER)],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            },
        )
        yield (
            "with_structured_output",
            base
            | {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "Answer", "schema": ANSWER, "strict": True},
                }
            },
        )
        streamed_call = {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        }
        yield (
            "streamed history",
            base
            | {"messages": tool_history(q, streamed_call), "tools": [tool("get_weather", WEATHER)]},
        )
        yield "max_tokens", base | {"max_tokens": 256, "presence_penalty": 0.5}


def litellm() -> Iterator[tuple[str, Body]]:
    cache = {"type": "ephemeral"}
    for q, system in itertools.product(QUESTIONS, SYSTEMS):
        messages = [
            {
                "role": "system",
                "content": [{"type": "text", "text": system, "cache_control": cache}],
            },
            {"role": "user", "content": q, "cache_control": cache},
        ]
        base: Body = {"model": MODEL, "messages": messages}
        yield "cached prompt", base
        yield "cached stream", base | {"stream": True, "stream_options": {"include_usage": True}}
        yield "user+metadata", base | {"user": "team-a", "metadata": {"trace_id": "t1"}}
        yield (
            "cached tools",
            base | {"tools": [{**tool("get_weather", WEATHER), "cache_control": cache}]},
        )
        yield "drop params", base | {"temperature": 1.0, "max_tokens": 1024, "top_p": 1.0}


def vercel_ai() -> Iterator[tuple[str, Body]]:
    for q, stream in itertools.product(QUESTIONS, (False, True)):
        base: Body = {
            "model": MODEL,
            "max_tokens": 512,
            "temperature": 0.5,
            "messages": [{"role": "user", "content": [{"type": "text", "text": q}]}],
        }
        if stream:
            base |= {"stream": True, "stream_options": {"include_usage": True}}
        yield "generateText", base
        yield "settings", base | {"seed": 3, "stop": ["END"], "frequency_penalty": 0.1}
        yield "tools", base | {"tools": [tool("get_weather", WEATHER, strict=False)]}
        yield "text format", base | {"response_format": {"type": "text"}}
        yield "json mode", base | {"response_format": {"type": "json_object"}}


def coding_agents() -> Iterator[tuple[str, Body]]:
    for q, system in itertools.product(QUESTIONS, SYSTEMS):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": q}]
        base: Body = {"model": MODEL, "messages": messages, "temperature": 0, "stream": True}
        yield "aider", base
        yield "continue", base | {"max_tokens": 4096, "stop": ["<|im_end|>", "```\n\n"]}
        yield (
            "cline",
            base
            | {
                "stream_options": {"include_usage": True},
                "tools": [tool("read_file", READ_FILE)],
                "parallel_tool_calls": False,
            },
        )
        yield "opencode", base | {"prompt_cache_key": "session-9", "max_completion_tokens": 8192}
        yield "both limits", base | {"max_tokens": 4096, "max_completion_tokens": 2048}


def kimi_clients() -> Iterator[tuple[str, Body]]:
    for q, thinking in itertools.product(QUESTIONS, ("enabled", "disabled")):
        base: Body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": q}],
            "max_tokens": 32000,
            "thinking": {"type": thinking},
            "stream": True,
        }
        yield "kimi cli", base
        effort = "high" if thinking == "enabled" else "none"
        yield "kimi cli effort", base | {"reasoning_effort": effort}
        yield (
            "partial",
            base
            | {
                "messages": [
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": "Sure:", "partial": True},
                ]
            },
        )


CLIENTS = {
    "openai-sdk": openai_sdk,
    "openai-agents": openai_agents,
    "langchain": langchain,
    "litellm": litellm,
    "vercel-ai": vercel_ai,
    "coding-agents": coding_agents,
    "kimi": kimi_clients,
}


def corpus() -> list[tuple[str, Body]]:
    return [
        (f"{client}: {name}", body) for client, make in CLIENTS.items() for name, body in make()
    ]


AGENT_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the weather.",
    "parameters": {**WEATHER, "additionalProperties": False, "title": "get_weather_args"},
    "strict": True,
}
FINAL_OUTPUT = {
    "type": "json_schema",
    "name": "final_output",
    "schema": {
        "type": "object",
        "properties": {"answer": {"title": "Answer", "type": "string"}},
        "required": ["answer"],
        "title": "Out",
        "additionalProperties": False,
    },
    "strict": True,
}


def responses_bodies() -> Iterator[tuple[str, Body]]:
    """`POST /v1/responses` bodies: the openai-agents SDK's default model (captured from the
    SDK: `include: []`, instructions, strict function tools, model settings as fields) and the
    OpenAI SDK's `responses.create` shapes from its docs."""
    for q, tools in itertools.product(QUESTIONS, ([], [AGENT_TOOL])):
        yield (
            "agents: run",
            {
                "model": MODEL,
                "include": [],
                "input": [{"content": q, "role": "user"}],
                "instructions": "You are helpful.",
                "tools": tools,
            },
        )
    call = {
        "type": "function_call",
        "call_id": "functions.get_weather:0",
        "name": "get_weather",
        "arguments": '{"city": "Paris"}',
        "id": "fc_1",
        "status": "completed",
    }
    turn = [
        {"content": "Weather in Paris?", "role": "user"},
        {
            "id": "rs_1",
            "type": "reasoning",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": "call the tool"}],
        },
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [
                {"type": "output_text", "text": "Checking.", "annotations": [], "logprobs": []}
            ],
        },
        call,
        {"type": "function_call_output", "call_id": "functions.get_weather:0", "output": "sunny"},
    ]
    yield (
        "agents: after a tool call",
        {"model": MODEL, "include": [], "input": turn, "instructions": "i", "tools": [AGENT_TOOL]},
    )
    settings = {
        "temperature": 0.3,
        "top_p": 0.9,
        "max_output_tokens": 200,
        "parallel_tool_calls": False,
        "tool_choice": "required",
        "store": True,
        "metadata": {"run": "1"},
        "top_logprobs": 2,
        "include": ["message.output_text.logprobs", "reasoning.encrypted_content"],
        "reasoning": {"effort": "low", "summary": "auto"},
        "text": {"format": FINAL_OUTPUT, "verbosity": "low"},
        "truncation": "disabled",
        "prompt_cache_key": "k",
        "safety_identifier": "u",
        "service_tier": "auto",
        "max_tool_calls": 4,
        "user": "u",
        "stream": True,
        "stream_options": {"include_obfuscation": False},
    }
    for name, value in settings.items():
        tools = [AGENT_TOOL] if name == "tool_choice" else []
        fields = {name: value, **({"stream": True} if name == "stream_options" else {})}
        yield f"agents: {name}", {"model": MODEL, "input": "hi", "tools": tools, **fields}
    yield "sdk: string input", {"model": MODEL, "input": "Tell me a joke."}
    yield (
        "sdk: developer message",
        {
            "model": MODEL,
            "input": [
                {"role": "developer", "content": "Talk like a pirate."},
                {"role": "user", "content": "Are semicolons optional in JavaScript?"},
            ],
        },
    )
    yield (
        "sdk: json_object",
        {"model": MODEL, "input": "JSON please", "text": {"format": {"type": "json_object"}}},
    )
    yield (
        "sdk: named tool",
        {
            "model": MODEL,
            "input": "weather?",
            "tools": [AGENT_TOOL],
            "tool_choice": {"type": "function", "name": "get_weather"},
        },
    )
    yield (
        "sdk: non-strict tool",
        {"model": MODEL, "input": "weather?", "tools": [{**AGENT_TOOL, "strict": False}]},
    )
    yield "sdk: background off", {"model": MODEL, "input": "x", "background": False}
