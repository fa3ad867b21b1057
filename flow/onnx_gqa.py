"""ONNX Runtime's `com.microsoft.GroupQueryAttention` as a torch op the ONNX exporter can emit.

Why: with a plain ONNX graph, a KV cache is an input and a *new* output every step, so each
decode token copies the whole past (`Concat`). ORT's GroupQueryAttention writes the new keys and
values into the past buffer in place when past and present are bound to the same memory (I/O
binding), which makes a decode step O(new tokens) in cache traffic. torch has no such op, so we
declare one (`flow::group_query_attention`) whose shape rule is all the exporter needs, and map it
to the contrib op with a custom translation.

Semantics of the op (those of ORT's CPU kernel, which is what runs it):

- query (B, T, heads*head_dim), key/value (B, T, kv_heads*head_dim): already normed and rotated;
- past_key/past_value (B, kv_heads, M, head_dim): a buffer of M slots, row b valid in
  slots `0 .. seqlens_k[b] - T`;
- seqlens_k (B,) int32 = (number of valid slots after this call) - 1 per row; the new tokens go to
  the T slots before that, so a row's slot is its position (right padding, never left);
- total_sequence_length () int32 = the longest row after this call;
- out: attention output (B, T, heads*head_dim) and the buffers with the new rows written.
"""

from __future__ import annotations

import torch
from torch import Tensor

DOMAIN = "com.microsoft"


@torch.library.custom_op("flow::group_query_attention", mutates_args=())
def group_query_attention(query: Tensor, key: Tensor, value: Tensor, past_key: Tensor,
                          past_value: Tensor, seqlens_k: Tensor, total_sequence_length: Tensor,
                          num_heads: int, kv_num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    # Only ever traced (by its fake below) for export; ONNX Runtime executes it.
    raise RuntimeError("flow::group_query_attention exists for ONNX export only; "
                       "run the exported graph with ONNX Runtime")


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, num_heads,
      kv_num_heads):
    return query.new_empty(query.shape), past_key.new_empty(past_key.shape), \
        past_value.new_empty(past_value.shape)


def _contrib_op():
    """The contrib op for onnxscript, with the schema of the inputs we use (onnx does not ship it)."""
    from onnx.defs import OpSchema
    from onnxscript.values import Op, Opset

    param = OpSchema.FormalParameter
    schema = OpSchema(
        "GroupQueryAttention", DOMAIN, 1, "ONNX Runtime contrib op (subset of inputs used here)",
        inputs=[param("query", "T"), param("key", "T"), param("value", "T"),
                param("past_key", "T"), param("past_value", "T"),
                param("seqlens_k", "M"), param("total_sequence_length", "M")],
        outputs=[param("output", "T"), param("present_key", "T"), param("present_value", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "activations"),
                          ("M", ["tensor(int32)"], "lengths")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "query heads"),
                    OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, "key/value heads")])
    return Op(Opset(DOMAIN, 1), "GroupQueryAttention", schema)


def translation_table() -> dict:
    """`custom_translation_table` for `torch.onnx.export(dynamo=True)`."""
    contrib = _contrib_op()

    def to_onnx(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                num_heads: int, kv_num_heads: int):
        return contrib(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                       num_heads=num_heads, kv_num_heads=kv_num_heads, _outputs=3)

    return {torch.ops.flow.group_query_attention.default: to_onnx}
