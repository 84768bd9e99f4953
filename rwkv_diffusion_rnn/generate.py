"""Generate from a trained model: ``python -m rwkv_diffusion_rnn.generate checkpoint=<dir> [key=value ...]``.

``checkpoint`` is a checkpoint directory or a run's ``logging.save_dir`` (its newest checkpoint);
the run's ``config.yaml`` and ``tokenizer.json`` rebuild the model (EMA weights when saved).
Options are ``key=value`` like the trainer's overrides, but a string is taken as typed, so a
prompt needs no quoting beyond the shell's. The texts go to stdout; ``out=<file>.jsonl`` also
writes one JSON object per sample (index, seed, prompt or template, text, token_ids, settings).

What to write (``mode=text``, the default)
    unconditional           ``num_samples=8 length=64``
    continue a prompt       ``prompt="ROMEO:"`` (or ``prompt_file=<file>``, one prompt per line);
                            ``length`` counts the prompt's tokens too; ``num_samples`` per prompt
    infill a template       ``template="To be, or <mask:6> to be"`` (or ``template_file=``):
                            ``<mask>`` is one token to fill, ``<mask:N>`` is N; the given text is
                            kept as it is. ``length`` longer than the template adds masks after it
    from a latent           (a text + latent model) ``latent=<file>.npy`` ([latent_dim] or
                            [N, latent_dim], one sample per row) or ``latent_text="a sentence"``,
                            encoded with the projection that made the training latents
                            (``projection=<dir>``; default the folder of the run's data.json_path)
    answer a prompt         (a checkpoint trained on conversations, ``data=sft``) ``chat=true
                            prompt="reverse: abc"`` (optionally ``system="..."``), or
                            ``conversation=<file>`` (JSON / JSONL conversations: each gets the
                            answer to its last turn; a final assistant turn is the reference,
                            kept in the record and replaced by the model's answer). The prompt is
                            rendered with the run's saved chat template; ``length`` counts the
                            answer's tokens (default: what ``data.seq_len`` leaves after the
                            prompt); the answer ends at the first end-of-text token and only it
                            is printed
``mode=latent``: a latent from a text (``text="..."`` or ``text_file=``; or a ``template``, whose
masks the latent sampler sees as unknown), written to ``latent_out=<file>.npy`` [N, latent_dim].
``mode=joint``: text and latent together, ``latent_out=`` gets the latents. ``joint_order=together``
(the default) co-denoises them: every step reads the partly masked text and the noisy latent in
one model call, commits text and moves the latent one DDIM interval (the latent's grid is the
text's ``steps``; ``latent_steps`` is not used). ``joint_order=latent_first`` samples the latent
first (``latent_steps``, ``latent_sampler``) and writes the text from it.

Decoding (masked diffusion, ``rwkv_diffusion_rnn.diffusion.sampling``)
    ``steps`` (default: the canvas length, at most one token per step), ``block_length``
    (semi-autoregressive blocks), ``remasking`` (random: the denoiser's own ancestral order, the
    default; low_confidence; random_topk), ``threshold``, ``temperature`` (1; 0 is argmax),
    ``top_k``, ``top_p``, ``cfg_scale`` (guidance towards the latent), ``prompt_cfg_scale``
    (guidance towards the prompt, LLaDA's: the unconditional pass sees the prompt masked), ``use_cache`` (the
    block_causal state cache), ``latent_steps`` / ``latent_sampler`` / ``eta`` (the latent).
An AR checkpoint (``training.objective=ar``) writes token by token through its recurrent
state (``temperature``, ``top_k``, ``top_p``); it continues prompts but does not infill.
An embedding-diffusion checkpoint (``training.objective=embedding``) writes unconditionally
only: DDIM over the token embeddings (``steps``, default the canvas length; ``eta``) from the
sample's own start noise, the last prediction rounded to the nearest token embedding.

Sample ``k`` (0, 1, ... in output order) draws from its own generator seeded ``seed + k``, so
its text does not depend on ``batch_size`` or on the other samples of its batch. With ``eos``
(default true) a sample ends at the first end-of-text token the model writes after its prompt
(in a template's gaps such a token adds nothing). Nothing is written when an option or an
input is wrong: the error names it and the command exits with status 2.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a file: python rwkv_diffusion_rnn/generate.py
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if not p or str(Path(p).resolve()) != _here]
    sys.path.insert(0, str(Path(_here).parent))

from rwkv_diffusion_rnn.common.checks import Num  # noqa: E402  (after the path fix above)
from rwkv_diffusion_rnn.common.files import check_output  # noqa: E402

MODES = ("text", "latent", "joint")
MASK_MARKER = re.compile(r"<mask(?::(\d+))?>")


@dataclass
class GenerateConfig:
    checkpoint: Optional[str] = None
    mode: str = "text"                    # MODES
    num_samples: int = 1                  # per prompt / template / latent; unconditional: in all
    length: Optional[int] = None          # canvas tokens, prompt included (default: data.seq_len)
    prompt: Optional[str] = None
    prompt_file: Optional[str] = None
    chat: bool = False                    # prompt= is a user turn of a conversation (data=sft runs)
    system: Optional[str] = None          # chat: the system text
    conversation: Optional[str] = None    # chat: a JSON / JSONL file of conversations to answer
    template: Optional[str] = None
    template_file: Optional[str] = None
    text: Optional[str] = None            # mode=latent: the text to encode
    text_file: Optional[str] = None
    latent: Optional[str] = None          # .npy of [latent_dim] or [N, latent_dim]
    latent_text: Optional[str] = None     # a sentence, encoded with the saved projection
    projection: Optional[str] = None      # folder of projection.npz (default: data.json_path's folder)
    steps: Optional[int] = None
    block_length: Optional[int] = None
    remasking: str = "random"             # sampling.REMASKING
    threshold: Optional[float] = None
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    cfg_scale: float = 0.0
    prompt_cfg_scale: float = 0.0
    use_cache: bool = True
    latent_steps: int = 50
    latent_sampler: str = "ddim"          # sampling.LATENT_SAMPLERS
    joint_order: str = "together"         # mode=joint: sampling.JOINT_ORDERS
    eta: float = 0.0
    eos: bool = True
    seed: int = 0
    batch_size: int = 16
    out: Optional[str] = None             # <file>.jsonl
    latent_out: Optional[str] = None      # <file>.npy
    device: Optional[str] = None          # default: the run's training.device
    trust_remote_code: bool = False       # run the tokenizer's own code (the user's say, never the checkpoint's)
    overwrite: bool = False               # out= / latent_out= may replace an existing file
    tokenizer_path: Optional[str] = None  # a tokenizer outside the checkpoint that you allow it to read
    print_texts: bool = True
    progress_bar: bool = True


FIELDS = {f.name: f for f in dataclasses.fields(GenerateConfig)}


def _error(message: str):
    from rwkv_diffusion_rnn.common.errors import ConfigError
    return ConfigError(message)


# ---------------------------------------------------------------------------------------------- options


def parse_options(argv: Sequence[str]) -> GenerateConfig:
    """``key=value`` items into a :class:`GenerateConfig` (strings as typed; numbers, booleans
    and ``null`` parsed)."""
    from rwkv_diffusion_rnn.common.errors import ConfigError
    from rwkv_diffusion_rnn.training.llada_names import translate_generate
    try:
        argv = translate_generate(argv)
    except ConfigError as e:
        raise _error(str(e)) from None
    values: Dict[str, Any] = {}
    for item in argv:
        key, sep, raw = item.partition("=")
        if not sep:
            raise _error(f"{item!r} is not key=value (e.g. prompt=\"ROMEO:\" or steps=32)")
        if key not in FIELDS:
            import difflib
            close = difflib.get_close_matches(key, list(FIELDS), n=3)
            raise _error(f"{key}: no such option of generate" + (f" (did you mean {', '.join(close)}?)" if close else
                                                                  f"; the options are {', '.join(FIELDS)}"))
        values[key] = _parse_value(key, raw)
    return GenerateConfig(**values)


def _parse_value(key: str, raw: str):
    kind = str(FIELDS[key].type)
    if raw.lower() in ("null", "none") and "Optional" in kind:
        return None
    if "str" in kind:
        return raw
    try:
        if "bool" in kind:
            if raw.lower() not in ("true", "false"):
                raise ValueError
            return raw.lower() == "true"
        if "int" in kind:
            return int(raw)
        return float(raw)
    except ValueError:
        want = "true or false" if "bool" in kind else ("an integer" if "int" in kind else "a number")
        raise _error(f"{key}={raw!r}: expected {want}") from None


# The largest canvas generate writes: beyond it one call would need tens of GB (every layer keeps
# [batch, length, width] activations) before the first token appears.
MAX_LENGTH = 1 << 20
# generate's numbers, with their ranges
OPTIONS = {
    "num_samples": Num(lo=1, integer=True), "length": Num(lo=1, hi=MAX_LENGTH, integer=True, optional=True),
    "steps": Num(lo=1, integer=True, optional=True), "block_length": Num(lo=1, integer=True, optional=True),
    "batch_size": Num(lo=1, integer=True), "latent_steps": Num(lo=1, integer=True),
    "top_k": Num(lo=1, integer=True, optional=True), "temperature": Num(lo=0),
    "top_p": Num(0, 1, lo_open=True, optional=True), "threshold": Num(0, 1, optional=True),
    "cfg_scale": Num(), "prompt_cfg_scale": Num(), "eta": Num(0, 1), "seed": Num(integer=True),
}


def check_options(g: GenerateConfig) -> None:
    """What can be refused before the model is loaded."""
    from rwkv_diffusion_rnn.diffusion.sampling import JOINT_ORDERS, LATENT_SAMPLERS, REMASKING
    if not g.checkpoint:
        raise _error("checkpoint=<dir> is required (a checkpoint directory or a run's logging.save_dir)")
    for key, choices in (("mode", MODES), ("remasking", REMASKING), ("latent_sampler", LATENT_SAMPLERS),
                         ("joint_order", JOINT_ORDERS)):
        if getattr(g, key) not in choices:
            raise _error(f"{key}={getattr(g, key)!r}; choose one of {', '.join(choices)}")
    given = [k for k in ("prompt", "prompt_file", "template", "template_file", "text", "text_file")
             if getattr(g, k) is not None]
    if len(given) > 1:
        raise _error(f"give one of prompt, prompt_file, template, template_file, text, text_file (got {', '.join(given)})")
    if g.latent is not None and g.latent_text is not None:
        raise _error("give latent=<file>.npy or latent_text=\"...\", not both")
    if g.conversation is not None:
        g.chat = True
    if g.chat:
        if g.mode != "text" or [k for k in given if k != "prompt"]:
            raise _error("chat=true answers a prompt= or a conversation= file (mode=text); "
                         f"{', '.join(k for k in given if k != 'prompt') or 'mode=' + g.mode} does not go with it")
        if (g.prompt is None) == (g.conversation is None):
            raise _error("chat=true needs exactly one of prompt=\"...\" (a user turn) and conversation=<file>")
    elif g.system is not None:
        raise _error("system= is the system text of chat=true")
    if g.mode == "latent":
        if not given or given[0] in ("prompt", "prompt_file"):
            raise _error("mode=latent encodes a text: give text=\"...\", text_file=<file> or a template")
        if g.latent is not None or g.latent_text is not None:
            raise _error("mode=latent writes a latent; latent= / latent_text= are inputs of mode=text")
    elif given and given[0] in ("text", "text_file"):
        raise _error(f"{given[0]}= is the input of mode=latent; to continue a text use prompt=, to fill one template=")
    if g.mode == "joint" and (g.latent is not None or g.latent_text is not None):
        raise _error("mode=joint samples the latent itself; to write from a given latent use mode=text latent=...")
    if g.mode == "joint" and g.joint_order == "together" and g.latent_sampler != "ddim":
        raise _error(f"latent_sampler={g.latent_sampler} is for joint_order=latent_first; joint_order=together "
                     "steps the latent by DDIM inside the text's steps (eta=1 draws DDPM's amount of noise)")
    for key, spec in OPTIONS.items():
        value = getattr(g, key)
        if not spec.ok(value):
            raise _error(f"{key}={value!r} must be {spec.describe()}")
    if g.out is not None and not g.out.endswith(".jsonl"):
        raise _error(f"out={g.out}: write samples to a .jsonl file")
    if g.latent_out is not None:
        if not g.latent_out.endswith(".npy"):
            raise _error(f"latent_out={g.latent_out}: write latents to a .npy file")
        if g.mode == "text":
            raise _error("latent_out= is written by mode=latent and mode=joint; mode=text writes no latent")
    inputs = [getattr(g, k) for k in ("prompt_file", "template_file", "text_file", "conversation", "latent",
                                      "projection") if getattr(g, k) is not None]
    for key in ("out", "latent_out"):
        check_output(key, getattr(g, key), inputs, g.overwrite)
    if g.cfg_scale != 0.0 and g.mode == "text" and g.latent is None and g.latent_text is None:
        raise _error("cfg_scale guides towards a latent: give latent=<file>.npy or latent_text=\"...\" "
                     "(or use mode=joint); prompt_cfg_scale guides towards the prompt (LLaDA's guidance)")


# ---------------------------------------------------------------------------------------------- inputs


@dataclass
class Canvas:
    """One sample to write: its token canvas (mask ids where to write) and where it came from."""
    ids: List[int]
    given: List[bool]
    source: Dict[str, str] = field(default_factory=dict)   # {"prompt": ...} / {"template": ...} / {"text": ...}
    latent: Optional[Any] = None                            # np.ndarray [latent_dim] to write from
    answer_from: Optional[int] = None                       # chat: where the answer starts

    @property
    def continues(self) -> bool:
        """Everything given comes first (a prompt, or nothing): an end of text may end it."""
        n = sum(self.given)
        return all(self.given[:n])


def _lines(path: str, key: str) -> List[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise _error(f"{key}={path}: cannot be read ({e.strerror or e})") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise _error(f"{key}={path} holds no line to use (one per line; blank lines are skipped)")
    return lines


def _encode(tokenizer, text: str, where: str) -> List[int]:
    try:
        return list(tokenizer.encode(text))
    except ValueError as e:   # e.g. a character a chars vocabulary lacks
        raise _error(f"{where}: {e}") from None


def parse_template(tokenizer, template: str, mask_id: int, where: str = "template"):
    """Token ids and given flags of a template: ``<mask>`` is one position to fill, ``<mask:N>`` N."""
    ids: List[int] = []
    given: List[bool] = []
    pos, found = 0, False
    starts = {m.start() for m in MASK_MARKER.finditer(template)}
    bad = next((i for i in range(len(template)) if template.startswith("<mask", i) and i not in starts), None)
    if bad is not None:
        raise _error(f"{where}: {template[bad:bad + 16]!r}... at character {bad} is not a mask marker: write "
                     "<mask> (one token) or <mask:N> (N tokens, N a whole number)")
    for m in MASK_MARKER.finditer(template):
        piece = _encode(tokenizer, template[pos:m.start()], where) if m.start() > pos else []
        n = int(m.group(1)) if m.group(1) is not None else 1
        if n < 1:
            raise _error(f"{where}: {m.group(0)} asks for {n} tokens; use <mask:N> with N >= 1")
        if len(ids) + len(piece) + n > MAX_LENGTH:
            raise _error(f"{where}: {m.group(0)} makes the canvas longer than {MAX_LENGTH} tokens, the most "
                         "generate writes; ask for fewer")
        ids += piece + [mask_id] * n
        given += [True] * len(piece) + [False] * n
        pos, found = m.end(), True
    if not found:
        raise _error(f"{where} has no mask marker: mark what to fill with <mask> (one token) or <mask:N> "
                     f"(N tokens), e.g. \"To be, or <mask:6> to be\"; to continue a text use prompt=")
    tail = _encode(tokenizer, template[pos:], where) if pos < len(template) else []
    return ids + tail, given + [True] * len(tail)


def build_canvases(g: GenerateConfig, tokenizer, mask_id: int, length: int, ar: bool) -> List[Canvas]:
    """The samples ``g`` asks for, in output order (before any latent is attached)."""
    def prompt_canvas(text: str, where: str) -> Canvas:
        if MASK_MARKER.search(text):
            raise _error(f"{where} holds a mask marker: pass it as template= (template_file=) to fill it")
        ids = _encode(tokenizer, text, where)
        if len(ids) >= length:
            how = "longer than" if len(ids) > length else "as long as"
            raise _error(f"{where} is {len(ids)} tokens, {how} length={length}, which leaves nothing to write "
                         f"(length counts the prompt too): set length > {len(ids)}")
        return Canvas(ids + [mask_id] * (length - len(ids)), [True] * len(ids) + [False] * (length - len(ids)),
                      {"prompt": text})

    def template_canvas(text: str, where: str) -> Canvas:
        if ar:
            raise _error(f"{where}: this checkpoint is an AR model (training.objective=ar), which writes left to "
                         "right and cannot fill gaps; it can continue a prompt (prompt=...) or write "
                         "unconditionally; infill with a diffusion checkpoint")
        ids, given = parse_template(tokenizer, text, mask_id, where)
        if g.length is not None:
            if g.length < len(ids):
                raise _error(f"{where} is {len(ids)} tokens, longer than length={g.length}: raise length or "
                             "leave it unset (the template's own length)")
            ids, given = ids + [mask_id] * (g.length - len(ids)), given + [False] * (g.length - len(ids))
        return Canvas(ids, given, {"template": text})

    def text_canvas(text: str, where: str) -> Canvas:
        ids = _encode(tokenizer, text, where)
        if not ids:
            raise _error(f"{where} is empty: there is nothing to encode")
        return Canvas(ids, [True] * len(ids), {"text": text})

    sources = []
    for key, make in (("prompt", prompt_canvas), ("template", template_canvas), ("text", text_canvas)):
        if getattr(g, key) is not None:
            sources = [make(getattr(g, key), key)]
        elif getattr(g, f"{key}_file") is not None:
            path = getattr(g, f"{key}_file")
            sources = [make(line, f"{key}_file={path}:{i + 1}") for i, line in enumerate(_lines(path, f"{key}_file"))]
    if not sources:
        sources = [Canvas([mask_id] * length, [False] * length)]
    return [Canvas(list(c.ids), list(c.given), dict(c.source)) for c in sources for _ in range(g.num_samples)]


def chat_template_of(cfg):
    """The ``ChatTemplate`` a checkpoint's run (``cfg``, its saved config) rendered conversations with."""
    from rwkv_diffusion_rnn.data import sft
    if "chat_template" not in cfg.data:
        raise _error(f"chat=true renders the prompt with the chat template of a run trained on conversations "
                     f"(data=sft); this checkpoint's run used data.kind={cfg.data.kind}")
    return sft.ChatTemplate(**dict(cfg.data.chat_template))


