"""The run plan as train_config.json: the layout run directories hold, read back whole."""

import json

import pytest

from builders import tiny_config
from flow.data.tokenizer import EOS_TOKEN
from flow.errors import ArtifactError
from training.config import TrainConfig
from training.plan import RunPlan


def saved_run(tmp_path, **extra) -> dict:
    """train_config.json as `flow train` writes it (keys train, family, tokenizer, stop_tokens)."""
    train = TrainConfig.from_dict({"model": {"preset": "tiny", "exits": [1]},
                                   "exit_loss": {"distill_alpha": 0.5, "weights": [1, 2, 1]},
                                   "checkpoint": {"dir": str(tmp_path)}}).to_dict()
    run = {"train": train, "family": tiny_config().to_dict(), "tokenizer": "corpus/tokenizer.json", **extra}
    (tmp_path / "train_config.json").write_text(json.dumps(run, indent=2) + "\n")
    return run


def test_a_saved_plan_loads_typed_and_saves_back_the_same_file(tmp_path):
    run = saved_run(tmp_path, stop_tokens=["<|im_end|>", EOS_TOKEN])
    text = (tmp_path / "train_config.json").read_text()
    plan = RunPlan.load(tmp_path)
    assert plan.family == tiny_config() and str(plan.tokenizer) == "corpus/tokenizer.json"
    assert plan.config.exit_loss.distill_alpha == 0.5 and plan.stop_tokens == ("<|im_end|>", EOS_TOKEN)
    assert plan.run_dir == tmp_path and plan.to_dict() == run
    plan.save()
    assert (tmp_path / "train_config.json").read_text() == text


def test_a_plan_saved_without_stop_tokens_ends_with_the_corpus_separator(tmp_path):
    saved_run(tmp_path)
    assert RunPlan.load(tmp_path).stop_tokens == (EOS_TOKEN,)


def test_a_run_config_missing_a_section_is_refused_by_name(tmp_path):
    (tmp_path / "train_config.json").write_text(json.dumps({"train": {}, "tokenizer": "t.json"}))
    with pytest.raises(ArtifactError, match=r"lacks \['family'\]"):
        RunPlan.load(tmp_path)
