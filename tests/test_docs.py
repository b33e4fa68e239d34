"""The README stays a front door and every link between the project's Markdown files resolves: the file, and the
heading a `#anchor` names (GitHub's slugs)."""

import re

import pytest

from conftest import ROOT

GENERATED = set()  # pages written by a tool; docs/knobs.md is written by tools/knob_docs.py, and checked here too
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md",
         ROOT / "tools" / "README.md", ROOT / "records" / "README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(text: str) -> set[str]:
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    heads = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_the_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    assert not any(re.match(r"^\| `[A-Z0-9_]+` \| `", l) for l in lines)  # no knob table: docs/knobs.md


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_local_link_resolves(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if file in GENERATED:
            continue
        assert file.exists(), f"{page.relative_to(ROOT)}: {target}"
        if anchor:
            assert anchor in _anchors(file.read_text()), f"{page.relative_to(ROOT)}: {target}"


def test_the_knob_reference_is_generated_from_the_declarations():
    """docs/knobs.md is what tools/knob_docs.py writes from Hyperparameters: one row per knob, its default."""
    import dataclasses

    import knob_docs
    import train_gpt

    text = (ROOT / "docs" / "knobs.md").read_text()
    assert text == knob_docs.render(), "docs/knobs.md is stale: run python3 tools/knob_docs.py"
    rows = dict(re.findall(r"^\| `([A-Z0-9_]+)` \| `([^`]*)` \|", text, flags=re.M))
    fields = dataclasses.fields(train_gpt.Hyperparameters)
    assert rows == {f.name.upper(): str(int(f.default) if isinstance(f.default, bool) else f.default) for f in fields}
