"""Tiny families, checkpoints and reference sequences built on the spot for tests (nothing is
downloaded)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flow import FamilyConfig


def tiny_config(**overrides) -> FamilyConfig:
    fields = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=5, num_heads=4,
                  num_kv_heads=2, head_dim=12, exits=(1, 2, 4), max_seq_len=64, rope_theta=10000.0)
    return FamilyConfig(**{**fields, **overrides})


def random_hf_checkpoint(path: Path, model_type: str = "qwen3", seed: int = 0, tie: bool = False,
                         **shape) -> Path:
    """A randomly initialised `transformers` Qwen3 or Llama checkpoint saved with `save_pretrained`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(vocab_size=101, hidden_size=32, intermediate_size=72, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                  max_position_embeddings=128, tie_word_embeddings=tie)
    fields.update(shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields))
    with torch.no_grad():  # default init leaves norms at 1: perturb them so a swapped norm shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(path)
    return path


def random_qwen3_checkpoint(path: Path, seed: int = 0, tie: bool = False, **shape) -> Path:
    """A randomly initialised `transformers` Qwen3 checkpoint."""
    return random_hf_checkpoint(path, "qwen3", seed, tie, **shape)


def random_llama_checkpoint(path: Path, seed: int = 0, tie: bool = False, **shape) -> Path:
    """A randomly initialised `transformers` Llama checkpoint."""
    return random_hf_checkpoint(path, "llama", seed, tie, **shape)


def sharpen_heads(family, scale: float = 25.0):
    """Scale a random family's LM heads: normal(0, 0.02) heads give near-uniform logits, where
    float noise decides many argmaxes; scaled heads give clear preferences, as trained ones have."""
    import torch

    with torch.no_grad():
        for branch in family.model.exits:
            branch.head.weight.mul_(scale)
    return family


def agreeing_copy(family, damping: float = 0.25, noise: float = 0.1, seed: int = 0):
    """A copy of `family` whose early members agree with the full model often but not always.

    The blocks after exit 0 and the exit branches' blocks have their output projections scaled
    by `damping` (they still move the residual stream, so the next tier's blocks and their KV
    caches change its tokens), and every early exit reads the final norm and the final head plus
    `noise` (relative to the head's spread). On the device family's prompts member 0's greedy
    token is the full model's at about 60 % of positions (checked by a test), so speculative
    drafts are accepted and rejected on every path.
    """
    import copy

    import torch

    family = copy.deepcopy(family)
    model, config = family.model, family.config
    last = config.last_exit
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        damped = [*model.blocks[config.exits[0] + 1:], *(model.exits[k].block for k in range(last))]
        for block in damped:
            block.attn.o_proj.weight.mul_(damping)
            block.mlp.down_proj.weight.mul_(damping)
        head = model.exits[last].head.weight
        for k in range(last):
            model.exits[k].norm.weight.copy_(model.exits[last].norm.weight)
            model.exits[k].head.weight.copy_(
                head + noise * head.std() * torch.randn(head.shape, generator=generator))
    family.provenance = {"source": "agreeing_copy", "damping": damping, "noise": noise}
    return family


@dataclass
class Reference:
    """The hand-off rows of `conftest.SEQUENCE` at exit 0 and the full model's token at every position."""

    rows: np.ndarray  # (16, hidden) float32
    tokens: list[int]


def prompt_of(length: int, seed: int, vocab_size: int = 97) -> list[int]:
    """Random token ids (tiny_config's vocabulary by default)."""
    return np.random.default_rng(seed).integers(0, vocab_size, length).tolist()


def handoff_rows(family, tokens: list[int], exit: int) -> np.ndarray:
    """h_e of every position, recomputed from the token ids (the device's part, independently)."""
    return family.handoff(tokens, exit=exit)[0].numpy()
