"""A text corpus for language modelling: documents tokenized once into flat token files, and the
windows a model is trained and validated on.

A corpus is a sequence of documents read from one of:

* a ``.txt`` file (one document: the whole file, read as UTF-8 with universal newlines, as
  Python's ``open`` and nanoGPT read it);
* a ``.jsonl`` file (one document per non-blank line: an object whose ``text_field`` holds the
  text, or a JSON string);
* a ``.json`` file (a list of such objects, or of strings; one document per item);
* a folder (every ``.txt``, ``.jsonl`` and ``.json`` under it, recursively, in sorted path order;
  hidden files and folders, and anything inside the cache folder, are skipped) or a glob pattern;
* a Hugging Face dataset (one document per row): a name for ``datasets.load_dataset``, or a local
  folder written by ``save_to_disk``.

``prepare_corpus`` tokenizes the documents into one token stream per split, with the tokenizer's
end-of-text id *between* documents (a separator: one ``.txt`` file gives exactly its tokens, so
tinyshakespeare with the chars tokenizer is nanoGPT's ``data``). Documents without text are skipped.
Validation is either a separate source (``val_path``) or the tail of the stream: train is
``tokens[:int(n * (1 - val_fraction))]`` and val the rest (nanoGPT's ``data[:int(n*0.9)]``).

Cache layout, one folder per (sources, text field, validation choice, tokenizer)::

    <cache_dir>/<stem>-<tokenizer kind>-<12 hex of the hash>/
        train.bin   the train tokens, raw little-endian uint16 (vocab_size <= 65536) or uint32
        val.bin     the validation tokens (absent when there is no validation split)
        meta.json   format_version, tokenizer (tokenizer_spec), dtype, sources and val_sources
                    (path, size, mtime_ns of every file; or the dataset's ids and fingerprint),
                    text_field, val_fraction, n_documents, n_tokens {train, val} and
                    n_chars {train, val} (null: unknown, or no validation split)

A cache is reused while every source file keeps its recorded size and mtime_ns (and a folder or
glob the same list of files), a dataset its fingerprint, and every ``.bin`` file its recorded
length; otherwise it is rebuilt, saying why. A build goes into a hidden sibling folder
``.<name>.tmp-<pid>-<random>`` that is renamed into place only when complete, so an interrupted
build is never read.

Windows: a window is ``seq_len + 1`` consecutive tokens ``w``; a batch holds ``input_ids = w[1:]``
([B, seq_len]), ``prev_ids = w[0]`` ([B]: the token before the window, which an autoregressive
model is given; nanoGPT's x/y pair is ``(prev_ids + input_ids[:, :-1], input_ids)``) and an
all-True ``attention_mask``. ``TrainWindows`` cuts the train split into non-overlapping windows at a
random shift each epoch and visits them in a random order, resumably; ``ValWindows`` uses fixed
windows at ``k * seq_len``, so every validation pass scores the same tokens.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from ..common.errors import DataFormatError, UnknownCharacterError
from ..common.files import atomic_write_json, os_error_message
from .data_simple import unicode_problem
from .epochs import EpochBatches, epoch_seed
from .tokenizer import ByteTokenizer, CharTokenizer, tokenizer_spec

__all__ = ["FORMAT_VERSION", "CorpusSpec", "Corpus", "prepare_corpus", "TrainWindows", "ValWindows"]

FORMAT_VERSION = 1
SUFFIXES = (".txt", ".jsonl", ".json")
_MAX_NAMED = 5  # source files an error names before summarising the rest
_ENCODE_BATCH_CHARS = 1 << 22  # subword tokenizers encode documents in batches of this many chars
_WRITE_BUFFER_TOKENS = 1 << 22  # tokens gathered in memory before one write
_COUNT_CHUNK_TOKENS = 1 << 23  # tokens per count_chars call when counting characters
_WHAT_FILES = (
    "a .txt file (one document), a .jsonl file (one JSON object per line, text under "
    "data.text_field), a .json file (a list of such objects, or of strings), a folder of them, or "
    "a glob"
)


@dataclass
class CorpusSpec:
    """Where a corpus's text comes from (the trainer fills it from the ``data.*`` config keys)."""

    # data.path: a .txt, .jsonl, .json (a list of objects, or of strings), a folder (all
    # .txt/.jsonl/.json under it, recursively, sorted), or a glob
    path: Optional[str] = None
    # data.text_field: the field of .jsonl / .json objects (and of Hugging Face dataset rows)
    text_field: str = "text"
    # data.val_path: same kinds as path; None: hold out the last val_fraction of the token stream
    val_path: Optional[str] = None
    # data.val_fraction: 0 with no val_path means no validation split
    val_fraction: float = 0.1
    # data.hf_dataset: instead of path, a Hugging Face dataset name or a save_to_disk folder
    hf_dataset: Optional[str] = None
    hf_config: Optional[str] = None  # data.hf_config
    hf_split: str = "train"  # data.hf_split


