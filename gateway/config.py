"""The gateway's YAML configuration, resolved once into frozen dataclasses.

    listen: {host: 127.0.0.1, port: 8000}
    keys:                                  # `key` inline (dev) or `key_env` (the secret's env var)
      - {name: dev, key: sk-k2-dev, profile: enterprise}
    profiles:                              # models: registry ids or "*"; default_model: see auth.py
      ordinary:   {models: [kimi-k2-instruct], default_model: kimi-k2-instruct}
      enterprise: {models: ["*"], default_model: kimi-k2-thinking}
    registry: {models: [...]}              # inline, or a path to a registry YAML (registry.py)
    limits: {max_body_bytes: 4194304, ...} # any Limits field; the rest keep their defaults

The protocol's own bounds (top_logprobs <= 20, stop <= 4 strings, tools <= 128, ...) are fixed
in openai_models.py; `Limits` holds the ones an operator sizes to the deployment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from gateway.auth import ALL_MODELS, ApiKey, KeyRing, Profile
from gateway.registry import ModelShape, Registry


class ConfigError(ValueError):
    """A gateway configuration that is malformed or inconsistent."""


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 4 * 1024 * 1024
    max_header_bytes: int = 16 * 1024  # request line and headers, checked as they arrive
    max_header_count: int = 100
    read_timeout_s: int = 30  # from a request's first byte until its head and body are in
    max_n: int = 8  # choices per request; each is a sequence in the decode batch
    max_stop_chars: int = 64  # per stop string
    max_tool_schema_bytes: int = 64 * 1024  # all tools' parameter schemas, as compact JSON
    max_tool_schema_depth: int = 16  # nesting of objects/arrays in one schema
    max_concurrent_requests: int = 256  # generation requests in flight; more are answered 429
    # Seconds one request may take across the backends; past it, it ends with a clean timeout
    # error (504, or an error event mid-stream) and its sequence is cancelled everywhere.
    request_timeout_s: int = 600


@dataclass(frozen=True)
class GatewayConfig:
    keys: tuple[ApiKey, ...]
    registry: Registry
    limits: Limits = field(default_factory=Limits)
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 0  # the gRPC Chat API beside REST; 0: not served

    def keyring(self) -> KeyRing:
        return KeyRing(self.keys)

    @classmethod
    def load(cls, path: str | Path, shape: ModelShape) -> GatewayConfig:
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: {e}") from e
        return cls.from_dict(raw, shape, base=Path(path).parent)

    @classmethod
    def from_dict(cls, raw: Any, shape: ModelShape, base: Path = Path(".")) -> GatewayConfig:
        raw = _mapping("gateway config", raw, {"listen", "keys", "profiles", "registry", "limits"})
        registry = _registry(raw.get("registry"), shape, base)
        profiles = _profiles(raw.get("profiles"), registry)
        keys = tuple(_key(i, k, profiles) for i, k in enumerate(raw.get("keys") or []))
        if not keys:
            raise ConfigError("keys: at least one API key is required")
        if len({k.secret for k in keys}) != len(keys):
            raise ConfigError("keys: two entries have the same secret")
        listen = _mapping("listen", raw.get("listen") or {}, {"host", "port", "grpc_port"})
        return cls(
            keys=keys,
            registry=registry,
            limits=_limits(raw.get("limits") or {}),
            host=str(listen.get("host", "127.0.0.1")),
            port=int(listen.get("port", 8000)),
            grpc_port=int(listen.get("grpc_port", 0)),
        )


def _mapping(where: str, raw: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping")
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    return raw


def _registry(raw: Any, shape: ModelShape, base: Path) -> Registry:
    if raw is None:
        raise ConfigError("registry is required")
    try:
        if isinstance(raw, str):
            return Registry.load(base / raw, shape)
        return Registry.from_dict(raw, shape)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _profiles(raw: Any, registry: Registry) -> dict[str, Profile]:
    out = {}
    for name, entry in _mapping("profiles", raw or {}, set(raw or {})).items():
        where = f"profiles.{name}"
        entry = _mapping(where, entry, {"models", "default_model"})
        models = entry.get("models")
        if (
            not isinstance(models, list)
            or not models
            or not all(isinstance(m, str) for m in models)
        ):
            raise ConfigError(f"{where}.models must be a non-empty list of model ids")
        unknown = sorted(set(models) - {ALL_MODELS, *registry.ids})
        if unknown:
            raise ConfigError(f"{where}.models: not in the registry: {unknown}")
        profile = Profile(name, tuple(models), str(entry.get("default_model", "")))
        if profile.default_model not in registry.ids or not profile.allows(profile.default_model):
            raise ConfigError(f"{where}.default_model must be a registry model the profile allows")
        out[name] = profile
    if not out:
        raise ConfigError("profiles: at least one profile is required")
    return out


def _key(index: int, raw: Any, profiles: dict[str, Profile]) -> ApiKey:
    where = f"keys[{index}]"
    entry = _mapping(where, raw, {"name", "key", "key_env", "profile"})
    if ("key" in entry) == ("key_env" in entry):
        raise ConfigError(f"{where}: exactly one of 'key' or 'key_env' is required")
    secret = entry["key"] if "key" in entry else os.environ.get(str(entry["key_env"]), "")
    if not isinstance(secret, str) or len(secret) < 8:
        raise ConfigError(f"{where}: the key must be a string of at least 8 characters")
    profile = entry.get("profile")
    if profile not in profiles:
        raise ConfigError(f"{where}.profile must be one of {sorted(profiles)}")
    return ApiKey(str(entry.get("name", f"key-{index}")), secret, profiles[profile])


def _limits(raw: Any) -> Limits:
    names = {f.name for f in fields(Limits)}
    entry = _mapping("limits", raw, names)
    for name, value in entry.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"limits.{name} must be a positive integer")
    return Limits(**entry)
