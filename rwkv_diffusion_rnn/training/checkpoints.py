"""Checkpoints: atomic save, keep-last rotation, verification and exact resume.

A checkpoint is one directory ``<save_dir>/<name>/`` (``epoch_003``, ``step_0000200``) with one
file per stateful part of a training run:

    model.safetensors    model weights; tensors tied together are stored once (see _split_shared)
    ema.safetensors      EMA copy of the model, when the run keeps one
    optimizer.pt         optimizer.state_dict()
    scheduler.pt         lr_scheduler.state_dict()
    rng.pt               python `random`, numpy, torch CPU and CUDA generator states
    extra.pt             tensors the trainer adds (e.g. the state of the data generator)
    trainer_state.json   global_step, epoch, position in the epoch, sampler state, metrics so far
    config.yaml          the resolved run config
    metrics.json         trainer_state["metrics"], for people reading the directory
    manifest.json        size and sha256 of every file above; written last

An FSDP run (``training.parallel=fsdp``) keeps its weights sharded: ``sharded/`` holds the model,
EMA and optimizer state as ``torch.distributed.checkpoint`` files (one per rank, keyed by
parameter name) instead of model.safetensors, ema.safetensors and optimizer.pt; every rank writes
its shard into a staging directory (:func:`save_shards`), then rank 0 moves it into the
checkpoint with the other files. Such a checkpoint loads into FSDP at any world size and into an
unsharded model in one process (:func:`load_checkpoint` reads whichever form it finds).

The .pt files hold only tensors and plain Python values (numpy state is stored as tensors and
ints), so every one loads with ``torch.load(weights_only=True)``; save refuses anything else.

Saving writes into ``<save_dir>/.tmp-<name>-<pid>``, fsyncs, then renames the directory to
``<name>``. A directory under a checkpoint name is therefore always complete, and a run killed
mid-save leaves the previous checkpoint untouched. Leftover ``.tmp-*`` directories are removed by
the next save (``clean_save_dir``). Only one process (rank 0) should save into a save_dir.

Nothing lost, nothing silently wrong:

* a failed write (a full disk above all) removes the temp directory and raises
  CheckpointWriteError naming the save_dir, the file and the newest intact checkpoint;
* weights holding NaN/inf are refused before writing (NonFiniteError); every manifest records
  ``"finite": true`` and keep_last never prunes the newest checkpoint so recorded;
* a directory under the name being saved that has no manifest is moved aside to
  ``<name>.incomplete-<unix time>``, not deleted, and ``resolve_resume("latest")`` refuses to
  skip a newer-looking ``step_*``/``epoch_*`` directory without a readable manifest;
* ``read_saved_config`` checks config.yaml against the manifest before parsing it.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..common.errors import CheckpointError, CheckpointWriteError, NonFiniteError, first_line
from ..common.pickles import unsafe_pickle_reason




__all__ = [
    "CheckpointError",
    "NonFiniteError",
    "CheckpointWriteError",
    "epoch_dir_name",
    "step_dir_name",
    "save_checkpoint",
    "load_checkpoint",
    "verify_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_resume",
    "check_config_compatible",
    "load_config",
    "read_saved_config",
    "parse_config_file",
    "read_trainer_state",
    "clean_save_dir",
    "save_shards",
    "is_sharded",
    "has_ema",
]

MANIFEST = "manifest.json"
FORMAT = "rwkv_diffusion_rnn.checkpoint"
FORMAT_VERSION = 1

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
RNG_FILE = "rng.pt"
EXTRA_FILE = "extra.pt"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
TOKENIZER_FILE = "tokenizer.json"   # the tokenizer's spec (data.tokenizer.tokenizer_spec)
SHARDED_DIR = "sharded"             # torch.distributed.checkpoint files of an FSDP run

# Parts restored with `obj.load_state_dict(torch.load(file))`: (argument name, file).
STATE_DICT_PARTS = (("optimizer", "optimizer.pt"), ("scheduler", "scheduler.pt"))

# Prefixes of the working directories inside save_dir (never listed as checkpoints).
_TMP, _OLD, _TRASH = ".tmp-", ".old-", ".trash-"
# Suffix of a same-named directory without a manifest that a save moved aside (kept, listed nowhere).
_INCOMPLETE = ".incomplete-"


def epoch_dir_name(epoch: int) -> str:
    return f"epoch_{int(epoch):03d}"


def step_dir_name(step: int) -> str:
    return f"step_{int(step):07d}"


# ----------------------------------------------------------------------------------------------
# Save


def save_checkpoint(
    save_dir,
    name: str,
    *,
    model: torch.nn.Module | None,
    optimizer=None,
    scheduler=None,
    ema: torch.nn.Module | None = None,
    trainer_state: dict,
    extra_tensors: dict | None = None,
    config: dict | None = None,
    tokenizer: dict | None = None,
    keep_last: int | None = None,
    sharded: Path | None = None,
) -> Path:
    """Write a complete checkpoint to ``<save_dir>/<name>`` atomically and return its path.

    An existing complete checkpoint ``<name>`` is replaced; an existing ``<name>`` without a
    manifest is moved aside to ``<name>.incomplete-<unix time>`` (with a warning), never deleted.
    ``trainer_state`` must be JSON-serialisable (tuples come back as lists, dict keys as strings).
    ``keep_last=N`` then deletes the oldest complete checkpoints in save_dir (by global_step) so
    that N remain, never the one just written nor the newest one recorded finite.

    Raises NonFiniteError (nothing written) when a floating tensor of the model or EMA is NaN or
    inf, and CheckpointWriteError (the half-written directory removed, nothing existing touched)
    when writing fails, e.g. for lack of disk space.

    ``sharded``: a staging directory from :func:`save_shards`, moved into the checkpoint as
    ``sharded/``; the model, EMA and optimizer are then in it (pass them as None here).
    """
    save_dir = Path(save_dir)
    if not name or name != Path(name).name or name.startswith("."):
        raise ValueError(f"checkpoint name {name!r} must be a plain directory name such as 'epoch_003'")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be a positive integer or None (keep all), got {keep_last!r}")
    if not isinstance(trainer_state, dict):
        raise TypeError(f"trainer_state must be a dict, got {type(trainer_state).__name__}")

    # Everything that can be refused is checked before the first byte is written.
    if (model is None) == (sharded is None):
        raise ValueError("save_checkpoint takes either model (unsharded weights) or sharded (the staging "
                         "directory of save_shards), not both or neither")
    model = _unwrap(model) if model is not None else None
    ema = _unwrap(ema) if ema is not None else None
    for module, where in ((model, "model"), (ema, "ema")):
        if module is not None:
            _check_weights(module.state_dict(), where, save_dir, name)
    state_text = _to_json(trainer_state, "trainer_state")
    metrics_text = _to_json(trainer_state["metrics"], "trainer_state['metrics']") if "metrics" in trainer_state else None
    config_text = _config_yaml(config) if config is not None else None
    tokenizer_text = _to_json(tokenizer, "tokenizer") if tokenizer is not None else None
    pt_parts = {}
    for arg, fname in STATE_DICT_PARTS:
        obj = {"optimizer": optimizer, "scheduler": scheduler}[arg]
        if obj is not None:
            pt_parts[fname] = obj.state_dict()
            _check_loadable(pt_parts[fname], f"{arg}.state_dict()")
    if extra_tensors is not None:
        if not isinstance(extra_tensors, dict):
            raise TypeError(f"extra_tensors must be a dict, got {type(extra_tensors).__name__}")
        _check_loadable(extra_tensors, "extra_tensors")
        pt_parts[EXTRA_FILE] = extra_tensors
    pt_parts[RNG_FILE] = _rng_state()

    # (file name, writer) in the order written; the manifest comes last, after all of them.
    writers = [(MODEL_FILE, lambda f: _save_weights(f, model, "model"))] if model is not None else []
    if ema is not None:
        writers.append((EMA_FILE, lambda f: _save_weights(f, ema, "ema")))
    writers += [(fname, lambda f, obj=obj: torch.save(obj, f)) for fname, obj in pt_parts.items()]
    for fname, text in ((STATE_FILE, state_text), (CONFIG_FILE, config_text), (METRICS_FILE, metrics_text),
                        (TOKENIZER_FILE, tokenizer_text)):
        if text is not None:
            writers.append((fname, lambda f, text=text: f.write_text(text, encoding="utf-8")))
    meta = {"name": name, "global_step": trainer_state.get("global_step"), "epoch": trainer_state.get("epoch")}

    save_dir.mkdir(parents=True, exist_ok=True)
    clean_save_dir(save_dir, keep=sharded)
    tmp = save_dir / f"{_TMP}{name}-{os.getpid()}"
    _write_tmp(tmp, writers, meta, save_dir, name, sharded)
    final = _move_into_place(tmp, save_dir, name)
    if keep_last is not None:
        _prune(save_dir, keep_last, final)
    return final


def save_model_folder(out, *, model: torch.nn.Module, trainer_state: dict, config, tokenizer: dict | None,
                      texts: dict | None = None, copies: dict | None = None) -> Path:
    """Write a model folder at ``out`` atomically: a checkpoint of ``model``'s weights alone
    (``model.safetensors``, no optimizer, EMA or random state: nothing in it is a pickle), its
    ``config.yaml``, ``tokenizer.json``, ``trainer_state.json``, the text files ``texts``
    ({name: text}, e.g. the README model card) and the files ``copies`` ({name in the folder:
    source path}, e.g. tokenizer files), all listed with their sha256 in the manifest, so the
    loaders that read a checkpoint (``load_trained``, ``training.init_from``) read it and verify it."""
    import shutil as _shutil
    out = Path(out)
    model = _unwrap(model)
    _check_weights(model.state_dict(), "model", out.parent, out.name)
    writers = [(MODEL_FILE, lambda f: _save_weights(f, model, "model"))]
    for fname, text in ((STATE_FILE, _to_json(trainer_state, "trainer_state")), (CONFIG_FILE, _config_yaml(config)),
                        (TOKENIZER_FILE, _to_json(tokenizer, "tokenizer") if tokenizer is not None else None),
                        *(texts or {}).items()):
        if text is not None:
            writers.append((fname, lambda f, text=text: f.write_text(text, encoding="utf-8")))

    def copy(f: Path, source: Path) -> None:
        f.parent.mkdir(parents=True, exist_ok=True)
        _shutil.copyfile(source, f)
    writers += [(fname, lambda f, source=Path(source): copy(f, source)) for fname, source in (copies or {}).items()]
    meta = {"name": out.name, "global_step": trainer_state.get("global_step"), "epoch": trainer_state.get("epoch")}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{_TMP}{out.name}-{os.getpid()}"
    _write_tmp(tmp, writers, meta, out.parent, out.name)
    return _move_into_place(tmp, out.parent, out.name)


def _write_tmp(tmp: Path, writers: list, meta: dict, save_dir: Path, name: str, sharded: Path | None = None) -> None:
    """Write every file (and move in the ``sharded`` staging directory), then the manifest,
    into ``tmp``; on failure remove ``tmp`` and raise CheckpointWriteError (a KeyboardInterrupt
    and the like pass through unchanged)."""
    writing = tmp
    try:
        tmp.mkdir()
        files: dict[str, dict] = {}
        for fname, write in writers:
            writing = tmp / fname
            write(writing)
            files[fname] = _record(writing)
        if sharded is not None:
            writing = tmp / SHARDED_DIR
            os.replace(sharded, writing)
            for file in sorted(writing.rglob("*")):
                if file.is_file():
                    files[file.relative_to(tmp).as_posix()] = _record(file)
            _fsync_dir(writing)
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "created_unix": time.time(),
                    # save refuses non-finite weights, so every manifest written says so (see _prune)
                    "finite": True, "files": files}
        writing = tmp / MANIFEST
        writing.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _record(writing)
        _fsync_dir(tmp)
    except Exception as e:
        free = _free_bytes(save_dir)  # measured before the partial files are removed
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(e, writing, save_dir, name, free) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, save_dir: Path, name: str) -> Path:
    final = save_dir / name
    if final.exists() or final.is_symlink():
        try:
            _read_manifest(final)
        except CheckpointError as e:
            # Not a checkpoint this code wrote to completion, but maybe data someone needs: keep it.
            aside = _aside_name(save_dir, name)
            os.replace(final, aside)
            warnings.warn(f"{final} was not a complete checkpoint ({e}); it was moved aside to {aside} "
                          f"instead of being replaced. Delete it once you know it is not needed.", stacklevel=3)
    if final.exists():
        # A non-empty directory cannot be renamed over: move the old one aside first. A kill
        # between the two renames leaves it under .old-*, which clean_save_dir puts back.
        old = save_dir / f"{_OLD}{name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(save_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
        _fsync_dir(save_dir)
    return final


def _aside_name(save_dir: Path, name: str) -> Path:
    """``<name>.incomplete-<unix time>``: not dot-prefixed, so clean_save_dir never deletes it."""
    stamp = int(time.time())
    aside, n = save_dir / f"{name}{_INCOMPLETE}{stamp}", 1
    while aside.exists() or aside.is_symlink():
        aside, n = save_dir / f"{name}{_INCOMPLETE}{stamp}-{n}", n + 1
    return aside


def _check_weights(state: dict, where: str, save_dir: Path, name: str) -> None:
    """Refuse, before writing, entries safetensors cannot store and any NaN / inf weight.

    One isfinite-reduction per floating tensor, all queued before the first result is read, so a
    GPU model syncs once; tensors tied together are checked once."""
    flags, seen = [], set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{where}.state_dict() entry {key!r} is a {type(value).__name__}; "
                            f"{where} weights are stored in safetensors, which holds tensors only")
        if value.device.type == "meta":
            raise ValueError(f"{where}.state_dict() entry {key!r} is on the meta device and has no data to save")
        view = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if (value.is_floating_point() or value.is_complex()) and view not in seen:
            seen.add(view)
            flags.append((key, value, torch.isfinite(value).all()))
    for key, value, finite in flags:
        if not bool(finite):
            bad = int((~torch.isfinite(value)).sum())
            raise NonFiniteError(
                f"refusing to save checkpoint {name} in {save_dir}: {where} tensor {key!r} holds {bad} NaN/inf "
                f"values of {value.numel()}, and a checkpoint of non-finite weights cannot be trained on. "
                f"{_sentence(_previous_clause(save_dir))}. The run has diverged: resume from an intact checkpoint with a "
                "lower learning rate, training.grad_clip, or fp32 (training.dtype)."
            )


# Text of errors that mean the disk (or quota, or file size limit) is full.
_NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NO_SPACE_TEXT = ("no space left", "disk quota exceeded", "file too large")
# torch.save's zip writer reports a failed write without its cause.
_ZIP_WRITER_TEXT = ("unexpected pos", "pytorchstreamwriter failed")


def _write_error(e: Exception, file: Path, save_dir: Path, name: str, free: int | None) -> CheckpointWriteError:
    """The CheckpointWriteError for ``e`` raised while writing ``file``."""
    kind, code = _failure_kind(e)
    space = f"{_show_bytes(free)} free" if free is not None else "free space unknown"
    cause = f"writing {file} failed ({first_line(e)})"
    if kind == "unclear" and free is not None and free < _LOW_SPACE:
        kind, code = "no_space", code or errno.ENOSPC
    if kind == "no_space":
        head = f"no space left on {save_dir}; {_previous_clause(save_dir)}"
        fix = ("Free disk space (or lower logging.keep_last, or set logging.save_dir to a larger disk), then "
               "resume with training.resume=latest.")
        text = f"cannot save checkpoint {name}: {head} ({cause}; {space}). {fix}"
    else:
        unclear = " (torch's writer does not say why)" if kind == "unclear" else ""
        text = (f"cannot save checkpoint {name}: {cause}{unclear}; {space} on {save_dir}. "
                f"{_sentence(_previous_clause(save_dir))}. Check that logging.save_dir is writable and has room, "
                "then resume with training.resume=latest.")
    err = CheckpointWriteError(text)
    err.errno = code
    return err


def _failure_kind(e: BaseException) -> tuple[str, int | None]:
    """("no_space" | "unclear" | "other", errno) for a write failure, following __cause__."""
    seen = set()
    kind, code = "other", None
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e).lower()
        if isinstance(e, OSError) and e.errno is not None:
            code = code or e.errno
            if e.errno in _NO_SPACE_ERRNOS:
                return "no_space", e.errno
        if any(t in text for t in _NO_SPACE_TEXT):  # safetensors' error carries the OS text only
            return "no_space", code or errno.ENOSPC
        if any(t in text for t in _ZIP_WRITER_TEXT):
            kind = "unclear"
        e = e.__cause__ or e.__context__
    return kind, code


# Below this much free space an unexplained write failure is reported as a full disk.
_LOW_SPACE = 16 << 20


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _show_bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def _previous_clause(save_dir: Path) -> str:
    """ "the previous checkpoint <path> is intact" (the newest that verifies), or why there is none."""
    ckpts = list_checkpoints(save_dir)
    for candidate in reversed(ckpts):
        try:
            _verify(candidate)
        except (CheckpointError, OSError):
            continue
        return f"the previous checkpoint {os.path.abspath(candidate)} is intact"
    if ckpts:
        return f"no earlier checkpoint in {save_dir} verifies against its manifest"
    return "no earlier checkpoint exists"


def _sentence(clause: str) -> str:
    return clause[:1].upper() + clause[1:]


def clean_save_dir(save_dir, keep: Path | None = None) -> None:
    """Tidy what an interrupted save left in save_dir.

    ``.tmp-*`` (half-written) and ``.trash-*`` (half-deleted) directories are removed; an
    ``.old-<name>-*`` directory (the previous version of a checkpoint that was being replaced)
    is moved back to ``<name>`` when that name is empty. Directories of processes still running
    (another save in progress) are left alone, and ``keep`` (the shards of the save under way).
    """
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return
    for entry in sorted(save_dir.iterdir()):
        prefix = next((p for p in (_OLD, _TMP, _TRASH) if entry.name.startswith(p)), None)
        if prefix is None or (keep is not None and entry.name == Path(keep).name):
            continue
        ckpt_name, _, pid = entry.name[len(prefix):].rpartition("-")
        if not pid.isdigit() or not ckpt_name:
            continue
        if int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue
        target = save_dir / ckpt_name
        if prefix == _OLD and not target.exists() and (entry / MANIFEST).is_file():
            os.replace(entry, target)
        else:
            shutil.rmtree(entry, ignore_errors=True)
    _fsync_dir(save_dir)


def _prune(save_dir: Path, keep_last: int, just_written: Path) -> None:
    """Delete the oldest checkpoints beyond ``keep_last``, sparing two: the one just written and
    the newest one whose manifest records ``"finite": true`` (so keep_last=1 can leave two when
    the one just written is older by global_step). Manifests without the key (written before
    it existed) count as unknown: they are pruned by age as before."""
    ckpts = list_checkpoints(save_dir)
    spared = {just_written.name}
    finite = [p for p in ckpts if _manifest_says_finite(p)]
    if finite:
        spared.add(finite[-1].name)
    n_drop = len(ckpts) - keep_last
    for path in [p for p in ckpts[:max(n_drop, 0)] if p.name not in spared]:
        # Rename first so that a kill during rmtree never leaves a half-deleted checkpoint.
        trash = save_dir / f"{_TRASH}{path.name}-{os.getpid()}"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)



def _manifest_says_finite(path: Path) -> bool:
    try:
        return _read_manifest(path).get("finite") is True
    except CheckpointError:
        return False


# ----------------------------------------------------------------------------------------------
# Load


def load_checkpoint(
    path,
    *,
    model: torch.nn.Module,
    optimizer=None,
    scheduler=None,
    ema: torch.nn.Module | None = None,
    map_location="cpu",
    restore_rng: bool = True,
) -> tuple[dict, dict]:
    """Verify the checkpoint at ``path``, load every given part in place, and return
    ``(trainer_state, extra_tensors)``.

    Weights are read on the CPU and copied into the model's own device and dtype;
    ``map_location`` applies to the optimizer, scheduler and extra tensors.
    A part passed here but absent from the checkpoint is an error.
    """
    path = Path(path)
    verify_checkpoint(path)
    files = _read_manifest(path)["files"]

    sharded = is_sharded(path)
    if sharded:
        _load_sharded(path / SHARDED_DIR, _unwrap(model), optimizer, _unwrap(ema) if ema is not None else None)
        optimizer = None        # its state was in the shards
    else:
        _load_weights(path / MODEL_FILE, _unwrap(model))
    if ema is not None and not sharded:
        if EMA_FILE not in files:
            raise CheckpointError(
                f"Checkpoint {path} has no EMA weights ({EMA_FILE}): the run that wrote it kept no EMA. "
                "Resume without EMA, or pass ema=None and initialise the EMA from the loaded model."
            )
        _load_weights(path / EMA_FILE, _unwrap(ema))

    parts = {"optimizer": optimizer, "scheduler": scheduler}
    for arg, fname in STATE_DICT_PARTS:
        obj = parts[arg]
        if obj is None:
            continue
        if fname not in files:
            raise CheckpointError(
                f"Checkpoint {path} has no {arg} state ({fname}); it cannot resume this run exactly. "
                f"Pass {arg}=None to load the weights only."
            )
        state = _torch_load(path / fname, map_location)
        try:
            obj.load_state_dict(state)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(
                f"{path / fname} does not fit the {arg} of this run ({type(e).__name__}: {e}). "
                f"Resume with the same {arg} settings and trainable parameters, or start a new run."
            ) from e

    extra = _torch_load(path / EXTRA_FILE, map_location) if EXTRA_FILE in files else {}
    if restore_rng and RNG_FILE in files:
        _set_rng_state(_torch_load(path / RNG_FILE, "cpu"), path / RNG_FILE)
    return read_trainer_state(path), extra


def is_sharded(path) -> bool:
    """Whether the checkpoint at ``path`` keeps its weights as FSDP shards (``sharded/``)."""
    try:
        files = _read_manifest(Path(path))["files"]
    except CheckpointError:
        return False
    return any(f.startswith(SHARDED_DIR + "/") for f in files)


def weight_shapes(path) -> dict | None:
    """``{parameter name: shape}`` of the model weights of the checkpoint at ``path``, read from
    the safetensors header alone (None for a sharded checkpoint). Tied tensors stored once appear
    under their stored name."""
    path = Path(path)
    if is_sharded(path):
        return None
    with safe_open(str(path / MODEL_FILE), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def has_ema(path) -> bool:
    """Whether the checkpoint at ``path`` holds EMA weights (ema.safetensors, or in its shards)."""
    path = Path(path)
    if not is_sharded(path):
        return (path / EMA_FILE).is_file()
    return any(k.startswith("ema.") for k in _shard_keys(path / SHARDED_DIR))


def _shard_keys(directory: Path) -> set:
    """The keys the ``torch.distributed.checkpoint`` files in ``directory`` hold ("model.<name>", ...)."""
    import torch.distributed.checkpoint as dcp
    try:
        return set(dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata)
    except Exception as e:
        raise CheckpointError(f"{directory} cannot be read as torch.distributed.checkpoint shards "
                              f"({type(e).__name__}: {first_line(e)})") from e


def _sharded_state(model: torch.nn.Module, optimizer=None, ema: torch.nn.Module | None = None) -> dict:
    """The parts of an FSDP checkpoint as ``torch.distributed.checkpoint`` state dicts, keyed
    by parameter name (sharded on an FSDP model, whole on a plain one)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    if ema is not None:
        state["ema"] = get_model_state_dict(ema)
    return state


