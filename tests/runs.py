"""Running `flow` as a user does (a real process) and reading what a training run wrote."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml


def write_config(directory: Path, corpus: Path, **sections) -> Path:
    """A tiny run: 4 layers, exits after layers 0, 1, 2 (both stages when PP=2) and 3."""
    config = {
        "model": {"preset": "tiny", "num_layers": 4, "exits": [0, 1, 2], "max_seq_len": 64},
        "data": {"corpus": str(corpus)},
        "parallel": {"tensor": 1, "pipeline": 1, "data": 1},
        "train": {"steps": 5, "seq_len": 32, "micro_batch_size": 2, "global_batch_size": 8,
                  "lr": 0.003, "warmup_steps": 1},
        "eval": {"interval": 5, "batches": 2},
        "checkpoint": {"dir": str(directory / "ckpt"), "interval": 5},
        "output": str(directory / "family"),
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values} if isinstance(values, dict) else values
    path = directory / "config.yaml"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def flow(*args, check=True, timeout=600):
    result = subprocess.run([sys.executable, "-m", "flow.cli.main", *map(str, args)],
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode:
        raise AssertionError(f"flow {args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


PROBE = Path(__file__).parent / "training" / "probe.py"


def probe(run: Path, out: Path, mode: str, ranks: int, *extra: str) -> Path:
    """Run tests/training/probe.py in `mode` on the run prepared in `run` with `ranks` processes."""
    out.mkdir(exist_ok=True)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc-per-node={ranks}", str(PROBE), str(run / "ckpt"), str(out), mode,
                             *extra], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-6000:]
    return out


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "ckpt" / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(reference: Path, run: Path, steps: int = 5) -> None:
    """`run` logged the per-exit losses of `reference` at every step (and its last validation),
    to 1e-4, and training moved every exit's loss."""
    import numpy as np

    expected, got = metrics(reference), metrics(run)
    assert [m["step"] for m in got] == list(range(1, steps + 1))
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-4)
    np.testing.assert_allclose(got[-1]["val_loss"], expected[-1]["val_loss"], rtol=1e-4)
    assert all(last < first - 0.05 for first, last in zip(got[0]["loss"], got[-1]["loss"], strict=True))


def assert_family_logits_match_megatron(run: Path, ranks: int) -> None:
    """Every exit of the family `flow train` wrote from `run` gives megatron's logits (1e-4),
    megatron's read from the run's newest checkpoint in `ranks` processes (its own layout)."""
    import torch

    from flow import Family

    out = probe(run, run / "probe", "logits", ranks)
    family = Family.load(run / "family")
    ids = torch.load(out / "input_ids.pt")
    for k in range(family.config.num_exits):
        megatron_logits = torch.load(out / f"logits_{k}.pt")
        assert (megatron_logits - family.logits(ids, exit=k)).abs().max().item() <= 1e-4


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    # A meta-path finder that refuses torch makes `import torch` fail as on a device install.
    blocker = textwrap.dedent("""
        import sys
        class _NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, _NoTorch())
    """)
    return subprocess.run([sys.executable, "-c", blocker + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120)


def free_port() -> int:
    """A port nothing listens on right now (for a server that must come back on the same one)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_flow_serve(family_dir: Path, port: int = 0, *args) -> tuple[subprocess.Popen, str]:
    """`flow serve` as a real process; returns it and its address once it listens."""
    process = subprocess.Popen([sys.executable, "-m", "flow.cli.main", "serve", str(family_dir),
                                "--port", str(port), *map(str, args)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if not line.startswith("listening on "):
        process.kill()
        raise AssertionError(f"flow serve did not start: {line!r}\n{process.stderr.read()[-3000:]}")
    return process, line.split()[-1]
