"""Generation with :class:`~rwkv_diffusion_rnn.models.rwkv_denoiser.MultimodalRWKVDenoiser`.

Five entry points, all batched, run without gradients and reproducible under a ``torch.Generator``:

* :func:`generate_text`: text from a clean latent (or none), from scratch or by filling the
  ``mask_id`` positions of a prompt (any pattern: prefix prompt, gaps, scattered tokens);
* :func:`fill_masks`: the same, named for infilling;
* :func:`generate_latent`: a latent from (possibly partly masked) text, by the Gaussian
  diffusion samplers of :class:`~rwkv_diffusion_rnn.diffusion.continuous_diffusion.GaussianDiffusion`;
* :func:`generate_joint`: text and latent together: co-denoised in the same steps, or latent first
  (see its docstring);
* :func:`generate_autoregressive`: text from a causal (``training.objective=ar``) model, token by token.

Text decoding (masked diffusion, as in LLaDA / MDLM)
----------------------------------------------------
The canvas starts with ``mask_id`` at every position to fill. Each step runs the model once,
proposes a token for every masked position of the current block, and *commits* some of them;
a committed token (and every token given in the prompt) is never changed again. Until the
whole canvas is filled:

* **Blocks.** ``block_length=None`` decodes the whole sequence as one block; otherwise blocks of
  ``block_length`` text positions are decoded left to right (semi-autoregressive), and a block's
  positions are only committed once every block before it is complete. Blocks that hold no mask
  are skipped. A row's blocks count from the end of its prompt (its leading given tokens), as
  LLaDA's semi-autoregressive decoding does, so an answer's first block starts after its prompt;
  for a model that reads in blocks of its own (``block_causal``, ``causal``: a cache unit) they
  start at position 0, cached or not, so that the cache carries whole model blocks.
* **How many per step.** Each row splits ``steps`` evenly over its blocks that hold masks
  (earlier blocks get the remainder; every such block gets at least one step). Inside a block with ``r``
  masks left and ``n`` steps left, a row commits ``ceil(r / n)`` tokens, which spreads the
  block's masks evenly over its steps (LLaDA's schedule) and always finishes on time.
* **Threshold decoding** (``threshold``, as in Fast-dLLM): a step also commits every masked
  position of the block whose confidence is at least ``threshold``. Without ``steps`` at least
  one token per row is committed per step; with ``steps`` the count above is the minimum, so the
  step budget still holds. ``threshold=0`` commits everything in one step.
* **Which positions** (``remasking``): ``"low_confidence"`` keeps the most confident proposals,
  ``"random"`` picks uniformly at random, ``"random_topk"`` picks without replacement with
  probability proportional to confidence (Gumbel top-k). The confidence of a proposal is the
  probability of the proposed token under the softmax of the filtered logits at temperature 1.
* **Proposals.** The mask token's logit is set to ``-inf`` (it is never proposed); ``top_k`` and
  ``top_p`` filter the logits; ``temperature=0`` takes the argmax, otherwise the token is drawn
  from ``softmax(logits / temperature)`` (Gumbel-max in float64).
* **Text time.** The model is given ``t`` = the fraction of the row's *initially masked*
  positions that are still masked: 1 at the first step, 0 when done. This is the masking rate of
  training, where ``t`` is the rate applied to the positions that may be noised (prompt and
  other given tokens never are).
* **Guidance on the latent** (``cfg_scale``): ``logits = cond + cfg_scale * (cond - uncond)``
  where ``uncond`` sees the learned null latent, exactly as ``latent=None`` does (latent time
  ``s = 1``); the conditional pass uses the clean latent (``s = 0``). ``cfg_scale = 0`` runs the
  conditional model alone. Both passes run as one batch of 2B rows.
* **Guidance on the prompt** (``prompt_cfg_scale``, LLaDA's): the same formula with ``uncond``
  the canvas with each row's prompt masked (``cond + w (cond - uncond)`` is LLaDA's
  ``uncond + (w + 1)(cond - uncond)``). With both, each guidance adds its own term:
  ``cond + cfg_scale (cond - uncond_latent) + prompt_cfg_scale (cond - uncond_prompt)``, the
  three passes as one batch of 3B rows.

State caching (``use_cache``)
-----------------------------
A mixer whose :meth:`~rwkv_diffusion_rnn.models.mixers.base.Mixer.cache_unit` is a number U
(``block_causal``: its ``block_size``; ``causal``: 1) lets nothing flow right to left across its
blocks of U tokens, so positions before the current decoding block only matter through the
forward-scan state. With ``use_cache=True`` that state is carried: a step feeds only the tokens
from the cache's boundary to the end of the model block holding the decoding block's last
position. Once a decoding block is complete, its tokens up to the last model-block boundary are
folded into the state (the latent prefix goes in with the first fold): for a mixer with the
``folds_state`` trait (``causal``, ``block_causal``) by the next block's first step itself, which
feeds the finished block and the next one and takes back the state at the boundary between them
(fold-and-step: one model call per step, none for folding); for other mixers by one more call on
the finished block with ``return_state=True``. Other mixers (no cache unit) read the whole
sequence each step and ignore ``use_cache``.

For a model that is not conditioned on the text time (``time_conditioning="none"``) the cached
path gives the same logits as running the full canvas every step. A time-conditioned model
encodes the committed tokens in the cache with the ``t`` of the call that folds them (the next
block's first step, or the step that completed their block), where the uncached path re-encodes them with the current ``t``; the two then differ slightly
(the committed context is the same text, seen at a slightly noisier time).

Batches
-------
A row is decoded as it would be alone: its steps, its time ``t`` and its choices depend only on
its own canvas, and with one generator per row (``generator=[g_0, ..., g_{B-1}]``) every random
number it uses comes from its own stream, drawn only while it still has masks to fill. So the
rows of a batch, whatever their prompts, equal the same rows decoded one at a time with the same
generators (up to the floating-point rounding of batched matrix products, which on CPU and in
float32 leaves the tokens the same; tested). A single generator is shared by the rows in order.

Autoregressive models
---------------------
:func:`generate_autoregressive` writes a causal model's canvas left to right, one token per call
through the recurrent state: the given tokens (a prefix of each row) are read, every other
position is drawn from the next-token distribution (the same ``temperature`` / ``top_k`` /
``top_p`` rules, Gumbel-max in float64), and a row that writes ``eos_id`` ends there.

The model is switched to eval mode for the call and put back afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .continuous_diffusion import GaussianDiffusion

__all__ = ["REMASKING", "LATENT_SAMPLERS", "JOINT_ORDERS", "cache_unit", "guided_logits", "propose_tokens", "generate_text",
           "fill_masks", "generate_latent", "generate_joint", "generate_autoregressive"]

REMASKING = ("low_confidence", "random", "random_topk")
# tokens of committed text (a prompt) read through a recurrent state per call
PREFILL_CHUNK = 4096
LATENT_SAMPLERS = ("ddim", "ddpm")
# generate_joint's orders: co-denoised in the same steps, or the latent first and the text from it
JOINT_ORDERS = ("together", "latent_first")


def cache_unit(model) -> Optional[int]:
    """The tokens a state cache commits at once for ``model`` (None: its mixer has no cache)."""
    return model.mixer.cache_unit()


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _rand(shape, generator, device) -> torch.Tensor:
    """Uniform [0, 1) in float64, drawn on the generator's device, returned on ``device``."""
    if generator is not None:
        return torch.rand(shape, generator=generator, device=generator.device,
                          dtype=torch.float64).to(device)
    return torch.rand(shape, device=device, dtype=torch.float64)


