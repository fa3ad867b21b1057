"""The device member format: the names and metadata every exported member carries.

The literal names here are written out on purpose, once: they are what members already on
devices were exported with, so a change to them must fail a test (and raise FORMAT_VERSION).
"""

from pathlib import Path

import pytest

from flow.errors import ArtifactError
from flow.member_format import FORMAT, FORMAT_VERSION, MemberInfo, cache_names, input_names, output_names

INFO = MemberInfo(weights="float32", family_hash="ab" * 32, exit=1, exit_layer=2, num_cache_layers=4,
                  hidden_size=48, num_kv_heads=2, head_dim=16, vocab_size=320, max_seq_len=96,
                  kv_cache="shared")


def test_graph_names_are_those_of_exported_members():
    assert input_names(2) == ["input_ids", "position_ids", "attention_mask",
                              "past_key_values.0.key", "past_key_values.0.value",
                              "past_key_values.1.key", "past_key_values.1.value"]
    assert output_names(2) == ["logits", "handoff_hidden", "present.0.key", "present.0.value",
                               "present.1.key", "present.1.value"]
    assert cache_names(1) == [("past_key_values.0.key", "present.0.key"),
                              ("past_key_values.0.value", "present.0.value")]


def test_metadata_keys_are_those_of_exported_members_and_read_back():
    meta = INFO.to_metadata()
    assert meta == {"format": "familial-flow/device-member", "format_version": "3", "weights": "float32",
                    "family_hash": "ab" * 32, "exit": "1", "exit_layer": "2", "num_cache_layers": "4",
                    "hidden_size": "48", "num_kv_heads": "2", "head_dim": "16", "vocab_size": "320",
                    "max_seq_len": "96", "kv_cache": "shared"}
    assert (FORMAT, FORMAT_VERSION) == (meta["format"], meta["format_version"])
    # ONNX Runtime's quantizer adds keys of its own; they are ignored
    assert MemberInfo.from_metadata({**meta, "onnx.infer": "onnxruntime.quant"}, Path("m")) == INFO


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("format"), "not a familial-flow device member"),
    (lambda m: m.update(format_version="1"), "device-member format '1'"),
    (lambda m: m.pop("head_dim"), "malformed member metadata"),
    (lambda m: m.update(exit="one"), "malformed member metadata"),
    (lambda m: m.update(kv_cache="paged"), "unknown KV cache layout 'paged'"),
])
def test_metadata_that_is_not_a_readable_member_is_refused(edit, message):
    meta = INFO.to_metadata()
    edit(meta)
    with pytest.raises(ArtifactError, match=message):
        MemberInfo.from_metadata(meta, Path("members/1/device.onnx"))
