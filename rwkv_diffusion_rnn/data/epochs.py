"""Epochs of a resumable training loader: the seed of each epoch's order, and the bookkeeping
shared by the corpus windows and the conversation batches."""

from __future__ import annotations

from typing import Iterator

import torch


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s order: depends on (seed, epoch) only, not on what ran before."""
    # Any fixed injective-enough mix of (seed, epoch) works; keep it in int64 range.
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + 12_345) % (2**63 - 1)


class EpochBatches:
    """Epoch bookkeeping of a resumable training loader whose subclass gives ``__len__`` (batches
    per epoch) and ``batch(epoch, index)``: iterating gives the rest of the current epoch (also
    after an abandoned pass), a batch is counted when handed out, so that a loader restored to
    that count hands out exactly the batch that would have come next."""

    _epoch = 0
    _consumed = 0

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def at_epoch_end(self) -> bool:
        """Every batch of the current epoch has been handed out (the next one starts a new epoch)."""
        return self._consumed >= len(self)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._consumed >= len(self):
            self._epoch, self._consumed = self._epoch + 1, 0
        while self._consumed < len(self):
            b = self.batch(self._epoch, self._consumed)
            self._consumed += 1  # counted when handed out, so an abandoned pass resumes after it
            yield b
        self._epoch, self._consumed = self._epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch."""
        self._epoch, self._consumed = int(epoch), 0
