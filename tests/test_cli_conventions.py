"""What every command does the same way (issue 18): the top-level help, usage hints naming the
command at fault, -v/-vv/-q, a closed pipe, completion, fetch-qemu as a subcommand."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cli, fetched, qemu_path

COMMANDS = (
    *("run", "discover", "report", "diff", "check", "explain", "pin", "fleet", "export"),
    *("fetch-qemu", "nightly", "completion"),
)


def test_top_level_help_lists_every_command_examples_and_exit_codes() -> None:
    done = cli("--help", check=True)
    listed = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("    ")]
    assert tuple(c for c in listed if c in COMMANDS) == COMMANDS, done.stdout
    assert "examples:" in done.stdout and "exit codes:" in done.stdout
    for code in ("0  done", "1  changed", "2  bad input", "3  interrupted", "4  internal"):
        assert code in done.stdout, code


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["run", "--bogus"], "see qmpprobe run -h"),
        (["fleet", "add", "d", "r", "--bogus"], "see qmpprobe fleet add -h"),
        (["check", "--baseline", "a"], "see qmpprobe check -h"),
        (["nope"], "see qmpprobe -h"),
        (["nightly", "--keep", "0"], "see qmpprobe nightly -h"),
        (["fetch-qemu", "6.1"], "see qmpprobe fetch-qemu -h"),
    ],
)
def test_usage_errors_name_the_command(argv: list[str], hint: str) -> None:
    done = cli(*argv)
    assert done.returncode == 2, done
    assert done.stderr.count("\n") == 1 and f"({hint})" in done.stderr, done.stderr


def test_a_closed_pipe_is_not_an_error() -> None:
    """`qmpprobe discover --json | head -1`: the reader goes away; no message, exit 0."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = f"{sys.executable} -m qmpprobe discover --qemu {qemu_path()} --json | head -c 1"
    done = subprocess.run(
        ["bash", "-c", f"{script}; echo ${{PIPESTATUS[0]}} >&2"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.stdout == "{"
    assert done.stderr.strip() == "0", done.stderr


def test_quiet_and_verbose(tmp_path: Path) -> None:
    plan = ["--qemu", qemu_path(), "--machines", "pc-q35-7.2", "--models", "qemu64"]
    quiet = cli("run", "-q", *plan, "--out", str(tmp_path / "q"), "--no-report", check=True)
    assert quiet.stdout == "" and quiet.stderr == ""
    loud = cli("-v", "run", *plan, "--out", str(tmp_path / "v"), "--no-report", check=True)
    said = loud.stderr.splitlines()
    assert any(line.startswith("qmpprobe: QEMU ") and "machine types" in line for line in said)
    assert "qmpprobe: qemu64 on pc-q35-7.2: ok (" in loud.stderr
    assert said[-1].startswith("qmpprobe: run took ") and said[-1].endswith(" s in all")
    # The summary says probing's time and the whole command's, which is the longer.
    summary = loud.stdout.splitlines()[-1]
    probing = float(summary.split("probing ")[1].split(" s")[0])
    whole = float(summary.split("; ")[-1].split(" s in all")[0])
    assert whole >= probing, summary


def test_vv_keeps_each_combos_qmp_traffic_in_its_journal_entry(tmp_path: Path) -> None:
    out = tmp_path / "vv"
    cli(
        "-vv", "run", "--qemu", qemu_path(), "--machines", "pc-q35-7.2", "--models", "qemu64",
        "--out", str(out), "--no-report", check=True,
    )  # fmt: skip
    entry = json.loads(
        gzip.decompress((out / "raw" / "pc-q35-7.2" / "qemu64.json.gz").read_bytes())
    )
    traffic = entry["traffic"]
    assert traffic[0].startswith("< ") and '"QMP"' in traffic[0], traffic[:2]  # the greeting
    sent = [json.loads(t[2:]) for t in traffic if t.startswith("> ")]
    assert sent[0]["execute"] == "qmp_capabilities", sent[0]
    assert any(s.get("execute") == "query-cpus-fast" for s in sent)
    # What QEMU answered is in the traffic as in the entry's answers.
    got = [json.loads(t[2:]) for t in traffic if t.startswith("< ")]
    cpus = entry["answers"]["query-cpus-fast"]["return"]
    assert any(g.get("return") == cpus for g in got)
    # A run without -vv keeps none.
    plain = tmp_path / "plain"
    cli("run", "--qemu", qemu_path(), "--machines", "pc-q35-7.2", "--models", "qemu64",
        "--out", str(plain), "--no-report", check=True)  # fmt: skip
    again = json.loads(
        gzip.decompress((plain / "raw" / "pc-q35-7.2" / "qemu64.json.gz").read_bytes())
    )
    assert "traffic" not in again


@pytest.mark.parametrize("shell", ["bash", "zsh", "tcsh"])
def test_completion_scripts(shell: str) -> None:
    done = cli("completion", shell, check=True)
    # tcsh's completion names options without their dashes.
    for word in ("fetch-qemu", "can-migrate", "guest-cpuid"):
        assert word in done.stdout, (shell, word)
    if shell == "bash":
        syntax = subprocess.run(["bash", "-n"], input=done.stdout, capture_output=True, text=True)
        assert syntax.returncode == 0, syntax.stderr


def test_completion_knows_the_nightlys_options() -> None:
    done = cli("completion", "bash", check=True)
    for option in ("--keep", "--date", "--root"):
        assert option in done.stdout, option


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--date", "2026-13-01"], "argument --date: '2026-13-01' is not a date YYYY-MM-DD"),
        (["--date", "../x"], "argument --date: '../x' is not a date YYYY-MM-DD"),
        (["--qemu", "x="], "--qemu x=: names no binary"),
        (["--accel", "hvf"], "--accel 'hvf': tcg or kvm"),
        (["--smp", "0"], "--smp: not a CPU count or QEMU topology: '0'"),
        (["--", "--results", "r"], "--results: the nightly gives every run its own"),
        (["--", "--bogus"], "run arguments qmpprobe run does not take: --bogus"),
        (["--", "--models", ","], "--models ',': no name or glob given"),
        (["--", "-h"], "-h among the run arguments: see qmpprobe run -h"),
    ],
)
def test_nightly_refuses_before_any_run(tmp_path: Path, argv: list[str], said: str) -> None:
    """What every run would refuse is refused once, up front, with its reason (it used to be
    a night of failed runs, the reason in night.json only)."""
    done = cli("nightly", "--root", str(tmp_path / "n"), *argv)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"qmpprobe: {said}") and done.stderr.count("\n") == 1
    assert not (tmp_path / "n").exists(), "no night made"


