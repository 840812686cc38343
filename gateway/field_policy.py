"""Fields real clients send that change nothing in the output: accepted, ignored, counted.

The request schemas (openai_models.py, anthropic_models.py) stay closed: a field they do not
declare is a 400 naming it, because an unknown field may change the output. A field declared with
`ignored(...)` is one whose meaning we know and that cannot change what the model generates
(billing tiers, storage and cache hints for the vendor's own servers, client bookkeeping kept in
conversation history); it takes any value, is dropped, and every request that carried it counts
once in `k2_gateway_ignored_fields_total{route, field}`. The README's field policy table lists
the same fields (a test keeps them equal).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

_MARK = "x-k2-ignored"


def ignored(why: str) -> Any:
    """A schema field that is accepted with any value and dropped; `why` documents it (it
    appears in /openapi.json as the field's description)."""
    return Field(
        default=None, description=f"Accepted and ignored: {why}", json_schema_extra={_MARK: True}
    )


def is_ignored(model: type[BaseModel], name: str) -> bool:
    extra = model.model_fields[name].json_schema_extra
    return isinstance(extra, dict) and bool(extra.get(_MARK))


def ignored_fields(body: BaseModel, path: str = "") -> set[str]:
    """The ignored fields a validated body carried, as schema paths (`messages[].cache_control`)."""
    found: set[str] = set()
    cls = type(body)
    for name in body.model_fields_set:
        value = getattr(body, name)
        where = f"{path}{name}"
        if is_ignored(cls, name):
            if value is not None:
                found.add(where)
            continue
        for item, suffix in _children(value):
            found |= ignored_fields(item, f"{where}{suffix}.")
    return found


def declared_ignored(model: type[BaseModel], path: str = "") -> set[str]:
    """Every ignored field a schema declares, with the same paths as `ignored_fields`."""
    found: set[str] = set()
    for name, info in model.model_fields.items():
        where = f"{path}{name}"
        if is_ignored(model, name):
            found.add(where)
            continue
        for child, suffix in _model_types(info.annotation):
            found |= declared_ignored(child, f"{where}{suffix}.")
    return found


def _children(value: Any) -> list[tuple[BaseModel, str]]:
    if isinstance(value, BaseModel):
        return [(value, "")]
    if isinstance(value, list):
        return [(v, "[]") for v in value if isinstance(v, BaseModel)]
    return []


def _model_types(annotation: Any, suffix: str = "") -> list[tuple[type[BaseModel], str]]:
    """The BaseModel classes inside a field's type (through unions, lists, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, suffix)]
    origin = getattr(annotation, "__origin__", None)
    args = getattr(annotation, "__args__", ()) or ()
    if origin is list:
        suffix = "[]"
    if getattr(annotation, "__metadata__", None) is not None:  # Annotated[T, ...]
        return _model_types(args[0], suffix)
    found: list[tuple[type[BaseModel], str]] = []
    for arg in args:
        for item in _model_types(arg, suffix):
            if item not in found:
                found.append(item)
    return found
