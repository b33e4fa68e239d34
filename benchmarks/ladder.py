"""The ablation ladder at the CPU proxy: the official baseline, the seed stack, then the default (frontier) preset's
groups added one at a time in the records' order, as configs/frontier.env's sections name them (vocabulary and
CaseOps data, model, training context, optimizer and schedule, quantizer, evaluator).

    python3 benchmarks/ladder.py [--steps 300] [--seeds 1337 42] [--only NAME ...]

Every row trains and scores train_gpt.py at the proxy size (configs/proxy.env: 4 layers, d=128, 4/2 heads,
sequence 256, 8,192 tokens a step, every matrix quantized) for the same steps of the same documents of the
bundled sample: sp1024 data up to the vocabulary rung, from there the same documents as CaseOps SP8192 data,
scored on the same original bytes. The baseline and the seed stack rows are benchmarks/seed_stack_proxy.py's
and benchmarks/frontier_proxy.py's; the frontier's layer indices and lengths move to 4 layers as
frontier_proxy.py moves them (its docstring), with the evaluator's 5-document TTT phase (5% of the 100
validation documents, as 2,500 of 50,000) on eval_proxy.py's 4,096-token SGD chunks and 16 calibration batches;
step-count schedules scale by the records' fractions. Printed per row: parameters; pre-quantization val_bpb of
the exported (averaged) weights; the round trip through the row's quantizer, plain evaluator, and its gap; the
final score through the row's evaluator (the official grep line); ms per step (inflated by anything else
running, not comparable across rows). The quantizer and evaluator rungs train exactly as the optimizer rung:
their pre-quantization column repeats it, a check that only the export and the scoring changed (the evaluator
rung's over one more, partial window: EVAL_INCLUDE_TAIL scores the last targets). benchmarks/README.md's table is this at
--steps 150.
"""

from __future__ import annotations

import re
import statistics

from proxy import CONFIGS, chosen, config, ensure_sample, row_args, run_rows, sample
import proxy
import frontier_proxy
import seed_stack_proxy

SHAPE = {**config("proxy"), **proxy.SHAPE}  # every matrix quantized, as at full size


def sections(name: str = "frontier") -> list[tuple[str, dict[str, str]]]:
    """configs/<name>.env as its sections, in file order: a comment after a setting opens the next one, named by
    its first words; the settings before the first such comment are the data's."""
    out, title, after_setting = [], "vocabulary and CaseOps data", False
    for line in (CONFIGS / f"{name}.env").read_text().splitlines():
        if line.startswith("#"):
            title = re.match(r"# ([a-z ]+)", line).group(1).strip() if after_setting else title
            after_setting = False
        elif line.strip():
            if not out or out[-1][0] != title:
                out.append((title, {}))
            key, value = line.split("=", 1)
            out[-1][1][key] = value
            after_setting = True
    return out


def configs(steps: int) -> dict[str, dict[str, str]]:
    data, tokenizer = sample("caseops")
    moved = {**{k: v for k, v in frontier_proxy.PROXY_FRONTIER.items()
                if k in ("LOOP_START", "LOOP_END", "PARALLEL_START_LAYER", "TRAIN_SEQ_LEN", "TRAIN_SEQ_SCHEDULE",
                         "EVAL_SEQ_LEN", "EVAL_STRIDE", "GPTQ_CALIB_TOKENS")},
             "SEQ_CHANGE_WARMUP_STEPS": str(max(1, round(steps * 32 / 4900))), "PHASED_TTT_PREFIX_DOCS": "5",
             "MUON_MOMENTUM_WARMUP_STEPS": str(round(steps * 1500 / 4900)),  # the frontier optimizer's run length
             "TTT_CHUNK_TOKENS": "4096",  # as benchmarks/eval_proxy.py: 32768 leaves the phase SGD nothing to train on
             "DATA_PATH": str(data), "TOKENIZER_PATH": str(tokenizer)}
    seed = frontier_proxy.configs(steps)["seed stack"]
    rows = {"baseline": {**seed_stack_proxy.configs(steps)["baseline"], **SHAPE}, "seed stack": {**seed, **SHAPE}}
    env, added = dict(seed), set()
    for title, settings in sections():
        own = {"optimizer and schedule": ("MUON_MOMENTUM_WARMUP_STEPS",),
               "evaluator": ("PHASED_TTT_PREFIX_DOCS", "TTT_CHUNK_TOKENS")}
        added |= {*settings, *own.get(title, ())}  # the knobs the section's proxy values come with (moved)
        env.update(settings)
        rows[f"+ {title}"] = {**env, **SHAPE, **{k: v for k, v in moved.items() if k in added}}
    return rows


def main(argv=None):
    a = row_args(__doc__, argv)
    todo = chosen(configs(a.steps), a.only)  # an unknown --only name ends here, before anything is built
    for variant in ("sp1024", "caseops"):
        ensure_sample(variant)
    rows = run_rows(todo, a.steps, a.seeds)
    print(f"{a.steps} steps, seeds {' '.join(map(str, a.seeds))}; means over the seeds (per seed in brackets)\n"
          "| rung | params | pre-quant val_bpb | round trip | quant gap | final val_bpb | ms/step |\n"
          "|---|---|---|---|---|---|---|")
    for name in todo:
        rs = [r for r in rows if r["name"] == name]
        col = lambda k: f"{statistics.mean(r[k] for r in rs):.4f} ({' '.join(f'{r[k]:.4f}' for r in rs)})"  # noqa: E731
        gap = statistics.mean(r["roundtrip"] - r["averaged"] for r in rs)
        print(f"| {name} | {rs[0]['params']:,} | {col('averaged')} | {col('roundtrip')} | {gap:+.4f} | "
              f"{col('final')} | {statistics.mean(r['ms'] for r in rs):.0f} |")


if __name__ == "__main__":
    main()
