"""One exported family member under ONNX Runtime, with its KV cache (no torch).

`MemberSession.run(tokens, start)` feeds the tokens at positions `start, start+1, ...` and returns
the exit's logits and the hand-off state `h_e` for each of them. The cache slot of a token is its
position, so going back (a rejected speculative draft, a replay) is just a smaller `start`: the
slots past it are overwritten before anything attends to them.

Graphs exported with the `shared` layout (ORT GroupQueryAttention) keep one preallocated buffer
per layer bound as both past and present through I/O binding, so a decode step writes its own
key/value rows and copies nothing else. `concat` graphs (standard ONNX) get the past back as a
new, longer present every call; they run too, at O(past) copy cost per call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flow.artifact import MEMBER_FORMAT, MEMBER_FORMAT_VERSION
from flow.errors import ArtifactError, FlowError, HashMismatchError

# ORT device names for the OrtValues a provider computes on; others run on CPU memory.
_PROVIDER_DEVICES = {"CUDAExecutionProvider": "cuda", "ROCMExecutionProvider": "cuda"}


class ContextFullError(FlowError):
    """The sequence would not fit the member's context (its KV cache)."""


@dataclass(frozen=True)
class MemberInfo:
    """What an exported member says about itself (its ONNX metadata)."""

    family_hash: str
    exit: int
    exit_layer: int
    num_cache_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_seq_len: int
    kv_cache: str
    weights: str

    @classmethod
    def from_metadata(cls, meta: dict[str, str], where: Path) -> MemberInfo:
        if meta.get("format") != MEMBER_FORMAT:
            raise ArtifactError(f"{where} is not a familial-flow device member (its metadata has no "
                                f"format {MEMBER_FORMAT!r}); export it with `flow export-onnx`")
        if meta.get("format_version") != MEMBER_FORMAT_VERSION:
            raise ArtifactError(f"{where} is device-member format {meta.get('format_version')!r}; "
                                f"this runtime reads {MEMBER_FORMAT_VERSION!r}. Re-export it with "
                                f"`flow export-onnx`.")
        try:
            return cls(family_hash=meta["family_hash"], exit=int(meta["exit"]),
                       exit_layer=int(meta["exit_layer"]),
                       num_cache_layers=int(meta["num_cache_layers"]),
                       hidden_size=int(meta["hidden_size"]), num_kv_heads=int(meta["num_kv_heads"]),
                       head_dim=int(meta["head_dim"]), vocab_size=int(meta["vocab_size"]),
                       max_seq_len=int(meta["max_seq_len"]), kv_cache=meta["kv_cache"],
                       weights=meta["weights"])
        except (KeyError, ValueError) as err:
            raise ArtifactError(f"{where}: malformed member metadata ({err}); re-export it") from None


@dataclass
class MemberOutput:
    """The member's results for the tokens of one call, one row per token."""

    logits: np.ndarray  # (T, vocab) float32
    handoff: np.ndarray  # (T, hidden) float32: h_e, what the next tier continues from


