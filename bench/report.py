"""The README's results from one run of the benchmarks: bench/results/*.json as markdown.

`flow bench all` (bench/suite.py) has every benchmark write bench/results/NAME.json (and often
NAME.png) and records the run in bench/results/suite.json. This script turns those files into one
markdown report: the machine, the dates of the runs and each suite entry's command, time and
status; then per benchmark JSON its command, a table of the figures the README quotes, and a link
to its plot. A JSON no formatter here knows is listed with its command; one that lacks a figure
(written by an older script) says which key is missing instead of stopping the report.

    python bench/report.py                  # writes bench/results/REPORT.md
    python bench/report.py --readme         # and puts the report into README.md

Writes bench/results/REPORT.md (in --results); with --readme also README.md (--readme-path),
between its lines `<!-- bench-report:begin -->` and `<!-- bench-report:end -->`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from common import REPO, RESULTS, atomic_file
from suite import SUITE

BEGIN = "<!-- bench-report:begin -->"
END = "<!-- bench-report:end -->"
REPORT = "REPORT.md"


class ReportError(Exception):
    """Why no report could be written; main prints it as one line."""


# --- cells ------------------------------------------------------------------------------------

def _shown(format_value: Callable[[float], str]) -> Callable[[float | None], str]:
    """A cell formatter that shows a figure the JSON lacks (None) as a dash."""
    return lambda value: "–" if value is None else format_value(value)


rate = _shown(lambda v: f"{v:,.0f}" if v >= 100 else f"{v:.1f}")  # tokens/s, MB
seconds = _shown(lambda v: f"{v:.2f}")
ms = _shown(lambda v: f"{v:.2f}" if v < 1 else f"{v:.1f}" if v < 100 else f"{v:,.0f}")
ratio = _shown(lambda v: f"{v:.2f}")
times = _shown(lambda v: f"{v:.2f}×")
percent = _shown(lambda v: f"{100 * v:.1f} %")  # a fraction, shown as a percentage
count = _shown(lambda v: f"{round(v):,}")  # bytes, tokens, requests
millions = _shown(lambda v: f"{v / 1e6:.1f} M")  # parameters
loss = _shown(lambda v: f"{v:.3f}")  # nats/token


def duration(elapsed: float | None) -> str:
    if elapsed is None:
        return "–"
    if elapsed < 600:
        return f"{elapsed:.0f} s"
    minutes = round(elapsed / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


# --- one formatter per benchmark script, each returning markdown lines --------------------------

def family_vs_separate(data: dict) -> list[str]:
    rows = [[f"exit {m['exit']}", m["layers"], millions(m["parameters"]),
             loss(m["family_heldout_loss"]), loss(m["separate_heldout_loss"])]
            for m in data["members"]]
    return [*table(["member", "layers", "parameters", "family member", "trained alone"], rows), "",
            f"Held-out loss, nats/token; {count(data['tokens_per_run'])} training tokens per run; "
            f"the family trained in {duration(data['family_train_seconds'])}, the separate models "
            f"in {duration(data['separate_train_seconds_total'])}."]


def train_throughput(data: dict) -> list[str]:
    layouts = data["layouts"]
    return table(["TP·PP·DP", *(f"{x['tensor']}·{x['pipeline']}·{x['data']}" for x in layouts)],
                 [["tokens/s", *(rate(x["tokens_per_s"]) for x in layouts)],
                  ["× one process", *(ratio(x["relative_to_single_process"]) for x in layouts)]])


def exit_tuning(data: dict) -> list[str]:
    rows = [[step, seconds(r["step_s"]), rate(r["tokens_per_s"]), times(r["vs_backbone_forward"]),
             millions(r.get("trainable_parameters"))] for step, r in data["results"].items()]
    return table(["step", "s / step", "tokens/s", "× backbone forward", "trained parameters"], rows)


def exit_distillation(data: dict) -> list[str]:
    variants = data["results"]
    *exits, full = next(iter(variants.values()))["exits"]  # the last exit is the full model
    header = ["variant", *(f"{name} after layer {e['exit_layer']}" for e in exits
                           for name in ("agreement", "held-out CE")), "training"]
    rows = [[variant, *(cell for e in v["exits"][:-1]
                        for cell in (percent(e["agreement"]), loss(e["heldout_ce"]))),
             duration(v.get("train_seconds"))] for variant, v in variants.items()]
    sizes = "; ".join(f"after layer {e['exit_layer']} {millions(e['member_parameters'])} "
                      f"({millions(e['member_parameters_head_tied'])} with the head tied)"
                      for e in exits)
    return [*table(header, rows), "",
            f"Members: {sizes}. The full model: held-out CE {loss(full['heldout_ce'])} "
            f"({count(next(iter(variants.values()))['tokens'])} held-out tokens)."]


def device_latency(data: dict) -> list[str]:
    rows = []
    for m in data["members"]:
        decode, prefill = m["decode"], m["prefill"]
        rows.append([f"{m['preset']} member {m['exit']} ({millions(m['parameters'])})",
                     rate(m["decode_weight_bytes"]["fp32"] / 2**20),
                     ms(decode["ort_fp32_shared"]["median_ms"]),
                     ms(decode["ort_int8_shared"]["median_ms"]),
                     ms(decode["torch_eager"]["median_ms"]), ms(m["bandwidth_bound_ms"]),
                     times(m["ratios"]["eager_over_ort_fp32"]), ratio(m["ratios"]["ort_fp32_over_bound"]),
                     f"{ms(prefill['ort_fp32_shared']['median_ms'])} / "
                     f"{ms(prefill['torch_eager']['median_ms'])}"])
    header = ["member", "fp32 MiB read / token", "ORT fp32 ms", "ORT int8 ms", "eager ms",
              "bandwidth bound ms", "eager ÷ ORT", "ORT ÷ bound", "prefill ms, ORT / eager"]
    args = data["args"]
    return [*table(header, rows), "",
            f"Decode at {args['past']} cached tokens, prefill of {args['prompt']}, "
            f"{data['threads']} threads; copy bandwidth {data['bandwidth']['bytes_per_s'] / 1e9:.1f} "
            f"GB/s read + write."]


def int8_cost(data: dict) -> list[str]:
    rows = []
    for m in data["members"]:
        decisions = m["exit_decision_agreement"]  # None for the last member: it has no exit
        rows.append([m["exit"], percent(m["top1_agreement"]),
                     " / ".join(f"{p} {percent(v)}" for p, v in decisions.items()) if decisions else "–",
                     f"{rate(m['fp32_mb'])} → {rate(m['int8_mb'])} MB"])
    return table(["member", "top-1 agreement int8 vs fp32", "same exit decision", "size fp32 → int8"],
                 rows)


def exit_tradeoff(data: dict) -> list[str]:
    targets = data["targets"]
    families = data["families"]
    exits = sorted({e for f in families.values() for e in f["exits"]}, key=int)
    policies = list(next(iter(next(iter(families.values()))["exits"].values()))["policies"])
    rows = []
    for exit_index in exits:
        for name, family in families.items():
            if exit_index not in family["exits"]:
                continue
            e = family["exits"][exit_index]
            rows.append([f"after layer {e['exit_layer']}", name, percent(e["top1_agreement"]),
                         loss(family["heldout_loss"][exit_index]),
                         *(" / ".join(percent(e["policies"][p][f"device_share_at_{t}"]) for p in policies)
                           for t in targets)])
    header = ["exit", "family", "top-1 agreement", "held-out loss",
              *(f"on device at {100 * t:g} % ({' / '.join(policies)})" for t in targets)]
    full = {name: loss(f["heldout_loss"][max(f["heldout_loss"], key=int)]) for name, f in families.items()}
    shown = next(iter(full.values())) if len(set(full.values())) == 1 else \
        ", ".join(f"{name} {value}" for name, value in full.items())
    return [*table(header, rows), "", f"The full model's held-out loss: {shown}."]


def cloud_throughput(data: dict) -> list[str]:
    engine = {row["sessions"]: row for row in data["engine"]}
    grpc = {name: {row["clients"]: row for row in server["rows"]} for name, server in data["grpc"].items()}
    sessions = sorted(set(engine).union(*grpc.values()))

    def by_sessions(rows: dict, figure: Callable[[dict], str]) -> list[str]:
        return [figure(rows[s]) if s in rows else "–" for s in sessions]

    rows = [["engine, batched (tokens/s)",
             *by_sessions(engine, lambda r: rate(r["batched"]["decode_tokens_per_s"]))],
            ["engine, one request at a time",
             *by_sessions(engine, lambda r: rate(r["one_at_a_time"]["decode_tokens_per_s"]))],
            ["batched ÷ one at a time", *by_sessions(engine, lambda r: times(r["decode_ratio"]))]]
    for name, server in grpc.items():
        alone = data["grpc"][name].get("no_engine", False)  # NoEngine: calls, not tokens
        unit, share = ("calls/s, no model", " (the ceiling)") if alone else ("tokens/s", "")
        rows.append([f"gRPC, {name} ({unit})", *by_sessions(server, lambda r: rate(r["tokens_per_s"]))])
        rows.append([f"gRPC, {name}: p50 / p99 ms per call", *by_sessions(
            server, lambda r: f"{ms(r['latency']['p50_ms'])} / {ms(r['latency']['p99_ms'])}")])
        if any(r.get("server_cpu_ms_per_request") is not None for r in server.values()):
            rows.append([f"gRPC, {name}: CPU ms per request, server / clients", *by_sessions(
                server, lambda r: " / ".join("–" if v is None else f"{v:.2f}" for v in (
                    r.get("server_cpu_ms_per_request"), r.get("client_cpu_ms_per_request"))))])
        if any("over_engine_batched" in r for r in server.values()):
            rows.append([f"gRPC, {name} ÷ engine, batched{share}", *by_sessions(
                server, lambda r: percent(r.get("over_engine_batched")))])
    generation = data["generation"]
    lines = [*table(["concurrent sessions", *map(str, sessions)], rows), ""]
    clients = {"processes": "each in a process of its own",
               "threads": "threads of one process, sharing its GIL"}.get(data.get("clients_in"))
    cores = data.get("cores") or {}
    if cores.get("mode") == "split":
        clients = (clients or "") + (f"; the clients on cores {cores['clients']}, the engine, the "
                                     f"server and the generation runners on cores {cores['server']}")
    if clients:
        lines += [f"gRPC clients: {clients}.", ""]
    lines += [f"Whole-model generation ({generation['prompt_tokens']} prompt + "
              f"{generation['new_tokens']} new tokens, greedy), tokens/s:", "",
              *table(["runner", "batch", "tokens/s"],
                     [[name, run["batch"], rate(run["tokens_per_s"])]
                      for name, run in generation["runs"].items()])]
    staged = [r for r in data["engine"] if "decode_stage_seconds" in r["batched"]]
    if staged:
        stages = list(staged[0]["batched"]["decode_stage_seconds"])

        def shares(r: dict) -> list[str]:
            seconds = r["batched"]["decode_stage_seconds"]
            return [percent(seconds[k] / (sum(seconds.values()) or 1.0)) for k in stages]

        lines += ["", "Where a batched decode step's time goes (share per engine stage):", "",
                  *table(["sessions", *stages], [[r["sessions"], *shares(r)] for r in staged])]
    return lines


def serving(data: dict) -> list[str]:
    """The engine against a static batch, on requests of mixed lengths, per spread of lengths."""
    args = data["args"]
    lines = [f"{args['requests']} requests, {args['slots']} at once on either side; prompt and output "
             f"lengths log-normal around {args['prompt']} and {args['tokens']} tokens (the spread: the "
             f"standard deviation of their logarithm). Arriving: Poisson arrivals over "
             f"{args['arrive_span']:g} of the engine's time for all at once.", ""]
    statics = {"generate": "`transformers`' generate on whatever has arrived, left-padded, to the "
                           "batch's longest output",
               "continue": "the same engine in batches whose finished rows run on until the batch's "
                           "longest is done"}
    for kind, by_spread in data["results"].items():
        rows = []
        for cell in by_spread.values():
            outputs = cell["new_tokens"]
            for schedule, result in cell["schedules"].items():
                engine, static = result["engine"], result["static"]
                rows.append([f"{cell['spread']:g}", f"{min(outputs)}–{max(outputs)} (mean {sum(outputs) / len(outputs):.0f})",
                             schedule.replace("_", " "), rate(engine["tokens_per_s"]),
                             rate(static["tokens_per_s"]), times(result["engine_over_static"]),
                             f"{ms(engine['latency']['p50_ms'])} / {ms(static['latency']['p50_ms'])}",
                             f"{ms(engine['latency']['p99_ms'])} / {ms(static['latency']['p99_ms'])}",
                             percent(result["token_agreement"])])
        lines += [f"**{kind}**: the static batch is {statics.get(kind, kind)}.", "",
                  *table(["spread", "new tokens", "schedule", "engine tokens/s", "static tokens/s",
                          "engine ÷ static", "to last token p50 ms, engine / static", "p99",
                          "same tokens"], rows), ""]
    return lines[:-1]


def link_modes(data: dict) -> list[str]:
    results = data["results"]
    profiles = list(results)
    variants = list(dict.fromkeys(v for profile in results.values() for v in profile))

    def by_profile(figure: Callable[[dict], str]) -> list[list[str]]:
        return [[variant, *(figure(results[p][variant]) if variant in results[p] else "–"
                            for p in profiles)] for variant in variants]

    lines = ["Tokens/s:", "", *table(["variant", *profiles], by_profile(lambda r: rate(r["tokens_per_s"]))),
             "", "Time to first token, ms:", "",
             *table(["variant", *profiles], by_profile(lambda r: ms(r["first_token_ms"]))),
             "", "Agreement with the full model / bytes up per token (as the device counts them):", "",
             *table(["variant", *profiles], by_profile(
                 lambda r: f"{percent(r.get('agreement'))} / {count(r.get('bytes_up_per_token'))}"))]
    if "baselines" in data:
        lines += ["", "Baselines:", "", *table(
            ["baseline", "tokens/s", "first token ms", "agreement", "what"],
            [[name, rate(b["tokens_per_s"]), ms(b.get("first_token_ms")), percent(b.get("agreement")),
              b.get("what", "")] for name, b in data["baselines"].items()])]
    if "adaptive" in data:
        lines += ["", "Adaptive drafts ÷ the best fixed number of drafts: " + ", ".join(
            f"{p} {ratio(data['adaptive'][p]['adaptive_over_best_fixed'])}"
            for p in profiles if p in data["adaptive"]) + "."]
    return lines


def many_devices(data: dict) -> list[str]:
    rows = [[devices, mode, rate(r["tokens_per_s_per_device"]), rate(r["tokens_per_s_total"]),
             ms(1000 * r["cloud_engine_s_per_token"]), ms(r["between_tokens_p99_ms"]),
             percent(r.get("agreement"))]
            for devices in sorted(data["results"], key=int)
            for mode, r in data["results"][devices].items()]
    lines = [f"Link profile {data['profile']}, {data['tokens_per_prompt']} tokens per prompt.", "",
             *table(["devices", "mode", "tokens/s per device", "tokens/s, all",
                     "cloud engine ms per token", "p99 between tokens, ms", "agreement"], rows)]
    spent = data.get("speculative_over_cloud_engine_s_per_token")
    if spent:
        lines += ["", "Cloud engine time per token, speculative ÷ cloud: " + ", ".join(
            f"{ratio(v)} at {n}" for n, v in sorted(spent.items(), key=lambda kv: int(kv[0]))) + "."]
    return lines


def soak(data: dict) -> list[str]:
    figures = ["tried", "refused_cleanly", "verified", "unexpected", "offline_tokens"]
    rows = [[case, *(count(c[f]) for f in figures)] for case, c in data["cases"].items()]
    rows.append(["**all**", *(f"**{count(data[f])}**" for f in figures)])
    return [*table(["case", *(f.replace("_", " ") for f in figures)], rows), "",
            f"{duration(data['seconds'])}{', interrupted' if data['interrupted'] else ''}; "
            f"peak RSS {count(data['peak_rss_bytes'])} bytes."]


def device_install_size(data: dict) -> list[str]:
    rows = [["the `[device]` extra, without pip", rate(data["without_pip_mb"])],
            *([name, rate(mb)] for name, mb in data["largest_mb"].items())]
    return [*table(["installed", "MB"], rows), "",
            f"torch installed: {'yes' if data['torch_installed'] else 'no'}; then generated "
            f"{data['generation']['tokens']} tokens with it."]


FORMATTERS: dict[str, Callable[[dict], list[str]]] = {
    f.__name__: f for f in (family_vs_separate, train_throughput, exit_tuning, exit_distillation,
                            device_latency, int8_cost, exit_tradeoff, cloud_throughput, serving,
                            link_modes, many_devices, soak, device_install_size)}  # by the script that wrote the JSON


# --- the report --------------------------------------------------------------------------------

def load(results: Path) -> tuple[dict[str, dict | str], dict | None]:
    """Every benchmark JSON under `results` by name (its text when it is not JSON), and suite.json."""
    loaded: dict[str, dict | str] = {}
    for path in sorted(results.glob("*.json")):
        try:
            loaded[path.stem] = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            loaded[path.stem] = f"not valid JSON ({error})"
    suite = loaded.pop("suite", None)
    return loaded, suite if isinstance(suite, dict) else None


def command_of(name: str, data: dict, suite: dict | None) -> str | None:
    """The command that wrote a JSON: its own record, else the suite run's, else the suite's list."""
    if data.get("command"):
        return data["command"].strip()
    for entry in (suite or {}).get("entries", []):
        if entry.get("name") == name and entry.get("command"):
            return entry["command"]
    for entry in SUITE:
        if entry.name == name:
            return "python bench/" + shlex.join(entry.argv)
    return None


def script_of(name: str, command: str | None) -> str:
    """The benchmark script behind a JSON (`--name` may have renamed the JSON)."""
    words = shlex.split(command) if command else []
    scripts = [Path(w).stem for w in words if w.endswith(".py")]
    return scripts[0] if scripts else name


def figures(name: str, data: dict | str, command: str | None) -> list[str]:
    if isinstance(data, str):
        return [f"could not read figures: {data}"]
    formatter = FORMATTERS.get(script_of(name, command))
    if formatter is None:
        return ["No formatter for this JSON in bench/report.py; its figures are in the file."]
    try:
        return formatter(data)
    except KeyError as error:  # a JSON from an older version of the script
        return [f"could not read figures: {error.args[0]} missing"]
    except (TypeError, IndexError, AttributeError, ValueError) as error:  # null or a changed shape
        return [f"could not read figures: {type(error).__name__}: {error}"]


def status(entry: dict) -> str:
    if entry.get("skipped") == ["long: --long"]:
        return "skipped: an hour or more (`flow bench all --long` runs it)"
    if "skipped" in entry:
        return "skipped: needs " + ", ".join(entry["skipped"])
    code = entry.get("returncode")
    return "ran" if code == 0 else "–" if code is None else f"failed (exit {code})"


def header(benchmarks: dict[str, dict | str], suite: dict | None) -> list[str]:
    records = [d for d in [*benchmarks.values(), suite] if isinstance(d, dict)]
    machines = {}
    for record in records:
        m = record.get("machine") or {}
        if m:
            key = f"{m.get('cpus', '?')} CPUs, {m.get('platform', '?')}, Python {m.get('python', '?')}"
            machines[key] = machines.get(key, 0) + 1
    when = sorted(r["machine"]["when"] for r in records if (r.get("machine") or {}).get("when"))
    lines = ["### Benchmark results" if suite is None else "### Results of one `flow bench all`", ""]
    if len(machines) <= 1:
        lines.append(f"Machine: {next(iter(machines), 'not recorded')}.")
    else:
        lines.append("Machines: " + "; ".join(f"{m} ({n} results)" for m, n in machines.items()) + ".")
    if when:
        lines[-1] += f" Runs from {when[0]} to {when[-1]}."
    if suite is None:
        return [*lines, "", "No suite.json: these results come from separate runs, not one `flow bench all`."]
    entries = suite.get("entries", [])
    total = sum(e.get("seconds", 0) for e in entries)
    return [*lines, f"The suite took {duration(total)} in all.", "",
            *table(["benchmark", "command", "time", "status"],
                   [[e.get("name", "?"), f"`{e.get('command', '?')}`", duration(e.get("seconds")), status(e)]
                    for e in entries])]


def render(results: Path, link_from: Path) -> str:
    """The report on the JSONs under `results`; plots linked relative to the directory `link_from`."""
    benchmarks, suite = load(results)
    if not benchmarks and suite is None:
        raise ReportError(f"no benchmark JSON under {results}; run `flow bench all` first")
    order = [e.name for e in SUITE]
    ran = {e.get("name") for e in (suite or {}).get("entries", []) if e.get("returncode") == 0}
    lines = header(benchmarks, suite)
    for name in sorted(benchmarks, key=lambda n: (order.index(n) if n in order else len(order), n)):
        data = benchmarks[name]
        command = command_of(name, data, suite) if isinstance(data, dict) else None
        lines += ["", f"#### {name}", "", f"`{command}`" if command else "(command not recorded)", ""]
        when = (data.get("machine") or {}).get("when") if isinstance(data, dict) else None
        if suite is not None and name not in ran:
            lines += [f"Not part of this `flow bench all` run: from a separate run"
                      f"{f' ({when})' if when else ''}.", ""]
        lines += figures(name, data, command)
        plot = results / f"{name}.png"
        if plot.exists():
            lines += ["", f"Plot: [{plot.name}]({Path(os.path.relpath(plot, link_from)).as_posix()})"]
    return "\n".join(lines) + "\n"


def write(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def into_readme(readme: Path, report: str) -> str:
    """README's text with the report between its marker lines; ReportError when they are missing."""
    if not readme.is_file():
        raise ReportError(f"{readme} does not exist; pass the README with --readme-path")
    lines = readme.read_text().splitlines(keepends=True)
    marked = [i for i, line in enumerate(lines) if line.strip() in (BEGIN, END)]
    if [lines[i].strip() for i in marked] != [BEGIN, END]:
        raise ReportError(f"{readme} needs one line `{BEGIN}` followed by one line `{END}` "
                         f"where the report goes; add them and run again")
    begin, end = marked
    return "".join([*lines[:begin + 1], "\n", report, "\n", *lines[end:]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Turn the benchmarks' JSON under bench/results/ (one `flow bench all`) into a "
                    "markdown report: the machine, the dates and suite.json's entries (command, "
                    "time, ran / failed / skipped), then per benchmark its command, a table of "
                    "the figures the README quotes and its plot. Writes REPORT.md in the results "
                    "directory and prints its path.",
        epilog=f"examples: `python bench/report.py` writes bench/results/REPORT.md; `python "
               f"bench/report.py --readme` also puts the report into README.md between its lines "
               f"{BEGIN} and {END} (an error, changing nothing, when they are missing).")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="directory of the benchmark JSONs and suite.json (default: %(default)s)")
    parser.add_argument("--readme", action="store_true",
                        help=f"also replace the text between the lines {BEGIN} and {END} of the "
                             f"README with the report")
    parser.add_argument("--readme-path", type=Path, default=REPO / "README.md",
                        help="the README --readme writes (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        report_path = args.results / REPORT
        readme = into_readme(args.readme_path, render(args.results, args.readme_path.parent)) \
            if args.readme else None  # checked before anything is written
        write(report_path, render(args.results, args.results))
        print(f"wrote {report_path}")
        if readme is not None:
            write(args.readme_path, readme)
            print(f"wrote {args.readme_path}")
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
