"""Tokenizers: the RWKV World vocabulary (rwkv7-g1's), and any Hugging Face tokenizer by name.

RWKV World (``rwkv_vocab_v20230424``, 65536 ids) tokenizes the UTF-8 bytes of a text by greedy
longest match: at each position take the longest vocabulary entry that matches there. BlinkDL's
``TRIE_TOKENIZER`` (in the ``rwkv`` package) is the definition; this module gives the same ids on
any text, faster, with two interchangeable encoders:

* ``"rust"``: the compiled ``pyrwkv_tokenizer`` package, used when it is installed;
* ``"python"``: our own encoder (numpy), always available; see ``_GreedyEncoder``.

Both read the vocabulary file that an installed package ships (``rwkv``, else ``pyrwkv_tokenizer``).

Special ids: 0 is end of text (RWKV's document separator, also used for padding) and 65535 is the
mask token of masked diffusion; no text ever encodes to either.

Two character-level tokenizers, for language modelling on small corpora (nanoGPT's
shakespeare_char):

* ``CharTokenizer``: one id per character of a fixed vocabulary (the sorted characters of the
  training text), then end of text and mask;
* ``ByteTokenizer``: one id per UTF-8 byte (0..255), then end of text (256) and mask (257).

``load_tokenizer(name)`` returns an ``RWKVWorldTokenizer`` for RWKV World names, the character-level
tokenizers for ``"chars"`` and ``"bytes"``, and otherwise wraps ``transformers.AutoTokenizer`` in
``HFTokenizer``; all have the same interface. ``tokenizer_spec`` describes a tokenizer as JSON and
``tokenizer_from_spec`` rebuilds it (checkpoints and corpus caches store the spec).

``count_chars(ids)`` is the number of characters the ids stand for, counted so that the counts over
consecutive pieces of one token stream add up to the characters of its text (a character split
between two pieces counts where it starts); bits per character are computed from it. It is None
for Hugging Face tokenizers, whose ids need not map onto characters.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import threading
from itertools import chain
from typing import Iterable, Sequence, Union

import numpy as np

from ..common.errors import UnknownCharacterError


VOCAB_FILENAME = "rwkv_vocab_v20230424.txt"
RWKV_WORLD_VOCAB_SIZE = 65536
RWKV_WORLD_EOS_ID = 0
RWKV_WORLD_MASK_ID = 65535
DEFAULT_TOKENIZER = "BlinkDL/rwkv7-g1"

# Installed packages that ship the vocabulary file, in order of preference.
_VOCAB_PACKAGES = ("rwkv", "pyrwkv_tokenizer")
# Names (case-insensitive prefixes) that mean the RWKV World vocabulary.
_RWKV_WORLD_PREFIXES = ("blinkdl/rwkv", "rwkv_vocab_v20230424", "rwkv-world")


# --------------------------------------------------------------------------------------------
# The vocabulary file
# --------------------------------------------------------------------------------------------
def find_vocab_file() -> str:
    """Path of ``rwkv_vocab_v20230424.txt`` as shipped by an installed package (``rwkv`` first)."""
    for package in _VOCAB_PACKAGES:
        # find_spec on a top-level package locates it without importing (running) it.
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            path = os.path.join(folder, VOCAB_FILENAME)
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(
        f"The RWKV World vocabulary ({VOCAB_FILENAME}) was not found: it ships with the `rwkv` "
        "package. Install it with `pip install rwkv` (or `pip install pyrwkv-tokenizer`), or "
        "pass the path of a vocabulary file as the tokenizer name."
    )


@functools.lru_cache(maxsize=4)
def read_vocab(path: str) -> tuple[bytes | None, ...]:
    """Read a vocabulary in the RWKV World format: ``<id> <python literal> <byte length>`` lines.

    Returns a tuple indexed by id giving the token's bytes, or None for ids without a token
    (0, and the unused ids at the top such as the mask id).
    """
    with open(path, encoding="utf-8") as f:
        lines = [(n, line) for n, line in enumerate(f.read().splitlines(), 1) if line.strip()]
    if not lines:
        raise ValueError(f"{path}: the vocabulary file is empty")

    def bad_line(line_no: int, line: str, why: str) -> ValueError:
        return ValueError(
            f"{path}:{line_no}: {why}; a vocabulary line reads `<id> <python str or bytes "
            f"literal> <byte length>`, got {line[:80]!r}"
        )

    ids, literals, lengths = [], [], []
    for line_no, line in lines:
        try:
            first, last = line.index(" "), line.rindex(" ")
            ids.append(int(line[:first]))
            lengths.append(int(line[last:]))
        except ValueError:
            raise bad_line(line_no, line, "no id or byte length") from None
        literals.append(line[first:last])
    try:  # one parse of all literals is ~6x faster than one per line
        tokens = ast.literal_eval("[" + ",\n".join(literals) + "]")
        if len(tokens) != len(literals):
            raise ValueError("a line holds more than one literal")
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        tokens = []
        for (line_no, line), literal in zip(lines, literals):
            try:
                tokens.append(ast.literal_eval(literal.strip()))
            except (ValueError, SyntaxError) as e:
                raise bad_line(line_no, line, f"the token is not a literal ({e})") from None
    table: dict[int, bytes] = {}
    for (line_no, line), idx, token, length in zip(lines, ids, tokens, lengths):
        if isinstance(token, str):
            token = token.encode("utf-8")
        if not isinstance(token, bytes) or len(token) != length or not token:
            raise bad_line(line_no, line, f"the token does not have byte length {length}")
        if idx in table or idx < 0:
            raise bad_line(line_no, line, f"id {idx} is negative or appears twice")
        table[idx] = token
    if len(set(table.values())) != len(table):
        raise ValueError(f"{path}: some token appears under two ids")
    known = set(table.values())
    missing = [b for b in range(256) if bytes([b]) not in known]
    if missing:
        # Greedy longest match needs every single byte as a token to encode any input.
        raise ValueError(f"{path}: the single bytes {missing[:8]} have no token")
    id_to_token: list[bytes | None] = [None] * (max(table) + 1)
    for idx, token in table.items():
        id_to_token[idx] = token
    return tuple(id_to_token)


# --------------------------------------------------------------------------------------------
# Encoders (bytes -> ids), both greedy longest match
# --------------------------------------------------------------------------------------------
class _GreedyEncoder:
    """Greedy longest-match encoder in Python + numpy, with the same ids as ``TRIE_TOKENIZER``.

    Why it is fast: a token can only span the boundary between two bytes ``a b`` if the pair
    ``ab`` occurs inside some vocabulary token. Where it does not (about every 4th byte of English,
    every character of Chinese), every tokenization, the greedy one included, has a boundary, so
    the text splits there into short segments that tokenize independently. numpy finds those
    cuts; each segment is looked up in a cache of segment -> ids (seeded with the vocabulary), and
    only segments never seen before are tokenized in Python, by walking prefixes of the vocabulary.

    For long inputs the cache lookup itself is vectorized: a segment of at most 15 bytes is
    packed exactly into two uint64 (its bytes, and its length in the top byte) and looked up in
    an open-addressing hash table held in numpy arrays. A cached segment's value is its token id
    when it is one token, else ``-2 - r`` for run ``r`` of ids in ``_runs``. Short inputs and
    longer segments use dicts.
    """

    MAX_PACKED_LEN = 15  # segments up to this long go in the numpy hash table
    MAX_DICT_LEN = 64  # longer segments are tokenized every time, not cached
    MAX_CACHED = 1 << 19  # cached segments at which a cache is reset to the vocabulary
    SMALL_INPUT = 512  # bytes; below this the plain-Python path has less overhead
    TINY_INPUT = 80  # bytes; below this, finding the cuts in Python beats numpy
    _MULT_LO = np.uint64(0x9E3779B97F4A7C15)
    _MULT_HI = np.uint64(0xC2B2AE3D27D4EB4F)

    def __init__(self, id_to_token: Sequence[bytes | None]):
        self._token_to_id = {t: i for i, t in enumerate(id_to_token) if t is not None}
        pairs_inside = set()
        # For every prefix of a token: (length, id) of the longest token that is a prefix of it.
        longest: dict[bytes, tuple[int, int]] = {}
        for token in self._token_to_id:
            pairs_inside.update(a << 8 | b for a, b in zip(token, token[1:]))
            for k in range(1, len(token) + 1):
                prefix = token[:k]
                if prefix in self._token_to_id:
                    longest[prefix] = (k, self._token_to_id[prefix])
                elif prefix not in longest:
                    longest[prefix] = longest[token[: k - 1]]
        self._cut_between = np.ones(1 << 16, dtype=bool)
        self._cut_between[np.fromiter(pairs_inside, dtype=np.int64)] = False
        self._cut_list = self._cut_between.tolist()
        self._longest = longest
        # Key parts by segment length L = 0..16 (16 stands for "longer than 15", never stored):
        # lo keeps bytes 0-7, hi keeps bytes 8-14 and holds L in its top byte.
        lengths = np.arange(17)
        keep = lambda n: (np.uint64(1) << (8 * n).astype(np.uint64)) - np.uint64(1)  # noqa: E731
        self._lo_mask = np.where(lengths >= 8, np.uint64(2**64 - 1), keep(np.minimum(lengths, 7)))
        self._hi_mask = keep(np.clip(lengths - 8, 0, 7))
        self._hi_mask[16] = self._hi_mask[15]
        self._hi_len = lengths.astype(np.uint64) << np.uint64(56)
        self._lock = threading.Lock()
        self._reset_caches()

    # ---- tokenizing one segment from scratch ----
    def _encode_segment(self, seg: bytes) -> tuple[int, ...]:
        longest, out, i, n = self._longest, [], 0, len(seg)
        while i < n:
            # Walk down the prefixes of the vocabulary as far as the text allows.
            j, best = i + 1, longest[seg[i : i + 1]]
            while j < n:
                nxt = longest.get(seg[i : j + 1])
                if nxt is None:
                    break
                best, j = nxt, j + 1
            out.append(best[1])
            i += best[0]
        return tuple(out)

    # ---- caches ----
    def _reset_caches(self) -> None:
        # Dict cache of the plain-Python path: segment -> ids.
        self._dict_cache = {t: (i,) for t, i in self._token_to_id.items()}
        # Ids of multi-token segments: run r is _runs[_run_off[r] : _run_off[r] + _run_cnt[r]].
        self._runs = np.zeros(0, dtype=np.int64)
        self._run_off = np.zeros(0, dtype=np.int64)
        self._run_cnt = np.zeros(0, dtype=np.int64)
        self._code_of_long: dict[bytes, int] = {}  # segments of 16-64 bytes -> value
        short = [t for t in self._token_to_id if len(t) <= self.MAX_PACKED_LEN]
        # Start at load <= 1/4 (the table doubles when it passes 1/2).
        self._table_bits = max(10, (4 * len(short)).bit_length())
        self._table_count, self._max_probe = 0, 0
        self._alloc_table()
        lengths = np.fromiter(map(len, short), dtype=np.int64, count=len(short))
        lo, hi = self._pack(b"".join(short), np.cumsum(lengths) - lengths, lengths)
        self._insert(lo, hi, np.fromiter(map(self._token_to_id.get, short), dtype=np.int64))

    def _alloc_table(self) -> None:
        size = 1 << self._table_bits
        self._tab_lo = np.zeros(size, dtype=np.uint64)
        self._tab_hi = np.zeros(size, dtype=np.uint64)  # 0: empty (a key's hi holds its length)
        self._tab_val = np.zeros(size, dtype=np.int64)

    def _add_runs(self, runs: list[tuple[int, ...]]) -> None:
        counts = np.fromiter(map(len, runs), dtype=np.int64, count=len(runs))
        offsets = len(self._runs) + np.cumsum(counts) - counts
        self._run_off = np.concatenate((self._run_off, offsets))
        self._run_cnt = np.concatenate((self._run_cnt, counts))
        self._runs = np.concatenate((self._runs, np.fromiter(chain.from_iterable(runs), np.int64)))

    def _hash(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        h = (lo ^ (hi * self._MULT_HI)) * self._MULT_LO
        return (h >> np.uint64(64 - self._table_bits)).astype(np.int64)

    def _pack(self, data: bytes, starts: np.ndarray, lengths: np.ndarray):
        """Exact keys of the segments ``data[s:s+n]`` of <= 15 bytes (longer ones get a key
        that is never stored)."""
        buf = np.zeros(len(data) + 16, dtype=np.uint8)
        buf[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        # windows[i] = the 8 bytes from i on, as one little-endian uint64 (an overlapping view).
        windows = np.ndarray((len(data) + 8,), dtype="<u8", buffer=buf, offset=0, strides=(1,))
        n = np.minimum(lengths, 16)
        lo = windows[starts] & self._lo_mask[n]
        hi = (windows[starts + 8] & self._hi_mask[n]) | self._hi_len[n]
        return lo, hi

    def _insert(self, lo, hi, vals) -> None:
        """Add new, distinct keys to the table."""
        if 2 * (self._table_count + len(lo)) > (1 << self._table_bits):  # keep load <= 1/2
            used = np.flatnonzero(self._tab_hi)
            old = self._tab_lo[used], self._tab_hi[used], self._tab_val[used]
            while 2 * (self._table_count + len(lo)) > (1 << self._table_bits):
                self._table_bits += 1
            self._alloc_table()
            self._table_count, self._max_probe = 0, 0
            self._insert(*old)
        mask = (1 << self._table_bits) - 1
        home = self._hash(lo, hi)
        pending, probe = np.arange(len(lo)), 0
        while pending.size:
            slot = (home[pending] + probe) & mask
            free = self._tab_hi[slot] == 0
            # Of several keys wanting the same free slot, the first takes it; others probe on.
            taken, first = np.unique(slot[free], return_index=True)
            winners = pending[free][first]
            self._tab_lo[taken], self._tab_hi[taken] = lo[winners], hi[winners]
            self._tab_val[taken] = vals[winners]
            if winners.size:
                self._max_probe = max(self._max_probe, probe)
            placed = np.zeros(len(lo), dtype=bool)
            placed[winners] = True
            pending = pending[~placed[pending]]
            probe += 1
        self._table_count += len(lo)

    def _lookup(self, lo, hi) -> np.ndarray:
        """Value of each key, or -1."""
        slot = self._hash(lo, hi)
        # First probe on whole arrays (most keys are found there), then follow the rest.
        tab_hi = self._tab_hi[slot]
        hit = (tab_hi == hi) & (self._tab_lo[slot] == lo)
        found = np.where(hit, self._tab_val[slot], -1)
        hit |= tab_hi == 0
        pending = np.flatnonzero(~hit)
        mask = (1 << self._table_bits) - 1
        for probe in range(1, self._max_probe + 1):
            if not pending.size:
                break
            slot = (self._hash(lo[pending], hi[pending]) + probe) & mask
            tab_hi = self._tab_hi[slot]
            hit = (tab_hi == hi[pending]) & (self._tab_lo[slot] == lo[pending])
            found[pending[hit]] = self._tab_val[slot[hit]]
            pending = pending[~hit & (tab_hi != 0)]
        return found

    # ---- encoding ----
    def _cuts(self, data: bytes, extra: np.ndarray | None = None) -> np.ndarray:
        """Ends of the segments of ``data`` (the last is ``len(data)``); also cut at ``extra``."""
        arr = np.frombuffer(data, dtype=np.uint8)
        pairs = (arr[:-1].astype(np.uint16) << 8) | arr[1:]
        is_cut = np.append(self._cut_between[pairs], True)  # is_cut[i]: a segment ends at i + 1
        if extra is not None:
            is_cut[extra[extra > 0] - 1] = True
        cuts = np.flatnonzero(is_cut)
        cuts += 1
        return cuts

    def _encode_small(self, data: bytes, cuts: list[int]) -> list[int]:
        cache, pieces, start = self._dict_cache, [], 0
        if len(cache) > self.MAX_CACHED:
            self._dict_cache = cache = {t: (i,) for t, i in self._token_to_id.items()}
        for end in cuts:
            seg = data[start:end]
            ids = cache.get(seg)
            if ids is None:
                ids = self._encode_segment(seg)
                if end - start <= self.MAX_DICT_LEN:
                    cache[seg] = ids
            pieces.append(ids)
            start = end
        return list(chain.from_iterable(pieces))

    def _segment_values(self, data: bytes, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Cached value of every segment, tokenizing and caching the new ones."""
        lo, hi = self._pack(data, starts, lengths)
        values = self._lookup(lo, hi)
        missing = np.flatnonzero(values == -1)
        if not missing.size:
            return values
        new_keys: dict[tuple[int, int], int] = {}
        new_runs: list[tuple[int, ...]] = []
        code_of_long, first_run = self._code_of_long, len(self._run_cnt)

        def value_of(ids: tuple[int, ...]) -> int:
            if len(ids) == 1:
                return ids[0]
            new_runs.append(ids)
            return -1 - first_run - len(new_runs)

        for i, s, n, key_lo, key_hi in zip(
            missing.tolist(), starts[missing].tolist(), lengths[missing].tolist(),
            lo[missing].tolist(), hi[missing].tolist(),
        ):
            if n <= self.MAX_PACKED_LEN:
                v = new_keys.get((key_lo, key_hi))
                if v is None:
                    v = new_keys[key_lo, key_hi] = value_of(self._encode_segment(data[s : s + n]))
            else:
                seg = data[s : s + n]
                v = code_of_long.get(seg)
                if v is None:
                    v = value_of(self._encode_segment(seg))
                    if n <= self.MAX_DICT_LEN:
                        code_of_long[seg] = v
            values[i] = v
        if new_runs:
            self._add_runs(new_runs)
        if new_keys:
            keys = np.array(list(new_keys), dtype=np.uint64).reshape(-1, 2)
            self._insert(keys[:, 0], keys[:, 1], np.fromiter(new_keys.values(), np.int64))
        return values

    def _encode_large(self, data: bytes, cuts: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Ids of ``data`` cut at ``cuts``, and the number of ids of each segment (None: all 1)."""
        if self._table_count + len(self._code_of_long) > self.MAX_CACHED:
            self._reset_caches()
        starts = np.empty_like(cuts)
        starts[0] = 0
        starts[1:] = cuts[:-1]
        values = self._segment_values(data, starts, cuts - starts)
        multi = np.flatnonzero(values < 0)
        if not multi.size:
            return values, None
        # Expand the multi-token segments: the single ones stay in place, runs are spliced in.
        run = -2 - values[multi]
        run_cnt = self._run_cnt[run]
        count = np.ones(len(values), dtype=np.int64)
        count[multi] = run_cnt
        ids = np.repeat(values, count)
        first_out = np.cumsum(count) - count
        rank = np.arange(int(run_cnt.sum())) - np.repeat(np.cumsum(run_cnt) - run_cnt, run_cnt)
        src = np.repeat(self._run_off[run], run_cnt) + rank
        ids[np.repeat(first_out[multi], run_cnt) + rank] = self._runs[src]
        return ids, count

    def encode(self, data: bytes) -> list[int]:
        n = len(data)
        if n < self.TINY_INPUT:
            if not n:
                return []
            cut = self._cut_list
            cuts = [i for i, (a, b) in enumerate(zip(data, data[1:]), 1) if cut[a << 8 | b]]
            cuts.append(n)
        else:
            cuts = self._cuts(data)
        with self._lock:
            if n < self.SMALL_INPUT:
                return self._encode_small(data, cuts if isinstance(cuts, list) else cuts.tolist())
            return self._encode_large(data, cuts)[0].tolist()

    def encode_many(self, items: Sequence[bytes]) -> list[list[int]]:
        """Encode several byte strings in one vectorized pass (joined, with cuts between them)."""
        data = b"".join(items)
        if len(data) < self.SMALL_INPUT:
            return [self.encode(x) for x in items]
        ends = np.cumsum(np.fromiter(map(len, items), dtype=np.int64, count=len(items)))
        cuts = self._cuts(data, extra=ends)
        with self._lock:
            ids, count = self._encode_large(data, cuts)
        # Ids per item: the counts of the segments that end inside it.
        item_of_segment = np.searchsorted(ends, cuts, side="left")
        per_item = np.bincount(item_of_segment, weights=count, minlength=len(items))
        bounds = np.concatenate(([0], np.cumsum(per_item.astype(np.int64)))).tolist()
        ids = ids.tolist()
        return [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


@functools.lru_cache(maxsize=4)
def _python_encoder(path: str) -> _GreedyEncoder:
    return _GreedyEncoder(read_vocab(path))


@functools.lru_cache(maxsize=4)
def _rust_encoder(path: str):
    """The compiled encoder of ``pyrwkv_tokenizer`` on the vocabulary ``path``, or None."""
    try:
        import pyrwkv_tokenizer
    except ImportError:
        return None
    return pyrwkv_tokenizer.WorldTokenizer(path)


def rust_available() -> bool:
    """Whether the compiled encoder (the ``pyrwkv_tokenizer`` package) is installed."""
    return importlib.util.find_spec("pyrwkv_tokenizer") is not None


# --------------------------------------------------------------------------------------------
# Public tokenizers
# --------------------------------------------------------------------------------------------
def _as_id_list(ids) -> list:
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)  # numpy array, torch tensor


def _as_id_array(ids) -> np.ndarray:
    if hasattr(ids, "detach"):  # torch tensor
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    return arr.reshape(-1).astype(np.int64, copy=False)


def _ids_in_range(ids, vocab_size: int) -> np.ndarray:
    """``ids`` as an int64 array, refusing ids outside ``[0, vocab_size)``."""
    arr = _as_id_array(ids)
    if arr.size and not (arr.min() >= 0 and arr.max() < vocab_size):
        bad = arr[(arr < 0) | (arr >= vocab_size)]
        raise ValueError(f"token ids {bad[:5].tolist()} are outside [0, {vocab_size})")
    return arr


def _count_utf8_starts(data: bytes) -> int:
    """Bytes of ``data`` that start a UTF-8 character (all but the continuation bytes 10xxxxxx)."""
    arr = np.frombuffer(data, dtype=np.uint8)
    return int(np.count_nonzero((arr & 0xC0) != 0x80))


class RWKVWorldTokenizer:
    """The RWKV World tokenizer (rwkv7-g1's vocabulary) with end-of-text id 0 and mask id 65535.

    Args:
        vocab_file: a vocabulary in the RWKV World format; default: the one an installed package
            ships (see ``find_vocab_file``).
        backend: ``"auto"`` (the compiled encoder when installed, else ours), ``"rust"`` or
            ``"python"``. All give the same ids; decoding is always ours.
        name: what to call it (``load_tokenizer`` passes the name it was given).
    """

    def __init__(
        self, vocab_file: str | None = None, backend: str = "auto", name: str | None = None
    ):
        if backend not in ("auto", "rust", "python"):
            raise ValueError(f"backend must be 'auto', 'rust' or 'python', got {backend!r}")
        self.vocab_file = os.path.abspath(vocab_file or find_vocab_file())
        self.name = name or (vocab_file and self.vocab_file) or "rwkv_vocab_v20230424"
        self._id_to_token = read_vocab(self.vocab_file)
        top = len(self._id_to_token) - 1
        if top >= RWKV_WORLD_MASK_ID or self._id_to_token[RWKV_WORLD_EOS_ID] is not None:
            raise ValueError(
                f"{self.vocab_file}: token ids must lie in 1..{RWKV_WORLD_MASK_ID - 1}: id "
                f"{RWKV_WORLD_EOS_ID} is end of text and id {RWKV_WORLD_MASK_ID} the mask token "
                f"(found ids up to {top})"
            )
        self._decode_table = [t or b"" for t in self._id_to_token]
        self._decode_table += [b""] * (RWKV_WORLD_VOCAB_SIZE - len(self._decode_table))
        self._rust = None
        if backend != "python" and self._is_world_vocab():
            # The compiled encoder only knows this vocabulary's file format; others use ours.
            self._rust = _rust_encoder(self.vocab_file)
        if self._rust is None and backend == "rust":
            raise ImportError(
                "backend='rust' needs the pyrwkv_tokenizer package (`pip install "
                f"pyrwkv-tokenizer`) and the {VOCAB_FILENAME} vocabulary; backend='auto' or "
                "'python' work without them"
            )
        self.backend = "rust" if self._rust is not None else "python"
        self._requested_backend = backend

    def __reduce__(self):  # pickle by vocabulary file (the compiled encoder does not pickle)
        return type(self), (self.vocab_file, self._requested_backend, self.name)

    def _is_world_vocab(self) -> bool:
        try:
            return self._id_to_token == read_vocab(find_vocab_file())
        except FileNotFoundError:
            return False

    @property
    def _python(self) -> _GreedyEncoder:
        return _python_encoder(self.vocab_file)  # built on first use, shared per vocabulary

    # ---- sizes and special ids ----
    @property
    def vocab_size(self) -> int:
        return RWKV_WORLD_VOCAB_SIZE

    def __len__(self) -> int:
        return RWKV_WORLD_VOCAB_SIZE

    @property
    def eos_id(self) -> int:
        return RWKV_WORLD_EOS_ID

    @property
    def pad_id(self) -> int:
        return RWKV_WORLD_EOS_ID

    @property
    def mask_id(self) -> int:
        return RWKV_WORLD_MASK_ID

    # ---- encoding ----
    def encode(self, text: str) -> list[int]:
        if self._rust is not None:
            return self._rust.encode(text)
        return self._python.encode(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """``encode`` as an int64 array."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def encode_bytes(self, data: bytes) -> list[int]:
        """Encode raw bytes (which need not be valid UTF-8) with our own encoder."""
        return self._python.encode(bytes(data))

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        texts = list(texts)
        if self._rust is not None:
            return self._rust.encode_batch(texts)
        return self._python.encode_many([t.encode("utf-8") for t in texts])

    # ---- decoding ----
    def decode_bytes(self, ids) -> bytes:
        """The bytes of ``ids`` joined; ids without a token (0, the mask id) add nothing."""
        ids = _as_id_list(ids)
        if ids and not (0 <= min(ids) and max(ids) < RWKV_WORLD_VOCAB_SIZE):
            bad = [i for i in ids if not 0 <= i < RWKV_WORLD_VOCAB_SIZE]
            raise ValueError(f"token ids {bad[:5]} are outside [0, {RWKV_WORLD_VOCAB_SIZE})")
        return b"".join(map(self._decode_table.__getitem__, ids))

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_batch(self, batch) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def count_chars(self, ids) -> int:
        """Characters that ``ids`` stand for: the bytes of their tokens that start a UTF-8
        character (a token may hold part of a character; the part holding its first byte counts)."""
        return _count_utf8_starts(self.decode_bytes(ids))

    def token_bytes(self, idx: int) -> bytes | None:
        """The bytes of token ``idx``, or None when the id has no token."""
        return self._id_to_token[idx] if 0 <= idx < len(self._id_to_token) else None

    def __repr__(self) -> str:
        return (f"RWKVWorldTokenizer({self.name!r}, vocab_file={self.vocab_file!r}, "
                f"backend={self.backend!r})")


class HFTokenizer:
    """A ``transformers`` tokenizer behind the ``RWKVWorldTokenizer`` interface.

    ``encode`` adds no special tokens and ``decode`` drops them. The mask id is the tokenizer's
    mask token when it has one, else a new id equal to the tokenizer's size (so ``vocab_size`` is
    one larger). End of text: the eos token, else sep, else pad.
    """

    def __init__(self, hf_tokenizer, name: str = "", revision: str | None = None):
        self.hf = hf_tokenizer
        self.name = name or getattr(hf_tokenizer, "name_or_path", "")
        self.revision = revision  # what load_tokenizer was asked for; part of tokenizer_spec
        size = len(hf_tokenizer)
        mask = hf_tokenizer.mask_token_id
        self._mask_id = int(mask) if mask is not None else size
        self._vocab_size = max(size, self._mask_id + 1)
        ends = (hf_tokenizer.eos_token_id, hf_tokenizer.sep_token_id, hf_tokenizer.pad_token_id)
        eos = next((t for t in ends if t is not None), None)
        if eos is None:
            raise ValueError(
                f"Tokenizer {self.name!r} has no end-of-text token (eos, sep or pad), which "
                "separates documents; use a tokenizer that has one"
            )
        self._eos_id = int(eos)
        pad = hf_tokenizer.pad_token_id
        self._pad_id = int(pad) if pad is not None else self._eos_id

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def __len__(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def mask_id(self) -> int:
        return self._mask_id

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        texts = list(texts)
        if not texts:
            return []
        return [list(ids) for ids in self.hf(texts, add_special_tokens=False)["input_ids"]]

    def count_chars(self, ids) -> None:
        """None: a subword tokenizer's ids need not split the text at character boundaries, and
        its decoding may normalise the text, so their characters are unknown."""
        return None

    def decode(self, ids) -> str:
        ids = [i for i in _as_id_list(ids) if i < len(self.hf)]  # drop an added mask id
        return self.hf.decode(ids, skip_special_tokens=True)

    def decode_batch(self, batch) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size}, mask_id={self.mask_id})"


class CharTokenizer:
    """One id per character of a fixed vocabulary, as nanoGPT's shakespeare_char.

    ``chars`` is the vocabulary: distinct characters in sorted order; id ``i`` is ``chars[i]``,
    then ``eos_id = len(chars)`` (end of text, also padding) and ``mask_id = len(chars) + 1``.
    Build it from a corpus with ``from_text`` (``prepare_corpus`` does, over all of its text), so
    that the ids depend only on the set of characters. Encoding a character outside the vocabulary
    raises ``UnknownCharacterError``.
    """

    name = "chars"

    def __init__(self, chars: str):
        if not isinstance(chars, str):
            raise ValueError(f"chars must be a str of the vocabulary's characters, got "
                             f"{type(chars).__name__}")
        if list(chars) != sorted(set(chars)):
            raise ValueError(
                "chars must hold distinct characters in sorted order (the vocabulary of "
                "CharTokenizer.from_text); got "
                + ("repeated characters" if len(set(chars)) != len(chars) else "them unsorted")
                + f": {chars[:40]!r}"
            )
        self.chars = chars
        self.eos_id = len(chars)
        self.mask_id = len(chars) + 1
        self.pad_id = self.eos_id
        self.vocab_size = len(chars) + 2
        codes = np.frombuffer(chars.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        # code point -> id (-1: not in the vocabulary); at most 1.1M entries (all of Unicode).
        self._lookup = np.full(int(codes.max()) + 1 if codes.size else 1, -1, dtype=np.int64)
        self._lookup[codes.astype(np.int64)] = np.arange(len(chars))

    @classmethod
    def from_text(cls, texts: Iterable[str]) -> "CharTokenizer":
        """The tokenizer whose vocabulary is every character that occurs in ``texts``."""
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls("".join(sorted(seen)))

    def __len__(self) -> int:
        return self.vocab_size

    def encode_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        codes = codes.astype(np.int64)
        ids = self._lookup[np.minimum(codes, len(self._lookup) - 1)]
        bad = (ids < 0) | (codes >= len(self._lookup))
        if bad.any():
            position = int(np.argmax(bad))
            raise UnknownCharacterError(text[position], position, len(self.chars))
        return ids

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        """The characters of ``ids``; end of text and mask ids add nothing."""
        arr = _ids_in_range(ids, self.vocab_size)
        chars = self.chars
        return "".join([chars[i] for i in arr[arr < len(chars)].tolist()])

    def decode_batch(self, batch) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def count_chars(self, ids) -> int:
        arr = _as_id_array(ids)
        return int(np.count_nonzero((arr >= 0) & (arr < len(self.chars))))

    def __repr__(self) -> str:
        shown = self.chars if len(self.chars) <= 40 else self.chars[:37] + "..."
        return f"CharTokenizer({len(self.chars)} chars {shown!r}, vocab_size={self.vocab_size})"


class ByteTokenizer:
    """One id per UTF-8 byte: ids 0..255 are byte values, 256 is end of text (also padding) and
    257 the mask. Every text encodes, so no vocabulary has to be built or stored."""

    name = "bytes"
    eos_id = 256
    mask_id = 257
    pad_id = 256
    vocab_size = 258

    def __len__(self) -> int:
        return self.vocab_size

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode_bytes(self, ids) -> bytes:
        """The bytes of ``ids``; end of text and mask ids add nothing."""
        arr = _ids_in_range(ids, self.vocab_size)
        return arr[arr < 256].astype(np.uint8).tobytes()

    def decode(self, ids) -> str:
        """The text of ``ids`` (an incomplete or invalid UTF-8 sequence becomes U+FFFD)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_batch(self, batch) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def count_chars(self, ids) -> int:
        """Byte ids that start a UTF-8 character (continuation bytes 10xxxxxx do not count)."""
        arr = _as_id_array(ids)
        return int(np.count_nonzero((arr >= 0) & (arr < 256) & ((arr & 0xC0) != 0x80)))

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=258)"


Tokenizer = Union[CharTokenizer, ByteTokenizer, RWKVWorldTokenizer, HFTokenizer]


def is_rwkv_world_name(name: str) -> bool:
    """True when ``name`` means the RWKV World vocabulary: a BlinkDL RWKV name, a BlinkDL ``.pth``
    checkpoint (``tokenizer.name`` follows ``model.rwkv_name``, and BlinkDL's checkpoints all use
    that vocabulary) or a vocabulary .txt."""
    lowered = str(name).lower()
    if lowered.startswith(_RWKV_WORLD_PREFIXES) or lowered.endswith(".pth"):
        return True
    return lowered.endswith(".txt") and os.path.isfile(name)


def load_tokenizer(
    name: str = DEFAULT_TOKENIZER,
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
    trust_remote_code: bool = False,
    chars: str | None = None,
) -> Tokenizer:
    """The tokenizer called ``name``.

    ``"bytes"`` gives ``ByteTokenizer`` and ``"chars"`` gives ``CharTokenizer(chars)``, whose
    vocabulary ``chars`` comes from the training text. RWKV World names ("BlinkDL/rwkv...",
    "rwkv_vocab_v20230424", "rwkv-world", or the path of a vocabulary .txt) give
    ``RWKVWorldTokenizer``, which needs no download. Any other name is loaded by
    ``transformers.AutoTokenizer.from_pretrained`` with the given options.
    """
    name = str(name)
    if name == ByteTokenizer.name:
        return ByteTokenizer()
    if name == CharTokenizer.name:
        if chars is None:
            raise ValueError(
                "tokenizer 'chars' builds its vocabulary from the training text, so it needs "
                "chars=<the vocabulary>: prepare a corpus with "
                "rwkv_diffusion_rnn.data.corpus.prepare_corpus(spec, 'chars', cache_dir) (its "
                ".tokenizer), or read the vocabulary from a checkpoint's tokenizer.json "
                "(tokenizer_from_spec)"
            )
        return CharTokenizer(chars)
    if is_rwkv_world_name(name):
        vocab = name if name.lower().endswith(".txt") and os.path.isfile(name) else None
        return RWKVWorldTokenizer(vocab, name=name)
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(
            name,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as e:
        where = f"cache dir {cache_dir!r}" if cache_dir else "the Hugging Face cache"
        hint = (
            f"it is not in {where} and local_files_only=True forbids downloading: run once "
            "online (without --local-files-only), or pass the --cache-dir that holds it"
            if local_files_only
            else "check the name and revision, and that the Hub can be reached (or pass "
            "--local-files-only with the --cache-dir that holds it)"
        )
        raise OSError(
            f"Could not load tokenizer {name!r}"
            + (f" (revision {revision!r})" if revision else "")
            + f": {hint}. For RWKV-7 models use the built-in tokenizer {DEFAULT_TOKENIZER!r}, "
            f"which needs no download. Cause: {type(e).__name__}: {str(e)[:300]}"
        ) from e
    return HFTokenizer(hf, name, revision=revision)


# --------------------------------------------------------------------------------------------
# Specs: a tokenizer as JSON, and back
# --------------------------------------------------------------------------------------------
_SPEC_KEYS = ("name", "kind", "vocab_size", "eos_id", "mask_id", "pad_id")
_KINDS = ("chars", "bytes", "rwkv_world", "hf")


def tokenizer_spec(tok: Tokenizer) -> dict:
    """A JSON-serialisable description of ``tok`` that ``tokenizer_from_spec`` rebuilds it from.

    Always ``name``, ``kind`` (one of "chars", "bytes", "rwkv_world", "hf"), ``vocab_size``,
    ``eos_id``, ``mask_id`` and ``pad_id``; a chars tokenizer adds its vocabulary ``chars``, an
    RWKV World tokenizer named by a vocabulary .txt its absolute ``vocab_file``, and a Hugging
    Face tokenizer the ``revision`` it was loaded at (when one was given).
    """
    if isinstance(tok, CharTokenizer):
        kind, extra = "chars", {"chars": tok.chars}
    elif isinstance(tok, ByteTokenizer):
        kind, extra = "bytes", {}
    elif isinstance(tok, RWKVWorldTokenizer):
        kind, extra = "rwkv_world", {}
        if str(tok.name).lower().endswith(".txt"):
            extra["vocab_file"] = tok.vocab_file
    elif isinstance(tok, HFTokenizer):
        kind, extra = "hf", {}
        if getattr(tok, "revision", None):
            extra["revision"] = tok.revision
    else:
        raise TypeError(
            f"tokenizer_spec: {type(tok).__name__} is not one of this package's tokenizers "
            "(CharTokenizer, ByteTokenizer, RWKVWorldTokenizer, HFTokenizer)"
        )
    spec = {
        "name": str(tok.name), "kind": kind, "vocab_size": int(tok.vocab_size),
        "eos_id": int(tok.eos_id), "mask_id": int(tok.mask_id), "pad_id": int(tok.pad_id),
    }
    spec.update(extra)
    return spec


def tokenizer_from_spec(
    spec: dict,
    *,
    cache_dir: str | None = None,
    local_files_only: bool = True,
    trust_remote_code: bool = False,
) -> Tokenizer:
    """Rebuild the tokenizer that ``tokenizer_spec`` described, and check that it has the spec's
    ``vocab_size``, ``eos_id`` and ``mask_id`` (a model trained with one vocabulary must not
    silently meet another). Hugging Face tokenizers load with the given options (offline by
    default). Raises ValueError naming a missing key, an unknown kind or a mismatch.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"a tokenizer spec is a dict (tokenizer_spec's output), got "
                         f"{type(spec).__name__}")
    for key in _SPEC_KEYS:
        if key not in spec:
            raise ValueError(f"tokenizer spec has no {key!r} key (it needs {', '.join(_SPEC_KEYS)}); "
                             f"got keys {sorted(spec)}")
    kind, name = spec["kind"], spec["name"]
    if kind == "chars":
        if not isinstance(spec.get("chars"), str):
            raise ValueError("tokenizer spec of kind 'chars' has no 'chars' key (a str: the "
                             "vocabulary)")
        tok: Tokenizer = CharTokenizer(spec["chars"])
    elif kind == "bytes":
        tok = ByteTokenizer()
    elif kind == "rwkv_world":
        if spec.get("vocab_file"):
            tok = RWKVWorldTokenizer(spec["vocab_file"], name=name)
        else:
            tok = load_tokenizer(name)
    elif kind == "hf":
        tok = load_tokenizer(name, revision=spec.get("revision"), cache_dir=cache_dir,
                             local_files_only=local_files_only,
                             trust_remote_code=trust_remote_code)
    else:
        raise ValueError(f"tokenizer spec has unknown 'kind' {kind!r}; expected one of "
                         f"{', '.join(_KINDS)}")
    for key in ("vocab_size", "eos_id", "mask_id"):
        if int(getattr(tok, key)) != spec[key]:
            raise ValueError(
                f"tokenizer {name!r} ({kind}) has {key}={getattr(tok, key)} but the spec says "
                f"{key}={spec[key]}: this is not the vocabulary it was saved with; load the same "
                "tokenizer (name, revision, vocabulary file) as when the spec was written"
            )
    return tok
