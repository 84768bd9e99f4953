"""The training loop: masked diffusion on text and Gaussian diffusion on the sentence latent, or
next-token prediction (``training.objective=ar``), the baseline.

:class:`Trainer` takes a resolved config (see ``configs/rwkv_mmdit.yaml``), builds the run's parts
with :mod:`~rwkv_diffusion_rnn.training.builders` and trains them: each optimizer step
accumulates the objective's gradients (:mod:`~rwkv_diffusion_rnn.diffusion.objective`), then a
logging step (``train_log.jsonl``, tqdm, optional wandb), an evaluation step and a checkpoint
step. Every run ends with a checkpoint of its last step and ``metrics.json``.

Exact resume: every random draw of training comes from the streams of
:mod:`~rwkv_diffusion_rnn.common.rng`, whose states are saved in each checkpoint together with
the data position and the running log accumulators, so a resumed run logs bit-identical losses
on CPU. Evaluation draws from fixed streams of its own and never disturbs training randomness.

Under torchrun the same loop runs on every rank (:mod:`~rwkv_diffusion_rnn.training.distributed`):
each rank computes its share of every batch, the step's losses and every evaluation are summed
over the ranks, and rank 0 alone writes the log, the metrics and the unsharded checkpoint files.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from ..diffusion.sampling import generate_latent, generate_text
from . import checkpoints as ckpt
from . import distributed, likelihood
from ..common import rng
from .builders import (AUTOCAST_DTYPES, autocast, build_data, build_latent_diffusion, build_model, build_objective,
                       build_optimizer_and_scheduler, build_text_diffusion, resolve_device, resolve_vocab)
from .config_validation import validate_config
from ..common.errors import ConfigError, TrainingDiverged

from .ema import EMA
from .run_lock import RunLock


LOG_FILE = "train_log.jsonl"
BAD_LOG_FILE = "train_log.bad.jsonl"     # damaged lines moved out of the log on resume
# Settings a resumed run must share with its checkpoint: the weights' shapes, and the batches the
# saved data position counts (another batch size would not continue the same epoch).
RESUME_KEYS = ("model", "training.train_batch_size", "training.grad_accum_steps")


def read_train_log(save_dir) -> List[Dict[str, Any]]:
    """The records of ``<save_dir>/train_log.jsonl``, one dict per logged step ([] if none).
    A line that is not JSON is skipped with a warning naming it."""
    log = Path(save_dir) / LOG_FILE
    if not log.exists():
        return []
    records = []
    for i, line in enumerate(log.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(f"{log} line {i} is not JSON and was skipped: {line[:80]!r}")
    return records


def json_safe(obj):
    """``obj`` with non-finite floats as None, so that the text is valid JSON (no bare NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _empty_window() -> Dict[str, float]:
    """Running sums of the steps since the last log record (``skipped``: non-finite steps)."""
    return {"loss": 0.0, "text_loss": 0.0, "latent_loss": 0.0, "n": 0, "tokens": 0, "skipped": 0}


class Trainer:
    def __init__(self, cfg: DictConfig):
        validate_config(cfg)
        self.cfg = cfg
        tr = cfg.training
        self.dist, self.device = distributed.setup(tr.parallel, resolve_device(tr.device), int(tr.train_batch_size))
        # Each rank may have resolved Hydra's timestamped folder at another second: rank 0's counts.
        self.save_dir = Path(self.dist.broadcast(str(cfg.logging.save_dir)))
        self.save_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(rng.seed_of("init", cfg.seed))

        self.synthetic = cfg.data.kind == "synthetic"
        # training.init_from starts a new run from a checkpoint's weights (a resumed run already
        # holds them): its data is read with the checkpoint's tokenizer, so that ids mean the same
        self.init_path = None if tr.resume or not tr.init_from else self._init_source(tr.init_from)
        with self.dist.first_main():        # rank 0 fills the token cache, the others read it
            self.data = build_data(cfg, tokenizer=self.init_path and self._init_tokenizer())
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
            self._init_weights()
        self._check_parallel()
        # The module the loss runs (DDP's wrapper, or the model sharded in place by FSDP); the
        # optimizer is built after it, on the parameters FSDP put in place.
        self.net = self.dist.wrap(self.model, AUTOCAST_DTYPES[tr.dtype])
        if self.ema is not None and self.dist.mode == "fsdp":
            distributed.shard(self.ema.module, AUTOCAST_DTYPES[tr.dtype])
        self.optimizer, self.scheduler = build_optimizer_and_scheduler(cfg, self.model, self.total_steps)
        self.noise_gen = rng.generator("noise", cfg.seed)

        self.global_step = 0
        self.saved_step = None            # the step of the newest checkpoint of this run
        self.metrics: Dict[str, Any] = {}
        self.window = _empty_window()
        self.bad_steps = 0                # consecutive steps skipped for a non-finite loss / gradient
        self.pending_record = None        # the last step's log record, written after its evaluation
        self.lock = RunLock(self.save_dir)
        self.stop_requested = False
        self.wandb = None
        self.resumed_from = None
        if tr.resume:
            self._resume(tr.resume)
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

    def _init_source(self, source) -> Path:
        from .trained import checkpoint_dir
        path = checkpoint_dir(source)
        ckpt.verify_checkpoint(path)
        return path

    def _init_tokenizer(self):
        """The tokenizer of the ``training.init_from`` checkpoint (None when it has none)."""
        from .trained import saved_config, saved_tokenizer
        saved = saved_config(self.init_path)
        name = saved.tokenizer.name
        if name != self.cfg.tokenizer.name:
            raise ConfigError(f"training.init_from={self.init_path} was trained with tokenizer.name={name!r} and this "
                              f"run has tokenizer.name={self.cfg.tokenizer.name!r}: the ids would mean other text. "
                              f"Set tokenizer.name={name}")
        return saved_tokenizer(self.init_path, saved) if saved.data.kind != "synthetic" else None

    def _init_weights(self):
        """The model (and EMA) weights of the ``training.init_from`` checkpoint; the optimizer,
        LR schedule, data position and step start fresh."""
        path = self.init_path
        saved = (ckpt.read_saved_config(path) or {}).get("model", {})
        current = OmegaConf.to_container(self.cfg.model, resolve=True)
        has_ema = ckpt.has_ema(path)
        try:
            ckpt.load_checkpoint(path, model=self.model, ema=self.ema.module if self.ema and has_ema else None,
                                 restore_rng=False)
        except ckpt.CheckpointError as e:
            differ = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            keys = ", ".join(f"model.{k}={saved.get(k)!r} there, {current.get(k)!r} here" for k in differ)
            raise ckpt.CheckpointError(
                f"training.init_from={path} does not fit this model ({keys or 'no model key differs'}): {e}") from None
        if self.ema and not has_ema:
            self.ema.module.load_state_dict(self.model.state_dict())
        self._print(f"initialised from {path} (its step {ckpt.read_trainer_state(path).get('global_step')}): "
                    f"weights{' and EMA' if self.ema and has_ema else ''}; optimizer, schedule and data start fresh")

    def _print(self, *args, **kwargs):
        if self.dist.main:
            print(*args, **kwargs)

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
        state = {"global_step": self.global_step, "epoch": self.data.epoch, "data": data_state,
                 "window": dict(self.window), "metrics": json_safe(self.metrics), "bad_steps": self.bad_steps,
                 "backbone_trainable": any(p.requires_grad for p in self.model.backbone.parameters()),
                 "world_size": self.dist.world, "parallel": self.dist.mode}
        if self.pending_record is not None:
            state["pending_record"] = json_safe(self.pending_record)
        return state

    def save(self, name: str) -> Path:
        _, tensors = self.data.state()
        tensors = dict(tensors, noise_rng=self.noise_gen.get_state())
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
        return Path(path)

    def _tokenizer_spec(self) -> Optional[Dict[str, Any]]:
        from ..data.tokenizer import tokenizer_spec
        return None if self.tokenizer is None else tokenizer_spec(self.tokenizer)

    def _resume(self, resume: str):
        path = ckpt.resolve_resume(str(resume), self.save_dir)
        saved = ckpt.read_saved_config(path, resolve=False)     # verified before it is parsed
        if saved is not None:
            current = OmegaConf.to_container(self.cfg, resolve=False)
            ckpt.check_config_compatible(saved, current, keys=RESUME_KEYS, checkpoint=path)
        saved_tok, tok = ckpt.read_tokenizer_spec(path), self._tokenizer_spec()
        if saved_tok is not None and saved_tok != tok:
            raise ckpt.CheckpointError(
                f"{path / ckpt.TOKENIZER_FILE} holds another tokenizer than this run's ({saved_tok.get('name')!r}, "
                f"{saved_tok.get('vocab_size')} ids, against {tok and tok.get('name')!r}, "
                f"{tok and tok.get('vocab_size')} ids; a chars vocabulary follows the corpus): resume with the "
                "data and tokenizer the checkpoint was trained on, or start a new run in another logging.save_dir")
        self._check_resume_world(path)
        state, tensors = ckpt.load_checkpoint(path, model=self.model, optimizer=self.optimizer,
                                              scheduler=self.scheduler,
                                              ema=self.ema.module if self.ema else None)
        if state.get("backbone_trainable"):
            self.model.set_backbone_trainable(True)
        self.global_step = self.saved_step = int(state["global_step"])
        self.window = dict(_empty_window(), **state.get("window", {}))
        self.metrics = state.get("metrics", {})
        self.bad_steps = int(state.get("bad_steps", 0))
        self.pending_record = state.get("pending_record")
        try:
            self.data.load(state.get("data", {}), tensors)
        except ValueError as e:
            raise ckpt.CheckpointError(f"training.resume={resume} ({path}): {e}") from None
        per_rank = tensors.get("rank_noise_rng")
        same_world = int(state.get("world_size", 1)) == self.dist.world
        # clone: set_state reads a row of the stacked states from its storage's start
        self.noise_gen.set_state(per_rank[self.dist.rank].clone() if per_rank is not None and same_world
                                 else tensors["noise_rng"])
        self.resumed_from = path
        self._print(f"resumed from {path} at step {self.global_step}")

    def _check_resume_world(self, path: Path):
        """A checkpoint resumes exactly only with the world size that wrote it; another one
        needs ``training.resume_any_world_size``, and a sharded checkpoint or an FSDP run the
        other's form."""
        state = ckpt.read_trainer_state(path)
        saved, world = int(state.get("world_size", 1)), self.dist.world
        if saved != world and not self.cfg.training.resume_any_world_size:
            raise ckpt.CheckpointError(
                f"{path} was written by a run of {saved} process{'es' if saved > 1 else ''} and this run has "
                f"{world}: it would continue, but not repeat the {saved}-process run exactly (each process's "
                "random stream, and sums grouped differently). Resume with the same world size "
                f"(torchrun --nproc_per_node={saved}" + (", or without torchrun" if saved == 1 else "") +
                "), or set training.resume_any_world_size=true to continue anyway")
        if self.dist.mode == "fsdp" and not ckpt.is_sharded(path):
            raise ckpt.CheckpointError(
                f"{path} holds whole weights (a training.parallel={state.get('parallel', 'none')} run) and this "
                "run shards them (training.parallel=fsdp): resume it with training.parallel=ddp or none")

    def _claim_save_dir(self):
        """Takes the run folder's lock; a fresh run refuses a folder that holds another run.
        Rank 0's work: the lock and the log are its files."""
        self.lock.acquire()
        if self.resumed_from is not None:
            self._truncate_log(self.global_step)
            return
        found = ckpt.list_checkpoints(self.save_dir)
        if found:
            self.lock.release()
            raise ckpt.CheckpointError(
                f"logging.save_dir={self.save_dir} already holds a run (checkpoints up to {found[-1].name}); "
                "a new run there would overwrite it. Continue it with training.resume=latest, or write "
                "this run into another logging.save_dir")
        log = self.save_dir / LOG_FILE
        if log.exists() and log.stat().st_size:     # a run killed before its first checkpoint
            aside = log.with_name(f"train_log.{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
            os.replace(log, aside)
            print(f"{log} of an earlier run that wrote no checkpoint moved to {aside}")

    def _truncate_log(self, step: int):
        """Drops log lines written after the checkpoint we resume from (a killed run's tail). A
        damaged line in the middle is moved to train_log.bad.jsonl and the records after it kept."""
        log = self.save_dir / LOG_FILE
        if not log.exists():
            return
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
        keep, kept_steps, bad = [], set(), []
        for i, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if i < len(lines):          # the last line may be cut by the kill; others are damage
                    bad.append((i, line))
                continue
            if record.get("step", 0) <= step:
                keep.append(line)
                kept_steps.add(record.get("step"))
        if self.pending_record is not None and self.pending_record.get("step") in kept_steps:
            self.pending_record = None      # the final record was written before the run ended
        if bad:
            with open(self.save_dir / BAD_LOG_FILE, "a", encoding="utf-8") as f:
                f.writelines(f"{line}\n" for _, line in bad)
            print(f"{log}: line{'s' if len(bad) > 1 else ''} {', '.join(str(i) for i, _ in bad)} "
                  f"{'are' if len(bad) > 1 else 'is'} not JSON; moved to {self.save_dir / BAD_LOG_FILE}, "
                  "the records after kept")
        tmp = log.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        os.replace(tmp, log)

    def _log(self, record: Dict[str, Any]):
        if not self.dist.main:
            return
        with open(self.save_dir / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def _init_wandb(self):
        lg = self.cfg.logging
        if not lg.wandb or not self.dist.main:
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
        unless a ``generator`` is given. Under torchrun: this rank's share of the batch's loss."""
        rows = self.dist.rows(batch["input_ids"].shape[0]) if self.dist.active else None
        return self.objective(self.net, batch, self.noise_gen if generator is None else generator,
                              self.device, self._autocast, rows=rows)

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
                                device=self.device, autocast=self._autocast,
                                dist=self.dist if self.dist.active else None)

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
            rows, counted = self.dist.eval_rows(batch["input_ids"].shape[0]) if self.dist.active else (None, True)
            _, st = self.objective(model, batch, g, self.device, self._autocast, rows=rows)
            if counted:
                tot["text_loss"] += st["text_loss"]
                tot["latent_loss"] += st["latent_loss"]
            n += 1
            if self.has_latent and i == 0:
                z = generate_latent(model, self.latent_diff, batch["input_ids"].to(self.device),
                                    steps=self.cfg.eval.latent_steps, generator=rng.generator("eval_sampling"))
                cos = torch.nn.functional.cosine_similarity(z.float().cpu(), batch["latent"].float(), dim=-1)
                cos_sum, cos_n = cos_sum + float(cos.sum()), cos_n + cos.numel()
        tot = dict(zip(tot, self.dist.sum(tot.values())))      # the shares of each batch add up
        out.update({f"val_{k}": v / max(n, 1) for k, v in tot.items()})
        if cos_n:
            out["val_latent_cos"] = cos_sum / cos_n
        return out

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
        return not self.synthetic and tr.num_epochs is not None and self.data.epoch >= tr.num_epochs

    def _accumulate(self, batch, step_sums: Dict[str, float], last: bool = True) -> None:
        """Forward and backward of one micro-batch; its losses go into this step's sums. Only
        the ``last`` micro-batch of a step reduces gradients across ranks. DDP and FSDP average
        the ranks' gradients, and a rank's loss is its share of the batch's: hence ``* world``."""
        accum = self.cfg.training.grad_accum_steps
        with self.dist.no_sync(self.net, last):
            loss, st = self.compute_loss(batch)
            (loss * self.dist.world / accum).backward()
        step_sums["text_loss"] += st["text_loss"] / accum
        step_sums["latent_loss"] += st["latent_loss"] / accum
        step_sums["loss"] += float(loss.detach()) / accum
        step_sums["tokens"] += st["tokens"]

    def _optimizer_step(self, step_sums: Dict[str, float]):
        """Clip, step the optimizer, LR schedule and EMA. Returns (grad norm, LR of the step).

        A step whose loss or gradient norm is not finite changes no weight, optimizer moment or
        EMA (the LR schedule still advances, so it stays a function of the step); more than
        ``training.max_bad_steps`` of them in a row stop the run (:class:`TrainingDiverged`)."""
        clip = self.cfg.training.grad_clip
        if self.dist.active:                # this rank's shares of the batch's losses -> the batch's
            keys = ("loss", "text_loss", "latent_loss", "tokens")
            step_sums.update(zip(keys, self.dist.sum(step_sums[k] for k in keys)))
        norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.grad is not None], clip if clip else float("inf"))
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)   # FSDP: a DTensor
        finite = math.isfinite(step_sums["loss"]) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        g0 = self.optimizer.param_groups[0]
        lr = g0["lr"] / g0.get("lr_mult", 1.0)
        self.scheduler.step()
        if finite and self.ema:
            self.ema.update(self.model)
        self.global_step += 1
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
        ev = self.evaluate()
        self.metrics.update(ev)
        self.metrics["step"] = step
        return ev

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
            return self._train()
        finally:
            if self.dist.main:
                self.lock.release()

    def _train(self) -> Dict[str, Any]:
        tr, lg = self.cfg.training, self.cfg.logging
        self._init_wandb()
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
            self.metrics.update(self.evaluate())
            self.metrics["step"] = self.global_step
        evals = {k: v for k, v in self.metrics.items() if k not in ("step", "epoch")}
        self._log(dict(self.pending_record, **evals))
        self.pending_record = None

    def _finish(self, epoch: int) -> Dict[str, Any]:
        """The checkpoint of the last step, then the last evaluation (so that an evaluation that
        fails loses no training), the last log record and ``metrics.json``."""
        if self.global_step and self.saved_step != self.global_step:
            self.save(ckpt.step_dir_name(self.global_step))
        if self.metrics.get("step") != self.global_step:  # not already evaluated at this step
            self.metrics.update(self.evaluate())
        self.metrics["step"] = self.global_step
        self.metrics["epoch"] = epoch
        if self.pending_record is not None:
            self._write_pending_record()
        if self.dist.main:
            tmp = self.save_dir / "metrics.json.tmp"
            tmp.write_text(json.dumps(json_safe(self.metrics), indent=2, allow_nan=False))
            os.replace(tmp, self.save_dir / "metrics.json")
        if self.wandb is not None:
            self.wandb.summary.update(self.metrics)
            self.wandb.finish()
        return self.metrics
