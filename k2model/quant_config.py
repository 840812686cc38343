"""quantization_config of a compressed-tensors checkpoint, parsed and validated (no torch: the
config is read where torch is not loaded). INT4 tensors themselves: k2model/checkpoint/int4.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GROUP = 32  # the group size K2's checkpoints use, and the only one served


class QuantConfigError(ValueError):
    """A quantization_config this server does not run (the message names the field)."""


@dataclass(frozen=True)
class Int4Scheme:
    group_size: int
    ignore: tuple[str, ...]  # the checkpoint's unquantised module patterns, as given


def parse_compressed_tensors(quant: dict[str, Any]) -> Int4Scheme:
    """quantization_config of quant_method compressed-tensors -> its scheme, or one
    QuantConfigError naming the first field this server does not run."""

    def need(ok: bool, field: str, why: str) -> None:
        if not ok:
            raise QuantConfigError(f"quantization_config.{field}: {why}")

    need(
        quant.get("format") == "pack-quantized",
        "format",
        f"only pack-quantized is served, got {quant.get('format')!r}",
    )
    groups = quant.get("config_groups")
    need(
        isinstance(groups, dict) and len(groups) == 1,
        "config_groups",
        "exactly one group is served",
    )
    ((name, group),) = groups.items()
    where = f"config_groups.{name}"
    need(isinstance(group, dict), where, "must be an object")
    weights = group.get("weights")
    need(isinstance(weights, dict), f"{where}.weights", "required")
    w = f"{where}.weights"
    need(
        weights.get("num_bits") == 4,
        f"{w}.num_bits",
        f"only 4 bits are served, got {weights.get('num_bits')!r}",
    )
    need(
        weights.get("type", "int") == "int",
        f"{w}.type",
        f"only int is served, got {weights.get('type')!r}",
    )
    need(
        weights.get("symmetric") is True, f"{w}.symmetric", "only symmetric quantisation is served"
    )
    need(
        weights.get("strategy") == "group",
        f"{w}.strategy",
        f"only group is served, got {weights.get('strategy')!r}",
    )
    need(
        weights.get("group_size") == GROUP,
        f"{w}.group_size",
        f"only {GROUP} is served, got {weights.get('group_size')!r}",
    )
    need(not weights.get("dynamic"), f"{w}.dynamic", "dynamic weight quantisation is not served")
    need(
        weights.get("actorder") in (None, False),
        f"{w}.actorder",
        "activation ordering is not served",
    )
    for kind in ("input_activations", "output_activations"):
        need(group.get(kind) is None, f"{where}.{kind}", "activation quantisation is not served")
    need(
        quant.get("kv_cache_scheme") is None,
        "kv_cache_scheme",
        "a quantised KV cache is not served",
    )
    ignore = quant.get("ignore") or []
    need(
        isinstance(ignore, list) and all(isinstance(p, str) for p in ignore),
        "ignore",
        "must be a list of strings",
    )
    return Int4Scheme(GROUP, tuple(ignore))
