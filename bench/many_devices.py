"""Many devices against one cloud: what each device gets and what the cloud spends, by mode.

For each device count, `flow simulate` (flow.simulate) starts one cloud (`flow serve`) and that
many device processes, each behind its own shaped link (--profile), generating held-out code
prompts in `speculative` (adaptive drafts) and `cloud` mode, one mode after the other. Reported
per count and mode: tokens/s per device, the cloud's tokens/s (all devices' tokens over the wall
time), cloud engine seconds per generated token (the engine's step time from its metrics), p99
time between tokens, and agreement with the full model. The figure speculative mode exists for
is the ratio of cloud seconds per token, speculative against cloud.

On a small machine the devices and the cloud share the cores: device counts beyond the cores
measure contention as much as the cloud; the JSON records the machine. The devices run member 0
by default: 32 processes of SmolLM2's member 1 would need 19 GB of memory on one machine, member
0 about 14 GB.

    python bench/many_devices.py                                  # SmolLM2 family, 1 8 32 devices
    python bench/many_devices.py --family runs/demo/family --devices 1 8

Writes bench/results/many_devices.{json,png} (or --name).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from common import add_generation_arguments, save_figure, write_json

from flow.data.corpus import code_prompts
from flow.link import PROFILES
from flow.simulate import Plan, Simulation, format_table

MODES = ["speculative", "cloud"]


def plot(rows: dict, name: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted(int(c) for c in rows)
    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    for mode in MODES:
        series = [rows[str(c)][mode] for c in counts]
        axes[0].plot(counts, [s["tokens_per_s_per_device"] for s in series], "o-", label=mode)
        axes[1].plot(counts, [s["tokens_per_s_total"] for s in series], "o-", label=mode)
        axes[2].plot(counts, [1000 * s["cloud_engine_s_per_token"] for s in series], "o-",
                     label=mode)
    titles = ("tokens/s per device", "tokens/s, all devices", "cloud engine ms per token")
    for axis, title in zip(axes, titles, strict=True):
        axis.set_xlabel("devices")
        axis.set_title(title)
        axis.legend()
    return save_figure(figure, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_arguments(parser, prompts=2, exit=0)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 8, 32],
                        help="device counts (default 1 8 32)")
    parser.add_argument("--profile", choices=list(PROFILES), default="4g",
                        help="every device's link (default 4g)")
    parser.add_argument("--name", default="many_devices", help="results name (default %(default)s)")
    args = parser.parse_args()

    prompts = code_prompts(args.corpus, args.prompts)
    rows, began = {}, time.time()
    for count in args.devices:
        plan = Plan(args.family, prompts, MODES, devices=count, profile=args.profile,
                    exit=args.exit, tokens=args.tokens)
        with Simulation(plan) as simulation:
            report = simulation.run(progress=lambda line: print(line, flush=True))
        print(format_table(report), flush=True)
        rows[str(count)] = {mode: {k: v for k, v in figures.items() if k != "per_device"}
                            for mode, figures in report["modes"].items()}
    ratios = {count: row["speculative"]["cloud_engine_s_per_token"] /
              row["cloud"]["cloud_engine_s_per_token"] for count, row in rows.items()}
    data = {"command": "python bench/many_devices.py " + shlex.join(sys.argv[1:]),
            "family": str(args.family), "exit": args.exit, "profile": args.profile,
            "prompts": prompts, "tokens_per_prompt": args.tokens, "seconds": time.time() - began,
            "results": rows, "speculative_over_cloud_engine_s_per_token": ratios}
    print(f"wrote {write_json(args.name, data)} and {plot(rows, args.name)}")
    print("cloud engine s/token, speculative / cloud:", {c: round(r, 3) for c, r in ratios.items()})


if __name__ == "__main__":
    main()
