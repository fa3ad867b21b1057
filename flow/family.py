"""`Family`: a familial model with its tokenizer and provenance, and the artifact it lives in.

    fam = Family.random(FamilyConfig(...), seed=0)          # tiny families for tests
    fam = Family.from_hf("hf_dir", exits=[1, 3])             # import a Qwen3 or Llama checkpoint
    fam = Family.from_gguf("model.gguf", exits=[9, 19])     # import a llama.cpp GGUF file
    fam.save("fam_dir"); fam = Family.load("fam_dir")       # the artifact of DESIGN.md §2
    fam.logits(input_ids, exit=k)        # (B, T, vocab) logits of member k
    fam.handoff(input_ids, exit=k)       # (B, T, hidden) h_e of member k
    fam.export_hf("member_dir", exit=k)  # member k as a standard Qwen3 / Llama directory

`k` indexes `fam.config.exits`; the last exit is the full backbone.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from flow import artifact, backbone, hf
from flow.config import FamilyConfig, with_final_exit
from flow.data.tokenizer import EOS_TOKEN, stop_tokens_of, token_ids, vocab_size_of
from flow.errors import ArtifactError, ConfigError
from flow.fsutil import atomic_directory
from flow.model import FamilyModel

# safetensors' dtype codes, for hashing tensors in memory exactly as `digest_safetensors` does.
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.float64: "F64", torch.int8: "I8", torch.int64: "I64"}
_SAFETENSORS_METADATA = {"format": "pt"}  # transformers refuses safetensors without it

InputIds = Tensor | np.ndarray | Sequence[int] | Sequence[Sequence[int]]


class Family:
    """One backbone with exits at several depths; every exit is a deployable member."""

    def __init__(self, model: FamilyModel, *, tokenizer_json: str | None = None,
                 tokenizer_name: str | None = None, provenance: dict[str, Any] | None = None,
                 stop_tokens: Sequence[str] = (EOS_TOKEN,)):
        self.model = model.eval()
        self.tokenizer_json = tokenizer_json
        self.tokenizer_name = tokenizer_name if tokenizer_json is not None else None
        # the tokens that end a generation (the checkpoint's end token(s)); saved with the tokenizer
        self.stop_tokens = tuple(stop_tokens)
        self.provenance = dict(provenance or {})
        self._tokenizer = None
        self._hash: _RecordedHash | None = None  # see `family_hash`
        if tokenizer_json is not None:
            _check_tokenizer_fits(self.tokenizer, model.config)

    # ---- construction -----------------------------------------------------------------------

    @classmethod
    def random(cls, config: FamilyConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
               tokenizer: str | Path | None = None) -> Family:
        """A randomly initialised family (normal(0, 0.02) weights), the same for the same seed."""
        model = FamilyModel(config)
        model.init_weights(torch.Generator().manual_seed(seed))
        tokenizer_json, tokenizer_name = _read_tokenizer(tokenizer)
        return cls(model.to(dtype), tokenizer_json=tokenizer_json, tokenizer_name=tokenizer_name,
                   provenance={"source": "random", "seed": seed})

    @classmethod
    def from_tensors(cls, config: FamilyConfig, tensors: dict[str, Tensor],
                     tokenizer: str | Path | None = None, provenance: dict[str, Any] | None = None,
                     stop_tokens: Sequence[str] = (EOS_TOKEN,)) -> Family:
        """A family from its tensors under flow's names (what training and converters produce)."""
        tokenizer_json, tokenizer_name = _read_tokenizer(tokenizer)
        return cls(_model_from_tensors(config, tensors, Path("<tensors>")), tokenizer_json=tokenizer_json,
                   tokenizer_name=tokenizer_name, provenance=provenance, stop_tokens=stop_tokens)

    @classmethod
    def from_hf(cls, path: str | Path, exits: Sequence[int], dtype: torch.dtype | None = None) -> Family:
        """Import a Hugging Face Qwen3 or Llama checkpoint (config.json + safetensors).

        config.json's `model_type` picks the architecture. `exits` are backbone layer indices;
        the last layer is always added as the deepest exit. Exit branches start as copies of
        block `e_k + 1`, the final norm and the LM head; tied embeddings become untied heads
        (`flow.backbone`). A `tokenizer.json` beside the weights comes along.
        """
        path = Path(path)
        fields, tied = hf.read_hf_config(path)
        config = FamilyConfig(**fields, exits=with_final_exit(exits, fields["num_layers"]))
        tensors = hf.load_hf_backbone(path, backbone.backbone_names(config, tied))
        tokenizer_path = path / "tokenizer.json"
        tokenizer_json, tokenizer_name = _read_tokenizer(
            tokenizer_path if tokenizer_path.is_file() else None, name=path.resolve().name)
        family = cls._imported(path, config, tensors, tied, dtype, tokenizer_json, tokenizer_name,
                               {"source": "huggingface", "path": str(path.resolve()),
                                "tied_embeddings": tied})
        family.stop_tokens = stop_tokens_of(family.tokenizer, hf.end_token_ids(path))
        return family

    @classmethod
    def from_gguf(cls, path: str | Path, exits: Sequence[int], dtype: torch.dtype | None = None) -> Family:
        """Import a llama.cpp GGUF file of a Llama or Qwen3 model, quantized or not.

        The weights are dequantized to float32 (then converted to `dtype` if given); exits and
        tied embeddings as for `from_hf`. The tokenizer is built from the file's metadata
        (`flow.gguf_tokenizer`); a file without one gives a tokenizer-less family.
        """
        from flow.gguf import GGUFCheckpoint

        path = Path(path)
        checkpoint = GGUFCheckpoint.open(path)
        fields, tied = checkpoint.family_fields()
        config = FamilyConfig(**fields, exits=with_final_exit(exits, fields["num_layers"]))
        tensors = checkpoint.backbone(config, tied)
        tokenizer_json = checkpoint.tokenizer_json()
        family = cls._imported(path, config, tensors, tied, dtype, tokenizer_json,
                               f"gguf-{path.stem}" if tokenizer_json is not None else None,
                               {"source": "gguf", "path": str(path.resolve()),
                                "sha256": artifact.file_sha256(path), "name": checkpoint.get("general.name"),
                                "tensor_types": checkpoint.tensor_types(), "tied_embeddings": tied})
        family.stop_tokens = stop_tokens_of(family.tokenizer, checkpoint.end_token_ids())
        return family

    @classmethod
    def _imported(cls, source: Path, config: FamilyConfig, tensors: dict[str, Tensor], tied: bool,
                  dtype: torch.dtype | None, tokenizer_json: str | None, tokenizer_name: str | None,
                  provenance: dict[str, Any]) -> Family:
        """A family from an imported backbone, its exit branches initialised by `flow.backbone`."""
        model = _model_from_tensors(config, backbone.family_tensors(tensors, config, tied), source)
        if dtype is not None:
            model = model.to(dtype)
        return cls(model, tokenizer_json=tokenizer_json, tokenizer_name=tokenizer_name,
                   provenance=provenance)

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu") -> Family:
        """Load and verify a family directory (hash, tensor names and shapes).

        The family keeps the hash it verified, so `family_hash()` costs nothing until the
        weights change (converting them to another `dtype` is such a change).
        """
        path = Path(path)
        manifest = artifact.read_manifest(path, verify=True)
        tensors = load_file(path / artifact.WEIGHTS_FILE, device=device)
        model = _model_from_tensors(manifest.config, tensors, path)
        tokenizer_json = None
        if manifest.tokenizer is not None:
            tokenizer_json = (path / artifact.TOKENIZER_FILE).read_text()
        family = cls(model, tokenizer_json=tokenizer_json,
                     tokenizer_name=manifest.tokenizer.name if manifest.tokenizer else None,
                     provenance=manifest.provenance,
                     stop_tokens=manifest.tokenizer.stop_tokens if manifest.tokenizer else (EOS_TOKEN,))
        family._record_hash(manifest.weights_sha256)  # the hash read_manifest verified
        if dtype is not None:
            model.to(dtype)  # in place; a conversion that changes the weights drops the record
        return family

    # ---- the artifact -----------------------------------------------------------------------

    @property
    def config(self) -> FamilyConfig:
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed.weight.dtype

    @property
    def tokenizer(self):
        """The `tokenizers.Tokenizer` of this family, or None for tokenizer-less test families."""
        if self._tokenizer is None and self.tokenizer_json is not None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_str(self.tokenizer_json)
        return self._tokenizer

    def family_hash(self) -> str:
        """The family's identity, what every tier and member compares: SHA-256 of the
        architecture and of the weights (names, dtypes, shapes, bytes; `flow.artifact`).

        Always the hash of the weights as they are now, computed at most once per state of
        them: `load` records the weights hash it verified against family.json, `save` the one it
        wrote, any other call the one it computes. A record holds while every tensor is the same
        object, at the same address, with the same dtype, shape and torch version counter; the
        counter counts in-place writes (an optimizer step, `copy_`, `load_state_dict`, an
        indexed assignment under `no_grad`), and `.to()` or a replaced parameter changes the
        object or address, so any of those makes the next call hash again. Writes that bypass
        the counter, through `tensor.data` or a NumPy view of a tensor, are not seen: change
        weights through torch operations on the parameters themselves.
        """
        if self._hash is None or not self._hash.matches(self.model):
            self._record_hash(self._digest_weights())
        return artifact.family_hash(self.config, self._hash.value)

    def _digest_weights(self) -> str:
        """The weights hash of the tensors in memory, as `artifact.digest_safetensors` hashes a file."""
        entries = []
        for name, tensor in self.model.state_dict().items():
            tensor = tensor.detach().cpu().contiguous()
            entries.append((name, _SAFETENSORS_DTYPES[tensor.dtype], tuple(tensor.shape),
                            tensor.reshape(-1).view(torch.uint8).numpy().data))
        return artifact.digest_tensors(entries)

    def _record_hash(self, value: str) -> None:
        """Remember `value` as the weights hash of the weights as they are now."""
        self._hash = _RecordedHash(value, self.model)

    def save(self, path: str | Path, overwrite: bool = False) -> artifact.FamilyManifest:
        """Write the family directory atomically; return the manifest written to family.json.

        The hash of the written weights becomes the family's recorded hash (`family_hash`).
        """
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.model.state_dict().items()}
        with atomic_directory(path, overwrite=overwrite) as staging:
            weights_path = staging / artifact.WEIGHTS_FILE
            save_file(tensors, weights_path, metadata=_SAFETENSORS_METADATA)
            tokenizer = None
            if self.tokenizer_json is not None:
                tokenizer_path = staging / artifact.TOKENIZER_FILE
                tokenizer_path.write_text(self.tokenizer_json)
                tokenizer = artifact.TokenizerInfo(self.tokenizer_name or "unnamed",
                                                   artifact.file_sha256(tokenizer_path), self.stop_tokens)
            manifest = artifact.FamilyManifest(
                config=self.config, weights_sha256=artifact.digest_safetensors(weights_path),
                weights_dtype=str(self.dtype).removeprefix("torch."), tokenizer=tokenizer,
                provenance=self.provenance)
            artifact.write_manifest(staging, manifest)
        self._record_hash(manifest.weights_sha256)
        return manifest

    def export_hf(self, path: str | Path, exit: int, overwrite: bool = False) -> Path:
        """Write member `exit` as a standard Hugging Face directory of the family's architecture
        (`Qwen3ForCausalLM` or `LlamaForCausalLM`) that `transformers` loads."""
        self.config.check_exit(exit)
        state = {name: t.detach().cpu().contiguous() for name, t in self.model.state_dict().items()}
        tensors = hf.hf_member_tensors(state, self.config, exit)
        stop_ids = self.stop_token_ids()
        eos = stop_ids[0] if len(stop_ids) == 1 else stop_ids or None
        config = hf.hf_config(self.config, exit, str(self.dtype).removeprefix("torch."), eos)
        config["familial_flow"] = {"family_hash": self.family_hash(), "exit": exit,
                                   "exit_layer": self.config.exit_layer(exit)}
        path = Path(path)
        with atomic_directory(path, overwrite=overwrite) as staging:
            save_file(tensors, staging / "model.safetensors", metadata=_SAFETENSORS_METADATA)
            (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            (staging / "generation_config.json").write_text(json.dumps(
                hf.hf_generation_config(self.config, eos), indent=2) + "\n")
            if self.tokenizer_json is not None:
                (staging / "tokenizer.json").write_text(self.tokenizer_json)
                (staging / "tokenizer_config.json").write_text(
                    json.dumps(self.tokenizer_config(), indent=2) + "\n")
        return path

    def tokenizer_config(self) -> dict[str, Any]:
        """tokenizer_config.json for `transformers` and onnxruntime-genai: a fast tokenizer whose
        end token also pads (the family has no pad token of its own)."""
        end = self.stop_tokens[0]
        return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": end, "pad_token": end,
                "model_max_length": self.config.max_seq_len}

    def stop_token_ids(self) -> list[int]:
        """Ids of `stop_tokens` in this family's vocabulary (none without a tokenizer)."""
        return token_ids(self.tokenizer, self.stop_tokens)

    # ---- running members --------------------------------------------------------------------

    @torch.no_grad()
    def logits(self, input_ids: InputIds, exit: int) -> Tensor:
        """Logits (B, T, vocab) of member `exit` for every position of `input_ids` (B, T) or (T,)."""
        self.config.check_exit(exit)
        return self.model(self._as_input_ids(input_ids), exits=[exit])[0]

    @torch.no_grad()
    def handoff(self, input_ids: InputIds, exit: int) -> Tensor:
        """h_e (B, T, hidden): the residual stream after block `e_k`, before exit branch k."""
        exit_layer = self.config.exit_layer(exit)
        hidden = self.model.embed_tokens(self._as_input_ids(input_ids))
        return self.model.run_blocks(hidden, 0, exit_layer)

    def _as_input_ids(self, input_ids: InputIds) -> Tensor:
        ids = torch.as_tensor(np.asarray(input_ids) if not isinstance(input_ids, Tensor) else input_ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ConfigError(f"input_ids must be a non-empty (T,) or (B, T) array of token ids, "
                              f"got shape {tuple(ids.shape)} dtype {ids.dtype}")
        if ids.shape[1] > self.config.max_seq_len:
            raise ConfigError(f"{ids.shape[1]} tokens exceed this family's context of "
                              f"{self.config.max_seq_len}; shorten the input")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ConfigError(f"token ids must lie in 0..{self.config.vocab_size - 1}, got {low}..{high}")
        return ids.to(device=self.model.embed.weight.device, dtype=torch.long)

    def __repr__(self) -> str:
        c = self.config
        return (f"Family(layers={c.num_layers}, hidden={c.hidden_size}, exits={list(c.exits)}, "
                f"vocab={c.vocab_size}, dtype={self.dtype})")


class _RecordedHash:
    """A weights hash and the state of the tensors it was computed from (see `Family.family_hash`).

    Weak references, so that a replaced tensor is neither kept alive nor mistaken for a new one
    that happens to reuse its id and address; a deep copy of the family shares them, so its own
    tensors never match and it hashes them afresh.
    """

    def __init__(self, value: str, model: FamilyModel):
        self.value = value
        tensors = model.state_dict(keep_vars=True)
        # Tensors made under torch.inference_mode have no version counter: such a record could
        # not see a write, so it never matches and every call hashes.
        self._tensors = None if any(t.is_inference() for t in tensors.values()) else [
            (name, weakref.ref(tensor), *_tensor_state(tensor)) for name, tensor in tensors.items()]

    def matches(self, model: FamilyModel) -> bool:
        """Whether `model`'s tensors are still exactly the ones this hash was computed from."""
        current = model.state_dict(keep_vars=True)
        return self._tensors is not None and len(current) == len(self._tensors) and all(
            name == now_name and ref() is tensor and tuple(state) == _tensor_state(tensor)
            for (name, ref, *state), (now_name, tensor) in zip(self._tensors, current.items(), strict=True))


def _tensor_state(tensor: Tensor) -> tuple:
    # `_version` is the counter autograd uses to detect in-place writes: every one bumps it.
    return tensor.data_ptr(), tensor._version, tensor.dtype, tuple(tensor.shape)


def _model_from_tensors(config: FamilyConfig, tensors: dict[str, Tensor], where: Path) -> FamilyModel:
    """Build the model on the meta device and adopt `tensors` as its parameters (no copies)."""
    with torch.device("meta"):
        model = FamilyModel(config)
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as err:
        raise ArtifactError(f"the tensors in {where} do not fit the architecture: {err}") from None
    return model


def _read_tokenizer(path: str | Path | None, name: str | None = None) -> tuple[str | None, str | None]:
    """The tokenizer's JSON and a name for it. By default: the name a family gave it, when the
    file is that family's tokenizer (a family trained from an imported one keeps its
    tokenizer's name), else its vocabulary size and content hash."""
    if path is None:
        return None, None
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"tokenizer file {path} does not exist; build one with `flow tokenizer`")
    text = path.read_text()
    digest = hashlib.sha256(text.encode()).hexdigest()
    if name is None:
        name = _family_tokenizer_name(path.parent, digest)
    if name is None:
        name = f"bpe{vocab_size_of(text)}-{digest[:12]}"
    return text, name


def _family_tokenizer_name(directory: Path, digest: str) -> str | None:
    """The name the family in `directory` records for the tokenizer of hash `digest`, if any."""
    if not (directory / artifact.FAMILY_JSON).is_file():
        return None
    try:
        recorded = artifact.read_manifest(directory, verify=False, weights=False).tokenizer
    except (ArtifactError, ConfigError):
        return None  # not a readable family: the tokenizer is named as any other file
    return recorded.name if recorded is not None and recorded.sha256 == digest else None


def _check_tokenizer_fits(tokenizer, config: FamilyConfig) -> None:
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > config.vocab_size:
        raise ConfigError(f"the tokenizer has {size} tokens but the family's vocab_size is "
                          f"{config.vocab_size}; build the family with vocab_size >= {size}")
