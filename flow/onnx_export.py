"""Export family member k as one ONNX graph for devices (`flow export-onnx`).

The graph is embedding + blocks 0..e_k + exit branch k; its inputs, outputs, cache layouts,
metadata and file names are the member format of `flow.member_format`. Rotary angles come from
`position_ids`. How each cache layout is built:

- `shared` (default wherever head_dim is a multiple of 8, as ORT's kernel needs): ONNX Runtime's
  GroupQueryAttention (`flow.onnx_gqa`), which derives causality and padding from the valid
  lengths and writes the new rows into the bound buffer, so a decode step copies nothing else.
  The layout onnxruntime-genai uses.
- `concat`: opset 23 `Attention`, present = past + new (one copy of the past per call); the
  mask is built in the graph from `attention_mask` and causality (a KV cache makes `is_causal`
  wrong).

A member whose head equals the embedding (a tied checkpoint whose exit heads were not trained)
is written with one tensor for both, as the checkpoint had it.

onnxruntime-genai: `export_family_members` also makes each members/<k>/ a genai model directory
(genai_config.json, tokenizer.json, tokenizer_config.json; `write_genai_files`), so
`og.Model("fam/members/<k>")` generates with the fp32 member, in either cache layout (`shared` is
genai's `past_present_share_buffer`). genai runs the graph as it is: it fetches only the outputs
its config names, so the extra `handoff_hidden` goes unfetched, and it feeds `attention_mask` and
`position_ids` as this format defines them (a batch right-padded with `pad_token_id`, the first
stop token, as genai's tokenizer pads). The int8 member shares the directory and is chosen with
a config overlay, not a second directory: genai reads only `genai_config.json` and refuses a
`filename` outside its directory, and the device runtime and family.json expect
device.int8.onnx where it is:

    config = og.Config("fam/members/0")
    config.overlay('{"model": {"decoder": {"filename": "device.int8.onnx"}}}')
    model = og.Model(config)

These files describe a member rather than being one, so family.json records no hash for them
(a device checks the .onnx it loads). A family without a tokenizer gets none: genai stops at the
tokenizer's end tokens and encodes text with it.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from flow import member_format
from flow.member_format import AUTO, CONCAT, KV_CACHE_CHOICES, KV_CACHE_LAYOUTS, SHARED, MemberInfo
from flow.model import FamilyCache, FamilyModel
from flow.onnx_gqa import group_query_attention
from flow.quiet import quiet

OPSET = 23


def choose_kv_cache(config, requested: str = AUTO) -> str:
    """The cache layout to export: `auto` is `shared` wherever ORT's kernel supports the shape."""
    from flow.errors import ConfigError

    supported = config.head_dim % 8 == 0  # ORT's GroupQueryAttention kernels require it
    if requested == AUTO:
        return SHARED if supported else CONCAT
    if requested not in KV_CACHE_LAYOUTS:
        raise ConfigError(f"unknown KV cache layout {requested!r}; choose one of "
                          f"{', '.join(KV_CACHE_CHOICES)}")
    if requested == SHARED and not supported:
        raise ConfigError(f"the shared KV cache layout (ORT GroupQueryAttention) needs head_dim to be "
                          f"a multiple of 8, this family has {config.head_dim}; export with "
                          f"--kv-cache {CONCAT}")
    return requested


