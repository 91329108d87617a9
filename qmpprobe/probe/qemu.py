"""One QEMU process with a QMP monitor on a socketpair: start it, talk to it, make sure it dies.

Every QEMU qmpprobe starts goes through `QemuProcess`: it runs in its own process group
(so a wrapper's children die with it), under a parent-death signal (so it cannot outlive
qmpprobe), with an environment marker (so a later run can find leftovers of a killed one),
and with its output drained into a bounded tail (so a flood cannot block it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Awaitable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import orjson
from qemu.qmp import ExecuteError, Message, QMPClient
from qemu.qmp.message import DeserializationError, UnexpectedTypeError
from qemu.qmp.models import ErrorResponse
from qemu.qmp.qmp_client import BadReplyError

#: Environment variable set in every QEMU qmpprobe starts; its value names the owner (a run).
OWNER_ENV = "QMPPROBE_OWNER"
#: Largest QMP message accepted (qom-list-get of a whole CPU is ~40 KiB; leave room).
READ_LIMIT = 8 << 20
#: Bytes of QEMU's stdout/stderr kept for error messages.
TAIL_BYTES = 16 << 10

T = TypeVar("T")

_SETPRIV = shutil.which("setpriv")
_PR_SET_PDEATHSIG = 1

#: Sessions (= process groups: every QEMU starts a session of its own) of the QEMUs alive now.
_LIVE: set[int] = set()
#: Where each session's start and end is told (the reaper's pipe), or None.
_TELL: int | None = None


def tell_reaper(fd: int | None) -> None:
    """Send every QEMU session's start (`+SID INODE`, the inode of its QMP socket) and end
    (`-SID`) to `fd` from now on (QEMUs started before the reaper are discovery's: none)."""
    global _TELL
    _TELL = fd


def tell(line: str) -> None:
    """Tell the reaper one line (nothing when there is none)."""
    if _TELL is None:
        return
    # A few bytes per QEMU; a reaper that is gone (EPIPE) cannot be helped from here.
    with contextlib.suppress(OSError):
        os.write(_TELL, f"{line}\n".encode())


def kill_live() -> None:
    """SIGKILL every QEMU session still alive (the last resort of a command that ends)."""
    for sid in list(_LIVE):
        kill_session(sid)


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass(frozen=True)
class LaunchOptions:
    """What every QEMU of a run is started with, besides the machine type and CPU model."""

    qemu: str
    accel: str
    topology: str = "1,sockets=1,cores=1,threads=1"
    cpu_flags: str = ""
    globals: tuple[str, ...] = ()
    #: --guest-cpuid: the firmware image to boot after the QMP read (see `guest`).
    firmware: str = ""

    def argv(self, machine: str, model: str | None = None) -> list[str]:
        """The QEMU command line for one machine type (and CPU model), without the monitor."""
        argv = [self.qemu, "-S", "-nodefaults", "-no-user-config", "-display", "none"]
        argv += ["-machine", machine, "-accel", self.accel]
        if model is not None:
            argv += ["-cpu", f"{model},{self.cpu_flags}" if self.cpu_flags else model]
            argv += ["-smp", self.topology]
            if self.firmware:
                # With an id, the device is not an anonymous `device[0]` beside the CPU's name.
                argv += ["-bios", self.firmware, "-no-reboot"]
                argv += ["-device", "isa-debug-exit,id=qmpprobe-exit"]
        for g in self.globals:
            argv += ["-global", g]
        return argv


@dataclass(frozen=True)
class Ended:
    """How a QEMU process ended: exit code, or the signal that killed it."""

    exit: int | None
    signal: int | None

    @classmethod
    def from_returncode(cls, rc: int | None) -> Ended:
        """Turn a Popen-style return code (negative = signal) into an `Ended`."""
        if rc is None:
            return cls(None, None)
        return cls(None, -rc) if rc < 0 else cls(rc, None)


def qmp_answer(result: Any) -> dict[str, Any]:
    """Wrap a command result as QEMU's own answer object (`{"return": ...}` or `{"error": ...}`)."""
    if isinstance(result, ExecuteError):
        error = cast(dict[str, Any], result.received["error"])
        return {"error": dict(error)}
    if isinstance(result, BaseException):
        raise result
    return {"return": result}


#: `-vv`: each client keeps the QMP messages it exchanged (`QemuProcess.traffic`), which a
#: combo's journal entry then holds.
_TRAFFIC = False


def record_traffic(on: bool) -> None:
    """Keep (or not) the QMP traffic of every QEMU started from now on."""
    global _TRAFFIC
    _TRAFFIC = on


def traffic_recorded() -> bool:
    """Whether `record_traffic` is on."""
    return _TRAFFIC


class _Client(QMPClient):
    """A QMPClient tuned for thousands of short sessions (qemu.qmp is pinned: see pyproject).

    qemu.qmp's message hooks (meant for subclasses) pretty-print every message eagerly for
    the debug log, about a third of qmpprobe's own CPU time in a full run: only done here
    when that log is on. Execution ids are short and pipelined commands share one write.
    """

    traffic: list[str] | None = None

    def _cb_outbound(self, msg: Message) -> Message:
        if self.traffic is not None:
            self.traffic.append("> " + orjson.dumps(dict(msg)).decode())
        return super()._cb_outbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg

    def _cb_inbound(self, msg: Message) -> Message:
        if self.traffic is not None:
            self.traffic.append("< " + orjson.dumps(dict(msg)).decode())
        return super()._cb_inbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg

    # QEMU reads QMP input one byte per system call (about 4 µs of its CPU a byte on 7.2,
    # measured): what qmpprobe sends is what a probe costs QEMU, so ids are kept short.
    def _get_exec_id(self) -> str:
        self._execute_id += 1
        return f"{self._execute_id:x}"

    async def execute(
        self, cmd: str, arguments: Mapping[str, object] | None = None, oob: bool = False
    ) -> object:
        # qemu.qmp's execute() builds the message twice, each time serialized at once with
        # the standard library's json (7% of qmpprobe's own CPU in exact mode); here it is
        # serialized once, when sent. The reply is judged as qemu.qmp 0.0.6's execute_msg does.
        obj: dict[str, object] = {"exec-oob" if oob else "execute": cmd}
        if arguments is not None:
            obj["arguments"] = arguments
        msg = Message(obj, eager=False)
        reply = await self._execute(msg)
        if "error" in reply:
            try:
                error_response = ErrorResponse(reply)
            except (KeyError, TypeError) as err:
                raise BadReplyError("QMP error reply is malformed", reply, msg) from err
            raise ExecuteError(error_response, msg, reply)
        if "return" not in reply:
            raise BadReplyError("QMP reply is missing a 'error' or 'return' member", reply, msg)
        return reply["return"]

    async def _do_recv(self) -> Message:
        # The standard library's JSON parser was a tenth of qmpprobe's own CPU in expand mode
        # (a 15 KiB expansion per model); orjson reads the same, ~4x faster. Failures are
        # qemu.qmp's own protocol errors, as with its parser.
        raw = await self._readline()
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as err:
            raise DeserializationError("Failed to deserialize QMP message.", raw) from err
        if not isinstance(obj, dict):
            raise UnexpectedTypeError("QMP message is not a JSON object.", obj)
        return Message(obj, eager=False)

    async def _bh_send_message(self) -> None:
        # Commands issued together (pipelined) go out in one write: one wakeup of QEMU's
        # monitor and one system call here, instead of one per command.
        batch = [await self._outgoing.get()]
        while not self._outgoing.empty():
            batch.append(self._outgoing.get_nowait())
        try:
            assert self._writer is not None
            # orjson's compact JSON is what qemu.qmp sends, for a third of the CPU.
            self._writer.write(b"".join(orjson.dumps(dict(self._cb_outbound(m))) for m in batch))
        finally:
            for _ in batch:
                self._outgoing.task_done()


class QemuProcess:
    """A running QEMU with a QMP client connected over a socketpair."""

    def __init__(
        self, argv: Sequence[str], env: Mapping[str, str] | None = None, name: str = "qemu"
    ) -> None:
        self.argv = list(argv)
        self.name = name
        self.env = dict(env) if env is not None else None
        self.proc: asyncio.subprocess.Process | None = None
        self.client: _Client | None = None
        self._sock: socket.socket | None = None
        self._tail = bytearray()
        self._cut = False
        self._drain: asyncio.Task[None] | None = None
        self._inode = 0
        self._pipe: asyncio.ReadTransport | None = None
        self.ended: Ended | None = None
        #: `record_traffic`: kept here, as the client is gone once QEMU is stopped.
        self._traffic: list[str] = []

    @property
    def pid(self) -> int | None:
        """PID (and process-group id) of the process qmpprobe started."""
        return self.proc.pid if self.proc else None

    def cpu_seconds(self) -> float:
        """CPU time QEMU has used so far: the process and its descendants (a wrapper's QEMU
        child), every thread, from /proc."""
        return sum(_cpu_of(p) for p in tree(self.pid)) if self.pid else 0.0

    async def start(self, monitor_args: bool = True) -> None:
        """Spawn QEMU with the QMP monitor on one end of a fresh socketpair."""
        ours, theirs = socket.socketpair()
        self._sock = ours
        argv = self.argv
        if monitor_args:
            fd = theirs.fileno()
            argv = [*argv, "-chardev", f"socket,id=qmp,fd={fd}", "-mon", "chardev=qmp,mode=control"]
        prefix: list[str] = [_SETPRIV, "--pdeathsig", "KILL", "--"] if _SETPRIV else []
        # QEMU's output pipe is ours, and told to the reaper before anything is spawned: a
        # QEMU holds it however a wrapper starts it, and from the first instant it exists.
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        self._inode = os.fstat(read_fd).st_ino
        tell(f"^{self._inode}")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *prefix,
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=write_fd,
                stderr=write_fd,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
                env=self.env,
                preexec_fn=None if _SETPRIV else _set_pdeathsig,
            )
        except BaseException:
            os.close(read_fd)
            tell(f"-0 {self._inode}")
            raise
        finally:
            theirs.close()
            os.close(write_fd)
        _LIVE.add(self.proc.pid)
        tell(f"+{self.proc.pid} {self._inode}")
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        self._pipe, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
        )
        self._drain = asyncio.create_task(self._drain_output(reader))

    async def _drain_output(self, reader: asyncio.StreamReader) -> None:
        while chunk := await reader.read(65536):
            self._tail += chunk
            if len(self._tail) > TAIL_BYTES:
                del self._tail[:-TAIL_BYTES]
                self._cut = True

    async def connect(self) -> None:
        """Read the QMP greeting and negotiate capabilities."""
        assert self._sock is not None
        self.client = _Client(self.name, readbuflen=READ_LIMIT)
        if _TRAFFIC:
            self.client.traffic = self._traffic
        await self.client.connect(self._sock)

    async def execute(self, cmd: str, args: Mapping[str, Any] | None = None) -> Any:
        """Run one QMP command; raises `ExecuteError` when QEMU answers with an error."""
        assert self.client is not None
        return await self.client.execute(cmd, args)

    async def answers(
        self, commands: Sequence[tuple[str, Mapping[str, Any] | None]]
    ) -> list[dict[str, Any]]:
        """Send commands pipelined; return QEMU's answers in order (`return` or `error`)."""
        results = await asyncio.gather(
            *(self.execute(c, a) for c, a in commands), return_exceptions=True
        )
        return [qmp_answer(r) for r in results]

    def traffic(self) -> list[str]:
        """The QMP messages exchanged, `> ` sent and `< ` received (with `record_traffic`)."""
        return list(self._traffic)

    def output(self) -> str:
        """The last bytes QEMU (or its wrapper) wrote to stdout/stderr (whole lines only, once
        the tail had to be cut)."""
        text = self._tail.decode("utf-8", "replace")
        return text.split("\n", 1)[-1] if self._cut else text

    async def wait_exit(self, timeout: float) -> Ended | None:
        """Wait up to `timeout` seconds for QEMU to end on its own."""
        assert self.proc is not None
        try:
            rc = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            return None
        self.ended = Ended.from_returncode(rc)
        return self.ended

    async def stop(self) -> Ended | None:
        """Kill the process group, reap it, close QMP; safe to call more than once.

        Returns how QEMU ended *on its own* (None when it was still running and we killed it).
        """
        if self.proc is None:
            return None
        if self.ended is None and self.proc.returncode is not None:
            self.ended = Ended.from_returncode(self.proc.returncode)
        # The whole tree and group: a wrapper's QEMU child too, even one that left the
        # wrapper's session (`setsid`); listed first, as killing the wrapper orphans it.
        kill_tree(self.proc.pid)
        reap = asyncio.ensure_future(self._reap())
        try:
            await asyncio.shield(reap)
        except asyncio.CancelledError:
            # Ctrl-C must not leave QEMU unreaped or QMP half-closed; QEMU is dead already,
            # so finishing takes no time.
            await reap
            raise
        return self.ended

    async def _reap(self) -> None:
        assert self.proc is not None
        await self.proc.wait()
        if self.client is not None:
            client, self.client = self.client, None
            # After QEMU is gone, disconnect() re-raises the reader's EOFError: expected.
            with contextlib.suppress(Exception):
                await client.disconnect()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._drain is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._drain), 0.1)
            except TimeoutError:
                # Something still writes to QEMU's output: a QEMU the wrapper left behind in
                # a session of its own (`exec setsid qemu …` forks and returns at once).
                for pid in pipe_holders({self._inode}):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._drain, 1.0)
            self._drain = None
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None
        if self.proc.pid in _LIVE:  # its whole tree is gone: the reaper may forget it
            _LIVE.discard(self.proc.pid)
            tell(f"-{self.proc.pid} {self._inode}")


