"""What the CPU proxy benchmarks share: the repository paths, the named configurations of configs/ (the proxy
size is configs/proxy.env), the shards of the bundled sample (built once, 100 validation documents) and the
one-process CPU setting. Every benchmark imports this module, train_gpt and data/build_shards, and nothing else of the
repository (not each other, but for eval_proxy.py's use of frontier_proxy.py's proxy frontier preset and
ladder.py's of the rows of frontier_proxy.py and seed_stack_proxy.py; not the tests)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import sentencepiece as spm

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "data")]
import build_shards  # noqa: E402
import train_gpt as tg  # noqa: E402

CONFIGS = ROOT / "configs"
SAMPLE = ROOT / "data" / "sample" / "fineweb_sample.jsonl"
DATA = ROOT / "data" / "datasets" / "sample_sp1024"
TOKENIZER = ROOT / "data" / "sample" / "fineweb_1024_bpe.model"
CASEOPS_TOKENIZER = ROOT / "data" / "sample" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"


def config(name: str) -> dict[str, str]:
    """configs/<name>.env as a dict: one NAME=value a line, # comments."""
    lines = [line for line in (CONFIGS / f"{name}.env").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


SEED = {k: v for k, v in config("seed_stack").items() if k not in ("DATA_PATH", "TOKENIZER_PATH")}  # no paths
PROXY = {**SEED, **config("proxy")}  # the seed stack at the CPU proxy size: 4 layers, d=128, sequence 256
# the proxy's shape for the rows that compare pre-quantization val_bpb (configs/proxy.env, no stack, without its
# quantization settings), logging every 50 steps
SHAPE = {**{k: v for k, v in config("proxy").items() if k not in ("FP16_MAX_NUMEL", "GPTQ_CALIB_TOKENS")},
         "TRAIN_LOG_EVERY": "50"}
# the seed stack at SHAPE: there every block matrix is within its FP16_MAX_NUMEL of 65,536 and exports as fp16, so
# its late QAT would fake-quantize nothing (LATE_QAT_THRESHOLD's check refuses that) and is off; no number changes
SEED_AT_SHAPE = {**SEED, "LATE_QAT_THRESHOLD": "0"}
CPU = tg.Dist(0, 1, 0, torch.device("cpu"))


def sample(variant: str = "sp1024") -> tuple[Path, Path]:
    """(shards, tokenizer) of the benchmarks' build of the bundled sample: data/datasets/sample_<variant>, sp1024
    or caseops, the same 100 validation documents (the quickstart's build keeps 50)."""
    return (DATA, TOKENIZER) if variant == "sp1024" else (DATA.with_name("sample_caseops"), CASEOPS_TOKENIZER)


def ensure_sample(variant: str = "sp1024") -> tuple[Path, Path]:
    """sample(variant), built once under a temporary name."""
    data, tokenizer = sample(variant)
    if not data.is_dir():
        partial = data.with_name(data.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        build_shards.build([SAMPLE], partial, tokenizer, num_val_docs=100, allow_small_val=True,
                           caseops_data=variant == "caseops")
        partial.rename(data)
    return data, tokenizer


def train_run(name: str, env: dict[str, str], steps: int, seed: int, workdir: Path) -> dict:
    """train_gpt.py in a subprocess on the bundled sample (sp1024 unless env names DATA_PATH and TOKENIZER_PATH)
    for `steps` steps: pre-quantization val_bpb (val_bpb: the last validation before export; averaged: of the
    weights exported, i.e. averaged when the run averages), the round trip through the run's quantizer (plain
    evaluator), the final score (the official grep line), training tokens per second, ms per step, parameters
    and peak RSS."""
    full = {**os.environ, "DATA_PATH": str(DATA), "TOKENIZER_PATH": str(TOKENIZER), **env, "ITERATIONS": str(steps),
            "SEED": str(seed), "RUN_ID": "proxy", "EVAL_DIAGNOSTICS": "1"}  # the columns below are diagnostics
    r = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], cwd=workdir, env=full, capture_output=True,
                       text=True)
    if r.returncode:
        sys.exit(f"{name}: train_gpt.py failed:\n{r.stderr[-2000:]}")
    out = r.stdout
    last = re.findall(rf"^step:{steps}/{steps} val_loss:\S+ val_bpb:(\S+) train_time:(\d+)ms", out, re.M)[-1]
    bpb = lambda pat: [float(b) for b in re.findall(rf"^{pat} val_loss:\S+ val_bpb:(\S+)", out, re.M)]  # noqa: E731
    return dict(name=name, seed=seed, val_bpb=float(last[0]), ms=int(last[1]) / steps,
                averaged=bpb("averaged_weights")[-1], roundtrip=bpb(r"final_\w+_roundtrip_exact")[0],
                final=bpb("final_int8_zlib_roundtrip_exact")[-1],
                tok_s=steps * int(full["TRAIN_BATCH_TOKENS"]) / (int(last[1]) / 1000),
                rss=int(re.search(r"peak memory rss: (\d+) MiB", out).group(1)),
                params=int(re.search(r"model_params:(\d+)", out).group(1)))


