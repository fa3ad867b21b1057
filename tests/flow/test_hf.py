"""Parity with an independent implementation: `transformers`' Qwen3ForCausalLM."""

import json

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from builders import random_qwen3_checkpoint
from flow import ConfigError, Family, FamilyConfig
from flow.artifact import block_tensor_shapes
from flow.hf import QWEN3_BLOCK_NAMES

SHAPES = [
    # GQA ratio 2, head_dim * heads == hidden
    dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8, hidden_size=32, vocab_size=101),
    # multi-query, head_dim * heads != hidden (as in Qwen3-0.6B), larger vocabulary
    dict(num_attention_heads=6, num_key_value_heads=1, head_dim=16, hidden_size=40, vocab_size=517),
    # plain multi-head attention, 5 layers, tied embeddings in the checkpoint
    dict(num_attention_heads=2, num_key_value_heads=2, head_dim=24, hidden_size=48, vocab_size=64,
         num_hidden_layers=5, tie=True),
]


def hf_logits(model_dir, ids):
    model = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits


def truncated_logits(model_dir, num_layers, ids):
    """Logits of the checkpoint's first `num_layers` layers + final norm + head, by transformers."""
    full = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = Qwen3Config.from_pretrained(model_dir)
    config.num_hidden_layers, config.layer_types = num_layers, config.layer_types[:num_layers]
    model = Qwen3ForCausalLM(config).eval()
    missing, _ = model.load_state_dict(full.state_dict(), strict=False)
    assert not missing
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits


@pytest.mark.parametrize("shape", SHAPES, ids=["gqa", "mqa-wide-heads", "mha-tied"])
def test_imported_family_matches_transformers_at_every_exit(tmp_path, shape):
    shape = dict(shape)
    tie = shape.pop("tie", False)
    layers = shape.get("num_hidden_layers", 4)
    src = random_qwen3_checkpoint(tmp_path / "qwen3", seed=len(tmp_path.name), tie=tie, **shape)
    family = Family.from_hf(src, exits=[0, layers - 3])
    assert family.config.exits == (0, layers - 3, layers - 1)
    ids = torch.randint(0, shape["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(0))

    full = hf_logits(src, ids)
    assert (family.logits(ids, exit=2) - full).abs().max().item() <= 1e-4

    for k in range(family.config.num_exits):
        # Fresh exits are copies of block e+1, the final norm and the head: member k is the
        # checkpoint truncated to e+2 layers, which transformers computes independently.
        expected = truncated_logits(src, family.config.member_num_layers(k), ids)
        assert (family.logits(ids, exit=k) - expected).abs().max().item() <= 1e-4

        exported = family.export_hf(tmp_path / f"member{k}", exit=k)
        assert json.loads((exported / "config.json").read_text())["num_hidden_layers"] == \
            family.config.member_num_layers(k)
        assert (hf_logits(exported, ids) - family.logits(ids, exit=k)).abs().max().item() <= 1e-4


def test_trained_exits_export_as_standalone_members(tmp_path, tiny_family):
    # Random exit branches (not copies of the backbone): export must carry the exit's own block.
    ids = torch.randint(0, tiny_family.config.vocab_size, (3, 11))
    for k in range(tiny_family.config.num_exits):
        exported = tiny_family.export_hf(tmp_path / f"m{k}", exit=k)
        config = json.loads((exported / "config.json").read_text())
        assert config["familial_flow"]["family_hash"] == tiny_family.family_hash()
        assert (hf_logits(exported, ids) - tiny_family.logits(ids, exit=k)).abs().max().item() <= 1e-4


def test_export_then_import_round_trips_the_last_member(tmp_path, tiny_family):
    last = tiny_family.config.num_exits - 1
    exported = tiny_family.export_hf(tmp_path / "full", exit=last)
    again = Family.from_hf(exported, exits=[1, 2])
    ids = torch.randint(0, tiny_family.config.vocab_size, (1, 9))
    assert torch.equal(again.logits(ids, exit=2), tiny_family.logits(ids, exit=last))


def test_block_name_map_covers_every_block_tensor():
    config = FamilyConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
                          num_kv_heads=1, head_dim=8, exits=(0,))
    assert set(QWEN3_BLOCK_NAMES) == set(block_tensor_shapes(config))


def test_non_qwen3_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="'llama' checkpoint; only Qwen3"):
        Family.from_hf(tmp_path, exits=[0])


def test_import_exit_past_the_last_layer_is_refused(tmp_path):
    src = random_qwen3_checkpoint(tmp_path / "q")
    with pytest.raises(ConfigError, match=r"exits \[7\] are outside the backbone's layers 0..3"):
        Family.from_hf(src, exits=[7])


def test_pickle_only_checkpoint_is_refused(tmp_path):
    src = random_qwen3_checkpoint(tmp_path / "q")
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(Exception, match="safetensors only"):
        Family.from_hf(src, exits=[1])