def save_shards(save_dir, name: str, dist, *, model: torch.nn.Module, optimizer=None,
                ema: torch.nn.Module | None = None) -> Path:
    """Every rank of an FSDP run: writes its shards of ``model``, ``optimizer`` and ``ema``
    with ``torch.distributed.checkpoint`` into a staging directory of ``save_dir`` and returns
    it, for rank 0's :func:`save_checkpoint` (``sharded=``). Refuses non-finite weights on any
    rank before writing (NonFiniteError on every rank)."""
    import torch.distributed.checkpoint as dcp
    save_dir = Path(save_dir)
    stage = save_dir / f"{_TMP}{name}-shards-{dist.broadcast(os.getpid())}"
    bad = []
    for module, where in ((model, "model"), (ema, "ema")):
        for key, value in (module.state_dict().items() if module is not None else ()):
            local = value.to_local() if hasattr(value, "to_local") else value
            if local.is_floating_point() and not bool(torch.isfinite(local).all()):
                bad.append(f"{where}.{key}")
    if dist.any(bool(bad)):
        raise NonFiniteError(f"checkpoint {save_dir / name} not written: weights hold NaN or inf"
                             + (f" ({_some(bad)})" if bad else " (on another rank)"))

    def fresh_stage():
        save_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()

    dist.on_main(fresh_stage)
    try:
        dcp.save(_sharded_state(model, optimizer, ema), checkpoint_id=str(stage))
    except Exception as e:
        shutil.rmtree(stage, ignore_errors=True)
        raise _write_error(e, stage, save_dir, name, _free_bytes(save_dir)) from e
    dist.barrier()
    return stage


