"""The README's two set-up commands stay true: CI runs the README's test command verbatim, and the
demo command names a real entry point (tests/e2e/test_demo.py runs `mlxsft demo --quick`)."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from mlxsft.cli import main

ROOT = Path(__file__).resolve().parents[2]


def setup_commands() -> list[str]:
    """The bash blocks of the README's "Set-up: two commands" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set-up: two commands", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_readme_has_exactly_two_setup_commands():
    demo, tests = setup_commands()
    assert demo == "pip install -e . && mlxsft demo"
    assert tests == 'pip install -e ".[dev]" && python -m pytest'


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert setup_commands()[1] in ci.splitlines()


def test_demo_entry_point_and_dev_extra_exist():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'mlxsft = "mlxsft.cli:main"' in pyproject
    assert re.search(r'^dev = \[.*"pytest', pyproject, re.M)
    result = CliRunner().invoke(main, ["demo", "--help"])
    assert result.exit_code == 0 and "--quick" in result.output
