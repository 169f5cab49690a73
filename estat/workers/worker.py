# -*- test-case-name: estat.test.test_workers -*-
"""
What a worker of C{WORKERS=N} changes in itself: its own write-ahead log
directory C{WAL_DIR/worker-<slot>} (the same slot across restarts, so a
restarted worker replays its own log), the dead-letter directory shared
with the other workers, an instance name with its slot, and a stop when
the supervisor goes away.  (It serves the supervisor's listening socket:
L{estat.http.transport.AdoptedEndpoint}, wired by L{estat.tap}.)
"""

from __future__ import annotations

import ctypes
import os
import signal

import attr
from twisted.internet import abstract
from twisted.logger import Logger

from ..config import Config

__all__ = ["worker_slot", "worker_config", "watch_supervisor", "tell_ready"]

log = Logger()

_PR_SET_PDEATHSIG = 1


def worker_slot(environ) -> int | None:
    """
    This process's slot when a supervisor started it, else C{None}.
    """
    text = environ.get("ESTAT_WORKER_SLOT")
    if text is None or text == "":
        return None
    return int(text)


def worker_config(config: Config, slot: int, instance: str) -> Config:
    """
    C{config} for worker C{slot}: C{WAL_DIR/worker-<slot>} and
    C{<instance>-w<slot>} in object keys.  C{DLQ_DIR} stays the one every
    worker shares (each entry is claimed with C{flock} before it is
    uploaded or expired: L{estat.dlq.Claim}).
    """
    return attr.evolve(
        config,
        wal_dir=os.path.join(config.wal_dir, f"worker-{slot}"),
        instance_id=f"{instance}-w{slot}",
        worker_slot=slot,
    )


class _SupervisorPipe(abstract.FileDescriptor):
    """
    Standard input, a pipe from the supervisor: end-of-file means the
    supervisor is gone.
    """

    def __init__(self, reactor, fd: int, gone) -> None:
        super().__init__(reactor)
        self._fd = fd
        self._gone = gone

    def fileno(self) -> int:
        return self._fd

    def doRead(self):
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            self.stopReading()
            self._gone()
        return None


def watch_supervisor(reactor, supervisor_pid: int, fd: int = 0) -> None:
    """
    Stop as on C{SIGTERM} (draining what this worker holds) when the
    supervisor dies: the kernel's C{PR_SET_PDEATHSIG} on Linux, and
    end-of-file on the pipe from it everywhere.
    """

    def gone() -> None:
        log.warn("the supervisor (pid {pid}) is gone: stopping", pid=supervisor_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != supervisor_pid:
        # It died before the line above.
        reactor.callWhenRunning(gone)
        return
    os.set_blocking(fd, False)
    _SupervisorPipe(reactor, fd, gone).startReading()


def tell_ready(reactor, fd: int) -> None:
    """
    Once the reactor runs (its signal handlers are in place), tell the
    supervisor on C{fd}: from then on it may send C{SIGTERM} and C{SIGHUP}.
    """

    def ready() -> None:
        try:
            os.write(fd, b"ready\n")
            os.close(fd)
        except OSError as e:
            log.warn("could not tell the supervisor this worker runs: {error}", error=str(e))

    reactor.callWhenRunning(ready)
