"""One command for a GPU machine: is it ready for the 8xH100 record run, and how fast is one rank's step?

    python3 benchmarks/gpu_check.py [--out gpu_check.json] [--steps 20] [--skip-pipeline] [--timeout 480]

No network and no downloaded data: everything runs on the bundled sample (data/sample/, built into token
shards in a temporary directory), within --timeout (default 480 s: the 8 minutes it is meant to take on one
H100; the pipeline run is stopped at that mark). On a machine without CUDA it says so in one line on stderr
and exits 2 before any work. Checks, in order:

1. Environment: Python, torch, CUDA, cuDNN, driver, every visible GPU (name, memory, compute capability), and
   whether FlashAttention 3 (`flash_attn_interface`) imports.
2. FlashAttention 3 against SDPA on random bf16 inputs of the record's attention shape (causal, 8 query / 4 KV
   heads, head dim 64, sequence 2048, 4 rows), forward and backward. The reference is SDPA in fp32 (the math
   kernel, no TF32); FA3's largest absolute error on the output and on dq, dk, dv must be at most twice that
   of SDPA run in bf16 (the kernel train_gpt.py falls back to) plus twice the bf16 rounding step of the
   reference: the acceptance rule of FlashAttention's own tests (Dao-AILab/flash-attention,
   hopper/test_flash_attn.py, test_flash_attn_output).
3. The training step at full size: train_gpt.Hyperparameters() defaults (the frontier stack: 11 layers, d=512,
   on the bundled sample built as CaseOps SP8192 data; the last stage, packed rows of 3072-token segments through
   the looped 17-layer pass), built, banked and compiled exactly as train_gpt.train does.
   The record's step is 786,432 tokens over 8 GPUs, i.e. on each GPU one micro-step of 98,304 tokens plus
   the optimizer step. One GPU runs world size 1, i.e. 8 such micro-steps and then the optimizer; each
   micro-step is timed with CUDA events (after 3 warm-up steps that compile), so the per-GPU forward and
   backward work is measured exactly. The projected 8xH100 step is one micro-step plus the one-GPU optimizer
   step: that optimizer does all of the Newton-Schulz work that 8 ranks split 8 ways, and none of their NCCL
   traffic (reduce-scatter, all-reduce, all-gather over NVLink), which one GPU cannot measure. The
   projection assumes the measured device: an H200 or any other GPU is not an H100. Also reported: steps in
   the training loop's budget (MAX_WALLCLOCK_SECONDS - GPTQ_RESERVE_SECONDS), peak memory, MFU against the
   H100's dense bf16 peak, and from torch._dynamo.utils.counters the graphs compiled, the recompiles after
   warm-up (expected: 0; late QAT is switched on for the last quarter of the timed steps and must not
   recompile) and the graph breaks (expected: 0; fullgraph=True would fail on one).
4. The whole pipeline once at full size: train_gpt.py itself as a subprocess (10 steps after 2 warm-up
   steps; everything else at its defaults: EMA, GPTQ calibration on training tokens, int6 GPTQ, fitting,
   lzma, writing, reading back, the round-trip and sliding-window evaluators) on the sample's 100
   validation documents, in a temporary working directory. Its log gives every time_ledger phase, the
   score lines and the artifact size; its console output is kept next to the JSON (<out>.pipeline.log).
   The environment's knob variables are not passed on, so defaults are what runs.

Every figure goes to one JSON file (--out); a short summary is printed. Exit status: 0 when every check
passed, 1 when one failed (the JSON says which, under "problems"), 2 on bad arguments or without CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import train_gpt as tg  # noqa: E402

FORMAT = "parameter-golf-gpu-check/1"
SAMPLE_JSONL = ROOT / "data" / "sample" / "fineweb_sample.jsonl"
TOKENIZER = ROOT / "data" / "sample" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"  # the default data
SAMPLE_VAL_DOCS = 100  # as the benchmarks: 100 validation documents, 300 training documents
RECORD_ATTENTION = dict(batch=4, seq_len=2048, heads=8, kv_heads=4, head_dim=64)  # the default model's attention
WARMUP_STEPS = 3  # world-size-1 steps before timing: the first compiles the model and Newton-Schulz
PIPELINE_ENV = {"ITERATIONS": "10", "WARMUP_STEPS": "2", "VAL_LOSS_EVERY": "0", "TRAIN_LOG_EVERY": "1",
                "DEVICE": "cuda", "RUN_ID": "gpu_check", "EVAL_DIAGNOSTICS": "1"}  # every phase timed
MIN_STEPS, MAX_STEPS, DEFAULT_STEPS = 20, 1000, 20
MIN_TIMEOUT, MAX_TIMEOUT, DEFAULT_TIMEOUT = 60, 7200, 480
MIN_PIPELINE_S = 30  # the pipeline is skipped when less than this is left of --timeout


# ---------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The few arguments, each checked; any problem exits 2 with the usage and a one-line reason."""
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_check.json", help="JSON report to write (default: gpu_check.json)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"timed world-size-1 steps of 8 micro-steps each, {MIN_STEPS}-{MAX_STEPS} "
                        f"(default {DEFAULT_STEPS})")
    p.add_argument("--skip-pipeline", action="store_true", help="do not run train_gpt.py end to end")
    p.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT,
                   help=f"seconds for the whole check, {MIN_TIMEOUT}-{MAX_TIMEOUT} (default {DEFAULT_TIMEOUT}); "
                        "the pipeline run is stopped when they are up")
    args = p.parse_args(argv)
    if not MIN_STEPS <= args.steps <= MAX_STEPS:
        p.error(f"--steps {args.steps}: must be in [{MIN_STEPS}, {MAX_STEPS}]")
    if not MIN_TIMEOUT <= args.timeout <= MAX_TIMEOUT:
        p.error(f"--timeout {args.timeout}: must be in [{MIN_TIMEOUT}, {MAX_TIMEOUT}] seconds")
    out = Path(args.out)
    if not args.out or out.is_dir():
        p.error(f"--out {args.out!r}: must be a file path, not a directory")
    if not out.parent.is_dir():
        p.error(f"--out {args.out!r}: the directory {str(out.parent)!r} does not exist")
    return args


