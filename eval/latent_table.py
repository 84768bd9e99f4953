"""The text-from-latents table on real sentences: short speeches and sentences of 33 Shakespeare
plays (``../shared/data/shakespeare_other_plays.txt``) through the DiffRwkv commands, one text +
latent model per latent, each scored by ``evaluate ... dashboard=true``.

    python eval/latent_table.py                              # run what is missing, then report
    python eval/latent_table.py --steps 20 --max-sentences 300 --max-chars 64 --width 64 \
        --samples 8 --eval-batches 2 --out /tmp/lt_smoke    # smoke test, about 5 minutes on 1 thread
    python eval/latent_table.py --report-only                # aggregate finished rows only

What it does, each stage skipped when its output is there (so a killed run resumes):

1. **Corpus** (``<out>/corpus/sentences.json``, DiffRwkv's JSON list of ``{"text": ...}``): the
   speeches of the plays (the lines after a speaker's ``NAME.`` line, stage directions in ``[...]``
   dropped, joined by spaces; the lists of persons skipped); a speech of at most ``--max-chars`` characters is one example, a
   longer one gives its sentences of ``--min-chars`` .. ``--max-chars``; duplicates dropped, in
   file order, the first ``--max-sentences`` kept.
2. **Latents**: ``python -m rwkv_diffusion_rnn.prepare_latents`` with the packaged
   all-MiniLM-L6-v2 (offline), ``--val_fraction 0.05 --seed 0`` (prepare_latents' own
   deterministic split: the same 5% held out for every latent), once per latent: PCA to 32, 64,
   128 dims (whitened), and the whole embedding for the learned projection (``--latent_dim 384
   --no_whiten``, a rotation that keeps all its variance; one below the train sentences when
   there are fewer).
3. **Tokens**: ``preprocess_tokenize_text --tokenizer bytes`` (offline, covers every character
   of the corpus) of the train and val JSON, once (the texts and split are the same for every
   latent).
4. **Rows**: a small RWKV-7 from scratch (``model=scratch``, ``--layers``, ``--width``) trained
   ``--steps`` steps per row, its latent head predicting x0 (``model.latent_target=x0``): PCA-32
   with FiLM, the same predicting the noise (``eps``, the config's default, for comparison),
   PCA-32 with AdaLN-Zero, PCA-64, PCA-128 (FiLM), and the learned projection
   (``model.latent_projector=linear``, 32 dims, ``training.latent_recon_weight=1``, and 10). A
   finished row (``metrics.json`` at the last step) is skipped, an interrupted one resumes from
   its newest checkpoint (``--save-every``).
5. **Dashboard**: ``python -m rwkv_diffusion_rnn.evaluate checkpoint=<row> dashboard=true
   dashboard.samples=<--samples>`` into ``<row>/dashboard.json``, then the table,
   ``<out>/latent_table.md``.

Everything goes under ``--out`` (default ``eval/out/latent``, ignored by git): nothing of the corpus
enters the repository. Each subprocess runs with ``--threads`` threads (default 1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "shakespeare_other_plays.txt"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_DIM = 384
VAL_FRACTION = 0.05

# the latents prepare_latents makes: name -> its extra arguments ("{full}" filled in at run time)
LATENTS = {"pca32": ["--latent_dim", "32"], "pca64": ["--latent_dim", "64"], "pca128": ["--latent_dim", "128"],
           "full": ["--latent_dim", "{full}", "--no_whiten"]}
# the table's rows: (latent, model overrides). The latent head predicts x0 (as the demo's does):
# with eps, x0 = (z - sigma eps) / alpha divides the head's error by alpha = 0.014 at s = 1, and
# the first DDIM steps throw the latent far off (the eps row: text -> latent MSE in the hundreds)
ROWS = {
    "PCA-32 FiLM": ("pca32", ["model.latent_dim=32", "model.time_conditioning=film"]),
    "PCA-32 FiLM, eps target": ("pca32", ["model.latent_dim=32", "model.time_conditioning=film",
                                          "model.latent_target=eps"]),
    "PCA-32 AdaLN-Zero": ("pca32", ["model.latent_dim=32", "model.time_conditioning=adaln_zero"]),
    "PCA-64": ("pca64", ["model.latent_dim=64"]),
    "PCA-128": ("pca128", ["model.latent_dim=128"]),
    "learned projection": ("full", ["model.latent_dim=32", "model.latent_projector=linear",
                                    "model.latent_input_dim={full}", "training.latent_recon_weight=1.0"]),
    "learned projection, recon x10": ("full", ["model.latent_dim=32", "model.latent_projector=linear",
                                               "model.latent_input_dim={full}", "training.latent_recon_weight=10.0"]),
}
SPEAKER = re.compile(r"^[A-Z][A-Z' ,&-]*\.$")           # "COUNTESS." / "FIRST LORD."
SENTENCE = re.compile(r"(?<=[.!?])\s+")


# ---------------------------------------------------------------------------------------------- corpus


def speeches(text: str):
    """The speeches of a play text: the lines after a speaker's line, up to a blank line (a
    play's list of persons, up to its first act or scene, is no speech)."""
    speech, inside, cast = [], False, False
    for line in text.splitlines() + [""]:
        line = line.strip()
        upper = line.upper()
        if upper.startswith(("PERSONS REPRESENTED", "DRAMATIS PERSON")):
            cast, inside, speech = True, False, []
        elif cast and upper.startswith(("ACT ", "SCENE")):
            cast = False
        if cast:
            continue
        if not line:
            if inside and speech:
                yield " ".join(speech)
            speech, inside = [], False
        elif SPEAKER.match(line):
            if inside and speech:
                yield " ".join(speech)
            speech, inside = [], True
        elif inside:
            line = re.sub(r"\[[^\]]*\]?", "", line).strip()   # stage directions
            if line:
                speech.append(line)


