"""A small real corpus and helpers to run `flow train` as users do (real torchrun, real ranks)."""

from pathlib import Path

import pytest

from flow.data.corpus import build_corpus, iter_documents
from flow.data.tokenizer import save_tokenizer, train_tokenizer
from flow.data.tokens import tokenize_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("train-corpus")
    build_corpus(path, val_fraction=0.1, max_bytes=300_000, heldout_bytes=50_000, progress=False)
    save_tokenizer(train_tokenizer(iter_documents(path, "train"), vocab_size=512), path / "tokenizer.json")
    tokenize_corpus(path, progress=False)
    return path


