"""Faults and bad input, tried against the real command lines: one table of what each does.

    .venv/bin/python eval/fault_table.py [--json out.json] [--only SUBSTRING ...] [--keep]

Each case makes its own tiny data in a temporary folder (never in the repository), provokes one
fault (a diverging run, two runs in one folder, a SIGKILL at a random moment, a damaged file, a
bad token id, a text that is not valid Unicode, a full disk, ...) and classifies what happened
into exactly one outcome:

    clear error   exit code != 0, and the message names the file / key / step and the fix (the
                  case's expected phrases), with no "Traceback"
    handled       the run does the right thing without an error (and says so where it should)
    traceback     a Python traceback on stderr, or (in-process cases) an exception that is not
                  one of the project's own error types escaped
    silent        the wrong thing without a message: bad input accepted, a result that differs,
                  or an error whose message lacks what the case expects it to say
    not tried     the case could not be set up (the reason is given)

plus a separate "data lost" column (yes / no) that the case checks itself: the previous
checkpoint still verifies, the old dataset files are intact, the log records are kept, ...

The command lines run as subprocesses (``OMP_NUM_THREADS=1``, ``HF_HUB_OFFLINE=1``, training runs
with ``hydra.run.dir`` in the temporary folder). A full disk cannot be provoked safely, so those
two cases patch the writer inside this process and call the library's training loop. Setup runs
(a base run whose checkpoints several cases damage, the uninterrupted reference of the SIGKILL
case) are in-process too, to keep the whole table under about five minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CLEAR, HANDLED, TRACEBACK, SILENT, NOT_TRIED = "clear error", "handled", "traceback", "silent", "not tried"
OUTCOMES = (CLEAR, HANDLED, TRACEBACK, SILENT, NOT_TRIED)

# The tiny synthetic run every trainer case starts from (tests/test_train_faults.py).
TINY = ["experiment=struct", "model.n_layer=1", "model.n_embd=64", "training.train_batch_size=16",
        "data.eval_size=16", "eval.sample_steps=4", "logging.progress_bar=false", "logging.log_freq=1",
        "logging.eval_freq=0", "optimizer.warmup_steps=2"]
LONG = ["training.max_steps=100000"]        # a run that is still running when the case needs it
LATENT = 4                                  # latent size of the text + latent cases
VOCAB, MASK = 64, 63                        # vocabulary of the hand-made token files


@dataclass
class Row:
    case: str
    done: str
    outcome: str
    lost: str
    message: str
    seconds: float = 0.0
    detail: str = ""            # the whole message (the table shows its first 100 characters)


@dataclass
class Res:
    rc: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + "\n" + self.err


class NotTried(Exception):
    """The case cannot be set up; its reason goes into the table."""


# ------------------------------------------------------------------------------------------ helpers

def env() -> dict:
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def strict_json(text: str):
    """json.loads that refuses the NaN / Infinity Python writes by default (not JSON)."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def first_error_line(text: str) -> str:
    """What says what went wrong: the last 'error:' message, else a traceback's exception line,
    else the last non-empty line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errs = [i for i, ln in enumerate(lines) if ln.startswith("error:")]
    if errs:                        # the message runs to the end (some list one setting a line)
        return " ".join(lines[errs[-1]:])[len("error:"):].strip()
    if "Traceback" in text:         # the exception line, not Hydra's note after it
        raised = [ln for ln in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*:", ln)]
        if raised:
            return raised[-1]
    return lines[-1] if lines else ""


def excerpt(text: str, limit: int = 100) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def missing_phrase(text: str, phrases) -> str | None:
    low = text.lower()
    return next((p for p in phrases if p.lower() not in low), None)


def judge_refusal(res: Res, phrases) -> tuple[str, str]:
    """A command line that should refuse: (outcome, message)."""
    if "Traceback" in res.err:
        return TRACEBACK, first_error_line(res.err)
    if res.rc == 0:
        return SILENT, "exit 0: " + (first_error_line(res.out) or "no message")
    miss = missing_phrase(res.err, phrases)
    if miss is not None:
        return SILENT, f"exit {res.rc}, message lacks {miss!r}: {first_error_line(res.err)}"
    return CLEAR, first_error_line(res.err)


def judge_handled(res: Res, ok: bool, why: str, phrases=(), say: str | None = None) -> tuple[str, str]:
    """A command line that should do the right thing: (outcome, message). ``ok``: the case's check
    of the result; ``phrases``: what its output must say; ``say``: the message to show."""
    if "Traceback" in res.err:
        return TRACEBACK, first_error_line(res.err)
    if res.rc != 0:
        return CLEAR, f"exit {res.rc}: {first_error_line(res.err)}"
    miss = missing_phrase(res.text, phrases)
    if not ok:
        return SILENT, why
    if miss is not None:
        return SILENT, f"no message saying {miss!r}"
    return HANDLED, say or why


def project_errors() -> tuple:
    from rwkv_diffusion_rnn.common.errors import CheckpointError, ConfigError, DataFormatError, LatentPrepError, RunLockedError, TrainingDiverged
    return (CheckpointError, DataFormatError, ConfigError, LatentPrepError, RunLockedError, TrainingDiverged)


def judge_exception(exc: BaseException | None, phrases) -> tuple[str, str]:
    """An in-process call that should raise one of the project's errors: (outcome, message)."""
    if exc is None:
        return SILENT, "no error raised"
    if not isinstance(exc, project_errors()):
        return TRACEBACK, f"{type(exc).__name__}: {exc}"
    miss = missing_phrase(str(exc), phrases)
    if miss is not None:
        return SILENT, f"message lacks {miss!r}: {exc}"
    return CLEAR, str(exc)


