"""One knob changes one thing: every technique of the default preset switches off with its own knob alone, and a
change of any one size knob keeps the defaults valid (layer positions, the length schedule and the evaluation
windows follow the size). Each is checked on the default preset itself, through the trainer's own pipeline."""

import contextlib
import dataclasses
import io
import json

import numpy as np
import pytest
import torch

from conftest import FRONTIER_ENV, SP1024, run_distributed
from helpers import CPU, TINY_DEFAULT, dormant, randomized

import train_gpt
from train_gpt import Hyperparameters

# Each default technique and the value that switches it off, by the stage it changes: training (the trained weights),
# export (the artifact's bytes) or evaluation (the score of one model).
TRAIN_OFFS = [("NUM_LOOPS", "0"), ("PARALLEL_START_LAYER", "0"), ("DOC_PACKING", "0"), ("TRAIN_SEQ_SCHEDULE", ""),
              ("SEQ_CHANGE_WARMUP_STEPS", "0"), ("LOGIT_SOFTCAP_ASYM", "0"), ("ATTN_GATE", "none"),
              ("SMEAR_GATE", "off"), ("SKIP_GATES", "0"), ("UNET_SKIPS", "0"), ("XSA_LAST_N", "0"), ("LN_SCALE", "0"),
              ("MLP_ACT", "relu2"), ("ROPE_DIMS", "0"), ("MUON_ROW_NORM", "0"), ("MUON_NS_COEFFS", "quintic"),
              ("MUON_WD", "0"), ("EMBED_WD", "0"), ("ADAM_WD", "0"), ("GRAD_CLIP_NORM", "0"),
              ("WEIGHT_AVERAGING", "none"), ("MIN_LR", "0"), ("WARMDOWN_FRAC", "0"), ("WARMDOWN_ITERS", "3"),
              ("ORTHO_INIT", "0"), ("TIE_EMBEDDINGS", "0")]
EXPORT_OFFS = [("QUANT_METHOD", "rtn"), ("QUANT_METHOD", "gptq_lite"), ("QUANT_CLIP", "search"), ("GPTQ_EMBED", "0"),
               ("LQER_RANK", "0"), ("AWQ_LITE_GROUPS", "0"), ("QUANT_GATE_BITS", "16"), ("COMPRESSOR", "lzma")]
# MIN_LR floors the warmdown only past 91.5% of training: 12 steps reach it, 4 do not
LONGER = {"MIN_LR": dict(ITERATIONS="12")}
# (EVAL_DOCS shapes the window evaluators, which the default's LoRA TTT replaces: they run as diagnostics)
EVAL_OFFS = [("TTT_ENABLED", "0"), ("NGRAM_TILT_ENABLED", "0"), ("PHASED_TTT_NUM_PHASES", "0"), ("TTT_MODE", "chunks")]
OFFS = TRAIN_OFFS + EXPORT_OFFS + EVAL_OFFS
# The run's length and data knobs for the sample's short validation split (not its size): a few steps, a small
# GPTQ calibration, a TTT phase after 2 of the 4 documents (one a batch) whose SGD chunks they can fill.
RUN = dict(ITERATIONS="4", WARMUP_STEPS="0", TRAIN_LOG_EVERY="0", GPTQ_CALIB_TOKENS="2048", TTT_CHUNK_TOKENS="512",
           TTT_BATCH_SIZE="1", PHASED_TTT_PREFIX_DOCS="2", TTT_SHORT_SCORE_FIRST_STEPS="",
           FP16_MAX_NUMEL="1024", DEVICE="cpu", MAX_WALLCLOCK_SECONDS="0", VOCAB_SIZE="1024", SEED="1234")
