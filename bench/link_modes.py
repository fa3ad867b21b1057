"""Every device mode over shaped links: time to first token, tokens/s, time between tokens, bytes
and round trips per token, the device's share, and agreement with the full model.

A real `flow serve` process serves the family; for each link profile a `LinkShaper` (flow.link)
sits between it and a `DeviceClient` in this process, which generates from held-out code prompts
(functions of the corpus' held-out split) in each mode:

- `local` (the member alone), `cloud` (the whole model streamed from the tier), `exit` at the
  member's calibrated threshold (hand-off rows in fp32, and fp16, bf16 and int8: bytes against
  agreement), `speculative` with 1, 2, 4 and 8 drafts and `adaptive` drafts (also with its draft
  rows in fp16, bf16 and int8), and `auto` (per request, whichever lossless mode it measured
  faster).

And, without a link, the baselines a user would otherwise pick: the whole model streamed from
the tier, the whole model in `transformers`' greedy `generate` on the same weights (in this
process: the ceiling of any server of these weights on this machine), and each member alone for
the whole request — one fixed exit per request, as the released Ruyi code serves a family.

Each (profile, mode) gets a fresh client and one warm-up generation (not counted), then
generates every prompt once. Agreement is the share of generated tokens equal to the full
model's greedy tokens (`cloud` mode on an unshaped link) at the same position; the lossless
modes must reach 1.0 up to near ties (a draft row in a lossy codec makes speculative lossy
too). Bytes are counted by the client and by the shaper. The verdict on adaptive drafting: its tokens/s within 5 % of the best fixed draft length on every
profile, and above every fixed length on at least one.

    python bench/link_modes.py                                   # SmolLM2 family, ~20 min
    python bench/link_modes.py --family runs/demo/family --exit 0 --profiles lan 4g --prompts 2

Writes bench/results/link_modes.{json,png} (or --name).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (
    add_generation_arguments,
    save_figure,
    token_agreement,
    transformers_greedy,
    transformers_model,
    write_json,
)

from device import DeviceClient
from flow.data.corpus import code_prompts
from flow.link import PROFILES, LinkShaper

FIXED_DRAFTS = (1, 2, 4, 8)
# hand-off codecs besides fp32, in exit and speculative mode: bytes per token against agreement
CODECS = ("fp16", "bf16", "int8")
VARIANTS = ["local", "cloud", "exit", *[f"exit@{codec}" for codec in CODECS],
            *[f"speculative-{k}" for k in FIXED_DRAFTS], "speculative-adaptive",
            *[f"speculative-adaptive@{codec}" for codec in CODECS], "auto"]


def start_tier(family: Path, exit: int) -> tuple[subprocess.Popen, str]:
    """`flow serve` for devices of member `exit`, with a KV pool sized for a benchmark."""
    process = subprocess.Popen([sys.executable, "-m", "flow.cli.main", "serve", str(family),
                                "--from-exit", str(exit), "--port", "0", "--max-sessions", "8",
                                "--max-context", "1024"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = process.stdout.readline()
    if not line.startswith("listening on "):
        process.kill()
        sys.exit(f"flow serve did not start: {line!r}")
    return process, line.split()[-1]


def client_for(variant: str, family: Path, exit: int, address: str) -> DeviceClient:
    """The client of a variant: MODE[-DRAFTS][@CODEC]."""
    variant, _, codec = variant.partition("@")
    mode, _, drafts = variant.partition("-")
    draft_tokens = (int(drafts) if drafts.isdigit() else drafts) if drafts else "adaptive"
    return DeviceClient(family, exit=exit, cloud=address, mode=mode, draft_tokens=draft_tokens,
                        codec=codec or "fp32", retry_interval=0.5)


def measure(variant: str, family: Path, exit: int, address: str, prompts: list[str],
            tokens: int, reference: list[list[int]] | None) -> dict:
    client = client_for(variant, family, exit, address)
    client.complete(prompts[0], max_new_tokens=8, ignore_eos=True)  # warm-up: sessions, caches
    runs = [client.complete(prompt, max_new_tokens=tokens, ignore_eos=True) for prompt in prompts]
    produced = sum(len(r.tokens) for r in runs)
    gaps = [later - earlier for r in runs
            for earlier, later in zip(r.token_times, r.token_times[1:], strict=False)]
    result = {
        "tokens": produced,
        "tokens_per_s": produced / sum(r.timings["total_s"] for r in runs),
        "first_token_ms": 1000 * statistics.median(r.timings["first_token_s"] for r in runs),
        "between_tokens_p50_ms": 1000 * statistics.median(gaps),
        "between_tokens_p99_ms": 1000 * statistics.quantiles(gaps, n=100)[98],
        "bytes_up_per_token": sum(r.bytes_sent for r in runs) / produced,
        "bytes_down_per_token": sum(r.bytes_received for r in runs) / produced,
        "round_trips_per_token": sum(r.round_trips for r in runs) / produced,
        "device_share": sum(r.tiers.count("device") for r in runs) / produced,
        "offline_tokens": sum(sum(r.offline) for r in runs),
        "modes_run": [r.mode for r in runs],
        "outputs": [r.tokens for r in runs],
    }
    if reference is not None:
        result["agreement"] = token_agreement([r.tokens for r in runs], reference)
    return result


def transformers_baseline(family_dir: Path, prompts: list[str], tokens: int,
                          reference: list[list[int]]) -> dict:
    """The whole model in `transformers`' greedy generate on the family's weights, no link."""
    import tempfile

    import torch
    from tokenizers import Tokenizer

    from flow.family import Family

    with tempfile.TemporaryDirectory() as tmp:
        model = transformers_model(Family.load(family_dir), Path(tmp))
    tokenizer = Tokenizer.from_file(str(family_dir / "tokenizer.json"))

    def generate(prompt: str, new: int) -> tuple[list[int], float]:
        began = time.perf_counter()
        out = transformers_greedy(model, [tokenizer.encode(prompt).ids], new)[0]
        return out, time.perf_counter() - began

    generate(prompts[0], 8)  # warm-up
    first = [generate(prompt, 1)[1] for prompt in prompts]
    runs = [generate(prompt, tokens) for prompt in prompts]
    outputs = [out for out, _ in runs]
    produced = sum(map(len, outputs))
    return {"tokens": produced, "tokens_per_s": produced / sum(s for _, s in runs),
            "first_token_ms": 1000 * statistics.median(first),
            "agreement": token_agreement(outputs, reference), "torch_threads": torch.get_num_threads()}


def baselines(args, address: str, prompts: list[str], reference_row: dict) -> dict:
    """What a user has without familial-flow's collaboration, measured without a link."""
    reference = reference_row["outputs"]
    rows = {"cloud mode, whole model": {**reference_row, "agreement": 1.0,
                                        "what": "the tier streams the full model's tokens"},
            "transformers generate, whole model": {
                **transformers_baseline(args.family, prompts, args.tokens, reference),
                "what": "greedy generate in this process, same weights"}}
    members = sorted(int(d.name) for d in (args.family / "members").iterdir()
                     if (d / "device.onnx").is_file())
    for member in members:  # one fixed exit for the whole request
        rows[f"member {member} alone"] = {
            **measure("local", args.family, member, address, prompts, args.tokens, reference),
            "what": f"one fixed exit (member {member}) for the whole request, on the device"}
    for name, row in rows.items():
        print(f"no link {name:>34s}: {row['tokens_per_s']:6.1f} tok/s, first "
              f"{row['first_token_ms']:7.1f} ms, agreement {row['agreement']:.1%}", flush=True)
    return rows


