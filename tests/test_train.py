"""The training loop in-process: determinism, the compile warm-up restore, the wall-clock cap, and an
evaluation that scores every validation token exactly once on any number of ranks."""

import math

import pytest
import torch
from conftest import SP1024, STEP_LINE, run_distributed, tiny_h
from helpers import tiny_default_h

import train_gpt
from train_gpt import Dist

CPU = Dist(0, 1, 0, torch.device("cpu"))


def _setup(shards, d=CPU, **overrides):
    h = tiny_h(data_path=str(shards), tokenizer_path=str(SP1024), **overrides)
    sp, train_files, val_files = train_gpt.check_inputs(h)
    torch.manual_seed(h.seed)
    data = train_gpt.TrainingData(train_files, h.vocab_size)
    return h, train_gpt.GPT(h), data, train_gpt.load_validation(h, sp, val_files, d.device)


def _train(shards, **overrides):
    h, model, data, val = _setup(shards, **overrides)
    lines = []
    result = train_gpt.train(h, CPU, model, data, val, lines.append)
    return result, lines, model


@pytest.mark.slow  # over 5 s on 2 CPU cores (four training runs)
def test_same_seed_same_run_and_warmup_is_undone(short_val_shards):
    a, lines, model = _train(short_val_shards, warmup_steps=0)
    b, _, _ = _train(short_val_shards, warmup_steps=0)
    c, warm_lines, _ = _train(short_val_shards, warmup_steps=3)
    assert a.final.val_loss == b.final.val_loss  # bit-identical
    # three real optimizer steps ran and were rolled back: weights, optimizer state and data position
    assert [l for l in warm_lines if l.startswith("warmup_step")] == ["warmup_step:1/3", "warmup_step:2/3",
                                                                    "warmup_step:3/3"]
    assert c.final.val_loss == a.final.val_loss
    d, _, _ = _train(short_val_shards, warmup_steps=0, seed=99)
    assert d.final.val_loss != a.final.val_loss
    # it learned something: 0.3 nats below its own untrained validation loss (step 0; measured 6.93 -> 6.32). The
    # unigram baseline of the training shards (6.10 nats on this validation data) is out of reach in 6 steps.
    untrained = float(next(l for l in lines if l.startswith("step:0/6 val_loss:")).split("val_loss:")[1].split()[0])
    assert a.steps == 6 and untrained > math.log(1024) - 0.05 and a.final.val_loss < untrained - 0.3


def test_log_lines(sample_shards):
    result, lines, _ = _train(sample_shards)
    train_lines = [l for l in lines if "train_loss" in l]
    val_lines = [l for l in lines if "val_loss" in l]
    assert [l.split()[0] for l in train_lines] == [f"step:{i}/6" for i in range(1, 7)]
    assert [l.split()[0] for l in val_lines] == ["step:0/6", "step:3/6", "step:6/6"]
    assert all(STEP_LINE.match(l) for l in train_lines + val_lines)


def test_wallclock_cap_stops_training(sample_shards):
    result, lines, _ = _train(sample_shards, iterations=10_000, max_wallclock_seconds=0.5, warmup_steps=0,
                              quant_method="rtn")  # no calibration reserve
    stop = [l for l in lines if l.startswith("stopping_early: wallclock_cap")]
    assert len(stop) == 1 and result.steps < 10_000 and result.train_ms >= 500
    assert lines[-1].startswith(f"step:{result.steps}/10000 val_loss:")
    assert f"step:{result.steps}/10000" in stop[0]


def _eval_rank(rank, world_size, shards):
    d = Dist(rank, world_size, 0, torch.device("cpu"))
    h, model, _, val = _setup(shards, d)
    r = train_gpt.eval_val(h, d, model, val)
    return r.val_loss, r.val_bpb, r.tokens, r.bytes, val.num_targets, val.byte_count


