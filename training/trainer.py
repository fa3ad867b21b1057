"""One training rank: `python -m training.trainer RUN_DIR` under torchrun (see `training.launch`).

Builds this rank's part of the familial GPT, initialises it from a `Family` (so every parallel
layout starts from the same weights), wraps it in megatron-core DDP, and runs megatron-core's
pipeline schedule with a plain AdamW (megatron's optimizer wrappers hard-code CUDA). With a frozen
backbone the schedule runs forward-only, the model differentiates its exit branches inside that
forward (`training.megatron_model`), and the trainer reduces their gradients over data-parallel
ranks itself. Per-exit losses are collected by the model's `ExitLosses` and reduced over pipeline
stages and data-parallel ranks; rank 0 shows a progress bar and appends one JSON line per step to
RUN_DIR/metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from flow.config import FamilyConfig
from flow.data.tokens import open_tokens
from training import checkpoint
from training.config import TrainConfig
from training.data import WindowSampler, rank_microbatches
from training.distributed import initialize, shutdown
from training.plan import RunPlan
from training.run_dir import iteration_dir, latest_step
from training.schedules import exit_loss_weights, learning_rate

METRICS_FILE = "metrics.jsonl"


def initial_tensors(config: TrainConfig, family: FamilyConfig) -> dict[str, torch.Tensor]:
    """The family weights training starts from: random (seeded), Hugging Face or a family."""
    from flow.family import Family

    init = config.init
    if init.source == "random":
        start = Family.random(family, seed=init.seed)
    elif init.source == "hf":
        start = Family.from_hf(init.path, exits=list(family.exits[:-1]), dtype=torch.float32)
    else:
        start = Family.load(init.path, dtype=torch.float32)
    return start.model.state_dict()


class Trainer:
    """One rank's part of a training run: its model shard, optimizer, data and the step loop.

    Built from the run's `RunPlan` (`plan`) and the run directory `run_dir` that holds its
    checkpoints and metrics; torch.distributed and megatron-core's parallel groups are set up
    here from the plan's parallel sizes. A directory with a checkpoint is resumed from the newest
    one; otherwise the weights come from `plan.config.init`. `train_step` runs one optimizer
    step, `evaluate` the validation cross-entropy per exit, `run` the loop with evaluation,
    checkpoints and logging.
    """

    def __init__(self, plan: RunPlan, run_dir: Path):
        from megatron.core import parallel_state as ps

        from training.megatron_model import build_model, load_family_weights

        self.plan, self.run_dir = plan, run_dir
        self.config, self.family = plan.config, plan.family
        c = self.config
        initialize(c.parallel.tensor, c.parallel.pipeline, c.train.seed)
        self.ps = ps
        self.model = build_model(self.family, exit_loss=c.exit_loss)
        resume_step = latest_step(run_dir)
        if resume_step is None:  # a resumed run gets its weights from the checkpoint below
            load_family_weights(self.model, initial_tensors(c, self.family))
        self.model.freeze(backbone=c.train.freeze_backbone, exit_heads=c.train.freeze_exit_heads)
        self.ddp = self._wrap_in_ddp()
        self.params = [p for p in self.ddp.parameters() if p.requires_grad]
        self.optimizer = self._adamw()
        tokens, tokenizer = c.data.tokens_dir, plan.tokenizer
        self.train_sampler = WindowSampler(open_tokens(tokens, "train", tokenizer), c.train.seq_len, c.train.seed)
        self.val_sampler = WindowSampler(open_tokens(tokens, "val", tokenizer), c.train.seq_len, 0, shuffle=False)
        self.rank = dist.get_rank()
        self.step = 0
        if resume_step is not None:
            self.step = checkpoint.load(iteration_dir(run_dir, resume_step), self.ddp.module,
                                        self.optimizer)["step"]
        if self.rank == 0:
            self._truncate_metrics()

    def _wrap_in_ddp(self):
        """megatron-core DDP around the model, with the hooks its pipeline schedule calls."""
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )

        ddp = DistributedDataParallel(
            self.model.config, DistributedDataParallelConfig(overlap_grad_reduce=False), self.model)
        self.model.config.finalize_model_grads_func = finalize_model_grads
        self.model.config.no_sync_func = ddp.no_sync
        return ddp

    def _adamw(self) -> torch.optim.AdamW:
        """AdamW over the trainable parameters; norms and other vectors get no weight decay."""
        train = self.config.train
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": train.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=train.lr, betas=(0.9, 0.95), eps=1e-8)

    def _truncate_metrics(self) -> None:
        """Drop metric lines of steps past the checkpoint we resume from (they will be redone)."""
        path = self.run_dir / METRICS_FILE
        if path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= self.step]
            path.write_text("".join(line + "\n" for line in kept))

    # ---- one step -----------------------------------------------------------------------------

    def _forward_backward(self, sampler: WindowSampler, batch_index: int, train: bool,
                          weights: list[float]) -> dict[str, list[float]]:
        """One global batch through the pipeline schedule; with `train`, gradients are left in
        the parameters' `main_grad`, reduced over data-parallel ranks. Returns the per-exit
        means of the objective ("loss") and of the cross-entropy ("ce")."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        c, model, exit_losses = self.config, self.model, self.model.exit_losses
        # A frozen backbone has no backward to schedule: the model back-propagates its exit
        # branches during the forward, and the gradients are reduced below.
        forward_only = not train or model.backbone_frozen
        num_microbatches = c.num_microbatches
        exit_losses.start_batch(weights, num_microbatches)
        batches = rank_microbatches(sampler, batch_index, c.train.global_batch_size,
                                    c.train.micro_batch_size, self.ps.get_data_parallel_rank(),
                                    self.ps.get_data_parallel_world_size())

        def forward_step(data_iterator, wrapped):
            batch = next(data_iterator)
            output = wrapped(batch["input_ids"], batch["position_ids"], None, labels=batch["labels"])

            def loss_func(loss_per_token):  # (B, T) cross-entropy of the last exit
                return exit_losses.last_exit(loss_per_token), {}

            return output, loss_func

        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=batches, model=[self.ddp],
            num_microbatches=num_microbatches, seq_length=c.train.seq_len,
            micro_batch_size=c.train.micro_batch_size, forward_only=forward_only)
        if train and forward_only:  # what the schedule does after a backward
            self.model.config.finalize_model_grads_func([self.ddp])
        return exit_losses.reduced_means()

    def _clip_and_step(self, lr: float) -> float:
        """Clip the gradients to `train.grad_clip` (global norm over model-parallel ranks) and
        take an AdamW step at `lr`; returns the norm before clipping."""
        from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        for p in self.params:
            p.grad = p.main_grad  # megatron DDP accumulates (and all-reduces) into main_grad
        norm_grads = [p.grad for p in self.params if param_is_not_tensor_parallel_duplicate(p)]
        grad_norm = get_grad_norm_fp32(norm_grads, grad_stats_parallel_group=self.ps.get_model_parallel_group())
        clip = self.config.train.grad_clip
        if clip > 0 and grad_norm > clip:
            torch._foreach_mul_([p.grad for p in self.params], clip / (grad_norm + 1e-6))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return float(grad_norm)

    def train_step(self) -> dict:
        """One optimizer step on the next global batch; returns its metrics line (per-exit
        losses measured before the update, λ, learning rate, gradient norm, throughput)."""
        c = self.config
        started = time.perf_counter()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad(set_to_none=True)
        weights = exit_loss_weights(c, self.family.num_exits, self.step)
        losses = self._forward_backward(self.train_sampler, self.step, True, weights)
        lr = learning_rate(c.train, self.step)
        grad_norm = self._clip_and_step(lr)
        self.step += 1
        elapsed = time.perf_counter() - started
        record = {"step": self.step, "loss": losses["loss"]}
        if self.model.exit_losses.distills:  # the objective is no longer the CE: log both
            record["ce"] = losses["ce"]
        return {**record, "lambda": weights, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": c.train.global_batch_size * c.train.seq_len / elapsed}

    @torch.no_grad()
    def exit_logits(self, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        """Full-vocabulary logits (B, T, vocab) of the exits computed on this rank's stage.

        Runs megatron-core's forward-only pipeline schedule on one micro-batch; every rank of
        a stage returns the same tensors (gathered over tensor parallelism).
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        batch, seq_len = input_ids.shape
        self.model.exit_logits = {}
        final: list[torch.Tensor] = []

        def forward_step(data_iterator, wrapped):
            ids = next(data_iterator)
            output = wrapped(ids, torch.arange(seq_len).expand(batch, seq_len), None)
            return output, lambda logits, non_loss_data=True: final.append(logits) or logits

        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([input_ids]), model=[self.ddp],
            num_microbatches=1, seq_length=seq_len, micro_batch_size=batch, forward_only=True,
            collect_non_loss_data=True)
        logits = dict(self.model.exit_logits)
        if final:
            logits[self.family.last_exit] = final[0]
        return {k: gather_from_tensor_model_parallel_region(v) for k, v in logits.items()}

    @torch.no_grad()
    def evaluate(self) -> list[float]:
        """Validation cross-entropy per exit (whatever the training objective)."""
        weights = [1.0] * self.family.num_exits
        per_batch = [self._forward_backward(self.val_sampler, i, False, weights)["ce"]
                     for i in range(self.config.eval.batches)]
        return [sum(b[k] for b in per_batch) / len(per_batch) for k in range(self.family.num_exits)]

    # ---- the run ------------------------------------------------------------------------------

    def run(self, stop_after: int | None) -> None:
        """Train up to `train.steps` (or step `stop_after`), evaluating, checkpointing and
        logging at the configured intervals; the last step reached is always checkpointed."""
        from tqdm import tqdm

        c = self.config
        if self.rank == 0:
            backend = dist.get_backend()
            print(f"flow train: {dist.get_world_size()} ranks (TP={c.parallel.tensor} PP={c.parallel.pipeline} "
                  f"DP={c.parallel.data}), {backend}, {self.model.layer_spec_name} layer spec, starting at step "
                  f"{self.step} of {c.train.steps}", flush=True)
        end = min(c.train.steps, stop_after) if stop_after else c.train.steps
        bar = tqdm(total=c.train.steps, initial=self.step, desc="train", unit="step",
                   disable=self.rank != 0, dynamic_ncols=True)
        record: dict = {}
        while self.step < end:
            record = self.train_step()
            if self.step % c.eval.interval == 0 or self.step == c.train.steps:
                record["val_loss"] = self.evaluate()
            if self.step % c.checkpoint.interval == 0 or self.step == end:
                checkpoint.save(self.run_dir, self.step, self.ddp.module, self.optimizer,
                                extra={"last_metrics": record, "run": self.plan.to_dict()})
            self._log(record, bar)
        bar.close()

    def _log(self, record: dict, bar) -> None:
        if self.rank != 0:
            return
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        losses = " ".join(f"e{k}={loss:.3f}" for k, loss in enumerate(record["loss"]))
        bar.set_postfix_str(f"{losses} lr={record['lr']:.1e} {record['tokens_per_s']:.0f} tok/s")
        bar.update(1)
        if "val_loss" in record:
            val = " ".join(f"e{k}={loss:.3f}" for k, loss in enumerate(record["val_loss"]))
            bar.write(f"step {record['step']}: val {val}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One rank of `flow train` (run under torchrun).")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--stop-after", type=int, default=None)
    args = parser.parse_args(argv)
    trainer = Trainer(RunPlan.load(args.run_dir), args.run_dir)
    try:
        trainer.run(args.stop_after)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
