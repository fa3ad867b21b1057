"""The `flow` command line, run as a real process."""

import json
from pathlib import Path

import pytest
import torch

from builders import random_llama_checkpoint, random_qwen3_checkpoint, tiny_config
from flow import Family
from flow.cli.main import build_parser
from runs import flow


def test_every_command_has_help():
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"corpus", "tokenizer", "tokenize", "new", "info", "import-hf", "export-hf"} <= set(commands)
    for name in commands:
        out = flow(name, "--help").stdout
        assert f"usage: flow {name}" in out and len(out.splitlines()) > 3


def test_new_info_export_round_trip(tmp_path):
    flow("new", tmp_path / "fam", "--preset", "tiny", "--exits", "0", "2", "--seed", "5")
    info = json.loads(flow("info", tmp_path / "fam", "--json").stdout)
    assert info["architecture"]["exits"] == [0, 2, 3]
    assert [m["layers"] for m in info["members"]] == [2, 4, 4]
    family = Family.load(tmp_path / "fam")
    assert info["family_hash"] == family.family_hash() != info["weights"]["sha256"]
    assert [m["parameters"] for m in info["members"]] == [
        family.config.member_parameters(k) for k in range(3)]
    text = flow("info", tmp_path / "fam").stdout
    assert family.family_hash() in text and "after layer" in text

    flow("export-hf", tmp_path / "fam", tmp_path / "m1", "--exit", "1")
    from transformers import Qwen3ForCausalLM

    ids = torch.randint(0, family.config.vocab_size, (1, 12))
    hf = Qwen3ForCausalLM.from_pretrained(tmp_path / "m1", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(ids).logits - family.logits(ids, exit=1)).abs().max() <= 1e-4


def test_info_counts_a_head_equal_to_the_embedding_once(tmp_path):
    """Catches: a member whose head is still the tied embedding (SmolLM2's, as exit tuning with
    frozen heads leaves them) counted with the vocabulary matrix twice, overstating its size by
    vocab x hidden (28 M of SmolLM2's 135 M); checked against transformers' own count of the same
    model, whose `parameters()` holds a tied tensor once."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = random_llama_checkpoint(tmp_path / "llama", tie=True, num_hidden_layers=4)
    family = Family.from_hf(src, exits=[0, 1])  # exits after layers 0, 1 and 3
    with torch.no_grad():  # exit 1's head trained away from the embedding; 0 and 2 stay tied
        family.model.exits[1].head.weight.add_(0.01)
    family.save(tmp_path / "fam")

    def transformers_count(layers: int, tied: bool) -> int:
        config = AutoConfig.from_pretrained(src, num_hidden_layers=layers, tie_word_embeddings=tied)
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())

    members = json.loads(flow("info", tmp_path / "fam", "--json").stdout)["members"]
    assert [m["parameters"] for m in members] == [
        transformers_count(2, tied=True), transformers_count(3, tied=False), transformers_count(4, tied=True)]
    assert [m["head_is_embedding"] for m in members] == [True, False, True]
    assert "members 0, 2: the head equals the embedding" in flow("info", tmp_path / "fam").stdout

    (tmp_path / "fam" / "weights.safetensors").unlink()  # a device's copy cannot tell: says so
    members = json.loads(flow("info", tmp_path / "fam", "--json").stdout)["members"]
    assert [m["head_is_embedding"] for m in members] == [None] * 3
    assert "each head as its own tensor" in flow("info", tmp_path / "fam").stdout


def test_import_hf_command(tmp_path):
    src = random_qwen3_checkpoint(tmp_path / "q", num_hidden_layers=3)
    flow("import-hf", src, tmp_path / "fam", "--exits", "0", "--dtype", "bfloat16")
    family = Family.load(tmp_path / "fam")
    assert family.config.exits == (0, 2) and family.dtype == torch.bfloat16


@pytest.mark.parametrize("args, message", [
    (["info", "{tmp}/nothing"], "is not a directory"),
    (["new", "{tmp}/x", "--exits", "99"], "exits [99] are outside the backbone's layers 0..3"),
    (["export-hf", "{fam}", "{tmp}/m", "--exit", "7"], "exit=7 is not a member"),
    (["new", "{fam}"], "already exists"),
    (["tokenize", "{tmp}"], "is not a corpus"),
])
def test_errors_are_one_clear_line(tmp_path, args, message):
    fam = tmp_path / "fam"
    Family.random(tiny_config(), seed=0).save(fam)
    result = flow(*(a.format(tmp=tmp_path, fam=fam) for a in args), check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unknown_preset_is_refused_with_the_presets_there_are(tmp_path):
    result = flow("new", tmp_path / "x", "--preset", "huge", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "invalid choice: 'huge' (choose from 'base', 'demo', 'small', 'tiny')" in result.stderr


def test_compose_commands_are_valid_flow_invocations():
    import yaml

    compose = yaml.safe_load((Path(__file__).parents[2] / "docker-compose.yml").read_text())
    parser = build_parser()
    commands = [service["command"] for service in compose["services"].values() if "command" in service]
    assert commands
    for command in commands:
        assert command[0] == "flow"
        parser.parse_args(command[1:])  # raises SystemExit on an invalid command line


def test_flow_bench_lists_every_benchmark_script_with_its_command():
    """Catches: a benchmark script `flow bench all` would never run (its figures then come from
    no command of the suite)."""
    bench = Path(__file__).parents[2] / "bench"
    listed = flow("bench", "list").stdout
    scripts = {p.name for p in bench.glob("*.py") if 'if __name__ == "__main__":' in p.read_text()
               and p.name not in ("suite.py", "report.py")}  # the suite and its report are not benchmarks
    assert scripts and all(f"python bench/{name}" in listed for name in scripts), listed
    unknown = flow("bench", "no_such_benchmark", check=False)
    assert unknown.returncode == 2 and "flow bench list" in unknown.stderr
