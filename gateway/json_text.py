"""JSON request bodies whose strings cannot become UTF-8.

JSON may escape a lone UTF-16 surrogate (`"a\\ud800b"`), which Python decodes into a str that no
UTF-8 text, protobuf string or tokenizer can carry: left alone, it fails deep in the pipeline
(a 500 while building a protobuf). The gateway refuses such a body up front with a 400 naming
the first offending string by its JSON path.
"""

from __future__ import annotations

import json
import re
from typing import Any

from gateway import errors

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def lone_surrogate(body: bytes) -> errors.ApiError | None:
    """A 400 naming the first string of a JSON body that holds a lone UTF-16 surrogate (JSON can
    escape one, `"\\ud800"`, but no UTF-8 text or protobuf string can carry it). Only bodies
    with a surrogate escape are parsed here; a valid pair decodes to one character and passes."""
    if not _SURROGATE_ESCAPE.search(body):
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None  # not JSON: the route says so
    path = _surrogate_path(value, "")
    if path is None:
        return None
    where = path or "body"
    return errors.invalid_value(f"{where}: contains a lone UTF-16 surrogate", path or None)


def _surrogate_path(value: Any, path: str) -> str | None:
    if isinstance(value, str):
        return path if _has_surrogate(value) else None
    if isinstance(value, list):
        for i, item in enumerate(value):
            if (found := _surrogate_path(item, f"{path}[{i}]")) is not None:
                return found
    elif isinstance(value, dict):
        for key, item in value.items():
            here = f"{path}.{key}" if path else key
            if _has_surrogate(key):
                return path or "body"
            if (found := _surrogate_path(item, here)) is not None:
                return found
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
