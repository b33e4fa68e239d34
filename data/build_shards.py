"""Build token shards in the official format from a JSONL corpus ({"text": ...} per line)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from train_gpt import SHARD_HEADER_INTS, SHARD_MAGIC, SHARD_VERSION  # noqa: E402


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Write one shard atomically: 256 little-endian int32 (magic, version, token count), then uint16 tokens."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > 65535):
        raise ValueError(f"{path}: token ids must fit in uint16")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    os.replace(tmp, path)
