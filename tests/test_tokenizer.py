"""The RWKV World tokenizer gives exactly the ids of BlinkDL's TRIE_TOKENIZER (rwkv package)."""
import os
import pickle
import random

import numpy as np
import pytest

from rwkv_diffusion_rnn.data import tokenizer as tk
from rwkv_diffusion_rnn.data.tokenizer import (
    HFTokenizer,
    RWKVWorldTokenizer,
    load_tokenizer,
)

trie_module = pytest.importorskip("rwkv.rwkv_tokenizer")

SHAKESPEARE = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare.txt"
)
BACKENDS = ["python", pytest.param("rust", marks=pytest.mark.skipif(
    not tk.rust_available(), reason="pyrwkv_tokenizer not installed"))]

# Code point ranges (no surrogates): ASCII with controls, Latin, Greek, Cyrillic, Arabic,
# Devanagari, kana, CJK, Hangul, private use, symbols, emoji, astral planes.
RANGES = [
    (0x0, 0x7F), (0x80, 0x24F), (0x370, 0x4FF), (0x600, 0x6FF), (0x900, 0x97F),
    (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xE000, 0xF8FF),
    (0x2000, 0x2BFF), (0x1F300, 0x1FAFF), (0x10000, 0x10FFFF),
]
EDGE_CASES = [
    "", " ", "\n", "\n\n", "\r\n", "\t", "\x00", "\x00" * 300, "a", "\u00e9", "\ufffd",
    "\U0010ffff", "\x7f\x80",
    " " * 127, " " * 128, " " * 129, " " * 5000, "-" * 81, "#" * 1000, "\n" * 1000, "a" * 3000,
    "ab" * 2000, "\u4e2d" * 700, "\U0001f600" * 300, "👨‍👩‍👧‍👦🏳️‍🌈🇨🇳",
    "x" * 79, "x" * 80, "x" * 81, "y" * 511, "y" * 512, "y" * 513,
]


def random_text(rng: random.Random, n_chars: int) -> str:
    """Random runs from many scripts, mixed with spaces, newlines and punctuation."""
    out = []
    while n_chars > 0:
        lo, hi = rng.choice(RANGES)
        k = rng.randint(1, 10)
        out.append("".join(chr(rng.randint(lo, hi)) for _ in range(k)))
        out.append(rng.choice(["", " ", "\n", ", ", ". ", "  ", "\n\n"]))
        n_chars -= k
    return "".join(out)


def vocab_soup(rng: random.Random, vocab, n_pieces: int) -> bytes:
    """Concatenated vocabulary tokens and pieces of them: stresses longest match."""
    tokens = [t for t in vocab if t]
    out = []
    for _ in range(n_pieces):
        t = rng.choice(tokens)
        if rng.random() < 0.3:
            t = t[: rng.randint(1, len(t))]
        out.append(t)
    return b"".join(out)


@pytest.fixture(scope="module")
def vocab_file():
    return tk.find_vocab_file()


@pytest.fixture(scope="module")
def trie(vocab_file):
    return trie_module.TRIE_TOKENIZER(vocab_file)


@pytest.fixture(scope="module", params=BACKENDS)
def tok(request, vocab_file):
    t = RWKVWorldTokenizer(vocab_file, backend=request.param)
    assert t.backend == request.param
    return t


@pytest.fixture(scope="module")
def corpus(trie):
    """A few MB: English (when the shared data is there), Chinese, emoji, code, random Unicode;
    with TRIE_TOKENIZER's ids, computed once."""
    rng = random.Random(0)
    parts = []
    if os.path.isfile(SHAKESPEARE):
        with open(SHAKESPEARE, encoding="utf-8") as f:
            parts.append(f.read())
    words = "我们 今天 世界 中国 学生 人工智能 非常 但是 的 了 是 ， 。 \n".split(" ")
    parts.append("".join(rng.choice(words) for _ in range(60_000)))
    emoji = "😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇯🇵 1️⃣ ❤️ 🚀".split()
    parts.append("".join(rng.choice(emoji) + rng.choice(["", " ", "\n"]) for _ in range(20_000)))
    with open(tk.__file__, encoding="utf-8") as f:
        parts.append(f.read() * 10)
    parts.append(random_text(rng, 150_000))
    text = "".join(parts)
    return text, trie.encode(text)


# ---- exactness ------------------------------------------------------------------------------
def test_corpus_matches_trie(tok, corpus):
    text, ref = corpus
    assert len(text.encode()) > 1_000_000
    assert tok.encode(text) == ref
    assert tok.encode(text) == ref  # again, with the caches filled


