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


def _requirement_names(block: str) -> set[str]:
    return {re.split(r"[<>=\[ ;]", r.strip().strip('"'))[0].lower().replace("_", "-")
            for r in re.findall(r'"[^"]+"', block)}


def test_constraints_pin_everything_the_setup_installs() -> None:
    # the set-up's second install takes constraints.txt, and that file pins (==) every package the project and its
    # test extra require, torch excepted (the first command pins it, CUDA builds included), each for Python >= 3.11
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    setup = next(b for b in blocks if any(c.startswith("pip install torch") for c in b))
    assert any(c.startswith("pip install -e") and c.endswith("-c constraints.txt") for c in setup), setup
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        requirement, marker = line.split(";")
        name, version = requirement.split("==")
        assert re.fullmatch(r"[0-9][0-9A-Za-z.+]*", version.strip()), line
        assert marker.strip() == 'python_version >= "3.11"', line
        pins[name.strip().lower().replace("_", "-")] = version.strip()
    pyproject = (ROOT / "pyproject.toml").read_text()
    dependencies = re.search(r"^dependencies = \[(.*?)\]", pyproject, flags=re.S | re.M)
    extra = re.search(r"^test = \[(.*?)\]", pyproject, flags=re.S | re.M)
    assert dependencies is not None and extra is not None
    required = (_requirement_names(dependencies.group(1)) | _requirement_names(extra.group(1))) - {"torch"}
    assert "torch" not in pins
    assert required <= set(pins), f"not pinned (run scripts/renew-constraints.sh): {sorted(required - set(pins))}"