def snapshot(folder: Path, skip=("run.lock",)) -> dict:
    """Every file under ``folder`` with its sha256 (what a refused run must leave unchanged)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def rewrite_manifest_entry(ckpt_dir: Path, fname: str) -> None:
    """Makes the manifest agree with ``fname`` as it now is (so the integrity check passes and
    the loader itself meets the file)."""
    man_path = ckpt_dir / "manifest.json"
    man = json.loads(man_path.read_text())
    data = (ckpt_dir / fname).read_bytes()
    man["files"][fname] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    man_path.write_text(json.dumps(man, indent=2) + "\n")


def verifies(path: Path) -> bool:
    from rwkv_diffusion_rnn.training.checkpoints import verify_checkpoint
    try:
        verify_checkpoint(path)
        return True
    except Exception:
        return False


def log_steps(save: Path) -> list:
    log = save / "train_log.jsonl"
    if not log.exists():
        return []
    out = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            out.append(json.loads(line).get("step"))
        except ValueError:
            out.append(None)
    return out


def log_losses(save: Path) -> dict:
    from rwkv_diffusion_rnn.training.improved_trainer import read_train_log
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {r["step"]: r.get("loss") for r in read_train_log(save)}


def yn(lost: bool) -> str:
    return "yes" if lost else "no"


class Ctx:
    """The temporary folder of one table run and the ways to run the command lines in it."""

    def __init__(self, tmp: Path, seed: int):
        self.tmp = tmp
        self.rand = random.Random(seed)
        self._n = 0
        self._base = None
        self.case_dirs = []

    def dir(self, name: str) -> Path:
        """A fresh folder for the case now running (shown as $D in its message)."""
        self._n += 1
        d = self.tmp / f"{self._n:02d}-{name}"
        d.mkdir(parents=True)
        self.case_dirs.append(d)
        return d

    def _hydra(self) -> str:
        self._n += 1
        return f"hydra.run.dir={self.tmp / 'hydra' / str(self._n)}"

    def train_cmd(self, args) -> list:
        return [sys.executable, "-m", "rwkv_diffusion_rnn.train_rwkv", *map(str, args), self._hydra()]

    def train(self, args, timeout=240) -> Res:
        return self.cli(self.train_cmd(args), timeout)

    def popen_train(self, args) -> subprocess.Popen:
        return subprocess.Popen(self.train_cmd(args), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def module(self, name: str, args, timeout=240) -> Res:
        return self.cli([sys.executable, "-m", f"rwkv_diffusion_rnn.{name}", *map(str, args)], timeout)

    @staticmethod
    def cli(cmd, timeout=240) -> Res:
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return Res(124, e.stdout or "", (e.stderr or "") + f"\n(timed out after {timeout} s)")
        return Res(p.returncode, p.stdout, p.stderr)

    def base(self) -> Path:
        """A finished 4-step run with checkpoints step_0000002 and step_0000004 (in-process
        setup), which the checkpoint cases copy and damage."""
        if self._base is None:
            save = self.tmp / "base"
            inprocess_train([*TINY, "training.max_steps=4", "logging.save_every=2", f"logging.save_dir={save}"])
            if not (save / "step_0000004").is_dir():
                raise NotTried("the base run left no step_0000004")
            self._base = save
        return self._base

    def copy_base(self, name: str) -> Path:
        dst = self.dir(name) / "run"
        shutil.copytree(self.base(), dst)
        return dst


def inprocess_train(overrides):
    """The trainer run in this process (setup runs and the full-disk cases); its prints are kept
    off the table. Returns what it printed."""
    from rwkv_diffusion_rnn.train_rwkv import compose_config, run
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        run(compose_config(list(overrides)))
    return buf.getvalue()


def inprocess_call(fn, *args, **kw):
    """(exception or None, stdout) of ``fn(*args, **kw)``."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            fn(*args, **kw)
    except Exception as e:  # classified by the case
        return e, buf.getvalue()
    return None, buf.getvalue()


def wait_for(cond, timeout: float, proc: subprocess.Popen | None = None, poll: float = 0.02) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(cond())
        time.sleep(poll)
    return False


def lock_owner(save: Path):
    try:
        return json.loads((save / "run.lock").read_text()).get("pid")
    except (OSError, ValueError, AttributeError):
        return None


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)


# ---- text + latent data (model-free: random embeddings, the bytes tokenizer) ----

def texts(tag: str, n: int = 12) -> list:
    return [f"{tag} sentence number {i}" for i in range(n)]


def embeddings(root: Path, n: int) -> Path:
    import numpy as np
    d = root / "emb"
    if d.is_dir() and len(list(d.glob("*.npy"))) == n:
        return d
    d.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    scale = np.linspace(3, 0.2, 16)
    for i in range(n):
        np.save(d / f"{i}.npy", (rng.normal(size=16) * scale).astype(np.float32))
    return d


def write_corpus(root: Path, lines, name="c.txt") -> Path:
    p = root / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def make_latents(root: Path, lines, overwrite=False):
    """``root/d`` from ``lines`` with random embeddings (in-process setup)."""
    from rwkv_diffusion_rnn.data.latents import prepare_latents
    corpus = write_corpus(root, lines)
    with contextlib.redirect_stderr(io.StringIO()):
        prepare_latents(corpus, "d", output_root=root, project_only=True, embeddings_dir=embeddings(root, len(lines)),
                        latent_dim=LATENT, overwrite=overwrite, show_progress=False)


def pl_args(root: Path, corpus: Path, n: int, *extra) -> list:
    return ["--input", corpus, "--name", "d", "--output_root", root, "--project_only", "--embeddings_dir",
            embeddings(root, n), "--latent_dim", LATENT, *extra]


def tokenize(root: Path, split="train"):
    from rwkv_diffusion_rnn.data.token_files import tokenize_json
    from rwkv_diffusion_rnn.data.tokenizer import ByteTokenizer
    return tokenize_json(root / "d" / f"{split}_data.json", root / "tok", ByteTokenizer(), max_length=48,
                         tokenizer_name="bytes", show_progress=False)


def tok_args(root: Path, split="train", out=None) -> list:
    return ["--json_path", root / "d" / f"{split}_data.json", "--output_dir", out or root / "tok",
            "--tokenizer", "bytes", "--max_length", "48"]


def entries(root: Path, split="train") -> list:
    return json.loads((root / "d" / f"{split}_data.json").read_text(encoding="utf-8"))


def decoded(path: Path) -> str:
    import numpy as np
    from rwkv_diffusion_rnn.data.tokenizer import ByteTokenizer
    with np.load(path, allow_pickle=False) as z:
        return ByteTokenizer().decode(z["input_ids"][z["attention_mask"].astype(bool)].tolist())


def dataset_state(root: Path, old: list, new: list) -> str:
    """'old' / 'new' when root/d is one whole dataset of those texts, else what is wrong."""
    import numpy as np
    d = root / "d"
    try:
        ents = entries(root) + entries(root, "val")
    except (OSError, ValueError) as e:
        return f"no readable dataset ({type(e).__name__})"
    got = sorted(e["text"] for e in ents)
    for e in ents:
        try:
            if np.load(d / e["latent_path"]).shape != (LATENT,):
                return f"{e['latent_path']} has the wrong shape"
        except (OSError, ValueError):
            return f"{e['latent_path']} is missing or unreadable"
    if got == sorted(old):
        return "old"
    if got == sorted(new):
        return "new"
    return "a mix of the old and new texts"


def token_files(root: Path, rows, pad_id=0, max_length=8):
    """One token file (right-padded) and latent per row of ids."""
    import numpy as np
    from rwkv_diffusion_rnn.common.files import atomic_save_npy, atomic_save_npz
    rng = np.random.default_rng(0)
    for i, ids in enumerate(rows):
        padded = np.full(max_length, pad_id, np.int32)
        padded[: len(ids)] = ids
        mask = (np.arange(max_length) < len(ids)).astype(np.uint8)
        atomic_save_npz(root / "tokens" / f"{i:08d}.npz", input_ids=padded, attention_mask=mask)
        atomic_save_npy(root / "latents" / f"{i:08d}.npy", rng.normal(size=LATENT).astype(np.float32))
    return root / "tokens", root / "latents"


def text_latent_args(save: Path, tok: Path, lat: Path, *extra) -> list:
    return ["model=scratch", f"model.vocab_size={VOCAB}", f"model.mask_id={MASK}", f"model.latent_dim={LATENT}",
            "model.n_layer=1", "model.n_embd=32", "data.json_path=null", f"data.token_dir={tok}",
            f"data.latent_dir={lat}", "data.val_fraction=0.0", "data.seq_len=8", "training.train_batch_size=2",
            "training.num_epochs=null", "training.max_steps=4", "logging.progress_bar=false", "logging.eval_freq=0",
            "logging.log_freq=1",
            "logging.save_epochs=false", f"logging.save_dir={save}", *extra]


GOOD_ROWS = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14]]


# ------------------------------------------------------------------------------------------ cases

CASES = []


def case(cid: str, title: str):
    def register(fn):
        CASES.append((cid, title, fn))
        return fn
    return register


