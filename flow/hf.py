"""Hugging Face Qwen3 checkpoints <-> family tensors.

Importing keeps the backbone as it is and initialises each exit branch k from the checkpoint
(Ruyi2): its block from block `e_k + 1`, its norm from the final norm, its head from the LM head.
Exporting writes member k as a plain Qwen3 directory of `e_k + 2` layers (the last member: all
layers), whose layer `e_k + 1` is the exit block. `transformers` is never imported here: the
mapping is names and JSON, so the tests can use `transformers` as an independent oracle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flow.config import FamilyConfig
from flow.errors import ArtifactError, ConfigError

# flow's name inside a block -> the Qwen3 name inside `model.layers.{i}`
QWEN3_BLOCK_NAMES = {
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


def read_qwen3_config(src: Path) -> tuple[dict[str, Any], bool]:
    """Architecture fields (all but `exits`) and whether the embeddings are tied."""
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ArtifactError(f"{src} is not a Hugging Face checkpoint: no config.json")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{config_path} is not valid JSON ({err})") from None
    if hf.get("model_type") != "qwen3":
        raise ConfigError(f"{src} is a {hf.get('model_type')!r} checkpoint; only Qwen3 "
                          f"(model_type \"qwen3\", dense) checkpoints can be imported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(f"{src} uses rope scaling {rope!r}; only default rotary embeddings "
                          f"are supported")
    if hf.get("attention_bias") or hf.get("use_sliding_window"):
        raise ConfigError(f"{src} uses attention bias or sliding windows, which a family does not")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{src} uses activation {hf['hidden_act']!r}; Qwen3 families use silu")
    heads = hf["num_attention_heads"]
    architecture = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)))
    return architecture, bool(hf.get("tie_word_embeddings", False))


def qwen3_to_family(hf: dict[str, Any], config: FamilyConfig, tied: bool) -> dict[str, Any]:
    """Family tensors from Qwen3 tensors (values are passed through; exit copies are cloned)."""
    def take(name: str) -> Any:
        if name not in hf:
            raise ArtifactError(f"the checkpoint has no tensor {name!r}; is it a complete Qwen3 "
                                f"checkpoint with {config.num_layers} layers?")
        return hf[name]

    lm_head = take("model.embed_tokens.weight") if tied else take("lm_head.weight")
    tensors = {"embed.weight": take("model.embed_tokens.weight")}
    for layer in range(config.num_layers):
        for ours, theirs in QWEN3_BLOCK_NAMES.items():
            tensors[f"blocks.{layer}.{ours}"] = take(f"model.layers.{layer}.{theirs}")
    for k, exit_layer in enumerate(config.exits):
        if k < config.num_exits - 1:
            for ours, theirs in QWEN3_BLOCK_NAMES.items():
                tensors[f"exits.{k}.block.{ours}"] = take(f"model.layers.{exit_layer + 1}.{theirs}").clone()
        tensors[f"exits.{k}.norm.weight"] = take("model.norm.weight").clone()
        tensors[f"exits.{k}.head.weight"] = lm_head.clone()
    return tensors


def family_to_qwen3(tensors: dict[str, Any], config: FamilyConfig, exit: int) -> dict[str, Any]:
    """Qwen3 tensors of member `exit`; its last layer is the exit block (unless the last exit)."""
    exit_layer = config.exit_layer(exit)
    hf = {"model.embed_tokens.weight": tensors["embed.weight"],
          "model.norm.weight": tensors[f"exits.{exit}.norm.weight"],
          "lm_head.weight": tensors[f"exits.{exit}.head.weight"]}
    for layer in range(exit_layer + 1):
        for ours, theirs in QWEN3_BLOCK_NAMES.items():
            hf[f"model.layers.{layer}.{theirs}"] = tensors[f"blocks.{layer}.{ours}"]
    if not config.is_final_exit(exit):
        for ours, theirs in QWEN3_BLOCK_NAMES.items():
            hf[f"model.layers.{exit_layer + 1}.{theirs}"] = tensors[f"exits.{exit}.block.{ours}"]
    return hf


def qwen3_config(config: FamilyConfig, exit: int, dtype: str, eos_token_id: int | None) -> dict[str, Any]:
    """config.json of member `exit` as a standard Qwen3 model."""
    layers = config.member_num_layers(exit)
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": layers,
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
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": layers,
        "use_cache": True,
        "torch_dtype": dtype,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
    }


def load_qwen3_tensors(src: Path) -> dict[str, Any]:
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
