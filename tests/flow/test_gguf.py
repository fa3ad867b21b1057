"""GGUF import against `transformers`' own GGUF loader, on tiny files written here with `gguf`.

The files are written the way llama.cpp's converter writes them (its tensor names from the `gguf`
package's own name map, Llama's q/k row permutation, 2-D weights quantized, norms in F32), so
flow's reader, its dequantization path, name map and un-permutation are checked against an
implementation that shares none of them.
"""

import json

import gguf
import numpy as np
import pytest
import regex
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from builders import random_hf_checkpoint
from flow import ArtifactError, ConfigError, Family
from flow.data.corpus import stdlib_sources
from flow.data.tokenizer import EOS_TOKEN, train_tokenizer
from parity import truncated_logits

F32, Q8_0, Q4_1 = (gguf.GGMLQuantizationType[name] for name in ("F32", "Q8_0", "Q4_1"))
CONTROL, USER_DEFINED = 3, 4
TEXTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "x = [\n    1, 22, 333]\n\t\ty  =  4\n",
    "  leading spaces, trailing ones  ",
    "tabs\tand\r\nnewlines\n\n\n",
    "héllo wörld — ünïcode ✓ 日本語",
    "it's we'll they'd I'M",
    f"{EOS_TOKEN}after a special token<tool>call",
    "3.14159e-10 + 0x1F",
]


# ---- writing GGUF files as llama.cpp's converter does ----------------------------------------------


