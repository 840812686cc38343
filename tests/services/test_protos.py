"""The committed stubs in services/pb match protos/ (drift test) and every proto's messages survive
the wire."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from google.protobuf.message import Message

from services.pb.k2.v1 import (
    chat_types_pb2,
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "services" / "pb"


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    """Fails when a .proto changed without `python scripts/gen_protos.py` (or the stubs were
    edited by hand)."""
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = _tree(tmp_path / "services" / "pb")
    committed = _tree(COMMITTED)
    assert sorted(fresh) == sorted(committed)
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert stale == [], "run: python scripts/gen_protos.py"
    for proto in (REPO / "protos" / "k2" / "v1").glob("*.proto"):
        assert f"k2/v1/{proto.stem}_pb2.py" in fresh


def test_stub_imports_point_inside_our_package() -> None:
    for name, text in _tree(COMMITTED).items():
        if name.endswith((".py", ".pyi")):
            assert b"from k2.v1 import" not in text, name
    # The proto file names (what reflection serves) keep their protos/-relative paths.
    assert decode_pb2.DESCRIPTOR.name == "k2/v1/decode.proto"
    assert decode_pb2.GenerateRequest.__module__ == "services.pb.k2.v1.decode_pb2"
    assert decode_pb2.DESCRIPTOR.dependencies[0] is common_pb2.DESCRIPTOR


def test_generated_files_pass_ruff() -> None:
    """Generated code is excluded from lint/format; our own __init__ files are clean."""
    for args in (["check"], ["format", "--check"]):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *args, "services/pb", "scripts/gen_protos.py"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr


def _round_trip(msg: Message) -> Message:
    data = msg.SerializeToString()
    back = type(msg).FromString(data)
    assert back == msg
    assert back.SerializeToString() == data
    return back


def test_chat_types_round_trip() -> None:
    msg = chat_types_pb2.ChatMessage(
        role="assistant",
        parts=chat_types_pb2.ContentParts(parts=[chat_types_pb2.ContentPart(text="héllo 你好")]),
        tool_calls=[chat_types_pb2.ToolCall(id="functions.get:0", name="get", arguments="{}")],
        reasoning_content="",
        partial=True,
    )
    back = _round_trip(msg)
    assert back.WhichOneof("content") == "parts"
    assert back.parts.parts[0].text == "héllo 你好"
    assert back.HasField("reasoning_content") and not back.HasField("name")


def test_common_round_trip() -> None:
    msg = common_pb2.SamplingParams(temperature=0.0, logit_bias={3: -100.0}, seed=2**64 - 1)
    back = _round_trip(msg)
    assert back.HasField("temperature") and back.temperature == 0.0
    assert not back.HasField("top_p")
    assert back.seed == 2**64 - 1 and dict(back.logit_bias) == {3: -100.0}
    tensor = _round_trip(common_pb2.Tensor(dtype="bfloat16", shape=[2, 576], data=b"\x01" * 2304))
    assert list(tensor.shape) == [2, 576]


def test_prefill_round_trip() -> None:
    kv = prefill_pb2.PrefillChunk(
        kv=prefill_pb2.KvChunk(
            layer=60, token_start=4096, latent=common_pb2.Tensor(dtype="float8_e4m3fn")
        )
    )
    assert _round_trip(kv).WhichOneof("part") == "kv"
    first = prefill_pb2.PrefillChunk(first_token=common_pb2.SampledToken(token_id=5, logprob=0.0))
    back = _round_trip(first)
    assert back.WhichOneof("part") == "first_token" and back.first_token.HasField("logprob")


def test_decode_round_trip() -> None:
    msg = decode_pb2.GenerateRequest(
        request_id="r-1",
        prompt_ids=[163584, 0, 2**31 - 1],
        sampling=common_pb2.SamplingParams(top_k=40),
        max_new_tokens=16,
        stop_ids=[163586],
    )
    assert list(_round_trip(msg).prompt_ids) == [163584, 0, 2**31 - 1]


def test_tokenizer_round_trip() -> None:
    chat = chat_types_pb2.ChatRequest(
        stop=["\n\n", "END"],
        tool_choice=chat_types_pb2.ToolChoice(
            mode=chat_types_pb2.ToolChoice.FUNCTION, function="f"
        ),
        max_tokens=0,
    )
    back = _round_trip(chat)
    assert list(back.stop) == ["\n\n", "END"] and back.tool_choice.function == "f"
    assert back.HasField("max_tokens") and not back.HasField("thinking")
    load = tokenizer_pb2.PlacementReply(
        decodes=[tokenizer_pb2.PeerLoad(name="d", stats=decode_pb2.DecodeStats(running=3))]
    )
    assert _round_trip(load).decodes[0].stats.running == 3


def test_service_stubs_exist_for_every_service() -> None:
    services = [
        (decode_pb2, decode_pb2_grpc, "Decode", ["Generate", "Stats"]),
        (prefill_pb2, prefill_pb2_grpc, "Prefill", ["Prefill", "Stats"]),
        (
            tokenizer_pb2,
            tokenizer_pb2_grpc,
            "Tokenizer",
            ["Chat", "CountTokens", "Render", "Info", "Placement"],
        ),
    ]
    for pb2, pb2_grpc, service, methods in services:
        for attr in (f"{service}Stub", f"{service}Servicer", f"add_{service}Servicer_to_server"):
            assert hasattr(pb2_grpc, attr), attr
        descriptor = pb2.DESCRIPTOR.services_by_name[service]
        assert descriptor.full_name == f"k2.v1.{service}"
        assert [m.name for m in descriptor.methods] == methods
