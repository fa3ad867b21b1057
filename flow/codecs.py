"""How hand-off rows `h_e` travel between tiers: raw bytes + dtype + shape (DESIGN.md §4).

Codecs, for a (rows, hidden) float32 array:

- `fp32`: the bytes as they are (exact);
- `fp16`: IEEE half;
- `bf16`: the top 16 bits of each float32, rounded to nearest even (fp32's range, 8-bit mantissa);
- `int8`: symmetric per-row quantization, one float32 scale per row (max |x| / 127).

numpy only, so devices and cloud share it. Every payload is little-endian.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flow.errors import FlowError

CODECS = ("fp32", "fp16", "bf16", "int8")


class CodecError(FlowError, ValueError):
    """A payload or codec name that cannot be decoded."""


@dataclass(frozen=True)
class EncodedRows:
    """A (rows, hidden) tensor on the wire."""

    codec: str
    shape: tuple[int, int]
    data: bytes
    scales: bytes = b""  # int8 only: one little-endian float32 per row

    @property
    def num_bytes(self) -> int:
        return len(self.data) + len(self.scales)


def encode(rows: np.ndarray, codec: str) -> EncodedRows:
    """Encode float rows (n, hidden) with `codec`."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2:
        raise CodecError(f"hand-off rows must be 2-D (rows, hidden), got shape {rows.shape}")
    if rows.shape[1] == 0:  # decode() rejects it too; int8 would fail on the empty max
        raise CodecError(f"hand-off rows need hidden > 0, got shape {rows.shape}")
    shape = (int(rows.shape[0]), int(rows.shape[1]))
    if codec == "fp32":
        return EncodedRows(codec, shape, rows.astype("<f4").tobytes())
    if codec == "fp16":
        return EncodedRows(codec, shape, rows.astype("<f2").tobytes())
    if codec == "bf16":
        bits = rows.view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest, ties to even
        # rounding would carry a NaN's low mantissa bits into the exponent (NaN -> inf, or
        # 0xFFFFFFFF -> 0); keep every NaN a quiet NaN of its sign instead
        rounded = np.where(np.isnan(rows), (bits >> 16) | 0x0040, rounded)
        return EncodedRows(codec, shape, rounded.astype("<u2").tobytes())
    if codec == "int8":
        scales = np.abs(rows).max(axis=1) / 127.0
        scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
        quantized = np.clip(np.rint(rows / scales[:, None]), -127, 127).astype(np.int8)
        return EncodedRows(codec, shape, quantized.tobytes(), scales.astype("<f4").tobytes())
    raise CodecError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")


_ITEM_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}


def decode(encoded: EncodedRows) -> np.ndarray:
    """The float32 rows of a payload; `CodecError` if its sizes do not match its shape."""
    codec, (n, hidden) = encoded.codec, encoded.shape
    if codec not in _ITEM_BYTES:
        raise CodecError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    if n < 0 or hidden <= 0:
        raise CodecError(f"bad shape {encoded.shape}: rows must be >= 0 and hidden > 0")
    expected = n * hidden * _ITEM_BYTES[codec]
    if len(encoded.data) != expected:
        raise CodecError(f"{codec} payload of shape {encoded.shape} must be {expected} bytes, "
                         f"got {len(encoded.data)}")
    if codec == "fp32":
        return np.frombuffer(encoded.data, "<f4").reshape(n, hidden).astype(np.float32)
    if codec == "fp16":
        return np.frombuffer(encoded.data, "<f2").reshape(n, hidden).astype(np.float32)
    if codec == "bf16":
        bits = np.frombuffer(encoded.data, "<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(n, hidden)
    if len(encoded.scales) != 4 * n:
        raise CodecError(f"int8 payload of {n} rows needs {n} float32 scales ({4 * n} bytes), "
                         f"got {len(encoded.scales)} bytes")
    scales = np.frombuffer(encoded.scales, "<f4")
    return np.frombuffer(encoded.data, np.int8).reshape(n, hidden).astype(np.float32) * scales[:, None]
