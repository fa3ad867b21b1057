"""Parity checks against independent implementations, shared by the flow and device tests."""

from __future__ import annotations

import copy

import numpy as np
import torch


def truncated_logits(model, num_layers: int, ids) -> torch.Tensor:
    """Logits of a `transformers` model's first `num_layers` layers + its final norm and head,
    computed by `transformers` (what a family member of that depth must reproduce)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:num_layers]
    truncated = AutoModelForCausalLM.from_config(config).eval()
    missing, _ = truncated.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    with torch.no_grad():
        return truncated(torch.as_tensor(ids)).logits


def check_member_matches_family(member, family, exit: int, tokens: list[int], decode_steps: int,
                                keep: int, chunk: list[int]) -> None:
    """An exported member on ONNX Runtime (`device.member.MemberSession`) against the family's
    reference model to 1e-4: a prefill of `tokens` (logits and hand-off rows), `decode_steps`
    greedy steps fed from the member's own cache, then a rollback to `keep` positions and
    `chunk` fed at once."""
    tokens = list(tokens)
    out = member.run(tokens, 0)
    np.testing.assert_allclose(out.logits, family.logits(tokens, exit=exit)[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(out.handoff, family.handoff(tokens, exit=exit)[0].numpy(), atol=1e-4)
    for _ in range(decode_steps):
        tokens.append(int(out.logits[-1].argmax()))
        out = member.run(tokens[-1:], len(tokens) - 1)
        np.testing.assert_allclose(out.logits[0], family.logits(tokens, exit=exit)[0, -1].numpy(),
                                   atol=1e-4)
    tokens = tokens[:keep] + list(chunk)
    out = member.run(tokens[keep:], keep)
    np.testing.assert_allclose(out.logits, family.logits(tokens, exit=exit)[0, keep:].numpy(), atol=1e-4)
    np.testing.assert_allclose(out.handoff, family.handoff(tokens, exit=exit)[0, keep:].numpy(), atol=1e-4)