class Corpus:
    """A prepared corpus: its tokenizer and read-only token arrays of the two splits.

    Attributes: ``tokenizer``; ``train`` (a 1-D read-only ``np.memmap`` of token ids); ``val``
    (the same, or None without a validation split); ``meta`` (the cache's ``meta.json``);
    ``path`` (the cache folder); ``rebuilt`` (True when this call tokenized the text, False when
    it reused the cache).
    """

    def __init__(self, path: Path, tokenizer, meta: dict, rebuilt: bool):
        self.path = Path(path)
        self.tokenizer = tokenizer
        self.meta = meta
        self.rebuilt = rebuilt
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")  # the files are little-endian
        self.train = _open_tokens(self.path / "train.bin", dtype, meta["n_tokens"]["train"])
        n_val = meta["n_tokens"]["val"]
        self.val = None if n_val is None else _open_tokens(self.path / "val.bin", dtype, n_val)

    def __repr__(self) -> str:
        n = self.meta["n_tokens"]
        return (f"Corpus({str(self.path)!r}, tokenizer={self.tokenizer!r}, train={n['train']} "
                f"tokens, val={n['val']} tokens)")


def _open_tokens(path: Path, dtype: np.dtype, n: int) -> np.ndarray:
    if n == 0:  # an empty file cannot be memory-mapped
        empty = np.zeros(0, dtype=dtype)
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------
class _Files:
    """The files of ``data.path`` or ``data.val_path``, resolved and sorted."""

    def __init__(self, path: str, key: str, exclude: Optional[Path]):
        self.key = key
        self.given = str(path)
        self.files = _resolve_files(str(path), key, exclude)
        # what the cache key hashes: the resolved file, folder or pattern (not the file list, so
        # that a file added to a folder rebuilds the same cache and says so)
        if any(c in self.given for c in "*?["):
            self.ident = os.path.abspath(os.path.expanduser(self.given))
        else:
            self.ident = str(Path(os.path.expanduser(self.given)).resolve())

    def stem(self) -> str:
        given = os.path.expanduser(self.given)
        if any(c in given for c in "*?["):
            parts = [p for p in Path(given).parts if not any(c in p for c in "*?[")]
            return parts[-1] if parts else "glob"
        p = Path(given).resolve()
        return p.stem if p.is_file() else p.name

    def describe(self) -> str:
        named = ", ".join(self.files[:_MAX_NAMED])
        more = f" and {len(self.files) - _MAX_NAMED} more" if len(self.files) > _MAX_NAMED else ""
        return f"{named}{more} ({self.key}={self.given!r})"

    def records(self) -> list[dict]:
        out = []
        for f in self.files:
            st = os.stat(f)
            out.append({"path": f, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        return out

    def count(self) -> Optional[int]:
        return None

    def documents(self, text_field: str) -> Iterator[tuple[str, tuple]]:
        for f in self.files:
            yield from _file_documents(f, text_field)


def _resolve_files(path: str, key: str, exclude: Optional[Path]) -> list[str]:
    expanded = os.path.expanduser(path)
    is_glob = any(c in expanded for c in "*?[")
    if is_glob:
        matches = sorted(glob.glob(expanded, recursive=True))
    elif os.path.exists(expanded):
        matches = [expanded]
    else:
        raise DataFormatError(
            f"{key}={path!r}: no such file or folder (looked for {os.path.abspath(expanded)}). "
            f"Set {key} to {_WHAT_FILES}."
        )
    if not is_glob and os.path.isfile(expanded):
        suffix = Path(expanded).suffix.lower()
        if suffix not in SUFFIXES:
            raise DataFormatError(
                f"{key}={path!r}: unsupported file type {suffix or '(no suffix)'!r}; a corpus is "
                f"{_WHAT_FILES}. Rename a plain text file to .txt."
            )
        return [str(Path(expanded).resolve())]
    files: set[str] = set()
    seen_dirs: set[str] = set()  # real paths: a symbolic link back up the tree is walked once
    for m in matches:
        if os.path.isdir(m):
            for root, dirs, names in os.walk(m, followlinks=True):
                seen_dirs.add(os.path.realpath(root))
                dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                                 and os.path.realpath(os.path.join(root, d)) not in seen_dirs)
                files.update(os.path.join(root, n) for n in names
                             if not n.startswith(".") and Path(n).suffix.lower() in SUFFIXES)
        elif os.path.isfile(m) and Path(m).suffix.lower() in SUFFIXES:
            files.add(m)
    resolved = {str(Path(f).resolve()) for f in files}
    if exclude is not None:
        # a cache folder inside the data folder holds meta.json, which is not a document
        resolved = {f for f in resolved if not Path(f).is_relative_to(exclude)}
    if not resolved:
        what = "pattern matches" if is_glob else "folder holds"
        raise DataFormatError(
            f"{key}={path!r}: the {what} no .txt, .jsonl or .json files (folders are searched "
            f"recursively; hidden files are skipped). Set {key} to {_WHAT_FILES}."
        )
    return sorted(resolved)


def _file_documents(path: str, text_field: str) -> Iterator[tuple[str, tuple]]:
    """(text, where) for each document of one file; ``where`` locates it for error messages."""
    suffix = Path(path).suffix.lower()
    try:
        if suffix == ".txt":
            with open(path, encoding="utf-8") as f:
                yield f.read(), ("txt", path)
        elif suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataFormatError(
                            f"{path}:{line_no}: not valid JSON ({e.msg}, column {e.colno}); each "
                            f"line of a .jsonl file is one JSON object with its text under "
                            f"data.text_field={text_field!r}. Fix or remove that line."
                        ) from None
                    yield _document_text(obj, text_field, f"{path}:{line_no}"), ("line", path, line_no)
        else:
            with open(path, encoding="utf-8") as f:
                try:
                    items = json.load(f)
                except json.JSONDecodeError as e:
                    raise DataFormatError(
                        f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}). A "
                        f".json corpus file is a list of objects with data.text_field="
                        f"{text_field!r}, or a list of strings."
                    ) from None
            if not isinstance(items, list):
                raise DataFormatError(
                    f"{path}: a .json corpus file must be a list of objects with data.text_field="
                    f"{text_field!r} (or a list of strings), got a {type(items).__name__}. For one "
                    "JSON object per line use a .jsonl file."
                )
            for i, obj in enumerate(items):
                yield _document_text(obj, text_field, f"{path}: item {i}"), ("item", path, i)
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not UTF-8 text ({e}). Re-save the file as UTF-8.") from None


