"""The commands of README.md and docs/*.md run as typed, at toy size.

Every fenced ```bash block of README.md and docs/*.md is read the way a shell reads it:
backslash-continued lines are joined, comments dropped, and a line that only sets variables
(``VAR=value``) is kept in front of the commands after it in its block. Each command then runs
in a user's directory made for this module (``<tmp>/repo``): the package, ``configs/``,
``dev.sh``, ``pyproject.toml`` and ``.venv`` linked in, ``../shared/data/tinyshakespeare.txt``
beside it, and the files a user would bring (``chats.jsonl``, ``prompts.txt``, ...) made by the
test. Relative outputs (``runs/...``, ``romeo.jsonl``, ``preprocessed_data/...``) therefore land
under tmp, as the user's would land in the checkout.

A command is changed in three ways only, all listed below:
- ``SHORTEN``: arguments appended by entry point (Hydra and ``key=value`` options: the last
  value of a key wins), so that it runs at toy size (``SHORTEN_ONE``: instead, for a command
  whose model is not sized by ``model.n_layer`` / ``model.n_embd``);
- ``SUBSTITUTE``: fixed paths outside the user's directory (``/tmp/...``) moved under tmp;
- ``CHAT_INPUT``: what is typed into the interactive chat.

Commands that need a GPU, several processes or nodes, a Hub download, or that are the test suite
itself are in ``NOT_RUN`` by their exact text, with the reason. The test fails when a command of
the docs is in neither table (classify it: add a shortening or a reason), and when a listed
command is no longer in the docs. A command that reads what another makes (a checkpoint, a
samples file, token files) finds its maker in ``MAKERS`` (by the path on its line) or ``NEEDS``;
makers run first, and every command runs once per module, so the docs may repeat a command.
All of it takes about 1.5 min on a 2-core CPU.
"""
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
TIMEOUT_S = 240

# --- what the test changes in a command ------------------------------------------------------

_TRAIN_RUN = ("training.max_steps=2 logging.log_freq=1 logging.eval_freq=0 logging.progress_bar=false "
              "eval.max_batches=1 eval.fresh=false eval.sample_steps=2 training.eval_batch_size=8")
_TRAIN = f"{_TRAIN_RUN} model.n_layer=1 model.n_embd=32"
SHORTEN = {   # entry point -> arguments appended
    "rwkv_diffusion_rnn.train_rwkv": _TRAIN,
    "rwkv_diffusion_rnn/train_rwkv.py": _TRAIN,
    "rwkv_diffusion_rnn.generate": "steps=2 num_samples=1",
    "rwkv_diffusion_rnn.evaluate": "eval.max_batches=1",
    "rwkv_diffusion_rnn.chat": "steps=2",
    "rwkv_diffusion_rnn.export": "",                     # a tiny checkpoint exports in a second
    "rwkv_diffusion_rnn.prepare_latents": "",           # the test's corpus is 48 lines
    "rwkv_diffusion_rnn/preprocess_tokenize_text.py": "",
    "dev.sh demo": ("--data_dir preprocessed_data/demo logging.save_dir=checkpoints/demo --n_train 64 "
                    "--n_heldout 8 --n_eval 4 --text_steps 2 --latent_steps 2 --eval_batch_size 4 "
                    "--examples 1 --no_progress training.max_steps=2 model.n_layer=1 model.n_embd=32 "
                    "training.train_batch_size=8 training.eval_batch_size=4 logging.eval_freq=0"),
    "python -c": "",
    "source": "",
}
DIFFRWKV_TRAIN = (
    "HF_HOME=/tmp/hf_cache python rwkv_diffusion_rnn/train_rwkv.py --config-name rwkv_mmdit "
    "training.num_epochs=1 training.train_batch_size=1 training.eval_batch_size=1 training.dtype=fp32 "
    "data.num_workers=0 data.max_samples=10 logging.log_freq=1 logging.eval_freq=100000 "
    "tokenizer.local_files_only=false")
FINE_TUNE = ("python -m rwkv_diffusion_rnn.train_rwkv data=sft data.path=chats.jsonl "
             "training.init_from=runs/pretrained logging.save_dir=runs/sft_ft")