def cuda_missing_message() -> str | None:
    """None when a CUDA device is visible, else the one line to print."""
    if torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda} build, no device visible" if torch.version.cuda else "a CPU-only build"
    return (f"gpu_check.py: error: no CUDA device (torch {torch.__version__}, {build}); "
            "run this on a GPU machine")


# ---------------------------------------------------------------------------------------------------------
# 1. Environment
# ---------------------------------------------------------------------------------------------------------


def fa3_import() -> dict:
    """Whether flash_attn_interface imports here (train_gpt.py uses it on CUDA when it does)."""
    try:
        module = importlib.import_module("flash_attn_interface")
    except Exception as e:  # an ImportError, or a broken build failing otherwise
        return {"importable": False, "module": None, "error": f"{type(e).__name__}: {e}"}
    return {"importable": hasattr(module, "flash_attn_func"), "module": getattr(module, "__file__", None),
            "error": None if hasattr(module, "flash_attn_func") else "no flash_attn_func in the module"}


def environment() -> dict:
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                     "capability": f"{props.major}.{props.minor}"})
    driver = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20, check=False)
        driver = r.stdout.split("\n")[0].strip() or None
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "driver": driver, "gpu_count": len(gpus), "gpus": gpus,
            "is_h100": bool(gpus) and all("H100" in g["name"] for g in gpus), "fa3": fa3_import()}


# ---------------------------------------------------------------------------------------------------------
# 2. FlashAttention 3 against SDPA
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def exact_fp32_matmuls():
    """TF32 off while the fp32 reference is computed (train_gpt.init_dist turns it on)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _sdpa(q, k, v, upcast: bool):
    """SDPA on FA3's (B, T, H, D) layout: causal, GQA; upcast = fp32 math kernel (the reference)."""
    args = [t.float() if upcast else t for t in (q, k, v)]
    ctx = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH) if upcast else contextlib.nullcontext()
    with ctx:
        y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in args), is_causal=True, enable_gqa=True)
    return y.transpose(1, 2).to(q.dtype)


