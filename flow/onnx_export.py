"""Export family member k as one ONNX graph for devices (`flow export-onnx`).

The graph is embedding + blocks 0..e_k + exit branch k, with the KV cache as explicit inputs and
outputs under the names onnxruntime-genai / optimum use:

    in:  input_ids (B, T) int64, position_ids (B, T) int64, attention_mask (B, P+T) int64,
         past_key_values.{i}.key|value (B, kv_heads, P, head_dim)
    out: logits (B, T, vocab), handoff_hidden (B, T, hidden) = h_e,
         present.{i}.key|value (B, kv_heads, P+T, head_dim)

Cache index i runs over the member's layers as a standalone Qwen3 model: blocks 0..e_k, then the
exit block as e_k + 1 (its cache is its own, not block e_k + 1's). The mask is built in the graph
from `attention_mask` (left padding) and causality, never `is_causal` (wrong with a cache), and
rotary angles come from `position_ids`. torch's dynamo exporter at opset 23 turns attention into
ONNX `Attention`. The family hash, exit, layers and dimensions go into the model's metadata.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from flow.model import FamilyCache, FamilyModel

OPSET = 23
FORMAT = "familial-flow/device-member"
FORMAT_VERSION = "1"


@dataclass
class ConcatKVCache:
    """A layer cache for export: the explicit past plus this call's keys/values is the present."""

    key: Tensor  # (B, kv_heads, P, head_dim), then (B, kv_heads, P + T, head_dim)
    value: Tensor

    def update(self, positions: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        self.key = torch.cat([self.key, key], dim=2)
        self.value = torch.cat([self.value, value], dim=2)
        return self.key, self.value


def padded_causal_mask(attention_mask: Tensor, num_new: int) -> Tensor:
    """(B, 1, T, P+T) attention mask from a (B, P+T) padding mask whose last T slots are new.

    A query attends to earlier non-padding slots and always to itself, so a padding query (whose
    output is never used) still has one key and no row of the softmax is empty (NaN).
    """
    total = attention_mask.shape[1]
    key_slots = torch.arange(total, device=attention_mask.device)
    # arange + offset rather than a slice: the exporter then knows there are exactly T queries.
    query_slots = torch.arange(num_new, device=attention_mask.device) + (total - num_new)
    causal = key_slots[None, :] <= query_slots[:, None]  # (T, S)
    itself = key_slots[None, :] == query_slots[:, None]
    return (attention_mask.bool()[:, None, None, :] & causal) | itself  # (B, 1, T, S)


class DeviceMember(nn.Module):
    """Member `exit` of a family with its KV cache as explicit inputs and outputs."""

    def __init__(self, model: FamilyModel, exit: int):
        super().__init__()
        self.model = model
        self.exit = exit
        self.exit_layer = model.config.exit_layer(exit)
        self.has_exit_block = model.exits[exit].block is not None
        self.num_cache_layers = self.exit_layer + 1 + int(self.has_exit_block)

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor,
                *past_key_values: Tensor) -> tuple[Tensor, ...]:
        caches = [ConcatKVCache(past_key_values[2 * i], past_key_values[2 * i + 1])
                  for i in range(self.num_cache_layers)]
        cache = FamilyCache(blocks={layer: caches[layer] for layer in range(self.exit_layer + 1)},
                            exits={self.exit: caches[-1]} if self.has_exit_block else {})
        mask = padded_causal_mask(attention_mask, input_ids.shape[1])
        hidden = self.model.embed_tokens(input_ids)
        handoff = self.model.run_blocks(hidden, 0, self.exit_layer, position_ids, cache, mask)
        logits = self.model.run_exit(handoff, self.exit, position_ids, cache, mask)
        presents = [t for c in caches for t in (c.key, c.value)]
        return (logits, handoff, *presents)


def input_names(num_cache_layers: int) -> list[str]:
    return ["input_ids", "position_ids", "attention_mask"] + [
        f"past_key_values.{i}.{kind}" for i in range(num_cache_layers) for kind in ("key", "value")]


def output_names(num_cache_layers: int) -> list[str]:
    return ["logits", "handoff_hidden"] + [
        f"present.{i}.{kind}" for i in range(num_cache_layers) for kind in ("key", "value")]


def export_member(family, exit: int, path: Path | str) -> Path:
    """Write member `exit` of `family` (a `flow.Family`) as an ONNX file at `path`, atomically."""
    import onnx

    from flow.fsutil import atomic_file

    config = family.config
    model = family.model
    if family.dtype != torch.float32:  # export in fp32 without converting the caller's family
        model = copy.deepcopy(model).float()
    member = DeviceMember(model.eval(), exit)
    n = member.num_cache_layers
    batch, seq, past = 2, 3, 4
    kv_shape = (batch, config.num_kv_heads, past, config.head_dim)
    example = (torch.zeros(batch, seq, dtype=torch.long),
               torch.arange(past, past + seq).expand(batch, seq).contiguous(),
               torch.ones(batch, past + seq, dtype=torch.long),
               *[torch.zeros(kv_shape) for _ in range(2 * n)])
    b, t, p, s = (torch.export.Dim(name, min=1, max=config.max_seq_len)
                  for name in ("batch", "sequence", "past_sequence", "total_sequence"))
    dynamic = ({0: b, 1: t}, {0: b, 1: t}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in range(2 * n)))
    with torch.no_grad():
        program = torch.onnx.export(member, example, dynamo=True, opset_version=OPSET,
                                    dynamic_shapes=dynamic, input_names=input_names(n),
                                    output_names=output_names(n), verbose=False)
    proto = program.model_proto
    metadata = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "weights": "float32",
        "family_hash": family.family_hash(),
        "exit": str(exit), "exit_layer": str(member.exit_layer), "num_cache_layers": str(n),
        "hidden_size": str(config.hidden_size), "num_kv_heads": str(config.num_kv_heads),
        "head_dim": str(config.head_dim), "vocab_size": str(config.vocab_size),
        "max_seq_len": str(config.max_seq_len),
    }
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    with atomic_file(path) as tmp:
        onnx.save(proto, tmp)
    return path


def quantize_member(fp32_path: Path | str, int8_path: Path | str) -> Path:
    """Dynamic int8 quantization of the MatMuls, one scale per output channel.

    Per channel because per-tensor QInt8 saturates on CPUs without VNNI. The metadata is kept,
    with `weights` set to int8, so the loader still checks the family hash.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from flow.fsutil import atomic_file

    int8_path = Path(int8_path)
    with atomic_file(int8_path) as tmp:
        quantize_dynamic(str(fp32_path), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"])
        proto = onnx.load(tmp)
        for prop in proto.metadata_props:
            if prop.key == "weights":
                prop.value = "int8"
        onnx.save(proto, tmp)
    return int8_path


def export_family_members(family_dir: Path | str, exits: list[int] | None = None,
                          int8: bool = False) -> list[Path]:
    """Write members/<k>/device.onnx (and device.int8.onnx) into a family directory."""
    from flow.artifact import MEMBERS_DIR
    from flow.family import Family

    family_dir = Path(family_dir)
    family = Family.load(family_dir)
    exits = list(range(family.config.num_exits)) if exits is None else exits
    written = []
    for exit in exits:
        family.config.check_exit(exit)
        member_dir = family_dir / MEMBERS_DIR / str(exit)
        member_dir.mkdir(parents=True, exist_ok=True)
        written.append(export_member(family, exit, member_dir / "device.onnx"))
        if int8:
            written.append(quantize_member(written[-1], member_dir / "device.int8.onnx"))
    return written
