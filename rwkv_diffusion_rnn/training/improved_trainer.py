"""The training loop: masked diffusion on text and Gaussian diffusion on the sentence latent, or
next-token prediction (``training.objective=ar``), the baseline.

:class:`Trainer` takes a resolved config (see ``configs/rwkv_mmdit.yaml``), builds the run's parts
with :mod:`~rwkv_diffusion_rnn.training.builders` and trains them: each optimizer step
accumulates the objective's gradients (:mod:`~rwkv_diffusion_rnn.diffusion.objective`), then a
logging step (``train_log.jsonl``, tqdm, optional wandb), an evaluation step and a checkpoint
step. Every run ends with a checkpoint of its last step and ``metrics.json``.

Exact resume: every random draw of training comes from the streams of
:mod:`~rwkv_diffusion_rnn.training.rng`, whose states are saved in each checkpoint together with
the data position and the running log accumulators, so a resumed run logs bit-identical losses
on CPU. Evaluation draws from fixed streams of its own and never disturbs training randomness.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from ..diffusion.sampling import generate_latent, generate_text
from . import checkpoints as ckpt
from . import likelihood, rng
from .builders import (autocast, build_data, build_latent_diffusion, build_model, build_objective,
                       build_optimizer_and_scheduler, build_text_diffusion, resolve_device, resolve_vocab)
from .config_validation import validate_config
from .ema import EMA


LOG_FILE = "train_log.jsonl"


def read_train_log(save_dir) -> List[Dict[str, Any]]:
    """The records of ``<save_dir>/train_log.jsonl``, one dict per logged step ([] if none)."""
    log = Path(save_dir) / LOG_FILE
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def _empty_window() -> Dict[str, float]:
    """Running sums of the steps since the last log record."""
    return {"loss": 0.0, "text_loss": 0.0, "latent_loss": 0.0, "n": 0, "tokens": 0}


class Trainer:
    def __init__(self, cfg: DictConfig):
        validate_config(cfg)
        self.cfg = cfg
        tr = cfg.training
        self.save_dir = Path(cfg.logging.save_dir)
        self.save_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(rng.seed_of("init", cfg.seed))
        self.device = resolve_device(tr.device)

        self.synthetic = cfg.data.kind == "synthetic"
        self.data = build_data(cfg)
        resolve_vocab(cfg, self.data)       # vocab_size / mask_id follow the tokenizer
        self.tokenizer = getattr(self.data, "tokenizer", None)
        self.model = build_model(cfg).to(self.device)
        self.text_diff = build_text_diffusion(cfg)
        self.latent_diff = build_latent_diffusion(cfg)
        self.has_latent = cfg.model.latent_prefix_len > 0
        self.objective = build_objective(cfg, self.text_diff, self.latent_diff)
        self.total_steps = self._total_steps()
        self.optimizer, self.scheduler = build_optimizer_and_scheduler(cfg, self.model, self.total_steps)
        self.ema = EMA(self.model, tr.ema_decay) if tr.ema_decay else None
        self.noise_gen = rng.generator("noise", cfg.seed)

        self.global_step = 0
        self.saved_step = None            # the step of the newest checkpoint of this run
        self.metrics: Dict[str, Any] = {}
        self.window = _empty_window()
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
        path = ckpt.save_checkpoint(
            self.save_dir, name, model=self.model, optimizer=self.optimizer,
            scheduler=self.scheduler, ema=self.ema.module if self.ema else None,
            trainer_state=self._trainer_state(), extra_tensors=tensors, config=self.config_dict,
            tokenizer=self._tokenizer_spec(), keep_last=self.cfg.logging.keep_last)
        self.saved_step = self.global_step
        return path

    def _tokenizer_spec(self) -> Optional[Dict[str, Any]]:
        from ..data.tokenizer import tokenizer_spec
        return None if self.tokenizer is None else tokenizer_spec(self.tokenizer)

    def _resume(self, resume: str):
        path = ckpt.resolve_resume(str(resume), self.save_dir)
        saved_cfg_path = path / "config.yaml"
        if saved_cfg_path.exists():
            saved = OmegaConf.to_container(OmegaConf.load(saved_cfg_path), resolve=False)
            current = OmegaConf.to_container(self.cfg, resolve=False)
            ckpt.check_config_compatible(saved, current, keys=("model",))
        saved_tok, tok = ckpt.read_tokenizer_spec(path), self._tokenizer_spec()
        if saved_tok is not None and saved_tok != tok:
            raise ckpt.CheckpointError(
                f"{path / ckpt.TOKENIZER_FILE} holds another tokenizer than this run's ({saved_tok.get('name')!r}, "
                f"{saved_tok.get('vocab_size')} ids, against {tok and tok.get('name')!r}, "
                f"{tok and tok.get('vocab_size')} ids; a chars vocabulary follows the corpus): resume with the "
                "data and tokenizer the checkpoint was trained on, or start a new run in another logging.save_dir")
        state, tensors = ckpt.load_checkpoint(path, model=self.model, optimizer=self.optimizer,
                                              scheduler=self.scheduler,
                                              ema=self.ema.module if self.ema else None)
        if state.get("backbone_trainable"):
            self.model.set_backbone_trainable(True)
        self.global_step = self.saved_step = int(state["global_step"])
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
        return autocast(self.device, self.cfg.training.dtype)

    def compute_loss(self, batch: Dict[str, torch.Tensor], generator: Optional[torch.Generator] = None):
        """The objective on one batch: ``(loss, stats)``; draws from the training noise stream
        unless a ``generator`` is given."""
        return self.objective(self.model, batch, self.noise_gen if generator is None else generator,
                              self.device, self._autocast)

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
        masked = batch.masked_input(self.data.task.mask_id)
        preds = []
        bs = self.cfg.training.eval_batch_size
        for i in range(0, masked.shape[0], bs):
            preds.append(generate_text(model, prompt_ids=masked[i:i + bs].to(self.device),
                                       steps=ev.sample_steps, threshold=ev.threshold,
                                       generator=rng.generator("eval_sampling")).cpu())
        return torch.cat(preds)

    def _evaluate_task(self, model) -> Dict[str, float]:
        task = self.data.task
        name = task.name
        res = task.score(self._decode_task(model, self.data.eval_set), self.data.eval_set)
        out = {f"{name}_acc": res["acc"], f"{name}_exact": res["exact"]}
        if not self.cfg.eval.fresh:
            return out
        fresh = task.sample_batch(self.data.eval_set.input_ids.shape[0],
                                  generator=rng.generator("eval_fresh", offset=self.global_step))
        res_fresh = task.score(self._decode_task(model, fresh), fresh)
        return dict(out, **{f"{name}_acc_fresh": res_fresh["acc"], f"{name}_exact_fresh": res_fresh["exact"]})

    def likelihood(self, model, latent: str = "clean") -> "likelihood.LikelihoodSummary":
        """The bound (diffusion) or NLL (ar) of the validation split, with the same noise every time."""
        ev = self.cfg.eval
        return likelihood.score(model, self.data.val, objective=self.cfg.training.objective,
                                schedule=self.text_diff.schedule, mask_id=self.cfg.model.mask_id,
                                vocab_size=self.cfg.model.vocab_size,
                                generator=rng.generator("eval_noise"), mc_samples=ev.mc_samples,
                                max_batches=ev.max_batches, tokenizer=self.tokenizer, latent=latent,
                                device=self.device, autocast=self._autocast)

    def _evaluate_text_latent(self, model) -> Dict[str, float]:
        if self.data.val is None:
            return {}
        if self.cfg.training.objective == "ar":
            nll = self.likelihood(model)
            return {"val_nll": nll.nats_per_token, **({"val_bpc": nll.bits_per_char} if nll.chars else {})}
        bound = self.likelihood(model)
        out = {"val_nelbo": bound.nats_per_token, "val_nelbo_stderr": bound.stderr}
        if bound.chars:
            out["val_bpc"] = bound.bits_per_char
        if self.has_latent:
            out["val_nelbo_null_latent"] = self.likelihood(model, latent="null").nats_per_token
        g = rng.generator("eval_noise")  # the same noise at every evaluation
        tot = {"text_loss": 0.0, "latent_loss": 0.0}
        n = 0
        cos_sum, cos_n = 0.0, 0
        for i, batch in enumerate(self.data.val):
            if self.cfg.eval.max_batches is not None and i >= self.cfg.eval.max_batches:
                break
            _, st = self.objective(model, batch, g, self.device, self._autocast)
            tot["text_loss"] += st["text_loss"]
            tot["latent_loss"] += st["latent_loss"]
            n += 1
            if self.has_latent and i == 0:
                z = generate_latent(model, self.latent_diff, batch["input_ids"].to(self.device),
                                    steps=self.cfg.eval.latent_steps, generator=rng.generator("eval_sampling"))
                cos = torch.nn.functional.cosine_similarity(z.float().cpu(), batch["latent"].float(), dim=-1)
                cos_sum, cos_n = cos_sum + float(cos.sum()), cos_n + cos.numel()
        out.update({f"val_{k}": v / max(n, 1) for k, v in tot.items()})
        if cos_n:
            out["val_latent_cos"] = cos_sum / cos_n
        return out

    # ------------------------------------------------------------------ the loop

    def _handle_signal(self, signum, frame):
        print(f"\nsignal {signum}: finishing this step, saving a checkpoint, then stopping")
        self.stop_requested = True

    def _maybe_unfreeze(self, epoch: int):
        at = self.cfg.training.unfreeze_backbone_at_epoch
        if at is not None and epoch >= at and not any(p.requires_grad for p in self.model.backbone.parameters()):
            self.model.set_backbone_trainable(True)
            print(f"epoch {epoch}: backbone unfrozen")

    def _done(self) -> bool:
        tr = self.cfg.training
        if self.total_steps is not None and self.global_step >= self.total_steps:
            return True
        return not self.synthetic and tr.num_epochs is not None and self.data.epoch >= tr.num_epochs

    def _accumulate(self, batch) -> None:
        """Forward and backward of one micro-batch; its losses go into the log window."""
        accum = self.cfg.training.grad_accum_steps
        loss, st = self.compute_loss(batch)
        (loss / accum).backward()
        w = self.window
        w["text_loss"] += st["text_loss"] / accum
        w["latent_loss"] += st["latent_loss"] / accum
        w["loss"] += float(loss.detach()) / accum
        w["tokens"] += st["tokens"]

    def _optimizer_step(self):
        """Clip, step the optimizer, LR schedule and EMA. Returns (grad norm, LR of the step)."""
        clip = self.cfg.training.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.grad is not None], clip if clip else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        g0 = self.optimizer.param_groups[0]
        lr = g0["lr"] / g0.get("lr_mult", 1.0)
        self.scheduler.step()
        if self.ema:
            self.ema.update(self.model)
        self.global_step += 1
        self.window["n"] += 1
        return float(grad_norm), lr

    def _eval_step(self) -> Dict[str, float]:
        """Evaluates when ``logging.eval_freq`` (or the last step) says so; {} otherwise."""
        lg, step = self.cfg.logging, self.global_step
        if not lg.eval_freq or not (step % lg.eval_freq == 0 or self._done()):
            return {}
        ev = self.evaluate()
        self.metrics.update(ev)
        self.metrics["step"] = step
        return ev

    def _log_step(self, epoch: int, grad_norm: float, lr: float, evals: Dict[str, float], pbar) -> None:
        """Writes a record of the window when ``logging.log_freq``, an evaluation or the last step says so."""
        step = self.global_step
        if pbar is not None:
            pbar.update(1)
        if not (step % self.cfg.logging.log_freq == 0 or evals or self._done()):
            return
        now = time.perf_counter()
        w, n = self.window, max(self.window["n"], 1)
        rec = {"step": step, "epoch": epoch, "loss": w["loss"] / n, "text_loss": w["text_loss"] / n,
               "latent_loss": w["latent_loss"] / n, "lr": lr, "grad_norm": grad_norm,
               "tokens_per_s": w["tokens"] / max(now - self._t_window, 1e-9), **evals}
        self._log(rec)
        if pbar is not None:
            pbar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        self.window = _empty_window()
        self._t_window = time.perf_counter()

    def _save_step(self) -> bool:
        """Checkpoints due after a step: every ``logging.save_every`` steps, and on a requested
        stop. True when the run should stop."""
        lg, step = self.cfg.logging, self.global_step
        stop_at = self.cfg.training.get("stop_at_step")
        stop = self.stop_requested or bool(stop_at and step >= stop_at)
        if (lg.save_every and step % lg.save_every == 0) or stop:
            self.save(ckpt.step_dir_name(step))
        if stop:
            print(f"stopped at step {step}; resume with training.resume=latest logging.save_dir={self.save_dir}")
        return stop

    def train(self) -> Dict[str, Any]:
        """Trains to ``training.max_steps`` / ``num_epochs``; returns the final metrics."""
        tr, lg = self.cfg.training, self.cfg.logging
        self._init_wandb()
        old_handlers = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self.model.train()
        pbar = None
        if lg.progress_bar:
            from tqdm.auto import tqdm
            pbar = tqdm(total=self.total_steps, initial=self.global_step, dynamic_ncols=True,
                        desc="train", disable=None)
        self._t_window = time.perf_counter()
        micro, epoch = 0, self.data.epoch
        try:
            while not self._done():
                epoch = self.data.epoch
                self._maybe_unfreeze(epoch)
                for batch in self.data.epoch_batches():
                    self._accumulate(batch)
                    micro += 1
                    if micro < tr.grad_accum_steps:
                        continue
                    micro = 0
                    grad_norm, lr = self._optimizer_step()
                    evals = self._eval_step()
                    self._log_step(epoch, grad_norm, lr, evals, pbar)
                    if self._save_step():
                        return self.metrics
                    if self._done():
                        break
                epoch_finished = self.data.epoch != epoch or self.data.at_epoch_end
                if epoch_finished and lg.save_epochs:
                    self.save(ckpt.epoch_dir_name(epoch))
        finally:
            if pbar is not None:
                pbar.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        return self._finish(epoch)

    def _finish(self, epoch: int) -> Dict[str, Any]:
        """The last evaluation, the checkpoint of the last step, and ``metrics.json``."""
        if self.metrics.get("step") != self.global_step:  # not already evaluated at this step
            self.metrics.update(self.evaluate())
        self.metrics["step"] = self.global_step
        self.metrics["epoch"] = epoch
        if self.global_step and self.saved_step != self.global_step:
            self.save(ckpt.step_dir_name(self.global_step))
        tmp = self.save_dir / "metrics.json.tmp"
        tmp.write_text(json.dumps(self.metrics, indent=2))
        os.replace(tmp, self.save_dir / "metrics.json")
        if self.wandb is not None:
            self.wandb.summary.update(self.metrics)
            self.wandb.finish()
        return self.metrics
