"""GGUF files (llama.cpp's format) -> backbone tensors, family config and tokenizer.

Read with the `gguf` package (its `GGUFReader` and numpy dequantization: F32, F16, BF16, Q4_0,
Q4_1, Q5_0, Q5_1, Q8_0 and the k-quants), never with `transformers`. A quantized file becomes a
float32 family holding the file's weights dequantized exactly (llama.cpp itself multiplies the
quantized blocks, so its own outputs differ from the family's by its rounding).

    checkpoint = GGUFCheckpoint.open("model.gguf")
    fields, tied = checkpoint.family_fields()          # FamilyConfig fields but exits
    backbone = checkpoint.backbone(config, tied)         # flow.backbone names, torch fp32
    checkpoint.tokenizer_json()                          # flow.gguf_tokenizer, or None

What differs per architecture (q/k norms, llama.cpp's q/k row permutation) is read from
`flow.architectures`; the tensor names below are llama.cpp's for every architecture.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from flow.architectures import Architecture, by_gguf_arch
from flow.backbone import backbone_names
from flow.config import FamilyConfig
from flow.errors import ArtifactError, ConfigError

# flow's name inside a block -> llama.cpp's name inside `blk.{i}`
GGUF_BLOCK_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "attn.q_proj.weight": "attn_q.weight",
    "attn.k_proj.weight": "attn_k.weight",
    "attn.v_proj.weight": "attn_v.weight",
    "attn.o_proj.weight": "attn_output.weight",
    "attn.q_norm.weight": "attn_q_norm.weight",
    "attn.k_norm.weight": "attn_k_norm.weight",
    "mlp_norm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GGUF_NAMES = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
               "head.weight": "output.weight"}


def gguf_name(name: str) -> str:
    """llama.cpp's name of a backbone tensor (`flow.backbone`'s names)."""
    if name.startswith("layers."):
        _, layer, inner = name.split(".", 2)
        return f"blk.{layer}.{GGUF_BLOCK_NAMES[inner]}"
    return _GGUF_NAMES[name]


def _gguf_module():
    try:
        import gguf
    except ImportError:
        raise ConfigError("reading GGUF files needs the `gguf` package: install familial-flow "
                          "with the [cloud] or [train] extra") from None
    return gguf


class GGUFCheckpoint:
    """An open GGUF file: its metadata, tensors (read lazily through mmap) and tokenizer."""

    def __init__(self, path: Path, reader: Any):
        self.path = path
        self.reader = reader
        self.arch: Architecture = by_gguf_arch(self.get("general.architecture"), str(path))
        self.tensors = {tensor.name: tensor for tensor in reader.tensors}

    @classmethod
    def open(cls, path: str | Path) -> GGUFCheckpoint:
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"no GGUF file at {path}")
        gguf = _gguf_module()
        try:
            reader = gguf.GGUFReader(path)
        except (ValueError, OSError) as err:
            raise ArtifactError(f"{path} is not a readable GGUF file ({err})") from None
        return cls(path, reader)

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value (string, number, bool or list), or `default` when absent."""
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def end_token_ids(self) -> list[int]:
        """The token ids the file declares as ending a generation (EOS, end of turn)."""
        ids = (self.get(f"tokenizer.ggml.{kind}_token_id") for kind in ("eos", "eot"))
        return [int(i) for i in ids if i is not None]

    def _arch_value(self, key: str, default: Any = None, required: bool = False) -> Any:
        value = self.get(f"{self.arch.gguf_arch}.{key}", default)
        if value is None and required:
            raise ArtifactError(f"{self.path} has no {self.arch.gguf_arch}.{key} metadata")
        if isinstance(value, list):  # per-layer values: a family has one for every layer
            if len(set(value)) != 1:
                raise ConfigError(f"{self.path} varies {self.arch.gguf_arch}.{key} across layers "
                                  f"({sorted(set(value))}); a family's layers are all alike")
            value = value[0]
        return value

    def family_fields(self) -> tuple[dict[str, Any], bool]:
        """`FamilyConfig` fields (all but `exits`) and whether the embeddings are tied, from the
        metadata; what a family cannot compute (rope scaling, partial rotary, experts, biases,
        extra tensors) is refused by name."""
        scaling = self._arch_value("rope.scaling.type", "none")
        if scaling != "none":
            raise ConfigError(f"{self.path} uses rope scaling {scaling!r}; only default rotary "
                              f"embeddings are supported")
        if self._arch_value("expert_count", 0):
            raise ConfigError(f"{self.path} is a mixture-of-experts model; families are dense")
        hidden = int(self._arch_value("embedding_length", required=True))
        heads = int(self._arch_value("attention.head_count", required=True))
        head_dim = int(self._arch_value("attention.key_length", hidden // heads))
        value_dim = int(self._arch_value("attention.value_length", head_dim))
        rotary_dim = int(self._arch_value("rope.dimension_count", head_dim))
        if value_dim != head_dim or rotary_dim != head_dim:
            raise ConfigError(f"{self.path} has key/value/rotary dimensions {head_dim}/{value_dim}/"
                              f"{rotary_dim}; a family rotates whole heads of one size")
        embed = self._tensor("token_embd.weight")
        fields = dict(
            vocab_size=int(self._arch_value("vocab_size", embed.shape[1])),
            hidden_size=hidden,
            intermediate_size=int(self._arch_value("feed_forward_length", required=True)),
            num_layers=int(self._arch_value("block_count", required=True)),
            num_heads=heads,
            num_kv_heads=int(self._arch_value("attention.head_count_kv", heads)),
            head_dim=head_dim,
            max_seq_len=int(self._arch_value("context_length", 2048)),
            rope_theta=float(self._arch_value("rope.freq_base", 10000.0)),
            rms_norm_eps=float(self._arch_value("attention.layer_norm_rms_epsilon", required=True)),
            architecture=self.arch.name)
        return fields, "output.weight" not in self.tensors

    def backbone(self, config: FamilyConfig, tied: bool) -> dict[str, Any]:
        """The backbone tensors of `config`, dequantized to float32 torch tensors under
        `flow.backbone`'s names, with llama.cpp's q/k row permutation undone where it applies."""
        import torch

        names = backbone_names(config, tied)
        wanted = {gguf_name(name): name for name in names}
        if "rope_freqs.weight" in self.tensors:
            raise ConfigError(f"{self.path} scales rotary frequencies (rope_freqs); only default "
                              f"rotary embeddings are supported")
        unexpected = sorted(set(self.tensors) - set(wanted))
        if unexpected:
            raise ConfigError(f"{self.path} has tensors a {config.architecture} family does not "
                              f"(biases or other extras), e.g. {unexpected[0]!r}")
        backbone = {}
        for theirs, ours in wanted.items():
            values = torch.from_numpy(self._dequantize(theirs))
            if self.arch.gguf_permuted_qk and ours.endswith(("q_proj.weight", "k_proj.weight")):
                heads = config.num_heads if ours.endswith("q_proj.weight") else config.num_kv_heads
                values = unpermute_rows(values, heads)
            backbone[ours] = values
        return backbone

    def tensor_types(self) -> dict[str, int]:
        """How many tensors of each GGML type the file stores (e.g. {"Q4_1": 210, "F32": 61})."""
        return dict(Counter(tensor.tensor_type.name for tensor in self.tensors.values()))

    def tokenizer_json(self) -> str | None:
        """The file's tokenizer as `tokenizers` JSON, or None when it carries none."""
        from flow.gguf_tokenizer import tokenizer_from_gguf

        tokenizer = tokenizer_from_gguf(self, str(self.path))
        return None if tokenizer is None else tokenizer.to_str()

    def _tensor(self, name: str) -> Any:
        if name not in self.tensors:
            raise ArtifactError(f"{self.path} has no tensor {name!r}; is it a complete "
                                f"{self.arch.gguf_arch} model?")
        return self.tensors[name]

    def _dequantize(self, name: str):
        """A tensor as a float32 numpy array in row-major (rows, columns) order."""
        import numpy as np

        tensor = self._tensor(name)
        try:
            values = _gguf_module().quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise ConfigError(f"{self.path}: tensor {name} is stored as {tensor.tensor_type.name}, "
                              f"which the gguf package cannot dequantize") from None
        # GGUF lists dimensions fastest-first; numpy wants them slowest-first. A fresh, writable
        # copy: plain F32 tensors are otherwise read-only views into the memory-mapped file.
        return np.array(values, dtype=np.float32).reshape(tuple(reversed(tensor.shape.tolist())))


def unpermute_rows(weight, heads: int):
    """Undo llama.cpp's q/k permutation: within each head, its converter moved row pairs
    (i, i + d/2) next to each other so that rotating interleaved pairs equals rotating halves.

    `weight` is (heads * head_dim, hidden) in llama.cpp's order; the result is in Hugging Face's.
    """
    rows, columns = weight.shape
    head_dim = rows // heads
    # llama.cpp's row r = 2j + s of a head holds Hugging Face's row s * d/2 + j.
    return weight.reshape(heads, head_dim // 2, 2, columns).transpose(1, 2).reshape(rows, columns)
