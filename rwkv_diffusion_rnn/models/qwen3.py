"""Qwen3 run without its causal mask as the denoiser's network (``model.arch=qwen3``).

transformers' ``Qwen3Model`` (its embedding, decoder layers and final norm, weights unchanged)
from a local directory or a Hub name (:func:`load_qwen3`). :class:`Qwen3Mixer` runs its decoder
layers itself, so that each gets the same per-layer FiLM / AdaLN-Zero
:class:`~rwkv_diffusion_rnn.models.mixers.Modulation` as the RWKV-7 blocks, and calls every
attention with no causal mask: each position sees both sides. An optional additive attention
bias ``[B, 1, Q, K]`` (0 visible, -inf hidden) restricts what each query sees; with
``model.block_attention=true`` the mixer builds the training-time block bias of LLaDA-style
semi-autoregressive decoding (:func:`block_attention_bias`). With no time conditioning and no
bias the mixer computes exactly what ``Qwen3Model`` computes when called with an all-visible
4-D mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .archs import Arch, pretrained_head_wanted, register_arch
from .mixers.base import MIXERS, Mixer, Modulation, _modulate, layer_mods


@dataclass
class Qwen3Sizes:
    """The sizes the denoiser reads from its backbone, taken from the Qwen3 config."""
    vocab_size: int
    n_layer: int
    n_embd: int
    n_head: int


class TiedHead(nn.Module):
    """An LM head that is the transpose of an embedding (``tie_word_embeddings``): no weights of
    its own, so a checkpoint holds the matrix once."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self._embedding = [embedding]         # a list: not registered a second time

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(h, self._embedding[0].weight)


class Qwen3Backbone(nn.Module):
    """A ``transformers`` ``Qwen3Model`` with the parts the denoiser uses (``embed``, ``blocks``,
    ``ln_out``, ``config``) and, when loaded with it, the checkpoint's LM head (``head``: its
    ``lm_head``, or the embedding transposed where the config ties them), which
    ``model.use_pretrained_head`` makes the text head, as Qwen3-LLaDA keeps it."""

    def __init__(self, model: nn.Module, head: Optional[nn.Module] = None):
        super().__init__()
        if getattr(model.config, "model_type", None) != "qwen3":
            raise ValueError(f"model.arch=qwen3 needs a Qwen3 model, got model_type="
                             f"{getattr(model.config, 'model_type', None)!r}")
        self.model = model
        self.head = head
        for layer in model.layers:   # read both sides, whatever attention implementation runs
            layer.self_attn.is_causal = False
        c = model.config
        self.config = Qwen3Sizes(c.vocab_size, c.num_hidden_layers, c.hidden_size, c.num_attention_heads)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def ln_out(self) -> nn.Module:
        return self.model.norm

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)


def load_qwen3(name_or_path: str, *, revision: Optional[str] = None, cache_dir: Optional[str] = None,
               local_files_only: bool = False, head: bool = False) -> Qwen3Backbone:
    """``Qwen3Model.from_pretrained`` (a local directory or a Hub name) in float32 with PyTorch's
    SDPA attention, wrapped as a backbone; with ``head`` ``Qwen3ForCausalLM``'s, keeping its LM
    head. Never runs code from the checkpoint."""
    from transformers import AutoConfig, Qwen3ForCausalLM, Qwen3Model
    where = f"model.qwen3_name={name_or_path!r}"
    try:
        config = AutoConfig.from_pretrained(name_or_path, revision=revision, cache_dir=cache_dir,
                                            local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: cannot read a model config there ({e}). Point it at a directory "
                         "holding config.json and the weights (save_pretrained), or a Hub name such as "
                         "Qwen/Qwen3-0.6B-Base (with network access, model.local_files_only=false)") from None
    if config.model_type != "qwen3":
        raise ValueError(f"{where} holds a {config.model_type!r} model; model.arch=qwen3 loads Qwen3 "
                         "checkpoints (model_type 'qwen3')")
    opts = dict(config=config, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                dtype=torch.float32, attn_implementation="sdpa")
    if not head:
        return Qwen3Backbone(Qwen3Model.from_pretrained(name_or_path, **opts))
    lm, info = Qwen3ForCausalLM.from_pretrained(name_or_path, output_loading_info=True, **opts)
    if config.tie_word_embeddings:
        return Qwen3Backbone(lm.model, TiedHead(lm.model.embed_tokens))
    if any(k.startswith("lm_head") for k in info.get("missing_keys", ())):
        raise ValueError(f"{where} holds no LM head (lm_head.weight) and its config does not tie it to the "
                         "embedding: set model.use_pretrained_head=false (a new text head is trained)")
    return Qwen3Backbone(lm.model, lm.lm_head)


