"""Conversation data for instruction tuning (``data=sft``), as LLaDA's SFT reads it.

A file is JSON (a list of conversations) or JSON Lines (one per line), or a Hugging Face dataset
with a ``conversations`` column. A conversation is::

    {"system": "optional", "conversations": [{"from": "human", "value": "..."},
                                              {"from": "gpt", "value": "..."}, ...]}

(``messages`` for ``conversations``, ``role`` / ``content`` for ``from`` / ``value``, and
``user`` / ``assistant`` for ``human`` / ``gpt`` are accepted too; a ``system`` turn may open the
list instead of the key.)

Every assistant turn is one example: its **prompt** is BOS (the tokenizer's end-of-text id, the
corpus separator) + the system text + every turn before it, each rendered with the chat template
(:class:`ChatTemplate`, ``data.chat_template``; the checkpoint's config keeps it), ending with the
assistant prefix; its **answer** is the assistant text + EOS. A batch puts its examples side by
side, each answer padded with EOS to the longest example of the batch (those EOS are part of the
answer: the model learns where to stop), and carries ``prompt_lengths``. An example whose prompt
alone does not fit ``data.seq_len`` is dropped, one whose answer does not fit is cut; both are
counted and reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .epochs import EpochBatches
from ..common.errors import DataFormatError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class ChatTemplate:
    """How a conversation becomes text: each turn is ``<role template>.format(text)``. The
    assistant template's text before ``{}`` opens every answer (the prompt ends with it)."""
    system: str = "System: {}\n"
    user: str = "User: {}\n"
    assistant: str = "Assistant: {}\n"

    def __post_init__(self):
        for role in ("system", "user", "assistant"):
            if getattr(self, role).count("{}") != 1:
                raise ValueError(f"data.chat_template.{role}={getattr(self, role)!r} must hold exactly one {{}} "
                                 "where the turn's text goes")

    @property
    def answer_prefix(self) -> str:
        return self.assistant.split("{}")[0]

    def prompt(self, system: Optional[str], turns: Sequence[Tuple[str, str]]) -> str:
        """The text before an answer: the system text and ``turns`` (role, text), then the
        assistant prefix."""
        parts = [self.system.format(system)] if system else []
        parts += [getattr(self, role).format(text) for role, text in turns]
        return "".join(parts) + self.answer_prefix


@dataclass
class Conversation:
    system: Optional[str]
    turns: List[Tuple[str, str]]        # (user | assistant, text)
    where: str                           # file and entry, for messages


def _turn(turn, where: str) -> Tuple[str, str]:
    if not isinstance(turn, dict):
        raise DataFormatError(f"{where}: a turn must be an object with from/value (or role/content), "
                              f"got {type(turn).__name__}")
    role = turn.get("from", turn.get("role"))
    text = turn.get("value", turn.get("content"))
    if role not in ROLES:
        raise DataFormatError(f"{where}: unknown role {role!r}; use one of {', '.join(ROLES)} "
                              "(in 'from' or 'role')")
    if not isinstance(text, str) or not text.strip():
        raise DataFormatError(f"{where}: the {role} turn has an empty value; give it text or drop the turn")
    return ROLES[role], text


def parse_conversation(entry, where: str) -> Conversation:
    """One conversation from its JSON object; refuses a malformed one, or one without an
    answer to learn, naming ``where``."""
    conv = _parse_turns(entry, where)
    if not any(role == "assistant" for role, _ in conv.turns):
        raise DataFormatError(f"{where}: the conversation has no assistant turn (roles: "
                              f"{', '.join(sorted({r for r, _ in conv.turns})) or 'none'}), so there is no answer to "
                              "learn; add a gpt/assistant turn or drop the entry")
    return conv