async def together(*aws: Awaitable[T]) -> list[T]:
    """`asyncio.gather`, except that when one fails the others are cancelled and awaited
    before the error goes on: no task is left holding a QEMU (gather leaves them running)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.contextmanager
def pidfd_reaping() -> Iterator[None]:
    """Within the running loop, reap child processes through pidfds.

    Python 3.11's default child watcher starts a thread per process to wait for it: a few
    hundred microseconds of qmpprobe's CPU per QEMU, on a machine whose cores QEMU needs.
    From 3.12 asyncio uses pidfds by itself; where the kernel has none, nothing changes.
    """
    if sys.version_info >= (3, 12) or not _pidfds_work():
        yield
        return
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(asyncio.get_running_loop())
    asyncio.set_child_watcher(watcher)
    try:
        yield
    finally:
        # The next event loop gets a default watcher again, not one tied to this loop.
        asyncio.set_child_watcher(None)  # type: ignore[arg-type]  # documented: the default
        watcher.close()


def _pidfds_work() -> bool:
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True


_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[bytes]:
    """/proc/PID/stat from field 3 on (the command name may hold spaces and parentheses)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return []
    return stat[stat.rfind(b")") + 2 :].split()


def _cpu_of(pid: int) -> float:
    fields = _stat_fields(pid)  # utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / _TICK if len(fields) > 12 else 0.0


