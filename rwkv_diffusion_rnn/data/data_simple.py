"""Paired text-token / sentence-latent data (``data_simple`` is the DiffRwkv pipeline's name): files
on disk, the dataset, batching and resumable order.

On-disk layout (written by ``prepare_latents`` and ``preprocess_tokenize_text``)::

    preprocessed_data/<name>/train_data.json        [{"id", "text", "latent_path"}, ...]
    preprocessed_data/<name>/latents/train/<stem>.npy    float32 [latent_dim]
    preprocessed_data/rwkv_tokens/train/<stem>.npz       input_ids int32 [max_length],
                                                          attention_mask uint8 [max_length]

A token file and a latent file belong together when they share a stem. ``latent_path`` in the
JSON may be absolute, relative to the JSON's directory (what ``prepare_latents`` writes), or
relative to the current directory (older lists); :func:`resolve_data_path` tries them in that order.

Text hashes tie the three together: ``prepare_latents`` writes each entry's ``text_sha256``
(:func:`text_sha256` of its text) into the data list, and ``preprocess_tokenize_text`` lists
``stem -> text_sha256`` of the text each token file was made from in
``<token_dir>/tokens_info.json`` (``"complete": false`` while a run is under way). The dataset
compares that listing with the data list's texts when it is built (no token file is opened for
it) and refuses a pair whose hashes disagree. Token files without a listing (older files, or files
made by hand) cannot be checked; the dataset says so in a warning.

:meth:`TextLatentDataset.arm_vocab_check` makes every token file's ids be checked against the
model's vocabulary (``0 <= id < vocab_size``, never ``mask_id``) the first time the file is read.

The dataset returns one example as ``dict(input_ids=LongTensor[T], attention_mask=BoolTensor[T],
latent=FloatTensor[D])`` with the padding of the ``.npz`` removed, so ``T`` is the real token
count (cut to ``seq_len`` when given). :class:`TextLatentCollator` pads a batch again, to the
longest example or to a fixed ``seq_len``.

:class:`ResumableSampler` fixes the order of every epoch from ``(seed, epoch)`` and can restart in
the middle of an epoch; :class:`ResumableDataLoader` counts the batches the training loop has
actually received (workers fetch ahead), so its ``state_dict()`` is the one to checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..common.errors import DataFormatError
from .epochs import epoch_seed

__all__ = [
    "read_data_json",
    "resolve_data_path",
    "entry_stem",
    "text_sha256",
    "unicode_problem",
    "TOKENS_INFO_FILE",
    "read_tokens_info",
    "dataset_and_indices",
    "TextLatentDataset",
    "TextLatentCollator",
    "collate_text_latent",
    "ResumableSampler",
    "ResumableDataLoader",
    "split_indices",
    "build_dataloaders",
]

_MAX_NAMED = 5  # how many missing files an error names before summarising the rest
TOKENS_INFO_FILE = "tokens_info.json"  # written by preprocess_tokenize_text in each split folder
_SHORT_HASH = 12  # hex digits of a text hash shown in messages


# --------------------------------------------------------------------------------------------
# The JSON list
# --------------------------------------------------------------------------------------------


def read_data_json(json_path: str | os.PathLike, *, require_text: bool = True) -> list[dict]:
    """Read a data list (``train_data.json``): a JSON list of objects with a ``text`` field.

    Raises :class:`DataFormatError` naming the file (and the entry index) when the file is
    missing, is not valid JSON, is not a list, or has an entry without a string ``text``.
    """
    json_path = Path(json_path)
    if not json_path.is_file():
        raise DataFormatError(
            f"{json_path}: data list not found. Create it with "
            "`python -m rwkv_diffusion_rnn.prepare_latents --input <corpus> --name <name>` "
            "(it writes preprocessed_data/<name>/train_data.json and val_data.json)."
        )
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataFormatError(
            f"{json_path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}). "
            "Expected a JSON list like [{\"text\": ..., \"latent_path\": ...}, ...]."
        ) from None
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{json_path}: not UTF-8 text ({e}). Re-save the file as UTF-8.") from None
    if not isinstance(data, list):
        raise DataFormatError(
            f"{json_path}: expected a JSON list of objects with a \"text\" field, got {type(data).__name__}."
        )
    if require_text:
        for i, entry in enumerate(data):
            if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
                what = "an object without a string \"text\" field" if isinstance(entry, dict) else type(entry).__name__
                raise DataFormatError(
                    f"{json_path}: entry {i} is {what}; every entry needs \"text\" "
                    "(fix or remove that entry)."
                )
    return data


def resolve_data_path(path: str | os.PathLike, json_dir: str | os.PathLike | None) -> Path:
    """Resolve a path stored in a data list: absolute, else relative to the JSON's directory,
    else relative to the current directory. Returns the first that exists (or the
    JSON-relative candidate when none does, so errors name where the file was expected)."""
    p = Path(path)
    if p.is_absolute():
        return p
    candidates = ([Path(json_dir) / p] if json_dir is not None else []) + [Path.cwd() / p]
    for c in candidates:
        if c.exists():
            return c
    return candidates[0]


def entry_stem(entry: dict, index: int) -> str:
    """The file stem that names an entry's token and latent files: the stem of its
    ``latent_path``, else its ``id``, else the zero-padded index."""
    lp = entry.get("latent_path")
    if isinstance(lp, str) and lp:
        return Path(lp).stem
    if entry.get("id") is not None:
        return str(entry["id"])
    return f"{index:08d}"


# --------------------------------------------------------------------------------------------
# Texts: their hashes, and the one way a Python str can fail to be text
# --------------------------------------------------------------------------------------------


def text_sha256(text: str) -> str:
    """Hex SHA-256 of ``text`` encoded as UTF-8: what data lists and token listings record of
    the text a latent or token file was made from."""
    # surrogatepass: a hash exists for every str; the CLIs refuse lone surrogates before hashing.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def unicode_problem(text: str) -> str | None:
    """Why ``text`` cannot be encoded as UTF-8 (a lone surrogate, which a JSON ``\\ud800``
    escape can produce), or None when it can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"the text is not valid Unicode: a lone surrogate (U+{ord(text[e.start]):04X}) at "
                f"character {e.start}. Fix that entry (a \\ud800-style JSON escape needs its pair) or remove it")
    return None