def _parse_turns(entry, where: str) -> Conversation:
    """The system text and turns of a conversation's JSON object (a system turn may only open it)."""
    if not isinstance(entry, dict):
        raise DataFormatError(f"{where}: a conversation must be an object with a 'conversations' list, "
                              f"got {type(entry).__name__}")
    turns = entry.get("conversations", entry.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise DataFormatError(f"{where}: no 'conversations' (or 'messages') list of turns")
    system = entry.get("system")
    if system is not None and not isinstance(system, str):
        raise DataFormatError(f"{where}: 'system' must be text, got {type(system).__name__}")
    parsed = [_turn(t, f"{where} turn {i}") for i, t in enumerate(turns)]
    if parsed[0][0] == "system":
        system = parsed[0][1] if system is None else f"{system}\n{parsed[0][1]}"
        parsed = parsed[1:]
    if any(role == "system" for role, _ in parsed):
        raise DataFormatError(f"{where}: a system turn may only open the conversation")
    return Conversation(system or None, parsed, where)


def read_conversations(path) -> List[Conversation]:
    """The conversations of a JSON or JSON Lines file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.path={path}: no such file")
    return [parse_conversation(e, w) for e, w in _entries(path)]


def _entries(path: Path) -> List[Tuple[object, str]]:
    """The JSON values of a file with where each is (``entry i`` of a list, ``line n`` of JSON Lines)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path} is not UTF-8 text (byte {e.start}): conversations are JSON or JSON Lines") from None
    try:
        if path.suffix == ".jsonl":
            raise json.JSONDecodeError("JSON Lines", text, 0)
        entries = json.loads(text)
        where = [f"{path} entry {i}" for i in range(len(entries))] if isinstance(entries, list) else []
    except json.JSONDecodeError:
        entries, where = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path} is neither JSON nor JSON Lines: line {n} does not parse ({e.msg} "
                                      f"at column {e.colno}): {line[:60]!r}") from None
            where.append(f"{path} line {n}")
    if not isinstance(entries, list):
        raise DataFormatError(f"{path}: expected a list of conversations, got {type(entries).__name__}")
    if not entries:
        raise DataFormatError(f"{path} holds no conversation")
    return list(zip(entries, where))


