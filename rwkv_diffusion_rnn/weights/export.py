"""RWKV-7 weights out to the RWKV ecosystem's formats: BlinkDL's ``.pth`` (the layout rwkv7-g1
ships in, read by BlinkDL's ``rwkv`` package and :func:`~rwkv_diffusion_rnn.weights.pretrained_rwkv.load_rwkv7`)
and the fla / Hugging Face folder (``config.json`` + ``model.safetensors``, what fla's
``RWKV7ForCausalLM.from_pretrained`` reads).

:func:`lm_state_dict` turns a denoiser over an RWKV-7 backbone into a plain RWKV-7 language
model's weights. What the denoiser adds around the backbone is folded in exactly where it is a
constant: the text token-type embedding (added after ``ln0``) into ``ln0``'s bias, and, for a
model that is always run at one diffusion time (the AR objective runs at ``t = 0``), the time
conditioning of every block (FiLM's scale and shift into the layer norms before the time-mix and
channel-mix, AdaLN-Zero's gates into their output projections). The text head becomes ``head``.
So an AR checkpoint exports to a file whose logits are the checkpoint's; a diffusion checkpoint
exports its backbone and head (its time conditioning is not part of an LM).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from ..common.errors import CheckpointError
from ..models.rwkv7 import RWKV7, RWKV7Config

StateDict = Dict[str, torch.Tensor]
FORMATS = ("blinkdl", "fla")


@torch.no_grad()
def lm_state_dict(model, fold_time: Optional[float] = None) -> StateDict:
    """BlinkDL-named weights of the RWKV-7 LM inside ``model`` (a ``MultimodalRWKVDenoiser`` over an
    :class:`RWKV7`); ``fold_time``: the text diffusion time whose conditioning is folded in (``0.0``
    for an AR model), or None to leave the time conditioning out."""
    cfg = model.config
    if not isinstance(model.backbone, RWKV7):
        raise CheckpointError(f"model.arch={cfg.arch} is not an RWKV-7 network: only RWKV-7 weights export to "
                              "the BlinkDL and fla formats")
    if cfg.latent_prefix_len or cfg.pos_emb_len:
        raise CheckpointError("this model reads a latent prefix or a learned position embedding "
                              "(model.latent_prefix_len / model.pos_emb_len), which an RWKV-7 LM has no place for")
    sd = {k: v.detach().float().clone() for k, v in model.backbone.state_dict().items()}
    if not cfg.use_pretrained_head:
        sd["head.weight"] = model.text_head.weight.detach().float().clone()
    sd["head.weight"] = sd["head.weight"][:cfg.vocab_size]
    sd["emb.weight"] = sd["emb.weight"][:cfg.vocab_size]
    sd["blocks.0.ln0.bias"] += model.type_emb.weight[1].float()
    if fold_time is not None and cfg.time_conditioning != "none":
        t = torch.full((1,), float(fold_time))
        mods = model._modulations(model.time_cond(t, None))
        for i, m in enumerate(mods):
            p = f"blocks.{i}."
            for ln, scale, shift in (("ln1", m.scale1, m.shift1), ("ln2", m.scale2, m.shift2)):
                s = 1 + scale.view(-1).float() if scale is not None else 1.0
                sd[p + ln + ".weight"] = sd[p + ln + ".weight"] * s
                sd[p + ln + ".bias"] = sd[p + ln + ".bias"] * s + (shift.view(-1).float() if shift is not None else 0.0)
            for out, gate in (("att.output.weight", m.gate1), ("ffn.value.weight", m.gate2)):
                if gate is not None:
                    sd[p + out] = gate.view(-1, 1).float() * sd[p + out]
    return sd


def blinkdl_to_fla(sd: StateDict) -> StateDict:
    """BlinkDL names and shapes -> fla's (``model.layers.N.attn...``); the inverse of
    :func:`~rwkv_diffusion_rnn.weights.pretrained_rwkv.fla_to_blinkdl`."""
    out: StateDict = {"model.embeddings.weight": sd["emb.weight"], "model.norm.weight": sd["ln_out.weight"],
                      "model.norm.bias": sd["ln_out.bias"], "lm_head.weight": sd["head.weight"]}
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    proj = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj", "ln_x": "g_norm"}
    for i in range(n_layer):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        norms = (("ln0", "pre_norm"),) if i == 0 else ()
        for a, b in norms + (("ln1", "attn_norm"), ("ln2", "ffn_norm")):
            out[q + b + ".weight"], out[q + b + ".bias"] = sd[p + a + ".weight"], sd[p + a + ".bias"]
        for x in "rwkvag":
            out[q + f"attn.x_{x}"] = sd[p + f"att.x_{x}"]
        for x in "wavg":
            if p + f"att.{x}1" not in sd:
                continue            # layer 0 has no value-residual LoRA
            out[q + f"attn.{x}_lora.lora.0.weight"] = sd[p + f"att.{x}1"].t().contiguous()
            out[q + f"attn.{x}_lora.lora.2.weight"] = sd[p + f"att.{x}2"].t().contiguous()
            if x != "g":
                out[q + f"attn.{x}_lora.lora.2.bias"] = sd[p + f"att.{x}0"].flatten()
        out[q + "attn.k_k"], out[q + "attn.k_a"] = sd[p + "att.k_k"].flatten(), sd[p + "att.k_a"].flatten()
        out[q + "attn.r_k"] = sd[p + "att.r_k"]
        for a, b in proj.items():
            for kind in ("weight", "bias") if a == "ln_x" else ("weight",):
                out[q + f"attn.{b}.{kind}"] = sd[p + f"att.{a}.{kind}"]
        out[q + "ffn.x_k"] = sd[p + "ffn.x_k"].flatten()
        out[q + "ffn.key.weight"], out[q + "ffn.value.weight"] = sd[p + "ffn.key.weight"], sd[p + "ffn.value.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def fla_config(cfg: RWKV7Config) -> dict:
    """The ``config.json`` of fla's RWKV-7 for these sizes."""
    return {"model_type": "rwkv7", "architectures": ["RWKV7ForCausalLM"], "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer, "head_dim": cfg.head_size,
            "num_heads": cfg.n_embd // cfg.head_size, "intermediate_size": cfg.dim_ffn,
            "decay_low_rank_dim": cfg.decay_lora, "a_low_rank_dim": cfg.aaa_lora, "v_low_rank_dim": cfg.mv_lora,
            "gate_low_rank_dim": cfg.gate_lora, "hidden_act": "sqrelu", "norm_bias": True, "norm_eps": 1e-5,
            "tie_word_embeddings": False}


def save(sd: StateDict, cfg: RWKV7Config, fmt: str, out: Union[str, os.PathLike]) -> Path:
    """Writes ``sd`` (BlinkDL names) as ``fmt`` at ``out`` (a ``.pth`` file for blinkdl, a folder
    for fla), through a temp name renamed into place."""
    from safetensors.torch import save_file
    out = Path(out)
    tmp = out.with_name(f".{out.name}.writing-{os.getpid()}")
    if fmt == "blinkdl":
        torch.save({k: v.contiguous() for k, v in sd.items()}, tmp)
    elif fmt == "fla":
        tmp.mkdir(parents=True)
        save_file(blinkdl_to_fla(sd), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(fla_config(cfg), indent=2) + "\n")
    else:
        raise ValueError(f"format={fmt!r}; choose one of {', '.join(FORMATS)}")
    os.replace(tmp, out)
    return out
