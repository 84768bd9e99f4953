"""The main job: ``python -m rwkv_diffusion_rnn.demo [options] [hydra overrides]``.

Trains a small text + latent diffusion model on a corpus whose content is known, then measures
whether the model learned to write text from a sentence latent and to infer a latent from text.

1. **Corpus.** Sentences from the attribute grammar of :mod:`rwkv_diffusion_rnn.data.demo_corpus`
   ("the red fox sleeps in the garden."): subject, colour, action, place, 8 values each, five
   templates. 4,200 distinct sentences (deterministic by ``--seed``), written with their
   attributes to ``<data_dir>/corpus.jsonl``.
2. **Latents and tokens.** :func:`~rwkv_diffusion_rnn.data.latents.prepare_latents` embeds
   them with the packaged all-MiniLM-L6-v2 (offline) and projects to 32 dims by PCA fitted on
   the 4,000 training sentences (200 are held out), into ``<data_dir>/minilm_32d/``;
   :func:`~rwkv_diffusion_rnn.data.token_files.tokenize_json` tokenizes both splits with
   the RWKV World tokenizer (max_length 16; the grammar's longest sentence is 12 tokens) into
   ``<data_dir>/rwkv_tokens/``. Steps whose outputs exist are skipped on a re-run.
3. **Training.** The config ``experiment=demo`` (``configs/experiment/demo.yaml``) composed with
   the command line's Hydra overrides, trained by the project's
   :class:`~rwkv_diffusion_rnn.training.improved_trainer.Trainer` (what ``train_rwkv`` runs) into
   ``logging.save_dir`` (default ``checkpoints/demo``). A fresh run clears an earlier demo run
   there; ``training.resume=latest`` continues it instead.
4. **Evaluation** on the held-out sentences:

   * latent -> text: ``generate_text(model, latent=z, length=n)`` with ``n`` the sentence's token
     count; *attribute recovery* is the mean fraction of the sentence's four attributes that the
     generated text names. Control: the same with the latents shuffled across rows (each row
     keeps its own length, gets another row's latent).
   * text -> latent: ``generate_latent`` from the clean text; the cosine with the row's true
     latent, and (control) with another row's true latent.

   A few examples are printed and ``<save_dir>/demo_results.json`` holds the numbers.

Options (everything else on the command line is a Hydra override, e.g. ``training.max_steps=50``):
``--data_dir``, ``--n_train``, ``--n_heldout``, ``--n_eval``, ``--text_steps``,
``--latent_steps``, ``--eval_only`` (evaluate the newest checkpoint in ``logging.save_dir``),
``--smoke`` (only the backbone check of :func:`smoke`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .common.errors import DemoError


from .weights.pretrained_rwkv import load_rwkv7, save_random_blinkdl_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = ROOT / "preprocessed_data" / "demo"
DEFAULT_SAVE_DIR = ROOT / "checkpoints" / "demo"
LATENT_NAME = "minilm_32d"
TOKENS_NAME = "rwkv_tokens"
EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TOKENIZER = "BlinkDL/rwkv7-g1"
MAX_LENGTH = 16        # data.seq_len of configs/experiment/demo.yaml
LATENT_DIM = 32
RESULTS_FILE = "demo_results.json"
GRAMMAR_VERSION = 1    # bump when demo_corpus changes its sentences


# ----------------------------------------------------------------------------------------------
# The backbone check


def smoke(seq_len: int = 64, seed: int = 0) -> float:
    """Writes a tiny random RWKV-7 checkpoint in BlinkDL's ``.pth`` layout, loads it with
    :func:`load_rwkv7`, runs a sequence in one pass and in four chunks with the recurrent state
    carried, and returns the largest logit difference between the two."""
    with tempfile.TemporaryDirectory() as d:
        path = save_random_blinkdl_checkpoint(Path(d) / "tiny-rwkv7.pth", n_layer=2, n_embd=64,
                                              head_size=32, vocab_size=256, seed=seed)
        model = load_rwkv7(path)
    c = model.config
    print(f"loaded {path.name}: n_layer={c.n_layer} n_embd={c.n_embd} head_size={c.head_size} "
          f"vocab={c.vocab_size} params={sum(p.numel() for p in model.parameters()):,}")
    ids = torch.randint(0, c.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = model(ids)
        state, parts = None, []
        for chunk in ids.split(max(1, seq_len // 4), dim=1):
            out, state = model(chunk, state=state, return_state=True)
            parts.append(out)
    diff = (torch.cat(parts, 1) - logits).abs().max().item()
    print(f"logits {tuple(logits.shape)}; last position, first 8: "
          f"{[round(x, 4) for x in logits[0, -1, :8].tolist()]}")
    print(f"one pass vs 4 chunks with carried state: max |diff| = {diff:.2e}")
    return diff


# ----------------------------------------------------------------------------------------------
# 1-2. data


@dataclass
class DemoData:
    root: Path
    n_train: int
    n_heldout: int
    longest: int                      # longest sentence of the corpus, in tokens

    @property
    def corpus(self) -> Path:
        return self.root / "corpus.jsonl"

    @property
    def latents(self) -> Path:
        return self.root / LATENT_NAME

    @property
    def tokens(self) -> Path:
        return self.root / TOKENS_NAME

    def overrides(self) -> List[str]:
        """The ``data.*`` settings that point the trainer at this data (absolute paths)."""
        lat, tok = self.latents, self.tokens
        return [f"data.json_path={lat / 'train_data.json'}", f"data.token_dir={tok / 'train'}",
                f"data.latent_dir={lat / 'latents' / 'train'}",
                f"data.val_json_path={lat / 'val_data.json'}", f"data.val_token_dir={tok / 'val'}",
                f"data.val_latent_dir={lat / 'latents' / 'val'}"]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def prepare_data(data_dir: str | os.PathLike = DEFAULT_DATA_DIR, *, n_train: int = 4000,
                 n_heldout: int = 200, seed: int = 0, max_length: int = MAX_LENGTH,
                 show_progress: bool = True) -> DemoData:
    """Corpus, latents and tokens under ``data_dir``; each step is skipped when its outputs exist
    and were made with the same settings (a changed corpus rebuilds everything after it)."""
    from .data import demo_corpus as grammar
    from .common.files import atomic_write_json
    from .data.latents import prepare_latents
    from .data.token_files import tokenize_json
    from .data.tokenizer import load_tokenizer

    root = Path(data_dir).resolve()
    n = n_train + n_heldout
    if n_heldout < 1 or n_train < LATENT_DIM + 1:
        raise DemoError(f"need --n_heldout >= 1 and --n_train >= {LATENT_DIM + 1} (PCA to {LATENT_DIM} dims), "
                        f"got {n_train} / {n_heldout}")
    data = DemoData(root, n_train, n_heldout, longest=0)
    tok = load_tokenizer(TOKENIZER)

    # 1. corpus
    info = {"grammar_version": GRAMMAR_VERSION, "n_lines": n, "n_heldout": n_heldout, "seed": seed}
    info_path = root / "corpus_info.json"
    rebuilt = False
    if data.corpus.is_file() and _read_json(info_path) == info:
        sentences = grammar.read_jsonl(data.corpus)
        print(f"[1/4] corpus: reusing {data.corpus} ({len(sentences)} sentences)")
    else:
        sentences = grammar.make_corpus(n, seed=seed)
        grammar.write_jsonl(data.corpus, sentences)
        atomic_write_json(info_path, info, indent=2)
        rebuilt = True
        print(f"[1/4] corpus: wrote {len(sentences)} sentences with their attributes to {data.corpus}")
    data.longest = grammar.longest(sentences, tok)
    if data.longest > max_length:
        raise DemoError(f"the longest sentence has {data.longest} tokens, more than max_length {max_length}; "
                        "raise the max_length (and data.seq_len)")
    print(f"      e.g. {sentences[0].text!r} -> {sentences[0].attributes}; "
          f"longest sentence: {data.longest} tokens (max_length {max_length})")

    # 2a. latents
    if not rebuilt and (data.latents / "train_data.json").is_file() and (data.latents / "val_data.json").is_file():
        print(f"[2/4] latents: reusing {data.latents}")
    else:
        print(f"[2/4] latents: embedding {n} sentences with {EMBEDDING_MODEL} (packaged, offline), "
              f"PCA to {LATENT_DIM} dims fitted on the {n_train} train sentences")
        summary = prepare_latents(data.corpus, LATENT_NAME, output_root=root, model=EMBEDDING_MODEL,
                                  latent_dim=LATENT_DIM, val_fraction=n_heldout / n, seed=seed,
                                  device="cpu", local_files_only=True, overwrite=True,
                                  show_progress=show_progress)
        rebuilt = True
        print(f"      {summary['n_train']} train + {summary['n_val']} held-out latents, "
              f"{100 * summary['explained_variance_total']:.1f}% of the embedding variance kept")
    # 2b. tokens (tokenize_json skips files that exist; new latents mean new token files)
    if rebuilt and data.tokens.is_dir():
        shutil.rmtree(data.tokens)
    for split in ("train", "val"):
        s = tokenize_json(data.latents / f"{split}_data.json", data.tokens, tok, max_length=max_length,
                          tokenizer_name=TOKENIZER, show_progress=show_progress)
        if s.written:
            what = f"wrote {s.written} files" + (f" (kept {s.skipped})" if s.skipped else "")
        else:
            what = f"reusing {s.skipped} files"
        print(f"      tokens {split}: {what} in {s.output_dir}"
              + (f" ({s.truncated} truncated)" if s.truncated else ""))
    return data


# ----------------------------------------------------------------------------------------------
# 3. config and training


def compose_config(overrides: Sequence[str] = (), data: Optional[DemoData] = None):
    """``experiment=demo`` + the data paths of ``data`` + ``overrides`` (the last word)."""
    from .train_rwkv import compose_config as compose
    base = ["experiment=demo", f"logging.save_dir={DEFAULT_SAVE_DIR}"]
    if data is not None:
        base += data.overrides()
    return compose([*base, *overrides])


def _clear_previous_run(save_dir: Path) -> None:
    """A fresh demo run starts from an empty save_dir: drop an earlier run's log and checkpoints."""
    from .training import checkpoints as ckpt
    old = ckpt.list_checkpoints(save_dir)
    files = [save_dir / f for f in ("train_log.jsonl", "metrics.json", RESULTS_FILE) if (save_dir / f).exists()]
    if not old and not files:
        return
    print(f"      clearing the earlier run in {save_dir} ({len(old)} checkpoints); "
          "pass training.resume=latest to continue it instead")
    for d in old:
        shutil.rmtree(d)
    for f in files:
        f.unlink()


