"""Corpus preparation (sources, splits, the token cache) and the training / validation windows."""
import json
import os

import numpy as np
import pytest
import torch

from rwkv_diffusion_rnn.data import corpus as corpus_mod
from rwkv_diffusion_rnn.data.corpus import (
    FORMAT_VERSION,
    CorpusSpec,
    TrainWindows,
    ValWindows,
    prepare_corpus,
)
from rwkv_diffusion_rnn.common.errors import DataFormatError
from rwkv_diffusion_rnn.data.tokenizer import ByteTokenizer, CharTokenizer, load_tokenizer

SHAKESPEARE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare.txt")
POEM = "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n" * 30
MIXED = "naïve café — 你好世界 😀👍🏽\n"


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path, rows):
    return write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def prepare(tmp_path, tokenizer="chars", **spec):
    return prepare_corpus(CorpusSpec(**spec), tokenizer, tmp_path / "cache", progress=False)


def joined(tok, docs):
    """The token stream of ``docs``: their tokens with eos between documents."""
    out = []
    for i, d in enumerate(docs):
        if i:
            out.append(tok.eos_id)
        out.extend(tok.encode(d))
    return out


# ---- sources and splits -------------------------------------------------------------------------
def test_a_txt_file_is_one_document_giving_exactly_its_tokens(tmp_path):
    src = write(tmp_path / "poem.txt", POEM)
    c = prepare(tmp_path, path=str(src), val_fraction=0)
    assert isinstance(c.tokenizer, CharTokenizer) and c.tokenizer.chars == "".join(sorted(set(POEM)))
    assert c.train.tolist() == c.tokenizer.encode(POEM)
    assert c.val is None and c.meta["n_tokens"] == {"train": len(POEM), "val": None}
    assert c.meta["n_documents"] == 1 and c.meta["n_chars"] == {"train": len(POEM), "val": None}
    assert not (c.path / "val.bin").exists() and c.rebuilt
    assert not c.train.flags.writeable
    assert c.path.parent == tmp_path / "cache" and c.path.name.startswith("poem-chars-")


def test_chars_split_is_nanogpts(tmp_path):
    src = write(tmp_path / "poem.txt", POEM + "xyz")
    c = prepare(tmp_path, path=str(src), val_fraction=0.1)
    # nanoGPT's shakespeare_char: stoi over sorted(set(data)), train = data[:int(n*0.9)]
    chars = sorted(set(POEM + "xyz"))
    stoi = {ch: i for i, ch in enumerate(chars)}
    data = [stoi[ch] for ch in POEM + "xyz"]
    n = len(data)
    assert c.train.tolist() == data[: int(n * 0.9)] and c.val.tolist() == data[int(n * 0.9):]
    assert c.tokenizer.vocab_size == len(chars) + 2 and c.tokenizer.eos_id == len(chars)
    assert c.meta["n_tokens"] == {"train": int(n * 0.9), "val": n - int(n * 0.9)}
    assert c.meta["val_fraction"] == 0.1 and c.meta["format_version"] == FORMAT_VERSION


def test_every_kind_of_source_file_with_eos_only_between_documents(tmp_path):
    root = tmp_path / "data"
    write(root / "a.txt", "first file\n")
    write_jsonl(root / "b.jsonl", [{"text": "jsonl one", "id": 1}, {"text": ""}, "jsonl string"])
    (root / "b.jsonl").write_text((root / "b.jsonl").read_text() + "\n   \n", encoding="utf-8")  # blank lines
    write(root / "c.json", json.dumps([{"text": "json object"}, {"text": "second object"}]))
    write(root / "sub" / "d.json", json.dumps(["a json string", "another"]))
    write(root / ".hidden.txt", "never read")
    write(root / ".git" / "x.txt", "never read")
    write(root / "notes.md", "never read")
    docs = ["first file\n", "jsonl one", "jsonl string", "json object", "second object",
            "a json string", "another"]  # sorted paths; the empty document is skipped
    tok = ByteTokenizer()
    c = prepare(tmp_path, tok, path=str(root), val_fraction=0)
    assert c.train.tolist() == joined(tok, docs)
    assert c.train[0] != tok.eos_id and c.train[-1] != tok.eos_id
    assert int(np.sum(c.train == tok.eos_id)) == len(docs) - 1
    assert c.meta["n_documents"] == len(docs)
    assert [s["path"] for s in c.meta["sources"]] == [str((root / p).resolve()) for p in
                                                      ("a.txt", "b.jsonl", "c.json", "sub/d.json")]
    assert all(s["size"] == os.path.getsize(s["path"]) and s["mtime_ns"] for s in c.meta["sources"])
    # one file of each kind alone, and globs
    for path, want in [(root / "b.jsonl", docs[1:3]), (root / "c.json", docs[3:5]),
                       (root / "sub" / "d.json", docs[5:]), (root / "*.json*", docs[1:5]),
                       (root / "**" / "*.json", docs[3:])]:
        c = prepare(tmp_path, tok, path=str(path), val_fraction=0)
        assert c.train.tolist() == joined(tok, want), path


