"""Schemathesis over the gateway's own /openapi.json (as vLLM fuzzes its server): generated
valid and invalid requests to every route never get a 5xx, and every error body has the exact
OpenAI or Anthropic shape. 50 examples per route, derandomised so a run is repeatable."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from gateway.app import create_app
from gateway.errors import is_anthropic_path
from tests.gateway.rest_fakes import ENTERPRISE_KEY, ScriptedChat, make_config

APP = create_app(make_config(), ScriptedChat())
# /anthropic/v1/... are the same handlers as /v1/messages...: fuzzed once, under /v1.
CONFIG = schemathesis.config.SchemathesisConfig.from_dict(
    {"phases": {"coverage": {"enabled": False}}}
)
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", APP, config=CONFIG).exclude(
    path_regex="^/anthropic/"
)
AUTH = {"Authorization": f"Bearer {ENTERPRISE_KEY}"}


@schemathesis.check
def error_body_shape(ctx, response, case) -> None:
    if response.status_code < 400:
        return None
    body = response.json()
    if is_anthropic_path(case.formatted_path):
        assert set(body) == {"type", "error"} and body["type"] == "error", body
        assert set(body["error"]) == {"type", "message"}, body
        assert all(isinstance(v, str) for v in body["error"].values()), body
    else:
        assert set(body) == {"error"}, body
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, body
        assert isinstance(error["message"], str) and isinstance(error["type"], str), body
        assert error["code"] is None or isinstance(error["code"], str), body
        assert error["param"] is None or isinstance(error["param"], str), body
    return None


@SCHEMA.parametrize()
@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_5xx_and_every_error_in_shape(case) -> None:
    case.call_and_validate(headers=AUTH, checks=[not_a_server_error, error_body_shape])