@case("1", "divergence (optimizer.lr=1e3)")
def c_divergence(ctx: Ctx):
    from safetensors.torch import load_file
    import torch
    from rwkv_diffusion_rnn.training import checkpoints as ckpt
    save = ctx.dir("diverge") / "run"
    res = ctx.train([*TINY, "training.max_steps=30", "optimizer.lr=1e3", "logging.save_every=1",
                     "logging.keep_last=1", "training.max_bad_steps=2", f"logging.save_dir={save}"])
    outcome, msg = judge_refusal(res, ["training diverged at step", "training.resume="])
    if outcome == CLEAR and res.rc != 3:
        outcome, msg = SILENT, f"exit {res.rc}, not 3: {msg}"
    problems = []
    last = ckpt.latest_checkpoint(save)
    if last is None:
        problems.append("no checkpoint left")
    else:
        if not verifies(last):
            problems.append(f"{last.name} does not verify")
        else:
            w = load_file(str(last / "model.safetensors"))
            if not all(torch.isfinite(t).all() for t in w.values() if t.is_floating_point()):
                problems.append(f"{last.name} holds NaN/inf weights")
        try:
            strict_json((last / "trainer_state.json").read_text())
        except ValueError as e:
            problems.append(f"trainer_state.json is not strict JSON ({e})")
    try:
        [strict_json(ln) for ln in (save / "train_log.jsonl").read_text().splitlines()]
    except (OSError, ValueError) as e:
        problems.append(f"train_log.jsonl is not strict JSON ({e})")
    if problems and outcome == CLEAR:
        msg = "; ".join(problems) + " | " + msg
    return "30 steps at lr 1e3, save_every=1, max_bad_steps=2", outcome, yn(bool(problems)), msg


@case("2", "two runs into one save_dir at once")
def c_two_runs(ctx: Ctx):
    save = ctx.dir("two-runs") / "run"
    a = ctx.popen_train([*TINY, *LONG, f"logging.save_dir={save}"])
    try:
        if not wait_for(lambda: lock_owner(save) == a.pid, 120, a):
            raise NotTried("the first run never took run.lock")
        a.send_signal(signal.SIGSTOP)       # paused, lock held: the second run gets the CPU
        res = ctx.train([*TINY, "training.max_steps=2", f"logging.save_dir={save}"])
        a_alive, owner = a.poll() is None, lock_owner(save)
        ckpts = sorted(p.name for p in save.glob("step_*"))
    finally:
        stop(a)
    outcome, msg = judge_refusal(res, [f"pid {a.pid}", "another training run"])
    steps = log_steps(save)
    lost = not a_alive or owner != a.pid or bool(ckpts) or steps != list(range(1, len(steps) + 1))
    return "a long run (paused, lock held), then a second run into its folder", outcome, yn(lost), msg


@case("3", "two training.resume=latest at once")
def c_two_resumes(ctx: Ctx):
    save = ctx.dir("two-resumes") / "run"
    inprocess_train([*TINY, *LONG, "training.stop_at_step=2", f"logging.save_dir={save}"])
    first = save / "step_0000002"
    common = [*TINY, *LONG, "training.resume=latest", f"logging.save_dir={save}"]
    r1 = ctx.popen_train(common)
    try:
        if not wait_for(lambda: lock_owner(save) == r1.pid, 120, r1):
            raise NotTried("the first resume never took run.lock")
        r1.send_signal(signal.SIGSTOP)
        res = ctx.train(common)
        alive = r1.poll() is None
    finally:
        stop(r1)
    outcome, msg = judge_refusal(res, [f"pid {r1.pid}", "another training run"])
    steps = log_steps(save)
    lost = not alive or not verifies(first) or steps != list(range(1, len(steps) + 1))
    return "resume=latest, and again while the first holds the lock", outcome, yn(lost), msg


@case("4", "stale lock of a SIGKILLed run")
def c_stale_lock(ctx: Ctx):
    from rwkv_diffusion_rnn.training import checkpoints as ckpt
    save = ctx.dir("stale-lock") / "run"
    a = ctx.popen_train([*TINY, *LONG, "logging.save_every=2", f"logging.save_dir={save}"])
    try:
        ok = wait_for(lambda: lock_owner(save) == a.pid and ckpt.latest_checkpoint(save) is not None, 120, a)
    finally:
        stop(a)
    if not ok or lock_owner(save) != a.pid:
        raise NotTried("the run was not holding run.lock with a checkpoint when killed")
    last = ckpt.latest_checkpoint(save)
    step = ckpt.read_trainer_state(last)["global_step"]
    res = ctx.train([*TINY, *LONG, "training.resume=latest", f"training.stop_at_step={step + 1}",
                     f"logging.save_dir={save}"])
    steps = log_steps(save)
    ok = steps == list(range(1, step + 2)) and (save / f"step_{step + 1:07d}").is_dir()
    lost = not verifies(last) or steps[: step] != list(range(1, step + 1))
    outcome, msg = judge_handled(res, ok, f"log steps {steps}, expected 1..{step + 1}",
                                 ["taking over the lock", f"pid {a.pid}"])
    if outcome == HANDLED:
        msg = next((ln for ln in res.out.splitlines() if "taking over" in ln), msg)
    return f"SIGKILL after {last.name}, then resume=latest", outcome, yn(lost), msg


@case("5", "prepare_latents --overwrite, then the tokenizer CLI")
def c_retokenize(ctx: Ctx):
    root = ctx.dir("retokenize")
    make_latents(root, texts("old"))
    tokenize(root)
    new = texts("old")
    new[1], new[5], new[9] = "a new first text", "a new fifth text", "a new ninth text"
    r1 = ctx.module("prepare_latents", pl_args(root, write_corpus(root, new, "c2.txt"), len(new), "--overwrite"))
    if r1.rc != 0:
        outcome, msg = judge_handled(r1, False, "")
        return "3 texts changed; prepare_latents --overwrite", outcome, "no", msg
    res = ctx.module("preprocess_tokenize_text", tok_args(root))
    ents = entries(root)
    wrong = [e["id"] for e in ents if not (root / "tok" / "train" / f"{e['id']}.npz").is_file()
             or decoded(root / "tok" / "train" / f"{e['id']}.npz") != e["text"]]
    n_changed = sum(e["text"].startswith("a new") for e in ents)
    info = json.loads((root / "tok" / "train" / "tokens_info.json").read_text())
    ok = not wrong and info.get("complete") is True
    outcome, msg = judge_handled(res, ok, f"token files {wrong} do not hold their new text",
                                 [f"{n_changed} rewritten because their text changed"], say=res.out.strip())
    return "3 texts changed; --overwrite, then tokenizer CLI again", outcome, yn(bool(wrong)), msg


@case("6", "token files older than the data list")
def c_stale_tokens(ctx: Ctx):
    root = ctx.dir("stale-tokens")
    make_latents(root, texts("old"))
    tokenize(root)
    make_latents(root, texts("new"), overwrite=True)        # ...and the tokenizer not re-run
    first = entries(root)[0]
    before = snapshot(root / "tok")
    save = root / "run"
    res = ctx.train(["model=scratch", "tokenizer.name=bytes", f"model.latent_dim={LATENT}", "model.n_layer=1",
                     "model.n_embd=32", f"data.json_path={root / 'd' / 'train_data.json'}",
                     f"data.token_dir={root / 'tok' / 'train'}", f"data.latent_dir={root / 'd' / 'latents' / 'train'}",
                     "data.val_fraction=0.0", "data.seq_len=48", "training.train_batch_size=4",
                     "training.num_epochs=null", "training.max_steps=2", "logging.progress_bar=false",
                     "logging.eval_freq=0", f"logging.save_dir={save}"])
    outcome, msg = judge_refusal(res, [f"{first['id']}.npz", "made from another text", "preprocess_tokenize_text"])
    lost = snapshot(root / "tok") != before
    return "new corpus, tokenizer not re-run, then train", outcome, yn(lost), msg


