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
error; a text + latent model also without its latent (``null_latent``). Writes ``<dir>/eval.json``
(or ``out=<file>``) and prints it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a file: python rwkv_diffusion_rnn/evaluate.py
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if not p or str(Path(p).resolve()) != _here]
    sys.path.insert(0, str(Path(_here).parent))

EVAL_FILE = "eval.json"


def _val_batches(cfg, tokenizer):
    from rwkv_diffusion_rnn.training.builders import build_data, corpus_spec, corpus_val_windows
    d = cfg.data
    if d.kind == "text":  # only the validation split: a corpus to score need not hold a training batch
        from rwkv_diffusion_rnn.data.corpus import prepare_corpus
        corpus = prepare_corpus(corpus_spec(d), tokenizer, d.cache_dir, progress=cfg.logging.progress_bar)
        val = corpus_val_windows(d, corpus, cfg.training.eval_batch_size)
        if val is None:
            from rwkv_diffusion_rnn.training.config_validation import ConfigError
            raise ConfigError("the corpus has no validation split (data.val_fraction=0 and no data.val_path): "
                              "set data.val_path=<file> or data.val_fraction")
        return val
    if d.kind == "synthetic":
        from rwkv_diffusion_rnn.training.config_validation import ConfigError
        raise ConfigError("data.kind=synthetic: a task model is scored by its task accuracy at training, "
                          "not by a likelihood")
    val = build_data(cfg, tokenizer=tokenizer).val
    if val is None:
        from rwkv_diffusion_rnn.training.config_validation import ConfigError
        raise ConfigError("the data has no validation split: set data.val_json_path or data.val_fraction")
    return val


def evaluate(checkpoint, overrides: Sequence[str] = (), out: Optional[str] = None) -> dict:
    """Scores ``checkpoint`` (see the module docstring); returns what it writes to ``eval.json``."""
    from rwkv_diffusion_rnn.data.data_simple import atomic_write_json
    from rwkv_diffusion_rnn.training import likelihood, rng
    from rwkv_diffusion_rnn.training.builders import autocast, build_text_diffusion
    from rwkv_diffusion_rnn.training.trained import load_trained

    trained = load_trained(checkpoint, overrides)
    path, cfg, tokenizer, model, device = trained.path, trained.cfg, trained.tokenizer, trained.model, trained.device
    batches = _val_batches(cfg, tokenizer)
    objective, ev = cfg.training.objective, cfg.eval
    schedule = build_text_diffusion(cfg).schedule

    def run(latent: str):
        return likelihood.score(model, batches, objective=objective, schedule=schedule, mask_id=cfg.model.mask_id,
                                vocab_size=cfg.model.vocab_size,
                                generator=rng.generator("eval_noise"), mc_samples=ev.mc_samples,
                                max_batches=ev.max_batches, tokenizer=tokenizer, latent=latent,
                                device=device, autocast=lambda: autocast(device, cfg.training.dtype),
                                progress=cfg.logging.progress_bar)

    summary = run("clean")
    result = {"checkpoint": str(path), "step": trained.step, "objective": objective,
              "quantity": "nll" if objective == "ar" else "nelbo", "mixer": cfg.model.mixer,
              "split": "validation", "seq_len": cfg.data.seq_len, "weights": trained.weights,
              **summary.as_dict()}
    if cfg.model.latent_prefix_len and objective != "ar":
        result["latent"] = "clean"
        result["null_latent"] = run("null").as_dict()
    atomic_write_json(Path(out) if out else path / EVAL_FILE, result, indent=2)
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv else 2)
    from rwkv_diffusion_rnn.data.data_simple import DataFormatError
    from rwkv_diffusion_rnn.training.config_validation import ConfigError
    from rwkv_diffusion_rnn.weights.pretrained_rwkv import CheckpointError
    checkpoint = out = None
    overrides = []
    for item in argv:
        if item.startswith("checkpoint="):
            checkpoint = item.split("=", 1)[1]
        elif item.startswith("out="):
            out = item.split("=", 1)[1]
        else:
            overrides.append(item)
    try:
        if not checkpoint:
            raise ConfigError("checkpoint=<dir> is required (a checkpoint directory or a run's logging.save_dir)")
        result = evaluate(checkpoint, overrides, out=out)
    except (ConfigError, DataFormatError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