def test_text_field_and_separate_validation_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"body": "abc"}, {"body": "cab"}])
    val = write_jsonl(tmp_path / "val.jsonl", [{"body": "bad"}, {"body": "z"}])
    c = prepare(tmp_path, path=str(train), val_path=str(val), text_field="body")
    tok = c.tokenizer
    assert tok.chars == "abcdz"  # validation characters are in the vocabulary too
    assert c.train.tolist() == joined(tok, ["abc", "cab"]) and c.val.tolist() == joined(tok, ["bad", "z"])
    assert c.meta["val_sources"][0]["path"] == str(val.resolve()) and c.meta["val_fraction"] is None
    assert c.meta["text_field"] == "body" and c.meta["n_chars"] == {"train": 6, "val": 4}


# ---- the cache ------------------------------------------------------------------------------------
def test_a_second_call_reuses_the_cache(tmp_path, monkeypatch):
    src = write(tmp_path / "poem.txt", POEM)
    first = prepare(tmp_path, path=str(src))
    monkeypatch.setattr(corpus_mod, "_build", lambda *a, **k: pytest.fail("re-tokenized"))
    again = prepare(tmp_path, path=str(src))
    assert not again.rebuilt and again.path == first.path and again.meta == first.meta
    assert again.tokenizer.chars == first.tokenizer.chars
    assert np.array_equal(again.train, first.train) and np.array_equal(again.val, first.val)


def test_other_settings_get_their_own_cache(tmp_path):
    src = write(tmp_path / "poem.txt", POEM)
    paths = {prepare(tmp_path, path=str(src)).path, prepare(tmp_path, ByteTokenizer(), path=str(src)).path,
             prepare(tmp_path, path=str(src), val_fraction=0.2).path}
    assert len(paths) == 3


def test_a_changed_source_is_re_tokenized_saying_why(tmp_path, capsys):
    src = write(tmp_path / "poem.txt", "abcd" * 50)
    c = prepare(tmp_path, path=str(src), val_fraction=0)
    size = os.path.getsize(src)
    write(src, "abcd" * 60)
    c2 = prepare(tmp_path, path=str(src), val_fraction=0)
    out = capsys.readouterr().out
    assert c2.rebuilt and c2.path == c.path and len(c2.train) == 240
    assert f"{src.resolve()} changed (size {size} -> {size + 40} bytes); re-tokenizing" in out
    assert str(c.path) in out
    # same size, new content and a new mtime
    before = os.stat(src).st_mtime_ns
    write(src, "dcba" * 60)
    os.utime(src, ns=(before + 5_000_000_000, before + 5_000_000_000))
    c3 = prepare(tmp_path, path=str(src), val_fraction=0)
    assert c3.rebuilt and c3.tokenizer.decode(c3.train[:4]) == "dcba"
    assert "mtime_ns" in capsys.readouterr().out
    assert not prepare(tmp_path, path=str(src), val_fraction=0).rebuilt
    # a folder whose list of files changes
    write(tmp_path / "dir" / "a.txt", "abc")
    prepare(tmp_path, path=str(tmp_path / "dir"), val_fraction=0)
    write(tmp_path / "dir" / "b.txt", "cab")
    c4 = prepare(tmp_path, path=str(tmp_path / "dir"), val_fraction=0)
    assert c4.rebuilt and c4.meta["n_documents"] == 2
    assert "list of source files changed (new: " in capsys.readouterr().out
    # the old folders were moved aside and deleted: only finished caches remain
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()) == ["dir", "poem"]


