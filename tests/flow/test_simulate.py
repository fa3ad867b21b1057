"""`flow simulate` on a tiny family: real tier and device processes behind link shapers, every
token accounted for, the lossless modes exactly the full model, and bytes that add up."""

import json

import pytest

from runs import flow

PROGRAMS = ["def add(a, b):\n    return a + b\n", "def neg(x):\n    return -x\n",
            "import os\n\ndef here():\n    return os.getcwd()\n"]


@pytest.fixture
def corpus(tmp_path):
    """A corpus whose held-out split has three short functions to prompt with."""
    directory = tmp_path / "corpus"
    directory.mkdir()
    (directory / "corpus.json").write_text("{}")
    (directory / "heldout.jsonl").write_text(
        "".join(json.dumps({"path": f"p{i}.py", "text": t}) + "\n" for i, t in enumerate(PROGRAMS)))
    return directory


def test_simulate_reports_every_mode_of_two_devices_on_shaped_links(agreeing_family, corpus,
                                                                   tmp_path):
    """Catches: a token without its tier, a lossless mode (speculative with adaptive drafts,
    auto, cloud) leaving the full model's tokens, devices that did not all run, bytes the devices
    count that did not cross their shapers (or far fewer than did), and processes left behind."""
    family_dir, _ = agreeing_family
    out = tmp_path / "report.json"
    result = flow("simulate", family_dir, "--devices", "2", "--profile", "lan", "--mode", "exit",
                  "speculative", "auto", "cloud", "--corpus", corpus, "--prompts", "3",
                  "--tokens", "8", "--out", out, timeout=300)
    report = json.loads(out.read_text())
    assert "tok/s/dev" in result.stdout and set(report["modes"]) == {"exit", "speculative",
                                                                      "auto", "cloud"}
    for mode, figures in report["modes"].items():
        assert figures["errors"] == [], (mode, figures["errors"])
        assert figures["tokens"] == 2 * 3 * 8, mode  # every prompt of every device, in full
        assert sum(figures["tier_share"].values()) == pytest.approx(1.0)
        assert figures["round_trips_per_token"] > 0
        for device in figures["per_device"]:
            assert device["returncode"] == 0 and len(device["results"]) == 3
            up = sum(r["bytes_sent"] for r in device["results"])
            down = sum(r["bytes_received"] for r in device["results"])
            # the payload the device counted crossed its shaper, inside gRPC's framing
            assert up <= device["shaper_bytes_up"] <= up + 4096 * (1 + sum(
                r["round_trips"] for r in device["results"])), mode
            assert down <= device["shaper_bytes_down"]
    for mode in ("speculative", "auto", "cloud"):
        assert report["modes"][mode]["agreement"] == 1.0, mode
    assert report["modes"]["auto"]["modes_run"] == ["cloud", "speculative"]
    assert 0 < report["modes"]["exit"]["tier_share"].get("device", 0) < 1
    assert report["modes"]["speculative"]["cloud_engine_s_per_token"] > 0


def test_simulate_through_an_edge_with_engine_workers(agreeing_family, corpus, tmp_path):
    """Catches: `--edge` or `--workers` starting a topology whose devices cannot reach the cloud
    (every token offline), or an edge whose speculative output leaves the full model's."""
    family_dir, _ = agreeing_family
    out = tmp_path / "report.json"
    flow("simulate", family_dir, "--devices", "2", "--profile", "lan", "--mode", "speculative",
         "--edge", "--workers", "1", "--corpus", corpus, "--prompts", "2", "--tokens", "8",
         "--out", out, timeout=300)
    figures = json.loads(out.read_text())["modes"]["speculative"]
    assert figures["errors"] == [] and figures["tokens"] == 2 * 2 * 8
    assert figures["agreement"] == 1.0
    assert not any(name.endswith("(offline)") for name in figures["tier_share"]), figures
    # verifications go through the edge to the full model: settled by the cloud, or drafts kept
    assert set(figures["tier_share"]) == {"cloud", "device"}
