"""Token streams on disk: one flat numpy memmap per split, documents separated by EOS.

`tokens.json` beside them records the dtype, the counts and the hash of the tokenizer that made
them, so a stream is never read with the wrong tokenizer. A corpus holds the streams of its own
tokenizer; the same corpus encoded with a pretrained family's tokenizer goes to a directory of
its own (`tokenize_corpus(..., out_dir=...)`), which `tokens.json` ties back to the corpus.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from flow.artifact import file_sha256
from flow.data.tokenizer import eos_id
from flow.errors import DataError
from flow.fsutil import atomic_file

TOKENS_JSON = "tokens.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def encode_documents(tokenizer, documents: Iterable[str], out_path: Path, total: int | None = None,
                     batch_size: int = 64, progress: bool = True) -> int:
    """Encode `documents` (each followed by EOS) into a flat token file; return the token count."""
    dtype = token_dtype(tokenizer.get_vocab_size(with_added_tokens=True))
    eos = np.array([eos_id(tokenizer)], dtype=dtype)
    count = 0
    with atomic_file(out_path) as tmp, open(tmp, "wb") as f, \
            tqdm(total=total, desc=f"encode {out_path.stem}", unit="doc", disable=not progress) as bar:
        batch: list[str] = []

        def flush() -> None:
            nonlocal count
            for encoding in tokenizer.encode_batch(batch, add_special_tokens=False):
                ids = np.asarray(encoding.ids, dtype=dtype)
                f.write(ids.tobytes())
                f.write(eos.tobytes())
                count += len(ids) + 1
            bar.update(len(batch))
            batch.clear()

        for text in documents:
            batch.append(text)
            if len(batch) == batch_size:
                flush()
        flush()
    return count


def write_tokens_manifest(directory: Path, tokenizer_path: Path, dtype: np.dtype,
                          counts: dict[str, int], corpus_sha256: str | None = None) -> None:
    manifest = {"tokenizer_sha256": file_sha256(tokenizer_path), "dtype": dtype.name, "tokens": counts,
                "corpus_sha256": corpus_sha256}
    with atomic_file(directory / TOKENS_JSON) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")


def open_tokens(directory: Path | str, split: str, tokenizer_path: Path | str | None = None) -> np.memmap:
    """The token stream of `split` as a read-only memmap (checked against its tokenizer)."""
    directory = Path(directory)
    manifest_path = directory / TOKENS_JSON
    if not manifest_path.is_file():
        raise DataError(f"{directory} has no token streams; run `flow tokenize {directory}`")
    manifest = json.loads(manifest_path.read_text())
    if split not in manifest["tokens"]:
        raise DataError(f"{directory} has no {split!r} tokens; splits: {sorted(manifest['tokens'])}")
    if tokenizer_path is not None and file_sha256(Path(tokenizer_path)) != manifest["tokenizer_sha256"]:
        raise DataError(f"the tokens in {directory} were made with another tokenizer than "
                        f"{tokenizer_path}; encode the corpus with it: `flow tokenize CORPUS "
                        f"--tokenizer {tokenizer_path} --out DIR`")
    tokens = np.memmap(directory / f"{split}.bin", dtype=manifest["dtype"], mode="r")
    if len(tokens) != manifest["tokens"][split]:
        raise DataError(f"{directory / (split + '.bin')} holds {len(tokens)} tokens, "
                        f"{TOKENS_JSON} says {manifest['tokens'][split]}; run `flow tokenize` again")
    return tokens


def tokenize_corpus(corpus_dir: Path | str, tokenizer_path: Path | str | None = None,
                    out_dir: Path | str | None = None, progress: bool = True) -> dict[str, int]:
    """Encode every split of a corpus into `<split>.bin` memmaps; return tokens per split.

    `tokenizer_path` defaults to the corpus's own `tokenizer.json`; `out_dir` (default: the
    corpus directory) receives the streams and `tokens.json`, which records the corpus manifest's
    hash beside the tokenizer's.
    """
    from flow.data.corpus import CORPUS_JSON, SPLITS, iter_documents, read_manifest
    from flow.data.tokenizer import TOKENIZER_FILE, load_tokenizer

    corpus_dir = Path(corpus_dir)
    corpus = read_manifest(corpus_dir)
    tokenizer_path = Path(tokenizer_path or corpus_dir / TOKENIZER_FILE)
    tokenizer = load_tokenizer(tokenizer_path)
    out_dir = Path(out_dir or corpus_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in SPLITS:
        counts[split] = encode_documents(tokenizer, iter_documents(corpus_dir, split),
                                         out_dir / f"{split}.bin",
                                         total=corpus["splits"][split]["files"], progress=progress)
    dtype = token_dtype(tokenizer.get_vocab_size(with_added_tokens=True))
    write_tokens_manifest(out_dir, tokenizer_path, dtype, counts, file_sha256(corpus_dir / CORPUS_JSON))
    return counts
