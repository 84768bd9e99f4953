"""fla's Triton WKV-7 kernel on CPU, under Triton's interpreter, against the torch backend.

``TRITON_INTERPRET=1`` runs every Triton kernel as numpy code on the CPU, so fla's
``chunk_rwkv7`` (the ``"fla"`` backend of ``wkv7``) can be checked without a GPU: output, final
state and the gradients of r, w, k, v, a, b and the initial state, with the final state in the
loss. Only float32 is checked: bf16 runs under the interpreter but gives wrong numbers (the
interpreter holds bf16 as raw uint16 bits), so no conclusion about bf16 can be drawn here.

The interpreter has to be on before triton is first imported, and other test files may import
triton earlier in the same pytest process, so the comparison runs in a child process (this
file run as a script). The child also works around three gaps of the interpreter, here and not
in library code:

* the autotuner needs a benchmarker, which the interpreter lacks: every autotuned fla kernel
  keeps only its first config;
* fla binds ``gather = tl.gather`` to a module-level name, which the interpreter does not
  patch: it is re-bound to a function that looks ``tl.gather`` up when called;
* loop variables of ``range`` loops are Python ints there, so fla's ``i_t.to(tl.int64)``
  fails: fla's modules get a ``range`` whose items are ints with a ``.to``.

The interpreter takes seconds per kernel call, so the shapes are small.
"""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

NAMES = ("o", "final_state", "grad_r", "grad_w", "grad_k", "grad_v", "grad_a", "grad_b",
         "grad_initial_state")
# (name, B, T, H, scale): T = 1; T = 45, not a multiple of any chunk length (16 by default,
# 64 fast); T = 128, two chunks of 64 (eight of 16).
SHAPES = [("T1", 2, 1, 2, 1.0), ("T45", 2, 45, 2, 0.7), ("T128", 2, 128, 1, 1.0)]
K = 16
# The default path agrees with the torch backend to about 1e-6 of the largest value; the fast
# path (safe_gate: float16 inversion of the intra-chunk matrix) to about 1e-4.
TOL = {"default": 1e-5, "fast": 1e-3}


# ---------------------------------------------------------------- child process (the interpreter)

def _patch_fla_for_interpreter():
    """Make fla 0.6.0's kernels runnable under Triton 3.9's interpreter (see module docstring)."""
    import builtins

    import triton.language as tl
    from triton.runtime.autotuner import Autotuner

    import fla.ops.rwkv7  # noqa: F401  (imports the kernels chunk_rwkv7 dispatches to)

    def gather(src, index, axis, _builder=None):
        return tl.gather(src, index, axis)

    class LoopInt(int):
        def to(self, dtype, *args, **kwargs):
            return tl.cast(int(self), dtype)

    def loop_range(*args):
        return [LoopInt(i) for i in builtins.range(*args)]

    n_tuned = 0
    for name, mod in list(sys.modules.items()):
        if mod is None or not name.startswith("fla."):
            continue
        if getattr(mod, "gather", None) is tl.gather:
            mod.gather = gather
        if name.startswith("fla.ops."):
            mod.range = loop_range     # shadows the builtin for fla's kernels (and host code)
        for obj in list(vars(mod).values()):
            for _ in range(4):         # Heuristics -> Autotuner -> JITFunction chains
                if isinstance(obj, Autotuner):
                    obj.configs = obj.configs[:1]
                    n_tuned += 1
                    break
                obj = getattr(obj, "fn", None)
                if obj is None:
                    break
    assert n_tuned > 0, "found no autotuned fla kernel to patch"


def _run(fn, xs, s0):
    """Output, final state and gradients of loss = sum(o * go) + sum(S * gS)."""
    import torch

    inp = [x.clone().requires_grad_(True) for x in xs]
    st = s0.clone().requires_grad_(True)
    o, S = fn(inp, st)
    gen = torch.Generator().manual_seed(11)
    go = torch.randn(o.shape, generator=gen)
    gS = torch.randn(S.shape, generator=gen)
    ((o * go).sum() + (S * gS).sum()).backward()
    return [o.detach(), S.detach()] + [x.grad for x in inp] + [st.grad]


