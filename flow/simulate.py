"""`flow simulate`: the two tiers and many devices on one machine, each device behind its own
shaped link, and what every mode costs and gives.

Everything is a real process started from the command line a deployment uses: the cloud is
`flow serve` (with `--workers` if asked, and `--metrics-port`, whose engine-step seconds say what
the cloud spent), an optional edge is `flow serve --to-exit` in front of it, and each device is
`flow generate --prompts-file ... --json`, reaching its tier through a `flow.link.LinkShaper` of
its own (in this process). Devices start together and generate every prompt (held-out code, the
corpus' functions) in turn; per mode, the report has tokens/s per device, time to first token,
time between tokens (p50, p99), each tier's share of the tokens, round trips and bytes up/down
per token (as the device counted them and as they crossed the shaper), cloud engine seconds per
generated token, agreement with the full model (the share of tokens equal to `cloud` mode's on an
unshaped link at the same position) and errors. Ctrl-C, or any failure, stops every process
started here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from flow.errors import FlowError
from flow.link import PROFILES, LinkShaper

STEP_SECONDS = "flow_engine_step_duration_seconds_sum"  # the cloud's engine time (Prometheus)


@dataclass
class Plan:
    """What to simulate: a family's tiers, `devices` devices on `profile`, each `mode` in turn."""

    family: Path
    prompts: list[str]
    modes: list[str]
    devices: int = 4
    profile: str = "4g"
    exit: int = 0
    tokens: int = 32
    workers: int = 0
    edge: bool = False
    draft_tokens: str = "adaptive"
    device_threads: int = 1
    extra_generate: list[str] = field(default_factory=list)


