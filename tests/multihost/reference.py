"""What the served pipeline must produce: the in-process model's greedy tokens for the same prompt.

The gateway renders a chat for the embedded checkpoint with the "k2-thinking" flavor (the model
opens its own <think>), so the reference renders the same way; its tokens end before a stop id,
which the gateway does not stream.
"""

from __future__ import annotations

from dataclasses import dataclass

from k2model import EMBEDDED_CHECKPOINT, K2Model, generate_ids, load_model
from k2model.text.chat_format import render
from k2model.text.messages import Message
from k2model.text.tokenizer import Tokenizer


@dataclass(frozen=True)
class Reference:
    model: K2Model
    tokenizer: Tokenizer

    @classmethod
    def embedded(cls) -> Reference:
        return cls(load_model(EMBEDDED_CHECKPOINT), Tokenizer.from_dir(EMBEDDED_CHECKPOINT))

    def ids(self, prompt: list[int], max_new: int) -> list[int]:
        return generate_ids(self.model, [prompt], max_new)[0]

    def chat_pieces(self, texts: list[str], max_new: int) -> list[list[bytes]]:
        """For each user message alone in a chat: the bytes of each token a greedy chat
        completion streams (one batched generation)."""
        prompts = [
            self.tokenizer.encode_segments(render((Message("user", t),), flavor="k2-thinking"))
            for t in texts
        ]
        stops = self.tokenizer.stop_ids
        outs = generate_ids(self.model, prompts, max_new, stop_ids=stops)
        return [[self.tokenizer.id_to_piece(i) for i in out if i not in stops] for out in outs]