def test_random_texts_match_trie(tok, trie):
    rng = random.Random(1)
    texts = [random_text(rng, rng.choice([1, 5, 30, 200, 700])) for _ in range(400)]
    texts += [t.decode("utf-8", errors="ignore") for t in
              (vocab_soup(rng, tok._id_to_token, rng.randint(1, 300)) for _ in range(200))]
    refs = [trie.encode(t) for t in texts]
    assert [tok.encode(t) for t in texts] == refs
    assert tok.encode_batch(texts) == refs
    assert tok.encode("".join(texts)) == trie.encode("".join(texts))


@pytest.mark.parametrize("text", EDGE_CASES, ids=range(len(EDGE_CASES)))
def test_edge_cases_match_trie(tok, trie, text):
    assert tok.encode(text) == trie.encode(text)
    assert tok.decode(tok.encode(text)) == text


def test_random_bytes_match_trie(trie, vocab_file):
    # Not valid UTF-8 in general: only our encoder takes raw bytes.
    t = RWKVWorldTokenizer(vocab_file, backend="python")
    rng = random.Random(2)
    for _ in range(300):
        data = (bytes(rng.randrange(256) for _ in range(rng.randint(0, 600)))
                if rng.random() < 0.5 else vocab_soup(rng, t._id_to_token, rng.randint(1, 200)))
        assert t.encode_bytes(data) == trie.encodeBytes(data)
        assert t.decode_bytes(t.encode_bytes(data)) == data


def test_small_and_vectorized_paths_agree(vocab_file):
    enc = tk._GreedyEncoder(tk.read_vocab(vocab_file))
    rng = random.Random(3)
    for _ in range(50):
        data = random_text(rng, rng.randint(1, 120)).encode()
        cuts = enc._cuts(data)
        assert enc._encode_small(data, cuts.tolist()) == enc._encode_large(data, cuts)[0].tolist()


def test_caches_reset(vocab_file, trie):
    # A small cache limit forces resets of both caches (numpy table and dict) between calls.
    enc = tk._GreedyEncoder(tk.read_vocab(vocab_file))
    enc.MAX_CACHED = enc._table_count + 1000
    rng = random.Random(4)
    for _ in range(3):
        text = random_text(rng, 20_000)
        assert enc.encode(text.encode()) == trie.encode(text)
        assert enc._table_count <= enc.MAX_CACHED + 20_000
    for _ in range(300):
        text = random_text(rng, 40)
        assert enc.encode(text.encode()) == trie.encode(text)
    assert len(enc._dict_cache) <= enc.MAX_CACHED + 300


def test_other_vocabulary_file(tmp_path, trie):
    """A vocabulary of our own in the same format (bytes literals, gaps in ids) also matches."""
    rng = random.Random(5)
    tokens = {bytes([b]) for b in range(256)}
    while len(tokens) < 1500:
        tokens.add(bytes(rng.choice(b"abcde \n\xe4\xb8\xad") for _ in range(rng.randint(2, 20))))
    ordered = sorted(tokens, key=len)
    lines = [f"{i + 1 + (i > 700) * 3} {t!r} {len(t)}" for i, t in enumerate(ordered)]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ref = trie_module.TRIE_TOKENIZER(str(path))
    mine = load_tokenizer(str(path))
    assert isinstance(mine, RWKVWorldTokenizer) and mine.backend == "python"
    bits = mine._python._table_bits
    for _ in range(100):
        data = bytes(rng.choice(b"abcde \n\xe4\xb8\xadxyz") for _ in range(rng.randint(0, 2000)))
        text = data.decode("utf-8", errors="ignore")
        assert mine.encode(text) == ref.encode(text)
        assert mine.encode_bytes(data) == ref.encodeBytes(data)
    assert mine._python._table_bits > bits  # new segments made the hash table grow


# ---- decoding, batches, special ids -----------------------------------------------------------
def test_roundtrip(tok):
    rng = random.Random(6)
    for _ in range(200):
        text = random_text(rng, rng.randint(0, 400))
        assert tok.decode(tok.encode(text)) == text
    ids = np.array(tok.encode("numpy ids 你好"))
    assert tok.decode(ids) == "numpy ids 你好"


