"""Train once, deploy many: one family against separately trained models of each member's depth.

The family (all exits trained together, one run) and, for every member k, a standalone Qwen3 model
of the member's depth (e_k + 2 layers; the last member: all layers) are trained on exactly the same
batches for the same number of steps. Each member and its standalone twin are then scored on
held-out code the models never saw (third-party package sources). The Ruyi2 claim this mirrors:
family members are comparable to same-sized models trained on their own, while the family costs
one training run instead of one per size.

    python bench/family_vs_separate.py --corpus runs/demo/corpus --steps 200

Writes bench/results/family_vs_separate.{json,png}.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import yaml
from common import REPO, RESULTS, save_figure, write_json


def run_config(corpus: Path, out: Path, steps: int, model: dict) -> Path:
    config = {
        "model": model,
        "data": {"corpus": str(corpus)},
        "train": {"steps": steps, "seq_len": 128, "micro_batch_size": 8, "global_batch_size": 16,
                  "lr": 0.003, "min_lr": 0.0003, "warmup_steps": max(1, steps // 10)},
        "eval": {"interval": steps, "batches": 4},
        "checkpoint": {"dir": str(out / "checkpoints"), "interval": steps},
        "output": str(out / "family"),
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def heldout_loss(family, exit: int, windows) -> float:
    import torch

    losses = []
    for start in range(0, len(windows), 16):
        batch = windows[start:start + 16]
        logits = family.logits(batch[:, :-1], exit=exit)
        losses.append(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).item())
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=REPO / "runs/demo/corpus")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--heldout-windows", type=int, default=64)
    parser.add_argument("--work", type=Path, default=REPO / "runs/bench/family_vs_separate")
    args = parser.parse_args()

    import torch

    from flow import Family
    from flow.config import preset
    from flow.data.tokens import open_tokens
    from training.data import WindowSampler
    from training.launch import train

    architecture = preset(args.preset)
    runs = {"family": {"preset": args.preset}}
    for k in range(architecture.num_exits):
        depth = architecture.member_num_layers(k)
        runs[f"separate{k}"] = {"preset": args.preset, "num_layers": depth, "exits": [depth - 1]}

    seconds = {}
    for name, model in runs.items():
        out = args.work / name
        started = time.perf_counter()
        print(f"== training {name} ({model}) for {args.steps} steps")
        train(run_config(args.corpus, out, args.steps, model))
        seconds[name] = time.perf_counter() - started

    windows = torch.from_numpy(WindowSampler(open_tokens(args.corpus, "heldout"), 128, seed=0,
                                             shuffle=False).windows(0, args.heldout_windows))
    family = Family.load(args.work / "family" / "family")
    members = []
    for k in range(family.config.num_exits):
        separate = Family.load(args.work / f"separate{k}" / "family")
        members.append({
            "exit": k, "layers": family.config.member_num_layers(k),
            "parameters": family.config.member_parameters(k),
            "family_heldout_loss": heldout_loss(family, k, windows),
            "separate_heldout_loss": heldout_loss(separate, 0, windows),
            "separate_train_seconds": seconds[f"separate{k}"],
        })
    tokens = args.steps * 16 * 128
    result = {"command": f"python bench/family_vs_separate.py --corpus {args.corpus} --steps {args.steps}",
              "preset": args.preset, "steps": args.steps, "tokens_per_run": tokens,
              "heldout_windows": args.heldout_windows, "family_train_seconds": seconds["family"],
              "separate_train_seconds_total": sum(v for k, v in seconds.items() if k != "family"),
              "members": members}
    print(f"{'member':>6} {'layers':>6} {'params':>10} {'family':>8} {'separate':>9}  (held-out loss, nats/token)")
    for m in members:
        print(f"{m['exit']:>6} {m['layers']:>6} {m['parameters']:>10,} {m['family_heldout_loss']:>8.3f} "
              f"{m['separate_heldout_loss']:>9.3f}")
    print(f"training time: family {seconds['family']:.0f} s, separate models "
          f"{result['separate_train_seconds_total']:.0f} s")
    path = write_json("family_vs_separate", result)
    plot(result)
    print(f"wrote {path} and {RESULTS / 'family_vs_separate.png'}")


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    members = result["members"]
    labels = [f"exit {m['exit']}\n{m['layers']} layers" for m in members]
    x = range(len(members))
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.bar([i - 0.2 for i in x], [m["family_heldout_loss"] for m in members], 0.4, label="family member")
    axis.bar([i + 0.2 for i in x], [m["separate_heldout_loss"] for m in members], 0.4, label="trained alone")
    axis.set_xticks(list(x), labels)
    low = min(min(m["family_heldout_loss"], m["separate_heldout_loss"]) for m in members)
    axis.set_ylim(math.floor(low * 0.9), None)
    axis.set_ylabel("held-out loss (nats/token)")
    axis.set_title(f"Same {result['tokens_per_run']:,} tokens: one family vs one model per size")
    axis.legend()
    save_figure(figure, "family_vs_separate")


if __name__ == "__main__":
    main()
