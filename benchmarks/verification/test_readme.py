"""The README's examples, run as written: each ```console block's output is what the command prints today.

Every ``$ torchledger ...`` line of a ```console block is run in-process through ``torchledger.cli.main`` and its
output compared with the lines that follow it, character for character. The ``measure`` example is a CPU run: on the
CPU the storage tracker counts every byte a step allocates, so its figures repeat exactly from run to run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from torchledger.cli import main

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


@dataclass(frozen=True)
class Example:
    line: int  # 1-based line of the command in README.md
    argv: tuple[str, ...]  # the arguments after `torchledger`
    output: str  # the README's text after the command, up to the next command or the end of the block

    @property
    def id(self) -> str:
        return f"L{self.line}-{' '.join(self.argv[:3])}"


def fenced_blocks(text: str, lang: str) -> list[tuple[int, list[str]]]:
    """(line of the opening fence, lines of the body) of each ```lang block."""
    blocks: list[tuple[int, list[str]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == f"```{lang}":
            start, body = i + 1, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            blocks.append((start, body))
        i += 1
    return blocks


def console_examples(text: str) -> list[Example]:
    examples: list[Example] = []
    for fence, body in fenced_blocks(text, "console"):
        starts = [k for k, line in enumerate(body) if line.startswith("$ ")]
        for n, k in enumerate(starts):
            words = shlex.split(body[k][2:])
            assert words[0] == "torchledger", f"README.md:{fence + k + 1}: not a torchledger command: {body[k]}"
            end = starts[n + 1] if n + 1 < len(starts) else len(body)
            examples.append(Example(fence + k + 1, tuple(words[1:]), "\n".join(body[k + 1 : end])))
    return examples


EXAMPLES = console_examples(README.read_text())


def run_in_process(argv: tuple[str, ...] | list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    status = main(list(argv))
    captured = capsys.readouterr()
    assert status == 0, f"torchledger {' '.join(argv)} exited with {status}: {captured.err}"
    return captured.out


def skip_unless_runnable(argv: tuple[str, ...]) -> None:
    """Skip, with the reason, an example this machine cannot reproduce."""
    if argv[0] == "estimate":
        return  # pure Python
    if importlib.util.find_spec("torch") is None:
        pytest.skip(f"torchledger {argv[0]} needs torch, which is not installed here")
    if "--hf-config" in argv and "reference" not in argv and importlib.util.find_spec("transformers") is None:
        pytest.skip(f"torchledger {argv[0]} --hf-config builds transformers' model, which is not installed here")
    if argv[0] == "measure" and "--device" not in argv and "--simulate" not in argv:
        import torch

        if torch.cuda.is_available():
            pytest.skip("the README's measure example is a CPU run; without --device it would measure on CUDA here")


def test_the_readme_shows_each_command() -> None:
    commands = {e.argv[0] for e in EXAMPLES}
    assert {"estimate", "count", "measure"} <= commands, f"console examples found: {sorted(commands)}"


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_console_example_prints_the_readmes_text(example: Example, capsys: pytest.CaptureFixture[str]) -> None:
    skip_unless_runnable(example.argv)
    printed = run_in_process(example.argv, capsys).rstrip("\n")
    assert printed.splitlines() == example.output.rstrip("\n").splitlines(), (
        f"README.md:{example.line}: `torchledger {' '.join(example.argv)}` prints\n{printed}"
    )


def shown_keys_differ(shown: object, actual: object, path: str = "") -> list[str]:
    """Where the README's object differs from the real one; keys the README leaves out are not compared."""
    if isinstance(shown, dict):
        if not isinstance(actual, dict):
            return [f"{path or '.'}: README shows an object, the command prints {actual!r}"]
        return [
            diff
            for key, value in shown.items()
            for diff in (
                shown_keys_differ(value, actual[key], f"{path}.{key}")
                if key in actual
                else [f"{path}.{key}: not printed by the command"]
            )
        ]
    if shown != actual or type(shown) is not type(actual):
        return [f"{path}: README {shown!r}, command {actual!r}"]
    return []


def test_shown_keys_differ_sees_a_changed_nested_figure() -> None:
    assert shown_keys_differ({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}, "d": 3}) == []
    assert shown_keys_differ({"a": {"b": 1}}, {"a": {"b": 2}}) == [".a.b: README 1, command 2"]
    assert shown_keys_differ({"a": 1}, {"a": 1.0}) == [".a: README 1, command 1.0"]
    assert shown_keys_differ({"a": 1}, {}) == [".a: not printed by the command"]


def test_json_example_is_the_output_of_the_command_it_follows(capsys: pytest.CaptureFixture[str]) -> None:
    text = README.read_text()
    section = text[text.index("## `torchledger estimate`") :]
    section = section[: section.index("\n## ", 1)]
    command = console_examples(section)[0].argv
    contract = section.index("These keys are a stable contract")
    (_, body), *_ = fenced_blocks(section[contract:], "json")
    shown = json.loads("\n".join(body))
    # the sentence before the block names the command the object comes from
    named = re.sub(r"\s+", " ", section[contract : section.index("```json", contract)])
    assert f"`torchledger {' '.join(command)} --json`" in named, named
    printed = json.loads(run_in_process([*command, "--json"], capsys))
    assert shown_keys_differ(shown, printed) == []


def test_the_cli_runs_from_a_bare_checkout(capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m torchledger` with only src/ on the path, as the README's set-up section says."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600, check=False)

    found = run("-c", "import torchledger; print(torchledger.__file__)")
    assert Path(found.stdout.strip()).resolve() == ROOT / "src" / "torchledger" / "__init__.py", found.stderr
    helped = run("-m", "torchledger", "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: torchledger"), helped.stdout
    shown = re.search(r"`PYTHONPATH=src python3? -m torchledger ([^`]+)`", README.read_text())
    assert shown, "README.md names no `PYTHONPATH=src python -m torchledger ...` command"
    argv = shlex.split(shown.group(1))
    ran = run("-m", "torchledger", *argv)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == run_in_process(argv, capsys)
