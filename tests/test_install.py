"""What the README's plain install gives: every subcommand runs, and an optional extra that is
missing is named in one line."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVING_STACK = ("fastapi", "uvicorn", "pydantic", "pyzmq", "prometheus-client", "aiohttp")


def test_serving_stack_is_a_core_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {
        dep.split(">")[0].split("=")[0].split("[")[0].strip() for dep in project["dependencies"]
    }
    assert set(SERVING_STACK) <= names


def test_missing_optuna_is_one_line_naming_the_extra(tmp_path):
    script = (
        "import sys; sys.modules['optuna'] = None\n"
        "from nanoflow.cli.main import main\n"
        f"sys.exit(main(['tune', '--model', 'builtin', '--out', {str(tmp_path / 'p.json')!r}]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "nanoflow: error: tune needs optuna: pip install 'nanoflow[tune]'"
