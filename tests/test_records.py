"""The record tooling: the t distribution and significance test of tools/stats.py, every refusal of
tools/make_record.py, and a record folder built end to end from three real tiny runs (conftest's seed_runs)."""

import hashlib
import json
import math
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import make_record  # noqa: E402
import stats  # noqa: E402

SEEDS = (1, 2, 3)


# ---------------------------------------------------------------------------------------------- stats.py

@pytest.mark.parametrize("t, df, p, tol", [
    (1.886, 2, 0.10, 1e-4), (6.965, 2, 0.01, 1e-5), (2.015, 5, 0.05, 1e-5), (2.998, 7, 0.01, 1e-5),
    (1.645, 1e9, 0.05, 1e-4), (0.0, 3, 0.5, 1e-15), (12.706, 1, 0.025, 1e-5),
])
def test_t_tail_matches_table_values(t, df, p, tol):
    assert stats.student_t_sf(t, df) == pytest.approx(p, abs=tol)


@pytest.mark.parametrize("t", [-40.0, -3.0, -1.0, -0.2, 0.0, 1e-6, 0.5, 1.0, 2.5, 7.0, 80.0, 1e5])
def test_t_cdf_matches_closed_forms_to_1e_12(t):
    """Small df have closed forms: df=1 is the Cauchy, then df=2, 3 and 4."""
    closed = {
        1: 0.5 + math.atan(t) / math.pi,
        2: 0.5 + t / (2 * math.sqrt(t * t + 2)),
        3: 0.5 + (t / (math.sqrt(3) * (1 + t * t / 3)) + math.atan(t / math.sqrt(3))) / math.pi,
        4: 0.5 + 0.375 * t / math.sqrt(1 + t * t / 4) * (1 - t * t / (12 * (1 + t * t / 4))),
    }
    for df, cdf in closed.items():
        assert abs(stats.student_t_cdf(t, df) - cdf) < 1e-12, df
        assert abs(stats.student_t_sf(t, df) - (1 - cdf)) < 1e-12, df
    assert stats.student_t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-14)


