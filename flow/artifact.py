"""The family artifact on disk (DESIGN.md §2), readable without torch.

    family.json            architecture, exits, tokenizer, provenance, format version, weights
                           hash, and the SHA-256 of every exported member file
    weights.safetensors    every tensor, under the names of `expected_tensors(config)`
    tokenizer.json         a `tokenizers` tokenizer (optional for test families)
    members/<k>/...        exported device parts (written by `flow export-onnx`)

The *weights hash* is a SHA-256 over the weights' names, dtypes, shapes and bytes in name order.
It does not depend on how the file is laid out, so it can be computed from tensors in memory or
from the file. The *family hash*, the identity every tier and device member compares, covers the
architecture as well (`family_hash`): two families with equal weights but another `rope_theta`,
norm epsilon, exits or context compute different models, and their hashes differ.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flow.config import FamilyConfig
from flow.data.tokenizer import EOS_TOKEN
from flow.errors import ArtifactError, ConfigError, HashMismatchError
from flow.member_format import FLOAT32_FILE, INT8_FILE

FORMAT = "familial-flow/family"
FORMAT_VERSION = 1
FAMILY_JSON = "family.json"
WEIGHTS_FILE = "weights.safetensors"
TOKENIZER_FILE = "tokenizer.json"
MEMBERS_DIR = "members"
CALIBRATION_FILE = "calibration.json"  # per member: `flow calibrate` thresholds

# ---- tensor names -------------------------------------------------------------------------------

def block_tensor_shapes(config: FamilyConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of one decoder block's tensors, by their name inside the block."""
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_heads * d, config.num_kv_heads * d
    shapes = {
        "attn_norm.weight": (h,), "attn.q_proj.weight": (q, h), "attn.k_proj.weight": (kv, h),
        "attn.v_proj.weight": (kv, h), "attn.o_proj.weight": (h, q), "attn.q_norm.weight": (d,),
        "attn.k_norm.weight": (d,), "mlp_norm.weight": (h,), "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
    }
    if not config.arch.qk_norm:
        del shapes["attn.q_norm.weight"], shapes["attn.k_norm.weight"]
    return shapes


def expected_tensors(config: FamilyConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a family with `config` stores, with its shape (flow's own names)."""
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (config.vocab_size, config.hidden_size)}
    block = block_tensor_shapes(config)
    for layer in range(config.num_layers):
        shapes.update({f"blocks.{layer}.{name}": shape for name, shape in block.items()})
    for k in range(config.num_exits):
        if k < config.last_exit:
            shapes.update({f"exits.{k}.block.{name}": shape for name, shape in block.items()})
        shapes[f"exits.{k}.norm.weight"] = (config.hidden_size,)
        shapes[f"exits.{k}.head.weight"] = (config.vocab_size, config.hidden_size)
    return shapes


# ---- hashing ------------------------------------------------------------------------------------

TensorEntry = tuple[str, str, tuple[int, ...], memoryview | bytes]  # name, dtype code, shape, bytes


def family_hash(config: FamilyConfig, weights_sha256: str) -> str:
    """The family's identity: SHA-256 of its architecture (canonical JSON) and its weights hash."""
    sha = hashlib.sha256(b"familial-flow family hash v2\n")
    sha.update(json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":")).encode())
    sha.update(weights_sha256.encode())
    return sha.hexdigest()


def digest_tensors(entries: Iterable[TensorEntry]) -> str:
    """The weights hash of tensors given as (name, safetensors dtype, shape, raw bytes)."""
    sha = hashlib.sha256()
    for name, dtype, shape, data in sorted(entries, key=lambda entry: entry[0]):
        sha.update(json.dumps([name, dtype, list(shape), len(data)]).encode())
        sha.update(data)
    return sha.hexdigest()


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (names -> dtype, shape, data_offsets)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as err:
        raise ArtifactError(f"{path} is not a readable safetensors file ({err})") from None
    header.pop("__metadata__", None)
    return header


