"""Shared fixtures: tiny families built on the spot (nothing is downloaded), and a reference
sequence with the full model's tokens."""

from pathlib import Path

import numpy as np
import pytest
import torch

from builders import Reference, agreeing_copy, sharpen_heads, tiny_config
from flow import Family
from greedy import NEAR_TIE


@pytest.fixture
def tiny_family() -> Family:
    return Family.random(tiny_config(), seed=0)


@pytest.fixture(scope="session")
def device_family(tmp_path_factory) -> tuple[Path, Family]:
    """A 5-layer family (exits after layers 1, 2, 4) with a real tokenizer of 320 tokens and
    exported members 0 and 1 (+ member 0 in int8): what the device and cloud tests run."""
    from flow.data.corpus import stdlib_sources
    from flow.data.tokenizer import save_tokenizer, train_tokenizer
    from flow.onnx_export import export_family_members

    root = tmp_path_factory.mktemp("device-family")
    names = {"stdlib/json/decoder.py", "stdlib/textwrap.py", "stdlib/heapq.py"}
    documents = [s.path.read_text() for s in stdlib_sources() if s.name in names]
    tokenizer = train_tokenizer(documents, vocab_size=320)
    save_tokenizer(tokenizer, root / "tokenizer.json")
    config = tiny_config(head_dim=16, vocab_size=tokenizer.get_vocab_size(), max_seq_len=96)
    family = sharpen_heads(Family.random(config, seed=11, tokenizer=root / "tokenizer.json"))
    family.save(root / "fam")
    export_family_members(root / "fam", exits=[0, 1], int8=True)
    return root / "fam", family


@pytest.fixture(scope="session")
def agreeing_family(device_family, tmp_path_factory) -> tuple[Path, Family]:
    """The device family made to agree often but not always (`builders.agreeing_copy`), with its
    tokenizer and exported members 0 and 1: what every speculative test drafts with, so that
    drafts are accepted as well as rejected."""
    from flow.onnx_export import export_family_members

    root = tmp_path_factory.mktemp("agreeing-family")
    family = agreeing_copy(device_family[1])
    family.save(root / "fam")
    export_family_members(root / "fam", exits=[0, 1])
    return root / "fam", family


# 16 positions, teacher-forced: the tokens need not be what the model would generate.
SEQUENCE = [17, 3, 250, 9, 100, 101, 102, 103, 42, 7, 42, 7, 5, 60, 61, 62]


@pytest.fixture(scope="session")
def reference(device_family) -> Reference:
    _, family = device_family
    with torch.no_grad():
        logits = family.logits(SEQUENCE, exit=family.config.last_exit)[0].float()  # (16, vocab)
        rows = family.handoff(SEQUENCE, exit=0)[0].float().numpy()  # (16, hidden)
    top2 = logits.topk(2, dim=-1).values
    # no near tie anywhere: exactly these tokens are the full model's, whatever the batching
    assert bool((top2[:, 0] - top2[:, 1] > NEAR_TIE).all())
    return Reference(np.ascontiguousarray(rows), logits.argmax(-1).tolist())