def sentences(text: str, min_chars: int, max_chars: int, limit: int):
    """Examples of the corpus, in file order, each once (see the module docstring)."""
    seen, out = set(), []
    for sp in speeches(text):
        sp = re.sub(r"\s+", " ", sp).strip()
        parts = [sp] if len(sp) <= max_chars else SENTENCE.split(sp)
        for s in parts:
            s = s.strip()
            if min_chars <= len(s) <= max_chars and s not in seen:
                seen.add(s)
                out.append(s)
                if len(out) == limit:
                    return out
    return out


def build_corpus(out: Path, args) -> Path:
    path = out / "corpus" / "sentences.json"
    if path.is_file():
        return path
    texts = sentences(CORPUS.read_text(encoding="utf-8"), args.min_chars, args.max_chars, args.max_sentences)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([{"text": t} for t in texts], ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)
    print(f"corpus: {len(texts)} examples of {args.min_chars}..{args.max_chars} characters -> {path}", flush=True)
    return path


# ---------------------------------------------------------------------------------------------- stages


def _env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _run(cmd, log: Path, threads: int) -> bool:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        rc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=_env(threads), stdout=f,
                            stderr=subprocess.STDOUT, check=False).returncode
    if rc:
        print(f"FAILED ({rc}): {' '.join(map(str, cmd[:4]))} ... (see {log})", flush=True)
    return rc == 0


def full_dim(corpus: Path) -> int:
    """The whole embedding, or as many PCA dims as the train split allows (all its variance)."""
    n = len(json.loads(corpus.read_text(encoding="utf-8")))
    n_train = n - max(1, round(n * VAL_FRACTION))
    return min(MINILM_DIM, n_train - 2)


