"""tensor_codec and sampling_codec: round trips, the wire layout, and every validation error."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from k2model.sampled import Sampled
from k2model.sampling_params import SamplingParams
from services.common.errors import InvalidArgument
from services.common.sampling_codec import (
    sampled_token_from_proto,
    sampled_token_to_proto,
    sampling_from_proto,
    sampling_to_proto,
)
from services.common.tensor_codec import DTYPES, tensor_from_proto, tensor_to_proto
from services.pb.k2.v1 import common_pb2

# --- tensors ---------------------------------------------------------------------------------


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 4).to(dtype)
    return torch.randint(-(2**30), 2**30, shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", [(3, 576), (2, 3, 4), (5,), (), (0, 576)])
def test_tensor_round_trip(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = _sample(dtype, shape)
    msg = common_pb2.Tensor.FromString(tensor_to_proto(t).SerializeToString())
    back = tensor_from_proto(msg, dtype=dtype, shape=[None, *shape[1:]] if shape else [])
    assert back.dtype == dtype and back.shape == t.shape
    bits = back.reshape(-1).view(torch.uint8)
    assert torch.equal(bits, t.reshape(-1).view(torch.uint8))  # bit-exact, NaN included


def test_dtype_names_are_the_ones_the_proto_lists() -> None:
    assert set(DTYPES) == {"bfloat16", "float16", "float32", "float8_e4m3fn", "int32", "int64"}
    for name, dtype in DTYPES.items():
        assert tensor_to_proto(torch.zeros(1, dtype=dtype)).dtype == name


def test_wire_layout_is_row_major_little_endian() -> None:
    ints = torch.tensor([[1, 256], [-1, 2**20]], dtype=torch.int32)
    assert tensor_to_proto(ints).data == struct.pack("<4i", 1, 256, -1, 2**20)
    assert list(tensor_to_proto(ints).shape) == [2, 2]
    # bf16 is the top half of fp32; fp8 e4m3fn 1.0 = 0 0111 000 (bias 7).
    bf16 = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    assert tensor_to_proto(bf16).data == b"\x80\x3f\x00\xc0"
    fp8 = torch.tensor([1.0, -1.0], dtype=torch.float8_e4m3fn)
    assert tensor_to_proto(fp8).data == bytes([0x38, 0xB8])


def test_non_contiguous_input_is_sent_in_logical_order() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).T  # a strided view
    back = tensor_from_proto(tensor_to_proto(t), dtype=torch.float32, shape=[4, 3])
    assert torch.equal(back, t)


def test_dtype_outside_the_contract_is_a_sender_bug() -> None:
    with pytest.raises(TypeError, match="float64"):
        tensor_to_proto(torch.zeros(2, dtype=torch.float64))


def _latent(dtype: str = "bfloat16", shape: tuple[int, ...] = (2, 4), nbytes: int = 16):
    return common_pb2.Tensor(dtype=dtype, shape=shape, data=b"\x00" * nbytes)


@pytest.mark.parametrize(
    ("msg", "message"),
    [
        (_latent(dtype="float64"), "unknown dtype 'float64'"),
        (_latent(dtype="torch.bfloat16"), "unknown dtype"),
        (_latent(dtype=""), "unknown dtype ''"),
        (_latent(dtype="float16"), "expected dtype bfloat16, got float16"),
        (_latent(shape=(8,)), r"expected shape \[\*, 4\], got \[8\]"),
        (_latent(shape=(1, 2, 4)), r"expected shape \[\*, 4\], got \[1, 2, 4\]"),
        (_latent(shape=(4, 2)), r"expected shape \[\*, 4\], got \[4, 2\]"),
        (_latent(shape=(-2, 4), nbytes=0), r"got \[-2, 4\]"),
        (_latent(nbytes=15), "needs 16 bytes, got 15"),
        (_latent(nbytes=17), "needs 16 bytes, got 17"),
        (_latent(shape=(2**40, 4), nbytes=16), "needs 8796093022208 bytes, got 16"),
    ],
)
def test_tensor_validation_errors(msg: common_pb2.Tensor, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as raised:
        tensor_from_proto(msg, dtype=torch.bfloat16, shape=[None, 4], name="kv.latent")
    assert raised.value.message.startswith("kv.latent: ")


def test_decoded_tensor_shares_the_message_bytes() -> None:
    data = torch.arange(6, dtype=torch.float32).numpy().tobytes()
    msg = common_pb2.Tensor(dtype="float32", shape=[2, 3], data=data)
    back = tensor_from_proto(msg, dtype=torch.float32, shape=[2, 3])
    assert back.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


# --- sampling parameters ---------------------------------------------------------------------


def test_absent_fields_take_the_neutral_values() -> None:
    params = sampling_from_proto(common_pb2.SamplingParams())
    assert params == SamplingParams()
    assert params.seed is None
    assert (params.temperature, params.top_p, params.repetition_penalty) == (1.0, 1.0, 1.0)


def test_present_zero_is_not_absent() -> None:
    params = sampling_from_proto(common_pb2.SamplingParams(temperature=0.0, seed=0))
    assert params.temperature == 0.0 and params.is_greedy
    assert params.seed == 0


def test_sampling_round_trip_keeps_decimal_values() -> None:
    params = SamplingParams(
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        presence_penalty=-1.3,
        frequency_penalty=0.1,
        repetition_penalty=1.1,
        logit_bias={17: -100.0, 3: 2.5, 99: 0.3},
        seed=2**64 - 1,
        logprobs=True,
        top_logprobs=20,
    )
    wire = common_pb2.SamplingParams.FromString(sampling_to_proto(params).SerializeToString())
    assert sampling_from_proto(wire) == params
    assert sampling_from_proto(sampling_to_proto(SamplingParams())) == SamplingParams()


def _f32s(lo: float, hi: float, *, exclude_min: bool = False) -> st.SearchStrategy[float]:
    return st.floats(lo, hi, width=32, exclude_min=exclude_min)


@given(
    temperature=_f32s(0.0, 2.0),
    top_p=_f32s(0.0, 1.0, exclude_min=True),
    min_p=_f32s(0.0, 0.5),
    presence=_f32s(-2.0, 2.0),
    repetition=_f32s(0.0, 10.0, exclude_min=True),
    bias=st.dictionaries(st.integers(0, 2**31 - 1), _f32s(-100.0, 100.0), max_size=4),
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    top_logprobs=st.integers(0, 20),
)
def test_any_valid_wire_message_survives_params_and_back(
    temperature: float,
    top_p: float,
    min_p: float,
    presence: float,
    repetition: float,
    bias: dict[int, float],
    seed: int | None,
    top_logprobs: int,
) -> None:
    wire = common_pb2.SamplingParams(
        temperature=temperature,
        top_p=top_p,
        min_p=min_p,
        presence_penalty=presence,
        frequency_penalty=-presence,
        repetition_penalty=repetition,
        logit_bias=bias,
        seed=seed,
        logprobs=top_logprobs > 0,
        top_logprobs=top_logprobs,
    )
    params = sampling_from_proto(wire)
    assert sampling_to_proto(params) == wire  # the same float32 values travel on
    assert sampling_from_proto(sampling_to_proto(params)) == params
    assert np.float32(params.top_p) == np.float32(top_p)


@pytest.mark.parametrize(
    ("wire", "field"),
    [
        (common_pb2.SamplingParams(temperature=-0.5), "temperature"),
        (common_pb2.SamplingParams(temperature=math.nan), "temperature"),
        (common_pb2.SamplingParams(top_p=0.0), "top_p"),
        (common_pb2.SamplingParams(top_p=1.5), "top_p"),
        (common_pb2.SamplingParams(top_k=-1), "top_k"),
        (common_pb2.SamplingParams(min_p=1.0), "min_p"),
        (common_pb2.SamplingParams(presence_penalty=2.5), "presence_penalty"),
        (common_pb2.SamplingParams(frequency_penalty=-3.0), "frequency_penalty"),
        (common_pb2.SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
        (common_pb2.SamplingParams(logit_bias={5: 101.0}), "logit_bias[5]"),
        (common_pb2.SamplingParams(logit_bias={-1: 1.0}), "logit_bias token id"),
        (common_pb2.SamplingParams(logprobs=True, top_logprobs=21), "top_logprobs"),
        (common_pb2.SamplingParams(top_logprobs=3), "top_logprobs"),
    ],
)
def test_out_of_range_sampling_field_is_invalid_argument(
    wire: common_pb2.SamplingParams, field: str
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        sampling_from_proto(wire)
    assert raised.value.message.startswith(f"sampling.{field} must be")


def test_seed_outside_uint64_cannot_be_sent() -> None:
    for seed in (-1, 2**64):
        with pytest.raises(InvalidArgument, match=r"sampling\.seed"):
            sampling_to_proto(SamplingParams(seed=seed))


# --- sampled tokens --------------------------------------------------------------------------


def test_sampled_token_round_trip() -> None:
    top = ((5, -0.25), (9, -1.5), (2, -3.0))
    for token in (Sampled(5, -0.25, top), Sampled(7, None, ()), Sampled(0, 0.0, ((0, 0.0),))):
        msg = sampled_token_to_proto(token)
        wire = common_pb2.SampledToken.FromString(msg.SerializeToString())
        assert sampled_token_from_proto(wire) == token
    assert not sampled_token_to_proto(Sampled(7)).HasField("logprob")
    assert sampled_token_to_proto(Sampled(7, 0.0)).HasField("logprob")  # 0.0 is a real logprob
