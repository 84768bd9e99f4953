"""Embedding diffusion (``training.objective=embedding``): Gaussian diffusion on the token
embeddings of the whole text, the continuous baseline beside masked diffusion (Diffusion-LM's
recipe, the DiR notes' prompt 4).

The clean signal of a text is its tokens' rows of the denoiser's embedding table, each scaled
to unit root-mean-square (``model.token_embeddings()``), so every clean vector has norm ``sqrt(C)`` like a
draw of the unit-variance prior, and rounding by the largest dot product is rounding to the
nearest row. The forward process is the variance-preserving one of
:class:`~rwkv_diffusion_rnn.diffusion.continuous_diffusion.GaussianDiffusion` (the
``latent_noise`` group's schedule), applied to every position:

    x_s = alpha(s) x0 + sigma(s) eps,    x0 = unit_rms(E[tokens])  [B, T, C]

The denoiser reads ``x_s`` in place of its input embeddings (no latent prefix; its time input
is ``s``) and predicts ``x0`` (the rounding below reads an ``x0``; Diffusion-LM predicts it too).

Loss (per real token, padding excluded)::

    mean ||x0_hat - x0||^2 / C  +  auxiliary_ce_weight * CE(x0_hat . E_hat^T, tokens)

``E_hat`` is that whole scaled table; the mask id's row is never a candidate.
The clean embeddings in the squared error and in the noised input are detached from the table:
a squared error that could move its own targets would shrink them together (every row alike
makes the error 0). The table is trained by the auxiliary CE only (Diffusion-LM's rounding
term); with weight 0 a model from scratch keeps its random table, which separates its rows well
in high dimensions, and a pretrained backbone keeps its own.

Measures (:func:`embedding_scores`): the squared error, the rounding cross-entropy (nats per
token of the rounding softmax of ``x0_hat``, at the same noise draws: a score of the denoiser's
guess, *not* a bound on the text's likelihood), the rounding accuracy, and the drift: the
root-mean-square distance per dimension from ``x0_hat`` to the nearest row of ``E_hat`` (0: on
the token manifold; the clean rows themselves have root-mean-square 1).

Sampling (:func:`generate_embedding_text`): DDIM over the embeddings from N(0, I), the final
``x0_hat`` rounded to the nearest row.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F

from .continuous_diffusion import GaussianDiffusion

__all__ = ["rounding_logits", "round_to_tokens", "EmbeddingDiffusionObjective",
           "embedding_scores", "generate_embedding_text"]


def rounding_logits(x0_hat: torch.Tensor, table: torch.Tensor, mask_id: Optional[int]) -> torch.Tensor:
    """``x0_hat . table^T`` [..., V] in float32, the mask id's column at -inf (no text holds it)."""
    logits = x0_hat.float() @ table.float().t()
    if mask_id is not None:
        logits[..., mask_id] = float("-inf")
    return logits


def round_to_tokens(x0_hat: torch.Tensor, table: torch.Tensor, mask_id: Optional[int] = None) -> torch.Tensor:
    """The nearest row of ``table`` (unit-rms rows: the largest dot product) for each vector."""
    return rounding_logits(x0_hat, table, mask_id).argmax(-1)


def _drift(x0_hat: torch.Tensor, table: torch.Tensor, mask_id: Optional[int]) -> torch.Tensor:
    """[...]: root-mean-square distance per dimension from each vector to its nearest row."""
    x = x0_hat.float()
    d2 = (x.pow(2).sum(-1, keepdim=True) - 2 * x @ table.float().t() + table.float().pow(2).sum(-1))
    if mask_id is not None:
        d2[..., mask_id] = float("inf")
    return (d2.min(-1).values.clamp_min(0) / x.shape[-1]).sqrt()


