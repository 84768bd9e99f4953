"""The GPU checks in one command, their results in one table.

    python eval/gpu_check.py [--out FILE] [--only tests wkv model struct] [--budget-scale 1.5]
    bash dev.sh gpu-check [same arguments]

On a CUDA machine it runs, in order, each step in its own subprocess with a time budget; a step
that fails or runs out of time is recorded in the table and the next step still runs:

  1. tests   ``pytest -q -rs tests/test_fla_gpu.py``: fla's kernel against the torch backend
  2. wkv     WKV-7 forward+backward, fla vs the torch backend at T=4096 (B=4, H=4, K=V=64, fp32;
             the functions of eval/bench_wkv7.py, i.e. ``bench_wkv7.py --device cuda --T 4096``)
  3. model   forward+backward tokens/s under bf16 autocast of a 12-layer, 768-wide RWKV-7 (head
             size 64, vocab 65536, B=8, T=1024): this project's ``RWKV7`` (wkv backend "fla")
             against fla's ``RWKV7ForCausalLM`` of the same shape, both scored with the same
             cross-entropy on their logits
  4. struct  ``python -m rwkv_diffusion_rnn.train_rwkv experiment=struct model.mixer=bi
             training.max_steps=200 training.device=cuda``: struct_acc, struct_exact, tokens/s

At the end it prints a markdown table (step, result, seconds) and writes it, with each step's
details and the tail of its output, as JSON (``--out``, default eval/out/gpu_check.json).
The budgets (140 + 60 + 140 + 120 s) add up to 7 min 40 s; expect less on an H100-class GPU.

Without a visible CUDA device it runs nothing, says so, and exits with code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "eval" / "out" / "gpu_check.json"
RESULT_TAG = "GPU_CHECK_RESULT "  # a child prints its result as one JSON line after this tag
NO_CUDA_MESSAGE = ("gpu_check: no CUDA device is visible (torch.cuda.is_available() is false); "
                   "nothing was run.")
EXIT_NO_CUDA = 2


@dataclass
class Step:
    name: str       # what --only takes
    title: str      # the table's first column
    budget_s: float


STEPS = [
    Step("tests", "1. GPU tests (tests/test_fla_gpu.py)", 140),
    Step("wkv", "2. WKV-7 fwd+bwd, fla vs torch, T=4096", 60),
    Step("model", "3. RWKV-7 12x768 fwd+bwd tok/s, bf16: ours vs fla", 140),
    Step("struct", "4. struct, bi, 200 steps on the GPU", 120),
]


# ---------------------------------------------------------------------------------------------
# Pure helpers (unit-tested on hand-made inputs)

SUMMARY_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected|warnings?)\b")
SUMMARY_TIME = re.compile(r"\bin [\d.]+s\b")
SKIP_LINE = re.compile(r"^SKIPPED \[\d+\] [^:]+:\d+: (.*)$")


def parse_pytest_summary(output: str) -> dict:
    """Counts from pytest's final line, e.g. '1 failed, 5 passed, 2 warnings in 3.21s'.

    Returns at least passed / failed / skipped / errors (0 when not mentioned, all 0 when there is
    no summary line), plus any other count the line names (xfailed, deselected, warnings, ...).
    """
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    summaries = [ln for ln in output.splitlines()
                 if SUMMARY_TIME.search(ln) and (SUMMARY_COUNT.search(ln) or "no tests ran" in ln)]
    if summaries:
        for n, word in SUMMARY_COUNT.findall(summaries[-1]):
            key = {"error": "errors", "warning": "warnings"}.get(word, word)
            counts[key] = counts.get(key, 0) + int(n)
    return counts


def skip_reasons(output: str) -> list[str]:
    """The distinct reasons of pytest -rs's 'SKIPPED [n] file:line: reason' lines, in order."""
    reasons = []
    for line in output.splitlines():
        m = SKIP_LINE.match(line.strip())
        if m and m.group(1) not in reasons:
            reasons.append(m.group(1))
    return reasons


