"""Configuration: parsing, validation before heavy work, and the input checks that name what is wrong."""

import os
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
from build_shards import write_shard
from conftest import ROOT, SP1024, SP8192, TINY_ENV, tiny_h

import train_gpt
from train_gpt import Hyperparameters


def test_env_parsing_casts_by_default_type():
    h = Hyperparameters.from_env({"NUM_LAYERS": "11", "MLP_MULT": "3.5", "TIE_EMBEDDINGS": "0",
                                  "MAX_WALLCLOCK_SECONDS": "560", "RUN_ID": "abc"})
    assert (h.num_layers, h.mlp_mult, h.tie_embeddings, h.max_wallclock_seconds, h.run_id) == (11, 3.5, False, 560.0, "abc")
    assert Hyperparameters.from_env({}) == Hyperparameters()
    assert Hyperparameters.from_env({"NUM_LAYERS": "9", "VE_ENABLED": "0"}).ve_layers == "9,10"  # unused: no error
    Hyperparameters.from_env({"MAX_WALLCLOCK_SECONDS": "3", "QUANT_METHOD": "rtn"})  # no reserve without GPTQ


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
    ({"NUM_LAYERS": "9"}, "VE_LAYERS"),  # the default layers 9,10 do not exist in a 9-layer model
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
    ({"EVAL_STRIDE": "0"}, "EVAL_STRIDE"),
    ({"EVAL_STRIDE": "4096"}, "EVAL_STRIDE"),  # longer than the 2048-token window
    ({"TRAIN_SEQ_LEN": "32"}, "EVAL_STRIDE"),  # the default stride 64 exceeds the window it would slide
    ({"EVAL_SEQ_LEN": "-1"}, "EVAL_SEQ_LEN"),
    ({"EVAL_BATCH_SEQS": "0"}, "EVAL_BATCH_SEQS"),
    ({"TTT_OPTIMIZER": "lion"}, "TTT_OPTIMIZER"),
    ({"TTT_LR": "0"}, "TTT_LR"),
    ({"TTT_EPOCHS": "0"}, "TTT_EPOCHS"),
    ({"TTT_CHUNK_TOKENS": "1024"}, "TTT_CHUNK_TOKENS"),  # shorter than one 2048-token sequence
    ({"TTT_FREEZE_BLOCKS": "12"}, "TTT_FREEZE_BLOCKS"),
    ({"TTT_MOMENTUM": "1"}, "TTT_MOMENTUM"),
    ({"TTT_GRAD_CLIP": "-1"}, "TTT_GRAD_CLIP"),
])
def test_invalid_values_are_rejected_naming_the_variable(env, var):
    with pytest.raises(ValueError, match=rf"^{var}="):
        Hyperparameters.from_env(env)


def test_world_size_must_divide_the_micro_batches(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="WORLD_SIZE=3"):
        train_gpt.init_dist(tiny_h())


def test_input_checks(tmp_path, sample_shards):
    h = tiny_h(data_path=str(sample_shards), tokenizer_path=str(SP1024), vocab_size=1024)
    sp, train, val = train_gpt.check_inputs(h)
    assert sp.vocab_size() == 1024 and len(train) == 2 and len(val) == 1

    def fails(match, **kw):
        with pytest.raises(ValueError, match=match):
            train_gpt.check_inputs(tiny_h(**{**vars(h), **kw}))

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


def test_tokenizer_that_would_overcount_spaces_is_refused(tmp_path, sample_shards):
    """Byte fallback without a usable lone '▁' piece: unmergeable spaces become the 3 byte pieces of U+2581."""
    from test_audit_bytes import mark_piece_unused

    sp = spm.SentencePieceProcessor(model_file=str(SP8192))
    model = tmp_path / "no_lone_space.model"
    model.write_bytes(mark_piece_unused(SP8192.read_bytes(), sp.piece_to_id("\u2581")))
    h = tiny_h(data_path=str(sample_shards), tokenizer_path=str(model), vocab_size=8192)
    with pytest.raises(ValueError, match="^TOKENIZER_PATH=.*byte fallback without a usable lone"):
        train_gpt.check_inputs(h)
    train_gpt.check_inputs(tiny_h(data_path=str(sample_shards), tokenizer_path=str(SP8192), vocab_size=8192))


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