def tree(pid: int) -> list[int]:
    """A process and its descendants (through /proc/PID/task/TID/children)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
    return found


def kill_group(pgid: int) -> None:
    """SIGKILL a process group, ignoring one that is already gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def pipe_holders(inodes: Collection[int]) -> list[int]:
    """PIDs of live processes holding one of these pipes (through /proc/PID/fd)."""
    wanted = {f"pipe:[{i}]" for i in inodes if i}
    if not wanted:
        return []
    found = []
    me = str(os.getpid())  # qmpprobe holds the read end of the same pipe
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or entry == me:
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/fd/{fd}") in wanted:
                        found.append(int(entry))
                        break
    return found


def session_members(sids: Collection[int]) -> list[int]:
    """PIDs of live processes in any of these sessions (field 6 of /proc/PID/stat)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))  # the session id is field 6
            if len(fields) > 3 and int(fields[3]) in sids:
                found.append(int(entry))
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL a process, its descendants and its process group."""
    below = tree(pid)
    kill_group(pid)
    for p in below:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)


def kill_session(sid: int) -> None:
    """SIGKILL a session's process group, then every process left in the session."""
    kill_group(sid)
    for pid in session_members({sid}):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def owned_processes(owner: str) -> list[int]:
    """PIDs of live processes whose environment carries `OWNER_ENV=owner` (leftovers of a run)."""
    needle = f"{OWNER_ENV}={owner}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def _under_a_live_qmpprobe(pid: int) -> bool:
    """Whether an ancestor of `pid` (other than this process) is a running qmpprobe."""
    me = os.getpid()
    fields = _stat_fields(pid)
    while len(fields) > 1 and (parent := int(fields[1])) > 1:
        if parent != me:
            with contextlib.suppress(OSError):
                if b"qmpprobe" in Path(f"/proc/{parent}/cmdline").read_bytes():
                    return True
        fields = _stat_fields(parent)
    return False


