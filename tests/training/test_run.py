"""`flow train` as a user runs it: resume, refusals before any process starts, schedules."""

import time

import numpy as np
import pytest

from flow import Family
from runs import flow, metrics, write_config
from training.config import TrainConfig
from training.schedules import exit_loss_weights, learning_rate


def test_stopping_and_resuming_gives_the_losses_of_an_uninterrupted_run(corpus, tmp_path):
    sections = dict(train={"steps": 6}, checkpoint={"interval": 2}, eval={"interval": 3})
    straight = tmp_path / "straight"
    flow("train", "--config", write_config(straight, corpus, **sections))
    resumed = tmp_path / "resumed"
    config = write_config(resumed, corpus, **sections)
    out = flow("train", "--config", config, "--stop-after", "3")
    assert "stopped after step 3" in out.stdout and not (resumed / "family").exists()
    flow("train", "--config", config)
    a, b = metrics(straight), metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(y["loss"], x["loss"], rtol=1e-6)
    assert Family.load(resumed / "family").family_hash() == Family.load(straight / "family").family_hash()


def test_frozen_backbone_trains_only_the_early_exits(corpus, tmp_path):
    flow("train", "--config", write_config(tmp_path, corpus, train={"steps": 2, "freeze_backbone": True},
                                           checkpoint={"interval": 2}, eval={"interval": 2}))
    trained = Family.load(tmp_path / "family")
    start = Family.random(trained.config, seed=0)
    before, after = start.model.state_dict(), trained.model.state_dict()
    changed = {name for name in before if not np.array_equal(before[name].numpy(), after[name].numpy())}
    last = trained.config.last_exit
    assert changed and all(n.startswith("exits.") and not n.startswith(f"exits.{last}.") for n in changed)


@pytest.mark.parametrize("sections, message", [
    (dict(model={"exits": [0, 9]}), "outside the backbone's layers 0..3"),
    (dict(parallel={"tensor": 3}), "parallel.tensor=3 must divide the attention heads"),
    (dict(parallel={"pipeline": 3}), "parallel.pipeline=3 must divide the 4 layers"),
    (dict(train={"global_batch_size": 7}), "must be a multiple of micro_batch_size x parallel.data"),
    (dict(data={"corpus": "/nonexistent"}), "has no token streams"),
    (dict(train={"seq_len": 100}), "must lie in 1..64"),
    (dict(exit_loss={"weights": [1, 1]}), "has 2 entries, the family has 4 exits"),
    (dict(train={"learning_rate": 1}), "unknown keys ['learning_rate'] in section 'train'"),
    (dict(exit_loss={"distill_alpha": 1.5}), "exit_loss.distill_alpha (1.5) must lie in 0..1"),
    (dict(exit_loss={"distill_alpha": 0.5, "distill_temperature": 0}), "distill_temperature (0) must be > 0"),
    (dict(exit_loss={"distill_alpha": 0.5}, parallel={"pipeline": 2}),
     "needs every early exit on the last pipeline stage (layers 2..3), where the teacher is; exits after layers [0, 1]"),
    (dict(model={"exits": []}, train={"freeze_backbone": True}), "freeze_backbone leaves nothing to train"),
    (dict(data={"tokens": "/nonexistent"}), "data.tokens /nonexistent has no token streams"),
    (dict(train={"lr": float("nan")}), "train.lr must be a finite number, got nan"),
    (dict(train={"lr": -1.0}), "train.lr > 0"),
    (dict(exit_loss={"weights": [1, float("nan"), 1, 1]}), "exit_loss.weights must be finite numbers >= 0"),
    (dict(train={"micro_batch_size": 0}), "train.micro_batch_size must be >= 1, got 0"),
    (dict(train={"steps": 2.5}), "train.steps must be an integer, got 2.5"),
    (dict(init={"source": "magic"}), "init.source 'magic' is not one of random, hf, family"),
])
def test_bad_configs_are_refused_before_any_process_starts(corpus, tmp_path, sections, message):
    started = time.perf_counter()
    result = flow("train", "--config", write_config(tmp_path, corpus, **sections), check=False)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "ckpt").exists()
    assert time.perf_counter() - started < 30  # no torchrun, no megatron import


