"""The `qmpprobe` command line: every subcommand, its options, exit codes and output conventions."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import re
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from qmpprobe import __version__, console
from qmpprobe.console import PipeSafe
from qmpprobe.errors import InputError, Interrupted
from qmpprobe.run.fetch import RELEASES, TARGETS
from qmpprobe.run.options import RunOptions, check_patterns, jobs_value, seconds_value
from qmpprobe.run.progress import is_terminal

EXIT_OK, EXIT_CHANGED, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_INTERNAL = 0, 1, 2, 3, 4


DESCRIPTION = """\
Ask QEMU over QMP what every CPU model is on every machine type (x86, s390x, aarch64), and show
the drift."""

EPILOG = """\
examples:
  qmpprobe run --machines 'pc-q35-7.*' --models 'Haswell*'    probe a small plan (TCG)
  qmpprobe run --qemu qemu-system-s390x                        every s390x model x machine type
  qmpprobe run --accel kvm --mode expand                       the whole matrix, fast, KVM
  qmpprobe report RUN                                          the report again
  qmpprobe check --baseline "$(qmpprobe fetch-qemu 10.0)" --candidate qemu-system-x86_64
  qmpprobe explain pc-i440fx-2.4 --models Haswell --as-globals
  qmpprobe pin pc-q35-7.2 Haswell --format libvirt
  qmpprobe fleet add fleet/ RUN...; qmpprobe fleet runnable fleet/ --machine pc-q35-7.2
  qmpprobe completion bash > /etc/bash_completion.d/qmpprobe

options of every command: -v (what qmpprobe does, on stderr), -vv (also each combo's QMP
traffic in its journal entry), -q (only the data asked for, and the last line of a failure).

exit codes:
  0  done (diff, check, explain --as-globals, fleet can-migrate: nothing changed / yes)
  1  changed: a shipped machine type's CPU changed, a pin did not verify, a migration is refused
  2  bad input: an option, a file, a QEMU or a folder qmpprobe cannot use (one line says which)
  3  interrupted (Ctrl-C, SIGTERM, SIGHUP): every file written whole; resume with run --resume
  4  internal error of qmpprobe's (one line; the traceback in a file it names)
A closed output pipe (qmpprobe ... | head) is not an error: the command still ends with its
own code. The run folder contract (files, columns, statuses) is in the README.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: scripts read the last line of stderr.
        command = " ".join(["qmpprobe", *self.prog.split()[1:]])
        self.exit(EXIT_INPUT, f"qmpprobe: {message} (see {command} -h)\n")


def _common() -> argparse.ArgumentParser:
    """-v and -q, accepted before and after the command (`qmpprobe -v run`, `run -v`)."""
    p = _Parser(add_help=False)
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="say what qmpprobe does on stderr; -vv: also keep each combo's QMP traffic "
        "in its journal entry (those combos are probed again, not taken from the cache)",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print only the data asked for, and the last line of a failure",
    )
    return p


_COMMON = _common()


def _subcommands(parser: argparse.ArgumentParser, dest: str) -> Any:
    """Subcommands of `parser`, each taking -v and -q too."""
    sub = parser.add_subparsers(dest=dest, required=True, parser_class=_Parser, metavar="COMMAND")
    add = sub.add_parser

    def add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = add(name, parents=[_COMMON], **kw)  # type: ignore[list-item]
        p.set_defaults(parser_of_command=p)  # whose usage an unknown argument is refused by
        return p

    sub.add_parser = add_parser  # type: ignore[method-assign,assignment]
    return sub


def _probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--qemu",
        default="qemu-system-x86_64",
        help="QEMU binary or wrapper script (default: qemu-system-x86_64 on PATH)",
    )
    p.add_argument("--accel", default="tcg", choices=("tcg", "kvm"), help="accelerator (tcg)")


def _flag_args(
    p: argparse.ArgumentParser, flags_help: str, globals_note: str, defaults: bool = True
) -> None:
    p.add_argument("--cpu-flags", default="" if defaults else None, help=flags_help)
    p.add_argument(
        "--global",
        dest="globals",
        action="append",
        default=[] if defaults else None,
        metavar="TYPE.PROP=VAL",
        help=f"passed to QEMU as -global{globals_note} (repeatable)",
    )


def _guest_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--guest-cpuid",
        action="store_true",
        help="also boot qmpprobe's firmware and store the CPUID the guest reads (cpuid:* cells)",
    )