SHORTEN_ONE = {   # exact command -> arguments appended instead of its entry point's
    # the Hub's rwkv7-g1 replaced by a random 1-layer, 32-wide model in its file layout
    # (model.rwkv_name takes a local .pth, docs/data.md); the sizes are the file's
    DIFFRWKV_TRAIN: f"{_TRAIN_RUN} model.rwkv_name=rwkv7-tiny.pth tokenizer.name=BlinkDL/rwkv7-g1",
    # the model keys come from the checkpoint (training.init_from), as the command is typed
    FINE_TUNE: _TRAIN_RUN,
}
SUBSTITUTE = {"/tmp/hf_cache": "{tmp}/hf_cache", "/tmp/tiny_qwen3": "{tmp}/tiny_qwen3"}
CHAT_INPUT = "reverse: abc\n/reset\nsort: 312\n"

LM_BI = "python -m rwkv_diffusion_rnn.train_rwkv experiment=shakespeare_char logging.save_dir=runs/shk_bi"
LM_AR = ("python -m rwkv_diffusion_rnn.train_rwkv experiment=shakespeare_char training.objective=ar "
         "model.mixer=causal logging.save_dir=runs/shk_ar")
ROMEO = ('python -m rwkv_diffusion_rnn.generate checkpoint=runs/shk_bi prompt="ROMEO:" length=128 '
         'steps=64 out=romeo.jsonl')
SFT = ("python -m rwkv_diffusion_rnn.train_rwkv model=scratch data=sft data.path=chats.jsonl "
       "tokenizer.name=chars logging.save_dir=runs/sft")
PROJECT = ("python -m rwkv_diffusion_rnn.prepare_latents --input my_corpus.jsonl --name qwen_32d "
           "--project_only --embeddings_dir my_embeddings/")
TOKENIZE = ("python rwkv_diffusion_rnn/preprocess_tokenize_text.py --json_path "
            "preprocessed_data/qwen_32d/train_data.json --output_dir preprocessed_data/rwkv_tokens "
            "--tokenizer BlinkDL/rwkv7-g1 --max_length 512")
QWEN3_MAKE = ('python -c "from transformers import Qwen3Config, Qwen3Model; Qwen3Model(Qwen3Config('
              'vocab_size=128,\n  hidden_size=128, intermediate_size=341, num_hidden_layers=4, '
              'num_attention_heads=4,\n  num_key_value_heads=4, head_dim=32)).save_pretrained(\'/tmp/tiny_qwen3\')"')

# A path a command reads -> the command of the docs that makes it (run first when needed).
EXPORT = "python -m rwkv_diffusion_rnn.export checkpoint=runs/shk_ar format=blinkdl out=runs/shk_ar.pth"
FOLDER = "python -m rwkv_diffusion_rnn.export checkpoint=runs/shk_bi format=folder out=runs/shk_bi_folder"
MAKERS = {"runs/shk_ar.pth": EXPORT, "runs/shk_bi_folder": FOLDER, "runs/shk_bi": LM_BI, "runs/shk_ar": LM_AR, "romeo.jsonl": ROMEO,
          "runs/sft": SFT,
          "runs/pretrained": SFT, "preprocessed_data/qwen_32d": PROJECT, "/tmp/tiny_qwen3": QWEN3_MAKE}
NEEDS = {DIFFRWKV_TRAIN: [TOKENIZE]}   # reads the data keys' defaults, not a path on its line

NOT_RUN = {
    "bash dev.sh setup": "installs packages into .venv (network); the test runs inside that .venv",
    "bash dev.sh test": "the test suite, of which this test is a part",
    "python -m rwkv_diffusion_rnn.prepare_latents --input my_corpus.jsonl --name qwen_32d "
    "--model Qwen/Qwen3-Embedding-0.6B --latent_dim 32":
        "downloads Qwen/Qwen3-Embedding-0.6B from the Hub; the --project_only command of "
        "docs/data.md runs instead and makes the same preprocessed_data/qwen_32d",
    "torchrun --standalone --nproc_per_node=8 -m rwkv_diffusion_rnn.train_rwkv experiment=shakespeare_char "
    "training.train_batch_size=64 logging.save_dir=runs/ddp":
        "8 processes, one per GPU; tests/test_distributed.py runs DDP and FSDP under torchrun with "
        "2 CPU processes",
    "torchrun --standalone --nproc_per_node=8 -m rwkv_diffusion_rnn.train_rwkv ... training.parallel=fsdp "
    "training.dtype=bf16":
        "'...' stands for the user's overrides; bf16 on 8 GPUs (tests/test_distributed.py: FSDP "
        "with 2 CPU processes)",
    "torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=node0.example:29500 "
    "--rdzv_id=run1 -m rwkv_diffusion_rnn.train_rwkv ... training.parallel=fsdp":
        "two nodes of 8 GPUs; '...' stands for the user's overrides",
    "python -m rwkv_diffusion_rnn.lm_eval_harness --model rwkv_diffusion --model_args "
    "checkpoint=runs/shk_bi,mc_samples=64 --include_path my_tasks/ --tasks my_task --batch_size 16":
        "my_tasks/ stands for the user's task folder; tests/test_lm_eval_harness.py runs this command "
        "on local tasks over AR and diffusion checkpoints",
}


