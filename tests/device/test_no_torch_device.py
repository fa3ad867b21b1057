"""The device SDK generates where torch cannot be imported, from a copy of the family without weights.

A device receives family.json, tokenizer.json and its member's directory; it has ONNX Runtime and
tokenizers but no torch. Each test runs DeviceClient in a subprocess whose `import torch` fails.
"""

import json
import shutil

import pytest
from tokenizers import Tokenizer

from device import DeviceClient
from runs import run_without_torch

PROMPT = "def f(x):"


@pytest.fixture
def device_copy(device_family, tmp_path):
    """What a device gets: family.json, tokenizer.json and members/0/ (fp32 and int8), no weights."""
    family_dir = device_family[0]
    copy = tmp_path / "on-device"
    (copy / "members").mkdir(parents=True)
    for name in ("family.json", "tokenizer.json"):
        shutil.copy(family_dir / name, copy / name)
    shutil.copytree(family_dir / "members" / "0", copy / "members" / "0")
    assert (family_dir / "weights.safetensors").is_file()
    assert not (copy / "weights.safetensors").exists()
    return copy


def complete_without_torch(family_dir, **client_options) -> dict:
    result = run_without_torch(f"""
        import json
        from device import DeviceClient
        client = DeviceClient({str(family_dir)!r}, exit=0, **{client_options!r})
        result = client.complete({PROMPT!r}, max_new_tokens=8, ignore_eos=True)
        assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
        print(json.dumps({{"tokens": result.tokens, "text": result.text,
                          "finish_reason": result.finish_reason, "tiers": result.tiers}}))
    """)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_device_copy_without_weights_completes_without_torch(device_copy, int8):
    result = complete_without_torch(device_copy, int8=int8)
    assert len(result["tokens"]) == 8
    assert result["finish_reason"] == "length"
    assert result["tiers"] == ["device"] * 8
    tokenizer = Tokenizer.from_file(str(device_copy / "tokenizer.json"))
    assert result["text"] == tokenizer.decode(result["tokens"], skip_special_tokens=False)


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_device_copy_generates_what_the_full_family_directory_generates(device_family, device_copy, int8):
    # The same member, read in-process from the complete family directory (torch importable).
    expected = DeviceClient(device_family[0], exit=0, int8=int8).complete(
        PROMPT, max_new_tokens=8, ignore_eos=True)
    result = complete_without_torch(device_copy, int8=int8)
    assert result["tokens"] == expected.tokens
    assert result["text"] == expected.text


def test_flow_generate_command_runs_without_torch(device_copy):
    # the CLI loads every tier's command plugin (train, serve, generate): none may pull torch in
    result = run_without_torch(f"""
        from flow.cli.main import main
        assert main(["generate", {str(device_copy)!r}, "--prompt", {PROMPT!r},
                     "--max-new-tokens", "5", "--color", "never"]) == 0
        assert "torch" not in sys.modules
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(PROMPT) and "5 tokens" in result.stderr


def test_flow_info_describes_a_device_copy_without_torch(device_copy):
    """Catches: `flow info` refusing the device copy the README describes (no weights file)."""
    result = run_without_torch(f"""
        import sys
        from flow.cli.main import main
        sys.argv = ["flow", "info", {str(device_copy)!r}]
        main()
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "a device copy, without weights.safetensors" in result.stdout
    assert "device.onnx (sha256 " in result.stdout
