"""Instruction tuning: conversation files, the examples and batches made of them, LLaDA's SFT loss
(checked by hand), training on a conversation file, and bad input refused by file and entry."""
import json
import math

import pytest
import torch

from rwkv_diffusion_rnn.common.errors import DataFormatError
from rwkv_diffusion_rnn.data.sft import ChatTemplate, collate, examples_of, parse_conversation, read_conversations
from rwkv_diffusion_rnn.data.tokenizer import CharTokenizer
from rwkv_diffusion_rnn.diffusion.diffusion_process import MaskedDiffusion
from rwkv_diffusion_rnn.diffusion.objective import DiffusionObjective
from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserOutput
from rwkv_diffusion_rnn.train_rwkv import compose_config, run
from rwkv_diffusion_rnn.training.improved_trainer import read_train_log

TEMPLATE = ChatTemplate()


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def reverse_conversations(n):
    words = ["ab", "cde", "fa", "bead", "cab", "dace", "ebb", "fad"]
    return [{"conversations": [{"from": "human", "value": f"reverse: {words[i % 8]}{i % 3}"},
                               {"from": "gpt", "value": f"{words[i % 8]}{i % 3}"[::-1]}]} for i in range(n)]


def test_both_conversation_formats_and_the_system_text_are_read(tmp_path):
    share = {"system": "be brief", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    openai = {"messages": [{"role": "system", "content": "terse"}, {"role": "user", "content": "a"},
                           {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                           {"role": "assistant", "content": "d"}]}
    (tmp_path / "c.json").write_text(json.dumps([share, openai]))
    convs = read_conversations(tmp_path / "c.json")
    assert [c.system for c in convs] == ["be brief", "terse"]
    assert convs[1].turns == [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]
    assert read_conversations(write_jsonl(tmp_path / "c.jsonl", [share, openai]))[0].turns == convs[0].turns


def test_every_assistant_turn_is_an_example_whose_prompt_is_everything_before_it():
    conv = parse_conversation({"system": "S", "conversations": [
        {"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
        {"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]}, "x")
    tok = CharTokenizer.from_text(["System: User: Assistant: \nabcdS"])
    (first, second), counts = examples_of([conv], tok, TEMPLATE, seq_len=200)
    assert counts == {"examples": 2, "dropped": 0, "cut": 0}
    assert first.prompt[0] == tok.eos_id                                   # BOS: the end-of-text id
    assert tok.decode(first.prompt[1:].tolist()) == "System: S\nUser: a\nAssistant: "
    assert tok.decode(second.prompt[1:].tolist()) == "System: S\nUser: a\nAssistant: b\nUser: c\nAssistant: "
    assert tok.decode(first.answer[:-1].tolist()) == "b" and first.answer[-1] == tok.eos_id
    # a prompt that does not fit is dropped, an answer that does not fit is cut
    _, counts = examples_of([conv], tok, TEMPLATE, seq_len=len(second.prompt))
    assert counts == {"examples": 1, "dropped": 1, "cut": 0}
    _, counts = examples_of([conv], tok, TEMPLATE, seq_len=len(second.prompt) + 1)
    assert counts == {"examples": 2, "dropped": 0, "cut": 1}


def two_example_batch():
    tok = CharTokenizer.from_text(["System: User: Assistant: \nabcdefgh"])
    convs = [parse_conversation({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}, "x")
             for q, a in (("abc", "d"), ("a", "efgh"))]
    examples, _ = examples_of(convs, tok, TEMPLATE, seq_len=100)
    return tok, collate(examples, tok.eos_id)


def test_a_batch_pads_answers_with_eos_and_carries_the_prompt_lengths():
    tok, batch = two_example_batch()
    ids, plen = batch["input_ids"], batch["prompt_lengths"]
    assert plen.tolist() == [len("User: abc\nAssistant: ") + 1, len("User: a\nAssistant: ") + 1]
    assert ids.shape == (2, int(plen[1]) + 5) and bool(batch["attention_mask"].all())
    assert tok.decode(ids[0, plen[0]:].tolist()).startswith("d") and (ids[0, plen[0] + 1:] == tok.eos_id).all()
    assert ids[0].eq(tok.eos_id).sum() == 1 + ids.shape[1] - plen[0] - 1    # BOS + the EOS of the answer and padding


def test_prompt_tokens_are_never_masked_and_eos_padding_is_part_of_the_answer():
    tok, batch = two_example_batch()
    obj = DiffusionObjective(MaskedDiffusion(mask_id=tok.mask_id, vocab_size=tok.vocab_size, truncate_prob=0.0),
                             None, sft=True)
    g = torch.Generator().manual_seed(0)
    answer = torch.arange(batch["input_ids"].shape[1])[None] >= batch["prompt_lengths"][:, None]
    seen = torch.zeros_like(answer)
    for _ in range(200):
        nb = obj.noise(batch, g)
        assert not nb.is_masked[~answer].any()
        seen |= nb.is_masked
        assert nb.answer_lengths.tolist() == answer.sum(1).tolist()
    assert seen.eq(answer).all()                    # every answer position, EOS padding included, gets masked


@pytest.mark.parametrize("loss_type", ["llada", "mdlm"])
def test_the_sft_loss_equals_a_hand_computation_on_two_examples(loss_type):
    tok, batch = two_example_batch()
    text = MaskedDiffusion(mask_id=tok.mask_id, vocab_size=tok.vocab_size, truncate_prob=0.0, loss_type=loss_type,
                           schedule="linear")
    obj = DiffusionObjective(text, None, sft=True)
    nb = obj.noise(batch, torch.Generator().manual_seed(3))
    logits = torch.randn(*batch["input_ids"].shape, tok.vocab_size, generator=torch.Generator().manual_seed(4))
    loss, _ = obj.loss(DenoiserOutput(logits, None, None), nb)
    total = 0.0
    for b in range(2):
        t = float(nb.t[b])
        weight = 1.0 / t                            # linear schedule: mask rate t; mdlm's -a'/(1-a) is 1/t too
        answer_len = batch["input_ids"].shape[1] - int(batch["prompt_lengths"][b])
        row = 0.0
        for i in range(batch["input_ids"].shape[1]):
            if nb.is_masked[b, i]:
                row += -float(torch.log_softmax(logits[b, i].double(), -1)[batch["input_ids"][b, i]])
        total += weight * row / answer_len
    assert nb.is_masked.any()
    assert float(loss) == pytest.approx(total / 2, rel=1e-5)


def sft_overrides(tmp_path, path, *extra):
    return ["model=scratch", "data=sft", f"data.path={path}", "tokenizer.name=chars", "model.n_layer=1",
            "model.n_embd=32", "model.head_size=16", "model.latent_prefix_len=0", "data.seq_len=48",
            "training.train_batch_size=8", "training.eval_batch_size=16", "training.max_steps=6",
            "training.num_epochs=null", "logging.eval_freq=3", "logging.log_freq=1", "logging.progress_bar=false",
            f"logging.save_dir={tmp_path / 'run'}", *extra]


def test_a_conversation_file_trains_scores_its_answers_and_resumes_exactly(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", reverse_conversations(60))
    metrics = run(compose_config(sft_overrides(tmp_path / "a", path)))
    assert math.isfinite(metrics["val_nelbo"]) and "val_bpc" not in metrics
    part = sft_overrides(tmp_path / "b", path)
    run(compose_config([*part, "training.stop_at_step=3"]))
    run(compose_config([*part, "training.resume=latest"]))
    assert [r["loss"] for r in read_train_log(tmp_path / "a" / "run")] == \
        [r["loss"] for r in read_train_log(tmp_path / "b" / "run")]
    plain = run(compose_config(sft_overrides(tmp_path / "c", path, "text_noise.sft=false")))
    assert plain["val_nelbo"] != metrics["val_nelbo"]           # the same answers, scored after other training


@pytest.mark.parametrize("content,phrases", [
    ([{"conversations": [{"from": "human", "value": "hi"}]}], ["line 1", "no assistant turn"]),
    ([{"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}],
     ["line 1 turn 1", "unknown role 'bot'"]),
    ([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}]}],
     ["line 1 turn 1", "empty value"]),
    ("this is { not json\n", ["neither JSON nor JSON Lines", "line 1"]),
])
def test_bad_conversations_are_refused_naming_the_file_and_entry(tmp_path, content, phrases):
    path = tmp_path / "bad.jsonl"
    path.write_text(content if isinstance(content, str) else "\n".join(json.dumps(r) for r in content))
    with pytest.raises(DataFormatError) as e:
        read_conversations(path)
    assert str(path) in str(e.value) and all(p in str(e.value) for p in phrases), str(e.value)


def train_answering_ok(tmp, seq_len: int):
    """A tiny model trained to answer every question with "ok" (its run folder)."""
    rows = [{"conversations": [{"from": "human", "value": f"question {i}"}, {"from": "gpt", "value": "ok"}]}
            for i in range(64)]
    path = write_jsonl(tmp / "c.jsonl", rows)
    run(compose_config(sft_overrides(tmp, path, "training.max_steps=60", "optimizer.lr=3e-3", "logging.eval_freq=0",
                                     "optimizer.warmup_steps=5", f"data.seq_len={seq_len}")))
    return tmp / "run"


@pytest.fixture(scope="module")
def answers_ok(tmp_path_factory):
    return train_answering_ok(tmp_path_factory.mktemp("ok"), 40)


def test_generate_chat_answers_after_the_rendered_prompt_and_prints_only_the_answer(answers_ok, tmp_path):
    from rwkv_diffusion_rnn.generate import generate
    rec, = generate(answers_ok, chat=True, prompt="question 99", temperature=0.0, remasking="low_confidence",
                    progress_bar=False, print_texts=False)
    assert rec["text"] == "ok" and rec["ended_by_eos"] and rec["prompt"] == "question 99"
    held = write_jsonl(tmp_path / "held.jsonl", [
        {"conversations": [{"from": "human", "value": "question 70"}, {"from": "gpt", "value": "ok"}]},
        {"system": "terse", "conversations": [{"from": "human", "value": "question 71"}]}])
    recs = generate(answers_ok, conversation=str(held), temperature=0.0, remasking="low_confidence", length=6,
                    progress_bar=False, print_texts=False)
    assert [r.get("reference") for r in recs] == ["ok", None] and recs[0]["text"] == "ok"
    assert all(len(r["token_ids"]) <= 6 for r in recs)


def test_the_chat_loop_answers_each_line_with_the_conversation_so_far(answers_ok):
    import io
    from rwkv_diffusion_rnn.chat import chat_loop
    out = io.StringIO()
    turns = chat_loop([f"checkpoint={answers_ok}", "temperature=0", "remasking=low_confidence", "length=4"],
                      lines=io.StringIO("question 5\n/reset\nquestion 6\nquestion 7\n"), out=out)
    assert out.getvalue().splitlines() == ["ok", "ok", "ok"]
    assert [t for t, _ in turns] == ["user", "assistant", "user", "assistant"]      # reset after the first


def test_chat_options_that_cannot_work_are_refused_by_name(answers_ok, tmp_path):
    from rwkv_diffusion_rnn.generate import generate
    from rwkv_diffusion_rnn.common.errors import ConfigError
    with pytest.raises(ConfigError, match="exactly one of prompt"):
        generate(answers_ok, chat=True)
    with pytest.raises(ConfigError, match="system= is the system text of chat=true"):
        generate(answers_ok, prompt="question 1", system="x")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"conversations": [{"from": "gpt", "value": "ok"}]}) + "\n")
    with pytest.raises(ConfigError, match="line 1: nothing to answer"):
        generate(answers_ok, conversation=str(bad))


def test_instruction_sets_have_checkable_answers_and_held_out_prompts_unseen_in_training():
    from rwkv_diffusion_rnn.data.instructions import TASKS, make_sets
    sets = make_sets(400, 80, seed=3)
    seen = {c["conversations"][0]["value"] for c in sets["train"]}
    assert not any(c["conversations"][0]["value"] in seen for c in sets["heldout"])
    assert {c["task"] for c in sets["heldout"]} == set(TASKS)
    for c in sets["train"][:40]:
        q, a = c["conversations"][0]["value"], c["conversations"][1]["value"]
        operands = [w for w in q.replace("?", " ").replace(".", " ").replace(":", " ").split() if w.isalnum()]
        if c["task"] == "add":
            x, y = [int(w) for w in operands if w.isdigit()]
            assert int(a) == x + y
        elif c["task"] == "sort":
            assert a == "".join(sorted(next(w for w in operands if w.isdigit())))
        elif c["task"] == "reverse":
            assert a[::-1] in operands
        else:
            assert a.lower() in operands and a.isupper()


@pytest.mark.parametrize("model", [["model.mixer=causal"], ["model.mixer=dw_jrt"], ["model.mixer=bi_wkv"], ["model.mixer=block_causal",
                                   "model.block_size=8"], ["model.arch=transformer"], ["model.arch=hybrid", "model.n_layer=2"],
                                   ["model.arch=qwen3", "model.block_attention=true", "model.block_size=8"],
                                   ["model.shift_logits=true"], ["model.mixer=block_causal", "model.block_size=8",
                                                                 "model.shift_logits=true", "model.block_context=clean"]])
def test_every_mixer_and_architecture_trains_on_conversations(tmp_path, model):
    path = write_jsonl(tmp_path / "c.jsonl", reverse_conversations(40))
    if "model.arch=qwen3" in model:
        from test_qwen3 import save_tiny_qwen3
        model = [*model, f"model.qwen3_name={save_tiny_qwen3(tmp_path / 'q3', vocab_size=64)}"]
    metrics = run(compose_config(sft_overrides(tmp_path, path, *model, "training.max_steps=2", "logging.eval_freq=0")))
    assert math.isfinite(metrics["val_nelbo"])
    losses = [r["loss"] for r in read_train_log(tmp_path / "run")]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_sft_settings_that_cannot_work_are_refused_by_key(tmp_path):
    from rwkv_diffusion_rnn.training.config_validation import validate_config
    from rwkv_diffusion_rnn.common.errors import ConfigError
    path = write_jsonl(tmp_path / "c.jsonl", reverse_conversations(20))
    for extra, phrase in ((["text_noise.truncate_prob=0.1"], "text_noise.truncate_prob=0.1 with data=sft"),
                          (["data.path=null"], "data=sft needs conversations"),
                          (["model.latent_prefix_len=4"], "data.kind=sft has no sentence latents"),
                          (["data.chat_template.user=User"], "data.chat_template.user='User' must hold exactly one")):
        with pytest.raises(ConfigError, match=phrase):
            cfg = compose_config(sft_overrides(tmp_path, path, *extra))
            validate_config(cfg)
            from rwkv_diffusion_rnn.training.builders import build_data
            build_data(cfg)
    with pytest.raises(ConfigError, match="text_noise.sft=true trains answers to prompts"):
        validate_config(compose_config(["experiment=shakespeare_char", "text_noise.sft=true"]))


def test_shares_of_an_sft_batch_add_up_to_its_loss():
    """Under torchrun each process runs some rows of a batch with the whole batch's normaliser."""
    from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig
    from rwkv_diffusion_rnn.weights.pretrained_rwkv import build_denoiser
    tok, batch = two_example_batch()
    torch.manual_seed(0)
    model = build_denoiser(DenoiserConfig(vocab_size=tok.vocab_size, mask_id=tok.mask_id, latent_prefix_len=0),
                           n_layer=1, n_embd=32, head_size=16)
    obj = DiffusionObjective(MaskedDiffusion(mask_id=tok.mask_id, vocab_size=tok.vocab_size, truncate_prob=0.0),
                             None, sft=True)
    whole, _ = obj(model, batch, torch.Generator().manual_seed(1))
    parts = [obj(model, batch, torch.Generator().manual_seed(1), rows=r)[0] for r in (slice(0, 1), slice(1, 2))]
    assert float(sum(parts).detach()) == pytest.approx(float(whole.detach()), rel=1e-5)


def test_a_character_the_vocabulary_lacks_is_named_with_its_conversation(tmp_path):
    conv = parse_conversation({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "Z"}]},
                              f"{tmp_path / 'c.jsonl'} line 3")
    tok = CharTokenizer.from_text(["System: User: Assistant: \na"])
    with pytest.raises(DataFormatError, match=r"c.jsonl line 3 turn 1: .*'Z'"):
        examples_of([conv], tok, TEMPLATE, seq_len=100)


@pytest.fixture(scope="module")
def answers_ok_64(tmp_path_factory):
    """The "ok" model of :func:`answers_ok` with data.seq_len=64: a few exchanges fill it."""
    return train_answering_ok(tmp_path_factory.mktemp("ok64"), 64)


def test_a_chat_session_keeps_the_last_turns_that_fit_and_survives_a_failing_turn(answers_ok_64):
    import os
    import subprocess
    import sys

    def chat(*lines, options=("length=4",)):
        done = subprocess.run(
            [sys.executable, "-m", "rwkv_diffusion_rnn.chat", f"checkpoint={answers_ok_64}", "temperature=0",
             "remasking=low_confidence", *options], input="".join(f"{line}\n" for line in lines),
            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.splitlines(), done.stderr

    # each exchange is 31 tokens: from the third turn on the oldest goes to leave length=4 for the answer
    answers, err = chat(*(f"question {i}" for i in range(5)))
    assert answers == ["ok"] * 5
    assert err.count("(dropped the oldest turn to fit data.seq_len=64)") == 3
    # without length= the answer keeps at least a quarter of data.seq_len: a second turn already drops one
    answers, err = chat("question 1", "question 2", options=())
    assert len(answers) == 2 and err.count("(dropped the oldest turn to fit data.seq_len=64)") == 1
    # a character outside the chars vocabulary fails that turn alone; the next one is answered
    answers, err = chat("question 1", "question Z", "question 3")
    assert answers == ["ok", "ok"]
    assert "error: " in err and "'Z'" in err and "(type /reset to start over)" in err, err