def _load_sharded(directory: Path, model: torch.nn.Module, optimizer=None, ema: torch.nn.Module | None = None) -> None:
    """Loads the shards into ``model`` (FSDP or plain), ``optimizer`` and ``ema``. Every weight
    must be in the files. The optimizer may lack the state of parameters that never had a
    gradient (an unused head): they keep the fresh state that the optimizer's first step would
    give them anyway."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    state = _sharded_state(model, optimizer, ema)
    stored = _shard_keys(directory)
    missing = [f"{part}.{k}" for part in ("model", "ema") for k in state.get(part, {}) if f"{part}.{k}" not in stored]
    if missing:
        hint = " (this run keeps an EMA, the run that wrote it did not)" if any(m.startswith("ema.") for m in missing) else ""
        raise CheckpointError(f"{directory} does not fit this run{hint}: missing {_some(missing)}. Resume with "
                              "the model settings it was written with, or start a new run.")
    try:
        with warnings.catch_warnings():     # one process reading shards: DCP says it has no process group
            warnings.filterwarnings("ignore", message=".*single process.*")
            dcp.load(state, checkpoint_id=str(directory), planner=DefaultLoadPlanner(allow_partial_load=True))
    except Exception as e:
        raise CheckpointError(
            f"{directory} does not fit this run ({type(e).__name__}: {first_line(e)}). It was written "
            "with other model settings (or without EMA while this run keeps one): resume with the same "
            "model config, or start a new run.") from e
    set_model_state_dict(model, state["model"])
    if ema is not None:
        set_model_state_dict(ema, state["ema"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def read_trainer_state(path) -> dict:
    """The trainer_state dict stored in a checkpoint (not verified)."""
    file = Path(path) / STATE_FILE
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file} cannot be read: {e}") from e


def load_config(path) -> dict | None:
    """The run config stored in a checkpoint as a plain dict, or None when it has none.

    Not verified against the manifest (read_saved_config is); a config.yaml that does not parse
    is a CheckpointError naming the file."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        return None
    return _config_container(parse_config_file(file), file, resolve=True)