def _echo(every_s: float = 15.0):
    """A trainer callback printing log records while training: at most one every ``every_s``
    seconds, and every one with evaluation metrics. For a terminal without a progress bar
    (``--no_progress``); elsewhere the trainer prints its own progress lines."""
    from .training.events import Callback

    class Echo(Callback):
        def __init__(self):
            self.t0 = self.last = time.perf_counter()

        def on_record(self, trainer, r):
            now = time.perf_counter()
            evals = {k: v for k, v in r.items() if k.startswith("val_")}
            if not evals and now - self.last < every_s:
                return
            self.last = now
            msg = (f"      step {r['step']}/{trainer.total_steps or '?'}  loss {r['loss']:.3f} (text {r.get('text_loss', 0):.3f}, "
                   f"latent {r.get('latent_loss', 0):.3f})  {r.get('tokens_per_s', 0):.0f} tok/s  "
                   f"[{now - self.t0:.0f} s]")
            if evals:
                msg += "  " + " ".join(f"{k}={v:.3f}" for k, v in evals.items())
            print(msg, flush=True)

    return Echo()


def train(cfg, echo: bool = False):
    """Train with the project's Trainer (which ends with a checkpoint of the last step); returns it
    (model, diffusion, metrics). ``echo`` prints log records while training."""
    from .training.improved_trainer import Trainer
    save_dir = Path(cfg.logging.save_dir)
    if not cfg.training.resume:
        _clear_previous_run(save_dir)
    trainer = Trainer(cfg, callbacks=[_echo()] if echo else ())
    n_params = sum(p.numel() for p in trainer.model.parameters())
    print(f"[3/4] training: {n_params:,} parameters, {len(trainer.data.train.dataset)} sentences, "
          f"{trainer.total_steps} steps of {cfg.training.train_batch_size} on {trainer.device}; "
          f"save_dir {trainer.save_dir}", flush=True)
    trainer.train()
    return trainer


