"""The compile cache of a whole default run: every graph the pipeline compiles, counted under a counting backend,
stays far below the recompile limit, so no run dies with FailOnRecompileLimitHit after ten minutes of training."""

import functools
import sys

import pytest
import torch
from conftest import FRONTIER_ENV, SP1024
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.testing import CompileCounter

import train_gpt

# the defaults at a tiny size: 2 layers of d=64, the loop on layer 0, lanes on 1, 16 -> 32 -> 64-token rows of
# 4,096-token micro-batches (so each length compiles one to three cu_seqlens lengths), 64-token evaluation
TINY_DEFAULTS = dict(NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", LOOP_START="0", LOOP_END="0",
                     PARALLEL_START_LAYER="1", TRAIN_SEQ_LEN="64", TRAIN_SEQ_SCHEDULE="16@0.100,32@0.700,64@1.000",
                     SEQ_CHANGE_WARMUP_STEPS="2", TRAIN_BATCH_TOKENS="32768", VAL_BATCH_SIZE="16384", ITERATIONS="2",
                     WARMUP_STEPS="1", MAX_WALLCLOCK_SECONDS="0", GPTQ_CALIB_TOKENS="2048", VOCAB_SIZE="1024",
                     AWQ_LITE_GROUP_SIZE="16", EVAL_SEQ_LEN="64", EVAL_STRIDE="64", TTT_LORA_RANK="4",
                     TTT_BATCH_SIZE="2", PHASED_TTT_PREFIX_DOCS="2", TTT_CHUNK_TOKENS="1024",
                     TTT_SHORT_SCORE_FIRST_STEPS="300:32", FP16_MAX_NUMEL="1024", DEVICE="cpu", COMPILE="1",
                     TRAIN_LOG_EVERY="0")


def counted_run(monkeypatch, tmp_path, shards, **env) -> tuple[list[int], CompileCounter]:
    """main() in-process on `env` over the defaults, every torch.compile on a counting backend; the cache entries
    of GPT.forward when training's graphs are reset and at the end."""
    for k, v in {**TINY_DEFAULTS, "DATA_PATH": str(shards), "TOKENIZER_PATH": str(SP1024), "RUN_ID": "c",
                 **env}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    counter, entries = CompileCounter(), []
    forward = lambda: len(_debug_get_cache_entry_list(train_gpt.GPT.forward.__code__))  # noqa: E731
    reset = torch._dynamo.reset
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    monkeypatch.setattr(torch._dynamo, "reset", lambda: (entries.append(forward()), reset()))
    monkeypatch.setattr(sys, "argv", ["train_gpt.py"])
    reset()
    try:
        train_gpt.main()
        entries.append(forward())
    finally:
        reset()
    return entries, counter


@pytest.mark.slow  # dynamo traces every graph of a whole run (about a minute on 2 CPU cores)
def test_a_whole_default_run_compiles_far_below_the_recompile_limit(monkeypatch, tmp_path, short_val_shards):
    """With VAL_LOSS_EVERY > 0, so validation's graphs count too."""
    entries, counter = counted_run(monkeypatch, tmp_path, short_val_shards, VAL_LOSS_EVERY="1")
    h = train_gpt.Hyperparameters.from_env({**FRONTIER_ENV, **TINY_DEFAULTS})
    shapes = len(train_gpt.warmup_shapes(h)) + len(train_gpt.warmup_shapes(h, True))
    assert len(entries) == 2 and counter.frame_count > 0  # training's graphs, reset; then evaluation's
    train, evaluation = entries
    print(f"cache entries of GPT.forward: training {train} (warmed shapes {shapes}), evaluation {evaluation}")
    # training: each warmed shape, the warm-up steps' plain and looped graphs, validation's (train and eval modes)
    assert shapes <= train <= shapes + 4
    assert evaluation <= 8  # the scored evaluator alone: LoRA TTT's any-length graphs and the phase SGD's
    assert max(entries) <= train_gpt.RECOMPILE_LIMIT // 4
    assert torch._dynamo.config.cache_size_limit >= train_gpt.RECOMPILE_LIMIT


def test_the_full_size_default_warms_few_shapes_against_the_limit():
    """At full size the warm-up compiles 15 shapes (PR #2014's 'auto' mode), an eighth of the limit."""
    h = train_gpt.Hyperparameters()
    plain, looped = train_gpt.warmup_shapes(h), train_gpt.warmup_shapes(h, True)
    assert {n for n, _ in plain} == {1024, 2048} and {n for n, _ in looped} == {2048, 3072}  # no looped 1024
    assert len(plain) + len(looped) == 15 and 4 * (15 + 4) <= train_gpt.RECOMPILE_LIMIT
