"""Synthetic bidirectional tasks: small character-level problems whose masked answer needs the
context to its *right*.

They are a data option of the trainer (``experiment=struct|rightcopy|rightrev|index|add``) for
models trained from scratch. A causal model cannot do better than (near) chance on the answer,
a model that reads in both directions can solve it exactly, so the gap measures how well the
denoiser moves information from right to left.

Every task uses the same :class:`CharVocab` (one model size fits all tasks), lays its text out
at fixed positions, pads to ``seq_len`` and marks the answer characters as ``maskable``. In
training and evaluation only maskable positions are masked; everything else is given.

Formats (``L = struct_len``, default 8; ``?`` names the answer field, shown in brackets):

========== ======================================== ==============================================
task       text (L = 8)                             answer
========== ======================================== ==============================================
struct     ``{"a":A,"b":[A C],"c":C}``              b = A followed by C (2L digits); its first half
                                                    copies A on the left, its second half copies C
                                                    on the right
rightcopy  ``l=X;?=[R];r=R``                        R, copied from the right (L digits); X is an
                                                    unrelated left-hand string
rightrev   ``l=X;?=[reversed R];r=R``               R reversed (L digits)
index      ``s=S;?=[S[i:i+4]];i=ii``                the 4 characters of S (2L digits) starting at
                                                    the index i given on the right (zero-padded)
add        ``[C]=A+B``                              C = A + B (L+1 digits, zero-padded); the sum
                                                    comes first, its operands follow on the right
========== ======================================== ==============================================

All random strings are decimal digits, so a model that cannot see the right context is at
chance level 1/10 per answer character (index: somewhat above, it can guess from the digits of
S it has seen). The layouts of struct, rightcopy, rightrev and index follow the rwkvdllm
experiments (same lengths, same left/answer/right arrangement), so their tables can be compared;
index answers a 4-character window rather than one character so that exact match is a
meaningful multi-token score. add is the exception: the rwkvdllm layout ``A+B=C`` has all it
needs on the left, so here the sum is written first.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Iterator, Sequence, Union

import torch

__all__ = [
    "CharVocab",
    "VOCAB",
    "TaskBatch",
    "SyntheticTask",
    "StructTask",
    "RightCopyTask",
    "RightRevTask",
    "IndexTask",
    "AddTask",
    "TASKS",
    "TASK_NAMES",
    "make_task",
]


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

# Characters any task may write. "_" and "#" are kept out: decode() uses them to show MASK and PAD.
_CHARS = string.digits + string.ascii_lowercase + '{}":,=+;[]? |-.'


class CharVocab:
    """Character vocabulary shared by all synthetic tasks.

    Ids: ``pad_id = 0``, then one id per character of ``chars``, then ``mask_id`` (the last id,
    so ``vocab_size == mask_id + 1``). ``decode`` shows MASK as ``_`` and PAD as ``#`` (or drops
    PAD); ``encode`` accepts those two symbols back, so ``encode(decode(ids, strip_pad=False))``
    returns ``ids``.
    """

    MASK_CHAR = "_"
    PAD_CHAR = "#"

    def __init__(self, chars: str = _CHARS):
        if len(set(chars)) != len(chars):
            raise ValueError("CharVocab: chars contains duplicates")
        for special in (self.MASK_CHAR, self.PAD_CHAR):
            if special in chars:
                raise ValueError(f"CharVocab: {special!r} is reserved for display of MASK/PAD")
        self.chars = chars
        self.pad_id = 0
        self._stoi = {ch: i + 1 for i, ch in enumerate(chars)}
        self.mask_id = len(chars) + 1
        self.vocab_size = len(chars) + 2
        self._itos = {i: ch for ch, i in self._stoi.items()}
        self._itos[self.mask_id] = self.MASK_CHAR
        self._itos[self.pad_id] = self.PAD_CHAR
        # digit d -> token id, as a tensor for vectorised layout
        self.digit_ids = torch.tensor([self._stoi[d] for d in string.digits], dtype=torch.long)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        ids = []
        for pos, ch in enumerate(text):
            if ch in self._stoi:
                ids.append(self._stoi[ch])
            elif ch == self.MASK_CHAR:
                ids.append(self.mask_id)
            elif ch == self.PAD_CHAR:
                ids.append(self.pad_id)
            else:
                raise ValueError(
                    f"CharVocab.encode: character {ch!r} at position {pos} is not in the vocabulary "
                    f"(allowed: {self.chars!r}, plus '_' for MASK and '#' for PAD)"
                )
        return ids

    def decode(self, ids: Union[Sequence[int], torch.Tensor], *, strip_pad: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"CharVocab.decode expects one sequence, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        out = []
        for i in ids:
            i = int(i)
            if i == self.pad_id and strip_pad:
                continue
            if i not in self._itos:
                raise ValueError(f"CharVocab.decode: id {i} is outside the vocabulary (size {self.vocab_size})")
            out.append(self._itos[i])
        return "".join(out)


VOCAB = CharVocab()


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


@dataclass
class TaskBatch:
    """One batch of task examples, all ``[B, T]``.

    ``input_ids``: the clean text (answers included), PAD after the text.
    ``maskable``: True on answer characters, the only positions masked in training and scored.
    ``attention_mask``: True on non-PAD positions.
    """

    input_ids: torch.Tensor
    maskable: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "TaskBatch":
        return TaskBatch(self.input_ids.to(device), self.maskable.to(device), self.attention_mask.to(device))

    def masked_input(self, mask_id: int) -> torch.Tensor:
        """``input_ids`` with every answer character replaced by ``mask_id`` (the evaluation input)."""
        return self.input_ids.masked_fill(self.maskable, mask_id)


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------

# A layout piece: a literal string, or (digits [B, k] as 0..9 values, is_answer).
_Piece = Union[str, tuple]


class SyntheticTask:
    """Base class: subclasses set ``name`` and implement ``_pieces`` and ``_text_len``."""

    name: str = ""

    def __init__(self, *, seq_len: int = 64, struct_len: int = 8, seed: int = 0, vocab: CharVocab = VOCAB):
        if int(struct_len) < 1:
            raise ValueError(f"task {self.name!r}: struct_len must be >= 1, got {struct_len}")
        self.seq_len = int(seq_len)
        self.struct_len = int(struct_len)
        self.seed = int(seed)
        self.vocab = vocab
        self._check_sizes()
        need = self.text_len
        if self.seq_len < need:
            raise ValueError(
                f"task {self.name!r} with struct_len={self.struct_len} writes {need} characters, "
                f"which does not fit seq_len={self.seq_len}; raise seq_len to at least {need} "
                f"or lower struct_len"
            )
        self._default_generator = torch.Generator().manual_seed(self.seed)

    # -- to implement -------------------------------------------------------------------------
    def _check_sizes(self) -> None:
        """Validate task-specific sizes (called before the seq_len check)."""

    @property
    def text_len(self) -> int:
        """Characters of one example before padding (the same for every example)."""
        raise NotImplementedError

    @property
    def answer_len(self) -> int:
        """Answer characters per example (the number of maskable positions in each row)."""
        raise NotImplementedError

    def _pieces(self, batch_size: int, g: torch.Generator) -> list[_Piece]:
        raise NotImplementedError

    # -- public API ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.vocab.vocab_size

    @property
    def mask_id(self) -> int:
        return self.vocab.mask_id

    @property
    def pad_id(self) -> int:
        return self.vocab.pad_id


    def sample_batch(self, batch_size: int, generator: torch.Generator | None = None) -> TaskBatch:
        """Fresh random examples; the same generator state gives the same batch.

        Without a generator, the task's own generator (seeded by ``seed``) is used and advanced.
        """
        if batch_size < 1:
            raise ValueError(f"task {self.name!r}: batch_size must be >= 1, got {batch_size}")
        g = self._default_generator if generator is None else generator
        B, T = batch_size, self.seq_len
        ids = torch.full((B, T), self.vocab.pad_id, dtype=torch.long)
        maskable = torch.zeros(B, T, dtype=torch.bool)
        pos = 0
        for piece in self._pieces(B, g):
            if isinstance(piece, str):
                k = len(piece)
                ids[:, pos : pos + k] = torch.tensor(self.vocab.encode(piece), dtype=torch.long)
            else:
                digits, is_answer = piece
                k = digits.shape[1]
                ids[:, pos : pos + k] = self.vocab.digit_ids[digits]
                maskable[:, pos : pos + k] = is_answer
            pos += k
        assert pos == self.text_len, (pos, self.text_len)
        return TaskBatch(ids, maskable, ids != self.vocab.pad_id)

    def fixed_eval_set(self, n: int = 200, seed: int = 1234) -> TaskBatch:
        """The fixed evaluation set: the same ``n`` examples on every call for the same ``seed``."""
        return self.sample_batch(n, torch.Generator().manual_seed(int(seed)))

    def iterate(self, batch_size: int, seed: int | None = None) -> Iterator[TaskBatch]:
        """Endless stream of training batches, reproducible from ``seed`` (default: the task's)."""
        g = torch.Generator().manual_seed(self.seed if seed is None else int(seed))
        while True:
            yield self.sample_batch(batch_size, g)

    def score(self, pred_ids: torch.Tensor, batch: TaskBatch) -> dict:
        """Accuracy of predictions on the answer positions.

        ``pred_ids``: predicted ids ``[B, T]`` (or logits ``[B, T, V]``, reduced by argmax); only
        the maskable positions are read. Returns ``acc`` (correct answer characters / all answer
        characters), ``exact`` (fraction of rows whose whole answer is right), ``n_tokens`` and
        ``n_rows``. The trainer reports them as ``<task>_acc`` and ``<task>_exact``.
        """
        if pred_ids.dim() == 3:
            pred_ids = pred_ids.argmax(dim=-1)
        if pred_ids.shape != batch.input_ids.shape:
            raise ValueError(
                f"task {self.name!r}: score got predictions of shape {tuple(pred_ids.shape)} "
                f"for a batch of shape {tuple(batch.input_ids.shape)}"
            )
        target = batch.input_ids
        m = batch.maskable.to(pred_ids.device)
        wrong = (pred_ids != target.to(pred_ids.device)) & m
        n_tokens = int(m.sum())
        rows = m.any(dim=1)
        n_rows = int(rows.sum())
        if n_tokens == 0:
            return {"acc": float("nan"), "exact": float("nan"), "n_tokens": 0, "n_rows": 0}
        acc = 1.0 - int(wrong.sum()) / n_tokens
        exact = int((rows & ~wrong.any(dim=1)).sum()) / n_rows
        return {"acc": acc, "exact": exact, "n_tokens": n_tokens, "n_rows": n_rows}

    def decode(self, ids: torch.Tensor | Sequence[int], *, strip_pad: bool = True) -> Union[str, list[str]]:
        """Text of one sequence, or a list of texts for a ``[B, T]`` tensor (MASK shown as ``_``)."""
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            return [self.vocab.decode(row, strip_pad=strip_pad) for row in ids]
        return self.vocab.decode(ids, strip_pad=strip_pad)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seq_len={self.seq_len}, struct_len={self.struct_len}, seed={self.seed})"