# --- reading the docs -----------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    text: str          # as typed, continuation lines joined, comment dropped
    preamble: tuple    # VAR=value lines before it in its block
    doc: str           # relative path of the doc
    line: int          # first line of the command in the doc


_FENCE = re.compile(r"^\s*```(\w*)\s*$")
_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")


def _scan(text: str) -> tuple[int, str | None]:
    """(where a shell comment starts in ``text`` or its length, the quote left open at its end)."""
    quote = None
    escaped = False
    for i, c in enumerate(text):
        if escaped:
            escaped = False
        elif quote:
            if c == quote:
                quote = None
            elif c == "\\" and quote == '"':
                escaped = True
        elif c == "\\":
            escaped = True
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or text[i - 1].isspace()):
            return i, None
    return len(text), quote


def strip_comment(line: str) -> str:
    """``line`` without a shell comment (a ``#`` that starts a word outside quotes)."""
    return line[:_scan(line)[0]].rstrip()


def bash_commands(text: str, doc: str = "") -> list[Command]:
    """The commands of the ```bash blocks of a markdown text, in order: a line ending in a
    backslash goes on with the next (joined with a space), and so does a line that leaves a quote
    open (joined with its newline, as the shell keeps it)."""
    out, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        i += 1
        if not m or not m.group(1):
            continue
        body = []
        while i < len(lines) and not _FENCE.match(lines[i]):
            body.append((i + 1, lines[i]))
            i += 1
        i += 1
        if m.group(1) != "bash":
            continue
        preamble, current, start = [], None, 0
        for lineno, raw in body:
            if current is None:
                current, start = raw.strip(), lineno
            elif current.endswith("\n"):
                current += raw.rstrip()
            else:
                current += raw.strip()
            if current.endswith("\\") and _scan(current[:-1])[1] is None:
                current = current[:-1].rstrip() + " "
                continue
            if _scan(current)[1] is not None:
                current += "\n"
                continue
            current, command = None, strip_comment(current)
            if not command:
                continue
            if all(_ASSIGN.match(w) for w in shlex.split(command)):
                preamble.append(command)
            else:
                out.append(Command(command, tuple(preamble), doc, start))
    return out


def entry_point(text: str) -> str:
    words = shlex.split(text)
    while words and _ASSIGN.match(words[0]):
        words = words[1:]
    if words[:2] == ["python", "-m"]:
        return words[2]
    if words[:2] == ["python", "-c"]:
        return "python -c"
    if words[0] == "python":
        return words[1]
    if words[0] == "bash" and words[1] == "dev.sh":
        return f"dev.sh {words[2]}"
    return words[0]


def doc_commands() -> dict[str, list[Command]]:
    return {p.relative_to(ROOT).as_posix(): bash_commands(p.read_text(encoding="utf-8"),
                                                         p.relative_to(ROOT).as_posix())
            for p in DOCS}


def test_parser_joins_lines_drops_comments_and_keeps_assignments():
    text = ("x\n```bash\n# a comment\nA=1\npython -m pkg.x a=1 \\\n    b='#kept' c=\"d e\"  # why\n"
            "FOO=bar python x.py  # and\npython -c \"a = (1,\n  2)\"  # it\n```\n```text\nnot=a command\n```\n  ```bash\n  bash dev.sh demo\n  ```\n")
    cmds = bash_commands(text)
    assert [c.text for c in cmds] == ["python -m pkg.x a=1 b='#kept' c=\"d e\"", "FOO=bar python x.py",
                                      'python -c "a = (1,\n  2)"', "bash dev.sh demo"]
    assert cmds[0].preamble == ("A=1",) and cmds[3].preamble == ()
    assert [entry_point(c.text) for c in cmds] == ["pkg.x", "x.py", "python -c", "dev.sh demo"]


