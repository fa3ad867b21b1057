"""What every benchmark shares: where results go, and writing them without half-written files."""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as `python bench/x.py` from anywhere in the checkout

from flow.fsutil import atomic_file  # noqa: E402

RESULTS = REPO / "bench" / "results"


def machine() -> dict:
    import os

    return {"python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "platform": platform.platform(),
            "when": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_json(name: str, data: dict) -> Path:
    path = RESULTS / f"{name}.json"
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({"machine": machine(), **data}, indent=2) + "\n")
    return path


def save_figure(figure, name: str) -> Path:
    path = RESULTS / f"{name}.png"
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


@contextlib.contextmanager
def quiet(*logger_names: str):
    """Silence warnings and the named loggers below ERROR (exporters, quantizers, generation)."""
    loggers = [logging.getLogger(name) for name in ("", *logger_names)]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)