def compare_attention(fa3_fn, device, batch: int = 4, seq_len: int = 2048, heads: int = 8, kv_heads: int = 4,
                      head_dim: int = 64, seed: int = 0) -> dict:
    """FA3's output and gradients against SDPA on random bf16 (B, T, H, D) inputs, causal, GQA. fa3_fn has
    flash_attn_interface.flash_attn_func's convention: fa3_fn(q, k, v, causal=True) -> a tensor or a tuple
    whose first item is the output. Reference: SDPA in fp32. Each of out, dq, dk, dv passes when FA3's max
    abs error is <= 2 x that of SDPA in bf16 + 2 x the bf16 rounding step of the reference (the rule of
    Dao-AILab/flash-attention's hopper/test_flash_attn.py)."""
    report = {"shape": dict(batch=batch, seq_len=seq_len, heads=heads, kv_heads=kv_heads, head_dim=head_dim),
              "dtype": "bfloat16", "causal": True,
              "rule": "max|fa3 - ref| <= 2 * max|sdpa_bf16 - ref| + 2 * max|bf16(ref + 0.3) - 0.3 - ref|, "
                      "ref = SDPA in fp32", "ok": False, "max_abs_err": None, "tolerance": None, "tensors": {},
                      "error": None}
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).bfloat16()

    q, k, v = (randn(batch, seq_len, n, head_dim).requires_grad_() for n in (heads, kv_heads, kv_heads))
    dout = randn(batch, seq_len, heads, head_dim)

    def run(fn):
        out = fn(q, k, v)
        out = out[0] if isinstance(out, tuple) else out
        return [out.detach(), *torch.autograd.grad(out, (q, k, v), dout)]

    try:
        with exact_fp32_matmuls():
            ref = run(lambda *t: _sdpa(*t, upcast=True))
        pt = run(lambda *t: _sdpa(*t, upcast=False))
        fa3 = run(lambda *t: fa3_fn(*t, causal=True))
    except Exception as e:  # a kernel that refuses the inputs (wrong GPU, wrong build) is a failed check
        report["error"] = f"{type(e).__name__}: {e}"[:2000]
        return report
    for name, r, p, f in zip(("out", "dq", "dk", "dv"), ref, pt, fa3):
        if f.shape != r.shape:
            report["tensors"][name] = {"ok": False, "error": f"shape {tuple(f.shape)}, expected {tuple(r.shape)}"}
            continue
        rounding = ((r + 0.3) - 0.3 - r).abs().max().item()  # bf16 arithmetic on the reference
        err, pt_err = (f.float() - r.float()).abs().max().item(), (p.float() - r.float()).abs().max().item()
        tol = 2 * pt_err + 2 * rounding
        report["tensors"][name] = {"max_abs_err": err, "sdpa_bf16_max_abs_err": pt_err, "tolerance": tol,
                                   "ok": err <= tol}  # NaN fails
    out = report["tensors"]["out"]
    report["max_abs_err"], report["tolerance"] = out.get("max_abs_err"), out.get("tolerance")
    report["ok"] = all(t["ok"] for t in report["tensors"].values())
    return report


# ---------------------------------------------------------------------------------------------------------
# 3. The training step at full size
# ---------------------------------------------------------------------------------------------------------


