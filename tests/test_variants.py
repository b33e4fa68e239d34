"""The data variants in train_gpt.py: CaseOps data is scored on the original bytes of its sidecar (checked before
training), every evaluator uses them, the data fingerprint names the variant; and whole runs on the sp8192 and
CaseOps sample shards, as the benchmarks build them (`VARIANT=... ./quickstart.sh` keeps 50 validation documents)."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import numpy
import pytest
import sentencepiece as spm
import torch
from build_shards import build, write_shard
from conftest import CASEOPS, QUICKSTART_ENV, ROOT, SAMPLE_JSONL, SP1024, SP8192, TINY_ENV, tiny_h

import train_gpt
from train_gpt import Dist

CPU = Dist(0, 1, 0, torch.device("cpu"))
MODELS = {"sp1024": SP1024, "sp8192": SP8192, "caseops": CASEOPS}


@pytest.fixture(scope="module")
def variant_shards(tmp_path_factory):
    """variant -> shards of the whole bundled sample (100 validation documents), as the benchmarks build them."""
    out = {}
    for variant in ("sp8192", "caseops"):
        path = tmp_path_factory.mktemp(variant)
        build([SAMPLE_JSONL], path, MODELS[variant], num_val_docs=100, allow_small_val=True,
              caseops_data=variant == "caseops", workers=2, log=lambda _: None)
        out[variant] = path
    return out


def test_variant_of_a_tokenizer():
    names = {v: train_gpt.data_variant(spm.SentencePieceProcessor(model_file=str(m))) for v, m in MODELS.items()}
    assert names == {v: v for v in MODELS}


def test_caseops_validation_counts_the_sidecar_bytes(variant_shards, sample_texts):
    h = tiny_h(data_path=str(variant_shards["caseops"]), tokenizer_path=str(CASEOPS), vocab_size=8192)
    sp, train, val_files = train_gpt.check_inputs(h)
    assert [os.path.basename(f) for f in val_files] == ["fineweb_val_000000.bin"]  # the sidecar is not a shard
    val = train_gpt.load_validation(h, sp, val_files, torch.device("cpu"))
    sidecar = train_gpt.load_data_shard(str(variant_shards["caseops"] / "fineweb_val_bytes_000000.bin"))
    assert val.sidecar is not None and val.byte_count == int(sidecar[1 : val.num_targets + 1].sum())
    tokens = train_gpt.load_data_shard(val_files[0])
    full = train_gpt.make_validation(tokens, val.luts, len(tokens) - 1, sidecar)  # no trimming
    assert full.byte_count == sum(len(t.strip().encode("utf-8")) for t in sample_texts[:100])
    # the tables would count the transformed text: operators as 3 bytes each, so more than the original
    luts_only = train_gpt.make_validation(val.tokens, val.luts, h.train_seq_len)
    assert luts_only.byte_count > val.byte_count
    fp = train_gpt.data_fingerprint(h, sp, val, train)
    assert fp["variant"] == "caseops" and fp["bytes_from"] == "sidecar" and fp["val_bytes"] == val.byte_count
    assert fp["train_shards"] == 1 and fp["train_full_shards"] == 0 and fp["val_tokens"] == val.num_targets


def test_every_evaluator_scores_the_sidecar_bytes_exactly_once(variant_shards):
    h = tiny_h(data_path=str(variant_shards["caseops"]), tokenizer_path=str(CASEOPS), vocab_size=8192)
    sp, _, val_files = train_gpt.check_inputs(h)
    val = train_gpt.load_validation(h, sp, val_files, torch.device("cpu"))
    val = train_gpt.make_validation(val.tokens[:4097], val.luts, h.train_seq_len, val.sidecar[:4097])
    torch.manual_seed(0)
    model = train_gpt.GPT(h)
    for stride in (64, 24):
        r = train_gpt.evaluate(h, CPU, model, val, train_gpt.Windows(64, stride, 8))
        assert (r.tokens, r.bytes) == (4096, int(val.sidecar[1:].sum()))
        assert math.isclose(r.val_bpb, r.val_loss * r.tokens / (math.log(2) * r.bytes))


def test_the_quickstart_and_the_ladder_give_their_phase_sgd_something_to_train_on(variant_shards):
    """configs/quickstart.env on the quickstart's 50 validation documents, the ladder's evaluator rung on the
    benchmarks' 100: the phase SGD's documents hold more than one TTT_CHUNK_TOKENS chunk, so it trains (at the
    default 32,768 they would not: the script would refuse the run)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ladder

    data = {"DATA_PATH": str(variant_shards["caseops"]), "TOKENIZER_PATH": str(CASEOPS), "VOCAB_SIZE": "8192"}
    for env, docs in ((QUICKSTART_ENV, 50), (ladder.configs(150)["+ evaluator"], 100)):
        h = train_gpt.Hyperparameters.from_env({**env, **data})
        sp, _, val_files = train_gpt.check_inputs(h)
        val = train_gpt.load_validation(h, sp, val_files, torch.device("cpu"))
        end = train_gpt.doc_bounds(val.tokens, val.bos_id)[docs] + 1
        val = train_gpt.make_validation(val.tokens[:end], val.luts, val.seq_len, val.sidecar[:end],
                                        h.eval_include_tail, val.bos_id)
        lengths = numpy.diff(train_gpt.doc_bounds(val.tokens, val.bos_id))
        [sgd_docs] = train_gpt.ttt_plan(h, lengths)[2]
        assert len(lengths) == docs and h.ttt_chunk_tokens < lengths[sgd_docs].sum() < 32_768
        assert len(sgd_docs) == h.phased_ttt_prefix_docs  # all it asks for, though the first batch is a short one
        train_gpt.check_ttt_phases(h, val)
        with pytest.raises(train_gpt.ConfigError, match="TTT_CHUNK_TOKENS=32768"):
            train_gpt.check_ttt_phases(dataclasses.replace(h, ttt_chunk_tokens=32_768), val)