def _gumbel(shape, generator, device) -> torch.Tensor:
    u = _rand(shape, generator, device).clamp_(1e-300, 1.0 - 1e-16)
    return -torch.log(-torch.log(u))


Generators = Union[None, torch.Generator, Sequence[Optional[torch.Generator]]]


def _row_generators(generator: Generators, batch: int) -> List[Optional[torch.Generator]]:
    """One random stream per row: a list (one per row) as given, else the one generator shared."""
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * batch
    gens = list(generator)
    if len(gens) != batch:
        raise ValueError(f"{len(gens)} generators for {batch} rows: pass one per row, or a single one")
    return gens


def _per_row(draw, counts: torch.Tensor, gens: List[Optional[torch.Generator]], device,
             *tail: int) -> torch.Tensor:
    """Rows' draws [sum(counts), *tail], row r's ``counts[r]`` from its own stream, concatenated in
    row order (the order of ``x[mask]`` for a [B, L] mask). A row with count 0 draws nothing, so a
    row's stream is consumed exactly as when the row is decoded alone."""
    parts = [draw((int(n), *tail), g, device) for n, g in zip(counts.tolist(), gens) if n > 0]
    if not parts:
        return torch.zeros((0, *tail), dtype=torch.float64, device=device)
    return torch.cat(parts)


@contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------
# The denoiser as a logits function (with guidance and state)
# --------------------------------------------------------------------------------------------


