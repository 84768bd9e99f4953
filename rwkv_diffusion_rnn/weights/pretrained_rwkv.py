"""Loading pretrained RWKV-7 weights into :class:`~rwkv_diffusion_rnn.models.rwkv7.RWKV7`.

Accepted sources (``load_rwkv7(name_or_path, ...)``):

* a BlinkDL ``.pth`` file, the format of the BlinkDL/rwkv7-g1 repository (keys ``emb.weight``,
  ``blocks.N.att.*``, ``head.weight``). Sizes (n_layer, n_embd, head size, LoRA ranks, FFN
  width, vocabulary) are read from the tensor shapes.
* a Hugging Face Hub repo id (e.g. ``BlinkDL/rwkv7-g1``) plus ``filename``, downloaded with
  ``huggingface_hub`` (``revision``, ``cache_dir``, ``local_files_only`` honoured).
* the fla / HF safetensors layout (fla-hub/rwkv7-*: ``model.embeddings.weight``,
  ``model.layers.N.attn.w_lora.lora.0.weight``, ...): a ``.safetensors`` file or a directory
  of them, local or on the Hub.

Files are untrusted: ``.pth`` files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from ..common.errors import CheckpointError, first_line
from ..common.pickles import unsafe_pickle_reason
from ..models.rwkv7 import RWKV7, RWKV7Config
from ..models.archs import Arch, arch_of
from ..models.rwkv_denoiser import DenoiserConfig, MultimodalRWKVDenoiser

StateDict = Dict[str, torch.Tensor]

DEFAULT_REPO = "BlinkDL/rwkv7-g1"


# --------------------------------------------------------------------------------------------
# reading files


def _read_pth(path: Path) -> StateDict:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:  # a legacy-format (non-zip) file cannot be memory-mapped but may still load
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad file
            refused = unsafe_pickle_reason(path, e)
            if refused:
                raise CheckpointError(f"{path}: {refused}. Expected a BlinkDL RWKV-7 .pth state dict.") from None
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint ({first_line(e)}). Expected a BlinkDL RWKV-7 .pth "
                "state dict; it looks truncated or corrupted: re-download the file.") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict of tensors; "
                              "expected a BlinkDL RWKV-7 .pth file")
    return dict(sd)


def _read_safetensors(paths) -> StateDict:
    from safetensors.torch import load_file
    sd: StateDict = {}
    for p in paths:
        try:
            sd.update(load_file(str(p), device="cpu"))
        except Exception as e:
            raise CheckpointError(f"{p}: not a readable safetensors file ({e}); "
                                  "re-download it if it is truncated") from None
    return sd


def read_state_dict(path: Union[str, os.PathLike]) -> StateDict:
    """Reads a .pth / .safetensors file, or every .safetensors file of a directory."""
    path = Path(path)
    if path.is_dir():
        shards = sorted(path.glob("*.safetensors"))
        if shards:
            return _read_safetensors(shards)
        pths = sorted(path.glob("*.pth"))
        if len(pths) == 1:
            return _read_pth(pths[0])
        raise CheckpointError(f"{path}: directory holds no .safetensors file and "
                              f"{len(pths)} .pth files; pass the file itself")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return _read_safetensors([path])
    return _read_pth(path)


# --------------------------------------------------------------------------------------------
# fla / HF layout -> BlinkDL layout


def fla_to_blinkdl(sd: StateDict) -> StateDict:
    """Renames an fla-format RWKV-7 state dict to BlinkDL names and shapes."""
    out: StateDict = {}
    for key, t in sd.items():
        if key == "model.embeddings.weight":
            out["emb.weight"] = t
        elif key.startswith("model.norm."):
            out["ln_out." + key.split(".")[-1]] = t
        elif key == "lm_head.weight":
            out["head.weight"] = t
        else:
            m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
            if not m:
                out[key] = t  # left for the key check to report
                continue
            i, rest = m.group(1), m.group(2)
            pre = f"blocks.{i}."
            simple = {"pre_norm": "ln0", "attn_norm": "ln1", "ffn_norm": "ln2"}
            head, _, tail = rest.partition(".")
            if head in simple:
                out[pre + simple[head] + "." + tail] = t
                continue
            m2 = re.fullmatch(r"attn\.(\w)_lora\.lora\.([02])\.(weight|bias)", rest)
            if m2:
                name, idx, kind = m2.groups()
                if kind == "bias":
                    out[pre + f"att.{name}0"] = t.view(1, 1, -1)
                else:
                    out[pre + f"att.{name}{1 if idx == '0' else 2}"] = t.t().contiguous()
                continue
            proj = {"r_proj": "receptance", "k_proj": "key", "v_proj": "value", "o_proj": "output",
                    "g_norm": "ln_x"}
            if rest.startswith("attn."):
                sub = rest[len("attn."):]
                name, _, tail = sub.partition(".")
                if name in proj:
                    out[pre + "att." + proj[name] + "." + tail] = t
                elif name in ("k_k", "k_a"):
                    out[pre + "att." + name] = t.view(1, 1, -1)
                else:
                    out[pre + "att." + sub] = t
            elif rest == "ffn.x_k":
                out[pre + "ffn.x_k"] = t.view(1, 1, -1)
            else:
                out[pre + rest] = t
    return out


# --------------------------------------------------------------------------------------------
# shapes -> config


def config_from_state_dict(sd: StateDict, source: str = "checkpoint") -> RWKV7Config:
    """Infers an :class:`RWKV7Config` from BlinkDL-layout tensor shapes."""
    def need(key):
        if key not in sd:
            raise CheckpointError(f"{source}: missing key '{key}'; this does not look like an "
                                  "RWKV-7 checkpoint (expected BlinkDL .pth or fla safetensors layout)")
        return sd[key]

    vocab, C = need("emb.weight").shape
    layer_ids = {int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
    if not layer_ids:
        raise CheckpointError(f"{source}: no 'blocks.N.*' keys; not an RWKV-7 checkpoint")
    n_layer = max(layer_ids) + 1
    H, N = need("blocks.0.att.r_k").shape
    mv = sd["blocks.1.att.v1"].shape[1] if "blocks.1.att.v1" in sd else (
        sd["blocks.0.att.v1"].shape[1] if "blocks.0.att.v1" in sd else None)
    return RWKV7Config(
        vocab_size=vocab, n_layer=n_layer, n_embd=C, head_size=N,
        dim_ffn=need("blocks.0.ffn.key.weight").shape[0],
        decay_lora=need("blocks.0.att.w1").shape[1],
        aaa_lora=need("blocks.0.att.a1").shape[1],
        mv_lora=mv,
        gate_lora=need("blocks.0.att.g1").shape[1],
    )


def load_blinkdl_state_dict(model: RWKV7, sd: StateDict, source: str = "checkpoint") -> None:
    """Copies a BlinkDL-layout state dict into ``model``, naming any missing, unexpected or
    mis-shaped tensors."""
    sd = dict(sd)
    for key in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"):
        sd.pop(key, None)  # present in some files, unused by layer 0
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad_shape = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:12])}"
                        + (" ..." if len(missing) > 12 else ""))
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:12])}"
                        + (" ..." if len(unexpected) > 12 else ""))
    if bad_shape:
        problems.append("tensors whose shapes disagree: " + "; ".join(bad_shape[:12]))
    if problems:
        raise CheckpointError(f"{source}: does not fit an RWKV-7 model "
                              f"(n_layer={model.config.n_layer}, n_embd={model.config.n_embd}, "
                              f"head_size={model.config.head_size}): " + " | ".join(problems))
    model.load_state_dict({k: sd[k] for k in own}, strict=True)


# --------------------------------------------------------------------------------------------
# the Hub


def pick_default_file(files) -> Optional[str]:
    """The default weight file of a repo: the only one, or else the smallest model (``0.1b`` <
    ``0.4b`` < ``1.5b`` ...) with the newest date (``20250728``) in its name; None if the names
    carry no size."""
    if len(files) == 1:
        return files[0]
    scored = []
    for f in files:
        size = re.search(r"(\d+(?:\.\d+)?)[bB](?![a-zA-Z])", f)
        date = re.findall(r"(20\d{6})", f)
        if size:
            scored.append((float(size.group(1)), -int(date[-1]) if date else 0, f))
    return min(scored)[2] if scored else None


def _cached_files(repo_id: str, revision: Optional[str], cache_dir: Optional[str]) -> list:
    """The file names of ``repo_id`` (at ``revision``, default ``main``) already in the Hugging Face
    cache: what an offline load can choose from without listing the Hub."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound
    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return []
    want = revision or "main"
    names = set()
    for repo in info.repos:
        if repo.repo_id != repo_id or repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            if want in rev.refs or rev.commit_hash.startswith(want):
                names |= {str(f.file_path.relative_to(rev.snapshot_path)) for f in rev.files}
    return sorted(names)


