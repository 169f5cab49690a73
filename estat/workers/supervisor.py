# -*- test-case-name: estat.test.test_workers -*-
"""
The supervisor of C{WORKERS=N}: it binds the listening socket, starts N
worker processes that adopt it (each C{twistd estat} with
C{ESTAT_WORKER_SLOT} and C{ESTAT_LISTEN_FD} set), restarts one that exits,
and on C{SIGTERM} stops them all and waits for their drains.  It serves
nothing and holds no events.

A worker keeps its slot (0 to N-1) across restarts.  A worker that exits
while the supervisor is not stopping is a failure: it is restarted after a
backoff (0.5 s, doubling to 10 s); L{MAX_FAILURES} failures within
L{FAILURE_WINDOW} seconds is a crash loop, and the supervisor stops every
worker and exits 1.

Each worker's standard input is a pipe from the supervisor: when the
supervisor dies, even by C{SIGKILL}, every worker reads end-of-file and
stops as on C{SIGTERM} (draining what it holds); on Linux they also get
C{SIGTERM} from the kernel (C{PR_SET_PDEATHSIG}).
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Callable

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

__all__ = ["Supervisor", "bind_listener", "bind_listeners", "MAX_FAILURES", "FAILURE_WINDOW"]

#: Worker exits (not asked for) within L{FAILURE_WINDOW} that stop the
#: supervisor.
MAX_FAILURES = 5
#: Seconds.
FAILURE_WINDOW = 60.0
#: The first restart's delay and the longest, in seconds.
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0
#: The descriptor number of the listening socket in a worker.
LISTEN_FD = 3
#: The descriptor a worker writes to once its reactor runs (and so its
#: signal handlers are in place).
READY_FD = 4


def bind_listener(description: str, reuse_port: bool = False,
                  port: int | None = None) -> socket.socket:
    """
    The listening socket of a C{tcp:PORT[:interface=HOST][:backlog=N]}
    endpoint description (what C{HTTP_ADDR} becomes), bound, listening,
    non-blocking, inheritable; with C{reuse_port}, C{SO_REUSEPORT} is set
    before the bind so that several such sockets share the port.

    @param port: overrides the description's port (the port the first of
        several sockets got, when the description asks for port 0).
    @raise ValueError: for any other kind of endpoint.
    """
    parts = description.split(":")
    kind = parts[0]
    if kind not in ("tcp", "tcp6") or len(parts) < 2:
        raise ValueError(f"WORKERS > 1 needs a TCP HTTP_ADDR, not {description!r}")
    if port is None:
        port = int(parts[1])
    host = ""
    backlog = 50
    for option in description.split(":", 2)[2:]:
        for item in _split_options(option):
            name, _, value = item.partition("=")
            if name == "interface":
                host = value.replace("\\:", ":")
            elif name == "backlog":
                backlog = int(value)
    family = socket.AF_INET6 if (kind == "tcp6" or ":" in host) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_listeners(description: str, count: int) -> list:
    """
    C{count} listening sockets on one port, one per worker slot, with
    C{SO_REUSEPORT}: the kernel spreads new connections evenly over them.
    (One socket inherited by every worker measured 54 of 64 connections on
    one worker: Twisted accepts up to a hundred connections per wake-up, so
    the worker that wakes first takes the whole queue; see
    C{bench/workers.py}.)
    """
    first = bind_listener(description, reuse_port=True)
    sockets = [first]
    try:
        port = first.getsockname()[1]
        for _ in range(count - 1):
            sockets.append(bind_listener(description, reuse_port=True, port=port))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _split_options(text: str) -> list:
    """
    C{a=1:b=2} split on the colons that are not escaped.
    """
    out, current, escaped = [], [], False
    for ch in text:
        if escaped:
            current.append("\\" + ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            out.append("".join(current))
            current = []
        else:
            current.append(ch)
    out.append("".join(current))
    return out


class WorkerProtocol(ProcessProtocol):
    """
    One worker process: tells the supervisor when it ended.
    """

    def __init__(self, slot: int, ended: Callable[[int, int], None],
                 became_ready: Callable[[int], None] = lambda slot: None) -> None:
        self.slot = slot
        self._ended = ended
        self._became_ready = became_ready
        self.pid: int | None = None
        #: The worker's reactor runs: it handles SIGTERM and SIGHUP (before
        #: that, either signal would end it at once, draining nothing).
        self.ready = False

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == READY_FD and data and not self.ready:
            self.ready = True
            self._became_ready(self.slot)

    def processEnded(self, reason) -> None:
        value = reason.value
        if isinstance(value, ProcessDone):
            status = 0
        elif isinstance(value, ProcessTerminated):
            if value.exitCode is not None:
                status = value.exitCode
            else:
                status = 128 + (value.signal or 0)
        else:  # pragma: no cover - Twisted gives one of the two
            status = 1
        self._ended(self.slot, status)


@attr.s
class Supervisor(Service):
    """
    @ivar spawn: C{(slot, protocol) -> None}: start worker C{slot}'s
        process with C{protocol} (L{twisted_spawner} in production, a fake
        in tests).
    @ivar clock: for the restart backoff and the failure window.
    @ivar count: how many workers.
    @ivar shutdown_timeout: seconds the workers have to drain on stop
        before they are killed (C{SHUTDOWN_TIMEOUT} plus a margin).
    @ivar on_exit: C{status -> None}, called once when the supervisor is
        done: 0 when every worker it had at the end exited 0, else the
        first failing status (1 for a crash loop).
    """

    log = Logger()

    spawn: Callable = attr.ib()
    clock = attr.ib()
    count: int = attr.ib()
    shutdown_timeout: float = attr.ib(default=30.0)
    on_exit: Callable[[int], None] = attr.ib(default=lambda status: None)
    max_failures: int = attr.ib(default=MAX_FAILURES)
    failure_window: float = attr.ib(default=FAILURE_WINDOW)
    #: The listening sockets, one per slot (closed here when stopping, so
    #: that each closes for good when its worker lets it go).
    listeners: list = attr.ib(factory=list)
    #: C{(slot, pid) -> None}, called when a worker's process has ended
    #: (the metrics snapshot of L{estat.workers.metrics} is retired).
    on_worker_exit: Callable[[int, int], None] = attr.ib(default=lambda slot, pid: None)

    #: slot -> its current L{WorkerProtocol}, while it runs.
    live: dict = attr.ib(factory=dict, init=False)
    #: Times of the failures within the window (all slots).
    failures: list = attr.ib(factory=list, init=False)
    #: Restarts done so far (all slots).
    restarts: int = attr.ib(default=0, init=False)
    stopping: bool = attr.ib(default=False, init=False)
    status: int | None = attr.ib(default=None, init=False)
    _pending: dict = attr.ib(factory=dict, init=False)
    _stopped: Deferred | None = attr.ib(default=None, init=False)
    _kill_call = attr.ib(default=None, init=False)
    finished: bool = attr.ib(default=False, init=False)

    def startService(self) -> None:
        super().startService()
        self.log.info("supervisor: starting {count} workers", count=self.count)
        for slot in range(self.count):
            self._start(slot)

    def _start(self, slot: int) -> None:
        self._pending.pop(slot, None)
        if self.stopping:
            return
        protocol = WorkerProtocol(slot, self._ended, self._ready)
        self.live[slot] = protocol
        self.spawn(slot, protocol)

    def _ended(self, slot: int, status: int) -> None:
        protocol = self.live.pop(slot, None)
        if protocol is not None and protocol.pid is not None:
            try:
                self.on_worker_exit(slot, protocol.pid)
            except Exception:
                self.log.failure("after worker {slot} ended", slot=slot)
        if self.stopping:
            if status != 0:
                self.log.error("worker {slot} stopped with status {status}",
                               slot=slot, status=status)
                if self.status in (None, 0):
                    self.status = status
            elif self.status is None:
                self.status = 0
            if not self.live:
                self._finish()
            return
        now = self.clock.seconds()
        self.failures = [t for t in self.failures if now - t < self.failure_window]
        self.failures.append(now)
        if len(self.failures) >= self.max_failures:
            self.log.critical(
                "worker {slot} exited with status {status}: {failures} worker failures "
                "within {window:.0f} s, a crash loop; stopping", slot=slot, status=status,
                failures=len(self.failures), window=self.failure_window)
            self.status = 1
            self._stop_workers()
            if not self.live:
                self._finish()
            return
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (len(self.failures) - 1))
        self.restarts += 1
        self.log.warn("worker {slot} exited with status {status}; restarting it in "
                      "{delay:.1f} s (restart {restarts})", slot=slot, status=status,
                      delay=delay, restarts=self.restarts)
        self._pending[slot] = self.clock.callLater(delay, self._start, slot)

    def _ready(self, slot: int) -> None:
        if self.stopping:
            # Asked to stop while it was starting: now it can drain.
            self._signal(self.live.get(slot), signal.SIGTERM)

    def signal_all(self, signum: int) -> None:
        """
        Send C{signum} to every running worker (C{SIGHUP} is passed on).
        A worker still starting gets no signal but C{SIGKILL}: it reads the
        current files when it starts, and L{_ready} passes a stop on.
        """
        for protocol in list(self.live.values()):
            if protocol.ready or signum == signal.SIGKILL:
                self._signal(protocol, signum)

    @staticmethod
    def _signal(protocol, signum: int) -> None:
        if protocol is not None:
            try:
                protocol.transport.signalProcess(signum)
            except Exception:  # the process is gone: processEnded follows
                pass

    def _stop_workers(self) -> None:
        self.stopping = True
        for listener in self.listeners:
            listener.close()
        self.listeners = []
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        self.signal_all(signal.SIGTERM)
        if self.live and self._kill_call is None:
            self._kill_call = self.clock.callLater(self.shutdown_timeout, self._kill)

    def _kill(self) -> None:
        self._kill_call = None
        if self.live:
            self.log.error("workers {slots} did not stop within {timeout:.0f} s: killing",
                           slots=sorted(self.live), timeout=self.shutdown_timeout)
            if self.status in (None, 0):
                self.status = 137
            self.signal_all(signal.SIGKILL)

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        self._kill_call = None
        status = self.status or 0
        self.log.info("supervisor: every worker stopped; status {status}", status=status)
        d, self._stopped = self._stopped, None
        self.on_exit(status)
        if d is not None:
            d.callback(None)

    def stopService(self) -> Deferred:
        super().stopService()
        if self._stopped is None:
            self._stopped = Deferred()
        d = self._stopped
        if self.finished:
            self._stopped = None
            d.callback(None)
            return d
        if not self.stopping:
            self.log.info("supervisor: stopping {count} workers", count=len(self.live))
            self._stop_workers()
        if not self.live:
            self._finish()
        return d


def worker_environment(environ: dict, slot: int) -> dict:
    """
    A worker's environment: the supervisor's, with its slot and the
    listening socket's descriptor.
    """
    env = dict(environ)
    env["ESTAT_WORKER_SLOT"] = str(slot)
    env["ESTAT_LISTEN_FD"] = str(LISTEN_FD)
    env["ESTAT_READY_FD"] = str(READY_FD)
    return env


def twisted_spawner(reactor, argv: list, environ: dict, listen_fds: list,
                    path: str | None = None) -> Callable:
    """
    C{(slot, protocol) -> None} that starts C{argv} as worker C{slot} with
    C{reactor.spawnProcess}: standard input a pipe from the supervisor
    (end-of-file when it dies), standard output and error shared, the
    slot's listening socket (C{listen_fds[slot]}) as descriptor
    L{LISTEN_FD}, a pipe to the supervisor
    as L{READY_FD} (the worker says it runs).
    """

    def spawn(slot: int, protocol: WorkerProtocol) -> None:
        reactor.spawnProcess(
            protocol, argv[0], argv, env=worker_environment(environ, slot), path=path,
            childFDs={0: "w", 1: 1, 2: 2, LISTEN_FD: listen_fds[slot], READY_FD: "r"})

    return spawn


def worker_argv(executable: str, argv: list) -> list:
    """
    The command of a worker: the same C{twistd ... estat <options>} as the
    supervisor's, in the foreground and without a pid file.
    """
    at = _subcommand_at(argv)
    if at is not None:
        options = argv[at + 1:]
        reactor = _reactor_options(argv[1:at])
    else:
        options = []
        reactor = []
    twistd = argv[0] if argv else "twistd"
    return [executable, twistd, "--nodaemon", "--pidfile=", *reactor, "estat", *options]


#: twistd's options that take the next word as their value.
_TWISTD_VALUE_OPTIONS = frozenset((
    "-r", "--reactor", "-l", "--logfile", "--pidfile", "--logger", "-d", "--rundir",
    "-u", "--uid", "-g", "--gid", "--umask", "--chroot", "--prefix", "-p", "--profile",
    "--profiler"))


def _subcommand_at(argv: list) -> int | None:
    """
    Where the C{estat} subcommand is in twistd's C{argv} (not the value of
    an option such as C{--reactor estat}), or C{None}.
    """
    for i in range(1, len(argv)):
        if argv[i] == "estat" and argv[i - 1] not in _TWISTD_VALUE_OPTIONS:
            return i
    return None


def _reactor_options(twistd_options: list) -> list:
    """
    The reactor the supervisor's twistd was told to use (C{--reactor=estat},
    C{--reactor estat}, C{-r estat}), for its workers: the last one given.
    """
    chosen = []
    i = 0
    while i < len(twistd_options):
        option = twistd_options[i]
        if option.startswith("--reactor="):
            chosen = [option]
        elif option in ("--reactor", "-r") and i + 1 < len(twistd_options):
            chosen = ["--reactor=" + twistd_options[i + 1]]
            i += 1
        elif option.startswith("-r") and not option.startswith("--") and len(option) > 2:
            chosen = ["--reactor=" + option[2:]]
        i += 1
    return chosen


def exit_with(reactor, status: int) -> None:
    """
    Make twistd exit with C{status} once the reactor has stopped: 0 clears
    the signal it would re-raise (as one process does after a clean
    drain); any other status ends the process with it.
    """
    if getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None
    if status:
        reactor.addSystemEventTrigger("after", "shutdown", os._exit, status)
