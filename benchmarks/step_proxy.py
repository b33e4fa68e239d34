"""Training speed on CPU for the tiny and proxy configurations, and the projected step budget on 8xH100.

    python3 benchmarks/step_proxy.py [--steps 40] [--script train_gpt.py] [--nproc 1]

1. CPU: runs --script (default: this repository's train_gpt.py; pass an older copy to compare, e.g.
   `git show <commit>:train_gpt.py > /tmp/old.py`) for --steps steps on the bundled sample in the tiny test
   configuration (2 layers, d=64, sequence 64, 2,048 tokens a step) and the CPU proxy (4 layers, d=128,
   sequence 256, 8,192 tokens a step), every seed-stack technique on, eager fp32, and prints training tokens
   per second from the last step_avg (the first 5 steps are compile/warm-up and excluded by WARMUP_STEPS).
2. 8xH100: FLOPs per step of the default configuration (train_gpt.forward_flops_per_token, backward = 2x
   forward) and its projected ms/step and steps in the loop's 596 s (600 s less the GPTQ reserve), at the
   model FLOP utilisation the records achieved: PR #1019 (86.7 ms/step for this model) and the official
   baseline (43.5 ms/step, 13,780 steps, for its 9-layer d=512 model at 1024 tokens).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# proxy first: it puts the repository root and data/ on sys.path
from proxy import DATA, PROXY, ROOT, TOKENIZER, config, ensure_sample
import train_gpt as tg

CONFIGS = {
    "tiny (2L d64 T64)": {k: v for k, v in config("tiny").items() if k not in ("ITERATIONS", "VAL_LOSS_EVERY")},
    "proxy (4L d128 T256)": PROXY,
}
RECORDS = {"PR #1019": (tg.Hyperparameters.from_env(config("seed_stack")), 0.0867),
           "baseline": (tg.Hyperparameters.from_env(config("baseline")), 0.0435)}


def cpu_tokens_per_s(script: Path, env: dict, steps: int, nproc: int) -> float:
    env = {**os.environ, **env, "ITERATIONS": str(steps), "WARMUP_STEPS": "5", "VAL_LOSS_EVERY": "0",
           "TRAIN_LOG_EVERY": "1", "MAX_WALLCLOCK_SECONDS": "0", "DEVICE": "cpu", "DATA_PATH": str(DATA),
           "TOKENIZER_PATH": str(TOKENIZER), "QUANT_METHOD": "rtn", "RUN_ID": "step_proxy",
           "EVAL_STRIDE": env.get("TRAIN_SEQ_LEN", "2048")}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([*launcher, str(script)], cwd=tmp, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{script} failed:\n{r.stderr[-3000:]}")
    last = [l for l in r.stdout.splitlines() if l.startswith(f"step:{steps}/{steps} train_loss")][-1]
    step_ms = float(re.search(r"step_avg:([\d.]+)ms", last).group(1))
    return int(env["TRAIN_BATCH_TOKENS"]) / (step_ms / 1000)


def projection():
    peak = 8 * tg.H100_BF16_FLOPS
    mfus = {}
    for name, (h, step_s) in RECORDS.items():
        mm, att = tg.forward_flops_per_token(h, h.train_seq_len)
        mfus[name] = 3 * (mm + att) * h.train_batch_tokens / step_s / peak
    h = tg.Hyperparameters()
    mm, att = tg.forward_flops_per_token(h, h.train_seq_len)
    step = 3 * (mm + att) * h.train_batch_tokens
    loop_s = h.loop_cap_ms / 1000
    print(f"\nDefault configuration: forward FLOPs/token matmul {mm:.4g}, attention {att:.4g}; "
          f"{step / 1e15:.3f} PFLOP per {h.train_batch_tokens:,}-token step\n"
          "| MFU source | MFU (8xH100 bf16 dense) | projected ms/step | steps in the loop's "
          f"{loop_s:.0f} s |\n|---|---|---|---|")
    for name, mfu in mfus.items():
        ms = step / (mfu * peak) * 1000
        print(f"| {name} | {mfu:.1%} | {ms:.1f} | {int(loop_s * 1000 / ms):,} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--script", type=Path, default=ROOT / "train_gpt.py")
    ap.add_argument("--nproc", type=int, default=1, help="processes (gloo) sharing the 2-core CPU")
    args = ap.parse_args()
    ensure_sample()
    print(f"CPU training throughput of {args.script} ({args.nproc} process(es), {args.steps} steps)\n"
          "| configuration | tokens/s |\n|---|---|")
    for name, env in CONFIGS.items():
        print(f"| {name} | {cpu_tokens_per_s(args.script.resolve(), env, args.steps, args.nproc):,.0f} |")
    projection()


if __name__ == "__main__":
    main()
