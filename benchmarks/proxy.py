"""What the CPU proxy benchmarks share: the repository paths, the named configurations of configs/ (the proxy
size is configs/proxy.env), the quickstart's shards of the bundled sample (built once) and the one-process CPU
setting. Every benchmark imports this module, train_gpt and data/build_shards, and nothing else of the
repository (not each other, not the tests)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "data")]
import build_shards  # noqa: E402
import train_gpt as tg  # noqa: E402

CONFIGS = ROOT / "configs"
SAMPLE = ROOT / "data" / "sample" / "fineweb_sample.jsonl"
DATA = ROOT / "data" / "datasets" / "sample_sp1024"
TOKENIZER = ROOT / "data" / "sample" / "fineweb_1024_bpe.model"


def config(name: str) -> dict[str, str]:
    """configs/<name>.env as a dict: one NAME=value a line, # comments."""
    lines = [line for line in (CONFIGS / f"{name}.env").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


PROXY = config("proxy")  # the CPU proxy size: 4 layers, d=128, sequence 256, 8,192 tokens a step
CPU = tg.Dist(0, 1, 0, torch.device("cpu"))


def ensure_sample():
    """The quickstart's shards of the bundled sample, built once."""
    if not DATA.is_dir():
        build_shards.build([SAMPLE], DATA, TOKENIZER, num_val_docs=100, allow_small_val=True)


def train_run(name: str, env: dict[str, str], steps: int, seed: int, workdir: Path) -> dict:
    """train_gpt.py in a subprocess on the bundled sample for `steps` steps: pre-quantization val_bpb (the last
    validation before export), training tokens per second, ms per step, parameters and peak RSS."""
    full = {**os.environ, **env, "ITERATIONS": str(steps), "SEED": str(seed), "DATA_PATH": str(DATA),
            "TOKENIZER_PATH": str(TOKENIZER), "RUN_ID": "proxy"}
    r = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], cwd=workdir, env=full, capture_output=True,
                       text=True)
    if r.returncode:
        sys.exit(f"{name}: train_gpt.py failed:\n{r.stderr[-2000:]}")
    out = r.stdout
    last = re.findall(rf"^step:{steps}/{steps} val_loss:\S+ val_bpb:(\S+) train_time:(\d+)ms", out, re.M)[-1]
    return dict(name=name, seed=seed, val_bpb=float(last[0]), ms=int(last[1]) / steps,
                tok_s=steps * int(full["TRAIN_BATCH_TOKENS"]) / (int(last[1]) / 1000),
                rss=int(re.search(r"peak memory rss: (\d+) MiB", out).group(1)),
                params=int(re.search(r"model_params:(\d+)", out).group(1)))
