"""The familial GPT on megatron-core: its GPTModel plus exit branches on the stages that own them.

`FamilialGPT` is megatron-core's `GPTModel` configured as the family's backbone (RMSNorm, SwiGLU,
GQA, RoPE, untied embeddings, per-head q/k norms where the architecture has them), built from a
layer spec (Transformer Engine's where it is installed and a GPU is present, the local spec
otherwise). Each early exit k is an `ExitBranch` (one decoder layer from the same spec, a norm, a
vocab-parallel head) on the pipeline stage that owns block `e_k`. A forward hook on that block
runs the branch and attaches its loss to the block's output through an identity whose backward
injects the loss gradient — megatron-core's pattern for MoE and MTP auxiliary losses — so any
stage carries exit losses and the pipeline schedule is unchanged. The model owns the exits'
losses in one `ExitLosses` (`training.exit_loss`): their weights, the objective, what was measured.

Two variations of where an exit's loss is computed:
- Self-distillation (`exit_loss.distill_alpha > 0`) needs the last exit's logits as the teacher.
  They exist only on the last pipeline stage, after the whole backbone has run, so an exit's
  `h_e` waits there and its branch and loss run in `compute_language_model_loss`, beside the
  last exit's; `TrainConfig.validate` refuses a layout that puts an early exit on another stage.
- With a frozen backbone (`freeze(backbone=True)`), a training forward runs the backbone under
  `torch.no_grad()` (no graph, no activations kept, no parameter gradients) and each exit branch
  is differentiated on its own, on a detached `h_e`, as soon as its loss is known; the trainer
  then runs the pipeline schedule forward-only and reduces the branch gradients itself.
"""

from __future__ import annotations

import contextlib
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
from training.config import ExitLossSection
from training.convert import Shard, family_to_megatron, with_fused_norm_names
from training.exit_loss import ExitLosses, Teacher


