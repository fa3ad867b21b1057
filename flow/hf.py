"""Hugging Face checkpoints (Qwen3, Llama) <-> backbone tensors and member directories.

A directory's `config.json` `model_type` picks the architecture (`flow.architectures`); the
tensor names below are the same for every architecture this module reads (Qwen3 adds the q/k
norms, which `block_tensor_shapes` lists only where the architecture has them). Exporting writes
member k as a plain `Qwen3ForCausalLM` / `LlamaForCausalLM` directory of `e_k + 2` layers (the
last member: all layers) whose layer `e_k + 1` is the exit block. `transformers` is never
imported here: the mapping is names and JSON, so the tests can use `transformers` as an
independent oracle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flow.architectures import by_hf_model_type
from flow.backbone import member_backbone
from flow.config import FamilyConfig
from flow.errors import ArtifactError, ConfigError

# flow's name inside a block -> the Hugging Face name inside `model.layers.{i}`
HF_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_HF_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "head.weight": "lm_head.weight"}

# config.json switches whose non-default values change the math a family computes.
_REFUSED_SWITCHES = ("attention_bias", "mlp_bias", "use_sliding_window")


def end_token_ids(src: Path) -> list[int]:
    """The `eos_token_id`(s) a checkpoint declares: generation_config.json first (what
    `generate` stops at), else config.json."""
    for name in ("generation_config.json", "config.json"):
        path = src / name
        if path.is_file():
            try:
                value = json.loads(path.read_text()).get("eos_token_id")
            except json.JSONDecodeError as err:
                raise ArtifactError(f"{path} is not valid JSON ({err})") from None
            if value is not None:
                return [int(i) for i in (value if isinstance(value, list) else [value])]
    return []


def hf_name(name: str) -> str:
    """The Hugging Face name of a backbone tensor (`flow.backbone`'s names)."""
    if name.startswith("layers."):
        _, layer, inner = name.split(".", 2)
        return f"model.layers.{layer}.{HF_BLOCK_NAMES[inner]}"
    return _HF_NAMES[name]


def read_hf_config(src: Path) -> tuple[dict[str, Any], bool]:
    """`FamilyConfig` fields (all but `exits`, `architecture` included) and whether the
    embeddings are tied, from a Qwen3 or Llama directory's config.json; anything whose math a
    family cannot reproduce is refused by name."""
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ArtifactError(f"{src} is not a Hugging Face checkpoint: no config.json")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{config_path} is not valid JSON ({err})") from None
    arch = by_hf_model_type(hf.get("model_type"), str(src))
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(f"{src} uses rope scaling {rope!r}; only default rotary embeddings "
                          f"are supported")
    switched = [name for name in _REFUSED_SWITCHES if hf.get(name)]
    if switched:
        raise ConfigError(f"{src} sets {', '.join(switched)}; a family has no biases and no "
                          f"sliding windows")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{src} uses activation {hf['hidden_act']!r}; families use silu (SwiGLU)")
    if hf.get("pretraining_tp", 1) != 1:
        raise ConfigError(f"{src} sets pretraining_tp={hf['pretraining_tp']}; only 1 is supported")
    absent = [key for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                              "num_attention_heads") if key not in hf]
    if absent:
        raise ArtifactError(f"{config_path} lacks {', '.join(absent)}")
    heads = hf["num_attention_heads"]
    fields = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), architecture=arch.name)
    return fields, bool(hf.get("tie_word_embeddings", False))


def load_hf_backbone(src: Path, names: list[str]) -> dict[str, Any]:
    """The backbone tensors `names` (`flow.backbone.backbone_names`) of a safetensors checkpoint."""
    tensors = load_hf_tensors(src)
    missing = [hf_name(name) for name in names if hf_name(name) not in tensors]
    if missing:
        raise ArtifactError(f"the checkpoint in {src} has no tensor {missing[0]!r} ({len(missing)} "
                            f"missing); is it complete, with the layers its config.json states?")
    return {name: tensors[hf_name(name)] for name in names}


def hf_member_tensors(tensors: dict[str, Any], config: FamilyConfig, exit: int) -> dict[str, Any]:
    """Member `exit`'s tensors under Hugging Face names; its last layer is the exit block."""
    return {hf_name(name): t for name, t in member_backbone(tensors, config, exit).items()}


def hf_config(config: FamilyConfig, exit: int, dtype: str,
              eos_token_id: int | list[int] | None) -> dict[str, Any]:
    """config.json of member `exit` as a standard model of the family's architecture."""
    arch = config.arch
    return {
        "architectures": [arch.hf_class],
        "model_type": arch.hf_model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.member_num_layers(exit),
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.rms_norm_eps,
        # Both spellings: transformers >= 5 reads rope_parameters, 4.x reads rope_theta.
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": dtype,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "pad_token_id": _first(eos_token_id),
        **arch.hf_config_extras,
    }


def hf_generation_config(config: FamilyConfig, eos_token_id: int | list[int] | None) -> dict[str, Any]:
    """generation_config.json of an exported member: greedy, stopping at the family's stop
    tokens, padding with the first of them (the family has no pad token of its own)."""
    return {"eos_token_id": eos_token_id, "pad_token_id": _first(eos_token_id),
            "do_sample": False, "max_length": config.max_seq_len}


def _first(token_ids: int | list[int] | None) -> int | None:
    return token_ids[0] if isinstance(token_ids, list) else token_ids


def load_hf_tensors(src: Path) -> dict[str, Any]:
    """All tensors of a (possibly sharded) safetensors checkpoint, as torch tensors."""
    from safetensors.torch import load_file

    index = src / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (src / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise ArtifactError(f"{src} has no model.safetensors (or index); weights load from "
                            f"safetensors only, never pickle")
    tensors: dict[str, Any] = {}
    for shard in shards:
        tensors.update(load_file(src / shard))
    return tensors