def _worker(out_path):
    import warnings

    import torch

    assert os.environ.get("TRITON_INTERPRET") == "1"
    _patch_fla_for_interpreter()
    sys.path[:0] = [str(ROOT), str(HERE)]
    from rwkv_diffusion_rnn.ops.wkv7 import FLA_LOWER_BOUND, wkv7, wkv7_fla
    from test_wkv7 import make_inputs

    # fla warns on every float32 call that some platforms lack float32 support
    warnings.filterwarnings("ignore", message=".*does not support float32.*")
    results = {}
    for variant in ("default", "fast"):
        for case, B, T, H, scale in SHAPES:
            xs, s0 = make_inputs(B, T, H, K, dtype=torch.float32, seed=T)
            w = xs[1]
            # RWKV-7's range, which the fast variant's lower_bound asserts
            assert FLA_LOWER_BOUND <= float(w.min()) and float(w.max()) < 0
            if variant == "default":
                def fla(i, s):
                    return wkv7(*i, scale=scale, initial_state=s, output_final_state=True,
                                backend="fla")
            else:
                def fla(i, s):
                    return wkv7_fla(*i, scale=scale, initial_state=s, output_final_state=True,
                                    fast=True)

            def ref(i, s):
                return wkv7(*i, scale=scale, initial_state=s, output_final_state=True,
                            backend="torch")

            t0 = time.perf_counter()
            got = _run(fla, xs, s0)
            seconds = time.perf_counter() - t0
            want = _run(ref, xs, s0)
            errs = {}
            for name, g, r in zip(NAMES, got, want):
                assert g is not None and g.shape == r.shape and g.dtype == torch.float32, name
                abs_err = float((g - r).abs().max())
                errs[name] = {"abs": abs_err, "rel": abs_err / max(float(r.abs().max()), 1e-30),
                              "finite": bool(torch.isfinite(g).all())}
            results[f"{variant}-{case}"] = {"seconds": seconds, "errors": errs}
    Path(out_path).write_text(json.dumps(results, indent=1))


# ---------------------------------------------------------------- pytest (the parent process)

@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    if importlib.util.find_spec("triton") is None:
        msg = "triton is not importable: pip install -e '.[fla-cpu]' to check fla's kernel on CPU"
        print(msg)
        pytest.skip(msg)
    out = tmp_path_factory.mktemp("fla_interpret") / "results.json"
    # no GPU in the child: on a CUDA machine fla would pick GPU-specific kernel paths
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(out)], env=env,
                          cwd=str(ROOT), capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, ("interpreter run failed:\n" + proc.stdout[-3000:]
                                  + proc.stderr[-6000:])
    results = json.loads(out.read_text())
    print(f"\nfla under TRITON_INTERPRET=1: child process {wall:.1f} s")
    for case, res in results.items():
        worst = max(res["errors"].items(), key=lambda kv: kv[1]["rel"])
        print(f"  {case:13s} {res['seconds']:5.1f} s  worst {worst[0]}: "
              f"abs {worst[1]['abs']:.1e}, rel {worst[1]['rel']:.1e}")
    return results


@pytest.mark.parametrize("variant", ["default", "fast"])
@pytest.mark.parametrize("case", [s[0] for s in SHAPES])
def test_fla_under_interpreter_matches_torch(interpreted, variant, case):
    """Output, final state and every gradient, relative to the largest value of each."""
    errs = interpreted[f"{variant}-{case}"]["errors"]
    assert set(errs) == set(NAMES)
    for name, e in errs.items():
        assert e["finite"], f"{name}: not finite"
        assert e["rel"] <= TOL[variant], f"{name}: abs {e['abs']:.2e}, rel {e['rel']:.2e}"


def test_fla_backend_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    import torch

    from rwkv_diffusion_rnn.ops.wkv7 import wkv7

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(1, 2, 1, 4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        wkv7(x, -x.abs() - 0.1, x, x, x, x, backend="fla")


if __name__ == "__main__":
    _worker(sys.argv[1])
