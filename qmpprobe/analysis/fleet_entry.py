"""What one run adds to a fleet dataset, read from its folder (README, "qmpprobe fleet"):
its host's runnability, `host`/`max` flags and facts, and its build's requested CPU
(`drift.requested`, as `diff` compares it). `add_all` is `fleet add`."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qmpprobe.analysis.diff import Run
from qmpprobe.analysis.drift import canonical_names, runnability
from qmpprobe.core.machines import ORDER
from qmpprobe.core.vocab import ERROR, GUEST_PREFIX, OK, SKIPPED, TIMEOUT
from qmpprobe.errors import InputError
from qmpprobe.store.csvfile import read_csv
from qmpprobe.store.fleet import (
    FACT_COLUMNS,
    REFERENCE,
    REFERENCE_COLUMNS,
    Dataset,
    Entry,
    check_host,
    digests,
)
from qmpprobe.store.folder import COMBOS, MANIFEST, SCHEMA, RunFolder
from qmpprobe.store.manifest import Manifest


def _host_row(m: Manifest, raw: dict[str, Any], source: str) -> pd.DataFrame:
    cpu = m.host.get("cpu", {}) if isinstance(m.host.get("cpu"), dict) else {}
    kernel = m.host.get("kernel", {}) if isinstance(m.host.get("kernel"), dict) else {}
    row = {
        "run_id": str(raw.get("run_id", "")),
        "start": m.start,
        "mode": m.mode,
        "source": source,
        "qemu_version": m.qemu.version,
        "qemu_package": m.qemu.package,
        "qemu_sha256": str(m.qemu.fingerprint.get("qemu_sha256", "")),
        "qmpprobe": m.qmpprobe,
        "hostname": str(m.host.get("hostname", "")),
        "host_fingerprint": m.host_fingerprint,
        "cpu_vendor": str(cpu.get("vendor") or ""),
        "cpu_model_name": str(cpu.get("model_name") or ""),
        "cpu_family": str(cpu.get("family") or ""),
        "cpu_model": str(cpu.get("model") or ""),
        "cpu_stepping": str(cpu.get("stepping") or ""),
        "microcode": str(cpu.get("microcode") or ""),
        "kernel": str(kernel.get("release") or ""),
        "cpu_flags": [str(f) for f in cpu.get("flags", []) if isinstance(f, str)],
    }
    return pd.DataFrame([row])


def _build_row(m: Manifest) -> pd.DataFrame:
    machines = [{"name": x["name"], "alias": x.get("alias")} for x in m.machines]
    return pd.DataFrame(
        [
            {
                "qemu_version": m.qemu.version,
                "qemu_package": m.qemu.package,
                "qemu_sha256": str(m.qemu.fingerprint.get("qemu_sha256", "")),
                "development": m.qemu.development,
                "machines": json.dumps(machines),
                "features": list(m.features),
                "feature_bits": json.dumps(dict(m.feature_bits), sort_keys=True),
                "feature_aliases": json.dumps(
                    {k: list(v) for k, v in m.feature_aliases.items()}, sort_keys=True
                ),
            }
        ]
    )


def _capability(m: Manifest, combos: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """`machine, model, features`: the flags on in the CPU of each model QEMU does not call
    migration-safe (`host`, `max`: what this host and accelerator give)."""
    unsafe = combos[(combos["status"].astype(str) == OK) & ~combos["migration_safe"].astype(bool)]
    canon = canonical_names(m.feature_aliases, m.features)
    flags = set(m.features) | set(canon)
    rows = cells[
        cells["model"].isin(set(unsafe["model"].astype(str)))
        & cells["prop"].isin(flags)
        & (cells["value"] == "true")
    ][["machine", "model", "prop"]].astype(str)
    rows = rows.merge(unsafe[["machine", "model"]].astype(str), on=["machine", "model"])
    rows["prop"] = rows["prop"].map(lambda p: canon.get(p, p))
    out = (
        rows.drop_duplicates()
        .sort_values(["machine", "model", "prop"])
        .groupby(["machine", "model"], sort=True)["prop"]
        .agg(list)
        .rename("features")
        .reset_index()
    )
    return out


def from_run(path: Path, host: str | None) -> Entry:
    """The rows a complete run folder adds (checked when read, as every reader checks it)."""
    folder = RunFolder(path)
    raw = folder.read_manifest(require_complete=True)
    _same_schema(raw, path)
    m = Manifest.of(raw)
    run = Run(folder.path, m, folder.read_combos(), folder.read_cells())
    combos = run.combos
    # drift's runnability, the one definition of "runs here unfiltered", with its blockers
    # as a list and the combo's status and QEMU's message.
    ru = runnability(combos, run.cells).merge(
        combos[["machine", "model", "status", "error"]].astype(str), on=["machine", "model"]
    )
    ru["unavailable"] = ru["unavailable"].map(lambda t: sorted(t.split()))
    facts = run.facts()
    facts = facts[~facts["prop"].str.startswith(GUEST_PREFIX)]
    ok = combos[combos["status"].astype(str) == OK]
    models = ok[["machine", "model", "alias_of", "qom_type", "migration_safe"]].copy()
    models = models.astype({"machine": str, "model": str, "alias_of": str, "qom_type": str})
    models["migration_safe"] = models["migration_safe"].astype(bool)
    models = models.merge(digests(facts), on=["machine", "model"], how="left")
    models["digest"] = models["digest"].fillna("")
    name = check_host(host if host is not None else str(m.host.get("hostname", "")))
    notes = []
    if m.guest_cpuid:
        notes.append(f"{path}: the guest CPUID cells are not added (a host's, not the build's)")
    return _entry(
        folder.path,
        raw,
        m,
        name,
        "run",
        ru[["machine", "model", "status", "error", "runnable", "unavailable"]],
        _capability(m, combos, run.cells),
        models,
        facts[FACT_COLUMNS].astype(str),
        notes,
    )


def _same_schema(raw: dict[str, Any], path: Path) -> None:
    """Refuse a run of another schema, or one whose CPUs are not the build's own (extra
    `-cpu` flags or `-global`s change what every model asks for and what it is filtered of)."""
    if raw["schema"] != SCHEMA:
        raise InputError(
            f"{path} has run folder schema {raw['schema']}; fleet add takes schema {SCHEMA}"
        )
    if raw.get("cpu_flags") or raw.get("globals"):
        raise InputError(
            f"{path} was probed with --cpu-flags or --global: its CPUs are not its build's own "
            "(fleet add takes plain runs)"
        )


def from_reference(path: Path, host: str | None) -> Entry:
    """The rows a published reference adds (manifest.json and runnability.csv, as
    `scripts/publish-reference` keeps them): host facts and runnability, no cells.
    A combo's status is told from the manifest's counts: a combo that ran is `ok`, and the
    rest must all have the one other status the counts hold."""
    folder = RunFolder(path)
    raw = folder.read_manifest(require_complete=True)
    _same_schema(raw, path)
    m = Manifest.of(raw)
    where = folder.path / REFERENCE
    try:
        df = read_csv(where)
    except (OSError, ValueError) as e:
        raise InputError(f"corrupted reference: {where}: {e}") from None
    # runnability.csv carries machine_order after machine since qmpprobe 0.4 (issue 18).
    if list(df.columns[1:3]) == ["machine", ORDER]:
        if not df[ORDER].astype(str).str.fullmatch(r"-?[0-9]+").all():
            raise InputError(f"corrupted reference: {where}: {ORDER} is not an integer")
        df = df.drop(columns=[ORDER])
    if list(df.columns) != REFERENCE_COLUMNS:
        raise InputError(f"corrupted reference: {where}: columns are not {REFERENCE_COLUMNS}")
    df = df.astype(str)
    machines = {x["name"] for x in m.machines}
    model_names = {x["name"] for x in m.models}
    bad = (
        (df["accel"] != m.accel)
        | ~df["machine"].isin(machines)
        | ~df["model"].isin(model_names)
        | ~df["runnable"].isin(["True", "False"])
    )
    if bad.any() or df.duplicated(["machine", "model"]).any():
        raise InputError(
            f"corrupted reference: {where}: a row of another accelerator, machine type or "
            "model than the manifest's, a runnable that is not True/False, or a combo twice"
        )
    ran = (df["runnable"] == "True") | (df["unavailable"] != "")
    counts = {k: int(v) for k, v in m.counts.items() if int(v)}
    others = [s for s in counts if s != OK]
    if len(df) != sum(counts.values()) or int(ran.sum()) != counts.get(OK, 0) or len(others) > 1:
        raise InputError(
            f"{path}: its statuses cannot be told from runnability.csv and the manifest's "
            f"counts {counts}: add the run folder instead"
        )
    other = others[0] if others else ERROR
    if other not in (ERROR, TIMEOUT, SKIPPED):
        raise InputError(f"{path}: counts hold status {other!r}")
    ru = df[["machine", "model"]].assign(
        status=np.where(ran, OK, other),
        error=np.where(ran, "", "(a published reference keeps no message)"),
        runnable=df["runnable"] == "True",
        unavailable=df["unavailable"].map(lambda t: sorted(t.split())),
    )
    name = check_host(host if host is not None else str(m.host.get("hostname", "")))
    empty_models = pd.DataFrame(
        {c: pd.Series(dtype=t) for c, t in
         (("machine", str), ("model", str), ("alias_of", str), ("qom_type", str),
          ("migration_safe", bool), ("digest", str))}
    )  # fmt: skip
    return _entry(
        folder.path,
        raw,
        m,
        name,
        "reference",
        ru[["machine", "model", "status", "error", "runnable", "unavailable"]],
        pd.DataFrame({"machine": [], "model": [], "features": []}),
        empty_models,
        pd.DataFrame({c: pd.Series(dtype=str) for c in FACT_COLUMNS}),
        [f"{path}: a published reference: runnability only (no cells: no requested CPU, "
         "no host/max flags)"],
    )  # fmt: skip


def _entry(
    source: Path,
    raw: dict[str, Any],
    m: Manifest,
    host: str,
    kind: str,
    runnability: pd.DataFrame,
    capability: pd.DataFrame,
    models: pd.DataFrame,
    facts: pd.DataFrame,
    notes: list[str],
) -> Entry:
    return Entry(
        source, host, str(raw.get("run_id", "")), m.start, m.qemu.fingerprint_id, m.accel,
        m.topology, m.mode, _host_row(m, raw, kind), runnability, capability, _build_row(m),
        models, facts, notes,
    )  # fmt: skip


def read_entry(path: str | Path, host: str | None) -> Entry:
    """A run folder's or a published reference's rows."""
    p = Path(path)
    if (p / MANIFEST).is_file() and not (p / COMBOS).exists() and (p / REFERENCE).is_file():
        return from_reference(p, host)
    return from_run(p, host)


def add_all(path: str | Path, sources: Sequence[str | Path], host: str | None) -> Iterator[str]:
    """`fleet add`: read and check every run first (nothing written if one is refused),
    then add them in order; a line per run."""
    if host is not None and len(sources) > 1:
        raise InputError("--host names one host: give one RUN with it")
    ds = Dataset(path)
    ds.check(create=False, probe=True)
    # Each run is checked before anything is written; with several, each is read twice
    # rather than all held at once (a full matrix is ~3 M cells).
    kept: Entry | None = read_entry(sources[0], host) if len(sources) == 1 else None
    if kept is None:
        for s in sources:
            read_entry(s, host)
    ds.check(create=True)
    ds.claim()
    try:
        for s in sources:
            e = kept if kept is not None else read_entry(s, host)
            yield from e.notes
            yield ds.add(e)
        ds.finish()
    finally:
        ds.release()
