"""`qmpprobe fleet`: many hosts' runs in one dataset, asked in DuckDB, each verdict checked
against the run folders themselves (read here with pandas, not with qmpprobe's code) and
against QEMU (the baseline pin started with `enforce`).

The hosts are real: the fixture holds this project's machine under KVM and under TCG (small
expand-mode plans) and the published KVM reference of another host (an AMD EPYC of family
26, runnability only), and each test session adds a fresh run of the machine it runs on.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from conftest import REPO, cli, plain_client, plain_quit, qemu_path

FIXTURE = REPO / "tests" / "data" / "fleet-runs.tar.xz"
MACHINES = "pc-i440fx-1.4,pc-q35-7.2"
HOSTS = {"vm-kvm": "vm-kvm", "vm-tcg": "vm-tcg", "epyc-zen5": "reference-epyc"}


def kvm_usable() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """host name → its run folder: the fixture's three and a fresh TCG run of this machine."""
    root = tmp_path_factory.mktemp("fleet-runs")
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(root, filter="data")
    out = {host: root / folder for host, folder in HOSTS.items()}
    fresh = root / "here-tcg"
    cli("run", "--qemu", qemu_path(), "--mode", "expand", "--machines", MACHINES,
        "--no-report", "--out", str(fresh), check=True)  # fmt: skip
    out["here-tcg"] = fresh
    second = root / "here-tcg-2"
    cli("run", "--qemu", qemu_path(), "--mode", "expand", "--machines", "pc-q35-7.2",
        "--no-report", "--out", str(second), check=True)  # fmt: skip
    exact = root / "here-tcg-exact"
    cli("run", "--qemu", qemu_path(), "--machines", "pc-q35-7.2", "--models",
        "qemu64,pentium3,Haswell", "--no-report", "--out", str(exact), check=True)  # fmt: skip
    return {**out, "here-tcg-2": second, "here-tcg-exact": exact}


#: The hosts of the shared dataset (the extra runs are for the tests that need them).
FLEET = ["epyc-zen5", "here-tcg", "vm-kvm", "vm-tcg"]


def add(ds: Path, runs: dict[str, Path], hosts: list[str]) -> None:
    for h in hosts:
        cli("fleet", "add", str(ds), str(runs[h]), "--host", h, check=True)


