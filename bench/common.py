"""What every benchmark shares: where results go, and writing them without half-written files."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as `python bench/x.py` from anywhere in the checkout

from flow.fsutil import atomic_file  # noqa: E402
from flow.quiet import quiet  # noqa: E402, F401  (the benches silence exporters with it)

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


def parse_with_quick(parser: argparse.ArgumentParser, quick: dict,
                     argv: list[str] | None = None) -> argparse.Namespace:
    """`argv` (default: the command line) parsed; with --quick, `quick` replaces the defaults
    (flags given explicitly still win)."""
    argv = sys.argv[1:] if argv is None else argv
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(**quick)
    return parser.parse_args(argv)


def add_generation_arguments(parser: argparse.ArgumentParser, prompts: int, tokens: int = 32,
                             exit: int = 1) -> None:
    """The options of a benchmark that generates on a family's member from held-out code prompts:
    --family, --exit, --corpus, --prompts, --tokens."""
    parser.add_argument("--family", type=Path, default=REPO / "runs/smollm2/family",
                        help="family directory with exported members (default: %(default)s)")
    parser.add_argument("--exit", type=int, default=exit, help=f"the devices' member (default {exit})")
    parser.add_argument("--corpus", type=Path, default=REPO / "runs/demo/corpus",
                        help="corpus whose held-out split gives the prompts (default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=prompts,
                        help=f"prompts per device (default {prompts})")
    parser.add_argument("--tokens", type=int, default=tokens,
                        help=f"tokens per prompt (default {tokens})")


def transformers_model(family, directory: Path):
    """The family's full model written by `Family.export_hf` under `directory` and loaded by
    `transformers`' AutoModelForCausalLM: the independent generator the benchmarks compare with."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    with quiet("transformers", "torch"):
        hf_dir = family.export_hf(Path(directory) / "hf", exit=family.config.last_exit)
        return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=family.dtype).eval()


def transformers_greedy(model, prompts: list[list[int]], new: int) -> list[list[int]]:
    """Exactly `new` greedy tokens after each prompt, in one batched call; prompts of different
    lengths are left-padded (token 0, masked out), as a static batch serves them."""
    import torch

    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    with torch.no_grad(), quiet("transformers", "torch"):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0)
    return out[:, width:].tolist()


def token_agreement(outputs: list[list[int]], references: list[list[int]]) -> float:
    """Share of the generated tokens equal to the reference's token at the same position."""
    same = sum(a == b for output, reference in zip(outputs, references, strict=True)
               for a, b in zip(output, reference, strict=False))
    return same / sum(len(output) for output in outputs)