class _TextDenoiser:
    """Calls the model on text with a fixed clean latent (or none), optionally guided.

    Guidance runs more passes in one batch: [conditional rows | null-latent rows (``cfg_scale``) |
    prompt-masked rows (``prompt_cfg_scale``)], and so does the state it returns. The conditional
    logits ``c`` and each unconditional ``u_k`` combine as ``c + sum_k w_k (c - u_k)``. The latent
    time ``s`` is passed explicitly on every call (0 for the clean latent, 1 for the null latent)
    so that continuation calls, which carry no prefix, are conditioned the same way.
    ``prompt_lengths`` [B]: each row's prompt (its leading given tokens), which the prompt-masked
    pass hides and a block-attention model sees as visible to all.
    """

    def __init__(self, model, latent: Optional[torch.Tensor], cfg_scale: float, batch: int,
                 prompt_cfg_scale: float = 0.0, prompt_lengths: Optional[torch.Tensor] = None):
        cfg = model.config
        self.model = model
        device = _device(model)
        if latent is not None:
            if not cfg.latent_prefix_len:
                raise ValueError("a latent was given, but the model has no latent input "
                                 "(model.latent_prefix_len=0); pass latent=None")
            if latent.shape != (batch, cfg.latent_dim):
                raise ValueError(f"latent must be [B, latent_dim] = [{batch}, {cfg.latent_dim}], "
                                 f"got {tuple(latent.shape)}")
            latent = latent.to(device)
        if cfg_scale != 0.0 and latent is None:
            raise ValueError("cfg_scale != 0 guides towards a latent: pass latent=[B, latent_dim] "
                             "(the unconditional pass uses the model's null latent); prompt_cfg_scale "
                             "guides towards the prompt")
        if prompt_cfg_scale != 0.0 and prompt_lengths is None:
            raise ValueError("prompt_cfg_scale needs the rows' prompt lengths")
        self.mask_id = cfg.mask_id
        self.prompt_lengths = None if prompt_lengths is None else prompt_lengths.to(device)
        # (kind, scale) of each pass after the conditional one
        self.passes = ([("latent", float(cfg_scale))] if cfg_scale != 0.0 else []) + \
                      ([("prompt", float(prompt_cfg_scale))] if prompt_cfg_scale != 0.0 else [])
        n = 1 + len(self.passes)
        zeros, ones = torch.zeros(batch, device=device), torch.ones(batch, device=device)
        fill = zeros if latent is not None else ones
        self.latent_in = None if latent is None else torch.cat([latent] * n)
        s_parts = [fill] + [ones if kind == "latent" else fill for kind, _ in self.passes]
        self.s = torch.cat(s_parts) if cfg.latent_prefix_len else None
        self.drop = None
        if any(kind == "latent" for kind, _ in self.passes):
            self.drop = torch.cat([(ones if kind == "latent" else zeros).bool() for kind in
                                   ["cond"] + [k for k, _ in self.passes]])

    def set_latent(self, latent: torch.Tensor, s: torch.Tensor) -> None:
        """Condition the next calls on the noisy latent ``latent`` [B, D] at latent times ``s`` [B]
        (joint co-denoising); a null-latent guidance pass keeps the null latent at ``s = 1``."""
        n = 1 + len(self.passes)
        self.latent_in = torch.cat([latent] * n)
        self.s = torch.cat([s] + [torch.ones_like(s) if kind == "latent" else s for kind, _ in self.passes])

    def _hide_prompt(self, ids: torch.Tensor, pos_offset: int) -> torch.Tensor:
        pos = pos_offset + torch.arange(ids.shape[1], device=ids.device)
        return ids.masked_fill(pos[None, :] < self.prompt_lengths[:, None], self.mask_id)

    def __call__(self, ids: torch.Tensor, t: torch.Tensor, state=None, return_state: bool = False,
                 pos_offset: int = 0, prev_ids: Optional[torch.Tensor] = None, state_at: Optional[int] = None):
        all_ids, all_prev = [ids], [prev_ids]
        for kind, _ in self.passes:
            if kind == "prompt":
                all_ids.append(self._hide_prompt(ids, pos_offset))
                all_prev.append(None if prev_ids is None else
                                prev_ids.masked_fill(pos_offset - 1 < self.prompt_lengths, self.mask_id))
            else:
                all_ids.append(ids)
                all_prev.append(prev_ids)
        n = len(all_ids)
        out = self.model(torch.cat(all_ids), torch.cat([t] * n), latent=self.latent_in, s=self.s,
                         latent_drop=self.drop, state=state, return_state=return_state, pos_offset=pos_offset,
                         prev_ids=None if prev_ids is None else torch.cat(all_prev),
                         prompt_lengths=None if self.prompt_lengths is None else torch.cat([self.prompt_lengths] * n),
                         **({} if state_at is None else {"state_at": state_at}))
        # the latent head's prediction for the conditional rows (what joint co-denoising steps with)
        self.latent_out = None if out.latent is None else out.latent[:ids.shape[0]].float()
        logits = out.logits.float()
        if self.passes:
            parts = logits.chunk(n)
            cond = logits = parts[0]
            for (_, w), uncond in zip(self.passes, parts[1:]):
                logits = logits + w * (cond - uncond)       # one pass: cond + w (cond - uncond)
        return logits, out.state


@torch.inference_mode()
def guided_logits(model, input_ids: torch.Tensor, t: torch.Tensor, latent: Optional[torch.Tensor] = None,
                  cfg_scale: float = 0.0, state=None, return_state: bool = False,
                  prev_ids: Optional[torch.Tensor] = None, prompt_cfg_scale: float = 0.0,
                  prompt_lengths: Optional[torch.Tensor] = None):
    """Text logits [B, T, V] (float32) as the text samplers see them, and the state (or None).

    ``latent`` is a clean latent [B, latent_dim] (``s = 0``) or None (the null latent, ``s = 1``);
    ``cfg_scale != 0`` returns ``cond + cfg_scale * (cond - uncond)`` with ``uncond`` the null-latent
    pass; its state then covers 2B rows (cond rows first). ``prev_ids``: the token before
    ``input_ids`` for a ``shift_logits`` model continuing a state. ``prompt_lengths`` [B]: each
    row's prompt, which block attention shows to all and ``prompt_cfg_scale`` guides towards
    (``+ prompt_cfg_scale * (cond - uncond)``, ``uncond`` seeing the prompt masked).
    """
    fn = _TextDenoiser(model, latent, cfg_scale, input_ids.shape[0], prompt_cfg_scale,
                       None if prompt_lengths is None else prompt_lengths.to(_device(model)))
    return fn(input_ids.to(_device(model)), t.to(_device(model)), state=state, return_state=return_state,
              prev_ids=None if prev_ids is None else prev_ids.to(_device(model)))


