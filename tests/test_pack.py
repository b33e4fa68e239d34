"""tools/pack.py: the self-extracting submission script is reproducible, exact, at most 40,000 bytes, the same
from Python 3.10, 3.11 and 3.12, inert on import, and trains to the very same scores as train_gpt.py while the
log counts the packed file's bytes; the record commands run it."""

import ast
import glob
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
from conftest import ROOT, SP1024, TINY_ENV, caller_env

sys.path.insert(0, str(ROOT / "tools"))
import make_record  # noqa: E402
import pack  # noqa: E402

SCRIPT = ROOT / "train_gpt.py"
SOURCE = SCRIPT.read_bytes()
README = (ROOT / "README.md").read_text()

# Everything strip() has to get right, in source Python 3.10 compiles: docstrings in every position (a body left
# empty, one followed by `;`, on the header's line, a string statement that is not a docstring), comments,
# continuation lines, f-strings with doubled braces, nested quotes, format specs and nested f-strings, token pairs
# that would merge without a space (`1 .real`, `'' ''`) beside pairs that need none (`- -1`, `2 ** -1`, `b'' b'x'`).
TRICKY = r'''#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""Module docstring."""
"""A string statement, not a docstring: kept."""
import math  # a comment


def only_doc():
    """Only a docstring: the body becomes `pass`."""


def semicolon(): "doc"; return 1


class Doc:
    "doc"; x = 2
    def method(self, width=6):
        """Doc."""
        # comment line
        return f"{{braces}} {self.x!r:>{width}} {'q' + 'x'} {f'{self.x:02d}'} {{{self.x}}}"


async def agen():
    """doc"""
    return 3


total = 1 + \
    2
names = ['a',   # comment inside brackets
         'b']
text = """not a docstring:
    # not a comment
"""
é = (1 .real, - -1, '' '', 2 ** -1, b'' b'x', rb'\d', 0x1f, 1e-5, 1_000, .5, 1., 1j, not -1, [...][0])
check = (lambda v: v if v else -v)(0) or (y := 4)
print(only_doc(), semicolon(), Doc().method(), Doc.x, total, names, text, é, check, y, math.pi)
'''


# the pairs of tokens in TRICKY, besides two word characters, that read differently without a space between them
MERGING = {("1", "."), ("''", "''")}


@pytest.fixture(scope="module")
def packed() -> bytes:
    return pack.pack(SOURCE)


def _interpreters() -> dict[str, str]:
    """Python 3.10, 3.11 and 3.12, where this machine has them: on PATH, or a pyenv version without a shim."""
    found = {}
    for version in ("3.10", "3.11", "3.12"):
        home = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
        for exe in (shutil.which(f"python{version}"), *sorted(glob.glob(f"{home}/versions/{version}.*/bin/python3"))):
            if exe and subprocess.run([exe, "-c", "pass"], capture_output=True).returncode == 0:
                found[version] = exe
                break
    return found


def _same(a, b, what: str):
    """a == b, failing with the first difference in context: pytest's own diff of two whole files takes minutes."""
    if a != b:
        i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        j = max(i - 80, 0)
        pytest.fail(f"{what} differ at {i} of {len(a)} / {len(b)}: {a[j:i + 80]!r} != {b[j:i + 80]!r}")


def _without_docstrings(tree: ast.Module) -> ast.Module:
    """The comparison strip() is held to: the tree without every docstring (what ast.get_docstring finds, the
    first statement of a module, class or function body when it is a string constant), and `pass` in a body it
    leaves empty. ast.dump leaves positions out, so formatting, comments and blank lines do not count."""
    for node in [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                                 ast.AsyncFunctionDef))]:
        if ast.get_docstring(node, clean=False) is not None:
            node.body = node.body[1:] or [ast.Pass()]
    return tree


def _assert_stripped(source: str, stripped: str):
    _same(ast.dump(ast.parse(stripped)), ast.dump(_without_docstrings(ast.parse(source))), "the ASTs")
    atoms = list(pack.atoms(stripped))  # tokens, an f-string one atom (3.12 splits it)
    assert not [a for a in atoms if a[0] in (tokenize.COMMENT, tokenize.NL)]  # no comments, no blank lines
    depth = 0
    for kind, text, _, _ in atoms:  # one space per indentation level
        depth += (kind == tokenize.INDENT) - (kind == tokenize.DEDENT)
        assert kind != tokenize.INDENT or text == " " * depth
    tokens = [a for a in atoms if a[0] not in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)]
    for (_, a, _, end), (_, b, start, _) in zip(tokens, tokens[1:]):  # a space on a line only where it is needed
        gap = stripped[end:start]
        needed = bool(re.match(r"\w", a[-1]) and re.match(r"\w", b[0])) or (a, b) in MERGING
        assert "\n" in gap or gap == " " * needed, (a, gap, b)


