"""The script as users run it: `python3 train_gpt.py` and `torchrun --nproc_per_node=2` (gloo on CPU)."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, SEED_STACK_ENV, SP1024, STEP_LINE, TINY_ENV

import train_gpt

SCRIPT = ROOT / "train_gpt.py"
pytestmark = pytest.mark.slow  # every test here reads the whole-script runs of the `runs` fixture


def run_script(cwd, shards, nproc=1, **env):
    env = {**os.environ, **TINY_ENV, "DATA_PATH": str(shards), "TOKENIZER_PATH": str(SP1024), "RUN_ID": "e2e", **env}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    r = subprocess.run([*launcher, str(SCRIPT)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def field(text, line_start, key):
    line = next(l for l in text.splitlines() if l.startswith(line_start))
    return re.search(rf"\b{key}:(\S+)", line).group(1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, short_val_shards):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    # every evaluator runs; TTT in 4 chunks of the short validation data (3,968 scored tokens)
    env = dict(EVAL_STRIDE="32", TTT_ENABLED="1", TTT_MODE="chunks", TTT_CHUNK_TOKENS="1024")
    return (one, run_script(one, short_val_shards, **env)), (two, run_script(two, short_val_shards, nproc=2, **env))


def test_single_process_run_reports_a_checked_artifact_and_score(runs):
    (cwd, out), _ = runs
    log = (cwd / "logs" / "e2e.txt").read_text()
    assert log.startswith(SCRIPT.read_text())  # the exact source heads the log file, and only the file
    assert "def main()" not in out and all(l in log for l in out.splitlines() if l != "logs/e2e.txt")
    assert "world_size:1 grad_accum_steps:8" in out and "hparam num_layers:2" in out
    assert ("features unet_skips:1 skip_gates:0 smear_gate:static bigram:256x32 xsa_layers:0,1 rope_dims:8/16 "
            "rope_base:10000.0 ln_scale:1 attn_gate:none value_embed:32@1 mlp:leaky_relu2x3.0 leaky_slope:0.5 ortho_init:1 "
            "logit_softcap:30.0 loops:off parallel_from:off doc_packing:0 train_seq:64@1.0") in out
    assert int(field(out, "val_data", "tokens")) > 0 and int(field(out, "val_data", "bytes")) > 0
    assert "device:cpu compile:0 autocast:off attention:sdpa" in out
    assert float(field(out, "model_flops", "matmul")) > 0 and float(field(out, "train_throughput", "tokens_per_s")) > 0
    assert "mfu_vs_h100" not in out  # MFU is printed on CUDA only
    steps = [l for l in out.splitlines() if l.startswith("step:")]
    assert len(steps) == 9 and all(STEP_LINE.match(l) for l in steps)
    code, model, total = (int(field(out, "artifact", k)) for k in ("code_bytes", "model_bytes", "total_bytes"))
    assert code == SCRIPT.stat().st_size and model == (cwd / "final_model.ptz").stat().st_size
    assert total == code + model and field(out, "artifact", "fits") == "1"
    for line in (f"Serialized model int6+lzma: {model} bytes", f"Code size: {code} bytes",
                 f"Total submission size int6+lzma: {total} bytes",
                 "averaging:ema decay:0.997 warmup:1 updates:6 applied"):
        assert line in out
    assert int(field(out, "gptq:calibration source:train", "tokens")) == 2048
    final = float(field(out, "final_int6_roundtrip_exact", "val_bpb"))
    averaged = float(field(out, "averaged_weights", "val_bpb"))
    assert math.isfinite(final) and abs(final - averaged) < 0.02  # int6 GPTQ barely moves a tiny model


def test_evaluators_and_the_official_score_line(runs):
    (_, out), _ = runs
    lines = out.splitlines()
    assert "final_eval_mode:sliding_window seq_len:64 stride:32 batch_seqs:32 windows:" in out
    counts = f"tokens:{field(out, 'val_data', 'tokens')} bytes:{field(out, 'val_data', 'bytes')}"
    assert re.search(rf"^final_int6_sliding_window val_loss:\S+ val_bpb:\S+ stride:32 eval_time:\d+ms {counts}$",
                     out, re.M)
    for name in ("averaged_weights", "final_int6_roundtrip", "legal_ttt"):  # each scored all of val_data
        assert re.search(rf"^{name} val_loss:\S+ val_bpb:\S+ eval_time:\d+ms {counts}$", out, re.M), name
    assert "ttt_sliding:start chunks=" in out and "ttt_sliding:params unfrozen=" in out
    scores = [l for l in lines if "val_bpb" in l and l.split()[0].endswith("_exact")]
    assert [l.split()[0] for l in scores] == ["final_int6_roundtrip_exact", "final_int6_sliding_window_exact",
                                              "legal_ttt_exact", "final_int8_zlib_roundtrip_exact"]
    assert scores[-1].split()[1:] == scores[-2].split()[1:]  # the closing line carries the TTT score
    assert lines[lines.index(scores[-1]) - 1].startswith("official_score source:legal_ttt_exact")


def test_time_ledger_and_the_training_data_gate(runs):
    (_, out), _ = runs
    lines = out.splitlines()
    phases = [re.match(r"time_ledger phase:(\w+) ms:(\d+) charged_to:(\w+)$", l) for l in lines]
    phases = [(m[1], int(m[2]), m[3]) for m in phases if m]
    assert phases[2:5] == [("train_loop", phases[2][1], "train"), ("averaging", phases[3][1], "train"),
                           ("gptq_calibration", phases[4][1], "train")]
    # the rulings the records followed: export, loading and the diagnostics outside both clocks (docs/evaluation.md)
    assert [(p, c) for p, _, c in phases[:2] + phases[5:]] == [
        ("compile_warmup", "none"), ("periodic_validation", "none"), ("diagnostic_eval", "none"), ("export", "none"),
        ("load_artifact", "none"), ("roundtrip_eval", "none"), ("sliding_window_eval", "none"), ("ttt_eval", "eval")]
    charged = {b: sum(ms for _, ms, c in phases if c == b) for b in ("train", "eval", "none")}
    summary = next(l for l in lines if l.startswith("time_ledger train:"))
    for budget, key in (("train", "train"), ("eval", "eval"), ("none", "not_charged")):
        assert abs(int(field(summary, "time_ledger", key).removesuffix("ms")) - charged[budget]) <= 6
    assert charged["train"] >= int(field(out, "gptq:calibration", "train_time_total").removesuffix("ms")) - 2
    closed = lines.index(next(l for l in lines if l.startswith("training_data:closed tokens_read:")))
    assert lines.index(next(l for l in lines if l.startswith("gptq:calibration"))) < closed
    assert closed < lines.index(next(l for l in lines if l.startswith("averaged_weights")))
    assert "OVER_BUDGET" not in out


def test_two_processes_match_one_process(runs):
    (_, one), (cwd, two) = runs
    assert "world_size:2 grad_accum_steps:4" in two and (cwd / "logs" / "e2e.txt").exists()
    for line in ("step:6/6 val_loss", "averaged_weights", "final_int6_roundtrip_exact",
                 "final_int6_sliding_window_exact", "legal_ttt_exact"):
        a, b = float(field(one, line, "val_loss")), float(field(two, line, "val_loss"))
        assert abs(a - b) <= 1e-5 * a  # same global batch; only float summation order differs
    assert field(one, "val_data", "bytes") == field(two, "val_data", "bytes")


def test_run_summary_reproduces_the_configuration_and_the_score(runs):
    (cwd, out), _ = runs
    s = json.loads((cwd / "logs" / "e2e.json").read_text())
    h = train_gpt.Hyperparameters.from_env({**s["env"], "SEED": str(s["seed"]), "RUN_ID": s["run_id"]})
    assert h.knob_values() == s["config"]  # the env of the summary parses back into exactly the configuration
    assert s["env"]["TTT_MODE"] == "chunks" and s["config"]["ttt_enabled"] and s["seed"] == 1234  # set by the test
    assert s["env"]["VOCAB_SIZE"] == "1024" and "TTT_ENABLED" not in s["env"] and s["world_size"] == 1  # TTT: default
    assert s["score"]["source"] == "legal_ttt_exact"
    assert f"{s['score']['val_bpb']:.8f}" == field(out, "final_int8_zlib_roundtrip_exact", "val_bpb")
    assert s["artifact"]["model_bytes"] == (cwd / "final_model.ptz").stat().st_size
    assert s["code"]["counted"] == "source" and s["code"]["counted_bytes"] == SCRIPT.stat().st_size
    assert set(s["stages"]) == {"pre_quant_raw", "averaged", "roundtrip", "sliding_window", "doc_window", "legal_ttt"}
    assert abs(s["train_ms"] - float(field(out, "time_ledger train", "train").removesuffix("ms"))) < 1


def test_each_run_keeps_its_artifact_and_final_model_is_the_latest(runs):
    (cwd, out), _ = runs
    kept = (cwd / "logs" / "e2e.ptz").read_bytes()
    assert kept == (cwd / "final_model.ptz").read_bytes()  # the latest run's, as the official scripts name it
    assert int(field(out, "artifact", "model_bytes")) == len(kept)
    assert not [p for p in cwd.rglob("*") if ".tmp" in p.name]  # every write was atomic


TINY_SEED_STACK = {k: v for k, v in SEED_STACK_ENV.items() if k not in ("DATA_PATH", "TOKENIZER_PATH")}


@pytest.mark.slow
def test_two_layers_with_every_other_model_default_trains_exports_and_scores(tmp_path, short_val_shards):
    """The seed stack: a change of depth needs no second knob (VE_LAYERS=-2,-1 follows the depth; the frontier's
    loop and lane indices are absolute, as the records'). Only the run's length and batch (one step, the smallest
    batch of 2048-token sequences), its calibration (one sequence) and its validation data (one sequence) are
    shrunk to CPU size; every technique, width and export knob keeps the preset's value."""
    env = {**{k: v for k, v in os.environ.items() if k not in TINY_ENV}, **TINY_SEED_STACK, "NUM_LAYERS": "2",
           "DATA_PATH": str(short_val_shards), "TOKENIZER_PATH": str(SP1024), "RUN_ID": "two", "DEVICE": "cpu",
           "ITERATIONS": "1", "WARMUP_STEPS": "0", "MAX_WALLCLOCK_SECONDS": "0", "TRAIN_BATCH_TOKENS": "16384",
           "VAL_BATCH_SIZE": "65536", "EVAL_STRIDE": "2048", "GPTQ_CALIB_TOKENS": "2048", "VAL_LOSS_EVERY": "0"}
    r = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "value_embed:128@0,1" in r.stdout and "hparam model_dim:512" in r.stdout
    assert field(r.stdout, "artifact", "fits") == "1"
    assert math.isfinite(float(field(r.stdout, "final_int8_zlib_roundtrip_exact", "val_bpb")))


# configs/frontier.env at a tiny size: its layer indices, schedule and calibration moved to 4 layers of d=64 and
# 256-token micro-batches, its evaluator to 64-token windows, one-document batches and a 2-document phase (the
# short validation data has 4 documents), on the sp1024 sample
FRONTIER_TINY = dict(NUM_LAYERS="4", MODEL_DIM="64", LOOP_START="1", LOOP_END="2", PARALLEL_START_LAYER="3",
                     TRAIN_SEQ_LEN="64", TRAIN_SEQ_SCHEDULE="16@0.100,32@0.700,64@1.000", SEQ_CHANGE_WARMUP_STEPS="2",
                     ITERATIONS="10", WARMUP_STEPS="1", GPTQ_CALIB_TOKENS="2048", VAL_LOSS_EVERY="0", VOCAB_SIZE="1024",
                     AWQ_LITE_GROUP_SIZE="16", EVAL_SEQ_LEN="64", EVAL_STRIDE="64", TTT_LORA_RANK="4",
                     TTT_BATCH_SIZE="1", PHASED_TTT_PREFIX_DOCS="2", TTT_CHUNK_TOKENS="1024",
                     TTT_SHORT_SCORE_FIRST_STEPS="1000:32")


def test_the_frontier_preset_runs_end_to_end_at_a_tiny_size(tmp_path, short_val_shards):
    """Every frontier technique acts in one whole run: the loop switch, the length switches, packing, the
    quantizer extras and the rANS artifact, read back and scored."""
    from conftest import FRONTIER_ENV

    env = {k: v for k, v in FRONTIER_ENV.items() if k not in ("DATA_PATH", "TOKENIZER_PATH")}
    out = run_script(tmp_path, short_val_shards, **{**env, **FRONTIER_TINY, "EVAL_DIAGNOSTICS": "0",
                                                    "BIGRAM_DIM": "0", "VE_DIM": "0"})  # the tiny seed stack's: off
    assert "layer_loop:enabled step:4 frac:0.400 order:0,1,2,1,2,1,2,3" in out  # the first step at or after 0.35
    assert "seq_len_switch step:2 seq_len:32" in out and "seq_len_switch step:8 seq_len:64" in out  # f inclusive
    assert "doc_packing:1" in out and "loops:1-2x2@0.35 parallel_from:3" in out
    assert re.search(r"^quantization method:gptq .*clip:sdclip.* extras:gptq_embed\+gate_int8\+lqer_r2_top4_g32\+"
                     r"awq1x16_int8", out, re.M)
    assert "Serialized model int6+rans:" in out and re.search(r"^final_int8_zlib_roundtrip_exact val_loss:\S+ "
                                                              r"val_bpb:\S+$", out, re.M)
    assert re.search(r"^eval_projection 8xH100 ngram_hints:\d+s legal_ttt:\d+s total:", out, re.M)
    assert re.search(r"^ngram_tilt order:16 threshold:0.8 boost:2.625 hinted:\d+/\d+", out, re.M)
    # no diagnostics by default: the score's evaluator alone, in the evaluation clock with the hints
    assert not re.search(r"^(step:10/10 val_loss|averaged_weights|final_int6_(roundtrip|doc_window))", out, re.M)
    charged = re.findall(r"^time_ledger phase:(\w+) ms:\d+ charged_to:eval$", out, re.M)
    assert charged == ["ngram_hints", "ttt_eval"] and "OVER_BUDGET" not in out
    assert "ttt_lora:start" in out and "lora_ttt phase [1/2] batches:2 docs_scored:2" in out
    assert re.search(r"^  lora_ttt phase \[1/2\] .* sgd_docs:2 sgd_tokens:\d+$", out, re.M)  # the pause's SGD
    assert "official_score source:legal_ttt_exact" in out
