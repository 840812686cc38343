"""The dispatcher's torch side (no Triton needed) and the model hooks' CPU behaviour."""

import torch

from k2model import EMBEDDED_CHECKPOINT, generate_ids, load_model
from k2model.batch import SeqSlice, build_batch
from k2model.checkpoint.fp8 import quantize_block_fp8
from k2model.kernels import dispatch
from k2model.linear import Linear
from k2model.moe import LocalExperts
from tests.kernels.helpers import assert_near


def test_importing_the_model_does_not_import_triton() -> None:
    import subprocess
    import sys

    code = "import sys, k2model, k2model.kernels.dispatch; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_fp8_linear_twin_tracks_the_dense_linear() -> None:
    """Fused parts whose fp8 blocks do not line up (200 rows, then 72): each part is its own GEMM;
    activation quantisation keeps the result within fp8 precision of the dense layer."""
    parts = [quantize_block_fp8(torch.randn(n, 160) * 0.1) for n in (200, 72)]
    layer = Linear(160, 272, torch.float32)
    layer.set_fp8(parts)
    x = torch.randn(2, 3, 160)
    out = dispatch.fp8_linear(x, parts, torch.float32)
    assert out.shape == (2, 3, 272)
    dense = layer(x)  # on CPU: the dequantise-then-matmul path
    assert ((out - dense).norm() / dense.norm()).item() < 0.05  # e4m3 activations: ~2.5%
    assert_near(out[..., 200:], dispatch.fp8_linear(x, parts[1:], torch.float32), 1e-6)


def test_stacked_fp8_experts_are_views_and_keep_every_expert() -> None:
    ex = LocalExperts(4, 128, 64, torch.float32)
    trios = [tuple(quantize_block_fp8(torch.randn(r, c)) for r, c in ((64, 128),) * 2 + ((128, 64),))
             for _ in range(4)]  # fmt: skip
    ex.set_fp8(trios)
    before = [ex.expert(e) for e in range(4)]
    w = ex.stacked()
    assert w.fp8 and w.gate.shape == (4, 64, 128) and w.down_scale.shape == (4, 1, 1)
    assert ex.stacked() is w, "stacked once"
    for e in range(4):
        assert ex.fp8[e][0][0].untyped_storage().data_ptr() == w.gate.untyped_storage().data_ptr()
        for got, want in zip(ex.expert(e), before[e], strict=True):
            assert torch.equal(got, want)
    ex.fp8 = list(reversed(ex.fp8))  # reassigned (e.g. moved to another device): restacked
    assert ex.stacked() is not w and torch.equal(ex.stacked().gate[0], w.gate[3])


def test_mla_decode_twin_is_softmax_attention() -> None:
    """Two sequences over shuffled slots; padding slots past each length must not count."""
    kv = torch.randn(10, 24)
    slots = torch.tensor([[3, 7, 1, 0], [9, 2, 0, 0]])
    lengths = torch.tensor([3, 2])
    q = torch.randn(2, 5, 24)
    out = dispatch.mla_decode(q, kv, slots, lengths, 0.3, 16)
    for b, n in enumerate(lengths.tolist()):
        ctx = kv[slots[b, :n]]
        p = (q[b] @ ctx.T * 0.3).softmax(-1)
        assert_near(out[b], p @ ctx[:, :16], 1e-6)


PROMPTS = [[5, 17, 99, 3, 250, 41], list(range(300, 340)), [7]]


def test_kernel_path_glue_gives_the_cpu_tokens(monkeypatch) -> None:
    """The layers' kernel-path glue (paged MLA decode, stacked experts, fused MoE) run on CPU
    over the torch twins reproduces the plain path's greedy tokens."""
    model = load_model(EMBEDDED_CHECKPOINT, dtype=torch.float32)
    plain = generate_ids(model, PROMPTS, 10)
    monkeypatch.setattr(dispatch, "kernel_path", lambda t: True)
    assert generate_ids(model, PROMPTS, 10) == plain


def test_kernel_path_fp8_tracks_dense(monkeypatch) -> None:
    """fp8-resident weights through the block-fp8 GEMM and fp8 MoE twins (activations quantised
    per token and 128 channels, ~2.5% error each) stay within fp8 precision of the dense layers:
    the first decoder layer, and an MoE block fed the same rows. (Through all four layers of the
    random embedded model the error compounds to ~25%, so whole-model logits are not compared.)"""
    dense = load_model(EMBEDDED_CHECKPOINT, dtype=torch.float32)
    fp8 = load_model(EMBEDDED_CHECKPOINT, dtype=torch.float32, fp8_resident=True)
    ids = torch.tensor(PROMPTS[1])
    meta = build_batch([SeqSlice(0, len(ids), [0, 1, 2])], 16)
    x = torch.randn(len(ids), dense.cfg.hidden_size)
    out = {}
    for name, model, on in (("dense", dense, False), ("fp8", fp8, True)):
        monkeypatch.setattr(dispatch, "kernel_path", lambda t, on=on: on)
        h = model.embed[ids]
        rot = model.rope.lookup(meta.positions)
        layer0 = model.layers[0](h, rot, meta, model.new_cache(4, 16), "naive")
        out[name] = (layer0, model.layers[1].ffn(x))
    for got, want in zip(out["fp8"], out["dense"], strict=True):
        assert ((got - want).norm() / want.norm()).item() < 0.06
