"""Time and peak memory of train_gpt.ngram_hints at the size of the official validation stream.

    OMP_NUM_THREADS=1 python3 benchmarks/ngram_hints.py [--tokens 47853344] [--order 16] [--threshold 0.8] [--world 8]

The stream: uniform random tokens of an 8192-piece vocabulary, with 2% of it overwritten by 1000-token blocks
copied from earlier in the stream (repeated passages, where the hints open). Printed: seconds, peak RSS before
and after the call (the process's high-water mark, torch import included), and the number of gated targets.
--world W times rank 0's share of W ranks (score_artifact: each rank builds the hints of its hashes).
"""

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--tokens", type=int, default=47_853_344)
p.add_argument("--order", type=int, default=16)
p.add_argument("--threshold", type=float, default=0.8)
p.add_argument("--world", type=int, default=1)
a = p.parse_args()
rng = np.random.default_rng(0)
tokens = rng.integers(0, 8192, a.tokens + 1, dtype=np.uint16)
for dst in rng.integers(1000, a.tokens - 1000, a.tokens // 50_000):
    src = rng.integers(0, dst - 1000 + 1)
    tokens[dst:dst + 1000] = tokens[src:src + 1000]
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # noqa: E731 (the high-water mark, GiB)
before, t0 = peak(), time.perf_counter()
hints = train_gpt.ngram_hints(tokens, a.order, a.threshold, (0, a.world))
seconds = time.perf_counter() - t0
print(f"ngram_hints tokens:{a.tokens} order:{a.order} threshold:{a.threshold} share:0/{a.world} time:{seconds:.1f}s "
      f"peak_rss_before:{before:.2f}GiB peak_rss_after:{peak():.2f}GiB gated:{int((hints >= 0).sum())} "
      f"({(hints >= 0).mean():.2%})")