def make_latents(out: Path, corpus: Path, name: str, threads: int) -> Path:
    d = out / "data" / name
    if (d / "projection.json").is_file() and (d / "val_data.json").is_file():
        return d
    extra = [a.format(full=full_dim(corpus)) for a in LATENTS[name]]
    cmd = [sys.executable, "-m", "rwkv_diffusion_rnn.prepare_latents", "--input", corpus, "--name", name,
           "--output_root", out / "data", "--model", MINILM, "--val_fraction", VAL_FRACTION, "--seed", 0,
           "--device", "cpu", "--overwrite", *extra]
    if not _run(cmd, out / "logs" / f"latents_{name}.log", threads):
        raise SystemExit(f"prepare_latents {name} failed")
    summary = json.loads((d / "projection.json").read_text())
    print(f"latents {name}: {summary['source_dim']} -> {summary['latent_dim']} dims, "
          f"{100 * summary.get('explained_variance_total', 0):.1f}% of train variance kept, val reconstruction "
          f"error {summary.get('reconstruction_error_val')}", flush=True)
    return d


def make_tokens(out: Path, data: Path, max_length: int, threads: int) -> Path:
    """Tokens of the train and val JSON (every latent shares the corpus and split: once)."""
    tokens = out / "tokens"
    for split in ("train", "val"):
        if (tokens / split).is_dir() and any((tokens / split).iterdir()):
            continue
        cmd = [sys.executable, "-m", "rwkv_diffusion_rnn.preprocess_tokenize_text", "--json_path",
               data / f"{split}_data.json", "--output_dir", tokens, "--tokenizer", "bytes",
               "--max_length", max_length, "--overwrite"]
        if not _run(cmd, out / "logs" / f"tokens_{split}.log", threads):
            raise SystemExit(f"preprocess_tokenize_text {split} failed")
    return tokens


def row_dir(out: Path, row: str) -> Path:
    return out / "runs" / re.sub(r"[^a-z0-9]+", "_", row.lower()).strip("_")


def finished(d: Path, steps: int) -> bool:
    try:
        return json.loads((d / "metrics.json").read_text()).get("step") == steps
    except (OSError, ValueError):
        return False


def train_row(out: Path, row: str, data: Path, tokens: Path, corpus: Path, args) -> Path:
    from rwkv_diffusion_rnn.training.checkpoints import latest_checkpoint
    d = row_dir(out, row)
    if finished(d, args.steps):
        return d
    _, extra = ROWS[row]
    extra = [a.format(full=full_dim(corpus)) for a in extra]
    cmd = [sys.executable, "-m", "rwkv_diffusion_rnn.train_rwkv", "model=scratch", f"model.n_layer={args.layers}",
           f"model.n_embd={args.width}", f"model.head_size={args.head_size}", "tokenizer.name=bytes",
           f"data.json_path={data / 'train_data.json'}", f"data.token_dir={tokens / 'train'}",
           f"data.latent_dir={data / 'latents' / 'train'}", f"data.val_json_path={data / 'val_data.json'}",
           f"data.val_token_dir={tokens / 'val'}", f"data.val_latent_dir={data / 'latents' / 'val'}",
           f"data.seq_len={args.max_chars + 8}", f"training.train_batch_size={args.batch_size}",
           f"training.eval_batch_size={args.batch_size}", "training.num_epochs=null",
           f"training.max_steps={args.steps}", "training.device=cpu", f"optimizer.lr={args.lr}",
           f"logging.eval_freq={max(args.steps // 4, 1)}", f"eval.max_batches={args.eval_batches}", f"logging.save_every={args.save_every}",
           "logging.save_epochs=false", "logging.progress_bar=false", f"logging.save_dir={d}",
           f"hydra.run.dir={d}/hydra", "model.latent_target=x0", *extra]
    if latest_checkpoint(d) is not None:
        cmd.append("training.resume=latest")
    _run(cmd, d / "stdout.log", args.threads)
    print(f"{'trained' if finished(d, args.steps) else 'FAILED'} {row} ({d})", flush=True)
    return d