@dataclass
class ConcatKVCache:
    """A layer cache for export: the explicit past plus this call's keys/values is the present."""

    key: Tensor  # (B, kv_heads, P, head_dim), then (B, kv_heads, P + T, head_dim)
    value: Tensor

    def update(self, positions: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        self.key = torch.cat([self.key, key], dim=2)
        self.value = torch.cat([self.value, value], dim=2)
        return self.key, self.value


@dataclass
class SharedBufferCache:
    """A layer cache for export whose attention is ORT's GroupQueryAttention on a slot buffer."""

    key: Tensor  # (B, kv_heads, M, head_dim): past in, present out (the same buffer at run time)
    value: Tensor
    seqlens_k: Tensor  # (B,) int32: valid slots after this call - 1
    total_sequence_length: Tensor  # () int32
    num_heads: int

    @property
    def max_seq_len(self) -> int:  # the model sizes its (here unused) position mask by this
        return self.key.shape[2]

    def attend(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        B, _, T, _ = query.shape
        flat = lambda x: x.transpose(1, 2).reshape(B, T, -1)  # noqa: E731  (B, T, heads*head_dim)
        output, self.key, self.value = group_query_attention(
            flat(query), flat(key), flat(value), self.key, self.value, self.seqlens_k,
            self.total_sequence_length, self.num_heads, key.shape[1])
        return output


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

    def __init__(self, model: FamilyModel, exit: int, kv_cache: str = SHARED):
        super().__init__()
        if kv_cache not in KV_CACHE_LAYOUTS:
            raise ValueError(f"kv_cache must be one of {KV_CACHE_LAYOUTS}, got {kv_cache!r}")
        self.model = model
        self.exit = exit
        self.kv_cache = kv_cache
        self.exit_layer = model.config.exit_layer(exit)
        self.has_exit_block = model.exits[exit].block is not None
        self.num_cache_layers = self.exit_layer + 1 + int(self.has_exit_block)

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor,
                *past_key_values: Tensor) -> tuple[Tensor, ...]:
        # key then value for each layer, in layer order (`member_format.cache_names`)
        pairs = [(past_key_values[2 * i], past_key_values[2 * i + 1])
                 for i in range(self.num_cache_layers)]
        if self.kv_cache == SHARED:
            seqlens_k = (attention_mask.sum(1) - 1).to(torch.int32)
            total = torch.full((), attention_mask.shape[1], dtype=torch.int32)
            heads = self.model.config.num_heads
            caches = [SharedBufferCache(k, v, seqlens_k, total, heads) for k, v in pairs]
            mask = None  # GroupQueryAttention derives causality and padding from seqlens_k
        else:
            caches = [ConcatKVCache(k, v) for k, v in pairs]
            mask = padded_causal_mask(attention_mask, input_ids.shape[1])
        cache = FamilyCache(blocks={layer: caches[layer] for layer in range(self.exit_layer + 1)},
                            exits={self.exit: caches[-1]} if self.has_exit_block else {})
        hidden = self.model.embed_tokens(input_ids)
        handoff = self.model.run_blocks(hidden, 0, self.exit_layer, position_ids, cache, mask)
        logits = self.model.run_exit(handoff, self.exit, position_ids, cache, mask)
        presents = [t for c in caches for t in (c.key, c.value)]
        return (logits, handoff, *presents)


def export_member(family, exit: int, path: Path | str, kv_cache: str = AUTO) -> Path:
    """Write member `exit` of `family` (a `flow.Family`) as an ONNX file at `path`, atomically.

    `kv_cache` is the cache layout: "shared" (ORT GroupQueryAttention, copy-free decode),
    "concat" (standard ONNX ops only; see the module docstring) or "auto" (shared if possible).
    The metadata carries `family.family_hash()`, which a family loaded or saved already holds.
    """
    import onnx

    from flow.fsutil import atomic_file
    from flow.onnx_gqa import translation_table

    config = family.config
    kv_cache = choose_kv_cache(config, kv_cache)
    model = family.model
    tied = torch.equal(model.exits[exit].head.weight, model.embed.weight)
    if family.dtype != torch.float32 or tied:  # export in fp32, never changing the caller's family
        model = copy.deepcopy(model).float()
    if tied:
        # The head equals the embedding (a tied source whose exit heads stayed frozen in tuning):
        # one tensor in the graph serves both, as in the source model (SmolLM2: 28 M parameters).
        model.exits[exit].head.weight = model.embed.weight
    member = DeviceMember(model, exit, kv_cache).eval()
    n = member.num_cache_layers
    batch, seq, past = 2, 3, 4
    cache_len = past if kv_cache == CONCAT else past + seq + 1  # a buffer has spare slots
    kv_shape = (batch, config.num_kv_heads, cache_len, config.head_dim)
    example = (torch.zeros(batch, seq, dtype=torch.long),
               torch.arange(past, past + seq).expand(batch, seq).contiguous(),
               torch.ones(batch, past + seq, dtype=torch.long),
               *[torch.zeros(kv_shape) for _ in range(2 * n)])
    b, t, p, s = (torch.export.Dim(name, min=1, max=config.max_seq_len)
                  for name in ("batch", "sequence", "past_sequence", "total_sequence"))
    dynamic = ({0: b, 1: t}, {0: b, 1: t}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in range(2 * n)))
    with torch.no_grad(), quiet("torch", "onnxscript"):
        program = torch.onnx.export(member, example, dynamo=True, opset_version=OPSET,
                                    dynamic_shapes=dynamic,
                                    input_names=member_format.input_names(n),
                                    output_names=member_format.output_names(n), verbose=False,
                                    custom_translation_table=translation_table())
    proto = program.model_proto
    info = MemberInfo(
        weights=member_format.FLOAT32_WEIGHTS, family_hash=family.family_hash(), exit=exit,
        exit_layer=member.exit_layer, num_cache_layers=n, hidden_size=config.hidden_size,
        num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, vocab_size=config.vocab_size,
        max_seq_len=config.max_seq_len, kv_cache=kv_cache)
    del proto.metadata_props[:]
    for key, value in info.to_metadata().items():
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
        with quiet("onnxruntime"):  # it suggests pre-processing, which changes nothing here
            quantize_dynamic(str(fp32_path), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul"])
        proto = onnx.load(tmp)
        info = MemberInfo.from_metadata({p.key: p.value for p in proto.metadata_props}, fp32_path)
        metadata = replace(info, weights=member_format.INT8_WEIGHTS).to_metadata()
        for prop in proto.metadata_props:  # in place: keys the quantizer added stay
            prop.value = metadata.get(prop.key, prop.value)
        onnx.save(proto, tmp)
    return int8_path


def genai_config(family, exit: int, kv_cache: str) -> dict:
    """genai_config.json of member `exit` exported with cache layout `kv_cache`: device.onnx as
    onnxruntime-genai's decoder of the family's architecture, generating greedily by default."""
    config = family.config
    stop_ids = family.stop_token_ids()
    return {
        "model": {
            "type": config.arch.hf_model_type,  # genai names decoders as Hugging Face does
            "context_length": config.max_seq_len,
            "vocab_size": config.vocab_size,
            "eos_token_id": stop_ids,
            "pad_token_id": stop_ids[0],  # no pad token of its own (as `Family.export_hf`)
            "decoder": {
                "filename": member_format.FLOAT32_FILE,
                "head_size": config.head_dim,
                "hidden_size": config.hidden_size,
                "num_attention_heads": config.num_heads,
                "num_key_value_heads": config.num_kv_heads,
                "num_hidden_layers": config.member_num_layers(exit),  # = its cache layers
                "inputs": {"input_ids": member_format.INPUT_IDS,
                           "position_ids": member_format.POSITION_IDS,
                           "attention_mask": member_format.ATTENTION_MASK,
                           "past_key_names": member_format.PAST_KEY,
                           "past_value_names": member_format.PAST_VALUE},
                "outputs": {"logits": member_format.LOGITS,
                            "present_key_names": member_format.PRESENT_KEY,
                            "present_value_names": member_format.PRESENT_VALUE},
            },
        },
        "search": {
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "top_k": 1,
            "top_p": 1.0, "temperature": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0,
            "min_length": 0, "early_stopping": True,
            # with a shared buffer, max_length is its number of slots: the member's context
            "max_length": config.max_seq_len,
            "past_present_share_buffer": kv_cache == SHARED,
        },
    }


def write_genai_files(family, exit: int, kv_cache: str, member_dir: Path | str) -> list[Path]:
    """Make `member_dir` (holding member `exit`'s device.onnx) an onnxruntime-genai model
    directory; return the files written (genai config, tokenizer, tokenizer config)."""
    from flow.artifact import TOKENIZER_FILE
    from flow.fsutil import atomic_file

    tokenizer_config = family.tokenizer_config()
    contents = {
        member_format.GENAI_CONFIG_FILE: json.dumps(genai_config(family, exit, kv_cache), indent=2),
        TOKENIZER_FILE: family.tokenizer_json,
        member_format.TOKENIZER_CONFIG_FILE: json.dumps(tokenizer_config, indent=2),
    }
    written = []
    for name, text in contents.items():
        path = Path(member_dir) / name
        with atomic_file(path) as tmp:
            tmp.write_text(text if name == TOKENIZER_FILE else text + "\n")
        written.append(path)
    return written


def export_family_members(family_dir: Path | str, exits: list[int] | None = None,
                          int8: bool = False, kv_cache: str = AUTO) -> list[Path]:
    """Write members/<k>/device.onnx (and device.int8.onnx) into a family directory, and
    onnxruntime-genai's files beside them (see the module docstring); return every file written.

    The weights are hashed once, when the family is loaded and verified; each member's metadata
    carries the family hash, and family.json records each ONNX file's SHA-256 (which a device
    checks).
    """
    from flow.artifact import member_path, record_member_files
    from flow.family import Family

    family_dir = Path(family_dir)
    family = Family.load(family_dir)
    kv_cache = choose_kv_cache(family.config, kv_cache)
    exits = list(range(family.config.num_exits)) if exits is None else exits
    written = []
    for exit in exits:
        family.config.check_exit(exit)
        path = member_path(family_dir, exit)
        path.parent.mkdir(parents=True, exist_ok=True)
        files = [export_member(family, exit, path, kv_cache)]
        if int8:
            files.append(quantize_member(path, member_path(family_dir, exit, int8=True)))
        record_member_files(family_dir, exit, files)
        written += files
        if family.stop_token_ids():  # a tokenizer that has the family's end token(s)
            written += write_genai_files(family, exit, kv_cache, path.parent)
    return written
