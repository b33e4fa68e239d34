"""What the CPU proxy benchmarks share: the repository paths, the named configurations of configs/ (the proxy
size is configs/proxy.env), the quickstart's shards of the bundled sample (built once) and the one-process CPU
setting. Every benchmark imports this module, train_gpt and data/build_shards, and nothing else of the
repository (not each other, not the tests)."""

from __future__ import annotations

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
        build_shards.build([SAMPLE], DATA, TOKENIZER, num_val_docs=100)