@pytest.mark.parametrize("df", [5, 9.5, 30, 250])
def test_t_tail_matches_numerical_integration_of_the_density(df):
    """An independent check at larger df: Simpson's rule on the density, 0 to t, 20000 intervals."""
    const = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    for t in (0.3, 1.7, 4.0):
        n, h = 20_000, t / 20_000
        f = [const * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        area = h / 3 * (f[0] + f[-1] + 4 * math.fsum(f[1:-1:2]) + 2 * math.fsum(f[2:-1:2]))
        assert abs(stats.student_t_sf(t, df) - (0.5 - area)) < 1e-11, (df, t)


def test_t_tail_is_accurate_far_out_and_tends_to_the_normal():
    # relative accuracy where 1 - cdf would cancel: the df=1 tail at t is 1/(pi t) (1 - 1/(3t^2) + ...)
    assert stats.student_t_sf(1e4, 1) == pytest.approx(math.atan(1e-4) / math.pi, rel=1e-10)
    for z in (-2.0, 0.7, 3.0):  # at df=1e7 the t and normal tails differ by ~1e-8
        assert stats.student_t_sf(z, 1e7) == pytest.approx(0.5 * math.erfc(z / math.sqrt(2)), abs=5e-8)
    assert stats.student_t_sf(math.inf, 3) == 0.0 and stats.student_t_sf(-math.inf, 3) == 1.0


def test_mean_std_and_the_improvement_test():
    xs = [1.100, 1.110, 1.105]
    assert stats.mean(xs) == pytest.approx(1.105) and stats.sample_std(xs) == pytest.approx(0.005)
    r = stats.improvement_test(xs, sota=1.1194)
    assert r.df == 2 and r.t == pytest.approx((1.1194 - 0.005 - 1.105) / (0.005 / math.sqrt(3)))
    assert r.p == pytest.approx(stats.student_t_sf(r.t, 2)) and not r.significant
    text = r.statement()
    assert "One-sided one-sample t-test, df=n-1=2" in text and "H0: mean(val_loss) >= SOTA - 0.005" in text
    assert "H1: mean(val_loss) < 1.114400" in text and "not significant at p < 0.01" in text
    tight = stats.improvement_test([1.100, 1.1001, 1.0999], sota=1.1194)
    assert tight.p < 1e-4 and tight.significant and "significant at p < 0.01" in tight.statement()


def test_one_seed_gives_no_test_and_equal_seeds_a_degenerate_one():
    one = stats.improvement_test([1.10], sota=1.12)
    assert one.p is None and one.t is None and stats.sample_std([1.10]) is None
    assert "No test possible" in one.statement() and not one.significant
    better = stats.improvement_test([1.10, 1.10, 1.10], sota=1.12)
    assert better.std == 0 and better.t == math.inf and better.p == 0.0 and "s = 0" in better.statement()
    worse = stats.improvement_test([1.118, 1.118], sota=1.12)
    assert worse.t == -math.inf and worse.p == 1.0 and not worse.significant


# ---------------------------------------------------------------------------------------------- real runs

@pytest.fixture(scope="module")
def runs(seed_runs):
    """The three real quickstart runs of conftest's seed_runs (seeds 1, 2, 3, by tools/run_seeds.sh, of the packed
    form of a private copy of train_gpt.py). Returns (script, [summary paths])."""
    assert seed_runs.seeds == SEEDS
    return seed_runs.script, seed_runs.summaries


def make(out, script, summaries, *extra):
    argv = ["--name", "TinyTest", "--author", "Test Author", "--github-id", "tester", "--blurb", "A tiny test.",
            "--date", "2026-01-02", "--script", str(script), "--out", str(out), *extra, *map(str, summaries)]
    return make_record.main(argv)


def crafted(tmp_path, runs, edit=None):
    """Copies of the three runs' summaries and logs in tmp_path/logs, as if they had run on 8 CUDA devices on the
    canonical sp1024 data (the real runs are on this CPU, on the sample); edit(seed, summary) may change them
    further."""
    logs = tmp_path / "logs"
    logs.mkdir()
    paths = []
    for src in runs[1]:
        s = json.loads(src.read_text())
        s.update(device="NVIDIA H100 80GB HBM3", devices={"type": "cuda", "count": 8})
        s["data"].update(train_shards=80, train_full_shards=80, val_tokens=62_021_632)
        if edit:
            edit(s["seed"], s)
        dst = logs / src.name
        dst.write_text(json.dumps(s))
        shutil.copyfile(src.with_suffix(".txt"), dst.with_suffix(".txt"))
        paths.append(dst)
    return paths


def on_seed(seed, key, value):
    """An edit for crafted(): set the dotted key of one seed's summary to value."""
    def edit(s_seed, s):
        if s_seed == seed:
            *path, last = key.split(".")
            d = s
            for k in path:
                d = d[k]
            d[last] = value
    return edit


def refused(capsys, out, code, *needles):
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("make_record.py: refused: ") and len(err.strip().splitlines()) == 1
    for needle in needles:
        assert needle in err, err
    assert not out.exists()  # refused before anything was created, not even the parent folder


REFUSALS = {
    "over_size": (on_seed(2, "artifact.total_bytes", 16_000_001), "seed2.json", "over the 16,000,000-byte cap"),
    "train_over_time": (on_seed(3, "train_ms", 600_001.0), "seed3.json", "training took 600.0s"),
    "eval_over_time": (on_seed(1, "eval_ms", 612_345.0), "seed1.json", "evaluation took 612.3s"),
    "different_code": (on_seed(2, "code.sha256", "0" * 64), "seed2.json", "ran different code"),
    "different_config": (on_seed(3, "config_sha256", "f" * 64), "seed3.json", "different configuration"),
    "duplicate_seed": (on_seed(2, "seed", 1), "seed2.json", "seed 1 appears twice (also in"),
    "wrong_format": (on_seed(1, "format", "something-else/2"), "seed1.json", "not a run summary of format"),
    "missing_key": (lambda seed, s: s["artifact"].pop("total_bytes") if seed == 2 else None, "seed2.json",
                    "'artifact.total_bytes' is missing"),
    "cpu_run": (on_seed(1, "devices.type", "cpu"), "seed1.json", "ran on 8 cpu device(s)",
                "a record needs 8 CUDA devices"),
    "one_gpu": (on_seed(3, "devices.count", 1), "seed3.json", "ran on 1 cuda device(s)"),
    "small_val": (on_seed(1, "data.val_tokens", 121_856), "seed1.json", "not the canonical sp1024 data"),
    "local_shards": (on_seed(2, "data.train_shards", 1499), "seed2.json", "train_shards:1499"),
    "different_data": (on_seed(3, "data.tokenizer_sha256", "0" * 64), "seed3.json",
                       "ran on different data than seed 1", "tokenizer_sha256 differ"),
}


@pytest.mark.slow  # the `runs` fixture launches three whole-script runs
@pytest.mark.parametrize("case", REFUSALS)
def test_refuses_runs_that_break_a_rule(case, runs, tmp_path, capsys):
    edit, *needles = REFUSALS[case]
    out = tmp_path / "out"
    refused(capsys, out, make(out, runs[0], crafted(tmp_path, runs, edit)), *needles)


@pytest.mark.slow  # the `runs` fixture launches three whole-script runs
def test_refuses_missing_or_unreadable_summaries_and_missing_logs(runs, tmp_path, capsys):
    paths, out = crafted(tmp_path, runs), tmp_path / "out"
    refused(capsys, out, make(out, runs[0], [*paths, tmp_path / "logs" / "nope.json"]), "nope.json", "not found")
    paths[1].write_text("{not json")
    refused(capsys, out, make(out, runs[0], paths), "seed2.json", "invalid JSON")
    paths[1].write_bytes(b"\xff\xfe\x00")
    refused(capsys, out, make(out, runs[0], paths), "seed2.json", "cannot read")
    shutil.copyfile(runs[1][1], paths[1])
    log = paths[0].with_suffix(".txt")
    log.write_bytes(b"#" + log.read_bytes()[1:])  # a log whose source is not the code the summary names
    refused(capsys, out, make(out, runs[0], paths), "seed1.txt", "not the log of this run")
    shutil.copyfile(runs[1][0].with_suffix(".txt"), log)
    paths[2].with_suffix(".txt").unlink()
    refused(capsys, out, make(out, runs[0], paths), "seed3.json", "seed3.txt is missing")


def test_command_line_exit_codes(tmp_path):
    """Run as a script: a refusal and a bad --name both exit 2, with a message on stderr."""
    base = [sys.executable, str(ROOT / "tools" / "make_record.py"), "--author", "a", "--github-id", "g",
            "--blurb", "b", "--out", str(tmp_path / "out")]
    r = subprocess.run([*base, "--name", "x", str(tmp_path / "gone.json")], capture_output=True, text=True)
    assert r.returncode == 2 and "refused:" in r.stderr and "gone.json: run summary not found" in r.stderr
    r = subprocess.run([*base, "--name", "../escape", str(tmp_path / "gone.json")], capture_output=True, text=True)
    assert r.returncode == 2 and "--name '../escape'" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # the `runs` fixture launches three whole-script runs
def test_refuses_a_script_that_is_not_the_code_that_ran(runs, tmp_path, capsys):
    other, out = tmp_path / "train_gpt.py", tmp_path / "out"
    other.write_bytes(runs[0].read_bytes() + b"\n")
    summaries = crafted(tmp_path, runs)
    refused(capsys, out, make(out, other, summaries), str(other), "is not the code the runs ran")
    refused(capsys, out, make(out, tmp_path / "missing.py", summaries), "missing.py", "cannot read the script")


@pytest.mark.slow  # the `runs` fixture launches three whole-script runs
def test_refuses_an_existing_target_and_leaves_nothing_behind_on_failure(runs, tmp_path, capsys, monkeypatch):
    out, summaries = tmp_path / "out", crafted(tmp_path, runs)
    (out / "2026-01-02_TinyTest").mkdir(parents=True)
    assert make(out, runs[0], summaries) == 2 and "already exists" in capsys.readouterr().err
    (out / "2026-01-02_TinyTest").rmdir()

    def broken_copy(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(make_record.shutil, "copyfile", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        make(out, runs[0], summaries)
    assert list(out.iterdir()) == []  # no record folder, no temporary folder


@pytest.mark.slow  # the `runs` fixture launches three whole-script runs
def test_non_record_allows_over_time_but_not_over_size(runs, tmp_path, capsys):
    slow = crafted(tmp_path, runs, on_seed(2, "train_ms", 700_000.0))
    out = tmp_path / "out"
    assert make(out, runs[0], slow) == 2
    capsys.readouterr()
    assert make(out, runs[0], slow, "--non-record") == 0
    sub = json.loads((out / "2026-01-02_TinyTest" / "submission.json").read_text())
    assert sub["non_record"] is True and sub["seeds"][1]["train_ms"] == 700_000.0
    assert "Non-record submission" in (out / "2026-01-02_TinyTest" / "README.md").read_text()
    assert make(tmp_path / "cpu", runs[0], runs[1], "--non-record") == 0  # the real runs, on this CPU

    big = tmp_path / "big"
    big.mkdir()
    huge = crafted(big, runs, on_seed(1, "artifact.total_bytes", 16_000_001))
    code = make(big / "out", runs[0], huge, "--non-record")
    refused(capsys, big / "out", code, "seed1.json", "over the 16,000,000-byte cap")


@pytest.mark.slow  # the `runs` fixture launches three whole-script runs
def test_builds_a_record_folder_from_three_real_runs(runs, tmp_path, capsys):
    script, summaries = runs[0], crafted(tmp_path, runs)
    out = tmp_path / "records" / "track_10min_16mb"
    assert make(out, script, summaries[::-1], "--sota-val-loss", "9.0") == 0
    folder = out / "2026-01-02_TinyTest"
    assert f"wrote {folder}/" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["2026-01-02_TinyTest"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["README.md", "submission.json", "train_gpt.py", "requirements.txt"] + [f"train_seed{s}.log" for s in SEEDS])
    assert (folder / "train_gpt.py").read_bytes() == script.read_bytes()
    assert (folder / "requirements.txt").read_bytes() == (ROOT / "requirements.txt").read_bytes()
    summ = [json.loads(p.read_text()) for p in summaries]
    for s, p in zip(summ, summaries):
        assert (folder / f"train_seed{s['seed']}.log").read_bytes() == p.with_suffix(".txt").read_bytes()
        assert s["code"]["sha256"] == hashlib.sha256(script.read_bytes()).hexdigest()

    sub = json.loads((folder / "submission.json").read_text())
    losses = [s["score"]["val_loss"] for s in summ]
    assert sub["val_loss"] == pytest.approx(sum(losses) / 3, rel=1e-15, abs=0)
    assert sub["val_bpb"] == pytest.approx(sum(s["score"]["val_bpb"] for s in summ) / 3, rel=1e-15, abs=0)
    assert sub["val_loss_std"] == pytest.approx(stats.sample_std(losses))
    assert sub["bytes_total"] == max(s["artifact"]["total_bytes"] for s in summ)
    assert sub["bytes_code"] == script.stat().st_size and sub["non_record"] is False
    assert [x["seed"] for x in sub["seeds"]] == list(SEEDS)
    assert {k: sub[k] for k in ("author", "github_id", "name", "blurb", "date")} == dict(
        author="Test Author", github_id="tester", name="TinyTest", blurb="A tiny test.", date="2026-01-02")

    readme = (folder / "README.md").read_text()
    env = " ".join(f"{k}={v}" for k, v in summ[0]["env"].items())
    for s in summ:
        row = f"| {s['seed']} | {s['steps']} | {s['train_ms'] / 1000:.1f} | {s['eval_ms'] / 1000:.1f} | "
        assert row + f"{s['score']['val_loss']:.5f} | {s['score']['val_bpb']:.5f} |" in readme
        assert f"{s['artifact']['total_bytes']:,} |" in readme
        assert f"{env} SEED={s['seed']} torchrun --standalone --nproc_per_node=1 train_gpt.py" in readme
    assert "One-sided one-sample t-test, df=n-1=2" in readme and "| legal_ttt val_loss |" in readme
    assert "| roundtrip val_loss |" not in readme  # a stage no run ran (a diagnostic, off by default) is left out
    assert f"val_loss {sub['val_loss']:.6f} (sample std {sub['val_loss_std']:.6f})" in readme


def _run(tmp_path, **data):
    fp = dict(variant="caseops", train_shards=80, train_full_shards=79, val_tokens=47_851_520,
              tokenizer_sha256="a" * 64) | data
    return make_record.Run(tmp_path / "seed1.json", tmp_path / "seed1.txt", {"seed": 1, "data": fp})


@pytest.mark.parametrize("data, needle", [
    (dict(val_tokens=9_662_464), "not the canonical caseops data: train_shards:80 (79 of 10^8 tokens) "
                                 "val_tokens:9662464, expected train_shards 80 of 10^8 tokens and val_tokens "
                                 "47851520 or 47853343"),  # the 10,000-document validation split of PR #1923
    (dict(train_shards=1499, train_full_shards=0), "train_shards:1499"),  # 10^7-token local shards (PR #2130)
    (dict(train_full_shards=70), "(70 of 10^8 tokens)"),
    (dict(variant="sp2048"), "variant 'sp2048', which has no canonical fingerprint"),
    (dict(variant="sp1024"), "not the canonical sp1024 data"),
])
def test_data_fingerprint_refusals(tmp_path, data, needle):
    with pytest.raises(make_record.Refusal, match=re.escape(needle)):
        make_record.check_data(_run(tmp_path, **data), non_record=False)
    make_record.check_data(_run(tmp_path, **data), non_record=True)  # a non-record submission may use any data


@pytest.mark.parametrize("data", [dict(), dict(val_tokens=47_853_343), dict(train_full_shards=80),
                                  dict(variant="sp8192", train_shards=128, train_full_shards=128,
                                       val_tokens=40_540_160),
                                  dict(variant="sp1024", val_tokens=62_021_632)])
def test_canonical_data_passes(tmp_path, data):
    make_record.check_data(_run(tmp_path, **data), non_record=False)
