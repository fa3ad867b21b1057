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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from torch import Tensor


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
