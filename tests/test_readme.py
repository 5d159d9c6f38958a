"""The README's runnable Python snippets run as written, and CI runs the README's test command.

Every ```python block of the README runs in a fresh namespace (offline, tiny weights), except blocks whose
first line says `# needs the real weights`: those are the hub examples, run against a local cache in
test_docs_examples.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
RUNNABLE = [b for b in BLOCKS if not b.startswith("# needs the real weights")]


def test_the_readme_has_runnable_snippets():
    assert len(RUNNABLE) >= 1 and len(BLOCKS) > len(RUNNABLE)


@pytest.mark.parametrize("index", range(len(RUNNABLE)))
def test_snippet_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a snippet that writes a file writes it here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with torch.random.fork_rng(devices=[]):
        exec(compile(RUNNABLE[index], f"README.md snippet {index}", "exec"), {"__name__": "__readme__"})


def test_ci_runs_the_readme_test_command():
    quickstart = re.search(r"## Quickstart\n\n```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
    install, test = quickstart.strip().splitlines()
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == test and "pia-torch --demo" in install
