"""MultimodalRWKVDenoiser (the DiffRwkv name): an RWKV-7 network (or another ``model.arch``) that
denoises [latent prefix | text].

Inputs are partly masked text ids and a noisy sentence latent ``z_s`` [B, latent_dim]. The
latent is projected to ``latent_prefix_len`` prefix tokens placed before the text; each token
also gets a token-type embedding (prefix / text; zero-initialised, so a pretrained backbone sees
its own embeddings at the start). With ``pos_emb_len > 0`` each text position also gets a
learned absolute position embedding (zero-initialised by default, or normal with
``pos_emb_init_std``): RWKV-7 itself knows positions only through its token shift and decays,
which is slow to learn from scratch when an answer has to be fetched from a fixed offset (the
synthetic copy tasks). The text time ``t`` and the latent time ``s`` are embedded
(sinusoidal + MLP) into a conditioning vector that modulates every block, as FiLM or AdaLN-Zero.
With ``latent_in_cond`` the latent's prefix embedding is added to that vector too (as DiT adds
the class embedding to the time embedding), so every block at every position reads the latent
directly instead of only through the scan from the prefix. A mixer (``causal``, ``bi``,
``dw_jrt``, ``block_causal``) decides how the blocks read the sequence. Two heads: text logits at the text positions, and the latent prediction (eps, x0 or v)
from the prefix positions.

``arch`` names the network inside: ``rwkv7`` (the default), ``transformer``, a bidirectional
transformer baseline (:mod:`~rwkv_diffusion_rnn.models.transformer`), or ``hybrid``, RWKV-7 with
attention blocks at chosen layers (:mod:`~rwkv_diffusion_rnn.models.hybrid`), or ``qwen3``,
transformers' Qwen3Model run without its causal mask (:mod:`~rwkv_diffusion_rnn.models.qwen3`);
each gets the same prefix, conditioning and heads. Build one with
:func:`~rwkv_diffusion_rnn.weights.pretrained_rwkv.build_denoiser` (pretrained rwkv7 weights or
sizes from scratch) or pass a backbone (:class:`~rwkv_diffusion_rnn.models.rwkv7.RWKV7` or
:class:`~rwkv_diffusion_rnn.models.transformer.Transformer`) directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import hybrid, qwen3, transformer  # noqa: F401  (each registers its model.arch entry)
from .archs import ARCHS, arch_of, pretrained_head_wanted
from .mixers import MIXERS, Modulation, mixer_class, option_defaults
from .mixers.base import Mixer
from .rwkv7 import LayerState
from ..common.checks import Flag, Num, check_options
from .time_conditioning import AdaLNZero, FiLM, TimeConditioner

TIME_CONDITIONINGS = ("film", "adaln_zero", "none")
# model.latent_projector: none (the data's latents are the model's), or a projector learned with the
# model from the data's larger vectors (model.latent_input_dim, e.g. a full sentence embedding)
LATENT_PROJECTORS = ("none", "linear", "mlp")
# the model.* numbers and flags of DenoiserConfig, with their ranges
OPTIONS = {
    "vocab_size": Num(lo=2, integer=True), "mask_id": Num(lo=0, integer=True),
    "latent_dim": Num(lo=1, integer=True), "latent_prefix_len": Num(lo=0, integer=True),
    "adaln_identity_init": Flag(), "bi_share_weights": Flag(), "bi_anneal_steps": Num(lo=0, integer=True), "dw_jrt_scale": Num(),
    "dw_jrt_learnable_alpha": Flag(), "dw_jrt_alpha_init": Num(), "dw_jrt_layer_start": Num(lo=0, integer=True),
    "block_size": Num(lo=1, integer=True), "block_attention": Flag(), "use_pretrained_head": Flag(),
    "freeze_backbone": Flag(), "pos_emb_len": Num(lo=0, integer=True), "pos_emb_init_std": Num(lo=0),
    "latent_in_cond": Flag(), "shift_logits": Flag(),
    "latent_input_dim": Num(lo=1, integer=True, optional=True, null_means="model.latent_dim (no projector)"),
    "bos_id": Num(lo=0, integer=True, optional=True, null_means="the tokenizer's end of text"),
}


@dataclass
class DenoiserConfig:
    """Everything the denoiser needs besides its backbone."""
    arch: str = "rwkv7"                 # the backbone's network (models/archs.py)
    vocab_size: int = 65536
    mask_id: int = 65535
    latent_dim: int = 32
    latent_prefix_len: int = 1          # 0: a text-only model (no latent input or head)
    latent_target: str = "eps"          # what the latent head predicts (GaussianDiffusion.TARGETS)
    time_conditioning: str = "film"     # film | adaln_zero | none
    adaln_identity_init: bool = True    # AdaLN gates start at 1 (pretrained) or 0 (DiT)
    mixer: str = "bi"
    bi_fusion: str = "sum"
    bi_share_weights: bool = True
    bi_anneal_steps: int = 0            # bi, block_causal: the right-to-left share grows 0 -> 1 over this many steps
    dw_jrt_scale: float = 1.0
    dw_jrt_learnable_alpha: bool = False
    dw_jrt_alpha_init: float = 0.0
    dw_jrt_layer_start: int = 1
    block_size: int = 16
    block_context: str = "noisy"        # block_causal: training reads blocks < b noised, or clean (BD3-LM)
    block_attention: bool = False       # qwen3: training-time block attention (blocks of block_size)
    use_pretrained_head: bool = False   # the text head is the pretrained backbone's own LM head
    use_rwkv_lm_head: Optional[bool] = None   # the former name of use_pretrained_head (set: sets it)
    freeze_backbone: bool = False
    pos_emb_len: int = 0                # learned position embedding for this many text positions
    pos_emb_init_std: float = 0.0       # its initial values: N(0, std^2); 0 = zeros
    latent_in_cond: bool = False        # also add the latent's embedding to the conditioning vector
    latent_projector: str = "none"      # LATENT_PROJECTORS: learn the latent from the data's vectors
    latent_input_dim: Optional[int] = None   # the data's latent size when a projector reads them
    shift_logits: bool = False          # the logits of token i come from the position before it
    bos_id: Optional[int] = None        # shift_logits: the token read before the first one
    # the text head predicts each position's clean embedding (training.objective=embedding, set by
    # the builder from it): the output's ``embedding``, no logits
    embedding_output: bool = False

    mixer_options: Dict[str, Any] = field(default_factory=dict)   # options of a mixer that are no field here

    def __post_init__(self):
        check_options("model", {k: getattr(self, k) for k in OPTIONS}, OPTIONS)
        arch = arch_of(self.arch)
        if self.mixer not in MIXERS:
            raise ValueError(f"model.mixer={self.mixer!r}; choose one of {sorted(MIXERS)}")
        if not arch.accepts(self.mixer):
            raise ValueError(f"model.mixer={self.mixer!r} is an RWKV-7 scan order that model.arch={self.arch} "
                             f"does not implement (its attention sees both sides at once): set "
                             f"model.mixer={arch.mixers[0]}")
        if self.use_rwkv_lm_head is not None:
            if self.use_pretrained_head and not self.use_rwkv_lm_head:
                raise ValueError("model.use_pretrained_head=true and model.use_rwkv_lm_head=false (its former "
                                 "name) contradict each other: set model.use_pretrained_head alone")
            self.use_pretrained_head = pretrained_head_wanted(vars(self))
            self.use_rwkv_lm_head = None
        if self.use_pretrained_head and not arch.pretrained_head:
            raise ValueError(f"model.use_pretrained_head=true reuses the LM head of pretrained weights; "
                             f"model.arch={self.arch} has none (it is built from scratch): set it to false")
        if self.block_attention and not arch.attention_bias:
            readers = ", ".join(a.name for a in ARCHS.values() if a.attention_bias)
            raise ValueError(f"model.block_attention=true is an attention bias of model.arch={readers}; "
                             f"model.arch={self.arch} does not read it (RWKV-7's block order is "
                             "model.mixer=block_causal): set it to false")
        if self.time_conditioning not in TIME_CONDITIONINGS:
            raise ValueError(f"model.time_conditioning={self.time_conditioning!r}; choose one of "
                             f"{TIME_CONDITIONINGS}")
        if arch.mixers is None:
            mixer_class(self.mixer).check_options(**{k: self.mixer_option(k) for k in option_defaults(self.mixer)})
        if not 0 <= self.mask_id < self.vocab_size:
            raise ValueError(f"model.mask_id={self.mask_id} must be a token id below model.vocab_size={self.vocab_size}")
        if self.shift_logits:
            if mixer_class(self.mixer).autoregressive:
                raise ValueError(f"model.shift_logits=true moves each prediction to the position before it, so "
                                 f"that a left-to-right head keeps its meaning; model.mixer={self.mixer} already "
                                 "predicts the next token at each position: set model.shift_logits=false")
            if self.block_attention:
                raise ValueError("model.shift_logits=true reads one more position than the text, which "
                                 "model.block_attention's blocks do not cover yet: set one of them to false")
            if self.bos_id is None or not 0 <= self.bos_id < self.vocab_size:
                raise ValueError(f"model.shift_logits=true reads model.bos_id before the first token; it is "
                                 f"{self.bos_id!r}: give a token id below model.vocab_size={self.vocab_size} "
                                 "(null takes the tokenizer's end of text)")
        if self.embedding_output:
            if self.latent_prefix_len or self.shift_logits or self.use_pretrained_head:
                raise ValueError("training.objective=embedding diffuses the text's embeddings alone: set "
                                 "model.latent_prefix_len=0, model.shift_logits=false and "
                                 "model.use_pretrained_head=false")
            if mixer_class(self.mixer).autoregressive:
                raise ValueError(f"training.objective=embedding denoises every position at once; model.mixer="
                                 f"{self.mixer} reads left to right only: choose a mixer that reads both ways "
                                 "(e.g. model.mixer=bi)")
        if self.latent_projector not in LATENT_PROJECTORS:
            raise ValueError(f"model.latent_projector={self.latent_projector!r}; choose one of {LATENT_PROJECTORS}")
        if self.latent_projector != "none" and (not self.latent_prefix_len or not self.latent_input_dim):
            raise ValueError(f"model.latent_projector={self.latent_projector} learns the latent from the data's "
                             "vectors: it needs model.latent_prefix_len >= 1 and model.latent_input_dim (their "
                             "size, e.g. 384 for all-MiniLM-L6-v2 embeddings kept whole)")
        if self.latent_projector == "none" and self.latent_input_dim not in (None, self.latent_dim):
            raise ValueError(f"model.latent_input_dim={self.latent_input_dim} differs from model.latent_dim="
                             f"{self.latent_dim} but no projector maps one to the other: set "
                             "model.latent_projector=linear or mlp, or model.latent_input_dim=null")
        if self.latent_in_cond and (self.time_conditioning == "none" or not self.latent_prefix_len):
            raise ValueError("model.latent_in_cond=true adds the latent to the time conditioning: it needs "
                             "model.latent_prefix_len >= 1 and model.time_conditioning=film or adaln_zero")

    def mixer_option(self, name: str):
        """The value of mixer option ``name``: its field here, else ``mixer_options``, else the
        mixer's default."""
        if name in _FIELDS:
            return getattr(self, name)
        if name in self.mixer_options:
            return self.mixer_options[name]
        return option_defaults(self.mixer)[name]