class Simulation:
    """The processes of one simulation; `with Simulation(plan) as sim: sim.run()`."""

    def __init__(self, plan: Plan):
        if plan.devices < 1:
            raise FlowError(f"--devices must be >= 1, got {plan.devices}")
        if plan.profile not in PROFILES:
            raise FlowError(f"unknown link profile {plan.profile!r}; profiles: {', '.join(PROFILES)}")
        self.plan = plan
        self._stack = ExitStack()
        self._processes: list[subprocess.Popen] = []
        self._scratch = Path(tempfile.mkdtemp(prefix="flow-simulate-"))

    def __enter__(self) -> Simulation:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        """End every process started here (SIGINT first, so they clean up), and the shapers."""
        for process in self._processes:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 15
        for process in self._processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self._stack.close()
        shutil.rmtree(self._scratch, ignore_errors=True)

    # ---- the tiers ----------------------------------------------------------------------------

    def start_tiers(self) -> str:
        """Start the cloud (and the edge); the address devices reach."""
        plan = self.plan
        self.metrics_port = _free_port()
        cloud = self.cloud_address = self._serve("--from-exit", plan.exit, "--workers", plan.workers,
                                                 "--metrics-port", self.metrics_port)
        if not plan.edge:
            return cloud
        return self._serve("--from-exit", plan.exit, "--to-exit", plan.exit + 1, "--next", cloud,
                           "--name", "edge")

    def _serve(self, *options) -> str:
        # A slot per device and its reference run, of a context for a prompt and its tokens
        # (SmolLM2's full context in every slot would be gigabytes).
        process = self._spawn("serve", self.plan.family, "--port", 0, "--max-sessions",
                              max(8, 2 * self.plan.devices), "--max-context", 1024, *options)
        line = process.stdout.readline()
        if not line.startswith("listening on "):
            raise FlowError(f"flow serve did not start ({line.strip() or 'no output'}); run the "
                            f"same `flow serve` by hand to see why")
        return line.split()[-1]

    def engine_seconds(self) -> float:
        """The cloud's engine-step seconds so far (its Prometheus metrics)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            for line in answer.read().decode().splitlines():
                if line.startswith(STEP_SECONDS):
                    return float(line.split()[-1])
        return 0.0

    # ---- the devices --------------------------------------------------------------------------

    def run_devices(self, mode: str, address: str, count: int, profile: str) -> list[dict]:
        """`count` devices in `mode`, each behind a link of `profile` to `address`, started
        together; per device its results (one per prompt), shaper bytes, exit status, errors."""
        prompts_file = self._scratch / "prompts.json"
        prompts_file.write_text(json.dumps(self.plan.prompts))
        host, port = address.rsplit(":", 1)
        links, devices = [], []
        for index in range(count):
            link = self._stack.enter_context(
                LinkShaper((host, int(port)), PROFILES[profile], seed=index))
            links.append(link)
            devices.append(self._spawn(
                "generate", self.plan.family, "--prompts-file", prompts_file, "--json",
                "--cloud", link.address, "--mode", mode, "--exit", self.plan.exit,
                "--max-new-tokens", self.plan.tokens, "--ignore-eos",
                "--draft-tokens", self.plan.draft_tokens, "--threads", self.plan.device_threads,
                *self.plan.extra_generate, stderr=subprocess.PIPE))
        reports = []
        for link, device in zip(links, devices, strict=True):
            out, err = device.communicate()
            results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            reports.append({"results": results, "returncode": device.returncode,
                            "errors": [] if device.returncode == 0 else [err.strip()[-500:]],
                            "shaper_bytes_up": link.bytes_up, "shaper_bytes_down": link.bytes_down})
            link.close()
        return reports

    def _spawn(self, command: str, *args, stderr=subprocess.DEVNULL) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-m", "flow.cli.main", command, *map(str, args)],
                                   stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   start_new_session=True)  # its own group: killed as one
        self._processes.append(process)
        return process

    # ---- the whole run ------------------------------------------------------------------------

    def run(self, progress=print) -> dict:
        """Every mode in turn against the same tiers; the report."""
        plan = self.plan
        address = self.start_tiers()
        progress(f"tiers up at {address}; the full model's tokens (cloud mode, no shaping)...")
        (reference,) = self.run_devices("cloud", self.cloud_address, 1, "none")
        full = [r["tokens"] for r in reference["results"]]
        report = {"plan": {k: (str(v) if isinstance(v, Path) else v)
                           for k, v in plan.__dict__.items()}, "profile": PROFILES[plan.profile].__dict__,
                  "modes": {}}
        for mode in plan.modes:
            progress(f"{mode}: {plan.devices} devices on {plan.profile} ...")
            before = self.engine_seconds()
            began = time.monotonic()
            devices = self.run_devices(mode, address, plan.devices, plan.profile)
            wall = time.monotonic() - began
            report["modes"][mode] = summarize(devices, full, self.engine_seconds() - before, wall)
        return report


def summarize(devices: list[dict], full: list[list[int]], engine_s: float, wall_s: float) -> dict:
    """One mode's figures over its devices (see the module docstring)."""
    results = [r for device in devices for r in device["results"]]
    tokens = sum(len(r["tokens"]) for r in results)
    per_device = [sum(len(r["tokens"]) for r in d["results"]) /
                  max(sum(r["timings"]["total_s"] for r in d["results"]), 1e-9) for d in devices]
    gaps = [b - a for r in results for a, b in zip(r["token_times"], r["token_times"][1:],
                                                   strict=False)]
    tiers: dict[str, int] = {}
    for r in results:
        for tier, offline in zip(r["tiers"], r["offline"], strict=True):
            name = f"{tier} (offline)" if offline else tier
            tiers[name] = tiers.get(name, 0) + 1
    same = sum(a == b for d in devices for r, ref in zip(d["results"], full, strict=False)
               for a, b in zip(r["tokens"], ref, strict=False))
    per_token = lambda total: total / tokens if tokens else 0.0  # noqa: E731
    return {
        "devices": len(devices), "tokens": tokens, "wall_s": wall_s,
        "tokens_per_s_per_device": statistics.mean(per_device),
        "tokens_per_s_total": tokens / wall_s,
        "first_token_ms": 1000 * statistics.median(r["timings"]["first_token_s"] for r in results)
        if results else None,
        "between_tokens_p50_ms": 1000 * statistics.median(gaps) if gaps else None,
        "between_tokens_p99_ms": 1000 * _quantile(gaps, 0.99) if gaps else None,
        "tier_share": {name: count / tokens for name, count in sorted(tiers.items())},
        "round_trips_per_token": per_token(sum(r["round_trips"] for r in results)),
        "bytes_up_per_token": per_token(sum(r["bytes_sent"] for r in results)),
        "bytes_down_per_token": per_token(sum(r["bytes_received"] for r in results)),
        "shaper_bytes_up_per_token": per_token(sum(d["shaper_bytes_up"] for d in devices)),
        "shaper_bytes_down_per_token": per_token(sum(d["shaper_bytes_down"] for d in devices)),
        "cloud_engine_s_per_token": per_token(engine_s),
        "agreement": per_token(same),
        "modes_run": sorted({r["mode"] for r in results}),
        "errors": [e for d in devices for e in d["errors"]],
        "per_device": devices,
    }


def format_table(report: dict) -> str:
    """The per-mode table `flow simulate` prints."""
    head = (f"{'mode':>12s} {'tok/s/dev':>9s} {'first ms':>9s} {'p50 ms':>7s} {'p99 ms':>7s} "
            f"{'device':>7s} {'trips/tok':>9s} {'B up/tok':>9s} {'B dn/tok':>9s} "
            f"{'cloud s/tok':>11s} {'agree':>6s} {'errors':>6s}")
    lines = [head]
    for mode, m in report["modes"].items():
        device = sum(v for k, v in m["tier_share"].items() if k.startswith("device"))
        lines.append(
            f"{mode:>12s} {m['tokens_per_s_per_device']:9.1f} {m['first_token_ms'] or 0:9.1f} "
            f"{m['between_tokens_p50_ms'] or 0:7.1f} {m['between_tokens_p99_ms'] or 0:7.1f} "
            f"{device:7.0%} {m['round_trips_per_token']:9.2f} {m['bytes_up_per_token']:9.0f} "
            f"{m['bytes_down_per_token']:9.0f} {m['cloud_engine_s_per_token']:11.4f} "
            f"{m['agreement']:6.1%} {len(m['errors']):6d}")
    return "\n".join(lines)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