def permute_like_llama_cpp(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter order for Llama q/k: rows j and j + d/2 of a head become 2j, 2j+1."""
    rows, columns = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, columns).swapaxes(1, 2).reshape(rows, columns)


def small_vocabulary(vocab_size=300):
    """(tokens by id, merges as 'a b', token types) of a byte-level BPE trained with `tokenizers`,
    plus one user-defined token."""
    names = {"stdlib/textwrap.py", "stdlib/heapq.py"}
    tokenizer = train_tokenizer([s.path.read_text() for s in stdlib_sources() if s.name in names],
                                vocab_size=vocab_size)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get) + ["<tool>"]
    merges = [" ".join(pair) for pair in json.loads(tokenizer.to_str())["model"]["merges"]]
    types = [CONTROL if token == EOS_TOKEN else USER_DEFINED if token == "<tool>" else 1 for token in tokens]
    return tokenizer, tokens, merges, types


def write_gguf(path, src, qtype=F32, pre="gpt2", vocabulary=None, arch_name=None, tokenizer_model="gpt2"):
    """Write the `transformers` checkpoint `src` as a GGUF file (with a tokenizer if given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    config = model.config
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen3": gguf.MODEL_ARCH.QWEN3}[config.model_type]
    writer = gguf.GGUFWriter(path, arch_name or gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name("tiny test model")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if vocabulary is not None:
        _, tokens, merges, types = vocabulary
        writer.add_tokenizer_model(tokenizer_model)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tokens.index(EOS_TOKEN))
        writer.add_eos_token_id(tokens.index(EOS_TOKEN))
        writer.add_add_bos_token(False)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        data = tensor.numpy()
        if config.model_type == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            data = permute_like_llama_cpp(data, heads)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if data.ndim == 2 and qtype != F32:
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---- the model -------------------------------------------------------------------------------------

LLAMA_CASES = {
    # plain float32, GQA ratio 2, untied head
    "f32-gqa": dict(qtype=F32, tie=False, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    hidden_size=64, intermediate_size=96),
    # 8-bit blocks (SmolLM2's embedding), multi-query, tied embeddings (SmolLM2's layout)
    "q8_0-mqa-tied": dict(qtype=Q8_0, tie=True, num_attention_heads=4, num_key_value_heads=1,
                          head_dim=16, hidden_size=64, intermediate_size=96),
    # 4-bit blocks with a minimum (SmolLM2's matrices), head_dim * heads != hidden
    "q4_1-wide-heads": dict(qtype=Q4_1, tie=False, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, hidden_size=96, intermediate_size=128),
}


@pytest.mark.parametrize("case", LLAMA_CASES.values(), ids=LLAMA_CASES.keys())
def test_llama_gguf_matches_transformers_gguf_load_at_every_exit(tmp_path, case):
    case = dict(case)
    qtype, tie = case.pop("qtype"), case.pop("tie")
    src = random_hf_checkpoint(tmp_path / "src", "llama", seed=7, tie=tie, num_hidden_layers=4,
                               vocab_size=301, rope_theta=100000.0, rms_norm_eps=1e-5, **case)
    write_gguf(tmp_path / "gguf" / "tiny.gguf", src, qtype, vocabulary=small_vocabulary())
    family = Family.from_gguf(tmp_path / "gguf" / "tiny.gguf", exits=[0, 1])
    assert family.config.architecture == "llama" and family.config.exits == (0, 1, 3)
    assert (family.config.rope_theta, family.config.rms_norm_eps) == (100000.0, pytest.approx(1e-5))
    assert family.provenance["tied_embeddings"] == tie
    assert family.provenance["tensor_types"].get(qtype.name, 0) > 0

    oracle = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file="tiny.gguf",
                                                  dtype=torch.float32).eval()
    ids = torch.randint(0, 301, (2, 13), generator=torch.Generator().manual_seed(0))
    for k in range(family.config.num_exits):
        expected = truncated_logits(oracle, family.config.member_num_layers(k), ids)
        assert (family.logits(ids, exit=k) - expected).abs().max().item() <= 1e-4
    if qtype == F32:  # unquantized, the round trip through GGUF gives back the source model
        source = Family.from_hf(src, exits=[0, 1])
        assert (family.logits(ids, exit=2) - source.logits(ids, exit=2)).abs().max().item() <= 1e-5


def test_qwen3_gguf_matches_its_source_checkpoint(tmp_path):
    # transformers' GGUF loader does not read a Qwen3 file's head_dim, so the oracle here is the
    # source checkpoint in transformers; Qwen3 files keep q/k rows in Hugging Face's order.
    src = random_hf_checkpoint(tmp_path / "src", "qwen3", seed=3, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, hidden_size=48, intermediate_size=80)
    write_gguf(tmp_path / "tiny.gguf", src)
    family = Family.from_gguf(tmp_path / "tiny.gguf", exits=[1])
    assert family.config.architecture == "qwen3" and family.tokenizer is None
    source = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.randint(0, 101, (2, 11), generator=torch.Generator().manual_seed(1))
    for k in range(family.config.num_exits):
        expected = truncated_logits(source, family.config.member_num_layers(k), ids)
        assert (family.logits(ids, exit=k) - expected).abs().max().item() <= 1e-4


# ---- the tokenizer ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocabulary():
    return small_vocabulary()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return random_hf_checkpoint(tmp_path_factory.mktemp("llama"), "llama", vocab_size=301, hidden_size=64,
                                intermediate_size=96)


@pytest.mark.parametrize("pre", ["gpt2", "qwen2"])
def test_tokenizer_equals_transformers_gguf_tokenizer(tmp_path, tiny_llama, vocabulary, pre):
    write_gguf(tmp_path / "tiny.gguf", tiny_llama, pre=pre, vocabulary=vocabulary)
    ours = Family.from_gguf(tmp_path / "tiny.gguf", exits=[1]).tokenizer
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode("a<tool>b").ids[1] == len(vocabulary[1]) - 1  # the user-defined token, whole
    if pre == "gpt2":  # GPT-2's split is the one the vocabulary was trained with: the same ids
        source = vocabulary[0]
        assert all(ours.encode(text).ids == source.encode(text).ids for text in TEXTS if "<tool>" not in text)


def llama_cpp_starcoder_split(text: str) -> list[str]:
    """llama.cpp's pre-tokenization for SmolLM2 ('smollm'): every digit alone, then GPT-2's regex."""
    gpt2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
    pieces = []
    for chunk in regex.split(r"(\p{N})", text):
        pieces += regex.findall(gpt2, chunk) if chunk and not regex.fullmatch(r"\p{N}", chunk) else [chunk]
    return [piece for piece in pieces if piece]


def test_smollm_pre_tokenizer_splits_digits_as_llama_cpp(tmp_path, tiny_llama, vocabulary):
    # transformers has no split for "smollm" and falls back to GPT-2's, which keeps a run of
    # blanks before a digit apart; the oracle is llama.cpp's split, encoded piece by piece by
    # transformers' own tokenizer of the same vocabulary.
    write_gguf(tmp_path / "gpt2" / "tiny.gguf", tiny_llama, pre="gpt2", vocabulary=vocabulary)
    write_gguf(tmp_path / "smollm" / "tiny.gguf", tiny_llama, pre="smollm", vocabulary=vocabulary)
    ours = Family.from_gguf(tmp_path / "smollm" / "tiny.gguf", exits=[1]).tokenizer
    per_piece = AutoTokenizer.from_pretrained(tmp_path / "gpt2", gguf_file="tiny.gguf")
    for text in TEXTS:
        if EOS_TOKEN in text:
            continue
        expected = [i for piece in llama_cpp_starcoder_split(text) for i in per_piece(piece)["input_ids"]]
        assert ours.encode(text).ids == expected, text


# ---- refusals and the command line -----------------------------------------------------------------


def test_unsupported_gguf_architecture_is_refused(tmp_path, tiny_llama):
    write_gguf(tmp_path / "gemma.gguf", tiny_llama, arch_name="gemma")
    with pytest.raises(ConfigError, match=r"is a GGUF file of architecture 'gemma'; supported: "
                                          r"'qwen3', 'llama'"):
        Family.from_gguf(tmp_path / "gemma.gguf", exits=[1])


@pytest.mark.parametrize("pre, model, message", [
    ("llama-bpe", "gpt2", r"pre-tokenizer 'llama-bpe' is not supported \(supported: default, gpt2"),
    ("default", "llama", r"only byte-level BPE GGUF tokenizers .* this one is 'llama'"),
])
def test_unsupported_tokenizers_are_refused(tmp_path, tiny_llama, vocabulary, pre, model, message):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_llama, pre=pre, vocabulary=vocabulary,
                      tokenizer_model=model)
    with pytest.raises(ConfigError, match=message):
        Family.from_gguf(path, exits=[1])