def read_saved_config(path, resolve: bool = True) -> dict | None:
    """The run config of the checkpoint at ``path`` as a plain dict, checked before it is parsed:
    the manifest, every file's size and config.yaml's sha256 (the full check of the other files
    is load_checkpoint's). None when the manifest lists no config.yaml. Any problem, invalid
    YAML included, is a CheckpointError naming the file (and, for damage, an intact checkpoint)."""
    path = Path(path)
    try:
        manifest = _read_manifest(path)
        _check_sizes(path, manifest)
        if CONFIG_FILE not in manifest["files"]:
            return None
        _verify(path, only=(CONFIG_FILE,))
    except CheckpointError as e:
        raise CheckpointError(f"{e}\n{_intact_alternative(path)}") from None
    file = path / CONFIG_FILE
    return _config_container(parse_config_file(file), file, resolve=resolve)


def parse_config_file(file):
    """``OmegaConf.load(file)`` as a DictConfig; a file that is not a YAML mapping is a
    CheckpointError naming it (yaml, omegaconf and decoding errors alike)."""
    from omegaconf import DictConfig, OmegaConf

    file = Path(file)
    try:
        cfg = OmegaConf.load(file)
    except Exception as e:  # yaml.YAMLError, UnicodeDecodeError, OSError("Invalid loaded object type")
        raise CheckpointError(_bad_config(file, e)) from None
    if not isinstance(cfg, DictConfig):
        raise CheckpointError(_bad_config(file, TypeError(f"it holds a {type(cfg).__name__}, not a mapping")))
    return cfg


