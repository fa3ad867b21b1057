"""The device tier: family members under ONNX Runtime and the device SDK (issue 4; not built yet)."""
