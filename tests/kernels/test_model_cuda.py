"""On a GPU the model runs the Triton kernels and gives the CPU's greedy tokens."""

import pytest
import torch

from k2model import EMBEDDED_CHECKPOINT, generate_ids, load_model
from k2model.config import K2Config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

PROMPTS = [[5, 17, 99, 3, 250, 41], list(range(300, 340)), [7]]


def test_greedy_tokens_match_cpu() -> None:
    """fp32 weights: the MLA decode and MoE kernels on GPU, plain torch on CPU."""
    cpu = generate_ids(load_model(EMBEDDED_CHECKPOINT, dtype=torch.float32), PROMPTS, 12)
    gpu = generate_ids(
        load_model(EMBEDDED_CHECKPOINT, dtype=torch.float32, device="cuda"), PROMPTS, 12
    )
    assert gpu == cpu


def test_fp8_kernels_match_their_cpu_twins(monkeypatch) -> None:
    """fp8-resident weights: the first decoder layer (block-fp8 GEMMs) and an MoE block (fp8
    align + grouped GEMMs) on GPU against the same glue over the torch twins on CPU, fed the
    same rows. Layer by layer: through the whole random model a 1e-6 change of one activation
    flips fp8 roundings that compound to ~10% in the logits, so logits are not compared."""
    from k2model.batch import SeqSlice, build_batch
    from k2model.kernels import dispatch, fused_moe
    from k2model.kernels.ops import Ops

    kernels = {"fp8_linear": Ops.fp8_linear, "routed_experts": Ops.routed_experts}

    def fp8_linear(self, x, parts, dtype):  # the torch backend runs the kernels' twins here
        if self.name == "triton":
            return kernels["fp8_linear"](self, x, parts, dtype)
        return dispatch.fp8_linear_ref(x, parts, dtype)

    def routed_experts(self, experts, x, ids, weights):
        if self.name == "triton":
            return kernels["routed_experts"](self, experts, x, ids, weights)
        return fused_moe.fused_moe_ref(x, ids, weights, experts.stacked())

    monkeypatch.setattr(Ops, "fp8_linear", fp8_linear)
    monkeypatch.setattr(Ops, "routed_experts", routed_experts)
    ids = torch.tensor(PROMPTS[1])
    x = torch.randn(len(ids), K2Config.from_dir(EMBEDDED_CHECKPOINT).hidden_size)
    outs = []
    for device in ("cpu", "cuda"):
        ops = "triton" if device == "cuda" else "torch"  # the GPU kernels against their twins
        model = load_model(
            EMBEDDED_CHECKPOINT, dtype=torch.float32, fp8_resident=True, device=device, ops=ops
        )
        meta = build_batch([SeqSlice(0, len(ids), [0, 1, 2])], 16, device)
        h = model.embed[ids.to(device)]
        rot = model.rope.lookup(meta.positions)
        layer0 = model.layers[0](h, rot, meta, model.new_cache(4, 16), "naive")
        outs.append((layer0.cpu(), model.layers[1].ffn(x.to(device)).cpu()))
    for cpu, gpu in zip(*outs, strict=True):
        assert ((gpu - cpu).norm() / cpu.norm()).item() < 2e-2
