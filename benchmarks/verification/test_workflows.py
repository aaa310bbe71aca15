"""The GitHub Actions workflows: audited by zizmor, every action pinned to a commit, no credentials left behind.

The nightly workflow runs on a self-hosted GPU runner, a machine of our own: a tag of an action can be moved to other
code, a token persisted by actions/checkout ends up in uploaded artifacts, and a broad default token can push. The
checks below hold the workflows to a full commit hash per action, `persist-credentials: false` on every checkout,
explicit token permissions, and no pull-request trigger on the GPU runner.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / ".github" / "workflows"
WORKFLOW_FILES = sorted([*WORKFLOWS.glob("*.yml"), *WORKFLOWS.glob("*.yaml")])

# `uses: owner/repo[/path]@ref  # comment`, as a step key or after the list dash
USES = re.compile(r"^(?P<indent>\s*)(?:-\s+)?uses:\s*(?P<ref>[^\s#]+)\s*(?:#\s*(?P<comment>.*))?$")
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")


def zizmor() -> str | None:
    """The zizmor binary: on PATH, or beside this interpreter (a virtual environment that is not activated)."""
    beside = Path(sys.executable).with_name("zizmor")
    return shutil.which("zizmor") or (str(beside) if beside.is_file() else None)


def uses_lines(text: str) -> list[tuple[int, str, str, str | None]]:
    """(line number, indentation of the step, action reference, trailing comment) of every `uses:`."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        m = USES.match(line)
        if m:
            found.append((number, m["indent"], m["ref"], m["comment"]))
    return found


def checkout_steps(text: str) -> list[tuple[int, list[str]]]:
    """(line number, the lines of the step) of every actions/checkout step."""
    lines = text.splitlines()
    steps = []
    for number, _, ref, _ in uses_lines(text):
        if not ref.startswith("actions/checkout@"):
            continue
        # the step runs from its `- ` line to the next line indented as deep as that dash or less
        start = number - 1
        while not lines[start].lstrip().startswith("- "):
            start -= 1
        dash = len(lines[start]) - len(lines[start].lstrip())
        end = start + 1
        while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > dash):
            end += 1
        steps.append((number, lines[start:end]))
    return steps


def test_there_are_workflows_to_check() -> None:
    assert {p.name for p in WORKFLOW_FILES} >= {"ci.yml", "nightly-gpu.yml"}


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_every_action_is_pinned_to_a_commit_with_its_version(path: Path) -> None:
    uses = uses_lines(path.read_text())
    assert uses, f"{path.name}: no `uses:` found"
    for number, _, ref, comment in uses:
        if ref.startswith("./"):
            continue  # an action of this repository, at this commit
        assert PINNED.match(ref), f"{path.name}:{number}: {ref} is not pinned to a full commit hash"
        assert comment and re.match(r"v\d+(\.\d+)*\b", comment), f"{path.name}:{number}: no `# vX.Y.Z` comment"


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_every_checkout_leaves_no_credentials(path: Path) -> None:
    for number, step in checkout_steps(path.read_text()):
        settings = [line.split("#")[0].strip() for line in step]
        assert "persist-credentials: false" in settings, f"{path.name}:{number}: checkout persists its credentials"


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_the_token_permissions_are_explicit(path: Path) -> None:
    text = path.read_text()
    top = re.search(r"^permissions:[ \t]*([^#\n]*)", text, flags=re.M)
    assert top, f"{path.name}: no top-level `permissions:`, so jobs get the repository's default token"
    value = top.group(1).strip()
    assert value in ("{}", "", "read-all"), top.group(0)
    if value == "":  # a mapping on the indented lines that follow: read access only
        mapping = re.match(r"(?:\n[ \t]+[^\n]*)*", text[top.end() :])
        assert mapping and "write" not in mapping.group(0), f"{path.name}: top-level {mapping}"


def test_the_gpu_runner_never_runs_pull_request_code() -> None:
    text = (WORKFLOWS / "nightly-gpu.yml").read_text()
    on = re.search(r"^on:[ \t]*\n((?:[ \t]+.*\n|[ \t]*#.*\n|\n)*)", text, flags=re.M)
    assert on, "nightly-gpu.yml: no `on:` mapping"
    triggers = set(re.findall(r"^  ([a-z_]+):", on.group(1), flags=re.M))
    assert triggers == {"schedule", "workflow_dispatch"}, triggers
    assert "github.event_name != 'pull_request'" in text
    # write access only in a job that runs on a GitHub-hosted runner
    for job in re.split(r"\n  (?=[\w-]+:\n)", text.split("\njobs:\n", 1)[1]):
        if "contents: write" in job:
            assert "self-hosted" not in job, job


def test_the_checks_above_can_fail() -> None:
    bad = "steps:\n  - uses: actions/checkout@v4\n    with:\n      fetch-depth: 0\n  - run: true\n"
    [(number, _, ref, comment)] = uses_lines(bad)
    assert (number, ref, comment) == (2, "actions/checkout@v4", None) and not PINNED.match(ref)
    [(_, step)] = checkout_steps(bad)
    assert [s.strip() for s in step] == ["- uses: actions/checkout@v4", "with:", "fetch-depth: 0"]
    good = "  - uses: actions/checkout@11bd71901bbe5b1630ceea73d27597364c9af683 # v4.2.2\n"
    [(_, _, ref, comment)] = uses_lines(good)
    assert PINNED.match(ref) and comment == "v4.2.2"


def test_zizmor_finds_nothing_at_medium_or_above() -> None:
    binary = zizmor()
    if binary is None:
        pytest.skip("zizmor is not installed here (the test extra installs it; CI runs this)")
    run = subprocess.run([binary, "--offline", "--no-exit-codes", "--format", "json", str(WORKFLOWS)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr
    findings = json.loads(run.stdout)
    serious = [
        f"{f['ident']} ({f['determinations']['severity']}): {f['desc']} at "
        + ", ".join(str(loc.get("concrete", {}).get("feature", "?")) for loc in f["locations"])
        for f in findings
        if f["determinations"]["severity"].lower() in ("medium", "high")
    ]
    assert serious == [], "\n".join(serious)