def chat_prompt_ids(tokenizer, template, system: Optional[str], turns, where: str) -> List[int]:
    """What an answer is decoded after: BOS (the end-of-text id) + ``turns`` rendered with ``template``."""
    return [int(tokenizer.eos_id)] + _encode(tokenizer, template.prompt(system, turns), where)


def chat_canvases(g: GenerateConfig, tokenizer, mask_id: int, cfg, turns=None) -> List[Canvas]:
    """``chat=true``: BOS + the prompt rendered with the run's chat template, then the answer's
    masks; one canvas per conversation (and sample). ``turns``: a conversation so far, (role,
    text) pairs ending with a user turn, in place of ``prompt=``."""
    from rwkv_diffusion_rnn.data import sft
    template = chat_template_of(cfg)
    if turns is not None:
        items = [(g.system, list(turns), None, {"prompt": turns[-1][1]}, "prompt")]
    elif g.prompt is not None:
        items = [(g.system, [("user", g.prompt)], None, {"prompt": g.prompt}, "prompt")]
    else:
        items = []
        try:
            conversations = sft.read_conversations_to_answer(g.conversation)
        except (OSError, ValueError) as e:
            raise _error(f"conversation={g.conversation}: {e}") from None
        for c, reference in conversations:
            items.append((c.system, c.turns, reference, {"conversation": c.where}, c.where))
    canvases = []
    for system, turns, reference, source, where in items:
        ids = chat_prompt_ids(tokenizer, template, system, turns, where)
        n = g.length if g.length is not None else int(cfg.data.seq_len) - len(ids)
        if n < 1:
            raise _error(f"{where}: the rendered prompt is {len(ids)} tokens, which leaves no room for an answer in "
                         f"data.seq_len={cfg.data.seq_len}; give length=<answer tokens>")
        if reference is not None:
            source = dict(source, reference=reference)
        canvases += [Canvas(ids + [mask_id] * n, [True] * len(ids) + [False] * n, dict(source), answer_from=len(ids))
                     for _ in range(g.num_samples)]
    return canvases


