"""Training on several processes: ``torchrun --nproc_per_node=N -m rwkv_diffusion_rnn.train_rwkv ...``.

``training.parallel`` picks how the model is spread over the processes (ranks):

* ``none``: one process, as without torchrun.
* ``ddp``: ``DistributedDataParallel``; every rank holds the whole model and optimizer state,
  gradients are averaged after each backward. The default under torchrun (``auto``).
* ``fsdp``: FSDP2 (``fully_shard``); the parameters, gradients and optimizer state are split over
  the ranks. Each block branch (RWKV-7 time-mix and channel-mix, attention, MLP) is one unit,
  gathered just before it runs and freed after; the rest (embedding, norms, head, conditioning)
  is the root unit. ``training.dtype=bf16`` computes in bf16 and reduces gradients in fp32 while
  the sharded master weights and optimizer state stay fp32.

NCCL carries the collectives on CUDA, gloo on the CPU.

**One global batch.** ``training.train_batch_size`` is the batch of one optimizer step over all
ranks. Every rank reads the same global batch from the same data position and draws the same
noise from the same named stream, then runs its own contiguous ``B / N`` rows (:meth:`Dist.rows`).
Its loss is its rows' share of the global loss (their terms over the whole batch's normaliser),
so the ranks' losses add up to the one-process loss; it is multiplied by ``N`` before the
backward because DDP and FSDP average gradients. N processes therefore take the steps one
process with batch B takes, up to float rounding (the sums are grouped differently).

Rank 0 alone logs, prints, holds the run lock and writes files other than FSDP's weight shards;
what it decides alone (the save folder, a checkpoint that failed) reaches the others through
:meth:`Dist.on_main`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..common.errors import ConfigError, OtherRankFailed


PARALLEL = ("auto", "none", "ddp", "fsdp")      # training.parallel
LAUNCH = "torchrun --nproc_per_node=N -m rwkv_diffusion_rnn.train_rwkv ..."


def launched() -> Optional[Tuple[int, int, int]]:
    """``(rank, world size, local rank)`` when torchrun started this process, else None."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def resolve_mode(parallel: str) -> str:
    """``training.parallel`` with ``auto`` resolved; refuses a mode the launch cannot give."""
    if parallel not in PARALLEL:
        raise ConfigError(f"training.parallel={parallel!r} is not valid; choose one of {', '.join(PARALLEL)}")
    env = launched()
    if parallel == "auto":
        return "ddp" if env is not None else "none"
    if parallel in ("ddp", "fsdp") and env is None:
        raise ConfigError(f"training.parallel={parallel} needs several processes started by torchrun: "
                          f"{LAUNCH} training.parallel={parallel} (this process was started without it)")
    if parallel == "none" and env is not None and env[1] > 1:
        raise ConfigError(f"training.parallel=none under torchrun with {env[1]} processes would train "
                          "the same model that many times into one folder; use training.parallel=ddp or "
                          "fsdp, or start one process without torchrun")
    return parallel


