"""The budget on paper in docs/speed-path.md: every number of its training table is the arithmetic of
train_gpt's FLOP count for the defaults at the MFU PR #1019 reached, and the defaults are the frontier preset."""

import re
import sys

import pytest
from conftest import FRONTIER_ENV, ROOT, SEED_STACK_ENV

import train_gpt as tg

DOC = (ROOT / "docs" / "speed-path.md").read_text()
ROW = re.compile(r"^\| (\d\.\d\d)–(\d\.\d\d) \| (\d+) \| (plain|looped) \((\d+) layers\) \| (\S+) \+ (\S+) \| "
                 r"(\S+) \| (\S+) \|$", re.M)


def test_the_defaults_are_the_frontier_preset_and_the_presets_keep_their_counts():
    h = tg.Hyperparameters()
    assert h.knob_values() == tg.Hyperparameters.from_env(FRONTIER_ENV).knob_values()  # derived = written out
    for env, count in (({}, 35_945_673), (SEED_STACK_ENV, 27_067_484)):
        model = tg.GPT(tg.Hyperparameters.from_env(env))
        assert sum(p.numel() for p in model.parameters()) == count


def test_the_docs_training_budget_is_the_flop_count_at_pr_1019s_mfu():
    h, seed = tg.Hyperparameters(), tg.Hyperparameters.from_env(SEED_STACK_ENV)
    peak = 8 * tg.H100_BF16_FLOPS
    mfu = 3 * sum(tg.forward_flops_per_token(seed, seed.train_seq_len)) * seed.train_batch_tokens / 0.0867 / peak
    assert f"(PR #1019: {mfu:.1%})" in DOC
    rows = ROW.findall(DOC)
    cuts = sorted({0.0, h.enable_looping_at, *(f for _, f in h.seq_stages)})
    assert [(float(a), float(b)) for a, b, *_ in rows] == list(zip(cuts, cuts[1:]))
    per_ms = 0.0
    for (lo, hi, n, kind, layers, mm, att, pflop, ms), a, b in zip(rows, cuts, cuts[1:]):
        looped = tg.looping_at(h, a)
        assert (int(n), kind == "looped", int(layers)) == (tg.seq_len_at(h, b), looped, len(h.layer_order(looped)))
        fm, fa = tg.forward_flops_per_token(h, int(n), looped)
        assert (float(mm), float(att)) == (pytest.approx(fm, rel=5e-4), pytest.approx(fa, rel=5e-4))
        step = 3 * (fm + fa) * h.train_batch_tokens
        assert float(pflop) == pytest.approx(step / 1e15, abs=5e-4)
        assert float(ms) == pytest.approx(step / (mfu * peak) * 1000, abs=0.05)
        per_ms += (b - a) / (step / (mfu * peak) * 1000)
    assert f"A time-weighted {1 / per_ms:.1f} ms/step" in DOC
    steps = h.loop_cap_ms * per_ms
    assert 4_200 < steps < 4_300 and "about 4,250 steps in the 592 s" in DOC


def test_the_ladder_climbs_from_the_seed_stack_to_the_default_preset_section_by_section():
    """benchmarks/ladder.py: each rung adds one section of configs/frontier.env (plus the proxy's moved indices and
    lengths), every rung is a valid configuration, and the last is the default at the proxy's size."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ladder

    rows, sections = ladder.configs(300), ladder.sections()
    assert [t for t, _ in sections] == ["vocabulary and CaseOps data", "model", "training context",
                                        "optimizer and schedule", "quantizer", "evaluator"]
    assert list(rows) == ["baseline", "seed stack", *(f"+ {t}" for t, _ in sections)]
    assert {k for _, s in sections for k in s} == set(FRONTIER_ENV)
    moved = {*ladder.SHAPE, "DATA_PATH", "TOKENIZER_PATH", "MUON_MOMENTUM_WARMUP_STEPS", "PHASED_TTT_PREFIX_DOCS",
             "TTT_CHUNK_TOKENS", "SEQ_CHANGE_WARMUP_STEPS", "LOOP_START", "LOOP_END", "PARALLEL_START_LAYER",
             "TRAIN_SEQ_SCHEDULE", "EVAL_SEQ_LEN", "EVAL_STRIDE"}
    names = list(rows)
    for (title, settings), before, after in zip(sections, names[1:], names[2:]):
        changed = {k for k in {*rows[before], *rows[after]} if rows[before].get(k) != rows[after].get(k)}
        assert changed - moved <= set(settings) and {k for k in settings if k not in moved} <= set(rows[after]), title
        assert all(rows[after][k] == v for k, v in settings.items() if k not in moved), title
    for env in rows.values():
        tg.Hyperparameters.from_env(env)  # each rung is a configuration train_gpt accepts
    assert tg.Hyperparameters.from_env(rows["+ evaluator"]).ttt_mode == "lora"
