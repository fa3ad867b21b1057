"""Parity with independent implementations: `transformers`' Qwen3ForCausalLM and LlamaForCausalLM."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from builders import random_hf_checkpoint, random_llama_checkpoint, random_qwen3_checkpoint, tiny_config
from flow import ConfigError, Family, FamilyConfig
from flow.artifact import block_tensor_shapes
from flow.hf import HF_BLOCK_NAMES
from parity import truncated_logits

SHAPES = [
    # Qwen3, GQA ratio 2, head_dim * heads == hidden
    dict(model_type="qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=8, hidden_size=32,
         vocab_size=101),
    # Qwen3, multi-query, head_dim * heads != hidden (as in Qwen3-0.6B), larger vocabulary
    dict(model_type="qwen3", num_attention_heads=6, num_key_value_heads=1, head_dim=16, hidden_size=40,
         vocab_size=517),
    # Qwen3, plain multi-head attention, 5 layers, tied embeddings in the checkpoint
    dict(model_type="qwen3", num_attention_heads=2, num_key_value_heads=2, head_dim=24, hidden_size=48,
         vocab_size=64, num_hidden_layers=5, tie=True),
    # Llama, GQA ratio 3, head_dim * heads != hidden, SmolLM2's rope theta and norm eps
    dict(model_type="llama", num_attention_heads=6, num_key_value_heads=2, head_dim=12, hidden_size=48,
         vocab_size=97, rope_theta=100000.0, rms_norm_eps=1e-5),
    # Llama, multi-query, 5 layers, tied embeddings (as SmolLM2)
    dict(model_type="llama", num_attention_heads=4, num_key_value_heads=1, head_dim=12, hidden_size=40,
         vocab_size=130, num_hidden_layers=5, tie=True),
]
SHAPE_IDS = ["qwen3-gqa", "qwen3-mqa-wide-heads", "qwen3-mha-tied", "llama-gqa-wide-heads", "llama-mqa-tied"]


def hf_logits(model_dir, ids):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_imported_family_matches_transformers_at_every_exit(tmp_path, shape):
    shape = dict(shape)
    model_type, tie = shape.pop("model_type"), shape.pop("tie", False)
    layers = shape.get("num_hidden_layers", 4)
    src = random_hf_checkpoint(tmp_path / model_type, model_type, seed=len(tmp_path.name), tie=tie, **shape)
    family = Family.from_hf(src, exits=[0, layers - 3])
    assert family.config.architecture == model_type
    assert family.config.exits == (0, layers - 3, layers - 1)
    assert family.config.rope_theta == shape.get("rope_theta", 10000.0)
    ids = torch.randint(0, shape["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(0))

    full = hf_logits(src, ids)
    assert (family.logits(ids, exit=2) - full).abs().max().item() <= 1e-4
    source = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)

    for k in range(family.config.num_exits):
        # Fresh exits are copies of block e+1, the final norm and the head: member k is the
        # checkpoint truncated to e+2 layers, which transformers computes independently.
        expected = truncated_logits(source, family.config.member_num_layers(k), ids)
        assert (family.logits(ids, exit=k) - expected).abs().max().item() <= 1e-4

        exported = family.export_hf(tmp_path / f"member{k}", exit=k)
        config = json.loads((exported / "config.json").read_text())
        assert config["num_hidden_layers"] == family.config.member_num_layers(k)
        assert config["model_type"] == model_type and config["architectures"] == [family.config.arch.hf_class]
        assert (hf_logits(exported, ids) - family.logits(ids, exit=k)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("architecture", ["qwen3", "llama"])
def test_trained_exits_export_as_standalone_members(tmp_path, architecture):
    # Random exit branches (not copies of the backbone): export must carry the exit's own block.
    family = Family.random(tiny_config(architecture=architecture, rms_norm_eps=1e-5), seed=0)
    ids = torch.randint(0, family.config.vocab_size, (3, 11))
    for k in range(family.config.num_exits):
        exported = family.export_hf(tmp_path / f"m{k}", exit=k)
        config = json.loads((exported / "config.json").read_text())
        assert config["familial_flow"]["family_hash"] == family.family_hash()
        model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
        assert type(model).__name__ == family.config.arch.hf_class
        assert (hf_logits(exported, ids) - family.logits(ids, exit=k)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("architecture", ["qwen3", "llama"])
def test_export_then_import_round_trips_the_last_member(tmp_path, architecture):
    family = Family.random(tiny_config(architecture=architecture), seed=0)
    last = family.config.last_exit
    exported = family.export_hf(tmp_path / "full", exit=last)
    again = Family.from_hf(exported, exits=[1, 2])
    assert again.config.replace(exits=family.config.exits) == family.config
    ids = torch.randint(0, family.config.vocab_size, (1, 9))
    assert torch.equal(again.logits(ids, exit=2), family.logits(ids, exit=last))


def test_block_name_map_covers_every_block_tensor():
    config = FamilyConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
                          num_kv_heads=1, head_dim=8, exits=(0,))
    assert set(HF_BLOCK_NAMES) == set(block_tensor_shapes(config))
    assert set(block_tensor_shapes(config.replace(architecture="llama"))) == \
        set(HF_BLOCK_NAMES) - {"attn.q_norm.weight", "attn.k_norm.weight"}


def test_unsupported_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ConfigError, match=r"is a 'mistral' checkpoint; supported model types: "
                                          r"'qwen3' \(Qwen3ForCausalLM\), 'llama' \(LlamaForCausalLM\)"):
        Family.from_hf(tmp_path, exits=[0])


@pytest.mark.parametrize("edit, message", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "uses rope scaling"),
    ({"attention_bias": True}, "sets attention_bias; a family has no biases"),
    ({"mlp_bias": True}, "sets mlp_bias; a family has no biases"),
    ({"hidden_act": "gelu"}, "uses activation 'gelu'"),
    ({"pretraining_tp": 2}, "sets pretraining_tp=2"),
], ids=["rope-scaling", "attention-bias", "mlp-bias", "gelu", "pretraining-tp"])
def test_llama_features_a_family_lacks_are_refused(tmp_path, edit, message):
    src = random_llama_checkpoint(tmp_path / "llama")
    config = json.loads((src / "config.json").read_text())
    config.pop("rope_parameters", None)
    (src / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ConfigError, match=message):
        Family.from_hf(src, exits=[1])


def test_import_exit_past_the_last_layer_is_refused(tmp_path):
    src = random_qwen3_checkpoint(tmp_path / "q")
    with pytest.raises(ConfigError, match=r"exits \[7\] are outside the backbone's layers 0..3"):
        Family.from_hf(src, exits=[7])


def test_pickle_only_checkpoint_is_refused(tmp_path):
    src = random_qwen3_checkpoint(tmp_path / "q")
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(Exception, match="safetensors only"):
        Family.from_hf(src, exits=[1])


def test_an_exported_member_pads_and_stops_with_the_familys_end_token(tmp_path, device_family):
    """Catches: a member exported without a pad token or generation config, on which batched
    `generate` has nothing to pad with and falls back to its own defaults."""
    from transformers import AutoTokenizer, GenerationConfig

    family = device_family[1]
    exported = family.export_hf(tmp_path / "member0", exit=0)
    end = family.stop_token_ids()[0]
    generation = GenerationConfig.from_pretrained(exported)
    assert generation.pad_token_id == end and generation.eos_token_id == end
    assert generation.do_sample is False and generation.max_length == family.config.max_seq_len
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert tokenizer.pad_token_id == end
    batch = tokenizer(["def f(x):", "import os\nprint(1)"], return_tensors="pt", padding=True)
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    out = model.generate(**batch, max_new_tokens=4, min_new_tokens=4)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)