def _diff_args(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument(
        "--out", help=f"where diff.csv, changes.csv, diff.json/md/html go (default: {default_out})"
    )
    p.add_argument(
        "--unreleased",
        action="append",
        default=[],
        metavar="MACHINE",
        help="a machine type of the baseline that has not shipped (repeatable)",
    )
    p.add_argument("--accept", metavar="FILE", help="CSV of known, accepted changes (globs)")
    p.add_argument("--cross-host", action="store_true", help="compare KVM runs of two hosts")
    p.add_argument("--junit", metavar="FILE", help="also write JUnit XML: a test per machine type")
    p.add_argument("--json", action="store_true", help="print one JSON document, not the lines")


JOBS_HELP = "QEMUs at once (default: cores + 1; capped by free memory and open files)"


def build_parser(
    nightly_options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.ArgumentParser:
    """The argument parser of every subcommand (`nightly_options`: the nightly's own options
    put on its subparser, for completion)."""
    parser = _Parser(
        prog="qmpprobe",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_COMMON],
    )
    parser.add_argument("--version", action="version", version=f"qmpprobe {__version__}")
    sub = _subcommands(parser, "command")

    r = sub.add_parser("run", help="probe every CPU model x machine type into a run folder")
    _probe_args(r)
    r.add_argument("--machines", help="comma-separated names or globs, e.g. 'pc-i440fx-*,q35'")
    r.add_argument("--models", help="comma-separated names or globs, e.g. 'Haswell*,qemu64'")
    r.add_argument(
        "--smp",
        default="1",
        help="N (-> N,sockets=1,cores=N,threads=1) or a full -smp topology (1)",
    )
    _flag_args(r, "appended to -cpu MODEL, e.g. '+x,-y,z=on' or -mmx", "")
    r.add_argument("--jobs", type=jobs_value, help=JOBS_HELP)
    r.add_argument(
        "--timeout",
        type=seconds_value,
        help="seconds per combo before QEMU is killed (30)",
    )
    r.add_argument(
        "--mode",
        default="exact",
        choices=("exact", "expand"),
        help="exact: one QEMU per combo, the realized CPU; expand: one QEMU per machine type, "
        "each model expanded (fast; no realize-only values, -smp 1 only)",
    )
    r.add_argument(
        "--read",
        default="auto",
        choices=("auto", "qom-get"),
        help="auto: expansion + qom-get of what realize sets (learned from reference "
        "combos); qom-get: every property of every combo (slow reference)",
    )
    r.add_argument(
        "--out", help="run folder to create (default: RESULTS/<stamp>-<ver>-<accel>-smpN)"
    )
    r.add_argument("--results", default="results", help="parent of new run folders (results)")
    r.add_argument("--resume", metavar="RUN", help="finish an interrupted run folder")
    r.add_argument(
        "--no-cache",
        action="store_true",
        help="probe and learn everything again: do not read ~/.cache/qmpprobe",
    )
    _guest_arg(r)
    r.add_argument(
        "--no-report",
        action="store_true",
        help="do not write the drift report at the end (qmpprobe report RUN later)",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    r.add_argument(
        "--no-visibility",
        action="store_true",
        help="do not learn what the guest sees of each drift (visibility.json: a few boots "
        "per build, cached); the report says 'not measured'",
    )

    d = sub.add_parser("discover", help="what the QEMU binary has: version, machines, models")
    _probe_args(d)
    d.add_argument("--json", action="store_true", help="everything as JSON")

    rp = sub.add_parser("report", help="drift analysis and report of a complete run folder")
    rp.add_argument("run", metavar="RUN", help="run folder")

    df = sub.add_parser(
        "diff", help="compare two runs: did a shipped machine type change? (exit 1)"
    )
    df.add_argument("run_a", metavar="RUN_A", help="baseline run folder")
    df.add_argument("run_b", metavar="RUN_B", help="candidate run folder")
    _diff_args(df, "results/diff-<A>--<B>")

    ck = sub.add_parser("check", help="probe a baseline and a candidate QEMU, then diff them")
    ck.add_argument("--baseline", required=True, metavar="QEMU_A", help="QEMU binary or wrapper")
    ck.add_argument("--candidate", required=True, metavar="QEMU_B", help="QEMU binary or wrapper")
    ck.add_argument("--accel", default="tcg", choices=("tcg", "kvm"))
    ck.add_argument("--smp", default="1")
    ck.add_argument("--machines", help="names or globs (each QEMU must have a match)")
    ck.add_argument("--models", help="names or globs (each QEMU must have a match)")
    ck.add_argument("--jobs", type=jobs_value, help=JOBS_HELP)
    ck.add_argument("--timeout", type=seconds_value, help="seconds per combo (30)")
    ck.add_argument("--no-cache", action="store_true", help="probe both QEMUs again")
    _guest_arg(ck)
    _diff_args(ck, "results/check-<stamp> (with baseline/ and candidate/ runs)")

    x = sub.add_parser(
        "explain", help="how a machine type's CPU differs from the newest of its family, and why"
    )
    x.add_argument("machine", metavar="MACHINE", help="machine type, e.g. pc-i440fx-2.4")
    x.add_argument("--run", metavar="RUN", help="a run with MACHINE and its family's newest")
    _probe_args(x)
    x.add_argument("--smp", default="1", help="topology when probing (no --run)")
    x.add_argument(
        "--models", "--model", dest="model", help="models (names or globs; default: all)"
    )
    x.add_argument(
        "--as-globals",
        action="store_true",
        help="print the -globals that make the newest machine type's CPU equal, and verify",
    )
    x.add_argument(
        "--qemu-compare",
        action="store_true",
        help="also ask QEMU's query-cpu-model-comparison (s390x), checked against the cells",
    )
    x.add_argument("--out", help="run folder when probing (default: results/explain-<stamp>)")
    x.add_argument("--jobs", type=jobs_value, help=JOBS_HELP)
    x.add_argument("--timeout", type=seconds_value, help="seconds per QEMU (30)")
    x.add_argument("--no-cache", action="store_true", help="probe and learn everything again")
    x.add_argument("--json", action="store_true", help="the differences (and round trips) as JSON")

    pn = sub.add_parser(
        "pin", help="a definition of MODEL on MACHINE that means the same everywhere, verified"
    )
    pn.add_argument(
        "machine", metavar="MACHINE", nargs="?", help="machine type, e.g. pc-i440fx-2.2"
    )
    pn.add_argument("model", metavar="MODEL", nargs="?", help="CPU model, e.g. Haswell")
    pn.add_argument(
        "--all",
        action="store_true",
        help="every (model, machine type) of --run into --out DIR, identical ones grouped",
    )
    pn.add_argument("--run", metavar="RUN", help="take QEMU, accelerator, topology, flags from RUN")
    # No defaults here: given with --run (which names them all) they are refused, not ignored.
    pn.add_argument("--qemu", help="QEMU binary or wrapper (default: qemu-system-x86_64)")
    pn.add_argument("--accel", choices=("tcg", "kvm"), help="accelerator (tcg)")
    pn.add_argument("--smp", help="topology when probing (1)")
    _flag_args(pn, "the source's extra -cpu flags (no --run)", " (the source's; no --run)", False)
    pn.add_argument(
        "--carry",
        metavar="PIN.json",
        help="carry a pin's JSON to --qemu's build and verify it there (no MACHINE, MODEL)",
    )
    _pin_form_args(pn, "write the definition here (default: stdout)")
    pn.add_argument(
        "--verify",
        metavar="MACHINES",
        help="machine types to start the pin on (globs; default: every one of the families)",
    )
    pn.add_argument(
        "--verify-qemu", metavar="PATH", help="also start the pin on this other QEMU build"
    )
    pn.add_argument(
        "--carried",
        action="store_true",
        help="write the pin as carried to --verify-qemu's build (what to start there)",
    )
    _guest_arg(pn)
    pn.add_argument("--jobs", type=jobs_value, help=JOBS_HELP)
    pn.add_argument("--timeout", type=seconds_value, help="seconds per QEMU (30)")
    pn.add_argument("--no-cache", action="store_true", help="learn the feature flags again")

    _fleet_parser(sub)

    e = sub.add_parser("export", help="write a run's cells in another format")
    e.add_argument("run", metavar="RUN", help="run folder")
    e.add_argument(
        "--csv", action="store_true", required=True, help="cells.csv beside cells.parquet"
    )

    fq = sub.add_parser(
        "fetch-qemu", help="put a Debian build of another QEMU release beside the system one"
    )
    fq.add_argument("version", metavar="VERSION", choices=RELEASES, help=", ".join(RELEASES))
    fq.add_argument(
        "target",
        metavar="TARGET",
        nargs="?",
        default="x86_64",
        choices=TARGETS,
        help=f"{', '.join(TARGETS)} (default x86_64; another goes to DIR/VERSION-TARGET)",
    )
    fq.add_argument(
        "--into",
        metavar="DIR",
        help="where releases go, each in DIR/VERSION (default: ~/.cache/qmpprobe-qemu)",
    )
    ng = sub.add_parser(
        "nightly",
        help="probe the configured QEMUs, diff against the previous night, index the nights",
        add_help=False,
    )
    if nightly_options:
        nightly_options(ng)
    else:  # its arguments are qmpprobe.nightly's own (main() hands them over unparsed)
        ng.add_argument("nightly_args", nargs=argparse.REMAINDER, help="see qmpprobe nightly -h")
    cp = sub.add_parser("completion", help="print a shell completion script")
    cp.add_argument(
        "shell", metavar="SHELL", choices=("bash", "zsh", "tcsh"), help="bash, zsh, tcsh"
    )
    return parser


def _pin_form_args(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument(
        "--format", default="cmdline", choices=("cmdline", "readconfig", "json", "libvirt")
    )
    p.add_argument("--out", metavar="FILE", help=out_help)


def _fleet_parser(sub: Any) -> None:
    fl = sub.add_parser(
        "fleet", help="many hosts' runs in one dataset: what runs everywhere, a baseline, migration"
    )
    fsub = _subcommands(fl, "fleet_command")
    add = fsub.add_parser("add", help="add run folders (or published references) to DATASET")
    add.add_argument("dataset", metavar="DATASET", help="fleet dataset folder (made if new)")
    add.add_argument("runs", metavar="RUN", nargs="+", help="complete run folder")
    add.add_argument("--host", help="host name (default: the host name in the run's manifest)")

    def query(name: str, help_: str) -> argparse.ArgumentParser:
        q: argparse.ArgumentParser = fsub.add_parser(name, help=help_)
        q.add_argument("dataset", metavar="DATASET", help="fleet dataset folder")
        out = q.add_mutually_exclusive_group()
        out.add_argument("--json", action="store_true", help="JSON on stdout")
        out.add_argument("--csv", action="store_true", help="CSV on stdout")
        return q

    r = query("runnable", "models every host runs unfiltered on MACHINE, and what blocks the rest")
    r.add_argument("--machine", required=True, metavar="MACHINE", help="machine type")
    b = query("baseline", "the largest CPU every host runs on MACHINE, as a pin")
    b.add_argument("--machine", required=True, metavar="MACHINE", help="machine type")
    b.add_argument("--model", metavar="MODEL", help="this model, with the flags all hosts add")
    _pin_form_args(b, "write the pin here (default: stdout)")
    b.add_argument(
        "--qemu",
        default="qemu-system-x86_64",
        help="QEMU that makes and starts the pin (default: qemu-system-x86_64 on PATH)",
    )
    b.add_argument("--accel", choices=("tcg", "kvm"), help="(default: the fleet's accelerator)")
    b.add_argument("--jobs", type=jobs_value, help=JOBS_HELP)
    b.add_argument("--timeout", type=seconds_value, help="seconds per QEMU (30)")
    b.add_argument("--no-cache", action="store_true", help="learn the feature flags again")
    m = query("can-migrate", "can a VM of MODEL on MACHINE move from host A to host B (exit 0/1)")
    m.add_argument("--machine", required=True, metavar="MACHINE", help="machine type")
    m.add_argument("--model", required=True, metavar="MODEL", help="CPU model")
    m.add_argument("--from", dest="source", required=True, metavar="HOST_A", help="source host")
    m.add_argument("--to", dest="target", required=True, metavar="HOST_B", help="target host")
    rp = fsub.add_parser("report", help="one HTML page: hosts x models, baselines, who holds back")
    rp.add_argument("dataset", metavar="DATASET", help="fleet dataset folder")
    rp.add_argument("--out", metavar="FILE", help="the page (default: DATASET/report.html)")


def _options(args: argparse.Namespace, **given: Any) -> RunOptions:
    """The validated options of a probing command (the one path: `RunOptions.from_args`)."""
    return RunOptions.from_args(vars(args), **given)


def _drawn() -> bool:
    """Whether a progress bar is drawn: on a terminal, unless -v (its lines) or -q."""
    return is_terminal() and console.verbosity() == 0


def _cmd_run(args: argparse.Namespace) -> int:
    from qmpprobe.run import lifecycle

    progress = _drawn() and not args.no_progress
    if args.resume:
        outcome = lifecycle.run_sync(
            lambda: lifecycle.resume(
                args.resume,
                args.jobs,
                args.timeout,
                progress,
                not args.no_cache,
                not args.no_visibility,
            )
        )
    else:
        options = _options(args, progress=progress)
        outcome = lifecycle.run_sync(lambda: lifecycle.run(options))
    report = None
    if outcome.complete and not args.no_report:
        from qmpprobe.report.report import write_report

        report = next(p for p in write_report(outcome.folder) if p.suffix == ".html")
    # The whole command's time (start-up, discovery and the report included), then probing's.
    console.note(f"{lifecycle.summary(outcome)}; {console.seconds_since_start():.1f} s in all")
    if report:
        console.note(f"report: {report}")
    return EXIT_OK


def _cmd_discover(args: argparse.Namespace) -> int:
    from qmpprobe.run import lifecycle

    found = lifecycle.discover_only(_options(args))
    if args.json:
        print(json.dumps(found.manifest(), indent=1))
        return EXIT_OK
    aliases = ", ".join(f"{m.alias} -> {m.name}" for m in found.machines if m.alias)
    print(f"QEMU {found.version} ({found.package}) at {found.qemu}, target {found.target}")
    print(f"fingerprint {found.fingerprint['id']}, accelerators: {', '.join(found.accelerators)}")
    print(f"{len(found.machines)} machine types (aliases: {aliases})")
    print(
        f"{len(found.models)} CPU models ({sum(m.deprecated for m in found.models)} deprecated, "
        f"{sum(not m.migration_safe for m in found.models)} not migration-safe)"
    )
    groups = {tuple(g) for g in found.feature_aliases.values()}
    print(
        f"{len(groups)} feature flags with several names, e.g. "
        + "; ".join("/".join(g) for g in sorted(groups)[:4])
    )
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from qmpprobe.report.report import write_report

    for path in write_report(args.run):
        console.note(str(path))
    return EXIT_OK


def _diff_and_write(
    run_a: str, run_b: str, args: argparse.Namespace, out: str, probed: Sequence[str] = ()
) -> int:
    from qmpprobe.analysis import diff
    from qmpprobe.report.junit import junit_xml
    from qmpprobe.report.report import printed_doc, write_diff
    from qmpprobe.store.folder import atomic_write

    accepted = diff.read_accepted(args.accept) if args.accept else None
    a, b = diff.Run.load(run_a), diff.Run.load(run_b)
    result = diff.compare(a, b, args.unreleased, args.cross_host, accepted)
    files = write_diff(result, out)
    if args.junit:
        atomic_write(Path(args.junit), junit_xml(result))
        files.append(Path(args.junit))
    if args.json:
        print(json.dumps(printed_doc(result, files, list(probed)), indent=1, ensure_ascii=False))
    else:
        console.note(diff.summary(result))
        for line in diff.change_lines(result):
            console.note(f"  {line}")
        console.note(f"diff: {files[0]}")
    return EXIT_CHANGED if len(result.breaks) else EXIT_OK


def _check_outputs(args: argparse.Namespace, out: Path, runs: Sequence[Path] = ()) -> None:
    """Where a diff goes, refused before anything is probed or written (after a whole check,
    a lost verdict): not into a run folder; `--junit FILE` a file it can write and replace,
    none of the diff's own, its inputs or the `runs` it makes (its folder may be `out`)."""
    from qmpprobe.report.report import DIFF_FILES
    from qmpprobe.store.folder import MANIFEST, file_target

    if (out / MANIFEST).exists():
        raise InputError(f"--out {out}: is a run folder (a diff goes into a folder of its own)")
    if args.junit:
        own = [out / f for f in DIFF_FILES] + list(runs)
        own += [Path(args.accept)] if args.accept else []
        file_target(args.junit, "--junit", out, own)


def _cmd_diff(args: argparse.Namespace) -> int:
    out = args.out or f"results/diff-{Path(args.run_a).name}--{Path(args.run_b).name}"
    _check_outputs(args, Path(out))
    return _diff_and_write(args.run_a, args.run_b, args, out)


def _stamp() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}"


def _cmd_check(args: argparse.Namespace) -> int:
    from qmpprobe.run import lifecycle

    out = Path(args.out or f"results/check-{_stamp()}")
    progress = _drawn()
    baseline = _options(args, qemu=args.baseline, out=str(out / "baseline"), progress=progress)
    candidate = _options(args, qemu=args.candidate, out=str(out / "candidate"), progress=progress)
    # With --json, stdout is one JSON document: the runs' lines go into it.
    _check_outputs(args, out, [out / "baseline", out / "candidate"])
    probed: list[str] = []
    say = probed.append if args.json else console.note
    lifecycle.check([baseline, candidate], lambda outcome: say(lifecycle.summary(outcome)))
    return _diff_and_write(str(out / "baseline"), str(out / "candidate"), args, str(out), probed)


def _cmd_explain(args: argparse.Namespace) -> int:
    from qmpprobe.analysis import explain
    from qmpprobe.run import lifecycle
    from qmpprobe.run.compare import comparisons
    from qmpprobe.run.preflight import capped_jobs
    from qmpprobe.run.verify import records, verify
    from qmpprobe.store.folder import RunFolder

    # Checked as every probing command's options are, before any QEMU starts (also with
    # --run: --as-globals probes).
    out = args.out or f"results/explain-{_stamp()}"
    options = _options(args, machines=args.machine, models=args.model, out=out, progress=_drawn())
    probed = []
    if not args.run:
        probed.append(lifecycle.summary(lifecycle.explain_run(options, args.machine)))
        if not args.json:  # --json: one document on stdout, the line inside it
            console.note(probed[0])
    folder = RunFolder(args.run or out)
    manifest = folder.manifest(require_complete=True)
    combos = folder.read_combos()
    newest = explain.pair(folder.path, manifest, combos, args.machine)
    cells, unanswered = explain.select_models(
        folder.read_cells(), combos, args.model, [args.machine, newest]
    )
    if unanswered and cells.empty:
        # The model was asked for, but QEMU gave nothing to compare: say what it said.
        raise InputError(f"nothing to explain: {'; '.join(unanswered[:3])}")
    for line in unanswered:
        console.warn(f"not compared: {line}")
    diffs = explain.causes(
        manifest, explain.differences(manifest, cells, args.machine, newest), args.machine, newest
    )
    trips = []
    if args.as_globals:
        plans = explain.globals_plans(manifest, diffs, args.machine, newest)
        jobs = capped_jobs(options.jobs)
        trips = lifecycle.run_sync(
            lambda: verify(manifest, cells, args.machine, newest, plans, jobs, options.timeout)
        )
    compared = _qemu_compare(args, manifest, cells, newest, options.timeout)
    failed = sum(t.status != "ok" or bool(t.left) for t in trips)
    code = EXIT_CHANGED if failed or not all(c.agrees for c in compared) else EXIT_OK
    if args.json:
        doc = explain.document(manifest, args.machine, newest, diffs)
        doc["probed"] = probed
        doc["round_trips"] = records(trips) if args.as_globals else None
        doc["qemu_compare"] = comparisons(compared) if args.qemu_compare else None
        print(json.dumps(doc, indent=1))
        return code
    print(
        f"{args.machine} vs {newest} ({manifest.qemu.version}, {manifest.accel}, "
        f"-smp {manifest.topology}): {len(diffs)} difference(s), "
        f"{diffs['model'].nunique()} model(s)"
    )
    for model, group in diffs.groupby("model", sort=True):
        print(f"{model}:")
        for r in group.itertuples():
            why = f"{r.cause_kind}: {r.cause}" if r.cause_kind else "compat props not declared"
            print(f"  {r.prop}: {r.value} (newest: {r.newest_value})  [{why}]")
    for t in trips:
        print(f"{t.model} on {newest}: " + " ".join(f"-global {g}" for g in t.globals))
        if t.status != "ok":
            print(f"  round trip: {t.status}: {t.error}")
        elif t.left:
            print(
                "  round trip: left over: "
                + ", ".join(f"{p} {a} (with globals: {b})" for p, (a, b) in sorted(t.left.items()))
            )
        else:
            print(f"  round trip: equal to {args.machine}")
    if args.as_globals:
        print(f"round trip: {len(trips) - failed}/{len(trips)} model(s) equal")
    if compared:
        from qmpprobe.run.compare import lines

        print("\n".join(lines(compared, args.machine, newest)))
    return code


def _qemu_compare(
    args: argparse.Namespace, manifest: Any, cells: Any, newest: str, timeout: float
) -> list[Any]:
    """`explain --qemu-compare`: QEMU's comparison per model explained (none without it)."""
    if not args.qemu_compare:
        return []
    from qmpprobe.run import lifecycle
    from qmpprobe.run.compare import explained

    return lifecycle.run_sync(lambda: explained(manifest, cells, args.machine, newest, timeout))


def _cmd_pin(args: argparse.Namespace) -> int:
    from qmpprobe.analysis.pin import Unpinnable
    from qmpprobe.report import pin as forms
    from qmpprobe.run import lifecycle, pin
    from qmpprobe.store.folder import atomic_write

    if refused := _pin_refusal(args):
        return _say(refused, EXIT_INPUT)
    check_patterns(args.verify, "--verify")
    if args.all:
        return _pin_all(args)
    options = _options(args, machines=args.machine, models=args.model, progress=False)
    request = pin.Request(
        args.machine or "",
        args.model or "",
        options,
        args.run,
        args.verify,
        args.verify_qemu,
        args.format,
        args.carry,
    )
    make = pin.carry if args.carry else pin.make
    try:
        pinned = lifecycle.run_sync(lambda: make(request))
    except Unpinnable as e:
        return _say(error_text(e), EXIT_CHANGED)
    except Interrupted:
        return _say("interrupted: no pin written, no QEMU left", EXIT_INTERRUPTED)
    text = forms.render(pinned, args.format, carried=args.carried or bool(args.carry))
    if args.out:
        atomic_write(Path(args.out), text.encode())
    else:
        sys.stdout.write(text)
    for line in forms.summary(pinned):
        console.warn(line)
    return EXIT_OK if pinned.equal else EXIT_CHANGED


def _pin_refusal(args: argparse.Namespace) -> str:
    """What `pin` refuses before anything starts: option sets that cannot go together."""
    source = [o for o, v in (("--qemu", args.qemu), ("--accel", args.accel), ("--smp", args.smp),
              ("--cpu-flags", args.cpu_flags), ("--global", args.globals)) if v]  # fmt: skip
    if args.all:
        if args.machine or args.model or not args.run or not args.out:
            return "pin --all takes --run RUN and --out DIR, and no MACHINE or MODEL"
        if args.verify or args.verify_qemu or args.carried or args.carry:
            return "pin --all verifies each definition on its own machine types, on its build"
    elif args.carry:
        if args.machine or args.model or args.run or args.verify_qemu:
            return "pin --carry FILE takes the QEMU to carry to as --qemu, no MACHINE or MODEL"
    elif not (args.machine and args.model):
        return "pin: MACHINE and MODEL are needed (or --all --run RUN --out DIR, or --carry FILE)"
    if args.run and source:
        return (
            f"pin --run takes QEMU, accelerator, topology and flags from the run: not {source[0]}"
        )
    if args.carried and not args.verify_qemu:
        return "pin --carried needs --verify-qemu PATH (the build it is carried to)"
    if args.format == "libvirt" and (args.carried or args.carry):
        return "the libvirt form is made on the source's build: not with --carried or --carry"
    if args.out and not args.all:
        from qmpprobe.store.folder import file_target

        try:
            file_target(args.out, "--out")
        except InputError as e:
            return f"{e}; pin --all writes a folder" if Path(args.out).is_dir() else str(e)
    return ""


def _pin_all(args: argparse.Namespace) -> int:
    from qmpprobe.report import pin as forms
    from qmpprobe.run import lifecycle, pin

    out = Path(args.out)
    taken = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if taken and not (out / "definitions.csv").is_file():
        return _say(f"--out {out}: exists and is not an empty folder or a pin --all's", EXIT_INPUT)
    options = _options(args, progress=False)
    request = pin.Request("", "", options, args.run, form=args.format)
    try:
        pins = lifecycle.run_sync(lambda: pin.make_all(request))
    except Interrupted:
        return _say(f"interrupted: nothing written to {out}, no QEMU left", EXIT_INTERRUPTED)
    unwritten = forms.write_all(out, pins, args.format)
    for line in forms.all_summary(pins):
        console.warn(line)
    if unwritten:
        _say(f"{unwritten} definition(s) --format {args.format} cannot hold (their error)", 0)
    print(out / "definitions.csv")
    return EXIT_OK if all(g.equal for g in pins.groups) and not unwritten else EXIT_CHANGED


def _cmd_fleet(args: argparse.Namespace) -> int:
    if args.fleet_command == "add":
        from qmpprobe.analysis import fleet_entry as store

        for line in store.add_all(args.dataset, args.runs, args.host):
            console.warn(line)
        print(args.dataset)
        return EXIT_OK
    from qmpprobe.analysis.fleet import Fleet
    from qmpprobe.report import fleet as forms

    f = Fleet(args.dataset)
    if args.fleet_command == "runnable":
        rows = f.runnable(args.machine)
        if args.json:
            sys.stdout.write(forms.runnable_json(rows))
        elif args.csv:
            sys.stdout.write(forms.runnable_csv(rows, forms.machines_of(f)))
        else:
            forms.runnable_table(rows)
        return EXIT_OK
    if args.fleet_command == "can-migrate":
        verdict = f.can_migrate(args.machine, args.model, args.source, args.target)
        if args.json:
            sys.stdout.write(json.dumps(forms.migration_doc(verdict), indent=1) + "\n")
        elif args.csv:
            sys.stdout.write(forms.migration_csv(verdict, forms.machines_of(f)))
        else:
            sys.stdout.write(forms.migration_text(verdict))
        return EXIT_OK if verdict.possible else EXIT_CHANGED
    if args.fleet_command == "report":
        from qmpprobe.store.folder import atomic_write

        out = Path(args.out) if args.out else f.dataset.path / "report.html"
        atomic_write(out, forms.report_html(f).encode())
        print(out)
        return EXIT_OK
    return _fleet_baseline(args, f)


def _fleet_baseline(args: argparse.Namespace, f: Any) -> int:
    from qmpprobe.analysis.fleet import NoBaseline
    from qmpprobe.analysis.pin import Unpinnable
    from qmpprobe.report import fleet as forms
    from qmpprobe.report import pin as pin_forms
    from qmpprobe.run import fleet, lifecycle
    from qmpprobe.store.folder import atomic_write

    try:
        choice = f.baseline(args.machine, args.model)
    except NoBaseline as e:
        return _say(error_text(e), EXIT_CHANGED)
    if args.csv:
        sys.stdout.write(forms.choice_csv(choice, forms.machines_of(f)))
        return EXIT_OK
    accel = args.accel or (choice.accels[0] if len(choice.accels) == 1 else None)
    if accel is None:
        return _say(
            f"the fleet runs {' and '.join(choice.accels)}: say which the pin is for (--accel)",
            EXIT_INPUT,
        )
    options = _options(args, accel=accel, smp=choice.build[2], progress=False)
    try:
        pinned = lifecycle.run_sync(lambda: fleet.baseline(choice, options, args.format))
    except Unpinnable as e:
        return _say(error_text(e), EXIT_CHANGED)
    except Interrupted:
        return _say("interrupted: no pin written, no QEMU left", EXIT_INTERRUPTED)
    if args.json:
        doc = {"fleet": forms.choice_doc(choice),
               "pin": json.loads(pin_forms.render(pinned, "json"))}  # fmt: skip
        text = json.dumps(doc, indent=1, ensure_ascii=False) + "\n"
    else:
        text = pin_forms.render(pinned, args.format)
    if args.out:
        atomic_write(Path(args.out), text.encode())
    else:
        sys.stdout.write(text)
    console.warn(f"baseline of {choice.hosts} host(s) on {choice.machine}: {choice.model}"
                 + (f" + {', '.join(choice.extra)}" if choice.extra else ""))  # fmt: skip
    for note in choice.notes:
        console.warn(note)
    for line in pin_forms.summary(pinned):
        console.warn(line)
    return EXIT_OK if pinned.equal else EXIT_CHANGED


def _cmd_fetch_qemu(args: argparse.Namespace) -> int:
    from qmpprobe.run.fetch import fetch

    print(fetch(args.version, args.into, console.verbosity() > 0, args.target))
    return EXIT_OK


def _cmd_completion(args: argparse.Namespace) -> int:
    import shtab

    from qmpprobe import nightly

    # The nightly's own options too (build_parser leaves them to it: importing the nightly
    # would cost every command its pandas).
    parser = build_parser(nightly.add_arguments)
    print(shtab.complete(parser, shell=args.shell))
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from qmpprobe.store.folder import RunFolder

    folder = RunFolder(args.run)
    folder.read_manifest()
    print(folder.export_csv())
    return EXIT_OK


COMMANDS = {
    "run": _cmd_run,
    "discover": _cmd_discover,
    "report": _cmd_report,
    "diff": _cmd_diff,
    "check": _cmd_check,
    "export": _cmd_export,
    "explain": _cmd_explain,
    "pin": _cmd_pin,
    "fleet": _cmd_fleet,
    "fetch-qemu": _cmd_fetch_qemu,
    "completion": _cmd_completion,
}


#: Options whose value may begin with `-` (`--cpu-flags -mmx`): argparse would take it for
#: an option, so the value is attached (`--cpu-flags=-mmx`) before parsing. The numbers too,
#: so that `--timeout -inf` is refused for what it is, not as a missing value.
DASH_VALUES = ("--cpu-flags", "--timeout", "--jobs", "--host")


def attach_dash_values(argv: Sequence[str]) -> list[str]:
    """`--cpu-flags -mmx` → `--cpu-flags=-mmx`, as a user means it."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in DASH_VALUES:
            value = next(it, None)
            out.append(arg if value is None else f"{arg}={value}")
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `qmpprobe` console script."""
    given = list(sys.argv[1:] if argv is None else argv)
    if sys.stdout is not None and not isinstance(sys.stdout, PipeSafe):
        sys.stdout = PipeSafe(sys.stdout)
    # Commands that start no QEMU (report, diff, export) stop on SIGTERM and SIGHUP as on
    # Ctrl-C; those that do replace these with their own handlers while QEMUs run.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # `nohup` keeps SIGHUP ignored
            signal.signal(sig, _stop)
    at = _nightly_at(given)
    if at is not None:  # its own options, parsed by qmpprobe.nightly
        from qmpprobe import nightly

        rest = given[at + 1 :]
        console.configure(_verbosity([*given[:at], *_leading_verbosity(rest)]))
        return _guarded(lambda: nightly.main(_without_verbosity(rest), _run_refusal))
    parser = build_parser()
    args, extra = parser.parse_known_args(attach_dash_values(given))
    if extra:
        getattr(args, "parser_of_command", parser).error(
            f"unrecognized arguments: {' '.join(extra)}"
        )
    console.configure(_verbosity(given))
    if console.verbosity() >= 2:
        from qmpprobe.run import lifecycle

        lifecycle.keep_traffic()
    code = _command(args)
    # -v: the whole command, from the process's start (Python and imports included).
    console.log.info("%s took %.1f s in all", args.command, console.seconds_since_start())
    return code


#: -v, -vv, -q as a token (`-qv` and `-vq` too); what argparse takes them as.
_VERBOSITY = re.compile(r"-[vq]+|--verbose|--quiet")


def _verbosity(tokens: Sequence[str]) -> int:
    """-1 for -q; else how many -v, given before and after the command alike (argparse keeps
    only the last place's count); tokens after `--` are not qmpprobe's."""
    mine = list(itertools.takewhile(lambda t: t != "--", tokens))
    flags = [t for t in mine if _VERBOSITY.fullmatch(t)]
    if any("q" in t and not t.startswith("--v") for t in flags):
        return -1
    return sum(t.count("v") if not t.startswith("--") else 1 for t in flags)


def _run_refusal(smp: str, run_args: Sequence[str]) -> str:
    """What `qmpprobe run --smp SMP RUN_ARGS` refuses before probing ("" when nothing): the
    nightly asks before its first run, not once per run."""
    from qmpprobe.run.options import RunOptions

    given = attach_dash_values(["run", "--smp", smp, *run_args])
    parsed, extra = build_parser().parse_known_args(given)
    if extra:
        return f"run arguments qmpprobe run does not take: {' '.join(extra)}"
    try:
        RunOptions.from_args(vars(parsed))
    except InputError as e:
        return str(e)
    return ""


def _nightly_at(given: Sequence[str]) -> int | None:
    """Where `nightly` is the command: only -v/-q may come before it (`qmpprobe -h nightly`
    is the help, `qmpprobe --models nightly` no command at all)."""
    for i, token in enumerate(given):
        if token == "nightly":
            return i
        if not _VERBOSITY.fullmatch(token):
            return None
    return None


def _leading_verbosity(rest: Sequence[str]) -> list[str]:
    """-v/-q given after `nightly` (before its `--`): qmpprobe's, as for every command."""
    mine = itertools.takewhile(lambda t: t != "--", rest)
    return [t for t in mine if _VERBOSITY.fullmatch(t)]


def _without_verbosity(rest: Sequence[str]) -> list[str]:
    """The nightly's own arguments: -v/-q before its `--` taken out."""
    before = list(itertools.takewhile(lambda t: t != "--", rest))
    return [t for t in before if not _VERBOSITY.fullmatch(t)] + list(rest[len(before) :])


def _guarded(command: Callable[[], int]) -> int:
    """Every way a command can end as an exit code and one line (see EPILOG)."""
    try:
        return command()
    except KeyboardInterrupt:
        return _say("interrupted (each file is written whole or not at all)", EXIT_INTERRUPTED)
    except InputError as e:
        return _say(error_text(e), EXIT_INPUT)
    except Interrupted as e:
        return _say(error_text(e), EXIT_INTERRUPTED)
    except OSError as e:
        if e.errno is None and not e.filename and not str(e):
            # A bare OSError (an asyncio TimeoutError) says nothing: a step forgot to say
            # what it waited for. That is qmpprobe's bug, not the user's input.
            return _internal(e)
        return _say(error_text(e), EXIT_INPUT)
    except Exception as e:  # a bug of qmpprobe's: one line here, the traceback in a file
        return _internal(e)


def _command(args: argparse.Namespace) -> int:
    """Run the parsed command."""
    return _guarded(lambda: COMMANDS[args.command](args))


def _stop(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def error_text(error: BaseException) -> str:
    """What went wrong, as one line that is never empty (the exception's type at least)."""
    text = str(error)
    if isinstance(error, OSError) and (error.strerror or error.filename):
        where = f"{error.filename}: " if error.filename else ""
        text = f"{where}{error.strerror or error}"
    text = " | ".join(line.strip() for line in text.splitlines() if line.strip())
    return text or f"{type(error).__name__} (no message)"


def _say(line: str, code: int) -> int:
    """The command's last line, on stderr; its exit code."""
    # Even under -q: the one line of a failure is never left out. stderr may be gone (a
    # hung-up terminal, `2>&-`): the exit code still says it, and stdout stays the data's.
    if sys.stderr is not None:
        with contextlib.suppress(OSError):
            print(f"qmpprobe: {console.printable(line)}", file=sys.stderr)
    return code


def _internal(error: BaseException) -> int:
    what = f": {error_text(error)}" if str(error).strip() else " (no message)"
    return _say(f"internal error: {type(error).__name__}{what}{_saved(error)}", EXIT_INTERNAL)


def _saved(error: BaseException) -> str:
    """Write the traceback of an internal error to a file; ` (traceback: FILE)` or nothing."""
    import tempfile
    import traceback

    try:
        fd, path = tempfile.mkstemp(prefix="qmpprobe-internal-error-", suffix=".txt")
        with open(fd, "w") as f:
            f.write("".join(traceback.format_exception(error)))
    except OSError:
        return ""
    return f" (traceback: {path})"
