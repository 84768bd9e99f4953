"""The training objectives: text + latent diffusion (which rows learn what, and their losses), and
next-token prediction, the autoregressive baseline every diffusion number is compared with.
Either runs a long window in chunks with the recurrent state carried when given a
:class:`~rwkv_diffusion_rnn.diffusion.chunks.Chunking` (``model.chunk_size``).

Every row of a batch gets one role, drawn per row from one uniform number ``u``:

* **text -> latent** (``u < clean_text_prob``): the text is clean (``t = 0``, nothing masked) and
  carries no text loss; the latent is noised and trained.
* **latent -> text** (next ``clean_latent_prob``): the latent is clean conditioning (``s = 0``)
  and carries no latent loss; the text is masked and trained.
* **joint** (the rest): both are noised, both are trained.

Independently, ``latent_drop_prob`` of the rows see the denoiser's learned null latent instead
of their own (classifier-free guidance); they carry no latent loss. Without a latent prefix
every row is a text row. The total is ``text_loss + latent_loss_weight * latent_loss``.

A model with a learned latent (``model.latent_projector``, ``projected_dim`` here) reads the
data's vectors: its forward projects each to the clean latent ``z0``, noises it with this
objective's ``s`` and ``eps`` (``latent_noise``) and decodes it back; the latent loss is then
against that ``z0``, and ``latent_recon_weight * latent_recon`` is added, ``latent_recon`` the
squared error of the decoded vector against the data's, as a share of the vector's squared norm,
averaged over every row (weight 0: no term).

All draws come from the one generator the caller passes, in a fixed order (truncation, ``t``,
``s``, roles, drops, latent noise, masks), so a run is reproduced by that generator's state.

``rows`` runs the denoiser on some rows of the batch only (one process's share, see
:mod:`~rwkv_diffusion_rnn.training.distributed`): the draws are still made for the whole batch,
and the loss is those rows' terms over the whole batch's normaliser, so the shares' losses add up
to the loss of the whole batch.

An objective returns ``(loss, stats)``; ``stats`` holds ``text_loss``, ``latent_loss`` and
``tokens`` (of the rows run) and ``text_rows`` / ``latent_rows``: how many rows of the whole batch
carry each loss. A loss no row carries is 0 by construction, not a measurement, and is left out
of the mean of a validation pass.

:class:`AutoregressiveObjective` trains a causal denoiser (``mixer=causal``, no latent) to
predict each token from those before it; it draws nothing.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch

from .chunks import Carry, Chunking, run_chunks
from .continuous_diffusion import GaussianDiffusion
from .diffusion_process import MaskedDiffusion

# training.objective; embedding: Gaussian diffusion of the token embeddings (embedding_diffusion.py)
OBJECTIVES = ("diffusion", "ar", "embedding")


@dataclass
class ObjectiveConfig:
    clean_text_prob: float = 0.25       # rows trained as text -> latent
    clean_latent_prob: float = 0.25     # rows trained as latent -> text
    latent_drop_prob: float = 0.1       # rows that see the null latent
    latent_loss_weight: float = 1.0
    latent_recon_weight: float = 0.0    # a latent_projector model: its reconstruction term

    def __post_init__(self):
        for name in ("clean_text_prob", "clean_latent_prob", "latent_drop_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"training.{name}={getattr(self, name)} must be a probability in [0, 1]")
        if self.clean_text_prob + self.clean_latent_prob > 1.0:
            raise ValueError("training.clean_text_prob + training.clean_latent_prob must not exceed 1")


class NoisyBatch(NamedTuple):
    """A batch after noising; every tensor on the CPU, rows as in the input batch."""
    x0: torch.Tensor                    # [B, T] clean ids (after truncation)
    xt: torch.Tensor                    # [B, T] noised ids
    is_masked: torch.Tensor             # [B, T] positions noised (these carry the text loss)
    valid: torch.Tensor                 # [B, T] real tokens (not padding)
    t: torch.Tensor                     # [B] text time (0 on text -> latent rows)
    text_rows: torch.Tensor             # [B] rows with a text loss
    z0: Optional[torch.Tensor] = None   # [B, D] clean latent
    zs: Optional[torch.Tensor] = None   # [B, D] noised latent (= z0 where s = 0)
    s: Optional[torch.Tensor] = None    # [B] latent time (0 on latent -> text rows)
    eps: Optional[torch.Tensor] = None  # [B, D] the latent noise
    drop: Optional[torch.Tensor] = None  # [B] rows given the null latent
    latent_rows: Optional[torch.Tensor] = None  # [B] rows with a latent loss
    answer_lengths: Optional[torch.Tensor] = None  # [B] SFT: positions after the prompt
    prompt_lengths: Optional[torch.Tensor] = None  # [B] conversations: positions of the prompt

    def take(self, rows: slice) -> "NoisyBatch":
        """These rows of every field."""
        return NoisyBatch(*(None if v is None else v[rows] for v in self))


class Normalizers(NamedTuple):
    """The divisors of a whole batch's losses: its scored text positions and latent rows."""
    text: float
    latent: float
    rows: float = 1.0                   # the batch's rows (the reconstruction term's divisor)

    @classmethod
    def of(cls, nb: NoisyBatch) -> "Normalizers":
        text = (max(float(nb.text_rows.sum()), 1.0) if nb.answer_lengths is not None
                else max(float(nb.valid[nb.text_rows].sum()), 1.0))
        latent = max(float(nb.latent_rows.sum()), 1.0) if nb.latent_rows is not None else 1.0
        return cls(text, latent, float(nb.x0.shape[0]))


