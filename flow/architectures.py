"""What differs between the backbone architectures a family can have: one table, no torch.

Every architecture here is the same pre-norm decoder (RMSNorm -> GQA attention with RoPE ->
residual -> RMSNorm -> SwiGLU MLP -> residual, final RMSNorm, LM head). They differ only in the
rows of this table: whether q and k get a per-head RMSNorm, and how Hugging Face names the model.
Everything else (rope theta, norm eps, shapes) is a field of `FamilyConfig`. Adding an
architecture means adding a row here; the model, the artifact, Hugging Face import/export, the
ONNX exporter and megatron-core training read the row, never the name.
"""

from __future__ import annotations

from dataclasses import dataclass

from flow.errors import ConfigError


@dataclass(frozen=True)
class Architecture:
    """One decoder architecture as the rest of flow needs to know it."""

    name: str  # FamilyConfig.architecture
    qk_norm: bool  # per-head RMSNorm on q and k before the rotary embedding (Qwen3)
    hf_model_type: str  # `model_type` in a Hugging Face config.json
    hf_class: str  # the `transformers` class a member is written as
    gguf_arch: str  # `general.architecture` in a GGUF file


ARCHITECTURES: dict[str, Architecture] = {
    "qwen3": Architecture("qwen3", qk_norm=True, hf_model_type="qwen3",
                          hf_class="Qwen3ForCausalLM", gguf_arch="qwen3"),
    "llama": Architecture("llama", qk_norm=False, hf_model_type="llama",
                          hf_class="LlamaForCausalLM", gguf_arch="llama"),
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
