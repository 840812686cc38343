"""A DeepSeek-V3-style checkpoint (HF tokenizer.json, its own chat template, no K2 tokens) served
by the real tokenizer, prefill and decode processes: the chat renders with the checkpoint's
template and the greedy reply equals in-process generate() on the same prompt ids."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from k2model import generate_ids, load_model
from k2model.checkpoint.random_init import random_weights, tiny_config, write_checkpoint
from k2model.sampling_params import SamplingParams
from k2model.text.messages import Message
from k2model.text.tokenizer import Tokenizer
from services.tokenizer.chat_text import ChatText
from tests.e2e.suite_fixtures import start_suite, write_deployment
from tests.gateway.test_grpc_chat import ChatServer, aggregate, request, run, user
from tests.text.test_hf_tokenizer import write_hf_checkpoint

QUESTION = "Tell me about the sea."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = write_hf_checkpoint(tmp_path_factory.mktemp("served") / "ds", think=False)
    config = tiny_config(vocab_size=512)
    return write_checkpoint(path, config, random_weights(config, seed=7))


@pytest.fixture(scope="module")
def chat(checkpoint, tmp_path_factory) -> Iterator[ChatServer]:
    path = write_deployment(tmp_path_factory.mktemp("dep") / "d.yaml", checkpoint=str(checkpoint))
    suite = start_suite(path)
    server = None
    try:
        server = ChatServer(suite)
        yield server
    finally:
        if server is not None:
            server.close()
        suite.stop()


def test_served_reply_equals_generate(chat, checkpoint) -> None:
    tokenizer = Tokenizer.from_dir(checkpoint)
    prompt = ChatText(checkpoint).render([Message("user", QUESTION)], (), True).prompt_ids
    assert prompt[0] == tokenizer.bos_id  # the template's {{ bos_token }}, as a control id
    # The model's rows past the tokenizer's ids have no text: the suite never samples them
    # (random weights would); here a -100 bias keeps greedy off them too.
    unmapped = range(tokenizer.vocab_size, 512)
    assert list(ChatText(checkpoint).unmapped_ids) == list(unmapped)
    params = SamplingParams(temperature=0.0, logit_bias={i: -100.0 for i in unmapped})
    model = load_model(checkpoint)
    [ids] = generate_ids(model, [prompt], 16, params, stop_ids=tokenizer.stop_ids)
    events = run(chat, request(messages=[user(QUESTION)], max_tokens=16))
    got = aggregate(events)
    text = tokenizer.decode([i for i in ids if i not in tokenizer.stop_ids])
    assert (got["content"], got["reasoning"]) == (text, "")
    assert events[-1].usage.prompt_tokens == len(prompt)
    assert events[-1].usage.completion_tokens == len(ids)
