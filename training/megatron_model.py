"""The familial GPT on megatron-core: its GPTModel plus exit branches on the stages that own them.

`FamilialGPT` is megatron-core's `GPTModel` configured as the Qwen3-style backbone (RMSNorm,
SwiGLU, GQA, q/k norm, RoPE, untied embeddings), built from a layer spec (Transformer Engine's
where it is installed and a GPU is present, the local spec otherwise). Each early exit k is an
`ExitBranch` (one decoder layer from the same spec, a norm, a vocab-parallel head) on the pipeline
stage that owns block `e_k`. A forward hook on that block runs the branch and attaches its loss to
the block's output through `ExitLoss`, an identity whose backward injects the loss gradient —
megatron-core's pattern for MoE and MTP auxiliary losses — so any stage carries exit losses and the
pipeline schedule is unchanged.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.utils import make_viewless_tensor
from torch import Tensor

from flow.config import FamilyConfig
from training.convert import Shard


def transformer_config(family: FamilyConfig, tensor: int, pipeline: int,
                       dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """megatron-core's TransformerConfig for the family's Qwen3 shape (no dropout, no biases)."""
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=family.num_layers, hidden_size=family.hidden_size,
        ffn_hidden_size=family.intermediate_size, num_attention_heads=family.num_heads,
        num_query_groups=family.num_kv_heads, kv_channels=family.head_dim,
        normalization="RMSNorm", layernorm_epsilon=family.rms_norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, qk_layernorm=True,
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        # Weights are then overwritten from a Family (random, Hugging Face or trained); megatron's
        # own initialisation must still run: with perform_initialization=False, megatron-core
        # 0.16 never marks weights as tensor-parallel, and gradient norms count one shard only.
        use_cpu_initialization=False, perform_initialization=True,
        # The fused kernels are CUDA-only.
        bias_dropout_fusion=on_gpu, apply_rope_fusion=False, masked_softmax_fusion=on_gpu,
        gradient_accumulation_fusion=False, persist_layer_norm=on_gpu, bias_activation_fusion=on_gpu)


def layer_spec() -> tuple[str, ModuleSpec]:
    """("transformer_engine", spec) on a GPU where TE imports, else ("local", megatron's local spec)."""
    if torch.cuda.is_available():
        try:
            from megatron.core.models.gpt.gpt_layer_specs import (
                get_gpt_layer_with_transformer_engine_spec,
            )

            return "transformer_engine", get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
        except (ImportError, AssertionError):
            pass  # no Transformer Engine: the local spec runs everywhere (the trainer says which)
    return "local", get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")


class ExitLoss(torch.autograd.Function):
    """Identity on `hidden`; in backward, also feeds `scale` as d(total loss)/d(exit loss)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, loss: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(loss)
        ctx.scale = scale
        return hidden

    @staticmethod
    def backward(ctx, grad_hidden: Tensor):
        (loss,) = ctx.saved_tensors
        return grad_hidden, torch.full_like(loss, ctx.scale), None


class ExitBranch(MegatronModule):
    """One decoder layer, its norm and a vocab-parallel LM head: exit k of the family."""

    def __init__(self, config: TransformerConfig, spec: ModuleSpec, norm_spec, vocab_size: int,
                 layer_number: int):
        super().__init__(config=config)
        self.layer = build_module(spec, config=config, layer_number=layer_number)
        self.final_norm = build_module(norm_spec, config=config, hidden_size=config.hidden_size,
                                       eps=config.layernorm_epsilon)
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, vocab_size, config=config, init_method=config.init_method,
            bias=False, gather_output=False, skip_bias_add=False)

    def forward(self, hidden: Tensor, layer_kwargs: dict) -> Tensor:
        hidden, _ = self.layer(**{**layer_kwargs, "hidden_states": hidden})
        logits, _ = self.output_layer(self.final_norm(hidden))
        return logits  # (T, B, vocab / tp)


class ExitBranches(MegatronModule):
    """The exit branches of one stage, named by exit index (`exit_branches.{k}.…`).

    A MegatronModule rather than a ModuleDict so that megatron's sharded_state_dict recursion
    reaches the branches' tensor-parallel layers (a plain container would save them replicated).
    """

    def add(self, k: int, branch: ExitBranch) -> None:
        self.add_module(str(k), branch)

    def __getitem__(self, k: int) -> ExitBranch:
        return self._modules[str(k)]


class FamilialGPT(GPTModel):
    """megatron-core's GPTModel with the family's early exits on this pipeline stage.

    Before each step the trainer sets `exit_loss_scales[k]` (λ_k / microbatches). During
    training, the per-exit losses of each microbatch are appended to `recorded_losses`; in
    forward-only calls without labels, exit logits are kept in `exit_logits` instead.
    """

    def __init__(self, family: FamilyConfig, config: TransformerConfig, spec: ModuleSpec, shard: Shard):
        super().__init__(
            config, spec, vocab_size=family.vocab_size, max_sequence_length=family.max_seq_len,
            pre_process=shard.first_stage, post_process=shard.last_stage,
            position_embedding_type="rope", rotary_base=family.rope_theta,
            share_embeddings_and_output_weights=False)
        self.family = family
        self.shard = shard
        self.exit_branches = ExitBranches(config=config)
        self.exit_loss_scales = [1.0] * family.num_exits
        self.recorded_losses: list[tuple[int, Tensor]] = []
        self.exit_logits: dict[int, Tensor] = {}
        self._labels: Tensor | None = None
        first_layer = shard.layers(family).start
        for k in shard.exits(family):
            exit_layer = family.exits[k]
            self.exit_branches.add(k, ExitBranch(config, spec, self.decoder.submodules.layer_norm,
                                                 family.vocab_size, layer_number=exit_layer + 2))
            block = self.decoder.layers[exit_layer - first_layer]
            block.register_forward_hook(functools.partial(self._run_exit, k), with_kwargs=True)

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor | None,
                labels: Tensor | None = None, **kwargs):
        self._labels = labels
        try:
            return super().forward(input_ids, position_ids, attention_mask, labels=labels, **kwargs)
        finally:
            self._labels = None

    def _run_exit(self, k: int, block, args, kwargs, output):
        hidden, context = output  # hidden: (T, B, hidden)
        logits = self.exit_branches[k](hidden, kwargs)
        if self._labels is None:
            self.exit_logits[k] = logits.detach().transpose(0, 1)  # (B, T, vocab / tp)
            return output
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), self._labels.t().contiguous()).mean()
        self.recorded_losses.append((k, loss.detach()))
        hidden = ExitLoss.apply(hidden, loss, self.exit_loss_scales[k])
        return make_viewless_tensor(inp=hidden, requires_grad=True, keep_graph=True), context

    def freeze_backbone(self) -> None:
        """Train only the early exit branches (the last exit is the backbone's own head)."""
        for name, param in self.named_parameters():
            param.requires_grad_(name.startswith("exit_branches."))


def current_shard() -> Shard:
    return Shard(tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                 tp_size=parallel_state.get_tensor_model_parallel_world_size(),
                 pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
                 pp_size=parallel_state.get_pipeline_model_parallel_world_size())


def build_model(family: FamilyConfig, dtype: torch.dtype = torch.float32,
                spec: tuple[str, ModuleSpec] | None = None) -> FamilialGPT:
    """This rank's part of the family as a megatron-core model (parallel state must be set up).

    `spec` is (name, layer spec); by default `layer_spec()` picks. The model records the name in
    `layer_spec_name` so logs say which implementation runs.
    """
    shard = current_shard()
    config = transformer_config(family, shard.tp_size, shard.pp_size, dtype)
    spec_name, module_spec = spec or layer_spec()
    model = FamilialGPT(family, config, module_spec, shard)
    model.layer_spec_name = spec_name
    return model


def load_family_weights(model: FamilialGPT, tensors: dict[str, Tensor]) -> None:
    """Copy a family's full tensors into this rank's shard of the model."""
    from training.convert import family_to_megatron

    local = family_to_megatron(tensors, model.family, model.shard)
    own = model.state_dict()
    # Transformer Engine fuses the pre-attention and pre-MLP norms into the following linear.
    renames = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
               "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
    for name in list(local):
        for plain, fused in renames.items():
            if name.endswith(plain) and name not in own:
                local[name[: -len(plain)] + fused] = local.pop(name)
    missing = sorted(n for n in own if n not in local and not n.endswith("_extra_state"))
    unexpected = sorted(n for n in local if n not in own)
    if missing or unexpected:
        raise RuntimeError(f"family/megatron name mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}")
    with torch.no_grad():
        for name, tensor in local.items():
            if own[name].shape != tensor.shape:
                raise RuntimeError(f"{name}: megatron shape {tuple(own[name].shape)} vs family "
                                   f"{tuple(tensor.shape)}")
            own[name].copy_(tensor)
