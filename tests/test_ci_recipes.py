"""The CI recipes (issue 18): the GitHub workflow and the GitLab job parsed and checked, then
their gate step taken out of each file and run here with bash, as each platform runs it, on
real QEMUs (the system 7.2 and, where fetched, 10.0) and on a QEMU that crashes."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from conftest import FAULTS, REPO, qemu_path

GITHUB = REPO / ".github" / "workflows" / "qemu-cpu-check.yml"
GITLAB = REPO / ".gitlab-ci.yml"
JOB = "qemu-cpu-check"
#: The small plan of the runs: 3 shipped machine types x 8 Haswell models.
PLAN = "--machines 'pc-i440fx-7.*' --models 'Haswell*'"
Q10 = REPO / ".cache" / "qemu" / "10.0" / "qemu-system-x86_64"
PLATFORMS = ("github", "gitlab")
#: A command line that runs `qmpprobe check`.
GATE = re.compile(r"^\s*qmpprobe check ", re.M)


def load(path: Path) -> dict[Any, Any]:
    """One YAML file, as the platform's parser reads it (YAML 1.1: `on` is True to PyYAML)."""
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a mapping"
    return data


def github_job() -> dict[str, Any]:
    job: dict[str, Any] = load(GITHUB)["jobs"][JOB]
    return job


def gitlab_config() -> dict[str, Any]:
    """.gitlab-ci.yml with its `include: - local:` files merged in, as GitLab merges them."""
    top = load(GITLAB)
    merged: dict[str, Any] = {}
    for item in top.pop("include", []):
        merged.update(load(REPO / item["local"]))
    merged.update(top)
    return merged


def gate_index(steps: list[dict[str, Any]]) -> int:
    """The one step of the GitHub job that runs `qmpprobe check`."""
    found = [i for i, s in enumerate(steps) if GATE.search(s.get("run", ""))]
    assert len(found) == 1, found
    return found[0]


def gate_script(platform: str) -> str:
    """The gate's shell commands as the platform hands them to bash: GitHub runs the step's
    `run` text as `bash --noprofile --norc -eo pipefail FILE` (the job's `shell: bash`);
    GitLab's runner runs the job's `script` lines in one bash with `set -eo pipefail`."""
    if platform == "github":
        steps = github_job()["steps"]
        run: str = steps[gate_index(steps)]["run"]
        return run
    return "set -eo pipefail\n" + "\n".join(gitlab_config()[JOB]["script"])


def bash_argv(platform: str, script: Path) -> list[str]:
    if platform == "github":
        return ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)]
    return ["bash", str(script)]


def shim(tmp: Path) -> Path:
    """A folder holding `qmpprobe`: this worktree's, run by the tests' interpreter."""
    folder = tmp / "bin"
    folder.mkdir()
    exe = folder / "qmpprobe"
    exe.write_text(
        "#!/bin/sh\n"
        f'PYTHONPATH={shlex.quote(str(REPO))} exec {shlex.quote(sys.executable)} -m qmpprobe "$@"\n'
    )
    exe.chmod(0o755)
    return folder