@pytest.mark.slow
def test_fetch_qemu_subcommand_runs_the_packaged_script(tmp_path: Path) -> None:
    """`qmpprobe fetch-qemu` runs the same script as scripts/fetch-qemu; a release already
    fetched (and verified) into --into is only checked and named again."""
    wrapper = Path(fetched("10.0"))
    done = cli("fetch-qemu", "10.0", "--into", str(wrapper.parents[1]), timeout=900, check=True)
    assert done.stdout.strip() == str(wrapper)
    bad = cli("fetch-qemu", "10.0", "--into", str(tmp_path / "a:b"), timeout=900)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "fetch-qemu 10.0: the folder path" in bad.stderr and "--library-path" in bad.stderr


def test_quiet_keeps_the_line_of_a_failure(tmp_path: Path) -> None:
    done = cli("-q", "report", str(tmp_path / "none"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("qmpprobe: not a run folder:"), done.stderr


def test_nightly_ends_as_every_command(tmp_path: Path) -> None:
    """Its errors are one line and an exit code of qmpprobe's (2 here, never a traceback or
    a 1, which says a shipped machine type changed); `-h nightly` is the help."""
    (tmp_path / "f").write_text("")
    done = cli("nightly", "--root", str(tmp_path / "f"), "--qemu", qemu_path())
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr
    helped = cli("-h", "nightly")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: qmpprobe [-h]")
    quiet = cli("nightly", "-q", "--keep", "0")
    assert quiet.returncode == 2 and "--keep" in quiet.stderr


def test_closed_stdout_and_stderr(tmp_path: Path) -> None:
    """No stdout at all (`>&-`): the command still ends with its own code; no stderr
    (`2>&-`): the failure's line never lands on stdout."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = [sys.executable, "-m", "qmpprobe"]
    closed = subprocess.run(
        ["bash", "-c", '"$@" >&-; echo $? >&2', "_", *run, "-h"], capture_output=True,
        text=True, env=env,
    )  # fmt: skip
    # (argparse writes the help to stderr when there is no stdout.)
    assert closed.stderr.strip().splitlines()[-1] == "0", closed.stderr
    no_err = subprocess.run(
        ["bash", "-c", '"$@" 2>&-; echo "rc=$?"', "_", *run, "report", str(tmp_path / "x")],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert no_err.stdout.strip() == "rc=2", no_err.stdout


def test_junit_into_a_missing_folder_is_refused_before_probing(tmp_path: Path) -> None:
    done = cli(
        "check", "--baseline", qemu_path(), "--candidate", qemu_path(), "--out",
        str(tmp_path / "ck"), "--junit", str(tmp_path / "no" / "junit.xml"),
    )  # fmt: skip
    assert done.returncode == 2 and "--junit" in done.stderr and "is not a folder" in done.stderr
    assert not (tmp_path / "ck").exists(), "nothing probed, nothing written"


def _targets(tmp: Path) -> dict[str, Path]:
    """File targets no command may replace: a FIFO, a link, a folder."""
    fifo, link, folder = tmp / "fifo", tmp / "link", tmp / "folder"
    os.mkfifo(fifo)
    (tmp / "kept").write_text("kept\n")
    link.symlink_to(tmp / "kept")
    folder.mkdir()
    return {"not a file": fifo, "a link": link, "a folder": folder}


def test_file_targets_that_are_not_regular_files_are_refused_up_front(tmp_path: Path) -> None:
    # The rename that writes a file atomically would replace the node itself (as root,
    # --junit /dev/null would be /dev/null no more): refused before anything is probed.
    for kind, target in _targets(tmp_path).items():
        for argv in (
            ["diff", "a", "b", "--out", str(tmp_path / "d"), "--junit", str(target)],
            ["check", "--baseline", qemu_path(), "--candidate", qemu_path(),
             "--out", str(tmp_path / "ck"), "--junit", str(target)],
            ["pin", "pc-q35-7.2", "qemu64", "--qemu", qemu_path(), "--out", str(target)],
        ):  # fmt: skip
            done = cli(*argv)
            assert done.returncode == 2, (argv, done.stderr)
            said = f"qmpprobe: {argv[-2]} {target}: is {kind} (it writes one regular file)"
            assert done.stderr.startswith(said) and done.stderr.count("\n") == 1, done.stderr
    assert (tmp_path / "kept").read_text() == "kept\n" and (tmp_path / "link").is_symlink()
    assert not (tmp_path / "d").exists() and not (tmp_path / "ck").exists()


def test_a_diff_never_writes_over_its_own_files_or_into_a_run_folder(tmp_path: Path) -> None:
    own = cli("diff", "a", "b", "--out", str(tmp_path), "--junit", str(tmp_path / "diff.csv"))
    assert own.returncode == 2 and "one of the files the command reads or writes" in own.stderr
    (tmp_path / "manifest.json").write_text("{}")
    done = cli(
        "check", "--baseline", qemu_path(), "--candidate", qemu_path(), "--out", str(tmp_path)
    )
    assert done.returncode == 2 and "is a run folder" in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_explain_of_a_model_qemu_did_not_answer_says_what_it_said(tmp_path: Path) -> None:
    """`host` is skipped under TCG: explain names that (it used to say "nothing matches")."""
    done = cli(
        "explain", "pc-q35-7.1", "--qemu", qemu_path(), "--models", "host",
        "--out", str(tmp_path / "x"),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip()
    assert line.startswith("qmpprobe: nothing to explain: host on pc-q35-7.1: skipped: "), line
    assert "under tcg" in line and "host on pc-q35-7.2: skipped" in line


def test_explain_json_is_one_document(tmp_path: Path) -> None:
    done = cli(
        "explain", "pc-q35-7.1", "--qemu", qemu_path(), "--models", "qemu64", "--json",
        "--out", str(tmp_path / "x"), check=True,
    )  # fmt: skip
    doc = json.loads(done.stdout)
    assert doc["machine"] == "pc-q35-7.1" and doc["newest"] == "pc-q35-7.2"
    assert doc["probed"] and doc["probed"][0].startswith(str(tmp_path / "x"))
    assert doc["round_trips"] is None
