"""The exported device member's format: what `flow.onnx_export` writes and `device.member` reads.

Torch- and onnx-free (stdlib only), because a device installs neither. A member is one ONNX
graph, member k of its family as a standalone model of `num_cache_layers` layers (blocks
0..e_k, then the exit block as e_k + 1, whose cache is its own), with its KV cache as explicit
inputs and outputs under the names onnxruntime-genai / optimum use:

    in:  input_ids (B, T) int64, position_ids (B, T) int64, attention_mask (B, S) int64,
         past_key_values.{i}.key|value (B, kv_heads, P, head_dim)
    out: logits (B, T, vocab), handoff_hidden (B, T, hidden) = h_e,
         present.{i}.key|value

The cache tensors come in layer order, each layer's key before its value. `kv_cache` in the
metadata names the cache layout:

- `shared`: P is a fixed buffer of slots and present has the same shape; a runtime binds both
  to the same memory, so a call writes only its own rows. Slot = position: rows are
  right-padded, `attention_mask` (B, S) marks each row's valid slots after this call (S = the
  longest row), and a rollback is free. Needs ONNX Runtime (a contrib op).
- `concat`: P is the past length and present = past + new; `attention_mask` (B, P + T) marks
  valid slots, so rows may be left-padded. Standard ONNX only, for any runtime.

The ONNX metadata holds `format`, `format_version` and every field of `MemberInfo` as a
string. A member is stored as members/<k>/device.onnx (float32 weights) and, optionally,
members/<k>/device.int8.onnx (int8 MatMuls), with the same metadata but `weights`. Beside them,
for a family with a tokenizer, genai_config.json, tokenizer.json and tokenizer_config.json make
members/<k>/ a model directory of onnxruntime-genai (`flow.onnx_export`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from flow.errors import ArtifactError

FORMAT = "familial-flow/device-member"  # ONNX metadata `format` of an exported member
FORMAT_VERSION = "3"  # raise it whenever a member written before could be misread (3: the family
# hash covers the architecture)

FLOAT32_FILE = "device.onnx"
INT8_FILE = "device.int8.onnx"
FLOAT32_WEIGHTS = "float32"  # the metadata `weights` of each file
INT8_WEIGHTS = "int8"

SHARED = "shared"
CONCAT = "concat"
KV_CACHE_LAYOUTS = (SHARED, CONCAT)
# What an export may ask for (`flow export-onnx --kv-cache`): a layout, or the best one the
# family's shape allows (`flow.onnx_export.choose_kv_cache`). Here so that a CLI reads it without torch.
AUTO = "auto"
KV_CACHE_CHOICES = (AUTO, *KV_CACHE_LAYOUTS)

# onnxruntime-genai's files beside a member (`flow.onnx_export.write_genai_files`)
GENAI_CONFIG_FILE = "genai_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
ATTENTION_MASK = "attention_mask"
LOGITS = "logits"
HANDOFF_HIDDEN = "handoff_hidden"
# Cache tensor names, `% layer` (the printf form onnxruntime-genai's config takes)
PAST_KEY = "past_key_values.%d.key"
PAST_VALUE = "past_key_values.%d.value"
PRESENT_KEY = "present.%d.key"
PRESENT_VALUE = "present.%d.value"


def cache_names(num_cache_layers: int) -> list[tuple[str, str]]:
    """(past input, present output) names of each cache tensor, in graph order."""
    return [(past % layer, present % layer) for layer in range(num_cache_layers)
            for past, present in ((PAST_KEY, PRESENT_KEY), (PAST_VALUE, PRESENT_VALUE))]


def input_names(num_cache_layers: int) -> list[str]:
    """The graph's inputs, in order."""
    return [INPUT_IDS, POSITION_IDS, ATTENTION_MASK] + [past for past, _ in cache_names(num_cache_layers)]


def output_names(num_cache_layers: int) -> list[str]:
    """The graph's outputs, in order."""
    return [LOGITS, HANDOFF_HIDDEN] + [present for _, present in cache_names(num_cache_layers)]


@dataclass(frozen=True)
class MemberInfo:
    """What an exported member says about itself: its ONNX metadata, one key per field."""

    weights: str  # FLOAT32_WEIGHTS or INT8_WEIGHTS
    family_hash: str
    exit: int
    exit_layer: int
    num_cache_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_seq_len: int
    kv_cache: str  # one of KV_CACHE_LAYOUTS

    def to_metadata(self) -> dict[str, str]:
        """The ONNX metadata of a member (every value a string, as ONNX stores them)."""
        return {"format": FORMAT, "format_version": FORMAT_VERSION,
                **{key: str(value) for key, value in asdict(self).items()}}

    @classmethod
    def from_metadata(cls, meta: dict[str, str], where: Path) -> MemberInfo:
        """Read and check a member's metadata; `ArtifactError` naming `where` if it is not one."""
        if meta.get("format") != FORMAT:
            raise ArtifactError(f"{where} is not a familial-flow device member (its metadata has no "
                                f"format {FORMAT!r}); export it with `flow export-onnx`")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"{where} is device-member format {meta.get('format_version')!r}; "
                                f"this runtime reads {FORMAT_VERSION!r}. Re-export it with "
                                f"`flow export-onnx`.")
        try:
            # `from __future__ import annotations` leaves each field's type as its name
            info = cls(**{f.name: int(meta[f.name]) if f.type == "int" else meta[f.name]
                          for f in fields(cls)})
        except (KeyError, ValueError) as err:
            raise ArtifactError(f"{where}: malformed member metadata ({err}); re-export it") from None
        if info.kv_cache not in KV_CACHE_LAYOUTS:
            raise ArtifactError(f"{where}: unknown KV cache layout {info.kv_cache!r} (this runtime "
                                f"reads {', '.join(KV_CACHE_LAYOUTS)}); re-export it")
        return info
