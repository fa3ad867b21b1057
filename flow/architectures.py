"""What differs between the backbone architectures a family can have: one table, no torch.

Every architecture here is the same pre-norm decoder (RMSNorm -> GQA attention with RoPE ->
residual -> RMSNorm -> SwiGLU MLP -> residual, final RMSNorm, LM head). They differ only in the
rows of this table: whether q and k get a per-head RMSNorm, how Hugging Face and llama.cpp name
and lay out the model. Everything else (rope theta, norm eps, shapes) is a field of
`FamilyConfig`, and what is the same for every architecture of a format (tensor names inside a
Hugging Face or GGUF checkpoint) lives in that format's module (`flow.hf`, `flow.gguf`). Adding an
architecture means adding a row here; the model, the artifact, Hugging Face and GGUF import, the
ONNX exporter and megatron-core training read the row, never the name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flow.errors import ConfigError


@dataclass(frozen=True)
class Architecture:
    """One decoder architecture as the rest of flow needs to know it."""

    name: str  # FamilyConfig.architecture
    qk_norm: bool  # per-head RMSNorm on q and k before the rotary embedding (Qwen3)
    hf_model_type: str  # `model_type` in a Hugging Face config.json
    hf_class: str  # the `transformers` class a member is written as
    gguf_arch: str  # `general.architecture` in a GGUF file
    # llama.cpp rotates interleaved pairs of q/k channels for this architecture (its "normal" rope)
    # where transformers rotates the two halves of a head, so its converter permuted the rows of
    # q and k within each head; importing a GGUF undoes that permutation.
    gguf_permuted_qk: bool
    # config.json fields a member is written with beyond those every architecture shares.
    hf_config_extras: dict[str, Any] = field(default_factory=dict, hash=False)


ARCHITECTURES: dict[str, Architecture] = {
    "qwen3": Architecture("qwen3", qk_norm=True, hf_model_type="qwen3",
                          hf_class="Qwen3ForCausalLM", gguf_arch="qwen3", gguf_permuted_qk=False,
                          hf_config_extras={"use_sliding_window": False, "sliding_window": None}),
    "llama": Architecture("llama", qk_norm=False, hf_model_type="llama",
                          hf_class="LlamaForCausalLM", gguf_arch="llama", gguf_permuted_qk=True,
                          hf_config_extras={"mlp_bias": False}),
}
DEFAULT_ARCHITECTURE = "qwen3"


def architecture(name: str) -> Architecture:
    """The table row of `name`, or a `ConfigError` listing the supported ones."""
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}; supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def by_hf_model_type(model_type: str | None, where: str) -> Architecture:
    """The architecture of a Hugging Face config's `model_type`, or a clear refusal."""
    for arch in ARCHITECTURES.values():
        if arch.hf_model_type == model_type:
            return arch
    supported = ", ".join(f"{a.hf_model_type!r} ({a.hf_class})" for a in ARCHITECTURES.values())
    raise ConfigError(f"{where} is a {model_type!r} checkpoint; supported model types: {supported}")


def by_gguf_arch(gguf_arch: str | None, where: str) -> Architecture:
    """The architecture of a GGUF file's `general.architecture`, or a clear refusal."""
    for arch in ARCHITECTURES.values():
        if arch.gguf_arch == gguf_arch:
            return arch
    supported = ", ".join(repr(a.gguf_arch) for a in ARCHITECTURES.values())
    raise ConfigError(f"{where} is a GGUF file of architecture {gguf_arch!r}; supported: {supported}")
