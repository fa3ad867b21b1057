"""One exported family member under ONNX Runtime, with its KV cache (no torch).

`MemberSession.run(tokens, start)` feeds the tokens at positions `start, start+1, ...` and returns
the exit's logits and the hand-off state `h_e` for each of them. The cache slot of a token is its
position, so going back (a rejected speculative draft, a replay) is just a smaller `start`: the
slots past it are overwritten before anything attends to them.

The graph's names, metadata and cache layouts are those of `flow.member_format`. Graphs
exported with the `shared` layout (ORT GroupQueryAttention) keep one preallocated buffer
per layer bound as both past and present through I/O binding, so a decode step writes its own
key/value rows and copies nothing else. `concat` graphs (standard ONNX) get the past back as a
new, longer present every call; they run too, at O(past) copy cost per call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flow.errors import ArtifactError, FlowError, HashMismatchError
from flow.member_format import (
    ATTENTION_MASK,
    HANDOFF_HIDDEN,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    SHARED,
    MemberInfo,
    cache_names,
)

# ORT device names for the OrtValues a provider computes on; others run on CPU memory.
_PROVIDER_DEVICES = {"CUDAExecutionProvider": "cuda", "ROCMExecutionProvider": "cuda"}


class ContextFullError(FlowError):
    """The sequence would not fit the member's context (its KV cache)."""


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
        self._cache_names = cache_names(self.info.num_cache_layers)  # (past, present) per tensor
        self.length = 0  # positions 0..length-1 hold valid keys/values
        self._cache: list = []
        self._binding = None
        self.reset()

    @property
    def num_cache_tensors(self) -> int:
        return len(self._cache_names)

    def reset(self) -> None:
        """Forget the sequence; the next call starts at position 0."""
        import onnxruntime as ort

        info = self.info
        self.length = 0
        if info.kv_cache == SHARED:
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
            INPUT_IDS: np.asarray(tokens, dtype=np.int64)[None],
            POSITION_IDS: np.arange(start, end, dtype=np.int64)[None],
            ATTENTION_MASK: np.ones((1, end), dtype=np.int64),
        }
        if self.info.kv_cache == SHARED:
            outputs = self._run_shared(feeds)
        else:
            outputs = self._run_concat(feeds, start)
        self.length = end
        return MemberOutput(logits=outputs[LOGITS][0], handoff=outputs[HANDOFF_HIDDEN][0])

    def _bind_cache(self):
        """One I/O binding for the session's life: the cache buffers as past *and* present."""
        binding = self.session.io_binding()
        for (past, present), buffer in zip(self._cache_names, self._cache, strict=True):
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)  # same memory: in place
        return binding

    def _run_shared(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        binding = self._binding
        for name, array in feeds.items():  # only the per-call inputs change
            binding.bind_cpu_input(name, array)
        # Rebound every call: ORT allocates them at this call's shape, on the CPU.
        binding.bind_output(LOGITS, "cpu")
        binding.bind_output(HANDOFF_HIDDEN, "cpu")
        self.session.run_with_iobinding(binding)
        # get_outputs() follows binding order: the cache first (bound once), then these two
        *_, logits, handoff = binding.get_outputs()
        return {LOGITS: logits.numpy(), HANDOFF_HIDDEN: handoff.numpy()}

    def _run_concat(self, feeds: dict[str, np.ndarray], start: int) -> dict[str, np.ndarray]:
        for (past_name, _), past in zip(self._cache_names, self._cache, strict=True):
            feeds[past_name] = past[:, :, :start]
        results = dict(zip(self._output_names, self.session.run(None, feeds), strict=True))
        self._cache = [results[present] for _, present in self._cache_names]
        return results

    def end_profiling(self) -> str:
        """Stop ORT's profiler (sessions made with `profile=True`); returns the JSON trace path."""
        return self.session.end_profiling()
