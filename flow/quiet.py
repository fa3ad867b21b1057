"""Silencing libraries that warn about themselves (exporters, quantizers, generation flags).

torch's ONNX exporter, onnxscript and ONNX Runtime's quantizer print dozens of warnings about
their own internals (torchvision not installed, deprecated tree specs, "consider pre-processing")
that say nothing about the user's model; `flow export-onnx` and the benchmarks run them quietly.
Errors still show.
"""

from __future__ import annotations

import contextlib
import logging
import warnings


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
