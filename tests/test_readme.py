"""The README's examples are what the tool prints today (issue 18): every ```console block is
run, command by command, and what each prints is compared with the lines under it.

A block is a shell session: `$ CMD` (continued by lines ending in `\\`), then what CMD prints
(stdout and stderr, in that order). Compared as a person reads them: durations (`1.2 s`), run
stamps and a QEMU build's patch level are not the point of an example and are left out of the
comparison; a line `...` or `…` alone stands for any number of lines, ` ... ` in a line for
any text there. Paths: `/tmp/` is the
test's own folder; `.cache/qemu/…`, `tests/…` and `results/…` are the checkout's. A block whose
QEMU release cannot be fetched here is skipped, naming it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qmpprobe.run.fetch import RELEASES

from conftest import REPO, fetched, qemu_path

pytestmark = pytest.mark.slow

README = REPO / "README.md"
SKIP = {"...", "…"}


@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)


@dataclass
class Block:
    line: int
    steps: list[Step]


def blocks(text: str) -> list[Block]:
    """Every ```console block of the README, as its commands and their output."""
    out: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```console":
            i += 1
            continue
        start, steps, i = i + 1, [], i + 1
        while i < len(lines) and lines[i].strip() != "```":
            line = lines[i]
            if line.startswith("$ "):
                command = line[2:]
                while command.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    command = command[:-1] + " " + lines[i].strip()
                steps.append(Step(command))
            elif steps:
                steps[-1].expected.append(line)
            i += 1
        out.append(Block(start, steps))
        i += 1
    return out


#: What an example does not mean to fix: how long it took, when it ran, a build's patch level.
NOISE = [
    (re.compile(r"\b\d+(?:\.\d+)? s\b"), "<N> s"),
    (re.compile(r"\b\d{8}T\d{6}Z\b"), "<stamp>"),
    (re.compile(r"\b(\d+\.\d+)\.\d+\b"), r"\1.<patch>"),
    (re.compile(r"\(Debian [^)]*\)"), "(Debian <package>)"),
]


def normal(line: str) -> str:
    for pattern, to in NOISE:
        line = pattern.sub(to, line)
    return line.rstrip()


def _line(expected: str) -> re.Pattern[str]:
    """An expected line as a pattern: ` ... ` inside it stands for any text (qmpprobe itself
    prints `…` in ranges, so only the three dots elide)."""
    parts = re.split(r" \.\.\.(?: |$)", expected)
    return re.compile(r"(?: .*? | .*$)".join(map(re.escape, parts)) + "$")


def matches(expected: list[str], got: list[str]) -> bool:
    """`got` is `expected`, where a `...` line takes any number of lines."""
    exp, have = [normal(x) for x in expected], [normal(x) for x in got]
    pats = [_line(x) for x in exp]

    def at(i: int, j: int) -> bool:
        if i == len(exp):
            return j == len(have)
        if exp[i].strip() in SKIP:
            return any(at(i + 1, k) for k in range(j, len(have) + 1))
        return j < len(have) and bool(pats[i].match(have[j])) and at(i + 1, j + 1)

    return at(0, 0)


def releases(block: Block) -> list[str]:
    """The fetched QEMU releases a block names (`.cache/qemu/10.0/...`)."""
    text = " ".join(s.command for s in block.steps)
    named = re.findall(r"(?:\.cache/qemu/|fetch-qemu )([0-9]+\.[0-9]+)\b", text)
    return sorted(set(named) & set(RELEASES))


def _shim(tmp: Path) -> Path:
    """`qmpprobe` on PATH: this checkout's, run by the test's Python."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "qmpprobe"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m qmpprobe "$@"\n')
    shim.chmod(0o755)
    return bin_dir


ALL = blocks(README.read_text())


def test_the_readme_has_examples_to_run() -> None:
    assert len(ALL) >= 7, [b.line for b in ALL]
    assert all(b.steps for b in ALL), [b.line for b in ALL if not b.steps]


@pytest.mark.parametrize("block", ALL, ids=[f"README.md:{b.line}" for b in ALL])
def test_readme_example(block: Block, tmp_path: Path) -> None:
    for version in releases(block):
        fetched(version)  # skips when this machine cannot fetch it
    work = tmp_path / "work"
    work.mkdir()
    env = {
        **os.environ,
        "PATH": f"{_shim(tmp_path)}:{Path(qemu_path()).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        # Each example runs as on a machine that never probed: nothing from the cache.
        "QMPPROBE_CACHE": str(tmp_path / "cache"),
        "COLUMNS": "100",
    }
    # One shell for the block (`echo $?` sees the command before it); a marker before each
    # command splits what they printed; unbuffered, so stdout and stderr keep their order.
    script = []
    for i, step in enumerate(block.steps):
        command = step.command.replace("/tmp/", f"{work}/")
        for part in (".cache/qemu", "tests/", "results/reference"):
            command = re.sub(rf"(?<![\w/.]){re.escape(part)}", f"{REPO}/{part}", command)
        # `(exit $s)`: the marker's echo must not be the `$?` the command sees.
        script.append(f"echo '{MARK}{i}'\n(exit $__s)\n{{ {command}\n}} 2>&1\n__s=$?")
    done = subprocess.run(
        ["bash", "-c", "\n".join(["__s=0", *script])], capture_output=True, text=True, cwd=work,
        env={**env, "PYTHONUNBUFFERED": "1"}, timeout=3600,
    )  # fmt: skip
    printed = done.stdout.replace(f"{work}/", "/tmp/").replace(f"{REPO}/", "")
    outputs = re.split(rf"^{MARK}\d+\n", printed, flags=re.M)[1:]
    assert len(outputs) == len(block.steps), (done.stdout[-2000:], done.stderr[-2000:])
    for step, out in zip(block.steps, outputs, strict=True):
        got = out.splitlines()
        assert matches(step.expected, got), (
            f"README.md:{block.line}: $ {step.command}\n--- README says:\n"
            + "\n".join(step.expected)
            + "\n--- qmpprobe printed:\n"
            + "\n".join(got)
        )


MARK = "@@qmpprobe-readme-step-"
