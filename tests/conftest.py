"""Shared test setup: the repository root and data/ on sys.path, paths to the bundled sample."""

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "data"), str(ROOT / "tools")]

SAMPLE_JSONL = ROOT / "data" / "sample" / "fineweb_sample.jsonl"
SP1024 = ROOT / "data" / "sample" / "fineweb_1024_bpe.model"  # no byte fallback: unknown characters -> <unk>
SP8192 = ROOT / "data" / "sample" / "fineweb_8192_bpe.model"  # byte fallback
CASEOPS = ROOT / "data" / "sample" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"  # operators 4-7


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a whole-script run of train_gpt.py (or torchrun), or over 5 s on 2 CPU "
                                       "cores; the inner loop `pytest -m \"not slow\" tests` leaves these out")
    for name in caller_knobs(os.environ):  # before any fixture: the tests' runs never see the caller's knobs
        del os.environ[name]


def caller_knobs(environ) -> list[str]:
    """The variables of `environ` that train_gpt.py or its launchers would read: every knob, renamed knob and
    near miss, the run scripts' SEEDS and NAME, and torchrun's rank and rendezvous variables."""
    import dataclasses

    import train_gpt

    knobs = [f.name.upper() for f in dataclasses.fields(train_gpt.Hyperparameters)]
    return [k for k in environ if k in knobs or k in train_gpt.RENAMED or k in train_gpt.FOREIGN_NAMES - {"NUM_THREADS"}
            or k in dict(train_gpt.near_misses({k: ""}, knobs))]


@pytest.fixture(scope="session")
def sample_texts() -> list[str]:
    """The 400 bundled FineWeb documents; the first 100 are the sample's validation split."""
    return [json.loads(line)["text"] for line in SAMPLE_JSONL.read_text(encoding="utf-8").splitlines()]

# The grep contract of progress lines (docs/metric-and-logs.md, "Log lines").
STEP_LINE = re.compile(r"^step:\d+/\d+ (train_loss:\d+\.\d{4}|val_loss:\d+\.\d{4} val_bpb:\d+\.\d{4}) "
                       r"train_time:\d+ms step_avg:\d+\.\d{2}ms$")

CONFIGS = ROOT / "configs"


def read_env(path: Path) -> dict[str, str]:
    """A configs/*.env file: one NAME=value a line, # comments."""
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


# The seed stack (the 2026-03-25 record's settings of every knob the frontier defaults changed).
SEED_STACK_ENV = read_env(CONFIGS / "seed_stack.env")

# A tiny seed-stack configuration that trains in seconds on CPU (environment form, for subprocess runs).
TINY_ENV = {**{k: v for k, v in SEED_STACK_ENV.items() if k not in ("DATA_PATH", "TOKENIZER_PATH")},
            **read_env(CONFIGS / "tiny.env")}

# The official baseline's settings (docs/presets.md runs them from this file).
BASELINE_ENV = read_env(CONFIGS / "baseline.env")

# The frontier preset: the defaults, written out.
FRONTIER_ENV = read_env(CONFIGS / "frontier.env")

# quickstart.sh's configuration (the defaults at a tiny size), cut to 3 steps for tests that need whole runs.
QUICKSTART_ENV = {**read_env(CONFIGS / "quickstart.env"), "ITERATIONS": "3", "VAL_LOSS_EVERY": "0"}


def caller_env() -> dict[str, str]:
    """os.environ without caller_knobs: the base environment of a whole-script run whose configuration the test
    sets (pytest_configure has removed them already; this keeps a run clean of any set since)."""
    drop = set(caller_knobs(os.environ))
    return {k: v for k, v in os.environ.items() if k not in drop}


