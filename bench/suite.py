"""The benchmark suite: every README figure's command, run one after another (`flow bench`).

Each entry is a benchmark script with the arguments the README quotes and the files it needs
(what `make demo` builds; `make demo-scratch` the from-scratch family; the distilled family is
prepared by hand, see bench/exit_distillation.py). `flow bench all` runs every entry whose inputs
exist, in this order, each as its own process, except the long ones (an hour or more of training:
run them by name, or add `--long`), and writes bench/results/suite.json: per entry the command,
seconds, exit status, or why it was skipped. Then bench/report.py makes the results report of the
run (bench/results/REPORT.md) and puts it into README.md. Entries run by name write their own
results only (suite.json stays the last whole run's).

    flow bench list
    flow bench all
    flow bench all --long
    flow bench link_modes many_devices
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOL = "runs/smollm2"
DEMO_TOKENS = "runs/demo/corpus/tokens.json"  # the demo corpus in its own tokenizer's ids
TOKENS_BUILDER = f"`make {DEMO_TOKENS}` builds them in seconds"


@dataclass(frozen=True)
class Entry:
    name: str
    what: str
    argv: tuple[str, ...]  # the script (under bench/) and its arguments
    needs: tuple[str, ...] = ()  # paths (relative to the checkout) that must exist
    builder: str = "`make demo` builds them"  # how the needed paths are made
    long: bool = False  # an hour or more: `all` runs it only with --long


SUITE = (
    Entry("device_latency", "device member latency, ONNX Runtime against PyTorch eager",
          ("device_latency.py",)),
    Entry("device_latency_smollm2", "the SmolLM2 members' latency",
          ("device_latency.py", "--sizes", f"{SMOL}/family:0", f"{SMOL}/family:1", "--name",
           "device_latency_smollm2"), (f"{SMOL}/family/members/1",)),
    Entry("device_install_size", "what a device installs, and that it generates",
          ("device_install_size.py", "--family", f"{SMOL}/family"), (f"{SMOL}/family/members/0",)),
    Entry("exit_tuning", "what exit tuning costs against a backbone forward",
          ("exit_tuning.py", "--family", f"{SMOL}/imported", "--tokens", f"{SMOL}/tokens",
           "--rounds", "4"), (f"{SMOL}/imported", f"{SMOL}/tokens")),
    Entry("exit_tradeoff", "what an exit settles on the device, untuned against tuned",
          ("exit_tradeoff.py", "--data", f"{SMOL}/tokens", "--family",
           f"untuned={SMOL}/imported", "--family", f"tuned={SMOL}/family", "--family",
           "distilled=runs/smollm2-distilled/family"),
          (f"{SMOL}/imported", f"{SMOL}/family", f"{SMOL}/tokens", "runs/smollm2-distilled/family")),
    Entry("cloud_throughput", "batched engine against one at a time, gRPC, whole-model generation",
          ("cloud_throughput.py",)),
    Entry("cloud_throughput_split", "gRPC clients on cores of their own, as devices elsewhere",
          ("cloud_throughput.py", "--cores", "split", "--concurrency", "32", "--grpc-concurrency",
           "32", "--grpc-workers", "0", "--grpc-baseline-max", "0", "--gen-rounds", "1",
           "--name", "cloud_throughput_split")),
    Entry("cloud_throughput_smollm2_split", "the same on the SmolLM2 family",
          ("cloud_throughput.py", "--family", f"{SMOL}/family", "--cores", "split", "--concurrency",
           "32", "--grpc-concurrency", "32", "--grpc-workers", "0", "1", "--grpc-baseline-max", "0",
           "--rounds", "2", "--gen-rounds", "1", "--gen-tokens", "16",
           "--name", "cloud_throughput_smollm2_split"),
          (f"{SMOL}/family/members/1",)),
    Entry("cloud_throughput_smollm2", "the same on the SmolLM2 family",
          ("cloud_throughput.py", "--family", f"{SMOL}/family", "--concurrency", "1", "8", "32",
           "--grpc-concurrency", "1", "8", "32", "--grpc-baseline-max", "8", "--rounds", "2",
           "--gen-rounds", "3", "--name", "cloud_throughput_smollm2"),
          (f"{SMOL}/family/members/1",)),
    Entry("serving", "continuous batching against a static batch, requests of mixed lengths",
          ("serving.py",)),
    Entry("serving_smollm2", "the same on the SmolLM2 family",
          ("serving.py", "--family", f"{SMOL}/family", "--requests", "32", "--slots", "8",
           "--prompt", "16", "--tokens", "16", "--spreads", "0", "1", "--rounds", "1", "--name",
           "serving_smollm2"), (f"{SMOL}/family/members/1",)),
    Entry("link_modes", "every device mode over shaped links",
          ("link_modes.py",), (f"{SMOL}/family/members/1", "runs/demo/corpus")),
    Entry("many_devices", "1, 8 and 32 devices against one cloud",
          ("many_devices.py",), (f"{SMOL}/family/members/1", "runs/demo/corpus")),
    Entry("soak", "floods, churn, kills and freezes for a bounded time", ("soak.py",)),
    Entry("family_vs_separate", "one family against separately trained models of the same depth",
          ("family_vs_separate.py", "--corpus", "runs/demo/corpus", "--steps", "200"),
          (DEMO_TOKENS,), builder=TOKENS_BUILDER),
    Entry("train_throughput", "training throughput per TP x PP x DP layout",
          ("train_throughput.py", "--corpus", "runs/demo/corpus", "--preset", "demo", "--steps", "8"),
          (DEMO_TOKENS,), builder=TOKENS_BUILDER),
    Entry("int8_cost", "what int8 costs a device member (the from-scratch family)",
          ("int8_cost.py", "--family", "runs/demo/family", "--data", "runs/demo/corpus"),
          ("runs/demo/family/members/0",), builder="`make demo-scratch` builds it"),
    Entry("int8_cost_smollm2", "what int8 costs the SmolLM2 members",
          ("int8_cost.py", "--family", f"{SMOL}/family", "--data", f"{SMOL}/tokens", "--name",
           "int8_cost_smollm2"), (f"{SMOL}/family/members/1", f"{SMOL}/tokens")),
    Entry("exit_distillation", "CE against self-distillation for the exits (trains 4 families)",
          ("exit_distillation.py",), ("runs/smollm2-distilled/family",),
          builder="the preparation commands in configs/smollm2.yaml make it", long=True),
)


def run(names: list[str], long: bool = False, progress=print) -> list[dict]:
    """Run the entries named (all: every one, the long ones only with `long`) in suite order;
    their outcomes."""
    chosen = [e for e in SUITE if "all" in names or e.name in names]
    outcomes = []
    for index, entry in enumerate(chosen, 1):
        command = [sys.executable, str(REPO / "bench" / entry.argv[0]), *entry.argv[1:]]
        shown = "python bench/" + shlex.join(entry.argv)
        if entry.long and not long and entry.name not in names:
            progress(f"[{index}/{len(chosen)}] {entry.name}: skipped, an hour or more "
                     f"(`flow bench {entry.name}` or `flow bench all --long` runs it)")
            outcomes.append({"name": entry.name, "command": shown, "skipped": ["long: --long"]})
            continue
        missing = [p for p in entry.needs if not (REPO / p).exists()]
        if missing:
            progress(f"[{index}/{len(chosen)}] {entry.name}: skipped, needs {', '.join(missing)} "
                     f"({entry.builder})")
            outcomes.append({"name": entry.name, "command": shown, "skipped": missing})
            continue
        progress(f"[{index}/{len(chosen)}] {entry.name}: {shown}")
        began = time.monotonic()
        status = subprocess.run(command, cwd=REPO).returncode
        outcomes.append({"name": entry.name, "command": shown, "returncode": status,
                         "seconds": round(time.monotonic() - began, 1)})
    return outcomes


def write_outcomes(outcomes: list[dict]) -> Path:
    sys.path.insert(0, str(REPO / "bench"))
    from common import write_json

    return write_json("suite", {"entries": outcomes})


def report() -> int:
    """bench/report.py over the results: REPORT.md, and the README's results section."""
    return subprocess.run([sys.executable, str(REPO / "bench" / "report.py"), "--readme"],
                          cwd=REPO).returncode


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="`list` (default), `all`, or benchmark names from the list")
    parser.add_argument("--long", action="store_true",
                        help="`all` also runs the benchmarks that train for an hour or more")
    args = parser.parse_args(argv)
    argv, long = args.names, args.long
    if not argv or argv == ["list"]:
        for entry in SUITE:
            what = entry.what + (" [long: --long]" if entry.long else "")
            print(f"{entry.name:24s} {what}\n{'':24s} python bench/{shlex.join(entry.argv)}")
        return 0
    unknown = set(argv) - {e.name for e in SUITE} - {"all"}
    if unknown:
        print(f"unknown benchmark(s) {', '.join(sorted(unknown))}; `flow bench list` lists them",
              file=sys.stderr)
        return 2
    outcomes = run(argv, long=long)
    if "all" not in argv:  # suite.json records whole runs: the report describes one
        return 0 if all(o.get("returncode", 0) == 0 for o in outcomes) else 1
    print(f"wrote {write_outcomes(outcomes)}")
    reported = report()
    return 0 if reported == 0 and all(o.get("returncode", 0) == 0 for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
