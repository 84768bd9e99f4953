"""load_rwkv7: file formats, shape inference and the errors users meet."""
import pytest
import torch
from safetensors.torch import save_file

from rwkv_diffusion_rnn.weights.pretrained_rwkv import load_rwkv7, random_blinkdl_state_dict, save_random_blinkdl_checkpoint
from rwkv_diffusion_rnn.common.errors import CheckpointError

SHAPE = dict(n_layer=2, n_embd=64, head_size=32, vocab_size=97, decay_lora=16, aaa_lora=32,
             mv_lora=8, gate_lora=24, dim_ffn=160)


def test_sizes_are_read_from_tensor_shapes(tmp_path):
    m = load_rwkv7(save_random_blinkdl_checkpoint(tmp_path / "m.pth", **SHAPE))
    c = m.config
    assert (c.n_layer, c.n_embd, c.head_size, c.vocab_size, c.dim_ffn) == (2, 64, 32, 97, 160)
    assert (c.decay_lora, c.aaa_lora, c.mv_lora, c.gate_lora) == (16, 32, 8, 24)
    assert not m.training


def test_dtype_and_device_arguments(tmp_path):
    m = load_rwkv7(save_random_blinkdl_checkpoint(tmp_path / "m.pth", **SHAPE),
                   dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 for p in m.parameters())
    assert m(torch.tensor([[1, 2, 3]])).dtype == torch.float64


def test_fla_safetensors_layout_gives_the_same_logits(tmp_path):
    sd = random_blinkdl_state_dict(seed=3, **SHAPE)
    blink = load_rwkv7(save_random_blinkdl_checkpoint(tmp_path / "m.pth", seed=3, **SHAPE))
    fla = {"model.embeddings.weight": sd["emb.weight"], "model.norm.weight": sd["ln_out.weight"],
           "model.norm.bias": sd["ln_out.bias"], "lm_head.weight": sd["head.weight"]}
    for i in range(SHAPE["n_layer"]):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        if i == 0:
            fla[q + "pre_norm.weight"], fla[q + "pre_norm.bias"] = sd[p + "ln0.weight"], sd[p + "ln0.bias"]
        for a, b in (("ln1", "attn_norm"), ("ln2", "ffn_norm")):
            fla[q + b + ".weight"], fla[q + b + ".bias"] = sd[p + a + ".weight"], sd[p + a + ".bias"]
        for x in "rwkvag":
            fla[q + f"attn.x_{x}"] = sd[p + f"att.x_{x}"]
        for x in "wav" if i > 0 else "wa":
            fla[q + f"attn.{x}_lora.lora.0.weight"] = sd[p + f"att.{x}1"].t().contiguous()
            fla[q + f"attn.{x}_lora.lora.2.weight"] = sd[p + f"att.{x}2"].t().contiguous()
            fla[q + f"attn.{x}_lora.lora.2.bias"] = sd[p + f"att.{x}0"].flatten()
        fla[q + "attn.g_lora.lora.0.weight"] = sd[p + "att.g1"].t().contiguous()
        fla[q + "attn.g_lora.lora.2.weight"] = sd[p + "att.g2"].t().contiguous()
        fla[q + "attn.k_k"], fla[q + "attn.k_a"] = sd[p + "att.k_k"].flatten(), sd[p + "att.k_a"].flatten()
        fla[q + "attn.r_k"] = sd[p + "att.r_k"]
        for a, b in (("receptance", "r_proj"), ("key", "k_proj"), ("value", "v_proj"),
                     ("output", "o_proj"), ("ln_x", "g_norm")):
            for kind in ("weight", "bias") if a == "ln_x" else ("weight",):
                fla[q + f"attn.{b}.{kind}"] = sd[p + f"att.{a}.{kind}"]
        fla[q + "ffn.x_k"] = sd[p + "ffn.x_k"].flatten()
        fla[q + "ffn.key.weight"], fla[q + "ffn.value.weight"] = sd[p + "ffn.key.weight"], sd[p + "ffn.value.weight"]
    d = tmp_path / "fla"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in fla.items()}, str(d / "model.safetensors"))
    ids = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        assert torch.allclose(load_rwkv7(d)(ids), blink(ids), atol=1e-6)