def read_tokens_info(token_dir: str | os.PathLike) -> dict | None:
    """``<token_dir>/tokens_info.json`` as a dict, or None when there is none."""
    path = Path(token_dir) / TOKENS_INFO_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataFormatError(
            f"{path}: cannot read ({type(e).__name__}: {e}). Fix: {_TOKENS_FIX} (it rewrites this file)."
        ) from None
    if not isinstance(info, dict):
        raise DataFormatError(f"{path}: expected a JSON object, got {type(info).__name__}. Fix: {_TOKENS_FIX}")
    return info


def _short(h: str | None) -> str:
    return (h or "none")[:_SHORT_HASH]


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


def _listdir_set(d: Path, cache: dict[Path, set[str]]) -> set[str]:
    if d not in cache:
        try:
            cache[d] = set(os.listdir(d))
        except (FileNotFoundError, NotADirectoryError):
            cache[d] = set()
    return cache[d]


def _exists(p: Path, cache: dict[Path, set[str]]) -> bool:
    # One listdir per directory instead of one stat per file: fast for 10^5+ files.
    return p.name in _listdir_set(p.parent, cache)


def _missing_error(kind: str, missing: list[Path], total: int, fix: str) -> str:
    named = "\n  ".join(str(p) for p in missing[:_MAX_NAMED])
    more = f"\n  ... and {len(missing) - _MAX_NAMED} more" if len(missing) > _MAX_NAMED else ""
    return f"{len(missing)} of {total} {kind} files are missing:\n  {named}{more}\nFix: {fix}"


_TOKENS_FIX = (
    "run `python -m rwkv_diffusion_rnn.preprocess_tokenize_text --json_path <train_data.json> "
    "--output_dir <token root>` and point data.token_dir at <token root>/<split>."
)
_LATENTS_FIX = (
    "run `python -m rwkv_diffusion_rnn.prepare_latents --input <corpus> --name <name>` and point "
    "data.latent_dir at preprocessed_data/<name>/latents/<split> (or use the JSON it writes)."
)