def test_extra_tensors_are_refused(tmp_path):
    src = random_hf_checkpoint(tmp_path / "src", "llama", attention_bias=True)
    write_gguf(tmp_path / "bias.gguf", src)
    with pytest.raises(ConfigError, match=r"has tensors a llama family does not .* 'blk.0.attn_"):
        Family.from_gguf(tmp_path / "bias.gguf", exits=[1])


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ArtifactError, match="is not a readable GGUF file"):
        Family.from_gguf(tmp_path / "x.gguf", exits=[1])


def test_import_hf_command_reads_gguf(tmp_path, tiny_llama, vocabulary):
    from runs import flow

    path = write_gguf(tmp_path / "tiny.gguf", tiny_llama, qtype=Q8_0, vocabulary=vocabulary)
    out = flow("import-hf", "--gguf", path, tmp_path / "fam", "--exits", "1").stdout
    assert "llama, 4 layers, exits after layers [1, 3]" in out
    manifest = json.loads((tmp_path / "fam" / "family.json").read_text())
    assert manifest["architecture"]["architecture"] == "llama"
    assert manifest["provenance"]["source"] == "gguf" and manifest["tokenizer"] is not None
    both = flow("import-hf", tiny_llama, tmp_path / "fam2", "--gguf", path, "--exits", "1", check=False)
    assert both.returncode == 1 and "give exactly one source" in both.stderr
