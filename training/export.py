"""A megatron-core checkpoint of any (TP, PP) layout -> a family artifact (`flow convert`).

The dist checkpoint is loaded into a single-rank (TP=1, PP=1) megatron model with the local layer
spec — megatron-core reshards on load — and its tensors are mapped to the family's names.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flow.artifact import FamilyManifest, file_sha256
from flow.config import FamilyConfig
from flow.data.tokenizer import EOS_TOKEN
from training import run_dir


def checkpoint_to_family(path: Path | str, out: Path | str, overwrite: bool = False) -> FamilyManifest:
    """Convert the checkpoint at `path` (an iteration or a run directory) into a family at `out`."""
    from flow.family import Family
    from training import checkpoint
    from training.convert import megatron_to_family
    from training.distributed import initialize, shutdown
    from training.megatron_model import build_model, local_layer_spec

    iteration = run_dir.resolve(path)
    run = run_dir.read_config(iteration.parent)
    family_config = FamilyConfig.from_dict(run["family"])
    initialize(tensor=1, pipeline=1, seed=0)
    try:
        model = build_model(family_config, spec=("local", local_layer_spec(family_config)))
        common = checkpoint.load(iteration, model, optimizer=None)
        tensors = megatron_to_family(model.state_dict(), family_config)
    finally:
        shutdown()
    corpus = Path(run["train"]["data"]["corpus"])
    corpus_manifest = corpus / "corpus.json"
    provenance = {
        "source": "megatron-core",
        "checkpoint": str(iteration.resolve()),
        "steps": common["step"],
        "metrics": common["extra"].get("last_metrics", {}),
        "data": {"corpus": str(corpus.resolve()),
                 "corpus_sha256": file_sha256(corpus_manifest) if corpus_manifest.is_file() else None},
        "train_config": run["train"],
    }
    family = Family.from_tensors(family_config, {k: v.to(torch.float32) for k, v in tensors.items()},
                                 tokenizer=run["tokenizer"], provenance=provenance,
                                 stop_tokens=run.get("stop_tokens", (EOS_TOKEN,)))
    return family.save(out, overwrite=overwrite)