def _document_text(obj, text_field: str, where: str) -> str:
    if isinstance(obj, str):
        return _valid_text(obj, where)
    if not isinstance(obj, dict):
        raise DataFormatError(
            f"{where}: a {type(obj).__name__}, not an object with data.text_field={text_field!r} "
            "or a string. Fix or remove it."
        )
    if text_field not in obj:
        raise DataFormatError(
            f"{where}: no {text_field!r} field (data.text_field={text_field!r}); the object has "
            f"keys {sorted(obj)[:10]}. Set data.text_field to the key that holds the text."
        )
    text = obj[text_field]
    if not isinstance(text, str):
        raise DataFormatError(
            f"{where}: the {text_field!r} field (data.text_field) is a {type(text).__name__}, not "
            "a string. Fix or remove it."
        )
    return _valid_text(text, where)


def _valid_text(text: str, where: str) -> str:
    # A JSON \ud800 escape gives a str no tokenizer can encode; name the document here rather
    # than fail with a bare UnicodeEncodeError while tokenizing or writing the cache's meta.json.
    problem = unicode_problem(text)
    if problem:
        raise DataFormatError(f"{where}: {problem}.")
    return text


class _HFDataset:
    """One split of a Hugging Face dataset."""

    key = "data.hf_dataset"

    def __init__(self, spec: CorpusSpec):
        try:
            import datasets
        except ImportError:
            raise ImportError("data.hf_dataset needs the `datasets` package: pip install datasets") from None
        name, config, split = str(spec.hf_dataset), spec.hf_config, spec.hf_split
        self.local = os.path.isdir(os.path.expanduser(name))
        self.name = str(Path(os.path.expanduser(name)).resolve()) if self.local else name
        self.config, self.split = config, split
        self.label = f"{self.key}={name!r}" + (f" (data.hf_config={config!r})" if config else "")
        saved = self.local and any(os.path.isfile(os.path.join(self.name, f)) for f in
                                   ("dataset_dict.json", "state.json", "dataset_info.json"))
        if saved:
            try:
                ds = datasets.load_from_disk(self.name)
            except Exception as e:
                raise DataFormatError(
                    f"{self.label}: cannot read this save_to_disk folder ({type(e).__name__}: "
                    f"{str(e)[:300]}). Write it again with dataset.save_to_disk(folder)."
                ) from None
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataFormatError(
                        f"{self.label}: no split {split!r} (data.hf_split); it has splits "
                        f"{sorted(ds)}. Set data.hf_split to one of them."
                    )
                ds = ds[split]
        else:
            try:
                ds = datasets.load_dataset(name, config, split=split)
            except Exception as e:
                raise DataFormatError(
                    f"{self.label}, split {split!r} (data.hf_split): could not load it "
                    f"({type(e).__name__}: {str(e)[:300]}). Without network a dataset must be "
                    "available offline: load it once online (it lands in the Hugging Face cache; "
                    "then HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1 reads it from there), or save "
                    "it with dataset.save_to_disk(folder) and set data.hf_dataset=<folder>."
                ) from None
        if not hasattr(ds, "column_names") or not hasattr(ds, "_fingerprint"):
            raise DataFormatError(f"{self.label}: expected one split (a datasets.Dataset), got "
                                  f"{type(ds).__name__}; set data.hf_split")
        if spec.text_field not in ds.column_names:
            raise DataFormatError(
                f"{self.label}: no column {spec.text_field!r} (data.text_field); its columns are "
                f"{ds.column_names}. Set data.text_field to the column that holds the text."
            )
        self.ds = ds
        self.ident = {"hf_dataset": self.name, "hf_config": config, "hf_split": split}

    def stem(self) -> str:
        return Path(self.name).name if self.local else self.name.replace("/", "_")

    def describe(self) -> str:
        return f"{self.label}, split {self.split!r}"

    def records(self) -> list[dict]:
        return [dict(self.ident, fingerprint=self.ds._fingerprint, n_rows=len(self.ds))]

    def count(self) -> Optional[int]:
        return len(self.ds)

    def documents(self, text_field: str) -> Iterator[tuple[str, tuple]]:
        row = 0
        for batch in self.ds.select_columns([text_field]).iter(batch_size=1024):
            for text in batch[text_field]:
                if not isinstance(text, str):
                    raise DataFormatError(
                        f"{self.describe()}: row {row}: the {text_field!r} column (data.text_field) "
                        f"holds a {type(text).__name__}, not a string. Filter those rows out."
                    )
                yield text, ("row", self.describe(), row)
                row += 1


