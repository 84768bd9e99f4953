"""Evaluation during training: the metrics of each ``train_log.jsonl`` evaluation record and of
``metrics.json``.

A synthetic task is scored by decoding its answers (accuracy and exact match, also on a fresh
random batch); text data by the validation bound (diffusion: ``val_nelbo``, nats per token) or
NLL (``training.objective=ar``: ``val_nll``), the objective's losses on the validation batches
and, with a latent, the cosine of latents inferred from text. Embedding diffusion
(``training.objective=embedding``) has no bound here: its squared error, rounding cross-entropy
(not a bound), rounding accuracy and embedding drift
(:func:`~rwkv_diffusion_rnn.diffusion.embedding_diffusion.embedding_scores`). Every evaluation draws from fixed
streams of :mod:`~rwkv_diffusion_rnn.common.rng` (the same noise every time, never the
training streams), so evaluations at different steps compare the models alone. Under torchrun
every rank scores its share and the sums are combined.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch

from ..diffusion.embedding_diffusion import embedding_scores
from ..diffusion.sampling import generate_latent, generate_text
from ..common import rng
from . import likelihood


@dataclass(frozen=True)
class EvalSettings:
    """The ``eval`` config group and the batch size of decoding (``training.eval_batch_size``)."""
    batch_size: int
    max_batches: Optional[int]      # validation batches for the losses and the bound (None: all)
    mc_samples: int                 # draws of (time, mask) per window for the diffusion bound
    sample_steps: int               # denoising steps when decoding a task's answers
    threshold: Optional[float]      # confidence-threshold parallel decoding
    latent_steps: int               # sampler steps for text -> latent
    fresh: bool                     # synthetic tasks: also score a fresh random batch


class Evaluator:
    """Scores a model on the run's validation data. ``by_task`` picks task scoring (the data
    has ``task`` and ``eval_set``: a source not scored by a likelihood) over the bound on ``data.val``; ``loss`` is the training
    objective (``loss(model, batch, generator, device, autocast, rows=...)``)."""

    def __init__(self, *, data, settings: EvalSettings, by_task: bool, objective: str,
                 loss: Callable, schedule, latent_diff, mask_id: int, vocab_size: int, tokenizer,
                 has_latent: bool, device: torch.device, autocast: Callable, dist, bound: bool = True):
        self.data, self.settings = data, settings
        self.by_task, self.objective, self.loss = by_task, objective, loss
        self.schedule, self.latent_diff = schedule, latent_diff
        self.mask_id, self.vocab_size, self.tokenizer = mask_id, vocab_size, tokenizer
        self.has_latent, self.bound = has_latent, bound
        self.device, self.autocast, self.dist = device, autocast, dist

    @torch.no_grad()
    def evaluate(self, model, step: int) -> Dict[str, float]:
        """The metrics of ``model`` (in eval mode meanwhile) at training step ``step``."""
        was_training = model.training
        model.eval()
        try:
            if self.by_task:
                return self._evaluate_task(model, step)
            return self._evaluate_text_latent(model)
        finally:
            model.train(was_training)

    def _decode_task(self, model, batch):
        ev = self.settings
        masked = batch.masked_input(self.data.task.mask_id)
        preds = []
        bs = ev.batch_size
        for i in range(0, masked.shape[0], bs):
            preds.append(generate_text(model, prompt_ids=masked[i:i + bs].to(self.device),
                                       steps=ev.sample_steps, threshold=ev.threshold,
                                       generator=rng.generator("eval_sampling")).cpu())
        return torch.cat(preds)

    def _evaluate_task(self, model, step: int) -> Dict[str, float]:
        task = self.data.task
        name = task.name
        res = task.score(self._decode_task(model, self.data.eval_set), self.data.eval_set)
        out = {f"{name}_acc": res["acc"], f"{name}_exact": res["exact"]}
        if not self.settings.fresh:
            return out
        # a fresh batch per step: the offset makes each evaluation's batch another one
        fresh = task.sample_batch(self.data.eval_set.input_ids.shape[0],
                                  generator=rng.generator("eval_fresh", offset=step))
        res_fresh = task.score(self._decode_task(model, fresh), fresh)
        return dict(out, **{f"{name}_acc_fresh": res_fresh["acc"], f"{name}_exact_fresh": res_fresh["exact"]})

    def likelihood(self, model, latent: str = "clean") -> "likelihood.LikelihoodSummary":
        """The bound (diffusion) or NLL (ar) of the validation split, with the same noise every time."""
        ev = self.settings
        return likelihood.score(model, self.data.val, objective=self.objective,
                                schedule=self.schedule, mask_id=self.mask_id,
                                vocab_size=self.vocab_size,
                                generator=rng.generator("eval_noise"), mc_samples=ev.mc_samples,
                                max_batches=ev.max_batches, tokenizer=self.tokenizer, latent=latent,
                                device=self.device, autocast=self.autocast,
                                dist=self.dist if self.dist.active else None)

    def _evaluate_text_latent(self, model) -> Dict[str, Any]:
        if self.data.val is None:
            return {}
        if self.objective == "ar":
            nll = self.likelihood(model)
            return {"val_nll": nll.nats_per_token, **({"val_bpc": nll.bits_per_char} if nll.chars else {})}
        if self.objective == "embedding":
            # token-weighted means of this process's rows (every process scores the same batches)
            scores = embedding_scores(self.loss, model, self.data.val, rng.generator("eval_noise"),
                                      max_batches=self.settings.max_batches, device=self.device,
                                      autocast=self.autocast)
            return {f"val_{k}": v for k, v in scores.items()}
        out = {}
        if self.bound:           # a model of uniform-state noise has no masked-diffusion bound
            bound = self.likelihood(model)
            out = {"val_nelbo": bound.nats_per_token, "val_nelbo_stderr": bound.stderr}
            if bound.chars:
                out["val_bpc"] = bound.bits_per_char
            if self.has_latent:
                out["val_nelbo_null_latent"] = self.likelihood(model, latent="null").nats_per_token
        g = rng.generator("eval_noise")  # the same noise at every evaluation
        # each loss is the mean over the batches that had rows carrying it: a batch without any
        # (e.g. every row text -> latent) has a 0 loss by construction, not a measured one
        tot = {"text_loss": 0.0, "latent_loss": 0.0}
        n = {"text_loss": 0, "latent_loss": 0}
        cos_sum, cos_n = 0.0, 0
        max_batches = self.settings.max_batches
        for i, batch in enumerate(self.data.val):
            if max_batches is not None and i >= max_batches:
                break
            rows, counted = self.dist.eval_rows(batch["input_ids"].shape[0]) if self.dist.active else (None, True)
            _, st = self.loss(model, batch, g, self.device, self.autocast, rows=rows)
            for key, rows_key in (("text_loss", "text_rows"), ("latent_loss", "latent_rows")):
                if st[rows_key]:            # the whole batch's rows: the same on every process
                    n[key] += 1
                    if counted:
                        tot[key] += st[key]
            if self.has_latent and i == 0:
                z = generate_latent(model, self.latent_diff, batch["input_ids"].to(self.device),
                                    steps=self.settings.latent_steps, generator=rng.generator("eval_sampling"))
                true = likelihood.clean_latent(model, batch["latent"].float().to(self.device)).float().cpu()
                cos = torch.nn.functional.cosine_similarity(z.float().cpu(), true, dim=-1)
                cos_sum, cos_n = cos_sum + float(cos.sum()), cos_n + cos.numel()
        tot = dict(zip(tot, self.dist.sum(tot.values())))      # the shares of each batch add up
        # a loss no batch measured is absent (a text-only model's latent loss too), never a 0
        out.update({f"val_{k}": v / n[k] for k, v in tot.items() if n[k]})
        if cos_n:
            out["val_latent_cos"] = cos_sum / cos_n
        return out