class EmbeddingDiffusionObjective:
    """The training objective of ``training.objective=embedding`` (see the module docstring);
    called like the other objectives, returns ``(loss, stats)`` with ``text_loss`` the loss,
    ``mse`` and ``rounding_ce`` its two parts."""

    def __init__(self, diffusion: GaussianDiffusion, auxiliary_ce_weight: float = 0.0,
                 mask_id: Optional[int] = None):
        if diffusion.target_type != "x0":
            raise ValueError("embedding diffusion predicts x0 (rounding reads it): build its GaussianDiffusion "
                             "with target='x0'")
        if auxiliary_ce_weight < 0:
            raise ValueError(f"training.auxiliary_ce_weight={auxiliary_ce_weight} must be >= 0")
        self.diffusion, self.weight, self.mask_id = diffusion, float(auxiliary_ce_weight), mask_id

    def forward(self, model, batch: Dict[str, torch.Tensor], generator: torch.Generator,
                device: torch.device = torch.device("cpu"), autocast: Callable = nullcontext,
                rows: Optional[slice] = None):
        """``(x0_hat, x0, valid, table)`` of one noising of ``batch`` (draws: ``s``, then eps)."""
        ids = batch["input_ids"]
        valid = batch["attention_mask"].bool()
        B = ids.shape[0]
        s = self.diffusion.sample_s(B, generator=generator)
        table = model.token_embeddings()
        eps = torch.randn((*ids.shape, table.shape[1]), generator=generator)
        if rows is not None:
            ids, valid, s, eps = ids[rows], valid[rows], s[rows], eps[rows]
        ids, valid, s = ids.to(device), valid.to(device), s.to(device)
        x0 = table[ids].detach().float()
        xs = self.diffusion.q_sample(x0, s, eps.to(device))
        with autocast():
            out = model(None, s, input_embeds=xs.to(table.dtype))
        return out.embedding.float(), x0, valid, table

    def terms(self, x0_hat, x0, valid, table, ids, count: Optional[float] = None):
        """(mse, ce, tokens): the squared error per dimension and the rounding CE, summed over real
        tokens and divided by ``count`` (default: their number)."""
        n = max(float(valid.sum()), 1.0) if count is None else count
        mse = ((x0_hat - x0).pow(2).mean(-1) * valid).sum() / n
        ce = F.cross_entropy(rounding_logits(x0_hat[valid], table, self.mask_id), ids[valid], reduction="sum") / n
        return mse, ce, int(valid.sum())

    def __call__(self, model, batch: Dict[str, torch.Tensor], generator: torch.Generator,
                 device: torch.device = torch.device("cpu"), autocast: Callable = nullcontext,
                 rows: Optional[slice] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
        count = None if rows is None else max(float(batch["attention_mask"].bool().sum()), 1.0)
        x0_hat, x0, valid, table = self.forward(model, batch, generator, device, autocast, rows)
        ids = batch["input_ids"] if rows is None else batch["input_ids"][rows]
        mse, ce, tokens = self.terms(x0_hat, x0, valid, table, ids.to(valid.device), count)
        # weight 0 leaves the CE out of the graph: the loss is the squared error alone
        loss = mse + self.weight * ce if self.weight else mse
        return loss, {"text_loss": float(loss.detach()), "latent_loss": 0.0, "tokens": tokens,
                      "text_rows": int(batch["input_ids"].shape[0]), "latent_rows": 0,
                      "mse": float(mse.detach()), "rounding_ce": float(ce.detach())}


@torch.no_grad()
def embedding_scores(objective: EmbeddingDiffusionObjective, model, batches: Iterable[dict],
                     generator: torch.Generator, max_batches: Optional[int] = None,
                     device: torch.device = torch.device("cpu"), autocast: Callable = nullcontext) -> Dict[str, float]:
    """Token-weighted means over ``batches`` (one noising each, from ``generator``):
    ``embedding_mse``, ``rounding_ce`` (nats per token; not a likelihood bound), ``rounding_acc``
    and ``embedding_drift`` (see the module docstring)."""
    sums = {"embedding_mse": 0.0, "rounding_ce": 0.0, "rounding_acc": 0.0, "embedding_drift": 0.0}
    tokens = 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x0_hat, x0, valid, table = objective.forward(model, batch, generator, device, autocast)
        ids = batch["input_ids"].to(valid.device)
        mse, ce, n = objective.terms(x0_hat, x0, valid, table, ids, count=1.0)
        sums["embedding_mse"] += float(mse)
        sums["rounding_ce"] += float(ce)
        pred = round_to_tokens(x0_hat[valid], table, objective.mask_id)
        sums["rounding_acc"] += float((pred == ids[valid]).sum())
        sums["embedding_drift"] += float(_drift(x0_hat[valid], table, objective.mask_id).sum())
        tokens += n
    return {k: v / tokens for k, v in sums.items()} if tokens else {}


@torch.no_grad()
def generate_embedding_text(model, diffusion: GaussianDiffusion, *, length: int, batch_size: int = 1,
                            steps: int = 50, eta: float = 0.0, generator=None,
                            init_noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Token ids [B, length]: DDIM over the embeddings (``eta``; 0 is deterministic given the
    start noise, ``init_noise`` [B, length, C]), the last ``x0_hat`` rounded to the nearest row."""
    was_training = model.training
    model.eval()
    try:
        table = model.token_embeddings()
        device = table.device
        shape = (batch_size, length, table.shape[1])

        def model_fn(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return model(None, s.to(device), input_embeds=x.to(device, table.dtype)).embedding.float().to(x.device)

        x0 = diffusion.ddim_sample(model_fn, shape, steps, eta=eta, generator=generator, device=device,
                                   init_noise=None if init_noise is None else init_noise.to(device))
        return round_to_tokens(x0, table, model.config.mask_id)
    finally:
        model.train(was_training)