def _hub_file(repo_id: str, filename: Optional[str], revision, cache_dir, local_files_only) -> Path:
    from huggingface_hub import hf_hub_download, list_repo_files
    from huggingface_hub.errors import LocalEntryNotFoundError

    how = (f"Download it once with network access (huggingface-cli download {repo_id}"
           f"{' ' + filename if filename else ''}), pass a local path, or point cache_dir / HF_HOME "
           "at a cache that holds it.")
    if filename is None:
        try:
            files = (list_repo_files(repo_id, revision=revision) if not local_files_only
                     else _cached_files(repo_id, revision, cache_dir))
        except Exception as e:
            raise OSError(f"Cannot list the files of Hub repo '{repo_id}' ({type(e).__name__}). "
                          "Pass filename=... (e.g. the .pth to use). " + how) from None
        candidates = sorted(f for f in files if f.endswith((".pth", ".safetensors")))
        filename = pick_default_file(candidates)
        if filename is None:
            raise ValueError(f"Hub repo '{repo_id}' holds {len(candidates)} weight files and none "
                             f"is the obvious default; choose one with filename=... "
                             f"(model.rwkv_filename): {', '.join(candidates[:20]) or '(none)'}")
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                    local_files_only=local_files_only))
    except LocalEntryNotFoundError:
        raise OSError(f"'{filename}' of Hub repo '{repo_id}' is not in the local cache and "
                      f"{'local_files_only is set' if local_files_only else 'the Hub cannot be reached'}. "
                      + how) from None
    except Exception as e:
        raise OSError(f"Could not download '{filename}' from Hub repo '{repo_id}' "
                      f"({type(e).__name__}: {e}). " + how) from None


