"""The lm-eval model ``rwkv_diffusion`` on checkpoints trained in the test: AR loglikelihoods equal
the exact NLL of the project's scorer, diffusion loglikelihoods equal its bound with the same draws
and an independent Monte-Carlo estimate within its standard error, greedy decoding agrees with
``is_greedy``, stop sequences cut generations, SFT checkpoints use their chat template, and
lm-eval's own command runs local multiple-choice, generation and perplexity tasks offline."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from rwkv_diffusion_rnn.generate import generate  # noqa: E402
from rwkv_diffusion_rnn.lm_eval_harness import RwkvDiffusionLM  # noqa: E402
from rwkv_diffusion_rnn.train_rwkv import compose_config, run  # noqa: E402
from rwkv_diffusion_rnn.training import likelihood  # noqa: E402

from test_lm import corpus_file, overrides  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(progress_bar=False, print_texts=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny chars checkpoints of the shakespeare preset: AR and bidirectional diffusion."""
    tmp = tmp_path_factory.mktemp("harness")
    corpus = corpus_file(tmp)
    out = {}
    for name, extra in {"ar": ["training.objective=ar", "model.mixer=causal"], "bi": []}.items():
        run(compose_config(overrides(tmp, corpus, "training.max_steps=12", "logging.eval_freq=0",
                                     f"logging.save_dir={tmp / name}", *extra)))
        out[name] = tmp / name
    return out


def req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_ar_loglikelihoods_are_the_exact_nll_of_the_projects_scorer(runs):
    lm = RwkvDiffusionLM(checkpoint=str(runs["ar"]), batch_size=3)
    enc, eos = lm.tok.encode, lm.tok.eos_id

    def nll(text):
        return likelihood.score_texts(lm.trained.model, [enc(text)], eos, lm.trained.device)[0][0]

    # within data.seq_len = 16 tokens, the end-of-text id first
    pairs = [("the cat", " sat on"), ("", "a dog ran"), ("we like", " tea and"), ("is it", " cold")]
    got = lm.loglikelihood([req("loglikelihood", c, x) for c, x in pairs])
    for (ctx, cont), (ll, _) in zip(pairs, got):
        want = -(nll(ctx + cont) - (nll(ctx) if ctx else 0.0))
        assert ll == pytest.approx(want, abs=1e-5), (ctx, cont)
    # a longer context is cut from the left to fit the 16 tokens
    (long, _), (cut, _) = lm.loglikelihood([req("loglikelihood", "a dog ran. the cat", " sat on"),
                                           req("loglikelihood", "ran. the cat", " sat on")])
    assert long == pytest.approx(cut, abs=1e-9)
    # a short text fits one window: the rolling loglikelihood is the whole text's
    assert lm.loglikelihood_rolling([req("loglikelihood_rolling", "the sun is up")])[0] == \
        pytest.approx(-nll("the sun is up"), abs=1e-5)


def test_rolling_windows_score_every_token_once_with_a_full_context_at_the_end(runs):
    for name in ("ar", "bi"):
        lm = RwkvDiffusionLM(checkpoint=str(runs[name]))
        text = "the cat sat on the mat. a dog ran in the park! we like"
        windows = lm.rolling_windows(text)
        assert sum((scored for _, scored in windows), []) == lm.tok.encode(text) and len(windows) > 2
        canvas = lm.max_length + (1 if name == "ar" else 0)     # AR: its inputs drop the last token
        assert all(len(c) + len(s) <= canvas for c, s in windows)
        assert len(windows[-1][0]) + len(windows[-1][1]) == canvas
    assert math.isfinite(lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])[0])


def test_ar_is_greedy_exactly_for_what_greedy_decoding_writes(runs):
    lm = RwkvDiffusionLM(checkpoint=str(runs["ar"]))
    rec, = generate(runs["ar"], prompt="the cat", length=7 + 5, temperature=0.0, eos=False, **FAST)
    written = rec["text"][len("the cat"):]
    other = ("a" if written[0] != "a" else "e") + written[1:]     # the first token is not the argmax
    (_, greedy), (_, not_greedy) = lm.loglikelihood([req("loglikelihood", "the cat", written),
                                                     req("loglikelihood", "the cat", other)])
    assert greedy and not not_greedy