def test_every_command_of_the_docs_is_run_or_listed_with_a_reason():
    commands = [c for cmds in doc_commands().values() for c in cmds]
    texts = {c.text for c in commands}
    unclassified = [f"{c.doc}:{c.line}: {c.text}" for c in commands
                    if c.text not in NOT_RUN and entry_point(c.text) not in SHORTEN]
    assert not unclassified, (
        "commands of the docs that this test neither runs nor lists; give their entry point a "
        "shortening in SHORTEN or list them in NOT_RUN with the reason: " + "; ".join(unclassified))
    gone = [t for t in [*NOT_RUN, *SHORTEN_ONE, *MAKERS.values(), *(n for v in NEEDS.values() for n in v), *NEEDS]
            if t not in texts]
    assert not gone, "commands named in this test that no doc has any more: " + "; ".join(gone)
    points = {entry_point(t) for t in texts}
    unused = [p for p in SHORTEN if p not in points] + [p for p in SUBSTITUTE if not any(p in t for t in texts)]
    assert not unused, "entries of SHORTEN / SUBSTITUTE that no command of the docs uses: " + ", ".join(unused)


# --- running them ---------------------------------------------------------------------------

def _venv_is_set_up() -> bool:
    """``bash dev.sh ...`` only runs (without installing anything) when .venv is current."""
    stamp = hashlib.sha1((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:12]
    return (ROOT / ".venv" / f".installed-{stamp}").is_file()


def _user_files(home: Path, tmp: Path) -> None:
    """The checkout as a user sees it, and the files the docs' commands expect the user to bring."""
    for name in ("rwkv_diffusion_rnn", "configs", "dev.sh", "pyproject.toml", ".venv"):
        if (ROOT / name).exists():
            (home / name).symlink_to(ROOT / name)
    data = tmp / "shared" / "data"
    data.mkdir(parents=True)
    if SHAKESPEARE.is_file():
        (data / "tinyshakespeare.txt").symlink_to(SHAKESPEARE)
    else:   # a stand-in with the characters the docs' prompts use
        lines = ["ROMEO:", "To be, or not to be: that is the question;", "JULIET:",
                 "What's in a name? That which we call a rose, by any other name would smell as sweet."]
        (data / "tinyshakespeare.txt").write_text("\n".join(lines * 60) + "\n")
    from rwkv_diffusion_rnn.data.demo_corpus import make_corpus
    corpus = make_corpus(48, seed=7)
    (home / "my_corpus.jsonl").write_text("".join(json.dumps({"text": s.text}) + "\n" for s in corpus))
    emb = home / "my_embeddings"
    emb.mkdir()
    rng = np.random.default_rng(0)
    for i in range(len(corpus)):
        np.save(emb / f"{i}.npy", rng.standard_normal(1024).astype(np.float32))
    from rwkv_diffusion_rnn.weights.pretrained_rwkv import save_random_blinkdl_checkpoint
    save_random_blinkdl_checkpoint(home / "rwkv7-tiny.pth", n_layer=1, n_embd=32, head_size=32,
                                   vocab_size=65536)

    def chat(q, a):
        return {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    words = ["abc", "dog", "tea", "sun", "map", "red", "cat", "pen", "box", "owl", "fig", "jar"]
    chats = [chat(f"reverse: {w}", w[::-1]) for w in words] + [chat(f"sort: {d}", "".join(sorted(d)))
                                                               for d in ("312", "951", "624", "873")]
    (home / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (home / "heldout.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats[:2]))
    (home / "prompts.txt").write_text("ROMEO:\nJULIET:\n")


class UserSession:
    """Runs commands in one user's directory, each at most once, makers first."""

    def __init__(self, tmp: Path):
        self.tmp, self.home = tmp, tmp / "repo"
        self.home.mkdir()
        _user_files(self.home, tmp)
        self.done: dict[str, float] = {}
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
                   OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
        self.env = env

    def needs(self, text: str) -> list[str]:
        made = [c for p, c in MAKERS.items() if c != text and re.search(rf"(?<![\w/.]){re.escape(p)}", text)]
        return list(dict.fromkeys([*NEEDS.get(text, []), *made]))

    def shell_line(self, cmd: Command) -> str:
        extra = SHORTEN_ONE.get(cmd.text, SHORTEN[entry_point(cmd.text)])
        line = f"{cmd.text} {extra}".rstrip()
        for old, new in SUBSTITUTE.items():
            line = line.replace(old, new.format(tmp=self.tmp))
        return "\n".join([*cmd.preamble, line])

    def run(self, cmd: Command, by_text: dict[str, Command]) -> None:
        if cmd.text in self.done:
            return
        for need in self.needs(cmd.text):
            self.run(by_text[need], by_text)
        if "runs/pretrained" in cmd.text and not (self.home / "runs" / "pretrained").exists():
            # the user's pretrained checkpoint: the SFT run of docs/sft.md stands in for it
            shutil.copytree(self.home / "runs" / "sft", self.home / "runs" / "pretrained",
                            ignore=shutil.ignore_patterns("run.lock"))
        line = self.shell_line(cmd)
        stdin = CHAT_INPUT if entry_point(cmd.text) == "rwkv_diffusion_rnn.chat" else ""
        t0 = time.monotonic()
        proc = subprocess.run(["bash", "-c", f"set -e\n{line}"], cwd=self.home, env=self.env, input=stdin,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
        self.done[cmd.text] = time.monotonic() - t0
        print(f"[{self.done[cmd.text]:5.1f} s] {line}")
        assert proc.returncode == 0, (
            f"{cmd.doc}:{cmd.line}: exit {proc.returncode}\n$ {line}\n--- stdout\n{proc.stdout[-3000:]}"
            f"\n--- stderr\n{proc.stderr[-3000:]}")
        check = CHECKS.get(entry_point(cmd.text))
        if check:
            check(self.home, cmd.text, proc)


def _check_train(home: Path, text: str, proc) -> None:
    output = proc.stdout + proc.stderr
    m = re.search(r"logging\.save_dir=(\S+)", text)
    save_dir = home / m.group(1) if m else None
    assert "final metrics:" in output, output[-2000:]
    if save_dir is not None:
        assert (save_dir / "metrics.json").is_file() and (save_dir / "train_log.jsonl").is_file()
        assert list(save_dir.glob("*/manifest.json")), f"no checkpoint in {save_dir}"


def _check_generate(home: Path, text: str, proc) -> None:
    m = re.search(r"\bout=(\S+)", text)
    if m:
        rows = [json.loads(x) for x in (home / m.group(1)).read_text().splitlines()]
        assert rows and all(isinstance(r["text"], str) for r in rows)


def _check_evaluate(home: Path, text: str, proc) -> None:
    m = re.search(r"eval\.samples=(\S+)\.jsonl", text)
    if m:
        assert json.loads((home / f"{m.group(1)}.eval.json").read_text())["gen_nll"] > 0
    else:
        ckpt = home / re.search(r"checkpoint=(\S+)", text).group(1)
        assert list(ckpt.glob("*/eval.json")), f"no eval.json under {ckpt}"


def _check_chat(home: Path, text: str, proc) -> None:
    turns = [x for x in CHAT_INPUT.splitlines() if not x.startswith("/")]
    assert "error:" not in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stdout.splitlines()) == len(turns), f"one answer per turn expected:\n{proc.stdout}"


def _check_demo(home: Path, text: str, proc) -> None:
    assert (home / "checkpoints" / "demo" / "demo_results.json").is_file()


CHECKS = {"rwkv_diffusion_rnn.train_rwkv": _check_train, "rwkv_diffusion_rnn/train_rwkv.py": _check_train,
          "rwkv_diffusion_rnn.generate": _check_generate, "rwkv_diffusion_rnn.evaluate": _check_evaluate,
          "rwkv_diffusion_rnn.chat": _check_chat, "dev.sh demo": _check_demo}


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    return UserSession(tmp_path_factory.mktemp("readme_user"))


@pytest.mark.parametrize("doc", [p.relative_to(ROOT).as_posix() for p in DOCS])
def test_the_commands_of_the_doc_run_as_typed(doc, session):
    commands = doc_commands()
    by_text = {c.text: c for cmds in commands.values() for c in cmds}
    skipped = []
    for cmd in commands[doc]:
        if cmd.text in NOT_RUN:
            continue
        point = entry_point(cmd.text)
        if point not in SHORTEN:
            continue    # test_every_command_of_the_docs_is_run_or_listed_with_a_reason fails
        if point.startswith("dev.sh") and not _venv_is_set_up():
            skipped.append(f"{cmd.text} (.venv is not set up for this pyproject.toml: dev.sh would install)")
            continue
        if point == "source" and not (ROOT / ".venv").is_dir():
            skipped.append(f"{cmd.text} (no .venv in the checkout)")
            continue
        session.run(cmd, by_text)
    if skipped:
        pytest.skip("not run here: " + "; ".join(dict.fromkeys(skipped)))
