"""The likelihood of a trained model on held-out text:
``python -m rwkv_diffusion_rnn.evaluate checkpoint=<dir> [key=value ...]``.

``checkpoint`` is a checkpoint directory (or a run's ``logging.save_dir``: its newest
checkpoint). The run's saved ``config.yaml`` and ``tokenizer.json`` rebuild the model and its
data; ``key=value`` overrides change them, e.g. ``eval.mc_samples=8``, ``eval.max_batches=null``
(the whole validation split), ``data.val_path=other.txt`` or ``training.device=cpu``. Scores the
validation split as training does (the same windows and noise, so with the same ``eval`` keys it
reproduces the ``val_nelbo`` / ``val_nll`` training logged): a diffusion model's negative ELBO,
an AR model's exact NLL, in nats and bits per token, bits per character where the tokenizer
knows characters, perplexity (a bound for diffusion), tokens scored and the Monte-Carlo standard
error; a text + latent model also without its latent (``null_latent``). ``eval.context=stream``
scores the validation split of a text corpus as one stream instead of independent windows:
left to right in chunks of ``data.seq_len`` tokens with the state carried (``causal`` and
``block_causal`` models; every token given all the text before it; see
:func:`~rwkv_diffusion_rnn.training.likelihood.score_stream`). With ``dashboard=true``
(``dashboard.samples=N``, default 32 held-out sentences; ``dashboard.projection=<dir>``, default
the folder of ``data.json_path``) a text + latent model also gets the ``dashboard_*`` keys of
:mod:`rwkv_diffusion_rnn.training.dashboard` (latent -> text chrF / BLEU against the lookup,
shuffled and null references, round-trip cosine, text -> latent MSE / cosine, MAUVE on MiniLM
features, the nats per sentence the latent carries). An embedding-diffusion
model (``training.objective=embedding``) has no bound here: it reports ``embedding_mse``,
``rounding_ce`` (nats per token of the rounding softmax of its x0 prediction at one noise draw per
window: a score, not a bound on the likelihood), ``rounding_acc`` and ``embedding_drift`` (the
root-mean-square distance per dimension from the predicted x0 to the nearest token embedding).
Writes ``<dir>/eval.json`` (or ``out=<file>``) and prints it. Progress goes to stderr: a bar on a terminal
(``logging.progress_bar``), a plain line every 30 s when the output is a file or a log.
The text corpus is read from the token cache training built (``data.cache_dir``, relative to the
current directory), tokenized again only when its sources changed.

The quality of generated samples:
``python -m rwkv_diffusion_rnn.evaluate eval.samples=<file.jsonl> eval.scorer=<AR checkpoint> [out=<file>]
[eval.batch_size=16] [key=value ...]``.

``<file.jsonl>`` holds one JSON object per line with a ``"text"`` string (as ``generate`` writes;
other fields are ignored). ``eval.scorer`` is a checkpoint (or run folder) trained with
``training.objective=ar``; ``checkpoint=<dir>`` serves as the scorer when ``eval.scorer`` is not
given, and ``key=value`` overrides apply to the scorer's saved config (e.g. ``training.device=cpu``).
Each text is tokenized by the scorer's tokenizer and scored after its end-of-text id (what precedes
a document in the training corpus): the exact NLL of every token given the tokens before it.
Reports ``gen_nll`` (nats per token over all samples) and ``gen_ppl`` = exp(gen_nll), the
token-weighted generative perplexity (as MDLM), ``gen_ppl_mean_of_samples`` (the mean over
samples of each one's perplexity), the unigram ``entropy`` in nats of each sample's token
histogram (mean and ``entropy_std`` over samples; low entropy with a low perplexity means
repetition), ``bits_per_char`` where the tokenizer knows characters, ``tokens`` scored and the
count of ``empty`` texts (skipped). Writes ``<file>.eval.json`` beside the samples (or
``out=<file>``) and prints it.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a file: python rwkv_diffusion_rnn/evaluate.py
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if not p or str(Path(p).resolve()) != _here]
    sys.path.insert(0, str(Path(_here).parent))

EVAL_FILE = "eval.json"


def _val_batches(cfg, tokenizer):
    from rwkv_diffusion_rnn.data.sources import data_source
    return data_source(cfg.data.kind).validation_batches(cfg, tokenizer)


def evaluate(checkpoint, overrides: Sequence[str] = (), out: Optional[str] = None,
             dashboard: Optional[dict] = None) -> dict:
    """Scores ``checkpoint`` (see the module docstring); returns what it writes to ``eval.json``.
    ``dashboard``: also the text + latent dashboard, with these options (``samples``, ``projection``)."""
    from rwkv_diffusion_rnn.common import rng
    from rwkv_diffusion_rnn.training import likelihood
    from rwkv_diffusion_rnn.training.builders import autocast, build_text_diffusion
    from rwkv_diffusion_rnn.training.events import output_is_terminal
    from rwkv_diffusion_rnn.training.trained import load_trained

    trained = load_trained(checkpoint, overrides)
    path, cfg, tokenizer, model, device = trained.path, trained.cfg, trained.tokenizer, trained.model, trained.device
    if cfg.training.objective != "ar":
        from rwkv_diffusion_rnn.common.errors import ConfigError
        from rwkv_diffusion_rnn.diffusion.diffusion_process import undecodable_noise
        why = undecodable_noise(cfg.text_noise.noise_type)
        if why:
            raise ConfigError(f"{path} cannot be scored: {why}")
    batches = _val_batches(cfg, tokenizer)
    objective, ev = cfg.training.objective, cfg.eval
    if objective == "embedding":
        from rwkv_diffusion_rnn.diffusion.embedding_diffusion import embedding_scores
        from rwkv_diffusion_rnn.training.builders import build_objective
        scores = embedding_scores(build_objective(cfg, None, None), model, batches, rng.generator("eval_noise"),
                                  max_batches=ev.max_batches, device=device,
                                  autocast=lambda: autocast(device, cfg.training.dtype))
        result = {"checkpoint": str(path), "step": trained.step, "objective": objective,
                  "quantity": "rounding_ce (not a likelihood bound)", "mixer": cfg.model.mixer,
                  "split": "validation", "seq_len": cfg.data.seq_len, "weights": trained.weights, **scores}
        _write_result(Path(out) if out else path / EVAL_FILE, result, "out" if out else "checkpoint")
        return result
    schedule = build_text_diffusion(cfg).schedule

    # off a terminal (a file, a CI log) plain lines always report progress: a long job never looks silent
    show = bool(cfg.logging.progress_bar) or not output_is_terminal()

    def run(latent: str):
        return likelihood.score(model, batches, objective=objective, schedule=schedule, mask_id=cfg.model.mask_id,
                                vocab_size=cfg.model.vocab_size,
                                generator=rng.generator("eval_noise"), mc_samples=ev.mc_samples,
                                max_batches=ev.max_batches, tokenizer=tokenizer, latent=latent,
                                device=device, autocast=lambda: autocast(device, cfg.training.dtype),
                                progress=show,
                                progress_desc="evaluate" if latent == "clean" else f"evaluate ({latent} latent)")

    if ev.get("context", "windows") == "stream":
        summary = _score_stream(trained, batches, schedule, show)
    else:
        summary = run("clean")
    result = {"checkpoint": str(path), "step": trained.step, "objective": objective,
              "quantity": "nll" if objective == "ar" else "nelbo", "mixer": cfg.model.mixer,
              "split": "validation", "seq_len": cfg.data.seq_len, "context": ev.get("context", "windows"),
              "weights": trained.weights,
              **summary.as_dict()}
    null = None
    if cfg.model.latent_prefix_len and objective != "ar":
        result["latent"] = "clean"
        null = run("null")
        result["null_latent"] = null.as_dict()
    if dashboard is not None:
        from rwkv_diffusion_rnn.training import dashboard as dash
        result.update(dash.dashboard(trained, **dashboard, bound_clean=summary, bound_null=null,
                                     bound_sentences=dash.count_sentences(batches, ev.max_batches),
                                     batch_size=int(cfg.training.eval_batch_size)))
    _write_result(Path(out) if out else path / EVAL_FILE, result, "out" if out else "checkpoint")
    return result


def _score_stream(trained, batches, schedule, show: bool):
    """``eval.context=stream``: the validation tokens as one stream (refused by key where it cannot be)."""
    from rwkv_diffusion_rnn.common import rng
    from rwkv_diffusion_rnn.common.errors import ConfigError
    from rwkv_diffusion_rnn.training import likelihood
    from rwkv_diffusion_rnn.training.builders import autocast
    cfg, model, device = trained.cfg, trained.model, trained.device
    tokens = getattr(batches, "tokens", None)
    if tokens is None:
        raise ConfigError(f"eval.context=stream reads a text corpus's validation split as one stream: data.kind="
                          f"{cfg.data.kind} gives separate examples; use eval.context=windows")
    try:
        return likelihood.score_stream(model, tokens, objective=cfg.training.objective, chunk=int(cfg.data.seq_len),
                                       schedule=schedule, mask_id=cfg.model.mask_id, vocab_size=cfg.model.vocab_size,
                                       generator=rng.generator("eval_noise"), mc_samples=cfg.eval.mc_samples,
                                       tokenizer=trained.tokenizer, device=device,
                                       autocast=lambda: autocast(device, cfg.training.dtype), progress=show)
    except ValueError as e:
        raise ConfigError(f"eval.context=stream: {e} (model.mixer={cfg.model.mixer}, model.arch={cfg.model.arch} in "
                          f"{trained.path}); use eval.context=windows") from None


def _write_result(path: Path, result: dict, key: str) -> None:
    """Writes ``result`` atomically; a failed write names the setting that chose ``path``."""
    from rwkv_diffusion_rnn.common.errors import ConfigError
    from rwkv_diffusion_rnn.common.files import atomic_write_json, os_error_message
    try:
        atomic_write_json(path, result, indent=2)
    except OSError as e:
        raise ConfigError(os_error_message(e, key, path)) from None


def _read_samples(samples: Path) -> list:
    """``(line number, text)`` of each non-blank line of a samples file (one JSON object with a
    ``"text"`` string per line)."""
    from rwkv_diffusion_rnn.common.errors import DataFormatError
    if not samples.is_file():
        raise FileNotFoundError(f"eval.samples={samples} does not exist" if not samples.exists() else
                                f"eval.samples={samples} is not a file")
    try:
        lines = samples.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataFormatError(f"eval.samples={samples} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{samples}:{number}: not a JSON object ({e.msg} at column {e.colno}); "
                                  'a samples file holds one {"text": ...} object per line') from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            why = ("has no \"text\" field" if isinstance(record, dict) and "text" not in record else
                   "has a \"text\" that is not a string" if isinstance(record, dict) else
                   f"is a JSON {type(record).__name__}, not an object")
            raise DataFormatError(f"{samples}:{number}: the line {why}; "
                                  'a samples file holds one {"text": ...} object per line')
        texts.append((number, record["text"]))
    if not texts:
        raise DataFormatError(f"eval.samples={samples} holds no samples (no non-blank line)")
    return texts


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def samples_eval_path(samples) -> Path:
    """Where ``evaluate_samples`` writes by default: ``<samples without .jsonl>.eval.json``."""
    samples = Path(samples)
    stem = samples.name[:-len(".jsonl")] if samples.name.endswith(".jsonl") else samples.name
    return samples.with_name(stem + ".eval.json")


def evaluate_samples(samples, scorer, out: Optional[str] = None, batch_size: int = 16, progress: bool = True,
                     *, overrides: Sequence[str] = ()) -> dict:
    """Scores the texts of the samples file ``samples`` under the AR checkpoint ``scorer`` (see
    the module docstring; ``overrides`` apply to the scorer's saved config); returns what it
    writes to ``out`` (default: ``<samples without .jsonl>.eval.json``)."""
    from rwkv_diffusion_rnn.common.errors import ConfigError, DataFormatError, UnknownCharacterError
    from rwkv_diffusion_rnn.training import likelihood
    from rwkv_diffusion_rnn.training.builders import autocast
    from rwkv_diffusion_rnn.training.trained import checkpoint_dir, load_trained, saved_config

    if batch_size < 1:
        raise ConfigError(f"eval.batch_size={batch_size} must be >= 1")
    samples = Path(samples)
    texts = _read_samples(samples)
    saved = saved_config(checkpoint_dir(scorer), overrides)   # refuse a diffusion scorer before loading it
    if saved.training.objective != "ar":
        raise ConfigError(f"eval.scorer={scorer} was trained with training.objective={saved.training.objective}; "
                          "the scorer must be an AR checkpoint (training.objective=ar)")
    from rwkv_diffusion_rnn.models.mixers import MIXERS
    if saved.model.mixer not in MIXERS or not MIXERS[saved.model.mixer].autoregressive:
        ar = ", ".join(n for n, c in MIXERS.items() if c.autoregressive)
        raise ConfigError(f"eval.scorer={scorer} has model.mixer={saved.model.mixer}; an AR scorer reads the "
                          f"tokens before each one only (model.mixer={ar})")
    trained = load_trained(scorer, overrides)
    cfg, tokenizer, device = trained.cfg, trained.tokenizer, trained.device
    if tokenizer is None:
        raise ConfigError(f"eval.scorer={scorer} has no tokenizer: it cannot score text")
    ids = []
    for number, text in texts:
        try:
            ids.append(tokenizer.encode(text))
        except UnknownCharacterError as e:
            raise DataFormatError(f"{samples}:{number}: {e}, the vocabulary of the scorer "
                                  f"({trained.path}); score these samples with a scorer whose "
                                  "tokenizer covers them") from None
    scored = [i for i, row in enumerate(ids) if row]
    if not scored:
        raise DataFormatError(f"eval.samples={samples}: every one of its {len(ids)} samples is empty: "
                              "nothing to score")
    max_len = cfg.model.get("pos_emb_len", 0)
    longest = max(scored, key=lambda i: len(ids[i]))
    if max_len and len(ids[longest]) > max_len:
        raise ConfigError(f"{samples}:{texts[longest][0]}: {len(ids[longest])} tokens exceed the scorer's "
                          f"model.pos_emb_len={max_len} (its learned positions)")
    nats, tokens = likelihood.score_texts(trained.model, [ids[i] for i in scored], tokenizer.eos_id, device,
                                          batch_size=batch_size, progress=progress,
                                          autocast=lambda: autocast(device, cfg.training.dtype))
    entropies = [likelihood.unigram_entropy(ids[i]) for i in scored]
    total_nats, total_tokens = math.fsum(nats), sum(tokens)
    result = {"samples": str(samples), "scorer": str(trained.path), "scorer_step": trained.step,
              "num_samples": len(scored), "empty": len(ids) - len(scored), "tokens": total_tokens,
              "gen_nll": total_nats / total_tokens, "gen_ppl": _exp(total_nats / total_tokens),
              "gen_ppl_mean_of_samples": statistics.fmean(_exp(n / t) for n, t in zip(nats, tokens)),
              "entropy": statistics.fmean(entropies), "entropy_std": statistics.pstdev(entropies)}
    count = getattr(tokenizer, "count_chars", None)
    chars = [count(ids[i]) for i in scored] if count is not None else [None]
    if None not in chars and sum(chars):
        result["bits_per_char"] = total_nats / math.log(2) / sum(chars)
    _write_result(Path(out) if out else samples_eval_path(samples), result, "out" if out else "eval.samples")
    return result


def _dashboard_options(options: dict) -> dict:
    """``dashboard.samples=N`` and ``dashboard.projection=<dir>`` as keyword arguments."""
    from rwkv_diffusion_rnn.common.errors import ConfigError
    unknown = sorted(set(options) - {"samples", "projection"})
    if unknown:
        raise ConfigError(f"dashboard.{unknown[0]}: no such option; dashboard takes dashboard.samples=N and "
                          "dashboard.projection=<folder of projection.npz>")
    kwargs = {}
    if "samples" in options:
        try:
            kwargs["samples"] = int(options["samples"])
        except ValueError:
            kwargs["samples"] = 0
        if kwargs["samples"] < 2:
            raise ConfigError(f"dashboard.samples={options['samples']} must be an integer >= 2")
    if "projection" in options:
        kwargs["projection"] = options["projection"]
    return kwargs


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv else 2)
    from rwkv_diffusion_rnn.common.errors import ConfigError, ProjectError
    checkpoint = out = samples = scorer = batch_size = None
    overwrite = False
    dashboard = None
    dash_options = {}
    overrides = []
    for item in argv:
        if item.startswith("overwrite="):
            overwrite = item.split("=", 1)[1].lower() == "true"
        elif item.startswith("checkpoint="):
            checkpoint = item.split("=", 1)[1]
        elif item.startswith("out="):
            out = item.split("=", 1)[1]
        elif item.startswith("eval.samples="):
            samples = item.split("=", 1)[1]
        elif item.startswith("eval.scorer="):
            scorer = item.split("=", 1)[1]
        elif item.startswith("eval.batch_size="):
            batch_size = item
        elif item.startswith("dashboard="):
            dashboard = item.split("=", 1)[1].lower() == "true"
        elif item.startswith("dashboard."):
            dash_options[item[len("dashboard."):].partition("=")[0]] = item.partition("=")[2]
        else:
            overrides.append(item)
    try:
        from rwkv_diffusion_rnn.common.files import check_output
        check_output("out", out, [samples] if samples else [], overwrite)
        if samples is not None or scorer is not None:
            if not samples:
                raise ConfigError("eval.scorer scores generated samples: give eval.samples=<file.jsonl>")
            if checkpoint and scorer:
                raise ConfigError("give the scorer once: eval.scorer=<AR checkpoint> or checkpoint=<dir>, not both")
            scorer = scorer or checkpoint
            if not scorer:
                raise ConfigError("eval.samples needs eval.scorer=<AR checkpoint>")
            size = 16
            if batch_size is not None:
                value = batch_size.split("=", 1)[1]
                try:
                    size = int(value)
                except ValueError:
                    raise ConfigError(f"eval.batch_size={value} is not an integer") from None
            result = evaluate_samples(samples, scorer, out=out, batch_size=size, overrides=overrides)
        else:
            if batch_size is not None:
                overrides.append(batch_size)
            if not checkpoint:
                raise ConfigError("checkpoint=<dir> is required (a checkpoint directory or a run's logging.save_dir)"
                                  ", or eval.samples=<file.jsonl> eval.scorer=<AR checkpoint> to score samples")
            result = evaluate(checkpoint, overrides, out=out,
                              dashboard=_dashboard_options(dash_options) if dashboard else None)
    except (ProjectError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