def _where(loc: tuple, text: str, position: int) -> str:
    kind = loc[0]
    if kind == "txt":
        return f"{loc[1]}:{text.count(chr(10), 0, position) + 1}"  # the line in the file
    if kind == "line":
        return f"{loc[1]}:{loc[2]}"
    if kind == "item":
        return f"{loc[1]}: item {loc[2]}"
    return f"{loc[1]}: row {loc[2]}"


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------
class _TokenWriter:
    """Appends documents to a raw token file, with ``eos`` between documents."""

    def __init__(self, path: Path, dtype: np.dtype, eos: int):
        self.f = open(path, "wb")
        self.dtype, self.eos = dtype, np.array([eos], dtype=dtype)
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.n_tokens = 0
        self.n_documents = 0

    def add(self, ids: np.ndarray) -> None:
        if self.n_documents:
            self.buffer.append(self.eos)
            self.buffered += 1
        self.buffer.append(ids.astype(self.dtype, copy=False))
        self.buffered += len(ids)
        self.n_documents += 1
        if self.buffered >= _WRITE_BUFFER_TOKENS:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            data = np.concatenate(self.buffer)
            self.f.write(data.tobytes())
            self.n_tokens += len(data)
            self.buffer, self.buffered = [], 0

    def close(self) -> int:
        self.flush()
        self.f.close()
        return self.n_tokens


def _encode_documents(source, text_field: str, tok, vocab_size: int, progress: bool, desc: str):
    """(ids, n_documents) of every document of ``source`` that has tokens, as int64 arrays."""
    from tqdm.auto import tqdm

    # Character-level tokenizers encode one document at a time (fast, and an unknown character
    # can be located); subword tokenizers encode batches of documents, which is much faster.
    per_document = isinstance(tok, (CharTokenizer, ByteTokenizer))
    docs = tqdm(source.documents(text_field), total=source.count(), desc=desc, unit=" docs",
                disable=not progress, dynamic_ncols=True)

    def checked(ids: np.ndarray) -> np.ndarray:
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise DataFormatError(f"{source.describe()}: the tokenizer {tok!r} produced ids outside "
                                  f"[0, {vocab_size}); it does not fit its own vocabulary size")
        return ids

    if per_document:
        for text, loc in docs:
            if not text:
                continue
            try:
                ids = tok.encode_array(text)
            except UnknownCharacterError as e:
                raise DataFormatError(
                    f"{_where(loc, text, e.position)}: character {e.char!r} (U+{ord(e.char):04X}) "
                    f"is not in the tokenizer's chars vocabulary of {len(tok.chars)} characters. "
                    "The model's vocabulary comes from its training text: use text with only "
                    "those characters, or train with tokenizer.name=bytes."
                ) from None
            yield checked(ids)
        return
    batch: list[str] = []
    size = 0
    for text, _ in docs:
        if not text:
            continue
        batch.append(text)
        size += len(text)
        if size >= _ENCODE_BATCH_CHARS:
            for ids in tok.encode_batch(batch):
                yield checked(np.asarray(ids, dtype=np.int64))
            batch, size = [], 0
    for ids in tok.encode_batch(batch) if batch else []:
        yield checked(np.asarray(ids, dtype=np.int64))


