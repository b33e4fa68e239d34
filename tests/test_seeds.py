"""tools/run_seeds.sh: the same command once per seed, each run with its own log, summary and artifact."""

import json
import subprocess

import pytest


@pytest.mark.slow
def test_each_seed_gets_its_own_log_summary_and_artifact(seed_runs):
    """conftest's seed_runs ran `SEEDS="1 2 3" NAME=qs tools/run_seeds.sh python3 train_gpt_packed.py` (the
    runs test_records.py makes a record folder of); here, what run_seeds.sh itself wrote and refuses."""
    work, seeds = seed_runs.work, seed_runs.seeds
    # it packed train_gpt.py beside the file the command names, once, and every seed ran and counted that file
    assert seed_runs.stdout.count(f"packed {seed_runs.source} -> {seed_runs.script} ") == 1
    scores = [l for l in seed_runs.stdout.splitlines() if l.startswith("final_int8_zlib_roundtrip_exact")]
    assert len(scores) == 2 * len(seeds)  # each run prints it, and the script repeats it after each run
    for seed in seeds:
        summary = json.loads((work / "logs" / f"qs_seed{seed}.json").read_text())
        assert summary["seed"] == seed and summary["run_id"] == f"qs_seed{seed}"
        assert summary["code"]["counted"] == "packed"
        assert summary["code"]["counted_bytes"] == seed_runs.script.stat().st_size
        assert (work / "logs" / f"qs_seed{seed}.ptz").stat().st_size == summary["artifact"]["model_bytes"]
        assert f"hparam seed:{seed}" in (work / "logs" / f"qs_seed{seed}.txt").read_text()
    assert (work / "final_model.ptz").read_bytes() == (work / "logs" / f"qs_seed{seeds[-1]}.ptz").read_bytes()
    again = subprocess.run(seed_runs.cmd, cwd=work, env=seed_runs.env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and f"logs/qs_seed{seeds[0]}.json exists" in again.stderr
    usage = subprocess.run(seed_runs.cmd[:1], cwd=work, env=seed_runs.env, capture_output=True, text=True,
                           timeout=60)
    assert usage.returncode == 2 and "usage:" in usage.stderr
