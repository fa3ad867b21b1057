"""Between `flow.codecs` and the generated protobuf messages of `flow.v1` (needs protobuf only).

Both tiers use it: the device's client encodes hand-off rows into a `Tensor`, the service decodes
them back (how errors travel is `flow.status`).
"""

from __future__ import annotations

import numpy as np

from flow.codecs import CodecError, EncodedRows, decode, encode
from flow.v1 import tier_pb2

CODEC_TO_PROTO = {"fp32": tier_pb2.CODEC_FP32, "fp16": tier_pb2.CODEC_FP16,
                  "bf16": tier_pb2.CODEC_BF16, "int8": tier_pb2.CODEC_INT8}
PROTO_TO_CODEC = {v: k for k, v in CODEC_TO_PROTO.items()} | {tier_pb2.CODEC_UNSPECIFIED: "fp32"}


def codec_name(value: int) -> str:
    if value not in PROTO_TO_CODEC:
        raise CodecError(f"unknown codec enum value {value}; this server knows "
                         f"{sorted(PROTO_TO_CODEC)}")
    return PROTO_TO_CODEC[value]


def rows_to_tensor(rows: np.ndarray, codec: str) -> tier_pb2.Tensor:
    """Encode hand-off rows (n, hidden) as a wire `Tensor`."""
    encoded = encode(rows, codec)
    return tier_pb2.Tensor(codec=CODEC_TO_PROTO[codec], shape=list(encoded.shape),
                           data=encoded.data, scales=encoded.scales)


def tensor_to_rows(tensor: tier_pb2.Tensor) -> np.ndarray:
    """The float32 rows of a wire `Tensor`; `CodecError` naming what is malformed."""
    if len(tensor.shape) != 2:
        raise CodecError(f"hidden must have shape [rows, hidden], got {list(tensor.shape)}")
    shape = (int(tensor.shape[0]), int(tensor.shape[1]))
    return decode(EncodedRows(codec_name(tensor.codec), shape, tensor.data, tensor.scales))
