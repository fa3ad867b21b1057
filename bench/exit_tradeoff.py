"""What an early exit can settle on the device: device share against agreement with the full model.

For each family given (for example the imported SmolLM2 family with untuned exits, the same after
exit tuning with cross-entropy only, and after self-distillation), each early exit and each
confidence policy, on held-out code, teacher-forced:

- the trade-off curve: settling on the device every position whose confidence passes τ (exit
  mode), the share of positions the member settles against the share whose token is the full
  model's — the curve `flow calibrate` picks its threshold from;
- the device share at 95 % and 99 % agreement (the README's table);
- the member's raw top-1 agreement with the full model, and every member's held-out loss.

    python bench/exit_tradeoff.py --data runs/smollm2/tokens \\
        --family untuned=runs/smollm2/imported --family tuned=runs/smollm2/family

Writes bench/results/exit_tradeoff.json and exit_tradeoff.png (or --name).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import save_figure, write_json

from flow.calibration import choose_threshold, teacher_forced
from flow.confidence import POLICIES
from flow.data.tokens import open_tokens

TARGETS = (0.95, 0.99)


def named_path(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, Path(path)


def measure(name: str, family_dir: Path, args) -> dict:
    from flow.family import Family

    family = Family.load(family_dir)
    config = family.config
    tokens = open_tokens(args.data, args.split, family_dir / "tokenizer.json")
    early = list(range(config.last_exit))
    began = time.perf_counter()
    measured = teacher_forced(family, list(range(config.num_exits)), tokens, args.window, args.tokens)
    result = {"family": str(family_dir), "family_hash": family.family_hash(),
              "exit_layers": list(config.exits), "provenance": family.provenance,
              "seconds": time.perf_counter() - began,
              "heldout_loss": {str(k): float(m.nll.mean()) for k, m in measured.items()},
              "exits": {}}
    for k in early:
        m = measured[k]
        row = {"exit_layer": config.exits[k], "positions": int(len(m.agrees)),
               "top1_agreement": float(m.agrees.mean()), "policies": {}}
        for policy in POLICIES:
            chosen = {t: choose_threshold(m.scores[policy], m.agrees, t, curve_points=101)
                      for t in TARGETS}
            row["policies"][policy] = {
                **{f"device_share_at_{t:g}": c.device_share for t, c in chosen.items()},
                **{f"threshold_at_{t:g}": c.threshold for t, c in chosen.items()},
                "curve": chosen[TARGETS[0]].curve}
        result["exits"][str(k)] = row
        print(f"{name:>10s} exit {k} (layer {config.exits[k]:2d}): top-1 agreement "
              f"{row['top1_agreement']:.1%}, held-out loss {result['heldout_loss'][str(k)]:.3f}; "
              + ", ".join(f"{p} {row['policies'][p]['device_share_at_0.95']:.0%}/"
                          f"{row['policies'][p]['device_share_at_0.99']:.0%}" for p in POLICIES)
              + " on device at 95/99 % agreement", flush=True)
    print(f"{name:>10s} full model: held-out loss {result['heldout_loss'][str(config.last_exit)]:.3f}")
    return result


def plot(results: dict, name: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exits = sorted({k for r in results.values() for k in r["exits"]}, key=int)
    figure, axes = plt.subplots(1, len(exits), figsize=(6 * len(exits), 4.5), squeeze=False)
    styles = {"max_prob": "-", "margin": "--", "entropy": ":"}
    for axis, k in zip(axes[0], exits, strict=True):
        for (label, result), colour in zip(results.items(), plt.cm.tab10.colors, strict=False):
            row = result["exits"].get(k)
            if row is None:
                continue
            for policy, style in styles.items():
                curve = row["policies"][policy]["curve"]
                axis.plot([100 * p["device_share"] for p in curve], [100 * p["agreement"] for p in curve],
                          style, color=colour, label=f"{label} ({policy})")
        for target in TARGETS:
            axis.axhline(100 * target, color="grey", linewidth=0.5)
        layer = next(r["exits"][k]["exit_layer"] for r in results.values() if k in r["exits"])
        axis.set(title=f"exit {k} (after layer {layer})", xlabel="tokens settled on the device (%)",
                 ylabel="agreement with the full model (%)", ylim=(50, 100.5), xlim=(0, 100))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    return save_figure(figure, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="token streams encoded with the families' tokenizer (flow tokenize)")
    parser.add_argument("--family", type=named_path, action="append", required=True,
                        metavar="NAME=DIR", help="a family to measure (repeatable)")
    parser.add_argument("--split", default="heldout", help="token split (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=16384,
                        help="held-out tokens to score (default: %(default)s)")
    parser.add_argument("--window", type=int, default=256, help="tokens per window (default: %(default)s)")
    parser.add_argument("--name", default="exit_tradeoff", help="results file name (default: %(default)s)")
    args = parser.parse_args()
    results = {name: measure(name, path, args) for name, path in args.family}
    command = "python bench/exit_tradeoff.py " + " ".join(
        [f"--data {args.data}", *(f"--family {n}={p}" for n, p in args.family)])
    path = write_json(args.name, {"command": command, "args": {k: str(v) for k, v in vars(args).items()},
                                  "targets": list(TARGETS), "families": results})
    print(f"wrote {path} and {plot(results, args.name)}")


if __name__ == "__main__":
    main()
