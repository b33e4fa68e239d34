"""Guards for the rules the trainer is written by: one config object, every knob used, no globals, a line
budget, and a README that gives the command CI runs (the docs' own checks: tests/test_docs.py)."""

import ast
import dataclasses
import re

import pytest

from conftest import ROOT

import train_gpt

SOURCE = (ROOT / "train_gpt.py").read_text()
TREE = ast.parse(SOURCE)
README = (ROOT / "README.md").read_text()
PRESETS = (ROOT / "docs" / "presets.md").read_text()


def _functions_containing(pattern: str) -> set[str]:
    found = set()
    for node in ast.walk(TREE):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if re.search(pattern, ast.get_source_segment(SOURCE, node)):
                found.add(node.name)
    return found


def test_environment_is_read_only_by_the_config_and_dist_setup():
    assert _functions_containing(r"os\.environ") == {"from_env", "torchrun_env"}
    inside = sum(ast.get_source_segment(SOURCE, n).count("os.environ") for n in ast.walk(TREE)
                 if isinstance(n, ast.FunctionDef) and n.name in ("from_env", "torchrun_env"))
    assert inside == SOURCE.count("os.environ")  # none at module level either


def test_no_global_statements_and_a_line_budget():
    assert not any(isinstance(n, (ast.Global, ast.Nonlocal)) for n in ast.walk(TREE))
    assert len(SOURCE.splitlines()) <= 3600  # the budget stated in the docstring


def test_every_knob_is_used_outside_its_declaration():
    """Read as h.<knob> outside the Hyperparameters class, or inside one of its derived properties that is itself
    read as h.<property> outside the class."""
    cls = next(n for n in TREE.body if isinstance(n, ast.ClassDef) and n.name == "Hyperparameters")
    outside = SOURCE.replace(ast.get_source_segment(SOURCE, cls), "")
    used_props = [ast.get_source_segment(SOURCE, n) for n in cls.body if isinstance(n, ast.FunctionDef)
                  and any(ast.unparse(d) in ("property", "functools.cached_property") for d in n.decorator_list)
                  and re.search(rf"\bh\.{n.name}\b", outside)]
    for f in dataclasses.fields(train_gpt.Hyperparameters):
        used = re.search(rf"\bh\.{f.name}\b|\bh\.used\(\"{f.name}\"\)", outside) or \
            any(re.search(rf"\bself\.{f.name}\b", p) for p in used_props)
        assert used, f"knob {f.name.upper()} is never used"


def test_ci_runs_the_readme_test_command():
    command = re.search(r"<!-- test-command -->\s*```(?:bash)?\n(.+?)\n```", README, flags=re.S).group(1).strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in ci.splitlines()


@pytest.mark.parametrize("name", ["baseline", "seed_stack", "frontier"])
def test_the_docs_run_the_presets_from_their_config_files(name):
    command = re.search(rf"<!-- {name}-env -->\s*```bash\n(.+?)\n```", PRESETS, flags=re.S).group(1).strip()
    assert command.startswith(f"env $(grep -v '^#' configs/{name}.env | xargs) torchrun ")
    assert command.endswith(" train_gpt.py") and (ROOT / "configs" / f"{name}.env").is_file()


def test_readme_setup_pins_a_torch_that_requirements_accept_and_greps_scores_not_source():
    pin = re.search(r"^pip install torch==(\d+)\.(\d+)\.\d+ --index-url \S+/cpu", README, flags=re.M)
    low, high = re.search(r"^torch>=(\d+\.\d+),<(\d+\.\d+)$", (ROOT / "requirements.txt").read_text(), re.M).groups()
    version = (int(pin[1]), int(pin[2]))
    assert tuple(map(int, low.split("."))) <= version < tuple(map(int, high.split(".")))
    assert "pip install matplotlib" in README
    grep = re.search(r'^grep -E "([^"]+)" logs/\*\.txt', README, flags=re.M).group(1)
    assert not any(re.search(grep, line) for line in SOURCE.splitlines())  # the log starts with the source
    assert re.search(grep, "final_int8_zlib_roundtrip_exact val_loss:2.1 val_bpb:1.2345")