class TextLatentDataset(Dataset):
    """Pairs tokenized text (``.npz``) with its sentence latent (``.npy``).

    Two ways to say which examples exist:

    * ``json_path`` given: the entries of that data list, in order. The token file of an entry is
      ``<token_dir>/<stem>.npz``; its latent is the entry's ``latent_path`` (resolved as in
      :func:`resolve_data_path`) or ``<latent_dir>/<stem>.npy`` when ``latent_dir`` is given.
    * ``json_path=None``: every ``<stem>.npz`` in ``token_dir`` paired with ``<latent_dir>/<stem>.npy``,
      sorted by stem (this is what ``data.token_dir`` / ``data.latent_dir`` select).

    All files are checked for existence when the dataset is built, and every missing file is
    reported in one error. The first latent's size is checked then too; every latent's size and
    finiteness is checked when it is loaded. ``seq_len`` cuts token sequences longer than it;
    ``latent_dim`` is the size every latent must have (``model.latent_dim``).
    """

    def __init__(
        self,
        json_path: str | os.PathLike | None,
        token_dir: str | os.PathLike,
        latent_dir: str | os.PathLike | None = None,
        max_samples: int | None = None,
        seq_len: int | None = None,
        latent_dim: int | None = None,
    ):
        if token_dir is None:
            raise DataFormatError("token_dir is required (data.token_dir): the directory of tokenized .npz files.")
        self.token_dir = Path(token_dir)
        self.latent_dir = Path(latent_dir) if latent_dir is not None else None
        self.json_path = Path(json_path) if json_path is not None else None
        self.seq_len = seq_len
        self.latent_dim = latent_dim
        if seq_len is not None and seq_len < 1:
            raise DataFormatError(f"seq_len must be >= 1, got {seq_len}.")
        if not self.token_dir.is_dir():
            raise DataFormatError(f"token directory {self.token_dir} does not exist (data.token_dir). Fix: {_TOKENS_FIX}")

        cache: dict[Path, set[str]] = {}
        self._vocab: tuple[int, int | None] | None = None  # (vocab_size, mask_id) once armed
        self._ids_checked = np.zeros(0, dtype=bool)
        entries: list[dict] | None = None
        if self.json_path is not None:
            entries = read_data_json(self.json_path)
            if max_samples is not None:
                entries = entries[:max_samples]
            json_dir = self.json_path.parent
            self.texts: list[str] | None = [e["text"] for e in entries]
            self.stems = [entry_stem(e, i) for i, e in enumerate(entries)]
            self.token_paths = [self.token_dir / f"{s}.npz" for s in self.stems]
            if self.latent_dir is not None:
                self.latent_paths = [self.latent_dir / f"{s}.npy" for s in self.stems]
            else:
                self.latent_paths = []
                for i, e in enumerate(entries):
                    lp = e.get("latent_path")
                    if not isinstance(lp, str) or not lp:
                        raise DataFormatError(
                            f"{self.json_path}: entry {i} has no \"latent_path\"; add it, or pass "
                            "latent_dir (data.latent_dir) so latents are found as <latent_dir>/<stem>.npy."
                        )
                    self.latent_paths.append(resolve_data_path(lp, json_dir))
            source = str(self.json_path)
        else:
            if self.latent_dir is None:
                raise DataFormatError(
                    "latent_dir (data.latent_dir) is required when no JSON data list is given: "
                    "latents are paired with token files by file stem."
                )
            if not self.latent_dir.is_dir():
                raise DataFormatError(f"latent directory {self.latent_dir} does not exist (data.latent_dir). Fix: {_LATENTS_FIX}")
            self.texts = None
            token_stems = sorted(n[:-4] for n in _listdir_set(self.token_dir, cache) if n.endswith(".npz"))
            latent_stems = {n[:-4] for n in _listdir_set(self.latent_dir, cache) if n.endswith(".npy")}
            if not token_stems:
                hint = ""
                subdirs = sorted(p.name for p in self.token_dir.iterdir() if p.is_dir())
                if subdirs:
                    hint = f" It has subdirectories {subdirs}: point data.token_dir at one split, e.g. {self.token_dir / subdirs[0]}."
                raise DataFormatError(f"{self.token_dir}: no .npz token files (data.token_dir).{hint} Fix: {_TOKENS_FIX}")
            orphans = sorted(latent_stems.difference(token_stems))
            if max_samples is not None:
                token_stems = token_stems[:max_samples]
                orphans = []  # a capped run only needs latents for the tokens it uses
            if orphans:
                raise DataFormatError(
                    _missing_error("token", [self.token_dir / f"{s}.npz" for s in orphans],
                                   len(latent_stems), _TOKENS_FIX)
                    + f"\n(these latents in {self.latent_dir} have no token file in {self.token_dir})"
                )
            self.stems = token_stems
            self.token_paths = [self.token_dir / f"{s}.npz" for s in self.stems]
            self.latent_paths = [self.latent_dir / f"{s}.npy" for s in self.stems]
            source = f"{self.token_dir} + {self.latent_dir}"

        if not self.stems:
            raise DataFormatError(f"{source}: no examples (the data list is empty). Fix: {_LATENTS_FIX}")
        seen: dict[str, int] = {}
        for i, s in enumerate(self.stems):
            if s in seen:
                raise DataFormatError(
                    f"{source}: entries {seen[s]} and {i} share the file stem {s!r}; each example needs "
                    "its own latent file name. Re-run prepare_latents to write unique ids."
                )
            seen[s] = i

        missing_tok = [p for p in self.token_paths if not _exists(p, cache)]
        missing_lat = [p for p in self.latent_paths if not _exists(p, cache)]
        problems = []
        if missing_tok:
            problems.append(_missing_error("token", missing_tok, len(self.stems), _TOKENS_FIX))
        if missing_lat:
            problems.append(_missing_error("latent", missing_lat, len(self.stems), _LATENTS_FIX))
        if problems:
            raise DataFormatError(f"{source}: " + "\n".join(problems))
        self._check_text_hashes(entries)
        # Fail at start-up, not mid-epoch, when the latent size does not match the model.
        self._load_latent(0)

    def __len__(self) -> int:
        return len(self.stems)

    # ---- text hashes: token files made from the texts the latents were made from --------------

    def _sibling_data_list(self) -> Path | None:
        """Directory pairing: the data list prepare_latents wrote next to ``latent_dir``
        (``<name>/latents/<split>`` -> ``<name>/<split>_data.json``), if there is one."""
        if self.latent_dir is None:
            return None
        p = self.latent_dir.parent.parent / f"{self.latent_dir.name}_data.json"
        return p if p.is_file() else None

    def _expected_hashes(self, entries: list[dict] | None) -> tuple[list[str | None], str | None]:
        """The text hash every token file should have, and the file the texts come from."""
        if entries is None:
            listing = self._sibling_data_list()
            if listing is None:
                return [None] * len(self.stems), None
            by_stem = {entry_stem(e, i): e for i, e in enumerate(read_data_json(listing))}
            found = [by_stem.get(s) for s in self.stems]
            return [None if e is None else self._entry_hash(e, listing, s) for e, s in zip(found, self.stems)], str(listing)
        return [self._entry_hash(e, self.json_path, s) for e, s in zip(entries, self.stems)], str(self.json_path)

    @staticmethod
    def _entry_hash(entry: dict, json_path, stem: str) -> str:
        h = text_sha256(entry["text"])
        recorded = entry.get("text_sha256")
        if recorded is not None and recorded != h:
            # The text was edited after prepare_latents made the latent from it.
            raise DataFormatError(
                f"{json_path}: entry {stem!r} records text_sha256 {_short(recorded)} (the text its latent was "
                f"made from) but its text now hashes to {_short(h)}: the text was changed after the latent was "
                f"made. Fix: {_LATENTS_FIX} Then re-run preprocess_tokenize_text."
            )
        return h

    def _check_text_hashes(self, entries: list[dict] | None) -> None:
        """Refuse token files listed as made from another text than the data list's (a data list
        replaced after tokenizing). Reads tokens_info.json only, never the token files."""
        expected, texts_from = self._expected_hashes(entries)
        if texts_from is None:
            return  # directory pairing without a data list: no texts to compare with
        info = read_tokens_info(self.token_dir)
        info_path = self.token_dir / TOKENS_INFO_FILE
        listed = info.get("text_sha256") if info is not None else None
        if not isinstance(listed, dict):
            why = f"it has no {TOKENS_INFO_FILE}" if info is None else f"its {TOKENS_INFO_FILE} records no text hashes (older file)"
            warnings.warn(
                f"{self.token_dir}: cannot check that these token files were made from the texts of {texts_from}: "
                f"{why}. Re-run preprocess_tokenize_text on that data list to record them.", stacklevel=3)
            return
        if info.get("complete") is False:
            raise DataFormatError(
                f"{info_path}: records an unfinished preprocess_tokenize_text run (killed or failed part-way), so "
                f"the token files in {self.token_dir} may not match {texts_from}. Fix: re-run preprocess_tokenize_text "
                "with the same arguments; it finishes the job and marks the listing complete."
            )
        bad = [i for i, h in enumerate(expected) if h is not None and listed.get(self.stems[i], h) != h]
        if bad:
            i = bad[0]
            raise DataFormatError(
                f"{self.token_paths[i]}: made from another text than {texts_from} entry {i} (stem {self.stems[i]!r}): "
                f"the token file's text_sha256 is {_short(listed[self.stems[i]])}, the entry's text hashes to "
                f"{_short(expected[i])} ({len(bad)} of {len(self.stems)} token files disagree; the data list was "
                f"replaced after tokenizing, e.g. by prepare_latents --overwrite). Fix: re-run "
                f"`python -m rwkv_diffusion_rnn.preprocess_tokenize_text --json_path {texts_from} --output_dir "
                f"{self.token_dir.parent}`; it rewrites the token files whose text changed."
            )
        unlisted = sum(1 for i, h in enumerate(expected) if h is not None and self.stems[i] not in listed)
        if unlisted:
            warnings.warn(
                f"{info_path}: {unlisted} of {len(self.stems)} token files have no recorded text hash, so they "
                f"cannot be checked against {texts_from}. Re-run preprocess_tokenize_text to record them.",
                stacklevel=3)

    # ---- token ids: inside the model's vocabulary ---------------------------------------------

    def arm_vocab_check(self, vocab_size: int, mask_id: int | None) -> None:
        """From now on, check each token file's ids the first time it is read: real tokens
        (attention_mask 1) must lie in ``[0, vocab_size)`` and must not be ``mask_id``."""
        self._vocab = (int(vocab_size), None if mask_id is None else int(mask_id))
        self._ids_checked = np.zeros(len(self.stems), dtype=bool)  # one flag per file, not a set

    def check_token_ids(self, indices: Sequence[int] | None = None, *, desc: str = "checking token ids",
                        progress: bool = True) -> None:
        """Read token files ``indices`` (all by default) now, so a bad id is reported before
        training instead of when the file is first batched. Needs :meth:`arm_vocab_check`."""
        if self._vocab is None:
            raise RuntimeError("check_token_ids needs arm_vocab_check(vocab_size, mask_id) first")
        from tqdm.auto import tqdm

        idx = range(len(self)) if indices is None else indices
        for i in tqdm(idx, desc=desc, unit="file", disable=not progress or len(idx) < 2000):
            if not self._ids_checked[i]:
                self._load_tokens(i)

    def _check_ids(self, i: int, ids: np.ndarray, mask: np.ndarray | None) -> None:
        vocab_size, mask_id = self._vocab
        real = np.flatnonzero(mask) if mask is not None else np.arange(ids.size)
        values = ids[real].astype(np.int64)  # pad positions carry pad_id, which may be any id: skipped
        bad = (values < 0) | (values >= vocab_size)
        if mask_id is not None:
            bad |= values == mask_id
        if bad.any():
            k = int(np.argmax(bad))
            pos, v = int(real[k]), int(values[k])
            what = (f"is model.mask_id {mask_id}, which marks noised positions and cannot be a data token"
                    if v == mask_id else f"is outside the vocabulary [0, {vocab_size})")
            raise DataFormatError(
                f"{self.token_paths[i]}: input_ids[{pos}] = {v} {what} (model.vocab_size={vocab_size}, "
                f"model.mask_id={mask_id}; {int(bad.sum())} such ids in this file). {self._made_with()}"
                "Fix: tokenize with the model's tokenizer (preprocess_tokenize_text --tokenizer ... --overwrite), "
                "or set tokenizer.name / model.vocab_size / model.mask_id to the tokenizer that made these files."
            )
        self._ids_checked[i] = True

    def _made_with(self) -> str:
        try:
            info = read_tokens_info(self.token_dir) or {}
        except DataFormatError:
            info = {}
        if "tokenizer" not in info:
            return ""
        return (f"{self.token_dir / TOKENS_INFO_FILE} says they were made with tokenizer={info['tokenizer']!r} "
                f"(vocab_size {info.get('vocab_size')}, mask_id {info.get('mask_id')}). ")

    def _load_latent(self, i: int) -> np.ndarray:
        path = self.latent_paths[i]
        try:
            lat = np.load(path, allow_pickle=False)
        except Exception as e:  # corrupt or not a .npy
            raise DataFormatError(f"{path}: cannot read latent ({e}). Re-run prepare_latents for this corpus.") from None
        if lat.ndim == 2 and lat.shape[0] == 1:
            lat = lat[0]
        if lat.ndim != 1:
            raise DataFormatError(f"{path}: latent has shape {lat.shape}, expected a vector [latent_dim]. {_LATENTS_FIX}")
        if self.latent_dim is not None and lat.shape[0] != self.latent_dim:
            raise DataFormatError(
                f"{path}: latent has {lat.shape[0]} dims but model.latent_dim is {self.latent_dim}. "
                f"Set model.latent_dim={lat.shape[0]}, or re-run prepare_latents with --latent_dim {self.latent_dim}."
            )
        if not np.all(np.isfinite(lat)):
            raise DataFormatError(f"{path}: latent contains NaN or inf values. Re-run prepare_latents for this corpus.")
        return lat.astype(np.float32, copy=False)

    def _load_tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        path = self.token_paths[i]
        try:
            with np.load(path, allow_pickle=False) as z:
                if "input_ids" not in z.files:
                    raise DataFormatError(f"{path}: no \"input_ids\" array (has {z.files}). {_TOKENS_FIX}")
                ids = np.asarray(z["input_ids"]).reshape(-1)
                mask = np.asarray(z["attention_mask"]).reshape(-1) if "attention_mask" in z.files else None
        except DataFormatError:
            raise
        except Exception as e:
            raise DataFormatError(f"{path}: cannot read token file ({e}). Fix: {_TOKENS_FIX}") from None
        if mask is not None and mask.shape != ids.shape:
            raise DataFormatError(f"{path}: attention_mask shape {mask.shape} != input_ids shape {ids.shape}. {_TOKENS_FIX}")
        if self._vocab is not None and not self._ids_checked[i]:
            self._check_ids(i, ids, mask)
        if mask is not None:
            ids = ids[mask.astype(bool)]
        return ids, mask

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, _ = self._load_tokens(i)
        if self.seq_len is not None:
            ids = ids[: self.seq_len]
        input_ids = torch.from_numpy(ids.astype(np.int64))
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones(input_ids.shape[0], dtype=torch.bool),
            "latent": torch.from_numpy(self._load_latent(i).copy()),
        }


