"""CI runs what the README tells a new user to run: the same set-up commands and the same test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bash_blocks(text: str) -> list[list[str]]:
    """The commands of each ```bash block, comments stripped."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [[line.split("#")[0].strip() for line in b.splitlines() if line.split("#")[0].strip()] for b in blocks]


def _ci_commands() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def test_ci_runs_the_readme_setup_and_test_commands() -> None:
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    setup = next(b for b in blocks if any(c.startswith("pip install torch") for c in b))
    tests = next(b for b in blocks if any("--benchmark-disable" in c for c in b))
    ci = _ci_commands()
    for command in [*setup, *tests]:
        assert command in ci, f"README command {command!r} is not run by .ci/run"
    # in that order: set-up before the tests
    assert ci.index(setup[-1]) < ci.index(tests[0])


def test_ci_makes_a_new_virtual_environment_before_installing() -> None:
    ci = _ci_commands()
    venv = next(i for i, c in enumerate(ci) if "-m venv" in c)
    activate = next(i for i, c in enumerate(ci) if c.startswith("source") and "activate" in c)
    first_install = next(i for i, c in enumerate(ci) if c.startswith("pip install"))
    assert venv < activate < first_install
    # nothing is installed with a bare python3 (the machine's interpreter) before the venv is active
    assert not any("python3 -m pip" in c for c in ci)


def test_test_extra_holds_what_ci_imports() -> None:
    # every tool .ci/run calls after the set-up must come from the README's install, not from the machine
    pyproject = (ROOT / "pyproject.toml").read_text()
    extra = re.search(r"^test = \[(.*?)\]", pyproject, flags=re.S | re.M)
    assert extra is not None
    names = {re.split(r"[<>=\[ ]", s.strip().strip('"'))[0] for s in extra.group(1).split(",") if s.strip()}
    tools = {c.split()[0] for c in _ci_commands() if c.split()[0] in {"ruff", "mypy", "zizmor"}}
    assert tools <= names, tools - names
    assert {"pytest", "pytest-benchmark", "pytest-xdist", "hypothesis"} <= names
