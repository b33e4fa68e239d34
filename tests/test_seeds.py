"""tools/run_seeds.sh: the same command once per seed, each run with its own log, summary and artifact."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, SP1024, TINY_ENV

SCRIPT = ROOT / "tools" / "run_seeds.sh"


@pytest.mark.slow
def test_each_seed_gets_its_own_log_summary_and_artifact(tmp_path, sample_shards):
    env = {**os.environ, **TINY_ENV, "DATA_PATH": str(sample_shards), "TOKENIZER_PATH": str(SP1024),
           "SEEDS": "7 8", "NAME": "tiny", "ITERATIONS": "2", "VAL_LOSS_EVERY": "0"}
    cmd = [str(SCRIPT), sys.executable, str(ROOT / "train_gpt.py")]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    scores = [l for l in r.stdout.splitlines() if l.startswith("final_int8_zlib_roundtrip_exact")]
    assert len(scores) == 4  # each run prints it, and the script repeats it after each run
    for seed in (7, 8):
        summary = json.loads((tmp_path / "logs" / f"tiny_seed{seed}.json").read_text())
        assert summary["seed"] == seed and summary["run_id"] == f"tiny_seed{seed}"
        assert (tmp_path / "logs" / f"tiny_seed{seed}.ptz").stat().st_size == summary["artifact"]["model_bytes"]
        assert f"hparam seed:{seed}" in (tmp_path / "logs" / f"tiny_seed{seed}.txt").read_text()
    assert (tmp_path / "final_model.ptz").read_bytes() == (tmp_path / "logs" / "tiny_seed8.ptz").read_bytes()
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "logs/tiny_seed7.json exists" in again.stderr
    usage = subprocess.run([str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "usage:" in usage.stderr