def test_decode_replaces_bad_utf8_and_skips_special(tok):
    half = tok.encode_bytes("中".encode()[:2])  # an incomplete character
    assert tok.decode(half) == "\ufffd"
    assert tok.decode([tok.eos_id] + tok.encode("hi") + [tok.mask_id]) == "hi"
    with pytest.raises(ValueError, match="outside"):
        tok.decode([70000])
    with pytest.raises(ValueError, match="outside"):
        tok.decode([-1])


def test_batch_equals_individual(tok):
    rng = random.Random(7)
    texts = ["", "a", "", "hello world\n"]
    texts += [random_text(rng, rng.randint(0, 300)) for _ in range(60)]
    texts += ["", "x" * 2000, ""]
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(t) for t in texts]
    assert tok.encode_batch([]) == []
    assert tok.encode_batch(["", ""]) == [[], []]
    assert tok.decode_batch(batch) == texts
    # the vectorized batch path (joined texts) as well as the per-text one
    enc = tok._python
    many = [t.encode() for t in texts] * 20
    assert enc.encode_many(many) == [enc.encode(t) for t in many]


def test_pickles_by_vocabulary_file(tok):
    again = pickle.loads(pickle.dumps(tok))
    assert again.backend == tok.backend and again.encode("pickle 你好") == tok.encode("pickle 你好")


def test_falls_back_to_our_encoder_without_the_compiled_one(monkeypatch, vocab_file):
    monkeypatch.setattr(tk, "_rust_encoder", lambda path: None)
    t = RWKVWorldTokenizer(vocab_file)
    assert t.backend == "python" and t.encode("Hello") == [33155]
    with pytest.raises(ImportError, match="pyrwkv-tokenizer"):
        RWKVWorldTokenizer(vocab_file, backend="rust")


def test_special_ids_and_sizes(tok):
    assert tok.vocab_size == len(tok) == 65536
    assert tok.eos_id == tok.pad_id == 0
    assert tok.mask_id == 65535
    assert tok.token_bytes(0) is None and tok.token_bytes(tok.mask_id) is None
    assert tok.token_bytes(1) == b"\x00"


def test_no_text_encodes_to_special_ids(vocab_file, trie):
    # Every token of the vocabulary, alone and all together, encodes to real token ids.
    t = RWKVWorldTokenizer(vocab_file, backend="python")
    tokens = [x for x in t._id_to_token if x]
    assert len(tokens) == 65529
    ids = set()
    for token in tokens:
        got = t.encode_bytes(token)
        assert got == [t._python._token_to_id[token]]
        ids.update(got)
    everything = b"".join(tokens)
    ids.update(t.encode_bytes(everything))
    assert t.mask_id not in ids and t.eos_id not in ids
    assert max(ids) < t.mask_id


# ---- names, files, errors -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["BlinkDL/rwkv7-g1", "BlinkDL/rwkv-7-world", "rwkv_vocab_v20230424", "rwkv-world"]
)
def test_rwkv_names_load_the_builtin_tokenizer(name):
    t = load_tokenizer(name, local_files_only=True)
    assert isinstance(t, RWKVWorldTokenizer) and t.name == name
    assert t.encode("Hello") == [33155]


def test_unknown_tokenizer_offline_says_what_to_do(tmp_path):
    name = "no-such-org/no-such-tokenizer"
    with pytest.raises(OSError) as err:
        load_tokenizer(name, local_files_only=True, cache_dir=str(tmp_path))
    msg = str(err.value)
    assert name in msg and "BlinkDL/rwkv7-g1" in msg and "local" in msg


def test_hf_tokenizer_adapter(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3}
    model = tokenizers.models.WordLevel(vocab, unk_token="[UNK]")
    raw = tokenizers.Tokenizer(model)
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="</s>")
    fast.save_pretrained(tmp_path)
    t = load_tokenizer(str(tmp_path), local_files_only=True)
    assert isinstance(t, HFTokenizer)
    assert t.encode("hello world") == [2, 3]
    assert t.encode_batch(["hello", "world hello"]) == [[2], [3, 2]]
    assert t.eos_id == 1 and t.pad_id == 1
    assert t.mask_id == 4 and t.vocab_size == 5  # no mask token: a new id after the vocabulary
    assert t.decode([2, 3, t.mask_id]) == "hello world"
    assert t.decode_batch([[2], [3]]) == ["hello", "world"]