def test_stripping_removes_docstrings_comments_and_whitespace_and_nothing_else(tmp_path):
    _assert_stripped(SOURCE.decode(), pack.strip(SOURCE.decode()))
    stripped = pack.strip(TRICKY)
    _assert_stripped(TRICKY, stripped)
    assert "def only_doc():\n pass\n" in stripped and "def semicolon():return 1\n" in stripped
    assert "(1 .real,--1,'' '',2**-1,b''b'x'," in stripped  # a space only where tokens would merge
    runs = []
    for name, text in (("tricky.py", TRICKY), ("stripped.py", stripped)):
        (tmp_path / name).write_text(text, encoding="utf-8")
        r = subprocess.run([sys.executable, name], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        runs.append(r.stdout)
    assert runs[0] == runs[1]


def test_the_packed_train_gpt_counts_at_most_40000_bytes_and_holds_the_stripped_source(packed):
    stripped = pack.strip(SOURCE.decode()).encode()
    assert len(packed) <= 40_000 and len(stripped) < 0.7 * len(SOURCE)
    _same(pack.unpack(packed), stripped, "unpacked and stripped")


def test_packing_is_reproducible_and_has_the_wrapper_shape(packed):
    _same(pack.pack(SOURCE), packed, "two packings")
    m = re.fullmatch(rb'#coding:l1\nimport lzma,linecache as L\n'
                     rb'S=lzma\.decompress\(("""|\'\'\')(.*)\1\.encode\("l1"\)\)\n'
                     rb'F="train_gpt_stripped\.py";L\.cache\[F\]=\(len\(S\),None,S\.decode\(\)\.splitlines\(1\),F\)\n'
                     rb'exec\(compile\(S,F,"exec"\),\{"__name__":__name__,"__file__":__file__,"PACKED_SOURCE":S\}\)\n',
                     packed, flags=re.S)
    assert m and b"\r" not in m.group(2) and b"\0" not in m.group(2)  # escaped: Python would not read them back


@pytest.mark.slow  # five interpreter starts and packings, ~5 s
def test_every_python_from_3_10_to_3_12_packs_the_same_bytes_and_runs_them(packed, tmp_path):
    """pack.py run by each interpreter compiles its output and checks it against the AST (pack() does), so equal
    bytes mean the one packed file compiles under all three; each runs the packed TRICKY program too."""
    pythons = _interpreters()
    assert sys.version_info[:2] != (3, 11) or "3.11" in pythons
    (tmp_path / "tricky.py").write_text(TRICKY, encoding="utf-8")
    expected = subprocess.run([sys.executable, "tricky.py"], cwd=tmp_path, capture_output=True, text=True).stdout
    for version, exe in pythons.items():
        out = tmp_path / f"train_gpt_packed{version}.py"
        for source, target in ((SCRIPT, out), (tmp_path / "tricky.py", tmp_path / f"tricky{version}.py")):
            r = subprocess.run([exe, str(ROOT / "tools" / "pack.py"), str(source), "-o", str(target)],
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
        _same(out.read_bytes(), packed, f"packed by {version} and by {sys.version_info[:2]}")
        r = subprocess.run([exe, f"tricky{version}.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout == expected, (version, r.stderr)
    if len(pythons) < 3:
        pytest.skip(f"only Python {', '.join(pythons)} found here")


def test_brotli_packing_round_trips():
    pytest.importorskip("brotli")
    packed = pack.pack(SOURCE, "brotli")
    assert packed.startswith(b"#coding:l1\nimport brotli,linecache as L\nS=brotli.decompress(")
    _same(pack.pack(SOURCE, "brotli"), packed, "two packings")
    _same(pack.unpack(packed), pack.strip(SOURCE.decode()).encode(), "unpacked and stripped")


def test_importing_the_packed_file_runs_nothing(packed, tmp_path, monkeypatch, capsys):
    path = tmp_path / "train_gpt_packed.py"
    path.write_bytes(packed)
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(path), run_name="train_gpt_packed")  # defines everything, calls no main()
    assert capsys.readouterr() == ("", "") and sorted(os.listdir(tmp_path)) == ["train_gpt_packed.py"]


def test_the_cli_refuses_invalid_or_packed_input(tmp_path, capsys):
    bad, latin, out = tmp_path / "bad.py", tmp_path / "latin.py", tmp_path / "out.py"
    bad.write_text("def f(:\n")
    assert pack.main([str(bad), "-o", str(out)]) == 2 and "not valid Python" in capsys.readouterr().err
    latin.write_bytes(b"# -*- coding: latin-1 -*-\nx = '\xe9'\n")
    assert pack.main([str(latin), "-o", str(out)]) == 2 and "not UTF-8" in capsys.readouterr().err
    assert pack.main([str(SCRIPT), "-o", str(out)]) == 0
    stripped = len(pack.strip(SOURCE.decode()).encode())
    assert (f"source_bytes:{len(SOURCE)} stripped_bytes:{stripped} packed_bytes:{out.stat().st_size}"
            in capsys.readouterr().out)
    assert pack.main([str(out), "-o", str(tmp_path / "again.py")]) == 2
    assert "already packed" in capsys.readouterr().err and not (tmp_path / "again.py").exists()
    assert pack.main([str(out), "-o", str(out)]) == 2 and "overwrite the input" in capsys.readouterr().err


def test_the_record_commands_run_the_packed_script():
    """The README's record run packs, then runs the packed file; run_seeds.sh's usage and make_record.py's
    --script default name it too."""
    record = re.search(r"## Record run \(8×H100\)\s*```bash\n(.+?)\n```", README, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in record.splitlines()]
    runs = [i for i, c in enumerate(commands) if "torchrun" in c]
    assert runs and all(commands[i].endswith(" train_gpt_packed.py") for i in runs)
    assert commands.index("python3 tools/pack.py") < runs[0]
    usage = subprocess.run([str(ROOT / "tools" / "run_seeds.sh")], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "train_gpt_packed.py" in usage.stderr
    argv = ["--name", "n", "--author", "a", "--github-id", "g", "--blurb", "b", "x.json"]
    assert make_record.parse_args(argv).script == Path("train_gpt_packed.py")
    # every log starts with the stripped source, which the README's score grep must not match either
    grep = re.search(r'^grep -E "([^"]+)" logs/\*\.txt', README, flags=re.M).group(1)
    assert not any(re.search(grep, line) for line in pack.strip(SOURCE.decode()).splitlines())


def _exact(log: str) -> list[str]:
    return [l for l in log.splitlines() if re.match(r"\w+_exact ", l)]


def _line(log, start):
    return next(l for l in log.splitlines() if l.startswith(start))


def _assert_counts_packed(log: str, summary: dict, packed: bytes):
    n, stripped = len(packed), pack.unpack(packed)
    assert log.startswith(stripped.decode())  # the source that ran heads the log, not the wrapper
    assert _line(log, "code ") == f"code source_bytes:{len(stripped)} packed_bytes:{n} counted:packed counted_bytes:{n}"
    assert _line(log, "artifact ").startswith(f"artifact code_bytes:{n} ")
    assert summary["artifact"]["code_bytes"] == summary["code"]["counted_bytes"] == n


def _train(script, cwd, shards):
    """A whole run of the tiny configuration, 2 steps (any configuration trains to one score per script)."""
    env = {**caller_env(), **TINY_ENV, "ITERATIONS": "2", "VAL_LOSS_EVERY": "0", "DATA_PATH": str(shards),
           "TOKENIZER_PATH": str(SP1024), "RUN_ID": "e2e"}
    r = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return (cwd / "logs" / "e2e.txt").read_text(), json.loads((cwd / "logs" / "e2e.json").read_text())


@pytest.mark.slow
def test_the_packed_script_trains_to_the_same_score_and_counts_its_own_bytes(packed, tmp_path, short_val_shards):
    plain_dir, packed_dir = tmp_path / "plain", tmp_path / "packed"
    plain_dir.mkdir(), packed_dir.mkdir()
    script = packed_dir / "train_gpt_packed.py"
    script.write_bytes(packed)
    (plain, _), (log, summary) = _train(SCRIPT, plain_dir, short_val_shards), _train(script, packed_dir,
                                                                                     short_val_shards)
    assert _exact(log) == _exact(plain) and "final_int8_zlib_roundtrip_exact" in _exact(log)[-1]
    _assert_counts_packed(log, summary, packed)
    assert _line(plain, "code ") == (f"code source_bytes:{len(SOURCE)} packed_bytes:none counted:source "
                                     f"counted_bytes:{len(SOURCE)}")


@pytest.mark.slow
def test_the_packed_quickstart_scores_as_the_readable_script(seed_runs, tmp_path):
    """conftest's seed_runs ran the quickstart configuration (1 step, the short validation data) packed, by
    tools/run_seeds.sh; the readable script it was packed from, run with seed 1's environment, prints the same
    digits on every final line, the TTT one included."""
    env = {**{k: v for k, v in seed_runs.env.items() if k not in ("SEEDS", "NAME")}, "SEED": "1", "RUN_ID": "plain"}
    r = subprocess.run([sys.executable, str(seed_runs.source)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    plain, log = (tmp_path / "logs" / "plain.txt").read_text(), (seed_runs.work / "logs" / "qs_seed1.txt").read_text()
    assert _exact(log) == _exact(plain) and any(l.startswith("legal_ttt_exact ") for l in _exact(log))
    _assert_counts_packed(log, json.loads(seed_runs.summaries[0].read_text()), seed_runs.script.read_bytes())
