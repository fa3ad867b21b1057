"""The family <-> megatron-core layout mapping, on its own."""

import torch

from builders import tiny_config
from flow import Family
from training.convert import (
    Shard,
    family_to_megatron,
    fuse_qkv,
    megatron_to_family,
    split_qkv,
    with_fused_norm_names,
)


def test_fused_qkv_is_grouped_per_kv_head():
    config = tiny_config(num_heads=4, num_kv_heads=2, head_dim=2, hidden_size=3)
    q = torch.arange(8 * 3).view(8, 3).float()  # heads 0..3, 2 rows each
    k = 100 + torch.arange(4 * 3).view(4, 3).float()
    v = 200 + torch.arange(4 * 3).view(4, 3).float()
    fused = fuse_qkv(q, k, v, config)
    # group 0: q heads 0-1, k0, v0; group 1: q heads 2-3, k1, v1
    expected = torch.cat([q[0:4], k[0:2], v[0:2], q[4:8], k[2:4], v[2:4]])
    assert torch.equal(fused, expected)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, config), (q, k, v), strict=True))


def test_tensor_parallel_shards_reassemble_to_the_single_rank_layout():
    family = Family.random(tiny_config(vocab_size=128), seed=0)
    tensors = family.model.state_dict()
    full = family_to_megatron(tensors, family.config, Shard())
    shards = [family_to_megatron(tensors, family.config, Shard(tp_rank=r, tp_size=2)) for r in (0, 1)]
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert torch.equal(torch.cat([s[qkv] for s in shards]), full[qkv])
    fc1 = "decoder.layers.0.mlp.linear_fc1.weight"
    gate, up = full[fc1].chunk(2)
    assert torch.equal(shards[1][fc1], torch.cat([gate.chunk(2)[1], up.chunk(2)[1]]))
    proj = "decoder.layers.0.self_attention.linear_proj.weight"
    assert torch.equal(torch.cat([s[proj] for s in shards], dim=1), full[proj])
    back = megatron_to_family(full, family.config)
    assert all(torch.equal(back[name], t) for name, t in tensors.items())


def test_pipeline_stages_hold_their_layers_and_exits():
    config = tiny_config()  # 5 layers would not split in 2: use a 4-layer family
    config = config.replace(num_layers=4, exits=(0, 2, 3))
    tensors = Family.random(config, seed=0).model.state_dict()
    first = family_to_megatron(tensors, config, Shard(pp_rank=0, pp_size=2))
    last = family_to_megatron(tensors, config, Shard(pp_rank=1, pp_size=2))
    assert "embedding.word_embeddings.weight" in first and "output_layer.weight" not in first
    assert any(n.startswith("exit_branches.0.") for n in first)
    assert any(n.startswith("exit_branches.1.") for n in last)
    assert torch.equal(last["decoder.layers.0.input_layernorm.weight"], tensors["blocks.2.attn_norm.weight"])


def test_norms_take_transformer_engines_fused_names_where_the_model_has_them():
    config = tiny_config(vocab_size=128)
    tensors = family_to_megatron(Family.random(config, seed=0).model.state_dict(), config, Shard())
    assert with_fused_norm_names(tensors, tensors.keys()) == tensors  # the local spec: unchanged
    fused_norms = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                   "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}

    def te_name(name: str) -> str:
        return next((name[: -len(p)] + f for p, f in fused_norms.items() if name.endswith(p)), name)

    fused = with_fused_norm_names(tensors, {te_name(name) for name in tensors})
    assert fused == {te_name(name): t for name, t in tensors.items()}
    assert "decoder.layers.2.mlp.linear_fc1.layer_norm_weight" in fused  # blocks and exit branches
    assert "exit_branches.0.layer.self_attention.linear_qkv.layer_norm_weight" in fused
