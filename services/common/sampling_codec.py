"""k2.v1.SamplingParams / SampledToken <-> the model's own types.

Absent optional fields take the neutral values that common.proto documents (temperature, top_p,
repetition_penalty 1.0; seed None = "assign one at admission"). Range checks are the model's
(`k2model.sampling_params.SamplingParams`); its ValueError comes back as InvalidArgument naming
the field as `sampling.<field>`.

Floats travel as float32. On the way in, each is replaced by the shortest decimal that maps to the
same float32, so a value the caller wrote as 0.7 arrives as 0.7 (not 0.699999988...) and
`sampling_from_proto(sampling_to_proto(p)) == p` for any such value.
"""

from __future__ import annotations

import numpy as np

from k2model.sampled import Sampled
from k2model.sampling_params import SamplingParams
from services.common.errors import InvalidArgument
from services.pb.k2.v1 import common_pb2

_UINT64_LIMIT = 1 << 64


def _f32(value: float) -> float:
    return float(str(np.float32(value)))


def _optional(msg: common_pb2.SamplingParams, field: str, absent: float) -> float:
    return _f32(getattr(msg, field)) if msg.HasField(field) else absent


def sampling_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=_optional(msg, "temperature", 1.0),
            top_p=_optional(msg, "top_p", 1.0),
            top_k=msg.top_k,
            min_p=_f32(msg.min_p),
            presence_penalty=_f32(msg.presence_penalty),
            frequency_penalty=_f32(msg.frequency_penalty),
            repetition_penalty=_optional(msg, "repetition_penalty", 1.0),
            logit_bias={token: _f32(bias) for token, bias in msg.logit_bias.items()},
            seed=msg.seed if msg.HasField("seed") else None,
            logprobs=msg.logprobs,
            top_logprobs=msg.top_logprobs,
        )
    except ValueError as exc:
        raise InvalidArgument(f"sampling.{exc}") from exc


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    """Every field is written explicitly (neutral values too), so the receiver sees exactly what
    the sender validated. InvalidArgument when the seed does not fit uint64."""
    if params.seed is not None and not 0 <= params.seed < _UINT64_LIMIT:
        raise InvalidArgument(f"sampling.seed must be in [0, 2**64), got {params.seed}")
    return common_pb2.SamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        logit_bias=dict(params.logit_bias),
        seed=params.seed,
        logprobs=params.logprobs,
        top_logprobs=params.top_logprobs,
    )


def sampled_token_to_proto(token: Sampled) -> common_pb2.SampledToken:
    return common_pb2.SampledToken(
        token_id=token.token_id,
        logprob=token.logprob,
        top_logprobs=[common_pb2.TokenLogprob(token_id=i, logprob=lp) for i, lp in token.top],
    )


def sampled_token_from_proto(msg: common_pb2.SampledToken) -> Sampled:
    return Sampled(
        token_id=msg.token_id,
        logprob=msg.logprob if msg.HasField("logprob") else None,
        top=tuple((entry.token_id, entry.logprob) for entry in msg.top_logprobs),
    )
