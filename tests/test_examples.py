"""The README's Python snippets are the example files' own code, and the example files run."""

from __future__ import annotations

import pathlib
import re
import runpy

import pytest

ROOT = pathlib.Path(__file__).parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
SNIPPETS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_every_readme_snippet_is_in_an_example_file():
    assert len(SNIPPETS) >= 3
    sources = {p.name: p.read_text() for p in EXAMPLES}
    for snippet in SNIPPETS:
        assert any(snippet in src for src in sources.values()), snippet[:200]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path, capsys):
    runpy.run_path(str(path), run_name="__main__")
    assert "output" in capsys.readouterr().out
