"""An exit's training objective on tensor-parallel logits: cross-entropy, or CE blended with
self-distillation from the family's own last exit.

For an early exit with logits z (the last exit's logits z_full being the teacher):

    loss = (1 - α) · CE(z, labels) + α · τ² · KL(softmax(z_full / τ) ‖ softmax(z / τ))

(the distillation loss of Hinton et al.; τ² keeps the soft term's gradient on the scale of the
hard term's as τ grows). The teacher is the model's own last exit in the same forward pass,
detached: no second model, and no gradient into the teacher. α = 0 is plain CE.

Logits arrive as vocabulary shards (T, B, vocab / tp) of a column-parallel head: the softmax
statistics (max, Σ exp) and the KL's sums over the vocabulary are all-reduced over the
tensor-parallel group, and the KL's gradient is written in closed form (`VocabParallelKL`), as
megatron-core does for its vocab-parallel cross-entropy. The teacher's distribution is computed
once per micro-batch and shared by every early exit.

`ExitLosses`, owned by the model, is the one home of the exits' losses during training: the
objective's α and τ, each exit's weight λ_k in the total, how an early exit's loss reaches the
backward (`AttachedLoss`, megatron-core's auxiliary-loss pattern), and the per-exit losses the
forwards of a global batch measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from torch import Tensor

from training.config import ExitLossSection


def _all_reduce_over_vocab(tensor: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(tensor, op=op, group=parallel_state.get_tensor_model_parallel_group())
    return tensor


def _vocab_dot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_v a·b over the full vocabulary of two vocab shards (T, B, vocab / tp) -> (T, B)."""
    return _all_reduce_over_vocab(torch.einsum("tbv,tbv->tb", a, b))  # one fused pass, no temporary


@dataclass
class Teacher:
    """The last exit's distribution at temperature τ, on this rank's vocabulary shard."""

    probs: Tensor  # p_full,τ (T, B, vocab / tp)
    neg_entropy: Tensor  # Σ_v p_full,τ · log p_full,τ over the full vocabulary, (T, B)


@torch.no_grad()
def teacher_of(logits: Tensor, temperature: float) -> Teacher:
    """The teacher from the last exit's logits (T, B, vocab / tp), without gradient.

    Call it before megatron's cross-entropy sees the same logits: that function overwrites its
    input with the softmax.
    """
    shifted = logits.float() / temperature
    shifted -= _all_reduce_over_vocab(shifted.amax(dim=-1), dist.ReduceOp.MAX)[..., None]
    probs = shifted.exp()
    sum_exp = _all_reduce_over_vocab(probs.sum(dim=-1))
    probs /= sum_exp[..., None]
    return Teacher(probs, _vocab_dot(probs, shifted) - sum_exp.log())  # Σ p = 1


