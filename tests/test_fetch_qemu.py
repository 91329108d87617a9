"""scripts/fetch-qemu in a hostile checkout path (issue 14, class 12).

The script is copied into a folder whose name holds `$(…)`, backquotes, quotes, spaces, `$HOME`
and glob characters, and run there for real (a Debian mirror from this machine's own apt
configuration; skipped with the script's reason when there is none or it cannot be reached).
Nothing of the name may run; the wrapper must run the release it names, from wherever the
folder is moved to; a plain QMP session must list the properties of `virtio-gpu-gl-pci` (its
module is shipped, so it must load) with QEMU still alive afterwards; a second run re-uses the
folder without apt.

The packages are kept in $QMPPROBE_FETCH_ARCHIVES (default: this checkout's
.cache/qemu/archives, the script's own default), so only the first run downloads (~170 MB).
QMPPROBE_TEST_FETCH_VERSION picks the release (default 10.0).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from conftest import REPO

SCRIPT = REPO / "scripts" / "fetch-qemu"
#: What scripts/fetch-qemu runs (the script `qmpprobe fetch-qemu` runs too).
TOOL = REPO / "qmpprobe" / "tools" / "fetch-qemu"


def copy_scripts(top: Path) -> None:
    """The checkout's fetch-qemu and the packaged script it runs, under `top`."""
    (top / "scripts").mkdir(parents=True)
    (top / "qmpprobe" / "tools").mkdir(parents=True)
    shutil.copy2(SCRIPT, top / "scripts" / "fetch-qemu")
    shutil.copy2(TOOL, top / "qmpprobe" / "tools" / "fetch-qemu")


VERSION = os.environ.get("QMPPROBE_TEST_FETCH_VERSION", "10.0")
#: Generous: a first run downloads and unpacks ~300 packages; nothing here measures speed.
PATIENCE = 3600


def hostile_checkout(tmp: Path, canary: Path, name: str) -> Path:
    """A copy of scripts/fetch-qemu in a checkout named to run `touch CANARY` if evaluated."""
    top = tmp / f"{name} ird$(touch {canary}-dollar)'x`touch {canary}-tick`\"q $HOME *[a]"
    copy_scripts(top)
    return top