@contextmanager
def mapped_tensors(path: Path) -> Iterator[dict[str, tuple[str, tuple[int, ...], memoryview]]]:
    """Every tensor of a safetensors file as (dtype, shape, bytes), the bytes zero-copy windows
    into the file mapped in memory (valid inside the `with` only), without torch."""
    header = read_safetensors_header(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        start = 8 + struct.unpack("<Q", data[:8])[0]
        with memoryview(data) as view:
            tensors = {name: (info["dtype"], tuple(info["shape"]),
                              view[start + info["data_offsets"][0]:start + info["data_offsets"][1]])
                       for name, info in header.items()}
            try:
                yield tensors
            finally:
                for _, _, window in tensors.values():
                    window.release()


def digest_safetensors(path: Path) -> str:
    """The weights hash of a safetensors file, read through mmap without torch."""
    with mapped_tensors(path) as tensors:
        return digest_tensors([(name, *tensor) for name, tensor in tensors.items()])


def heads_equal_to_embedding(path: Path, num_exits: int) -> list[bool]:
    """Per exit, whether its LM head in the weights file `path` is bit for bit the embedding.

    A family stores every head as a tensor of its own, even when its source tied them
    (`flow.backbone` copies the embedding into each exit, and training may move some heads while
    frozen ones stay equal), so neither shared storage nor a config flag tells. The device
    exporter writes one tensor for both exactly when they are equal (`flow.onnx_export`), and
    this is the same test on the stored bytes.
    """
    with mapped_tensors(path) as tensors:
        embedding = tensors["embed.weight"]
        return [tensors[f"exits.{k}.head.weight"] == embedding for k in range(num_exits)]


# ---- the manifest (family.json) -----------------------------------------------------------------


@dataclass
class TokenizerInfo:
    name: str
    sha256: str
    # Tokens that end a generation: the checkpoint's declared end token(s), and flow's document
    # separator where the vocabulary has it (manifests from before this field: that one only).
    stop_tokens: tuple[str, ...] = (EOS_TOKEN,)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "file": TOKENIZER_FILE, "sha256": self.sha256,
                "stop_tokens": list(self.stop_tokens)}


@dataclass
class FamilyManifest:
    """The content of family.json."""

    config: FamilyConfig
    weights_sha256: str
    weights_dtype: str
    tokenizer: TokenizerInfo | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    # exit (as a string) -> {file name: SHA-256} of the member files `flow export-onnx` wrote
    members: dict[str, dict[str, str]] = field(default_factory=dict)

    def member_sha256(self, exit: int, file_name: str) -> str | None:
        """The recorded hash of member `exit`'s `file_name`, None if none was recorded."""
        return self.members.get(str(exit), {}).get(file_name)

    @property
    def family_hash(self) -> str:
        """The identity of architecture and weights (`flow.artifact.family_hash`)."""
        return family_hash(self.config, self.weights_sha256)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "architecture": self.config.to_dict(),
            "weights": {"file": WEIGHTS_FILE, "sha256": self.weights_sha256,
                        "dtype": self.weights_dtype},
            "tokenizer": self.tokenizer.to_dict() if self.tokenizer else None,
            "provenance": self.provenance,
            "members": self.members,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: Path) -> FamilyManifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ArtifactError(f"{where} is not a family manifest (no \"format\": \"{FORMAT}\")")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(f"{where} has format_version {version!r}; this flow reads version "
                                f"{FORMAT_VERSION}. Re-export the family with this version of flow.")
        try:
            config = FamilyConfig.from_dict(data["architecture"])
            weights = data["weights"]
            tokenizer = data.get("tokenizer")
            return cls(
                config=config, weights_sha256=str(weights["sha256"]),
                weights_dtype=str(weights["dtype"]),
                tokenizer=TokenizerInfo(tokenizer["name"], tokenizer["sha256"],
                                        tuple(tokenizer.get("stop_tokens", (EOS_TOKEN,))))
                if tokenizer else None,
                provenance=dict(data.get("provenance") or {}),
                members={str(k): {str(f): str(h) for f, h in files.items()}
                         for k, files in (data.get("members") or {}).items()})
        except ConfigError as err:
            raise ArtifactError(f"{where}: inconsistent architecture: {err}") from None
        except (KeyError, TypeError, AttributeError) as err:
            raise ArtifactError(f"{where}: malformed manifest, missing or bad field {err}") from None


def is_family_dir(path: Path | str) -> bool:
    return (Path(path) / FAMILY_JSON).is_file()


def member_path(family_dir: Path | str, exit: int, int8: bool = False) -> Path:
    """Where `flow export-onnx` writes member `exit`'s ONNX graph (`flow.member_format`)."""
    return Path(family_dir) / MEMBERS_DIR / str(exit) / (INT8_FILE if int8 else FLOAT32_FILE)


def calibration_path(family_dir: Path | str, exit: int) -> Path:
    """Where `flow calibrate` writes member `exit`'s thresholds, which the device SDK reads."""
    return Path(family_dir) / MEMBERS_DIR / str(exit) / CALIBRATION_FILE


