"""megatron-core training under tensor x pipeline x data parallelism, against a single process."""

import numpy as np
import pytest
import torch

from flow import Family
from flow.data.tokens import open_tokens
from runs import assert_same_training, flow, metrics, write_config
from training.data import WindowSampler

LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 2)]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("tp1pp1dp1")
    flow("train", "--config", write_config(run, corpus))
    return run


@pytest.mark.parametrize("tp, pp, dp", LAYOUTS, ids=lambda v: str(v))
def test_per_exit_losses_match_a_single_process(reference, corpus, tmp_path, tp, pp, dp):
    flow("train", "--config", write_config(tmp_path, corpus, parallel={"tensor": tp, "pipeline": pp, "data": dp}))
    assert_same_training(reference, tmp_path)


def test_converted_family_reproduces_megatron_validation_losses(reference, corpus):
    """The family converted from the checkpoint scores the validation windows as megatron did."""
    family = Family.load(reference / "family")
    assert family.provenance["source"] == "megatron-core" and family.provenance["steps"] == 5
    sampler = WindowSampler(open_tokens(corpus, "val"), seq_len=32, seed=0, shuffle=False)
    windows = torch.from_numpy(sampler.windows(0, 2 * 8))  # eval.batches x global_batch_size
    losses = []
    for k in range(family.config.num_exits):
        logits = family.logits(windows[:, :-1], exit=k)
        losses.append(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item())
    np.testing.assert_allclose(losses, metrics(reference)[-1]["val_loss"], rtol=1e-4)


def test_flow_convert_rebuilds_the_same_family_from_the_checkpoint(reference, tmp_path):
    out = flow("convert", reference / "ckpt", tmp_path / "again")
    assert "5 steps" in out.stdout
    assert Family.load(tmp_path / "again").family_hash() == Family.load(reference / "family").family_hash()
    refused = flow("convert", tmp_path, tmp_path / "x", check=False)
    assert refused.returncode == 1 and "holds no complete megatron checkpoint" in refused.stderr