def _count_chars(tok, tokens: np.ndarray) -> Optional[int]:
    if tok.count_chars(np.zeros(0, dtype=np.int64)) is None:  # a tokenizer that cannot tell
        return None
    total = 0
    for start in range(0, len(tokens), _COUNT_CHUNK_TOKENS):
        n = tok.count_chars(np.asarray(tokens[start : start + _COUNT_CHUNK_TOKENS], dtype=np.int64))
        if n is None:
            return None
        total += int(n)
    return total


def _build(folder: Path, spec: CorpusSpec, train_src, val_src, tokenizer, records, val_records,
           progress: bool) -> tuple[object, dict]:
    tf = spec.text_field
    if isinstance(tokenizer, str):
        # The vocabulary is every character of train AND validation text, so that validation
        # never meets a character the model has no id for.
        from tqdm.auto import tqdm

        texts = (text for src in (train_src, val_src) if src is not None
                 for text, _ in tqdm(src.documents(tf), total=src.count(), desc="vocabulary",
                                     unit=" docs", disable=not progress, dynamic_ncols=True))
        tokenizer = CharTokenizer.from_text(texts)
    tok = tokenizer
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 65536 else np.uint32).newbyteorder("<")
    n_documents = 0
    counts: dict[str, Optional[int]] = {}
    splits = [("train", train_src)] + ([("val", val_src)] if val_src is not None else [])
    for split, src in splits:
        writer = _TokenWriter(folder / f"{split}.bin", dtype, tok.eos_id)
        try:
            desc = "tokenizing" if val_src is None else f"tokenizing {split}"
            for ids in _encode_documents(src, tf, tok, tok.vocab_size, progress, desc):
                if len(ids):
                    writer.add(ids)
        finally:
            counts[split] = writer.close()
        if not counts[split]:
            key = "data.val_path" if split == "val" else src.key
            raise DataFormatError(
                f"the corpus has no text: {src.describe()}: no document with any text. "
                f"Point {key} at text, or check data.text_field={tf!r}."
            )
        n_documents += writer.n_documents
    if val_src is None and spec.val_fraction > 0:
        # The validation split is the tail of the one stream: move it to val.bin.
        n = counts["train"]
        cut = int(n * (1 - spec.val_fraction))
        all_tokens = np.memmap(folder / "train.bin", dtype=dtype, mode="r", shape=(n,))
        with open(folder / "val.bin", "wb") as f:
            for start in range(cut, n, _WRITE_BUFFER_TOKENS):
                f.write(np.asarray(all_tokens[start : min(n, start + _WRITE_BUFFER_TOKENS)]).tobytes())
        del all_tokens
        os.truncate(folder / "train.bin", cut * dtype.itemsize)
        counts = {"train": cut, "val": n - cut}
    counts.setdefault("val", None)
    n_chars = {}
    for split in ("train", "val"):
        if counts[split] is None:
            n_chars[split] = None
            continue
        n_chars[split] = _count_chars(tok, _open_tokens(folder / f"{split}.bin", dtype, counts[split]))
    meta = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer_spec(tok),
        "dtype": dtype.name,
        "sources": records,
        "val_sources": val_records,
        "text_field": tf,
        "val_fraction": None if val_src is not None else spec.val_fraction,
        "n_documents": n_documents,
        "n_tokens": counts,
        "n_chars": n_chars,
    }
    atomic_write_json(folder / "meta.json", meta)  # last: a folder with meta.json is complete
    return tok, meta


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------
_META_KEYS = ("format_version", "tokenizer", "dtype", "sources", "val_sources", "text_field",
              "val_fraction", "n_documents", "n_tokens", "n_chars")