def read_manifest(path: Path | str, verify: bool = True, weights: bool = True) -> FamilyManifest:
    """Read and check a family directory's manifest.

    Checks that the weights file holds exactly the tensors the architecture needs, with the right
    shapes, and (with `verify`) that their hash and the tokenizer's are the ones recorded; raises
    `ArtifactError` naming the problem otherwise. `weights=False` reads a device's copy of a
    family, which carries family.json, tokenizer.json and its members but not the weights.
    """
    path = Path(path)
    manifest_path = path / FAMILY_JSON
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a directory; a family is a directory with {FAMILY_JSON}")
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} is not a family: it has no {FAMILY_JSON} "
                            f"(build one with `flow new`, `flow import-hf` or `flow train`)")
    try:
        data = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{manifest_path} is not valid JSON ({err})") from None
    manifest = FamilyManifest.from_dict(data, manifest_path)
    if weights:
        _check_weights(path / WEIGHTS_FILE, manifest, verify)
    if verify:
        if manifest.tokenizer is not None:
            tokenizer_path = path / TOKENIZER_FILE
            if not tokenizer_path.is_file():
                raise ArtifactError(f"{path} names tokenizer {manifest.tokenizer.name!r} but has no "
                                    f"{TOKENIZER_FILE}")
            if file_sha256(tokenizer_path) != manifest.tokenizer.sha256:
                raise HashMismatchError(f"{tokenizer_path} does not match the hash in {FAMILY_JSON}")
    return manifest


def _check_weights(weights_path: Path, manifest: FamilyManifest, verify: bool) -> None:
    if not weights_path.is_file():
        raise ArtifactError(f"{weights_path.parent} has no {WEIGHTS_FILE}")
    check_tensor_shapes(read_safetensors_header(weights_path), manifest.config, weights_path)
    if verify:
        actual = digest_safetensors(weights_path)
        if actual != manifest.weights_sha256:
            raise HashMismatchError(
                f"{weights_path} does not match its manifest: weights hash {actual[:16]}…, "
                f"family.json records {manifest.weights_sha256[:16]}…; the weights were changed or "
                f"the copy is incomplete. Copy the family again from its source.")


def check_tensor_shapes(header: dict[str, Any], config: FamilyConfig, where: Path) -> None:
    """Raise `ArtifactError` unless `header` has exactly the tensors `config` needs."""
    expected = expected_tensors(config)
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing or extra:
        raise ArtifactError(f"{where} does not fit its architecture: missing tensors "
                            f"{missing[:5]}{'…' if len(missing) > 5 else ''}, unexpected tensors "
                            f"{extra[:5]}{'…' if len(extra) > 5 else ''}")
    for name, shape in expected.items():
        if tuple(header[name]["shape"]) != shape:
            raise ArtifactError(f"{where}: tensor {name} has shape {tuple(header[name]['shape'])}, "
                                f"the architecture needs {shape}")


def write_manifest(path: Path, manifest: FamilyManifest) -> None:
    """Write family.json into directory `path` (a temporary file renamed over the old one)."""
    from flow.fsutil import atomic_file

    with atomic_file(Path(path) / FAMILY_JSON) as tmp:
        tmp.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")


def record_member_files(family_dir: Path | str, exit: int, paths: Iterable[Path]) -> None:
    """Record the SHA-256 of member `exit`'s files `paths` in the family's manifest."""
    family_dir = Path(family_dir)
    manifest = read_manifest(family_dir, verify=False)
    files = manifest.members.setdefault(str(exit), {})
    files.update({Path(p).name: file_sha256(Path(p)) for p in paths})
    write_manifest(family_dir, manifest)


def check_member_file(manifest: FamilyManifest, exit: int, path: Path) -> None:
    """Raise `ArtifactError` unless `path` is the member file `flow export-onnx` recorded for
    member `exit` in `manifest` (a corrupt, replaced or foreign member would run and produce
    garbage)."""
    expected = manifest.member_sha256(exit, Path(path).name)
    if expected is None:
        raise ArtifactError(f"family.json records no hash for {path}; export the member with "
                            f"`flow export-onnx` (or copy family.json from where it was exported)")
    actual = file_sha256(Path(path))
    if actual != expected:
        raise HashMismatchError(f"{path} is not the member that was exported (SHA-256 {actual[:16]}…, "
                                f"family.json records {expected[:16]}…): it was changed, corrupted "
                                f"or replaced; export it again or copy it from its source")


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()