def transformer_config(family: FamilyConfig, tensor: int, pipeline: int,
                       dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """megatron-core's TransformerConfig for the family's decoder (no dropout, no biases)."""
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=family.num_layers, hidden_size=family.hidden_size,
        ffn_hidden_size=family.intermediate_size, num_attention_heads=family.num_heads,
        num_query_groups=family.num_kv_heads, kv_channels=family.head_dim,
        normalization="RMSNorm", layernorm_epsilon=family.rms_norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, qk_layernorm=family.arch.qk_norm,
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


def local_layer_spec(family: FamilyConfig) -> ModuleSpec:
    """megatron-core's local (plain torch) layer spec for the family's architecture."""
    return get_gpt_layer_local_spec(qk_layernorm=family.arch.qk_norm, normalization="RMSNorm")


def layer_spec(family: FamilyConfig) -> tuple[str, ModuleSpec]:
    """("transformer_engine", spec) on a GPU where TE imports, else ("local", `local_layer_spec`)."""
    if torch.cuda.is_available():
        try:
            from megatron.core.models.gpt.gpt_layer_specs import (
                get_gpt_layer_with_transformer_engine_spec,
            )

            return "transformer_engine", get_gpt_layer_with_transformer_engine_spec(
                qk_layernorm=family.arch.qk_norm)
        except (ImportError, AssertionError):
            pass  # no Transformer Engine: the local spec runs everywhere (the trainer says which)
    return "local", local_layer_spec(family)


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

    A forward with labels (training and evaluation) scores the early exits of this stage into
    `exit_losses` (see `ExitLosses`); one without labels keeps their logits in `exit_logits`.
    """

    def __init__(self, family: FamilyConfig, config: TransformerConfig, spec: ModuleSpec, shard: Shard,
                 exit_loss: ExitLossSection | None = None):
        super().__init__(
            config, spec, vocab_size=family.vocab_size, max_sequence_length=family.max_seq_len,
            pre_process=shard.first_stage, post_process=shard.last_stage,
            position_embedding_type="rope", rotary_base=family.rope_theta,
            share_embeddings_and_output_weights=False)
        self.family = family
        self.shard = shard
        self.exit_losses = ExitLosses(family.num_exits, exit_loss or ExitLossSection())
        self.exit_branches = ExitBranches(config=config)
        self.exit_logits: dict[int, Tensor] = {}
        self.backbone_frozen = False
        self._labels: Tensor | None = None
        self._tune_branches = False  # this forward differentiates the branches alone
        self._waiting: list[tuple[int, Tensor, dict]] = []  # exits waiting for the teacher
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
        self._waiting = []
        # A training forward of a frozen backbone: no autograd in the backbone at all; the exit
        # branches switch it back on for themselves (`_branch_objective`).
        self._tune_branches = self.backbone_frozen and labels is not None and torch.is_grad_enabled()
        try:
            with torch.no_grad() if self._tune_branches else contextlib.nullcontext():
                return super().forward(input_ids, position_ids, attention_mask, labels=labels, **kwargs)
        finally:
            self._labels, self._waiting, self._tune_branches = None, [], False

    def _run_exit(self, k: int, block, args, kwargs, output):
        hidden, context = output  # hidden: (T, B, hidden)
        if self._labels is None:
            logits = self.exit_branches[k](hidden, kwargs)
            self.exit_logits[k] = logits.detach().transpose(0, 1)  # (B, T, vocab / tp)
            return output
        if self.exit_losses.distills:  # the teacher comes at the end of the backbone (last stage)
            self._waiting.append((k, hidden, kwargs))
            return output
        objective = self._branch_objective(k, hidden, kwargs, teacher=None)
        if objective is None:
            return output
        hidden = self.exit_losses.attach(k, hidden, objective)
        return make_viewless_tensor(inp=hidden, requires_grad=True, keep_graph=True), context

    def compute_language_model_loss(self, labels: Tensor, logits: Tensor) -> Tensor:
        """The last exit's per-token CE (B, T), carrying the losses of the exits that waited for
        it as their teacher (self-distillation)."""
        teacher = self.exit_losses.teacher(logits) if self._waiting else None
        loss = super().compute_language_model_loss(labels, logits)  # overwrites `logits`
        for k, hidden, kwargs in self._waiting:
            objective = self._branch_objective(k, hidden, kwargs, teacher)
            if objective is not None:
                loss = self.exit_losses.attach(k, loss, objective)
        self._waiting = []
        return loss

    def _branch_objective(self, k: int, hidden: Tensor, kwargs: dict, teacher: Teacher | None) -> Tensor | None:
        """Exit k's objective on `h_e` (T, B, hidden), recorded; None when already differentiated.

        With a frozen backbone the branch runs with autograd on a detached `h_e` and is
        back-propagated here, so nothing of it outlives this call.
        """
        labels = self._labels.t().contiguous()  # (T, B)
        with torch.enable_grad() if self._tune_branches else contextlib.nullcontext():
            branch_input = hidden.detach() if self._tune_branches else hidden
            logits = self.exit_branches[k](branch_input, kwargs)  # (T, B, vocab / tp)
            objective = self.exit_losses.early_exit(k, logits, labels, teacher)
            if not self._tune_branches:
                return objective
            self.exit_losses.backward(k, objective)
        return None

    def freeze(self, backbone: bool, exit_heads: bool = False) -> None:
        """Train only the early exit branches (`backbone`), and/or keep their LM heads as they
        are (`exit_heads`). The last exit is the backbone's own final norm and head."""
        self.backbone_frozen = backbone
        for name, param in self.named_parameters():
            in_branch = name.startswith("exit_branches.")
            head = in_branch and ".output_layer." in name
            param.requires_grad_(not ((backbone and not in_branch) or (exit_heads and head)))


def current_shard() -> Shard:
    return Shard(tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                 tp_size=parallel_state.get_tensor_model_parallel_world_size(),
                 pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
                 pp_size=parallel_state.get_pipeline_model_parallel_world_size())


def build_model(family: FamilyConfig, dtype: torch.dtype = torch.float32,
                spec: tuple[str, ModuleSpec] | None = None,
                exit_loss: ExitLossSection | None = None) -> FamilialGPT:
    """This rank's part of the family as a megatron-core model (parallel state must be set up).

    `spec` is (name, layer spec); by default `layer_spec(family)` picks. The model records the
    name in `layer_spec_name` so logs say which implementation runs. `exit_loss` (the config's
    section) says whether early exits distil from the last one.
    """
    shard = current_shard()
    config = transformer_config(family, shard.tp_size, shard.pp_size, dtype)
    spec_name, module_spec = spec or layer_spec(family)
    model = FamilialGPT(family, config, module_spec, shard, exit_loss)
    model.layer_spec_name = spec_name
    return model


def load_family_weights(model: FamilialGPT, tensors: dict[str, Tensor]) -> None:
    """Copy a family's full tensors into this rank's shard of the model."""
    own = model.state_dict()
    local = with_fused_norm_names(family_to_megatron(tensors, model.family, model.shard), own)
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
