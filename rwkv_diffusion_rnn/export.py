"""Export an RWKV-7 checkpoint to the RWKV ecosystem's formats:
``python -m rwkv_diffusion_rnn.export checkpoint=<dir> format=blinkdl|fla out=<path> [overwrite=true]``.

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


def export(checkpoint, fmt: str, out, overwrite: bool = False) -> Path:
    """Writes the RWKV-7 of ``checkpoint`` as ``fmt`` at ``out``; returns ``out``."""
    from rwkv_diffusion_rnn.common.errors import ConfigError
    from rwkv_diffusion_rnn.training.trained import load_trained
    from rwkv_diffusion_rnn.weights.export import FORMATS, lm_state_dict, save
    from rwkv_diffusion_rnn.weights.pretrained_rwkv import config_from_state_dict
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
        if out.is_dir() != (fmt == "fla"):
            raise ConfigError(f"out={out} is a {'folder' if out.is_dir() else 'file'} and format={fmt} writes a "
                              f"{'folder' if fmt == 'fla' else '.pth file'}: give another path")
    trained = load_trained(checkpoint, device="cpu")
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
                raise ConfigError(f"{key}= is required (export checkpoint=<dir> format=blinkdl|fla out=<path>)")
        path = export(values["checkpoint"], values["format"], values["out"],
                      overwrite=values.get("overwrite", "false").lower() == "true")
    except (ProjectError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
