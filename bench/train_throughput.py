"""Training throughput (tokens/s) of `flow train` per (tensor, pipeline, data) layout.

Each layout trains the same model on the same batches for a few steps; the figure is the median
tokens/s of the steps after the first two (start-up excluded), from the run's metrics.jsonl. On a
CPU machine every rank is a process sharing the same cores, so this measures the overhead of each
layout rather than a speed-up; on a GPU node each rank has its own GPU.

    python bench/train_throughput.py --corpus runs/demo/corpus --preset demo --steps 8

Writes bench/results/train_throughput.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml
from common import REPO, RESULTS, save_figure, write_json

LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=REPO / "runs/demo/corpus")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--work", type=Path, default=REPO / "runs/bench/train_throughput")
    args = parser.parse_args()

    from training.launch import train

    rows = []
    for tp, pp, dp in LAYOUTS:
        out = args.work / f"tp{tp}pp{pp}dp{dp}"
        config = {
            "model": {"preset": args.preset},
            "data": {"corpus": str(args.corpus)},
            "parallel": {"tensor": tp, "pipeline": pp, "data": dp},
            "train": {"steps": args.steps, "seq_len": args.seq_len, "micro_batch_size": 2,
                      "global_batch_size": args.global_batch, "warmup_steps": 1},
            "eval": {"interval": 10**6, "batches": 1},
            "checkpoint": {"dir": str(out / "checkpoints"), "interval": 10**6},
            "output": str(out / "family"),
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(config))
        for stale in (out / "checkpoints").glob("*"):
            if stale.is_file():
                stale.unlink()
        started = time.perf_counter()
        train(out / "config.yaml")
        metrics = [json.loads(line) for line in (out / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
        steady = [m["tokens_per_s"] for m in metrics[2:]] or [m["tokens_per_s"] for m in metrics]
        rows.append({"tensor": tp, "pipeline": pp, "data": dp, "ranks": tp * pp * dp,
                     "tokens_per_s": statistics.median(steady), "wall_seconds": time.perf_counter() - started})
        print(f"TP={tp} PP={pp} DP={dp}: {rows[-1]['tokens_per_s']:.0f} tokens/s")

    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["relative_to_single_process"] = row["tokens_per_s"] / base
    path = write_json("train_throughput", {
        "command": f"python bench/train_throughput.py --corpus {args.corpus} --preset {args.preset} --steps {args.steps}",
        "preset": args.preset, "seq_len": args.seq_len, "global_batch": args.global_batch,
        "micro_batch": 2, "layouts": rows})

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3))
    axis.bar([f"TP{r['tensor']}·PP{r['pipeline']}·DP{r['data']}" for r in rows], [r["tokens_per_s"] for r in rows])
    axis.set_ylabel("tokens / s")
    axis.set_title(f"flow train, {args.preset} preset, this machine")
    save_figure(figure, "train_throughput")
    print(f"wrote {path} and {RESULTS / 'train_throughput.png'}")


if __name__ == "__main__":
    main()
