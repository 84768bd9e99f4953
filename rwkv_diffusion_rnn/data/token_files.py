"""Token files: the texts of a data list (``train_data.json``) tokenized into one ``.npz`` per
example, named so that each pairs with its latent file.

:func:`tokenize_json` does the job (the ``python -m rwkv_diffusion_rnn.preprocess_tokenize_text``
command is a thin wrapper around it). Each entry of the JSON list becomes
``<output_dir>/<split>/<stem>.npz`` holding

* ``input_ids``: int32 [max_length], the text's tokens (no special tokens added), cut to
  ``max_length`` and right-padded with the tokenizer's pad id (0 for RWKV World);
* ``attention_mask``: uint8 [max_length], 1 on real tokens, 0 on padding.

``<stem>`` is the stem of the entry's ``latent_path`` (else its ``id``, else its zero-padded
index), so the token file pairs with the latent file by name. ``<split>`` comes from the JSON file
name (``train_data.json`` -> ``train``, ``val_data.json`` -> ``val``, ``<x>.json`` -> ``<x>``)
unless ``split`` is given. ``<output_dir>/<split>/tokens_info.json`` records the tokenizer,
``max_length`` and, under ``text_sha256``, ``stem -> SHA-256`` of the text each file was made
from. A re-run skips only files whose text is unchanged; files whose text changed (a new corpus
through ``prepare_latents --overwrite``) or whose hash was never recorded (older files) are
rewritten, and the summary counts them. A re-run refuses to mix tokenizer / ``max_length``
settings unless ``overwrite`` is given (which rewrites every file).

Every text is checked before anything is written (a lone surrogate is refused, naming the
entry). ``tokens_info.json`` is written atomically and last, with ``"complete": true``; while a
run rewrites files it says ``"complete": false`` and lists only the files not yet rewritten, so a
killed run never leaves a listing that vouches for files it did not finish.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from rwkv_diffusion_rnn.common.errors import DataFormatError
from rwkv_diffusion_rnn.common.files import atomic_save_npz, atomic_write_json
from rwkv_diffusion_rnn.data.data_simple import (TOKENS_INFO_FILE, entry_stem, read_data_json, read_tokens_info,
                                                 text_sha256, unicode_problem)

__all__ = ["TokenizeSummary", "split_from_json_name", "encode_padded", "tokenize_json"]

_LISTING_SAVE_S = 60.0  # while writing, how often the partial hash listing is saved (resumable runs)


@dataclass
class TokenizeSummary:
    output_dir: str
    split: str
    entries: int = 0
    written: int = 0
    skipped: int = 0
    changed: int = 0  # files rewritten because their text changed since they were written
    unrecorded: int = 0  # files rewritten because no text hash was recorded for them (older files)
    tokens: int = 0  # real (unpadded) tokens in the files written this run
    truncated: int = 0  # files written this run whose text was longer than max_length
    max_length: int = 0

    def line(self) -> str:
        return (
            f"{self.split}: {self.entries} entries -> {self.output_dir}: wrote {self.written} files, "
            f"skipped {self.skipped} existing, {self.tokens} tokens, {self.truncated} truncated "
            f"to max_length {self.max_length}; {self.changed} rewritten because their text changed"
            + (f", {self.unrecorded} because no text hash was recorded (older files)" if self.unrecorded else "")
        )


def split_from_json_name(json_path: str | os.PathLike) -> str:
    """``train_data.json`` -> ``train``; ``val_data.json`` -> ``val``; ``x.json`` -> ``x``."""
    stem = Path(json_path).stem
    return stem[: -len("_data")] if stem.endswith("_data") and len(stem) > len("_data") else stem


def encode_padded(ids: Sequence[int], max_length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(input_ids int32 [max_length], attention_mask uint8 [max_length], was_truncated)."""
    n = min(len(ids), max_length)
    input_ids = np.full(max_length, pad_id, dtype=np.int32)
    input_ids[:n] = np.asarray(ids[:n], dtype=np.int64)
    mask = np.zeros(max_length, dtype=np.uint8)
    mask[:n] = 1
    return input_ids, mask, len(ids) > max_length


def _tokenizer_label(tokenizer, name: str | None) -> str:
    return name or getattr(tokenizer, "name", None) or type(tokenizer).__name__


def _check_entries(json_path: Path, entries: list[dict], stems: list[str], out: Path) -> None:
    """Refuse, before anything is written, texts that cannot be tokenized and entries that would
    share a token file."""
    for i, e in enumerate(entries):
        problem = unicode_problem(e["text"])
        if problem:
            raise DataFormatError(
                f"{json_path}: entry {i} (stem {stems[i]!r}): {problem}; then re-run prepare_latents and this "
                "command. Nothing was written."
            )
    first_of: dict[str, int] = {}
    for i, s in enumerate(stems):
        if s in first_of:
            raise DataFormatError(
                f"{json_path}: entries {first_of[s]} and {i} both map to {out / (s + '.npz')} "
                "(same latent file stem / id); give every entry its own latent_path or id."
            )
        first_of[s] = i


