"""The text + latent dashboard: what a model that writes text from a sentence latent and infers
the latent from text does on held-out sentences
(``python -m rwkv_diffusion_rnn.evaluate checkpoint=<dir> dashboard=true``).

On the first ``samples`` sentences of the validation split (each with its true latent ``z``):

* **latent -> text**: each sentence is written from its latent on a canvas of its own length (the
  training rows' padding after it kept, as training showed it), greedy (temperature 0,
  most-confident-first remasking, one token per step), and scored against the sentence with
  sacrebleu's corpus chrF and BLEU (``dashboard_chrf`` / ``dashboard_bleu``). Three references on
  the same sentences: ``_lookup``, the training sentence whose latent is nearest (cosine) to
  ``z`` (what a lookup table gives); ``_shuffled``, the text written from another sentence's
  latent (the next one's); ``_null``, the text written from the learned null latent. A model
  that uses its latent beats the shuffled and null rows; one that generalises beats the lookup.
* **round trip** (``dashboard_roundtrip_cos``): the text written from ``z`` embedded again by
  the embedding model and projection that made the training latents, cosine to ``z``; and
  ``dashboard_roundtrip_cos_source``: the source sentence itself through the same path (the
  ceiling the projection allows: 1 when the latents on disk were made this way);
  ``dashboard_roundtrip_cos_shuffled``, the written text against the next sentence's latent
  (the chance level: latents of unrelated sentences need not be orthogonal, e.g. a learned
  projection with a bias).
* **text -> latent**: the latent sampled from each clean sentence by the DDIM sampler users get
  (``eval.latent_steps`` steps, eta 0, start noise from a fixed seed) against ``z``:
  ``dashboard_t2l_mse`` (per dimension) and ``dashboard_t2l_cos``, and the same for the mean
  training latent (``_mean_latent``: the score of knowing nothing about the sentence).
* **joint pairs** (``dashboard_joint_pair_cos``): text and latent sampled together from the
  all-mask canvas of each held-out sentence's length (``generate_joint``, co-denoised in the same
  steps; temperature 1, random remasking, one token per step, sample ``i`` from generator
  ``i``), the text embedded again as in the round trip, cosine to the latent it came with: how
  well the two halves of a pair agree. ``dashboard_joint_pair_cos_sequential``: the same with
  the latent sampled first (``eval.latent_steps`` DDIM steps) and the text written from it,
  from the same start noise and generators.
* **MAUVE** (``dashboard_mauve_minilm``): mauve-text's MAUVE of the texts written from the
  latents against the held-out sentences, both featurised by the packaged all-MiniLM-L6-v2
  sentence embeddings (not GPT-2 features as in the MAUVE paper: the numbers are comparable only
  with other MiniLM-featured MAUVEs). With few samples MAUVE's clustering is coarse.
* **bound**: the masked-diffusion bound given the clean and the null latent
  (``dashboard_nelbo_clean`` / ``_null``, nats per token, as ``evaluate`` reports them) and
  ``dashboard_latent_nats_per_sentence``: their difference times the tokens scored, per
  sentence: what the latent saves in coding the text.

The scorers are plain functions (:func:`chrf`, :func:`bleu`, :func:`row_cosines`) so their wiring
is testable on their own.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..common import rng
from ..common.errors import ConfigError

DEFAULT_SAMPLES = 32
MAUVE_FEATURES = "sentence-transformers/all-MiniLM-L6-v2"      # the packaged copy, offline


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus chrF (0..100) of ``hypotheses`` against one reference each."""
    import sacrebleu
    return float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score)


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU (0..100) of ``hypotheses`` against one reference each."""
    import sacrebleu
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``a`` with the same row of ``b`` (0 for a zero row)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    dot = (a * b).sum(-1)
    return np.where((na > 0) & (nb > 0), dot / np.maximum(na * nb, 1e-300), 0.0)


def mauve_score(p_features: np.ndarray, q_features: np.ndarray, seed: int = 0) -> float:
    """mauve-text's MAUVE of two feature sets (CPU)."""
    import mauve
    return float(mauve.compute_mauve(p_features=np.asarray(p_features, dtype=np.float32),
                                     q_features=np.asarray(q_features, dtype=np.float32),
                                     device_id=-1, verbose=False, seed=seed).mauve)


def _sentences(loader, n: int):
    """The first ``n`` rows of ``loader``'s batches: (ids [T_i] lists, latents [n, D], batches)."""
    ids, lat = [], []
    for batch in loader:
        for row, mask, z in zip(batch["input_ids"], batch["attention_mask"].bool(), batch["latent"]):
            if len(ids) == n:
                break
            ids.append(row[mask].tolist())
            lat.append(z.float().numpy())
        if len(ids) == n:
            break
    return ids, np.stack(lat) if lat else np.zeros((0, 0), np.float32)


