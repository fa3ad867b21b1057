"""The generated wire code is what `protos/` says (CI fails on a stale checkout)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_generated_code_is_up_to_date():
    result = subprocess.run([sys.executable, str(REPO / "protos" / "generate.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_wire_tensor_round_trip_and_malformed_tensors():
    import numpy as np
    import pytest

    from flow.codecs import CodecError
    from flow.v1 import tier_pb2
    from flow.wire import rows_to_tensor, tensor_to_rows

    rows = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    tensor = tier_pb2.Tensor.FromString(rows_to_tensor(rows, "fp32").SerializeToString())
    np.testing.assert_array_equal(tensor_to_rows(tensor), rows)
    with pytest.raises(CodecError, match="rows, hidden"):
        tensor_to_rows(tier_pb2.Tensor(codec=tier_pb2.CODEC_FP32, shape=[24], data=rows.tobytes()))
    with pytest.raises(CodecError, match="unknown codec"):
        tensor_to_rows(tier_pb2.Tensor(codec=17, shape=[3, 8], data=rows.tobytes()))
