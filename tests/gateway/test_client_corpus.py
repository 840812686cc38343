"""Bodies shaped like popular clients' (client_corpus.py) are all accepted, and what changes the
output reaches the pipeline: strict tools and JSON response formats are honoured, not dropped."""

from __future__ import annotations

from collections import Counter

import pytest

from gateway.config import GatewayConfig
from gateway.registry import ModelShape
from tests.gateway.client_corpus import CLIENTS, corpus, responses_bodies
from tests.gateway.rest_fakes import ENTERPRISE_KEY, ScriptedChat, config_dict
from tests.gateway.rest_server import HTTP, running

AUTH = {"Authorization": f"Bearer {ENTERPRISE_KEY}"}
BODIES = corpus()


@pytest.fixture(scope="module")
def gateway():
    """K2's own context (the clients' max_tokens 32000 fits; the fakes' 8k would not)."""
    fake = ScriptedChat()
    config = GatewayConfig.from_dict(config_dict(), ModelShape(262144, 163840))
    with running(fake, config) as base:
        yield base, fake


def test_the_corpus_is_large_and_varied() -> None:
    per_client = Counter(name.split(":")[0] for name, _ in BODIES)
    assert len(BODIES) >= 200 and len(per_client) >= 6 and set(per_client) == set(CLIENTS)
    assert min(per_client.values()) >= 15


@pytest.mark.parametrize(("name", "body"), BODIES, ids=[n for n, _ in BODIES])
def test_a_client_body_is_accepted_and_its_output_controls_honoured(gateway, name, body) -> None:
    base, fake = gateway
    before = len(fake.requests)
    response = HTTP.post(f"{base}/v1/chat/completions", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    assert len(fake.requests) == before + 1
    request = fake.requests[-1]
    strict = {t["function"]["name"] for t in body.get("tools") or () if t["function"].get("strict")}
    assert request.strict_tools == strict
    kind = (body.get("response_format") or {}).get("type", "text")
    assert (request.response_format is None) == (kind == "text")
    if kind == "json_schema":
        assert request.response_format.schema == body["response_format"]["json_schema"]["schema"]


RESPONSES = list(responses_bodies())


@pytest.mark.parametrize(("name", "body"), RESPONSES, ids=[n for n, _ in RESPONSES])
def test_a_responses_body_is_accepted(gateway, name, body) -> None:
    base, fake = gateway
    before = len(fake.requests)
    response = HTTP.post(f"{base}/v1/responses", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    assert len(fake.requests) == before + 1
    request = fake.requests[-1]
    strict = {t["name"] for t in body.get("tools") or () if t.get("strict") is not False}
    assert request.strict_tools == strict
