"""Export a checkpoint: ``python -m rwkv_diffusion_rnn.export checkpoint=<dir> format=blinkdl|fla|folder out=<path> [overwrite=true]``.

``format=folder`` writes a model folder to hand to someone else, for any architecture and
objective: ``model.safetensors`` (the EMA weights when the checkpoint kept them, else the
model's; the card and ``trainer_state.json`` say which), the run's ``config.yaml``,
``tokenizer.json`` (and the tokenizer's own files under ``tokenizer/`` when it read local files),
``eval.json`` / ``metrics.json`` when the checkpoint has them, a ``README.md`` model card generated
from the run (what the model is, how to load it, its training data and steps, its evaluation
figures with their commands) and a manifest with every file's sha256. ``generate``, ``evaluate``,
``chat``, the lm-eval harness and ``training.init_from`` take the folder as ``checkpoint=`` /
``training.init_from=``; loading it reads only safetensors, YAML and JSON (never a pickle, never
code that comes with it).

The RWKV ecosystem's formats (RWKV-7 checkpoints):

``checkpoint`` is a checkpoint directory or a run folder (its newest checkpoint; the EMA weights
when it kept them). ``format=blinkdl`` writes a BlinkDL ``.pth`` (the layout rwkv7-g1 ships in:
BlinkDL's ``rwkv`` package and ``model.rwkv_name=<file>.pth`` read it); ``format=fla`` writes a
folder with ``config.json`` and ``model.safetensors`` (fla's ``RWKV7ForCausalLM.from_pretrained``
and ``load_rwkv7`` read it). An AR run (``training.objective=ar``) exports as the language model it
is, its logits unchanged; a diffusion run exports its backbone and text head. A checkpoint of
another architecture (transformer, hybrid, qwen3) is refused, and so is an ``out`` that exists
unless ``overwrite=true``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a file: python rwkv_diffusion_rnn/export.py
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if not p or str(Path(p).resolve()) != _here]
    sys.path.insert(0, str(Path(_here).parent))

OPTIONS = ("checkpoint", "format", "out", "overwrite")
FOLDER = "folder"       # the model folder; the weight formats are weights.export.FORMATS
CARD_FILE = "README.md"
TOKENIZER_FILES = "tokenizer"   # where a tokenizer's local files go inside the folder


def formats() -> tuple:
    from rwkv_diffusion_rnn.weights.export import FORMATS
    return (*FORMATS, FOLDER)


def export(checkpoint, fmt: str, out, overwrite: bool = False) -> Path:
    """Writes ``checkpoint`` as ``fmt`` at ``out`` (module docstring); returns ``out``."""
    from rwkv_diffusion_rnn.common.errors import ConfigError
    from rwkv_diffusion_rnn.training.trained import load_trained
    from rwkv_diffusion_rnn.weights.export import lm_state_dict, save
    from rwkv_diffusion_rnn.weights.pretrained_rwkv import config_from_state_dict
    FORMATS = formats()
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r} is not valid; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if fmt == "blinkdl" and out.suffix != ".pth":
        raise ConfigError(f"out={out}: format=blinkdl writes a .pth file (BlinkDL's rwkv package reads <name>.pth)")
    source = Path(checkpoint).resolve()
    if out.resolve() == source or source in out.resolve().parents:
        raise ConfigError(f"out={out} is inside the checkpoint it exports: write it elsewhere")
    if out.exists():
        if not overwrite:
            raise ConfigError(f"out={out} exists: give another path, or overwrite=true to replace it")
        if out.is_dir() != (fmt in ("fla", FOLDER)):
            raise ConfigError(f"out={out} is a {'folder' if out.is_dir() else 'file'} and format={fmt} writes a "
                              f"{'folder' if fmt == 'fla' else '.pth file'}: give another path")
    trained = load_trained(checkpoint, device="cpu")
    if fmt == FOLDER:
        return export_folder(trained, out)
    sd = lm_state_dict(trained.model, fold_time=0.0 if trained.objective == "ar" else None)
    cfg = config_from_state_dict(sd, str(trained.path))
    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.with_name(f".{out.name}.replaced") if out.exists() else None
    if old is not None:
        out.rename(old)             # put back if the write fails
    try:
        save(sd, cfg, fmt, out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    return out


def _tokenizer_files(trained):
    """The tokenizer spec the folder keeps and the files it copies: a tokenizer that read local
    files (an RWKV World vocabulary file, a Hugging Face tokenizer folder) gets them under
    ``tokenizer/``, its spec pointing there relative to the folder (``in_checkpoint``)."""
    from rwkv_diffusion_rnn.training import checkpoints as ckpt
    from rwkv_diffusion_rnn.training.trained import local_tokenizer_paths, resolve_tokenizer_spec
    spec = ckpt.read_tokenizer_spec(trained.path)
    if spec is None:
        return None, {}
    spec = resolve_tokenizer_spec(trained.path, spec)
    copies = {}
    for local in local_tokenizer_paths(spec):
        source = Path(local).expanduser()
        if source.is_file():
            copies[f"{TOKENIZER_FILES}/{source.name}"] = source
            spec = {**spec, "vocab_file": f"{TOKENIZER_FILES}/{source.name}"}
        elif source.is_dir():
            for f in sorted(source.iterdir()):
                if f.is_file():
                    copies[f"{TOKENIZER_FILES}/{f.name}"] = f
            spec = {**spec, "name": TOKENIZER_FILES}
    if copies:
        spec["in_checkpoint"] = True
    return spec, copies


def _figures(result: dict) -> str:
    keys = ("nats_per_token", "bits_per_token", "bits_per_char", "perplexity", "stderr", "tokens", "mc_samples")
    return ", ".join(f"{k} {result[k]:.4g}" if isinstance(result[k], float) else f"{k} {result[k]}"
                     for k in keys if result.get(k) is not None)


def model_card(trained, weights: str, evaluation: dict | None, metrics: dict | None, params: int) -> str:
    """The README.md of a model folder, from the run's saved config and results."""
    from omegaconf import OmegaConf
    cfg = trained.cfg

    def get(key):
        return OmegaConf.select(cfg, key, default=None)
    objective = cfg.training.objective
    what = ("an autoregressive language model (training.objective=ar)" if objective == "ar" else
            "a masked-diffusion language model (training.objective=diffusion)")
    latent = " with a sentence latent" if get("model.latent_prefix_len") else ""
    lines = [f"# {trained.path.parent.name}/{trained.path.name} ({get('model.arch')} / {get('model.mixer')})", "",
             f"A model of rwkv_diffusion_rnn: {what}{latent}, {params:,} parameters, "
             f"model.arch={get('model.arch')}, model.mixer={get('model.mixer')}, model.n_layer={get('model.n_layer')}, "
             f"model.n_embd={get('model.n_embd')}, data.seq_len={get('data.seq_len')}, "
             f"tokenizer {get('tokenizer.name')} ({get('model.vocab_size')} ids).", "",
             f"Weights: `model.safetensors` holds the {'EMA' if weights == 'ema' else 'trained (not EMA)'} weights "
             f"of step {trained.step} ({'the run kept an EMA' if weights == 'ema' else 'the run kept no EMA'}).", "",
             "## Load it", "", "```",
             'python -m rwkv_diffusion_rnn.generate checkpoint=<this folder> prompt="..." length=64',
             "python -m rwkv_diffusion_rnn.evaluate checkpoint=<this folder>",
             "python -m rwkv_diffusion_rnn.lm_eval_harness --model rwkv_diffusion --model_args checkpoint=<this folder> --tasks ...",
             "python -m rwkv_diffusion_rnn.train_rwkv training.init_from=<this folder> ...   # fine-tune",
             "```", "",
             "Loading reads safetensors, YAML and JSON only: no pickle, no code from this folder.", "",
             "## Training", "",
             f"- data: data.kind={get('data.kind')}" + "".join(
                 f", {k}={get(k)}" for k in ("data.path", "data.json_path", "data.token_dir", "data.hf_dataset")
                 if get(k)),
             f"- steps: {trained.step} (training.max_steps={get('training.max_steps')}, "
             f"batch {get('training.train_batch_size')} x {get('training.grad_accum_steps')} accumulation)",
             f"- optimizer: {get('optimizer.name')}, lr {get('optimizer.lr')}",
             f"- exported from: {trained.path}", "", "## Evaluation", ""]
    if metrics:
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        lines += ["Logged by training at its last evaluation (metrics.json): "
                  + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()), ""]
    if evaluation:
        quantity = "NLL" if evaluation.get("quantity") == "nll" else "negative ELBO (a bound)"
        mc = evaluation.get("mc_samples")
        command = "python -m rwkv_diffusion_rnn.evaluate checkpoint=<this folder>" + (
            f" eval.mc_samples={mc}" if mc and objective != "ar" else "")
        lines += [f"`evaluate` (eval.json, {evaluation.get('split', 'validation')} split, {quantity}, "
                  f"{evaluation.get('weights', '?')} weights): {_figures(evaluation)}.", "",
                  "```", command, "```", ""]
    if not metrics and not evaluation:
        lines += ["Not evaluated: run `python -m rwkv_diffusion_rnn.evaluate checkpoint=<this folder>`.", ""]
    return "\n".join(lines)


