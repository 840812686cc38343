"""The model registry: which public model ids exist and who serves each.

    models:
      - id: kimi-k2-instruct
        local: {thinking: false}          # served by our pipeline, Thinking disabled
      - id: kimi-k2-thinking
        local: {thinking: true}
      - id: moonshot-kimi-k2
        upstream:                         # an OpenAI-compatible provider, proxied (streaming too)
          base_url: https://api.moonshot.ai/v1
          model: kimi-k2-0905-preview     # the provider's name for it
          api_key_env: MOONSHOT_API_KEY   # the secret stays in the environment, not in the file

Local models share one pipeline (the deployment's checkpoint); their context length and
vocabulary come from that checkpoint's config, resolved once at start-up (`ModelShape`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway import errors


class RegistryError(ValueError):
    """A registry description that is malformed or inconsistent."""


@dataclass(frozen=True)
class ModelShape:
    """What the gateway checks requests against: prompt + max_tokens <= context_length, and
    logit_bias ids < vocab_size."""

    context_length: int
    vocab_size: int


@dataclass(frozen=True)
class LocalModel:
    id: str
    shape: ModelShape
    thinking: bool | None = None  # the ChatRequest.thinking it runs with; None: checkpoint default
    owned_by: str = "k2serve"


@dataclass(frozen=True)
class UpstreamModel:
    id: str
    base_url: str
    model: str
    api_key_env: str
    owned_by: str = "upstream"


Model = LocalModel | UpstreamModel


@dataclass(frozen=True)
class Registry:
    models: tuple[Model, ...]

    def get(self, model_id: str) -> Model:
        for m in self.models:
            if m.id == model_id:
                return m
        raise errors.model_not_found(model_id)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(m.id for m in self.models)

    @classmethod
    def load(cls, path: str | Path, shape: ModelShape) -> Registry:
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise RegistryError(f"{path}: {e}") from e
        return cls.from_dict(raw, shape)

    @classmethod
    def from_dict(cls, raw: Any, shape: ModelShape) -> Registry:
        if not isinstance(raw, dict) or set(raw) != {"models"}:
            raise RegistryError("a registry is a mapping with one key, 'models'")
        entries = raw["models"]
        if not isinstance(entries, list) or not entries:
            raise RegistryError("registry.models must be a non-empty list")
        models = tuple(_model(i, e, shape) for i, e in enumerate(entries))
        ids = [m.id for m in models]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise RegistryError(f"duplicate model ids in the registry: {duplicates}")
        return cls(models)


def _keys(where: str, entry: Any, allowed: set[str], required: set[str]) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise RegistryError(f"{where} must be a mapping")
    unknown, missing = set(entry) - allowed, required - set(entry)
    if unknown:
        raise RegistryError(f"{where}: unknown keys {sorted(unknown)}")
    if missing:
        raise RegistryError(f"{where}: missing keys {sorted(missing)}")
    return entry


def _model(index: int, entry: Any, shape: ModelShape) -> Model:
    where = f"registry.models[{index}]"
    entry = _keys(where, entry, {"id", "local", "upstream", "owned_by"}, {"id"})
    model_id = entry["id"]
    if not isinstance(model_id, str) or not model_id:
        raise RegistryError(f"{where}.id must be a non-empty string")
    if ("local" in entry) == ("upstream" in entry):
        raise RegistryError(f"{where}: exactly one of 'local' or 'upstream' is required")
    if "local" in entry:
        local = _keys(f"{where}.local", entry["local"] or {}, {"thinking"}, set())
        thinking = local.get("thinking")
        if thinking is not None and not isinstance(thinking, bool):
            raise RegistryError(f"{where}.local.thinking must be true, false or absent")
        return LocalModel(model_id, shape, thinking, str(entry.get("owned_by", "k2serve")))
    fields = {"base_url", "model", "api_key_env"}
    up = _keys(f"{where}.upstream", entry["upstream"], fields, fields)
    if not all(isinstance(up[k], str) and up[k] for k in fields):
        raise RegistryError(f"{where}.upstream: {sorted(fields)} must be non-empty strings")
    return UpstreamModel(
        model_id,
        up["base_url"].rstrip("/"),
        up["model"],
        up["api_key_env"],
        str(entry.get("owned_by", "upstream")),
    )
