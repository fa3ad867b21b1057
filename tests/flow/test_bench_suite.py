"""bench/suite.py: every entry is a command its script accepts."""

import argparse
import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))  # the bench scripts import their siblings (common, suite)
from suite import SUITE  # noqa: E402


class Parsed(Exception):
    """Raised where a script's arguments have parsed: the benchmark itself never runs."""


@pytest.mark.parametrize("entry", SUITE, ids=lambda entry: entry.name)
def test_every_suite_entry_is_a_command_its_script_accepts(entry, monkeypatch):
    """Catches: an entry without an argument its script requires, or with one it does not know,
    found otherwise only when a run of the whole suite (about an hour) reaches it."""
    script = importlib.import_module(Path(entry.argv[0]).stem)
    monkeypatch.setattr(sys, "argv", [str(BENCH / entry.argv[0]), *entry.argv[1:]])
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        raise Parsed(parse(parser, args, namespace))  # a bad command exits 2 inside parse

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(Parsed):
        script.main()