def _write(model, ids: List[List[int]], latents: Optional[np.ndarray], pad_id: int, batch_size: int) -> List[List[int]]:
    """Greedy text from each latent (None: the null latent) on a canvas of each row's length."""
    from ..diffusion.sampling import generate_text
    cfg, device = model.config, next(model.parameters()).device
    out: List[List[int]] = []
    for i in range(0, len(ids), batch_size):
        rows = ids[i:i + batch_size]
        T = max(len(r) for r in rows)
        canvas = torch.full((len(rows), T), pad_id, dtype=torch.long)
        for r, row in enumerate(rows):
            canvas[r, :len(row)] = cfg.mask_id
        z = None if latents is None else torch.tensor(latents[i:i + batch_size], device=device)
        written = generate_text(model, latent=z, prompt_ids=canvas.to(device), steps=T, remasking="low_confidence",
                                temperature=0.0, use_cache=False)
        out += [written[r, :len(row)].tolist() for r, row in enumerate(rows)]
    return out


def _joint(model, diffusion, ids: List[List[int]], pad_id: int, batch_size: int, order: str,
           latent_steps: int):
    """Text and latent sampled together on each row's all-mask canvas (its padding kept as in
    :func:`_write`): (token lists, latents [n, D]). Row ``i`` draws from generator ``i``, the same
    for either ``order``, so the two orders start from the same noise."""
    from ..diffusion.sampling import generate_joint
    device = next(model.parameters()).device
    texts: List[List[int]] = []
    latents = []
    for i in range(0, len(ids), batch_size):
        rows = ids[i:i + batch_size]
        T = max(len(r) for r in rows)
        canvas = torch.full((len(rows), T), pad_id, dtype=torch.long)
        for r, row in enumerate(rows):
            canvas[r, :len(row)] = model.config.mask_id
        gens = [torch.Generator().manual_seed(i + r) for r in range(len(rows))]
        text, z = generate_joint(model, diffusion, prompt_ids=canvas.to(device), steps=T, order=order,
                                 latent_steps=latent_steps, remasking="random", temperature=1.0, generator=gens,
                                 use_cache=False)
        texts += [text[r, :len(row)].tolist() for r, row in enumerate(rows)]
        latents.append(z.float().cpu().numpy())
    return texts, np.concatenate(latents)


