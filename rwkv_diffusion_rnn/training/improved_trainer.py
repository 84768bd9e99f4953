"""The training loop (``improved_trainer`` is the DiffRwkv pipeline's name for it): masked diffusion on text and Gaussian diffusion on the sentence latent, or
next-token prediction (``training.objective=ar``), the baseline.

:class:`Trainer` takes a resolved config (see ``configs/rwkv_mmdit.yaml``), builds the run's parts
with :mod:`~rwkv_diffusion_rnn.training.builders` and trains them: each optimizer step
accumulates the objective's gradients (:mod:`~rwkv_diffusion_rnn.diffusion.objective`), then an
evaluation step (:mod:`~rwkv_diffusion_rnn.training.evaluation`), a logging step (the run
folder's ``train_log.jsonl``, :mod:`~rwkv_diffusion_rnn.training.run_folder`; a tqdm bar on a
terminal, plain progress lines otherwise; optional wandb, a callback) and a checkpoint step. Every run ends
with a checkpoint of its last step and ``metrics.json``. ``training.resume`` and
``training.init_from`` are read by :mod:`~rwkv_diffusion_rnn.training.resume`; callers follow a
run through the callbacks of :mod:`~rwkv_diffusion_rnn.training.events`.

Exact resume: every random draw of training comes from the streams of
:mod:`~rwkv_diffusion_rnn.common.rng`, whose states are saved in each checkpoint together with
the data position and the running log accumulators, so a resumed run logs bit-identical losses
on CPU. Evaluation draws from fixed streams of its own and never disturbs training randomness.

Under torchrun the same loop runs on every rank (:mod:`~rwkv_diffusion_rnn.training.distributed`):
each rank computes its share of every batch, the step's losses and every evaluation are summed
over the ranks, and rank 0 alone writes the log, the metrics and the unsharded checkpoint files.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from . import checkpoints as ckpt
from . import distributed, resume
from ..common import rng
from ..data.sources import data_source
from ..diffusion.diffusion_process import undecodable_noise
from .builders import (AUTOCAST_DTYPES, autocast, build_data, build_latent_diffusion, build_model, build_objective,
                       build_optimizer_and_scheduler, build_text_diffusion, resolve_device, resolve_vocab)
from .config_validation import check_stream_parallel, validate_config
from ..common.errors import ConfigError, TrainingDiverged

from .ema import EMA
from .evaluation import EvalSettings, Evaluator
from .events import Callback, ProgressLines, WandbLog, output_is_terminal
from .run_folder import RunFolder, json_safe
from .run_folder import read_train_log  # noqa: F401  (scripts and tests import it from here)


def _empty_window() -> Dict[str, float]:
    """Running sums of the steps since the last log record (``skipped``: non-finite steps)."""
    return {"loss": 0.0, "text_loss": 0.0, "latent_loss": 0.0, "n": 0, "tokens": 0, "skipped": 0}


class Trainer:
    """``Trainer(cfg).train()``; ``callbacks`` (:class:`~rwkv_diffusion_rnn.training.events.Callback`)
    follow the run on the process that writes its folder."""

    def __init__(self, cfg: DictConfig, callbacks: Sequence[Callback] = ()):
        validate_config(cfg)
        self.cfg = cfg
        tr = cfg.training
        self.dist, self.device = distributed.setup(tr.parallel, resolve_device(tr.device), int(tr.train_batch_size))
        # Each rank may have resolved Hydra's timestamped folder at another second: rank 0's counts.
        self.save_dir = Path(self.dist.broadcast(str(cfg.logging.save_dir)))
        self.save_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(rng.seed_of("init", cfg.seed))

        self.source = data_source(cfg.data.kind)      # what the data is: epochs or a stream, scored how
        # training.init_from starts a new run from a checkpoint's weights (a resumed run already
        # holds them): its data is read with the checkpoint's tokenizer, so that ids mean the same
        self.init_path = None if tr.resume or not tr.init_from else resume.init_source(tr.init_from)
        with self.dist.first_main():        # rank 0 fills the token cache, the others read it
            self.data = build_data(cfg, tokenizer=self.init_path and resume.init_tokenizer(
                self.init_path, cfg.tokenizer.name))
        resolve_vocab(cfg, self.data)       # vocab_size / mask_id follow the tokenizer
        check_vocab = getattr(self.data, "check_vocab", None)
        if check_vocab is not None:         # token files on disk: ids checked against the vocabulary
            check_vocab(int(cfg.model.vocab_size), int(cfg.model.mask_id))
        self.tokenizer = getattr(self.data, "tokenizer", None)
        self.model = build_model(cfg).to(self.device)
        self.model.set_grad_checkpointing(bool(tr.grad_checkpointing))
        self.text_diff = build_text_diffusion(cfg)
        self.latent_diff = build_latent_diffusion(cfg)
        self.has_latent = cfg.model.latent_prefix_len > 0
        self.objective = build_objective(cfg, self.text_diff, self.latent_diff)
        self.total_steps = self._total_steps()
        self.ema = EMA(self.model, tr.ema_decay) if tr.ema_decay else None
        if self.init_path is not None:
            self._print(resume.init_weights(self.init_path, model=self.model, ema=self.ema and self.ema.module,
                                            model_config=OmegaConf.to_container(cfg.model, resolve=True)))
        self._check_parallel()
        # The module the loss runs (DDP's wrapper, or the model sharded in place by FSDP); the
        # optimizer is built after it, on the parameters FSDP put in place.
        self.net = self.dist.wrap(self.model, AUTOCAST_DTYPES[tr.dtype])
        if self.ema is not None and self.dist.mode == "fsdp":
            distributed.shard(self.ema.module, AUTOCAST_DTYPES[tr.dtype])
        self.optimizer, self.scheduler = build_optimizer_and_scheduler(cfg, self.model, self.total_steps)
        # fp16's narrow range: the loss is scaled up for the backward, the gradients down before
        # clipping, and the scale follows overflows (its state goes into the checkpoint)
        self.scaler = torch.amp.GradScaler(self.device.type) if tr.dtype == "fp16" else None
        self.noise_gen = rng.generator("noise", cfg.seed)
        ev = cfg.eval
        self.evaluator = Evaluator(
            data=self.data, settings=EvalSettings(
                batch_size=int(tr.eval_batch_size), max_batches=ev.max_batches, mc_samples=ev.mc_samples,
                sample_steps=ev.sample_steps, threshold=ev.threshold, latent_steps=ev.latent_steps,
                fresh=bool(ev.fresh)),
            by_task=not self.source.likelihood, objective=tr.objective, loss=self.objective,
            schedule=self.text_diff.schedule, latent_diff=self.latent_diff, mask_id=cfg.model.mask_id,
            vocab_size=cfg.model.vocab_size, tokenizer=self.tokenizer, has_latent=self.has_latent,
            device=self.device, autocast=self._autocast, dist=self.dist,
            bound=undecodable_noise(cfg.text_noise.noise_type) is None)
        # a bar cannot redraw in a file or CI log: one plain line per log record there instead
        self.callbacks = ([] if output_is_terminal() else [ProgressLines()]) + list(callbacks)
        if cfg.logging.wandb:
            self.callbacks.append(WandbLog(cfg.logging.wandb_project, cfg.logging.wandb_mode))

        self.global_step = 0
        self.saved_step = None            # the step of the newest checkpoint of this run
        self.metrics: Dict[str, Any] = {}
        self.window = _empty_window()
        self.bad_steps = 0                # consecutive steps skipped for a non-finite loss / gradient
        self.pending_record = None        # the last step's log record, written after its evaluation
        self.folder = RunFolder(self.save_dir)  # its lock and files are rank 0's
        self.stop_requested = False
        self.resumed_from = None
        self.config_changes = []          # settings changed on a resume: key, was, now, from which step
        self._t_window = time.perf_counter()  # start of the steps the next log record sums up
        self._bad = ""                    # what made the last skipped step non-finite
        if tr.resume:
            self._resume(tr.resume)
        self._set_step()
        self.config_dict = OmegaConf.to_container(cfg, resolve=True)

    def _check_parallel(self):
        tr, mode = self.cfg.training, self.dist.mode
        if mode == "fsdp" and self.cfg.optimizer.name == "muon":
            raise ConfigError("optimizer=muon orthogonalises whole weight matrices, which training.parallel=fsdp "
                              "splits over the ranks; use optimizer=adamw with fsdp, or training.parallel=ddp")
        if mode == "fsdp" and tr.unfreeze_backbone_at_epoch is not None:
            raise ConfigError("training.unfreeze_backbone_at_epoch changes which weights train in the middle of "
                              "a run, which training.parallel=fsdp cannot follow; use training.parallel=ddp, or "
                              "set model.freeze_backbone=false from the start")
        check_stream_parallel(self.cfg.data, mode)      # the mode training.parallel=auto resolved to

    def _print(self, *args, **kwargs):
        if self.dist.main:
            print(*args, **kwargs)

    # ------------------------------------------------------------------ bookkeeping

    def _total_steps(self) -> Optional[int]:
        tr = self.cfg.training
        if tr.max_steps:
            return int(tr.max_steps)
        if self.source.endless:
            return None
        per_epoch = math.ceil(len(self.data.train) / tr.grad_accum_steps)
        return per_epoch * int(tr.num_epochs)

    def _trainer_state(self) -> Dict[str, Any]:
        data_state, _ = self.data.state()
        state = {"global_step": self.global_step, "epoch": self.data.epoch, "data": data_state,
                 "window": dict(self.window), "metrics": json_safe(self.metrics), "bad_steps": self.bad_steps,
                 "backbone_trainable": any(p.requires_grad for p in self.model.backbone.parameters()),
                 "world_size": self.dist.world, "parallel": self.dist.mode}
        if self.pending_record is not None:
            state["pending_record"] = json_safe(self.pending_record)
        if self.config_changes:
            state["config_changes"] = json_safe(self.config_changes)
        if self.scaler:
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def save(self, name: str) -> Path:
        _, tensors = self.data.state()
        tensors = dict(tensors, noise_rng=self.noise_gen.get_state())
        carry = getattr(self.objective, "carry", None)
        if carry is not None:
            tensors.update(carry.tensors())
        if self.dist.world > 1:             # every rank's own stream, in rank order
            tensors["rank_noise_rng"] = torch.stack(self.dist.gather(self.noise_gen.get_state()))
        ema = self.ema.module if self.ema else None
        parts = dict(model=self.model, optimizer=self.optimizer, ema=ema)
        sharded = None
        if self.dist.mode == "fsdp":
            sharded = ckpt.save_shards(self.save_dir, name, self.dist, **parts)
            parts = dict(model=None, optimizer=None, ema=None)
        path = self.dist.on_main(lambda: ckpt.save_checkpoint(
            self.save_dir, name, **parts, scheduler=self.scheduler, sharded=sharded,
            trainer_state=self._trainer_state(), extra_tensors=tensors, config=self.config_dict,
            tokenizer=self._tokenizer_spec(), keep_last=self.cfg.logging.keep_last))
        self.saved_step = self.global_step
        self._emit("on_save", Path(path))
        return Path(path)

    def _tokenizer_spec(self) -> Optional[Dict[str, Any]]:
        from ..data.tokenizer import tokenizer_spec
        return None if self.tokenizer is None else tokenizer_spec(self.tokenizer)

    def _resume(self, source: str):
        path = ckpt.resolve_resume(str(source), self.save_dir)
        changes = resume.check_resumable(path, config=OmegaConf.to_container(self.cfg, resolve=True),
                                         tokenizer=self._tokenizer_spec(), world=self.dist.world,
                                         parallel=self.dist.mode,
                                         any_world_size=bool(self.cfg.training.resume_any_world_size))
        state = resume.restore(source, path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                               ema=self.ema.module if self.ema else None, data=self.data,
                               noise_gen=self.noise_gen, rank=self.dist.rank, world=self.dist.world,
                               carry=getattr(self.objective, "carry", None))
        if state.get("backbone_trainable"):
            self.model.set_backbone_trainable(True)
        self.global_step = self.saved_step = int(state["global_step"])
        self.window = dict(_empty_window(), **state.get("window", {}))
        self.metrics = state.get("metrics", {})
        self.bad_steps = int(state.get("bad_steps", 0))
        if self.scaler and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.pending_record = state.get("pending_record")
        self.resumed_from = path
        self._print(f"resumed from {path} at step {self.global_step}")
        # a setting changed on resume takes effect from here; the record says what ran before it
        self.config_changes = list(state.get("config_changes", [])) + [
            {"from_step": self.global_step, "key": k, "was": was, "now": now} for k, was, now in changes]
        for k, was, now in changes:
            self._print(f"  {k}: {was!r} until step {self.global_step}, {now!r} from here")

    def _claim_save_dir(self):
        """Takes the run folder (:meth:`RunFolder.claim`). Rank 0's work: the lock and the log are its files."""
        kept = self.folder.claim(self.global_step if self.resumed_from is not None else None)
        if self.pending_record is not None and self.pending_record.get("step") in kept:
            self.pending_record = None      # the final record was written before the run ended

    def _log(self, record: Dict[str, Any]):
        if not self.dist.main:
            return
        self._emit("on_record", self.folder.append_record(record))

    def _emit(self, event: str, *args) -> None:
        """Calls ``event`` of every callback, on rank 0 (the process that writes the run folder)."""
        if self.dist.main:
            for callback in self.callbacks:
                getattr(callback, event)(self, *args)

    # ------------------------------------------------------------------ one step

    def _autocast(self):
        return autocast(self.device, self.cfg.training.dtype)

    def compute_loss(self, batch: Dict[str, torch.Tensor], generator: Optional[torch.Generator] = None):
        """The objective on one batch: ``(loss, stats)``; draws from the training noise stream
        unless a ``generator`` is given. Under torchrun: this rank's share of the batch's loss."""
        rows = self.dist.rows(batch["input_ids"].shape[0]) if self.dist.active else None
        return self.objective(self.net, batch, self.noise_gen if generator is None else generator,
                              self.device, self._autocast, rows=rows)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> Dict[str, float]:
        """The metrics of the model (its EMA when kept) at this step."""
        return self.evaluator.evaluate(self.ema.module if self.ema else self.model, self.global_step)

    def _evaluate_now(self) -> Dict[str, float]:
        """Evaluates this step into ``metrics`` and tells the callbacks."""
        ev = self.evaluate()
        self.metrics.update(ev)
        self.metrics["step"] = self.global_step
        self._emit("on_evaluation", ev)
        return ev

    # ------------------------------------------------------------------ the loop

    def _handle_signal(self, signum, frame):
        self._print(f"\nsignal {signum}: finishing this step, saving a checkpoint, then stopping")
        self.stop_requested = True

    def _maybe_unfreeze(self, epoch: int):
        at = self.cfg.training.unfreeze_backbone_at_epoch
        if at is not None and epoch >= at and not any(p.requires_grad for p in self.model.backbone.parameters()):
            self.model.set_backbone_trainable(True)
            if self.dist.mode == "ddp":     # DDP reduces the gradients of the weights trained when it was built
                self.net = self.dist.wrap(self.model)
            self._print(f"epoch {epoch}: backbone unfrozen")

    def _done(self) -> bool:
        tr = self.cfg.training
        if self.total_steps is not None and self.global_step >= self.total_steps:
            return True
        return not self.source.endless and tr.num_epochs is not None and self.data.epoch >= tr.num_epochs

    def _accumulate(self, batch, step_sums: Dict[str, float], last: bool = True) -> None:
        """Forward and backward of one micro-batch; its losses go into this step's sums. Only
        the ``last`` micro-batch of a step reduces gradients across ranks. DDP and FSDP average
        the ranks' gradients, and a rank's loss is its share of the batch's: hence ``* world``."""
        accum = self.cfg.training.grad_accum_steps
        with self.dist.no_sync(self.net, last):
            loss, st = self.compute_loss(batch)
            scaled = loss * self.dist.world / accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        step_sums["text_loss"] += st["text_loss"] / accum
        step_sums["latent_loss"] += st["latent_loss"] / accum
        step_sums["loss"] += float(loss.detach()) / accum
        step_sums["tokens"] += st["tokens"]

    def _set_step(self) -> None:
        """The models follow the training step (an annealed reading: models/mixers/bi.py)."""
        for model in (self.model, self.ema.module if self.ema else None):
            if model is not None:
                model.set_training_step(self.global_step)

    def _optimizer_step(self, step_sums: Dict[str, float]):
        """Clip, step the optimizer, LR schedule and EMA. Returns (grad norm, LR of the step).

        A step whose loss or gradient norm is not finite changes no weight, optimizer moment or
        EMA (the LR schedule still advances, so it stays a function of the step); more than
        ``training.max_bad_steps`` of them in a row stop the run (:class:`TrainingDiverged`)."""
        clip = self.cfg.training.grad_clip
        if self.dist.active:                # this rank's shares of the batch's losses -> the batch's
            keys = ("loss", "text_loss", "latent_loss", "tokens")
            step_sums.update(zip(keys, self.dist.sum(step_sums[k] for k in keys)))
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.grad is not None], clip if clip else float("inf"))
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)   # FSDP: a DTensor
        finite = math.isfinite(step_sums["loss"]) and math.isfinite(grad_norm)
        if self.scaler:
            # an fp16 overflow with a finite loss is the scaler's to handle (it skips the update
            # and lowers the scale), not a step towards divergence
            self.scaler.step(self.optimizer)
            self.scaler.update()
            finite = math.isfinite(step_sums["loss"])
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        g0 = self.optimizer.param_groups[0]
        lr = g0["lr"] / g0.get("lr_mult", 1.0)
        self.scheduler.step()
        if finite and self.ema:
            self.ema.update(self.model)
        self.global_step += 1
        self._set_step()
        if finite:
            self.bad_steps = 0
            for key in ("loss", "text_loss", "latent_loss", "tokens"):
                self.window[key] += step_sums[key]
            self.window["n"] += 1
        else:
            self.bad_steps += 1
            self.window["skipped"] += 1
            self._bad = f"loss {step_sums['loss']}, gradient norm {grad_norm}"
            if not self._diverged():
                self._print(f"step {self.global_step}: {self._bad}: the update is skipped ({self.bad_steps} in a "
                            f"row; training.max_bad_steps={self.cfg.training.max_bad_steps})")
        return grad_norm, lr

    def _diverged(self) -> bool:
        return self.bad_steps > self.cfg.training.max_bad_steps

    def _stop_diverged(self):
        limit = self.cfg.training.max_bad_steps
        last = ckpt.latest_checkpoint(self.save_dir)
        good = (f"the last checkpoint, {last}, holds finite weights: resume from it with "
                f"training.resume={last}" if last else "no checkpoint was written before")
        raise TrainingDiverged(
            f"training diverged at step {self.global_step}: {self._bad}, {self.bad_steps} steps in a row "
            f"(more than training.max_bad_steps={limit}); {good} and a lower optimizer.lr, a "
            "training.grad_clip, or fp32 (training.dtype). No checkpoint was written from these weights.")

    def _eval_step(self) -> Dict[str, float]:
        """Evaluates when ``logging.eval_freq`` (or the last step) says so; {} otherwise."""
        lg, step = self.cfg.logging, self.global_step
        if not lg.eval_freq or step % lg.eval_freq or self._done():
            return {}  # the last step is evaluated by _finish, after its checkpoint
        return self._evaluate_now()

    def _log_step(self, epoch: int, grad_norm: float, lr: float, evals: Dict[str, float], pbar) -> None:
        """Writes a record of the window when ``logging.log_freq``, an evaluation or the last step says so."""
        step = self.global_step
        if pbar is not None:
            pbar.update(1)
        if not (step % self.cfg.logging.log_freq == 0 or evals or self._done() or self._diverged()):
            return
        now = time.perf_counter()
        w, n = self.window, max(self.window["n"], 1)
        rec = {"step": step, "epoch": epoch, "loss": w["loss"] / n if w["n"] else None,
               "text_loss": w["text_loss"] / n if w["n"] else None,
               "latent_loss": w["latent_loss"] / n if w["n"] else None, "lr": lr, "grad_norm": grad_norm,
               "tokens_per_s": w["tokens"] / max(now - self._t_window, 1e-9), **evals}
        if w["skipped"]:
            rec["skipped_steps"] = w["skipped"]
        if self._done() and not self._diverged():
            self.pending_record = rec       # written by _finish with the final evaluation
        else:
            self._log(rec)
        if pbar is not None and rec["loss"] is not None:
            pbar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        self.window = _empty_window()
        self._t_window = time.perf_counter()

    def _can_save_periodic(self) -> bool:
        """No periodic checkpoint while steps are being skipped: its weights give non-finite
        losses, and with logging.keep_last it would push out the last good checkpoint."""
        if self.bad_steps:
            self._print(f"step {self.global_step}: checkpoint not written ({self.bad_steps} non-finite steps in a row)")
        return not self.bad_steps

    def _save_step(self) -> bool:
        """Checkpoints due after a step: every ``logging.save_every`` steps, and on a requested
        stop. True when the run should stop."""
        lg, step = self.cfg.logging, self.global_step
        stop_at = self.cfg.training.stop_at_step
        # a signal may reach the ranks at different steps: all stop at the first rank's
        stop = self.dist.any(self.stop_requested) or bool(stop_at and step >= stop_at)
        if (lg.save_every and step % lg.save_every == 0 and self._can_save_periodic()) or stop:
            self.save(ckpt.step_dir_name(step))
        if stop:
            self._print(f"stopped at step {step}; resume with training.resume=latest logging.save_dir={self.save_dir}")
        return stop

    def train(self) -> Dict[str, Any]:
        """Trains to ``training.max_steps`` / ``num_epochs``; returns the final metrics."""
        self.dist.on_main(self._claim_save_dir)
        # rank 0 may have found the last record already in the log: every rank follows it
        self.pending_record = self.dist.broadcast(self.pending_record)
        try:
            metrics = self._train()
        finally:
            if self.dist.main:
                self.folder.release()
        self._emit("on_end", metrics)
        return metrics

    def _train(self) -> Dict[str, Any]:
        tr, lg = self.cfg.training, self.cfg.logging
        self._emit("on_begin")
        if self.pending_record is not None and not self._done():
            # resumed from a finished run's last checkpoint to train further: its record first
            self._write_pending_record()
        old_handlers = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self.model.train()
        pbar = None
        if lg.progress_bar and self.dist.main:
            from tqdm.auto import tqdm
            pbar = tqdm(total=self.total_steps, initial=self.global_step, dynamic_ncols=True,
                        desc="train", disable=None)
        self._t_window = time.perf_counter()
        micro, epoch = 0, self.data.epoch
        try:
            while not self._done():
                epoch = self.data.epoch
                self._maybe_unfreeze(epoch)
                step_sums = _empty_window()
                for batch in self.data.epoch_batches():
                    self._accumulate(batch, step_sums, last=micro + 1 == tr.grad_accum_steps)
                    micro += 1
                    if micro < tr.grad_accum_steps:
                        continue
                    micro = 0
                    grad_norm, lr = self._optimizer_step(step_sums)
                    step_sums = _empty_window()
                    evals = self._eval_step()
                    self._log_step(epoch, grad_norm, lr, evals, pbar)
                    if self._diverged():
                        self._stop_diverged()
                    if self._save_step():
                        return self.metrics
                    if self._done():
                        break
                epoch_finished = self.data.epoch != epoch or self.data.at_epoch_end
                if epoch_finished and lg.save_epochs and self._can_save_periodic():
                    self.save(ckpt.epoch_dir_name(epoch))
        finally:
            if pbar is not None:
                pbar.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        return self._finish(epoch)

    def _write_pending_record(self) -> None:
        """The last step's log record, with the evaluation of that step."""
        if self.metrics.get("step") != self.global_step:
            self._evaluate_now()
        evals = {k: v for k, v in self.metrics.items() if k not in ("step", "epoch")}
        self._log(dict(self.pending_record, **evals))
        self.pending_record = None

    def _finish(self, epoch: int) -> Dict[str, Any]:
        """The checkpoint of the last step, then the last evaluation (so that an evaluation that
        fails loses no training), the last log record and ``metrics.json``."""
        if self.global_step and self.saved_step != self.global_step:
            self.save(ckpt.step_dir_name(self.global_step))
        if self.metrics.get("step") != self.global_step:  # not already evaluated at this step
            self._evaluate_now()
        self.metrics["step"] = self.global_step
        self.metrics["epoch"] = epoch
        if self.pending_record is not None:
            self._write_pending_record()
        if self.dist.main:
            self.folder.write_metrics(self.metrics)
        return self.metrics
