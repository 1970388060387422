"""The README is a front door that stays one: short, its two set-up commands exactly as CI runs
them, and every document it points to present."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
GENERATE = (
    "pip install torch==2.13.0 && pip install -e . && "
    'nanoflow generate --prompt "Hello, my name is"'
)
TEST = 'pip install torch==2.13.0 && pip install -e ".[test]" && pytest -q'


def test_readme_is_short():
    assert len(README.splitlines()) <= 250


def test_readme_gives_the_two_set_up_commands_and_ci_runs_the_test_one():
    assert GENERATE in README and TEST in README
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    steps = [line for line in ci if line and not line.startswith(("#", "set ", "cd "))]
    runs = [re.sub(r"^python3 -m pip install -q ", "pip install ", s) for s in steps]
    assert [r for r in runs if r != "ruff check ."] == TEST.split(" && ")


def test_every_document_the_readme_links_exists():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if not link.startswith("http")]
    assert {"docs/architecture.md", "docs/results.md", "docs/findings.md"} <= set(local)
    for link in local:
        assert (ROOT / link).exists(), link


def test_docs_quote_no_unmeasured_claims():
    texts = [README] + [p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))]
    for text in texts:
        assert "not yet measured" not in text and "not been re-measured" not in text
        assert "DESIGN" not in text