def test_bad_vocabulary_file_names_the_line(tmp_path):
    path = tmp_path / "bad.txt"
    lines = [f"{b + 1} {bytes([b])!r} 1" for b in range(256)] + ["257 'ab' 3"]
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.txt:257.*byte length 3"):
        tk.read_vocab(str(path))
    path.write_text("\n".join(lines[:-1] + ["257 'ab 2"]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.txt:257.*not a literal"):
        tk.read_vocab(str(path))
    path.write_text("\n".join(lines[:-1] + ["65535 'ab' 2"]), encoding="utf-8")
    with pytest.raises(ValueError, match="mask"):
        RWKVWorldTokenizer(str(path))


# ---- character-level tokenizers, specs ----------------------------------------------------------
from rwkv_diffusion_rnn.common.errors import UnknownCharacterError  # noqa: E402
from rwkv_diffusion_rnn.data.tokenizer import (  # noqa: E402
    ByteTokenizer,
    CharTokenizer,
    tokenizer_from_spec,
    tokenizer_spec,
)

MIXED = "Hello, world!\nnaïve café — 你好世界 😀👍🏽\tend"


def _tiny_hf_tokenizer_dir(path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3}
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="</s>")
    fast.save_pretrained(path)
    return str(path)


def test_char_tokenizer_ids_follow_the_sorted_vocabulary():
    t = CharTokenizer.from_text(["banana", "cab\n"])
    assert t.chars == "\nabcn" and t.name == "chars"
    assert t.encode("cab") == [3, 1, 2]
    assert (t.eos_id, t.mask_id, t.pad_id, t.vocab_size, len(t)) == (5, 6, 5, 7, 7)
    arr = t.encode_array("banana")
    assert arr.dtype == np.int64 and arr.tolist() == t.encode("banana")
    assert t.encode_batch(["ab", "", "n"]) == [[1, 2], [], [4]]
    assert t.decode([t.eos_id, 3, t.mask_id, 1, 2, t.eos_id]) == "cab"
    assert t.decode(np.array([2, 1])) == "ba" and t.decode_batch([[1], [4, 1]]) == ["a", "na"]
    assert t.count_chars([3, t.eos_id, 1, t.mask_id]) == 2
    with pytest.raises(ValueError, match="outside"):
        t.decode([7])
    assert "5 chars" in repr(t)


def test_char_tokenizer_refuses_unsorted_or_repeated_chars():
    with pytest.raises(ValueError, match="sorted"):
        CharTokenizer("ba")
    with pytest.raises(ValueError, match="repeated"):
        CharTokenizer("aab")
    assert CharTokenizer.from_text([MIXED]).decode(CharTokenizer.from_text([MIXED]).encode(MIXED)) == MIXED


def test_unknown_character_names_the_character_its_position_and_the_vocabulary_size():
    t = CharTokenizer("abc")
    for text, char, pos in [("abcz", "z", 3), ("a😀", "😀", 1), ("\x00", "\x00", 0)]:
        with pytest.raises(UnknownCharacterError) as err:
            t.encode(text)
        assert err.value.char == char and err.value.position == pos
        msg = str(err.value)
        assert repr(char) in msg and f"U+{ord(char):04X}" in msg and "3 characters" in msg
        assert isinstance(err.value, ValueError)
    with pytest.raises(UnknownCharacterError):
        t.encode_batch(["ab", "ad"])


def test_char_tokenizer_encodes_a_megabyte_quickly():
    import time

    rng = random.Random(8)
    text = "".join(rng.choice("abcdefghij klmnop\nQRSTUVWXYZ,.;é你") for _ in range(1_100_000))
    t = CharTokenizer.from_text([text])
    start = time.perf_counter()
    ids = t.encode_array(text)
    assert time.perf_counter() - start < 0.5
    assert len(ids) == len(text) and t.decode(ids[:1000]) == text[:1000]


def test_byte_tokenizer_encodes_utf8_bytes():
    b = ByteTokenizer()
    assert (b.eos_id, b.mask_id, b.pad_id, b.vocab_size, len(b), b.name) == (256, 257, 256, 258, 258, "bytes")
    assert b.encode("aé") == [97, 0xC3, 0xA9]
    assert b.encode_array(MIXED).tolist() == list(MIXED.encode()) and b.encode_array("").dtype == np.int64
    assert b.encode_batch(["a", ""]) == [[97], []]
    assert b.decode([b.eos_id] + b.encode(MIXED) + [b.mask_id]) == MIXED
    assert b.decode(b.encode("中")[:2]) == "\ufffd"  # an incomplete character
    assert b.decode_batch([[104, 105], []]) == ["hi", ""]
    with pytest.raises(ValueError, match="outside"):
        b.decode([258])


@pytest.mark.parametrize("kind", ["chars", "bytes", "world"])
def test_count_chars_adds_up_over_consecutive_pieces(kind):
    rng = random.Random(9)
    text = MIXED * 20 + random_text(rng, 3000)
    tok = {"chars": lambda: CharTokenizer.from_text([text]), "bytes": ByteTokenizer,
           "world": lambda: load_tokenizer("BlinkDL/rwkv7-g1")}[kind]()
    ids = tok.encode(text) + [tok.eos_id]
    assert tok.count_chars(ids) == len(text)
    for size in (1, 2, 3, 7, 64):
        pieces = [ids[i : i + size] for i in range(0, len(ids), size)]
        assert sum(tok.count_chars(p) for p in pieces) == len(text)
    assert tok.count_chars(np.array(ids[:50])) == tok.count_chars(ids[:50])


def test_world_tokenizer_encode_array_is_encode():
    t = load_tokenizer("BlinkDL/rwkv7-g1")
    arr = t.encode_array(MIXED)
    assert arr.dtype == np.int64 and arr.tolist() == t.encode(MIXED)


def test_hf_tokenizer_knows_no_characters_and_keeps_its_revision(tmp_path):
    path = _tiny_hf_tokenizer_dir(tmp_path)
    t = load_tokenizer(path, local_files_only=True)
    assert t.count_chars([2, 3]) is None and t.revision is None
    assert t.encode_array("hello world").tolist() == [2, 3]
    spec = tokenizer_spec(t)
    assert spec == {"name": path, "kind": "hf", "vocab_size": 5, "eos_id": 1, "mask_id": 4, "pad_id": 1}
    again = tokenizer_from_spec(spec)
    assert isinstance(again, HFTokenizer) and again.encode("world hello") == [3, 2]
    t.revision = "main"
    assert tokenizer_spec(t)["revision"] == "main"


def test_load_tokenizer_gives_the_character_level_tokenizers():
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
    t = load_tokenizer("chars", chars="abc")
    assert isinstance(t, CharTokenizer) and t.chars == "abc"
    with pytest.raises(ValueError) as err:
        load_tokenizer("chars")
    msg = str(err.value)
    assert "training text" in msg and "prepare_corpus" in msg and "tokenizer.json" in msg


def test_tokenizer_spec_round_trips_every_kind(vocab_file):
    import json

    cases = [CharTokenizer("\n ab"), ByteTokenizer(), load_tokenizer("BlinkDL/rwkv7-g1"),
             load_tokenizer(vocab_file)]
    for tok in cases:
        spec = tokenizer_spec(tok)
        assert json.loads(json.dumps(spec)) == spec
        for key in ("name", "kind", "vocab_size", "eos_id", "mask_id", "pad_id"):
            assert key in spec
        again = tokenizer_from_spec(spec)
        assert type(again) is type(tok) and tokenizer_spec(again) == spec
        assert again.encode("ab") == tok.encode("ab")
    assert tokenizer_spec(cases[0])["chars"] == "\n ab"
    world, by_file = (tokenizer_spec(t) for t in cases[2:])
    assert world["kind"] == "rwkv_world" and world["name"] == "BlinkDL/rwkv7-g1" and "vocab_file" not in world
    assert by_file["vocab_file"] == os.path.abspath(vocab_file)
    with pytest.raises(TypeError, match="not one of"):
        tokenizer_spec(object())


def test_tokenizer_from_spec_names_a_missing_key_an_unknown_kind_or_a_mismatch():
    spec = tokenizer_spec(CharTokenizer("abc"))
    for key in ("kind", "vocab_size", "mask_id"):
        broken = {k: v for k, v in spec.items() if k != key}
        with pytest.raises(ValueError, match=repr(key)):
            tokenizer_from_spec(broken)
    with pytest.raises(ValueError, match="'chars'"):
        tokenizer_from_spec({k: v for k, v in spec.items() if k != "chars"})
    with pytest.raises(ValueError, match="kind.*'sentencepiece'"):
        tokenizer_from_spec(dict(spec, kind="sentencepiece"))
    with pytest.raises(ValueError, match="vocab_size=5 but the spec says vocab_size=6"):
        tokenizer_from_spec(dict(spec, vocab_size=6))
    with pytest.raises(ValueError, match="mask_id=257 but the spec says mask_id=1"):
        tokenizer_from_spec(dict(tokenizer_spec(ByteTokenizer()), mask_id=1))
