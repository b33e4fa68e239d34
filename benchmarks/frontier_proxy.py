"""CPU proxy comparison of the seed stack, the frontier preset and the frontier preset with each technique
removed in turn, plus the full-size preset's FLOPs and projected 8xH100 step time.

    python3 benchmarks/frontier_proxy.py [--steps 300] [--seeds 1337 42] [--only NAME ...]

1. Proxy: every row trains train_gpt.py on the bundled sample (sp1024) for the same steps of the same tokens at
   the proxy size (configs/proxy.env: 4 layers, d=128, sequence 256, 8,192 tokens a step) and prints
   pre-quantization val_bpb (the last validation before export), ms per step and parameters. The frontier
   preset is configs/frontier.env with the proxy's shape and data. Its layer indices are moved to 4 layers the
   way the records place them in 11: the loop covers the middle layers 1..2 (the records' 3..5 at the U-Net
   hinge; 8 virtual layers), the parallel lanes the last layer (the records' last three, 8..10); the
   progressive context keeps its fractions with lengths 64/128/256 (the records' 1024/2048/3072 cannot all
   divide the proxy's 1,024-token micro-batch). Step-count schedules are scaled by the records' fractions: the
   seed stack's warmdown 4000 and momentum warm-up 1500 of about 6,920 steps, the frontier's momentum warm-up
   1500 and context warm-up 32 of about 4,900. The vocabulary stays 1024 for every row (8192 would make the
   embedding most of a d=128 model).
2. Full size: forward FLOPs per token of the frontier preset, plain and looped, and the projected ms per step on
   8xH100 at the model FLOP utilisation PR #1019 reached with the seed stack (86.7 ms/step), against the final
   records' measured ~96 ms/step before the loop switch, ~141 after, ~122 on average (PR #1855, #2014).
"""

from __future__ import annotations

import statistics

from proxy import SEED, SEED_AT_SHAPE, SHAPE, chosen, config, ensure_sample, row_args, run_rows
import train_gpt as tg

# the full-size preset's indices moved to the proxy's 4 layers (see the docstring)
PROXY_FRONTIER = dict(LOOP_START="1", LOOP_END="2", PARALLEL_START_LAYER="3", TRAIN_SEQ_LEN="256",
                      TRAIN_SEQ_SCHEDULE="64@0.100,128@0.700,256@1.000",
                      # the rows compare pre-quantization val_bpb: the final evaluation stays the plain one
                      EVAL_SEQ_LEN="256", EVAL_STRIDE="256", EVAL_DOCS="0", TTT_ENABLED="0", NGRAM_TILT_ENABLED="0",
                      GPTQ_CALIB_TOKENS=str(16 * int(SHAPE["TRAIN_BATCH_TOKENS"])))  # 16 batches, as the preset's
# frontier minus one technique: knobs set to their seed-stack (off) value; None: the seed stack's (or default) value
ABLATIONS = {  # the techniques new in this preset first (the order a short run covers)
    "- recurrence": dict(NUM_LOOPS="0", LOOP_START=None, LOOP_END=None, ENABLE_LOOPING_AT=None),
    "- parallel residuals": dict(PARALLEL_START_LAYER="0"),
    "- document packing": dict(DOC_PACKING="0"),
    "- progressive context": dict(TRAIN_SEQ_SCHEDULE=None, SEQ_CHANGE_WARMUP_STEPS=None),
    "- trained asymmetric softcap": dict(LOGIT_SOFTCAP_ASYM="0"),
    "- sparse attention gate": dict(ATTN_GATE="none", ATTN_GATE_SCALE=None, QUANT_GATE_BITS=None),
    "- input SmearGate": dict(SMEAR_GATE="off"),
    "- skip gates": dict(SKIP_GATES="0"),
    "leaky slope 0.5 (not 0.3)": dict(MLP_LEAKY_SLOPE="0.5"),
    "MLP 3x (not 4x)": dict(MLP_MULT="3.0"),
    "QK gain 1.5 (not 5.25)": dict(QK_GAIN_INIT=None),
    "- MuonEq-R": dict(MUON_ROW_NORM="0"),
    "- Polar Express (quintic NS)": dict(MUON_NS_COEFFS="quintic"),
    "- MIN_LR floor": dict(MIN_LR="0"),
}
RECORD_MS = {"plain": 96.0, "looped": 141.0, "average": 122.0}  # PR #1855 / #2014 logs, 8xH100


