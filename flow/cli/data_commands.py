"""`flow corpus`, `flow tokenizer`, `flow tokenize`: the data a family trains and is judged on."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subcommands: argparse._SubParsersAction) -> None:
    corpus = subcommands.add_parser(
        "corpus", help="collect the training corpus (stdlib) and held-out code (site-packages)",
        description="Collect the Python standard library's sources into train/val splits (split "
                    "by file, the same on every machine) and third-party package sources into a "
                    "held-out evaluation split.")
    corpus.add_argument("out", type=Path, help="corpus directory to write")
    corpus.add_argument("--val-fraction", type=float, default=0.05,
                        help="share of stdlib files in the validation split (default 0.05)")
    corpus.add_argument("--max-mb", type=float, default=None,
                        help="cap train+val at this many MB (default: the whole stdlib)")
    corpus.add_argument("--heldout-mb", type=float, default=4.0,
                        help="size of the held-out split in MB (default 4)")
    corpus.add_argument("--include-tests", action="store_true",
                        help="also take the stdlib's own test suites")
    corpus.set_defaults(handler=run_corpus)

    tokenizer = subcommands.add_parser(
        "tokenizer", help="train a byte-level BPE tokenizer on a corpus",
        description="Train a byte-level BPE tokenizer on the train split; writes CORPUS/tokenizer.json.")
    tokenizer.add_argument("corpus", type=Path, help="corpus directory made by `flow corpus`")
    tokenizer.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size (default 4096)")
    tokenizer.add_argument("--min-frequency", type=int, default=2,
                           help="least count of a pair to be merged (default 2)")
    tokenizer.set_defaults(handler=run_tokenizer)

    tokenize = subcommands.add_parser(
        "tokenize", help="encode every corpus split into token memmaps",
        description="Encode train/val/heldout into CORPUS/<split>.bin (flat uint16/uint32 token "
                    "streams, documents separated by <|endoftext|>) and CORPUS/tokens.json.",
        epilog="For a pretrained family, encode the corpus with the family's own tokenizer into a "
               "directory of its own: `flow tokenize CORPUS --tokenizer FAMILY/tokenizer.json "
               "--out DIR`, then set `data.tokens: DIR` in the training config.")
    tokenize.add_argument("corpus", type=Path, help="corpus directory made by `flow corpus`")
    tokenize.add_argument("--tokenizer", type=Path, default=None,
                          help="tokenizer to use (default CORPUS/tokenizer.json)")
    tokenize.add_argument("--out", type=Path, default=None,
                          help="directory for the token streams (default CORPUS)")
    tokenize.set_defaults(handler=run_tokenize)


def run_corpus(args: argparse.Namespace) -> None:
    from flow.data.corpus import build_corpus

    mb = 2**20
    manifest = build_corpus(args.out, val_fraction=args.val_fraction,
                            max_bytes=int(args.max_mb * mb) if args.max_mb else None,
                            heldout_bytes=int(args.heldout_mb * mb), include_tests=args.include_tests)
    for split, info in manifest["splits"].items():
        print(f"{split:8s} {info['files']:6d} files {info['bytes'] / mb:8.2f} MB")
    print(f"wrote {args.out}")


def run_tokenizer(args: argparse.Namespace) -> None:
    from flow.data.corpus import iter_documents, read_manifest
    from flow.data.tokenizer import TOKENIZER_FILE, save_tokenizer, train_tokenizer

    read_manifest(args.corpus)
    print(f"training a {args.vocab_size}-token byte-level BPE on {args.corpus}/train.jsonl …")
    tokenizer = train_tokenizer(iter_documents(args.corpus, "train"), args.vocab_size, args.min_frequency)
    path = save_tokenizer(tokenizer, args.corpus / TOKENIZER_FILE)
    print(f"wrote {path} ({tokenizer.get_vocab_size()} tokens)")


def run_tokenize(args: argparse.Namespace) -> None:
    from flow.data.tokens import tokenize_corpus

    counts = tokenize_corpus(args.corpus, args.tokenizer, args.out)
    for split, count in counts.items():
        print(f"{split:8s} {count:10,d} tokens")
    print(f"wrote {args.out or args.corpus}/tokens.json")
