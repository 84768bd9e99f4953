"""Long windows in chunks with the state carried (model.chunk_size): the same forward as the
window read at once, the same gradient in full mode, the gradient of a model detached at the
chunk borders in truncated mode; refused by key where no state carries."""
from pathlib import Path

import pytest
import torch

from rwkv_diffusion_rnn.diffusion.chunks import Chunking, detach_state
from rwkv_diffusion_rnn.diffusion.continuous_diffusion import GaussianDiffusion
from rwkv_diffusion_rnn.diffusion.diffusion_process import MaskedDiffusion
from rwkv_diffusion_rnn.diffusion.objective import AutoregressiveObjective, DiffusionObjective
from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig, MultimodalRWKVDenoiser
from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7Config

V, T, D = 40, 24, 4


def model(mixer, prefix=0, context="noisy", shift=False, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    backbone = RWKV7(RWKV7Config(vocab_size=V, n_layer=2, n_embd=32, head_size=16))
    cfg = DenoiserConfig(vocab_size=V, mask_id=V - 1, latent_dim=D, latent_prefix_len=prefix, mixer=mixer,
                         block_size=4, block_context=context, bi_fusion="gated", shift_logits=shift, bos_id=0,
                         time_conditioning="film" if mixer == "block_causal" else "none")
    m = MultimodalRWKVDenoiser(backbone, cfg).to(dtype)
    with torch.no_grad():                  # every part matters, not their zero init
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def batch(seed=1, latent=False):
    g = torch.Generator().manual_seed(seed)
    b = {"input_ids": torch.randint(0, V - 1, (3, T), generator=g), "attention_mask": torch.ones(3, T, dtype=torch.long)}
    b["attention_mask"][2, T - 5:] = 0                     # a padded row
    if latent:
        b["latent"] = torch.randn(3, D, generator=g)
    return b


def objective(mixer, prefix, chunking=None):
    if mixer == "causal":
        return AutoregressiveObjective(chunking)
    return DiffusionObjective(MaskedDiffusion(mask_id=V - 1, vocab_size=V),
                              GaussianDiffusion() if prefix else None, chunking=chunking)


def loss_and_grads(m, obj, b):
    m.zero_grad()
    loss, stats = obj(m, b, torch.Generator().manual_seed(7))
    loss.backward()
    return loss.detach(), stats, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


CASES = [("causal", 0, "noisy", False), ("block_causal", 0, "noisy", False), ("block_causal", 1, "noisy", False),
         ("block_causal", 1, "clean", False), ("block_causal", 0, "clean", True), ("block_causal", 1, "noisy", True)]


@pytest.mark.parametrize("mixer, prefix, context, shift", CASES)
def test_a_window_read_in_chunks_gives_the_logits_of_the_window_read_at_once(mixer, prefix, context, shift):
    m = model(mixer, prefix, context, shift)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, V - 1, (2, T), generator=g)
    xt = torch.where(torch.rand(2, T, generator=g) < 0.5, torch.full_like(x0, V - 1), x0)
    t, z = torch.rand(2, generator=g), torch.randn(2, D, generator=g) if prefix else None
    ctx = x0 if context == "clean" else None
    with torch.no_grad():
        whole = m(xt, t, z, context_ids=ctx)
        state, parts = None, []
        for a in range(0, T, 8):
            out = m(xt[:, a:a + 8], t, z, state=state, return_state=True, pos_offset=a,
                    prev_ids=(x0 if ctx is not None else xt)[:, a - 1] if shift and a else None,
                    context_ids=None if ctx is None else ctx[:, a:a + 8])
            parts.append(out.logits)
            state = out.state
            if a == 0 and prefix:
                assert torch.allclose(out.latent, whole.latent, atol=1e-6)
    assert torch.allclose(torch.cat(parts, 1), whole.logits, atol=1e-6), (torch.cat(parts, 1) - whole.logits).abs().max()


@pytest.mark.parametrize("mixer, prefix, context, shift", CASES)
def test_full_chunked_training_gives_the_loss_and_gradient_of_the_window_read_at_once(mixer, prefix, context, shift):
    m = model(mixer, prefix, context, shift)
    b = batch(latent=bool(prefix))
    want_loss, want_stats, want = loss_and_grads(m, objective(mixer, prefix), b)
    got_loss, got_stats, got = loss_and_grads(m, objective(mixer, prefix, Chunking(8, "full")), b)
    assert torch.allclose(got_loss, want_loss, atol=1e-6), (got_loss, want_loss)
    for key in ("text_loss", "latent_loss"):
        assert got_stats[key] == pytest.approx(want_stats[key], abs=1e-6)
    assert got.keys() == want.keys() and len(got) > 20
    for n in got:
        assert torch.allclose(got[n], want[n], atol=1e-5, rtol=1e-4), (n, (got[n] - want[n]).abs().max())


