"""The run folder (``logging.save_dir``) as the trainer writes it: the lock, ``train_log.jsonl``
and ``metrics.json``. Checkpoint directories inside it belong to
:mod:`~rwkv_diffusion_rnn.training.checkpoints`.

One process writes a run folder (:class:`~rwkv_diffusion_rnn.training.run_lock.RunLock`, kept as
its own module: tests and other processes take the lock without a trainer). A fresh run refuses a
folder holding another run's checkpoints; a resumed run cuts the log back to its checkpoint's
step, so that the log reads as if the run had never been interrupted. Under torchrun only rank 0
holds a :class:`RunFolder`'s lock and writes its files.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

from ..common.errors import CheckpointError
from ..common.files import atomic_write_json, atomic_write_text
from . import checkpoints as ckpt
from .run_lock import RunLock


LOG_FILE = "train_log.jsonl"
BAD_LOG_FILE = "train_log.bad.jsonl"     # damaged lines moved out of the log on resume
METRICS_FILE = "metrics.json"


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


class RunFolder:
    """The lock, log and metrics of one run folder; create it on the rank that writes."""

    def __init__(self, save_dir):
        self.save_dir = Path(save_dir)
        self.lock = RunLock(self.save_dir)

    @property
    def log_path(self) -> Path:
        return self.save_dir / LOG_FILE

    def claim(self, resumed_step: Optional[int]) -> Set[int]:
        """Takes the folder's lock. A resumed run (``resumed_step``: its checkpoint's step) has
        its log cut back to that step; a fresh run refuses a folder that holds another run's
        checkpoints. Returns the steps the log holds afterwards (empty for a fresh run)."""
        self.lock.acquire()
        if resumed_step is not None:
            return self.truncate_log(resumed_step)
        found = ckpt.list_checkpoints(self.save_dir)
        if found:
            self.lock.release()
            raise CheckpointError(
                f"logging.save_dir={self.save_dir} already holds a run (checkpoints up to {found[-1].name}); "
                "a new run there would overwrite it. Continue it with training.resume=latest, or write "
                "this run into another logging.save_dir")
        log = self.log_path
        if log.exists() and log.stat().st_size:     # a run killed before its first checkpoint
            aside = log.with_name(f"train_log.{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
            os.replace(log, aside)
            print(f"{log} of an earlier run that wrote no checkpoint moved to {aside}")
        return set()

    def release(self) -> None:
        self.lock.release()

    def truncate_log(self, step: int) -> Set[int]:
        """Drops log lines written after ``step`` (a killed run's tail) and returns the steps
        kept. A damaged line in the middle is moved to train_log.bad.jsonl and the records after
        it kept."""
        log = self.log_path
        if not log.exists():
            return set()
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
        if bad:
            # appended, not replaced: earlier resumes' damaged lines stay
            with open(self.save_dir / BAD_LOG_FILE, "a", encoding="utf-8") as f:
                f.writelines(f"{line}\n" for _, line in bad)
            print(f"{log}: line{'s' if len(bad) > 1 else ''} {', '.join(str(i) for i, _ in bad)} "
                  f"{'are' if len(bad) > 1 else 'is'} not JSON; moved to {self.save_dir / BAD_LOG_FILE}, "
                  "the records after kept")
        atomic_write_text(log, "".join(line + "\n" for line in keep))
        return kept_steps

    def append_record(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """Appends one record to the log; returns it as written (non-finite floats as None)."""
        safe = json_safe(record)
        # one write per line, so a kill cuts at most the last line (truncate_log drops it)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(safe, allow_nan=False) + "\n")
        return safe

    def write_metrics(self, metrics: Dict[str, Any]) -> None:
        atomic_write_json(self.save_dir / METRICS_FILE, json_safe(metrics), indent=2)
