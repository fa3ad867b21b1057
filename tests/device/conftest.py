"""A small family with a real tokenizer and exported members, shared by the device tests."""

from pathlib import Path

import pytest
import torch

from builders import tiny_config
from flow import Family
from flow.data.corpus import stdlib_sources
from flow.data.tokenizer import save_tokenizer, train_tokenizer
from flow.onnx_export import export_member, quantize_member
from flow.reference_tier import ReferenceTier


def sharpen_heads(family: Family, scale: float = 25.0) -> Family:
    # normal(0, 0.02) heads give near-uniform logits, where float noise decides many argmaxes;
    # scaled heads give a random model clear preferences, as a trained one has.
    with torch.no_grad():
        for branch in family.model.exits:
            branch.head.weight.mul_(scale)
    return family


@pytest.fixture(scope="session")
def device_family(tmp_path_factory) -> tuple[Path, Family]:
    """A 5-layer family (exits after layers 1, 2, 4), tokenizer of 320 tokens, members 0 and 1."""
    root = tmp_path_factory.mktemp("device-family")
    sources = [s for s in stdlib_sources() if s.name in {"stdlib/json/decoder.py", "stdlib/textwrap.py", "stdlib/heapq.py"}]
    documents = [s.path.read_text() for s in sources]
    tokenizer = train_tokenizer(documents, vocab_size=320)
    save_tokenizer(tokenizer, root / "tokenizer.json")
    config = tiny_config(head_dim=16, vocab_size=tokenizer.get_vocab_size(), max_seq_len=96)
    family = sharpen_heads(Family.random(config, seed=11, tokenizer=root / "tokenizer.json"))
    family.save(root / "fam")
    for exit in (0, 1):
        export_member(family, exit, root / "fam" / "members" / str(exit) / "device.onnx")
    quantize_member(root / "fam" / "members" / "0" / "device.onnx",
                    root / "fam" / "members" / "0" / "device.int8.onnx")
    return root / "fam", family


@pytest.fixture
def tier(device_family) -> ReferenceTier:
    return ReferenceTier(device_family[1])
