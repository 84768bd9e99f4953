"""The keys and values a Qwen3-LLaDA user types, read as this trainer's.

Qwen3-LLaDA's ``config.yaml`` and ``inference.py`` name several settings this project has under
other names. Where the meaning is the same the override is rewritten (and a note printed once);
where it is not, it is refused naming what to type instead. README.md ("Coming from Qwen3-LLaDA")
has the table.
"""

from __future__ import annotations

import sys
from typing import Dict, List, Optional, Sequence, Tuple

from ..common.errors import ConfigError

# their training key -> (our key, their values -> ours, None: the same values)
TRAIN_KEYS: Dict[str, Tuple[str, Optional[Dict[str, str]]]] = {
    "training.loss_impl": ("text_noise.loss_type", {"guidelines": "llada", "dllm": "llada", "soft_ce": "soft_ce"}),
    "training.noise.schedule": ("text_noise.schedule", {"uniform": "linear"}),
    "training.noise.noise_type": ("text_noise.noise_type", None),
    "training.noise.min_masking_rate": ("text_noise.min_masking_rate", None),
    "training.noise.mask_contiguous_region_prob": ("text_noise.span_prob", None),
    "training.noise.reweight_cap": ("text_noise.reweight_cap", None),
    "training.noise.random_length_prob": ("text_noise.truncate_prob", None),
    "training.block_attention.enabled": ("model.block_attention", None),
    "training.block_attention.block_length": ("model.block_size", None),
    "optim.name": ("optimizer.name", None),
    "dataset.name": ("data.hf_dataset", None),
}
# their values typed under our keys
VALUES: Dict[str, Dict[str, str]] = {
    "text_noise.loss_type": {"guidelines": "llada", "dllm": "llada"},
    "text_noise.schedule": {"uniform": "linear"},
}
# their keys with no one-to-one equivalent -> what to type here
TRAIN_REFUSED: Dict[str, str] = {
    "training.mode": "SFT is data=sft data.path=<conversations.jsonl> text_noise.sft=true; pretraining is "
                     "data=text data.path=<corpus>",
    "evaluation.do_eval_loss": "logging.eval_freq=N evaluates every N steps (0: never)",
    "evaluation.eval_every_steps": "logging.eval_freq=N",
}
# generate: their inference.py options -> ours
GENERATE_KEYS: Dict[str, Tuple[str, Optional[Dict[str, str]]]] = {"gen_length": ("length", None),
                                                                  "model": ("checkpoint", None)}
GENERATE_REFUSED: Dict[str, str] = {
    "block_attention": "block attention is part of the checkpoint's model (model.block_attention at training) "
                       "and applies at generation by itself",
}

_noted = set()


def _note(old: str, new: str) -> None:
    if old not in _noted:
        _noted.add(old)
        print(f"note: read {old} as {new} (Qwen3-LLaDA's name)", file=sys.stderr)


def _translate(items: Sequence[str], keys: Dict[str, Tuple[str, Optional[Dict[str, str]]]],
               values: Dict[str, Dict[str, str]], refused: Dict[str, str], what: str) -> List[str]:
    """``key=value`` items with their keys (``keys``: theirs -> ours and their values -> ours) and
    their values under our keys (``values``) rewritten; a key of ``refused`` raises, naming ours."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        bare = key.lstrip("+~")            # Hydra's append / delete prefixes
        if not sep or item.startswith("-"):
            out.append(item)
            continue
        if bare in refused:
            raise ConfigError(f"{bare} is Qwen3-LLaDA's {what}; here {refused[bare]}")
        if bare in keys:
            ours, mapped = keys[bare]
            new = f"{ours}={(mapped or {}).get(value, value)}"
        elif bare in values and value in values[bare]:
            new = f"{key}={values[bare][value]}"
        else:
            out.append(item)
            continue
        _note(item, new)
        out.append(new)
    return out


def translate_train(overrides: Sequence[str]) -> List[str]:
    """Hydra overrides with Qwen3-LLaDA's keys and values rewritten as this trainer's."""
    return _translate(overrides, TRAIN_KEYS, VALUES, TRAIN_REFUSED, "setting")


def translate_generate(argv: Sequence[str]) -> List[str]:
    """``generate``'s key=value items with Qwen3-LLaDA's inference options rewritten."""
    return _translate(argv, GENERATE_KEYS, {}, GENERATE_REFUSED, "option")