def test_learning_rate_warms_up_then_decays_to_min_lr():
    """Catches: a linear decay (or any other curve) where the schedule is a cosine. The midpoint
    (0.55 for both) cannot tell them apart; a quarter and three quarters into the decay can:
    the cosine is at 0.8626 and 0.2374 where a linear decay is at 0.77 and 0.33."""
    train = TrainConfig.from_dict({"train": {"steps": 100, "lr": 1.0, "min_lr": 0.1, "warmup_steps": 10}}).train
    assert learning_rate(train, 0) == pytest.approx(0.1)
    assert learning_rate(train, 9) == pytest.approx(1.0)
    assert learning_rate(train, 33) == pytest.approx(0.8626, abs=1e-4)  # 23/90 into the decay
    assert learning_rate(train, 55) == pytest.approx(0.55)
    assert learning_rate(train, 77) == pytest.approx(0.2374, abs=1e-4)  # 67/90 into the decay
    assert learning_rate(train, 100) == pytest.approx(0.1)


@pytest.mark.parametrize("schedule, step, expected", [
    ("constant", 50, [2.0, 1.0, 1.0]),
    ("warmup", 0, [0.0, 0.0, 1.0]),
    ("warmup", 5, [1.0, 0.5, 1.0]),
    ("warmup", 50, [2.0, 1.0, 1.0]),
    ("decay", 0, [2.0, 1.0, 1.0]),
    ("decay", 10, [1.0, 0.5, 1.0]),
])
def test_exit_loss_schedules(schedule, step, expected):
    config = TrainConfig.from_dict({"train": {"steps": 11}, "exit_loss": {
        "schedule": schedule, "weights": [2.0, 1.0, 1.0], "warmup_steps": 10, "decay_to": 0.5}})
    assert exit_loss_weights(config, 3, step) == pytest.approx(expected)


def test_training_starts_from_a_hugging_face_checkpoint(corpus, tmp_path):
    """Step 1's loss (measured before the first update) is the checkpoint's own loss by transformers."""
    import shutil

    import torch
    from transformers import Qwen3ForCausalLM

    from builders import random_qwen3_checkpoint
    from flow.data.tokens import open_tokens
    from training.data import WindowSampler

    src = random_qwen3_checkpoint(tmp_path / "qwen3", vocab_size=512, num_hidden_layers=4,
                                  max_position_embeddings=64)
    shutil.copy(corpus / "tokenizer.json", src / "tokenizer.json")
    flow("train", "--config", write_config(tmp_path / "run", corpus, model={"exits": [1]},
                                           init={"source": "hf", "path": str(src)},
                                           train={"steps": 1}, checkpoint={"interval": 1}))
    first = metrics(tmp_path / "run")[0]["loss"]
    windows = torch.from_numpy(WindowSampler(open_tokens(corpus, "train"), 32, seed=0).windows(0, 8))
    hf = Qwen3ForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(windows[:, :-1]).logits
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), windows[:, 1:].reshape(-1)).item()
    assert first[-1] == pytest.approx(expected, rel=1e-4)
    assert Family.load(tmp_path / "run" / "family").config.exits == (1, 3)


def test_a_checkpoint_flow_train_did_not_write_is_refused_unless_trusted(corpus, tmp_path):
    """Catches: `flow convert` (which unpickles the checkpoint's metadata) loading a checkpoint
    whose files were swapped, edited or never recorded, without the user saying they trust it."""
    flow("train", "--config", write_config(tmp_path, corpus, train={"steps": 2},
                                           checkpoint={"interval": 2}, eval={"interval": 2}))
    (iteration,) = (tmp_path / "ckpt").glob("iter_*")
    record = iteration / "flow_checkpoint.json"
    assert record.is_file()
    flow("convert", tmp_path / "ckpt", tmp_path / "converted")  # as written: converts
    expected = Family.load(tmp_path / "family").family_hash()
    assert Family.load(tmp_path / "converted").family_hash() == expected
    metadata = iteration / ".metadata"
    metadata.write_bytes(metadata.read_bytes() + b"\0")
    refused = flow("convert", tmp_path / "ckpt", tmp_path / "edited", check=False)
    assert refused.returncode == 1 and ".metadata are not the files flow train wrote" in refused.stderr
    assert not (tmp_path / "edited").exists()
    metadata.write_bytes(metadata.read_bytes()[:-1])
    record.unlink()
    refused = flow("convert", tmp_path / "ckpt", tmp_path / "unrecorded", check=False)
    assert refused.returncode == 1 and "has no flow_checkpoint.json" in refused.stderr
    flow("convert", tmp_path / "ckpt", tmp_path / "trusted", "--trust-checkpoint")
    assert Family.load(tmp_path / "trusted").family_hash() == expected