def load_trained(cfg):
    """(model, latent diffusion) of the newest checkpoint in ``logging.save_dir``, rebuilt from its
    saved config (EMA weights when it kept them, as training evaluates); a ``model.*`` setting of
    ``cfg`` that differs from the checkpoint's is refused."""
    from omegaconf import OmegaConf
    from .training import checkpoints as ckpt
    from .training import trained
    from .training.builders import build_latent_diffusion
    path = ckpt.resolve_resume("latest", cfg.logging.save_dir)
    run = trained.load_trained(path, device=cfg.training.device)
    ckpt.check_config_compatible(OmegaConf.to_container(run.cfg, resolve=False),
                                 OmegaConf.to_container(cfg, resolve=False), keys=("model",), checkpoint=path)
    print(f"loaded {path} ({run.weights} weights)")
    return run.model, build_latent_diffusion(run.cfg)


# ----------------------------------------------------------------------------------------------
# 4. evaluation


@dataclass
class HeldOut:
    texts: List[str]
    attributes: List[Dict[str, str]]
    ids: List[torch.Tensor]           # token ids of each sentence (unpadded)
    latents: torch.Tensor             # [N, latent_dim]


def load_heldout(data: DemoData, n: Optional[int] = None) -> HeldOut:
    from .data import demo_corpus as grammar
    from .data.data_simple import read_data_json, resolve_data_path
    corpus = grammar.read_jsonl(data.corpus)
    json_path = data.latents / "val_data.json"
    entries = read_data_json(json_path)[:n]
    texts, attrs, ids, lats = [], [], [], []
    for e in entries:
        s = corpus[int(e["id"])]
        if s.text != e["text"]:
            raise DemoError(f"{json_path}: entry {e['id']} does not match line {int(e['id'])} of {data.corpus}; "
                            f"delete {data.root} and run the demo again")
        stem = Path(e["latent_path"]).stem
        with np.load(data.tokens / "val" / f"{stem}.npz") as z:
            ids.append(torch.from_numpy(z["input_ids"][z["attention_mask"].astype(bool)].astype(np.int64)))
        lats.append(np.load(resolve_data_path(e["latent_path"], json_path.parent)))
        texts.append(s.text)
        attrs.append(s.attributes)
    return HeldOut(texts, attrs, ids, torch.from_numpy(np.stack(lats)).float())