# --------------------------------------------------------------------------------------------
# public entry point


def load_rwkv7(name_or_path: Union[str, os.PathLike], *, filename: Optional[str] = None,
               revision: Optional[str] = None, cache_dir: Optional[str] = None,
               local_files_only: bool = False, dtype: Optional[torch.dtype] = None,
               device: Optional[Union[str, torch.device]] = None,
               wkv_backend: str = "auto") -> RWKV7:
    """Loads an RWKV-7 causal LM from a local file/directory or a Hub repo (see module doc)."""
    path = Path(name_or_path)
    if filename is not None and path.is_dir():
        path = path / filename
    if not path.exists():
        if os.path.isabs(str(name_or_path)) or str(name_or_path).endswith((".pth", ".safetensors")):
            raise FileNotFoundError(f"{name_or_path}: no such checkpoint file")
        if str(name_or_path).count("/") != 1:
            raise FileNotFoundError(f"{name_or_path}: neither a local file nor a Hub repo id "
                                    "(owner/name)")
        path = _hub_file(str(name_or_path), filename, revision, cache_dir, local_files_only)
    sd = read_state_dict(path)
    if "model.embeddings.weight" in sd:
        sd = fla_to_blinkdl(sd)
    cfg = config_from_state_dict(sd, str(path))
    cfg.wkv_backend = wkv_backend
    model = RWKV7(cfg, init_weights=False)
    load_blinkdl_state_dict(model, sd, str(path))
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()


# --------------------------------------------------------------------------------------------
# random checkpoints in the real layout (tests, smoke runs)


