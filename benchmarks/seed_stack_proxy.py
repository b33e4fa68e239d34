"""CPU proxy comparison of the official baseline and the seed stack at the same tiny width and depth.

    python3 benchmarks/seed_stack_proxy.py [--steps 300] [--seeds 1337]

Each configuration trains train_gpt.py on the bundled sample (built once into data/datasets/sample_sp1024) for
the same number of steps of the same tokens (4 layers, d=128, 4 heads / 2 KV heads, sequence 256, 8,192 tokens
a step), and the script prints pre-quantization val_bpb (the last validation before export), training tokens
per second and the process's peak resident memory. The schedules are scaled to the proxy's length with the
fractions the records used: the baseline's warmdown is 1200 of its 13,780 steps and its momentum warm-up 500;
the seed stack's are 4000 and 1500 of about 6,920. Rows:
  baseline        the official baseline's settings, configs/baseline.env (model and optimizer)
  baseline+recipe the baseline model trained with the seed stack's optimizer recipe
  seed stack      the defaults (VE on the last two layers, as 9,10 of 11)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from proxy import SEED_AT_SHAPE, SHAPE, config, ensure_sample, train_run

MODEL_KNOBS = ("MLP_MULT", "MLP_ACT", "ROPE_DIMS", "ROPE_NTK_LEN", "SMEAR_GATE", "BIGRAM_VOCAB_SIZE",
               "XSA_LAST_N", "LN_SCALE", "VE_LAYERS", "ORTHO_INIT")


def configs(steps: int) -> dict[str, dict[str, str]]:
    def scaled(warmdown, warmup, of):
        return dict(WARMDOWN_ITERS=str(round(steps * warmdown / of)),
                    MUON_MOMENTUM_WARMUP_STEPS=str(round(steps * warmup / of)))

    base = {k: v for k, v in config("baseline").items() if k not in ("TRAIN_SEQ_LEN", "TRAIN_BATCH_TOKENS",
                                                                       "VAL_LOSS_EVERY", "TRAIN_LOG_EVERY",
                                                                       "DATA_PATH", "TOKENIZER_PATH")}
    base["EVAL_STRIDE"] = SHAPE["TRAIN_SEQ_LEN"]  # the baseline's 1024 would exceed the proxy's window: plain
    return {
        "baseline": {**base, **scaled(1200, 500, 13780)},
        "baseline+recipe": {**{k: v for k, v in SEED_AT_SHAPE.items() if k != "MLP_LEAKY_SLOPE"},  # relu2: no slope
                            **{k: base[k] for k in MODEL_KNOBS if k in base}, **scaled(4000, 1500, 6920)},
        "seed stack": {**SEED_AT_SHAPE, **scaled(4000, 1500, 6920)},  # value embeddings on the last two layers
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[1337])
    a = p.parse_args(argv)
    ensure_sample()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:
            for name, env in configs(a.steps).items():
                rows.append(train_run(name, {**env, **SHAPE}, a.steps, seed, Path(tmp)))
                print(f"done: {rows[-1]}", file=sys.stderr, flush=True)
    print("| config | seed | params | pre-quant val_bpb | train tokens/s | peak RSS MiB |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['seed']} | {r['params']:,} | {r['val_bpb']:.4f} | {r['tok_s']:,.0f} | {r['rss']} |")


if __name__ == "__main__":
    main()