def adaptive_verdict(results: dict) -> dict:
    """Adaptive drafting against the fixed lengths, profile by profile."""
    verdict = {}
    for profile, by_variant in results.items():
        fixed = {k: by_variant[f"speculative-{k}"]["tokens_per_s"] for k in FIXED_DRAFTS}
        adaptive = by_variant["speculative-adaptive"]["tokens_per_s"]
        best = max(fixed.values())
        verdict[profile] = {"adaptive_over_best_fixed": adaptive / best,
                            "best_fixed_drafts": max(fixed, key=fixed.get),
                            "beats_every_fixed": adaptive > best}
    verdict["within_5_percent_everywhere"] = all(v["adaptive_over_best_fixed"] >= 0.95
                                                 for v in verdict.values())
    verdict["beats_every_fixed_somewhere"] = any(v["beats_every_fixed"]
                                                 for k, v in verdict.items() if isinstance(v, dict))
    return verdict


def plot(results: dict, name: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = list(results)
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(VARIANTS)
    for i, variant in enumerate(VARIANTS):
        xs = [p + (i - len(VARIANTS) / 2) * width for p in range(len(profiles))]
        colour = plt.cm.tab20(i)
        axes[0].bar(xs, [results[p][variant]["tokens_per_s"] for p in profiles], width,
                    label=variant, color=colour)
        axes[1].bar(xs, [results[p][variant]["first_token_ms"] for p in profiles], width,
                    color=colour)
    for axis, title in zip(axes, ("tokens/s (higher is better)", "time to first token, ms"),
                           strict=True):
        axis.set_xticks(range(len(profiles)), profiles)
        axis.set_title(title)
    axes[1].set_yscale("log")
    figure.legend(loc="upper center", ncol=5, fontsize=8, bbox_to_anchor=(0.5, 1.08))
    return save_figure(figure, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_arguments(parser, prompts=3)
    parser.add_argument("--profiles", nargs="+", default=["lan", "wifi", "4g", "3g"],
                        choices=list(PROFILES), help="link profiles (default: lan wifi 4g 3g)")
    parser.add_argument("--name", default="link_modes", help="results name (default %(default)s)")
    args = parser.parse_args()

    prompts = code_prompts(args.corpus, args.prompts)
    tier, address = start_tier(args.family, args.exit)
    began = time.time()
    try:
        reference_row = measure("cloud", args.family, args.exit, address, prompts, args.tokens, None)
        reference = reference_row["outputs"]
        without_link = baselines(args, address, prompts, reference_row)
        results = {}
        for profile in args.profiles:
            results[profile] = {}
            for variant in VARIANTS:
                host, port = address.rsplit(":", 1)
                with LinkShaper((host, int(port)), PROFILES[profile], seed=0) as link:
                    row = measure(variant, args.family, args.exit, link.address, prompts,
                                  args.tokens, reference)
                    row["shaper_bytes_up"], row["shaper_bytes_down"] = link.bytes_up, link.bytes_down
                results[profile][variant] = row
                print(f"{profile:>5s} {variant:>26s}: {row['tokens_per_s']:6.1f} tok/s, first "
                      f"{row['first_token_ms']:7.1f} ms, p99 gap {row['between_tokens_p99_ms']:7.1f}"
                      f" ms, {row['round_trips_per_token']:.2f} trips/token, device "
                      f"{row['device_share']:.0%}, agreement {row['agreement']:.1%}", flush=True)
    finally:
        tier.terminate()
        tier.wait(30)
    verdict = adaptive_verdict(results)
    data = {"command": "python bench/link_modes.py " + shlex.join(sys.argv[1:]),
            "family": str(args.family), "exit": args.exit, "prompts": prompts,
            "tokens_per_prompt": args.tokens, "profiles": {p: PROFILES[p].__dict__ for p in
                                                            args.profiles},
            "seconds": time.time() - began, "results": results, "baselines": without_link,
            "adaptive": verdict}
    print(f"wrote {write_json(args.name, data)} and {plot(results, args.name)}")
    print("adaptive vs best fixed draft:", {p: round(v["adaptive_over_best_fixed"], 3)
                                            for p, v in verdict.items() if isinstance(v, dict)})


if __name__ == "__main__":
    main()