def run_gate(platform: str, tmp: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The gate step in a fresh job folder `tmp/job`, with `env` over the tests' environment
    (its BASELINE, CANDIDATE and QMPPROBE_ARGS unset unless given)."""
    job = tmp / "job"
    job.mkdir()
    script = tmp / "gate.sh"
    script.write_text(gate_script(platform))
    base = {
        k: v for k, v in os.environ.items() if k not in ("BASELINE", "CANDIDATE", "QMPPROBE_ARGS")
    }
    base["PATH"] = f"{shim(tmp)}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(
        bash_argv(platform, script),
        cwd=job,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=900,
    )


def diff_rows(tmp: Path) -> pd.DataFrame:
    return pd.read_csv(tmp / "job" / "check" / "diff.csv", keep_default_na=False, dtype=str)


def assert_report(tmp: Path) -> None:
    check = tmp / "job" / "check"
    for name in ("junit.xml", "diff.html", "diff.md", "diff.csv"):
        assert (check / name).is_file(), f"check/{name} missing"
    assert (check / "baseline" / "manifest.json").is_file()
    assert (check / "candidate" / "manifest.json").is_file()


# --- structure ------------------------------------------------------------------------------


def test_github_workflow_gates_in_debian_and_reports_always() -> None:
    wf = load(GITHUB)
    triggers = wf.get("on", wf.get(True))
    assert {"pull_request", "workflow_dispatch", "schedule"} <= set(triggers)
    job = github_job()
    assert job["container"]["image"] == "debian:bookworm"
    assert job["defaults"]["run"]["shell"] == "bash"  # sh is the container default
    steps = job["steps"]
    gate = steps[gate_index(steps)]
    argv = shlex.split(gate["run"].replace("\\\n", " ").split("qmpprobe check", 1)[1])
    assert argv[argv.index("--junit") + 1] == "check/junit.xml"
    assert argv[argv.index("--out") + 1] == "check"
    # The job's status is the gate's: nothing softens the gate, nothing after it decides.
    assert "continue-on-error" not in gate and "if" not in gate and "shell" not in gate
    after = steps[gate_index(steps) + 1 :]
    assert after, "no step after the gate"
    for step in after:
        assert step["if"] == "always()" and step["continue-on-error"] is True, step
    uses = {s["uses"].split("@")[0]: s for s in after if "uses" in s}
    assert uses["actions/upload-artifact"]["with"]["path"] == "check/"
    assert uses["mikepenz/action-junit-report"]["with"]["report_paths"] == "check/junit.xml"
    assert any("GITHUB_STEP_SUMMARY" in s.get("run", "") for s in after)
    assert wf["permissions"]["checks"] == "write"
    # Inputs and variables reach the scripts as environment, never pasted into them.
    for step in steps:
        assert "${{" not in step.get("run", ""), step


def test_gitlab_job_gates_in_debian_and_reports_always() -> None:
    job = gitlab_config()[JOB]
    assert job["image"] == "debian:bookworm"
    assert "allow_failure" not in job
    script = "\n".join(job["script"])
    assert "qmpprobe check" in script and "--junit check/junit.xml" in script
    assert job["artifacts"]["when"] == "always"
    assert "check/" in job["artifacts"]["paths"]
    assert job["artifacts"]["reports"]["junit"] == "check/junit.xml"
    assert set(job["variables"]) >= {"BASELINE", "CANDIDATE", "QMPPROBE_ARGS"}


def test_one_gate_for_both_platforms() -> None:
    github = gate_script("github")
    gitlab = gitlab_config()[JOB]["script"]
    assert len(gitlab) == 1 and gitlab[0] == github


def test_recipes_name_no_host() -> None:
    # apt uses the image's own sources and pip its own index: no address in any recipe.
    for path in (GITHUB, GITLAB, REPO / "ci" / "gitlab-ci.yml", REPO / "Containerfile"):
        text = path.read_text()
        assert "://" not in text and "index-url" not in text, path


# --- the gate, run ----------------------------------------------------------------------------


@pytest.mark.parametrize("platform", PLATFORMS)
def test_gate_passes_when_nothing_changed(platform: str, tmp_path: Path) -> None:
    qemu = qemu_path()
    done = run_gate(
        platform, tmp_path, {"BASELINE": qemu, "CANDIDATE": qemu, "QMPPROBE_ARGS": PLAN}
    )
    assert done.returncode == 0, done.stderr
    assert_report(tmp_path)
    assert diff_rows(tmp_path).empty
    assert "no shipped machine type changed" in done.stdout


@pytest.mark.parametrize("platform", PLATFORMS)
def test_gate_default_candidate_is_debians_qemu(platform: str, tmp_path: Path) -> None:
    qemu = qemu_path()
    done = run_gate(platform, tmp_path, {"BASELINE": qemu, "QMPPROBE_ARGS": PLAN})
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "job" / "check" / "candidate" / "manifest.json").read_text())
    assert manifest["qemu"]["path"] == qemu


def q10() -> str:
    if not Q10.is_file():
        pytest.skip("QEMU 10.0 not fetched (scripts/fetch-qemu 10.0)")
    return str(Q10)


@pytest.mark.slow
@pytest.mark.parametrize("platform", PLATFORMS)
def test_gate_fails_on_the_ht_break_only(platform: str, tmp_path: Path) -> None:
    """7.2 -> 10.0: with one CPU only capability and property changes (no break: pass);
    with two, 10.0 turned `ht` on for shipped machine types (exit 1, the job fails)."""
    env = {"BASELINE": qemu_path(), "CANDIDATE": q10()}
    for sub in ("smp1", "smp2"):
        (tmp_path / sub).mkdir()
    one = run_gate(platform, tmp_path / "smp1", {**env, "QMPPROBE_ARGS": PLAN})
    assert one.returncode == 0, one.stderr
    rows = diff_rows(tmp_path / "smp1")
    assert not rows.empty and "abi-change" not in set(rows["kind"])
    two = run_gate(platform, tmp_path / "smp2", {**env, "QMPPROBE_ARGS": PLAN + " --smp 2"})
    assert two.returncode == 1, two.stderr
    assert_report(tmp_path / "smp2")
    breaks = diff_rows(tmp_path / "smp2").query("kind == 'abi-change'")
    assert set(breaks["prop"]) == {"ht"} and set(breaks["new"]) == {"true"}
    assert set(breaks["machine"]) == {"pc-i440fx-7.0", "pc-i440fx-7.1", "pc-i440fx-7.2"}


@pytest.mark.slow
@pytest.mark.parametrize("platform", PLATFORMS)
def test_gate_default_baseline_is_fetched_10_0(platform: str, tmp_path: Path) -> None:
    q10()
    # `qmpprobe fetch-qemu` keeps releases in $XDG_CACHE_HOME/qmpprobe-qemu: pointed at the
    # checkout's .cache/qemu, where 10.0 is fetched already, it re-uses that (verified) copy.
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    (xdg / "qmpprobe-qemu").symlink_to(Q10.parent.parent)
    env = {"CANDIDATE": qemu_path(), "QMPPROBE_ARGS": PLAN, "XDG_CACHE_HOME": str(xdg)}
    done = run_gate(platform, tmp_path, env)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "job" / "check" / "baseline" / "manifest.json").read_text())
    assert manifest["qemu"]["version"].startswith("10.0.")


def crashing(match: str) -> dict[str, str]:
    """The fault wrapper as the candidate: QEMU exits 7 whenever `match` is on its command line."""
    return {
        "BASELINE": qemu_path(),
        "CANDIDATE": str(FAULTS / "qemu-fault"),
        "FAULT_QEMU": qemu_path(),
        "FAULT_MODE": "exit",
        "FAULT_MATCH": match,
        "QMPPROBE_ARGS": PLAN,
    }


@pytest.mark.parametrize("platform", PLATFORMS)
def test_gate_fails_on_a_qemu_that_crashes(platform: str, tmp_path: Path) -> None:
    # Every start of the candidate crashes: no verdict, qmpprobe's exit 2 is the step's.
    done = run_gate(platform, tmp_path, crashing("*"))
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "is not a working QEMU" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("platform", PLATFORMS)
def test_gate_fails_when_a_shipped_machine_type_crashes(platform: str, tmp_path: Path) -> None:
    done = run_gate(platform, tmp_path, crashing("pc-i440fx-7.2"))
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert_report(tmp_path)
    rows = diff_rows(tmp_path)
    assert set(rows["kind"]) == {"status-change"}
    assert set(rows["machine"]) == {"pc-i440fx-7.2"}


@pytest.mark.parametrize("platform", PLATFORMS)
def test_gate_args_are_words_never_code(platform: str, tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    qemu = qemu_path()
    env = {"BASELINE": qemu, "CANDIDATE": qemu}
    # `$(touch …)` is a model pattern like any other (it matches nothing: bad input, exit 2).
    done = run_gate(
        platform,
        tmp_path,
        {**env, "QMPPROBE_ARGS": f"--machines pc-i440fx-7.2 --models '$(touch {canary})'"},
    )
    assert done.returncode == 2, done.stderr
    assert not canary.exists()
    assert "touch" in done.stderr  # qmpprobe names the pattern it could not match
    (tmp_path / "open").mkdir()
    done = run_gate(platform, tmp_path / "open", {**env, "QMPPROBE_ARGS": "--models 'Haswell"})
    assert done.returncode == 2
    assert "QMPPROBE_ARGS cannot be split into words" in done.stderr


# --- the README's variant: QEMU built at the merge base and at HEAD ----------------------------


class GitLabLoader(yaml.SafeLoader):
    """YAML as GitLab reads it: `!reference [job, key]` kept as the list it names."""


GitLabLoader.add_constructor(
    "!reference", lambda loader, node: ["!reference", *loader.construct_sequence(node)]
)


def readme_variants() -> list[Any]:
    """The YAML blocks of the README's "CI recipes" section, parsed."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## CI recipes\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    return [yaml.load(textwrap.dedent(b), Loader=GitLabLoader) for b in blocks]


def test_readme_variant_builds_both_qemus() -> None:
    github, gitlab = readme_variants()
    for env, commands in (
        (github["env"], "\n".join(s.get("run", "") for s in github["steps"])),
        (gitlab[JOB]["variables"], "\n".join(map(str, gitlab[JOB]["before_script"]))),
    ):
        assert env["BASELINE"] == "../qemu-base/build/qemu-system-x86_64"
        assert env["CANDIDATE"] == "build/qemu-system-x86_64"
        assert "git worktree add --detach ../qemu-base" in commands
        assert commands.count("./configure --target-list=x86_64-softmmu && make") == 2
    assert any(s.get("with", {}).get("fetch-depth") == 0 for s in github["steps"])
    assert gitlab["include"] == [{"local": "ci/gitlab-ci.yml"}]
    assert gitlab[JOB]["variables"]["GIT_DEPTH"] == 0
    # The setup it takes back is the recipe's own.
    setup = gitlab[JOB]["before_script"][0]
    assert setup == ["!reference", ".qmpprobe-setup", "before_script"]
    assert gitlab_config()[".qmpprobe-setup"]["before_script"]
