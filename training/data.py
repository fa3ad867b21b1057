"""Batches of token windows, a pure function of the step: the same global batch for every layout.

The training stream is cut into non-overlapping windows of `seq_len + 1` tokens, shuffled with
the run's seed (reshuffled each epoch). Step s takes the next `global_batch_size` windows; data-
parallel rank d takes its contiguous share, cut into micro-batches. Because a batch depends only
on (seed, step), (TP, PP, DP) layouts see identical data and a resumed run needs no iterator state.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


class WindowSampler:
    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, shuffle: bool = True):
        self.tokens = tokens
        self.window = seq_len + 1
        self.num_windows = (len(tokens) - 1) // seq_len - 1
        if self.num_windows < 1:
            raise ValueError(f"{len(tokens)} tokens hold no window of {self.window}")
        self.seed, self.shuffle = seed, shuffle
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            order = np.arange(self.num_windows)
            if self.shuffle:
                np.random.default_rng([self.seed, epoch]).shuffle(order)
            self._orders = {epoch: order}  # keep one epoch: memory stays flat on long runs
        return self._orders[epoch]

    def windows(self, first: int, count: int) -> np.ndarray:
        """Windows `first .. first+count-1` of the endless shuffled sequence: (count, seq_len + 1)."""
        rows = []
        for index in range(first, first + count):
            epoch, position = divmod(index, self.num_windows)
            start = int(self._order(epoch)[position]) * (self.window - 1)
            rows.append(np.asarray(self.tokens[start:start + self.window], dtype=np.int64))
        return np.stack(rows)


def rank_microbatches(sampler: WindowSampler, step: int, global_batch: int, micro_batch: int,
                      dp_rank: int, dp_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """The micro-batches of data-parallel rank `dp_rank` at `step`."""
    per_rank = global_batch // dp_size
    windows = sampler.windows(step * global_batch + dp_rank * per_rank, per_rank)
    for start in range(0, per_rank, micro_batch):
        chunk = torch.from_numpy(windows[start:start + micro_batch])
        seq_len = chunk.shape[1] - 1
        yield {"input_ids": chunk[:, :-1], "labels": chunk[:, 1:],
               "position_ids": torch.arange(seq_len).expand(chunk.shape[0], seq_len)}
