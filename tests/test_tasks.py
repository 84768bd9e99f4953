import re

import pytest
import torch

from rwkv_diffusion_rnn.data.tasks import (
    TASK_NAMES,
    VOCAB,
    CharVocab,
    TaskBatch,
    make_task,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _rows(task, batch):
    """Decoded clean texts and, per row, the answer substring read off the maskable positions."""
    texts = task.decode(batch.input_ids)
    answers = [task.vocab.decode(row[m]) for row, m in zip(batch.input_ids, batch.maskable)]
    return texts, answers


def _answer_span(maskable_row):
    idx = maskable_row.nonzero().flatten().tolist()
    assert idx == list(range(idx[0], idx[-1] + 1)), "answer must be one contiguous span"
    return idx[0], idx[-1] + 1


# ---------------------------------------------------------------- vocabulary


def test_vocab_roundtrip_and_specials():
    v = CharVocab()
    text = '{"a":0123,"b":x}=+;[]? az'
    assert v.decode(v.encode(text)) == text
    assert v.mask_id == v.vocab_size - 1
    assert v.pad_id == 0
    assert len({v.pad_id, v.mask_id, *v.encode("0123456789abcdefghijklmnopqrstuvwxyz")}) == 38
    assert v.decode([v.mask_id, v.pad_id, *v.encode("7")]) == "_7"
    assert v.decode([v.mask_id, v.pad_id], strip_pad=False) == "_#"
    assert v.encode("_#") == [v.mask_id, v.pad_id]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        v.encode("A")


def test_all_tasks_share_vocab():
    sizes = {make_task(n).vocab_size for n in TASK_NAMES}
    assert sizes == {VOCAB.vocab_size}
    assert {make_task(n).mask_id for n in TASK_NAMES} == {VOCAB.mask_id}


# ---------------------------------------------------------------- struct


def test_struct_examples_parse_and_maskable_is_b():
    task = make_task("struct")
    batch = task.sample_batch(16, _gen(3))
    assert batch.input_ids.shape == (16, 64)
    pat = re.compile(r'^\{"a":(\d{8}),"b":(\d{16}),"c":(\d{8})\}$')
    texts, answers = _rows(task, batch)
    for text, ans, ids, m in zip(texts, answers, batch.input_ids, batch.maskable):
        match = pat.match(text)
        assert match, text
        a, b, c = match.groups()
        assert b == a + c
        assert ans == b
        start, end = _answer_span(m)
        assert text[start:end] == b
        assert text[start - 5 : start] == ',"b":' and text[end:].startswith(',"c":')
        assert int(m.sum()) == 16 == task.answer_len
    # attention mask marks the 48 text characters, PAD after
    assert batch.attention_mask.sum(1).tolist() == [48] * 16
    assert (batch.input_ids[:, 48:] == task.pad_id).all()
    assert not (batch.maskable & ~batch.attention_mask).any()


def test_struct_len_option():
    task = make_task("struct", struct_len=3, seq_len=28)
    batch = task.sample_batch(2, _gen())
    for text in task.decode(batch.input_ids):
        a, b, c = re.fullmatch(r'\{"a":(\d{3}),"b":(\d{6}),"c":(\d{3})\}', text).groups()
        assert b == a + c


# ---------------------------------------------------------------- right-dependent tasks


def test_rightcopy_answer_is_right_string():
    task = make_task("rightcopy")
    batch = task.sample_batch(16, _gen(1))
    texts, answers = _rows(task, batch)
    for text, ans in zip(texts, answers):
        x, q, r = re.fullmatch(r"l=(\d{8});\?=(\d{8});r=(\d{8})", text).groups()
        assert q == r == ans


def test_rightrev_answer_is_reversed_right_string():
    task = make_task("rightrev")
    batch = task.sample_batch(16, _gen(2))
    texts, answers = _rows(task, batch)
    assert any(a != a[::-1] for a in answers)  # not trivially palindromic
    for text, ans in zip(texts, answers):
        x, q, r = re.fullmatch(r"l=(\d{8});\?=(\d{8});r=(\d{8})", text).groups()
        assert q == r[::-1] == ans


def test_index_answer_is_window_at_index():
    task = make_task("index")
    batch = task.sample_batch(64, _gen(4))
    texts, answers = _rows(task, batch)
    starts = set()
    for text, ans in zip(texts, answers):
        s, q, i = re.fullmatch(r"s=(\d{16});\?=(\d{4});i=(\d{2})", text).groups()
        i = int(i)
        assert 0 <= i <= 12
        assert q == s[i : i + 4] == ans
        starts.add(i)
    assert len(starts) > 5  # the index really varies


def test_add_answer_is_sum_left_of_operands():
    task = make_task("add")
    batch = task.sample_batch(32, _gen(5))
    texts, answers = _rows(task, batch)
    for text, ans, m in zip(texts, answers, batch.maskable):
        c, a, b = re.fullmatch(r"(\d{9})=(\d{8})\+(\d{8})", text).groups()
        assert int(c) == int(a) + int(b)
        assert c == ans
        assert m[:9].all() and not m[9:].any()


def test_add_long_operands_exact():
    task = make_task("add", struct_len=25, seq_len=80)
    for text in task.decode(task.sample_batch(8, _gen(6)).input_ids):
        c, a, b = re.fullmatch(r"(\d{26})=(\d{25})\+(\d{25})", text).groups()
        assert int(c) == int(a) + int(b)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_task_contract(name):
    task = make_task(name)
    batch = task.sample_batch(8, _gen(7))
    assert batch.input_ids.dtype == torch.long and batch.input_ids.shape == (8, 64)
    assert batch.maskable.dtype == torch.bool and batch.attention_mask.dtype == torch.bool
    assert (batch.maskable.sum(1) == task.answer_len).all()
    assert (batch.attention_mask.sum(1) == task.text_len).all()
    assert not (batch.input_ids == task.mask_id).any()
    masked = batch.masked_input(task.mask_id)
    assert (masked[batch.maskable] == task.mask_id).all()
    assert torch.equal(masked[~batch.maskable], batch.input_ids[~batch.maskable])
    assert "_" * task.answer_len in task.decode(masked[0])


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", TASK_NAMES)
def test_sample_batch_deterministic_under_generator(name):
    task = make_task(name)
    b1 = task.sample_batch(8, _gen(11))
    b2 = task.sample_batch(8, _gen(11))
    b3 = task.sample_batch(8, _gen(12))
    assert torch.equal(b1.input_ids, b2.input_ids) and torch.equal(b1.maskable, b2.maskable)
    assert not torch.equal(b1.input_ids, b3.input_ids)
    g = _gen(11)
    first, second = task.sample_batch(8, g), task.sample_batch(8, g)
    assert torch.equal(first.input_ids, b1.input_ids)
    assert not torch.equal(first.input_ids, second.input_ids)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_fixed_eval_set_is_fixed(name):
    task = make_task(name)
    e1 = task.fixed_eval_set()
    task.sample_batch(4)  # advancing the task's own stream must not change the eval set
    e2 = make_task(name, seed=99).fixed_eval_set(n=200, seed=1234)
    other = task.fixed_eval_set(n=200, seed=4321)
    assert e1.input_ids.shape == (200, 64)
    assert torch.equal(e1.input_ids, e2.input_ids) and torch.equal(e1.maskable, e2.maskable)
    assert not torch.equal(e1.input_ids, other.input_ids)


def test_iterate_reproducible():
    task = make_task("struct")
    it1, it2 = task.iterate(4, seed=5), task.iterate(4, seed=5)
    for _ in range(3):
        assert torch.equal(next(it1).input_ids, next(it2).input_ids)
    assert not torch.equal(next(task.iterate(4, seed=5)).input_ids, next(task.iterate(4, seed=6)).input_ids)


def test_default_stream_follows_task_seed():
    a = make_task("rightcopy", seed=3).sample_batch(4)
    b = make_task("rightcopy", seed=3).sample_batch(4)
    c = make_task("rightcopy", seed=4).sample_batch(4)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)