def random_blinkdl_state_dict(n_layer: int = 2, n_embd: int = 64, head_size: int = 32,
                              vocab_size: int = 256, *, decay_lora: int = 32, aaa_lora: int = 32,
                              mv_lora: int = 32, gate_lora: int = 32, dim_ffn: Optional[int] = None,
                              seed: int = 0, include_layer0_v: bool = True) -> StateDict:
    """A random, numerically healthy RWKV-7 state dict with BlinkDL names and shapes.

    Values are drawn so that every path of the network matters (non-zero LoRAs, gates, bonus),
    which makes it a sharp test of a reimplementation.
    """
    g = torch.Generator().manual_seed(seed)
    C, H, N = n_embd, n_embd // head_size, head_size
    F = dim_ffn or 4 * C

    def rnd(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    def uni(*shape, lo=0.0, hi=1.0):
        return torch.rand(*shape, generator=g) * (hi - lo) + lo

    sd: StateDict = {"emb.weight": rnd(vocab_size, C)}
    for i in range(n_layer):
        p = f"blocks.{i}."
        if i == 0:
            sd[p + "ln0.weight"], sd[p + "ln0.bias"] = uni(C, lo=0.5, hi=1.5), rnd(C, std=0.1)
        for ln in ("ln1", "ln2"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = uni(C, lo=0.5, hi=1.5), rnd(C, std=0.1)
        a = p + "att."
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            sd[a + name] = uni(1, 1, C)
        sd[a + "w0"] = rnd(1, 1, C, std=1.0, mean=-1.0)
        sd[a + "w1"], sd[a + "w2"] = rnd(C, decay_lora, std=0.1), rnd(decay_lora, C, std=0.1)
        sd[a + "a0"] = rnd(1, 1, C, std=0.5)
        sd[a + "a1"], sd[a + "a2"] = rnd(C, aaa_lora, std=0.1), rnd(aaa_lora, C, std=0.1)
        if i > 0 or include_layer0_v:
            sd[a + "v0"] = rnd(1, 1, C, std=0.5, mean=0.5)
            sd[a + "v1"], sd[a + "v2"] = rnd(C, mv_lora, std=0.1), rnd(mv_lora, C, std=0.1)
        sd[a + "g1"], sd[a + "g2"] = rnd(C, gate_lora, std=0.1), rnd(gate_lora, C, std=0.1)
        sd[a + "k_k"] = uni(1, 1, C, lo=0.5, hi=1.0)
        sd[a + "k_a"] = uni(1, 1, C, lo=0.5, hi=1.5)
        sd[a + "r_k"] = rnd(H, N, std=0.3)
        for lin in ("receptance", "key", "value", "output"):
            sd[a + lin + ".weight"] = rnd(C, C, std=C ** -0.5)
        sd[a + "ln_x.weight"], sd[a + "ln_x.bias"] = uni(C, lo=0.5, hi=1.5), rnd(C, std=0.1)
        f = p + "ffn."
        sd[f + "x_k"] = uni(1, 1, C)
        sd[f + "key.weight"] = rnd(F, C, std=C ** -0.5)
        sd[f + "value.weight"] = rnd(C, F, std=F ** -0.5)
    sd["ln_out.weight"], sd["ln_out.bias"] = uni(C, lo=0.5, hi=1.5), rnd(C, std=0.1)
    sd["head.weight"] = rnd(vocab_size, C, std=C ** -0.5)
    return sd


def save_random_blinkdl_checkpoint(path: Union[str, os.PathLike], **kwargs) -> Path:
    """Writes :func:`random_blinkdl_state_dict` to ``path`` (a BlinkDL-layout ``.pth``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_blinkdl_state_dict(**kwargs), path)
    return path


def build_denoiser(cfg: DenoiserConfig, *, rwkv_name: Optional[str] = None,
                   rwkv_filename: Optional[str] = None, rwkv_revision: Optional[str] = None,
                   cache_dir: Optional[str] = None, local_files_only: bool = False,
                   n_layer: int = 2, n_embd: int = 128, head_size: int = 32,
                   wkv_backend: str = "auto", **keys) -> MultimodalRWKVDenoiser:
    """A denoiser of ``cfg.arch`` over pretrained weights (``rwkv_name`` for rwkv7: a path or Hub
    repo; ``qwen3_name=`` for qwen3) or over a backbone built from scratch with the given sizes.
    ``keys``: other ``model.*`` keys the arch reads (e.g. ``attn_layers`` for hybrid)."""
    arch = arch_of(cfg.arch)
    m = dict(vocab_size=cfg.vocab_size, rwkv_name=rwkv_name, rwkv_filename=rwkv_filename,
             rwkv_revision=rwkv_revision, cache_dir=cache_dir, local_files_only=local_files_only,
             n_layer=n_layer, n_embd=n_embd, head_size=head_size, wkv_backend=wkv_backend, **keys)
    return MultimodalRWKVDenoiser(arch.build(m, pretrained_loader(arch)), cfg)


def pretrained_loader(arch: Arch):
    """The function loading ``arch``'s pretrained weights (None when it has none)."""
    return named_function(arch.loader)


def named_function(spec: Optional[str]):
    """The function a ``"module:function"`` string of an arch entry names (None for None)."""
    if spec is None:
        return None
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def backbone_from_shapes(shapes, keys, source: str = "checkpoint") -> RWKV7:
    """An RWKV-7 of the sizes that BlinkDL-named tensor ``shapes`` (anything with ``.shape``) say,
    its WKV backend from the ``model.*`` ``keys``: a checkpoint that holds every weight rebuilds
    without reading the pretrained file it started from."""
    cfg = config_from_state_dict(shapes, source)
    cfg.wkv_backend = keys.get("wkv_backend") or "auto"
    return RWKV7(cfg)