class VocabParallelKL(torch.autograd.Function):
    """KL(p_full,τ ‖ p_exit,τ) per token (T, B) from an exit's vocab shard of logits, with its
    gradient in closed form, ∂KL/∂z = (p_exit,τ − p_full,τ) / τ.

    KL = Σ p_full log p_full − Σ p_full·z/τ + logsumexp(z/τ): sums over the vocabulary, each
    all-reduced over the shards, and one exp per element. On a CPU the vocabulary-sized passes
    are the cost, so the forward works in place on one new tensor and keeps it for the backward,
    where autograd would keep a chain of intermediates and exponentiate again (for SmolLM2's
    exits, bench/exit_tuning.py: distillation's cost fell from 1.1× to 0.4× a backbone forward).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, teacher_probs: Tensor, teacher_neg_entropy: Tensor,
                temperature: float) -> Tensor:
        scaled = logits.float() / temperature  # (T, B, vocab / tp), a new tensor
        cross = _vocab_dot(teacher_probs, scaled)
        shift = _all_reduce_over_vocab(scaled.amax(dim=-1), dist.ReduceOp.MAX)
        exp = scaled.sub_(shift[..., None]).exp_()
        sum_exp = _all_reduce_over_vocab(exp.sum(dim=-1))
        ctx.save_for_backward(exp.div_(sum_exp[..., None]).sub_(teacher_probs))  # p_exit − p_full
        ctx.temperature, ctx.dtype = temperature, logits.dtype
        return teacher_neg_entropy - cross + sum_exp.log() + shift

    @staticmethod
    def backward(ctx, grad_kl: Tensor):
        (difference,) = ctx.saved_tensors
        return (difference * (grad_kl[..., None] / ctx.temperature)).to(ctx.dtype), None, None, None


def exit_objective(logits: Tensor, labels: Tensor, teacher: Teacher | None, alpha: float,
                   temperature: float) -> tuple[Tensor, Tensor]:
    """(objective, cross-entropy), each the mean over the micro-batch's tokens, of one exit.

    `logits` (T, B, vocab / tp), `labels` (T, B); `teacher` is `teacher_of` the last exit, or
    None for plain CE (the last exit itself, or α = 0).
    """
    distill = None
    if teacher is not None and alpha > 0:
        # Before the cross-entropy: megatron's overwrites fp32 logits in place with the softmax.
        distill = VocabParallelKL.apply(logits, teacher.probs, teacher.neg_entropy, temperature).mean()
    ce = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels).mean()
    if distill is None:
        return ce, ce
    return (1.0 - alpha) * ce + alpha * temperature**2 * distill, ce


class AttachedLoss(torch.autograd.Function):
    """Identity on `activation`; in backward, also feeds `scale` as d(total loss)/d(`loss`).

    Attaching an exit's loss to an activation the pipeline already carries lets any stage hold
    exit losses without changing megatron-core's schedule (its MoE and MTP auxiliary losses work
    the same way).
    """

    @staticmethod
    def forward(ctx, activation: Tensor, loss: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(loss)
        ctx.scale = scale
        return activation

    @staticmethod
    def backward(ctx, grad_activation: Tensor):
        (loss,) = ctx.saved_tensors
        return grad_activation, torch.full_like(loss, ctx.scale), None


class ExitLosses:
    """Every exit's loss in one model's forwards: how it is computed, what it weighs, what it was.

    Total loss = Σ_k λ_k · objective_k, each objective the mean over a micro-batch's tokens. The
    trainer opens a global batch with `start_batch(λ, num_microbatches)` and reads the per-exit
    means with `reduced_means()` after the pipeline schedule ran. In between, the model scores
    its early exits (`early_exit`) and hands their gradient to autograd (`attach`, or `backward`
    for a branch differentiated on its own), and the schedule's loss function scores the last
    exit (`last_exit`).

    Early exits are scaled by λ_k / num_microbatches here, because their losses bypass the
    schedule; the last exit's loss is returned to the schedule, which divides it by the number of
    micro-batches itself.
    """

    def __init__(self, num_exits: int, section: ExitLossSection):
        self.num_exits = num_exits
        self.alpha = section.distill_alpha  # weight of self-distillation; 0 is plain CE
        self.temperature = section.distill_temperature
        self.weights = [1.0] * num_exits  # λ_k of the current batch
        self._early_scales = [1.0] * num_exits  # λ_k / num_microbatches
        self.recorded: list[tuple[int, Tensor, Tensor]] = []  # (exit, objective, CE) per micro-batch

    @property
    def distills(self) -> bool:
        """Early exits learn from the last exit's logits too (the objective is no longer the CE)."""
        return self.alpha > 0

    def start_batch(self, weights: list[float], num_microbatches: int) -> None:
        """Weigh exit k by `weights[k]` in the coming global batch and forget earlier losses."""
        self.weights = weights
        self._early_scales = [w / num_microbatches for w in weights]
        self.recorded = []

    def teacher(self, last_exit_logits: Tensor) -> Teacher:
        """The distillation teacher from the last exit's logits (T, B, vocab / tp)."""
        return teacher_of(last_exit_logits, self.temperature)

    def early_exit(self, k: int, logits: Tensor, labels: Tensor, teacher: Teacher | None) -> Tensor:
        """Early exit k's objective from its logits (T, B, vocab / tp) and labels (T, B), recorded."""
        objective, ce = exit_objective(logits, labels, teacher, self.alpha, self.temperature)
        self.recorded.append((k, objective.detach(), ce.detach()))
        return objective

    def attach(self, k: int, activation: Tensor, objective: Tensor) -> Tensor:
        """`activation`, carrying exit k's objective into the backward with its weight."""
        return AttachedLoss.apply(activation, objective, self._early_scales[k])

    def backward(self, k: int, objective: Tensor) -> None:
        """Back-propagate exit k's weighted objective now (a branch differentiated on its own)."""
        (objective * self._early_scales[k]).backward()

    def last_exit(self, loss_per_token: Tensor) -> Tensor:
        """The last exit's weighted loss for the pipeline schedule from its CE per token (B, T), recorded."""
        last = self.num_exits - 1
        loss = loss_per_token.float().mean()
        self.recorded.append((last, loss.detach(), loss.detach()))
        return loss * self.weights[last]

    def reduced_means(self) -> dict[str, list[float]]:
        """Per exit, the mean objective ("loss") and cross-entropy ("ce") of the batch over its
        micro-batches, pipeline stages and data-parallel ranks (a collective on every rank)."""
        sums = torch.zeros(3, self.num_exits, dtype=torch.float64)  # objective, ce, count
        for k, objective, ce in self.recorded:
            sums[:, k] += torch.tensor([float(objective), float(ce), 1.0], dtype=torch.float64)
        dist.all_reduce(sums, group=parallel_state.get_pipeline_model_parallel_group())
        dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        return {"loss": (sums[0] / sums[2]).tolist(), "ce": (sums[1] / sums[2]).tolist()}