def load_latents(g: GenerateConfig, cfg, latent_dim: int):
    """[N, latent_dim] float32 from ``latent=`` or ``latent_text=``, or None."""
    import numpy as np
    if g.latent is not None:
        try:
            z = np.load(g.latent, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise _error(f"latent={g.latent}: cannot be read as a .npy array ({e})") from None
        z = np.asarray(z, dtype=np.float32)
        if z.ndim == 1:
            z = z[None]
        if z.ndim != 2 or z.shape[1] != latent_dim:
            raise _error(f"latent={g.latent} has shape {tuple(np.shape(z))}; this model reads latents of "
                         f"{latent_dim} dims (model.latent_dim; model.latent_input_dim with a projector): give [{latent_dim}] or [N, {latent_dim}]")
        if not np.isfinite(z).all():
            raise _error(f"latent={g.latent} holds NaN or infinite values")
        return z
    if g.latent_text is not None:
        from rwkv_diffusion_rnn.data.latents import encode_texts, projection_source_model
        from rwkv_diffusion_rnn.common.errors import LatentPrepError
        proj = g.projection
        json_path = cfg.data.get("json_path") if "json_path" in cfg.data else None
        if proj is None:
            if not json_path:
                raise _error("latent_text needs the projection that made the training latents: "
                             "set projection=<folder of projection.npz>")
            proj = str(Path(json_path).parent)
        # a projection given beside the run's own must come from the same embedding model
        own = projection_source_model(Path(json_path).parent) if json_path and g.projection else None
        try:
            z = encode_texts([g.latent_text], proj, expect_model=own)
        except (LatentPrepError, OSError, ValueError) as e:
            raise _error(f"latent_text: cannot encode with projection={proj}: {e}") from None
        if z.shape[1] != latent_dim:
            raise _error(f"projection={proj} makes {z.shape[1]}-dim latents; this model reads {latent_dim} "
                         "(model.latent_dim; model.latent_input_dim with a projector): use the projection of the run's data")
        return z.astype(np.float32)
    return None


def attach_latents(canvases: List[Canvas], z, num_samples: int) -> List[Canvas]:
    """Pair samples with latent rows: one latent for all, one per sample, or N latents each
    written ``num_samples`` times when there is no prompt or template."""
    if z is None:
        return canvases
    n = z.shape[0]
    if n == 1:
        for c in canvases:
            c.latent = z[0]
        return canvases
    if all(not c.source for c in canvases):         # unconditional: one sample per latent row (x num_samples)
        out = []
        for row in z:
            for _ in range(num_samples):
                out.append(Canvas(list(canvases[0].ids), list(canvases[0].given), {}, row))
        return out
    sources = len(canvases) // num_samples
    if n != sources:
        raise _error(f"latent holds {n} rows for {sources} prompts/templates: give one latent, or one per line")
    for i, c in enumerate(canvases):
        c.latent = z[i // num_samples]
    return canvases


# ---------------------------------------------------------------------------------------------- decoding


def _groups(canvases: List[Canvas], batch_size: int):
    """Batches of consecutive samples of the same canvas length (a bidirectional model reads
    every position, so rows are never padded)."""
    batch: List[int] = []
    for i, c in enumerate(canvases):
        if batch and (len(batch) == batch_size or len(canvases[batch[0]].ids) != len(c.ids)):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _finish(c: Canvas, ids: List[int], eos_id: Optional[int], use_eos: bool, tokenizer):
    """(text, token ids kept, ended by an end of text): a continuation ends at the first end of
    text the model wrote; in a template the tokens are kept as written. A chat answer is the text
    after its prompt."""
    ended = False
    if use_eos and eos_id is not None and c.continues:
        for i, (tok, given) in enumerate(zip(ids, c.given)):
            if not given and tok == eos_id:
                ids, ended = ids[:i], True
                break
    if c.answer_from is not None:
        ids = ids[c.answer_from:]
    return tokenizer.decode(ids), ids, ended


def generate(checkpoint=None, config: Optional[GenerateConfig] = None, trained=None, turns=None,
             **options) -> List[dict]:
    """Generate as the command line does; returns one dict per sample (what ``out=`` writes).

    ``generate("runs/shakespeare", prompt="ROMEO:", length=64, num_samples=4, steps=32)``.
    ``trained``: the checkpoint already loaded (:func:`~rwkv_diffusion_rnn.training.trained.load_trained`);
    ``turns``: with ``chat=True``, a conversation so far to answer ((role, text) pairs) instead of ``prompt``.
    """
    import numpy as np
    import torch
    from rwkv_diffusion_rnn.diffusion import sampling
    from rwkv_diffusion_rnn.diffusion.diffusion_process import undecodable_noise
    from rwkv_diffusion_rnn.training.builders import build_latent_diffusion
    from rwkv_diffusion_rnn.training.events import PlainProgress, output_is_terminal
    from rwkv_diffusion_rnn.training.trained import load_trained

    g = dataclasses.replace(config or GenerateConfig(), **options)
    if checkpoint is not None:
        g.checkpoint = str(checkpoint)
    if turns is not None:
        g = dataclasses.replace(g, chat=True, prompt=turns[-1][1])
    if trained is not None and g.checkpoint is None:
        g.checkpoint = str(trained.path)
    check_options(g)
    trained = trained or load_trained(g.checkpoint, device=g.device, trust_remote_code=g.trust_remote_code,
                                      tokenizer_path=g.tokenizer_path)
    model, cfg, tok = trained.model, trained.cfg, trained.tokenizer
    mcfg = model.config
    ar = trained.objective == "ar"
    embedding = trained.objective == "embedding"
    has_latent = bool(mcfg.latent_prefix_len)
    if embedding and (g.mode != "text" or g.chat or any(getattr(g, k) is not None for k in (
            "prompt", "prompt_file", "template", "template_file", "latent", "latent_text", "conversation"))):
        raise _error(f"{trained.path} is an embedding-diffusion model (training.objective=embedding): it writes "
                     "text unconditionally (mode=text, num_samples=, length=, steps=, eta=); prompts, templates "
                     "and latents are read by masked-diffusion checkpoints")
    why = None if ar or embedding else undecodable_noise(cfg.text_noise.get("noise_type", "mask"))
    if why:
        raise _error(f"{trained.path} cannot be decoded: {why}")
    if tok is None:          # a synthetic-task run: its character vocabulary
        from rwkv_diffusion_rnn.data.tasks import VOCAB as tok
    if ar and (g.mode != "text" or g.latent is not None or g.latent_text is not None):
        raise _error(f"{trained.path} is an AR model (training.objective=ar) without a latent: it writes text "
                     "unconditionally or after a prompt (mode=text), token by token")
    if not has_latent and (g.mode != "text" or g.latent is not None or g.latent_text is not None):
        raise _error(f"{trained.path} is a text-only model (model.latent_prefix_len=0): mode=latent, mode=joint, "
                     "latent= and latent_text= need a text + latent model")
    if g.block_length is not None and ar:
        raise _error("block_length is a diffusion decoding option; an AR model writes one token at a time")
    if g.prompt_cfg_scale != 0.0 and ar:
        raise _error("prompt_cfg_scale guides masked-diffusion decoding; an AR model writes from its prompt "
                     "token by token")
    length = g.length or int(cfg.data.seq_len)
    if mcfg.pos_emb_len and length > mcfg.pos_emb_len:
        raise _error(f"length={length} exceeds the {mcfg.pos_emb_len} positions this model learned "
                     f"(model.pos_emb_len): give length <= {mcfg.pos_emb_len}")
    eos_id = getattr(tok, "eos_id", None)
    if g.chat and ar:
        raise _error("chat=true decodes an answer with masked diffusion; this checkpoint is an AR model")
    canvases = (chat_canvases(g, tok, mcfg.mask_id, cfg, turns) if g.chat
                else build_canvases(g, tok, mcfg.mask_id, length, ar))
    from rwkv_diffusion_rnn.models.rwkv_denoiser import data_latent_dim
    # latent= / latent_text= are in the data's space (a latent_projector model projects them below)
    canvases = attach_latents(canvases, load_latents(g, cfg, data_latent_dim(cfg.model)) if has_latent else None,
                              g.num_samples)
    diffusion = build_latent_diffusion(cfg) if g.mode != "text" else None
    device = trained.device

    settings = {"checkpoint": str(trained.path), "step": trained.step, "weights": trained.weights,
                "mode": g.mode,
                "decoding": "autoregressive" if ar else "embedding_diffusion" if embedding else "masked_diffusion",
                "temperature": g.temperature, "top_k": g.top_k, "top_p": g.top_p, "eos": g.eos}
    if embedding:
        settings.update(steps=g.steps, eta=g.eta)
    elif not ar:
        settings.update(steps=g.steps, block_length=g.block_length, remasking=g.remasking,
                        threshold=g.threshold, cfg_scale=g.cfg_scale, prompt_cfg_scale=g.prompt_cfg_scale,
                        mixer=mcfg.mixer,
                        # co-denoising changes the latent every step: no state is carried
                        use_cache=(g.use_cache and sampling.cache_unit(model) is not None
                                   and not (g.mode == "joint" and g.joint_order == "together")))
    if g.mode != "text":
        settings.update(latent_steps=g.latent_steps, latent_sampler=g.latent_sampler, eta=g.eta)
    if g.mode == "joint":
        settings["joint_order"] = g.joint_order

    def latent_for(canvas_ids, gens):
        init = torch.stack([torch.randn(mcfg.latent_dim, generator=gen) for gen in gens]).to(device)
        if g.latent_sampler == "ddim" and g.eta == 0.0:    # deterministic after its start noise
            return sampling.generate_latent(model, diffusion, canvas_ids, steps=g.latent_steps, init_noise=init)
        # stochastic samplers draw noise at every step: one row at a time keeps each row's own stream
        return torch.cat([sampling.generate_latent(model, diffusion, canvas_ids[r:r + 1], steps=g.latent_steps,
                                                   sampler=g.latent_sampler, eta=g.eta, generator=gens[r],
                                                   init_noise=init[r:r + 1]) for r in range(len(gens))])

    records: List[dict] = []
    latents_out: List[Any] = []
    groups = list(_groups(canvases, g.batch_size))
    bar = None
    # a file or a CI log: a plain line per batch of samples, bar or not (a chat turn, one answer
    # printed as soon as it is written, needs none)
    if not output_is_terminal() and turns is None:
        bar = PlainProgress("generate", len(canvases), unit="samples", every_s=0.0)
    elif g.progress_bar:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(canvases), desc="generate", unit="sample", dynamic_ncols=True, disable=None,
                   file=sys.stderr)
    for rows in groups:
        gens = [torch.Generator().manual_seed(g.seed + i) for i in rows]
        x = torch.tensor([canvases[i].ids for i in rows], dtype=torch.long, device=device)
        z = None
        steps = None if (g.steps is None and g.threshold is not None) else (g.steps or x.shape[1])
        if g.mode == "latent":
            z = latent_for(x, gens)
            out = x
        elif embedding:
            from rwkv_diffusion_rnn.diffusion.embedding_diffusion import generate_embedding_text
            from rwkv_diffusion_rnn.training.builders import build_embedding_diffusion
            width = model.token_embeddings().shape[1]
            init = torch.stack([torch.randn(x.shape[1], width, generator=gen) for gen in gens])
            # eta > 0 draws fresh noise each step from one stream: each row alone keeps its own
            out = torch.cat([generate_embedding_text(model, build_embedding_diffusion(cfg), length=x.shape[1],
                                                     batch_size=1, steps=steps, eta=g.eta, generator=gens[r],
                                                     init_noise=init[r:r + 1]) for r in range(len(rows))]) \
                if g.eta else generate_embedding_text(model, build_embedding_diffusion(cfg), length=x.shape[1],
                                                      batch_size=len(rows), steps=steps, init_noise=init)
        elif ar:
            out = sampling.generate_autoregressive(model, bos_id=eos_id if eos_id is not None else mcfg.mask_id,
                                                   prompt_ids=x, temperature=g.temperature, top_k=g.top_k,
                                                   top_p=g.top_p, eos_id=eos_id if g.eos else None,
                                                   generator=gens)
        elif g.mode == "joint" and g.joint_order == "together":
            init = torch.stack([torch.randn(mcfg.latent_dim, generator=gen) for gen in gens]).to(device)
            out, z = sampling.generate_joint(model, diffusion, prompt_ids=x, steps=steps, order="together",
                                             eta=g.eta, init_noise=init, generator=gens,
                                             block_length=g.block_length, remasking=g.remasking,
                                             threshold=g.threshold, temperature=g.temperature, top_k=g.top_k,
                                             top_p=g.top_p, cfg_scale=g.cfg_scale,
                                             prompt_cfg_scale=g.prompt_cfg_scale)
        else:
            if g.mode == "joint":       # joint_order=latent_first
                z = latent_for(x, gens)
            elif canvases[rows[0]].latent is not None:
                with torch.no_grad():
                    z = model.clean_latent(torch.tensor(np.stack([canvases[i].latent for i in rows]), device=device))
            out = sampling.generate_text(model, latent=z, prompt_ids=x, steps=steps,
                                         block_length=g.block_length, remasking=g.remasking,
                                         threshold=g.threshold, temperature=g.temperature, top_k=g.top_k,
                                         top_p=g.top_p, cfg_scale=g.cfg_scale,
                                         prompt_cfg_scale=g.prompt_cfg_scale, generator=gens,
                                         use_cache=g.use_cache)
        for r, i in enumerate(rows):
            c = canvases[i]
            rec: Dict[str, Any] = {"index": i, "seed": g.seed + i, **c.source}
            if g.mode == "latent":
                rec["text"] = c.source.get("text", tok.decode(c.ids))
                rec["token_ids"] = list(c.ids)
            else:
                text, ids, ended = _finish(c, out[r].tolist(), eos_id, g.eos, tok)
                rec.update(text=text, token_ids=ids, ended_by_eos=ended)
            if z is not None and g.mode != "text":
                rec["latent"] = [float(v) for v in z[r].float().cpu()]
                latents_out.append(z[r].float().cpu().numpy())
            elif c.latent is not None:
                rec["latent_in"] = g.latent if g.latent is not None else {"latent_text": g.latent_text}
            rec["settings"] = settings if ar or g.mode == "latent" else {**settings, "steps": steps}
            records.append(rec)
        if bar is not None:
            bar.update(len(rows))
    if bar is not None:
        bar.close()
    _write(g, records, latents_out)
    return records


def _write(g: GenerateConfig, records: List[dict], latents: List[Any]) -> None:
    from rwkv_diffusion_rnn.common.files import atomic_save_npy, atomic_write_bytes, os_error_message
    try:
        if g.out is not None:
            body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            atomic_write_bytes(g.out, body.encode("utf-8"))
    except OSError as e:
        raise _error(os_error_message(e, "out", g.out)) from None
    try:
        if g.latent_out is not None:
            import numpy as np
            atomic_save_npy(g.latent_out, np.stack(latents).astype(np.float32))
    except OSError as e:
        raise _error(os_error_message(e, "latent_out", g.latent_out)) from None


def _show(records: List[dict]) -> str:
    parts = []
    for r in records:
        head = f"--- sample {r['index']} (seed {r['seed']})"
        for key in ("prompt", "template", "conversation"):
            if key in r:
                head += f" {key}: {r[key]!r}"
        body = r["text"]
        if "latent" in r:
            body += "\nlatent: [" + ", ".join(f"{v:.3f}" for v in r["latent"][:8]) + (", ...]" if len(r["latent"]) > 8 else "]")
        parts.append(f"{head} ---\n{body}")
    return "\n".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv else 2)
    from rwkv_diffusion_rnn.common.errors import ProjectError
    try:
        g = parse_options(argv)
        records = generate(config=g)
    except (ProjectError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if g.print_texts:
        print(_show(records))
    if g.out:
        print(f"wrote {len(records)} samples to {g.out}", file=sys.stderr)
    if g.latent_out:
        print(f"wrote latents to {g.latent_out}", file=sys.stderr)


if __name__ == "__main__":
    main()