def tiny_h(**overrides):
    """Hyperparameters of TINY_ENV with overrides, built in-process (a variant is validated like any config). A knob
    TINY_ENV sets that an override leaves dormant (BIGRAM_DIM once BIGRAM_VOCAB_SIZE=0) goes back to its default, as a
    user switching the technique off would leave it unset."""
    import dataclasses

    import train_gpt
    from helpers import dormant

    h = train_gpt.Hyperparameters.from_env(TINY_ENV)
    kw = {**{f.name: getattr(h, f.name) for f in dataclasses.fields(h)}, **overrides}
    fields = train_gpt.Hyperparameters.__dataclass_fields__
    return train_gpt.Hyperparameters(**{**kw, **{k: fields[k].default for k in dormant(kw) - overrides.keys()}})


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory, sample_texts) -> Path:
    """Shards of real text: 30 validation documents (from the sample's validation split) and 150
    training documents, each [BOS] + tokens, with the bundled 1024-piece tokenizer."""
    import numpy as np
    import sentencepiece as spm
    from build_shards import write_shard

    sp = spm.SentencePieceProcessor(model_file=str(SP1024))
    out = tmp_path_factory.mktemp("shards")

    def encode(texts):
        return np.concatenate([[sp.bos_id()] + sp.encode(t) for t in texts]).astype(np.uint16)

    write_shard(out / "fineweb_val_000000.bin", encode(sample_texts[:30]))
    write_shard(out / "fineweb_train_000000.bin", encode(sample_texts[100:175]))
    write_shard(out / "fineweb_train_000001.bin", encode(sample_texts[175:250]))
    return out


@pytest.fixture(scope="session")
def short_val_shards(tmp_path_factory, sample_shards, sample_texts) -> Path:
    """sample_shards' training shards with a short validation shard: the first 4 validation documents
    (3,985 tokens, one 2048-token sequence or 62 of 64 tokens), for whole-script runs that assert how the script
    runs, not what it scores; each of their evaluations (a run has three to five) reads 8x fewer tokens."""
    import numpy as np
    import sentencepiece as spm
    from build_shards import write_shard

    sp = spm.SentencePieceProcessor(model_file=str(SP1024))
    out = tmp_path_factory.mktemp("short_val_shards")
    for f in sample_shards.glob("fineweb_train_*.bin"):
        (out / f.name).symlink_to(f)
    tokens = np.concatenate([[sp.bos_id()] + sp.encode(t) for t in sample_texts[:4]]).astype(np.uint16)
    write_shard(out / "fineweb_val_000000.bin", tokens)
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank, world_size, port, args, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        # plain pickle: torch's queue reducers would share memory that dies with this process
        queue.put((rank, pickle.dumps(fn(rank, world_size, *args))))
    except BaseException as e:
        queue.put((rank, pickle.dumps(RuntimeError(f"rank {rank} failed: {e!r}"))))
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args) -> list:
    """Run fn(rank, world_size, *args) in world_size spawned processes joined by a gloo group; return the
    per-rank results in rank order (fn must be a module-level function and its result picklable)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, port, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results = {rank: pickle.loads(blob) for rank, blob in (queue.get(timeout=180) for _ in procs)}
    for error in (r for r in results.values() if isinstance(r, RuntimeError)):
        raise error
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return [results[r] for r in range(world_size)]


@pytest.fixture(scope="session")
def seed_runs(tmp_path_factory, short_val_shards):
    """Three real runs of the quickstart model (the defaults at a tiny size; 1 step each, 4,096 calibration tokens,
    the short validation data, sp1024), seeds 1, 2, 3, launched as users do, by tools/run_seeds.sh, of the packed
    form (train_gpt_packed.py, which run_seeds.sh packs) of a private copy of train_gpt.py (so edits to the working
    tree during the session cannot change the code under the runs). One set of runs serves test_seeds.py (what
    run_seeds.sh writes), test_records.py (the record folder made from them) and test_pack.py (the readable copy
    scores the same). Returns a namespace: work (the folder they ran in), source (the copy), script (its packed
    form), seeds, summaries (their paths), stdout, cmd and env (to launch run_seeds.sh again)."""
    import types

    work = tmp_path_factory.mktemp("seed_runs")
    source, script = work / "train_gpt.py", work / "train_gpt_packed.py"
    shutil.copyfile(ROOT / "train_gpt.py", source)
    seeds = (1, 2, 3)
    env = {**caller_env(), **QUICKSTART_ENV, "ITERATIONS": "1", "GPTQ_CALIB_TOKENS": "4096",
           "DATA_PATH": str(short_val_shards), "TOKENIZER_PATH": str(SP1024), "VOCAB_SIZE": "1024",
           "SEEDS": " ".join(map(str, seeds)), "NAME": "qs"}
    cmd = [str(ROOT / "tools" / "run_seeds.sh"), sys.executable, str(script)]
    r = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return types.SimpleNamespace(work=work, source=source, script=script, seeds=seeds, stdout=r.stdout, cmd=cmd,
                                 env=env, summaries=[work / "logs" / f"qs_seed{seed}.json" for seed in seeds])
