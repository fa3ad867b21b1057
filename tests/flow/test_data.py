"""Corpus, tokenizer and token streams, built from the real stdlib with small caps."""

import json

import numpy as np
import pytest

from flow import DataError
from flow.data.corpus import build_corpus, iter_documents, split_of, stdlib_sources
from flow.data.tokenizer import EOS_TOKEN, load_tokenizer, save_tokenizer, train_tokenizer
from flow.data.tokens import open_tokens, tokenize_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus")
    build_corpus(path, val_fraction=0.2, max_bytes=400_000, heldout_bytes=200_000, progress=False)
    tokenizer = train_tokenizer(iter_documents(path, "train"), vocab_size=600)
    save_tokenizer(tokenizer, path / "tokenizer.json")
    tokenize_corpus(path, progress=False)
    return path


def read_split(path, split):
    return [json.loads(line) for line in (path / f"{split}.jsonl").read_text().splitlines()]


def test_split_is_by_file_disjoint_and_deterministic(corpus, tmp_path):
    train, val = read_split(corpus, "train"), read_split(corpus, "val")
    assert train and val
    assert {d["path"] for d in train}.isdisjoint(d["path"] for d in val)
    assert all(split_of(d["path"], 0.2) == "val" for d in val)
    assert all(split_of(d["path"], 0.2) == "train" for d in train)
    again = build_corpus(tmp_path, val_fraction=0.2, max_bytes=400_000, heldout_bytes=200_000,
                         progress=False)
    assert again["splits"] == json.loads((corpus / "corpus.json").read_text())["splits"]


def test_heldout_is_third_party_code_never_trained_on(corpus):
    heldout = read_split(corpus, "heldout")
    assert heldout and all(d["path"].startswith("site-packages/") for d in heldout)
    stdlib_texts = {source.path.read_text(errors="replace") for source in stdlib_sources()}
    assert not any(d["text"] in stdlib_texts for d in heldout)
    assert all(d["path"].startswith("stdlib/") for d in read_split(corpus, "train"))


def test_stdlib_test_suites_are_left_out_by_default():
    names = [s.name for s in stdlib_sources()]
    assert "stdlib/json/decoder.py" in names
    assert not any("/test/" in n for n in names)
    assert any("/test/" in s.name for s in stdlib_sources(include_tests=True))


def test_tokenizer_round_trips_code_exactly(corpus):
    tokenizer = load_tokenizer(corpus / "tokenizer.json")
    assert tokenizer.get_vocab_size() == 600
    assert tokenizer.token_to_id(EOS_TOKEN) == 0
    for text in list(iter_documents(corpus, "val"))[:5] + ["\tx = 'héllo wörld' # ∑\n\n  \r\n"]:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_token_streams_hold_every_document_separated_by_eos(corpus):
    tokenizer = load_tokenizer(corpus / "tokenizer.json")
    tokens = open_tokens(corpus, "val", corpus / "tokenizer.json")
    assert tokens.dtype == np.uint16
    documents = list(iter_documents(corpus, "val"))
    assert int((tokens == 0).sum()) == len(documents) and tokens[-1] == 0
    first_end = int(np.argmax(tokens == 0))
    assert tokenizer.decode(tokens[:first_end].tolist()) == documents[0]


def test_tokens_made_with_another_tokenizer_are_refused(corpus, tmp_path):
    other = train_tokenizer(["def f(): pass"] * 10, vocab_size=300)
    save_tokenizer(other, tmp_path / "other.json")
    with pytest.raises(DataError, match="made with another tokenizer"):
        open_tokens(corpus, "train", tmp_path / "other.json")


def test_missing_corpus_and_bad_vocab_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not a corpus"):
        tokenize_corpus(tmp_path)
    with pytest.raises(DataError, match="vocab_size must be at least 257"):
        train_tokenizer(["x"], vocab_size=100)
