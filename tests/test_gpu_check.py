"""benchmarks/gpu_check.py on CPU: its arguments, the one-line refusal without CUDA, the FlashAttention 3 check
against SDPA stand-ins (a right and a wrong one), and every check run end to end on a tiny model (CPU, the
eager dynamo backend, train_gpt.py in a subprocess) for the JSON it writes."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from conftest import ROOT, SP1024, TINY_ENV, tiny_h

import train_gpt

spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)

CPU = train_gpt.Dist(0, 1, 0, torch.device("cpu"))
SMALL_ATTENTION = dict(batch=2, seq_len=128, heads=8, kv_heads=4, head_dim=64)  # the record's heads, shorter
TINY_PIPELINE = {**TINY_ENV, "ITERATIONS": "2", "WARMUP_STEPS": "0", "VAL_LOSS_EVERY": "0", "EVAL_STRIDE": "32",
                 "RUN_ID": "gpu_check"}


def sdpa_standin(returns_tuple: bool = False, causal_inside: bool = True):
    """FA3's calling convention, (B, T, H, D) bf16 in and out, computed by SDPA in fp32 (as in
    test_speed_path.py); causal_inside=False is a wrong kernel that ignores the causal flag."""

    def flash_attn_func(q, k, v, causal=False, softmax_scale=None):
        assert q.dtype == k.dtype == v.dtype == torch.bfloat16 and causal and softmax_scale is None
        out = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)),
                                             is_causal=causal_inside, enable_gqa=True).transpose(1, 2).bfloat16()
        return (out, None) if returns_tuple else out

    return flash_attn_func


# ---------------------------------------------------------------------------------------------------- arguments


def test_arguments_defaults():
    args = gpu_check.parse_args([])
    assert (args.out, args.steps, args.skip_pipeline, args.timeout) == ("gpu_check.json", 20, False, 480)
    args = gpu_check.parse_args(["--steps", "25", "--skip-pipeline", "--timeout", "600", "--out", "x.json"])
    assert (args.out, args.steps, args.skip_pipeline, args.timeout) == ("x.json", 25, True, 600)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "19"], "--steps 19: must be in [20, 1000]"),
    (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["--timeout", "10"], "--timeout 10: must be in [60, 7200] seconds"),
    (["--out", "no/such/dir/report.json"], "the directory 'no/such/dir' does not exist"),
    (["--out", "."], "must be a file path, not a directory"),
    (["--verbose"], "unrecognized arguments: --verbose"),
])
def test_bad_arguments_exit_2_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err.splitlines()[-1]


def test_without_cuda_it_says_so_in_one_line_and_exits_2(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "r.json")],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check.py: error: no CUDA device"), r.stderr
    assert not (tmp_path / "r.json").exists()


# ---------------------------------------------------------------------------------------------------- FA3 check


@pytest.mark.parametrize("returns_tuple", [False, True])
def test_attention_check_passes_an_sdpa_standin(returns_tuple):
    r = gpu_check.compare_attention(sdpa_standin(returns_tuple), torch.device("cpu"), **SMALL_ATTENTION)
    assert r["ok"] and r["error"] is None, r
    assert set(r["tensors"]) == {"out", "dq", "dk", "dv"}
    for t in r["tensors"].values():
        assert t["ok"] and 0 <= t["max_abs_err"] <= t["tolerance"] and t["sdpa_bf16_max_abs_err"] > 0
    assert r["max_abs_err"] == r["tensors"]["out"]["max_abs_err"] and r["shape"] == SMALL_ATTENTION


def test_attention_check_fails_a_wrong_kernel():
    r = gpu_check.compare_attention(sdpa_standin(causal_inside=False), torch.device("cpu"), **SMALL_ATTENTION)
    assert not r["ok"] and r["max_abs_err"] > 10 * r["tolerance"]

    def refuses(q, k, v, causal=False):
        raise RuntimeError("FlashAttention only supports Hopper GPUs")

    r = gpu_check.compare_attention(refuses, torch.device("cpu"), **SMALL_ATTENTION)
    assert not r["ok"] and "Hopper" in r["error"]


# ---------------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory, sample_texts):
    """Few documents, so the tiny pipeline's three evaluations take a moment: 3 validation, 20 training."""
    from build_shards import write_shard

    sp = spm.SentencePieceProcessor(model_file=str(SP1024))
    out = tmp_path_factory.mktemp("gpu_check_shards")
    for name, texts in (("val", sample_texts[:3]), ("train", sample_texts[100:120])):
        tokens = np.concatenate([[sp.bos_id()] + sp.encode(t) for t in texts]).astype(np.uint16)
        write_shard(out / f"fineweb_{name}_000000.bin", tokens)
    return out