def fetch(
    checkout: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **(env or {})}
    env.setdefault("QMPPROBE_FETCH_ARCHIVES", str(REPO / ".cache" / "qemu" / "archives"))
    return subprocess.run(
        [str(checkout / "scripts" / "fetch-qemu"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=checkout.parent,
        timeout=PATIENCE,
    )


def skip_unless_fetched(done: subprocess.CompletedProcess[str]) -> None:
    """Skip (with the script's one line) when this machine cannot fetch: no Debian mirror in
    its apt configuration (exit 2), or none that could be used (exit 3)."""
    last = (done.stderr.strip().splitlines() or [""])[-1]
    if done.returncode in (2, 3) and "folder path" not in last:
        pytest.skip(f"scripts/fetch-qemu {VERSION} cannot run here: {last}")
    assert done.returncode == 0, done.stderr[-3000:]


async def gl_session(wrapper: Path) -> tuple[list[str], list[str]]:
    """A plain QMP session with the fetched QEMU: the non-abstract devices it has, and the
    properties of virtio-gpu-gl-pci (listed when it has that device; QEMU must still answer
    afterwards and end on `quit` with exit 0)."""
    ours, theirs = socket.socketpair()
    proc = await asyncio.create_subprocess_exec(
        str(wrapper),
        *("-S", "-nodefaults", "-no-user-config", "-display", "none", "-machine", "none"),
        *("-chardev", f"socket,id=qmp,fd={theirs.fileno()}", "-mon", "chardev=qmp,mode=control"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        pass_fds=(theirs.fileno(),),
    )
    theirs.close()
    client = QMPClient("fetched")
    devices: list[str] = []
    props: list[str] = []
    failed: BaseException | None = None
    try:
        await client.connect(ours)
        types = await client.execute("qom-list-types", {"implements": "device", "abstract": False})
        devices = sorted(t["name"] for t in types)
        if "virtio-gpu-gl-pci" in devices:
            got = await client.execute("device-list-properties", {"typename": "virtio-gpu-gl-pci"})
            props = sorted(p["name"] for p in got)
            # QEMU is still there and answers.
            assert (await client.execute("query-status"))["status"] == "prelaunch"
        await client.execute("quit")
    except Exception as err:  # reported below with what QEMU said
        failed = err
        proc.kill()
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()
        ours.close()
        try:
            rc = await asyncio.wait_for(proc.wait(), 600)
        except TimeoutError:
            proc.kill()
            rc = await proc.wait()
    output = (await proc.stdout.read()).decode(errors="replace") if proc.stdout else ""
    assert failed is None and rc == 0, f"{failed!r}; QEMU ended with {rc}: {output}"
    return devices, props


def test_refuses_a_path_the_loader_cannot_carry(tmp_path: Path) -> None:
    """':' splits the loader's --library-path: refused up front with one line, exit 2."""
    top = tmp_path / "a:b"
    copy_scripts(top)
    done = fetch(top, VERSION)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "--library-path" in done.stderr, done.stderr
    assert not (top / ".cache" / "qemu" / VERSION).exists()


def apt_config(tmp: Path, sources: str) -> dict[str, str]:
    """An environment whose apt configuration names only SOURCES (deb822)."""
    (tmp / "parts").mkdir(parents=True)
    (tmp / "sources.list").write_text("")
    (tmp / "parts" / "only.sources").write_text(sources)
    conf = tmp / "apt.conf"
    conf.write_text(
        f'Dir::Etc::SourceList "{tmp}/sources.list";\nDir::Etc::SourceParts "{tmp}/parts";\n'
    )
    return {"APT_CONFIG": str(conf)}


def test_no_debian_mirror_configured_is_one_line(tmp_path: Path) -> None:
    """The mirror comes from the machine's apt configuration; with none there, one line."""
    env = apt_config(
        tmp_path / "apt", "Types: deb\nURIs: file:/elsewhere\nSuites: nodistro\nComponents: main\n"
    )
    done = fetch(hostile_checkout(tmp_path, tmp_path / "canary", "m"), VERSION, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "names no Debian mirror" in done.stderr, done.stderr


def test_a_mirror_that_serves_nothing_is_exit_3(tmp_path: Path) -> None:
    """A Debian suite configured, but its archive does not answer: exit 3, nothing left."""
    env = apt_config(
        tmp_path / "apt",
        "Types: deb\nURIs: file:/nonexistent/debian\nSuites: bookworm\nComponents: main\n",
    )
    checkout = hostile_checkout(tmp_path, tmp_path / "canary", "n")
    done = fetch(checkout, VERSION, env=env)
    assert done.returncode == 3, done.stderr
    assert "(tried: file:/nonexistent/debian/)" in done.stderr.splitlines()[-1], done.stderr
    assert not (checkout / ".cache" / "qemu" / f".{VERSION}.building").exists()
    assert not (checkout / ".cache" / "qemu" / VERSION).exists()


def test_bad_version_is_refused(tmp_path: Path) -> None:
    done = fetch(hostile_checkout(tmp_path, tmp_path / "canary", "v"), "$(id)")
    assert done.returncode == 2 and done.stderr.startswith("fetch-qemu: usage:"), done.stderr


@pytest.mark.slow
def test_fetch_in_a_hostile_checkout_runs_qemu_and_nothing_else(tmp_path: Path) -> None:
    try:
        fetch_in_a_hostile_checkout(tmp_path)
    finally:
        # The unpacked release is ~700 MB: not kept among pytest's last temporary folders.
        shutil.rmtree(tmp_path, ignore_errors=True)


def fetch_in_a_hostile_checkout(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    checkout = hostile_checkout(tmp_path, canary, "we")
    done = fetch(checkout, VERSION)
    skip_unless_fetched(done)
    home = checkout / ".cache" / "qemu" / VERSION
    wrapper = Path(done.stdout.strip().splitlines()[-1])
    assert wrapper == home / "qemu-system-x86_64"

    # The wrapper names no path at all: nothing of the folder's name can be evaluated.
    text = wrapper.read_text()
    assert str(tmp_path) not in text and "touch" not in text, text

    marker = (home / "fetched").read_text().splitlines()
    assert marker[0].startswith(f"fetch-qemu 2: QEMU {VERSION} from Debian "), marker
    modules = sorted(p.name for p in (home / "root/usr/lib/x86_64-linux-gnu/qemu").glob("*.so"))
    assert f"modules: all {len(modules)} present load" in "\n".join(marker), marker

    version = subprocess.run(
        [str(wrapper), "--version"], capture_output=True, text=True, timeout=PATIENCE
    )
    assert version.returncode == 0 and version.stdout.startswith(
        f"QEMU emulator version {VERSION}."
    ), version

    devices, props = asyncio.run(gl_session(wrapper))
    assert "virtio-gpu-pci" in devices
    if "hw-display-virtio-gpu-pci-gl.so" in modules:
        # Its module is shipped, so it loads and the device is there, with its properties.
        assert "virtio-gpu-gl-pci" in devices
        assert "max_outputs" in props, props

    # The marker means what it says: a second run takes the folder as it is, without apt.
    again = fetch(checkout, VERSION)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == str(wrapper) and again.stderr == "", again.stderr

    # Nothing of the name ran, in any of these steps.
    assert not list(tmp_path.glob("canary*")), list(tmp_path.glob("canary*"))

    # The folder can move (to another hostile name): the wrapper finds itself.
    moved = tmp_path / f"moved $(touch {canary}-moved) `touch {canary}-moved`"
    rel = wrapper.relative_to(checkout)
    moved.parent.mkdir(parents=True)
    checkout.rename(moved)
    version = subprocess.run(
        [str(moved / rel), "--version"], capture_output=True, text=True, timeout=PATIENCE
    )
    assert version.returncode == 0 and f"version {VERSION}." in version.stdout, version
    assert not list(tmp_path.glob("canary*")), list(tmp_path.glob("canary*"))