def test_missing_keys_are_named(tmp_path):
    sd = random_blinkdl_state_dict(**SHAPE)
    del sd["blocks.1.att.k_a"], sd["blocks.0.ffn.x_k"]
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \(2\): blocks.0.ffn.x_k, blocks.1.att.k_a"):
        load_rwkv7(tmp_path / "m.pth")


def test_disagreeing_shapes_are_named(tmp_path):
    sd = random_blinkdl_state_dict(**SHAPE)
    sd["blocks.1.att.key.weight"] = torch.zeros(64, 32)
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=r"blocks.1.att.key.weight: file \(64, 32\) vs model \(64, 64\)"):
        load_rwkv7(tmp_path / "m.pth")


def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="junk.pth: not a readable PyTorch checkpoint"):
        load_rwkv7(tmp_path / "junk.pth")
    torch.save({"step": 3}, tmp_path / "dict.pth")
    with pytest.raises(CheckpointError, match="not a state dict of tensors"):
        load_rwkv7(tmp_path / "dict.pth")
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="missing key 'emb.weight'"):
        load_rwkv7(tmp_path / "other.pth")


def test_truncated_checkpoint_is_reported(tmp_path):
    p = save_random_blinkdl_checkpoint(tmp_path / "m.pth", **SHAPE)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="m.pth: not a readable PyTorch checkpoint"):
        load_rwkv7(p)


def test_missing_local_file_and_uncached_hub_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        load_rwkv7(tmp_path / "nope.pth")
    with pytest.raises(OSError, match="not in the local cache.*huggingface-cli download BlinkDL/rwkv7-g1"):
        load_rwkv7("BlinkDL/rwkv7-g1", filename="rwkv7-g1a-0.1b-20250728-ctx4096.pth",
                   cache_dir=str(tmp_path / "hf"), local_files_only=True)


def test_default_hub_file_is_the_smallest_newest_model():
    from rwkv_diffusion_rnn.weights.pretrained_rwkv import pick_default_file
    files = ["rwkv7-g1-1.5b-20250429-ctx4096.pth", "rwkv7-g1-0.1b-20250307-ctx4096.pth",
             "rwkv7-g1a-0.1b-20250728-ctx4096.pth", "rwkv7-g1-0.4b-20250324-ctx4096.pth"]
    assert pick_default_file(files) == "rwkv7-g1a-0.1b-20250728-ctx4096.pth"
    assert pick_default_file(["only.pth"]) == "only.pth"
    assert pick_default_file(["a.pth", "b.pth"]) is None


def test_an_offline_hub_load_without_a_filename_finds_the_file_in_the_cache(tmp_path):
    """load_rwkv7("BlinkDL/rwkv7-g1", local_files_only=True) chooses among the repo's files already
    in a Hugging Face cache (here one laid out by hand in the Hub's layout), instead of listing the
    Hub; it picks the smallest, newest model as with network access."""
    cache = tmp_path / "hf"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--BlinkDL--rwkv7-g1"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    for name, seed in (("rwkv7-g1a-0.1b-20250728-ctx4096.pth", 1), ("rwkv7-g1-0.4b-20250324-ctx4096.pth", 2)):
        blob = repo / "blobs" / f"blob{seed}"
        save_random_blinkdl_checkpoint(blob, seed=seed, **SHAPE)
        (snap / name).symlink_to(blob)
    m = load_rwkv7("BlinkDL/rwkv7-g1", cache_dir=str(cache), local_files_only=True)
    ref = load_rwkv7(repo / "blobs" / "blob1")          # the 0.1b file
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 12))
    with torch.no_grad():
        assert torch.equal(m(ids), ref(ids))
    with pytest.raises(ValueError, match="holds 0 weight files"):
        load_rwkv7("BlinkDL/other-repo", cache_dir=str(cache), local_files_only=True)
