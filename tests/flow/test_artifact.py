"""The family directory: bit-exact round trips and refusals that name the problem."""

import json

import pytest
import torch

from builders import tiny_config
from flow import ArtifactError, Family, HashMismatchError
from flow.artifact import FAMILY_JSON, WEIGHTS_FILE, read_manifest
from flow.family import _read_tokenizer


def test_save_load_round_trip_is_bit_exact(tmp_path, tiny_family):
    manifest = tiny_family.save(tmp_path / "fam")
    loaded = Family.load(tmp_path / "fam")
    assert loaded.config == tiny_family.config
    for (name, a), (name_b, b) in zip(tiny_family.model.state_dict().items(),
                                      loaded.model.state_dict().items(), strict=True):
        assert name == name_b and a.dtype == b.dtype and torch.equal(a, b)
    assert manifest.family_hash == loaded.family_hash() == tiny_family.family_hash()
    assert loaded.provenance == {"source": "random", "seed": 0}


def test_bfloat16_round_trip_keeps_dtype_and_hash(tmp_path):
    family = Family.random(tiny_config(), seed=1, dtype=torch.bfloat16)
    manifest = family.save(tmp_path / "fam")
    assert manifest.weights_dtype == "bfloat16"
    loaded = Family.load(tmp_path / "fam")
    assert loaded.dtype == torch.bfloat16 and loaded.family_hash() == manifest.family_hash


def test_hash_sees_every_tensor(tiny_family):
    before = tiny_family.family_hash()
    with torch.no_grad():
        tiny_family.model.exits[1].norm.weight[3] += 1e-3
    assert tiny_family.family_hash() != before


@pytest.mark.parametrize("field, value", [("rope_theta", 5e4), ("rms_norm_eps", 1e-3),
                                          ("max_seq_len", 100)])
def test_the_family_hash_covers_the_architecture(tmp_path, tiny_family, field, value):
    """Catches: a family.json whose architecture was edited (same weights, another model) that
    still carries the family's identity, so that a tier would silently compute another model."""
    manifest = tiny_family.save(tmp_path / "fam")
    data = json.loads((tmp_path / "fam" / FAMILY_JSON).read_text())
    data["architecture"][field] = value
    (tmp_path / "fam" / FAMILY_JSON).write_text(json.dumps(data))
    edited = Family.load(tmp_path / "fam")  # the weights still verify
    assert read_manifest(tmp_path / "fam").weights_sha256 == manifest.weights_sha256
    assert edited.family_hash() == read_manifest(tmp_path / "fam").family_hash != manifest.family_hash


@pytest.mark.parametrize("field, value, message", [
    ("rope_theta", float("nan"), "rope_theta must be a finite positive number"),
    ("rms_norm_eps", float("inf"), "rms_norm_eps must be a finite positive number"),
    ("num_layers", 100_000_000, "num_layers = 100000000 is beyond"),
    ("vocab_size", 1 << 40, "vocab_size = 1099511627776 is beyond")])
def test_non_finite_and_absurd_architectures_are_refused_in_one_line(tmp_path, tiny_family, field,
                                                                     value, message):
    tiny_family.save(tmp_path / "fam")
    data = json.loads((tmp_path / "fam" / FAMILY_JSON).read_text())
    data["architecture"][field] = value
    (tmp_path / "fam" / FAMILY_JSON).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=message):
        read_manifest(tmp_path / "fam")


@pytest.fixture
def digests(monkeypatch):
    """How many times the weights have been hashed (from memory or from a file) so far."""
    import flow.artifact

    count = [0]
    digest = flow.artifact.digest_tensors

    def counted(entries):
        count[0] += 1
        return digest(entries)

    monkeypatch.setattr(flow.artifact, "digest_tensors", counted)
    return lambda: count[0]


def fresh_hash(family) -> str:
    """The hash of `family`'s weights computed from scratch (a new Family has no record)."""
    return Family(family.model).family_hash()


def test_loaded_family_keeps_its_verified_hash_until_the_weights_change(tmp_path, tiny_family, digests):
    import copy

    manifest = tiny_family.save(tmp_path / "fam")
    assert tiny_family.family_hash() == manifest.family_hash and digests() == 1  # the file, once
    loaded = Family.load(tmp_path / "fam")
    assert digests() == 2  # read_manifest verifying the file
    assert loaded.family_hash() == loaded.family_hash() == manifest.family_hash and digests() == 2
    assert fresh_hash(loaded) == manifest.family_hash and digests() == 3

    copied = copy.deepcopy(loaded)  # tensors of its own: hashed afresh, to the same value
    assert copied.family_hash() == manifest.family_hash and digests() == 4
    with torch.no_grad():
        loaded.model.blocks[0].mlp.up_proj.weight[0, 0] += 1e-3  # in place
    changed = loaded.family_hash()
    assert changed != manifest.family_hash and changed == fresh_hash(loaded)
    assert copied.family_hash() == manifest.family_hash  # the copy's weights did not change
    loaded.model.exits[0].norm.weight = torch.nn.Parameter(loaded.model.exits[0].norm.weight * 2)
    assert loaded.family_hash() not in (changed, manifest.family_hash)
    assert loaded.family_hash() == fresh_hash(loaded)
    loaded.model.to(torch.bfloat16)
    assert loaded.family_hash() == fresh_hash(loaded) != fresh_hash(Family.load(tmp_path / "fam"))