# ---------------------------------------------------------------- scoring


@pytest.mark.parametrize("name", TASK_NAMES)
def test_score_ground_truth_is_perfect(name):
    task = make_task(name)
    batch = task.fixed_eval_set(n=20)
    res = task.score(batch.input_ids.clone(), batch)
    assert res["acc"] == 1.0 and res["exact"] == 1.0
    assert res["n_tokens"] == 20 * task.answer_len and res["n_rows"] == 20
    # changes outside the answer are ignored
    pred = batch.input_ids.clone()
    pred[~batch.maskable] = task.mask_id
    assert task.score(pred, batch)["exact"] == 1.0
    # all-mask prediction scores zero
    assert task.score(batch.masked_input(task.mask_id), batch) == {
        "acc": 0.0, "exact": 0.0, "n_tokens": 20 * task.answer_len, "n_rows": 20,
    }


def test_score_hand_made_corruption():
    task = make_task("struct")
    batch = task.sample_batch(2, _gen(8))
    pred = batch.input_ids.clone()
    start, _ = _answer_span(batch.maskable[0])
    pred[0, start] = task.vocab.encode("x")[0]  # one wrong answer token in row 0
    res = task.score(pred, batch)
    assert res["exact"] == 0.5
    assert res["acc"] == pytest.approx(31 / 32)  # 2 rows x 16 answer tokens, 1 wrong
    # two more wrong tokens in row 1
    start1, _ = _answer_span(batch.maskable[1])
    pred[1, start1 : start1 + 2] = task.mask_id
    res = task.score(pred, batch)
    assert res["exact"] == 0.0
    assert res["acc"] == pytest.approx(29 / 32)


def test_score_accepts_logits_and_checks_shape():
    task = make_task("add")
    batch = task.sample_batch(3, _gen(9))
    logits = torch.nn.functional.one_hot(batch.input_ids, task.vocab_size).float()
    assert task.score(logits, batch)["exact"] == 1.0
    with pytest.raises(ValueError, match="shape"):
        task.score(batch.input_ids[:, :10], batch)


def test_score_by_hand_on_tiny_batch():
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 0]])
    maskable = torch.tensor([[False, True, True, False], [False, True, True, False]])
    batch = TaskBatch(ids, maskable, ids != 0)
    pred = torch.tensor([[9, 6, 1, 0], [5, 6, 7, 3]])
    res = make_task("struct").score(pred, batch)
    assert res["acc"] == pytest.approx(3 / 4)
    assert res["exact"] == 0.5


# ---------------------------------------------------------------- errors


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError) as err:
        make_task("sudoku")
    msg = str(err.value)
    assert "sudoku" in msg and all(n in msg for n in ("struct", "rightcopy", "rightrev", "index", "add"))


@pytest.mark.parametrize("name", TASK_NAMES)
def test_seq_len_too_short_names_seq_len(name):
    need = make_task(name).text_len
    with pytest.raises(ValueError, match=r"seq_len=%d" % (need - 1)) as err:
        make_task(name, seq_len=need - 1)
    assert "struct_len" in str(err.value)
    make_task(name, seq_len=need)  # exactly fits


def test_struct_needs_48_for_default_len():
    with pytest.raises(ValueError, match="seq_len"):
        make_task("struct", seq_len=40)
    with pytest.raises(ValueError, match="struct_len"):
        make_task("struct", struct_len=0)