class DiffusionObjective:
    """Noises a batch, runs the denoiser, and returns ``(loss, stats)`` (see the module docstring).

    ``latent`` is None for a text-only model. ``sft`` (LLaDA's SFT, ``text_noise.sft``): the batch
    carries ``prompt_lengths``; the prompt is never masked, and each row's text loss is divided by
    its answer length (every position after the prompt, EOS padding included), then averaged
    over the text rows.

    With ``chunking`` the noised window is read in chunks, the denoiser's state carried from one
    to the next (the latent prefix read with the first); each chunk's text loss uses the whole
    window's divisors, so the chunks' losses add up to the loss of the window read at once.
    With ``carry`` (``data.order=stream``) a batch that continues the previous one starts from
    the state it left (its rows' windows follow the previous rows': the clean text before them)."""

    def __init__(self, text: MaskedDiffusion, latent: Optional[GaussianDiffusion],
                 config: Optional[ObjectiveConfig] = None, sft: bool = False,
                 chunking: Optional[Chunking] = None, carry: Optional[Carry] = None,
                 projected_dim: Optional[int] = None):
        self.text, self.latent, self.config, self.sft = text, latent, config or ObjectiveConfig(), sft
        self.chunking, self.carry = chunking, carry
        # the model's latent size when its forward projects the data's vectors (model.latent_projector)
        self.projected_dim = projected_dim if latent is not None else None

    def noise(self, batch: Dict[str, torch.Tensor], generator: torch.Generator) -> NoisyBatch:
        c, g = self.config, generator
        x0 = batch["input_ids"]
        valid = batch["attention_mask"].bool()
        maskable = batch.get("maskable", valid).bool()
        if self.sft:
            if "prompt_lengths" not in batch:
                raise ValueError("text_noise.sft=true needs batches with prompt_lengths (data=sft)")
            maskable = maskable & answer_positions(batch)
        x0, valid, maskable = self.text.maybe_truncate(x0, valid, maskable, generator=g)
        B = x0.shape[0]
        t = self.text.sample_t(B, generator=g)
        clean_text = torch.zeros(B, dtype=torch.bool)
        lat = {}
        if self.latent is not None:
            z0 = batch["latent"].float()
            s = self.latent.sample_s(B, generator=g)
            u = torch.rand(B, generator=g)
            clean_text = u < c.clean_text_prob
            clean_latent = (u >= c.clean_text_prob) & (u < c.clean_text_prob + c.clean_latent_prob)
            s = torch.where(clean_latent, torch.zeros_like(s), s)
            drop = torch.rand(B, generator=g) < c.latent_drop_prob
            if self.projected_dim:      # z0 is the data's vector; the model projects and noises it
                eps = torch.randn((B, self.projected_dim), generator=g)
                zs = None
            else:
                eps = torch.randn(z0.shape, generator=g)
                zs = self.latent.q_sample(z0, s, eps)
            lat = dict(z0=z0, zs=zs, s=s, eps=eps, drop=drop, latent_rows=(s > 0) & ~drop)
        xt, is_masked = self.text.noise(x0, t, maskable=maskable & ~clean_text.view(B, 1), generator=g)
        t = torch.where(clean_text, torch.zeros_like(t), t)
        answer_lengths = (valid & maskable).sum(1) if self.sft else None
        return NoisyBatch(x0, xt, is_masked, valid, t, ~clean_text, **lat, answer_lengths=answer_lengths,
                          prompt_lengths=batch.get("prompt_lengths"))

    def loss(self, out, nb: NoisyBatch, norm: Optional[Normalizers] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
        """The loss of the denoiser output ``out`` (``.logits``, ``.latent``) on ``nb``;
        ``norm``: the divisors of the whole batch ``nb`` is a share of (default: its own)."""
        dev = out.logits.device
        rows = nb.text_rows
        if rows.any():
            text_loss, _ = self.text.loss(out.logits[rows], nb.x0[rows].to(dev), nb.is_masked[rows].to(dev),
                                          nb.t[rows].to(dev), valid=nb.valid[rows].to(dev),
                                          answer_lengths=None if nb.answer_lengths is None else nb.answer_lengths[rows],
                                          normalizer=None if norm is None else norm.text)
        else:  # keeps the graph, so backward() works on a batch without text rows
            text_loss = out.logits.sum() * 0.0
        loss = text_loss
        latent_loss = torch.zeros((), device=dev)
        z0 = out.latent_x0 if self.projected_dim else nb.z0
        if self.latent is not None and nb.latent_rows.any():
            latent_loss = self.latent.loss(out.latent.float(), z0.to(dev), nb.eps.to(dev), nb.s.to(dev),
                                           row_mask=nb.latent_rows.to(dev),
                                           normalizer=None if norm is None else norm.latent)
            loss = loss + self.config.latent_loss_weight * latent_loss
        extra = {}
        if self.projected_dim:
            # each row's squared error as a share of its vector's energy: the data's vectors are
            # centred (prepare_latents), so this is the share of its variance the latent loses
            src = nb.z0.to(dev).float()
            err = (out.latent_recon.float() - src).pow(2).sum(1) / src.pow(2).sum(1).clamp_min(1e-12)
            recon = err.sum() / (norm.rows if norm is not None else err.shape[0])
            if self.config.latent_recon_weight:
                loss = loss + self.config.latent_recon_weight * recon
            extra["latent_recon"] = float(recon.detach())
        return loss, {"text_loss": float(text_loss.detach()), "latent_loss": float(latent_loss.detach()),
                      "tokens": int(nb.valid.sum()), **self._carried(nb), **extra}

    @staticmethod
    def _carried(nb: NoisyBatch) -> Dict[str, int]:
        """The rows of ``nb`` that carry each loss."""
        return {"text_rows": int(nb.text_rows.sum()),
                "latent_rows": int(nb.latent_rows.sum()) if nb.latent_rows is not None else 0}

    def __call__(self, model, batch: Dict[str, torch.Tensor], generator: torch.Generator,
                 device: torch.device = torch.device("cpu"), autocast: Callable = nullcontext,
                 rows: Optional[slice] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
        nb = self.noise(batch, generator)
        norm = whole = None
        if rows is not None:
            whole = self._carried(nb)       # the counts of the whole batch, not of this share
            norm, nb = Normalizers.of(nb), nb.take(rows)
        if self.chunking is not None or self.carry is not None:
            start = None if self.carry is None else self.carry.take(batch)
            prev = batch.get("prev_ids") if start is not None else None
            loss, stats, end = self._chunked(model, nb, norm or Normalizers.of(nb), device, autocast, start, prev)
            if self.carry is not None and "continues" in batch:     # a training stream's batch
                self.carry.keep(end)
            return loss, {**stats, **(whole or {})}
        has_latent = nb.s is not None
        kw = {}
        if has_latent and self.projected_dim:
            alpha, sigma = self.latent.alpha_sigma(nb.s)
            kw["latent_noise"] = (alpha.to(device), sigma.to(device), nb.eps.to(device))
        z_in = (nb.z0 if self.projected_dim else nb.zs) if has_latent else None
        with autocast():
            out = model(nb.xt.to(device), nb.t.to(device), z_in.to(device) if has_latent else None,
                        nb.s.to(device) if has_latent else None,
                        latent_drop=nb.drop.to(device) if has_latent else None, context_ids=nb.x0.to(device),
                        prompt_lengths=None if nb.prompt_lengths is None else nb.prompt_lengths.to(device),
                        **kw)
        loss, stats = self.loss(out, nb, norm)
        return loss, {**stats, **(whole or {})}

    def _chunked(self, model, nb: NoisyBatch, norm: Normalizers, device, autocast, start=None, prev=None):
        """:meth:`loss` of ``nb`` with the window read chunk by chunk from the state ``start``
        (``prev``: the token before the window), and the state after it."""
        has_latent = nb.zs is not None
        lat = dict(latent=nb.zs.to(device), s=nb.s.to(device), latent_drop=nb.drop.to(device)) if has_latent else {}
        x0, xt, t = nb.x0.to(device), nb.xt.to(device), nb.t.to(device)
        net = _bare(model)
        shift = net.config.shift_logits
        # with shift_logits a chunk's first position reads the token before it as the window read
        # at once does: clean where the mixer reads clean context, else as noised
        before = x0 if net.mixer.reads_context else xt
        no_latent_rows = None if nb.latent_rows is None else torch.zeros_like(nb.latent_rows)
        parts = {"text_loss": 0.0, "latent_loss": 0.0}

        def step(a: int, b: int, state):
            with autocast():
                first = before[:, a - 1] if a else (None if prev is None else prev.to(device))
                out = model(xt[:, a:b], t, **lat, state=state, return_state=True, pos_offset=a,
                            prev_ids=first if shift else None, context_ids=x0[:, a:b])
            part = nb._replace(x0=nb.x0[:, a:b], xt=nb.xt[:, a:b], is_masked=nb.is_masked[:, a:b],
                               valid=nb.valid[:, a:b], latent_rows=nb.latent_rows if a == 0 else no_latent_rows)
            loss, st = self.loss(out, part, norm)
            # read before the backward, which runs each step once more (its recomputation)
            parts["text_loss"] += st["text_loss"]
            parts["latent_loss"] += st["latent_loss"]
            return loss, out.state

        T = nb.xt.shape[1]
        loss, end = run_chunks(step, self.chunking or Chunking(T), T, start)
        return loss, {**parts, "tokens": int(nb.valid.sum()), **self._carried(nb)}, end


def _bare(model):
    """The denoiser inside a DDP wrapper (FSDP shards it in place)."""
    return getattr(model, "module", model)


def answer_positions(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, T] bool: the positions after each row's prompt (``prompt_lengths``, conversations)."""
    return torch.arange(batch["input_ids"].shape[1])[None, :] >= batch["prompt_lengths"].view(-1, 1)


def next_token_inputs(batch: Dict[str, torch.Tensor]):
    """``(inputs, targets, valid)`` of next-token prediction on a batch.

    With ``prev_ids`` [B] (the token before each window, as corpus windows carry) every token of
    ``input_ids`` is a target, read after the token before it (nanoGPT's x / y). Without it the
    first token is context only. ``valid`` marks targets that exist and follow a real token."""
    ids = batch["input_ids"]
    real = batch["attention_mask"].bool()
    prev = batch.get("prev_ids")
    if prev is not None:
        return torch.cat([prev.view(-1, 1).to(ids.dtype), ids[:, :-1]], 1), ids, real
    return ids[:, :-1], ids[:, 1:], real[:, 1:] & real[:, :-1]


class AutoregressiveObjective:
    """Mean cross-entropy of the next token under a causal denoiser (its time input fixed at 0);
    with ``rows``, those rows' cross-entropies over the whole batch's target count; with
    ``chunking``, the window read chunk by chunk with the state carried; with ``carry``
    (``data.order=stream``) a batch that continues the previous one starts from its state."""

    def __init__(self, chunking: Optional[Chunking] = None, carry: Optional[Carry] = None):
        self.chunking, self.carry = chunking, carry

    def __call__(self, model, batch: Dict[str, torch.Tensor], generator: Optional[torch.Generator] = None,
                 device: torch.device = torch.device("cpu"), autocast: Callable = nullcontext,
                 rows: Optional[slice] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
        inputs, targets, valid = next_token_inputs(batch)
        n_rows = int(inputs.shape[0])       # every row carries the text loss
        count = None
        if rows is not None:
            count = max(float(valid.sum()), 1.0)
            inputs, targets, valid = inputs[rows], targets[rows], valid[rows]
        inputs, targets, valid = inputs.to(device), targets.to(device), valid.to(device)
        t = torch.zeros(inputs.shape[0], device=device)
        if self.chunking is not None or self.carry is not None:
            start = None if self.carry is None else self.carry.take(batch)

            def step(a: int, b: int, state):      # a causal mixer never shifts its logits
                with autocast():
                    out = model(inputs[:, a:b], t, state=state, return_state=True, pos_offset=a)
                v = valid[:, a:b]
                return torch.nn.functional.cross_entropy(out.logits[v].float(), targets[:, a:b][v],
                                                         reduction="sum"), out.state
            T = inputs.shape[1]
            ce, end = run_chunks(step, self.chunking or Chunking(T), T, start)
            if self.carry is not None and "continues" in batch:     # a training stream's batch
                self.carry.keep(end)
            loss = ce / (count or max(float(valid.sum()), 1.0))
        else:
            with autocast():
                logits = model(inputs, t).logits
            ce = torch.nn.functional.cross_entropy(logits[valid].float(), targets[valid],
                                                   reduction="mean" if count is None else "sum")
            loss = ce if count is None else ce / count
        return loss, {"text_loss": float(loss.detach()), "latent_loss": 0.0, "tokens": int(valid.sum()),
                      "text_rows": n_rows, "latent_rows": 0}