def _old_listing(info_path: Path, existing: set[str], info: dict, overwrite: bool) -> dict[str, str]:
    """``stem -> text hash`` of the files already there, from the previous run's listing;
    refuses to mix tokenizer settings unless ``overwrite``."""
    if overwrite or not info_path.is_file() or not existing:
        return {}
    try:
        old = read_tokens_info(info_path.parent) or {}
    except DataFormatError:
        old = {}  # unreadable: every existing file counts as unrecorded and is rewritten
    for key in ("tokenizer", "max_length", "pad_id"):
        if key in old and old[key] != info[key]:
            raise DataFormatError(
                f"{info_path}: existing token files in {info_path.parent} were made with {key}={old[key]!r}, this run "
                f"has {key}={info[key]!r}; pass --overwrite to rewrite them all, or use another --output_dir."
            )
    listed = old.get("text_sha256")
    return {k: v for k, v in listed.items() if f"{k}.npz" in existing} if isinstance(listed, dict) else {}


def _save_listing(info_path: Path, info: dict, hashes: dict[str, str], complete: bool) -> None:
    atomic_write_json(info_path, {**info, "complete": complete, "text_sha256": hashes}, indent=2)


def tokenize_json(
    json_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    tokenizer,
    *,
    max_length: int = 512,
    split: str | None = None,
    overwrite: bool = False,
    batch_size: int = 1024,
    max_samples: int | None = None,
    tokenizer_name: str | None = None,
    show_progress: bool = True,
) -> TokenizeSummary:
    """Write ``<output_dir>/<split>/<stem>.npz`` for every entry of ``json_path`` whose file is
    missing or was made from another text (every entry with ``overwrite``).

    ``tokenizer`` needs ``encode_batch(texts)`` and ``pad_id``. Returns the counts.
    """
    if max_length < 1:
        raise DataFormatError(f"--max_length must be >= 1, got {max_length}.")
    json_path = Path(json_path)
    entries = read_data_json(json_path)
    if max_samples is not None:
        entries = entries[:max_samples]
    if not entries:
        raise DataFormatError(f"{json_path}: the data list is empty; nothing to tokenize. Re-run prepare_latents on a non-empty corpus.")
    split = split or split_from_json_name(json_path)
    out = Path(output_dir) / split
    stems = [entry_stem(e, i) for i, e in enumerate(entries)]
    _check_entries(json_path, entries, stems, out)
    hashes = [text_sha256(e["text"]) for e in entries]
    out.mkdir(parents=True, exist_ok=True)

    label = _tokenizer_label(tokenizer, tokenizer_name)
    pad_id = int(tokenizer.pad_id)
    info = {
        "tokenizer": label,
        "vocab_size": int(getattr(tokenizer, "vocab_size", 0) or 0),
        "pad_id": pad_id,
        "eos_id": getattr(tokenizer, "eos_id", None),
        "mask_id": getattr(tokenizer, "mask_id", None),
        "max_length": int(max_length),
        "input_ids_dtype": "int32",
        "attention_mask_dtype": "uint8",
        "padding": "right",
        "source_json": str(json_path),
        "text_hash": "sha256 of the UTF-8 text, per file stem under text_sha256",
    }
    info_path = out / TOKENS_INFO_FILE
    existing = {n for n in os.listdir(out) if n.endswith(".npz")}
    listed = _old_listing(info_path, existing, info, overwrite)

    summary = TokenizeSummary(output_dir=str(out), split=split, entries=len(entries), max_length=max_length)
    todo = []
    for i, s in enumerate(stems):
        if overwrite or f"{s}.npz" not in existing:
            todo.append(i)
        elif listed.get(s) != hashes[i]:
            todo.append(i)
            if s in listed:
                summary.changed += 1
            else:
                summary.unrecorded += 1
    summary.skipped = len(entries) - len(todo)
    # From here on the listing vouches only for files this run leaves alone; the files it
    # rewrites are listed again once written.
    for i in todo:
        listed.pop(stems[i], None)
    if todo and info_path.is_file():
        _save_listing(info_path, info, listed, complete=False)
    last_save = time.monotonic()
    with tqdm(total=len(entries), desc=f"tokenizing {split}", unit="text", disable=not show_progress,
              initial=summary.skipped) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            batch_ids = tokenizer.encode_batch([entries[i]["text"] for i in chunk])
            for i, ids in zip(chunk, batch_ids):
                input_ids, mask, cut = encode_padded(ids, max_length, pad_id)
                atomic_save_npz(out / f"{stems[i]}.npz", input_ids=input_ids, attention_mask=mask)
                listed[stems[i]] = hashes[i]
                summary.written += 1
                summary.tokens += int(mask.sum())
                summary.truncated += int(cut)
            bar.update(len(chunk))
            if time.monotonic() - last_save > _LISTING_SAVE_S:  # a killed long run resumes from here
                _save_listing(info_path, info, listed, complete=False)
                last_save = time.monotonic()
    info.update(entries=summary.entries, last_run={"written": summary.written, "skipped": summary.skipped,
                                                  "changed": summary.changed, "unrecorded": summary.unrecorded,
                                                  "tokens": summary.tokens, "truncated": summary.truncated})
    _save_listing(info_path, info, listed, complete=True)  # last: its presence means every file is done
    return summary