def _digits(batch_size: int, length: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 10, (batch_size, length), generator=g)


class StructTask(SyntheticTask):
    """``{"a":A,"b":B,"c":C}`` with A, C random ``struct_len``-digit strings and B = A followed by
    C; only B is masked."""

    name = "struct"

    @property
    def text_len(self) -> int:
        return 4 * self.struct_len + 16

    @property
    def answer_len(self) -> int:
        return 2 * self.struct_len

    def _pieces(self, batch_size, g):
        a = _digits(batch_size, self.struct_len, g)
        c = _digits(batch_size, self.struct_len, g)
        b = torch.cat([a, c], dim=1)
        return ['{"a":', (a, False), ',"b":', (b, True), ',"c":', (c, False), "}"]


class RightCopyTask(SyntheticTask):
    """``l=X;?=R;r=R``: the answer copies the string R given on its right; X is an unrelated
    string on the left (so the left context says nothing about the answer)."""

    name = "rightcopy"

    @property
    def text_len(self) -> int:
        return 3 * self.struct_len + 8

    @property
    def answer_len(self) -> int:
        return self.struct_len

    def _transform(self, r: torch.Tensor) -> torch.Tensor:
        return r

    def _pieces(self, batch_size, g):
        x = _digits(batch_size, self.struct_len, g)
        r = _digits(batch_size, self.struct_len, g)
        return ["l=", (x, False), ";?=", (self._transform(r), True), ";r=", (r, False)]


