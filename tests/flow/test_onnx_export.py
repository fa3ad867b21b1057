"""The exported device member under ONNX Runtime against the reference model.

These tests cover the portable `concat` cache layout (standard ONNX ops, left padding); the
shared-buffer layout the device runtime uses is tested in tests/device/test_member.py.
"""

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from builders import tiny_config
from flow import Family
from flow.artifact import file_sha256, read_manifest
from flow.member_format import (
    ATTENTION_MASK,
    HANDOFF_HIDDEN,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    MemberInfo,
    cache_names,
)
from flow.onnx_export import export_member
from parity import check_member_matches_family


@pytest.fixture(scope="module")
def family():
    return Family.random(tiny_config(), seed=3)


@pytest.fixture(scope="module", params=[0, 2], ids=["early-exit", "last-exit"])
def exported(request, family, tmp_path_factory):
    path = export_member(family, request.param, tmp_path_factory.mktemp("onnx") / "device.onnx",
                         kv_cache="concat")
    return request.param, path


def member_info(path) -> MemberInfo:
    return MemberInfo.from_metadata({p.key: p.value for p in onnx.load(path).metadata_props}, path)


def test_metadata_names_the_family_and_member(family, exported):
    exit, path = exported
    info = member_info(path)
    assert info.family_hash == family.family_hash() and info.weights == "float32"
    assert info.exit == exit and info.exit_layer == family.config.exits[exit]
    expected_layers = family.config.exits[exit] + (2 if exit < 2 else 1)
    assert info.num_cache_layers == expected_layers and info.kv_cache == "concat"


def test_auto_layout_needs_head_dim_multiple_of_8(family, tmp_path):
    from flow.errors import ConfigError
    from flow.onnx_export import choose_kv_cache

    assert choose_kv_cache(family.config) == "concat"  # head_dim 12: ORT's kernel cannot run it
    assert choose_kv_cache(family.config.replace(head_dim=16)) == "shared"
    with pytest.raises(ConfigError, match="choose one of auto, shared, concat"):
        choose_kv_cache(family.config, "paged")
    with pytest.raises(ConfigError, match="--kv-cache concat"):
        export_member(family, 0, tmp_path / "device.onnx", kv_cache="shared")