def dashboard(d: Path, args) -> dict | None:
    path = d / "dashboard.json"
    if not path.is_file() and finished(d, args.steps):
        cmd = [sys.executable, "-m", "rwkv_diffusion_rnn.evaluate", f"checkpoint={d}", "dashboard=true",
               f"dashboard.samples={args.samples}", f"eval.max_batches={args.eval_batches}", f"out={path}"]
        _run(cmd, d / "dashboard.log", args.threads)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------- table

COLUMNS = [
    ("chrF", "dashboard_chrf", 1), ("chrF lookup", "dashboard_chrf_lookup", 1),
    ("chrF shuffled", "dashboard_chrf_shuffled", 1), ("chrF null", "dashboard_chrf_null", 1),
    ("BLEU", "dashboard_bleu", 1), ("BLEU lookup", "dashboard_bleu_lookup", 1),
    ("BLEU shuffled", "dashboard_bleu_shuffled", 1), ("BLEU null", "dashboard_bleu_null", 1),
    ("round-trip cos", "dashboard_roundtrip_cos", 3), ("round-trip cos shuffled", "dashboard_roundtrip_cos_shuffled", 3),
    ("text->latent cos", "dashboard_t2l_cos", 3),
    ("text->latent MSE", "dashboard_t2l_mse", 3), ("MAUVE (MiniLM)", "dashboard_mauve_minilm", 3),
    ("bound clean", "dashboard_nelbo_clean", 3), ("bound null", "dashboard_nelbo_null", 3),
    ("nats/sentence", "dashboard_latent_nats_per_sentence", 1),
    ("joint pair cos together", "dashboard_joint_pair_cos", 3),
    ("joint pair cos sequential", "dashboard_joint_pair_cos_sequential", 3),
]


def _cell(result: dict | None, key: str, digits: int) -> str:
    if result is None or not isinstance(result.get(key), (int, float)):
        return "-"
    return f"{result[key]:.{digits}f}"


def table(out: Path, args) -> str:
    lines = [f"Text from latents, real sentences ({args.steps} steps, {args.layers} x {args.width} RWKV-7 from "
             f"scratch, bytes; dashboard on {args.samples} held-out sentences; bound in nats/token)", "",
             "| row | " + " | ".join(c[0] for c in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for row in ROWS:
        d = row_dir(out, row)
        result = None
        try:
            result = json.loads((d / "dashboard.json").read_text())
        except (OSError, ValueError):
            pass
        lines.append(f"| {row} | " + " | ".join(_cell(result, k, n) for _, k, n in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "eval" / "out" / "latent")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW",
                   help=f"rows to run (default all: {', '.join(ROWS)})")
    p.add_argument("--max-sentences", type=int, default=20000)
    p.add_argument("--min-chars", type=int, default=20)
    p.add_argument("--max-chars", type=int, default=160)
    p.add_argument("--steps", type=int, default=800, help="training steps per row")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--head-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--save-every", type=int, default=250, help="steps between checkpoints (resume points)")
    p.add_argument("--samples", type=int, default=32, help="held-out sentences the dashboard scores")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches of the bound")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    if args.report_only:
        print(table(args.out, args), end="")
        return
    if not CORPUS.is_file():
        raise SystemExit(f"{CORPUS} not found: this table reads ../shared/data/shakespeare_other_plays.txt")
    out = args.out
    corpus = build_corpus(out, args)
    tokens = None
    for row in args.rows:
        latent = ROWS[row][0]
        data = make_latents(out, corpus, latent, args.threads)
        tokens = tokens or make_tokens(out, data, args.max_chars + 8, args.threads)
        d = train_row(out, row, data, tokens, corpus, args)
        dashboard(d, args)
    text = table(out, args)
    (out / "latent_table.md").write_text(text, encoding="utf-8")
    print(text, end="")
    print(f"wrote {out / 'latent_table.md'}", flush=True)


if __name__ == "__main__":
    main()
