"""Long sequences in chunks with the recurrent state carried (``model.chunk_size``).

A mixer that reads left to right (``carries_state``: ``causal``, ``block_causal``) gives the
same outputs for a sequence read at once and for the sequence read in consecutive chunks, each
starting from the state the one before left. So a training step can run a window of any length
chunk by chunk: chunk k's loss is computed inside chunk k, and only the carried state (a few
tensors per layer, independent of the length) links the chunks.

Each chunk is checkpointed (PyTorch's non-reentrant ``checkpoint``): its activations are dropped
after its forward and recomputed in the backward, so activation memory is that of one chunk
plus the carried states of all chunks, whatever the length. ``grad`` chooses what the backward
does at chunk borders:

* ``full``: gradients flow through the carried state into earlier chunks: the gradient of the
  whole sequence read at once (truncated nowhere).
* ``truncated``: the state is detached at each border (truncated backpropagation through time):
  each chunk's loss trains only that chunk's computation, from the state it was given.

Both cost one extra forward per chunk (the recomputation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch.utils.checkpoint import checkpoint

from ..common.checks import Num

CHUNK_GRADS = ("full", "truncated")      # model.chunk_grad
OPTIONS = {"chunk_size": Num(lo=1, integer=True, optional=True, null_means="each window read at once")}


@dataclass(frozen=True)
class Chunking:
    size: int                   # tokens per chunk (model.chunk_size)
    grad: str = "full"          # model.chunk_grad

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"model.chunk_size={self.size!r} must be a positive number of tokens (or null)")
        if self.grad not in CHUNK_GRADS:
            raise ValueError(f"model.chunk_grad={self.grad!r}; choose one of {', '.join(CHUNK_GRADS)}")

    def spans(self, length: int) -> List[Tuple[int, int]]:
        """``(start, end)`` of each chunk of a sequence of ``length`` tokens."""
        return [(a, min(a + self.size, length)) for a in range(0, length, self.size)]


def detach_state(state: Any) -> Any:
    """The carried state (a list of LayerState tuples, or None) cut from the graph."""
    if state is None:
        return None
    return [type(s)(*(None if f is None else f.detach() for f in s)) for s in state]


def run_chunks(step: Callable[[int, int, Any], Tuple[torch.Tensor, Any]], chunking: Chunking, length: int,
               state: Any = None) -> Tuple[torch.Tensor, Any]:
    """``step(start, end, state) -> (loss of the chunk, state after it)`` over every chunk of a
    sequence of ``length`` tokens, from ``state``; returns the summed loss and the final state.
    Under autograd each chunk of a window of several is checkpointed, and ``truncated`` detaches
    the state between chunks."""
    total: Optional[torch.Tensor] = None
    spans = chunking.spans(length)
    # one chunk (a streamed window read at once) keeps its activations: recomputing saves nothing
    recompute = torch.is_grad_enabled() and len(spans) > 1
    for a, b in spans:
        if torch.is_grad_enabled() and chunking.grad == "truncated":
            state = detach_state(state)
        if recompute:
            loss, state = checkpoint(step, a, b, state, use_reentrant=False)
        else:
            loss, state = step(a, b, state)
        total = loss if total is None else total + loss
    return total, state


class Carry:
    """The state one training step leaves for the next (``data.order=stream``, whose batches say
    ``continues`` when each row follows the previous batch's row): detached, so each step's
    backward stops at its first token (truncated backpropagation through time). It goes into
    the checkpoint (:meth:`tensors` / :meth:`load`), so a resumed run continues exactly."""

    PREFIX = "carried_state"

    def __init__(self):
        self.state: Any = None

    def take(self, batch: dict) -> Any:
        """The state to start ``batch`` from: the kept one if its rows continue, else None."""
        continues = batch.get("continues")
        return self.state if continues is not None and bool(continues) else None

    def keep(self, state: Any) -> None:
        self.state = detach_state(state)

    def tensors(self) -> dict:
        if self.state is None:
            return {}
        return {f"{self.PREFIX}.{i}.{j}": f for i, s in enumerate(self.state) for j, f in enumerate(s)}

    def load(self, tensors: dict) -> None:
        from ..models.rwkv7 import LayerState
        layers: dict = {}
        for name, t in tensors.items():
            if name.startswith(self.PREFIX + "."):
                _, i, j = name.split(".")
                layers.setdefault(int(i), {})[int(j)] = t
        self.state = [LayerState(*(layers[i][j] for j in sorted(layers[i]))) for i in sorted(layers)] or None