def dataset_and_indices(ds: Dataset) -> tuple[Dataset, list[int] | None]:
    """The dataset under (nested) ``Subset``s and the indices into it they select (None: all)."""
    indices: list[int] | None = None
    while isinstance(ds, Subset):
        indices = list(ds.indices) if indices is None else [ds.indices[j] for j in indices]
        ds = ds.dataset
    return ds, indices


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


@dataclass
class TextLatentCollator:
    """Stack examples into a batch, right-padding ``input_ids`` with ``pad_id``.

    Pads to the longest example in the batch, or to exactly ``seq_len`` when given (longer
    examples are cut). ``attention_mask`` is True on real tokens.
    """

    pad_id: int = 0
    seq_len: int | None = None

    def __call__(self, batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return collate_text_latent(batch, pad_id=self.pad_id, seq_len=self.seq_len)


def collate_text_latent(
    batch: Sequence[dict[str, torch.Tensor]], pad_id: int = 0, seq_len: int | None = None
) -> dict[str, torch.Tensor]:
    if len(batch) == 0:
        raise ValueError("cannot collate an empty batch")
    lengths = [min(int(b["input_ids"].shape[0]), seq_len) if seq_len is not None else int(b["input_ids"].shape[0]) for b in batch]
    L = seq_len if seq_len is not None else max(1, max(lengths))
    input_ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), L), dtype=torch.bool)
    for j, (b, n) in enumerate(zip(batch, lengths)):
        input_ids[j, :n] = b["input_ids"][:n]
        mask[j, :n] = b["attention_mask"][:n] if "attention_mask" in b else True
    latent = torch.stack([b["latent"] for b in batch]).float()
    return {"input_ids": input_ids, "attention_mask": mask, "latent": latent}