@pytest.mark.slow  # over 5 s on 2 CPU cores (two gloo ranks)
def test_eval_scores_every_token_once_on_one_and_two_ranks(sample_shards):
    one = _eval_rank(0, 1, sample_shards)
    loss, bpb, tokens, nbytes, num_targets, byte_count = one
    assert tokens == num_targets and nbytes == byte_count
    assert math.isclose(bpb, loss / math.log(2) * tokens / nbytes, rel_tol=1e-12)
    for two in run_distributed(_eval_rank, 2, sample_shards):
        assert two[2:] == one[2:]  # the same tokens and bytes, split across ranks
        assert math.isclose(two[0], loss, rel_tol=1e-6) and math.isclose(two[1], bpb, rel_tol=1e-6)


FRONTIER_OFF = dict(muon_row_norm=False, muon_ns_coeffs="quintic", muon_wd_taper_start=0.0, min_lr=0.0,
                    warmdown_frac=0.0, embed_wd=0.04)  # embed_wd = ADAM_WD's default: the tables decay as before


def _schedule(shards, monkeypatch, **knobs):
    """(lr scale, Muon momentum, Muon WD scale) of every optimizer step of a 4-step run of the tiny default preset."""
    h = tiny_default_h(data_path=str(shards), tokenizer_path=str(SP1024), iterations=4, warmup_steps=0,
                       val_loss_every=0, seq_change_warmup_steps=2, **knobs)
    sp, train_files, val_files = train_gpt.check_inputs(h)
    torch.manual_seed(h.seed)
    calls, step = [], train_gpt.Optimizers.step
    monkeypatch.setattr(train_gpt.Optimizers, "step", lambda self, *a: calls.append(a) or step(self, *a))
    train_gpt.train(h, CPU, train_gpt.GPT(h, sp.bos_id()), train_gpt.TrainingData(train_files, h.vocab_size),
                    train_gpt.load_validation(h, sp, val_files, CPU.device), lambda line: None)
    return calls


# By hand, at fractions 0, 1/4, 1/2, 3/4 of 4 steps: the derived schedule 16@0.1,32@0.7,64@1 switches the context
# at steps 1 and 3, whose LR ramp (SEQ_CHANGE_WARMUP_STEPS=2) halves each; the momentum warms up from 0.92 over
# 1,500 steps.
RAMP = [1, 0.5, 1, 0.5]
MOMENTUM = [0.92 + 0.05 * s / 1500 for s in range(4)]
EXPECTED = {
    "frontier_off": ([1.0 * r for r in RAMP], [1.0] * 4),
    "defaults": ([max(min(1.0, (1 - s / 4) / 0.85), 0.1) * r for s, r in enumerate(RAMP)], [1.0] * 4),  # PR #1394
    "taper": ([1.0 * r for r in RAMP], [1.0, 1.0, 1.0, 1 + (0.25 - 1) * (0.75 - 0.5) / 0.5]),  # PR #1729
}


@pytest.mark.parametrize("case", EXPECTED)
def test_the_training_loop_applies_each_schedule_knob_as_written(case, short_val_shards, monkeypatch):
    """On the default preset: WARMDOWN_FRAC and MIN_LR shape the LR, the Muon WD taper the WD, the length switch its
    ramp, each by its formula (EXPECTED, by hand), and with the frontier knobs off the LR stays 1 but for the ramp.
    Control: a loop that forgets the ramp fails the same comparison."""
    knobs = {"frontier_off": FRONTIER_OFF, "defaults": {},
             "taper": dict(FRONTIER_OFF, muon_wd_taper_start=0.5, muon_wd_taper_factor=0.25)}[case]
    calls = _schedule(short_val_shards, monkeypatch, **knobs)
    lrs, wds = EXPECTED[case]
    assert [c[0] for c in calls] == pytest.approx(lrs) and [c[2] for c in calls] == pytest.approx(wds)
    assert [c[1] for c in calls] == pytest.approx(MOMENTUM)
    if case == "defaults":
        monkeypatch.setattr(train_gpt, "seq_ramp", lambda *a: 1.0)
        assert [c[0] for c in _schedule(short_val_shards, monkeypatch)] != pytest.approx(lrs)
