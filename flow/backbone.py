"""A pretrained decoder's tensors -> a family's tensors, and a member's tensors back out.

Every importer (a Hugging Face directory, a GGUF file) first renames its checkpoint into
*backbone names*, the same for every format:

    embed.weight                  token embedding (vocab, hidden)
    layers.{i}.<block tensor>     decoder block i, under flow's names inside a block
    norm.weight                   final RMSNorm
    head.weight                   LM head (absent when the checkpoint ties it to the embedding)

and this module turns them into a family the one way Ruyi2 prescribes: the backbone stays as it
is, and exit branch k starts as a copy of block `e_k + 1`, the final norm and the LM head. So,
before any training, member k is the checkpoint truncated to `e_k + 2` layers.

A checkpoint with tied embeddings becomes a family whose every head, the last one included, is an
untied copy of the embedding: each exit owns its head (DESIGN.md §1), training moves them apart,
and the artifact, the ONNX exporter and megatron-core conversion then know one layout only.
"""

from __future__ import annotations

from typing import Any

from flow.artifact import block_tensor_shapes
from flow.config import FamilyConfig


def backbone_names(config: FamilyConfig, tied: bool) -> list[str]:
    """The backbone names a checkpoint of `config` must provide (no head when `tied`)."""
    names = ["embed.weight"]
    for layer in range(config.num_layers):
        names += [f"layers.{layer}.{name}" for name in block_tensor_shapes(config)]
    names.append("norm.weight")
    if not tied:
        names.append("head.weight")
    return names


def family_tensors(backbone: dict[str, Any], config: FamilyConfig, tied: bool) -> dict[str, Any]:
    """Family tensors (flow's names) from the complete `backbone_names` tensors; exit copies
    are cloned. Importers check completeness, naming what is missing in their own format."""
    head = backbone["embed.weight"] if tied else backbone["head.weight"]
    tensors = {"embed.weight": backbone["embed.weight"]}
    block = list(block_tensor_shapes(config))
    for layer in range(config.num_layers):
        tensors.update({f"blocks.{layer}.{name}": backbone[f"layers.{layer}.{name}"] for name in block})
    for k, exit_layer in enumerate(config.exits):
        if not config.is_final_exit(k):
            tensors.update({f"exits.{k}.block.{name}": backbone[f"layers.{exit_layer + 1}.{name}"].clone()
                            for name in block})
        tensors[f"exits.{k}.norm.weight"] = backbone["norm.weight"].clone()
        tensors[f"exits.{k}.head.weight"] = head.clone()
    return tensors


def member_backbone(tensors: dict[str, Any], config: FamilyConfig, exit: int) -> dict[str, Any]:
    """Member `exit` as a standalone backbone (untied): blocks 0..e_k, then its exit block."""
    exit_layer = config.exit_layer(exit)
    backbone = {"embed.weight": tensors["embed.weight"],
                "norm.weight": tensors[f"exits.{exit}.norm.weight"],
                "head.weight": tensors[f"exits.{exit}.head.weight"]}
    block = list(block_tensor_shapes(config))
    for layer in range(exit_layer + 1):
        backbone.update({f"layers.{layer}.{name}": tensors[f"blocks.{layer}.{name}"] for name in block})
    if not config.is_final_exit(exit):
        backbone.update({f"layers.{exit_layer + 1}.{name}": tensors[f"exits.{exit}.block.{name}"]
                         for name in block})
    return backbone
