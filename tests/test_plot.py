"""tools/plot.py: exact parsing of train logs (source header ignored), a clear error without matplotlib, and a
real PNG when matplotlib is installed."""

import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import plot  # noqa: E402

# A log as train_gpt.py writes it: the source first (its f-strings and docstrings must not parse as data),
# then header lines, progress lines, other stages' scores, and the official score line.
LOG = '''"""Example in a docstring:
step:<s>/<N> train_loss:<x> train_time:<ms>ms step_avg:<x>ms
"""
    log(f"step:{step}/{h.iterations} train_loss:{loss.item():.4f} train_time:{elapsed_ms:.0f}ms "
    log(f"final_int8_zlib_roundtrip_exact val_loss:{r.val_loss:.8f} val_bpb:{r.val_bpb:.8f}")
versions python:3.11.2 torch:2.13.0
step:0/6 val_loss:6.9307 val_bpb:3.8473 train_time:0ms step_avg:0.00ms
step:1/6 train_loss:6.9315 train_time:1345ms step_avg:1344.80ms
step:2/6 train_loss:6.6242 train_time:2696ms step_avg:1347.99ms
step:3/6 val_loss:6.1000 val_bpb:3.3900 train_time:4039ms step_avg:1346.40ms
step:3/6 train_loss:6.5182 train_time:4039ms step_avg:1346.40ms
step:6/6 val_loss:5.5000 val_bpb:3.0500 train_time:8100ms step_avg:1350.00ms
final_int6_roundtrip_exact val_loss:5.60000000 val_bpb:3.10000000
final_int8_zlib_roundtrip_exact val_loss:5.55000000 val_bpb:3.07000000
'''


@pytest.fixture
def log(tmp_path):
    path = tmp_path / "run_a.txt"
    path.write_text(LOG)
    return path


def test_parse_log_reads_exact_values(log):
    run = plot.parse_log(log)
    assert run == {
        "train_step": [1, 2, 3], "train_loss": [6.9315, 6.6242, 6.5182], "train_time_s": [1.345, 2.696, 4.039],
        "val_step": [0, 3, 6], "val_loss": [6.9307, 6.1, 5.5], "val_bpb": [3.8473, 3.39, 3.05],
        "val_time_s": [0.0, 4.039, 8.1], "final": {"val_loss": 5.55, "val_bpb": 3.07},
    }


def test_a_run_without_a_final_line_and_a_log_without_steps(tmp_path, capsys):
    cut = tmp_path / "cut.txt"
    cut.write_text(LOG.split("final_int6")[0])
    assert plot.parse_log(cut)["final"] is None and len(plot.parse_log(cut)["val_bpb"]) == 3
    empty = tmp_path / "empty.txt"
    empty.write_text("versions python:3.11.2\n")
    assert plot.main([str(empty), "-o", str(tmp_path / "x.png")]) == 2
    assert "no step lines" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_missing_matplotlib_is_a_clear_error(log, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert plot.main([str(log), "-o", str(tmp_path / "c.png")]) == 2
    assert "matplotlib is not installed: pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_a_png_is_written(log, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    other = tmp_path / "run_b.txt"
    other.write_text(LOG.split("final_int6")[0].replace("train_loss:6.6", "train_loss:6.4"))
    out = tmp_path / "curves.png"
    assert plot.main([str(log), str(other), "-o", str(out), "--labels", "a,b"]) == 0
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "run_a.txt", "run_b.txt"]  # no temp left
    assert f"wrote {out} (2 runs)" in capsys.readouterr().out