def export_folder(trained, out: Path) -> Path:
    """The model folder of ``trained`` at ``out`` (module docstring)."""
    import json
    from omegaconf import OmegaConf
    from rwkv_diffusion_rnn.training import checkpoints as ckpt
    spec, copies = _tokenizer_files(trained)
    state = {"global_step": trained.step, "epoch": ckpt.read_trainer_state(trained.path).get("epoch"),
             "weights": trained.weights, "exported_from": str(trained.path)}

    def read(name):
        f = trained.path / name
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None
    evaluation, metrics = read("eval.json"), read(ckpt.METRICS_FILE)
    params = sum(p.numel() for p in trained.model.parameters())
    texts = {CARD_FILE: model_card(trained, trained.weights, evaluation, metrics, params)}
    for name, value in (("eval.json", evaluation), (ckpt.METRICS_FILE, metrics)):
        if value is not None:
            texts[name] = json.dumps(value, indent=2) + "\n"
    config = OmegaConf.to_container(trained.cfg, resolve=False)
    return ckpt.save_model_folder(out, model=trained.model, trainer_state=state, config=config, tokenizer=spec,
                                  texts=texts, copies=copies)


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv else 2)
    from rwkv_diffusion_rnn.common.errors import ConfigError, ProjectError
    values = {}
    try:
        for item in argv:
            key, sep, value = item.partition("=")
            if not sep or key not in OPTIONS:
                raise ConfigError(f"{item!r}: export takes {', '.join(k + '=' for k in OPTIONS)}")
            values[key] = value
        for key in ("checkpoint", "format", "out"):
            if not values.get(key):
                raise ConfigError(f"{key}= is required (export checkpoint=<dir> format={'|'.join(formats())} out=<path>)")
        path = export(values["checkpoint"], values["format"], values["out"],
                      overwrite=values.get("overwrite", "false").lower() == "true")
    except (ProjectError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
