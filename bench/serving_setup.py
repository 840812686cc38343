"""bench/serving.py's inputs: the K2-latent checkpoint, vLLM's view of it, the prompts.

The checkpoint has random weights in K2's architecture and HF format with K2's MLA latent
(kv_lora_rank 512 + qk_rope_head_dim 64, which vLLM's CPU MLA requires). vLLM reads the same
weight file through symlinks, as model_type deepseek_v3, with a tokenizer.json converted from the
same tiktoken ranks and a chat template that renders one user turn exactly as our K2-Thinking
format does with thinking off.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
from pathlib import Path

from k2model import EMBEDDED_CHECKPOINT

SEED = 0
SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."
VLLM_TEMPLATE = (
    "{% for m in messages %}<|im_user|>user<|im_middle|>{{ m['content'] }}<|im_end|>{% endfor %}"
    "<|im_assistant|>assistant<|im_middle|><think></think>"
)


def make_checkpoint(out: Path) -> Path:
    from k2model.checkpoint.random_init import random_weights, tiny_config, write_checkpoint

    cfg = tiny_config(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1024,
        moe_intermediate_size=256,
        num_hidden_layers=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        q_lora_rank=256,
        kv_lora_rank=512,
        qk_nope_head_dim=64,
        qk_rope_head_dim=64,
        v_head_dim=64,
        max_position_embeddings=4096,
        bos_token_id=3840,
        eos_token_id=3842,
    )
    write_checkpoint(out, cfg, random_weights(cfg, seed=SEED))
    for name in ("tiktoken.model", "tokenizer_config.json"):
        shutil.copy(EMBEDDED_CHECKPOINT / name, out / name)
    return out


def vllm_view(checkpoint: Path, out: Path) -> Path:
    """The same weights as vLLM loads them (symlinked), with an HF fast tokenizer."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from k2model.text.tokenizer import Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["model_type"] = "deepseek_v3"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in checkpoint.glob("*.safetensors*"):
        (out / f.name).symlink_to(f)
    encoding = Tokenizer.from_dir(checkpoint)._encoding
    ranks = out / "ranks.tiktoken"
    ranks.write_text(
        "".join(
            f"{base64.b64encode(b).decode()} {r}\n" for b, r in encoding._mergeable_ranks.items()
        )
    )
    fast = TikTokenConverter(
        vocab_file=str(ranks),
        pattern=encoding._pat_str,
        extra_special_tokens=encoding._special_tokens,
    ).converted()
    fast.save(str(out / "tokenizer.json"))
    ranks.unlink()
    system = f"<|im_system|>system<|im_middle|>{SYSTEM}<|im_end|>"
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "[BOS]",
        "eos_token": "<|im_end|>",
        "chat_template": system + VLLM_TEMPLATE,
        "model_max_length": cfg["max_position_embeddings"],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return out


def make_prompts(checkpoint: Path, n: int, tokens: int) -> list[str]:
    """n distinct texts of ordinary tokens, each `tokens` long once rendered as one user turn
    (the chat framing included), as our tokenizer counts them."""
    from k2model.text.chat_format import render
    from k2model.text.messages import Message
    from k2model.text.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(checkpoint)
    rng = random.Random(SEED)
    frame = len(tok.encode_segments(render([Message("user", "")], flavor="k2-thinking"))) + 2
    prompts = []
    for _ in range(n):
        ids = [rng.randrange(256, tok.n_base) for _ in range(tokens - frame)]
        text = tok.decode(ids)
        while len(tok.encode(text)) > tokens - frame:
            text = text[: int(len(text) * 0.97)]
        prompts.append(text)
    return prompts
