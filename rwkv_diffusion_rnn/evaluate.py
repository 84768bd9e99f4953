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

import copy
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a file: python rwkv_diffusion_rnn/evaluate.py
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if not p or str(Path(p).resolve()) != _here]
    sys.path.insert(0, str(Path(_here).parent))

EVAL_FILE = "eval.json"


def _checkpoint_dir(path: Path) -> Path:
    from rwkv_diffusion_rnn.training import checkpoints as ckpt
    if (path / ckpt.MANIFEST).is_file():
        return path
    latest = ckpt.latest_checkpoint(path)
    if latest is None:
        why = "is neither a checkpoint nor a run folder holding one" if path.is_dir() else "does not exist"
        raise ckpt.CheckpointError(f"checkpoint={path} {why}; pass a checkpoint directory "
                                   f"(e.g. <logging.save_dir>/step_0002000) or the run's logging.save_dir")
    return latest


def _config(path: Path, overrides: Sequence[str]):
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    from rwkv_diffusion_rnn.training import checkpoints as ckpt
    from rwkv_diffusion_rnn.training.config_validation import ConfigError
    file = path / ckpt.CONFIG_FILE
    if not file.is_file():
        raise ckpt.CheckpointError(f"{path} has no {ckpt.CONFIG_FILE}: the model and data it was trained on "
                                   "cannot be rebuilt; evaluate a checkpoint the trainer wrote")
    cfg = OmegaConf.load(file)
    OmegaConf.set_struct(cfg, True)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value (e.g. eval.mc_samples=8)")
        try:
            OmegaConf.update(cfg, key, OmegaConf.select(OmegaConf.from_dotlist([item]), key), merge=False)
        except OmegaConfBaseException:
            raise ConfigError(f"{key}: no such key in {file} (the saved config of this checkpoint)") from None
    return cfg


def _tokenizer(path: Path, cfg):
    from rwkv_diffusion_rnn.data.tokenizer import tokenizer_from_spec
    from rwkv_diffusion_rnn.training import checkpoints as ckpt
    spec = ckpt.read_tokenizer_spec(path)
    if spec is None:
        if cfg.data.kind == "text":
            raise ckpt.CheckpointError(
                f"{path} has no {ckpt.TOKENIZER_FILE}: its corpus cannot be tokenized as in training (a "
                "chars vocabulary comes from the training text). Evaluate a checkpoint the trainer wrote, "
                f"or copy {ckpt.TOKENIZER_FILE} from another checkpoint of the same run")
        return None
    t = cfg.tokenizer
    try:
        return tokenizer_from_spec(spec, cache_dir=t.cache_dir, local_files_only=True,
                                   trust_remote_code=t.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ckpt.CheckpointError(f"{path / ckpt.TOKENIZER_FILE} cannot be loaded: {e}") from e


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
    from rwkv_diffusion_rnn.training import checkpoints as ckpt
    from rwkv_diffusion_rnn.training import likelihood, rng
    from rwkv_diffusion_rnn.training.builders import autocast, build_model, build_text_diffusion, resolve_device

    path = _checkpoint_dir(Path(checkpoint))
    ckpt.verify_checkpoint(path)
    cfg = _config(path, overrides)
    tokenizer = _tokenizer(path, cfg)
    batches = _val_batches(cfg, tokenizer)
    device = resolve_device(cfg.training.device)

    model = build_model(cfg)
    ema = copy.deepcopy(model) if (path / ckpt.EMA_FILE).is_file() else None
    state, _ = ckpt.load_checkpoint(path, model=model, ema=ema, restore_rng=False)
    model = (ema if ema is not None else model).to(device).eval()  # training evaluates the EMA too

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
    result = {"checkpoint": str(path), "step": state.get("global_step"), "objective": objective,
              "quantity": "nll" if objective == "ar" else "nelbo", "mixer": cfg.model.mixer,
              "split": "validation", "seq_len": cfg.data.seq_len, "weights": "ema" if ema is not None else "model",
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
