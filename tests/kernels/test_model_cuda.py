"""On a GPU the model runs the Triton kernels and gives the CPU's greedy tokens."""

import pytest
import torch

from k2model import EMBEDDED_CHECKPOINT, generate_ids, load_model
from k2model.config import K2Config
from k2model.model import K2Model
from k2model.rope import RotaryTable

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

PROMPTS = [[5, 17, 99, 3, 250, 41], list(range(300, 340)), [7]]


def on_cuda(model: K2Model) -> K2Model:
    """Buffers move with .to(); the rope table and resident fp8 parts are plain attributes."""
    model.to("cuda")
    model.rope = RotaryTable(model.cfg, "cuda")
    for m in model.modules():
        if getattr(m, "fp8_parts", None) is not None:
            m.fp8_parts = [(w.cuda(), s.cuda()) for w, s in m.fp8_parts]
        if getattr(m, "fp8", None) is not None and isinstance(m.fp8, list):
            m.fp8 = [tuple((w.cuda(), s.cuda()) for w, s in trio) for trio in m.fp8]
    return model


def test_greedy_tokens_match_cpu() -> None:
    """fp32 weights: the MLA decode and MoE kernels on GPU, plain torch on CPU."""
    cpu = generate_ids(load_model(EMBEDDED_CHECKPOINT, dtype=torch.float32), PROMPTS, 12)
    gpu = generate_ids(on_cuda(load_model(EMBEDDED_CHECKPOINT, dtype=torch.float32)), PROMPTS, 12)
    assert gpu == cpu


def test_fp8_kernels_match_their_cpu_twins(monkeypatch) -> None:
    """fp8-resident weights: the first decoder layer (block-fp8 GEMMs) and an MoE block (fp8
    align + grouped GEMMs) on GPU against the same glue over the torch twins on CPU, fed the
    same rows. Layer by layer: through the whole random model a 1e-6 change of one activation
    flips fp8 roundings that compound to ~10% in the logits, so logits are not compared."""
    from k2model.batch import SeqSlice, build_batch
    from k2model.kernels import dispatch

    monkeypatch.setattr(dispatch, "kernel_path", lambda t: True)
    ids = torch.tensor(PROMPTS[1])
    x = torch.randn(len(ids), K2Config.from_dir(EMBEDDED_CHECKPOINT).hidden_size)
    outs = []
    for device in ("cpu", "cuda"):
        model = load_model(EMBEDDED_CHECKPOINT, dtype=torch.float32, fp8_resident=True)
        if device == "cuda":
            model = on_cuda(model)
        meta = build_batch([SeqSlice(0, len(ids), [0, 1, 2])], 16, device)
        h = model.embed[ids.to(device)]
        rot = model.rope.lookup(meta.positions)
        layer0 = model.layers[0](h, rot, meta, model.new_cache(4, 16), "naive")
        outs.append((layer0.cpu(), model.layers[1].ffn(x.to(device)).cpu()))
    for cpu, gpu in zip(*outs, strict=True):
        assert ((gpu - cpu).norm() / cpu.norm()).item() < 2e-2
