"""The training and evaluation corpora: real Python code found on every machine.

- train / val: the Python standard library's own sources, split by file with a salted hash of
  the file's path, so the split is the same on every machine with the same Python.
- heldout: sources of installed third-party packages (site-packages), code the model never
  trained on; files whose content also appears in the standard library are dropped.

Each split is a JSON-lines file of `{"path": ..., "text": ...}` documents, next to `corpus.json`
which records what went in.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from flow.errors import DataError
from flow.fsutil import atomic_file

SPLITS = ("train", "val", "heldout")
CORPUS_JSON = "corpus.json"
MAX_FILE_BYTES = 512 * 1024  # larger sources are generated tables, not code worth learning
# Packages whose sources would leak our own code or tooling into the held-out set.
_HELDOUT_EXCLUDED = {"flow", "device", "cloud", "training", "pip", "setuptools", "_distutils_hack"}


@dataclass(frozen=True)
class SourceFile:
    name: str  # stable, machine-independent name, e.g. "stdlib/json/decoder.py"
    path: Path


def _salted_fraction(salt: str, name: str) -> float:
    digest = hashlib.sha256(f"{salt}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(name: str, val_fraction: float) -> str:
    """'val' for a stable `val_fraction` of file names, else 'train'."""
    return "val" if _salted_fraction("split", name) < val_fraction else "train"


def stdlib_sources(include_tests: bool = False) -> list[SourceFile]:
    """The standard library's .py files (no site-packages; no test suites unless asked)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        parts = relative.parts
        if "site-packages" in parts or "dist-packages" in parts:
            continue
        if not include_tests and any(p in ("test", "tests", "idle_test") for p in parts[:-1]):
            continue
        files.append(SourceFile(f"stdlib/{relative.as_posix()}", path))
    return files


def third_party_sources() -> list[SourceFile]:
    """The .py files of installed third-party packages of this interpreter."""
    roots = {Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")}
    files = []
    for root in sorted(roots):
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.py")):
            relative = path.relative_to(root)
            if relative.parts[0] in _HELDOUT_EXCLUDED or relative.parts[0].endswith(".dist-info"):
                continue
            files.append(SourceFile(f"site-packages/{relative.as_posix()}", path))
    return files


def _read_source(source: SourceFile) -> str | None:
    try:
        if source.path.stat().st_size > MAX_FILE_BYTES:
            return None
        text = source.path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text if text.strip() else None


def build_corpus(out_dir: Path | str, val_fraction: float = 0.05, max_bytes: int | None = None,
                 heldout_bytes: int = 4 * 2**20, include_tests: bool = False,
                 progress: bool = True) -> dict:
    """Write train/val/heldout JSON-lines files and corpus.json into `out_dir`; return the manifest.

    `max_bytes` caps train + val (files taken in a salted-hash order, so a cap keeps a spread of
    the whole library); `heldout_bytes` caps the held-out set the same way.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def ordered(files: list[SourceFile]) -> list[SourceFile]:
        return sorted(files, key=lambda f: _salted_fraction("order", f.name))

    stdlib = ordered(stdlib_sources(include_tests))
    if not stdlib:
        raise DataError(f"found no standard-library sources under {sysconfig.get_paths()['stdlib']}")
    documents: dict[str, list[tuple[str, str]]] = {split: [] for split in SPLITS}
    seen_content: set[str] = set()
    taken = skipped = 0
    for source in tqdm(stdlib, desc="stdlib sources", unit="file", disable=not progress):
        text = _read_source(source)
        if text is None:
            skipped += 1
            continue
        if max_bytes is not None and taken + len(text) > max_bytes:
            break
        taken += len(text)
        seen_content.add(hashlib.sha256(text.encode()).hexdigest())
        documents[split_of(source.name, val_fraction)].append((source.name, text))

    heldout_taken = 0
    for source in tqdm(ordered(third_party_sources()), desc="held-out sources", unit="file",
                       disable=not progress):
        if heldout_taken >= heldout_bytes:
            break
        text = _read_source(source)
        if text is None or hashlib.sha256(text.encode()).hexdigest() in seen_content:
            continue
        heldout_taken += len(text)
        documents["heldout"].append((source.name, text))

    for split in ("train", "val"):
        if not documents[split]:
            raise DataError(f"the {split} split is empty; raise --max-mb or --val-fraction")
    manifest = {
        "python": sys.version.split()[0],
        "val_fraction": val_fraction,
        "include_tests": include_tests,
        "skipped_files": skipped,
        "splits": {split: _write_split(out_dir / f"{split}.jsonl", docs)
                   for split, docs in documents.items()},
    }
    with atomic_file(out_dir / CORPUS_JSON) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _write_split(path: Path, documents: list[tuple[str, str]]) -> dict:
    sha = hashlib.sha256()
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for name, text in documents:
            line = json.dumps({"path": name, "text": text}) + "\n"
            sha.update(line.encode())
            f.write(line)
    return {"files": len(documents), "bytes": sum(len(t.encode()) for _, t in documents),
            "sha256": sha.hexdigest()}


def read_manifest(corpus_dir: Path | str) -> dict:
    path = Path(corpus_dir) / CORPUS_JSON
    if not path.is_file():
        raise DataError(f"{corpus_dir} is not a corpus (no {CORPUS_JSON}); build it with `flow corpus`")
    return json.loads(path.read_text())


def iter_documents(corpus_dir: Path | str, split: str) -> Iterator[str]:
    """The texts of one split, in file order."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; splits are {SPLITS}")
    path = Path(corpus_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{path} is missing; rebuild the corpus with `flow corpus {corpus_dir}`")
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def code_prompts(corpus_dir: Path | str, count: int, split: str = "heldout",
                 context_lines: int = 6) -> list[str]:
    """`count` prompts from real code the model did not train on: in file order, each function
    definition of the split (a line starting with `def `) that has a body, with up to
    `context_lines` lines before it, ending with its signature line, so the model writes the
    body. One prompt per document, so the prompts span many files."""
    prompts = []
    for text in iter_documents(corpus_dir, split):
        lines = text.splitlines()
        for i, line in enumerate(lines[:-1]):
            if line.startswith("def ") and line.rstrip().endswith(":") and lines[i + 1].strip():
                prompts.append("\n".join(lines[max(0, i - context_lines):i + 1]) + "\n")
                break
        if len(prompts) == count:
            return prompts
    raise DataError(f"{corpus_dir}'s {split} split has {len(prompts)} functions to prompt with, "
                    f"not {count}; ask for fewer prompts or build a larger corpus")
