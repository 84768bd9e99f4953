"""The training loop: masked diffusion on text and Gaussian diffusion on the sentence latent.

:class:`Trainer` takes a resolved config (see ``configs/rwkv_mmdit.yaml``) and owns the model,
the two diffusion processes, the data, the optimizer and LR schedule, EMA, evaluation, logging
(``train_log.jsonl``, ``metrics.json``, tqdm, optional wandb) and checkpoints.

Exact resume: every random draw of training (batch order, masking, noise, latent dropout) comes
from generators whose states are saved in each checkpoint, together with the data position and
the running log accumulators, so a resumed run logs bit-identical losses on CPU. Evaluation uses
its own freshly seeded generators and never disturbs training randomness.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from . import checkpoints as ckpt
from .config_validation import ConfigError, validate_config
from ..diffusion.continuous_diffusion import GaussianDiffusion
from ..diffusion.diffusion_process import MaskedDiffusion
from ..models.rwkv_denoiser import DenoiserConfig, MultimodalRWKVDenoiser, build_denoiser
from .optimizer import build_optimizer, build_scheduler
from ..diffusion.sampling import generate_latent, generate_text


# ----------------------------------------------------------------------------------------------
# building blocks from the config


def denoiser_config(m: DictConfig) -> DenoiserConfig:
    return DenoiserConfig(
        vocab_size=m.vocab_size, mask_id=m.mask_id, latent_dim=m.latent_dim,
        latent_prefix_len=m.latent_prefix_len, latent_target=m.latent_target,
        time_conditioning=m.time_conditioning, adaln_identity_init=m.adaln_identity_init,
        mixer=m.mixer, bi_fusion=m.bi_fusion, bi_share_weights=m.bi_share_weights,
        dw_jrt_scale=m.dw_jrt_scale, dw_jrt_learnable_alpha=m.dw_jrt_learnable_alpha,
        dw_jrt_alpha_init=m.dw_jrt_alpha_init, dw_jrt_layer_start=m.dw_jrt_layer_start,
        block_size=m.block_size, use_rwkv_lm_head=m.use_rwkv_lm_head,
        freeze_backbone=m.freeze_backbone, pos_emb_len=m.pos_emb_len,
        pos_emb_init_std=float(m.pos_emb_init_std))


def build_model(cfg: DictConfig) -> MultimodalRWKVDenoiser:
    m = cfg.model
    return build_denoiser(denoiser_config(m), rwkv_name=m.rwkv_name, rwkv_filename=m.rwkv_filename,
                          rwkv_revision=m.rwkv_revision, cache_dir=m.cache_dir,
                          local_files_only=m.local_files_only, n_layer=m.n_layer or 2,
                          n_embd=m.n_embd or 128, head_size=m.head_size or 32,
                          wkv_backend=m.wkv_backend)


def build_text_diffusion(cfg: DictConfig) -> MaskedDiffusion:
    n = cfg.text_noise
    return MaskedDiffusion(
        schedule=n.schedule, mask_id=cfg.model.mask_id, vocab_size=cfg.model.vocab_size,
        schedule_kwargs=dict(n.schedule_kwargs or {}), noise_type=n.noise_type,
        min_masking_rate=n.min_masking_rate, span_prob=n.span_prob,
        mean_span_length=n.mean_span_length, truncate_prob=n.truncate_prob,
        loss_type=n.loss_type, label_smoothing=n.label_smoothing, reweight_cap=n.reweight_cap,
        low_discrepancy=n.low_discrepancy)


def build_latent_diffusion(cfg: DictConfig) -> GaussianDiffusion:
    n = cfg.latent_noise
    return GaussianDiffusion(schedule=n.schedule, min_noise_level=n.min_noise_level,
                             max_noise_level=n.max_noise_level, target=n.target,
                             num_train_steps=n.num_train_steps)


LOG_FILE = "train_log.jsonl"


def read_train_log(save_dir) -> List[Dict[str, Any]]:
    """The records of ``<save_dir>/train_log.jsonl``, one dict per logged step ([] if none)."""
    log = Path(save_dir) / LOG_FILE
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


class EMA:
    """Exponential moving average of the trainable weights, kept in a copy of the model."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module):
        for e, p in zip(self.module.parameters(), model.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1.0 - self.decay)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("training.device=cuda but no CUDA device is visible; use training.device=cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------
# data sources


class SyntheticData:
    """An endless stream of synthetic-task batches; its position is a generator state."""

    def __init__(self, cfg: DictConfig, batch_size: int, seed: int):
        from ..data.tasks import make_task
        d = cfg.data
        self.task = make_task(d.task, seq_len=d.seq_len, struct_len=d.struct_len, seed=seed)
        self.batch_size = batch_size
        self.gen = torch.Generator().manual_seed(seed + 17)
        self.eval_set = self.task.fixed_eval_set(n=d.eval_size, seed=d.eval_seed)
        self.epoch = 0

    def batches(self):
        while True:
            b = self.task.sample_batch(self.batch_size, generator=self.gen)
            yield {"input_ids": b.input_ids, "maskable": b.maskable, "attention_mask": b.attention_mask}

    def state(self):
        return {}, {"data_rng": self.gen.get_state()}

    def load(self, state, tensors):
        self.gen.set_state(tensors["data_rng"])


class TextLatentData:
    def __init__(self, cfg: DictConfig, batch_size: int, eval_batch_size: int, seed: int, pad_id: int):
        from ..data.data_simple import build_dataloaders
        d = cfg.data
        self.train, self.val = build_dataloaders(
            token_dir=d.token_dir, latent_dir=d.latent_dir, json_path=d.json_path,
            val_token_dir=d.val_token_dir, val_latent_dir=d.val_latent_dir,
            val_json_path=d.val_json_path, val_fraction=d.val_fraction, batch_size=batch_size,
            eval_batch_size=eval_batch_size, seq_len=d.seq_len,
            latent_dim=cfg.model.latent_dim if cfg.model.latent_prefix_len else None,
            max_samples=d.max_samples, num_workers=d.num_workers, seed=seed, pad_id=pad_id,
            shuffle=d.shuffle)

    @property
    def epoch(self):
        return self.train.epoch

    def state(self):
        return {"loader": self.train.state_dict()}, {}

    def load(self, state, tensors):
        self.train.load_state_dict(state["loader"])


# ----------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    def __init__(self, cfg: DictConfig):
        validate_config(cfg)
        self.cfg = cfg
        tr = cfg.training
        self.save_dir = Path(cfg.logging.save_dir)
        self.save_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.device = _resolve_device(tr.device)
        self.autocast_dtype = torch.bfloat16 if tr.dtype == "bf16" else None

        self.synthetic = cfg.data.kind == "synthetic"
        if self.synthetic:
            self.data = SyntheticData(cfg, tr.train_batch_size, cfg.seed)
        else:
            self.data = TextLatentData(cfg, tr.train_batch_size, tr.eval_batch_size, cfg.seed,
                                       pad_id=0)
        self.model = build_model(cfg).to(self.device)
        self.text_diff = build_text_diffusion(cfg)
        self.latent_diff = build_latent_diffusion(cfg)
        self.has_latent = cfg.model.latent_prefix_len > 0

        o = cfg.optimizer
        self.optimizer = build_optimizer(self.model, lr=o.lr, weight_decay=o.weight_decay,
                                         betas=tuple(o.betas), eps=o.eps,
                                         backbone_lr_mult=o.backbone_lr_mult, name=o.name,
                                         decay_lr_mult=o.decay_lr_mult,
                                         # only optimizer=muon configs carry these keys
                                         **{k: o[k] for k in ("muon_lr", "muon_momentum", "muon_ns_steps")
                                            if k in o})
        self.total_steps = self._total_steps()
        self.scheduler = build_scheduler(self.optimizer, o.schedule, o.warmup_steps,
                                         self.total_steps, o.min_lr_ratio,
                                         decay_steps=o.decay_steps)
        self.ema = EMA(self.model, tr.ema_decay) if tr.ema_decay else None
        # Training randomness lives in these generators (saved in checkpoints).
        self.noise_gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)

        self.global_step = 0
        self.metrics: Dict[str, Any] = {}
        self.window = {"loss": 0.0, "text_loss": 0.0, "latent_loss": 0.0, "n": 0, "tokens": 0}
        self.stop_requested = False
        self.wandb = None
        if tr.resume:
            self._resume(tr.resume)
        self.config_dict = OmegaConf.to_container(cfg, resolve=True)

    # ------------------------------------------------------------------ bookkeeping

    def _total_steps(self) -> Optional[int]:
        tr = self.cfg.training
        if tr.max_steps:
            return int(tr.max_steps)
        if self.synthetic:
            return None
        per_epoch = math.ceil(len(self.data.train) / tr.grad_accum_steps)
        return per_epoch * int(tr.num_epochs)

    def _trainer_state(self) -> Dict[str, Any]:
        data_state, _ = self.data.state()
        return {"global_step": self.global_step, "epoch": self.data.epoch, "data": data_state,
                "window": dict(self.window), "metrics": self.metrics,
                "backbone_trainable": any(p.requires_grad for p in self.model.backbone.parameters())}

    def save(self, name: str) -> Path:
        _, tensors = self.data.state()
        tensors = dict(tensors, noise_rng=self.noise_gen.get_state())
        return ckpt.save_checkpoint(
            self.save_dir, name, model=self.model, optimizer=self.optimizer,
            scheduler=self.scheduler, ema=self.ema.module if self.ema else None,
            trainer_state=self._trainer_state(), extra_tensors=tensors,
            config=self.config_dict, keep_last=self.cfg.logging.keep_last)

    def _resume(self, resume: str):
        path = ckpt.resolve_resume(str(resume), self.save_dir)
        saved_cfg_path = path / "config.yaml"
        if saved_cfg_path.exists():
            saved = OmegaConf.to_container(OmegaConf.load(saved_cfg_path), resolve=False)
            current = OmegaConf.to_container(self.cfg, resolve=False)
            ckpt.check_config_compatible(saved, current, keys=("model",))
        state, tensors = ckpt.load_checkpoint(path, model=self.model, optimizer=self.optimizer,
                                              scheduler=self.scheduler,
                                              ema=self.ema.module if self.ema else None)
        if state.get("backbone_trainable"):
            self.model.set_backbone_trainable(True)
        self.global_step = int(state["global_step"])
        self.window = state.get("window", self.window)
        self.metrics = state.get("metrics", {})
        self.data.load(state.get("data", {}), tensors)
        self.noise_gen.set_state(tensors["noise_rng"])
        self._truncate_log(self.global_step)
        print(f"resumed from {path} at step {self.global_step}")

    def _truncate_log(self, step: int):
        """Drops log lines written after the checkpoint we resume from (a killed run's tail)."""
        log = self.save_dir / LOG_FILE
        if not log.exists():
            return
        keep = []
        for line in log.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                break  # a line cut by the kill
        tmp = log.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, log)

    def _log(self, record: Dict[str, Any]):
        with open(self.save_dir / LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def _init_wandb(self):
        lg = self.cfg.logging
        if not lg.wandb:
            return
        try:
            import wandb
        except ImportError:
            print("logging.wandb=true but wandb is not installed; continuing without it")
            return
        self.wandb = wandb.init(project=lg.wandb_project, mode=lg.wandb_mode,
                                dir=str(self.save_dir), config=self.config_dict)

    # ------------------------------------------------------------------ one step

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def compute_loss(self, batch: Dict[str, torch.Tensor]):
        """Noise a batch, run the denoiser, return (loss, stats)."""
        tr = self.cfg.training
        g = self.noise_gen
        x0 = batch["input_ids"]
        valid = batch["attention_mask"].bool()
        maskable = batch.get("maskable", valid).bool()
        x0, valid, maskable = self.text_diff.maybe_truncate(x0, valid, maskable, generator=g)
        B = x0.shape[0]
        t = self.text_diff.sample_t(B, generator=g)
        latent = s = drop = eps = z0 = None
        clean_text = torch.zeros(B, dtype=torch.bool)
        if self.has_latent:
            z0 = batch["latent"].float()
            s = self.latent_diff.sample_s(B, generator=g)
            u = torch.rand(B, generator=g)
            clean_text = u < tr.clean_text_prob
            clean_latent = (u >= tr.clean_text_prob) & (u < tr.clean_text_prob + tr.clean_latent_prob)
            s = torch.where(clean_latent, torch.zeros_like(s), s)
            drop = torch.rand(B, generator=g) < tr.latent_drop_prob
            eps = torch.randn(z0.shape, generator=g)
            latent = self.latent_diff.q_sample(z0, s, eps)
        xt, is_masked = self.text_diff.noise(x0, t, maskable=maskable & ~clean_text.view(B, 1),
                                              generator=g)
        t = torch.where(clean_text, torch.zeros_like(t), t)
        dev = self.device
        with self._autocast():
            out = self.model(xt.to(dev), t.to(dev), None if latent is None else latent.to(dev),
                             None if s is None else s.to(dev),
                             latent_drop=None if drop is None else drop.to(dev))
        text_rows = ~clean_text
        text_loss, stats = self.text_diff.loss(out.logits[text_rows], x0[text_rows].to(dev),
                                               is_masked[text_rows].to(dev), t[text_rows].to(dev),
                                               valid=valid[text_rows].to(dev)) \
            if text_rows.any() else (out.logits.sum() * 0.0, {})
        loss = text_loss
        latent_loss = torch.zeros((), device=dev)
        if self.has_latent:
            # Rows whose latent was clean conditioning (s = 0) or dropped carry no latent loss.
            rows = (s > 0) & ~drop
            if rows.any():
                latent_loss = self.latent_diff.loss(out.latent.float(), z0.to(dev), eps.to(dev),
                                                    s.to(dev), row_mask=rows.to(dev))
                loss = loss + tr.latent_loss_weight * latent_loss
        n_tokens = int(valid.sum())
        return loss, {"text_loss": float(text_loss.detach()), "latent_loss": float(latent_loss.detach()),
                      "tokens": n_tokens}

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        model = self.ema.module if self.ema else self.model
        was_training = model.training
        model.eval()
        try:
            if self.synthetic:
                return self._evaluate_task(model)
            return self._evaluate_text_latent(model)
        finally:
            model.train(was_training)

    def _decode_task(self, model, batch):
        ev = self.cfg.eval
        task = self.data.task
        masked = batch.masked_input(task.mask_id)
        preds = []
        bs = self.cfg.training.eval_batch_size
        for i in range(0, masked.shape[0], bs):
            preds.append(generate_text(model, prompt_ids=masked[i:i + bs].to(self.device),
                                       steps=ev.sample_steps, threshold=ev.threshold,
                                       generator=torch.Generator().manual_seed(0)).cpu())
        return torch.cat(preds)

    def _evaluate_task(self, model) -> Dict[str, float]:
        task = self.data.task
        name = task.name
        res = task.score(self._decode_task(model, self.data.eval_set), self.data.eval_set)
        out = {f"{name}_acc": res["acc"], f"{name}_exact": res["exact"]}
        if not self.cfg.eval.fresh:
            return out
        fresh = task.sample_batch(self.data.eval_set.input_ids.shape[0],
                                  generator=torch.Generator().manual_seed(10_000 + self.global_step))
        res_fresh = task.score(self._decode_task(model, fresh), fresh)
        return dict(out, **{f"{name}_acc_fresh": res_fresh["acc"], f"{name}_exact_fresh": res_fresh["exact"]})

    def _evaluate_text_latent(self, model) -> Dict[str, float]:
        if self.data.val is None:
            return {}
        g_state = self.noise_gen.get_state()
        self.noise_gen.manual_seed(1234)  # the same noise at every evaluation
        tot = {"text_loss": 0.0, "latent_loss": 0.0}
        n = 0
        cos_sum, cos_n = 0.0, 0
        for i, batch in enumerate(self.data.val):
            if i >= self.cfg.eval.max_batches:
                break
            _, st = self.compute_loss(batch)
            tot["text_loss"] += st["text_loss"]
            tot["latent_loss"] += st["latent_loss"]
            n += 1
            if self.has_latent and i == 0:
                z = generate_latent(model, self.latent_diff, batch["input_ids"].to(self.device),
                                    steps=self.cfg.eval.latent_steps,
                                    generator=torch.Generator().manual_seed(0))
                cos = torch.nn.functional.cosine_similarity(z.float().cpu(), batch["latent"].float(), dim=-1)
                cos_sum, cos_n = cos_sum + float(cos.sum()), cos_n + cos.numel()
        self.noise_gen.set_state(g_state)
        out = {f"val_{k}": v / max(n, 1) for k, v in tot.items()}
        if cos_n:
            out["val_latent_cos"] = cos_sum / cos_n
        return out

    # ------------------------------------------------------------------ the loop

    def _handle_signal(self, signum, frame):
        print(f"\nsignal {signum}: finishing this step, saving a checkpoint, then stopping")
        self.stop_requested = True

    def _batches(self):
        """(epoch, batch) pairs from the current data position to the end of training."""
        tr = self.cfg.training
        if self.synthetic:
            for b in self.data.batches():
                yield 0, b
            return
        while tr.num_epochs is None or self.data.epoch < tr.num_epochs:
            epoch = self.data.epoch
            self._maybe_unfreeze(epoch)
            for b in self.data.train:
                yield epoch, b
            if self.cfg.logging.save_epochs:
                yield epoch, "epoch_end"

    def _maybe_unfreeze(self, epoch: int):
        at = self.cfg.training.unfreeze_backbone_at_epoch
        if at is not None and epoch >= at and not any(p.requires_grad for p in self.model.backbone.parameters()):
            self.model.set_backbone_trainable(True)
            print(f"epoch {epoch}: backbone unfrozen")

    def train(self) -> Dict[str, Any]:
        tr, lg = self.cfg.training, self.cfg.logging
        self._init_wandb()
        old_handlers = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self.model.train()
        pbar = None
        if lg.progress_bar:
            from tqdm.auto import tqdm
            pbar = tqdm(total=self.total_steps, initial=self.global_step, dynamic_ncols=True,
                        desc="train", disable=None)
        t_last = time.perf_counter()
        accum, micro = tr.grad_accum_steps, 0
        last_epoch = self.data.epoch
        stop_at = tr.get("stop_at_step")
        try:
            for epoch, batch in self._batches():
                if isinstance(batch, str):  # end of an epoch
                    self.save(ckpt.epoch_dir_name(epoch))
                    continue
                if self.total_steps is not None and self.global_step >= self.total_steps:
                    break
                loss, st = self.compute_loss(batch)
                (loss / accum).backward()
                micro += 1
                self.window["text_loss"] += st["text_loss"] / accum
                self.window["latent_loss"] += st["latent_loss"] / accum
                self.window["loss"] += float(loss.detach()) / accum
                self.window["tokens"] += st["tokens"]
                if micro < accum:
                    continue
                micro = 0
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in self.model.parameters() if p.grad is not None],
                    tr.grad_clip if tr.grad_clip else float("inf"))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                lr = self.optimizer.param_groups[0]["lr"] / self.optimizer.param_groups[0].get("lr_mult", 1.0)
                self.scheduler.step()
                if self.ema:
                    self.ema.update(self.model)
                self.global_step += 1
                self.window["n"] += 1
                last_epoch = epoch
                step = self.global_step
                done = self.total_steps is not None and step >= self.total_steps
                do_eval = lg.eval_freq and (step % lg.eval_freq == 0 or done)
                do_log = step % lg.log_freq == 0 or done or do_eval
                if do_log:
                    now = time.perf_counter()
                    w = self.window
                    rec = {"step": step, "epoch": epoch,
                           "loss": w["loss"] / max(w["n"], 1),
                           "text_loss": w["text_loss"] / max(w["n"], 1),
                           "latent_loss": w["latent_loss"] / max(w["n"], 1),
                           "lr": lr, "grad_norm": float(grad_norm),
                           "tokens_per_s": w["tokens"] / max(now - t_last, 1e-9)}
                    if do_eval:
                        ev = self.evaluate()
                        rec.update(ev)
                        self.metrics.update(ev)
                        self.metrics["step"] = step
                    self._log(rec)
                    if pbar is not None:
                        pbar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                    self.window = {"loss": 0.0, "text_loss": 0.0, "latent_loss": 0.0, "n": 0, "tokens": 0}
                    t_last = time.perf_counter()
                if pbar is not None:
                    pbar.update(1)
                if lg.save_every and step % lg.save_every == 0:
                    self.save(ckpt.step_dir_name(step))
                if self.stop_requested or (stop_at and step >= stop_at):
                    self.save(ckpt.step_dir_name(step))
                    print(f"stopped at step {step}; resume with training.resume=latest "
                          f"logging.save_dir={self.save_dir}")
                    return self.metrics
                if done:
                    break
        finally:
            if pbar is not None:
                pbar.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        if self.metrics.get("step") != self.global_step:  # not already evaluated at this step
            self.metrics.update(self.evaluate())
        self.metrics["step"] = self.global_step
        self.metrics["epoch"] = last_epoch
        tmp = self.save_dir / "metrics.json.tmp"
        tmp.write_text(json.dumps(self.metrics, indent=2))
        os.replace(tmp, self.save_dir / "metrics.json")
        if self.wandb is not None:
            self.wandb.summary.update(self.metrics)
            self.wandb.finish()
        return self.metrics