def _model_latents(model, vectors: np.ndarray) -> np.ndarray:
    """The data's latent vectors as the model's latents (a ``latent_projector`` model projects
    them; the others take them as they are)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return model.clean_latent(torch.as_tensor(vectors, dtype=torch.float32, device=device)).float().cpu().numpy()


def _projection_dir(cfg, projection: Optional[str]) -> str:
    if projection:
        return projection
    json_path = cfg.data.get("json_path") if "json_path" in cfg.data else None
    if not json_path:
        raise ConfigError("dashboard=true re-embeds written text with the projection that made the training "
                          "latents: this run has no data.json_path to find it beside; give "
                          "dashboard.projection=<folder of projection.npz>")
    return str(Path(json_path).parent)


@torch.no_grad()
def dashboard(trained, *, samples: int = DEFAULT_SAMPLES, projection: Optional[str] = None,
              bound_clean=None, bound_null=None, bound_sentences: Optional[int] = None,
              batch_size: int = 16) -> Dict[str, float]:
    """The ``dashboard_*`` metrics of a text + latent checkpoint (see the module docstring).
    ``bound_clean`` / ``bound_null``: the LikelihoodSummary of the validation split given the
    clean / null latent (``evaluate`` computes them), over ``bound_sentences`` sentences."""
    from ..data.latents import encode_texts, embed_texts, load_sentence_model, projection_source_model
    from ..diffusion.sampling import generate_latent
    from .builders import build_data, build_latent_diffusion

    cfg, model, tok = trained.cfg, trained.model, trained.tokenizer
    if not cfg.model.latent_prefix_len or cfg.training.objective != "diffusion":
        raise ConfigError(f"dashboard=true scores a text + latent model; {trained.path} has "
                          f"model.latent_prefix_len={cfg.model.latent_prefix_len}, "
                          f"training.objective={cfg.training.objective}")
    proj_dir = _projection_dir(cfg, projection)
    data = build_data(cfg, tokenizer=tok)
    if data.val is None:
        raise ConfigError("dashboard=true scores held-out sentences: this run has no validation split "
                          "(set data.val_fraction > 0 or data.val_json_path / data.val_token_dir)")
    ids, z = _sentences(data.val, samples)
    z = _model_latents(model, z)
    n = len(ids)
    if n < 2:
        raise ConfigError(f"dashboard=true needs at least 2 held-out sentences (the shuffled reference pairs "
                          f"each with another); the validation split holds {n}")
    decode = tok.decode
    sources = [decode(r) for r in ids]
    pad_id = int(getattr(tok, "pad_id", 0) or 0)

    # the training latents: the mean, and the nearest one's sentence for each held-out latent
    train = data.train.dataset
    train_z = _model_latents(model, np.stack([train[i]["latent"].float().numpy() for i in range(len(train))]))
    unit = train_z / np.maximum(np.linalg.norm(train_z, axis=1, keepdims=True), 1e-12)
    nearest = (z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12) @ unit.T).argmax(1)
    lookup = [decode(train[int(j)]["input_ids"].tolist()) for j in nearest]

    written = [decode(r) for r in _write(model, ids, z, pad_id, batch_size)]
    shuffled = [decode(r) for r in _write(model, ids, np.roll(z, -1, axis=0), pad_id, batch_size)]
    null = [decode(r) for r in _write(model, ids, None, pad_id, batch_size)]
    out: Dict[str, float] = {"dashboard_samples": n}
    for name, texts in (("", written), ("_lookup", lookup), ("_shuffled", shuffled), ("_null", null)):
        out[f"dashboard_chrf{name}"] = chrf(texts, sources)
        out[f"dashboard_bleu{name}"] = bleu(texts, sources)

    diffusion = build_latent_diffusion(cfg)
    joint = {order: _joint(model, diffusion, ids, pad_id, batch_size, order, int(cfg.eval.latent_steps))
             for order in ("together", "latent_first")}
    joint_texts = [decode(r) for order in ("together", "latent_first") for r in joint[order][0]]

    json_path = cfg.data.get("json_path") if "json_path" in cfg.data else None
    own = projection_source_model(Path(json_path).parent) if json_path and projection else None
    back = _model_latents(model, encode_texts(written + sources + joint_texts, proj_dir, expect_model=own))
    out["dashboard_roundtrip_cos"] = float(row_cosines(back[:n], z).mean())
    out["dashboard_roundtrip_cos_source"] = float(row_cosines(back[n:2 * n], z).mean())
    # its chance level: the written text against another sentence's latent (the next one's)
    out["dashboard_roundtrip_cos_shuffled"] = float(row_cosines(back[:n], np.roll(z, -1, axis=0)).mean())
    out["dashboard_joint_pair_cos"] = float(row_cosines(back[2 * n:3 * n], joint["together"][1]).mean())
    out["dashboard_joint_pair_cos_sequential"] = float(row_cosines(back[3 * n:], joint["latent_first"][1]).mean())

    device = trained.device
    g = rng.generator("eval_sampling")
    zt = []
    for i in range(0, n, batch_size):
        rows = ids[i:i + batch_size]
        T = max(len(r) for r in rows)
        x = torch.full((len(rows), T), pad_id, dtype=torch.long)
        for r, row in enumerate(rows):
            x[r, :len(row)] = torch.tensor(row)
        init = torch.randn(len(rows), cfg.model.latent_dim, generator=g)
        zt.append(generate_latent(model, diffusion, x.to(device), steps=int(cfg.eval.latent_steps),
                                  init_noise=init.to(device)).float().cpu().numpy())
    zt = np.concatenate(zt)
    mean = np.broadcast_to(train_z.mean(0), z.shape)
    out["dashboard_t2l_mse"] = float(((zt - z) ** 2).mean())
    out["dashboard_t2l_cos"] = float(row_cosines(zt, z).mean())
    out["dashboard_t2l_mse_mean_latent"] = float(((mean - z) ** 2).mean())
    out["dashboard_t2l_cos_mean_latent"] = float(row_cosines(mean, z).mean())

    features = load_sentence_model(MAUVE_FEATURES, "cpu" if device.type == "cpu" else None)
    p = embed_texts(features, written, show_progress=False)
    q = embed_texts(features, sources, show_progress=False)
    out["dashboard_mauve_minilm"] = mauve_score(p, q)

    if bound_clean is not None and bound_null is not None:
        out["dashboard_nelbo_clean"] = bound_clean.nats_per_token
        out["dashboard_nelbo_null"] = bound_null.nats_per_token
        sentences = bound_sentences or 1
        out["dashboard_latent_nats_per_sentence"] = ((bound_null.nats_per_token - bound_clean.nats_per_token)
                                                     * bound_clean.tokens / sentences)
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:                 # a metric that came out NaN is reported, never passed on silently
        out["dashboard_nonfinite"] = bad
    return out


def count_sentences(batches, max_batches: Optional[int]) -> int:
    """Rows with at least one token in the first ``max_batches`` batches (what the bound scored)."""
    total = 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        total += int((batch["attention_mask"].sum(1) > 0).sum())
    return total
