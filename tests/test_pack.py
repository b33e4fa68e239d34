"""tools/pack.py: the self-extracting submission script is reproducible, exact, smaller, inert on import, and
trains to the very same score as train_gpt.py while the log counts the packed file's bytes."""

import base64
import lzma
import os
import re
import runpy
import subprocess
import sys

import pytest
from conftest import ROOT, SP1024, TINY_ENV

sys.path.insert(0, str(ROOT / "tools"))
import pack  # noqa: E402

SCRIPT = ROOT / "train_gpt.py"
SOURCE = SCRIPT.read_bytes()


@pytest.fixture(scope="module")
def packed() -> bytes:
    return pack.pack(SOURCE)


def test_packing_is_reproducible_and_has_the_three_line_shape(packed):
    assert pack.pack(SOURCE) == packed
    lines = packed.decode("ascii").splitlines()
    assert len(lines) == 3 and lines[0] == "import base64,lzma"
    assert re.fullmatch(r'S=lzma\.decompress\(base64\.b85decode\(b"[^"\\]+"\)\)', lines[1])
    assert lines[2] == ('exec(compile(S,"train_gpt.py","exec"),'
                        '{"__name__":__name__,"__file__":__file__,"PACKED_SOURCE":S})')


def test_the_packed_file_holds_exactly_the_source_and_is_smaller(packed):
    literal = re.search(rb'b85decode\(b"([^"]+)"\)', packed).group(1)
    assert lzma.decompress(base64.b85decode(literal)) == SOURCE
    assert len(packed) < 0.5 * len(SOURCE)


def test_brotli_packing_round_trips():
    brotli = pytest.importorskip("brotli")
    packed = pack.pack(SOURCE, "brotli")
    assert packed.startswith(b"import base64,brotli\nS=brotli.decompress(") and pack.pack(SOURCE, "brotli") == packed
    assert brotli.decompress(base64.b85decode(re.search(rb'b"([^"]+)"', packed).group(1))) == SOURCE


def test_importing_the_packed_file_runs_nothing(packed, tmp_path, monkeypatch, capsys):
    path = tmp_path / "train_gpt_packed.py"
    path.write_bytes(packed)
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(path), run_name="train_gpt_packed")  # defines everything, calls no main()
    assert capsys.readouterr() == ("", "") and sorted(os.listdir(tmp_path)) == ["train_gpt_packed.py"]


def test_the_cli_refuses_invalid_or_packed_input(tmp_path, capsys):
    bad, out = tmp_path / "bad.py", tmp_path / "out.py"
    bad.write_text("def f(:\n")
    assert pack.main([str(bad), "-o", str(out)]) == 2 and "not valid Python" in capsys.readouterr().err
    assert pack.main([str(SCRIPT), "-o", str(out)]) == 0
    assert f"source_bytes:{len(SOURCE)} packed_bytes:{out.stat().st_size}" in capsys.readouterr().out
    assert pack.main([str(out), "-o", str(tmp_path / "again.py")]) == 2
    assert "already packed" in capsys.readouterr().err and not (tmp_path / "again.py").exists()


def _train(script, cwd, shards):
    """A whole run of the tiny configuration, 2 steps (any configuration trains to one score per script)."""
    env = {**os.environ, **TINY_ENV, "ITERATIONS": "2", "VAL_LOSS_EVERY": "0", "DATA_PATH": str(shards),
           "TOKENIZER_PATH": str(SP1024), "RUN_ID": "e2e"}
    r = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return (cwd / "logs" / "e2e.txt").read_text()


def _line(log, start):
    return next(l for l in log.splitlines() if l.startswith(start))


@pytest.mark.slow
def test_the_packed_script_trains_to_the_same_score_and_counts_its_own_bytes(packed, tmp_path, short_val_shards):
    plain_dir, packed_dir = tmp_path / "plain", tmp_path / "packed"
    plain_dir.mkdir(), packed_dir.mkdir()
    script = packed_dir / "train_gpt_packed.py"
    script.write_bytes(packed)
    plain, log = _train(SCRIPT, plain_dir, short_val_shards), _train(script, packed_dir, short_val_shards)
    final = "final_int8_zlib_roundtrip_exact "
    assert _line(log, final) == _line(plain, final)
    assert log.startswith(SOURCE.decode())  # the real source heads the log, not the packed wrapper
    n = len(packed)
    assert _line(log, "code ") == f"code source_bytes:{len(SOURCE)} packed_bytes:{n} counted:packed counted_bytes:{n}"
    assert _line(log, "artifact ").startswith(f"artifact code_bytes:{n} ")
    assert _line(plain, "code ") == (f"code source_bytes:{len(SOURCE)} packed_bytes:none counted:source "
                                     f"counted_bytes:{len(SOURCE)}")