def test_a_family_loaded_in_another_dtype_has_the_hash_of_its_converted_weights(tmp_path, tiny_family):
    tiny_family.save(tmp_path / "fam")
    converted = Family.load(tmp_path / "fam", dtype=torch.bfloat16)
    assert converted.family_hash() == fresh_hash(converted) != tiny_family.family_hash()
    assert Family.load(tmp_path / "fam", dtype=torch.float32).family_hash() == tiny_family.family_hash()


def test_tampered_weights_are_refused(tmp_path, tiny_family):
    tiny_family.save(tmp_path / "fam")
    weights = tmp_path / "fam" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # one flipped bit in the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(HashMismatchError, match="weights were changed or the copy is incomplete"):
        Family.load(tmp_path / "fam")


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["architecture"].update(num_layers=6, exits=[1, 2, 5]), "does not fit its architecture"),
    (lambda m: m["architecture"].update(exits=[1, 3]), "end with the backbone's last layer"),
    (lambda m: m["architecture"].update(num_kv_heads=3), "multiple of num_kv_heads"),
    (lambda m: m["architecture"].update(hidden_size=40), "has shape"),
    (lambda m: m["architecture"].update(colour="blue"), "unknown architecture fields"),
    (lambda m: m["weights"].update(sha256="0" * 64), "does not match its manifest"),
    (lambda m: m.update(format_version=99), "format_version 99"),
    (lambda m: m.pop("weights"), "missing or bad field"),
])
def test_tampered_or_inconsistent_manifest_is_refused(tmp_path, tiny_family, edit, message):
    tiny_family.save(tmp_path / "fam")
    path = tmp_path / "fam" / FAMILY_JSON
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=message):
        Family.load(tmp_path / "fam")


def test_a_directory_that_is_not_a_family_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ArtifactError, match="is not a family: it has no family.json"):
        Family.load(tmp_path / "x")
    with pytest.raises(ArtifactError, match="is not a directory"):
        read_manifest(tmp_path / "missing")
    (tmp_path / "x" / FAMILY_JSON).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(tmp_path / "x")


def test_save_never_clobbers_without_overwrite_and_replaces_atomically(tmp_path, tiny_family):
    tiny_family.save(tmp_path / "fam")
    with pytest.raises(ArtifactError, match="already exists"):
        tiny_family.save(tmp_path / "fam")
    other = Family.random(tiny_config(), seed=9)
    other.save(tmp_path / "fam", overwrite=True)
    assert Family.load(tmp_path / "fam").family_hash() == other.family_hash()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fam"]  # no staging left behind


def test_failed_save_leaves_nothing_half_written(tmp_path, tiny_family, monkeypatch):
    import flow.family

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(flow.family.artifact, "write_manifest", broken)
    with pytest.raises(OSError, match="disk full"):
        tiny_family.save(tmp_path / "fam")
    assert list(tmp_path.iterdir()) == []


def test_a_family_built_from_another_family_s_tokenizer_keeps_its_name(tmp_path, tiny_family):
    """Catches: training from an imported family (its tokenizer.json) renaming the tokenizer
    `bpe<size>-<hash>`, so that `flow info` no longer says which tokenizer it is."""
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(str(tmp_path / "tok.json"))
    text, _ = _read_tokenizer(tmp_path / "tok.json")
    Family(tiny_family.model, tokenizer_json=text, tokenizer_name="gguf-Some-Model-Q8_0").save(
        tmp_path / "imported")
    trained = Family.random(tiny_family.config, tokenizer=tmp_path / "imported" / "tokenizer.json")
    assert trained.tokenizer_name == "gguf-Some-Model-Q8_0"
    # the same file elsewhere, or another file beside a family, is named by its content
    assert _read_tokenizer(tmp_path / "tok.json")[1].startswith("bpe")
    (tmp_path / "imported" / "tokenizer.json").write_text(text.replace('"a"', '"z"'))
    assert _read_tokenizer(tmp_path / "imported" / "tokenizer.json")[1].startswith("bpe")


def test_tokenizer_travels_with_the_family_and_is_verified(tmp_path, tiny_family):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tok.json"))
    text, name = _read_tokenizer(tmp_path / "tok.json")
    family = Family(tiny_family.model, tokenizer_json=text, tokenizer_name=name, stop_tokens=("b",))
    family.save(tmp_path / "fam")
    loaded = Family.load(tmp_path / "fam")
    assert loaded.tokenizer.encode("a b a").ids == [1, 2, 1]
    assert loaded.tokenizer_name == name
    assert loaded.stop_tokens == ("b",) and loaded.stop_token_ids() == [2]
    # a manifest written before stop tokens were recorded ends generations at <|endoftext|>
    manifest = json.loads((tmp_path / "fam" / FAMILY_JSON).read_text())
    del manifest["tokenizer"]["stop_tokens"]
    (tmp_path / "fam" / FAMILY_JSON).write_text(json.dumps(manifest))
    assert read_manifest(tmp_path / "fam").tokenizer.stop_tokens == ("<|endoftext|>",)
    (tmp_path / "fam" / "tokenizer.json").write_text(text.replace('"a"', '"z"'))
    with pytest.raises(HashMismatchError, match="tokenizer.json does not match"):
        Family.load(tmp_path / "fam")


def test_saved_family_is_readable_by_other_users_as_the_umask_allows(tmp_path, tiny_family):
    import os
    import stat

    old = os.umask(0o022)
    try:
        tiny_family.save(tmp_path / "fam")
    finally:
        os.umask(old)
    for path in [tmp_path / "fam", *(tmp_path / "fam").rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