def test_a_half_written_or_truncated_cache_is_never_reused(tmp_path, monkeypatch, capsys):
    src = write(tmp_path / "poem.txt", POEM)
    c = prepare(tmp_path, path=str(src))
    want_train, want_val = c.train.tolist(), c.val.tolist()
    name, cache = c.path.name, c.path.parent
    del c
    # a build killed before its rename: a tmp folder (even with a plausible meta.json) is not read
    (cache / name).rename(cache / f".{name}.tmp-99999-deadbeef")
    with open(cache / f".{name}.tmp-99999-deadbeef" / "train.bin", "r+b") as f:
        f.write(b"\xff\xff" * 10)
    c = prepare(tmp_path, path=str(src))
    assert c.rebuilt and c.train.tolist() == want_train
    # a truncated .bin, a missing meta.json, an old format version
    with open(c.path / "val.bin", "r+b") as f:
        f.truncate(10)
    c = prepare(tmp_path, path=str(src))
    assert c.rebuilt and c.val.tolist() == want_val
    assert f"val.bin has 10 bytes, expected n_tokens.val * 2 = {2 * len(want_val)}" in capsys.readouterr().out
    (c.path / "meta.json").unlink()
    assert prepare(tmp_path, path=str(src)).rebuilt and "meta.json is missing" in capsys.readouterr().out
    meta = json.loads((c.path / "meta.json").read_text())
    (c.path / "meta.json").write_text(json.dumps(dict(meta, format_version=0)))
    assert prepare(tmp_path, path=str(src)).rebuilt and "format version 0" in capsys.readouterr().out
    (c.path / "meta.json").write_text('{"format_version": 1, "tok')
    assert prepare(tmp_path, path=str(src)).rebuilt and "unreadable" in capsys.readouterr().out
    # a build interrupted in the middle leaves neither a cache nor its tmp folder behind
    for p in cache.iterdir():
        if not p.name.startswith("."):
            corpus_mod.shutil.rmtree(p)

    def interrupted(self, ids):
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus_mod._TokenWriter, "add", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path, path=str(src))
    assert [p.name for p in cache.iterdir()] == [f".{name}.tmp-99999-deadbeef"]  # not ours to delete


def test_bytes_world_and_a_large_vocabulary_store_uint16_or_uint32(tmp_path):
    src = write(tmp_path / "mixed.txt", MIXED * 10)
    for tok in (ByteTokenizer(), load_tokenizer("BlinkDL/rwkv7-g1")):
        c = prepare(tmp_path, tok, path=str(src), val_fraction=0)
        assert c.tokenizer is tok and c.train.dtype == np.uint16 and c.meta["dtype"] == "uint16"
        assert c.train.tolist() == tok.encode(MIXED * 10)
        assert os.path.getsize(c.path / "train.bin") == 2 * len(c.train)
        assert c.meta["tokenizer"]["kind"] == {"bytes": "bytes"}.get(tok.name, "rwkv_world")
        assert c.meta["n_chars"]["train"] == len(MIXED * 10)
    # more than 65536 ids: a chars vocabulary of 70000 characters
    text = "".join(chr(0x20000 + i) for i in range(70_000))
    c = prepare(tmp_path, path=str(write(tmp_path / "big.txt", text)), val_fraction=0)
    assert c.tokenizer.vocab_size == 70_002 and c.train.dtype == np.uint32 and c.meta["dtype"] == "uint32"
    assert os.path.getsize(c.path / "train.bin") == 4 * 70_000
    assert c.train[-1] == 69_999 and c.tokenizer.decode(c.train) == text


@pytest.mark.parametrize("kind", ["chars", "bytes", "world"])
def test_count_chars_over_consecutive_windows_adds_up_to_the_text(tmp_path, kind):
    docs = [MIXED * 7, "plain ascii\n" * 5, "ünïcödé 🎉" * 9]
    write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    tok = {"chars": "chars", "bytes": ByteTokenizer(), "world": load_tokenizer("BlinkDL/rwkv7-g1")}[kind]
    c = prepare(tmp_path, tok, path=str(tmp_path / "docs.jsonl"), val_fraction=0)
    tok, tokens, total = c.tokenizer, c.train, sum(map(len, docs))
    assert c.meta["n_chars"]["train"] == total
    seq_len = 5
    val = ValWindows(tokens, seq_len, batch_size=3)
    counted = tok.count_chars(tokens[:1]) + tok.count_chars(tokens[val.num_windows * seq_len + 1:])
    for batch in val:
        counted += sum(tok.count_chars(row) for row in batch["input_ids"])
    assert counted == total


