"""Optimizer groups and MuonAdamW, checked against torch's own Muon and AdamW."""
import io

import pytest
import torch
import torch.nn as nn

from rwkv_diffusion_rnn.training.optimizer import MuonAdamW, build_optimizer, newton_schulz, param_groups


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.proj = nn.Linear(8, 12)
        self.tall = nn.Linear(12, 24, bias=False)       # weight (24, 12): taller than wide
        self.ln = nn.LayerNorm(24)
        self.head = nn.Linear(24, 11, bias=False)

    def forward(self, ids):
        return self.head(self.ln(self.tall(torch.relu(self.proj(self.emb(ids))))))


def _train(opt, model, steps=3):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 11, (4, 5), generator=g)
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def test_muon_groups_hold_only_hidden_matrices():
    groups = param_groups(Tiny(), 1e-3, 0.1, muon_lr=0.05)
    muon = {n for g in groups if g["use_muon"] for n in g["names"]}
    assert muon == {"proj.weight", "tall.weight"}
    for g in groups:
        assert g["lr"] == (0.05 if g["use_muon"] else 1e-3)
    assert not any(g["use_muon"] for g in param_groups(Tiny(), 1e-3, 0.1))


def test_newton_schulz_makes_singular_values_near_one():
    g = torch.randn(24, 12, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 5, 12)
    s = torch.linalg.svdvals(newton_schulz(g))
    assert s.min() > 0.6 and s.max() < 1.25          # the quintic's band, whatever the input scale
    assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 20


def _deltas(model, init):
    return {n: p.detach() - init[n] for n, p in model.named_parameters()}


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_part_matches_torch_adamw(wd):
    """With the Muon LR at 0 the matrices stay put (wd only decays them), so the other
    parameters must follow torch's AdamW exactly."""
    torch.manual_seed(0)
    ours, ref = Tiny(), Tiny()
    ref.load_state_dict(ours.state_dict())
    opt = build_optimizer(ours, lr=3e-3, weight_decay=wd, betas=(0.9, 0.95), name="muon", muon_lr=0.0)
    assert isinstance(opt, MuonAdamW)
    ref.proj.weight.requires_grad_(False), ref.tall.weight.requires_grad_(False)
    adam = torch.optim.AdamW(
        [{"params": [ref.head.weight], "weight_decay": wd},          # 2-D, kept with AdamW
         {"params": [ref.emb.weight, ref.proj.bias, ref.ln.weight, ref.ln.bias], "weight_decay": 0.0}],
        lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    _train(opt, ours)
    _train(adam, ref)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_muon_part_matches_torch_muon(wd, monkeypatch):
    """Two steps on the matrices against torch.optim.Muon. torch orthogonalises in bfloat16,
    ours in the parameter's dtype; with torch's cast made a no-op the two must agree to fp32
    rounding."""
    torch.manual_seed(0)
    ours, ref = Tiny(), Tiny()
    ref.load_state_dict(ours.state_dict())
    init = {n: p.detach().clone() for n, p in ours.named_parameters()}
    opt = build_optimizer(ours, lr=0.0, weight_decay=wd, name="muon", muon_lr=0.02, muon_momentum=0.9)
    muon = torch.optim.Muon([ref.proj.weight, ref.tall.weight], lr=0.02, weight_decay=wd,
                            momentum=0.9, nesterov=True, adjust_lr_fn="original")
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda t: t.clone())
    _train(opt, ours, steps=2)
    _train(muon, ref, steps=2)
    d_ours, d_ref = _deltas(ours, init), _deltas(ref, init)
    for name in ("proj.weight", "tall.weight"):
        assert d_ref[name].norm() > 0.01
        torch.testing.assert_close(d_ours[name], d_ref[name], rtol=1e-4, atol=1e-6)


def test_muon_adamw_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    a, b = Tiny(), Tiny()
    opt_a = build_optimizer(a, lr=3e-3, name="muon")
    _train(opt_a, a, steps=2)
    b.load_state_dict(a.state_dict())
    opt_b = build_optimizer(b, lr=3e-3, name="muon")
    buf = io.BytesIO()                                  # as a checkpoint does
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    _train(opt_a, a, steps=2)
    _train(opt_b, b, steps=2)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_unknown_optimizer_name_is_refused():
    with pytest.raises(ValueError, match="optimizer.name='sgd'"):
        build_optimizer(Tiny(), name="sgd")