def _config_container(cfg, file: Path, resolve: bool) -> dict:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(cfg, resolve=resolve)
    except Exception as e:  # an interpolation that does not resolve
        raise CheckpointError(_bad_config(file, e)) from None


def _bad_config(file: Path, e: BaseException) -> str:
    why = " ".join(str(e).split())  # yaml's messages span several lines
    return (f"{file} is not a valid run config ({type(e).__name__}: {why}). Restore it from a copy, or "
            "resume from an earlier checkpoint with training.resume=<its directory>.")


def read_tokenizer_spec(path) -> dict | None:
    """The tokenizer spec stored in a checkpoint, or None when the run had no tokenizer."""
    file = Path(path) / TOKENIZER_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file} cannot be read: {e}") from e


# ----------------------------------------------------------------------------------------------
# Verify, list, resolve


def verify_checkpoint(path) -> None:
    """Check that every file in the manifest exists with the recorded size and sha256.

    Raises CheckpointError naming the checkpoint and the bad file, and the newest earlier
    checkpoint in the same directory that does verify.
    """
    try:
        _verify(Path(path))
    except CheckpointError as e:
        raise CheckpointError(f"{e}\n{_intact_alternative(Path(path))}") from None


def list_checkpoints(save_dir) -> list[Path]:
    """Complete checkpoints under save_dir, oldest first: by global_step, then by save time.

    Complete means the directory holds this project's manifest, which a save writes last. A
    checkpoint damaged later is still listed, so that loading it reports the damage and names an
    intact one instead of silently resuming from an older step."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = []
    for d in save_dir.iterdir():
        if d.name.startswith(".") or not d.is_dir():
            continue
        try:
            manifest = _read_manifest(d)
        except CheckpointError:
            continue
        step = manifest.get("global_step")
        try:
            step = json.loads((d / STATE_FILE).read_text(encoding="utf-8")).get("global_step", step)
        except (OSError, ValueError, AttributeError):
            pass
        step = step if isinstance(step, (int, float)) and not isinstance(step, bool) else -1
        try:
            mtime = (d / MANIFEST).stat().st_mtime
        except OSError:         # pruned by a running save since its manifest was read: not there any more
            continue
        found.append((step, mtime, d.name, d))
    return [d for *_, d in sorted(found)]


def latest_checkpoint(save_dir) -> Path | None:
    ckpts = list_checkpoints(save_dir)
    return ckpts[-1] if ckpts else None


def resolve_resume(resume: str, save_dir) -> Path:
    """Map ``training.resume`` to a checkpoint directory.

    ``latest`` is the newest complete checkpoint under save_dir; it is refused when a
    checkpoint-named directory (step_*/epoch_*) that looks newer (a higher number of the same
    kind, or a later mtime) has no readable manifest, since resuming would later overwrite it.
    Anything else is a path; a bare name that does not exist where it is given is looked up
    inside save_dir.
    """
    save_dir = Path(save_dir)
    resume = str(resume).strip()
    if resume == "latest":
        return _resolve_latest(save_dir)
    path = Path(resume).expanduser()
    if not path.exists() and not path.is_absolute() and (save_dir / resume).exists():
        path = save_dir / resume
    if path.is_file():
        raise CheckpointError(f"training.resume={resume}: {path} is a file, not a checkpoint directory. "
                              f"{_parent_hint(path, save_dir)}")
    if not path.is_dir():
        raise CheckpointError(f"training.resume={resume}: checkpoint directory {path} does not exist. "
                              f"{_latest_hint(save_dir)}")
    try:
        _check_sizes(path, _read_manifest(path))
    except CheckpointError as e:
        raise CheckpointError(f"training.resume={resume}: {e}\n{_intact_alternative(path)}") from None
    return path


def _resolve_latest(save_dir: Path) -> Path:
    path = latest_checkpoint(save_dir)
    broken = _broken_newer(save_dir, path)
    if broken:
        listed = "; ".join(f"{d} ({why})" for d, why in broken)
        example = f"mv {broken[0][0]} {broken[0][0]}.damaged"
        if path is None:
            raise CheckpointError(
                f"training.resume=latest: {save_dir} holds no complete checkpoint, only checkpoint directories "
                f"that are incomplete or damaged: {listed}. Restore them from a copy, or move them aside "
                f"(e.g. {example}) and start without training.resume.")
        raise CheckpointError(
            f"training.resume=latest: the newest complete checkpoint is {path}, but the newer-looking {listed} "
            f"cannot be used; resuming from {path} would later overwrite it. Either move the damaged directory "
            f"aside (e.g. {example}) and rerun, or resume explicitly from the older one with "
            f"training.resume={os.path.abspath(path)}.")
    if path is None:
        why = "holds no complete checkpoint" if save_dir.is_dir() else "does not exist"
        raise CheckpointError(
            f"training.resume=latest: {save_dir} {why}. Start without training.resume, "
            f"or set training.resume=<checkpoint dir> and logging.save_dir to where the run saved."
        )
    return path


_CKPT_NAME = re.compile(r"(step|epoch)_(\d+)")


def _broken_newer(save_dir: Path, chosen: Path | None) -> list[tuple[Path, str]]:
    """Checkpoint-named directories without a readable manifest that are newer than ``chosen``
    (all of them when there is none), each with the reason."""
    if not save_dir.is_dir():
        return []
    chosen_name = _CKPT_NAME.fullmatch(chosen.name) if chosen is not None else None
    found = []
    for d in sorted(save_dir.iterdir()):
        m = _CKPT_NAME.fullmatch(d.name)
        if m is None or not d.is_dir() or (chosen is not None and d.name == chosen.name):
            continue
        try:
            _read_manifest(d)
            continue
        except CheckpointError as e:
            why = str(e)
        if chosen is not None:
            by_number = (chosen_name is not None and chosen_name.group(1) == m.group(1)
                         and int(m.group(2)) > int(chosen_name.group(2)))
            if not (by_number or d.stat().st_mtime > chosen.stat().st_mtime):
                continue
        found.append((d, why))
    return found


def _parent_hint(file: Path, save_dir: Path) -> str:
    parent = file.resolve().parent
    if (parent / MANIFEST).is_file():
        return f"Its folder {parent} is a checkpoint: resume from it with training.resume={parent}"
    return _latest_hint(save_dir)


def _latest_hint(save_dir: Path) -> str:
    latest = latest_checkpoint(save_dir)
    return f"The newest checkpoint in {save_dir} is {latest}." if latest else f"{save_dir} holds no complete checkpoint."


def check_config_compatible(saved_config: dict, config: dict, keys=("model",), *, checkpoint=None,
                            ignore=(), instead: str = "start a new run in another logging.save_dir") -> None:
    """Raise CheckpointError listing every setting under the ``keys`` prefixes (dotted, e.g.
    ``model`` or ``data.seq_len``) whose value differs between the checkpoint and this run (but
    the keys under an ``ignore`` prefix); ``instead``: what else the user can do."""
    saved, current = _plain(saved_config), _plain(config)
    diffs = []
    for prefix in keys:
        a = flatten_keys(_get_dotted(saved, prefix), prefix)
        b = flatten_keys(_get_dotted(current, prefix), prefix)
        for key in sorted(set(a) | set(b)):
            if any(key == p or key.startswith(p + ".") for p in ignore):
                continue
            va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
            if va is _ABSENT or vb is _ABSENT or va != vb or (type(va) is bool) != (type(vb) is bool):
                diffs.append(f"  {key}: checkpoint {_show(va)}, config {_show(vb)}")
    if diffs:
        where = f"Checkpoint {checkpoint}" if checkpoint is not None else "The checkpoint"
        raise CheckpointError(
            f"{where} was saved with different settings than this run:\n" + "\n".join(diffs) + "\n"
            f"Resume with the same {', '.join(keys)} settings as the checkpoint (see its {CONFIG_FILE}), "
            f"or {instead}."
        )


# ----------------------------------------------------------------------------------------------
# Weights (safetensors)


def _split_shared(state: dict, where: str) -> tuple[dict, dict]:
    """Tensors to write (each with its own storage) and {alias: stored name} for tied ones.

    safetensors refuses tensors that share memory. Entries that are the very same view
    (tied embedding / head) are stored once; any other overlap is cloned apart.
    """
    tensors, tied, first, used = {}, {}, {}, set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{where}.state_dict() entry {key!r} is a {type(value).__name__}; "
                f"{where} weights are stored in safetensors, which holds tensors only"
            )
        if value.device.type == "meta":
            raise ValueError(f"{where}.state_dict() entry {key!r} is on the meta device and has no data to save")
        ptr = value.untyped_storage().data_ptr()
        view = (value.device, ptr, value.storage_offset(), tuple(value.shape), value.stride(), value.dtype)
        if ptr and view in first:
            tied[key] = first[view]
            continue
        first[view] = key
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()  # a fresh storage of its own
        t = t.contiguous()
        p = t.untyped_storage().data_ptr()
        if p in used or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        used.add(t.untyped_storage().data_ptr())
        tensors[key] = t
    return tensors, tied


def _save_weights(file: Path, module: torch.nn.Module, where: str) -> None:
    tensors, tied = _split_shared(module.state_dict(), where)
    save_file(tensors, str(file), metadata={"format": "pt", "tied": json.dumps(tied, sort_keys=True)})


def _load_weights(file: Path, module: torch.nn.Module) -> None:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tied = json.loads(metadata.get("tied", "{}"))
    except Exception as e:  # safetensors raises its own error types for a damaged header or body
        raise CheckpointError(f"{file} cannot be read as safetensors ({e}); it is truncated or corrupted.") from e

    for alias, stored in tied.items():
        if alias not in tensors and stored in tensors:
            tensors[alias] = tensors[stored]
    target = module.state_dict()
    # Names this model ties together but the file stored under a sibling name.
    groups = collections.defaultdict(list)
    for k, v in target.items():
        groups[(v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride())].append(k)
    for names in groups.values():
        present = [k for k in names if k in tensors]
        for k in names:
            if k not in tensors and present:
                tensors[k] = tensors[present[0]]

    problems = []
    shapes = [
        f"{k}: file {list(tensors[k].shape)} vs model {list(v.shape)}"
        for k, v in target.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    missing = [k for k in target if k not in tensors]
    unexpected = [k for k in tensors if k not in target]
    if shapes:
        problems.append("tensor shapes differ: " + _some(shapes))
    if missing:
        problems.append("missing from the file: " + _some(missing))
    if unexpected:
        problems.append("in the file but not in the model: " + _some(unexpected))
    if problems:
        raise CheckpointError(
            f"{file} does not fit the model ({'; '.join(problems)}). It was written with other model "
            "settings: resume with the same model config, or start a new run."
        )
    module.load_state_dict(tensors, strict=True)


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(module, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), torch.nn.Module):
            module = module._orig_mod
        else:
            return module


# ----------------------------------------------------------------------------------------------
# RNG


def _rng_state() -> dict:
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": {"version": int(version), "state": [int(x) for x in internal], "gauss_next": gauss_next},
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, file: Path) -> None:
    try:
        py, npy = state["python"], state["numpy"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
        np.random.set_state(
            (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
        )
        torch.set_rng_state(state["torch"].cpu())
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{file} holds no usable generator state ({type(e).__name__}: {e})") from e
    cuda = state.get("cuda")
    if cuda is None:
        return
    if not torch.cuda.is_available():
        warnings.warn(f"{file} holds CUDA generator states but CUDA is not available here; they are not restored.")
        return
    n = torch.cuda.device_count()
    if n != len(cuda):
        warnings.warn(f"{file} holds {len(cuda)} CUDA generator states but {n} devices are visible; restoring {min(n, len(cuda))}.")
    for i, s in enumerate(cuda[:n]):
        torch.cuda.set_rng_state(s.cpu(), i)


# ----------------------------------------------------------------------------------------------
# Files, manifest, helpers


def _record(file: Path) -> dict:
    """Flush ``file`` to disk and return its manifest entry."""
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
        os.fsync(f.fileno())
    return {"size": file.stat().st_size, "sha256": digest.hexdigest()}


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not sync directories
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True  # exists, owned by another user
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    return True


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"Checkpoint directory {path} does not exist.")
    if not file.is_file():
        raise CheckpointError(
            f"Checkpoint {path} has no {MANIFEST}: it is incomplete (the manifest is written last, "
            "so the save that made it did not finish)."
        )
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file} is unreadable ({e}); checkpoint {path} cannot be trusted.") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{file} is not a {FORMAT} manifest; {path} is not a checkpoint of this project.")
    return manifest


def _check_sizes(path: Path, manifest: dict) -> None:
    for fname, entry in manifest["files"].items():
        file = path / fname
        if not file.is_file():
            raise CheckpointError(f"Checkpoint {path} is incomplete: {file} is missing.")
        size = file.stat().st_size
        if size != entry.get("size"):
            raise CheckpointError(
                f"Checkpoint {path} is damaged: {file} has {size} bytes, the manifest records "
                f"{entry.get('size')} (truncated or overwritten)."
            )


def _verify(path: Path, only=None) -> None:
    """Manifest, sizes, then the sha256 of every file (or of the names in ``only``)."""
    manifest = _read_manifest(path)
    _check_sizes(path, manifest)
    for fname, entry in manifest["files"].items():
        if only is not None and fname not in only:
            continue
        file = path / fname
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != entry.get("sha256"):
            raise CheckpointError(
                f"Checkpoint {path} is corrupted: the sha256 of {file} does not match the manifest "
                f"(file {digest.hexdigest()[:16]}..., manifest {str(entry.get('sha256'))[:16]}...)."
            )


def _intact_alternative(path: Path) -> str:
    """A sentence naming the newest earlier checkpoint beside ``path`` that verifies."""
    parent = path.parent
    ckpts = list_checkpoints(parent)
    names = [p.name for p in ckpts]
    earlier = ckpts[: names.index(path.name)] if path.name in names else ckpts
    for candidate in reversed(earlier):
        try:
            _verify(candidate)
        except CheckpointError:
            continue
        full = os.path.abspath(candidate)
        return f"The earlier checkpoint {full} is intact; resume from it with training.resume={full}"
    return f"No intact earlier checkpoint was found in {parent}; restore the files from a copy or start a new run."


def _torch_load(file: Path, map_location) -> Any:
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling errors, a damaged zip archive, ...
        refused = unsafe_pickle_reason(file, e)
        if refused:
            raise CheckpointError(f"{file} {refused}. Checkpoint files may hold only tensors and plain "
                                  "Python values.") from e
        raise CheckpointError(
            f"{file} cannot be loaded ({first_line(e)}): it is truncated or corrupted. Restore it from a "
            "copy, or resume from an earlier checkpoint.") from e


_SCALARS = (type(None), bool, int, float, complex, str, bytes)
_TORCH_LEAVES = (torch.Size, torch.dtype, torch.device)


def _check_loadable(obj: Any, where: str) -> None:
    """Refuse, before saving, any value that torch.load(weights_only=True) would refuse."""
    stack = [(obj, where)]
    while stack:
        value, at = stack.pop()
        kind = type(value)
        if kind in _SCALARS or isinstance(value, _TORCH_LEAVES) or kind in (torch.Tensor, torch.nn.Parameter):
            continue
        if kind in (dict, collections.OrderedDict):
            for k, v in value.items():
                stack.append((k, f"{at} key {k!r}"))
                stack.append((v, f"{at}[{k!r}]"))
        elif kind in (list, tuple, set):
            stack.extend((v, f"{at}[{i}]") for i, v in enumerate(value))
        else:
            raise TypeError(
                f"{at} is a {kind.__module__}.{kind.__qualname__}; checkpoint files hold only tensors and "
                "plain Python values (so they load with torch.load(weights_only=True)). "
                "Convert it first, e.g. a numpy array with torch.from_numpy, a numpy scalar with .item()."
            )


def _to_json(obj: Any, where: str) -> str:
    """JSON text of ``obj`` (numpy scalars become numbers); a TypeError names the offending entry."""
    stack = [(obj, where)]
    while stack:
        value, at = stack.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, (str, int, float, bool, type(None))):
                    raise TypeError(f"{where} must be JSON-serialisable: {at} has a key of type {type(k).__name__}")
                stack.append((v, f"{at}[{k!r}]"))
        elif isinstance(value, (list, tuple)):
            stack.extend((v, f"{at}[{i}]") for i, v in enumerate(value))
        elif not isinstance(value, (str, int, float, bool, type(None), np.generic)):
            kind = type(value)
            raise TypeError(
                f"{where} must be JSON-serialisable (dicts, lists, numbers, strings): {at} is a "
                f"{kind.__module__}.{kind.__qualname__}; store tensors in extra_tensors instead"
            )
    return json.dumps(obj, indent=2, default=lambda v: v.item()) + "\n"


def _config_yaml(config) -> str:
    from omegaconf import OmegaConf

    cfg = config if OmegaConf.is_config(config) else OmegaConf.create(config)
    return OmegaConf.to_yaml(cfg, resolve=True)


_ABSENT = object()


def _plain(config) -> dict:
    if config is None:
        return {}
    from omegaconf import OmegaConf

    if OmegaConf.is_config(config):
        return OmegaConf.to_container(config, resolve=True)
    return config


def _get_dotted(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def flatten_keys(node, prefix: str) -> dict:
    """``{"group.key.sub": value}`` of a nested config mapping under ``prefix``."""
    if node is _ABSENT:
        return {}
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(flatten_keys(v, f"{prefix}.{k}"))
        return out
    return {prefix: node}


def _show(value) -> str:
    return "(absent)" if value is _ABSENT else str(value)


def _some(items: list, limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