def test_prefill_and_decode_with_left_padding_match_the_reference(family, exported):
    exit, path = exported
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    config = family.config
    layers = member_info(path).num_cache_layers
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, config.vocab_size, size=n).tolist() for n in (5, 9)]
    width = max(map(len, prompts))
    input_ids = np.array([[0] * (width - len(p)) + p for p in prompts], dtype=np.int64)
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=np.int64)
    position_ids = np.maximum(mask.cumsum(1) - 1, 0)
    past = {name: np.zeros((2, config.num_kv_heads, 0, config.head_dim), np.float32)
            for name, _ in cache_names(layers)}
    sequences = [list(p) for p in prompts]
    for step in range(9):  # the prefill, then 8 decode steps fed with ORT's own presents
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {
            INPUT_IDS: input_ids, POSITION_IDS: position_ids, ATTENTION_MASK: mask, **past}),
            strict=True))
        for row, tokens in enumerate(sequences):
            count = input_ids.shape[1] if step else len(prompts[row])
            reference_logits = family.logits(tokens, exit=exit)[0, -count:].numpy()
            reference_handoff = family.handoff(tokens, exit=exit)[0, -count:].numpy()
            np.testing.assert_allclose(outputs[LOGITS][row, -count:], reference_logits, atol=1e-4)
            np.testing.assert_allclose(outputs[HANDOFF_HIDDEN][row, -count:], reference_handoff, atol=1e-4)
        next_tokens = outputs[LOGITS][:, -1].argmax(-1)
        for row, token in enumerate(next_tokens):
            sequences[row].append(int(token))
        past = {past_name: outputs[present] for past_name, present in cache_names(layers)}
        input_ids = next_tokens[:, None].astype(np.int64)
        position_ids = position_ids[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    assert all(len(s) == len(p) + 9 for s, p in zip(sequences, prompts, strict=True))


def test_exported_graph_uses_onnx_attention(exported):
    _, path = exported
    assert "Attention" in {node.op_type for node in onnx.load(path).graph.node}


def test_export_onnx_command_writes_members_into_the_family(tmp_path, family):
    from runs import flow

    family.save(tmp_path / "fam")
    out = flow("export-onnx", tmp_path / "fam", "--exit", "0", "--int8")
    assert "device.onnx" in out.stdout and "device.int8.onnx" in out.stdout
    member = tmp_path / "fam" / "members" / "0"
    fp32, int8 = member_info(member / "device.onnx"), member_info(member / "device.int8.onnx")
    assert int8.weights == "int8" and int8 == dataclasses.replace(fp32, weights="int8")
    assert int8.family_hash == family.family_hash()
    session = ort.InferenceSession(member / "device.int8.onnx", providers=["CPUExecutionProvider"])
    assert "present.0.key" in [o.name for o in session.get_outputs()]
    info = flow("info", tmp_path / "fam").stdout
    recorded = read_manifest(tmp_path / "fam").members["0"]
    assert recorded == {name: file_sha256(member / name) for name in ("device.onnx", "device.int8.onnx")}
    assert f"device.int8.onnx (sha256 {recorded['device.int8.onnx'][:12]}…), device.onnx" in info
    refused = flow("export-onnx", tmp_path / "fam", "--exit", "5", check=False)
    assert refused.returncode == 1 and "exit=5 is not a member" in refused.stderr


def test_exporting_a_family_directory_hashes_its_weights_once(tmp_path, family, monkeypatch):
    """Catches: each exported member hashing every tensor again, when the family verified its
    hash at load (SmolLM2: a full pass over 540 MB of weights per member)."""
    import flow.artifact
    from flow.onnx_export import export_family_members

    family.save(tmp_path / "fam")
    digests = []
    digest = flow.artifact.digest_tensors

    def counted(entries):
        digests.append(1)
        return digest(entries)

    monkeypatch.setattr(flow.artifact, "digest_tensors", counted)
    written = export_family_members(tmp_path / "fam", exits=[0, 1])
    assert len(digests) == 1  # verifying weights.safetensors at load
    assert [member_info(path).family_hash for path in written] == [family.family_hash()] * 2


def test_exporting_a_bfloat16_family_leaves_the_family_untouched(tmp_path):
    import torch

    family = Family.random(tiny_config(), seed=1, dtype=torch.bfloat16)
    before = family.family_hash()
    export_member(family, 0, tmp_path / "device.onnx")
    assert family.dtype == torch.bfloat16 and family.family_hash() == before


# ---- Llama members: both cache layouts and int8, through the device runtime ------------------------

LLAMA_CONFIG = dict(architecture="llama", head_dim=16, num_heads=6, num_kv_heads=2, rope_theta=100000.0,
                    rms_norm_eps=1e-5)  # heads * head_dim (96) != hidden (48); SmolLM2's theta and eps


@pytest.fixture(scope="module")
def llama_family():
    from builders import sharpen_heads

    return sharpen_heads(Family.random(tiny_config(**LLAMA_CONFIG), seed=5))


@pytest.fixture(scope="module")
def llama_member(llama_family, tmp_path_factory):
    """`(exit, kv_cache) -> path` of the exported member, each exported once per module."""
    exported = {}

    def path(exit, kv_cache):
        if (exit, kv_cache) not in exported:
            target = tmp_path_factory.mktemp("llama") / "device.onnx"
            exported[exit, kv_cache] = export_member(llama_family, exit, target, kv_cache=kv_cache)
        return exported[exit, kv_cache]
    return path


@pytest.mark.parametrize("exit, kv_cache", [(0, "shared"), (0, "concat"), (2, "shared")],
                         ids=["early-exit-shared", "early-exit-concat", "last-exit-shared"])
def test_llama_member_matches_the_reference(llama_family, llama_member, exit, kv_cache):
    from device.member import MemberSession

    member = MemberSession(llama_member(exit, kv_cache), family_hash=llama_family.family_hash(), exit=exit)
    assert member.info.kv_cache == kv_cache
    check_member_matches_family(member, llama_family, exit, [17, 3, 60, 9, 41, 8], decode_steps=5,
                                keep=7, chunk=[1, 2])


def test_llama_int8_member_follows_the_reference_loosely(llama_family, llama_member, tmp_path):
    from device.member import MemberSession
    from flow.onnx_export import quantize_member

    int8 = MemberSession(quantize_member(llama_member(0, "shared"), tmp_path / "device.int8.onnx"))
    assert int8.info.weights == "int8"
    tokens = np.random.default_rng(0).integers(0, llama_family.config.vocab_size, 40).tolist()
    logits = int8.run(tokens, 0).logits
    reference = llama_family.logits(tokens, exit=0)[0].numpy()
    spread = reference.max() - reference.min()
    assert np.abs(logits - reference).max() < 0.03 * spread  # per-channel int8: close, not exact
    assert np.mean(logits.argmax(-1) == reference.argmax(-1)) >= 0.9


def test_a_head_equal_to_the_embedding_is_exported_once(tmp_path):
    """Catches: a tied member (its head kept equal to the embedding, as exit tuning with frozen
    heads leaves SmolLM2's) shipped with two copies of the vocabulary matrix, or a shared tensor
    that changes the logits or the caller's family."""
    import onnx
    import torch

    from device.member import MemberSession

    family = Family.random(tiny_config(vocab_size=2000, head_dim=16), seed=2)
    with torch.no_grad():
        family.model.exits[0].head.weight.copy_(family.model.embed.weight)
    before = family.family_hash()
    tied = export_member(family, 0, tmp_path / "tied.onnx")
    untied = export_member(family, 1, tmp_path / "untied.onnx")  # exit 1's head is its own

    def vocab_matrices(path):
        shape = [family.config.vocab_size, family.config.hidden_size]
        return sum(sorted(init.dims) == sorted(shape) for init in onnx.load(path).graph.initializer)

    assert vocab_matrices(tied) == 1 and vocab_matrices(untied) == 2
    assert family.family_hash() == before and family.model.exits[0].head.weight is not family.model.embed.weight
    tokens = [5, 17, 1999, 3]
    logits = MemberSession(tied, family_hash=before, exit=0).run(tokens, 0).logits
    np.testing.assert_allclose(logits, family.logits(tokens, exit=0)[0].numpy(), atol=1e-4)
