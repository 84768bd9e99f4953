"""Following a run: plain progress lines when the output is not a terminal, and the trainer's
callbacks (every log record, evaluation, checkpoint and the end)."""
import os
import re
import subprocess
import sys
from pathlib import Path

from rwkv_diffusion_rnn.train_rwkv import compose_config
from rwkv_diffusion_rnn.training.events import Callback, ProgressLines
from rwkv_diffusion_rnn.training.improved_trainer import Trainer, read_train_log

ROOT = Path(__file__).resolve().parents[1]
TINY = ["experiment=struct", "model.n_layer=1", "model.n_embd=64", "training.train_batch_size=16",
        "data.eval_size=16", "eval.sample_steps=4"]
LINE = re.compile(r"^step (\d+)/(\d+)  loss \d+\.\d{4}  \d+ tok/s  elapsed \d+m\d\ds  ETA \d+m\d\ds")


def test_output_to_a_file_gets_a_plain_line_every_log_freq_steps(tmp_path):
    out = tmp_path / "out.txt"
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    with open(out, "w") as f:       # the progress bar stays on (its default): stderr is no terminal either
        r = subprocess.run([sys.executable, "-m", "rwkv_diffusion_rnn.train_rwkv", *TINY, "training.max_steps=10",
                            "logging.log_freq=3", "logging.eval_freq=0", f"logging.save_dir={tmp_path / 'run'}",
                            f"hydra.run.dir={tmp_path / 'hydra'}"],
                           cwd=ROOT, env=env, stdout=f, stderr=subprocess.PIPE, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    text = out.read_text()
    lines = [line for line in text.splitlines() if line.startswith("step ")]
    assert all(LINE.match(line) for line in lines), lines
    assert [int(LINE.match(line)[1]) for line in lines] == [3, 6, 9, 10]    # every 3 steps, and the last
    assert {LINE.match(line)[2] for line in lines} == {"10"}
    assert "\r" not in text and "\r" not in r.stderr                       # no bar redrawn into the files


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_begin(self, trainer):
        self.events.append(("begin", trainer.global_step))

    def on_record(self, trainer, record):
        self.events.append(("record", record))

    def on_evaluation(self, trainer, metrics):
        self.events.append(("evaluation", trainer.global_step, dict(metrics)))

    def on_save(self, trainer, path):
        self.events.append(("save", path.name))

    def on_end(self, trainer, metrics):
        self.events.append(("end", dict(metrics)))


def test_a_callback_receives_every_logged_record_evaluation_save_and_the_end(tmp_path):
    cfg = compose_config([*TINY, "logging.progress_bar=false", "training.max_steps=8", "logging.log_freq=2",
                          "logging.eval_freq=4", "logging.save_every=3", f"logging.save_dir={tmp_path}"])
    rec = Recorder()
    metrics = Trainer(cfg, callbacks=[rec]).train()
    kinds = [e[0] for e in rec.events]
    assert kinds[0] == "begin" and rec.events[0][1] == 0 and kinds[-1] == "end" and kinds.count("end") == 1
    records = [e[1] for e in rec.events if e[0] == "record"]
    assert records == read_train_log(tmp_path) and [r["step"] for r in records] == [2, 4, 6, 8]
    evaluations = [e[1:] for e in rec.events if e[0] == "evaluation"]
    assert [step for step, _ in evaluations] == [4, 8]
    assert evaluations[0][1] == {k: v for k, v in records[1].items() if k.startswith("struct_")}
    assert [e[1] for e in rec.events if e[0] == "save"] == ["step_0000003", "step_0000006", "step_0000008"]
    assert rec.events[-1][1] == metrics
    # the last step's record comes after its checkpoint and evaluation
    assert kinds[-4:] == ["save", "evaluation", "record", "end"]


def test_progress_line_names_evaluation_metrics_and_the_eta(capsys):
    class Run:
        global_step, total_steps = 10, 40
    lines = ProgressLines()
    lines.on_begin(Run())
    lines.t0 -= 30.0                 # 30 s for the 10 steps since the start: 60 s for the 20 left
    lines.on_record(Run(), {"step": 20, "epoch": 0, "loss": 1.5, "lr": 1e-3, "tokens_per_s": 1234.4,
                            "val_nelbo": 2.25})
    out = capsys.readouterr().out
    assert out.startswith("step 20/40  loss 1.5000  1234 tok/s  elapsed 0m30s  ETA 1m00s") and "val_nelbo=2.25" in out


def test_wandb_gets_the_config_every_record_and_the_final_metrics(tmp_path, monkeypatch):
    """logging.wandb=true, with a stand-in for the wandb package."""
    import types
    calls = {"log": [], "summary": {}, "finished": 0}

    class Run:
        summary = calls["summary"]

        def log(self, record, step):
            calls["log"].append((step, record))

        def finish(self):
            calls["finished"] += 1

    def init(project, mode, dir, config):
        calls["init"] = (project, mode, dir, config)
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    cfg = compose_config([*TINY, "logging.progress_bar=false", "training.max_steps=4", "logging.log_freq=2",
                          "logging.eval_freq=0", "logging.wandb=true", f"logging.save_dir={tmp_path}"])
    metrics = Trainer(cfg).train()
    project, mode, folder, config = calls["init"]
    assert (project, mode, folder) == ("rwkv_diffusion_rnn", "offline", str(tmp_path))
    assert config["training"]["max_steps"] == 4
    assert [r for _, r in calls["log"]] == read_train_log(tmp_path) and [s for s, _ in calls["log"]] == [2, 4]
    assert calls["summary"] == metrics and calls["finished"] == 1


def test_other_commands_off_a_terminal_print_a_line_first_then_every_30_s_and_at_the_end(monkeypatch):
    """events.progress (evaluate, generate, the demo's evaluation) when the output is a file."""
    import io
    from rwkv_diffusion_rnn.training import events
    clock = iter([0.0, 1.0, 2.0, 31.0, 32.0, 33.0, 40.0])    # the start, then one reading per batch
    monkeypatch.setattr(events.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    assert list(events.progress(range(6), desc="evaluate", stream=out)) == list(range(6))
    assert out.getvalue().splitlines() == ["evaluate: 1/6 batches  0m01s  ETA 0m05s",     # the first
                                           "evaluate: 3/6 batches  0m31s  ETA 0m31s",     # 30 s after it
                                           "evaluate: 6/6 batches  0m40s  ETA 0m00s"]     # the end