@case("7", "SIGKILL during prepare_latents --overwrite")
def c_kill_prepare(ctx: Ctx):
    root = ctx.dir("kill-prepare")
    n = 1500
    old, new = texts("old", n), texts("new", n)
    make_latents(root, old)
    write_corpus(root, new, "c2.txt")
    staging = root / ".d.new"
    states, kills, problems, estimate = [], 0, [], None
    for attempt in range(2):
        cmd = [sys.executable, "-m", "rwkv_diffusion_rnn.prepare_latents",
               *map(str, pl_args(root, root / "c2.txt", n, "--overwrite"))]
        p = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: staging.exists(), 60, p, poll=0.002)
        t_staging = time.time()
        if attempt == 0:        # when a random share of the new latent files is written
            frac = ctx.rand.uniform(0.1, 0.9)

            def written():
                try:
                    return sum(1 for _ in os.scandir(staging / "latents" / "train")) >= frac * 0.9 * n
                except OSError:
                    return False
            wait_for(written, 60, p, poll=0.002)
            estimate = (time.time() - t_staging) / frac
        else:                   # at a random moment of the whole write, the lists and the swap
            time.sleep(ctx.rand.uniform(0.0, 1.3 * (estimate or 1.0)))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        leftover = staging.exists() or (root / ".d.old").exists()
        # the next run tidies up what the kill left (and then refuses: the dataset exists)
        tidy = ctx.module("prepare_latents", pl_args(root, root / "c.txt", n))
        if "Traceback" in tidy.err:
            return f"{kills} SIGKILLs, then the next run", TRACEBACK, "no", first_error_line(tidy.err)
        if leftover and not any(w in tidy.err for w in ("deleted", "restored")):
            problems.append("the next run tidied up without saying so")
        states.append(dataset_state(root, old, new))
        if states[-1] == "new":                 # start again from the old dataset
            shutil.rmtree(root / "d")
            make_latents(root, old)
    left = [s.name for s in (staging, root / ".d.old") if s.exists()]
    bad = [s for s in states if s not in ("old", "new")]
    lost = bool(bad) or bool(left)
    msg = f"after each kill the dataset was whole: {', '.join(states)}"
    if left:
        problems.append(f"left behind: {', '.join(left)}")
    outcome = SILENT if lost or problems else HANDLED
    return (f"{kills} of 2 runs SIGKILLed at random moments, {n} texts", outcome, yn(lost),
            "; ".join([*problems, msg]))


def bad_id_case(ctx: Ctx, name: str, bad: int, phrases_of):
    root = ctx.dir(name)
    rows = [list(r) for r in GOOD_ROWS]
    rows[1][3] = bad
    tok, lat = token_files(root, rows, pad_id=0)
    before = snapshot(root)
    res = ctx.train(text_latent_args(root / "run", tok, lat))
    outcome, msg = judge_refusal(res, phrases_of(tok / "00000001.npz"))
    after = {k: v for k, v in snapshot(root).items() if not k.startswith("run/")}
    return outcome, yn(after != before), msg


@case("8", "token id >= vocab in a training .npz")
def c_id_too_big(ctx: Ctx):
    outcome, lost, msg = bad_id_case(ctx, "id-too-big", VOCAB, lambda f: [
        f"{f}: input_ids[3] = {VOCAB}", "outside the vocabulary", f"model.vocab_size={VOCAB}"])
    return f"id {VOCAB} (vocab {VOCAB}) in 1 of 4 files", outcome, lost, msg


@case("9", "negative token id")
def c_id_negative(ctx: Ctx):
    outcome, lost, msg = bad_id_case(ctx, "id-negative", -1, lambda f: [
        f"{f}: input_ids[3] = -1", "outside the vocabulary"])
    return "id -1 in 1 of 4 files", outcome, lost, msg


@case("10", "bad id only in the validation split")
def c_id_in_val(ctx: Ctx):
    root = ctx.dir("id-in-val")
    tok, lat = token_files(root / "train", GOOD_ROWS)
    vtok, vlat = token_files(root / "val", [[1, 2], [3, 70]])
    save = root / "run"
    res = ctx.train(text_latent_args(save, tok, lat, f"data.val_token_dir={vtok}", f"data.val_latent_dir={vlat}"))
    outcome, msg = judge_refusal(res, [f"{vtok / '00000001.npz'}: input_ids[1] = 70", "outside the vocabulary"])
    if outcome == CLEAR and log_steps(save):
        outcome, msg = SILENT, f"refused only after {len(log_steps(save))} training steps: {msg}"
    return "id 70 in a validation file, training files fine", outcome, "no", msg


@case("11", "the mask id in the data")
def c_mask_id(ctx: Ctx):
    outcome, lost, msg = bad_id_case(ctx, "mask-id", MASK, lambda f: [
        f"{f}: input_ids[3] = {MASK}", "model.mask_id"])
    return f"id {MASK} = model.mask_id in 1 of 4 files", outcome, lost, msg


def full_disk_case(ctx: Ctx, name: str, patch, phrases):
    """A run whose second checkpoint hits a full disk (``patch`` arms it in this process)."""
    from rwkv_diffusion_rnn.training import checkpoints as ckpt
    save = ctx.dir(name) / "run"
    undo = patch()
    try:
        exc, _ = inprocess_call(inprocess_train, [*TINY, "training.max_steps=3", "logging.save_every=1",
                                                  f"logging.save_dir={save}"])
    finally:
        undo()
    outcome, msg = judge_exception(exc, phrases)
    first = save / "step_0000001"
    lost = (not verifies(first) or ckpt.latest_checkpoint(save) != first or bool(list(save.glob(".tmp-*")))
            or log_steps(save) != [1, 2])
    return outcome, yn(lost), msg


@case("12", "disk full while writing the weights")
def c_disk_full_weights(ctx: Ctx):
    from rwkv_diffusion_rnn.training import checkpoints as ckpt
    calls = []

    def patch():
        real = ckpt.save_file

        def full(tensors, filename, metadata=None):
            calls.append(filename)
            if len(calls) == 2:     # step 2's model.safetensors: half written, then ENOSPC
                Path(filename).write_bytes(b"\0" * 4096)
                raise OSError(errno.ENOSPC, "No space left on device", str(filename))
            return real(tensors, filename, metadata=metadata)
        ckpt.save_file = full
        return lambda: setattr(ckpt, "save_file", real)
    outcome, lost, msg = full_disk_case(ctx, "disk-full-weights", patch,
                                        ["no space left", "model.safetensors", "step_0000001", "training.resume="])
    return "in-process: step 2's safetensors write fails with ENOSPC", outcome, lost, msg


@case("13", "disk full while writing optimizer.pt")
def c_disk_full_optimizer(ctx: Ctx):
    import torch
    calls = []

    def patch():
        real_save, real_usage = torch.save, shutil.disk_usage
        state = {"full": False}

        def full(obj, f, *a, **kw):
            if Path(str(f)).name == "optimizer.pt":
                calls.append(f)
                if len(calls) == 2:  # what torch's zip writer says when the disk is full
                    state["full"] = True
                    Path(f).write_bytes(b"PK\x03\x04" + b"\0" * 2048)
                    raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed "
                                       "writing file data/3: file write failed")
            return real_save(obj, f, *a, **kw)

        def usage(path):
            u = real_usage(path)
            return u._replace(free=512 * 1024) if state["full"] else u
        torch.save, shutil.disk_usage = full, usage

        def undo():
            torch.save, shutil.disk_usage = real_save, real_usage
        return undo
    outcome, lost, msg = full_disk_case(ctx, "disk-full-optimizer", patch,
                                        ["no space left", "optimizer.pt", "step_0000001", "training.resume="])
    return "in-process: step 2's optimizer.pt write fails, 512 KiB free", outcome, lost, msg