def tests_result(counts: dict, returncode: int, reasons=()) -> tuple[str, str]:
    """(status, result text) of the pytest step: ok only when tests ran and none failed or skipped."""
    text = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
    if counts["errors"]:
        text += f", {counts['errors']} errors"
    if returncode != 0 or counts["failed"] or counts["errors"]:
        if not any(counts[k] for k in ("passed", "failed", "skipped", "errors")):
            text = f"no tests ran (pytest exit {returncode})"
        return "failed", text
    if counts["skipped"]:
        return "skipped", text + (f" ({'; '.join(reasons)})" if reasons else "")
    if not counts["passed"]:
        return "failed", "no tests ran"
    return "ok", text


def format_table(rows: list[dict]) -> str:
    """Markdown table of the step rows (keys: title, result, seconds)."""
    lines = ["| step | result | seconds |", "|---|---|---:|"]
    for r in rows:
        result = str(r["result"]).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['title']} | {result} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def last_result(output: str):
    """The JSON a child printed after RESULT_TAG (the last one), or None."""
    found = None
    for line in output.splitlines():
        if line.startswith(RESULT_TAG):
            found = json.loads(line[len(RESULT_TAG):])
    return found


def tail(text: str, n_chars: int = 2000) -> str:
    return text[-n_chars:]


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def struct_result(metrics: dict, log: list[dict]) -> dict:
    """struct_acc / struct_exact from metrics.json and tokens/s from train_log.jsonl records.

    tokens/s is the last logged interval's (the first interval holds kernel compilation).
    """
    speeds = [r["tokens_per_s"] for r in log if "tokens_per_s" in r]
    return {"struct_acc": metrics.get("struct_acc"), "struct_exact": metrics.get("struct_exact"),
            "step": metrics.get("step"), "tokens_per_s": speeds[-1] if speeds else None,
            "tokens_per_s_all": speeds}


def model_part(name: str, m) -> str:
    """'ours 123,456 tok/s, 20.1 GiB peak' / 'ours failed: ...' / 'fla not reached'."""
    if m is None:
        return f"{name} not reached"
    if "error" in m:
        return f"{name} failed: {m['error']}"
    return f"{name} {m['tokens_per_s']:,.0f} tok/s, {m['peak_gib']:.1f} GiB peak"


def has_error(d: dict) -> bool:
    """Whether a child's result records a part that failed (e.g. one of the two models)."""
    return any(isinstance(v, dict) and "error" in v for v in d.values())


def describe(name: str, d: dict) -> str:
    """One line of the table for a step's details."""
    if name == "wkv":
        return (f"fla {d['fla_ms']:.2f} ms, torch {d['torch_ms']:.2f} ms: fla {d['speedup']:.1f}x "
                f"(B={d['B']} H={d['H']} K=V={d['K']} T={d['T']} {d['dtype']}, median of {d['repeats']})")
    if name == "model":
        ours, fla = d.get("ours"), d.get("fla")
        text = f"{model_part('ours', ours)}, {model_part('fla', fla)}"
        if ours and fla and "tokens_per_s" in ours and "tokens_per_s" in fla:
            text += f"; ours/fla {ours['tokens_per_s'] / fla['tokens_per_s']:.2f}x"
        return text + f" (B={d['B']} T={d['T']})"
    if name == "struct":
        if d["struct_acc"] is None or d["tokens_per_s"] is None:
            return f"metrics.json / train_log.jsonl lack struct_acc or tokens_per_s: {json.dumps(d)}"
        return (f"struct_acc {d['struct_acc']:.4f}, struct_exact {d['struct_exact']:.4f} at step "
                f"{d['step']}; {d['tokens_per_s']:,.0f} tok/s (last logged interval)")
    return json.dumps(d)


# ---------------------------------------------------------------------------------------------
# Measurements run inside a child process (python eval/gpu_check.py --child NAME)

def measure_wkv(T=4096, B=4, H=4, K=64, repeats=5) -> dict:
    """eval/bench_wkv7.py's forward+backward at one T, fla vs torch, median of `repeats`."""
    import torch
    sys.path.insert(0, str(ROOT / "eval"))
    import bench_wkv7
    from rwkv_diffusion_rnn.ops.wkv7 import wkv7

    xs = bench_wkv7.inputs(B, T, H, K, "cuda", torch.float32)
    out = {"B": B, "H": H, "K": K, "T": T, "dtype": "float32", "repeats": repeats}
    for name in ("fla", "torch"):
        fn = lambda *x, name=name: wkv7(*x, output_final_state=True, backend=name)  # noqa: E731
        bench_wkv7.fwd_bwd(fn, xs, "cuda")  # warm-up (and Triton compilation)
        times = [bench_wkv7.fwd_bwd(fn, xs, "cuda") for _ in range(repeats)]
        out[f"{name}_ms"] = statistics.median(times) * 1e3
    out["speedup"] = out["torch_ms"] / out["fla_ms"]
    return out