# --------------------------------------------------------------------------------------------
# Resumable order
# --------------------------------------------------------------------------------------------


class ResumableSampler(torch.utils.data.Sampler[list[int]]):
    """Yields batches of indices into a dataset of size ``n``; one pass of ``__iter__`` is the
    rest of the current epoch.

    The order of epoch ``e`` is ``torch.randperm(n)`` drawn from a generator seeded by
    ``(seed, e)`` (or ``range(n)`` when ``shuffle=False``), so it does not depend on what ran
    before. ``state_dict()`` holds ``epoch``, ``batch_index`` (batches of that epoch already
    handed out) and ``seed``; after ``load_state_dict`` the next batch is exactly the one that
    would have come next. Use as ``DataLoader(..., batch_sampler=sampler)``.

    ``len()`` is the number of batches in a full epoch.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = False):
        if n < 0 or batch_size < 1:
            raise ValueError(f"need n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
        self.n = int(n)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.batch_index = 0

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        return (self.n + self.batch_size - 1) // self.batch_size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator()
        g.manual_seed(epoch_seed(self.seed, epoch))
        return torch.randperm(self.n, generator=g)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch."""
        self.epoch = int(epoch)
        self.batch_index = 0

    def __iter__(self) -> Iterator[list[int]]:
        order = self.epoch_order(self.epoch)
        nb = len(self)
        while self.batch_index < nb:
            b = self.batch_index
            idx = order[b * self.batch_size : (b + 1) * self.batch_size].tolist()
            self.batch_index += 1
            yield idx
        self.epoch += 1
        self.batch_index = 0

    def state_dict(self) -> dict[str, int | bool]:
        return {
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "seed": self.seed,
            "n": self.n,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("n", "batch_size", "shuffle", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]!r} but this run has "
                    f"{key}={getattr(self, key)!r}; resume with the same dataset and batch size "
                    "(same data.max_samples and training.train_batch_size) or start a fresh run."
                )
        self.seed = int(state.get("seed", self.seed))
        self.epoch = int(state["epoch"])
        self.batch_index = int(state["batch_index"])
        if self.batch_index >= len(self):  # saved right after the last batch of an epoch
            self.epoch += 1
            self.batch_index = 0


