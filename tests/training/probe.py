"""A torchrun script the tests use to look inside real training ranks.

    torchrun --nproc-per-node N probe.py RUN_DIR OUT_DIR grads    # d(loss)/d(embedding), one step
    torchrun --nproc-per-node N probe.py RUN_DIR OUT_DIR logits   # every exit's logits

Each writes tensors from the ranks that hold them (data-parallel rank 0, tensor-parallel rank 0).
"""

import sys
from pathlib import Path

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from training.schedules import exit_loss_weights
from training.trainer import Trainer


def main(run_dir: str, out_dir: str, mode: str) -> None:
    trainer = Trainer(Path(run_dir))
    out = Path(out_dir)
    writer = ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0
    if mode == "grads":
        weights = exit_loss_weights(trainer.config, trainer.family.num_exits, 0)
        trainer.ddp.zero_grad_buffer()
        trainer._forward_backward(trainer.train_sampler, 0, False, weights)
        if ps.is_pipeline_first_stage():
            grad = trainer.model.embedding.word_embeddings.weight.main_grad  # (vocab / tp, hidden)
            full = gather_from_tensor_model_parallel_region(grad.t().contiguous()).t()
            if writer:
                torch.save(full.clone(), out / "embedding_grad.pt")
    else:
        ids = torch.arange(24).remainder(trainer.family.vocab_size).view(2, 12) * 7 % trainer.family.vocab_size
        for k, logits in trainer.exit_logits(ids).items():
            if writer:
                torch.save(logits.clone(), out / f"logits_{k}.pt")
        if writer and ps.is_pipeline_first_stage():
            torch.save(ids, out / "input_ids.pt")


if __name__ == "__main__":
    try:
        main(*sys.argv[1:4])
    finally:
        from training.distributed import shutdown

        shutdown()