@pytest.mark.parametrize("mixer, context", [("causal", "noisy"), ("block_causal", "noisy"), ("block_causal", "clean")])
def test_a_carried_state_holds_its_own_storage_not_the_chunk_it_came_from(mixer, context):
    # a chunked window keeps every chunk's state until the backward: a state that were a view of
    # the chunk's activations would keep them all, and memory would grow with the window
    m = model(mixer, context=context)
    ids = batch()["input_ids"]
    out = m(ids, torch.full((3,), 0.5), state=None, return_state=True, context_ids=ids)
    tensors = [f for s in out.state for f in s if f is not None]
    assert tensors
    for f in tensors:
        assert f.untyped_storage().nbytes() == f.numel() * f.element_size(), f.shape


def test_truncated_chunks_give_the_gradient_of_the_model_detached_at_chunk_borders():
    """The reference written out: the causal model run chunk by chunk with its state detached
    between chunks and no recomputation, the summed next-token loss over the window's targets."""
    m = model("causal", dtype=torch.float64)
    b = batch()
    _, _, got = loss_and_grads(m, objective("causal", 0, Chunking(8, "truncated")), b)
    _, _, full = loss_and_grads(m, objective("causal", 0, Chunking(8, "full")), b)
    m.zero_grad()
    inputs, targets = b["input_ids"][:, :-1], b["input_ids"][:, 1:]
    valid = (b["attention_mask"][:, 1:] & b["attention_mask"][:, :-1]).bool()
    state, total = None, 0.0
    for a in range(0, T - 1, 8):
        out = m(inputs[:, a:a + 8], torch.zeros(3, dtype=torch.float64), state=detach_state(state),
                return_state=True, pos_offset=a)
        v = valid[:, a:a + 8]
        total = total + torch.nn.functional.cross_entropy(out.logits[v].float(), targets[:, a:a + 8][v], reduction="sum")
        state = out.state
    (total / valid.sum()).backward()
    want = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for n in got:
        assert torch.allclose(got[n], want[n], atol=1e-10), (n, float((got[n] - want[n]).abs().max()))
    assert any(not torch.allclose(got[n], full[n], atol=1e-6) for n in got)     # truncation changes it


@pytest.mark.parametrize("overrides, phrase", [
    (["model.mixer=bi", "model.chunk_size=16"], "model.mixer=bi with model.arch=rwkv7 reads the whole sequence"),
    (["model.mixer=dw_jrt", "model.chunk_size=16"], "model.mixer=dw_jrt"),
    (["model.arch=transformer", "model.mixer=causal", "training.objective=ar", "model.chunk_size=16"],
     "model.arch=transformer"),
    (["model.mixer=block_causal", "model.block_size=16", "model.chunk_size=24"], "not a multiple of model.block_size=16"),
    (["model.mixer=causal", "training.objective=ar", "model.chunk_grad=some"], "model.chunk_grad"),
    (["model.mixer=causal", "training.objective=ar", "model.chunk_size=0"], "model.chunk_size"),
    (["model.mixer=bi", "data.order=stream"], "data.order=stream carries the model's state"),
    (["model.mixer=causal", "training.objective=ar", "data.order=stream", "training.parallel=ddp"],
     "training.parallel=ddp is not supported"),
    (["model.mixer=causal", "training.objective=ar", "data.order=random"], "data.order='random'"),
])
def test_chunking_is_refused_by_key_where_it_cannot_work(overrides, phrase, tmp_path):
    from rwkv_diffusion_rnn.common.errors import ConfigError
    from rwkv_diffusion_rnn.train_rwkv import compose_config
    from rwkv_diffusion_rnn.training.config_validation import validate_config
    cfg = compose_config(["experiment=shakespeare_char", f"data.path={tmp_path}/corpus.txt",
                          f"logging.save_dir={tmp_path}", *overrides])
    with pytest.raises(ConfigError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        validate_config(cfg)


def test_a_chunked_training_run_logs_the_losses_of_the_unchunked_run_and_resumes_exactly(tmp_path):
    """Through the trainer (grad accumulation and grad checkpointing on): full-gradient chunks of 8
    train the same steps as windows of 32 read at once; a chunked run stopped and resumed logs the
    same losses as the uninterrupted one."""
    from tests.test_lm import corpus_file, overrides
    from rwkv_diffusion_rnn.train_rwkv import compose_config, run
    from rwkv_diffusion_rnn.training.improved_trainer import read_train_log
    corpus = corpus_file(tmp_path)
    args = ["model.mixer=block_causal", "model.block_size=4", "model.block_context=clean", "data.seq_len=32",
            "training.max_steps=4", "training.grad_accum_steps=2", "training.grad_checkpointing=true",
            "logging.log_freq=1", "logging.eval_freq=2"]
    run(compose_config(overrides(tmp_path / "plain", corpus, *args)))
    chunked = overrides(tmp_path / "chunked", corpus, *args, "model.chunk_size=8")
    run(compose_config(chunked))
    part = overrides(tmp_path / "part", corpus, *args, "model.chunk_size=8")
    run(compose_config([*part, "training.stop_at_step=2"]))
    run(compose_config([*part, "training.resume=latest"]))
    plain, got, resumed = (read_train_log(tmp_path / d / "run") for d in ("plain", "chunked", "part"))
    assert len(got) == 4
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in plain], abs=1e-5)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in got]


