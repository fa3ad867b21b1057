"""The reference familial model: a Qwen3- or Llama-style backbone with Ruyi2 exit branches.

Read top-down: norm -> rotary -> attention -> MLP -> block -> KV cache -> exit branch -> model.
The math is that of `transformers.Qwen3ForCausalLM` and `LlamaForCausalLM` (tests hold it to
1e-4), so their checkpoints import as they are; `flow.architectures` says what differs. There is no parallelism, export or serving code in here; those
tiers reuse these modules.

Positions are always explicit. A forward call gets `positions` (B, T): the absolute position of
each new token, used for the rotary angles and, when a `KVCache` is passed, as the cache slot it
writes. A query at position p attends to keys at positions <= p, which is the causal mask without
a cache and, with one, also hides slots a rolled-back speculative draft left behind (they are
always overwritten before anything at that position attends).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flow.config import FamilyConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 whatever the activation dtype, as Qwen3 does.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_tables(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles for `positions` (B, T); each (B, T, head_dim), fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                             device=positions.device) / head_dim))
    angles = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, head_dim)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate `x` (B, heads, T, head_dim) by the angles whose cos/sin are (B, T, head_dim)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class KVCache:
    """Static keys and values of one attention layer, one slot per position.

    `update` writes the new rows at their positions and returns the whole buffers, so attention
    over a cache costs no concatenation and rolling back is free (the caller moves its frontier).
    """

    key: Tensor  # (B, kv_heads, max_seq_len, head_dim)
    value: Tensor  # (B, kv_heads, max_seq_len, head_dim)

    @classmethod
    def empty(cls, config: FamilyConfig, batch_size: int, max_seq_len: int,
              dtype: torch.dtype, device: torch.device | str) -> KVCache:
        shape = (batch_size, config.num_kv_heads, max_seq_len, config.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(shape, dtype=dtype, device=device))

    @property
    def max_seq_len(self) -> int:
        return self.key.shape[2]

    def update(self, positions: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        rows = torch.arange(key.shape[0], device=key.device)[:, None]  # (B, 1)
        # Advanced indices around a slice put (B, T) first: targets are (B, T, kv_heads, head_dim).
        self.key[rows, :, positions] = key.transpose(1, 2)
        self.value[rows, :, positions] = value.transpose(1, 2)
        return self.key, self.value


@dataclass
class FamilyCache:
    """The KV caches one sequence batch needs: backbone layers and exit-branch blocks.

    An exit block's cache is its own; it is not the cache of backbone block `e_k + 1`. Any
    object with `update(positions, key, value) -> (keys, values)` serves as a layer's cache
    (the ONNX export passes one that concatenates an explicit past). A cache may instead offer
    `attend(query, key, value) -> (B, T, heads*head_dim)` when it stores the new keys/values and
    computes attention in one fused op (the export's GroupQueryAttention cache).
    """

    blocks: dict[int, KVCache] = field(default_factory=dict)  # backbone layer -> cache
    exits: dict[int, KVCache] = field(default_factory=dict)  # exit index -> branch block cache


class Attention(nn.Module):
    """Grouped-query attention with rotary positions, and per-head RMSNorm on q and k (Qwen3)."""

    def __init__(self, config: FamilyConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        # Qwen3 normalises each head's q and k; Llama does not (flow.architectures).
        self.q_norm = RMSNorm(d, config.rms_norm_eps) if config.arch.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(d, config.rms_norm_eps) if config.arch.qk_norm else nn.Identity()

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, positions: Tensor,
                cache: KVCache | None = None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, heads, T, head_dim)
        if hasattr(cache, "attend"):  # a cache that computes attention itself (ONNX export)
            return self.o_proj(cache.attend(q, k, v))
        if cache is not None:
            k, v = cache.update(positions, k, v)  # (B, kv_heads, max_seq_len, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: FamilyConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: FamilyConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, positions: Tensor,
                cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, positions, cache)
        return x + self.mlp(self.mlp_norm(x))


class ExitBranch(nn.Module):
    """Exit k: one extra decoder block (absent for the last exit), its own norm and LM head."""

    def __init__(self, config: FamilyConfig, with_block: bool):
        super().__init__()
        self.block = Block(config) if with_block else None
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, handoff_hidden: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                positions: Tensor, cache: KVCache | None = None) -> Tensor:
        x = handoff_hidden
        if self.block is not None:
            x = self.block(x, cos, sin, mask, positions, cache)
        return self.head(self.norm(x))  # (B, T, vocab)


def as_positions(positions: Tensor | None, batch_size: int, seq_len: int,
                 device: torch.device) -> Tensor:
    """Positions as (B, T) int64: `None` means 0..T-1, a (T,) vector is shared by every row."""
    if positions is None:
        positions = torch.arange(seq_len, device=device)
    positions = positions.to(device=device, dtype=torch.long)
    if positions.dim() == 1:
        positions = positions[None].expand(batch_size, seq_len)
    if positions.shape != (batch_size, seq_len):
        raise ValueError(f"positions must be (T,) or (B, T) = ({batch_size}, {seq_len}), "
                         f"got {tuple(positions.shape)}")
    return positions


def attention_mask(positions: Tensor, max_seq_len: int | None) -> Tensor:
    """Boolean (B, 1, T, S) mask: True where a query may attend to a key.

    Keys are the cache slots 0..max_seq_len-1 when a cache is used, else the new tokens themselves.
    """
    if max_seq_len is None:
        key_positions = positions[:, None, :]  # (B, 1, T)
    else:
        key_positions = torch.arange(max_seq_len, device=positions.device)[None, None, :]  # (1, 1, S)
    return (key_positions <= positions[:, :, None])[:, None]  # (B, 1, T, S)


class FamilyModel(nn.Module):
    """Embedding, `num_layers` backbone blocks, and one `ExitBranch` per exit.

    The last exit's branch is the backbone's final norm and LM head. Every entry point takes
    explicit positions and an optional `FamilyCache`, and any contiguous range of blocks can be
    run on a given residual stream, which is what the tiers after a device do.
    """

    def __init__(self, config: FamilyConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.exits = nn.ModuleList(
            ExitBranch(config, with_block=k < config.last_exit) for k in range(config.num_exits))

    # ---- pieces the tiers compose -----------------------------------------------------------

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        return self.embed(input_ids)  # (B, T, hidden)

    def run_blocks(self, hidden: Tensor, first: int, last: int, positions: Tensor | None = None,
                   cache: FamilyCache | None = None, mask: Tensor | None = None) -> Tensor:
        """Backbone blocks `first..last` (inclusive) on the residual stream `hidden` (B, T, hidden).

        `mask` (B, 1, T, S), True where a query may attend, replaces the mask derived from
        `positions` when keys do not sit at their positions' slots (left padding, exported caches).
        """
        if not 0 <= first <= last + 1 <= self.config.num_layers:
            raise ValueError(f"block range {first}..{last} is outside 0..{self.config.num_layers - 1}")
        positions, cos, sin, mask = self._prepare(hidden, positions, cache, mask)
        for layer in range(first, last + 1):
            layer_cache = _lookup(cache.blocks, layer, "backbone layer") if cache is not None else None
            hidden = self.blocks[layer](hidden, cos, sin, mask, positions, layer_cache)
        return hidden

    def run_exit(self, handoff_hidden: Tensor, exit: int, positions: Tensor | None = None,
                 cache: FamilyCache | None = None, mask: Tensor | None = None) -> Tensor:
        """Exit branch `exit` on `h_e` (B, T, hidden): logits (B, T, vocab)."""
        positions, cos, sin, mask = self._prepare(handoff_hidden, positions, cache, mask)
        branch = self.exits[exit]
        exit_cache = (_lookup(cache.exits, exit, "exit branch")
                      if cache is not None and branch.block is not None else None)
        return branch(handoff_hidden, cos, sin, mask, positions, exit_cache)

    def forward(self, input_ids: Tensor, positions: Tensor | None = None,
                exits: list[int] | None = None, cache: FamilyCache | None = None,
                mask: Tensor | None = None) -> list[Tensor]:
        """Logits (B, T, vocab) of the requested exits (default: all), one pass through the backbone.

        Training calls this with all exits; inference asks for one and the backbone stops at its
        layer.
        """
        exits = list(range(self.config.num_exits)) if exits is None else sorted(exits)
        hidden = self.embed_tokens(input_ids)
        logits, first = [], 0
        for k in exits:
            hidden = self.run_blocks(hidden, first, self.config.exits[k], positions, cache, mask)
            logits.append(self.run_exit(hidden, k, positions, cache, mask))
            first = self.config.exits[k] + 1
        return logits

    # ---- caches -----------------------------------------------------------------------------

    def new_cache(self, batch_size: int, max_seq_len: int | None = None,
                  layers: range | None = None, exits: list[int] | None = None) -> FamilyCache:
        """Zeroed caches for backbone `layers` (default all) and the branch blocks of `exits`."""
        max_seq_len = max_seq_len or self.config.max_seq_len
        layers = range(self.config.num_layers) if layers is None else layers
        exits = list(range(self.config.num_exits)) if exits is None else exits
        param = self.embed.weight
        make = lambda: KVCache.empty(self.config, batch_size, max_seq_len, param.dtype, param.device)  # noqa: E731
        return FamilyCache(blocks={layer: make() for layer in layers},
                           exits={k: make() for k in exits if self.exits[k].block is not None})

    def _prepare(self, hidden: Tensor, positions: Tensor | None, cache: FamilyCache | None,
                 mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        B, T, _ = hidden.shape
        positions = as_positions(positions, B, T, hidden.device)
        cos, sin = rotary_tables(positions, self.config.head_dim, self.config.rope_theta)
        if mask is None:
            mask = attention_mask(positions, _cache_length(cache))
        return positions, cos, sin, mask

    # ---- initialisation ---------------------------------------------------------------------

    def init_weights(self, generator: torch.Generator, std: float = 0.02) -> None:
        """Normal(0, std) for matrices and embeddings, ones for norms, deterministically."""
        for name, param in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, std, generator=generator)


def _lookup(caches: dict[int, KVCache], key: int, what: str) -> KVCache:
    # A cached call must cache every layer it runs: the mask spans the cache's slots.
    if key not in caches:
        raise ValueError(f"the cache passed has no entry for {what} {key}; "
                         f"allocate it with FamilyModel.new_cache(...)")
    return caches[key]


def _cache_length(cache: FamilyCache | None) -> int | None:
    if cache is None:
        return None
    # A list, not a set: hashing a symbolic length while exporting would fix it to one value.
    lengths = [c.max_seq_len for c in (*cache.blocks.values(), *cache.exits.values())]
    if any(length != lengths[0] for length in lengths):
        raise ValueError(f"all caches of one call must have the same length, got {lengths}")
    return lengths[0] if lengths else None