def _read_meta(folder: Path) -> tuple[Optional[dict], str]:
    try:
        with open(folder / "meta.json", encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        return None, "meta.json is missing (an unfinished build)"
    except (OSError, ValueError) as e:
        return None, f"meta.json is unreadable ({type(e).__name__}: {str(e)[:120]})"
    if not isinstance(meta, dict):
        return None, "meta.json is not an object"
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        return None, f"meta.json lacks {', '.join(missing)}"
    if meta["format_version"] != FORMAT_VERSION:
        return None, f"format version {meta['format_version']!r}, this code writes {FORMAT_VERSION}"
    n_tokens = meta["n_tokens"]
    if not (isinstance(n_tokens, dict) and isinstance(n_tokens.get("train"), int)
            and (n_tokens.get("val") is None or isinstance(n_tokens.get("val"), int))):
        return None, "meta.json has no n_tokens {train, val}"
    return meta, ""


def _sources_changed(recorded, current) -> str:
    """Why the recorded sources differ from the current ones ('' when they do not)."""
    if recorded is None or current is None:
        return "" if recorded == current else "the validation sources changed"
    if not isinstance(recorded, list) or not all(isinstance(r, dict) for r in recorded):
        return "meta.json's sources are malformed"
    if current and "fingerprint" in current[0]:
        cur, old = current[0], recorded[0] if recorded else {}
        if old.get("fingerprint") != cur["fingerprint"]:
            return (f"dataset {cur['hf_dataset']!r} changed (fingerprint {old.get('fingerprint')} "
                    f"-> {cur['fingerprint']})")
        return ""
    old_paths = [r.get("path") for r in recorded]
    new_paths = [c["path"] for c in current]
    if old_paths != new_paths:
        added = [p for p in new_paths if p not in old_paths]
        gone = [p for p in old_paths if p not in new_paths]
        return ("the list of source files changed ("
                + "; ".join(filter(None, [added and f"new: {', '.join(added[:3])}",
                                          gone and f"gone: {', '.join(map(str, gone[:3]))}"]))
                + ")")
    for old, cur in zip(recorded, current):
        if old.get("size") != cur["size"]:
            return f"{cur['path']} changed (size {old.get('size')} -> {cur['size']} bytes)"
        if old.get("mtime_ns") != cur["mtime_ns"]:
            return f"{cur['path']} changed (modified: mtime_ns {old.get('mtime_ns')} -> {cur['mtime_ns']})"
    return ""


def _stale(folder: Path, records, val_records, want_tokenizer: Optional[dict]) -> tuple[Optional[dict], str]:
    """(meta, '') when ``folder`` can be reused, else (None, why not)."""
    meta, why = _read_meta(folder)
    if meta is None:
        return None, why
    why = _sources_changed(meta["sources"], records) or _sources_changed(meta["val_sources"], val_records)
    if why:
        return None, why
    tok = meta["tokenizer"]
    if not isinstance(tok, dict) or (want_tokenizer is not None and tok != want_tokenizer) or (
            want_tokenizer is None and not (tok.get("kind") == "chars" and isinstance(tok.get("chars"), str))):
        return None, "the tokenizer differs from the one recorded"
    try:
        dtype = np.dtype(meta["dtype"])
    except TypeError:
        return None, f"unknown dtype {meta['dtype']!r}"
    for split in ("train", "val"):
        n = meta["n_tokens"][split]
        if n is None:
            continue
        path = folder / f"{split}.bin"
        size = path.stat().st_size if path.is_file() else None
        if size != n * dtype.itemsize:
            return None, (f"{split}.bin has {size if size is not None else 'no'} bytes, expected "
                          f"n_tokens.{split} * {dtype.itemsize} = {n * dtype.itemsize}")
    return meta, ""


def _folder_name(spec: CorpusSpec, train_src, val_src, tokenizer) -> str:
    tok = {"kind": "chars", "vocabulary": "all characters of the corpus"} if isinstance(tokenizer, str) \
        else tokenizer_spec(tokenizer)
    key = {
        "format_version": FORMAT_VERSION,
        "sources": train_src.ident,
        "val_sources": val_src.ident if val_src is not None else None,
        "text_field": spec.text_field,
        "val_fraction": None if val_src is not None else float(spec.val_fraction),
        "tokenizer": tok,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{train_src.stem()}-{tok['kind']}").strip("._")[:64]
    return f"{stem or 'corpus'}-{digest}"


def prepare_corpus(spec: CorpusSpec, tokenizer, cache_dir, *, progress: bool = True) -> Corpus:
    """Tokenize the corpus that ``spec`` describes into ``cache_dir`` (or reuse that cache).

    ``tokenizer`` is the string ``"chars"``, for a ``CharTokenizer`` built from ALL the text of
    the corpus (train and validation, so a held-out split never meets an unknown character), or
    a tokenizer object (``CharTokenizer``, ``ByteTokenizer``, ``RWKVWorldTokenizer``,
    ``HFTokenizer``) used as it is. Returns the ``Corpus``; ``corpus.tokenizer`` is the tokenizer
    its ids belong to. Problems with the data raise ``DataFormatError`` naming the file, line or
    config key and what to do. ``progress`` shows tqdm bars over documents while tokenizing.
    """
    if isinstance(tokenizer, str) and tokenizer != "chars":
        raise ValueError(f"tokenizer must be 'chars' or a tokenizer object, got {tokenizer!r}; "
                         "load others with rwkv_diffusion_rnn.data.tokenizer.load_tokenizer")
    if not 0.0 <= float(spec.val_fraction) < 1.0:
        raise DataFormatError(f"data.val_fraction must be in [0, 1), got {spec.val_fraction}")
    if spec.path is None and spec.hf_dataset is None:
        raise DataFormatError(
            "no corpus given: set data.path (a .txt, .jsonl or .json file, a folder of them, or a "
            "glob) or data.hf_dataset (a Hugging Face dataset name or a save_to_disk folder)"
        )
    if spec.path is not None and spec.hf_dataset is not None:
        raise DataFormatError(
            f"both data.path={spec.path!r} and data.hf_dataset={spec.hf_dataset!r} are set; set "
            "one of them (data.val_path may give separate validation files for either)"
        )
    cache_dir = Path(cache_dir).expanduser().resolve()
    train_src = (_Files(spec.path, "data.path", cache_dir) if spec.path is not None
                 else _HFDataset(spec))
    val_src = _Files(spec.val_path, "data.val_path", cache_dir) if spec.val_path is not None else None
    # stat before reading: a file that changes while it is read leaves a cache that is rebuilt
    records = train_src.records()
    val_records = val_src.records() if val_src is not None else None
    name = _folder_name(spec, train_src, val_src, tokenizer)
    folder = cache_dir / name
    want = None if isinstance(tokenizer, str) else tokenizer_spec(tokenizer)

    if isinstance(tokenizer, CharTokenizer):
        # A chars vocabulary saved with a checkpoint (evaluate, resume) was built by training from
        # this corpus with tokenizer="chars", whose cache is keyed by that string, not by the
        # vocabulary: reuse it when it holds the same vocabulary rather than tokenize a copy.
        built = cache_dir / _folder_name(spec, train_src, val_src, "chars")
        if built.is_dir():
            meta, _ = _stale(built, records, val_records, want)
            if meta is not None:
                return Corpus(built, tokenizer, meta, rebuilt=False)
    if folder.is_dir():
        meta, why = _stale(folder, records, val_records, want)
        if meta is not None:
            tok = tokenizer if want is not None else CharTokenizer(meta["tokenizer"]["chars"])
            return Corpus(folder, tok, meta, rebuilt=False)
        print(f"corpus cache {folder}: {why}; re-tokenizing", flush=True)

    tmp = cache_dir / f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise DataFormatError(os_error_message(e, "data.cache_dir", cache_dir)) from None
    try:
        try:
            tok, meta = _build(tmp, spec, train_src, val_src, tokenizer, records, val_records, progress)
        except OSError as e:
            if e.filename is not None and not str(e.filename).startswith(str(tmp)):
                raise           # reading the corpus: the error names its file
            raise DataFormatError(os_error_message(e, "data.cache_dir", cache_dir)) from None
        old = None
        if folder.exists():
            old = cache_dir / f".{name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(folder, old)
        try:
            os.rename(tmp, folder)
        except OSError:
            # Another process put its build in place between the two renames: use it if sound.
            theirs, _ = _stale(folder, records, val_records, want) if folder.is_dir() else (None, "")
            if theirs is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            tok = tokenizer if want is not None else CharTokenizer(theirs["tokenizer"]["chars"])
            meta = theirs
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Corpus(folder, tok, meta, rebuilt=True)


# --------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------
def _batch(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> dict[str, torch.Tensor]:
    w = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    w = torch.from_numpy(w)
    return {
        "input_ids": w[:, 1:].contiguous(),
        "prev_ids": w[:, 0].contiguous(),
        "attention_mask": torch.ones(w.shape[0], seq_len, dtype=torch.bool),
    }


def _check_sizes(seq_len: int, batch_size: int) -> None:
    if int(seq_len) < 1 or int(batch_size) < 1:
        raise ValueError(f"need seq_len >= 1 and batch_size >= 1, got {seq_len} and {batch_size}")


def _as_tokens(tokens, source: str) -> np.ndarray:
    if getattr(tokens, "ndim", None) != 1:
        raise ValueError(f"{source}: tokens must be a 1-D array, got shape "
                         f"{getattr(tokens, 'shape', type(tokens).__name__)}")
    return tokens


class TrainWindows(EpochBatches):
    """Training batches of windows of ``seq_len + 1`` tokens, one epoch covering the split once.

    Epoch ``e`` draws, from a generator seeded by ``(seed, e)``, a shift in ``[0, seq_len)`` and
    a permutation of the ``n = (N - seq_len) // seq_len`` windows that start at
    ``shift + k * seq_len``; its batches are consecutive slices of that permutation (the last
    incomplete one dropped). The windows of an epoch do not overlap, and their boundaries move
    from epoch to epoch. Iteration and resumption work as ``ResumableDataLoader``'s: iterating
    gives the rest of the current epoch (also after an abandoned pass), ``state_dict()`` counts
    the batches handed out, and after ``load_state_dict`` the next batch is exactly the one that
    would have come next.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, *,
                 source: str = "train split"):
        _check_sizes(seq_len, batch_size)
        self.tokens = _as_tokens(tokens, source)
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)
        self.source = source
        N = len(self.tokens)
        if N < self.seq_len + 1:
            raise DataFormatError(
                f"{source} has {N} tokens, shorter than one window of data.seq_len + 1 = "
                f"{self.seq_len + 1} tokens; lower data.seq_len or use more text (data.path)."
            )
        self.n_windows = (N - self.seq_len) // self.seq_len
        if self.n_windows < self.batch_size:
            raise DataFormatError(
                f"{source} has {N} tokens, which give {self.n_windows} windows of data.seq_len="
                f"{self.seq_len} per epoch ((N - seq_len) // seq_len, as each epoch starts at a "
                f"random shift), fewer than one batch of training.train_batch_size="
                f"{self.batch_size}; lower training.train_batch_size or data.seq_len, or use "
                "more text."
            )
        self._epoch = 0
        self._consumed = 0
        self._order_cache: tuple[int, int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.n_windows // self.batch_size

    def epoch_order(self, epoch: int) -> tuple[int, np.ndarray]:
        """(shift, order of the window indices) of ``epoch``."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            g = np.random.default_rng(epoch_seed(self.seed, epoch))
            shift = int(g.integers(0, self.seq_len))
            self._order_cache = (epoch, shift, g.permutation(self.n_windows))
        return self._order_cache[1], self._order_cache[2]

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        """Batch ``index`` of ``epoch``."""
        shift, order = self.epoch_order(epoch)
        k = order[index * self.batch_size : (index + 1) * self.batch_size]
        return _batch(self.tokens, shift + k * self.seq_len, self.seq_len)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batch_index": self._consumed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "n_windows": self.n_windows, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seq_len", "batch_size", "n_windows"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"the training windows' state was saved with {key}={state[key]!r} but this run "
                    f"has {key}={getattr(self, key)!r}; resume with the same data and batch size "
                    "(data.path, data.seq_len, data.val_fraction, training.train_batch_size) or "
                    "start a fresh run."
                )
        self.seed = int(state.get("seed", self.seed))
        self._epoch, self._consumed = int(state["epoch"]), int(state["batch_index"])
        if self._consumed >= len(self):  # saved right after the last batch of an epoch
            self._epoch, self._consumed = self._epoch + 1, 0


ORDERS = ("shuffled", "stream")      # data.order: TrainWindows, StreamWindows


class StreamWindows(TrainWindows):
    """Training batches that read the split as ``batch_size`` streams (``data.order=stream``):
    row b of every batch continues row b of the batch before, so a model can carry its state
    from one step to the next (truncated backpropagation through time over the corpus).

    The split is cut into ``batch_size`` equal lanes; epoch ``e`` draws (seeded by ``(seed, e)``)
    a shift in ``[0, seq_len)``, and batch ``i`` holds, in each lane, the window of ``seq_len + 1``
    tokens that starts ``shift + i * seq_len`` into the lane. Every batch but an epoch's first
    has ``continues`` set: its windows follow the previous batch's. Resumes as TrainWindows."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, *,
                 source: str = "train split"):
        super().__init__(tokens, seq_len, batch_size, seed, source=source)
        self.lane = len(self.tokens) // self.batch_size
        # windows per lane: the last one starts at most shift + i * seq_len with shift < seq_len
        self.n_windows = max(0, (self.lane - 2 * self.seq_len) // self.seq_len)
        if self.n_windows < 1:
            raise DataFormatError(
                f"{source} has {len(self.tokens)} tokens: cut into training.train_batch_size={self.batch_size} "
                f"streams of {self.lane} tokens, each is too short for two windows of data.seq_len={self.seq_len}; "
                "lower the batch size or data.seq_len, or use more text.")

    def __len__(self) -> int:
        return self.n_windows

    def epoch_order(self, epoch: int) -> tuple[int, np.ndarray]:
        if self._order_cache is None or self._order_cache[0] != epoch:
            g = np.random.default_rng(epoch_seed(self.seed, epoch))
            self._order_cache = (epoch, int(g.integers(0, self.seq_len)), np.arange(self.batch_size))
        return self._order_cache[1], self._order_cache[2]

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        shift, lanes = self.epoch_order(epoch)
        b = _batch(self.tokens, lanes * self.lane + shift + index * self.seq_len, self.seq_len)
        b["continues"] = torch.tensor(index > 0)
        return b


class ValWindows:
    """Validation batches: the fixed non-overlapping windows starting at ``k * seq_len`` for
    ``k < (N - 1) // seq_len``, in order, the last batch possibly smaller; the same every pass.
    Their ``input_ids`` cover tokens ``1 .. num_windows * seq_len`` exactly once."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, *,
                 source: str = "validation split"):
        _check_sizes(seq_len, batch_size)
        self.tokens = _as_tokens(tokens, source)
        self.seq_len, self.batch_size, self.source = int(seq_len), int(batch_size), source
        N = len(self.tokens)
        if N < self.seq_len + 1:
            raise DataFormatError(
                f"{source} has {N} tokens, shorter than one window of data.seq_len + 1 = "
                f"{self.seq_len + 1} tokens; lower data.seq_len, give more validation text "
                "(data.val_path), or a larger data.val_fraction."
            )
        self.num_windows = (N - 1) // self.seq_len

    def __len__(self) -> int:
        return -(-self.num_windows // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, self.num_windows, self.batch_size):
            k = np.arange(start, min(start + self.batch_size, self.num_windows))
            yield _batch(self.tokens, k * self.seq_len, self.seq_len)