# ---- Hugging Face datasets ------------------------------------------------------------------------
def test_a_dataset_saved_to_disk_and_a_split_of_a_dataset_dict(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = ["first row", "second row", "third"]
    ds = datasets.Dataset.from_dict({"text": rows, "n": [1, 2, 3]})
    ds.save_to_disk(str(tmp_path / "ds"))
    tok = ByteTokenizer()
    c = prepare(tmp_path, tok, hf_dataset=str(tmp_path / "ds"), val_fraction=0)
    assert c.train.tolist() == joined(tok, rows) and c.meta["n_documents"] == 3
    (source,) = c.meta["sources"]
    assert source["fingerprint"] == datasets.load_from_disk(str(tmp_path / "ds"))._fingerprint
    assert source["hf_dataset"] == str((tmp_path / "ds").resolve()) and "size" not in source
    monkeypatch.setattr(corpus_mod, "_build", lambda *a, **k: pytest.fail("re-tokenized"))
    assert not prepare(tmp_path, tok, hf_dataset=str(tmp_path / "ds"), val_fraction=0).rebuilt
    monkeypatch.undo()
    dd = datasets.DatasetDict({"train": ds, "validation": datasets.Dataset.from_dict({"body": ["v1", "v2"],
                                                                                        "text": ["x", "y"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    c = prepare(tmp_path, tok, hf_dataset=str(tmp_path / "dd"), hf_split="validation", text_field="body",
                val_fraction=0)
    assert c.train.tolist() == joined(tok, ["v1", "v2"])
    with pytest.raises(DataFormatError) as err:
        prepare(tmp_path, tok, hf_dataset=str(tmp_path / "dd"), hf_split="test")
    assert "'test'" in str(err.value) and "['train', 'validation']" in str(err.value)
    assert "data.hf_split" in str(err.value)
    with pytest.raises(DataFormatError) as err:
        prepare(tmp_path, tok, hf_dataset=str(tmp_path / "ds"), text_field="content")
    assert "'content'" in str(err.value) and "['text', 'n']" in str(err.value)
    assert "data.text_field" in str(err.value)


def test_a_hub_dataset_that_is_not_available_offline_says_how_to_make_it(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataFormatError) as err:
        prepare(tmp_path, ByteTokenizer(), hf_dataset="no-such-org/no-such-dataset")
    msg = str(err.value)
    assert "no-such-org/no-such-dataset" in msg and "offline" in msg and "save_to_disk" in msg


# ---- errors ---------------------------------------------------------------------------------------
def error_of(tmp_path, tokenizer="chars", **spec) -> str:
    with pytest.raises(DataFormatError) as err:
        prepare(tmp_path, tokenizer, **spec)
    return str(err.value)


def test_errors_name_the_key_the_file_and_the_fix(tmp_path):
    msg = error_of(tmp_path)
    assert "data.path" in msg and "data.hf_dataset" in msg
    missing = tmp_path / "nope.txt"
    msg = error_of(tmp_path, path=str(missing))
    assert "data.path" in msg and str(missing) in msg and "no such file" in msg
    msg = error_of(tmp_path, path=str(write(tmp_path / "x.txt", "ab")), val_path=str(tmp_path / "v.txt"))
    assert "data.val_path" in msg and "v.txt" in msg
    write(tmp_path / "empty_dir" / "readme.md", "not a corpus file")
    msg = error_of(tmp_path, path=str(tmp_path / "empty_dir"))
    assert "empty_dir" in msg and ".txt, .jsonl or .json" in msg
    msg = error_of(tmp_path, path=str(tmp_path / "empty_dir" / "*.txt"))
    assert "pattern matches no .txt, .jsonl or .json" in msg
    msg = error_of(tmp_path, path=str(write(tmp_path / "data.csv", "a,b")))
    assert "data.csv" in msg and "'.csv'" in msg and ".txt" in msg
    msg = error_of(tmp_path, path=str(write(tmp_path / "x.txt", "ab")), val_fraction=1.0)
    assert "data.val_fraction" in msg
    msg = error_of(tmp_path, path=str(write(tmp_path / "x.txt", "ab")), hf_dataset="some/dataset")
    assert "data.path" in msg and "data.hf_dataset" in msg and "one of them" in msg


def test_an_empty_corpus_names_its_sources(tmp_path):
    msg = error_of(tmp_path, path=str(write(tmp_path / "empty.txt", "")))
    assert "no text" in msg and "empty.txt" in msg
    msg = error_of(tmp_path, path=str(write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}])))
    assert "no text" in msg and "blank.jsonl" in msg and "data.text_field" in msg
    msg = error_of(tmp_path, path=str(write(tmp_path / "x.txt", "ab")),
                   val_path=str(write(tmp_path / "e.txt", "")))
    assert "no text" in msg and "e.txt" in msg and "data.val_path" in msg


def test_bad_json_lines_and_files_name_file_line_and_key(tmp_path):
    bad = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": "unterminated\n')
    msg = error_of(tmp_path, path=str(bad))
    assert f"{bad.resolve()}:2" in msg and "not valid JSON" in msg
    no_field = write_jsonl(tmp_path / "nofield.jsonl", [{"text": "ok"}, {"body": "x"}])
    msg = error_of(tmp_path, path=str(no_field))
    assert f"{no_field.resolve()}:2" in msg and "'text'" in msg and "data.text_field" in msg and "['body']" in msg
    wrong_type = write_jsonl(tmp_path / "num.jsonl", [{"text": 3}])
    assert "not a string" in error_of(tmp_path, path=str(wrong_type))
    not_list = write(tmp_path / "obj.json", json.dumps({"text": "a"}))
    msg = error_of(tmp_path, path=str(not_list))
    assert str(not_list.resolve()) in msg and "must be a list" in msg and ".jsonl" in msg
    item = write(tmp_path / "items.json", json.dumps([{"text": "a"}, 7]))
    assert f"{item.resolve()}: item 1" in error_of(tmp_path, path=str(item))
    broken = write(tmp_path / "broken.json", "[{")
    assert "broken.json" in error_of(tmp_path, path=str(broken))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    msg = error_of(tmp_path, path=str(latin1))
    assert "latin1.txt" in msg and "UTF-8" in msg


def test_an_unknown_character_names_where_it_is_and_the_fix(tmp_path):
    tok = CharTokenizer("\nabc")
    txt = write(tmp_path / "t.txt", "abc\ncab\nbaz\n")
    jsonl = write_jsonl(tmp_path / "t.jsonl", [{"text": "abc"}, {"text": "cQb"}])
    js = write(tmp_path / "t.json", json.dumps(["abc", "ab", "c€"]))
    for path, where, char in [(txt, ":3", "z"), (jsonl, ":2", "Q"), (js, ": item 2", "€")]:
        msg = error_of(tmp_path, tok, path=str(path))
        assert f"{path.resolve()}{where}:" in msg and repr(char) in msg and f"U+{ord(char):04X}" in msg
        assert "4 characters" in msg and "training text" in msg and "tokenizer.name=bytes" in msg


# ---- windows ----------------------------------------------------------------------------------------
def starts_of(batches):
    return [s for b in batches for s in b["prev_ids"].tolist()]


@pytest.mark.parametrize("N,seq_len,batch_size", [(1000, 8, 4), (1003, 10, 7), (64, 1, 9)])
def test_one_epoch_covers_every_window_once(N, seq_len, batch_size):
    tokens = np.arange(N, dtype=np.int64)  # each token is its position
    tw = TrainWindows(tokens, seq_len, batch_size, seed=3)
    n = (N - seq_len) // seq_len
    assert tw.n_windows == n and len(tw) == n // batch_size
    batches = list(tw)
    assert len(batches) == len(tw) and tw.epoch == 1 and not tw.at_epoch_end
    for b in batches:
        assert b["input_ids"].shape == (batch_size, seq_len) and b["input_ids"].dtype == torch.long
        assert b["prev_ids"].shape == (batch_size,) and b["prev_ids"].dtype == torch.long
        assert b["attention_mask"].dtype == torch.bool and bool(b["attention_mask"].all())
        assert torch.equal(b["input_ids"], b["prev_ids"][:, None] + 1 + torch.arange(seq_len))
    starts = starts_of(batches)
    shift = min(starts) % seq_len
    assert len(set(starts)) == len(starts) == len(tw) * batch_size
    assert set(starts) <= {shift + k * seq_len for k in range(n)}
    assert max(starts) + seq_len < N
    if n % batch_size == 0:
        assert sorted(starts) == [shift + k * seq_len for k in range(n)]


def test_epochs_differ_and_the_seed_decides_them():
    tokens = np.arange(5000)
    tw = TrainWindows(tokens, 16, 8, seed=0)
    epochs = [starts_of(tw) for _ in range(4)]
    assert all(a != b for i, a in enumerate(epochs) for b in epochs[i + 1:])
    assert len({min(e) % 16 for e in epochs}) > 1  # window boundaries move
    assert starts_of(TrainWindows(tokens, 16, 8, seed=0)) == epochs[0]
    assert starts_of(TrainWindows(tokens, 16, 8, seed=1)) != epochs[0]


def test_resuming_from_state_dict_gives_the_uninterrupted_batches():
    tokens = np.random.default_rng(0).integers(0, 50, size=3000)
    ref = TrainWindows(tokens, 12, 5, seed=7)
    nb = len(ref)
    want = [b["input_ids"] for _ in range(3) for b in ref]
    for stop in (1, nb // 2, nb - 1, nb, nb + 3):
        tw = TrainWindows(tokens, 12, 5, seed=7)
        got = []
        while len(got) < stop:
            for b in tw:
                got.append(b["input_ids"])
                if len(got) == stop:
                    break  # an abandoned pass
        state = json.loads(json.dumps(tw.state_dict()))
        assert state == {"epoch": stop // nb if stop % nb else stop // nb - 1, "batch_index": stop % nb or nb,
                         "seq_len": 12, "batch_size": 5, "n_windows": ref.n_windows, "seed": 7}
        assert tw.at_epoch_end == (stop % nb == 0)
        resumed = TrainWindows(tokens, 12, 5, seed=0)  # the seed comes from the state
        resumed.load_state_dict(state)
        # like ResumableDataLoader: a state saved after an epoch's last batch resumes at the next
        assert resumed.epoch == stop // nb and resumed.at_epoch_end is False
        while len(got) < len(want):
            got.extend(b["input_ids"] for b in resumed)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), stop
        # the same instance continues as well
        cont = [b["input_ids"] for b in tw]
        assert all(torch.equal(a, b) for a, b in zip(cont, want[stop:]))


def test_a_state_from_other_data_or_batch_size_is_refused():
    tw = TrainWindows(np.arange(2000), 10, 4, seed=0)
    for other in (TrainWindows(np.arange(2000), 10, 5, seed=0), TrainWindows(np.arange(3000), 10, 4, seed=0),
                  TrainWindows(np.arange(2000), 20, 4, seed=0)):
        with pytest.raises(ValueError, match="same data and batch size"):
            other.load_state_dict(tw.state_dict())


def test_windows_refuse_too_little_text_naming_source_and_keys():
    with pytest.raises(DataFormatError) as err:
        TrainWindows(np.arange(10), 10, 1, seed=0, source="tiny.txt")
    assert "tiny.txt" in str(err.value) and "shorter than one window" in str(err.value)
    with pytest.raises(DataFormatError) as err:
        TrainWindows(np.arange(100), 10, 16, seed=0, source="small.txt")
    msg = str(err.value)
    assert "small.txt" in msg and "100 tokens" in msg and "9 windows" in msg
    assert "data.seq_len=10" in msg and "training.train_batch_size=16" in msg and "lower" in msg
    with pytest.raises(DataFormatError) as err:
        ValWindows(np.arange(5), 8, 2, source="val of x")
    msg = str(err.value)
    assert "val of x" in msg and "data.seq_len" in msg and "data.val_fraction" in msg


def test_validation_windows_are_fixed_and_cover_the_split():
    tokens = np.arange(103)
    vw = ValWindows(tokens, 10, 4)
    assert vw.num_windows == 10 and len(vw) == 3
    passes = [list(vw), list(vw)]
    assert [b["input_ids"].shape[0] for b in passes[0]] == [4, 4, 2]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(*passes) for k in a)
    ids = torch.cat([b["input_ids"] for b in passes[0]]).flatten()
    assert ids.tolist() == list(range(1, 101))  # tokens 1 .. num_windows * seq_len
    assert torch.cat([b["prev_ids"] for b in passes[0]]).tolist() == list(range(0, 100, 10))
    assert ValWindows(np.arange(11), 10, 4).num_windows == 1


# ---- tinyshakespeare --------------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.isfile(SHAKESPEARE), reason="../shared/data/tinyshakespeare.txt is absent")
def test_tinyshakespeare_with_chars_is_nanogpts_shakespeare_char(tmp_path):
    import time

    start = time.perf_counter()
    c = prepare(tmp_path, path=SHAKESPEARE)
    assert time.perf_counter() - start < 10
    assert len(c.tokenizer.chars) == 65 and c.tokenizer.vocab_size == 67
    assert c.meta["n_tokens"] == {"train": int(1115394 * 0.9), "val": 1115394 - int(1115394 * 0.9)}
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()
    assert c.tokenizer.decode(c.train[:1000]) == text[:1000]
    assert c.tokenizer.decode(c.val[-1000:]) == text[-1000:]
    again = prepare(tmp_path, path=SHAKESPEARE)
    assert not again.rebuilt and again.path == c.path