class Clock:
    """CUDA events on CUDA (read after one synchronize), perf_counter on CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else 1000 * (b - a)


def dynamo_counts() -> dict:
    """Graphs and frames compiled so far, and the graph breaks, from torch._dynamo.utils.counters."""
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    return {"graphs": int(counters["stats"]["unique_graphs"]), "frames": int(counters["frames"]["ok"]),
            "graph_breaks": int(sum(breaks.values())), "graph_break_reasons": sorted(breaks)[:10]}


def _ms_stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "median": statistics.median(values), "min": min(values),
            "max": max(values)}


def time_training_step(h: tg.Hyperparameters, d: tg.Dist, steps: int, warmup_steps: int = WARMUP_STEPS,
                       backend: str | None = "inductor", log=print) -> dict:
    """World-size-1 steps of h's model on the shards of h.data_path, built, banked and compiled as
    train_gpt.train does, by train_gpt.prepare_training and train_gpt.train_step (backend "inductor", what
    train_gpt.py compiles with, or None: not compiled, for tests). Returns the per-micro-step and optimizer times,
    the projection to 8 GPUs, MFU, memory and torch._dynamo's counts."""
    from torch._dynamo.utils import counters

    if backend not in ("inductor", None):
        raise ValueError(f"backend={backend!r}: train_gpt.py compiles with inductor, or not at all (None)")

    T, local_tokens = h.train_seq_len, h.train_batch_tokens // tg.MICROBATCHES
    mm, att = tg.forward_flops_per_token(h, T)
    flops_micro = 3 * (mm + att) * local_tokens
    report = {"world_size": d.world_size, "micro_steps_per_step": d.grad_accum_steps, "seq_len": T,
              "tokens_per_micro_step": local_tokens, "seqs_per_micro_step": local_tokens // T,
              "warmup_steps": warmup_steps, "timed_steps": steps, "timed_micro_steps": steps * d.grad_accum_steps,
              "compile_backend": backend, "flops_per_micro_step": flops_micro, "error": None}
    torch._dynamo.reset()
    counters.clear()
    if d.cuda:
        torch.cuda.reset_peak_memory_stats(d.device)
    clock, loader = Clock(d.cuda), None
    try:
        sp, train_files, _ = tg.check_inputs(h)
        torch.manual_seed(h.seed)
        base = tg.build_model(h, d, sp.bos_id())
        report["attention"] = "fa3" if base.blocks[0].attn.use_fa3 else "sdpa"
        model, opt = tg.prepare_training(dataclasses.replace(h, compile="1" if backend else "0"), d, base)
        averager, params = tg.make_averager(h, base, lambda m: None), list(base.parameters())
        loader = tg.DistributedTokenLoader(tg.TrainingData(train_files, h.vocab_size), d.rank, d.world_size,
                                           sp.bos_id() if h.doc_packing else None)  # packed rows, as train does

        def step(i: int, marks: list | None) -> torch.Tensor:
            """train_gpt.train's step (train_gpt.train_step, then the EMA); a mark after each micro-step and after
            the optimizer."""
            mark = None if marks is None else (lambda: marks.append(clock.mark()))
            loss = tg.train_step(h, d, model, opt, loader, i, 1.0, after_micro=mark)
            if averager is not None:
                averager.step(params, i + 1, 1.0)
            if mark is not None:
                mark()
            d.sync()  # the training loop synchronises once per step (its clock all-reduce)
            return loss

        t0 = time.perf_counter()
        for i in range(warmup_steps):
            step(i, None)
            log(f"[gpu_check] warm-up step {i + 1}/{warmup_steps} ({time.perf_counter() - t0:.0f} s)")
        d.sync()
        report["warmup_s"] = time.perf_counter() - t0
        before = dynamo_counts()
        qat_from = steps * 3 // 4 if h.late_qat_threshold > 0 else None
        report["qat_on_from_timed_step"] = qat_from
        all_marks, t0 = [], time.perf_counter()
        for i in range(steps):
            if i == qat_from:
                tg.set_qat(base, True)  # as late QAT does in a record run: a buffer, no recompile
            marks = [clock.mark()]
            loss = step(warmup_steps + i, marks)
            all_marks.append(marks)
        d.sync()
        wall_ms = 1000 * (time.perf_counter() - t0) / steps
        report["final_train_loss"] = float(loss)
        after = dynamo_counts()
    except Exception:
        report["error"] = traceback.format_exc().strip()[-3000:]
        log(f"[gpu_check] training step failed: {report['error'].splitlines()[-1]}")
        return report
    finally:
        if loader is not None:
            loader.pool.shutdown(wait=True)
    A = d.grad_accum_steps
    micro = [clock.ms(m[j], m[j + 1]) for m in all_marks for j in range(A)]
    optim = [clock.ms(m[A], m[A + 1]) for m in all_marks]
    micro_ms, opt_ms = statistics.fmean(micro), statistics.fmean(optim)
    projected = micro_ms + opt_ms
    loop_ms = h.loop_cap_ms or tg.BUDGET_MS  # no cap: the 600 s of the rules
    report.update({
        "micro_step_ms": micro_ms, "micro_step_ms_stats": _ms_stats(micro),
        "optimizer_step_ms": opt_ms, "optimizer_step_ms_stats": _ms_stats(optim),
        "step_ms_world1": wall_ms,
        "projected_8x_step_ms": projected,
        "projection": "one micro-step (the per-GPU forward and backward of an 8-GPU step) + the one-GPU optimizer "
                      "step (all of the Newton-Schulz work that 8 ranks split 8 ways, none of their NCCL traffic); "
                      "on the measured device, which is an H100 only if environment.is_h100",
        "loop_budget_s": loop_ms / 1000,
        "projected_steps_in_budget": int(loop_ms // projected),
        "tflops_per_s": flops_micro / (micro_ms / 1000) / 1e12,
        "mfu_vs_h100_bf16": flops_micro / (micro_ms / 1000) / tg.H100_BF16_FLOPS,
        "projected_step_mfu_vs_h100_bf16": flops_micro / (projected / 1000) / tg.H100_BF16_FLOPS,
        "peak_memory_allocated_mib": torch.cuda.max_memory_allocated(d.device) // 2**20 if d.cuda else None,
        "peak_memory_reserved_mib": torch.cuda.max_memory_reserved(d.device) // 2**20 if d.cuda else None,
        # a recompile is one more frame compiled (counters["frames"]["ok"]) and one more graph
        "dynamo": {"graphs_after_warmup": before["graphs"], "frames_after_warmup": before["frames"],
                   "recompiles_after_warmup": after["frames"] - before["frames"],
                   "new_graphs_after_warmup": after["graphs"] - before["graphs"],
                   "graph_breaks": after["graph_breaks"], "graph_break_reasons": after["graph_break_reasons"]},
    })
    return report


# ---------------------------------------------------------------------------------------------------------
# 4. The whole pipeline: train_gpt.py as a subprocess
# ---------------------------------------------------------------------------------------------------------


def build_sample_shards(out_dir: Path) -> Path:
    """The bundled sample as shards (data/build_shards.py, as quickstart.sh builds them)."""
    cmd = [sys.executable, str(ROOT / "data" / "build_shards.py"), "--input", str(SAMPLE_JSONL),
           "--tokenizer", str(TOKENIZER), "--output-dir", str(out_dir), "--num-val-docs", str(SAMPLE_VAL_DOCS),
           "--allow-small-val", "--caseops", "--workers", str(min(4, os.cpu_count() or 1))]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode:
        raise RuntimeError(f"data/build_shards.py failed: {(r.stderr or r.stdout).strip()[-1000:]}")
    return out_dir


LEDGER_PHASE = re.compile(r"^time_ledger phase:(\S+) ms:(\d+) charged_to:(\S+)$")
LEDGER_TOTAL = re.compile(r"^time_ledger train:(\d+)ms eval:(\d+)ms not_charged:(\d+)ms")
SCORE = re.compile(r"^final_int8_zlib_roundtrip_exact val_loss:(\S+) val_bpb:(\S+)$")
SCORE_SOURCE = re.compile(r"^official_score source:(\S+)")
STAGE = re.compile(r"^(\w+)_exact val_loss:(\S+) val_bpb:(\S+)$")
ARTIFACT = re.compile(r"^artifact code_bytes:(\d+) model_bytes:(\d+) total_bytes:(\d+) cap_bytes:(\d+) "
                      r"headroom_bytes:(-?\d+) fits:([01])$")
DEVICE = re.compile(r"^device:(\S+) compile:([01]) autocast:(\S+) attention:(\S+)$")
TRAIN_STEP = re.compile(r"^step:(\d+)/(\d+) train_loss:(\S+) train_time:(\d+)ms step_avg:([\d.]+)ms$")


def parse_pipeline_log(text: str) -> dict:
    """The figures of a train_gpt.py console log: time ledger phases and totals, score and stage lines,
    artifact size, device line, the last training step."""
    out = {"ledger_phases": {}, "ledger_totals": None, "score": None, "stages": {}, "artifact": None,
           "device": None, "last_train_step": None}
    for line in text.splitlines():
        if m := LEDGER_PHASE.match(line):
            out["ledger_phases"][m[1]] = {"ms": int(m[2]), "charged_to": m[3]}
        elif m := LEDGER_TOTAL.match(line):
            out["ledger_totals"] = {"train_ms": int(m[1]), "eval_ms": int(m[2]), "not_charged_ms": int(m[3])}
        elif m := SCORE.match(line):
            out["score"] = {**(out["score"] or {}), "val_loss": float(m[1]), "val_bpb": float(m[2])}
        elif m := SCORE_SOURCE.match(line):
            out["score"] = {**(out["score"] or {}), "source": m[1]}
        elif m := ARTIFACT.match(line):
            out["artifact"] = dict(zip(("code_bytes", "model_bytes", "total_bytes", "cap_bytes", "headroom_bytes"),
                                       map(int, m.groups()[:5])), fits=m[6] == "1")
        elif m := DEVICE.match(line):
            out["device"] = {"device": m[1], "compile": m[2] == "1", "autocast": m[3], "attention": m[4]}
        elif m := TRAIN_STEP.match(line):
            out["last_train_step"] = {"step": int(m[1]), "train_loss": float(m[3]), "step_avg_ms": float(m[5])}
        if (m := STAGE.match(line)) and m[1] != "final_int8_zlib_roundtrip":
            out["stages"][m[1]] = {"val_loss": float(m[2]), "val_bpb": float(m[3])}
    return out


def pipeline_env(data_dir: Path, overrides: dict[str, str], tokenizer: Path = TOKENIZER) -> dict[str, str]:
    """The child's environment: this one without any knob or torchrun variable, plus the overrides."""
    knobs = {f.name.upper() for f in dataclasses.fields(tg.Hyperparameters)} | set(tg.RENAMED)
    launcher = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in knobs | launcher}
    return {**env, "DATA_PATH": str(data_dir), "TOKENIZER_PATH": str(tokenizer), **overrides}


