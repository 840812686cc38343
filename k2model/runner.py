"""One model step over a ragged batch: builds the tensors, runs the model, samples.

The only place (beside tests) that turns plain-Python batch descriptions into tensors; schedulers
upstream deal in token lists and block ids. With remote experts (the data plane), a large enough
step runs as two micro-batches in lockstep (K2Model.forward_interleaved), so that one half's
attention hides the other half's expert hop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from k2model.batch import BatchMeta, SeqSlice, build_batch
from k2model.mla import AttentionForm
from k2model.model import K2Model
from k2model.sampled import Sampled
from k2model.sampling import sample
from k2model.sampling_params import SamplingRow

MICRO_BATCH_MIN = 8  # sequences per micro-batch before a step is split in two


@dataclass(frozen=True)
class StepInput:
    tokens: Sequence[int]  # the new tokens of this sequence
    start: int  # absolute position of tokens[0] (= tokens already cached)
    block_table: Sequence[int]
    row: SamplingRow | None  # None: nothing to sample (e.g. a non-final prefill chunk)


class ModelRunner:
    def __init__(
        self,
        model: K2Model,
        num_blocks: int,
        block_size: int,
        kv_dtype: torch.dtype | None = None,
        micro_batch_min: int = MICRO_BATCH_MIN,
    ) -> None:
        """micro_batch_min: with remote experts that can be submitted, a step of at least twice
        this many sequences runs as two interleaved micro-batches (0: never)."""
        self.model, self.block_size = model, block_size
        self.cache = model.new_cache(num_blocks, block_size, kv_dtype)
        self.micro_batch_min = micro_batch_min

    def step(
        self,
        inputs: Sequence[StepInput],
        form: AttentionForm = "absorbed",
        on_layer: Callable[[int, torch.Tensor], None] | None = None,
    ) -> list[Sampled | None]:
        """Run the batch; returns one Sampled per input that has a row, else None.

        `on_layer(layer, latents)` receives, as soon as each layer is done, the latent KV rows
        [T, kv_dim] of the new tokens in input order.
        """
        half = len(inputs) // 2
        split = on_layer is None and 0 < self.micro_batch_min <= half and self.model.submits_experts
        if split:  # ping-pong: one half's attention while the other's rows are at the experts
            parts = [self._tensors(inputs[:half]), self._tensors(inputs[half:])]
            logits = torch.cat(self.model.forward_interleaved(parts, self.cache, form))
        else:
            ids, meta = self._tensors(inputs)
            hook = None
            if on_layer is not None:

                def hook(layer: int) -> None:
                    on_layer(layer, self.cache.data[layer].index_select(0, meta.write_slots))

            logits = self.model(ids, meta, self.cache, form, on_layer=hook)
        wanted = [k for k, i in enumerate(inputs) if i.row is not None]
        out: list[Sampled | None] = [None] * len(inputs)
        if wanted:
            rows = logits if len(wanted) == len(inputs) else logits[wanted]  # no copy when all
            result = sample(rows, [inputs[k].row for k in wanted]).cpu()
            for j, k in enumerate(wanted):
                out[k] = result.row(j)
        return out

    def _tensors(self, inputs: Sequence[StepInput]) -> tuple[torch.Tensor, BatchMeta]:
        slices = [SeqSlice(i.start, len(i.tokens), list(i.block_table)) for i in inputs]
        meta = build_batch(slices, self.block_size, self.model.device)
        ids = torch.tensor([t for i in inputs for t in i.tokens], device=self.model.device)
        return ids, meta
