"""The gateway keeps the public API contract only: importing every module of the gateway package
loads no tokenizer, no model, no model config and no torch (text belongs to the tokenizer
service, reached over its Chat RPC). The compose side (no checkpoint mounted into a gateway
container) is tests/deploy/test_compose.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = (
    "torch",
    "tiktoken",
    "jinja2",
    "k2model.config",
    "k2model.model",
    "k2model.constraints",
    "k2model.text.tokenizer",
    "services.tokenizer",
)
PROBE = f"""
import importlib, json, pkgutil, sys
import gateway
for m in pkgutil.walk_packages(gateway.__path__, "gateway."):
    importlib.import_module(m.name)
loaded = [n for n in {FORBIDDEN!r} if n in sys.modules]
print(json.dumps(loaded))
"""


def test_the_gateway_package_imports_no_text_layer_and_no_model() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout.splitlines()[-1]) == []


def test_the_probe_would_see_a_forbidden_import() -> None:
    """The same probe, after an import that does load torch, reports it (the check can fail)."""
    probe = PROBE.replace("import gateway\n", "import gateway, k2model.model\n")
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert "torch" in json.loads(out.stdout.splitlines()[-1])
