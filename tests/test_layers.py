"""The layout's rules (README "Layout"), checked on the source: a broken rule fails here.

Each step is a package; what a module may import follows from its step. Imports are read
with `ast` (every `import`, at any depth), so a rule cannot be dodged by importing late.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qmpprobe"
#: The probing side starts QEMU; the reading side works on run folders only.
PROBING = {"discover", "probe"}
READING = {"store", "analysis", "report"}
#: What each step may import of qmpprobe (besides itself and `errors`, a leaf).
ALLOWED = {
    "core": set(),
    "plan": {"core"},
    "probe": {"core"},
    "discover": {"core", "probe"},
    "store": {"core"},
    "analysis": {"core", "plan", "store"},
    "report": {"core", "analysis", "store"},
    "run": {"core", "plan", "probe", "discover", "store", "analysis"},
    "cli": {"core", "run", "analysis", "report", "store", "console", "nightly"},
    "nightly": {"core", "report", "store", "console"},
    "__main__": {"cli"},
    # Leaves: the package root (its version) and the two exceptions everyone raises.
    "qmpprobe": set(),
    "errors": set(),
    # The command line's edge: verbosity, a stdout that survives a closed pipe.
    "console": {"core"},
}
#: Imports the command line may make at all: it parses and prints.
CLI_STDLIB = {
    "argparse",
    "contextlib",
    "json",
    "signal",
    "sys",
    "collections",
    "typing",
    "datetime",
    "pathlib",
    "tempfile",
    "traceback",
    "__future__",
    # `qmpprobe completion`: the completion script generated from the parser itself.
    "shtab",
    # Reading -v/-q and `nightly` out of argv.
    "itertools",
    "re",
}


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def step(module: str) -> str:
    """`qmpprobe.store.cells` → `store`; `qmpprobe.cli` → `cli`; `qmpprobe` → `qmpprobe`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imports(tree: ast.AST, package: str) -> Iterator[tuple[ast.stmt, str, list[str], bool]]:
    """(node, module, names, at top level) of every import in a module of `package`;
    relative imports resolved against it; `if TYPE_CHECKING:` counts."""
    top = set(map(id, getattr(tree, "body", [])))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name, [], id(node) in top
        elif isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([module] if module else [])])
            yield node, module, names, id(node) in top


@cache
def graph() -> dict[str, dict[str, list[tuple[int, bool]]]]:
    """module → {imported qmpprobe module or external top name: [(line, top level)]}."""
    mods = modules()
    out: dict[str, dict[str, list[tuple[int, bool]]]] = {}
    for name, path in mods.items():
        edges: dict[str, list[tuple[int, bool]]] = {}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node, module, names, top in _imports(ast.parse(path.read_text()), package):
            targets = [module]
            if module.startswith("qmpprobe"):
                # `from qmpprobe.run import options` imports the module qmpprobe.run.options.
                subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in mods]
                targets = subs or [module]
            else:
                targets = [module.split(".")[0]]
            for t in targets:
                edges.setdefault(t, []).append((node.lineno, top))
        out[name] = edges
    return out


def internal(module: str) -> dict[str, list[tuple[int, bool]]]:
    return {m: v for m, v in graph()[module].items() if m.startswith("qmpprobe")}


