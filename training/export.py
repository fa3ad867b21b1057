"""A megatron-core checkpoint of any (TP, PP) layout -> a family artifact (`flow convert`).

The dist checkpoint is loaded into a single-rank (TP=1, PP=1) megatron model with the local layer
spec — megatron-core reshards on load — and its tensors are mapped to the family's names. The run's
`RunPlan`, saved beside the checkpoints, gives the architecture, tokenizer and end tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flow.artifact import FamilyManifest, file_sha256
from training import run_dir
from training.plan import RunPlan


def checkpoint_to_family(path: Path | str, out: Path | str, overwrite: bool = False,
                         trust: bool = False) -> FamilyManifest:
    """Convert the checkpoint at `path` (an iteration or a run directory) into a family at `out`.

    Unless `trust`, the checkpoint must hold exactly the files `flow train` recorded when it wrote
    it (`training.checkpoint`: loading one unpickles it)."""
    from flow.family import Family

    iteration = run_dir.resolve(path)
    plan = RunPlan.load(iteration.parent)
    tensors, common = _load_family_tensors(iteration, plan, trust)
    family = Family.from_tensors(plan.family, {k: v.to(torch.float32) for k, v in tensors.items()},
                                 tokenizer=plan.tokenizer, provenance=_provenance(plan, iteration, common),
                                 stop_tokens=plan.stop_tokens)
    return family.save(out, overwrite=overwrite)


def _load_family_tensors(iteration: Path, plan: RunPlan,
                         trust: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """The checkpoint's tensors under the family's names, and its common state (step, extra)."""
    from training import checkpoint
    from training.convert import megatron_to_family
    from training.distributed import initialize, shutdown
    from training.megatron_model import build_model, local_layer_spec

    initialize(tensor=1, pipeline=1, seed=0)
    try:
        model = build_model(plan.family, spec=("local", local_layer_spec(plan.family)))
        common = checkpoint.load(iteration, model, optimizer=None, trust=trust)
        return megatron_to_family(model.state_dict(), plan.family), common
    finally:
        shutdown()


def _provenance(plan: RunPlan, iteration: Path, common: dict) -> dict[str, Any]:
    """Where the family came from: the checkpoint, its step and metrics, the corpus and config."""
    corpus = Path(plan.config.data.corpus)
    corpus_manifest = corpus / "corpus.json"
    return {
        "source": "megatron-core",
        "checkpoint": str(iteration.resolve()),
        "steps": common["step"],
        "metrics": common["extra"].get("last_metrics", {}),
        "data": {"corpus": str(corpus.resolve()),
                 "corpus_sha256": file_sha256(corpus_manifest) if corpus_manifest.is_file() else None},
        "train_config": plan.config.to_dict(),
    }