class Dist:
    """This process's place among the ranks, and the few collectives the trainer needs. With
    ``mode="none"`` every method is the one-process identity, so the trainer has one code path."""

    def __init__(self, mode: str = "none", rank: int = 0, world: int = 1, local_rank: int = 0,
                 device: torch.device = torch.device("cpu")):
        self.mode, self.rank, self.world, self.local_rank = mode, rank, world, local_rank
        self.device = device            # where collective tensors live (CUDA for NCCL)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1 or self.mode != "none"

    # ------------------------------------------------------------------ rows of a batch

    def rows(self, n: int) -> slice:
        """This rank's rows of a training batch of ``n`` rows (``n`` divides by the world size)."""
        if n % self.world:
            raise ConfigError(f"a batch of {n} rows cannot be split over {self.world} processes; make "
                              f"training.train_batch_size a multiple of {self.world}")
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def eval_rows(self, n: int) -> Tuple[slice, bool]:
        """This rank's rows of an evaluation batch of any size, and whether they count. Shares
        differ by at most one row. A rank left without a row (``n`` below the world size) runs
        row 0 uncounted: under FSDP every rank must take part in every forward."""
        start, stop = self.rank * n // self.world, (self.rank + 1) * n // self.world
        if start == stop:
            return slice(0, 1), False
        return slice(start, stop), True

    # ------------------------------------------------------------------ collectives

    def sum(self, values: Sequence[float]) -> List[float]:
        """Each value summed over the ranks (float64)."""
        if self.world == 1:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.cpu().tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one."""
        return bool(self.sum([float(bool(flag))])[0])

    def gather(self, obj: Any) -> List[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0; its result on every rank. When it raises, rank 0 raises the error
        and the others :class:`OtherRankFailed`, so that no rank waits for a failed one."""
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except Exception as e:
                error = e
        shared = self.broadcast(("failed", f"{type(error).__name__}: {error}") if error is not None
                                else ("ok", result))
        if error is not None:
            raise error
        if shared[0] == "failed":
            raise OtherRankFailed(f"rank 0 failed: {shared[1]}")
        return shared[1]

    @contextlib.contextmanager
    def first_main(self):
        """Rank 0 runs the block first, then the others: for work that fills a shared cache
        (tokenizing a corpus) which the others then read."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()

    def close(self) -> None:
        """Leaves the process group once every rank is done with it."""
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    # ------------------------------------------------------------------ the model

    def wrap(self, model: torch.nn.Module, dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
        """The module the loss runs: ``model`` itself, the DDP wrapper around it, or ``model``
        sharded in place by FSDP2 (``dtype``: the compute dtype of ``training.dtype``)."""
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            # Some parameters get no gradient in some steps (the learned null latent when no row
            # of this rank drops its latent; a frozen backbone's); DDP must look for them.
            return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                           find_unused_parameters=True)
        if self.mode == "fsdp":
            shard(model, dtype)
        return model

    def no_sync(self, net: torch.nn.Module, sync: bool):
        """A context in which the backward accumulates gradients without reducing them across
        ranks (all micro-batches of a step but its last one)."""
        if sync or self.mode == "none":
            return contextlib.nullcontext()
        if self.mode == "ddp":
            return net.no_sync()
        return _fsdp_no_sync(net)


@contextlib.contextmanager
def _fsdp_no_sync(net):
    net.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        net.set_requires_gradient_sync(True)


def fsdp_units(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The block branches each sharded as one FSDP unit: RWKV-7 time-mix and channel-mix, the
    transformer's attention and MLP, Qwen3's attention and MLP. Each is called through its own
    ``forward``, which is where FSDP gathers its weights."""
    from ..models.rwkv7 import RWKV7ChannelMix, RWKV7TimeMix
    from ..models.transformer import MLP, SelfAttention
    kinds: Tuple[type, ...] = (RWKV7TimeMix, RWKV7ChannelMix, SelfAttention, MLP)
    try:
        from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3MLP
        kinds += (Qwen3Attention, Qwen3MLP)
    except ImportError:
        pass
    return [m for m in model.modules() if isinstance(m, kinds)]


def shard(model: torch.nn.Module, dtype: Optional[torch.dtype] = None) -> None:
    """FSDP2 over the ranks: each of :func:`fsdp_units` one unit, the rest the root unit."""
    import warnings
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # The views FSDP warns about are the RWKV-7 branches' last-token outputs (x[:, -1], the
    # token-shift state for cached generation); nothing writes into them in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype is not None else None)
    for unit in fsdp_units(model):
        fully_shard(unit, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def setup(parallel: str, device: torch.device, batch_size: int) -> Tuple[Dist, torch.device]:
    """Joins the process group torchrun started (``training.parallel`` other than none) and
    returns this rank's :class:`Dist` and device (``cuda:<local rank>`` on CUDA)."""
    mode = resolve_mode(parallel)
    if mode == "none":
        return Dist(), device
    rank, world, local_rank = launched()
    if batch_size % world:
        raise ConfigError(f"training.train_batch_size={batch_size} is the batch of one step over all "
                          f"{world} processes and must divide by {world}: each process runs an equal share")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(mode, rank, world, local_rank, device if device.type == "cuda" else torch.device("cpu")), device
