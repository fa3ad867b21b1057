"""The reference model against itself where the contract is exact: caches, ranges, exits."""

import pytest
import torch

from builders import tiny_config
from flow import Family
from flow.artifact import expected_tensors
from flow.model import FamilyModel


def test_state_dict_names_and_shapes_are_the_artifact_contract(tiny_family):
    state = {name: tuple(t.shape) for name, t in tiny_family.model.state_dict().items()}
    assert state == expected_tensors(tiny_family.config)


def test_parameter_counts_from_config_match_the_model(tiny_family):
    config, model = tiny_family.config, tiny_family.model
    assert config.total_parameters() == sum(p.numel() for p in model.parameters())
    for k, exit_layer in enumerate(config.exits):
        used = model.embed.weight.numel() + sum(
            p.numel() for layer in range(exit_layer + 1) for p in model.blocks[layer].parameters())
        used += sum(p.numel() for p in model.exits[k].parameters())
        assert config.member_parameters(k) == used


@pytest.mark.parametrize("exit", [0, 1, 2])
def test_incremental_decoding_with_cache_equals_full_forward(tiny_family, exit):
    torch.manual_seed(1)
    ids = torch.randint(0, tiny_family.config.vocab_size, (2, 20))
    full = tiny_family.logits(ids, exit=exit)
    model = tiny_family.model
    cache = model.new_cache(batch_size=2, max_seq_len=32)
    prompt = 7
    with torch.no_grad():
        steps = [model(ids[:, :prompt], positions=torch.arange(prompt), exits=[exit], cache=cache)[0]]
        for pos in range(prompt, ids.shape[1]):
            steps.append(model(ids[:, pos:pos + 1], positions=torch.tensor([pos]), exits=[exit],
                               cache=cache)[0])
    incremental = torch.cat(steps, dim=1)
    assert (incremental - full).abs().max().item() < 1e-5


def test_rolled_back_cache_slots_are_overwritten_not_seen(tiny_family):
    model = tiny_family.model
    ids = torch.randint(0, tiny_family.config.vocab_size, (1, 12))
    wrong = ids.clone()
    wrong[0, 8:] = (wrong[0, 8:] + 5) % tiny_family.config.vocab_size
    cache = model.new_cache(batch_size=1, max_seq_len=16)
    with torch.no_grad():
        model(wrong, cache=cache)  # a draft that fills slots 0..11, 8..11 wrongly
        redo = model(ids[:, 8:], positions=torch.arange(8, 12), cache=cache)[-1]  # roll back to 8
    full = tiny_family.logits(ids, exit=2)[:, 8:]
    assert (redo - full).abs().max().item() < 1e-5


def test_per_row_positions_match_separate_runs(tiny_family):
    # Two sequences at different offsets in one batch: what a batching cloud engine does.
    model = tiny_family.model
    a = torch.randint(0, 97, (1, 10))
    b = torch.randint(0, 97, (1, 10))
    cache = model.new_cache(batch_size=2, max_seq_len=16)
    with torch.no_grad():
        both = torch.cat([a[:, :4], b[:, :4]])
        model(both[:, :3], positions=torch.tensor([[0, 1, 2], [0, 1, 2]]), cache=cache)
        # Row 0 continues at position 3, row 1 re-does position 2 then 3 (a different frontier).
        step = torch.cat([a[:, 3:5], b[:, 2:4]])
        out = model(step, positions=torch.tensor([[3, 4], [2, 3]]), cache=cache)[-1]
    assert (out[0] - tiny_family.logits(a[:, :5], exit=2)[0, 3:5]).abs().max() < 1e-5
    assert (out[1] - tiny_family.logits(b[:, :4], exit=2)[0, 2:4]).abs().max() < 1e-5


@pytest.mark.parametrize("exit", [0, 1])
def test_range_run_on_handoff_equals_full_model(tiny_family, exit):
    ids = torch.randint(0, 97, (3, 15))
    config, model = tiny_family.config, tiny_family.model
    handoff = tiny_family.handoff(ids, exit=exit)
    with torch.no_grad():
        hidden = model.run_blocks(handoff, config.exit_layer(exit) + 1, config.num_layers - 1)
        logits = model.run_exit(hidden, config.last_exit)
    assert (logits - tiny_family.logits(ids, exit=config.last_exit)).abs().max() < 1e-5


def test_exit_logits_differ_between_members(tiny_family):
    ids = torch.randint(0, 97, (1, 8))
    a, b = tiny_family.logits(ids, exit=0), tiny_family.logits(ids, exit=2)
    assert (a - b).abs().max() > 1e-3


def test_all_exits_in_one_pass_equal_single_exit_calls(tiny_family):
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        together = tiny_family.model(ids)
    for k, logits in enumerate(together):
        assert torch.equal(logits, tiny_family.logits(ids, exit=k))


def test_random_is_deterministic_per_seed():
    a, b, c = (Family.random(tiny_config(), seed=s) for s in (3, 3, 4))
    assert a.family_hash() == b.family_hash() != c.family_hash()


def test_cache_missing_a_layer_is_a_clear_error():
    model = FamilyModel(tiny_config())
    cache = model.new_cache(batch_size=1, max_seq_len=8, layers=range(2))
    with pytest.raises(ValueError, match="no entry for backbone layer 2"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("bad, message", [
    ([[]], "non-empty"),
    ([[1.5, 2.0]], "token ids"),
    ([[1, 200]], "must lie in 0..96"),
    ([list(range(65))], "exceed this family's context of 64"),
])
def test_bad_input_ids_are_refused(tiny_family, bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_family.logits(bad, exit=0)


def test_unknown_exit_is_refused(tiny_family):
    with pytest.raises(ValueError, match=r"exit=3 is not a member.*exits 0..2"):
        tiny_family.logits([[1, 2]], exit=3)
