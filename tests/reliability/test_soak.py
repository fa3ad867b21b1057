"""`bench/soak.py` for a short while: every case it has runs against real `flow serve` processes,
the tier's outputs check out against the reference model, the servers' memory is measured, and
nothing unexpected happens."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"
KINDS = {"flood", "malformed", "oversized", "bad_token", "churn", "kill", "freeze", "server"}


@pytest.mark.slow
def test_a_short_soak_tries_every_case_and_finds_nothing_unexpected(tmp_path):
    """Catches: a refusal answered UNKNOWN or INTERNAL (bytes that are no message, an oversized
    call), a traceback in `flow serve`'s stderr, a tier that does not answer right again after
    a SIGSTOP/SIGCONT or a killed worker, a device client or call that hangs, a server that
    does not stop on SIGTERM, and tokens the tier settled that are not the full model's; and the
    soak itself losing a case or its memory figure, or leaving a process behind on SIGTERM."""
    soak = subprocess.Popen([sys.executable, str(SOAK), "--duration", "20", "--results", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = soak.communicate(timeout=55)
    except subprocess.TimeoutExpired:
        soak.send_signal(signal.SIGTERM)  # it kills every server it started, then reports
        out, err = soak.communicate(timeout=30)
        pytest.fail(f"the soak ran past 55 s:\n{out}\n{err[-3000:]}")
    result = json.loads((tmp_path / "soak.json").read_text())
    assert set(result["cases"]) == KINDS
    assert all(case["tried"] > 0 for case in result["cases"].values()), result["cases"]
    assert result["unexpected"] == 0, "\n".join(
        f"[{d['case']}, {d['config']}] x{d['count']}: {d['what']}" for d in result["unexpected_details"])
    assert result["verified"] > 0 and result["peak_rss_bytes"] > 0, out
    assert soak.returncode == 0, err[-3000:]
