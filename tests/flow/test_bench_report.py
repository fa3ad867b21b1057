"""bench/report.py: the benchmarks' JSON as the README's results section."""

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
MACHINE = {"python": "3.11.7", "machine": "x86_64", "cpus": 2, "platform": "Linux-test",
           "when": "2026-11-30 05:06:30"}


@pytest.fixture(scope="module")
def report():
    sys.path.insert(0, str(BENCH))  # the bench scripts import their siblings (common, suite)
    try:
        return importlib.import_module("report")
    finally:
        sys.path.remove(str(BENCH))


def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def link_row(tokens_per_s: float, agreement: float = 1.0, bytes_up: float = 8.0) -> dict:
    return {"tokens": 96, "tokens_per_s": tokens_per_s, "first_token_ms": 180.4,
            "bytes_up_per_token": bytes_up, "agreement": agreement, "device_share": 0.3}


@pytest.fixture
def results(tmp_path) -> Path:
    """A results directory of one link_modes.json (profiles lan and 4g, one variant only on lan)
    and the suite.json of a run that ran it, failed one benchmark and skipped another."""
    directory = tmp_path / "results"
    write(directory / "link_modes.json", {
        "machine": {**MACHINE, "when": "2026-11-30 05:06:30"},
        "command": "python bench/link_modes.py ",
        "results": {
            "lan": {"cloud": link_row(16.94), "speculative-adaptive@int8": link_row(30.0, 0.5),
                    "exit": link_row(23.0, 0.84375, 6972.3)},
            "4g": {"cloud": link_row(14.9), "speculative-adaptive@int8": link_row(12.345, 0.8766, 12345.6)},
        },
        "baselines": {"transformers generate": {"tokens_per_s": 9.87, "first_token_ms": 250.0,
                                                "agreement": 1.0, "what": "the full model, batch 1"},
                      "member 1 alone": {"tokens_per_s": 60.0}}})
    write(directory / "suite.json", {"machine": {**MACHINE, "when": "2026-11-30 09:00:00"}, "entries": [
        {"name": "link_modes", "command": "python bench/link_modes.py", "returncode": 0, "seconds": 100.0},
        {"name": "soak", "command": "python bench/soak.py", "returncode": 1, "seconds": 25.5},
        {"name": "int8_cost", "command": "python bench/int8_cost.py", "skipped": ["runs/demo/family"]}]})
    (directory / "link_modes.png").write_bytes(b"png")
    return directory


def tables(markdown: str) -> list[dict[str, dict[str, str]]]:
    """Every markdown table as {first cell of a row: {column header: cell}}."""
    found, lines = [], markdown.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("|---"):
            header = [c.strip() for c in lines[index - 1].strip("|").split("|")]
            rows = {}
            for row in lines[index + 1:]:
                if not row.startswith("|"):
                    break
                cells = [c.strip() for c in row.strip("|").split("|")]
                rows[cells[0]] = dict(zip(header, cells, strict=True))
            found.append(rows)
    return found


def section(markdown: str, name: str) -> str:
    return markdown.split(f"#### {name}\n", 1)[1].split("\n#### ", 1)[0]


def test_link_modes_figures_land_in_their_cells(report, results, capsys):
    """Catches: a figure in the wrong row or column, or formatted with the wrong precision."""
    assert report.main(["--results", str(results)]) == 0
    assert str(results / "REPORT.md") in capsys.readouterr().out
    text = (results / "REPORT.md").read_text()
    tokens, first_token, agreement_bytes, baselines = tables(section(text, "link_modes"))
    assert tokens["speculative-adaptive@int8"]["4g"] == "12.3"
    assert tokens["speculative-adaptive@int8"]["lan"] == "30.0"
    assert tokens["cloud"] == {"variant": "cloud", "lan": "16.9", "4g": "14.9"}
    assert tokens["exit"]["4g"] == "–"  # not measured on that profile
    assert first_token["cloud"]["lan"] == "180"
    assert agreement_bytes["speculative-adaptive@int8"]["4g"] == "87.7 % / 12,346"
    assert agreement_bytes["exit"]["lan"] == "84.4 % / 6,972"
    assert baselines["transformers generate"]["tokens/s"] == "9.9"
    assert baselines["transformers generate"]["what"] == "the full model, batch 1"
    assert baselines["member 1 alone"]["first token ms"] == "–"
    assert "`python bench/link_modes.py`" in section(text, "link_modes")
    assert "Plot: [link_modes.png](link_modes.png)" in text


