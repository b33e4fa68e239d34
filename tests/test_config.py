"""Configuration: parsing, validation before heavy work, and the input checks that name what is wrong."""

import dataclasses
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch
from build_shards import write_shard
from conftest import ROOT, SEED_STACK_ENV, SP1024, SP8192, TINY_ENV, tiny_h

import train_gpt
from train_gpt import Hyperparameters


def test_env_parsing_casts_by_default_type():
    h = Hyperparameters.from_env({"NUM_LAYERS": "11", "MLP_MULT": "3.5", "TIE_EMBEDDINGS": "0",
                                  "MAX_WALLCLOCK_SECONDS": "560", "RUN_ID": "abc"})  # on the defaults (frontier)
    assert (h.num_layers, h.mlp_mult, h.tie_embeddings, h.max_wallclock_seconds, h.run_id) == (11, 3.5, False, 560.0, "abc")
    assert Hyperparameters.from_env({}) == Hyperparameters()
    seed = Hyperparameters.from_env({**SEED_STACK_ENV, "NUM_LAYERS": "9", "VE_LAYERS": ""})
    assert seed.value_embed_layers == [] and seed.mlp_mult == 3.0  # off; the seed stack's own values
    Hyperparameters.from_env({**SEED_STACK_ENV, "MAX_WALLCLOCK_SECONDS": "3", "QUANT_METHOD": "rtn"})  # no reserve
    Hyperparameters.from_env({"MAX_WALLCLOCK_SECONDS": "3", "QUANT_METHOD": "rtn"})  # the GPTQ extras go dormant
    with pytest.raises(ValueError, match=r"^AWQ_LITE_BITS=6: has no effect unless AWQ_LITE_GROUPS>0 and QUANT_METHOD=gptq"):
        Hyperparameters.from_env({"QUANT_METHOD": "rtn", "AWQ_LITE_BITS": "6"})  # set, but nothing reads it


@pytest.mark.parametrize("env, message", [
    ({"TTT_ENABLED": "0", "TTT_LR": "0.002"}, "TTT_LR=0.002: has no effect unless TTT_ENABLED=1 and TTT_MODE=chunks or "
                                              "TTT_ENABLED=1 and TTT_MODE=lora and PHASED_TTT_NUM_PHASES>0"),
    ({"TTT_ENABLED": "0", "TTT_MODE": "chunks"}, "TTT_MODE='chunks': has no effect unless TTT_ENABLED=1"),
    ({"TTT_ENABLED": "0", "TTT_LORA_RANK": "8"},
     "TTT_LORA_RANK=8: has no effect unless TTT_ENABLED=1 and TTT_MODE=lora"),
    ({"PHASED_TTT_NUM_PHASES": "0", "TTT_EPOCHS": "3"}, "TTT_EPOCHS=3: has no effect unless"),  # LoRA without phases
    ({"PHASED_TTT_NUM_PHASES": "0", "PHASED_TTT_PREFIX_DOCS": "100"},
     "PHASED_TTT_PREFIX_DOCS=100: has no effect unless TTT_ENABLED=1 and TTT_MODE=lora and PHASED_TTT_NUM_PHASES>0"),
])
def test_a_ttt_knob_that_nothing_reads_is_an_error(env, message):
    """The chunks' SGD knobs are read by chunked TTT and by LoRA TTT's phases only; none of them with TTT off."""
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        Hyperparameters.from_env(env)


def test_the_ttt_knobs_are_accepted_where_they_are_read():
    for env in ({"TTT_MODE": "chunks", "PHASED_TTT_NUM_PHASES": "0", "TTT_LR": "0.002"},  # phases: LoRA only
                {"TTT_LR": "0.002", "PHASED_TTT_PREFIX_DOCS": "100"},  # the default LoRA TTT with its phase
                {"TTT_ENABLED": "0", "TTT_LR": "0", "PHASED_TTT_NUM_PHASES": "0"}):  # off, as 0 may say
        Hyperparameters.from_env(env)


CHUNKS = {"TTT_ENABLED": "1", "TTT_MODE": "chunks"}  # the seed stack's chunked TTT, where the TTT_* rules apply