SIZE = {k.upper(): str(v) for k, v in TINY_DEFAULT.items() if k.upper() in
        ("NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "TRAIN_SEQ_LEN", "TRAIN_BATCH_TOKENS", "ROPE_DIMS")}
SIZES = [dict(NUM_LAYERS="2"), dict(NUM_LAYERS="4"), dict(NUM_LAYERS="13"), dict(MODEL_DIM="256"),
         dict(TRAIN_SEQ_LEN="1024"), dict(TRAIN_SEQ_LEN="128"), dict(TRAIN_BATCH_TOKENS="393216")]


def test_the_full_size_defaults_derive_the_frontier_preset_written_out():
    """configs/frontier.env writes every derived value out (LOOP_START=3, LOOP_END=5, PARALLEL_START_LAYER=8, the
    1024/2048/3072 schedule, 3072-token windows and stride): the defaults derive exactly those at 11 layers."""
    env = {k: v for k, v in FRONTIER_ENV.items() if k not in ("DATA_PATH", "TOKENIZER_PATH")}
    derived, written = Hyperparameters().knob_values(), Hyperparameters.from_env(env).knob_values()
    assert derived == written
    assert (derived["loop_start"], derived["loop_end"], derived["parallel_start_layer"]) == (3, 5, 8)
    assert derived["train_seq_schedule"] == "1024@0.100,2048@0.700,3072@1.000"
    assert (derived["eval_seq_len"], derived["eval_stride"]) == (3072, 3072)
    assert Hyperparameters().layer_order() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    h = Hyperparameters(num_layers=4, train_seq_len=256, train_batch_tokens=4096)  # the quickstart's shape
    assert (h.loop, h.parallel_from, h.seq_stages) == ((1, 2), 3, [(64, 0.1), (128, 0.7), (256, 1.0)])
    assert Hyperparameters(loop_end=7).parallel_from == 8 and Hyperparameters(loop_end=8).parallel_from == 9
    assert Hyperparameters(num_layers=3).parallel_from == 0  # no layer past the loop: lanes off


@pytest.mark.parametrize("knob, off", OFFS, ids=[f"{k}={v}" for k, v in OFFS])
def test_each_default_technique_switches_off_with_its_own_knob_alone(knob, off):
    """At full size and at a tiny size, nothing else set, the configuration validates (the tests below show each
    switch then changes what it should)."""
    for base in ({}, SIZE):
        Hyperparameters.from_env({**base, knob: off})


@pytest.mark.parametrize("size", SIZES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_each_size_knob_alone_keeps_the_defaults_valid(size):
    h = Hyperparameters.from_env(size)
    assert h.loop[0] <= h.loop[1] < h.num_layers and h.parallel_from < h.num_layers
    assert h.seq_stages[-1][0] == h.train_seq_len and h.stride == h.eval_len == h.train_seq_len


def _setup(short_val_shards, env):
    """The tiny default with env over it, less the RUN knobs env leaves dormant (TTT_BATCH_SIZE with chunked TTT)."""
    given = {**SIZE, **RUN, **env}
    off = dormant({f.name: train_gpt._parse_knob(f.name.upper(), given[f.name.upper()], f.default)
                   for f in dataclasses.fields(Hyperparameters) if f.name.upper() in given})
    given = {k: v for k, v in given.items() if k not in RUN or k in env or k.lower() not in off}
    h = Hyperparameters.from_env({**given, "DATA_PATH": str(short_val_shards), "TOKENIZER_PATH": str(SP1024),
                                  "RUN_ID": "knobs"})
    sp, train_files, val_files = train_gpt.check_inputs(h)
    return h, sp, train_files, val_files, train_gpt.load_validation(h, sp, val_files, torch.device("cpu"))


def _trained(short_val_shards, env) -> dict:
    h, sp, train_files, _, val = _setup(short_val_shards, env)
    torch.manual_seed(h.seed)
    model = train_gpt.GPT(h, sp.bos_id())
    result = train_gpt.train(h, CPU, model, train_gpt.TrainingData(train_files, h.vocab_size), val, lambda m: None)
    train_gpt.apply_average(model, result.averager)
    return model.state_dict()


@pytest.fixture(scope="module")
def default_trained(short_val_shards):
    return _trained(short_val_shards, {})


@pytest.mark.slow  # 26 tiny trainings
@pytest.mark.parametrize("knob, off", TRAIN_OFFS, ids=[f"{k}={v}" for k, v in TRAIN_OFFS])
def test_each_training_technique_off_trains_a_different_model(knob, off, short_val_shards, default_trained):
    if knob in LONGER:  # both runs long enough for the technique to act
        default_trained = _trained(short_val_shards, LONGER[knob])
    sd = _trained(short_val_shards, {knob: off, **LONGER.get(knob, {})})
    shared = sd.keys() & default_trained.keys()
    assert sd.keys() != default_trained.keys() or any(not torch.equal(sd[k], default_trained[k]) for k in shared)


def _exported(short_val_shards, env, tmp_path, monkeypatch) -> bytes:
    h, sp, train_files, _, val = _setup(short_val_shards, env)
    tmp_path.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(tmp_path)
    train_gpt.check_outputs(h)
    torch.manual_seed(0)
    model = randomized(train_gpt.GPT(h, sp.bos_id()))
    loader = train_gpt.DistributedTokenLoader(train_gpt.TrainingData(train_files, h.vocab_size), 0, 1, sp.bos_id())
    with contextlib.redirect_stdout(io.StringIO()):
        ledger = train_gpt.TimeLedger(CPU, lambda m: None)
        hessians = train_gpt.calibrate(h, CPU, model, loader, ledger, sp.bos_id(), lambda m: None)
        train_gpt.export(h, model, hessians, 40_000, lambda m: None)
    return (tmp_path / h.artifact_path).read_bytes()


@pytest.mark.slow  # 9 tiny exports with GPTQ calibration
@pytest.mark.parametrize("knob, off", EXPORT_OFFS, ids=[f"{k}={v}" for k, v in EXPORT_OFFS])
def test_each_export_technique_off_writes_a_different_artifact(knob, off, short_val_shards, tmp_path, monkeypatch):
    base = _exported(short_val_shards, {}, tmp_path / "a", monkeypatch)
    assert _exported(short_val_shards, {knob: off}, tmp_path / "b", monkeypatch) != base


def _score(short_val_shards, env) -> float:
    h, sp, _, _, val = _setup(short_val_shards, env)
    train_gpt.check_ttt_phases(h, val)
    torch.manual_seed(0)
    model = randomized(train_gpt.GPT(h, sp.bos_id(), qat=False))
    hints = train_gpt.ngram_hints(val.tokens, h.token_order, h.token_threshold) if h.ngram_tilt_enabled else None
    e = train_gpt.eval_plan(h)[-1]
    return train_gpt.begin_evaluator(h, CPU, e, (model, model, model), val, hints, lambda m: None)().val_bpb


@pytest.mark.slow  # 6 tiny evaluations, LoRA TTT among them
@pytest.mark.parametrize("knob, off", EVAL_OFFS, ids=[f"{k}={v}" for k, v in EVAL_OFFS])
def test_each_evaluation_technique_off_scores_differently(knob, off, short_val_shards, default_score):
    assert _score(short_val_shards, {knob: off}) != default_score


@pytest.fixture(scope="module")
def default_score(short_val_shards):
    return _score(short_val_shards, {})


def _whole_run(short_val_shards, env, tmp_path, monkeypatch) -> dict:
    """The trainer's own run(): train, export, score, summary, in-process at a tiny size."""
    h, sp, train_files, val_files, val = _setup(short_val_shards, env)
    train_gpt.check_ttt_phases(h, val)
    monkeypatch.chdir(tmp_path)
    train_gpt.check_outputs(h)
    with contextlib.redirect_stdout(io.StringIO()):
        train_gpt.run(h, CPU, sp, train_files, val_files, val)
    return json.loads((tmp_path / "logs" / "knobs.json").read_text())


@pytest.mark.slow  # a tiny whole run for each size change
@pytest.mark.parametrize("size", [dict(NUM_LAYERS="2"), dict(NUM_LAYERS="13"), dict(MODEL_DIM="128"),
                                  dict(TRAIN_SEQ_LEN="128"), dict(TRAIN_BATCH_TOKENS="4096")],
                         ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_a_tiny_run_of_each_size_change_trains_and_scores(size, short_val_shards, tmp_path, monkeypatch):
    summary = _whole_run(short_val_shards, size, tmp_path, monkeypatch)
    assert summary["score"]["source"] == "legal_ttt_exact" and np.isfinite(summary["score"]["val_bpb"])
    (knob, value), = size.items()
    assert summary["config"][knob.lower()] == int(value)


def _rank_run(rank, world_size, short_val_shards, tmp_path):
    from train_gpt import Dist

    h, sp, train_files, val_files, val = _setup(short_val_shards, {})
    h = dataclasses.replace(h, run_id="knobs2")
    d = Dist(rank, world_size, rank, torch.device("cpu"))
    import os

    os.chdir(tmp_path)
    train_gpt.check_outputs(h)
    with contextlib.redirect_stdout(io.StringIO()):
        train_gpt.run(h, d, sp, train_files, val_files, val)
    return json.loads((tmp_path / "logs" / "knobs2.json").read_text())["score"] if rank == 0 else None


@pytest.mark.slow  # two ranks over gloo
def test_a_tiny_run_on_two_ranks_trains_and_scores(short_val_shards, tmp_path):
    score = run_distributed(_rank_run, 2, short_val_shards, tmp_path)[0]
    assert score["source"] == "legal_ttt_exact" and np.isfinite(score["val_bpb"])