def run_pipeline(data_dir: Path, workdir: Path, log_path: Path, timeout_s: float, overrides: dict[str, str],
                 tokenizer: Path = TOKENIZER) -> dict:
    """train_gpt.py end to end in workdir (its logs/ and final_model.ptz land there), stopped after
    timeout_s; console output to log_path. Returns the parsed figures, the return code and whether it ran
    out of time."""
    env = pipeline_env(data_dir, overrides, tokenizer)
    shown = ("DATA_PATH", "TOKENIZER_PATH", *overrides)
    report = {"command": "python3 train_gpt.py", "env": {k: env[k] for k in shown}, "timeout_s": round(timeout_s, 1),
              "returncode": None, "timed_out": False, "wall_s": 0.0, "steps": None, "error": None,
              **parse_pipeline_log("")}
    t0 = time.perf_counter()
    try:
        with open(log_path, "w", encoding="utf-8") as f:
            proc = subprocess.Popen([sys.executable, str(ROOT / "train_gpt.py")], cwd=workdir, env=env, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # a process group of its own
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                report["timed_out"] = True
            finally:  # out of time, or this script interrupted: stop it and its compile workers
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                report["returncode"] = proc.wait()
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        report["error"], text = f"{type(e).__name__}: {e}", ""
    report["wall_s"] = time.perf_counter() - t0
    report.update(parse_pipeline_log(text))
    summary = workdir / "logs" / f"{env.get('RUN_ID', '')}.json"
    if summary.is_file():
        report["steps"] = json.loads(summary.read_text()).get("steps")
    elif report["last_train_step"]:
        report["steps"] = report["last_train_step"]["step"]
    if report["returncode"] != 0 or report["timed_out"]:
        report["log_tail"] = text.splitlines()[-40:]
    report["ok"] = (report["returncode"] == 0 and not report["timed_out"] and report["score"] is not None
                    and report["artifact"] is not None and report["artifact"]["fits"])
    return report


# ---------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------


def assemble_report(args: argparse.Namespace, env: dict, attention: dict, step: dict, pipeline: dict,
                    elapsed: dict) -> dict:
    """The JSON document: every measurement, plus the problems (each a failed check) and notes."""
    problems, notes = [], []
    if not env["fa3"]["importable"]:
        problems.append(f"FlashAttention 3 does not import ({env['fa3']['error']}); the record's attention kernel "
                        "is missing (README.md, Set up: GPU extra)")
    if attention.get("skipped") is None and not attention.get("ok"):
        problems.append("FlashAttention 3 disagrees with SDPA beyond the bf16 tolerance: " +
                        (attention.get("error") or ", ".join(f"{n} {t.get('max_abs_err')} > {t.get('tolerance')}"
                                                              for n, t in attention["tensors"].items() if not t["ok"])))
    if step.get("skipped") is None:
        if step.get("error"):
            problems.append(f"the training step failed: {step['error'].splitlines()[-1]}")
        else:
            dyn = step["dynamo"]
            if dyn["recompiles_after_warmup"] or dyn["new_graphs_after_warmup"]:
                problems.append(f"{dyn['recompiles_after_warmup']} recompiles ({dyn['new_graphs_after_warmup']} new "
                                "graphs) after warm-up (rerun with TORCH_LOGS=recompiles for the reasons)")
            if dyn["graph_breaks"]:
                problems.append(f"{dyn['graph_breaks']} graph breaks: {'; '.join(dyn['graph_break_reasons'])}")
            if not math.isfinite(step["final_train_loss"]):
                problems.append(f"the training loss is {step['final_train_loss']}")
            if step.get("attention") != "fa3":
                notes.append("the timed model used SDPA, not FlashAttention 3")
    if pipeline.get("skipped") is None and not pipeline.get("ok"):
        why = ("ran out of --timeout (raise it)" if pipeline.get("timed_out") else
               f"exited {pipeline.get('returncode')}" if pipeline.get("returncode") else
               "the artifact does not fit" if pipeline.get("artifact") else "no score or artifact line")
        problems.append(f"the full pipeline (train_gpt.py) failed: {why}" +
                        (f" ({pipeline['error']})" if pipeline.get("error") else ""))
    if env["gpus"] and not env["is_h100"]:
        notes.append(f"the device is {env['gpus'][0]['name']}, not an H100: every projection assumes 8 of the "
                     "measured device, and MFU is against the H100's bf16 peak")
    return {"format": FORMAT, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "ok": not problems, "problems": problems, "notes": notes,
            "args": {"steps": args.steps, "skip_pipeline": args.skip_pipeline, "timeout_s": args.timeout},
            "environment": env, "attention_check": attention, "training_step": step, "pipeline": pipeline,
            "elapsed_s": elapsed}


def summary_lines(report: dict) -> list[str]:
    env, att, step, pipe = (report[k] for k in ("environment", "attention_check", "training_step", "pipeline"))
    names = ", ".join(g["name"] for g in env["gpus"]) or "none"
    lines = [f"gpu_check: {env['gpu_count']} GPU(s) [{names}], torch {env['torch']}, CUDA {env['cuda']}, "
             f"FlashAttention 3 imports: {'yes' if env['fa3']['importable'] else 'no'}"]
    if att.get("skipped"):
        lines.append(f"attention check: skipped ({att['skipped']})")
    else:
        s = att["shape"]
        lines.append(f"attention FA3 vs SDPA ({s['batch']}x{s['seq_len']}, {s['heads']}/{s['kv_heads']} heads, d"
                     f"{s['head_dim']}, bf16, causal): " +
                     (f"error {att['error']}" if att["error"] else
                      f"out max abs err {att['max_abs_err']:.3g} (tolerance {att['tolerance']:.3g}), grads "
                      f"{'ok' if all(t['ok'] for n, t in att['tensors'].items() if n != 'out') else 'FAIL'}") +
                     f": {'ok' if att['ok'] else 'FAIL'}")
    if step.get("skipped"):
        lines.append(f"training step: skipped ({step['skipped']})")
    elif step.get("error"):
        lines.append(f"training step: FAILED: {step['error'].splitlines()[-1]}")
    else:
        dyn = step["dynamo"]
        lines += [f"training step ({step['seqs_per_micro_step']}x{step['seq_len']} tokens per micro-step, "
                  f"{step['attention']}, {step['timed_micro_steps']} micro-steps timed): {step['micro_step_ms']:.1f} "
                  f"ms/micro-step, optimizer {step['optimizer_step_ms']:.1f} ms (world size 1)",
                  f"  projected 8-GPU step {step['projected_8x_step_ms']:.1f} ms -> "
                  f"{step['projected_steps_in_budget']:,} steps in {step['loop_budget_s']:.0f} s; MFU vs H100 bf16 "
                  f"{step['mfu_vs_h100_bf16']:.1%} (micro-step), peak memory {step['peak_memory_allocated_mib']} MiB",
                  f"  dynamo: {dyn['graphs_after_warmup']} graphs after warm-up, {dyn['recompiles_after_warmup']} "
                  f"recompiles after it, {dyn['graph_breaks']} graph breaks"]
    if pipe.get("skipped"):
        lines.append(f"pipeline: skipped ({pipe['skipped']})")
    else:
        score, art = pipe.get("score") or {}, pipe.get("artifact") or {}
        lines.append(f"pipeline (train_gpt.py at full size, {pipe.get('steps')} steps): "
                     f"{'ok' if pipe['ok'] else 'FAIL'} in {pipe['wall_s']:.0f} s; score val_bpb "
                     f"{score.get('val_bpb')} ({score.get('source')}), total {art.get('total_bytes')} bytes")
        lines.append("  ledger: " + ", ".join(f"{k} {v['ms']:,} ms ({v['charged_to']})"
                                              for k, v in pipe["ledger_phases"].items()))
    lines += [f"note: {n}" for n in report["notes"]] + [f"PROBLEM: {p}" for p in report["problems"]]
    lines.append(f"result: {'OK' if report['ok'] else 'FAILED'}")
    return lines


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------


def collect(args: argparse.Namespace, d: tg.Dist, data_dir: Path, workdir: Path, log_path: Path, fa3_fn,
            attention_shape: dict = RECORD_ATTENTION, h: tg.Hyperparameters | None = None,
            pipeline_overrides: dict[str, str] = PIPELINE_ENV, backend: str | None = "inductor", log=print,
            tokenizer: Path = TOKENIZER) -> dict:
    """Every check in order, on device d (tests pass a CPU Dist, a tiny h, its tokenizer and an SDPA stand-in)."""
    t_start, elapsed = time.perf_counter(), {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        elapsed[name] = round(time.perf_counter() - t0, 1)
        return out

    env = timed("environment", environment)
    log(f"[gpu_check] attention check ({'FlashAttention 3' if fa3_fn else 'skipped: no FlashAttention 3'})")
    attention = timed("attention_check", lambda: compare_attention(fa3_fn, d.device, **attention_shape)) \
        if fa3_fn is not None else {"skipped": "FlashAttention 3 does not import"}
    h = h or tg.Hyperparameters()
    h.data_path, h.tokenizer_path, h.device = str(data_dir), str(tokenizer), d.device.type
    log("[gpu_check] training step at full size: compiling, then timing")
    step = timed("training_step", lambda: time_training_step(h, d, args.steps, backend=backend, log=log))
    torch._dynamo.reset()  # the compiled model's caches hold its memory; the pipeline needs the GPU
    gc.collect()
    if d.cuda:
        torch.cuda.empty_cache()
    left = args.timeout - (time.perf_counter() - t_start)
    if args.skip_pipeline:
        pipeline = {"skipped": "--skip-pipeline"}
    elif left < MIN_PIPELINE_S:
        pipeline = {"skipped": f"only {left:.0f} s of --timeout {args.timeout} left"}
    else:
        log(f"[gpu_check] full pipeline: train_gpt.py (console output: {log_path}), at most {left:.0f} s")
        pipeline = timed("pipeline", lambda: run_pipeline(data_dir, workdir, log_path, left, pipeline_overrides,
                                                          tokenizer))
    elapsed["total"] = round(time.perf_counter() - t_start, 1)
    return assemble_report(args, env, attention, step, pipeline, elapsed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = cuda_missing_message()
    if missing:
        print(missing, file=sys.stderr)
        return 2
    if any(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        print("gpu_check.py: error: run it as one plain process (python3 benchmarks/gpu_check.py), not under "
              "torchrun", file=sys.stderr)
        return 2
    out = Path(args.out)
    log_path = out.with_name(out.stem + ".pipeline.log")
    h = tg.Hyperparameters(device="cuda")
    d = tg.init_dist(h)  # one process: cuda:0, TF32 as train_gpt.py sets it
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        print("[gpu_check] building the sample shards", flush=True)
        try:
            data_dir = build_sample_shards(Path(tmp) / "sample_sp1024")
        except RuntimeError as e:
            print(f"gpu_check.py: error: {e}", file=sys.stderr)
            return 1
        workdir = Path(tmp) / "run"
        workdir.mkdir()
        report = collect(args, d, data_dir, workdir, log_path, tg.flash_attn_func, h=h,
                         log=lambda m: print(m, flush=True))
    tg.write_atomic(str(out), (json.dumps(report, indent=1) + "\n").encode())
    print("\n".join(summary_lines(report)) + f"\n(report: {out})", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
