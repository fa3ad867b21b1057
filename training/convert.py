"""Family tensors <-> the local state dict of one megatron-core rank.

megatron-core stores the decoder's shapes differently from the family (DESIGN.md §3):
- `linear_qkv` fuses q, k and v *per query group*: for each KV group g, the rows of its query
  heads, then k_g, then v_g. Tensor parallelism gives each rank a contiguous run of groups.
- `linear_fc1` stacks gate and up; each tensor-parallel rank holds [gate shard; up shard].
- column-parallel weights (qkv, fc1, embedding, heads) split rows; row-parallel weights
  (`linear_proj`, `linear_fc2`) split columns; norms are replicated.
- the per-head q/k norms exist only where the architecture has them (`config.arch.qk_norm`:
  Qwen3 yes, Llama no); megatron then builds no `q_layernorm`/`k_layernorm` either.
- Transformer Engine's layer spec fuses the pre-attention and pre-MLP norms into the linear that
  follows each (`with_fused_norm_names`); the local spec, which conversion back uses, does not.

Exit branch k lives on the pipeline stage that owns block `e_k`, under `exit_branches.{k}.`.
The last exit is megatron's own `decoder.final_layernorm` and `output_layer`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import Tensor

from flow.config import FamilyConfig
from training.config import stage_layers

# flow's name inside a block -> megatron's name inside a TransformerLayer (local spec)
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.o_proj.weight": "self_attention.linear_proj.weight",
    "mlp_norm.weight": "pre_mlp_layernorm.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
QK_NORM_NAMES = {
    "attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "attn.k_norm.weight": "self_attention.k_layernorm.weight",
}
QKV = "self_attention.linear_qkv.weight"
FC1 = "mlp.linear_fc1.weight"
ROW_PARALLEL = {"self_attention.linear_proj.weight", "mlp.linear_fc2.weight"}
# megatron's local-spec norm name -> Transformer Engine's, whose linear carries the norm before it
FUSED_NORM_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


@dataclass(frozen=True)
class Shard:
    """Which part of the family one rank holds: its place in the tensor-parallel group
    (`tp_rank` of `tp_size`) and in the pipeline (stage `pp_rank` of `pp_size`).

    The defaults are the single-rank layout, which holds everything.
    """

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1

    def layers(self, config: FamilyConfig) -> range:
        """The backbone layers of this pipeline stage (global indices)."""
        return stage_layers(config.num_layers, self.pp_size, self.pp_rank)

    @property
    def first_stage(self) -> bool:
        """This stage holds the embedding."""
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        """This stage holds the final norm and head (the last exit)."""
        return self.pp_rank == self.pp_size - 1

    def exits(self, config: FamilyConfig) -> list[int]:
        """Early exits (not the last) whose block `e_k` lives on this stage."""
        layers = self.layers(config)
        return [k for k, e in enumerate(config.exits[:-1]) if e in layers]

    def rows(self, tensor: Tensor) -> Tensor:
        """This rank's slice of a column-parallel weight: a contiguous block of output rows."""
        return tensor.chunk(self.tp_size, dim=0)[self.tp_rank]

    def columns(self, tensor: Tensor) -> Tensor:
        """This rank's slice of a row-parallel weight: a contiguous block of input columns."""
        return tensor.chunk(self.tp_size, dim=1)[self.tp_rank]


def layer_names(config: FamilyConfig) -> dict[str, str]:
    """The one-to-one tensor names of a block of this architecture (flow -> megatron)."""
    return {**LAYER_NAMES, **QK_NORM_NAMES} if config.arch.qk_norm else LAYER_NAMES


# ---- family -> megatron -------------------------------------------------------------------------


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, config: FamilyConfig) -> Tensor:
    """[q; k; v] projections -> megatron's per-group layout ((heads + 2 kv) * head_dim, hidden)."""
    groups, d = config.num_kv_heads, config.head_dim
    per_group = config.num_heads // groups
    q = q.view(groups, per_group * d, -1)
    k, v = k.view(groups, d, -1), v.view(groups, d, -1)
    return torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])