class MemberSession:
    """A member's ONNX graph in an ONNX Runtime session, for one sequence at a time.

    providers: ONNX Runtime execution providers in priority order (default CPU only); any
        provider ORT offers (CUDA, CoreML, NNAPI, ...) is passed through as given.
    intra_op_threads: threads for one operator (default: ORT's choice, one per core).
    max_seq_len: context to allocate the KV cache for (default: the family's).
    family_hash / exit: when given, the member must carry exactly this hash and exit.
    profile: a path prefix for ONNX Runtime's profiler trace (`end_profiling()` writes it).
    """

    def __init__(self, path: Path | str, *, providers: Sequence[str | tuple[str, dict]] | None = None,
                 intra_op_threads: int | None = None, inter_op_threads: int = 1,
                 max_seq_len: int | None = None, family_hash: str | None = None,
                 exit: int | None = None, profile: str | Path | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"no ONNX member at {path}; write it with "
                                f"`flow export-onnx FAMILY --exit K`")
        options = ort.SessionOptions()
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if profile is not None:
            options.enable_profiling = True
            options.profile_file_prefix = str(profile)
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=self.providers)
        self.path = path
        self.info = MemberInfo.from_metadata(self.session.get_modelmeta().custom_metadata_map, path)
        if family_hash is not None and self.info.family_hash != family_hash:
            raise HashMismatchError(
                f"{path} was exported from family {self.info.family_hash[:16]}…, not from this "
                f"family ({family_hash[:16]}…); re-export it with `flow export-onnx`")
        if exit is not None and self.info.exit != exit:
            raise ArtifactError(f"{path} is member {self.info.exit}, not member {exit}")
        self.max_seq_len = min(max_seq_len or self.info.max_seq_len, self.info.max_seq_len)
        first = self.providers[0]
        self._device = _PROVIDER_DEVICES.get(first if isinstance(first, str) else first[0], "cpu")
        self._output_names = [o.name for o in self.session.get_outputs()]
        self.length = 0  # positions 0..length-1 hold valid keys/values
        self._cache: list = []
        self._binding = None
        self.reset()

    @property
    def num_cache_tensors(self) -> int:
        return 2 * self.info.num_cache_layers

    def reset(self) -> None:
        """Forget the sequence; the next call starts at position 0."""
        import onnxruntime as ort

        info = self.info
        self.length = 0
        if info.kv_cache == "shared":
            shape = (1, info.num_kv_heads, self.max_seq_len, info.head_dim)
            # Allocated (zeroed) once per session; every call writes its rows in place. On CPU the
            # OrtValue wraps the numpy array, which must stay referenced as long as it is used.
            if not self._cache:
                self._host = [np.zeros(shape, np.float32) for _ in range(self.num_cache_tensors)]
                self._cache = [ort.OrtValue.ortvalue_from_numpy(array, self._device, 0)
                               for array in self._host]
                self._binding = self._bind_cache()
        else:
            empty = np.zeros((1, info.num_kv_heads, 0, info.head_dim), np.float32)
            self._cache = [empty] * self.num_cache_tensors

    def run(self, tokens: Sequence[int], start: int) -> MemberOutput:
        """Feed `tokens` at positions start.. and return their logits and `h_e` rows.

        `start` may be below the current length (the cache is rolled back to it), never above.
        """
        count = len(tokens)
        if count == 0:
            raise ValueError("run() needs at least one token")
        if not 0 <= start <= self.length:
            raise ValueError(f"start {start} leaves a gap: the cache holds positions 0..{self.length - 1}")
        end = start + count
        if end > self.max_seq_len:
            raise ContextFullError(f"{end} tokens do not fit this member's context of "
                                   f"{self.max_seq_len} tokens")
        feeds = {
            "input_ids": np.asarray(tokens, dtype=np.int64)[None],
            "position_ids": np.arange(start, end, dtype=np.int64)[None],
            "attention_mask": np.ones((1, end), dtype=np.int64),
        }
        if self.info.kv_cache == "shared":
            outputs = self._run_shared(feeds)
        else:
            outputs = self._run_concat(feeds, start)
        self.length = end
        return MemberOutput(logits=outputs["logits"][0], handoff=outputs["handoff_hidden"][0])

    def _bind_cache(self):
        """One I/O binding for the session's life: the cache buffers as past *and* present."""
        binding = self.session.io_binding()
        for i, buffer in enumerate(self._cache):
            layer, kind = divmod(i, 2)
            suffix = f"{layer}.{'value' if kind else 'key'}"
            binding.bind_ortvalue_input(f"past_key_values.{suffix}", buffer)
            binding.bind_ortvalue_output(f"present.{suffix}", buffer)  # same memory: in place
        return binding

    def _run_shared(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        binding = self._binding
        for name, array in feeds.items():  # only the per-call inputs change
            binding.bind_cpu_input(name, array)
        # Rebound every call: ORT allocates them at this call's shape, on the CPU.
        binding.bind_output("logits", "cpu")
        binding.bind_output("handoff_hidden", "cpu")
        self.session.run_with_iobinding(binding)
        # get_outputs() follows binding order: the cache first (bound once), then these two
        *_, logits, handoff = binding.get_outputs()
        return {"logits": logits.numpy(), "handoff_hidden": handoff.numpy()}

    def _run_concat(self, feeds: dict[str, np.ndarray], start: int) -> dict[str, np.ndarray]:
        for i, past in enumerate(self._cache):
            layer, kind = divmod(i, 2)
            feeds[f"past_key_values.{layer}.{'value' if kind else 'key'}"] = past[:, :, :start]
        results = dict(zip(self._output_names, self.session.run(None, feeds), strict=True))
        self._cache = [results[f"present.{i // 2}.{'value' if i % 2 else 'key'}"]
                       for i in range(self.num_cache_tensors)]
        return results

    def end_profiling(self) -> str:
        """Stop ORT's profiler (sessions made with `profile=True`); returns the JSON trace path."""
        return self.session.end_profiling()