def closure(module: str) -> set[str]:
    """Every qmpprobe module `module` imports, directly or not."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        for m in internal(todo.pop()):
            if m not in seen and m in graph():
                seen.add(m)
                todo.append(m)
    return seen


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in internal(m):
            if n not in graph() or n == m:
                continue
            if state.get(n) == 1:
                cycle = [*path[path.index(n) :], n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in graph():
        if m not in state:
            visit(m)


def test_each_step_imports_only_what_it_may() -> None:
    bad = []
    for m in graph():
        s = step(m)
        assert s in ALLOWED, f'{m}: a step the layout does not know (README "Layout")'
        for n, where in internal(m).items():
            t = step(n)
            if t not in (s, "errors", "qmpprobe") and t not in ALLOWED[s]:
                bad.append(f"{m}:{where[0][0]} imports {n} ({s} may not import {t})")
    assert not bad, "\n".join(bad)


def test_reading_side_never_reaches_the_probing_side() -> None:
    bad = [
        f"{m} reaches {n}"
        for m in graph()
        if step(m) in READING | {"core", "plan"}
        for n in closure(m)
        if step(n) in PROBING | {"run"}
    ]
    assert not bad, "\n".join(bad)


def test_probing_side_never_reaches_store_runner_or_analysis() -> None:
    bad = [
        f"{m} reaches {n}"
        for m in graph()
        if step(m) in PROBING
        for n in closure(m)
        if step(n) in READING | {"run"}
    ]
    assert not bad, "\n".join(bad)


def test_only_the_runner_joins_probing_and_store() -> None:
    bad = []
    for m in graph():
        steps = {step(n) for n in internal(m)}
        if steps & PROBING and "store" in steps and step(m) != "run":
            bad.append(m)
    assert not bad, f"modules importing both the probing side and the store: {bad}"


def test_no_function_level_import_outside_the_cli() -> None:
    # The command line imports each command's modules when that command runs (start-up time
    # of `qmpprobe report` must not pay for the QEMU client); nowhere else is an import late.
    bad = [
        f"{m}:{line} imports {n} inside a function"
        for m, edges in graph().items()
        if m != "qmpprobe.cli"
        for n, where in edges.items()
        for line, top in where
        if not top
    ]
    assert not bad, "\n".join(bad)


def test_no_import_by_name() -> None:
    # importlib or __import__ would hide an import from every rule above.
    bad = [
        f"{m}:{where[0][0]} imports {n}"
        for m, edges in graph().items()
        for n, where in edges.items()
        if n == "importlib"
    ]
    bad += [
        f"{m} calls __import__"
        for m, path in modules().items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Name) and node.id == "__import__"
    ]
    assert not bad, "\n".join(bad)


#: What a command's loop may call: printing and the formatting of what it prints.
PRINTING = {
    *("print", "str", "len", "iter", "next", "bool", "sorted", "tuple"),
    *("join", "items", "itertuples"),
    # console.note and console.warn print (or not, under -q).
    *("note", "warn"),
}


def test_the_cli_parses_and_prints() -> None:
    edges = graph()["qmpprobe.cli"]
    external = {n for n in edges if not n.startswith("qmpprobe")}
    assert external <= CLI_STDLIB, f"the CLI imports {sorted(external - CLI_STDLIB)}"
    tree = ast.parse(modules()["qmpprobe.cli"].read_text())
    classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
    assert classes == ["_Parser"], f"the CLI defines {classes}: behaviour belongs below it"
    # No loops over data beyond printing: a `for` in a command only prints what it walks.
    # Parsing (argv rewriting, the parser) may loop; a command's loops only print.
    commands = (
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("_cmd_")
    )
    for fn in commands:
        loops = (
            n
            for n in ast.walk(fn)
            if isinstance(n, ast.For | ast.While | ast.ListComp | ast.SetComp | ast.GeneratorExp)
        )
        for loop in loops:
            body = loop.body if isinstance(loop, ast.For | ast.While) else [loop.elt]
            calls = {
                c.func.id if isinstance(c.func, ast.Name) else c.func.attr
                for stmt in body
                for c in ast.walk(stmt)
                if isinstance(c, ast.Call) and isinstance(c.func, ast.Name | ast.Attribute)
            }
            line = getattr(loop, "lineno", fn.lineno)
            assert calls <= PRINTING, (
                f"qmpprobe.cli:{line}: a loop in {fn.name} calls {sorted(calls - PRINTING)}"
            )


READERS = sorted(m for m in modules() if step(m) in READING | {"core", "plan"})


@pytest.mark.parametrize("module", READERS)
def test_reading_side_does_not_load_the_qmp_client(module: str) -> None:
    code = f"import sys, {module}; sys.exit('qemu' in sys.modules or 'qemu.qmp' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, f"importing {module} loads qemu.qmp {done.stderr[-300:]}"