def test_header_names_the_machine_the_dates_and_each_suite_entry(report, results):
    text = report.render(results, results)
    assert "Machine: 2 CPUs, Linux-test, Python 3.11.7." in text
    assert "Runs from 2026-11-30 05:06:30 to 2026-11-30 09:00:00." in text
    assert "The suite took 126 s in all." in text  # 100 + 25.5
    suite = tables(text)[0]
    assert suite["link_modes"]["status"] == "ran" and suite["link_modes"]["time"] == "100 s"
    assert suite["soak"]["status"] == "failed (exit 1)"
    assert suite["int8_cost"] == {"benchmark": "int8_cost", "command": "`python bench/int8_cost.py`",
                                  "time": "–", "status": "skipped: needs runs/demo/family"}


def test_a_result_the_suite_run_did_not_make_says_so(report, results):
    """Catches: an older JSON (a skipped or failed entry's, or one outside the suite) passing for
    a figure of the run the header describes."""
    write(results / "soak.json", {"machine": {**MACHINE, "when": "2026-11-01 10:00:00"},
                                  "cases": {}, "seconds": 1.0, "interrupted": False})
    text = report.render(results, results)
    assert "Not part of this `flow bench all` run: from a separate run (2026-11-01 10:00:00)." in \
        section(text, "soak")  # soak failed in this run: its JSON is older
    assert "Not part of" not in section(text, "link_modes")  # ran


def test_partial_unknown_and_broken_json_each_get_a_line_not_a_crash(report, results):
    """Catches: one older or foreign JSON killing the whole report."""
    write(results / "many_devices.json", {"machine": MACHINE, "profile": "4g", "tokens_per_prompt": 32,
                                          "results": {"8": {"cloud": {"tokens_per_s_total": 24.2}}}})
    write(results / "mystery.json", {"machine": MACHINE, "command": "python bench/mystery.py --fast"})
    (results / "torn.json").write_text('{"machine": ')
    text = report.render(results, results)
    assert section(text, "many_devices").strip().endswith(
        "could not read figures: tokens_per_s_per_device missing")
    assert "`python bench/many_devices.py`" in section(text, "many_devices")  # from SUITE
    mystery = section(text, "mystery")
    assert "`python bench/mystery.py --fast`" in mystery and "No formatter" in mystery
    assert "could not read figures: not valid JSON" in section(text, "torn")
    assert tables(section(text, "link_modes"))[0]["cloud"]["lan"] == "16.9"  # the rest still there


def test_readme_gets_the_report_between_its_markers_and_nothing_else_changes(report, results, tmp_path):
    readme = tmp_path / "README.md"
    before = "# Project\n\n## Measured\n\nProse.\n<!-- bench-report:begin -->\n"
    after = "<!-- bench-report:end -->\n\n## Packaging\n\nMore prose.\n"
    readme.write_text(before + "an old report\n| a | table |\n" + after)
    assert report.main(["--results", str(results), "--readme", "--readme-path", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(before) and text.endswith(after)
    between = text[len(before):-len(after)]
    assert "an old report" not in between and "#### link_modes" in between
    assert tables(between)[1]["speculative-adaptive@int8"]["4g"] == "12.3"
    assert "Plot: [link_modes.png](results/link_modes.png)" in between  # relative to the README
    assert "Plot: [link_modes.png](link_modes.png)" in (results / "REPORT.md").read_text()


def test_readme_without_markers_is_an_error_and_left_as_it_was(report, results, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n\n<!-- bench-report:begin -->\nno end marker\n")
    original = readme.read_bytes()
    assert report.main(["--results", str(results), "--readme", "--readme-path", str(readme)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "<!-- bench-report:end -->" in error and str(readme) in error
    assert readme.read_bytes() == original
    assert not (results / "REPORT.md").exists()  # nothing written when the README cannot take it


def test_every_real_result_gets_a_subsection_with_its_figures(tmp_path):
    """Catches: a formatter out of step with what its benchmark writes today."""
    copied = tmp_path / "results"
    shutil.copytree(BENCH / "results", copied, ignore=shutil.ignore_patterns("REPORT.md"))
    names = sorted(p.stem for p in copied.glob("*.json") if p.stem != "suite")
    assert names, "bench/results/ has no JSON"
    run = subprocess.run([sys.executable, str(BENCH / "report.py"), "--results", str(copied)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    text = (copied / "REPORT.md").read_text()
    for name in names:
        assert f"#### {name}\n" in text
        body = section(text, name)
        assert "could not read figures" not in body and "No formatter" not in body, (name, body)
        assert tables(body), name


def test_cloud_throughput_says_how_its_clients_ran(report, tmp_path):
    """Catches: the clients' setting shown mangled ("each in a processe of its own")."""
    results = tmp_path / "results"
    results.mkdir()
    data = json.loads((BENCH / "results" / "cloud_throughput.json").read_text())
    for clients_in, said in (("processes", "gRPC clients: each in a process of its own."),
                             ("threads", "gRPC clients: threads of one process, sharing its GIL.")):
        write(results / "cloud_throughput.json", {**data, "clients_in": clients_in})
        assert said in section(report.render(results, results), "cloud_throughput")