def test_the_diffusion_loglikelihood_is_the_projects_bound_with_the_same_draws(runs):
    lm = RwkvDiffusionLM(checkpoint=str(runs["bi"]), mc_samples=8, batch_size=8, is_greedy=False, seed=3)
    ctx, cont = "the cat", " sat on"        # 15 tokens with the end-of-text id: no cut
    (ll, _), = lm.loglikelihood([req("loglikelihood", ctx, cont)])
    # evaluate's scorer on a batch of the same sequence, its context given as a prompt
    ids = [lm.eos_id] + lm.tok.encode(ctx + cont)
    n = len(lm.tok.encode(cont))
    batch = {"input_ids": torch.tensor([ids] * 8), "attention_mask": torch.ones(8, len(ids), dtype=torch.long),
             "prompt_lengths": torch.full((8,), len(ids) - n)}
    cfg = lm.trained.cfg
    summary = likelihood.score(lm.trained.model, [batch], objective="diffusion", schedule=lm.schedule,
                               mask_id=cfg.model.mask_id, vocab_size=cfg.model.vocab_size,
                               generator=torch.Generator().manual_seed(3))
    assert summary.tokens == 8 * n
    assert ll == pytest.approx(-summary.nats_per_token * n, rel=1e-9)


def test_the_diffusion_loglikelihood_agrees_with_an_independent_estimate_within_its_standard_error(runs):
    """A plain Monte-Carlo estimate of the conditional bound (independent times, no stratification):
    E_t E_mask [ w(t) * sum over masked continuation tokens of -log p(x_i | x_t, t) ]."""
    lm = RwkvDiffusionLM(checkpoint=str(runs["bi"]), mc_samples=256, batch_size=64, is_greedy=False)
    ctx, cont = "we like", " tea and"
    draws = lm.diffusion_nats([lm.eos_id] + lm.tok.encode(ctx), lm.tok.encode(cont))
    ids = torch.tensor([lm.eos_id] + lm.tok.encode(ctx + cont))
    n, L, mask_id = len(lm.tok.encode(cont)), len(ids), lm.trained.cfg.model.mask_id
    g = torch.Generator().manual_seed(11)
    ref = []
    with torch.no_grad():
        for _ in range(4):
            t = torch.rand(64, generator=g, dtype=torch.float64)
            masked = (torch.rand(64, L, generator=g, dtype=torch.float64) < lm.schedule.mask_rate(t)[:, None])
            masked[:, :L - n] = False
            x = ids.expand(64, L)
            xt = torch.where(masked, torch.full_like(x, mask_id), x)
            logits = lm.trained.model(xt, t.float(), context_ids=x.clone(),
                                      prompt_lengths=torch.full((64,), L - n)).logits.double()
            logits[..., mask_id] = -math.inf
            nll = -(logits.log_softmax(-1).gather(-1, x[..., None]).squeeze(-1) * masked).sum(1)
            ref.append(lm.schedule.elbo_weight(t) * nll)
    ref = torch.cat(ref)
    se = math.sqrt(draws.var() / len(draws) + ref.var() / len(ref))
    assert abs(float(draws.mean() - ref.mean())) < 4 * se, (float(draws.mean()), float(ref.mean()), se)
    assert float(draws.std()) > 0 and float(draws.mean()) > 0


def test_diffusion_is_greedy_exactly_for_what_greedy_decoding_writes(runs):
    lm = RwkvDiffusionLM(checkpoint=str(runs["bi"]), mc_samples=2)
    ctx = [lm.eos_id] + lm.tok.encode("the cat")
    from rwkv_diffusion_rnn.diffusion.sampling import generate_text
    canvas = torch.tensor([ctx + [lm.trained.cfg.model.mask_id] * 5])
    written = lm.tok.decode(generate_text(lm.trained.model, prompt_ids=canvas, steps=5, remasking="low_confidence",
                                          temperature=0.0)[0, len(ctx):].tolist())
    other = ("a" if written[0] != "a" else "e") + written[1:]     # the first token is not the argmax
    (_, greedy), (_, not_greedy) = lm.loglikelihood([req("loglikelihood", "the cat", written),
                                                     req("loglikelihood", "the cat", other)])
    assert greedy and not not_greedy