@case("14", "resume with another training.train_batch_size")
def c_resume_batch(ctx: Ctx):
    save = ctx.copy_base("resume-batch")
    before = snapshot(save)
    res = ctx.train([*TINY, "training.max_steps=6", "training.resume=latest", "training.train_batch_size=8",
                     f"logging.save_dir={save}"])
    outcome, msg = judge_refusal(res, ["training.train_batch_size", "16", "8"])
    return "resume=latest train_batch_size=8 (saved 16)", outcome, yn(snapshot(save) != before), msg


@case("15", "invalid YAML in a checkpoint's config.yaml, then resume")
def c_bad_yaml(ctx: Ctx):
    save = ctx.copy_base("bad-yaml")
    newest = save / "step_0000004"
    (newest / "config.yaml").write_text("model: {n_layer: 1\ntraining: [resume\n  : -\n", encoding="utf-8")
    rewrite_manifest_entry(newest, "config.yaml")
    before = snapshot(save)
    res = ctx.train([*TINY, "training.max_steps=6", "training.resume=latest", f"logging.save_dir={save}"])
    outcome, msg = judge_refusal(res, [str(newest / "config.yaml")])
    lost = snapshot(save) != before or not verifies(save / "step_0000002")
    return "config.yaml made invalid (manifest rewritten), resume=latest", outcome, yn(lost), msg


@case("16", "lone surrogate in a JSONL given to prepare_latents")
def c_surrogate_prepare(ctx: Ctx):
    root = ctx.dir("surrogate-prepare")
    make_latents(root, texts("old"))
    before = snapshot(root / "d")
    corpus = root / "c.jsonl"
    corpus.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": "ab \\ud800 cd"}\n', encoding="utf-8")
    res = ctx.module("prepare_latents", pl_args(root, corpus, 3, "--overwrite"))
    outcome, msg = judge_refusal(res, [f"{corpus}: line 3", "not valid unicode"])
    lost = snapshot(root / "d") != before or (root / ".d.new").exists()
    return '"\\ud800" on line 3, --overwrite over a dataset', outcome, yn(lost), msg


@case("17", "lone surrogate given to the tokenizer CLI")
def c_surrogate_tokenizer(ctx: Ctx):
    root = ctx.dir("surrogate-tokenizer")
    make_latents(root, texts("old"))
    tokenize(root)
    before = snapshot(root / "tok")
    js = root / "d" / "train_data.json"
    ents = entries(root)
    ents[2]["text"] = "x\ud800y"
    js.write_text(json.dumps(ents), encoding="utf-8")      # ensure_ascii: stored as a \ud800 escape
    res = ctx.module("preprocess_tokenize_text", tok_args(root))
    fresh = ctx.module("preprocess_tokenize_text", tok_args(root, out=root / "fresh"))
    phrases = [f"{js}: entry 2", "not valid unicode"]
    outcome, msg = judge_refusal(res, phrases)
    outcome2, msg2 = judge_refusal(fresh, phrases)
    if outcome == CLEAR and outcome2 != CLEAR:
        outcome, msg = outcome2, "fresh output dir: " + msg2
    info = root / "fresh" / "train" / "tokens_info.json"
    claims = info.exists() and json.loads(info.read_text()).get("complete") is True
    lost = snapshot(root / "tok") != before or claims
    return "entry 2 made \"x\\ud800y\"; existing and fresh output dir", outcome, yn(lost), msg


@case("18", "lone surrogate in a data=text corpus")
def c_surrogate_corpus(ctx: Ctx):
    root = ctx.dir("surrogate-corpus")
    src = root / "c.jsonl"
    src.write_text('{"text": "hello there general kenobi"}\n{"text": "\\ud800 abc"}\n', encoding="utf-8")
    save = root / "run"
    res = ctx.train(["model=scratch", "data=text", f"data.path={src}", f"data.cache_dir={root / 'cache'}",
                     "tokenizer.name=chars", "data.seq_len=8", "model.latent_prefix_len=0", "model.n_layer=1",
                     "model.n_embd=32", "training.max_steps=2", "training.num_epochs=null",
                     "logging.progress_bar=false", "logging.eval_freq=0", f"logging.save_dir={save}"])
    outcome, msg = judge_refusal(res, [f"{src}:2", "not valid unicode"])
    return '"\\ud800" on line 2, trainer CLI', outcome, yn(bool(log_steps(save))), msg


@case("19a", "legacy-format pickle as the pretrained weights")
def c_legacy_pretrained(ctx: Ctx):
    import torch
    from rwkv_diffusion_rnn.weights.pretrained_rwkv import load_rwkv7, random_blinkdl_state_dict
    root = ctx.dir("legacy-pretrained")
    sd = random_blinkdl_state_dict(n_layer=1, n_embd=64, head_size=32, vocab_size=VOCAB, include_layer0_v=False)
    pth = root / "rwkv7-legacy.pth"
    torch.save(sd, pth, _use_new_zipfile_serialization=False)
    exc, _ = inprocess_call(load_rwkv7, pth)
    if exc is not None:
        outcome, msg = judge_exception(exc, [str(pth)])
        return "torch.save(..., _use_new_zipfile_serialization=False) .pth", outcome, "no", msg
    model = load_rwkv7(pth)
    got = model.state_dict()
    same = all(k in got and got[k].numel() == v.numel() and torch.equal(got[k].float(), v.float().reshape(got[k].shape))
               for k, v in sd.items())
    save = root / "run"
    tok, lat = token_files(root, GOOD_ROWS)
    args = [a for a in text_latent_args(save, tok, lat, "training.max_steps=2")
            if not a.startswith(("model=", "model.n_layer", "model.n_embd"))]
    res = ctx.train([f"model.rwkv_name={pth}", "tokenizer.name=null", *args])
    ok = same and log_steps(save) == [1, 2]
    outcome, msg = judge_handled(res, ok, "weights differ from the file" if not same else f"log steps {log_steps(save)}",
                                 say="load_rwkv7 reads it (same tensors); 2 steps trained with model.rwkv_name=<it>")
    return "legacy .pth: load_rwkv7, then train with model.rwkv_name", outcome, "no", msg


@case("19b", "legacy-format pickle as a checkpoint's optimizer.pt")
def c_legacy_optimizer(ctx: Ctx):
    import torch
    save = ctx.copy_base("legacy-optimizer")
    base_losses = log_losses(ctx.base())
    shutil.rmtree(save / "step_0000004")
    ck = save / "step_0000002"
    state = torch.load(ck / "optimizer.pt", weights_only=True)
    torch.save(state, ck / "optimizer.pt", _use_new_zipfile_serialization=False)
    rewrite_manifest_entry(ck, "optimizer.pt")
    res = ctx.train([*TINY, "training.max_steps=4", "training.resume=latest", f"logging.save_dir={save}"])
    losses = log_losses(save)
    ok = [losses.get(s) for s in (1, 2, 3, 4)] == [base_losses.get(s) for s in (1, 2, 3, 4)]
    outcome, msg = judge_handled(res, ok, f"losses after the resume differ: {losses} vs {base_losses}",
                                 say="resumed from it; losses of steps 3-4 equal the uninterrupted run's")
    if outcome == CLEAR and "optimizer.pt" not in msg:
        outcome = SILENT
    return "optimizer.pt re-saved in legacy format (manifest rewritten), resume", outcome, "no", msg