MODEL_SHAPE = dict(n_layer=12, n_embd=768, head_size=64, vocab_size=65536)


def build_ours():
    from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7Config
    model = RWKV7(RWKV7Config(**MODEL_SHAPE, wkv_backend="fla"))
    return model, lambda ids: model(ids)


def build_fla():
    """fla's RWKV7ForCausalLM with our shape: same LoRA widths and FFN width as RWKV7Config."""
    from fla.models import RWKV7Config as FlaConfig
    from fla.models import RWKV7ForCausalLM
    from rwkv_diffusion_rnn.models.rwkv7 import RWKV7Config
    ours = RWKV7Config(**MODEL_SHAPE)
    cfg = FlaConfig(hidden_size=ours.n_embd, num_hidden_layers=ours.n_layer,
                    head_dim=ours.head_size, vocab_size=ours.vocab_size,
                    intermediate_size=ours.dim_ffn, decay_low_rank_dim=ours.decay_lora,
                    a_low_rank_dim=ours.aaa_lora, v_low_rank_dim=ours.mv_lora,
                    gate_low_rank_dim=ours.gate_lora, fuse_cross_entropy=False,
                    use_cache=False)
    model = RWKV7ForCausalLM(cfg)
    return model, lambda ids: model(input_ids=ids, use_cache=False).logits


def time_fwd_bwd(model, logits_fn, B, T, warmup, iters, budget_s) -> dict:
    """tokens/s of forward+backward (bf16 autocast, fp32 weights), timed with cuda.synchronize.

    After `warmup` iterations it times up to `iters` more, stopping early once `budget_s` is spent.
    """
    import torch
    import torch.nn.functional as F
    model.to("cuda").train()
    vocab = MODEL_SHAPE["vocab_size"]
    ids = torch.randint(0, vocab, (B, T), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))

    def one():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = logits_fn(ids)
        loss = F.cross_entropy(logits.float().view(-1, vocab), ids.view(-1))
        loss.backward()

    for _ in range(warmup):
        one()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0, n = time.perf_counter(), 0
    while n < iters and (n == 0 or time.perf_counter() - t0 < budget_s):
        one()
        torch.cuda.synchronize()
        n += 1
    dt = time.perf_counter() - t0
    return {"tokens_per_s": B * T * n / dt, "iters": n, "seconds": dt,
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30}


def measure_model(B=8, T=1024, warmup=3, iters=10, budget_s=20.0, report=print) -> dict:
    """Our RWKV7, then fla's RWKV7ForCausalLM, same batch and timing.

    A model that fails is recorded as {"error": ...} and the other still runs; `report` gets the
    result so far after each model, so a step that runs out of time keeps the first one.
    """
    import torch
    out = {"B": B, "T": T, "warmup": warmup, **MODEL_SHAPE}
    for name, build in (("ours", build_ours), ("fla", build_fla)):
        torch.manual_seed(0)
        try:
            with torch.device("cuda"):  # the 65536x768 orthogonal init takes minutes on CPU
                model, logits_fn = build()
            out[name] = time_fwd_bwd(model, logits_fn, B, T, warmup, iters, budget_s)
            out[name]["params"] = sum(p.numel() for p in model.parameters())
        except Exception as e:  # noqa: BLE001 - recorded in the table
            out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        model = logits_fn = None
        torch.cuda.empty_cache()
        report(out)
    return out


def print_result(result: dict):
    print(RESULT_TAG + json.dumps(result), flush=True)


CHILDREN = {"wkv": lambda: measure_wkv(), "model": lambda: measure_model(report=print_result)}


def run_child(name: str) -> int:
    import torch
    print(f"device: {torch.cuda.get_device_name(0)}", flush=True)
    print_result(CHILDREN[name]())
    return 0


# ---------------------------------------------------------------------------------------------
# The parent: each step is a subprocess with a timeout