def read_conversations_to_answer(path) -> List[Tuple[Conversation, Optional[str]]]:
    """Conversations to answer, each with its reference: a conversation that ends with an
    assistant turn is asked that turn (the turn is the reference); one that ends with a user
    turn is asked the next one (no reference)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    out = []
    for entry, where in _entries(path):
        conv = _parse_turns(entry, where)     # the system text and turns as training reads them
        reference = None
        if conv.turns and conv.turns[-1][0] == "assistant":
            reference, conv.turns = conv.turns[-1][1], conv.turns[:-1]
        if not conv.turns or conv.turns[-1][0] != "user":
            raise DataFormatError(f"{where}: nothing to answer (the turns before the answer must end with a user turn)")
        out.append((conv, reference))
    return out


def hf_conversations(name: str, config: Optional[str], split: str) -> List[Conversation]:
    """The conversations of a Hugging Face dataset (a ``conversations`` or ``messages`` column)."""
    from .corpus import CorpusSpec, _HFDataset
    try:
        ds = _HFDataset(CorpusSpec(hf_dataset=name, hf_config=config, hf_split=split, text_field="conversations")).ds
        column = "conversations"
    except DataFormatError:
        ds = _HFDataset(CorpusSpec(hf_dataset=name, hf_config=config, hf_split=split, text_field="messages")).ds
        column = "messages"
    return [parse_conversation({column: row[column], "system": row.get("system")}, f"data.hf_dataset={name} row {i}")
            for i, row in enumerate(ds)]


@dataclass
class Example:
    prompt: np.ndarray                   # BOS + rendered prompt
    answer: np.ndarray                   # answer + EOS


def rendered_texts(conversations: Sequence[Conversation], template: ChatTemplate) -> Iterator[str]:
    """Every text that tokenization will meet (to build a character vocabulary from)."""
    yield template.system + template.user + template.assistant
    for c in conversations:
        if c.system:
            yield c.system
        for _, text in c.turns:
            yield text


def examples_of(conversations: Sequence[Conversation], tokenizer, template: ChatTemplate,
                seq_len: int) -> Tuple[List[Example], Dict[str, int]]:
    """Every assistant turn as an :class:`Example`, and the counts of dropped (prompt too long)
    and cut (answer cut to fit ``seq_len``) examples."""
    bos = eos = int(tokenizer.eos_id)
    out, dropped, cut = [], 0, 0
    for c in conversations:
        for i, (role, text) in enumerate(c.turns):
            if role != "assistant":
                continue
            try:
                prompt = np.array([bos] + list(tokenizer.encode(template.prompt(c.system, c.turns[:i]))), dtype=np.int64)
                answer = np.array(list(tokenizer.encode(text)) + [eos], dtype=np.int64)
            except ValueError as e:     # a character a chars vocabulary (e.g. training.init_from's) lacks
                raise DataFormatError(f"{c.where} turn {i}: {e}") from None
            if len(prompt) >= seq_len:
                dropped += 1
                continue
            if len(prompt) + len(answer) > seq_len:
                answer, cut = answer[:seq_len - len(prompt)], cut + 1
            out.append(Example(prompt, answer))
    return out, {"examples": len(out), "dropped": dropped, "cut": cut}


def collate(examples: Sequence[Example], eos_id: int, multiple: int = 1) -> Dict[str, torch.Tensor]:
    """A batch: each prompt + answer padded with EOS to the longest (rounded up to ``multiple``).
    Every position is real (the EOS padding belongs to the answer)."""
    T = max(len(e.prompt) + len(e.answer) for e in examples)
    T = -(-T // multiple) * multiple
    ids = torch.full((len(examples), T), int(eos_id), dtype=torch.long)
    for r, e in enumerate(examples):
        seq = np.concatenate([e.prompt, e.answer])
        ids[r, :len(seq)] = torch.from_numpy(seq)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "prompt_lengths": torch.tensor([len(e.prompt) for e in examples], dtype=torch.long)}


class SFTBatches(EpochBatches):
    """Training batches of examples: each epoch a permutation (seeded by ``(seed, epoch)``) cut
    into batches (the last incomplete one dropped). Iteration and resumption as the corpus
    windows': ``state_dict()`` counts the batches handed out."""

    def __init__(self, examples: List[Example], batch_size: int, seed: int, eos_id: int, multiple: int = 1,
                 source: str = "data.path"):
        if len(examples) < batch_size:
            raise DataFormatError(f"{source} gives {len(examples)} examples, fewer than one batch of "
                                  f"training.train_batch_size={batch_size}; lower the batch size or add conversations")
        self.examples, self.batch_size, self.seed = examples, int(batch_size), int(seed)
        self.eos_id, self.multiple = int(eos_id), int(multiple)
        self._order: Tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.examples) // self.batch_size

    def batch(self, epoch: int, index: int) -> Dict[str, torch.Tensor]:
        """Batch ``index`` of ``epoch``."""
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)))
        k = self._order[1][index * self.batch_size:(index + 1) * self.batch_size]
        return collate([self.examples[i] for i in k], self.eos_id, self.multiple)

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batch_index": self._consumed, "batch_size": self.batch_size,
                "n_examples": len(self.examples), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("batch_size", self.batch_size), ("n_examples", len(self.examples))):
            if state.get(key, mine) != mine:
                raise ValueError(f"the SFT loader's state was saved with {key}={state[key]} but this run has "
                                 f"{mine}; resume with the same conversations and batch size, or start a fresh run")
        self._epoch, self._consumed = int(state["epoch"]), int(state["batch_index"])
        if self._consumed >= len(self):     # saved right after the last batch of an epoch
            self._epoch, self._consumed = self._epoch + 1, 0


class SFTEvalBatches:
    """The held-out examples in file order, ``batch_size`` at a time."""

    def __init__(self, examples: List[Example], batch_size: int, eos_id: int, multiple: int = 1):
        self.examples, self.batch_size, self.eos_id, self.multiple = examples, int(batch_size), int(eos_id), int(multiple)

    def __len__(self) -> int:
        return -(-len(self.examples) // self.batch_size)

    def __iter__(self):
        for i in range(0, len(self.examples), self.batch_size):
            yield collate(self.examples[i:i + self.batch_size], self.eos_id, self.multiple)
