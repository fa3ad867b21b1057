"""A Llama-architecture family (no per-head q/k norms) on megatron-core: the Qwen3 checks, again."""

import pytest

from flow import Family
from runs import assert_family_logits_match_megatron, assert_same_training, flow, write_config

LLAMA = {"architecture": "llama"}


@pytest.fixture(scope="module")
def llama_runs(corpus, tmp_path_factory):
    """Five steps of a tiny random Llama family at (TP, PP) = (1, 1) and (2, 2)."""
    runs = {}
    for tp, pp in ((1, 1), (2, 2)):
        run = tmp_path_factory.mktemp(f"llama-tp{tp}pp{pp}")
        flow("train", "--config", write_config(run, corpus, model=LLAMA, parallel={"tensor": tp, "pipeline": pp}))
        runs[tp, pp] = run
    return runs


def test_llama_per_exit_losses_match_across_layouts(llama_runs):
    assert_same_training(llama_runs[1, 1], llama_runs[2, 2])


def test_llama_tp2_pp2_checkpoint_converts_to_a_family_with_the_same_logits(llama_runs):
    run = llama_runs[2, 2]
    family = Family.load(run / "family")
    assert family.config.architecture == "llama"
    assert not [name for name in family.model.state_dict() if "q_norm" in name or "k_norm" in name]
    assert_family_logits_match_megatron(run, ranks=4)