def kill_owned(owner: str, orphans_only: bool = False) -> list[int]:
    """SIGKILL every process left by `owner`; returns their PIDs. With `orphans_only`, spare
    those a live qmpprobe still runs (a copy of a run folder carries the same owner)."""
    pids = owned_processes(owner)
    if orphans_only:
        pids = [p for p in pids if not _under_a_live_qmpprobe(p)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return pids


# -- what QEMU said -----------------------------------------------------------------------------
def qemu_errors(output: str) -> list[str]:
    """The lines of QEMU's output that are not warnings (QEMU warns about filtered features
    on every start: never why it stopped)."""
    return [ln.strip() for ln in output.splitlines() if ln.strip() and "warning:" not in ln]


def qemu_message(output: str) -> str:
    """QEMU's own error message from its output: its last lines that are not warnings (the
    warnings when it said nothing else)."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    return " | ".join((qemu_errors(output) or lines)[-3:])


def ended_text(ended: Ended | None) -> str:
    """How QEMU ended, in words (`QEMU killed by signal 6 (SIGABRT)`)."""
    if ended is None:
        return "QEMU stopped answering"
    if ended.signal is not None:
        return f"QEMU killed by signal {ended.signal} ({signal.Signals(ended.signal).name})"
    return f"QEMU exited with code {ended.exit}"