@pytest.mark.parametrize("name", ["ar", "bi"])
def test_generate_until_continues_with_the_projects_sampler_and_stops_at_the_stop_sequence(runs, name):
    lm = RwkvDiffusionLM(checkpoint=str(runs[name]), steps=6)
    free, = lm.generate_until([req("generate_until", "the cat", {"max_gen_toks": 6})])
    rec, = generate(runs[name], prompt="the cat", length=7 + 6, temperature=0.0, steps=None if name == "ar" else 6,
                    **FAST)
    assert free == rec["text"][len("the cat"):] and len(free) <= 6
    stop = free[2:4] if len(free) >= 4 else None
    if stop:
        cut, = lm.generate_until([req("generate_until", "the cat", {"max_gen_toks": 6, "until": [stop]})])
        assert cut == free[:free.index(stop)]


def test_an_sft_checkpoint_renders_and_answers_with_its_chat_template(tmp_path):
    from test_sft import train_answering_ok
    folder = train_answering_ok(tmp_path, 40)
    lm = RwkvDiffusionLM(checkpoint=str(folder), remasking="low_confidence", mc_samples=4, is_greedy=False)
    prompt = lm.apply_chat_template([{"role": "user", "content": "question 99"}])
    assert prompt == "User: question 99\nAssistant: "
    answer, = lm.generate_until([req("generate_until", prompt, {"max_gen_toks": 6})])
    rec, = generate(folder, chat=True, prompt="question 99", temperature=0.0, remasking="low_confidence",
                    length=6, **FAST)
    assert answer == rec["text"]
    ok, bad = lm.loglikelihood([req("loglikelihood", prompt, "ok"), req("loglikelihood", prompt, "qu")])
    assert ok[0] > bad[0]


def test_bad_model_args_are_refused_by_name(runs):
    from rwkv_diffusion_rnn.common.errors import ConfigError
    with pytest.raises(ConfigError, match="checkpoint=<dir>"):
        RwkvDiffusionLM()
    with pytest.raises(ConfigError, match="stepz"):
        RwkvDiffusionLM(checkpoint=str(runs["bi"]), stepz=3)
    with pytest.raises(ConfigError, match="mc_samples"):
        RwkvDiffusionLM(checkpoint=str(runs["bi"]), mc_samples=0)
    with pytest.raises(ConfigError, match="data=sft"):
        RwkvDiffusionLM(checkpoint=str(runs["bi"])).apply_chat_template([{"role": "user", "content": "hi"}])


TASKS = {
    "tiny_mc": """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""",
    "tiny_gen": """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
""",
    "tiny_ppl": """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/ppl.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""",
}


def write_tasks(tmp_path) -> Path:
    data = tmp_path / "tasks"
    data.mkdir()
    mc = [{"question": "the cat sat on the", "choices": ["mat.", "park!", "cake.", "night?"], "answer": 0},
          {"question": "a dog ran in the", "choices": ["mat.", "park!", "cake.", "night?"], "answer": 1},
          {"question": "we like tea and", "choices": ["mat.", "park!", "cake.", "night?"], "answer": 2}]
    gen = [{"prompt": "the cat sat", "target": " on the mat"}, {"prompt": "is it cold", "target": " at night?"}]
    ppl = [{"text": "the cat sat on the mat. a dog ran in the park!"}, {"text": "we like tea and cake."}]
    for name, rows in (("mc", mc), ("gen", gen), ("ppl", ppl)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, body in TASKS.items():
        (data / f"{name}.yaml").write_text(body.format(data=data))
    return data


@pytest.mark.parametrize("name", ["ar", "bi"])
def test_lm_evals_command_runs_local_tasks_offline_and_prints_its_table(runs, tmp_path, name):
    tasks = write_tasks(tmp_path)
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "-m", "rwkv_diffusion_rnn.lm_eval_harness", "--model", "rwkv_diffusion",
                        "--model_args", f"checkpoint={runs[name]},mc_samples=4,steps=6", "--include_path", str(tasks),
                        "--tasks", "tiny_mc,tiny_gen,tiny_ppl", "--device", "cpu", "--batch_size", "4",
                        "--output_path", str(tmp_path / "out")],
                       cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for task in ("tiny_mc", "tiny_gen", "tiny_ppl"):
        assert task in p.stdout
    assert "rwkv_diffusion" in p.stdout and "acc" in p.stdout and "exact_match" in p.stdout
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    assert 0.0 <= results["tiny_mc"]["acc,none"] <= 1.0
    assert math.isfinite(results["tiny_ppl"]["word_perplexity,none"])