@pytest.mark.parametrize("schedule,expected", [
    # warmup 10 then: step -> multiplier (total 100 steps, min_lr_ratio 0.2)
    ("constant", {0: 0.1, 9: 1.0, 50: 1.0, 99: 1.0}),
    ("linear", {0: 0.1, 10: 1.0, 55: 0.6, 100: 0.2}),
    ("cosine", {0: 0.1, 10: 1.0, 55: 0.6, 100: 0.2}),
    # wsd, decay_steps=20: flat until step 80, then linear down to 0.2 at step 100
    ("wsd", {0: 0.1, 10: 1.0, 80: 1.0, 90: 0.6, 100: 0.2}),
])
def test_lr_schedules_by_hand(schedule, expected):
    from rwkv_diffusion_rnn.training.optimizer import lr_lambda
    f = lr_lambda(schedule, warmup_steps=10, total_steps=100, min_lr_ratio=0.2, decay_steps=20)
    for step, want in expected.items():
        assert f(step) == pytest.approx(want), (schedule, step)


def test_wsd_needs_decay_steps():
    from rwkv_diffusion_rnn.training.optimizer import lr_lambda
    with pytest.raises(ValueError, match="decay_steps"):
        lr_lambda("wsd", warmup_steps=10, total_steps=100)


def test_decay_lr_mult_scales_only_the_decay_bases():
    from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7Config
    model = RWKV7(RWKV7Config(n_layer=2, n_embd=64, head_size=32, vocab_size=20))
    w0 = {n for n, _ in model.named_parameters() if n.endswith("att.w0")}
    assert len(w0) == 2
    for muon_lr in (None, 0.05):
        base = param_groups(model, 1e-3, 0.1, muon_lr=muon_lr)
        assert not any(g["group_name"].endswith("_w0") for g in base)
        groups = param_groups(model, 1e-3, 0.1, muon_lr=muon_lr, decay_lr_mult=3.0)
        lr_of = {n: g["lr"] for g in groups for n in g["names"]}
        lr_base = {n: g["lr"] for g in base for n in g["names"]}
        assert lr_of.keys() == lr_base.keys()
        for n, lr in lr_of.items():
            assert lr == pytest.approx(lr_base[n] * (3.0 if n in w0 else 1.0)), n
    opt = build_optimizer(model, lr=1e-3, name="muon", decay_lr_mult=2.0)
    (g,) = [g for g in opt.param_groups if g["group_name"].endswith("_w0")]
    assert g["lr"] == pytest.approx(2e-3) and g["weight_decay"] == 0.0 and not g["use_muon"]


def test_position_embedding_is_an_embedding_no_decay_no_muon():
    from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig
    from rwkv_diffusion_rnn.weights.pretrained_rwkv import build_denoiser
    model = build_denoiser(DenoiserConfig(vocab_size=20, mask_id=19, latent_prefix_len=0, pos_emb_len=8),
                           n_layer=1, n_embd=64, head_size=32)
    for muon_lr in (None, 0.05):
        (g,) = [g for g in param_groups(model, 1e-3, 0.1, muon_lr=muon_lr) if "pos_emb" in g["names"]]
        assert g["weight_decay"] == 0.0 and not g["use_muon"]


@pytest.mark.parametrize("name", ["adamw8bit", "lion8bit"])
def test_8bit_optimizers_on_cpu_warn_and_train_with_adamw(name):
    torch.manual_seed(0)
    model = Tiny()
    with pytest.warns(UserWarning, match=f"optimizer.name={name}: .*CUDA.*training with AdamW"):
        opt = build_optimizer(model, lr=1e-2, name=name)
    assert type(opt) is torch.optim.AdamW
    torch.manual_seed(0)
    ref = Tiny()
    want = build_optimizer(ref, lr=1e-2, name="adamw")
    assert [g["names"] for g in opt.param_groups] == [g["names"] for g in want.param_groups]
    _train(opt, model)
    _train(want, ref)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_a_run_with_an_8bit_optimizer_on_cpu_warns_and_trains(tmp_path):
    from rwkv_diffusion_rnn.train_rwkv import compose_config, run
    from rwkv_diffusion_rnn.training.improved_trainer import read_train_log
    with pytest.warns(UserWarning, match="optimizer.name=adamw8bit"):
        run(compose_config(["experiment=struct", "model.n_layer=1", "model.n_embd=32", "model.head_size=16",
                            "optimizer=adamw", "optimizer.name=adamw8bit", "training.max_steps=3",
                            "data.eval_size=8", "eval.sample_steps=2", "logging.log_freq=1",
                            "logging.eval_freq=0", "logging.progress_bar=false", f"logging.save_dir={tmp_path}"]))
    assert [r["step"] for r in read_train_log(tmp_path)] == [1, 2, 3]
