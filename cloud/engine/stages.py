"""Where an engine step's time goes: seconds per stage, summed over the engine's life.

`Engine.step()` marks the end of each stage with `lap`; `Engine.stats()["stage_seconds"]` reports
the sums, and Prometheus exports them as `flow_engine_stage_seconds_total{stage=...}`. The stages:

- `schedule`: choosing the chunks of this step and grouping them by first block;
- `inputs`: positions, slots, mask and KV views of each group, and its input rows or embeddings;
- `blocks`: the forward through the group's blocks, KV writes and gathers included;
- `head`: the final norm and LM head (or an edge's exit branch) on the rows that need answers;
- `answers`: argmax, top-k, sampling and the bookkeeping that completes requests.

On CUDA, kernels run asynchronously: with `synchronize` each lap waits for them, so that a stage
is charged with its own kernels (at the cost of a few pipeline bubbles per step).
"""

from __future__ import annotations

import time

STAGES = ("schedule", "inputs", "blocks", "head", "answers")
# The stage that runs after each (a step runs its groups one after another: inputs .. answers).
_NEXT = {None: "schedule", "schedule": "inputs", "inputs": "blocks", "blocks": "head",
         "head": "answers", "answers": "inputs"}


class StageTimes:
    """Seconds per stage; `start()` at the top of a step, `lap(stage)` at the end of each stage,
    `lap_failed()` where a group's work failed."""

    def __init__(self, synchronize=None):
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self._synchronize = synchronize  # e.g. torch.cuda.synchronize, or None on the CPU
        self._mark = time.perf_counter()
        self._last: str | None = None  # the stage lapped last in this step

    def start(self) -> None:
        self._mark = time.perf_counter()
        self._last = None

    def lap(self, stage: str) -> None:
        """Charge the time since the previous mark to `stage`."""
        if self._synchronize is not None:
            self._synchronize()
        now = time.perf_counter()
        self.seconds[stage] += now - self._mark
        self._mark, self._last = now, stage

    def lap_failed(self) -> None:
        """Charge the time since the previous mark to the stage that was running when a group's
        work failed (its forward, usually), not to whatever the step runs next."""
        self.lap(_NEXT[self._last])

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)