def block_attention_bias(prompt_lens: torch.Tensor, length: int, block_size: int,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive bias [B, 1, L, L] of training-time block attention.

    Positions below ``prompt_lens[b]`` are the prompt: every query sees them, and prompt queries
    see only the prompt. The rest is cut into blocks of ``block_size`` counted from the prompt's
    end; a query in a block sees the prompt and its own block. 0 where visible, -inf elsewhere.
    """
    pos = torch.arange(length, device=prompt_lens.device)
    p = prompt_lens.view(-1, 1)
    in_prompt = pos.view(1, -1) < p                                  # [B, L]
    block = torch.where(in_prompt, -1, (pos.view(1, -1) - p) // block_size)
    visible = in_prompt[:, None, :] | (block[:, :, None] == block[:, None, :])
    bias = torch.zeros(visible.shape, dtype=dtype, device=prompt_lens.device)
    return bias.masked_fill_(~visible, float("-inf")).unsqueeze(1)


def run_qwen3_layer(layer: nn.Module, x: torch.Tensor, position_embeddings, attention_bias=None,
                    mod: Optional[Modulation] = None) -> torch.Tensor:
    """One Qwen3 decoder layer, modulated as :func:`~rwkv_diffusion_rnn.models.mixers.run_block`
    modulates an RWKV-7 block; without ``mod`` it is the layer's own computation."""
    mod = mod or Modulation()
    h = _modulate(layer.input_layernorm(x), mod.shift1, mod.scale1)
    h, _ = layer.self_attn(hidden_states=h, position_embeddings=position_embeddings,
                           attention_mask=attention_bias, is_causal=False)
    x = x + (h if mod.gate1 is None else mod.gate1 * h)
    h = layer.mlp(_modulate(layer.post_attention_layernorm(x), mod.shift2, mod.scale2))
    return x + (h if mod.gate2 is None else mod.gate2 * h)


class Qwen3Mixer(Mixer):
    """Runs Qwen3 decoder layers over [latent prefix | text] with positions 0..L-1, both sides
    visible; with ``block_attention`` the latent prefix and each row's prompt (``prompt_lengths``
    text positions) are the prompt of :func:`block_attention_bias`, and the rest of the text is cut
    into blocks of ``block_size`` counted from the prompt's end."""

    reads_prompt = True

    def __init__(self, rotary_emb: nn.Module, block_attention: bool = False, block_size: int = 16,
                 causal: bool = False):
        super().__init__()
        self.rotary = rotary_emb      # the backbone's; it holds no parameters or saved buffers
        self.block_attention, self.block_size = block_attention, block_size
        self.autoregressive = causal  # Qwen3's own causal mask: the AR baseline (decoded by recomputing)

    def forward(self, blocks: Sequence[nn.Module], x: torch.Tensor, mods=None, state=None,
                return_state: bool = False, prefix_len: int = 0,
                attention_bias: Optional[torch.Tensor] = None, prompt_lengths: Optional[torch.Tensor] = None):
        if state is not None or return_state:
            raise ValueError("model.arch=qwen3 keeps no recurrent state: decode without use_cache")
        B, L, _ = x.shape
        if self.autoregressive:
            if attention_bias is not None or self.block_attention:
                raise ValueError("model.mixer=causal reads with Qwen3's causal mask: no other attention bias")
            attention_bias = torch.full((L, L), float("-inf"), device=x.device, dtype=x.dtype).triu(1).expand(B, 1, L, L)
        if attention_bias is None and self.block_attention:
            visible = torch.full((B,), prefix_len, device=x.device)
            if prompt_lengths is not None:
                visible = visible + prompt_lengths.to(visible)
            attention_bias = block_attention_bias(visible, L, self.block_size, x.dtype)
        if attention_bias is not None and attention_bias.shape != (B, 1, L, L):
            raise ValueError(f"attention_bias must be [B, 1, L, L] = [{B}, 1, {L}, {L}] (L counts the "
                             f"latent prefix), got {tuple(attention_bias.shape)}")
        positions = torch.arange(L, device=x.device).unsqueeze(0)
        rope = self.rotary(x, positions)
        mods = layer_mods(mods, len(blocks))
        for i, layer in enumerate(blocks):
            x = self.run(run_qwen3_layer, layer, x, rope, attention_bias, mods[i])
        return x, None


def _check(m) -> None:
    if not m.get("qwen3_name"):
        raise ValueError("model.arch=qwen3 loads a pretrained Qwen3: set model.qwen3_name to a directory "
                         "written by save_pretrained or a Hub name (model=qwen3 sets Qwen/Qwen3-0.6B-Base)")


def _build(m, load=load_qwen3) -> Qwen3Backbone:
    return load(m["qwen3_name"], cache_dir=m.get("cache_dir"), local_files_only=bool(m.get("local_files_only")),
                head=pretrained_head_wanted(m))


# model.arch=qwen3: transformers' Qwen3Model, its attention both ways (bi) or with its own causal
# mask (causal: the AR baseline), with an optional training-time block attention bias
register_arch(Arch(
    name="qwen3", backbone=Qwen3Backbone, build=_build, mixers=("bi", "causal"), attention_bias=True, pretrained_head=True,
    pretrained_key="qwen3_name", keys=("qwen3_name",), check=_check,
    loader="rwkv_diffusion_rnn.models.qwen3:load_qwen3",
    make_mixer=lambda backbone, cfg: Qwen3Mixer(backbone.model.rotary_emb, cfg.block_attention, cfg.block_size,
                                                causal=MIXERS[cfg.mixer].autoregressive)))