@case("20", "training.resume=<a file inside a checkpoint>")
def c_resume_file(ctx: Ctx):
    save = ctx.copy_base("resume-file")
    before = snapshot(save)
    f = save / "step_0000004" / "model.safetensors"
    res = ctx.train([*TINY, "training.max_steps=6", f"training.resume={f}", f"logging.save_dir={save}"])
    outcome, msg = judge_refusal(res, [str(f), "step_0000004"])
    return "resume=<ckpt>/model.safetensors", outcome, yn(snapshot(save) != before), msg


@case("21", "+training.max_step=3 (a key nothing reads)")
def c_unknown_key(ctx: Ctx):
    save = ctx.dir("unknown-key") / "run"
    res = ctx.train([*TINY, "+training.max_step=3", f"logging.save_dir={save}"])
    outcome, msg = judge_refusal(res, ["training.max_step", "did you mean training.max_steps"])
    return "+training.max_step=3", outcome, yn(save.exists() and any(save.iterdir())), msg


@case("22", "a damaged line in the middle of train_log.jsonl, then resume")
def c_damaged_log(ctx: Ctx):
    save = ctx.copy_base("damaged-log")
    log = save / "train_log.jsonl"
    lines = log.read_text().splitlines()
    lines[1] = lines[1][:25] + "\x00garbage"
    log.write_text("\n".join(lines) + "\n")
    res = ctx.train([*TINY, "training.max_steps=6", "training.resume=latest", f"logging.save_dir={save}"])
    steps = log_steps(save)
    bad = save / "train_log.bad.jsonl"
    kept_bad = bad.exists() and lines[1] in bad.read_text()
    ok = steps == [1, 3, 4, 5, 6] and kept_bad
    lost = not ({1, 3, 4} <= set(steps)) or not kept_bad
    outcome, msg = judge_handled(res, ok, f"log steps {steps}, bad line kept: {kept_bad}",
                                 ["line 2", "train_log.bad.jsonl"])
    if outcome == HANDLED:
        msg = next((ln for ln in res.out.splitlines() if "line 2" in ln), msg)
    return "line 2 of 4 damaged, resume=latest to step 6", outcome, yn(lost), msg


@case("23", "the newest checkpoint's manifest.json deleted, then resume=latest")
def c_no_manifest(ctx: Ctx):
    save = ctx.copy_base("no-manifest")
    newest, earlier = save / "step_0000004", save / "step_0000002"
    weights = (newest / "model.safetensors").read_bytes()
    (newest / "manifest.json").unlink()
    res = ctx.train([*TINY, "training.max_steps=6", "training.resume=latest", f"logging.save_dir={save}"])
    outcome, msg = judge_refusal(res, ["step_0000004", "step_0000002", "manifest.json"])
    if res.rc == 0 and "step_0000004" not in res.text:
        msg = "exit 0: resumed from step_0000002 without naming step_0000004"
    still = any(p.read_bytes() == weights for p in save.glob("step_0000004*/model.safetensors"))
    lost = not still or not verifies(earlier)
    return "manifest.json of step_0000004 deleted, resume=latest", outcome, yn(lost), msg