_FIELDS = {f.name for f in fields(DenoiserConfig)} - {"mixer_options"}


def data_latent_dim(model_keys) -> int:
    """The size of the data's latent vectors for these ``model.*`` keys: ``latent_input_dim``
    when a projector reads them, else ``latent_dim``."""
    get = model_keys.get
    if get("latent_projector", "none") not in (None, "none") and get("latent_input_dim"):
        return int(get("latent_input_dim"))
    return int(get("latent_dim"))


class _Whiten(nn.BatchNorm1d):
    """Each latent dimension normalised to mean 0 and variance 1 over the data: the batch's
    statistics in training, their running averages otherwise (and for a training batch of one
    row, which has no variance to take)."""

    def __init__(self, dim: int):
        super().__init__(dim, affine=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.training and h.shape[0] < 2:
            return F.batch_norm(h, self.running_mean, self.running_var, None, None, False, 0.0, self.eps)
        return super().forward(h)


class LatentProjector(nn.Module):
    """The latent learned with the model (``model.latent_projector``): ``encode`` maps a data
    vector [B, input_dim] (e.g. a whole sentence embedding) to the model's latent [B, latent_dim],
    ``decode`` maps it back (the reconstruction term of ``training.latent_recon_weight``).

    Two things keep it from collapsing. The denoising losses alone would pay it to make the latent
    carry nothing (latents gathered at one point are trivially denoised), so (1) each dimension of
    the encoded latent is whitened over the data (mean 0, variance 1, as prepare_latents whitens
    PCA latents): the latents cannot gather at one point, nor shrink under the noise. Scaling each
    latent to a fixed norm does not do it: the latents then gather within a few degrees of one
    direction and the decoder reads the small differences (eval/README, "Text from latents, real
    sentences"). (2) The decoder must rebuild the input from the latent, so the directions it
    keeps carry the input.
    """

    def __init__(self, input_dim: int, latent_dim: int, kind: str):
        super().__init__()
        self.latent_dim = latent_dim
        self.enc = (nn.Linear(input_dim, latent_dim) if kind == "linear" else
                    nn.Sequential(nn.Linear(input_dim, input_dim), nn.GELU(), nn.Linear(input_dim, latent_dim)))
        self.whiten = _Whiten(latent_dim)
        self.dec = nn.Linear(latent_dim, input_dim)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.whiten(self.enc(x.to(self.dec.weight.dtype)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.dec(z)


class DenoiserOutput(NamedTuple):
    logits: Optional[torch.Tensor]            # [B, T, vocab] at the text positions (None: embedding_output)
    latent: Optional[torch.Tensor]            # [B, latent_dim] eps / x0 / v prediction
    state: Optional[List[LayerState]]         # forward-scan state (causal / block_causal only)
    embedding: Optional[torch.Tensor] = None  # [B, T, C] predicted clean embeddings (embedding_output)
    latent_x0: Optional[torch.Tensor] = None    # [B, latent_dim] the projected clean latent (latent_noise)
    latent_recon: Optional[torch.Tensor] = None  # [B, latent_input_dim] it decoded back (latent_noise)


class MultimodalRWKVDenoiser(nn.Module):
    def __init__(self, backbone, cfg: DenoiserConfig):
        super().__init__()
        arch = arch_of(cfg.arch)
        if not isinstance(backbone, arch.backbone):
            raise TypeError(f"model.arch={cfg.arch} needs a {arch.backbone.__name__} backbone, "
                            f"got {type(backbone).__name__}")
        self.config = cfg
        bc = backbone.config               # RWKV7Config or TransformerConfig: the sizes read below
        C = bc.n_embd
        if cfg.use_pretrained_head and bc.vocab_size != cfg.vocab_size:
            raise ValueError(f"model.use_pretrained_head needs vocab_size == the backbone's "
                             f"({bc.vocab_size}), got {cfg.vocab_size}")
        if cfg.vocab_size > bc.vocab_size:
            raise ValueError(f"vocab_size={cfg.vocab_size} exceeds the backbone's embedding "
                             f"table ({bc.vocab_size} rows)")
        self.backbone = backbone
        self.n_embd = C
        P = cfg.latent_prefix_len

        self.type_emb = nn.Embedding(2, C)            # 0: latent prefix, 1: text
        nn.init.zeros_(self.type_emb.weight)
        if cfg.pos_emb_len:
            self.pos_emb = nn.Parameter(torch.randn(cfg.pos_emb_len, C) * cfg.pos_emb_init_std
                                        if cfg.pos_emb_init_std else torch.zeros(cfg.pos_emb_len, C))
        if P:
            self.latent_proj = nn.Sequential(nn.Linear(cfg.latent_dim, C), nn.SiLU(),
                                             nn.Linear(C, P * C))
            self.latent_norm = nn.LayerNorm(C)
            self.null_latent = nn.Parameter(torch.randn(cfg.latent_dim) * 0.02)  # CFG / no latent
            self.latent_out_norm = nn.LayerNorm(C)
            self.latent_head = nn.Linear(P * C, cfg.latent_dim)
            nn.init.zeros_(self.latent_head.weight)   # zero final layer, as in DiT
            nn.init.zeros_(self.latent_head.bias)

        if cfg.latent_projector != "none":
            self.latent_projector = LatentProjector(cfg.latent_input_dim, cfg.latent_dim, cfg.latent_projector)

        if cfg.time_conditioning != "none":
            self.time_cond = TimeConditioner(C, latent_time=P > 0)
            if cfg.latent_in_cond:
                self.latent_cond = nn.Linear(C, C)
            if cfg.time_conditioning == "film":
                self.cond = nn.ModuleList(nn.ModuleList([FiLM(C, C), FiLM(C, C)])
                                          for _ in range(bc.n_layer))
            else:
                self.cond = nn.ModuleList(AdaLNZero(C, C, identity_init=cfg.adaln_identity_init)
                                          for _ in range(bc.n_layer))

        self.mixer = arch.make_mixer(backbone, cfg)
        if cfg.block_context == "clean" and not self.mixer.reads_context:
            raise ValueError(f"model.block_context=clean is read by model.mixer=block_causal on RWKV-7 blocks; "
                             f"model.mixer={cfg.mixer} (model.arch={cfg.arch}) reads no clean context: set "
                             "model.block_context=noisy")
        if cfg.embedding_output:
            self.embedding_head = nn.Linear(C, C)
        elif not cfg.use_pretrained_head:
            self.text_head = nn.Linear(C, cfg.vocab_size, bias=False)
            nn.init.normal_(self.text_head.weight, std=C ** -0.5)
        if cfg.freeze_backbone:
            self.set_backbone_trainable(False)

    # ------------------------------------------------------------------ parameters

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Freezes or unfreezes the pretrained weights (embedding, blocks, ln_out, head)."""
        for p in self.backbone.parameters():
            p.requires_grad_(trainable)

    def set_training_step(self, step: int) -> None:
        """Tells every mixer the training step (for readings that change over training)."""
        for m in self.modules():
            if isinstance(m, Mixer):
                m.set_step(step)

    def set_grad_checkpointing(self, enabled: bool) -> None:
        """Recompute each block in the backward instead of keeping its activations (every mixer,
        the hybrid's inner bi mixer included): less memory, about one more forward of time."""
        for m in self.modules():
            if isinstance(m, Mixer):
                m.grad_checkpointing = enabled

    # ------------------------------------------------------------------ forward pieces

    def _modulations(self, c: Optional[torch.Tensor]) -> Optional[List[Modulation]]:
        if c is None:
            return None
        mods = []
        for cond in self.cond:
            if self.config.time_conditioning == "film":
                (g1, b1), (g2, b2) = (f.params(c) for f in cond)
                mods.append(Modulation(shift1=b1, scale1=g1, shift2=b2, scale2=g2))
            else:
                p = cond(c)
                mods.append(Modulation(p.shift_att, p.scale_att, p.gate_att,
                                       p.shift_ffn, p.scale_ffn, p.gate_ffn))
        return mods

    def token_embeddings(self) -> torch.Tensor:
        """[vocab, C]: every token's input embedding scaled to unit root-mean-square, the clean
        signal and the rounding table of embedding diffusion
        (:mod:`~rwkv_diffusion_rnn.diffusion.embedding_diffusion`)."""
        ids = torch.arange(self.config.vocab_size, device=self.type_emb.weight.device)
        x = self.backbone.embed(ids)
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True).clamp_min(1e-12)).to(x.dtype)

    def _embed_text(self, ids: torch.Tensor, prev_ids: Optional[torch.Tensor], return_state: bool,
                    pos_offset: int, embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The text's input vectors: with ``shift_logits`` position i reads token i - 1
        (``prev_ids`` first) and one more position reads the last token, except in a call that
        returns a state (see :meth:`forward`). ``embeds`` [B, T, C] stand in for the ids' embeddings."""
        cfg = self.config
        if embeds is None and cfg.shift_logits:
            B, T = ids.shape
            ids = torch.cat([prev_ids.view(B, 1).to(ids), ids[:, :T - 1] if return_state else ids], 1)
        x = (self.backbone.embed(ids) if embeds is None else embeds) + self.type_emb.weight[1]
        n = x.shape[1]
        if cfg.pos_emb_len:
            if pos_offset + n > cfg.pos_emb_len:
                raise ValueError(f"text positions {pos_offset}..{pos_offset + n - 1} exceed "
                                 f"model.pos_emb_len={cfg.pos_emb_len}; train with "
                                 f"model.pos_emb_len >= the longest text (data.seq_len"
                                 f"{', + 1 with model.shift_logits' if cfg.shift_logits else ''})")
            x = x + self.pos_emb[pos_offset:pos_offset + n].to(x.dtype)
        return x

    def embed_prefix(self, latent: Optional[torch.Tensor], batch: int) -> torch.Tensor:
        cfg = self.config
        if latent is None:
            latent = self.null_latent.expand(batch, -1)
        if latent.shape != (batch, cfg.latent_dim):
            raise ValueError(f"latent must be [B, latent_dim] = [{batch}, {cfg.latent_dim}], got "
                             f"{tuple(latent.shape)} (check model.latent_dim against the data)")
        z = self.latent_proj(latent.to(self.latent_norm.weight.dtype))
        z = self.latent_norm(z.view(batch, cfg.latent_prefix_len, self.n_embd))
        return z + self.type_emb.weight[0]

    def forward(self, input_ids: torch.Tensor, t: torch.Tensor, latent: Optional[torch.Tensor] = None,
                s: Optional[torch.Tensor] = None, latent_drop: Optional[torch.Tensor] = None,
                state: Optional[List[LayerState]] = None, return_state: bool = False,
                pos_offset: int = 0, attention_bias: Optional[torch.Tensor] = None,
                prev_ids: Optional[torch.Tensor] = None,
                context_ids: Optional[torch.Tensor] = None,
                prompt_lengths: Optional[torch.Tensor] = None,
                state_at: Optional[int] = None, input_embeds: Optional[torch.Tensor] = None,
                latent_noise: Optional[tuple] = None) -> DenoiserOutput:
        """Denoise.

        Args:
            input_ids: [B, T] text with ``mask_id`` at noised positions.
            t: [B] text diffusion time in [0, 1].
            latent: [B, latent_dim] noisy latent z_s, or None for the learned null latent
                (no latent information: unconditional / classifier-free guidance).
            s: [B] latent diffusion time (default: 0, a clean latent; 1 when ``latent`` is None).
            latent_drop: [B] bool, rows whose latent is replaced by the null latent.
            state / return_state: continue from / return the forward-scan state (mixers
                ``causal`` and ``block_causal``). A continuation call has no latent prefix: the
                prefix was read by the call that produced the state.
            pos_offset: the text position of ``input_ids[:, 0]`` (a continuation call passes the
                number of text tokens its state has read); used by the position embedding.
            attention_bias: [B, 1, L, L] additive bias over [prefix | text] (0 visible, -inf
                hidden); model.arch=qwen3 only.
            prev_ids: [B] with ``shift_logits``, the token before ``input_ids[:, 0]`` (default
                ``bos_id`` for a call without ``state``; a continuation call must pass it).
            context_ids: [B, T] the clean text of a noised ``input_ids`` (training and scoring pass
                it). A mixer that conditions on clean context (``block_causal`` with
                ``block_context=clean``) reads it; the others have no use for it and do not.
            prompt_lengths: [B] each row's prompt (leading text positions; SFT batches and the
                samplers pass it), visible to every position under Qwen3's block attention; the
                other mixers see the whole text, or blocks from position 0, and do not read it.
            state_at: return (as ``state``) the forward-scan state after the first ``state_at``
                text positions of this call (a model-block boundary, after the prefix when the call
                reads one), while the logits cover every position as in a call without a state
                (mixers with the ``folds_state`` trait; not with ``return_state``).
            input_embeds: [B, T, C] noisy embeddings read in place of ``input_ids``' (pass
                ``input_ids=None``): embedding diffusion, whose model (``embedding_output``)
                returns the predicted clean embeddings in ``embedding``.
            latent_noise: ``(alpha [B], sigma [B], eps [B, latent_dim])`` (training a
                ``latent_projector`` model): ``latent`` is then the data's clean vector; the call
                projects it (``latent_x0``), noises it as ``alpha z0 + sigma eps`` and decodes it
                back (``latent_recon``), so the projector learns inside the forward.

        With ``shift_logits`` the text position i reads token i - 1 (``bos_id`` before the first)
        and its output is the logits of token i: each prediction comes from the position before
        its token, as a left-to-right LM head predicts the next token (Dream's and DiffuLLaMA's
        shift). One more position, reading the last token, follows the text and is not scored,
        so a whole-sequence mixer sees every token; a call with ``return_state`` leaves it out,
        so that its state ends at the position before the next call's first.
        """
        cfg = self.config
        if (input_embeds is not None) != cfg.embedding_output or (input_embeds is None) == (input_ids is None):
            raise ValueError("an embedding_output model (training.objective=embedding) reads input_embeds alone, "
                             "any other model input_ids alone")
        B, T = input_ids.shape if input_embeds is None else input_embeds.shape[:2]
        P = cfg.latent_prefix_len if state is None else 0
        if state_at is not None:
            if return_state or not self.mixer.folds_state:
                folders = ", ".join(n for n, c in MIXERS.items() if c.folds_state)
                raise ValueError(f"state_at is read in a call without return_state, by a mixer that folds its state "
                                 f"({folders}); got return_state={return_state}, model.mixer={cfg.mixer}")
        if t.shape != (B,):
            raise ValueError(f"t must be [B] = [{B}], got {tuple(t.shape)}")
        if s is None and cfg.latent_prefix_len:
            s = torch.full((B,), 1.0 if latent is None else 0.0, device=t.device)
        if prev_ids is None and cfg.shift_logits:
            if state is not None:
                raise ValueError("model.shift_logits=true: a call that continues a state reads the token "
                                 "before input_ids first; pass prev_ids=[B]")
            prev_ids = input_ids.new_full((B,), cfg.bos_id)
        elif prev_ids is not None and not cfg.shift_logits:
            raise ValueError("prev_ids is read by a model.shift_logits=true model only")
        x = self._embed_text(input_ids, prev_ids, return_state, pos_offset, input_embeds)
        z0 = None
        if latent_noise is not None:
            if cfg.latent_projector == "none":
                raise ValueError("latent_noise is read by a model.latent_projector model only")
            alpha, sigma, eps = latent_noise
            z0 = self.latent_projector.encode(latent)
            latent = alpha.view(B, 1).to(z0) * z0 + sigma.view(B, 1).to(z0) * eps.to(z0)
        context = None
        if context_ids is not None and self.mixer.reads_context:
            if context_ids.shape != input_ids.shape:
                raise ValueError(f"context_ids must be the clean text of input_ids, {tuple(input_ids.shape)}, "
                                 f"got {tuple(context_ids.shape)}")
            context = self._embed_text(context_ids, prev_ids, return_state, pos_offset)
            if cfg.shift_logits:
                # a block's first position reads the token before the block: clean, as in decoding
                starts = torch.arange(0, x.shape[1], self.mixer.cache_unit(), device=x.device)
                x = x.index_copy(1, starts, context.index_select(1, starts))
        prefix = None
        if P or cfg.latent_in_cond:  # a continuation call reads no prefix, but may condition on it
            prefix = self.embed_prefix(latent, B)
            if latent_drop is not None:
                null = self.embed_prefix(None, B)
                prefix = torch.where(latent_drop.view(B, 1, 1), null, prefix)
        if P:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
            if context is not None:
                context = torch.cat([prefix.to(x.dtype), context], dim=1)

        c = None
        if cfg.time_conditioning != "none":
            c = self.time_cond(t.float(), s.float() if cfg.latent_prefix_len else None)
            if cfg.latent_in_cond:
                c = c + self.latent_cond(prefix.float().mean(1))
        extra = {}
        if attention_bias is not None:
            if not arch_of(cfg.arch).attention_bias:
                raise ValueError(f"attention_bias is read by an attention arch, not model.arch={cfg.arch}")
            extra["attention_bias"] = attention_bias
        if context is not None:
            extra["context"] = context
        if prompt_lengths is not None and self.mixer.reads_prompt:
            extra["prompt_lengths"] = prompt_lengths
        if state_at is not None:
            extra["state_at"] = P + state_at
        x, new_state = self.mixer(self.backbone.blocks, x, self._modulations(c), state=state,
                                  return_state=return_state, prefix_len=P, **extra)

        h_text = self.backbone.ln_out(x[:, P:P + T])
        if cfg.embedding_output:
            return DenoiserOutput(None, None, new_state, self.embedding_head(h_text))
        head = self.backbone.head if cfg.use_pretrained_head else self.text_head
        logits = head(h_text)
        latent_out = None
        if P:
            h_lat = self.latent_out_norm(x[:, :P]).reshape(B, P * self.n_embd)
            latent_out = self.latent_head(h_lat)
        if z0 is not None:
            return DenoiserOutput(logits, latent_out, new_state, None, z0, self.latent_projector.decode(z0))
        return DenoiserOutput(logits, latent_out, new_state)

    def clean_latent(self, data_latent: torch.Tensor) -> torch.Tensor:
        """The model's clean latent [B, latent_dim] of the data's latent vectors: projected by a
        ``latent_projector`` model, as they are otherwise."""
        if self.config.latent_projector == "none":
            return data_latent
        return self.latent_projector.encode(data_latent)