def split_qkv(qkv: Tensor, config: FamilyConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of `fuse_qkv` on a full (unsharded) weight."""
    groups, d = config.num_kv_heads, config.head_dim
    per_group = config.num_heads // groups
    grouped = qkv.view(groups, (per_group + 2) * d, -1)
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    hidden = qkv.shape[-1]
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def layer_to_megatron(block: dict[str, Tensor], config: FamilyConfig, shard: Shard) -> dict[str, Tensor]:
    """One decoder block (flow names, full tensors) -> this rank's megatron layer tensors."""
    out = {}
    for ours, theirs in layer_names(config).items():
        tensor = block[ours]
        out[theirs] = shard.columns(tensor) if theirs in ROW_PARALLEL else tensor
    out[QKV] = shard.rows(fuse_qkv(block["attn.q_proj.weight"], block["attn.k_proj.weight"],
                                   block["attn.v_proj.weight"], config))
    gate, up = block["mlp.gate_proj.weight"], block["mlp.up_proj.weight"]
    out[FC1] = torch.cat([shard.rows(gate), shard.rows(up)])
    return out


def family_to_megatron(tensors: dict[str, Tensor], config: FamilyConfig, shard: Shard) -> dict[str, Tensor]:
    """The state dict one rank's `FamilialGPT` loads, from the family's full tensors."""
    def block(prefix: str) -> dict[str, Tensor]:
        return {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}

    out: dict[str, Tensor] = {}
    if shard.first_stage:
        out["embedding.word_embeddings.weight"] = shard.rows(tensors["embed.weight"])
    for local, layer in enumerate(shard.layers(config)):
        for name, t in layer_to_megatron(block(f"blocks.{layer}."), config, shard).items():
            out[f"decoder.layers.{local}.{name}"] = t
    for k in shard.exits(config):
        for name, t in layer_to_megatron(block(f"exits.{k}.block."), config, shard).items():
            out[f"exit_branches.{k}.layer.{name}"] = t
        out[f"exit_branches.{k}.final_norm.weight"] = tensors[f"exits.{k}.norm.weight"]
        out[f"exit_branches.{k}.output_layer.weight"] = shard.rows(tensors[f"exits.{k}.head.weight"])
    if shard.last_stage:
        last = config.last_exit
        out["decoder.final_layernorm.weight"] = tensors[f"exits.{last}.norm.weight"]
        out["output_layer.weight"] = shard.rows(tensors[f"exits.{last}.head.weight"])
    return {name: t.contiguous() for name, t in out.items()}


def with_fused_norm_names(local: dict[str, Tensor], model_names: Collection[str]) -> dict[str, Tensor]:
    """`local` (from `family_to_megatron`) with each norm renamed to `FUSED_NORM_NAMES`' fused
    name wherever the model (`model_names`, its state dict's keys) lacks the local-spec name."""
    renamed = {}
    for name, tensor in local.items():
        plain = next((p for p in FUSED_NORM_NAMES if name.endswith(p)), None)
        if plain is not None and name not in model_names:
            name = name[: -len(plain)] + FUSED_NORM_NAMES[plain]
        renamed[name] = tensor
    return renamed


# ---- megatron -> family -------------------------------------------------------------------------


def layer_from_megatron(layer: dict[str, Tensor], config: FamilyConfig) -> dict[str, Tensor]:
    """One megatron layer (full, TP=1 tensors) -> a flow decoder block."""
    out = {ours: layer[theirs] for ours, theirs in layer_names(config).items()}
    q, k, v = split_qkv(layer[QKV], config)
    out.update({"attn.q_proj.weight": q, "attn.k_proj.weight": k, "attn.v_proj.weight": v})
    gate, up = layer[FC1].chunk(2, dim=0)
    out.update({"mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up})
    return out


def megatron_to_family(state: dict[str, Tensor], config: FamilyConfig) -> dict[str, Tensor]:
    """Family tensors from the state dict of a single-rank (TP=1, PP=1) `FamilialGPT`."""
    def layer(prefix: str) -> dict[str, Tensor]:
        return {name[len(prefix):]: t for name, t in state.items() if name.startswith(prefix)}

    out = {"embed.weight": state["embedding.word_embeddings.weight"]}
    for index in range(config.num_layers):
        for name, t in layer_from_megatron(layer(f"decoder.layers.{index}."), config).items():
            out[f"blocks.{index}.{name}"] = t
    for k in range(config.last_exit):
        for name, t in layer_from_megatron(layer(f"exit_branches.{k}.layer."), config).items():
            out[f"exits.{k}.block.{name}"] = t
        out[f"exits.{k}.norm.weight"] = state[f"exit_branches.{k}.final_norm.weight"]
        out[f"exits.{k}.head.weight"] = state[f"exit_branches.{k}.output_layer.weight"]
    last = config.last_exit
    out[f"exits.{last}.norm.weight"] = state["decoder.final_layernorm.weight"]
    out[f"exits.{last}.head.weight"] = state["output_layer.weight"]
    return {name: t.detach().clone().contiguous() for name, t in out.items()}
