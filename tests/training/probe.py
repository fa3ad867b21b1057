"""A torchrun script the tests use to look inside real training ranks.

    torchrun --nproc-per-node N probe.py RUN_DIR OUT_DIR grads    # d(loss)/d(embedding), one step
    torchrun --nproc-per-node N probe.py RUN_DIR OUT_DIR logits   # every exit's logits
    torchrun --nproc-per-node N probe.py RUN_DIR OUT_DIR step     # every trainable gradient, one step
    torchrun --nproc-per-node N probe.py RUN_DIR OUT_DIR losses A,B,..  # step 0's losses per α

`grads` and `logits` write full tensors from the ranks that hold them (data-parallel rank 0,
tensor-parallel rank 0). `step` runs the first step's forward and backward as training does and
writes, per (tensor, pipeline) rank, each trainable parameter's reduced gradient under its
megatron name (`grads_tp{t}_pp{p}.pt`) and `facts_tp{t}_pp{p}.json`: which parameters have
gradients, which the optimizer holds, and how many tensors autograd saved for backward while a
backbone module ran. `losses` writes the per-exit objective and CE of step 0's batch for each α
(`losses.json`), without updating anything.
"""

import json
import sys
from pathlib import Path

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from training.plan import RunPlan
from training.schedules import exit_loss_weights
from training.trainer import Trainer


def backbone_modules(model) -> list[torch.nn.Module]:
    """The megatron modules of this stage that are not exit branches."""
    modules = list(model.decoder.layers)
    if model.pre_process:
        modules.append(model.embedding)
    if model.post_process:
        modules += [model.decoder.final_layernorm, model.output_layer]
    return modules


def one_step(trainer: Trainer, out: Path) -> None:
    model = trainer.model
    saved = {"backbone": 0, "elsewhere": 0}
    depth = [0]  # > 0 while a backbone module's own forward runs (exit hooks run after it)
    for module in backbone_modules(model):
        module.register_forward_pre_hook(lambda *_: depth.__setitem__(0, depth[0] + 1))
        module.register_forward_hook(lambda *_: depth.__setitem__(0, depth[0] - 1), prepend=True)

    def pack(tensor):
        saved["backbone" if depth[0] else "elsewhere"] += 1
        return tensor

    weights = exit_loss_weights(trainer.config, trainer.family.num_exits, 0)
    trainer.ddp.zero_grad_buffer()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        trainer._forward_backward(trainer.train_sampler, 0, True, weights)
    names = {id(p): name for name, p in model.named_parameters()}
    with_grad = sorted(name for name, p in model.named_parameters()
                       if p.grad is not None or getattr(p, "main_grad", None) is not None)
    optimized = sorted(names[id(p)] for group in trainer.optimizer.param_groups for p in group["params"])
    facts = {"with_grad": with_grad, "optimized": optimized, "saved_tensors": saved,
             "all": sorted(names.values())}
    grads = {name: p.main_grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    rank = f"tp{ps.get_tensor_model_parallel_rank()}_pp{ps.get_pipeline_model_parallel_rank()}"
    if ps.get_data_parallel_rank() == 0:
        torch.save(grads, out / f"grads_{rank}.pt")
        (out / f"facts_{rank}.json").write_text(json.dumps(facts))


def main(run_dir: str, out_dir: str, mode: str, *extra: str) -> None:
    trainer = Trainer(RunPlan.load(run_dir), Path(run_dir))
    out = Path(out_dir)
    writer = ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0
    if mode == "grads":
        weights = exit_loss_weights(trainer.config, trainer.family.num_exits, 0)
        trainer.ddp.zero_grad_buffer()
        trainer._forward_backward(trainer.train_sampler, 0, True, weights)
        if ps.is_pipeline_first_stage():
            grad = trainer.model.embedding.word_embeddings.weight.main_grad  # (vocab / tp, hidden)
            full = gather_from_tensor_model_parallel_region(grad.t().contiguous()).t()
            if writer:
                torch.save(full.clone(), out / "embedding_grad.pt")
    elif mode == "step":
        one_step(trainer, out)
    elif mode == "losses":
        weights = exit_loss_weights(trainer.config, trainer.family.num_exits, 0)
        results = {}
        for alpha in extra[0].split(","):
            trainer.model.exit_losses.alpha = float(alpha)
            with torch.no_grad():
                results[alpha] = trainer._forward_backward(trainer.train_sampler, 0, False, weights)
        if writer and ps.is_pipeline_last_stage():
            (out / "losses.json").write_text(json.dumps(results))
    else:
        ids = torch.arange(24).remainder(trainer.family.vocab_size).view(2, 12) * 7 % trainer.family.vocab_size
        for k, logits in trainer.exit_logits(ids).items():
            if writer:
                torch.save(logits.clone(), out / f"logits_{k}.pt")
        if writer and ps.is_pipeline_first_stage():
            torch.save(ids, out / "input_ids.pt")


if __name__ == "__main__":
    try:
        main(*sys.argv[1:])
    finally:
        from training.distributed import shutdown

        shutdown()
