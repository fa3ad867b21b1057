"""The shared-buffer ONNX member under ONNX Runtime against the reference model."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from device.member import MemberSession
from flow import Family, HashMismatchError
from flow.artifact import ArtifactError, member_path
from flow.member_format import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, MemberInfo, cache_names
from flow.onnx_export import export_member
from parity import check_member_matches_family


@pytest.mark.parametrize("exit", [0, 1])
def test_prefill_decode_and_rollback_match_the_reference(device_family, exit):
    path, family = device_family
    member = MemberSession(member_path(path, exit), family_hash=family.family_hash(), exit=exit)
    assert member.info.kv_cache == "shared"
    # 8 decode steps, then roll back 5 positions and feed a different 3-token chunk at once
    check_member_matches_family(member, family, exit, [17, 3, 250, 9, 41, 8], decode_steps=8,
                                keep=9, chunk=[1, 2, 3])


def test_batch_of_right_padded_rows_decodes_with_one_shared_buffer(device_family):
    path, family = device_family
    session = ort.InferenceSession(member_path(path, 0), providers=["CPUExecutionProvider"])
    info = MemberInfo.from_metadata(session.get_modelmeta().custom_metadata_map, member_path(path, 0))
    layers, cfg = info.num_cache_layers, family.config
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42]]
    width = max(map(len, prompts))
    ids = np.array([p + [0] * (width - len(p)) for p in prompts], np.int64)
    lengths = np.array([len(p) for p in prompts])
    cache = {past: np.zeros((2, cfg.num_kv_heads, 32, cfg.head_dim), np.float32)
             for past, _ in cache_names(layers)}
    feeds = {INPUT_IDS: ids, POSITION_IDS: np.tile(np.arange(width), (2, 1)),
             ATTENTION_MASK: (np.arange(width)[None] < lengths[:, None]).astype(np.int64)}
    sequences = [list(p) for p in prompts]
    for step in range(9):  # the prefill, then 8 decode steps with rows of different lengths
        names = [o.name for o in session.get_outputs()]
        outputs = dict(zip(names, session.run(None, {**feeds, **cache}), strict=True))
        last = lengths - 1 if step == 0 else np.zeros(2, int)
        for row, tokens in enumerate(sequences):
            reference = family.logits(tokens, exit=0)[0, -1].numpy()
            np.testing.assert_allclose(outputs[LOGITS][row, last[row]], reference, atol=1e-4)
        next_tokens = outputs[LOGITS][np.arange(2), last].argmax(-1)
        for row, token in enumerate(next_tokens):
            sequences[row].append(int(token))
        cache = {past: outputs[present] for past, present in cache_names(layers)}
        feeds = {INPUT_IDS: next_tokens[:, None].astype(np.int64),
                 POSITION_IDS: lengths[:, None].astype(np.int64),
                 ATTENTION_MASK: (np.arange(lengths.max() + 1)[None] <= lengths[:, None]).astype(np.int64)}
        lengths = lengths + 1


def test_decode_writes_the_shared_buffer_in_place(device_family):
    """Catches: ONNX Runtime allocating a new `present` per call (a copy of the whole cache)
    instead of writing into the buffer bound as the past. The outputs ORT hands back after each
    call are fresh OrtValues; each must sit at the address of the host array allocated once at
    start, and that array must hold the new rows."""
    path, family = device_family
    member = MemberSession(member_path(path, 0), max_seq_len=32)
    host = [array.ctypes.data for array in member._host]  # the memory allocated at start
    for tokens, start in (([1, 2, 3], 0), ([4], 3), ([5], 4)):
        member.run(tokens, start)
        presents = member._binding.get_outputs()[:member.num_cache_tensors]  # new objects
        assert [value.data_ptr() for value in presents] == host
    key = member._host[0]
    assert np.abs(key[0, :, :5]).min() > 0 and not key[0, :, 5:].any()  # rows 0..4 written, no more


def test_member_from_another_family_is_refused(device_family, tmp_path):
    path, family = device_family
    other = Family.random(family.config, seed=99)
    export_member(other, 0, tmp_path / "device.onnx")
    with pytest.raises(HashMismatchError, match="re-export"):
        MemberSession(tmp_path / "device.onnx", family_hash=family.family_hash())
    with pytest.raises(ArtifactError, match="member 0, not member 1"):
        MemberSession(tmp_path / "device.onnx", exit=1)


def test_context_and_gaps_are_refused(device_family):
    from device.member import ContextFullError

    member = MemberSession(member_path(device_family[0], 0), max_seq_len=8)
    with pytest.raises(ContextFullError, match="context of 8"):
        member.run(list(range(9)), 0)
    member.run([1, 2], 0)
    with pytest.raises(ValueError, match="gap"):
        member.run([3], 4)


def test_graph_uses_group_query_attention_and_no_concat_of_the_cache(device_family):
    path = member_path(device_family[0], 0)
    graph = onnx.load(path).graph
    assert "GroupQueryAttention" in {n.op_type for n in graph.node}
    cache_inputs = {past for past, _ in cache_names(MemberSession(path).info.num_cache_layers)}
    assert cache_inputs <= {i.name for i in graph.input}
    assert not [n for n in graph.node if n.op_type == "Concat" and set(n.input) & cache_inputs]
