"""What exit tuning costs: a frozen-backbone training step against a forward-only backbone pass.

Exit tuning (`train.freeze_backbone: true`) runs the backbone without autograd and
differentiates only the exit branches. Its floor is one forward pass of the backbone (the
branches need `h_e`, distillation needs the last exit's logits). This script times, in one
training process (TP = PP = DP = 1) and on the same batches:

- `backbone_forward`: megatron-core's GPTModel of the same backbone without exits, forward only
  with the last exit's cross-entropy (no autograd);
- exit-tuning steps, the whole `Trainer.train_step` (forward, branch backward, AdamW):
  `ce` (plain CE) and `distill` (α = 0.5, τ = 2), with the exit heads trained or frozen
  (`freeze_exit_heads`; each head setting is its own training process);
- `full`: a step that trains every parameter, for scale.

Each process takes the measurements in turns, one of each per round; a figure is the median over
`--rounds` rounds after `--warmup`, a ratio the median of the per-round ratios, so the load other
processes put on the machine cancels out of the ratios as far as it can. The default model is SmolLM2-135M's shape (Llama, 30 layers, hidden 576, vocabulary
49152) with random weights, exits after layers 9 and 19 — step time does not depend on the
weights' values; `--family DIR --tokens DIR` times an imported family on its own tokens instead.

    python bench/exit_tuning.py --corpus runs/demo/corpus

Writes bench/results/exit_tuning.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import REPO, write_json

SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                     num_heads=9, num_kv_heads=3, head_dim=64, max_seq_len=2048, rope_theta=100000.0,
                     rms_norm_eps=1e-5, architecture="llama")
# (name, train section overrides); each is one training process.
PROCESSES = [
    ("heads-trained", {"freeze_backbone": True}),
    ("heads-frozen", {"freeze_backbone": True, "freeze_exit_heads": True}),
    ("full", {}),
]


def run_config(args: argparse.Namespace, work: Path, train: dict) -> Path:
    config = {
        "model": {"preset": "small", **SMOLLM2_SHAPE, "exits": args.exits},
        "data": {"corpus": str(args.corpus)},
        "train": {"steps": 10**6, "seq_len": args.seq_len, "micro_batch_size": args.micro_batch,
                  "global_batch_size": args.global_batch, "lr": 1e-4, "warmup_steps": 0, **train},
        "eval": {"interval": 10**6, "batches": 1},
        "checkpoint": {"dir": str(work / "checkpoints"), "interval": 10**6},
        "output": str(work / "family"),
    }
    if args.family:
        config["model"] = {"exits": args.exits}
        config["init"] = {"source": "family", "path": str(args.family)}
        config["data"]["tokens"] = str(args.tokens)
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def measure(config_path: Path, warmup: int, rounds: int, variants: list[str]) -> dict:
    """Inside one training process: the backbone's forward and the asked training steps, taken
    in turns (one of each per round, so load from other processes hits all alike); per variant
    the median seconds and the median of its per-round ratio to the backbone forward."""

    import torch

    from training.data import rank_microbatches
    from training.launch import prepare
    from training.megatron_model import build_model
    from training.trainer import Trainer

    plan = prepare(config_path)
    trainer = Trainer(plan, plan.run_dir)
    c, family = trainer.config, trainer.family
    backbone = build_model(family.replace(exits=(family.num_layers - 1,)))  # no exit branches
    backbone.eval()

    def backbone_forward():
        with torch.no_grad():
            for batch in rank_microbatches(trainer.train_sampler, 0, c.train.global_batch_size,
                                           c.train.micro_batch_size, 0, 1):
                backbone(batch["input_ids"], batch["position_ids"], None, labels=batch["labels"]).mean()

    def step(alpha: float):
        trainer.model.exit_losses.alpha, trainer.model.exit_losses.temperature = alpha, 2.0
        trainer.train_step()

    runs = {"backbone_forward": backbone_forward}
    for variant in variants:
        runs[variant] = functools.partial(step, 0.5 if variant == "distill" else 0.0)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(warmup + rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            if round_index >= warmup:
                seconds[name].append(time.perf_counter() - started)
    forward = seconds["backbone_forward"]
    return {"seconds": {name: statistics.median(times) for name, times in seconds.items()},
            "ratio": {name: statistics.median(t / f for t, f in zip(times, forward, strict=True))
                      for name, times in seconds.items()},
            "tokens_per_step": c.train.global_batch_size * c.train.seq_len,
            "trainable_parameters": sum(p.numel() for p in trainer.params),
            "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=REPO / "runs/demo/corpus")
    parser.add_argument("--family", type=Path, default=None, help="an imported family (default: random SmolLM2 shape)")
    parser.add_argument("--tokens", type=Path, default=None, help="its token streams (with --family)")
    parser.add_argument("--exits", type=int, nargs="+", default=[9, 19])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (one of each measurement)")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "VARIANTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), args.warmup, args.rounds, args.child[1].split(","))))
        return
    if args.family and not args.tokens:
        parser.error("--family needs --tokens (the corpus encoded with the family's tokenizer)")

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, train in PROCESSES:
            work = Path(tmp) / name
            work.mkdir()
            variants = ["full"] if name == "full" else ["ce", "distill"]
            command = [sys.executable, __file__, "--child", str(run_config(args, work, train)), ",".join(variants),
                       "--warmup", str(args.warmup), "--rounds", str(args.rounds)]
            out = subprocess.run(command, capture_output=True, text=True, check=False)
            if out.returncode:
                raise SystemExit(f"{name} failed:\n{out.stderr[-4000:]}")
            measured = json.loads(out.stdout.strip().splitlines()[-1])
            tokens = measured["tokens_per_step"]
            for variant, seconds in measured["seconds"].items():
                key = variant if variant in ("backbone_forward", "full") else f"{variant}, {name}"
                if key in results:  # every process times the backbone; its own ratios use its own
                    continue
                results[key] = {"step_s": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
                                "vs_backbone_forward": round(measured["ratio"][variant], 3)}
                if variant != "backbone_forward":
                    results[key]["trainable_parameters"] = measured["trainable_parameters"]
                    results[key]["process_max_rss_gb"] = round(measured["max_rss_gb"], 2)
            print(f"{name}: " + ", ".join(f"{v} {s:.2f} s" for v, s in measured["seconds"].items()), flush=True)

    model = "imported family " + str(args.family) if args.family else "SmolLM2-135M shape, random weights"
    path = write_json("exit_tuning", {
        "model": model, "exits": args.exits, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
        "global_batch": args.global_batch, "timed_rounds": args.rounds, "results": results})
    width = max(map(len, results))
    for key, row in results.items():
        print(f"{key:{width}s}  {row['step_s']:7.2f} s/step  {row['tokens_per_s']:7.1f} tok/s  "
              f"{row['vs_backbone_forward']:5.2f}x backbone forward")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