def test_every_check_on_cpu_writes_the_report(tiny_shards, tmp_path):
    """The whole check on a tiny model: the FA3 stand-in passes, the timed steps recompile nothing, the
    pipeline's ledger, score and artifact are parsed from train_gpt.py's own log, and the report is JSON."""
    args = gpu_check.parse_args(["--out", str(tmp_path / "r.json")])
    args.steps = 4  # below the argument's minimum of 20, to keep the test short
    workdir = tmp_path / "run"
    workdir.mkdir()
    report = gpu_check.collect(args, CPU, tiny_shards, workdir, tmp_path / "r.pipeline.log", sdpa_standin(),
                               attention_shape=SMALL_ATTENTION, h=tiny_h(), pipeline_overrides=TINY_PIPELINE,
                               backend=None, log=lambda m: None, tokenizer=SP1024)
    report = json.loads(json.dumps(report))  # what --out holds
    assert set(report) == {"format", "date", "ok", "problems", "notes", "args", "environment", "attention_check",
                           "training_step", "pipeline", "elapsed_s"}
    assert report["format"] == "parameter-golf-gpu-check/1"
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["gpu_count"] == 0 and env["fa3"]["importable"] is False
    # no FlashAttention 3 here: the one problem; everything else passed
    assert len(report["problems"]) == 1 and "FlashAttention 3 does not import" in report["problems"][0]
    assert not report["ok"]
    assert report["attention_check"]["ok"]

    step = report["training_step"]
    assert step["error"] is None, step["error"]
    assert (step["world_size"], step["micro_steps_per_step"], step["timed_micro_steps"]) == (1, 8, 32)
    assert step["tokens_per_micro_step"] == 2048 // 8 and step["seqs_per_micro_step"] == 4
    assert 0 < step["micro_step_ms"] and 0 < step["optimizer_step_ms"] and step["qat_on_from_timed_step"] == 3
    assert step["projected_8x_step_ms"] == pytest.approx(step["micro_step_ms"] + step["optimizer_step_ms"])
    h = tiny_h()
    assert step["loop_budget_s"] == 600 and step["projected_steps_in_budget"] == int(600_000 // step["projected_8x_step_ms"])
    mm, att = train_gpt.forward_flops_per_token(h, h.train_seq_len)
    assert step["flops_per_micro_step"] == 3 * (mm + att) * 256
    assert step["mfu_vs_h100_bf16"] == pytest.approx(
        step["flops_per_micro_step"] / (step["micro_step_ms"] / 1000) / train_gpt.H100_BF16_FLOPS)
    assert step["compile_backend"] is None and step["dynamo"] == {  # not compiled here (see the test below)
        "graphs_after_warmup": 0, "frames_after_warmup": 0, "recompiles_after_warmup": 0, "new_graphs_after_warmup": 0,
        "graph_breaks": 0, "graph_break_reasons": []}
    assert step["attention"] == "sdpa" and step["peak_memory_allocated_mib"] is None

    pipe = report["pipeline"]
    assert pipe["ok"] and pipe["returncode"] == 0 and not pipe["timed_out"], pipe.get("log_tail")
    assert pipe["steps"] == 2 and pipe["env"]["ITERATIONS"] == "2" and pipe["env"]["DATA_PATH"] == str(tiny_shards)
    phases = pipe["ledger_phases"]
    assert {"compile_warmup", "train_loop", "averaging", "gptq_calibration", "diagnostic_eval", "export",
            "load_artifact", "roundtrip_eval", "sliding_window_eval"} <= set(phases)
    assert phases["train_loop"]["charged_to"] == "train" and phases["export"]["charged_to"] == "none"
    assert pipe["ledger_totals"]["eval_ms"] == pytest.approx(
        sum(p["ms"] for p in phases.values() if p["charged_to"] == "eval"), abs=len(phases))
    assert pipe["score"]["source"] == "final_int6_sliding_window_exact"
    assert pipe["score"]["val_bpb"] == pipe["stages"]["final_int6_sliding_window"]["val_bpb"]
    assert pipe["artifact"]["fits"] and pipe["artifact"]["total_bytes"] < train_gpt.CAP_BYTES
    assert pipe["device"] == {"device": "cpu", "compile": False, "autocast": "off", "attention": "sdpa"}
    assert "final_int8_zlib_roundtrip_exact" in (tmp_path / "r.pipeline.log").read_text()
    assert set(report["elapsed_s"]) == {"environment", "attention_check", "training_step", "pipeline", "total"}

    lines = gpu_check.summary_lines(report)
    assert lines[-1] == "result: FAILED" and any(line.startswith("PROBLEM: FlashAttention 3") for line in lines)


def test_dynamo_counts_see_graphs_recompiles_and_breaks():
    """The counters gpu_check reads exist under these names in this torch: a recompile (a new shape with
    dynamic=False) is one more frame and graph, a graph break is counted with its reason."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    f = torch.compile(lambda x: (x * 2).sum(), backend="eager", dynamic=False)
    f(torch.ones(3))
    f(torch.ones(3))
    first = gpu_check.dynamo_counts()
    assert (first["graphs"], first["frames"], first["graph_breaks"]) == (1, 1, 0)
    f(torch.ones(4))
    assert (gpu_check.dynamo_counts()["graphs"], gpu_check.dynamo_counts()["frames"]) == (2, 2)

    def breaks(x):
        x = x + 1
        torch._dynamo.graph_break()
        return x * 2

    torch.compile(breaks, backend="eager")(torch.ones(3))
    counts = gpu_check.dynamo_counts()
    assert counts["graph_breaks"] >= 1 and counts["graph_break_reasons"]
    torch._dynamo.reset()


def test_the_pipeline_is_stopped_at_its_time_limit(tiny_shards, tmp_path):
    r = gpu_check.run_pipeline(tiny_shards, tmp_path, tmp_path / "log", 0.5, TINY_PIPELINE, SP1024)
    assert r["timed_out"] and not r["ok"] and r["returncode"] != 0 and isinstance(r["log_tail"], list)


def fake_report(**changes):
    """assemble_report on made-up measurements of a passing run, with changes to its parts."""
    parts = {
        "env": {"gpus": [{"name": "NVIDIA H100 80GB HBM3"}], "is_h100": True,
                "fa3": {"importable": True, "error": None}},
        "attention": {"ok": True, "tensors": {"out": {"ok": True, "max_abs_err": 0.008, "tolerance": 0.03}},
                      "error": None},
        "step": {"error": None, "final_train_loss": 6.9, "attention": "fa3",
                 "dynamo": {"recompiles_after_warmup": 0, "new_graphs_after_warmup": 0, "graph_breaks": 0,
                            "graph_break_reasons": []}},
        "pipeline": {"ok": True},
    }
    for path, value in changes.items():
        part, _, key = path.partition("__")
        if key:
            parts[part][key] = value
        else:
            parts[part] = value
    args = gpu_check.parse_args([])
    return gpu_check.assemble_report(args, parts["env"], parts["attention"], parts["step"], parts["pipeline"], {})


def test_assemble_report_names_each_failed_check():
    ok = fake_report()
    assert ok["ok"] and ok["problems"] == [] and ok["notes"] == []
    assert ok["args"] == {"steps": 20, "skip_pipeline": False, "timeout_s": 480}
    cases = {
        "does not import": fake_report(env__fa3={"importable": False, "error": "ModuleNotFoundError: x"}),
        "disagrees with SDPA": fake_report(attention={"ok": False, "error": None, "tensors": {
            "out": {"ok": False, "max_abs_err": 3.3, "tolerance": 0.03}}}),
        "1 recompiles": fake_report(step__dynamo={"recompiles_after_warmup": 1, "new_graphs_after_warmup": 1,
                                                  "graph_breaks": 0, "graph_break_reasons": []}),
        "training step failed": fake_report(step={"error": "Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory"}),
        "loss is nan": fake_report(step__final_train_loss=float("nan")),
        "ran out of --timeout": fake_report(pipeline={"ok": False, "timed_out": True, "returncode": -9}),
    }
    for phrase, report in cases.items():
        assert not report["ok"] and len(report["problems"]) == 1 and phrase in report["problems"][0], report["problems"]
    skipped = fake_report(pipeline={"skipped": "--skip-pipeline"})
    assert skipped["ok"]
    h200 = fake_report(env__gpus=[{"name": "NVIDIA H200"}], env__is_h100=False)
    assert h200["ok"] and "not an H100" in h200["notes"][0]


def test_the_training_step_times_the_default_stack_packed_and_looped(tiny_shards):
    """The defaults (the frontier stack, at the quickstart's size): packed rows with their segments through the
    looped pass, as train_gpt.train runs its last stage."""
    from conftest import QUICKSTART_ENV

    h = train_gpt.Hyperparameters.from_env({**QUICKSTART_ENV, "VOCAB_SIZE": "1024", "DATA_PATH": str(tiny_shards),
                                            "TOKENIZER_PATH": str(SP1024)})
    assert h.doc_packing and h.num_loops == 2
    step = gpu_check.time_training_step(h, CPU, steps=1, warmup_steps=0, backend=None, log=lambda m: None)
    assert step["error"] is None, step["error"]
    assert step["seq_len"] == 256 and step["tokens_per_micro_step"] == h.train_batch_tokens // 8 > 0
    assert step["final_train_loss"] > 0