def row_args(doc: str, argv=None) -> argparse.Namespace:
    """The command line of a benchmark that trains named rows: --steps, --seeds and --only."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 42])
    p.add_argument("--only", nargs="+", help="row names to run (default: all)")
    return p.parse_args(argv)


def chosen(rows: dict[str, dict[str, str]], only: list[str] | None) -> dict[str, dict[str, str]]:
    """The rows --only names (all when it names none), in the rows' order; an unknown name is an error."""
    if unknown := set(only or ()) - set(rows):
        sys.exit(f"--only: no row named {', '.join(map(repr, sorted(unknown)))}; the rows: {', '.join(rows)}")
    return {k: v for k, v in rows.items() if not only or k in only}


def run_rows(rows: dict[str, dict[str, str]], steps: int, seeds: list[int]) -> list[dict]:
    """train_run of each row at each seed, row by row, in one temporary directory; a `done:` line on stderr as
    each ends."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, env in rows.items():
            for seed in seeds:
                out.append(train_run(name, env, steps, seed, Path(tmp)))
                print(f"done: {out[-1]}", file=sys.stderr, flush=True)
    return out


def full_size_run(work: Path, name: str = "frontier") -> str:
    """configs/<name>.env at full size (frontier: the default, 35.9M parameters, on the sample as CaseOps SP8192
    data; seed_stack: 27M parameters on sp1024) trained 2 steps on CPU on 16,384-token batches (the frontier's
    24,576: eight rows of its 3,072-token context, one length throughout) and exported as a record run would, in
    `work` (its artifact: work / train_gpt.ARTIFACT_PATH); returns the run's stdout. The plain round-trip
    evaluator only (no sliding window, TTT or tilt: slow on CPU at this size) on 10 documents; calibration reads
    8,192 tokens."""
    shards, env = work / "shards", {k: v for k, v in config(name).items() if k not in ("DATA_PATH", "TOKENIZER_PATH")}
    env.update(ITERATIONS="2", WARMUP_STEPS="0", VAL_LOSS_EVERY="0", TRAIN_BATCH_TOKENS="16384",
               VAL_BATCH_SIZE="16384", GPTQ_CALIB_TOKENS="8192", EVAL_STRIDE=env.get("EVAL_SEQ_LEN", "2048"))
    if name == "frontier":
        tokenizer = CASEOPS_TOKENIZER
        build_shards.build([SAMPLE], shards, tokenizer, num_val_docs=10, allow_small_val=True, caseops_data=True,
                           workers=1, log=lambda m: None)
        env.update(TRAIN_SEQ_SCHEDULE="", SEQ_CHANGE_WARMUP_STEPS="0", EVAL_DOCS="0", TTT_ENABLED="0",
                   NGRAM_TILT_ENABLED="0", TRAIN_BATCH_TOKENS="24576", VAL_BATCH_SIZE="24576")
    else:
        texts = [json.loads(line)["text"] for line in SAMPLE.read_text().splitlines()]
        tokenizer, sp = TOKENIZER, spm.SentencePieceProcessor(model_file=str(TOKENIZER))
        encode = lambda ts: np.concatenate([[sp.bos_id()] + sp.encode(t) for t in ts]).astype(np.uint16)  # noqa: E731
        shards.mkdir()
        build_shards.write_shard(shards / "fineweb_val_000000.bin", encode(texts[:10]))
        build_shards.write_shard(shards / "fineweb_train_000000.bin", encode(texts[100:]))
    env = {**os.environ, **env, "DATA_PATH": str(shards), "TOKENIZER_PATH": str(tokenizer), "DEVICE": "cpu",
           "MAX_WALLCLOCK_SECONDS": "0", "RUN_ID": "full"}
    r = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], cwd=work, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"full-size run ({name}) failed:\n{r.stderr[-3000:]}")
    return r.stdout


def proxy_h(steps: int, **extra) -> tg.Hyperparameters:
    """The seed stack at the proxy size, its schedule scaled to `steps` by PR #1019's fractions, on the sample."""
    env = {**PROXY, "ITERATIONS": str(steps), "WARMDOWN_ITERS": str(round(steps * 4000 / 6920)),
           "MUON_MOMENTUM_WARMUP_STEPS": str(round(steps * 1500 / 6920)), "DATA_PATH": str(DATA),
           "TOKENIZER_PATH": str(TOKENIZER), **extra}
    return tg.Hyperparameters.from_env(env)


def trained(h: tg.Hyperparameters):
    """Trained in-process, averaged and calibrated: (model, validation, TrainResult, Hessians, tokenizer)."""
    sp, train_files, val_files = tg.check_inputs(h)
    torch.manual_seed(h.seed)
    val = tg.load_validation(h, sp, val_files, CPU.device)
    model = tg.build_model(h, CPU, sp.bos_id())
    result = tg.train(h, CPU, model, tg.TrainingData(train_files, h.vocab_size), val, lambda m: None)
    hessians = tg.finish_training(h, CPU, model, result, tg.TimeLedger(CPU, lambda m: None), sp.bos_id(),
                                  lambda m: None)
    return model, val, result, hessians, sp