def run_subprocess(cmd: list[str], timeout_s: float, env=None) -> tuple[int | None, str]:
    """(return code or None on timeout, stdout+stderr). A timed-out child's process group is killed."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env=env)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out or ""


def step_tests(budget_s: float) -> dict:
    rc, out = run_subprocess([sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_fla_gpu.py"],
                             budget_s)
    if rc is None:
        return {"status": "timeout", "log": out}
    counts = parse_pytest_summary(out)
    status, text = tests_result(counts, rc, skip_reasons(out))
    return {"status": status, "result": text, "details": counts, "log": out}


def step_child(name: str, budget_s: float) -> dict:
    rc, out = run_subprocess([sys.executable, str(Path(__file__).resolve()), "--child", name], budget_s)
    d = last_result(out)  # on a timeout, what the child had reported so far
    if rc is None:
        return {"status": "timeout", "details": d, "log": out,
                "partial": describe(name, d) if d else None}
    if rc != 0 or d is None:
        return {"status": "failed", "result": f"exit {rc}: {last_line(out)}", "log": out}
    return {"status": "failed" if has_error(d) else "ok", "result": describe(name, d),
            "details": d, "log": out}


def step_struct(budget_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpu_check_struct_") as save_dir:
        cmd = [sys.executable, "-m", "rwkv_diffusion_rnn.train_rwkv", "experiment=struct",
               "model.mixer=bi", "training.max_steps=200", "training.device=cuda",
               f"logging.save_dir={save_dir}", "logging.progress_bar=false"]
        rc, out = run_subprocess(cmd, budget_s)
        if rc is None:
            return {"status": "timeout", "log": out}
        metrics_path = Path(save_dir) / "metrics.json"
        if rc != 0 or not metrics_path.exists():
            return {"status": "failed", "result": f"exit {rc}: {last_line(out)}", "log": out}
        log_path = Path(save_dir) / "train_log.jsonl"
        log = [json.loads(ln) for ln in log_path.read_text().splitlines() if ln.strip()] \
            if log_path.exists() else []
        d = struct_result(json.loads(metrics_path.read_text()), log)
    return {"status": "ok", "result": describe("struct", d), "details": d, "log": out}


def run_step(step: Step, budget_scale: float) -> dict:
    budget = step.budget_s * budget_scale
    print(f"== {step.title} (budget {budget:.0f} s)", flush=True)
    t0 = time.perf_counter()
    try:
        if step.name == "tests":
            r = step_tests(budget)
        elif step.name == "struct":
            r = step_struct(budget)
        else:
            r = step_child(step.name, budget)
    except Exception as e:  # a broken step must not stop the others
        r = {"status": "failed", "result": f"{type(e).__name__}: {e}", "log": ""}
    seconds = time.perf_counter() - t0
    if r["status"] == "timeout":
        so_far = f"; so far: {r['partial']}" if r.get("partial") else f": {last_line(r['log'])}"
        r["result"] = f"timed out after {budget:.0f} s{so_far}"
    elif r["status"] != "ok":
        r["result"] = f"{r['status'].upper()}: {r['result']}"
    print(f"   {r['result']}  ({seconds:.1f} s)", flush=True)
    return {"name": step.name, "title": step.title, "status": r["status"], "result": r["result"],
            "seconds": seconds, "budget_s": budget, "details": r.get("details"),
            "log_tail": tail(r.get("log", ""))}


def environment() -> dict:
    import torch
    try:
        import fla
        fla_version = getattr(fla, "__version__", "?")
    except Exception as e:  # recorded, not fatal: step 2-4 then fail with the reason
        fla_version = f"not importable ({type(e).__name__})"
    return {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "cuda": torch.version.cuda, "fla": fla_version}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file for the results")
    ap.add_argument("--only", nargs="+", choices=[s.name for s in STEPS],
                    help="run only these steps (in the usual order)")
    ap.add_argument("--budget-scale", type=float, default=1.0,
                    help="multiply every step's time budget (a slower GPU)")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import torch
    if not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        return EXIT_NO_CUDA
    if args.child:
        return run_child(args.child)

    env = environment()
    print(f"# gpu_check on {env['device']} (torch {env['torch']}, CUDA {env['cuda']}, fla {env['fla']})")
    steps = [s for s in STEPS if not args.only or s.name in args.only]
    rows = [run_step(s, args.budget_scale) for s in steps]
    table = format_table(rows)
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**env, "steps": rows, "table": table}, indent=2))
    print(f"\nwrote {args.out}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
