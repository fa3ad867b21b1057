"""Exit tuning of a frozen backbone and self-distillation, against plain torch on `flow.model`.

The oracle is the reference model (`Family`) differentiated by torch autograd with the loss
written out here from its definition: (1 − α)·CE + α·τ²·KL(p_full,τ ‖ p_exit,τ) for the early
exits, CE for the last. megatron's gradients come from real ranks (tests/training/probe.py).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flow import Family, FamilyConfig
from flow.data.corpus import iter_documents
from flow.data.tokenizer import save_tokenizer, train_tokenizer
from flow.data.tokens import open_tokens
from runs import flow, metrics, probe, write_config
from training.convert import Shard, family_to_megatron
from training.data import WindowSampler
from training.plan import RunPlan

DISTILL = {"distill_alpha": 0.5, "distill_temperature": 2.0}


def first_batch(tokens: Path, tokenizer: Path | None = None) -> torch.Tensor:
    """Step 0's global batch of the tiny runs (`runs.write_config`): 8 windows of 33 tokens."""
    return torch.from_numpy(WindowSampler(open_tokens(tokens, "train", tokenizer), 32, seed=0).windows(0, 8))


def reference_objectives(family: Family, windows: torch.Tensor, alpha: float,
                         temperature: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-exit (objective, CE) over the whole batch, with autograd, by plain torch."""
    logits = family.model(windows[:, :-1])  # one (B, T, vocab) per exit
    labels = windows[:, 1:].reshape(-1)
    teacher = F.log_softmax(logits[-1].detach() / temperature, dim=-1)
    objectives, ces = [], []
    for k, z in enumerate(logits):
        ce = F.cross_entropy(z.reshape(-1, z.shape[-1]), labels)
        objective = ce
        if k < len(logits) - 1 and alpha > 0:
            kl = F.kl_div(F.log_softmax(z / temperature, dim=-1), teacher, log_target=True,
                          reduction="none").sum(-1).mean()
            objective = (1 - alpha) * ce + alpha * temperature**2 * kl
        objectives.append(objective)
        ces.append(ce)
    return objectives, ces


def reference_gradients(run: Path, corpus: Path, alpha: float, temperature: float) -> tuple[FamilyConfig, dict]:
    """d(Σ_k objective_k)/d(every family tensor) at the run's first step, from its initial weights."""
    config = RunPlan.load(run / "ckpt").family
    family = Family.random(config, seed=0)  # the run's init: {source: random, seed: 0}
    objectives, _ = reference_objectives(family, first_batch(corpus), alpha, temperature)
    params = dict(family.model.named_parameters())
    grads = torch.autograd.grad(sum(objectives), list(params.values()))
    return config, dict(zip(params, grads, strict=True))


def assert_rank_gradients_match(out: Path, config: FamilyConfig, expected: dict, tp: int, pp: int) -> list[dict]:
    """Each (tensor, pipeline) rank's reduced gradients equal the reference's shard, to 1e-4."""
    facts = []
    for t in range(tp):
        for p in range(pp):
            local = family_to_megatron(expected, config, Shard(tp_rank=t, tp_size=tp, pp_rank=p, pp_size=pp))
            grads = torch.load(out / f"grads_tp{t}_pp{p}.pt")
            assert grads
            for name, grad in grads.items():
                scale = local[name].abs().max().item()
                assert scale > 0, name
                torch.testing.assert_close(grad, local[name], rtol=1e-4, atol=1e-4 * scale, msg=name)
            facts.append(json.loads((out / f"facts_tp{t}_pp{p}.json").read_text()))
    return facts


@pytest.mark.parametrize("parallel, exit_loss", [
    ({"pipeline": 2}, {}),  # exits 0 and 1 on stage 0, exit 2 on stage 1; plain CE
    ({"tensor": 2}, DISTILL),  # vocabulary-parallel distillation
], ids=["pp2-ce", "tp2-distill"])
def test_frozen_backbone_runs_without_autograd_and_branch_gradients_match_torch(
        corpus, tmp_path, parallel, exit_loss):
    flow("train", "--config", write_config(tmp_path, corpus, parallel=parallel, exit_loss=exit_loss,
                                           train={"freeze_backbone": True}), "--prepare-only")
    tp, pp = parallel.get("tensor", 1), parallel.get("pipeline", 1)
    out = probe(tmp_path, tmp_path / "probe", "step", tp * pp)
    config, expected = reference_gradients(tmp_path, corpus, exit_loss.get("distill_alpha", 0.0),
                                           exit_loss.get("distill_temperature", 1.0))
    for facts in assert_rank_gradients_match(out, config, expected, tp, pp):
        branches = [name for name in facts["all"] if name.startswith("exit_branches.")]
        # Only the exit branches have gradients or optimizer state; the last exit (the backbone's
        # own head) and every backbone tensor have neither.
        assert facts["with_grad"] == facts["optimized"] == branches
        # Autograd kept nothing while a backbone module ran: no activations held for backward.
        assert facts["saved_tensors"]["backbone"] == 0 and facts["saved_tensors"]["elsewhere"] > 0


def test_distillation_losses_and_gradients_match_torch(corpus, tmp_path):
    """Whole-model training at TP=2 with α = 0.5: megatron's per-exit objective for α in
    {0, 0.5, 1} and every gradient of the step (backbone included) equal torch's."""
    flow("train", "--config", write_config(tmp_path, corpus, parallel={"tensor": 2}, exit_loss=DISTILL),
         "--prepare-only")
    out = probe(tmp_path, tmp_path / "probe", "losses", 2, "0,0.5,1")
    config = RunPlan.load(tmp_path / "ckpt").family
    family = Family.random(config, seed=0)
    losses = json.loads((out / "losses.json").read_text())
    with torch.no_grad():
        for alpha in ("0", "0.5", "1"):
            objectives, ces = reference_objectives(family, first_batch(corpus), float(alpha), 2.0)
            np.testing.assert_allclose(losses[alpha]["loss"], [o.item() for o in objectives], rtol=1e-4)
            np.testing.assert_allclose(losses[alpha]["ce"], [c.item() for c in ces], rtol=1e-4)
    assert losses["1"]["loss"][0] != pytest.approx(losses["0"]["loss"][0], rel=1e-2)  # α matters

    out = probe(tmp_path, tmp_path / "step", "step", 2)
    config, expected = reference_gradients(tmp_path, corpus, 0.5, 2.0)
    for facts in assert_rank_gradients_match(out, config, expected, tp=2, pp=1):
        assert facts["with_grad"] == facts["optimized"] == facts["all"]


def test_tuning_a_pretrained_familys_exits_on_its_own_tokens(corpus, tmp_path):
    """A family with a tokenizer of its own: the corpus is encoded with it (`flow tokenize
    --tokenizer --out`), its exits are tuned with distillation on a frozen backbone, and the
    first step's losses are the family's own on those tokens."""
    tokenizer = save_tokenizer(train_tokenizer(iter_documents(corpus, "train"), vocab_size=384),
                               tmp_path / "tokenizer.json")
    config = FamilyConfig(vocab_size=384, hidden_size=64, intermediate_size=176, num_layers=4,
                          num_heads=4, num_kv_heads=2, head_dim=16, exits=(0, 1, 2, 3), max_seq_len=64,
                          architecture="llama")
    start = Family.random(config, seed=3, tokenizer=tokenizer)
    start.stop_tokens = (start.tokenizer.id_to_token(7), "<|endoftext|>")  # a checkpoint's own end token
    start.save(tmp_path / "pretrained")
    family_tokenizer = tmp_path / "pretrained" / "tokenizer.json"
    sections = dict(init={"source": "family", "path": str(tmp_path / "pretrained")},
                    train={"steps": 2, "freeze_backbone": True}, exit_loss=DISTILL,
                    checkpoint={"interval": 2}, eval={"interval": 2})

    refused = flow("train", "--config", write_config(tmp_path / "run", corpus, **sections), check=False)
    assert refused.returncode == 1 and "made with another tokenizer" in refused.stderr

    flow("tokenize", corpus, "--tokenizer", family_tokenizer, "--out", tmp_path / "tokens")
    flow("train", "--config", write_config(tmp_path / "run", corpus, data={"tokens": str(tmp_path / "tokens")},
                                           **sections))
    first = metrics(tmp_path / "run")[0]  # step 1's losses are measured before its update
    with torch.no_grad():
        objectives, ces = reference_objectives(start, first_batch(tmp_path / "tokens", family_tokenizer), 0.5, 2.0)
    np.testing.assert_allclose(first["loss"], [o.item() for o in objectives], rtol=1e-4)
    np.testing.assert_allclose(first["ce"], [c.item() for c in ces], rtol=1e-4)

    tuned = Family.load(tmp_path / "run" / "family")
    assert tuned.tokenizer_json == start.tokenizer_json and tuned.stop_tokens == start.stop_tokens
    before, after = start.model.state_dict(), tuned.model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith(("exits.0.", "exits.1.", "exits.2.")) for name in changed)
