"""EleutherAI's lm-evaluation-harness on any checkpoint of this project: the model ``rwkv_diffusion``.

``python -m rwkv_diffusion_rnn.lm_eval_harness --model rwkv_diffusion --model_args checkpoint=<dir>[,key=value...] --tasks ...``
(the same arguments as ``lm_eval``, whose command line this runs: importing this module registers
the model with lm-eval's registry, which ``lm_eval`` alone does not do). From Python:
``import rwkv_diffusion_rnn.lm_eval_harness`` and then ``lm_eval.simple_evaluate(model="rwkv_diffusion", ...)``.

``model_args`` (comma-separated ``key=value``):

``checkpoint``
    a checkpoint directory, a run's ``logging.save_dir`` (its newest checkpoint) or an exported
    model folder (``export format=folder``); loaded as ``generate`` loads it (EMA weights when saved).
``mc_samples`` (default 64)
    Monte-Carlo draws of a diffusion checkpoint's bound per request (below).
``batch_size`` (default 16; also lm-eval's ``--batch_size``)
    rows per forward pass: AR requests, or the draws of one diffusion request.
``max_length`` (default the run's ``data.seq_len``)
    tokens a request is scored in: a longer context is cut from the left; ``loglikelihood_rolling``
    scores windows of this many tokens.
``seed`` (default 0)
    the draws of the bound and the decoding; every request starts from it (common random numbers:
    the choices of a multiple-choice question see the same times and masks wherever their lengths allow).
``is_greedy`` (default true)
    compute ``is_greedy`` of a diffusion request (one decoding per request, below); false reports False.
``device``, ``trust_remote_code``, ``tokenizer_path``
    as for ``generate``.
every decoding option of ``generate`` (``steps``, ``block_length``, ``remasking``, ``threshold``,
``temperature``, ``top_k``, ``top_p``, ``prompt_cfg_scale``, ``use_cache``, ``eos``, ...)
    the default of ``generate_until``; a task's ``generation_kwargs`` (lm-eval ``--gen_kwargs``)
    override them per request.

What each request type computes (``rwkv_diffusion_rnn.training.likelihood``, the code ``evaluate`` scores with):

``loglikelihood(context, continuation)``
    The tokens are read after the end-of-text id (the document separator of the training corpus,
    lm-eval's prefix token), context first. An AR checkpoint: the exact ``log p(continuation |
    context)`` from its logits, and ``is_greedy`` when every continuation token is the argmax.
    A diffusion checkpoint: minus the masked-diffusion bound of the continuation given the clean
    context (LLaDA's conditional estimator, :func:`~rwkv_diffusion_rnn.diffusion.elbo.masked_nelbo`
    with the run's schedule): each draw picks a time ``t``, masks each continuation token with the
    schedule's probability, never the context, and weighs the cross-entropy of the masked tokens by
    the schedule's ELBO weight; the ``mc_samples`` draws of a request are the rows of its batches
    (their times stratified over each batch) and their mean is reported. A lower bound of the
    log-likelihood, unbiased for the bound; its Monte-Carlo standard error (the spread of the draws
    over the square root of ``mc_samples``: it falls as ``1/sqrt(mc_samples)``, and is heavier for
    one- or two-token continuations, whose rare low-``t`` draws carry large weights) is logged per
    call. ``is_greedy``: the run's sampler at temperature 0 (``low_confidence`` remasking, one
    token per step) writes exactly the continuation after the context.
``loglikelihood_rolling(text)``
    lm-eval's disjoint rolling windows of ``max_length``: the first window after the end-of-text
    id, each window given the token before it, the last given a full window of context. AR: the
    exact NLL; diffusion: the sum of each window's bound given its clean context (the windows
    ``evaluate`` scores), so perplexity tasks report an upper bound of the perplexity.
``generate_until(context, gen_kwargs)``
    ``rwkv_diffusion_rnn.generate.generate`` with ``prompt=context`` and a canvas of the prompt
    and ``max_gen_toks`` tokens (default 256), cut at the first stop sequence (``until``) and at
    the end-of-text id. Without ``do_sample=true`` decoding is greedy (``temperature=0``) unless
    the task or model_args set a temperature.

Chat templates (``--apply_chat_template``): a checkpoint trained on conversations (``data=sft``)
renders the conversation with its saved ``data.chat_template``, and ``generate_until`` answers it
as ``generate chat=true`` does (the end-of-text id first, the answer after the prompt). Other
checkpoints have no template and refuse the option.

lm-eval reads tasks from the Hub by default; a local task (``--include_path <folder of YAML>``
with ``dataset_path: json`` and ``dataset_kwargs: {data_files: ...}``) runs offline with
``HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a file: python rwkv_diffusion_rnn/lm_eval_harness.py
    from pathlib import Path
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if not p or str(Path(p).resolve()) != _here]
    sys.path.insert(0, str(Path(_here).parent))

import torch  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402

MODEL_NAME = "rwkv_diffusion"
DEFAULT_MC_SAMPLES = 64
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256
# lm-eval's generation keys that are not generate's options
_LM_EVAL_GEN_KEYS = ("until", "max_gen_toks", "do_sample")

log = logging.getLogger(__name__)


def _error(message: str):
    from rwkv_diffusion_rnn.common.errors import ConfigError
    return ConfigError(message)


@register_model(MODEL_NAME)
class RwkvDiffusionLM(LM):
    """lm-eval's ``LM`` for a checkpoint of this project (module docstring)."""

    def __init__(self, checkpoint: Optional[str] = None, mc_samples: int = DEFAULT_MC_SAMPLES,
                 batch_size=DEFAULT_BATCH_SIZE, max_batch_size: Optional[int] = None,
                 max_length: Optional[int] = None, seed: int = 0, is_greedy: bool = True,
                 device: Optional[str] = None, trust_remote_code: bool = False,
                 tokenizer_path: Optional[str] = None, **decoding):
        super().__init__()
        from rwkv_diffusion_rnn.generate import FIELDS, parse_options
        from rwkv_diffusion_rnn.training.builders import build_text_diffusion
        from rwkv_diffusion_rnn.training.trained import load_trained
        if not checkpoint:
            raise _error(f"--model {MODEL_NAME} needs --model_args checkpoint=<dir> (a checkpoint directory, "
                         "a run's logging.save_dir or an exported model folder)")
        for key in decoding:
            if key not in FIELDS or key in ("checkpoint", "out", "latent_out", "prompt", "prompt_file",
                                             "template", "template_file", "text", "text_file", "conversation",
                                             "mode", "num_samples", "length", "chat"):
                raise _error(f"model_args {key}: not an option of --model {MODEL_NAME} (see "
                             "python -m rwkv_diffusion_rnn.lm_eval_harness --help-model)")
        # generate's own parser checks the decoding options' types and names
        self._decoding = parse_options([f"{k}={v}" for k, v in decoding.items()])
        self._decoding_keys = set(decoding)
        if int(mc_samples) < 1:
            raise _error(f"model_args mc_samples={mc_samples} must be >= 1")
        self.mc_samples = int(mc_samples)
        self.batch_size = DEFAULT_BATCH_SIZE if batch_size in (None, "auto") else int(str(batch_size).split(":")[0])
        if self.batch_size < 1:
            raise _error(f"batch_size={batch_size} must be >= 1")
        self.seed, self.check_greedy = int(seed), bool(is_greedy)
        if device in (None, "") or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            if device not in (None, ""):      # lm_eval's own --device default is cuda
                print(f"lm_eval passed device={device}, but no CUDA device is visible: the model runs on the "
                      "CPU (--device cpu says so)", file=sys.stderr)
            device = None
        self.trained = load_trained(checkpoint, device=None if device is None else str(device),
                                    trust_remote_code=bool(trust_remote_code), tokenizer_path=tokenizer_path)
        cfg = self.trained.cfg
        self.tok = self.trained.tokenizer
        if self.tok is None:
            raise _error(f"{self.trained.path} is a synthetic-task run without a text tokenizer: lm-eval's "
                         "tasks are text")
        self.ar = self.trained.objective == "ar"
        if not self.ar:
            from rwkv_diffusion_rnn.diffusion.diffusion_process import undecodable_noise
            why = undecodable_noise(cfg.text_noise.noise_type)
            if why:
                raise _error(f"{self.trained.path} cannot be scored: {why}")
        mcfg = self.trained.model.config
        self.max_length = int(max_length or cfg.data.seq_len)
        if mcfg.pos_emb_len and self.max_length > mcfg.pos_emb_len:
            raise _error(f"model_args max_length={self.max_length} exceeds the {mcfg.pos_emb_len} positions "
                         "this model learned (model.pos_emb_len)")
        if self.max_length < 2:
            raise _error(f"model_args max_length={self.max_length} must be >= 2")
        self.schedule = None if self.ar else build_text_diffusion(cfg).schedule
        self.eos_id = int(self.tok.eos_id)
        self._device = self.trained.device
        self._chat_turns: Dict[str, Tuple[Optional[str], List[Tuple[str, str]]]] = {}

    # ------------------------------------------------------------------------------ helpers

    def _autocast(self):
        from rwkv_diffusion_rnn.training.builders import autocast
        return autocast(self._device, self.trained.cfg.training.dtype)

    def _encode(self, text: str) -> List[int]:
        from rwkv_diffusion_rnn.common.errors import UnknownCharacterError
        try:
            return list(self.tok.encode(text))
        except (UnknownCharacterError, ValueError) as e:
            raise _error(f"{e} (the vocabulary of {self.trained.path})") from None

    def _pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        """Context ids (after the end-of-text id) and continuation ids; the trailing spaces of the
        context go to the continuation, as lm-eval's causal models split a pair."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        if whole[:len(ctx)] != ctx:     # a tokenizer that merges across the boundary
            cont = self._encode(continuation)
        else:
            cont = whole[len(ctx):]
        return [self.eos_id] + ctx, cont

    def _fit(self, ctx: List[int], cont: List[int]) -> Tuple[List[int], List[int]]:
        """Cut the context from the left so that context + continuation fits ``max_length``
        (AR: its inputs, the last continuation token never being read)."""
        room = self.max_length + (1 if self.ar else 0)
        if len(cont) >= room:
            raise _error(f"a continuation of {len(cont)} tokens does not fit model_args max_length="
                         f"{self.max_length} with its context")
        return ctx[max(0, len(ctx) + len(cont) - room):], cont

    # ------------------------------------------------------------------------------ scoring

    @torch.no_grad()
    def _ar_scores(self, pairs: Sequence[Tuple[List[int], List[int]]]) -> List[Tuple[float, bool]]:
        """Exact ``(log p(cont | ctx), greedy)`` of each pair: causal rows right-padded (padding
        after a row is never read by its earlier positions), lengths batched together."""
        from rwkv_diffusion_rnn.diffusion.elbo import ar_nll
        out: List[Tuple[float, bool]] = [(0.0, True)] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            T = max(len(pairs[i][0]) + len(pairs[i][1]) for i in rows) - 1
            inputs = torch.full((len(rows), T), self.eos_id, dtype=torch.long)
            targets = torch.full((len(rows), T), self.eos_id, dtype=torch.long)
            valid = torch.zeros(len(rows), T, dtype=torch.bool)
            for r, i in enumerate(rows):
                ctx, cont = pairs[i]
                seq = torch.tensor(ctx + cont, dtype=torch.long)
                n = len(seq) - 1
                inputs[r, :n], targets[r, :n] = seq[:-1], seq[1:]
                valid[r, len(ctx) - 1:n] = True
            with self._autocast():
                logits = self.trained.model(inputs.to(self._device),
                                            torch.zeros(len(rows), device=self._device)).logits
            nats = ar_nll(logits, targets.to(self._device), valid=valid.to(self._device)).cpu()
            hit = (logits.argmax(-1).cpu() == targets) | ~valid
            for r, i in enumerate(rows):
                out[i] = (-float(nats[r]), bool(hit[r].all()))
        return out

    @torch.no_grad()
    def diffusion_nats(self, ctx: List[int], cont: List[int]) -> torch.Tensor:
        """The ``mc_samples`` draws [mc_samples] float64 of the bound of ``cont`` given the clean
        ``ctx``: batches of copies of the one sequence, scored by
        :func:`~rwkv_diffusion_rnn.training.likelihood.batch_nats` (the prompt is ``ctx``) with a
        generator seeded ``seed``."""
        from rwkv_diffusion_rnn.diffusion.elbo import prior_nats
        from rwkv_diffusion_rnn.training.likelihood import batch_nats
        cfg = self.trained.cfg
        seq = torch.tensor(ctx + cont, dtype=torch.long)
        gen = torch.Generator().manual_seed(self.seed)
        prior = prior_nats(self.schedule, cfg.model.vocab_size - 1)
        draws = []
        for start in range(0, self.mc_samples, self.batch_size):
            n = min(self.batch_size, self.mc_samples - start)
            batch = {"input_ids": seq.expand(n, -1).clone(), "attention_mask": torch.ones(n, len(seq), dtype=torch.long),
                     "prompt_lengths": torch.full((n,), len(ctx), dtype=torch.long)}
            nats, _, _ = batch_nats(self.trained.model, batch, objective="diffusion", schedule=self.schedule,
                                    mask_id=cfg.model.mask_id, generator=gen, mc_samples=1,
                                    device=self._device, autocast=self._autocast, prior=prior)
            draws.append(nats[0].cpu())
        return torch.cat(draws)

    @torch.no_grad()
    def _diffusion_greedy(self, ctx: List[int], cont: List[int]) -> bool:
        from rwkv_diffusion_rnn.diffusion.sampling import generate_text
        mask_id = self.trained.cfg.model.mask_id
        canvas = torch.tensor([ctx + [mask_id] * len(cont)], dtype=torch.long, device=self._device)
        out = generate_text(self.trained.model, prompt_ids=canvas, steps=len(cont), remasking="low_confidence",
                            temperature=0.0, generator=[torch.Generator().manual_seed(self.seed)])
        return out[0, len(ctx):].tolist() == list(cont)

    def _diffusion_scores(self, pairs, greedy: bool = True) -> List[Tuple[float, bool]]:
        out, errs = [], []
        for ctx, cont in pairs:
            draws = self.diffusion_nats(ctx, cont)
            if len(draws) > 1:
                errs.append(float(draws.std()) / math.sqrt(len(draws)))
            is_greedy = greedy and self.check_greedy and self._diffusion_greedy(ctx, cont)
            out.append((-float(draws.mean()), bool(is_greedy)))
        if errs:
            log.info("rwkv_diffusion: %d requests, mean Monte-Carlo standard error of the bound %.4f nats "
                     "(mc_samples=%d)", len(pairs), sum(errs) / len(errs), self.mc_samples)
        return out

    def _scores(self, pairs, greedy: bool = True) -> List[Tuple[float, bool]]:
        """``(log-likelihood, is_greedy)`` of each pair; ``greedy=False`` skips the diffusion
        greedy decoding (what a rolling log-likelihood, which reports no is_greedy, would waste)."""
        pairs = [self._fit(ctx, cont) for ctx, cont in pairs]
        return self._ar_scores(pairs) if self.ar else self._diffusion_scores(pairs, greedy)

    # ------------------------------------------------------------------------------ lm-eval's API

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        pairs = []
        for req in requests:
            context, continuation = req.args
            if context == "":
                pairs.append(([self.eos_id], self._encode(continuation)))
            else:
                pairs.append(self._pair(context, continuation))
        results = self._scores(pairs)
        for req, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return results

    def rolling_windows(self, text: str) -> List[Tuple[List[int], List[int]]]:
        """lm-eval's disjoint rolling windows of ``text`` (module docstring): (context, scored tokens)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        # the AR inputs of a window are context + scored[:-1]; a diffusion canvas is context + scored
        size = self.max_length if self.ar else self.max_length - 1
        return [make_disjoint_window(w) for w in get_rolling_token_windows(
            token_list=self._encode(text), prefix_token=self.eos_id, max_seq_len=size, context_len=1)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        results = []
        for req in requests:
            (text,) = req.args[:1]
            windows = self.rolling_windows(text)
            total = sum(ll for ll, _ in self._scores(windows, greedy=False)) if windows else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            results.append(total)
        return results

    def _generate_config(self, gen_kwargs: dict):
        """generate's options for one request: model_args' decoding, then the request's."""
        import dataclasses
        from rwkv_diffusion_rnn.generate import parse_options
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_gen = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        sample = bool(kwargs.pop("do_sample", False))
        own = parse_options([f"{k}={v}" for k, v in kwargs.items()])
        g = self._decoding
        for key in kwargs:
            g = dataclasses.replace(g, **{key: getattr(own, key)})
        if not sample and "temperature" not in kwargs and "temperature" not in self._decoding_keys:
            g = dataclasses.replace(g, temperature=0.0)
        return dataclasses.replace(g, print_texts=False, progress_bar=False, num_samples=1, out=None,
                                   seed=g.seed if "seed" in kwargs else self.seed), until, max_gen

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        import dataclasses
        from rwkv_diffusion_rnn.generate import generate
        mcfg = self.trained.model.config
        limit = mcfg.pos_emb_len or None
        results = []
        for req in requests:
            context, gen_kwargs = req.args
            g, until, max_gen = self._generate_config(gen_kwargs)
            chat = self._chat_turns.get(context)
            if chat is not None:
                system, turns = chat
                g = dataclasses.replace(g, system=system, length=max_gen)
                text = generate(config=g, trained=self.trained, turns=turns)[0]["text"]
            else:
                ids = self._encode(context)
                if limit and len(ids) + max_gen > limit:      # keep the end of a long prompt
                    ids = ids[max(0, len(ids) + max_gen - limit):]
                    context = self.tok.decode(ids)
                    ids = self._encode(context)
                if not ids:
                    raise _error("generate_until got an empty context; generate continues a prompt")
                rec = generate(config=dataclasses.replace(g, prompt=context, length=len(ids) + max_gen),
                               trained=self.trained)[0]
                text = self.tok.decode(rec["token_ids"][len(ids):])
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            self.cache_hook.add_partial("generate_until", req.args, text)
            results.append(text)
        return results

    # ------------------------------------------------------------------------------ chat

    def _template(self):
        from rwkv_diffusion_rnn.generate import chat_template_of
        return chat_template_of(self.trained.cfg)

    @property
    def tokenizer_name(self) -> str:
        return str(self.trained.path)

    def chat_template(self, chat_template=False) -> str:
        template = self._template()
        return f"{template.system}|{template.user}|{template.assistant}"

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        """The conversation as the run's saved chat template renders it (``data=sft`` checkpoints);
        ``generate_until`` answers it as ``generate chat=true`` does."""
        template = self._template()
        system = None
        turns: List[Tuple[str, str]] = []
        for message in chat_history:
            role, content = message["role"], message["content"]
            if role == "system":
                system = content if system is None else f"{system}\n{content}"
            elif role in ("user", "assistant"):
                turns.append((role, content))
            else:
                raise _error(f"chat message role {role!r}: the chat template has system, user and assistant")
        if add_generation_prompt:
            rendered = template.prompt(system, turns)
            if turns and turns[-1][0] == "user":
                self._chat_turns[rendered] = (system, turns)
            return rendered
        # a prefilled assistant answer: the prompt up to it, then its text
        head = template.prompt(system, turns[:-1]) if turns and turns[-1][0] == "assistant" else template.prompt(system, turns)
        return head + (turns[-1][1] if turns and turns[-1][0] == "assistant" else "")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """lm-eval's command line with ``--model rwkv_diffusion`` registered."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    if len(sys.argv) > 1 and sys.argv[1] == "--help-model":
        print(__doc__)
        return
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()


if __name__ == "__main__":
    main()
