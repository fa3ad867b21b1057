"""Device member latency: ONNX Runtime (fp32, int8) against PyTorch eager, the memory-bandwidth
bound, and what the copy-free ("shared") KV cache saves over the standard ("concat") one.

For each member (PRESET:EXIT; default the demo preset's member 0 and the small preset's member 1,
a member whose weights are far larger than any CPU cache; or FAMILY_DIR:EXIT for a family's own
weights, e.g. runs/smollm2/family:1), a random family is built (or the family loaded) and the
member exported three ways into a temporary directory: fp32 with the shared KV cache (ORT
GroupQueryAttention, past and present bound to one buffer), its int8 quantization, and fp32 with
the concat cache (present = concat(past, new) every call). Then, all with the same thread count:

- decode: median time of a one-token call with --past tokens already cached (after warm-up
  calls), and prefill: median time of one call on a --prompt-token prompt, for ORT fp32 shared,
  ORT int8 shared, ORT fp32 concat and PyTorch eager (the same member on FamilyModel with its own
  static KV cache, torch.no_grad). The runtimes take turns over --rounds rounds, so the drift of
  a shared machine's speed hits them alike;
- the bandwidth bound: the bytes of fp32 weights one decode token reads (every parameter of
  blocks 0..e_k and of the exit branch, one embedding row) divided by this machine's measured
  copy bandwidth (numpy copy, best of several, counted as bytes read + bytes written per second);
- decode latency against the past length for shared, concat and eager, and, from ORT's profiler
  at the longest past, the time per decode step spent in Concat nodes (the concat layout's cache
  copy) and in the attention nodes, for both layouts.

All ratios are within one run, on one machine.

    python bench/device_latency.py              # default sizes, a few minutes on 2 cores
    python bench/device_latency.py --quick      # tiny member, under a minute: checks the script
    python bench/device_latency.py --sizes small:1 --threads 4 --past 512

Writes bench/results/device_latency.{json,png}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common
import numpy as np
from common import RESULTS, parse_with_quick, save_figure, write_json

NAME = "device_latency"
ORT_VARIANTS = {  # label -> (file, what it is)
    "ort_fp32_shared": ("shared.onnx", "ONNX Runtime fp32, shared KV cache (GroupQueryAttention)"),
    "ort_int8_shared": ("shared.int8.onnx", "ONNX Runtime int8 MatMuls, shared KV cache"),
    "ort_fp32_concat": ("concat.onnx", "ONNX Runtime fp32, concat KV cache (standard ONNX)"),
}
EAGER = "torch_eager"
CURVE = ("ort_fp32_shared", "ort_fp32_concat", EAGER)  # the runtimes of the decode-vs-past curve
# --quick replaces these defaults (explicit flags still win): a tiny member, few tokens.
QUICK = dict(sizes=["tiny:0"], past=64, prompt=32, tokens=6, warmup=2, rounds=2,
             past_lengths=[16, 64, 256], profile_steps=4, bandwidth_mb=64)


# ---- arguments ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["demo:0", "small:1"], metavar="PRESET:EXIT",
                        help="members to measure, as a preset name or a family directory, and an exit "
                             "index (default: %(default)s)")
    parser.add_argument("--preset", help="measure one member of this preset (with --exit, default 0)")
    parser.add_argument("--exit", type=int, help="the exit of --preset to measure")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads and torch threads")
    parser.add_argument("--past", type=int, default=128, help="tokens cached before the timed decode calls")
    parser.add_argument("--prompt", type=int, default=128, help="prompt length of the timed prefill")
    parser.add_argument("--tokens", type=int, default=12, help="timed decode calls per round")
    parser.add_argument("--warmup", type=int, default=4, help="untimed decode calls before them, per round")
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds in which the runtimes take turns (one timed prefill each)")
    parser.add_argument("--past-lengths", type=int, nargs="+", default=[32, 128, 512, 1024, 2048],
                        help="past lengths of the decode curve, capped to the context")
    parser.add_argument("--profile-steps", type=int, default=8, help="decode steps under ORT's profiler")
    parser.add_argument("--bandwidth-mb", type=int, default=256, help="size of the copied array (MiB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="keep the exported members here (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few tokens (< 60 s)")
    parser.add_argument("--name", default=NAME, help="results file name under bench/results (default: %(default)s)")
    args = parse_with_quick(parser, QUICK, argv)
    if args.exit is not None and args.preset is None:
        parser.error("--exit needs --preset")
    if args.preset is not None:
        args.sizes = [f"{args.preset}:{args.exit or 0}"]
    try:
        args.members = [(name, int(exit)) for name, exit in (s.rsplit(":", 1) for s in args.sizes)]
    except ValueError:
        parser.error(f"--sizes takes PRESET:EXIT pairs such as demo:0, got {args.sizes}")
    return args


# ---- the machine ----------------------------------------------------------------------------


def copy_bandwidth(megabytes: int, threads: int, repeats: int = 10) -> float:
    """Bytes read + bytes written per second by a numpy copy split over `threads` threads, best of
    `repeats`. The array is far larger than the CPU caches, so this is DRAM bandwidth."""
    count = megabytes * 2**20 // 4
    source, target = np.ones(count, np.float32), np.zeros(count, np.float32)
    edges = np.linspace(0, count, threads + 1, dtype=np.int64)
    spans = list(zip(edges[:-1], edges[1:], strict=True))

    def copy(span):  # numpy releases the GIL while it copies, so the threads run in parallel
        np.copyto(target[span[0]:span[1]], source[span[0]:span[1]])

    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            started = time.perf_counter()
            list(pool.map(copy, spans))
            best = min(best, time.perf_counter() - started)
    return 2 * source.nbytes / best


def l3_cache_bytes() -> int | None:
    """The last-level cache of CPU 0 as Linux reports it, or None where it does not."""
    path = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    try:
        text = path.read_text().strip().upper()
    except OSError:
        return None
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def versions() -> dict:
    import onnxruntime
    import torch

    return {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "numpy": np.__version__}


# ---- members --------------------------------------------------------------------------------


def quiet():
    """Silence the exporter's and quantizer's warnings (torchvision missing, deprecations)."""
    return common.quiet("torch", "onnxscript", "onnxruntime")


def export_variants(family, exit: int, directory: Path) -> dict[str, float]:
    """Write the three ORT variants of member `exit` into `directory`; seconds each took."""
    from flow.onnx_export import export_member, quantize_member

    seconds = {}
    for label, layout in (("ort_fp32_shared", "shared"), ("ort_fp32_concat", "concat")):
        started = time.perf_counter()
        with quiet():
            export_member(family, exit, directory / ORT_VARIANTS[label][0], kv_cache=layout)
        seconds[label] = time.perf_counter() - started
    started = time.perf_counter()
    with quiet():
        quantize_member(directory / ORT_VARIANTS["ort_fp32_shared"][0],
                        directory / ORT_VARIANTS["ort_int8_shared"][0])
    seconds["ort_int8_shared"] = time.perf_counter() - started
    return seconds


def decode_weight_bytes(model, exit: int) -> dict[str, int]:
    """Weight bytes one decode token reads: blocks 0..e_k, the exit branch, one embedding row.

    fp32: every parameter at 4 bytes. int8: the matrices (what quantize_member turns to int8) at
    1 byte, the vectors (norms) and the embedding row still fp32; per-channel scales ignored.
    """
    exit_layer = model.config.exit_layer(exit)
    params = [p for block in model.blocks[:exit_layer + 1] for p in block.parameters()]
    params += list(model.exits[exit].parameters())
    matrices = sum(p.numel() for p in params if p.dim() == 2)
    vectors = sum(p.numel() for p in params if p.dim() != 2) + model.config.hidden_size
    return {"fp32": 4 * (matrices + vectors), "int8": matrices + 4 * vectors}


class EagerMember:
    """Member `exit` run by PyTorch eager: embedding, blocks 0..e_k, exit branch, static cache.

    The cache holds exactly `capacity` slots, the fewest the measurement needs: FamilyModel's
    attention spans every slot of its cache, so a smaller cache is eager's best case.
    """

    def __init__(self, family, exit: int, capacity: int):
        self.model, self.exit = family.model, exit
        self.exit_layer = family.config.exit_layer(exit)
        self.cache = self.model.new_cache(1, capacity, layers=range(self.exit_layer + 1), exits=[exit])

    def run(self, tokens: list[int], start: int) -> np.ndarray:
        import torch

        with torch.no_grad():
            ids = torch.tensor([tokens], dtype=torch.long)
            positions = torch.arange(start, start + len(tokens))[None]
            hidden = self.model.embed_tokens(ids)
            hidden = self.model.run_blocks(hidden, 0, self.exit_layer, positions, self.cache)
            return self.model.run_exit(hidden, self.exit, positions, self.cache)[0].numpy()


def ort_runner(session):
    return lambda tokens, start: session.run(tokens, start).logits


# ---- timing ---------------------------------------------------------------------------------


def summary(seconds: list[float]) -> dict[str, float]:
    """Median and 10th/90th percentiles in milliseconds."""
    ms = sorted(s * 1e3 for s in seconds)
    deciles = statistics.quantiles(ms, n=10) if len(ms) > 1 else [ms[0]] * 9
    return {"median_ms": statistics.median(ms), "p10_ms": deciles[0], "p90_ms": deciles[-1], "calls": len(ms)}


def random_tokens(rng: np.random.Generator, vocab: int, count: int) -> list[int]:
    return rng.integers(0, vocab, count).tolist()


def interleaved(runners: dict, rounds: int, measure) -> dict[str, dict[str, float]]:
    """`measure(run)` (a list of seconds) for every runner, round after round.

    The runners take turns, in an order rotated each round, and their times are pooled: a shared
    machine's speed drifts by tens of percent over seconds, and interleaving makes the drift hit
    every runner alike, so ratios between them hold where back-to-back blocks would not.
    """
    labels = list(runners)
    times = {label: [] for label in labels}
    for index in range(rounds):
        turn = index % len(labels)
        for label in labels[turn:] + labels[:turn]:
            time.sleep(0.05)  # let the previous runtime's spinning worker threads go idle
            times[label] += measure(runners[label])
    return {label: summary(seconds) for label, seconds in times.items()}


def time_decode(runners: dict, past: int, args, rng, vocab: int) -> dict[str, dict[str, float]]:
    """Per-token decode latency of each runner with `past` tokens cached.

    Each round rolls the cache back to `past` (free: a token's slot is its position), makes
    `warmup` untimed calls (the first after a switch of runtime is slow) and `tokens` timed ones,
    which see past + warmup .. past + warmup + tokens - 1 cached tokens.
    """
    for run in runners.values():
        run(random_tokens(rng, vocab, past), 0)

    def one_round(run) -> list[float]:
        times = []
        for step in range(args.warmup + args.tokens):
            token = random_tokens(rng, vocab, 1)
            started = time.perf_counter()
            run(token, past + step)
            times.append(time.perf_counter() - started)
        return times[args.warmup:]

    return interleaved(runners, args.rounds, one_round)


def time_prefill(runners: dict, prompt: list[int], args) -> tuple[dict, dict[str, np.ndarray]]:
    """Latency of one call on the whole prompt from position 0: per round one untimed call (the
    first after a switch of runtime is slow) and one timed; also each runner's logits, to check
    that they all compute the same member."""
    logits = {label: np.asarray(run(prompt, 0)) for label, run in runners.items()}

    def one_call(run) -> list[float]:
        run(prompt, 0)
        started = time.perf_counter()
        run(prompt, 0)
        return [time.perf_counter() - started]

    return interleaved(runners, args.rounds, one_call), logits


def decode_room(args) -> int:
    """Cache slots a decode measurement uses beyond its past length."""
    return args.warmup + args.tokens


def curve_lengths(requested: list[int], context: int, args) -> list[int]:
    """Past lengths for the curve; each leaves room in the context for its warm-up and timed calls."""
    return sorted({max(1, min(length, context - decode_room(args))) for length in requested})


# ---- the profiler ---------------------------------------------------------------------------


def profile_decode(path: Path, past: int, args, rng, work: Path) -> dict[str, float]:
    """Per decode step at `past`: µs in Concat nodes (all, and those building a KV cache, i.e. a
    float output longer than the step along the sequence axis), in attention nodes, in all nodes,
    and the whole run, from ORT's profiler."""
    from device.member import MemberSession

    session = MemberSession(path, intra_op_threads=args.threads, profile=work / "ort-profile")
    vocab = session.info.vocab_size
    session.run(random_tokens(rng, vocab, past), 0)
    warmup = 2
    for step in range(warmup + args.profile_steps):
        session.run(random_tokens(rng, vocab, 1), past + step)
    trace_path = Path(session.end_profiling())
    trace = json.loads(trace_path.read_text())
    trace_path.unlink()
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    steps = runs[-args.profile_steps:]
    nodes = [e for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
             and any(r["ts"] <= e["ts"] <= r["ts"] + r["dur"] for r in steps)]

    def total(select) -> float:
        return sum(e["dur"] for e in nodes if select(e)) / len(steps)

    op = lambda e: e["args"].get("op_name")  # noqa: E731
    return {
        "past": past, "steps": len(steps),
        "concat_us": total(lambda e: op(e) == "Concat"),
        "kv_concat_us": total(lambda e: op(e) == "Concat" and _is_cache_concat(e)),
        "attention_us": total(lambda e: op(e) in ("GroupQueryAttention", "Attention")),
        "all_nodes_us": total(lambda e: True),
        "run_us": sum(r["dur"] for r in steps) / len(steps),
        "concat_nodes": sum(1 for e in nodes if op(e) == "Concat") // len(steps),
        "attention_nodes": sum(1 for e in nodes if op(e) in ("GroupQueryAttention", "Attention")) // len(steps),
    }


def _is_cache_concat(event: dict) -> bool:
    # A decode step has one new token, so only a cache concat has a float (B, heads, S, head_dim)
    # output with S > 1; rotary's concats have S = 1 and shape arithmetic is int64.
    shapes = event["args"].get("output_type_shape", [])
    return any(len(dims) == 4 and dims[2] > 1 for shape in shapes
               for dtype, dims in shape.items() if dtype == "float")


# ---- one member -----------------------------------------------------------------------------


def member_family(name: str, seed: int):
    """A family directory's trained weights, or a random family of preset `name`."""
    from flow.config import preset
    from flow.family import Family

    if (Path(name) / "family.json").is_file():
        return Family.load(name)
    return Family.random(preset(name), seed=seed)


def measure_member(preset_name: str, exit: int, args, work: Path, bandwidth: float) -> dict:
    from device.member import MemberSession

    print(f"\n== {preset_name} member {exit}: loading or building, and exporting", flush=True)
    family = member_family(preset_name, args.seed)
    config = family.config
    config.check_exit(exit)
    directory = work / f"{Path(preset_name).name}-{exit}"
    directory.mkdir(parents=True, exist_ok=True)
    export_seconds = export_variants(family, exit, directory)
    weights = decode_weight_bytes(family.model, exit)
    rng = np.random.default_rng(args.seed)
    vocab = config.vocab_size
    prompt = random_tokens(rng, vocab, args.prompt)
    past = min(args.past, config.max_seq_len - decode_room(args))
    sessions = {label: MemberSession(directory / file, intra_op_threads=args.threads)
                for label, (file, _) in ORT_VARIANTS.items()}

    def runners(labels, capacity: int) -> dict:
        # Eager's static cache spans `capacity` slots, the fewest the measurement needs (its
        # attention covers every slot, so this is eager at its best).
        return {label: ort_runner(sessions[label]) for label in labels} | {
            EAGER: EagerMember(family, exit, capacity).run}

    print("   decode and prefill", flush=True)
    prefill, logits = time_prefill(runners(ORT_VARIANTS, args.prompt), prompt, args)
    decode = time_decode(runners(ORT_VARIANTS, past + decode_room(args)), past, args, rng, vocab)

    print("   decode against past length", flush=True)
    lengths = curve_lengths(args.past_lengths, config.max_seq_len, args)
    curve = {"past": lengths, **{label: [] for label in CURVE}}
    for n in lengths:
        medians = time_decode(runners(CURVE[:2], n + decode_room(args)), n, args, rng, vocab)
        for label in CURVE:
            curve[label].append(medians[label]["median_ms"])
    sessions.clear()  # free them (and their thread pools) before the profiled sessions

    print("   ORT profile at the longest past", flush=True)
    profile = {layout: profile_decode(directory / ORT_VARIANTS[f"ort_fp32_{layout}"][0], lengths[-1],
                                      args, rng, directory) for layout in ("shared", "concat")}

    bound_ms = weights["fp32"] / bandwidth * 1e3
    fp32, eager = decode["ort_fp32_shared"]["median_ms"], decode[EAGER]["median_ms"]
    l3 = l3_cache_bytes()
    return {
        "preset": preset_name, "exit": exit, "exit_layer": config.exit_layer(exit),
        "config": config.to_dict(), "parameters": config.member_parameters(exit),
        "export_seconds": export_seconds,
        "file_bytes": {label: (directory / file).stat().st_size for label, (file, _) in ORT_VARIANTS.items()},
        "decode_weight_bytes": weights,
        # Weights that fit the last-level cache are not streamed from DRAM each token, so the
        # bandwidth bound (and the 1.5 target) only applies to members well over it.
        "weights_fit_in_l3": None if l3 is None else weights["fp32"] <= l3,
        "bandwidth_bound_ms": bound_ms, "int8_bandwidth_bound_ms": weights["int8"] / bandwidth * 1e3,
        "past": past, "prompt": args.prompt,
        "decode": decode, "prefill": prefill,
        "prefill_tokens_per_s": {k: args.prompt / (v["median_ms"] / 1e3) for k, v in prefill.items()},
        "max_abs_logit_diff_vs_eager": {k: float(np.abs(v - logits[EAGER]).max())
                                        for k, v in logits.items() if k != EAGER},
        "ratios": {
            "ort_fp32_over_bound": fp32 / bound_ms,
            "eager_over_ort_fp32": eager / fp32,
            "ort_fp32_over_int8": fp32 / decode["ort_int8_shared"]["median_ms"],
            "concat_over_shared_at_past": decode["ort_fp32_concat"]["median_ms"] / fp32,
            "concat_over_shared_at_longest": curve["ort_fp32_concat"][-1] / curve["ort_fp32_shared"][-1],
        },
        "decode_vs_past": curve,
        "profile": profile,
    }


# ---- output ---------------------------------------------------------------------------------


def print_member(row: dict) -> None:
    name = f"{row['preset']} member {row['exit']}"
    print(f"\n{name}: {row['parameters'] / 1e6:.1f} M parameters, decode reads "
          f"{row['decode_weight_bytes']['fp32'] / 2**20:.1f} MiB of fp32 weights per token"
          + ("  (fits in L3: not bandwidth-bound)" if row["weights_fit_in_l3"] else ""))
    print(f"  {'runtime':<18} {'decode ms/token':>16} {'prefill ms':>11} {'prefill tok/s':>14} {'max|Δlogit|':>12}")
    for label in (*ORT_VARIANTS, EAGER):
        diff = row["max_abs_logit_diff_vs_eager"].get(label)
        print(f"  {label:<18} {row['decode'][label]['median_ms']:>16.2f} {row['prefill'][label]['median_ms']:>11.1f} "
              f"{row['prefill_tokens_per_s'][label]:>14.0f} {'' if diff is None else f'{diff:.1e}':>12}")
    print(f"  {'bandwidth bound':<18} {row['bandwidth_bound_ms']:>16.2f}")
    r = row["ratios"]
    print(f"  ORT fp32 / bound = {r['ort_fp32_over_bound']:.2f} (target <= 1.5 when bandwidth-bound)   "
          f"eager / ORT fp32 = {r['eager_over_ort_fp32']:.2f} (target >= 2)   "
          f"fp32 / int8 = {r['ort_fp32_over_int8']:.2f}")
    curve = row["decode_vs_past"]
    print(f"  {'past':>6} {'shared ms':>10} {'concat ms':>10} {'eager ms':>9} {'concat/shared':>14}")
    for i, past in enumerate(curve["past"]):
        shared, concat = curve["ort_fp32_shared"][i], curve["ort_fp32_concat"][i]
        print(f"  {past:>6} {shared:>10.2f} {concat:>10.2f} {curve[EAGER][i]:>9.2f} {concat / shared:>14.2f}")
    for layout, p in row["profile"].items():
        print(f"  profile {layout:<6} past {p['past']}: per step {p['run_us']:.0f} µs, Concat {p['concat_us']:.0f} µs "
              f"(KV cache {p['kv_concat_us']:.0f} µs), attention {p['attention_us']:.0f} µs")


def plot(rows: list[dict], threads: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(12, 3.2 * len(rows) + 0.8))
    grid = figure.add_gridspec(len(rows), 2, width_ratios=(1.3, 1))
    styles = {"ort_fp32_shared": ("ORT fp32 shared KV", "-o"), "ort_fp32_concat": ("ORT fp32 concat KV", "--s"),
              EAGER: ("PyTorch eager", ":^")}
    for i, row in enumerate(rows):
        axis = figure.add_subplot(grid[i, 0])
        curve = row["decode_vs_past"]
        for label, (text, style) in styles.items():
            axis.plot(curve["past"], curve[label], style, label=text)
        axis.set_xscale("log", base=2)
        axis.set_xticks(curve["past"], [str(n) for n in curve["past"]])
        axis.minorticks_off()
        axis.set_ylim(bottom=0)
        axis.set_ylabel("ms / token")
        axis.set_title(f"{row['preset']} member {row['exit']}: decode latency vs past length", fontsize=10)
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    axis.set_xlabel("past length (cached tokens)")

    bars = figure.add_subplot(grid[:, 1])
    kinds = [("ort_fp32_shared", "ORT fp32"), ("ort_int8_shared", "ORT int8"), (EAGER, "eager"), ("bound", "fp32 bandwidth bound")]
    width = 0.8 / len(kinds)
    for j, (key, text) in enumerate(kinds):
        values = [row["bandwidth_bound_ms"] if key == "bound" else row["decode"][key]["median_ms"] for row in rows]
        positions = [i + (j - (len(kinds) - 1) / 2) * width for i in range(len(rows))]
        drawn = bars.bar(positions, values, width, label=text, hatch="//" if key == "bound" else None,
                         fill=key != "bound")
        bars.bar_label(drawn, fmt="%.2f", fontsize=7)
    bars.set_xticks(range(len(rows)), [f"{r['preset']} member {r['exit']}\n(past {r['past']}"
                                       + (", weights fit in L3)" if r["weights_fit_in_l3"] else ")") for r in rows])
    bars.set_yscale("log")
    bars.set_ylabel("decode ms / token (log)")
    bars.set_title(f"per-token decode latency, {threads} threads", fontsize=10)
    bars.legend(fontsize=8)
    figure.tight_layout()
    return figure


# ---- main -----------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()  # other work on the machine skews every number; record it
    bandwidth = copy_bandwidth(args.bandwidth_mb, args.threads)
    single = copy_bandwidth(args.bandwidth_mb, 1)
    print(f"copy bandwidth (read + write): {bandwidth / 1e9:.1f} GB/s with {args.threads} threads, "
          f"{single / 1e9:.1f} GB/s with 1")
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="device_latency-")))
        rows = [measure_member(name, exit, args, work, bandwidth) for name, exit in args.members]
    for row in rows:
        print_member(row)

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "members"}
    path = write_json(args.name, {
        "command": shlex.join(["python", "bench/device_latency.py", *sys.argv[1:]]),
        "args": settings, "threads": args.threads, "versions": versions(),
        "cpu_count": os.cpu_count(), "l3_cache_bytes": l3_cache_bytes(),
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "bandwidth": {"bytes_per_s": bandwidth, "single_thread_bytes_per_s": single,
                      "method": f"numpy copy of a {args.bandwidth_mb} MiB float32 array split over "
                                f"{args.threads} threads, best of 10",
                      "counts": "bytes read + bytes written per second (a copy of N bytes counts 2N)"},
        "definitions": {
            "decode": "one-token call with `past` tokens cached; per round `warmup` untimed then "
                      "`tokens` timed calls (the cache grows by one per call, rolled back each "
                      "round); runtimes take turns round by round; median over all timed calls",
            "prefill": "one call on a `prompt`-token prompt from position 0, one per round, median",
            "bandwidth_bound_ms": "fp32 weight bytes per decode token / copy bandwidth",
            "variants": {k: v[1] for k, v in ORT_VARIANTS.items()} | {
                EAGER: "PyTorch eager FamilyModel, static KV cache sized to the measurement, no_grad"},
            "profile": "ORT profiler, µs per decode step at the curve's longest past, averaged over "
                       "`steps` steps; kv_concat_us counts Concat nodes with a float 4-D output "
                       "longer than one token along the sequence axis",
        },
        "members": rows, "wall_seconds": time.perf_counter() - started})
    save_figure(plot(rows, args.threads), args.name)
    print(f"\nwrote {path} and {RESULTS / (args.name + '.png')} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