@pytest.mark.parametrize("env, var", [
    ({"NUM_LAYERS": "abc"}, "NUM_LAYERS"),
    ({"TIE_EMBEDDINGS": "2"}, "TIE_EMBEDDINGS"),
    ({"MODEL_DIM": "500"}, "MODEL_DIM"),  # not divisible by 8 heads
    ({"MODEL_DIM": "24", "NUM_HEADS": "8", "NUM_KV_HEADS": "4"}, "MODEL_DIM"),  # odd head dim 3
    ({"NUM_KV_HEADS": "3"}, "NUM_KV_HEADS"),
    ({"NUM_HEADS": "0"}, "NUM_HEADS"),
    ({"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS"),
    ({"TRAIN_SEQ_LEN": "0"}, "TRAIN_SEQ_LEN"),
    ({"VAL_BATCH_SIZE": "1024"}, "VAL_BATCH_SIZE"),
    ({"VOCAB_SIZE": "70000"}, "VOCAB_SIZE"),
    ({"MUON_MOMENTUM": "1.0"}, "MUON_MOMENTUM"),
    ({"MATRIX_LR": "-0.1"}, "MATRIX_LR"),
    ({"DEVICE": "tpu"}, "DEVICE"),
    ({"COMPILE": "yes"}, "COMPILE"),
    ({"MLP_ACT": "gelu"}, "MLP_ACT"),
    ({"ROPE_DIMS": "15"}, "ROPE_DIMS"),  # rotates pairs
    ({"ROPE_DIMS": "128"}, "ROPE_DIMS"),  # more than the 64 head dims
    ({"ROPE_DIMS": "2"}, "ROPE_NTK_LEN"),  # the NTK exponent rd / (rd - 2) needs rd > 2
    ({"BIGRAM_VOCAB_SIZE": "1"}, "BIGRAM_VOCAB_SIZE"),
    ({"XSA_LAST_N": "12"}, "XSA_LAST_N"),
    ({"XSA_LAST_N": "-2"}, "XSA_LAST_N"),
    ({"VE_LAYERS": "11"}, "VE_LAYERS"),  # no layer 11 in an 11-layer model
    ({"VE_LAYERS": "1,-10"}, "VE_LAYERS"),  # -10 is layer 1 of 11: twice the same layer
    ({"ITERATIONS": "0"}, "ITERATIONS"),  # an untrained model has no meaningful score
    ({"VE_LAYERS": "3,3"}, "VE_LAYERS"),
    ({"VE_LAYERS": "a"}, "VE_LAYERS"),
    ({"WEIGHT_AVERAGING": "lawa"}, "WEIGHT_AVERAGING"),
    ({"EMA_DECAY": "1"}, "EMA_DECAY"),
    ({"QUANT_MLP_BITS": "3"}, "QUANT_MLP_BITS"),
    ({"QUANT_EMBED_BITS": "12"}, "QUANT_EMBED_BITS"),
    ({"QUANT_METHOD": "awq"}, "QUANT_METHOD"),
    ({"GPTQ_CALIBRATION": "val"}, "GPTQ_CALIBRATION"),  # validation data is never a calibration source
    ({"MAX_WALLCLOCK_SECONDS": "3"}, "GPTQ_RESERVE_SECONDS"),  # the 4 s reserve would not fit
    ({"PRUNE_FRAC": "1"}, "PRUNE_FRAC"),
    ({"COMPRESSOR": "xz"}, "COMPRESSOR"),
    ({"EVAL_STRIDE": "-1"}, "EVAL_STRIDE"),
    ({"EVAL_STRIDE": "4096"}, "EVAL_STRIDE"),  # longer than the 2048-token window
    ({"TRAIN_SEQ_LEN": "32"}, "EVAL_STRIDE"),  # the default stride 64 exceeds the window it would slide
    ({"EVAL_SEQ_LEN": "-1"}, "EVAL_SEQ_LEN"),
    ({"EVAL_BATCH_SEQS": "0"}, "EVAL_BATCH_SEQS"),
    ({**CHUNKS, "TTT_OPTIMIZER": "lion"}, "TTT_OPTIMIZER"),
    ({**CHUNKS, "TTT_LR": "0"}, "TTT_LR"),
    ({**CHUNKS, "TTT_EPOCHS": "0"}, "TTT_EPOCHS"),
    ({**CHUNKS, "TTT_CHUNK_TOKENS": "1024"}, "TTT_CHUNK_TOKENS"),  # shorter than one 2048-token sequence
    ({**CHUNKS, "TTT_FREEZE_BLOCKS": "12"}, "TTT_FREEZE_BLOCKS"),
    ({**CHUNKS, "TTT_MOMENTUM": "1"}, "TTT_MOMENTUM"),
    ({**CHUNKS, "TTT_GRAD_CLIP": "-1"}, "TTT_GRAD_CLIP"),
])
def test_invalid_values_are_rejected_naming_the_variable(env, var):
    """Each rule on the seed stack's settings (the frontier defaults would trip other rules first)."""
    with pytest.raises(ValueError, match=rf"^{var}="):
        Hyperparameters.from_env({**SEED_STACK_ENV, **env})


def test_world_size_must_divide_the_micro_batches(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="WORLD_SIZE=3"):
        train_gpt.init_dist(tiny_h())


def test_packed_training_on_cuda_without_flashattention_3_is_refused_before_anything_runs(monkeypatch):
    """SDPA would build a dense mask of each packed row's tokens squared (98,304^2 at full size): out of memory
    after the data and model are set up, so init_dist refuses, naming the extra; CPU (tests) and DOC_PACKING=0
    still get SDPA."""
    monkeypatch.setattr(train_gpt.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(train_gpt, "flash_attn_varlen_func", None)
    monkeypatch.setattr(train_gpt.torch.cuda, "set_device", lambda device: None)  # a CPU build has no CUDA
    with pytest.raises(train_gpt.ConfigError, match=r"^DOC_PACKING=True: .*flash_attn_interface.*DOC_PACKING=0"):
        train_gpt.init_dist(Hyperparameters())
    assert train_gpt.init_dist(dataclasses.replace(Hyperparameters(), doc_packing=False)).cuda
    assert not train_gpt.init_dist(dataclasses.replace(Hyperparameters(), device="cpu")).cuda
    monkeypatch.setattr(train_gpt, "flash_attn_varlen_func", object())
    assert train_gpt.init_dist(Hyperparameters()).cuda


def test_input_checks(tmp_path, sample_shards):
    h = tiny_h(data_path=str(sample_shards), tokenizer_path=str(SP1024), vocab_size=1024)
    sp, train, val = train_gpt.check_inputs(h)
    assert sp.vocab_size() == 1024 and len(train) == 2 and len(val) == 1

    def fails(match, **kw):
        with pytest.raises(ValueError, match=match):
            train_gpt.check_inputs(dataclasses.replace(h, **kw))

    fails("^TOKENIZER_PATH=", tokenizer_path=str(tmp_path / "missing.model"))
    fails("^TOKENIZER_PATH=", tokenizer_path=str(ROOT / "README.md"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    fails("^TOKENIZER_PATH=.*not a loadable", tokenizer_path=str(tmp_path / "junk.model"))
    fails(r"^VOCAB_SIZE=512: smaller than the vocabulary", vocab_size=512)
    fails("^DATA_PATH=.*not a directory", data_path=str(tmp_path / "nope"))
    fails("^DATA_PATH=.*no fineweb_train", data_path=str(tmp_path))
    (tmp_path / "fineweb_train_000000.bin").write_bytes((sample_shards / "fineweb_train_000000.bin").read_bytes())
    fails("^DATA_PATH=.*no fineweb_val", data_path=str(tmp_path))
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(10, dtype=np.uint16))
    fails("^TRAIN_SEQ_LEN=64: the validation shards hold only 10 tokens", data_path=str(tmp_path))
    bad = tmp_path / "fineweb_train_000001.bin"
    bad.write_bytes((tmp_path / "fineweb_train_000000.bin").read_bytes()[:-2])
    fails("fineweb_train_000001.bin: .*truncated or corrupt", data_path=str(tmp_path))


def test_tokenizer_that_would_overcount_spaces_is_refused(tmp_path, sample_shards, sample_texts):
    """Byte fallback without a usable lone '▁' piece: unmergeable spaces become the 3 byte pieces of U+2581."""
    from test_audit_bytes import mark_piece_unused

    sp = spm.SentencePieceProcessor(model_file=str(SP8192))
    model = tmp_path / "no_lone_space.model"
    model.write_bytes(mark_piece_unused(SP8192.read_bytes(), sp.piece_to_id("\u2581")))
    h = tiny_h(data_path=str(sample_shards), tokenizer_path=str(model), vocab_size=8192)
    with pytest.raises(ValueError, match="^TOKENIZER_PATH=.*byte fallback without a usable lone"):
        train_gpt.check_inputs(h)
    shards = _texts_shards(tmp_path, [t for t in sample_texts[:40]], SP8192)  # shards this tokenizer made
    train_gpt.check_inputs(tiny_h(data_path=str(shards), tokenizer_path=str(SP8192), vocab_size=8192))


def test_tokenizer_without_bos_is_refused(tmp_path, sample_shards, sample_texts):
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sample_texts[100:120]), model_prefix=str(tmp_path / "nobos"),
                                   vocab_size=300, bos_id=-1, minloglevel=2)
    h = tiny_h(data_path=str(sample_shards), tokenizer_path=str(tmp_path / "nobos.model"))
    with pytest.raises(ValueError, match="^TOKENIZER_PATH=.*no BOS piece"):
        train_gpt.check_inputs(h)


@pytest.mark.slow
def test_bad_config_fails_fast_with_one_line_and_no_run(tmp_path, sample_shards):
    env = {**os.environ, **TINY_ENV, "DATA_PATH": str(sample_shards), "TOKENIZER_PATH": str(SP1024),
           "NUM_HEADS": "3", "NUM_KV_HEADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == ["train_gpt.py: error: MODEL_DIM=64: must be divisible by NUM_HEADS=3 "
                                             "into an even head dimension (RoPE rotates pairs)"]
    assert not (tmp_path / "logs").exists() and not (tmp_path / train_gpt.ARTIFACT_PATH).exists()


def test_import_has_no_side_effects(tmp_path):
    code = "import train_gpt, torch.distributed as d; assert not d.is_initialized(); print('ok')"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "ok" and list(tmp_path.iterdir()) == []


def test_renamed_knob_is_an_error_naming_the_new_one():
    with pytest.raises(ValueError, match="^PRUNE_MARGIN_BYTES='500': renamed to FIT_MARGIN_BYTES"):
        Hyperparameters.from_env({"PRUNE_MARGIN_BYTES": "500"})
    assert Hyperparameters.from_env({"FIT_MARGIN_BYTES": "500"}).fit_margin_bytes == 500


def test_knob_rules_live_beside_their_fields_and_variants_revalidate():
    import dataclasses

    h = Hyperparameters()
    assert h.errors() == [] and dataclasses.replace(h, num_layers=12).num_layers == 12
    with pytest.raises(ValueError, match="^BETA2=1.0: must be in \\[0, 1\\)"):
        dataclasses.replace(h, beta2=1.0)  # checked by the one generic loop, from the field's declaration
    # what an artifact must agree on is declared on the fields, not kept in a list by hand
    assert set(Hyperparameters.model_knobs()) == {
        "vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "mlp_act", "mlp_leaky_slope",
        "tie_embeddings", "rope_base", "rope_dims", "rope_ntk_len", "train_seq_len", "logit_softcap",
        "logit_softcap_asym", "unet_skips", "skip_gates", "smear_gate", "smear_gate_window", "bigram_vocab_size",
        "bigram_dim", "xsa_last_n", "attn_gate", "attn_gate_window", "attn_gate_scale", "ln_scale", "ve_dim",
        "ve_layers", "num_loops", "loop_start", "loop_end", "parallel_start_layer"}
    # derived values are computed once, as properties
    assert (h.head_dim, h.kv_dim, h.mlp_hidden, h.eval_len) == (64, 256, 2048, 3072)
    assert h.uses_hessians and h.uses_train_calibration and h.loop_cap_ms == 592_000  # the 8 s GPTQ reserve


def test_every_configuration_error_at_once_the_variables_set_first():
    with pytest.raises(ValueError) as e:
        Hyperparameters.from_env({"NUM_HEADS": "5", "MODEL_DIM": "128", "ROPE_BASE": "-1", "SEED": "x"})
    lines = str(e.value).splitlines()
    assert lines == ["SEED='x': expected int",
                     "MODEL_DIM=128: must be divisible by NUM_HEADS=5 into an even head dimension (RoPE rotates pairs)",
                     "ROPE_BASE=-1.0: must be > 0", "NUM_KV_HEADS=4: must divide NUM_HEADS=5"]


# Variables of other tools and of the shell: never taken for a mistyped knob.
NEVER_A_TYPO = ["CUDA_VISIBLE_DEVICES", "CUDA_LAUNCH_BLOCKING", "NCCL_DEBUG", "NCCL_NET", "NCCL_IB_DISABLE",
                "OMP_NUM_THREADS", "MKL_NUM_THREADS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID",
                "TORCH_COMPILE_DEBUG", "TORCHINDUCTOR_CACHE_DIR", "PYTORCH_CUDA_ALLOC_CONF", "PYTHONPATH",
                "PYTHONHASHSEED", "TRITON_CACHE_DIR", "HF_HOME", "OPENBLAS_CORETYPE", "TOKENIZERS_PARALLELISM",
                "NUM_THREADS", "MAX_JOBS", "SEEDS", "NAME", "PATH", "HOME", "USER", "PWD", "SHELL", "TERM", "LANG",
                "CI", "TMPDIR", "VIRTUAL_ENV", "DISPLAY", "EDITOR"]


def test_near_miss_knob_names_are_errors_naming_the_knob():
    for typo, meant in (("MODLE_DIM", "MODEL_DIM"), ("NUM_LAYER", "NUM_LAYERS"), ("TTT_LRR", "TTT_LR"),
                        ("ITERATION", "ITERATIONS"), ("GPTQ_CALIB", "GPTQ_CALIBRATION")):
        with pytest.raises(ValueError, match=rf"^{typo}='64': not a knob; did you mean {meant}\?"):
            Hyperparameters.from_env({typo: "64"})
    assert Hyperparameters.from_env({name: "1" for name in NEVER_A_TYPO}) == Hyperparameters()
    assert Hyperparameters.from_env(dict(os.environ)).model_dim > 0  # nothing in this machine's environment either


def test_value_embedding_switch_is_the_layer_list():
    with pytest.raises(ValueError, match="^VE_ENABLED='0': removed: .*VE_LAYERS= turns them off"):
        Hyperparameters.from_env({"VE_ENABLED": "0"})
    assert [train_gpt.layer_list("-2,-1", n) for n in (1, 2, 11)] == [[0], [0, 1], [9, 10]]
    assert train_gpt.layer_list("", 4) == [] and train_gpt.layer_list("3,-1", 4) is None  # layer 3 twice
    assert train_gpt.layer_list("-5", 4) is None  # below the first layer and nothing left


@pytest.mark.parametrize("depth", range(1, 13))
def test_every_depth_validates_and_runs_with_the_other_defaults(depth):
    """Of the seed stack: the frontier's loop and lane indices are absolute (3..5, 8), as in the records."""
    h = Hyperparameters.from_env({**SEED_STACK_ENV, "NUM_LAYERS": str(depth)})
    model = train_gpt.GPT(h)
    x = torch.randint(0, h.vocab_size, (1, 16))
    assert model(x, x).isfinite() and h.value_embed_layers == [max(depth - 2, 0), depth - 1][-min(depth, 2):]


def _texts_shards(tmp_path, texts, model):
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tmp_path.mkdir(parents=True, exist_ok=True)
    tokens = np.concatenate([[sp.bos_id()] + sp.encode(t) for t in texts]).astype(np.uint16)
    write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    write_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    return tmp_path


def test_tokenizer_that_did_not_make_the_shards_is_refused(tmp_path, sample_shards, sample_texts):
    wrong = tiny_h(data_path=str(sample_shards), tokenizer_path=str(SP8192), vocab_size=8192)  # sp1024 shards
    with pytest.raises(ValueError, match=r"^TOKENIZER_PATH=.*does not match the shards in DATA_PATH=.*do not come back"):
        train_gpt.check_inputs(wrong)
    sp8192 = _texts_shards(tmp_path, sample_texts[:40], SP8192)
    with pytest.raises(ValueError, match=r"^TOKENIZER_PATH=.*does not match.*holds token id \d+, but the tokenizer "
                                         r"has only 1024 pieces"):
        train_gpt.check_inputs(tiny_h(data_path=str(sp8192), tokenizer_path=str(SP1024), vocab_size=8192))
    # every correct pairing of the bundled samples passes
    train_gpt.check_inputs(tiny_h(data_path=str(sample_shards), tokenizer_path=str(SP1024)))
    train_gpt.check_inputs(tiny_h(data_path=str(sp8192), tokenizer_path=str(SP8192), vocab_size=8192))
    for model in (SP1024, SP8192):
        for start in range(0, 400, 100):  # every bundled document, a hundred at a time
            d = _texts_shards(tmp_path / f"{model.stem}_{start}", sample_texts[start : start + 100], model)
            train_gpt.check_inputs(tiny_h(data_path=str(d), tokenizer_path=str(model), vocab_size=8192))


def test_outputs_are_checked_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    h = tiny_h(run_id="r1")
    train_gpt.check_outputs(h)  # creates logs/, writes nothing else
    assert [p.name for p in tmp_path.iterdir()] == ["logs"] and not any((tmp_path / "logs").iterdir())
    (tmp_path / "logs" / "r2.ptz").mkdir()
    with pytest.raises(ValueError, match=r"^logs/r2.ptz: cannot be written .*is a directory"):
        train_gpt.check_outputs(tiny_h(run_id="r2"))
    (tmp_path / train_gpt.ARTIFACT_PATH).mkdir()
    with pytest.raises(ValueError, match=rf"^{train_gpt.ARTIFACT_PATH}: cannot be written"):
        train_gpt.check_outputs(h)
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    (other / "logs").write_text("a file where the log folder should be")
    with pytest.raises(ValueError, match=r"^logs/r1.txt: cannot be written"):
        train_gpt.check_outputs(h)
    with pytest.raises(OSError):
        train_gpt.write_atomic(str(other / "logs" / "x.json"), b"data")  # logs is a file: the write fails ...
    assert sorted(p.name for p in other.iterdir()) == ["logs"]  # ... and leaves no temporary file


def test_bare_run_on_a_fresh_clone_says_where_data_comes_from(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env={k: v for k, v in os.environ.items() if k not in ("DATA_PATH", "TOKENIZER_PATH")})
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "data/cached_challenge_fineweb.py" in r.stderr and "./quickstart.sh" in r.stderr


def test_a_phase_sgd_with_nothing_to_train_on_stops_the_script_before_training(tmp_path, sample_shards):
    """The sample's 2 longest validation documents, the phase SGD's, hold fewer tokens than the default's 32,768-token
    chunks: one clean error and no log, so nothing was trained (the check: test_eval_frontier.py)."""
    env = {**os.environ, **TINY_ENV, "DATA_PATH": str(sample_shards), "TOKENIZER_PATH": str(SP1024), "TTT_ENABLED": "1",
           "TTT_MODE": "lora", "TTT_BATCH_SIZE": "1", "PHASED_TTT_PREFIX_DOCS": "2"}
    r = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert r.stderr.startswith("train_gpt.py: error: TTT_CHUNK_TOKENS=32768: a phase's SGD (PHASED_TTT_PREFIX_DOCS=2")
    assert not list(tmp_path.rglob("*.txt")) and r.stdout == ""


@pytest.mark.slow
def test_a_world_size_that_does_not_divide_8_prints_one_clean_error(tmp_path, sample_shards):
    env = {**os.environ, **TINY_ENV, "DATA_PATH": str(sample_shards), "TOKENIZER_PATH": str(SP1024)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                        str(ROOT / "train_gpt.py")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and out.count("train_gpt.py: error:") == 1
    assert "train_gpt.py: error: WORLD_SIZE=3: must divide 8" in out
    assert 'train_gpt.py", line' not in out  # no traceback from the script (torchrun adds its own summary)


def test_the_callers_knobs_never_reach_the_tests():
    """conftest removes, before any fixture runs, every variable train_gpt.py or torchrun would read (a hostile
    `QUANT_METHOD=rtn NUM_LAYERS=3 TTT_ENABLED=0` exported by the caller once failed the suite)."""
    from conftest import caller_knobs

    hostile = {"QUANT_METHOD": "rtn", "NUM_LAYERS": "3", "TTT_ENABLED": "0", "PRUNE_MARGIN_BYTES": "1",
               "TTT_LORA_RNK": "4", "RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "1", "HOME": "/root",
               "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    assert sorted(caller_knobs(hostile)) == ["MASTER_PORT", "NUM_LAYERS", "PRUNE_MARGIN_BYTES", "QUANT_METHOD", "RANK",
                                             "TTT_ENABLED", "TTT_LORA_RNK", "WORLD_SIZE"]
    assert caller_knobs(os.environ) == []