@pytest.fixture(scope="module")
def dataset(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    ds = tmp_path_factory.mktemp("fleet") / "ds"
    add(ds, runs, FLEET)
    return ds


# --- an independent reading of the run folders ---------------------------------------------


def verdicts(run: Path, machine: str) -> dict[str, tuple[str, list[str]]]:
    """model → (status, unavailable features) of one host on `machine`, from its files."""
    if not (run / "combos.csv").exists():  # a published reference: runnability.csv
        df = pd.read_csv(run / "runnability.csv", dtype=str, keep_default_na=False)
        df = df[df["machine"] == machine]
        return {
            r.model: ("ok" if r.runnable == "True" or r.unavailable else "error",
                      sorted(r.unavailable.split()))
            for r in df.itertuples()
        }  # fmt: skip
    combos = pd.read_csv(run / "combos.csv", dtype=str, keep_default_na=False)
    combos = combos[combos["machine"] == machine]
    cells = pd.read_parquet(run / "cells.parquet")
    ua = cells[(cells["machine"] == machine) & (cells["prop"] == "unavailable-features")]
    lists = {str(r.model): sorted(json.loads(str(r.value))) for r in ua.itertuples()}
    return {r.model: (r.status, lists.get(r.model, [])) for r in combos.itertuples()}


def expected(runs: dict[str, Path], machine: str, hosts: list[str] = FLEET) -> pd.DataFrame:
    """Per model: everywhere, blocked hosts and the features they block it with."""
    per_host = {h: verdicts(runs[h], machine) for h in hosts}
    models = sorted(set().union(*per_host.values()))
    rows = []
    for m in models:
        blocked, features = [], set()
        for h in sorted(per_host):
            status, ua = per_host[h].get(m, ("not probed", []))
            if status != "ok" or ua:
                blocked.append(h)
                features |= set(ua)
        rows.append((m, not blocked, " ".join(blocked), " ".join(sorted(features))))
    return pd.DataFrame(rows, columns=["model", "everywhere", "blocked_hosts", "features"])


def runnable_csv(ds: Path, machine: str) -> pd.DataFrame:
    done = cli("fleet", "runnable", str(ds), "--machine", machine, "--csv", check=True)
    return pd.read_csv(_io(done.stdout), dtype=str, keep_default_na=False)


def _io(text: str) -> Any:
    import io

    return io.StringIO(text)


# --- runnable ----------------------------------------------------------------------------


@pytest.mark.parametrize("machine", MACHINES.split(","))
def test_runnable_is_what_every_run_says(
    dataset: Path, runs: dict[str, Path], machine: str
) -> None:
    got = runnable_csv(dataset, machine)
    assert list(got.columns)[:8] == [
        "machine", "machine_order", "model", "everywhere", "hosts", "runnable_hosts",
        "blocked_hosts", "blocking_features",
    ]  # fmt: skip
    want = expected(runs, machine)
    assert set(got["machine"]) == {machine}
    # The version as one number (X*10000+Y*100+Z), so SQL and spreadsheets sort 2.10 after 2.9.
    major, minor = machine.rsplit("-", 1)[1].split(".")
    assert set(got["machine_order"]) == {str(int(major) * 10000 + int(minor) * 100)}
    assert list(got["model"]) == list(want["model"])
    assert list(got["everywhere"]) == ["true" if e else "false" for e in want["everywhere"]]
    assert list(got["blocked_hosts"]) == list(want["blocked_hosts"])
    assert list(got["blocking_features"]) == list(want["features"])
    assert set(got["hosts"]) == {str(len(FLEET))}
    assert want["everywhere"].any() and not want["everywhere"].all()


def test_runs_everywhere_means_nothing_unavailable_on_any_host(
    dataset: Path, runs: dict[str, Path]
) -> None:
    """QEMU's own answer: every host's run has `ok` and an empty unavailable-features."""
    for machine in MACHINES.split(","):
        everywhere = runnable_csv(dataset, machine).query("everywhere == 'true'")["model"]
        assert len(everywhere) >= 5, machine
        for host in FLEET:
            v = verdicts(runs[host], machine)
            for model in everywhere:
                assert v[model] == ("ok", []), (host, machine, model)


def test_runnability_depends_on_the_machine_type(dataset: Path) -> None:
    """Under TCG `core2duo` runs on pc-q35-7.2 but not on pc-i440fx-1.4, which turns vmx on."""
    new = runnable_csv(dataset, "pc-q35-7.2").set_index("model")
    old = runnable_csv(dataset, "pc-i440fx-1.4").set_index("model")
    for tcg in ("vm-tcg", "here-tcg"):
        assert tcg not in new.loc["core2duo", "blocked_hosts"].split()
        assert tcg in old.loc["core2duo", "blocked_hosts"].split()
    assert "vmx" in old.loc["core2duo", "blocking_features"].split()


def test_runnable_json_names_each_hosts_reason(dataset: Path, runs: dict[str, Path]) -> None:
    done = cli("fleet", "runnable", str(dataset), "--machine", "pc-q35-7.2", "--json", check=True)
    rows = {r["model"]: r for r in json.loads(done.stdout)["runnable"]}
    v = {h: verdicts(runs[h], "pc-q35-7.2") for h in FLEET}
    for model, r in rows.items():
        named = [h for b in r["blocked"] for h in b["hosts"]]
        assert sorted(named) == r["blocked_hosts"]  # each blocked host once, in one group
        for b in r["blocked"]:
            for h in b["hosts"]:
                status, ua = v[h].get(model, ("not probed", []))
                assert b["status"] == status and b["features"] == ua
    table = cli("fleet", "runnable", str(dataset), "--machine", "pc-q35-7.2", check=True)
    assert "models run unfiltered on every host" in table.stdout


# --- baseline ----------------------------------------------------------------------------


async def _starts_filtering_nothing(accel: str, machine: str, cpu: str, tmp: Path) -> None:
    """A plain QEMU with `-cpu CPU,enforce` starts (enforce refuses any filtered flag) and its
    CPU says no feature was filtered."""
    sock = str(tmp / "qmp.sock")
    proc = subprocess.Popen(
        [qemu_path(), "-S", "-nodefaults", "-no-user-config", "-display", "none",
         "-machine", machine, "-accel", accel, "-cpu", f"{cpu},enforce",
         "-qmp", f"unix:{sock},server=on,wait=off"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        try:
            client = await plain_client(sock, proc, "baseline")
        except AssertionError:
            raise AssertionError(f"the baseline did not start: {proc.stderr.read()}") from None
        cpus = await client.execute("query-cpus-fast")
        path = cpus[0]["qom-path"]
        filtered = await client.execute("qom-get", {"path": path, "property": "filtered-features"})
        assert all(w["features"] == 0 for w in filtered)
        await plain_quit(client)
    finally:
        proc.kill()
        proc.wait()


def _baseline(ds: Path, accel: str, machine: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return cli("fleet", "baseline", str(ds), "--machine", machine, "--accel", accel,
               "--qemu", qemu_path(), *extra)  # fmt: skip


@pytest.mark.parametrize("machine", MACHINES.split(","))
def test_baseline_starts_on_this_host_with_enforce(
    dataset: Path, machine: str, tmp_path: Path
) -> None:
    done = _baseline(dataset, "tcg", machine)
    assert done.returncode == 0, done.stderr
    cpu = done.stdout.strip()
    assert "\n" not in cpu
    assert "baseline of 4 host(s)" in done.stderr
    asyncio.run(_starts_filtering_nothing("tcg", machine, cpu, tmp_path))


def test_baseline_is_the_largest_runnable_model_plus_shared_flags(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """Without the published reference (which has no host/max flags), the two TCG hosts
    share `max`'s flags: the baseline carries them on top, and still starts with enforce."""
    ds = tmp_path / "ds"
    add(ds, runs, ["vm-tcg", "here-tcg"])
    done = _baseline(ds, "tcg", "pc-q35-7.2", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    fleet, pin = doc["fleet"], doc["pin"]
    everywhere = set(expected(runs, "pc-q35-7.2", ["vm-tcg", "here-tcg"])
                     .query("everywhere")["model"])  # fmt: skip
    assert fleet["model"] in everywhere
    assert {c["model"] for c in fleet["candidates"]} <= everywhere
    assert fleet["extra_features"], "two TCG hosts share more than any one model has"
    # every flag added is on in `max` of both hosts (what TCG gives there)
    for h in ("vm-tcg", "here-tcg"):
        cells = pd.read_parquet(runs[h] / "cells.parquet")
        mx = cells[(cells.model == "max") & (cells.machine == "pc-q35-7.2")]
        on = set(mx.loc[mx["value"] == "true", "prop"].astype(str))
        assert set(fleet["extra_features"]) <= on, h
    props = pin["definition"]["props"]
    assert all(props[f] is True for f in fleet["extra_features"])
    assert pin["verified"]["equal"] is True
    cmd = _baseline(ds, "tcg", "pc-q35-7.2")
    asyncio.run(_starts_filtering_nothing("tcg", "pc-q35-7.2", cmd.stdout.strip(), tmp_path))


@pytest.mark.kvm
def test_baseline_under_kvm_starts_on_this_host(runs: dict[str, Path], tmp_path: Path) -> None:
    if not kvm_usable():
        pytest.skip("/dev/kvm is not usable here")
    here = tmp_path / "here-kvm"
    cli("run", "--qemu", qemu_path(), "--accel", "kvm", "--mode", "expand", "--machines",
        "pc-q35-7.2", "--no-report", "--out", str(here), check=True)  # fmt: skip
    ds = tmp_path / "ds"
    add(ds, {**runs, "here-kvm": here}, ["vm-kvm", "epyc-zen5", "here-kvm"])
    done = _baseline(ds, "kvm", "pc-q35-7.2")
    assert done.returncode == 0, done.stderr
    asyncio.run(_starts_filtering_nothing("kvm", "pc-q35-7.2", done.stdout.strip(), tmp_path))


def test_baseline_of_a_model_that_does_not_run_everywhere(dataset: Path) -> None:
    done = _baseline(dataset, "tcg", "pc-q35-7.2", "--model", "Haswell")
    assert done.returncode == 1
    assert "Haswell does not run unfiltered on every host on pc-q35-7.2" in done.stderr
    assert done.stdout == ""


# --- can-migrate -------------------------------------------------------------------------


def _migrate(ds: Path, model: str, a: str, b: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return cli("fleet", "can-migrate", str(ds), "--machine", "pc-q35-7.2", "--model", model,
               "--from", a, "--to", b, *extra)  # fmt: skip


def test_can_migrate_between_two_tcg_hosts_of_one_release(
    dataset: Path, runs: dict[str, Path]
) -> None:
    done = _migrate(dataset, "qemu64", "vm-tcg", "here-tcg", "--json")
    doc = json.loads(done.stdout)
    same_build = (
        json.loads((runs["vm-tcg"] / "manifest.json").read_text())["qemu"]["fingerprint"]["id"]
        == json.loads((runs["here-tcg"] / "manifest.json").read_text())["qemu"]["fingerprint"]["id"]
    )
    if same_build:
        assert done.returncode == 0 and doc["possible"] is True, doc
    else:  # another machine's build: every reason is a real difference of the two runs
        assert all(r["kind"] != "accel" for r in doc["reasons"])


def test_can_migrate_says_every_reason(dataset: Path, runs: dict[str, Path]) -> None:
    done = _migrate(dataset, "EPYC", "vm-kvm", "vm-tcg")
    assert done.returncode == 1
    assert "no" in done.stdout.splitlines()[0]
    assert "accel: vm-kvm runs kvm, vm-tcg tcg" in done.stdout
    tcg_ua = verdicts(runs["vm-tcg"], "pc-q35-7.2")["EPYC"][1]
    assert tcg_ua, "EPYC is filtered under TCG"
    assert f"is filtered on target vm-tcg: {' '.join(tcg_ua)}" in done.stdout
    # the requested CPUs of two builds differ where diff would say so (kvm's own flags)
    assert "abi-change: kvmclock: true on vm-kvm, false on vm-tcg" in done.stdout


def test_can_migrate_to_a_host_without_cells_is_not_shown_safe(dataset: Path) -> None:
    done = _migrate(dataset, "486", "vm-kvm", "epyc-zen5", "--json")
    doc = json.loads(done.stdout)
    assert done.returncode == 1
    assert [r["kind"] for r in doc["reasons"]] == ["unknown"]


def test_can_migrate_unknown_host_machine_or_model(dataset: Path) -> None:
    done = _migrate(dataset, "486", "vm-kvm", "vm-kmv")
    assert done.returncode == 2
    assert "no host 'vm-kmv' in the dataset (close: vm-kvm" in done.stderr
    done = _migrate(dataset, "no-such-model", "vm-kvm", "vm-tcg")
    assert done.returncode == 2 and "no host probed 'no-such-model'" in done.stderr
    done = cli("fleet", "can-migrate", str(dataset), "--machine", "pc-q35-72", "--model",
               "486", "--from", "vm-kvm", "--to", "vm-tcg")  # fmt: skip
    assert done.returncode == 2 and "no host probed machine type" in done.stderr


# --- the dataset -------------------------------------------------------------------------


def _digest(ds: Path) -> dict[str, str]:
    return {
        str(p.relative_to(ds)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(ds.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def test_readding_is_idempotent_and_order_does_not_matter(
    dataset: Path, runs: dict[str, Path], tmp_path: Path
) -> None:
    before = _digest(dataset)
    again = cli("fleet", "add", str(dataset), str(runs["vm-tcg"]), "--host", "vm-tcg")
    assert again.returncode == 0 and "already in the dataset" in again.stderr
    assert _digest(dataset) == before
    other = tmp_path / "ds"
    add(other, runs, FLEET[::-1])
    for machine in MACHINES.split(","):
        a = cli("fleet", "runnable", str(dataset), "--machine", machine, "--json").stdout
        b = cli("fleet", "runnable", str(other), "--machine", machine, "--json").stdout
        assert a == b
    for args in (("EPYC", "vm-kvm", "vm-tcg"), ("qemu64", "here-tcg", "vm-tcg")):
        assert _migrate(dataset, *args).stdout == _migrate(other, *args).stdout


def test_requested_cpu_is_stored_once_per_build(runs: dict[str, Path], tmp_path: Path) -> None:
    """Two runs of one build on two hosts: the second adds no requested CPU (it has only
    combos the first had), only its own runnability."""
    ds = tmp_path / "ds"
    add(ds, runs, ["here-tcg", "here-tcg-2"])
    assert len(list((ds / "requested").rglob("*.parquet"))) == 1
    assert len(list((ds / "runnability").rglob("*.parquet"))) == 2
    assert not (ds / "host_values").exists()
    assert sorted(p.name for p in (ds / "hosts").iterdir()) == ["host=here-tcg", "host=here-tcg-2"]
    again = cli("fleet", "add", str(ds), str(runs["here-tcg"]), "--host", "other")
    assert again.returncode == 2 and "is in the dataset as host here-tcg" in again.stderr


def test_one_build_probed_in_two_modes_migrates(runs: dict[str, Path], tmp_path: Path) -> None:
    """Exact and expand mode read other facts of one CPU: one build is one CPU, not a change."""
    ds = tmp_path / "ds"
    add(ds, runs, ["here-tcg", "here-tcg-exact"])
    done = _migrate(ds, "qemu64", "here-tcg", "here-tcg-exact")
    if verdicts(runs["here-tcg-exact"], "pc-q35-7.2")["qemu64"] == ("ok", []):
        assert done.returncode == 0 and done.stdout.endswith(": yes\n"), done.stdout


def test_a_host_has_one_accelerator_and_topology(runs: dict[str, Path], tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    cli("fleet", "add", str(ds), str(runs["vm-tcg"]), "--host", "h", check=True)
    done = cli("fleet", "add", str(ds), str(runs["vm-kvm"]), "--host", "h")
    assert done.returncode == 2 and "a host has one state" in done.stderr


def test_a_newer_run_of_a_host_replaces_its_older_one(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    ds = tmp_path / "ds"
    old, new = runs["vm-tcg"], runs["here-tcg"]  # the fixture's is older than this session's
    cli("fleet", "add", str(ds), str(new), "--host", "h", check=True)
    kept = cli("fleet", "add", str(ds), str(old), "--host", "h")
    assert kept.returncode == 0 and "has a newer run in the dataset" in kept.stderr
    ds2 = tmp_path / "ds2"
    cli("fleet", "add", str(ds2), str(old), "--host", "h", check=True)
    done = cli("fleet", "add", str(ds2), str(new), "--host", "h", check=True)
    assert "replacing 1 older run" in done.stderr
    assert len(list((ds2 / "hosts").rglob("*.parquet"))) == 1
    assert len(list((ds2 / "runnability").rglob("*.parquet"))) == 1


def test_published_reference_statuses_come_from_its_counts(dataset: Path) -> None:
    import duckdb

    ref = json.loads((REPO / "results/reference/qemu-7.2.22-kvm-host-2fc51509c885fffe"
                      / "manifest.json").read_text())  # fmt: skip
    got = duckdb.sql(
        f"select status, count(*) from read_parquet('{dataset}/runnability/host=epyc-zen5/"
        "*/*/*/*.parquet') group by all order by 1"
    ).fetchall()
    assert dict(got) == {k: v for k, v in ref["counts"].items() if v}


def test_reference_of_today_with_machine_order_is_taken(tmp_path: Path) -> None:
    """A reference published from a run of this version (runnability.csv with machine_order)
    goes in as the ones before it did."""
    run = tmp_path / "run"
    cli("run", "-q", "--machines", "pc-q35-7.1,pc-q35-7.2", "--models", "qemu64,Haswell",
        "--out", str(run), check=True)  # fmt: skip
    ref = tmp_path / "ref"
    ref.mkdir()
    for name in ("manifest.json", "runnability.csv"):  # what publish-reference keeps of it
        shutil.copy2(run / name, ref / name)
    assert "machine_order" in (ref / "runnability.csv").read_text().splitlines()[0]
    cli("fleet", "add", str(tmp_path / "ds"), str(ref), "--host", "today", check=True)
    done = cli("fleet", "runnable", str(tmp_path / "ds"), "--machine", "pc-q35-7.2", "--json",
               check=True)  # fmt: skip
    got = {r["model"]: r["everywhere"] for r in json.loads(done.stdout)["runnable"]}
    assert got == {"qemu64": True, "Haswell": False}, got


# --- refused -----------------------------------------------------------------------------


@pytest.fixture
def edited(runs: dict[str, Path], tmp_path: Path) -> Iterator[Any]:
    def edit(host: str, change: Any) -> Path:
        dest = tmp_path / f"edited-{host}"
        shutil.copytree(runs[host], dest)
        m = json.loads((dest / "manifest.json").read_text())
        change(m)
        (dest / "manifest.json").write_text(json.dumps(m))
        return dest

    yield edit


def test_incomplete_and_other_schema_runs_are_refused(edited: Any, tmp_path: Path) -> None:
    ds = tmp_path / "new-ds"
    incomplete = edited("vm-tcg", lambda m: m.update(complete=False))
    done = cli("fleet", "add", str(ds), str(incomplete))
    assert done.returncode == 2 and "incomplete run" in done.stderr
    assert not ds.exists(), "nothing written"
    newer = edited("vm-kvm", lambda m: m.update(schema=2))
    done = cli("fleet", "add", str(ds), str(newer))
    assert done.returncode == 2 and "schema 2" in done.stderr
    flagged = edited("here-tcg", lambda m: m.update(cpu_flags="-mmx"))
    done = cli("fleet", "add", str(ds), str(flagged))
    assert done.returncode == 2 and "--cpu-flags" in done.stderr
    assert not ds.exists()


def test_reference_whose_statuses_cannot_be_told_is_refused(edited: Any, tmp_path: Path) -> None:
    def two_kinds(m: dict[str, Any]) -> None:
        m["counts"]["error"] -= 1
        m["counts"]["timeout"] = 1

    ref = edited("epyc-zen5", two_kinds)
    done = cli("fleet", "add", str(tmp_path / "ds"), str(ref))
    assert done.returncode == 2 and "cannot be told" in done.stderr


def test_queries_refuse_what_is_not_a_dataset(dataset: Path, tmp_path: Path) -> None:
    done = cli("fleet", "runnable", str(tmp_path), "--machine", "pc-q35-7.2")
    assert done.returncode == 2 and "not a fleet dataset" in done.stderr
    done = cli("fleet", "runnable", str(dataset), "--machine", "pc-q35-72")
    assert done.returncode == 2 and "no host probed machine type 'pc-q35-72'" in done.stderr
    (tmp_path / "x").write_text("")
    done = cli("fleet", "add", str(tmp_path), str(REPO / "tests"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    other = Path(tempfile.mkdtemp(dir=tmp_path))
    (other / "fleet.json").write_text('{"schema": 9}')
    done = cli("fleet", "runnable", str(other), "--machine", "pc-q35-7.2")
    assert done.returncode == 2 and "schema 9" in done.stderr


def test_hostile_host_names(runs: dict[str, Path], tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    name = "<b>x</b>/../=%2F'q'"
    cli("fleet", "add", str(ds), str(runs["vm-tcg"]), "--host", name, check=True)
    assert [p.name for p in (ds / "hosts").iterdir()] == [
        "host=%3Cb%3Ex%3C%2Fb%3E%2F..%2F%3D%252F%27q%27"
    ]
    done = cli("fleet", "runnable", str(ds), "--machine", "pc-q35-7.2", "--json", check=True)
    blocked = {h for r in json.loads(done.stdout)["runnable"] for h in r["blocked_hosts"]}
    assert blocked == {name}
    page = tmp_path / "page.html"
    cli("fleet", "report", str(ds), "--out", str(page), check=True)
    html = page.read_text()
    assert "&lt;b&gt;x&lt;/b&gt;" in html and "<b>x</b>" not in html
    for bad_name in ("a\nb", "a b", "", "__HIVE_DEFAULT_PARTITION__"):
        bad = cli("fleet", "add", str(ds), str(runs["here-tcg"]), "--host", bad_name)
        assert bad.returncode == 2 and "--host" in bad.stderr, bad_name


def test_report_is_one_page(dataset: Path) -> None:
    done = cli("fleet", "report", str(dataset), check=True)
    page = Path(done.stdout.strip())
    assert page == dataset / "report.html"
    html = page.read_text()
    for h in HOSTS:
        assert h in html
    assert "Which hosts hold the fleet back" in html
    assert "pc-q35-7.2" in html and "baseline" in html
    assert "http://" not in html.replace("http://libvirt", "") and "<script src" not in html


def test_an_add_that_did_not_finish_leaves_the_files_trusted(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """`index.parquet` is derived: while `.adding` is there (an add under way, or one that
    ended before it finished) readers take the hosts files, and the next add remakes it."""
    ds = tmp_path / "ds"
    add(ds, runs, ["vm-tcg", "here-tcg"])
    full = cli("fleet", "runnable", str(ds), "--machine", "pc-q35-7.2", "--json", check=True)
    import pyarrow.parquet as pq

    idx = pq.read_table(ds / "index.parquet")
    pq.write_table(idx.slice(0, 1), ds / "index.parquet")  # as if the add died before it
    (ds / ".adding").write_bytes(b"")
    again = cli("fleet", "runnable", str(ds), "--machine", "pc-q35-7.2", "--json", check=True)
    assert again.stdout == full.stdout
    cli("fleet", "add", str(ds), str(runs["vm-kvm"]), "--host", "vm-kvm", check=True)
    assert not (ds / ".adding").exists()
    assert pq.read_table(ds / "index.parquet").num_rows == 3


def test_facts_no_combo_claims_are_not_read(runs: dict[str, Path], tmp_path: Path) -> None:
    """An add that ended between a build's `requested` and `models` files left facts no
    combo claims: readers skip them, the next add removes them."""
    ds = tmp_path / "ds"
    add(ds, runs, ["here-tcg"])
    before = _migrate(ds, "qemu64", "here-tcg", "here-tcg").stdout
    (req,) = list((ds / "requested").rglob("*.parquet"))
    shutil.copy(req, req.with_name("orphan.parquet"))
    assert _migrate(ds, "qemu64", "here-tcg", "here-tcg").stdout == before
    cli("fleet", "add", str(ds), str(runs["here-tcg-2"]), "--host", "two", check=True)
    assert not req.with_name("orphan.parquet").exists()


def test_damaged_datasets_are_refused_in_one_line(dataset: Path, tmp_path: Path) -> None:
    """Files of another shape, a host run without its runnability, no builds: exit 2 and one
    line, never a traceback; an index of another shape is only not used."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def damaged(change: Any) -> subprocess.CompletedProcess[str]:
        ds = tmp_path / f"ds{len(list(tmp_path.iterdir()))}"
        shutil.copytree(dataset, ds)
        change(ds)
        return cli("fleet", "runnable", str(ds), "--machine", "pc-q35-7.2", "--csv")

    good = cli("fleet", "runnable", str(dataset), "--machine", "pc-q35-7.2", "--csv").stdout
    index = damaged(lambda ds: pq.write_table(pa.table({"x": [1]}), ds / "index.parquet"))
    assert index.returncode == 0 and index.stdout == good

    def other_hosts_file(ds: Path) -> None:  # read when the index is made again
        pq.write_table(pa.table({"x": [1]}), next((ds / "hosts").rglob("*.parquet")))
        (ds / "index.parquet").unlink()

    def no_runnability(ds: Path) -> None:
        shutil.rmtree(ds / "runnability" / "host=vm-tcg")

    def other_runnability(ds: Path) -> None:
        for f in (ds / "runnability").rglob("*.parquet"):
            pq.write_table(pa.table({"machine": ["pc-q35-7.2"]}), f)

    for change in (other_hosts_file, no_runnability, other_runnability):
        done = damaged(change)
        assert done.returncode == 2, (change.__name__, done.stderr)
        assert done.stderr.count("\n") == 1 and "corrupted fleet dataset" in done.stderr
    gone = damaged(lambda ds: shutil.rmtree(ds / "hosts" / "host=vm-tcg"))
    assert gone.returncode == 0 and "vm-tcg" not in gone.stdout  # the index is not trusted


def test_a_flag_one_build_has_no_bit_for_is_one_fact() -> None:
    """11.1 under KVM learned no CPUID bit for `fpu` … `mtrr`; 7.2 did: one flag, one fact."""
    from qmpprobe.analysis.diff import by_bit

    a = pd.DataFrame({"fact": ["bit:0x00000001:0:edx:0"], "prop": ["fpu"], "value": ["true"]})
    b = pd.DataFrame({"fact": ["fpu"], "prop": ["fpu"], "value": ["true"]})
    b = by_bit(b, {"fpu": "0x00000001:0:edx:0"})
    assert list(b["fact"]) == list(a["fact"])