class ResumableDataLoader:
    """A DataLoader over a :class:`ResumableSampler` whose ``state_dict()`` counts the batches
    the caller has received, not those the workers have already fetched ahead.

    Iterating gives the rest of the current epoch. Checkpoint ``state_dict()``; after
    ``load_state_dict()`` iteration continues with the next unseen batch.
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, collate_fn=None, num_workers: int = 0,
                 pin_memory: bool = False, **loader_kwargs):
        self.dataset = dataset
        self.sampler = sampler
        self._epoch = sampler.epoch
        self._consumed = sampler.batch_index
        self.loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate_fn,
            num_workers=num_workers,
            pin_memory=pin_memory,
            **loader_kwargs,
        )

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def at_epoch_end(self) -> bool:
        """Every batch of the current epoch has been handed out (the next one starts a new epoch)."""
        return self._consumed >= len(self.sampler)

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # Rewind the sampler to what was consumed: an earlier pass may have been abandoned
        # while workers had fetched ahead.
        self.sampler.epoch, self.sampler.batch_index = self._epoch, self._consumed
        if self._consumed >= len(self.sampler):
            self.sampler.set_epoch(self._epoch + 1)
            self._epoch, self._consumed = self.sampler.epoch, 0
        for batch in self.loader:
            self._consumed += 1
            yield batch
        self._epoch += 1
        self._consumed = 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch, self._consumed = int(epoch), 0
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, int | bool]:
        state = self.sampler.state_dict()
        state.update(epoch=self._epoch, batch_index=self._consumed)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._epoch, self._consumed = self.sampler.epoch, self.sampler.batch_index


# --------------------------------------------------------------------------------------------
# Building loaders
# --------------------------------------------------------------------------------------------


def split_indices(n: int, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Deterministic train/val split of ``range(n)``: ``round(n * val_fraction)`` indices (at
    least one when ``val_fraction > 0`` and ``n >= 2``) go to val. Both lists are sorted."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, max(0, n - 1))
    g = torch.Generator()
    g.manual_seed(epoch_seed(seed, -1))
    perm = torch.randperm(n, generator=g).tolist()
    val = sorted(perm[:n_val])
    val_set = set(val)
    train = [i for i in range(n) if i not in val_set]
    return train, val


def build_dataloaders(
    *,
    token_dir: str | os.PathLike,
    latent_dir: str | os.PathLike | None = None,
    json_path: str | os.PathLike | None = None,
    val_token_dir: str | os.PathLike | None = None,
    val_latent_dir: str | os.PathLike | None = None,
    val_json_path: str | os.PathLike | None = None,
    val_fraction: float = 0.0,
    batch_size: int = 8,
    eval_batch_size: int | None = None,
    seq_len: int | None = None,
    latent_dim: int | None = None,
    max_samples: int | None = None,
    num_workers: int = 0,
    seed: int = 0,
    pad_id: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    pin_memory: bool = False,
    pad_to_seq_len: bool = False,
) -> tuple[ResumableDataLoader, DataLoader | None]:
    """Train and validation loaders.

    Validation data is the separate set given by ``val_token_dir`` (+ ``val_latent_dir`` and/or
    ``val_json_path``) when present; otherwise ``val_fraction`` of the training set is held out
    deterministically by ``seed`` (none when 0). ``max_samples`` caps the training set before
    that split (and the separate validation set). Returns ``(train_loader, val_loader or None)``;
    the train loader is resumable, the val loader is a plain ordered DataLoader.

    ``seq_len`` cuts longer examples; batches are padded to their longest example, or to exactly
    ``seq_len`` with ``pad_to_seq_len=True`` (fixed shapes).
    """
    if val_token_dir is None and (val_json_path is not None or val_latent_dir is not None):
        raise DataFormatError(
            "data.val_json_path / data.val_latent_dir are set but data.val_token_dir is not; set "
            "data.val_token_dir to the tokenized validation split (e.g. preprocessed_data/rwkv_tokens/val), "
            "or clear them to hold out data.val_fraction of the training set."
        )
    collate = TextLatentCollator(pad_id=pad_id, seq_len=seq_len if pad_to_seq_len else None)
    full = TextLatentDataset(json_path, token_dir, latent_dir, max_samples=max_samples, seq_len=seq_len,
                             latent_dim=latent_dim)
    val_ds: Dataset | None = None
    if val_token_dir is not None:
        train_ds: Dataset = full
        val_ds = TextLatentDataset(val_json_path, val_token_dir, val_latent_dir, max_samples=max_samples,
                                   seq_len=seq_len, latent_dim=latent_dim)
    elif val_fraction > 0:
        tr, va = split_indices(len(full), val_fraction, seed)
        train_ds, val_ds = Subset(full, tr), (Subset(full, va) if va else None)
    else:
        train_ds = full
    sampler = ResumableSampler(len(train_ds), batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last)
    if len(sampler) == 0:
        raise DataFormatError(
            f"the training set has {len(train_ds)} examples, fewer than one batch of {batch_size} with "
            "drop_last; lower the batch size or add data (data.max_samples)."
        )
    train_loader = ResumableDataLoader(train_ds, sampler, collate_fn=collate, num_workers=num_workers,
                                       pin_memory=pin_memory)
    val_loader = None
    if val_ds is not None:
        val_loader = DataLoader(val_ds, batch_size=eval_batch_size or batch_size, shuffle=False,
                                collate_fn=collate, num_workers=num_workers, pin_memory=pin_memory)
    return train_loader, val_loader