class RightRevTask(RightCopyTask):
    """``l=X;?=reversed(R);r=R``: as rightcopy, but the answer is R reversed."""

    name = "rightrev"

    def _transform(self, r: torch.Tensor) -> torch.Tensor:
        return r.flip(dims=[1])


class IndexTask(SyntheticTask):
    """``s=S;?=S[i:i+w];i=ii``: S has ``2*struct_len`` digits, the answer is the window of
    ``w = min(4, len(S))`` characters starting at the index i written on the right (zero-padded
    to a fixed width, uniform over all valid starts). The answer is several characters so that
    exact match scores reading the index *and* copying from it."""

    name = "index"
    window = 4

    @property
    def source_len(self) -> int:
        return 2 * self.struct_len

    @property
    def window_len(self) -> int:
        return min(self.window, self.source_len)

    @property
    def index_width(self) -> int:
        return len(str(self.source_len - self.window_len))

    @property
    def text_len(self) -> int:
        return 2 + self.source_len + 3 + self.window_len + 3 + self.index_width

    @property
    def answer_len(self) -> int:
        return self.window_len

    def _pieces(self, batch_size, g):
        s = _digits(batch_size, self.source_len, g)
        start = torch.randint(0, self.source_len - self.window_len + 1, (batch_size,), generator=g)
        answer = torch.gather(s, 1, start[:, None] + torch.arange(self.window_len)[None, :])
        # index as zero-padded decimal digits, most significant first
        powers = 10 ** torch.arange(self.index_width - 1, -1, -1)
        idx_digits = (start[:, None] // powers[None, :]) % 10
        return ["s=", (s, False), ";?=", (answer, True), ";i=", (idx_digits, False)]


class AddTask(SyntheticTask):
    """``C=A+B``: A, B random ``struct_len``-digit strings (leading zeros allowed), C their sum
    zero-padded to ``struct_len + 1`` digits. The whole sum is the answer and sits left of its
    operands."""

    name = "add"

    @property
    def text_len(self) -> int:
        return 3 * self.struct_len + 3

    @property
    def answer_len(self) -> int:
        return self.struct_len + 1

    def _pieces(self, batch_size, g):
        n = self.struct_len
        a = _digits(batch_size, n, g)
        b = _digits(batch_size, n, g)
        # schoolbook addition from the least significant digit: exact for any length
        c = torch.zeros(batch_size, n + 1, dtype=torch.long)
        carry = torch.zeros(batch_size, dtype=torch.long)
        for k in range(n - 1, -1, -1):
            s = a[:, k] + b[:, k] + carry
            c[:, k + 1] = s % 10
            carry = s // 10
        c[:, 0] = carry
        return [(c, True), "=", (a, False), "+", (b, False)]


TASKS: dict[str, type[SyntheticTask]] = {
    cls.name: cls for cls in (StructTask, RightCopyTask, RightRevTask, IndexTask, AddTask)
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def make_task(name: str, *, seq_len: int = 64, struct_len: int = 8, seed: int = 0) -> SyntheticTask:
    """Build the synthetic task ``name`` (one of ``TASK_NAMES``)."""
    if name not in TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; valid tasks: {', '.join(TASK_NAMES)}")
    return TASKS[name](seq_len=seq_len, struct_len=struct_len, seed=seed)