class _StateCache:
    """Forward-scan state of the text before ``self.pos`` (a model-block boundary).

    With ``shift_logits`` position i reads token i - 1, so a call from ``pos`` passes the token
    before it (``x[:, pos - 1]``) as ``prev_ids``. Committed text longer than ``chunk`` tokens
    (a long prompt) is folded into the state a chunk at a time before a block is decoded, so it
    costs the memory of one chunk.

    Fold-and-step: for a mixer that folds its state (the ``folds_state`` trait), the committed
    blocks between ``pos`` and the block being decoded are folded into the state by the same
    call that computes that block's logits (the mixer returns the state at that interior
    boundary); otherwise a finished block is folded by a call of its own (:meth:`advance`).
    ``calls`` counts the model calls."""

    def __init__(self, fn: _TextDenoiser, granularity: int, chunk: Optional[int] = None):
        self.fn = fn
        self.g = granularity
        self.chunk = max(granularity, ((chunk or PREFILL_CHUNK) // granularity) * granularity)
        self.pos = 0
        self.state = None
        self.shift = fn.model.config.shift_logits
        self.folds = fn.model.mixer.folds_state
        self.calls = 0

    def _prev(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        return x[:, self.pos - 1] if self.shift and self.pos > 0 else None

    def logits(self, x: torch.Tensor, a: int, b: int, t: torch.Tensor) -> torch.Tensor:
        """Logits of positions [a, b), feeding x[pos : end of b's model block] (and, folding, moving
        ``pos`` to the last model-block boundary <= a)."""
        while (a // self.g) * self.g - self.pos > self.chunk:
            self.advance(x, self.pos + self.chunk, t)
        end = min(-(-b // self.g) * self.g, x.shape[1])
        new = (a // self.g) * self.g
        start = self.pos
        self.calls += 1
        if self.folds and new > start:
            logits, self.state = self.fn(x[:, start:end], t, state=self.state, pos_offset=start,
                                         prev_ids=self._prev(x), state_at=new - start)
            self.pos = new
        else:
            logits, _ = self.fn(x[:, start:end], t, state=self.state, pos_offset=start, prev_ids=self._prev(x))
        return logits[:, a - start:b - start]

    def advance(self, x: torch.Tensor, b: int, t: torch.Tensor) -> None:
        """Fold the committed text up to the last model-block boundary <= b into the state."""
        new = (b // self.g) * self.g
        if new > self.pos:
            self.calls += 1
            _, self.state = self.fn(x[:, self.pos:new], t, state=self.state, return_state=True,
                                    pos_offset=self.pos, prev_ids=self._prev(x))
            self.pos = new

    def block_done(self, x: torch.Tensor, b: int, t: torch.Tensor) -> None:
        """A decoding block ending at ``b`` is complete: fold it now, unless the next block's first
        call will (fold-and-step)."""
        if not self.folds and b < x.shape[1]:
            self.advance(x, b, t)


# --------------------------------------------------------------------------------------------
# Proposals and the choice of positions
# --------------------------------------------------------------------------------------------


def _filter_logits(logits: torch.Tensor, top_k: Optional[int], top_p: Optional[float]) -> torch.Tensor:
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def propose_tokens(logits: torch.Tensor, mask_id: int, temperature: float = 0.0,
                   top_k: Optional[int] = None, top_p: Optional[float] = None,
                   generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """A proposed token and its confidence for every position of ``logits`` [..., V].

    The mask token is never proposed. Returns ``(tokens [...] long, confidence [...] float32)``,
    the confidence being the token's probability under the softmax of the filtered logits.
    """
    noise = None if temperature == 0.0 else _gumbel(logits.shape, generator, logits.device)
    return _propose(logits, mask_id, temperature, top_k, top_p, noise)


def _propose(logits, mask_id, temperature, top_k, top_p, noise: Optional[torch.Tensor]):
    """:func:`propose_tokens` with its Gumbel noise (float64, the shape of ``logits``) given."""
    logits = logits.float().clone()
    logits[..., mask_id] = float("-inf")
    logits = _filter_logits(logits, top_k, top_p)
    if temperature == 0.0:
        tokens = logits.argmax(-1)
    else:
        tokens = (logits.double() / temperature + noise).argmax(-1)
    conf = logits.softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, conf


def _choose(conf: torch.Tensor, masked: torch.Tensor, n_min: torch.Tensor, remasking: str,
            threshold: Optional[float], gens: List[Optional[torch.Generator]]) -> torch.Tensor:
    """Which masked positions of a block [B, L] to commit this step (bool [B, L])."""
    score = conf.double()
    if remasking != "low_confidence":
        # each row with a masked position draws one number per position of the block
        busy = masked.any(1)
        noise = torch.zeros_like(score)
        draw = _rand if remasking == "random" else _gumbel
        noise[busy] = _per_row(draw, busy.long(), gens, conf.device, conf.shape[1])
        if remasking == "random":
            score = noise
        else:  # random_topk: sampling without replacement, probability proportional to confidence
            score = score.clamp_min(1e-300).log() + noise
    score = score.clamp(min=-1e300)                     # finite for masked positions ...
    count = n_min
    if threshold is not None:
        sure = masked & (conf >= threshold)
        score = score.masked_fill(sure, float("inf"))   # ... and confident ones always first
        count = torch.maximum(count, sure.sum(1))
    score = score.masked_fill(~masked, float("-inf"))
    count = torch.minimum(count, masked.sum(1))
    order = score.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                             .expand_as(order).contiguous())
    return (ranks < count.unsqueeze(1)) & masked


def _split_steps(steps: int, n_blocks: int) -> List[int]:
    base, extra = divmod(steps, n_blocks)
    return [max(1, base + (i < extra)) for i in range(n_blocks)]


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def _canvas(cfg, device, latent, length, prompt_ids, batch_size) -> torch.Tensor:
    if prompt_ids is not None:
        x = prompt_ids.to(device=device, dtype=torch.long).clone()
        if x.dim() != 2:
            raise ValueError(f"prompt_ids must be [B, T], got shape {tuple(x.shape)}")
        if length is not None:
            if length < x.shape[1]:
                raise ValueError(f"length={length} is shorter than prompt_ids ({x.shape[1]} tokens)")
            pad = torch.full((x.shape[0], length - x.shape[1]), cfg.mask_id, dtype=torch.long, device=device)
            x = torch.cat([x, pad], dim=1)
        return x
    if length is None or length < 1:
        raise ValueError("give length >= 1 (the number of tokens to generate) or prompt_ids")
    if batch_size is None:
        batch_size = latent.shape[0] if latent is not None else 1
    return torch.full((batch_size, length), cfg.mask_id, dtype=torch.long, device=device)


@torch.inference_mode()
def generate_text(model, *, latent: Optional[torch.Tensor] = None, length: Optional[int] = None,
                  prompt_ids: Optional[torch.Tensor] = None, batch_size: Optional[int] = None,
                  steps: Optional[int] = None, block_length: Optional[int] = None,
                  remasking: str = "low_confidence", threshold: Optional[float] = None,
                  temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                  cfg_scale: float = 0.0, prompt_cfg_scale: float = 0.0, generator: Generators = None,
                  use_cache: bool = True, return_history: bool = False, prefill_chunk: int = PREFILL_CHUNK
                  ) -> Union[torch.Tensor, Tuple[torch.Tensor, List[torch.Tensor]]]:
    """Decode text by masked diffusion (see the module docstring for every rule).

    Args:
        model: a :class:`MultimodalRWKVDenoiser`.
        latent: clean latent [B, latent_dim] to write from, or None (the null latent).
        length: number of text positions; with ``prompt_ids`` it pads the prompt with masks
            on the right (default: the prompt's length).
        prompt_ids: [B, T] text with ``model.config.mask_id`` at the positions to fill; the other
            tokens are kept as they are.
        batch_size: rows to generate without prompt or latent (default: the latent's rows, else 1).
        steps: denoising steps over the whole canvas (may be None with ``threshold``).
        block_length: decode blocks of this many positions left to right (None: one block).
        remasking: ``"low_confidence"``, ``"random"`` or ``"random_topk"``.
        threshold: commit every proposal with confidence >= threshold (at least one per row).
        temperature, top_k, top_p: how proposals are drawn (``temperature=0``: argmax).
        cfg_scale: guidance on the latent, ``cond + cfg_scale * (cond - uncond)``.
        prompt_cfg_scale: guidance on the prompt (the leading given tokens of each row), the
            unconditional pass seeing them masked.
        generator: randomness of proposals and of random remasking: one generator, or one per
            row (then every row is decoded exactly as it would be alone with its generator).
        use_cache: carry committed blocks as RNN state (``block_causal`` and ``causal`` mixers).
        prefill_chunk: with the cache, committed text (a prompt) is read into the state in calls of
            at most this many tokens (rounded down to whole model blocks).
        return_history: also return the canvas before the first step and after every step.

    Returns:
        LongTensor [B, T] without any mask id; with ``return_history``, ``(tokens, history)``
        where ``history[0]`` is the starting canvas and ``history[i]`` the canvas after step i.
    """
    return _decode_text(model, latent=latent, length=length, prompt_ids=prompt_ids, batch_size=batch_size,
                        steps=steps, block_length=block_length, remasking=remasking, threshold=threshold,
                        temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale,
                        prompt_cfg_scale=prompt_cfg_scale, generator=generator, use_cache=use_cache,
                        return_history=return_history, prefill_chunk=prefill_chunk, co=None)


def _decode_text(model, *, latent: Optional[torch.Tensor] = None, length: Optional[int] = None,
                 prompt_ids: Optional[torch.Tensor] = None, batch_size: Optional[int] = None,
                 steps: Optional[int] = None, block_length: Optional[int] = None,
                 remasking: str = "low_confidence", threshold: Optional[float] = None,
                 temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 cfg_scale: float = 0.0, prompt_cfg_scale: float = 0.0, generator: Generators = None,
                 use_cache: bool = True, return_history: bool = False, prefill_chunk: int = PREFILL_CHUNK,
                 co: Optional["_CoLatent"] = None) -> Union[torch.Tensor, Tuple[torch.Tensor, List[torch.Tensor]]]:
    """:func:`generate_text`, and with ``co`` the latent co-denoised in the same steps."""
    cfg = model.config
    mask_id = cfg.mask_id
    if remasking not in REMASKING:
        raise ValueError(f"remasking={remasking!r}; choose one of {REMASKING}")
    if steps is None and threshold is None:
        raise ValueError("give steps (the number of denoising steps) or a confidence threshold")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if threshold is not None and threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if block_length is not None and block_length < 1:
        raise ValueError(f"block_length must be >= 1, got {block_length}")

    device = _device(model)
    x = _canvas(cfg, device, latent, length, prompt_ids, batch_size)
    B, T = x.shape
    n_start = (x == mask_id).sum(1).clamp_min(1).float()   # the positions this call fills
    open_ = x == mask_id
    prompt_lengths = torch.where(open_.any(1), open_.float().argmax(1), torch.full((B,), T, device=device)).long()
    fn = _TextDenoiser(model, latent, cfg_scale, B, prompt_cfg_scale, prompt_lengths)
    cache = None
    # co-denoising changes the latent every step: a state carried from earlier steps would hold an old one
    unit = cache_unit(model) if use_cache and co is None else None
    if unit is not None:
        cache = _StateCache(fn, unit, prefill_chunk)

    gens = _row_generators(generator, B)
    L = T if block_length is None else block_length
    # row r's block j: positions start_r + j L ... ; blocks count from each row's prompt end, except
    # for a model that reads in blocks of its own (a cache unit): those, from position 0, cached or not
    aligned = block_length is not None and cache_unit(model) is None
    start = prompt_lengths if aligned else torch.zeros_like(prompt_lengths)
    first = int(start.min())
    n_blocks = max(1, -(-(T - first) // L))
    # the canvas with a scratch column T, where the positions of a block past the end point
    canvas = torch.cat([x, torch.full((B, 1), mask_id, dtype=x.dtype, device=device)], 1)
    x = canvas[:, :T]

    def block(j: int):
        """Positions [B, w] of each row's block j, and which of them exist (a row's width depends
        on nothing but the block size and T, so a row decodes as it would alone)."""
        w = L if aligned else min(L, T - j * L)
        idx = start[:, None] + j * L + torch.arange(w, device=device)
        inside = idx < T
        return idx.masked_fill(~inside, T), inside

    # each row splits its steps over its own blocks that hold masks, as it would decoded alone
    holds = torch.stack([((canvas.gather(1, idx) == mask_id) & inside).any(1)
                         for idx, inside in map(block, range(n_blocks))], 1).cpu()   # [B, n_blocks]
    budget = torch.zeros(holds.shape, dtype=torch.long)
    if steps is not None:
        for r in range(B):
            idx = holds[r].nonzero().flatten()
            if len(idx):
                budget[r, idx] = torch.tensor(_split_steps(steps, len(idx)))
    budget = budget.to(device)
    active = [j for j in range(n_blocks) if bool(holds[:, j].any())]
    if co is not None:
        # each row's latent grid: as many intervals as the text steps the row plans (a block of m
        # masks and b steps takes min(b, m); without steps, at most one step per mask)
        masks = torch.stack([((canvas.gather(1, idx) == mask_id) & inside).sum(1)
                             for idx, inside in map(block, range(n_blocks))], 1).cpu()
        co.start(torch.minimum(budget.cpu(), masks).sum(1) if steps is not None else masks.sum(1), gens)
    history = [x.clone()] if return_history else None

    with _eval_mode(model):
        for j in active:
            idx, inside = block(j)
            a, b = j * L, min(j * L + L, T)          # the block's span where every row starts at 0
            step = 0
            while True:
                current = canvas.gather(1, idx)
                masked = (current == mask_id) & inside
                remaining = masked.sum(1)
                if not bool(remaining.any()):
                    break
                t = (x == mask_id).sum(1).float() / n_start
                pick = masked
                if cache is not None:
                    # from the first column any row still has masked: the text before it (a prompt,
                    # committed tokens) is read into the state once, not fed again every step
                    lo = a + int(masked.any(0).nonzero()[0])
                    logits, pick = cache.logits(x, lo, b, t), masked[:, lo - a:]
                else:
                    if co is not None:
                        co.feed(fn)
                    full = fn(x, t)[0]
                    full = torch.cat([full, full[:, :1]], 1)      # the scratch column
                    logits = full.gather(1, idx[..., None].expand(-1, -1, full.shape[-1]))
                # proposals only where they can be used: [n_masked, V] instead of [B, L, V]
                tokens = current.clone()
                conf = torch.zeros(masked.shape, device=device)
                flat = logits[pick]
                noise = None if temperature == 0.0 else _per_row(_gumbel, remaining, gens, device, flat.shape[-1])
                tokens[masked], conf[masked] = _propose(flat, mask_id, temperature, top_k, top_p, noise)
                if steps is None:
                    n_min = (remaining > 0).long()
                else:
                    left = (budget[:, j] - step).clamp_min(1)
                    n_min = torch.div(remaining + left - 1, left, rounding_mode="floor")
                commit = _choose(conf, masked, n_min, remasking, threshold, gens)
                canvas.scatter_(1, idx, torch.where(commit, tokens, current))
                if co is not None:          # the rows that took a text step take a latent step
                    co.step(fn.latent_out, remaining > 0)
                step += 1
                if history is not None:
                    history.append(x.clone())
            if cache is not None:
                cache.block_done(x, b, (x == mask_id).float().mean(1))
        if co is not None:
            co.finish(fn, x, (x == mask_id).sum(1).float() / n_start)

    return (x.clone(), history) if return_history else x.clone()


def fill_masks(model, ids: torch.Tensor, **kwargs):
    """Infilling: replace every ``mask_id`` of ``ids`` [B, T]; keyword arguments as :func:`generate_text`."""
    return generate_text(model, prompt_ids=ids, **kwargs)


# --------------------------------------------------------------------------------------------
# Latent
# --------------------------------------------------------------------------------------------


@torch.inference_mode()
def generate_latent(model, diffusion: GaussianDiffusion, text_ids: torch.Tensor, steps: int = 50,
                    sampler: str = "ddim", eta: float = 0.0, generator: Optional[torch.Generator] = None,
                    init_noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sample a latent [B, latent_dim] (float32) for ``text_ids`` [B, T].

    The model sees the text with text time ``t`` = the fraction of ``mask_id`` positions in the
    row (0 for clean text, 1 for all-mask text: no text information) and the noisy latent ``z_s``
    at latent time ``s``; its latent head's prediction (of ``diffusion``'s target type, which must
    match ``model.config.latent_target``) drives ``diffusion.ddim_sample`` (``eta``; ``eta=0`` is
    deterministic given the start noise) or ``diffusion.ddpm_sample``.
    """
    cfg = model.config
    _check_latent_model(model, diffusion)
    if sampler not in LATENT_SAMPLERS:
        raise ValueError(f"sampler={sampler!r}; choose one of {LATENT_SAMPLERS}")
    device = _device(model)
    ids = text_ids.to(device=device, dtype=torch.long)
    if ids.dim() != 2:
        raise ValueError(f"text_ids must be [B, T], got shape {tuple(ids.shape)}")
    t = (ids == cfg.mask_id).float().mean(1)

    def model_fn(z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        out = model(ids, t, latent=z.to(device), s=s.to(device)).latent
        return out.float().to(z.device)

    shape = (ids.shape[0], cfg.latent_dim)
    with _eval_mode(model):
        if sampler == "ddim":
            z = diffusion.ddim_sample(model_fn, shape, steps, eta=eta, generator=generator,
                                      device=device, init_noise=init_noise)
        else:
            z = diffusion.ddpm_sample(model_fn, shape, steps, generator=generator, device=device,
                                      init_noise=init_noise)
    return z.to(device)


# --------------------------------------------------------------------------------------------
# Both
# --------------------------------------------------------------------------------------------


class _CoLatent:
    """The latent's reverse process run inside the text decoder's steps (``order="together"``).

    Row r's latent lives on a grid of ``n_r`` intervals, ``s = k / n_r`` with ``k`` the intervals
    left (``n_r``: the text steps the row plans). Every text step of the row reads ``z_s`` at its
    ``s`` (:meth:`feed`), and the same forward's latent-head output moves ``z`` one DDIM interval
    (:meth:`step`) while ``k > 1``. The last interval, to the clean latent, is kept for the finished
    text (:meth:`finish`): the latent a pair ends with is predicted from the text the pair holds.
    A row whose text finished early (threshold decoding) takes its remaining intervals then, on
    its finished text. A row steps only on its own steps and draws noise (``eta > 0``) only from
    its own stream, so it is co-denoised as it would be alone.
    """

    def __init__(self, diffusion: GaussianDiffusion, z: torch.Tensor, eta: float):
        self.diffusion, self.z, self.eta = diffusion, z.float(), float(eta)

    def start(self, planned: torch.Tensor, gens: List[Optional[torch.Generator]]) -> None:
        device = self.z.device
        self.n = planned.clamp_min(1).to(device)
        self.k = self.n.clone()
        self.gens = gens

    def _s(self, k: torch.Tensor) -> torch.Tensor:
        return k.float() / self.n.float()

    def feed(self, fn: "_TextDenoiser") -> None:
        fn.set_latent(self.z, self._s(self.k))

    def step(self, pred: torch.Tensor, rows: torch.Tensor) -> None:
        """One DDIM interval ``k -> k - 1`` for ``rows`` (bool [B]) that have more than one left."""
        go = rows.to(self.k.device) & (self.k > 1)
        if not bool(go.any()):
            return
        d, z = self.diffusion, self.z
        s, s2 = self._s(self.k), self._s(self.k - 1)
        x0, eps = d.predict_x0(z, s, pred), d.predict_eps(z, s, pred)
        a, sig = (v[:, None] for v in d.alpha_sigma(s))
        a2, sig2 = (v[:, None] for v in d.alpha_sigma(s2))
        c = self.eta * (sig2 / sig) * (1.0 - (a / a2) ** 2).clamp_min(0).sqrt()
        new = a2 * x0 + (sig2 ** 2 - c ** 2).clamp_min(0).sqrt() * eps
        if self.eta > 0:
            noise = torch.zeros_like(z)
            noise[go] = _per_row(_normal, go.long(), self.gens, z.device, z.shape[1]).to(z.dtype)
            new = new + c * noise
        self.z = torch.where(go[:, None], new, z)
        self.k = self.k - go.long()

    def finish(self, fn: "_TextDenoiser", x: torch.Tensor, t: torch.Tensor) -> None:
        """The remaining intervals on the finished text ``x``, then the clean latent from it."""
        while bool((self.k > 1).any()):
            self.feed(fn)
            fn(x, t)
            self.step(fn.latent_out, torch.ones_like(self.k, dtype=torch.bool))
        self.feed(fn)
        fn(x, t)
        self.z = self.diffusion.predict_x0(self.z, self._s(self.k), fn.latent_out)


def _normal(shape, generator, device) -> torch.Tensor:
    if generator is not None:
        return torch.randn(shape, generator=generator, device=generator.device).to(device)
    return torch.randn(shape, device=device)


def _check_latent_model(model, diffusion: GaussianDiffusion) -> None:
    cfg = model.config
    if not cfg.latent_prefix_len:
        raise ValueError("this model has no latent (model.latent_prefix_len=0): nothing to sample")
    if diffusion.target_type != cfg.latent_target:
        raise ValueError(f"the diffusion predicts {diffusion.target_type!r} but the model's latent head "
                         f"was built for {cfg.latent_target!r} (model.latent_target); make them agree")


def generate_joint(model, diffusion: GaussianDiffusion, batch_size: Optional[int] = None,
                   length: Optional[int] = None, steps: Optional[int] = None, *,
                   order: str = "together", latent_steps: int = 50, sampler: str = "ddim", eta: float = 0.0,
                   prompt_ids: Optional[torch.Tensor] = None, generator: Generators = None,
                   init_noise: Optional[torch.Tensor] = None, **text_kwargs):
    """Sample text and latent together.

    ``order="together"`` (the default) co-denoises them: both reverse processes advance in the
    same steps, one model call per step. The call reads the partly masked text at its time ``t``
    and the noisy latent ``z_s`` at its time ``s``; its text logits commit tokens as
    :func:`generate_text` does (every rule of the module docstring: blocks, remasking,
    threshold, guidance, per-row generators), and its latent prediction moves ``z`` one DDIM
    interval (``eta``) towards ``s = 0``. The latent's grid has as many intervals as the row's
    text steps (``latent_steps`` is not used), and its last interval, to the clean latent, is
    taken on the finished text (see :class:`_CoLatent`): one call more than the text's steps.
    This is how a model trained on both noised at once samples the pair from its joint: each
    half conditions the other at every noise level, neither is fixed before the other has begun.
    The state cache (``use_cache``) is not used: the latent changes every step.

    ``order="latent_first"`` factors the joint as ``p(z | prompt) p(text | z, prompt)``:

    1. the latent is sampled by :func:`generate_latent` from the canvas (all masks, ``t = 1``,
       when there is no prompt: the model's latent marginal, as it learned it from rows whose text
       was fully masked);
    2. the text is decoded by :func:`generate_text` from that clean latent, filling the canvas.

    ``batch_size`` and ``length`` give an all-mask canvas; ``prompt_ids`` (mask ids where to fill)
    gives a partly known one, which the latent then also sees. ``latent_steps``, ``sampler`` and
    ``eta`` go to the latent sampler (``together``: ``eta`` only; DDIM), ``steps`` and
    ``text_kwargs`` (``block_length``, ``remasking``, ``threshold``, ``temperature``,
    ``cfg_scale``, ...) to the text sampler. ``generator``: one, or one per row (each row then
    draws its start noise and every later number from its own stream, as it would alone);
    ``init_noise`` [B, latent_dim] replaces the latent's start noise.

    Returns ``(text [B, T], latent [B, latent_dim])``, or ``(text, latent, history)`` with
    ``return_history=True``.
    """
    if order not in JOINT_ORDERS:
        raise ValueError(f"order={order!r}; choose one of {JOINT_ORDERS}")
    cfg = model.config
    device = _device(model)
    canvas = _canvas(cfg, device, None, length, prompt_ids, 1 if batch_size is None else batch_size)
    B = canvas.shape[0]
    per_row = generator is not None and not isinstance(generator, torch.Generator)
    gens = _row_generators(generator, B)
    if init_noise is None and per_row:
        init_noise = torch.stack([_normal((cfg.latent_dim,), g, device) for g in gens])
    if order == "latent_first":
        if not per_row:
            latent = generate_latent(model, diffusion, canvas, steps=latent_steps, sampler=sampler, eta=eta,
                                     generator=generator, init_noise=init_noise)
        elif sampler == "ddim" and eta == 0.0:     # deterministic after its start noise
            latent = generate_latent(model, diffusion, canvas, steps=latent_steps, init_noise=init_noise)
        else:       # noise at every step: one row at a time keeps each row's own stream
            latent = torch.cat([generate_latent(model, diffusion, canvas[r:r + 1], steps=latent_steps,
                                                sampler=sampler, eta=eta, generator=gens[r],
                                                init_noise=init_noise[r:r + 1]) for r in range(B)])
        out = generate_text(model, latent=latent, prompt_ids=canvas, steps=steps, generator=generator,
                            **text_kwargs)
    else:
        _check_latent_model(model, diffusion)
        if sampler != "ddim":
            raise ValueError(f"order='together' steps the latent by DDIM (eta=1 draws DDPM's amount of noise); "
                             f"sampler={sampler!r} is for order='latent_first'")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        z = (init_noise.to(device).float().clone() if init_noise is not None else
             _normal((B, cfg.latent_dim), generator, device))
        if z.shape != (B, cfg.latent_dim):
            raise ValueError(f"init_noise must be [B, latent_dim] = [{B}, {cfg.latent_dim}], got {tuple(z.shape)}")
        co = _CoLatent(diffusion, z, eta)
        with torch.inference_mode():
            out = _decode_text(model, latent=z, prompt_ids=canvas, steps=steps, generator=generator, co=co,
                               **text_kwargs)
        latent = co.z
    if text_kwargs.get("return_history"):
        text, history = out
        return text, latent, history
    return out, latent


# --------------------------------------------------------------------------------------------
# Autoregressive
# --------------------------------------------------------------------------------------------


@torch.inference_mode()
def generate_autoregressive(model, *, bos_id: int, length: Optional[int] = None,
                            prompt_ids: Optional[torch.Tensor] = None, batch_size: Optional[int] = None,
                            temperature: float = 1.0, top_k: Optional[int] = None,
                            top_p: Optional[float] = None, eos_id: Optional[int] = None,
                            generator: Generators = None, prefill_chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """Next-token sampling from a causal model (an autoregressive mixer): through its recurrent
    state, or, for causal attention (no state, no KV cache), by running the whole prefix again for
    every token.

    The canvas is as for :func:`generate_text` (``prompt_ids`` with ``mask_id`` where to write,
    padded with masks to ``length``), but the given tokens of each row must come before the
    positions to write: an AR model cannot fill a gap. ``bos_id`` is read before the first
    position (the document separator the corpus was joined with). Each call reads one token
    (every row at the same position), so a row's result does not depend on the others. Once a
    row has written ``eos_id`` its later positions are ``eos_id`` and nothing more is drawn
    for it. A recurrent model reads the prompt every row shares through its state in calls of
    ``prefill_chunk`` tokens (memory of one chunk, whatever the prompt's length), then one token
    per call. Returns LongTensor [B, T].
    """
    cfg = model.config
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    if not model.mixer.autoregressive:
        raise ValueError(f"generate_autoregressive needs a causal model; this one has mixer={cfg.mixer!r} "
                         "(decode it by masked diffusion with generate_text)")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    mask_id, device = cfg.mask_id, _device(model)
    x = _canvas(cfg, device, None, length, prompt_ids, batch_size)
    B, T = x.shape
    open_ = x == mask_id
    first = torch.where(open_.any(1), open_.float().argmax(1), torch.full((B,), T, device=device))
    gap = (open_ != (torch.arange(T, device=device) >= first[:, None])).any(1)   # a given token after an open one
    if bool(gap.any()):
        row = int(gap.nonzero()[0])
        raise ValueError(f"row {row} has given tokens after a position to write: an AR model writes left "
                         "to right, so it can continue a prompt but not fill a gap (use a diffusion model)")
    gens = _row_generators(generator, B)
    ended = torch.zeros(B, dtype=torch.bool, device=device)
    zeros = torch.zeros(B, device=device)
    bos = torch.full((B, 1), bos_id, dtype=torch.long, device=device)
    state, prev, start = None, bos, 0
    with _eval_mode(model):
        shared = int(first.min())               # positions every row is given
        if model.mixer.carries_state and shared > 1:
            # what the calls for positions 0 .. shared - 1 read: bos, then the prompt
            seq = torch.cat([bos, x[:, :shared - 1]], 1)
            for c in range(0, shared, prefill_chunk):
                state = model(seq[:, c:c + prefill_chunk], zeros, state=state, return_state=True, pos_offset=c).state
            start, prev = shared, x[:, shared - 1:shared]
        for i in range(start, T):
            if bool((first <= i).all()) and bool(ended.all()):
                x[:, i:] = eos_id
                break
            if model.mixer.carries_state:
                out = model(prev, zeros, state=state, return_state=True, pos_offset=i)
                state = out.state
            else:
                out = model(torch.cat([bos, x[:, :i]], 1), zeros)
            write = open_[:, i] & ~ended
            if bool(write.any()):
                logits = out.logits[:, -1].float()[write]
                noise = (None if temperature == 0.0 else
                         _per_row(_gumbel, write.long(), gens, device, logits.shape[-1]))
                x[write, i], _ = _propose(logits, mask_id, temperature, top_k, top_p, noise)
            if eos_id is not None:
                x[open_[:, i] & ended, i] = eos_id
                ended |= write & (x[:, i] == eos_id)
            prev = x[:, i:i + 1]
    return x