@case("24", "SIGKILL at 3 random moments (save_every=1), resumed each time")
def c_sigkills(ctx: Ctx):
    import torch
    from safetensors.torch import load_file
    from rwkv_diffusion_rnn.training import checkpoints as ckpt
    root = ctx.dir("sigkills")
    steps = 10
    common = [*TINY, f"training.max_steps={steps}", "logging.save_every=1", "logging.keep_last=2"]
    inprocess_train([*common, f"logging.save_dir={root / 'full'}"])
    part = root / "part"
    kills = 0
    for _ in range(3):
        extra = ["training.resume=latest"] if ckpt.latest_checkpoint(part) else []
        p = subprocess.Popen(ctx.train_cmd([*common, *extra, f"logging.save_dir={part}"]), cwd=ROOT, env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = ckpt.latest_checkpoint(part)
        wait_for(lambda: ckpt.latest_checkpoint(part) != start, 120, p, poll=0.01)
        time.sleep(ctx.rand.uniform(0.0, 0.4))           # a step, a save or a prune in progress
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
    res = ctx.train([*common, "training.resume=latest", f"logging.save_dir={part}"])
    full, resumed = log_losses(root / "full"), log_losses(part)
    same_losses = resumed == full and sorted(resumed) == list(range(1, steps + 1))
    last = f"step_{steps:07d}"
    same_weights = False
    if (part / last).is_dir():
        a, b = load_file(str(root / "full" / last / "model.safetensors")), load_file(str(part / last / "model.safetensors"))
        same_weights = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lost = sorted(resumed) != list(range(1, steps + 1)) or not (part / last).is_dir()
    outcome, msg = judge_handled(res, same_losses and same_weights,
                                 f"losses {'equal' if same_losses else 'differ'}, weights "
                                 f"{'equal' if same_weights else 'differ'} ({kills} kills)",
                                 say=f"{kills} kills; all {steps} losses and the final weights equal an uninterrupted run's")
    return f"{steps} steps, {kills} SIGKILLs, resume=latest after each", outcome, yn(lost), msg


@case("25", "a corrupted byte in model.safetensors, then resume")
def c_corrupt_weights(ctx: Ctx):
    save = ctx.copy_base("corrupt-weights")
    newest, earlier = save / "step_0000004", save / "step_0000002"
    w = newest / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[len(raw) - 40] ^= 0xFF                         # inside the tensor data: same size
    w.write_bytes(bytes(raw))
    res = ctx.train([*TINY, "training.max_steps=6", "training.resume=latest", f"logging.save_dir={save}"])
    outcome, msg = judge_refusal(res, [str(w), f"training.resume={earlier.resolve()}"])
    return "one byte flipped in step_0000004's weights, resume=latest", outcome, yn(not verifies(earlier)), msg


class Payload:
    """Unpickling it would create ``marker`` (a directory): what a hostile checkpoint file does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@case("26", "a pickle payload as a checkpoint's extra.pt")
def c_pickle_payload(ctx: Ctx):
    import torch
    save = ctx.copy_base("pickle-payload")
    newest = save / "step_0000004"
    marker = save.parent / "PWNED"
    torch.save({"data_rng": Payload(marker)}, newest / "extra.pt")
    rewrite_manifest_entry(newest, "extra.pt")
    res = ctx.train([*TINY, "training.max_steps=6", "training.resume=latest", f"logging.save_dir={save}"])
    outcome, msg = judge_refusal(res, [str(newest / "extra.pt"), "pickle"])
    if marker.exists():
        outcome, msg = SILENT, f"the payload ran (created {marker.name}): {msg}"
    return "extra.pt holds an os.mkdir payload (manifest rewritten)", outcome, yn(not verifies(save / "step_0000002")), msg


def save_tiny_qwen3(path: Path, vocab_size: int) -> Path:
    import torch
    from transformers import Qwen3Config, Qwen3Model
    torch.manual_seed(0)
    Qwen3Model(Qwen3Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8)).save_pretrained(path)
    return path


@case("27", "model.arch=qwen3 whose embedding is smaller than the vocabulary")
def c_qwen3_vocab(ctx: Ctx):
    root = ctx.dir("qwen3-vocab")
    qwen = save_tiny_qwen3(root / "qwen3", vocab_size=16)     # the struct task has 53 ids
    res = ctx.train([*TINY, "training.max_steps=2", "model.arch=qwen3", f"model.qwen3_name={qwen}",
                     f"logging.save_dir={root / 'run'}"])
    outcome, msg = judge_refusal(res, ["model.qwen3_name", "model.vocab_size=53", "16 rows"])
    run_dir = root / "run"
    return "a saved Qwen3 of 16 rows, the task's 53 ids", outcome, yn(run_dir.exists() and any(run_dir.iterdir())), msg


@case("28", "model.qwen3_name a folder without a model")
def c_qwen3_missing(ctx: Ctx):
    root = ctx.dir("qwen3-missing")
    (root / "empty").mkdir()
    res = ctx.train([*TINY, "training.max_steps=2", "model.arch=qwen3", f"model.qwen3_name={root / 'empty'}",
                     f"logging.save_dir={root / 'run'}"])
    outcome, msg = judge_refusal(res, ["model.qwen3_name", "config.json"])
    run_dir = root / "run"
    return "model.arch=qwen3 model.qwen3_name=<empty folder>", outcome, yn(run_dir.exists() and any(run_dir.iterdir())), msg


@case("29", "model.arch=hybrid with both attn_layers and attn_every")
def c_hybrid_keys(ctx: Ctx):
    save = ctx.dir("hybrid-keys") / "run"
    res = ctx.train([*TINY, "model.n_layer=2", "model.arch=hybrid", "model.attn_layers=[1]", "model.attn_every=2",
                     f"logging.save_dir={save}"])
    outcome, msg = judge_refusal(res, ["model.attn_layers", "model.attn_every", "exactly one"])
    return "model.attn_layers=[1] model.attn_every=2", outcome, yn(save.exists() and any(save.iterdir())), msg


def torchrun_train(ctx: Ctx, args, nproc: int = 2) -> Res:
    """A training command under ``torchrun --standalone``. torchrun ends a failed launch with its
    own report (the ranks' exit codes and the launcher's traceback); that report is cut off, so
    what is judged is what the ranks printed."""
    res = ctx.cli([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   *ctx.train_cmd(args)[1:]])
    ranks = res.err.split("] failed (exitcode:")[0]
    return Res(res.rc, res.out, ranks.rsplit("\n", 1)[0] if ranks != res.err else res.err)


@case("30", "training.parallel=fsdp without torchrun")
def c_fsdp_alone(ctx: Ctx):
    save = ctx.dir("fsdp-alone") / "run"
    res = ctx.train([*TINY, "training.parallel=fsdp", f"logging.save_dir={save}"])
    outcome, msg = judge_refusal(res, ["training.parallel=fsdp", "torchrun --nproc_per_node"])
    return "one process with training.parallel=fsdp", outcome, yn(save.exists() and any(save.iterdir())), msg


@case("31", "a global batch that does not divide over the processes")
def c_batch_not_divisible(ctx: Ctx):
    save = ctx.dir("batch-odd") / "run"
    res = torchrun_train(ctx, [*TINY, "training.train_batch_size=15", f"logging.save_dir={save}"])
    outcome, msg = judge_refusal(res, ["training.train_batch_size=15", "2 processes"])
    if res.err.count("training.train_batch_size=15") > 1:
        outcome, msg = SILENT, f"every rank printed the error: {msg}"
    return "torchrun, 2 processes, training.train_batch_size=15", outcome, yn(save.exists() and any(save.iterdir())), msg


@case("32", "a 2-process checkpoint resumed by one process")
def c_other_world_size(ctx: Ctx):
    save = ctx.dir("world-size") / "run"
    first = torchrun_train(ctx, [*TINY, "training.max_steps=2", f"logging.save_dir={save}"])
    if first.rc != 0:
        raise NotTried(f"the 2-process run failed: {first_error_line(first.err)}")
    res = ctx.train([*TINY, "training.max_steps=4", "training.resume=latest", f"logging.save_dir={save}"])
    outcome, msg = judge_refusal(res, ["2 processes", "training.resume_any_world_size=true",
                                       "--nproc_per_node=2"])
    return "torchrun 2 processes, then training.resume=latest alone", outcome, yn(not verifies(save / "step_0000002")), msg


def text_corpus(folder: Path, text: str | None = None) -> Path:
    path = folder / "corpus.txt"
    path.write_text(text if text is not None else "\n".join(["the cat sat on the mat.", "a dog ran in the park!"] * 60))
    return path


TEXT = ["experiment=shakespeare_char", "data.seq_len=16", "model.n_layer=1", "model.n_embd=32", "model.head_size=16",
        "training.train_batch_size=4", "training.max_steps=2", "logging.eval_freq=0", "eval.max_batches=1",
        "logging.progress_bar=false"]


@case("33", "a checkpoint whose config asks to run its tokenizer's code")
def c_remote_code(ctx: Ctx):
    import yaml
    save = ctx.copy_base("remote-code")
    newest = save / "step_0000004"
    marker = save.parent / "PWNED"
    evil = save.parent / "evil_tokenizer"
    evil.mkdir()
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (evil / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.Evil", None]}}))
    cfg = yaml.safe_load((newest / "config.yaml").read_text())
    cfg["tokenizer"]["trust_remote_code"] = True
    (newest / "config.yaml").write_text(yaml.safe_dump(cfg))
    (newest / "tokenizer.json").write_text(json.dumps({"kind": "hf", "name": str(evil), "vocab_size": 53,
                                                       "eos_id": 52, "mask_id": 52}))
    for name in ("config.yaml", "tokenizer.json"):
        rewrite_manifest_entry(newest, name)
    res = ctx.module("generate", [f"checkpoint={newest}", "num_samples=1", "steps=2"])
    outcome, msg = judge_refusal(res, [str(newest / "config.yaml"), "tokenizer.trust_remote_code=true"])
    if marker.exists():
        outcome, msg = SILENT, f"the tokenizer's code ran (wrote {marker.name}): {msg}"
    return "config.yaml trust_remote_code: true, tokenizer.json names a code tokenizer (manifest rewritten)", \
        outcome, "no", msg


@case("34", "a typed value out of its range")
def c_typed_value(ctx: Ctx):
    save = ctx.dir("typed") / "run"
    res = ctx.train([*TINY, "training.max_steps=2", "optimizer.betas=[2,0.9]", f"logging.save_dir={save}"])
    outcome, msg = judge_refusal(res, ["optimizer.betas=[2, 0.9]", "[0, 1)"])
    return "optimizer.betas=[2,0.9]", outcome, "no", msg


@case("35", "a value that would make a wrong run (negative gradient clip)")
def c_wrong_run_value(ctx: Ctx):
    save = ctx.dir("grad-clip") / "run"
    res = ctx.train([*TINY, "training.max_steps=2", "training.grad_clip=-1", f"logging.save_dir={save}"])
    outcome, msg = judge_refusal(res, ["training.grad_clip=-1", "positive number or null"])
    return "training.grad_clip=-1", outcome, "no", msg


@case("36", "resume with another text noise")
def c_resume_other_noise(ctx: Ctx):
    save = ctx.copy_base("resume-noise")
    res = ctx.train([*TINY, "training.max_steps=6", "training.resume=latest", "text_noise.loss_type=mdlm",
                     f"logging.save_dir={save}"])
    outcome, msg = judge_refusal(res, ["text_noise.loss_type", "training.init_from="])
    return "text_noise.loss_type=mdlm (trained llada) on training.resume=latest", outcome, \
        yn(not verifies(save / "step_0000004")), msg


@case("37", "resume with another learning rate")
def c_resume_other_lr(ctx: Ctx):
    from rwkv_diffusion_rnn.training import checkpoints as ckpt
    save = ctx.copy_base("resume-lr")
    res = ctx.train([*TINY, "training.max_steps=6", "training.resume=latest", "optimizer.lr=0.05",
                     f"logging.save_dir={save}"])
    state = ckpt.read_trainer_state(save / "step_0000006") if (save / "step_0000006").is_dir() else {}
    changes = state.get("config_changes", [])
    ok = any(c.get("key") == "optimizer.lr" and c.get("now") == 0.05 and c.get("from_step") == 4 for c in changes)
    outcome, msg = judge_handled(res, ok, f"config_changes in step_0000006: {changes}", ["optimizer.lr"],
                                 say="the new learning rate ran from step 4, recorded as config_changes")
    return "optimizer.lr=0.05 on training.resume=latest", outcome, yn(not verifies(save / "step_0000004")), msg


@case("38", "generate out= an existing file")
def c_out_exists(ctx: Ctx):
    save = ctx.base()
    out = ctx.dir("out-exists") / "samples.jsonl"
    out.write_text("keep me\n")
    res = ctx.module("generate", [f"checkpoint={save}", "num_samples=1", "steps=2", f"out={out}"])
    outcome, msg = judge_refusal(res, ["exists", "overwrite=true"])
    return "out= names a file that exists", outcome, yn(out.read_text() != "keep me\n"), msg


@case("39", "evaluate out= its own samples file")
def c_out_own_input(ctx: Ctx):
    d = ctx.dir("out-input")
    samples = d / "s.jsonl"
    samples.write_text(json.dumps({"text": "abc"}) + "\n")
    res = ctx.module("evaluate", [f"eval.samples={samples}", f"eval.scorer={ctx.base()}", f"out={samples}",
                                  "overwrite=true"])
    outcome, msg = judge_refusal(res, ["is also an input"])
    return "eval.samples=S out=S", outcome, yn(samples.read_text() != json.dumps({"text": "abc"}) + "\n"), msg


@case("40", "a read-only token cache folder")
def c_readonly_cache(ctx: Ctx):
    d = ctx.dir("ro-cache")
    cache = d / "cache"
    cache.mkdir()
    if shutil.which("unshare") is None:
        raise NotTried("no unshare to mount a read-only folder (root ignores file permissions)")
    args = [*TEXT, f"data.path={text_corpus(d)}", f"data.cache_dir={cache}", f"logging.save_dir={d / 'run'}"]
    cmd = f'mount -t tmpfs -o ro tmpfs {cache} && exec "$0" "$@"'
    res = ctx.cli(["unshare", "-rm", "sh", "-c", cmd, *ctx.train_cmd(args)])
    if "mount:" in res.err and res.rc != 0 and "cache" not in res.err.split("mount:")[0]:
        raise NotTried(f"cannot mount a read-only tmpfs here: {first_error_line(res.err)}")
    outcome, msg = judge_refusal(res, ["data.cache_dir=", "not writable"])
    return "data.cache_dir on a read-only mount", outcome, "no", msg


@case("41", "a corpus of blank lines")
def c_blank_corpus(ctx: Ctx):
    d = ctx.dir("blank")
    res = ctx.train([*TEXT, f"data.path={text_corpus(d, chr(10) * 4000)}", f"data.cache_dir={d / 'cache'}",
                     f"logging.save_dir={d / 'run'}"])
    outcome, msg = judge_refusal(res, ["corpus.txt", "distinct token"])
    return "data.path holds only blank lines", outcome, "no", msg


@case("42", "generate temperature=nan")
def c_temperature_nan(ctx: Ctx):
    res = ctx.module("generate", [f"checkpoint={ctx.base()}", "num_samples=1", "steps=2", "temperature=nan"])
    outcome, msg = judge_refusal(res, ["temperature=nan", ">= 0"])
    return "temperature=nan", outcome, "no", msg


# ------------------------------------------------------------------------------------------ driver

def run_case(ctx: Ctx, cid: str, title: str, fn) -> Row:
    t = time.time()
    ctx.case_dirs = []
    try:
        done, outcome, lost, msg = fn(ctx)
    except NotTried as e:
        done, outcome, lost, msg = "-", NOT_TRIED, "-", str(e)
    except Exception as e:  # the harness itself failed: say so instead of guessing an outcome
        tb = traceback.format_exc(limit=-2)
        done, outcome, lost, msg = "-", NOT_TRIED, "-", f"setup failed: {type(e).__name__}: {e} ({excerpt(tb, 300)})"
    msg = str(msg)
    for d in ctx.case_dirs:
        msg = msg.replace(str(d.resolve()), "$D").replace(str(d), "$D")
    msg = msg.replace(str(ctx.tmp.resolve()), "$T").replace(str(ctx.tmp), "$T")
    return Row(f"{cid} {title}", done, outcome, lost, excerpt(msg), round(time.time() - t, 1), msg[:4000])


def matches(only: str, cid: str, title: str) -> bool:
    """``--only 8`` is case 8 (``--only 19``: 19a and 19b); any other text is a substring of the
    number and title."""
    only = only.strip().lower()
    if re.fullmatch(r"\d+[a-z]?", only):
        return cid == only or (cid.startswith(only) and cid[len(only):].isalpha())
    return only in f"{cid} {title}".lower()


def md(text: str) -> str:
    return str(text).replace("|", "\\|")


def table(rows) -> str:
    out = ["| case | what was done | outcome | data lost | message excerpt |", "|---|---|---|---|---|"]
    out += [f"| {md(r.case)} | {md(r.done)} | {r.outcome} | {r.lost} | {md(r.message)} |" for r in rows]
    return "\n".join(out)


def summary(rows) -> str:
    tried = [r for r in rows if r.outcome != NOT_TRIED]
    n = {o: sum(r.outcome == o for r in rows) for o in OUTCOMES}
    lost = sum(r.lost == "yes" for r in rows)
    line = (f"{len(tried)} tried: {n[CLEAR]} clear error, {n[HANDLED]} handled, {n[TRACEBACK]} traceback, "
            f"{n[SILENT]} silent, {lost} lost")
    if n[NOT_TRIED]:
        line += f" ({n[NOT_TRIED]} not tried)"
    return line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--only", action="append", default=[],
                   help="run only the cases whose number and title contain this substring (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random kill moments")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = p.parse_args(argv)
    # before torch is first imported (by the in-process cases); the subprocesses get them from env()
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("WANDB_MODE", "disabled")
    chosen = [c for c in CASES if not args.only or any(matches(s, *c[:2]) for s in args.only)]
    if not chosen:
        p.error(f"no case matches --only {args.only}")
    tmp = Path(tempfile.mkdtemp(prefix="fault_table-"))
    ctx, rows, t0 = Ctx(tmp, args.seed), [], time.time()
    try:
        for i, (cid, title, fn) in enumerate(chosen, 1):
            print(f"[{i:2d}/{len(chosen)}] {cid} {title} ...", end="", file=sys.stderr, flush=True)
            row = run_case(ctx, cid, title, fn)
            rows.append(row)
            print(f" {row.outcome}, data lost: {row.lost} ({row.seconds:.1f} s)", file=sys.stderr, flush=True)
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(table(rows))
    print()
    print(summary(rows))
    print(f"({time.time() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