def configs(steps: int) -> dict[str, dict[str, str]]:
    frontier = {**{k: v for k, v in config("frontier").items() if k not in ("DATA_PATH", "TOKENIZER_PATH")},
                "VOCAB_SIZE": "1024"}
    frontier.update(PROXY_FRONTIER, MUON_MOMENTUM_WARMUP_STEPS=str(round(steps * 1500 / 4900)),
                    SEQ_CHANGE_WARMUP_STEPS=str(max(1, round(steps * 32 / 4900))))
    rows = {"seed stack": dict(SEED_AT_SHAPE, WARMDOWN_ITERS=str(round(steps * 4000 / 6920)),
                               MUON_MOMENTUM_WARMUP_STEPS=str(round(steps * 1500 / 6920))),
            "frontier": frontier}
    for name, change in ABLATIONS.items():  # None: the seed stack's value, or the knob's default if it has none
        rows[name] = {k: SEED.get(k) if v is None else v for k, v in {**frontier, **change}.items()
                      if v is not None or k in SEED}
    return rows


def projection():
    h, seed = tg.Hyperparameters.from_env(config("frontier")), tg.Hyperparameters.from_env(config("seed_stack"))
    mm, att = tg.forward_flops_per_token(seed, seed.train_seq_len)
    peak = 8 * tg.H100_BF16_FLOPS
    mfu_1019 = 3 * (mm + att) * seed.train_batch_tokens / 0.0867 / peak
    print(f"\nFull-size frontier preset ({tg.describe_features(h)}): projected 8xH100 ms/step at PR #1019's MFU "
          f"({mfu_1019:.1%}), attention counted causal over the whole length L (packing only shortens it)\n"
          "| training fraction | L | pass | forward FLOPs/token (matmul + attention) | PFLOP/step | projected ms/step |"
          "\n|---|---|---|---|---|---|")
    cuts = sorted({0.0, h.enable_looping_at, *(f for _, f in h.seq_stages)})
    total = 0.0
    for lo, hi in zip(cuts, cuts[1:]):
        n, looped = tg.seq_len_at(h, hi), tg.looping_at(h, lo)
        mm, att = tg.forward_flops_per_token(h, n, looped)
        step = 3 * (mm + att) * h.train_batch_tokens
        ms = step / (mfu_1019 * peak) * 1000
        total += (hi - lo) / ms  # steps per ms of training, weighted by the fraction of the time
        print(f"| {lo:.2f}-{hi:.2f} | {n} | {'looped' if looped else 'plain'} ({len(h.layer_order(looped))} layers) | "
              f"{mm:.4g} + {att:.4g} | {step / 1e15:.3f} | {ms:.1f} |")
    loop_s = h.loop_cap_ms / 1000
    print(f"Time-weighted mean {1 / total:.1f} ms/step, {int(loop_s * 1000 * total):,} steps in {loop_s:.0f} s; the "
          f"records measured {RECORD_MS['plain']:.0f} ms/step before the loop switch and {RECORD_MS['looped']:.0f} "
          f"after (PR #1855, 2048 throughout), {RECORD_MS['average']:.0f} on average and 4,882-4,888 steps (PR #2014).")


def main(argv=None):
    a = row_args(__doc__, argv)
    todo = chosen(configs(a.steps), a.only)  # an unknown --only name ends here, before anything is built
    ensure_sample()
    rows = run_rows({name: {**env, **SHAPE} for name, env in todo.items()}, a.steps, a.seeds)
    base = {r["seed"]: r["val_bpb"] for r in rows if r["name"] == "frontier"}
    print(f"{a.steps} steps, seeds {' '.join(map(str, a.seeds))}; Δ = paired difference to the frontier row\n"
          "| config | params | pre-quant val_bpb (mean) | per seed | Δ vs frontier | ms/step |\n|---|---|---|---|---|---|")
    for name in todo:
        rs = [r for r in rows if r["name"] == name]
        bpbs, delta = [r["val_bpb"] for r in rs], [r["val_bpb"] - base[r["seed"]] for r in rs if r["seed"] in base]
        shown = f"{statistics.mean(delta):+.4f}" if delta and name != "frontier" else "–"
        print(f"| {name} | {rs[0]['params']:,} | {statistics.mean(bpbs):.4f} | {' '.join(f'{b:.4f}' for b in bpbs)} | "
              f"{shown} | {statistics.mean(r['ms'] for r in rs):.0f} |")
    projection()


if __name__ == "__main__":
    main()