def derangement(n: int, seed: int = 0) -> torch.Tensor:
    """A random permutation of range(n) without fixed points (one cycle), for the controls."""
    if n < 2:
        raise DemoError("the shuffled controls need at least 2 held-out sentences")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-1)
    return perm


def _by_length(lengths: Sequence[int], batch_size: int):
    """Row indices grouped by length, in chunks of at most batch_size: [(length, rows), ...]."""
    groups: Dict[int, List[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(int(n), []).append(i)
    for n in sorted(groups):
        rows = groups[n]
        for a in range(0, len(rows), batch_size):
            yield n, torch.tensor(rows[a:a + batch_size])


def text_from_latents(model, latents: torch.Tensor, lengths: Sequence[int], *, steps: Optional[int],
                      batch_size: int, tokenizer, desc: str, show_progress: bool = True) -> List[str]:
    """Decode row i from ``latents[i]`` at ``lengths[i]`` tokens (greedy, lowest-confidence remasking)."""
    from .diffusion.sampling import generate_text
    from .training.events import progress
    device = next(model.parameters()).device
    out: List[Optional[str]] = [None] * len(lengths)
    chunks = list(_by_length(lengths, batch_size))
    for n, rows in progress(chunks, desc=desc, bar=show_progress, stream=sys.stdout):
        ids = generate_text(model, latent=latents[rows].to(device), length=n, steps=steps or n,
                            generator=torch.Generator().manual_seed(0)).cpu()
        for r, row in zip(rows.tolist(), ids):
            out[r] = tokenizer.decode([t for t in row.tolist() if t != 0]).strip()
    return out


def latents_from_text(model, diffusion, ids: Sequence[torch.Tensor], *, steps: int, batch_size: int,
                      seed: int = 0, desc: str = "text -> latent", show_progress: bool = True) -> torch.Tensor:
    """A latent for every clean text by the DDIM sampler (start noise seeded per row)."""
    from .diffusion.sampling import generate_latent
    from .training.events import progress
    device = next(model.parameters()).device
    dim = model.config.latent_dim
    noise = torch.randn(len(ids), dim, generator=torch.Generator().manual_seed(seed))
    out = torch.empty(len(ids), dim)
    chunks = list(_by_length([len(x) for x in ids], batch_size))
    for n, rows in progress(chunks, desc=desc, bar=show_progress, stream=sys.stdout):
        text = torch.stack([ids[r] for r in rows.tolist()])
        z = generate_latent(model, diffusion, text.to(device), steps=steps, init_noise=noise[rows].to(device))
        out[rows] = z.float().cpu()
    return out


def _recovery(texts: Sequence[str], attributes: Sequence[Dict[str, str]]):
    """(mean fraction of the attributes each text names unambiguously, the same per attribute)"""
    from .data.demo_corpus import ATTRIBUTES, attribute_matches
    per = {a: 0 for a in ATTRIBUTES}
    for text, attrs in zip(texts, attributes):
        for a, hit in attribute_matches(text, attrs).items():
            per[a] += hit
    n = max(len(texts), 1)
    per = {a: v / n for a, v in per.items()}
    return sum(per.values()) / len(per), per


def _strict_recovery(texts: Sequence[str], attributes: Sequence[Dict[str, str]]) -> float:
    """The same, counting only texts that are sentences of the grammar (others score 0)."""
    from .data.demo_corpus import ATTRIBUTES, parse_sentence
    total = 0
    for text, attrs in zip(texts, attributes):
        parsed = parse_sentence(text)
        if parsed is not None:
            total += sum(parsed[a] == attrs[a] for a in ATTRIBUTES)
    return total / (len(ATTRIBUTES) * max(len(texts), 1))


def nearest_neighbour_reference(data: DemoData, held: HeldOut) -> float:
    """Fraction of attributes a held-out sentence shares with the training sentence whose latent
    is nearest (cosine): how much of the attributes the 32-dim latents themselves carry."""
    from .data import demo_corpus as grammar
    from .data.data_simple import read_data_json, resolve_data_path
    corpus = grammar.read_jsonl(data.corpus)
    json_path = data.latents / "train_data.json"
    entries = read_data_json(json_path)
    train = np.stack([np.load(resolve_data_path(e["latent_path"], json_path.parent)) for e in entries])
    train_attrs = [corpus[int(e["id"])].attributes for e in entries]
    a = torch.nn.functional.normalize(held.latents, dim=-1)
    b = torch.nn.functional.normalize(torch.from_numpy(train).float(), dim=-1)
    nn_idx = (a @ b.T).argmax(1).tolist()
    hits = sum(sum(held.attributes[i][k] == train_attrs[j][k] for k in grammar.ATTRIBUTES)
               for i, j in enumerate(nn_idx))
    return hits / (4 * len(nn_idx))


def evaluate(model, diffusion, data: DemoData, *, n_eval: int = 200, text_steps: Optional[int] = None,
             latent_steps: int = 50, batch_size: int = 100, seed: int = 0, n_examples: int = 5,
             show_progress: bool = True) -> dict:
    """The four numbers of the demo (and a few more) on ``n_eval`` held-out sentences."""
    from .data.demo_corpus import parse_sentence
    from .data.tokenizer import load_tokenizer
    tok = load_tokenizer(TOKENIZER)
    held = load_heldout(data, n_eval)
    N = len(held.texts)
    perm = derangement(N, seed)
    lengths = [len(x) for x in held.ids]
    model.eval()
    t0 = time.perf_counter()
    gen = text_from_latents(model, held.latents, lengths, steps=text_steps, batch_size=batch_size,
                            tokenizer=tok, desc="latent -> text", show_progress=show_progress)
    gen_shuf = text_from_latents(model, held.latents[perm], lengths, steps=text_steps, batch_size=batch_size,
                                 tokenizer=tok, desc="latent -> text (shuffled latents)",
                                 show_progress=show_progress)
    z = latents_from_text(model, diffusion, held.ids, steps=latent_steps, batch_size=batch_size, seed=seed,
                          show_progress=show_progress)
    seconds = time.perf_counter() - t0
    cos = torch.nn.functional.cosine_similarity(z, held.latents, dim=-1)
    cos_shuf = torch.nn.functional.cosine_similarity(z, held.latents[perm], dim=-1)
    rec, per = _recovery(gen, held.attributes)
    rec_shuf, per_shuf = _recovery(gen_shuf, held.attributes)
    results = {
        "attribute_recovery": rec,
        "attribute_recovery_shuffled": rec_shuf,
        "latent_cosine": float(cos.mean()),
        "latent_cosine_shuffled": float(cos_shuf.mean()),
        "attribute_recovery_per_attribute": per,
        "attribute_recovery_per_attribute_shuffled": per_shuf,
        # the same, counting only outputs that are sentences of the grammar (others score 0)
        "attribute_recovery_strict": _strict_recovery(gen, held.attributes),
        "attribute_recovery_strict_shuffled": _strict_recovery(gen_shuf, held.attributes),
        "grammatical_fraction": sum(parse_sentence(t) is not None for t in gen) / N,
        "exact_match_fraction": sum(g == t for g, t in zip(gen, held.texts)) / N,
        "latent_nearest_neighbour_reference": nearest_neighbour_reference(data, held),
        "n_eval": N,
        "text_steps": text_steps or "length",
        "latent_steps": latent_steps,
        "eval_seconds": round(seconds, 1),
    }
    results["examples"] = [{"source": held.texts[i], "generated": gen[i],
                            "generated_from_shuffled_latent": gen_shuf[i],
                            "latent_cosine": round(float(cos[i]), 4)} for i in range(min(n_examples, N))]
    return results


def print_results(r: dict) -> None:
    print("\nexamples (held-out sentences):")
    for e in r["examples"]:
        print(f"  source:            {e['source']}")
        print(f"  from its latent:   {e['generated']}")
        print(f"  shuffled latent:   {e['generated_from_shuffled_latent']}")
        print(f"  text -> latent cosine with the true latent: {e['latent_cosine']:+.3f}\n")
    per = ", ".join(f"{k} {v:.2f}" for k, v in r["attribute_recovery_per_attribute"].items())
    print(f"on {r['n_eval']} held-out sentences:")
    print(f"  latent -> text attribute recovery: {r['attribute_recovery']:.3f} "
          f"(shuffled latents: {r['attribute_recovery_shuffled']:.3f}; chance for a grammatical "
          f"sentence 0.125)  [{per}]")
    print(f"  counting grammatical outputs only: {r['attribute_recovery_strict']:.3f} "
          f"(shuffled: {r['attribute_recovery_strict_shuffled']:.3f})")
    print(f"  grammatical outputs {r['grammatical_fraction']:.3f}, exact reproductions "
          f"{r['exact_match_fraction']:.3f}; the nearest training latent shares "
          f"{r['latent_nearest_neighbour_reference']:.3f} of the attributes")
    print(f"  text -> latent cosine: {r['latent_cosine']:.3f} (shuffled true latents: "
          f"{r['latent_cosine_shuffled']:.3f})")


# ----------------------------------------------------------------------------------------------
# the command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rwkv_diffusion_rnn.demo",
        description="Train a text + latent diffusion RWKV-7 on an attribute grammar and measure latent -> text "
                    "and text -> latent. Arguments other than the options below are Hydra overrides of "
                    "experiment=demo, e.g. training.max_steps=50 logging.save_dir=/tmp/demo.")
    p.add_argument("--smoke", action="store_true", help="only the tiny backbone check (random checkpoint)")
    p.add_argument("--data_dir", default=str(DEFAULT_DATA_DIR), help="where corpus, latents and tokens go")
    p.add_argument("--n_train", type=int, default=4000, help="training sentences")
    p.add_argument("--n_heldout", type=int, default=200, help="held-out sentences")
    p.add_argument("--n_eval", type=int, default=200, help="held-out sentences to evaluate on")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus, split and controls")
    p.add_argument("--text_steps", type=int, default=None,
                   help="denoising steps for latent -> text (default: one per token)")
    p.add_argument("--latent_steps", type=int, default=50, help="DDIM steps for text -> latent")
    p.add_argument("--eval_batch_size", type=int, default=100)
    p.add_argument("--examples", type=int, default=5, help="examples to print")
    p.add_argument("--eval_only", action="store_true",
                   help="skip training; evaluate the newest checkpoint in logging.save_dir")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        parser.error(f"unknown arguments {bad}; options are listed by --help, everything else must be a "
                     "Hydra override key=value (e.g. training.max_steps=50)")
    if args.smoke:
        return {"max_abs_diff": smoke()}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the packaged MiniLM needs no network

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from .common.errors import ProjectError
    from .training.events import output_is_terminal

    t_start = time.perf_counter()
    progress = not args.no_progress
    try:
        data = prepare_data(args.data_dir, n_train=args.n_train, n_heldout=args.n_heldout, seed=args.seed,
                            show_progress=progress)
        extra = [] if progress else ["logging.progress_bar=false"]
        cfg = compose_config([*extra, *overrides], data)
        if cfg.data.seq_len < data.longest:
            raise DemoError(f"data.seq_len={cfg.data.seq_len} is shorter than the longest sentence "
                            f"({data.longest} tokens)")
        t_train = time.perf_counter()
        if args.eval_only:
            print(f"[3/4] training: skipped (--eval_only); newest checkpoint in {cfg.logging.save_dir}")
            model, diffusion = load_trained(cfg)
            steps = None
        else:
            # without a bar the trainer prints progress lines itself, unless the output is a terminal
            trainer = train(cfg, echo=not progress and output_is_terminal())
            model, diffusion = (trainer.ema.module if trainer.ema else trainer.model), trainer.latent_diff
            steps = trainer.global_step
        train_seconds = time.perf_counter() - t_train
        print(f"[4/4] evaluation on {min(args.n_eval, args.n_heldout)} held-out sentences: latent -> text, "
              "text -> latent, each with its shuffled control", flush=True)
        results = evaluate(model, diffusion, data, n_eval=args.n_eval, text_steps=args.text_steps,
                           latent_steps=args.latent_steps, batch_size=args.eval_batch_size, seed=args.seed,
                           n_examples=args.examples, show_progress=progress)
    except (ProjectError, HydraException, OmegaConfBaseException) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    results.update(train_steps=steps, train_seconds=None if args.eval_only else round(train_seconds, 1),
                   total_seconds=round(time.perf_counter() - t_start, 1),
                   overrides=list(overrides), save_dir=str(Path(cfg.logging.save_dir).resolve()))
    print_results(results)
    out = Path(cfg.logging.save_dir) / RESULTS_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out)
    print(f"\nwrote {out} (total {results['total_seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)   # messages in order when the output is a file
    main()
