"""The device tier: a family member on ONNX Runtime and the SDK around it (no torch).

`DeviceClient` generates with member k of a family and hands its hidden state to the next tier
when it is not confident (DESIGN.md §4); `MemberSession` is the ONNX Runtime session under it.
Only the `[device]` extra is needed: onnxruntime, numpy, tokenizers, gRPC.
"""

from device.client import Completion, DeviceClient, Generation, Step
from device.member import MemberSession

__all__ = ["DeviceClient", "Generation", "Completion", "Step", "MemberSession"]