def test_a_streamed_ar_nll_is_the_token_by_token_recurrent_sum():
    from rwkv_diffusion_rnn.training.likelihood import score_stream
    m = model("causal", dtype=torch.float64).eval()
    tokens = torch.randint(0, V - 1, (50,), generator=torch.Generator().manual_seed(3))
    got = score_stream(m, tokens.numpy(), objective="ar", chunk=16)
    state, want = None, 0.0
    with torch.no_grad():
        for i in range(49):
            out = m(tokens[i:i + 1].view(1, 1), torch.zeros(1, dtype=torch.float64), state=state, return_state=True,
                    pos_offset=i)
            want -= float(torch.log_softmax(out.logits[0, 0], -1)[tokens[i + 1]])
            state = out.state
    assert got.tokens == 49
    assert got.nats_per_token * 49 == pytest.approx(want, abs=1e-6)


def test_a_streamed_bound_scores_each_chunk_after_the_clean_text_before_it():
    """block_causal without time conditioning: chunk 2's bound is the model's bound of the chunk
    written after the clean chunk 1 (the same draws), and chunk 1's that of a window alone."""
    from rwkv_diffusion_rnn.diffusion.elbo import masked_nelbo
    from rwkv_diffusion_rnn.training.likelihood import score_stream
    m = model("block_causal", dtype=torch.float64)
    m.config.time_conditioning = "none"
    m = MultimodalRWKVDenoiser(m.backbone, m.config).double().eval()
    tokens = torch.randint(0, V - 1, (17,), generator=torch.Generator().manual_seed(4))
    sched = MaskedDiffusion(mask_id=V - 1, vocab_size=V).schedule
    got = score_stream(m, tokens.numpy(), objective="diffusion", chunk=8, schedule=sched, mask_id=V - 1,
                       vocab_size=V, generator=torch.Generator().manual_seed(9), mc_samples=2)
    g = torch.Generator().manual_seed(9)
    first, second = tokens[1:9].view(1, -1), tokens[9:17].view(1, -1)
    with torch.no_grad():
        n1 = masked_nelbo(lambda xt, t: m(xt, t).logits, first, sched, V - 1, g, mc_samples=2)
        n2 = masked_nelbo(lambda xt, t: m(torch.cat([first, xt], 1), t).logits[:, 8:], second, sched, V - 1, g,
                          mc_samples=2)
    from rwkv_diffusion_rnn.diffusion.elbo import prior_nats
    want = float((n1.mean() + n2.mean())) + prior_nats(sched, V - 1) * 16
    assert got.tokens == 16
    assert got.nats_per_token * 16 == pytest.approx(want, abs=1e-8)


def test_streamed_batches_continue_each_row_and_a_streamed_run_resumes_exactly_after_a_kill(tmp_path):
    """data.order=stream: row b of batch i + 1 starts where row b of batch i ended; the state
    carried between steps goes into the checkpoint, so a run killed (SIGKILL) after a save and
    resumed logs the losses of the uninterrupted run."""
    import signal
    import subprocess
    import sys
    import numpy as np
    from rwkv_diffusion_rnn.data.corpus import StreamWindows
    from tests.test_lm import corpus_file, overrides
    from rwkv_diffusion_rnn.train_rwkv import compose_config, run
    from rwkv_diffusion_rnn.training.improved_trainer import read_train_log
    tokens = np.arange(1000) % 97
    w = StreamWindows(tokens, 16, 4, seed=0)
    b0, b1 = w.batch(0, 0), w.batch(0, 1)
    assert not bool(b0["continues"]) and bool(b1["continues"])
    assert torch.equal(b1["prev_ids"], b0["input_ids"][:, -1])
    corpus = corpus_file(tmp_path)
    args = ["training.objective=ar", "model.mixer=causal", "data.order=stream", "data.seq_len=16",
            "model.chunk_size=8", "training.max_steps=6", "logging.log_freq=1", "logging.eval_freq=3"]
    run(compose_config(overrides(tmp_path / "full", corpus, *args)))
    part = overrides(tmp_path / "part", corpus, *args, "logging.save_every=3")
    root = Path(__file__).resolve().parents[1]
    run(compose_config([*part, "training.stop_at_step=3"]))
    proc = subprocess.Popen([sys.executable, "-m", "rwkv_diffusion_rnn.train_rwkv", *part, "training.resume=latest",
                             "training.stop_at_step=5", "logging.save_every=100"], cwd=root)
    # killed before it saves again: the run restarts from step 3's checkpoint and its carried state
    import time
    while proc.poll() is None and len(read_train_log(tmp_path / "part" / "run")) < 4:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run(compose_config([*part, "training.resume=latest"]))
    full, resumed = read_train_log(tmp_path / "full" / "run"), read_train_log(tmp_path / "part" / "run")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
