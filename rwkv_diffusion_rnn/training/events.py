"""Following a training run from outside the loop: ``Trainer(cfg, callbacks=[...])``.

A callback overrides the hooks it needs; the trainer calls them on the process that writes the
run folder (rank 0 under torchrun), in the order the callbacks were given:

* ``on_begin(trainer)``: before the first step (after a resume, at its step);
* ``on_record(trainer, record)``: each record just appended to ``train_log.jsonl``, as written;
* ``on_evaluation(trainer, metrics)``: the metrics of each evaluation, at ``trainer.global_step``;
* ``on_save(trainer, path)``: each checkpoint written;
* ``on_end(trainer, metrics)``: when training ends (the last step, or a requested stop), with
  the metrics ``train()`` returns.

:class:`ProgressLines` prints one plain line per log record; the trainer adds it itself when the
output goes to a file or CI log rather than a terminal, where a progress bar cannot redraw.
:func:`progress` does the same for the other long commands (evaluate, generate, the demo's
evaluation): a bar on a terminal, :class:`PlainProgress` lines elsewhere.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Optional, TextIO

# The record's own fields; any other numeric field is an evaluation metric, shown in the line
RECORD_FIELDS = frozenset({"step", "epoch", "loss", "text_loss", "latent_loss", "lr", "grad_norm",
                           "tokens_per_s", "skipped_steps"})


class Callback:
    """Base of the trainer's callbacks: every hook does nothing."""

    def on_begin(self, trainer) -> None:
        pass

    def on_record(self, trainer, record: Dict[str, Any]) -> None:
        pass

    def on_evaluation(self, trainer, metrics: Dict[str, Any]) -> None:
        pass

    def on_save(self, trainer, path: Path) -> None:
        pass

    def on_end(self, trainer, metrics: Dict[str, Any]) -> None:
        pass


def output_is_terminal() -> bool:
    """Whether both stdout and stderr are terminals (neither goes to a file or a CI log)."""
    return all(getattr(s, "isatty", lambda: False)() for s in (sys.stdout, sys.stderr))


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class ProgressLines(Callback):
    """``step 40/200  loss 1.2345  812 tok/s  elapsed 0m31s  ETA 2m04s`` for each log record
    (every ``logging.log_freq`` steps, each evaluation and the last step), with the record's
    evaluation metrics. The ETA assumes the remaining steps take the mean time of those done."""

    def __init__(self, stream: Optional[TextIO] = None):
        self.stream = stream
        self.start_step = 0
        self.t0 = time.perf_counter()

    def on_begin(self, trainer) -> None:
        self.start_step, self.t0 = trainer.global_step, time.perf_counter()

    def on_record(self, trainer, record: Dict[str, Any]) -> None:
        step, total = record["step"], trainer.total_steps
        elapsed = time.perf_counter() - self.t0
        parts = [f"step {step}/{total if total is not None else '?'}"]
        loss = record.get("loss")
        parts.append(f"loss {loss:.4f}" if loss is not None else "loss n/a")
        if record.get("tokens_per_s") is not None:
            parts.append(f"{record['tokens_per_s']:.0f} tok/s")
        parts.append(f"elapsed {_duration(elapsed)}")
        done = step - self.start_step
        if total is not None and done > 0:
            parts.append(f"ETA {_duration(max(total - step, 0) * elapsed / done)}")
        evals = [f"{k}={v:.4g}" for k, v in record.items()
                 if k not in RECORD_FIELDS and isinstance(v, (int, float)) and not isinstance(v, bool)]
        if evals:
            parts.append(" ".join(evals))
        print("  ".join(parts), file=self.stream or sys.stdout, flush=True)


class PlainProgress:
    """``evaluate: 120/1742 batches  0m31s  ETA 6m40s``: the plain-line counterpart of a progress
    bar, for the long commands other than training (evaluate, generate, the demo's evaluation)
    when their output is not a terminal. A line after the first update (so a log shows the work
    started and its pace), then at most one every ``every_s`` seconds, and one at the end; the
    ETA assumes the remaining items take the mean time of those done."""

    def __init__(self, desc: str, total: Optional[int] = None, unit: str = "batches",
                 every_s: float = 30.0, stream: Optional[TextIO] = None):
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.stream = stream
        self.n = 0
        self.t0 = self.last = time.perf_counter()
        self.printed_at = None          # the count of the last line printed

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.printed_at is None or now - self.last >= self.every_s or self.n == self.total:
            self._line(now)

    def close(self) -> None:
        if self.printed_at != self.n:
            self._line(time.perf_counter())

    def _line(self, now: float) -> None:
        self.last, self.printed_at = now, self.n
        elapsed = now - self.t0
        parts = [f"{self.desc}: {self.n}/{self.total if self.total is not None else '?'} {self.unit}",
                 _duration(elapsed)]
        if self.total is not None and self.n > 0:
            parts.append(f"ETA {_duration(max(self.total - self.n, 0) * elapsed / self.n)}")
        print("  ".join(parts), file=self.stream or sys.stderr, flush=True)


def progress(items: Iterable, *, desc: str, total: Optional[int] = None, unit: str = "batches",
             bar: bool = True, every_s: float = 30.0, stream: Optional[TextIO] = None) -> Iterator:
    """``items``, reporting progress as they are consumed: a tqdm bar on a terminal (unless
    ``bar`` is false: nothing), plain :class:`PlainProgress` lines to ``stream`` (default stderr)
    otherwise, where a bar cannot redraw and a long job would look silent."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    if output_is_terminal():
        if bar:
            from tqdm.auto import tqdm
            yield from tqdm(items, total=total, desc=desc, dynamic_ncols=True)
        else:
            yield from items
        return
    lines = PlainProgress(desc, total, unit, every_s, stream)
    for item in items:
        yield item
        lines.update()
    lines.close()


class WandbLog(Callback):
    """``logging.wandb=true``: the run's config, every log record and the final metrics to a
    Weights & Biases run (``project``, ``mode``: online / offline) kept in the run folder.
    Without the wandb package the run goes on without it, saying so."""

    def __init__(self, project: str, mode: str):
        self.project, self.mode = project, mode
        self.run = None

    def on_begin(self, trainer) -> None:
        try:
            import wandb
        except ImportError:
            print("logging.wandb=true but wandb is not installed; continuing without it")
            return
        self.run = wandb.init(project=self.project, mode=self.mode, dir=str(trainer.save_dir),
                              config=trainer.config_dict)

    def on_record(self, trainer, record: Dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(record, step=record["step"])

    def on_end(self, trainer, metrics: Dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(metrics)
            self.run.finish()
            self.run = None