def test_sidecar_refusals(tmp_path, variant_shards):
    def check(data, model):
        h = tiny_h(data_path=str(data), tokenizer_path=str(model), vocab_size=8192)
        return train_gpt.check_inputs(h)

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in variant_shards["caseops"].glob("fineweb_*_0*.bin"):
        if "bytes" not in f.name:
            (bare / f.name).symlink_to(f)
    with pytest.raises(ValueError, match=r"fineweb_val_bytes_000000.bin: missing; TOKENIZER_PATH=.* is a CaseOps "
                                         r"tokenizer, scored on a byte sidecar per validation shard"):
        check(bare, CASEOPS)
    short = variant_shards["caseops"] / "fineweb_val_bytes_000000.bin"
    write_shard(bare / short.name, train_gpt.load_data_shard(str(short))[:-1])
    with pytest.raises(ValueError, match=r"fineweb_val_bytes_000000.bin: \d+ byte counts for \d+ tokens; "):
        check(bare, CASEOPS)
    sp8192 = tmp_path / "sp8192"
    sp8192.mkdir()
    for f in variant_shards["sp8192"].glob("*.bin"):
        (sp8192 / f.name).symlink_to(f)
    (sp8192 / short.name).symlink_to(short)
    with pytest.raises(ValueError, match=r"holds CaseOps byte sidecars, but TOKENIZER_PATH=.* is not a CaseOps "
                                         r"tokenizer"):
        check(sp8192, SP8192)
    (sp8192 / short.name).unlink()
    check(sp8192, SP8192)


def field(text, line_start, key):
    line = next(l for l in text.splitlines() if l.startswith(line_start))
    return re.search(rf"\b{key}:(\S+)", line).group(1)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sp8192", "caseops"])
def test_whole_run_on_each_variant(variant, tmp_path):
    shards = tmp_path / "shards"  # 4 validation documents: three evaluations at vocabulary 8192 stay short on CPU
    build([SAMPLE_JSONL], shards, MODELS[variant], num_val_docs=4, allow_small_val=True,
          caseops_data=variant == "caseops", workers=2, log=lambda _: None)
    env = {**os.environ, **TINY_ENV, "DATA_PATH": str(shards), "TOKENIZER_PATH": str(MODELS[variant]),
           "VOCAB_SIZE": "8192", "RUN_ID": variant, "ITERATIONS": "2", "VAL_LOSS_EVERY": "0", "EVAL_STRIDE": "64"}
    r = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert math.isfinite(float(field(out, "final_int8_zlib_roundtrip_exact", "val_bpb")))
    fp = field(out, "data_fingerprint", "variant"), field(out, "data_fingerprint", "bytes_from")
    assert fp == (variant, "sidecar" if variant == "caseops" else "luts")
    s = json.loads((tmp_path / "logs" / f"{variant}.json").read_text())
    assert s["data"]["variant"] == variant and s["data"]["val_bytes"] == int(field(out, "val_data", "bytes"))
    counts = f"tokens:{field(out, 'val_data', 'tokens')} bytes:{field(out, 'val_data', 'bytes')}"
    # the plain evaluator (stride = length): every evaluator's exactly-once count is tested in-process above
    assert re.search(rf"^final_int6_roundtrip val_loss:\S+ val_bpb:\S+ eval_time:\d+ms {counts}$", out, re.M)


def test_quickstart_refuses_an_unknown_variant_before_building_anything(tmp_path):
    r = subprocess.run([str(ROOT / "quickstart.sh")], env={**os.environ, "VARIANT": "sp4096"}, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stderr == "quickstart.sh: VARIANT=sp4096: expected sp1024, sp8192 or caseops\n"
    assert not (ROOT / "data" / "datasets" / "sample_sp4096").exists()
