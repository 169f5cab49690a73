# -*- test-case-name: estat.test.test_workers -*-
"""
Tests for L{estat.workers}: the supervisor's restarts, crash loop and
ordered stop on a fake spawner and a L{Clock}; C{WORKERS=auto}'s CPU count
from fake affinity and cgroup files; the listening socket; a worker's
configuration.  The real processes are in L{estat.test.test_e2e_workers}.
"""

from __future__ import annotations

import os
import signal
import socket

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from estat.config import Config, ConfigError, available_cpus, load_config
from estat.workers.supervisor import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    LISTEN_FD,
    READY_FD,
    Supervisor,
    WorkerProtocol,
    bind_listener,
    bind_listeners,
    worker_argv,
    worker_environment,
)
from estat.workers.worker import worker_config, worker_slot


class FakeTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list = []

    def signalProcess(self, signum) -> None:
        self.signals.append(signum)


class FakeSpawner:
    """
    Records each spawn; C{exit(slot, status)} ends that slot's process.
    """

    def __init__(self) -> None:
        self.spawned: list = []
        self.protocols: dict = {}
        self._pid = 100

    ready = True

    def __call__(self, slot: int, protocol: WorkerProtocol) -> None:
        self._pid += 1
        protocol.makeConnection(FakeTransport(self._pid))
        self.spawned.append((slot, self._pid))
        self.protocols[slot] = protocol
        if self.ready:
            protocol.childDataReceived(READY_FD, b"ready\n")

    def exit(self, slot: int, status: int = 0, signum: int | None = None) -> None:
        protocol = self.protocols.pop(slot)
        if status == 0 and signum is None:
            reason = Failure(ProcessDone(0))
        else:
            reason = Failure(ProcessTerminated(None if signum else status, signum))
        protocol.processEnded(reason)


def supervisor(count: int = 2, **kwargs):
    clock = Clock()
    spawner = FakeSpawner()
    exits: list = []
    s = Supervisor(spawn=spawner, clock=clock, count=count, on_exit=exits.append, **kwargs)
    return s, spawner, clock, exits


class SupervisorTests(SynchronousTestCase):

    def test_starts_one_worker_per_slot(self) -> None:
        s, spawner, clock, exits = supervisor(3)
        s.startService()
        self.assertEqual([slot for slot, _ in spawner.spawned], [0, 1, 2])
        self.assertEqual(sorted(s.live), [0, 1, 2])
        self.assertEqual(exits, [])

    def test_restart_keeps_the_slot_with_backoff(self) -> None:
        s, spawner, clock, exits = supervisor(2)
        s.startService()
        spawner.exit(1, signum=signal.SIGKILL)
        self.assertEqual(sorted(s.live), [0])
        clock.advance(BACKOFF_FIRST - 0.01)
        self.assertEqual(len(spawner.spawned), 2)
        clock.advance(0.01)
        self.assertEqual(spawner.spawned[-1][0], 1)
        self.assertEqual(sorted(s.live), [0, 1])
        self.assertEqual(s.restarts, 1)
        # A second failure waits twice as long.
        spawner.exit(1, status=3)
        clock.advance(BACKOFF_FIRST * 2 - 0.01)
        self.assertEqual(len(spawner.spawned), 3)
        clock.advance(0.01)
        self.assertEqual(len(spawner.spawned), 4)
        self.assertEqual(exits, [])

    def test_backoff_is_capped(self) -> None:
        s, spawner, clock, exits = supervisor(1, max_failures=100)
        s.startService()
        for _ in range(10):
            spawner.exit(0, status=1)
            clock.advance(BACKOFF_MAX)
            self.assertIn(0, s.live)
        # Failures older than the window are forgotten: the backoff starts over.
        clock.advance(s.failure_window)
        spawner.exit(0, status=1)
        clock.advance(BACKOFF_FIRST)
        self.assertIn(0, s.live)

    def test_crash_loop_stops_with_status_1(self) -> None:
        s, spawner, clock, exits = supervisor(2, max_failures=3)
        s.startService()
        for _ in range(2):
            spawner.exit(0, status=1)
            clock.advance(BACKOFF_MAX)
        self.assertEqual(exits, [])
        spawner.exit(0, status=1)
        # The other worker is asked to stop; the supervisor ends when it has.
        self.assertEqual(spawner.protocols[1].transport.signals, [signal.SIGTERM])
        self.assertEqual(exits, [])
        spawner.exit(1, status=0)
        self.assertEqual(exits, [1])
        clock.advance(BACKOFF_MAX)
        self.assertEqual(s.live, {})

    def test_failures_outside_the_window_do_not_count(self) -> None:
        s, spawner, clock, exits = supervisor(1, max_failures=2, failure_window=10.0)
        s.startService()
        for _ in range(5):
            spawner.exit(0, status=1)
            clock.advance(11)
        self.assertEqual(exits, [])
        self.assertIn(0, s.live)

    def test_stop_terms_every_worker_and_exits_0(self) -> None:
        listeners = [socket.socket(), socket.socket()]
        s, spawner, clock, exits = supervisor(2, listeners=listeners)
        s.startService()
        d = s.stopService()
        self.assertEqual([listener.fileno() for listener in listeners], [-1, -1])
        for slot in (0, 1):
            self.assertEqual(spawner.protocols[slot].transport.signals, [signal.SIGTERM])
        self.assertNoResult(d)
        spawner.exit(0)
        self.assertNoResult(d)
        spawner.exit(1)
        self.successResultOf(d)
        self.assertEqual(exits, [0])

    def test_status_after_earlier_restarts_is_0(self) -> None:
        s, spawner, clock, exits = supervisor(2)
        s.startService()
        spawner.exit(0, signum=signal.SIGKILL)
        clock.advance(BACKOFF_FIRST)
        d = s.stopService()
        spawner.exit(0)
        spawner.exit(1)
        self.successResultOf(d)
        self.assertEqual(exits, [0])

    def test_stop_reports_a_failing_worker(self) -> None:
        s, spawner, clock, exits = supervisor(2)
        s.startService()
        d = s.stopService()
        spawner.exit(0, status=0)
        spawner.exit(1, status=4)
        self.successResultOf(d)
        self.assertEqual(exits, [4])

    def test_stop_cancels_a_pending_restart(self) -> None:
        s, spawner, clock, exits = supervisor(2)
        s.startService()
        spawner.exit(1, status=1)
        d = s.stopService()
        spawner.exit(0)
        self.successResultOf(d)
        clock.advance(BACKOFF_MAX)
        self.assertEqual(len(spawner.spawned), 2)
        self.assertEqual(exits, [0])

    def test_kills_workers_that_do_not_stop(self) -> None:
        s, spawner, clock, exits = supervisor(2, shutdown_timeout=30.0)
        s.startService()
        d = s.stopService()
        spawner.exit(0)
        clock.advance(30.0)
        self.assertEqual(spawner.protocols[1].transport.signals,
                         [signal.SIGTERM, signal.SIGKILL])
        spawner.exit(1, signum=signal.SIGKILL)
        self.successResultOf(d)
        self.assertEqual(exits, [137])

    def test_a_worker_that_ended_is_reported_with_its_pid(self) -> None:
        ended: list = []
        s, spawner, clock, exits = supervisor(2, on_worker_exit=lambda slot, pid: ended.append(
            (slot, pid)))
        s.startService()
        spawner.exit(1, signum=signal.SIGKILL)
        self.assertEqual(ended, [(1, 102)])

    def test_a_starting_worker_is_stopped_once_it_runs(self) -> None:
        """
        A worker still starting (its signal handlers not yet in place) gets
        no SIGTERM or SIGHUP until it says it runs.
        """
        s, spawner, clock, exits = supervisor(1)
        spawner.ready = False
        s.startService()
        protocol = spawner.protocols[0]
        s.signal_all(signal.SIGHUP)
        d = s.stopService()
        self.assertEqual(protocol.transport.signals, [])
        protocol.childDataReceived(READY_FD, b"ready\n")
        self.assertEqual(protocol.transport.signals, [signal.SIGTERM])
        spawner.exit(0)
        self.successResultOf(d)
        self.assertEqual(exits, [0])

    def test_a_worker_that_never_runs_is_killed(self) -> None:
        s, spawner, clock, exits = supervisor(1, shutdown_timeout=5.0)
        spawner.ready = False
        s.startService()
        d = s.stopService()
        clock.advance(5.0)
        self.assertEqual(spawner.protocols[0].transport.signals, [signal.SIGKILL])
        spawner.exit(0, signum=signal.SIGKILL)
        self.successResultOf(d)
        self.assertEqual(exits, [137])

    def test_sighup_goes_to_every_worker(self) -> None:
        s, spawner, clock, exits = supervisor(2)
        s.startService()
        s.signal_all(signal.SIGHUP)
        for slot in (0, 1):
            self.assertEqual(spawner.protocols[slot].transport.signals, [signal.SIGHUP])

    def test_stop_after_a_crash_loop_finishes_once(self) -> None:
        s, spawner, clock, exits = supervisor(1, max_failures=1)
        s.startService()
        spawner.exit(0, status=2)
        self.assertEqual(exits, [1])
        self.successResultOf(s.stopService())
        self.assertEqual(exits, [1])


class AvailableCPUsTests(SynchronousTestCase):

    def cgroup(self, files: dict) -> str:
        root = self.mktemp()
        for name, text in files.items():
            path = os.path.join(root, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
        os.makedirs(root, exist_ok=True)
        return root

    def test_affinity_without_quota(self) -> None:
        root = self.cgroup({"cpu.max": "max 100000\n"})
        self.assertEqual(available_cpus({0, 1, 2, 3}, root), 4)
        self.assertEqual(available_cpus({2}, self.cgroup({})), 1)

    def test_v2_quota_rounded_down(self) -> None:
        self.assertEqual(available_cpus({0, 1, 2, 3}, self.cgroup({"cpu.max": "250000 100000"})), 2)
        self.assertEqual(available_cpus({0, 1}, self.cgroup({"cpu.max": "800000 100000"})), 2)

    def test_half_a_cpu_gets_one(self) -> None:
        self.assertEqual(available_cpus({0, 1, 2, 3}, self.cgroup({"cpu.max": "50000 100000"})), 1)

    def test_v1_quota(self) -> None:
        root = self.cgroup({"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"})
        self.assertEqual(available_cpus(set(range(8)), root), 3)
        root = self.cgroup({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})
        self.assertEqual(available_cpus(set(range(8)), root), 8)

    def test_unreadable_files_are_ignored(self) -> None:
        self.assertEqual(available_cpus({0, 1}, self.cgroup({"cpu.max": "garbage"})), 2)

    def test_this_process(self) -> None:
        self.assertEqual(available_cpus(None, self.cgroup({})), len(os.sched_getaffinity(0)))


class WorkersSettingTests(SynchronousTestCase):

    def test_default_is_one(self) -> None:
        self.assertEqual(load_config({}, {}, {}).workers, 1)
        self.assertEqual(Config.defaults().workers, 1)

    def test_values(self) -> None:
        self.assertEqual(load_config({}, {"WORKERS": "4"}, {}).workers, 4)
        self.assertEqual(load_config({}, {"WORKERS": "auto"}, {}).workers, 0)
        self.assertEqual(load_config({}, {"WORKERS": " AUTO "}, {}).workers, 0)

    def test_refused(self) -> None:
        for text in ("0", "-1", "257", "two", ""):
            with self.assertRaises(ConfigError) as e:
                load_config({}, {"WORKERS": text}, {})
            self.assertIn("WORKERS", str(e.exception))


class ListenerTests(SynchronousTestCase):

    def test_binds_an_inheritable_listening_socket(self) -> None:
        sock = bind_listener("tcp:0:interface=127.0.0.1:backlog=64")
        self.addCleanup(sock.close)
        host, port = sock.getsockname()
        self.assertEqual(host, "127.0.0.1")
        self.assertTrue(sock.get_inheritable())
        self.assertFalse(sock.getblocking())
        client = socket.create_connection((host, port))
        client.close()

    def test_ipv6_interface(self) -> None:
        try:
            sock = bind_listener("tcp6:0:interface=\\:\\:1")
        except OSError:
            raise self.skipTest("no IPv6 loopback here")
        self.addCleanup(sock.close)
        self.assertEqual(sock.family, socket.AF_INET6)
        self.assertEqual(sock.getsockname()[0], "::1")

    def test_one_socket_per_slot_on_one_port(self) -> None:
        """
        With port 0, the first socket's port is the others' too; the kernel
        hands connections to all of them.
        """
        sockets = bind_listeners("tcp:0:interface=127.0.0.1", 3)
        for sock in sockets:
            self.addCleanup(sock.close)
        ports = {sock.getsockname()[1] for sock in sockets}
        self.assertEqual(len(ports), 1)
        [port] = ports
        for sock in sockets:
            self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT), 1)
        import select

        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(60)]
        for c in clients:
            self.addCleanup(c.close)
        readable, _, _ = select.select(sockets, [], [], 1.0)
        self.assertGreater(len(readable), 1)

    def test_a_port_in_use_is_refused(self) -> None:
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with self.assertRaises(OSError):
            bind_listeners(f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1", 2)

    def test_refuses_other_endpoints(self) -> None:
        with self.assertRaises(ValueError):
            bind_listener("unix:/tmp/x.sock")


class WorkerHelpersTests(SynchronousTestCase):

    def test_argv(self) -> None:
        self.assertEqual(
            worker_argv("/venv/bin/python", ["/venv/bin/twistd", "-n", "estat", "--x=1"]),
            ["/venv/bin/python", "/venv/bin/twistd", "--nodaemon", "--pidfile=", "estat", "--x=1"])

    def test_argv_keeps_the_reactor(self) -> None:
        for given in (["--reactor=estat"], ["--reactor", "estat"], ["-r", "estat"], ["-restat"],
                      ["--reactor=poll", "-n", "--reactor=estat"]):
            self.assertEqual(
                worker_argv("/py", ["/twistd", "-n", *given, "--pidfile=x", "estat", "--x=1"]),
                ["/py", "/twistd", "--nodaemon", "--pidfile=", "--reactor=estat", "estat", "--x=1"],
                given)

    def test_argv_reactor_option_after_estat_is_the_plugins(self) -> None:
        self.assertEqual(
            worker_argv("/py", ["/twistd", "estat", "--reactor=estat"]),
            ["/py", "/twistd", "--nodaemon", "--pidfile=", "estat", "--reactor=estat"])

    def test_environment(self) -> None:
        env = worker_environment({"A": "1"}, 3)
        self.assertEqual(env, {"A": "1", "ESTAT_WORKER_SLOT": "3",
                               "ESTAT_LISTEN_FD": str(LISTEN_FD),
                               "ESTAT_READY_FD": str(READY_FD)})

    def test_slot(self) -> None:
        self.assertIsNone(worker_slot({}))
        self.assertIsNone(worker_slot({"ESTAT_WORKER_SLOT": ""}))
        self.assertEqual(worker_slot({"ESTAT_WORKER_SLOT": "1"}), 1)

    def test_config(self) -> None:
        config = worker_config(Config.defaults(wal_dir="/w", dlq_dir="/d"), 1, "host-ab")
        self.assertEqual(config.wal_dir, "/w/worker-1")
        self.assertEqual(config.instance_id, "host-ab-w1")
        self.assertEqual(config.dlq_dir, "/d")
        self.assertEqual(config.worker_slot, 1)


class BuildSupervisorTests(SynchronousTestCase):

    def test_a_port_in_use_stops_start_up_with_the_reason(self) -> None:
        """
        WORKERS=2 on a port another process holds: the supervisor does not
        start; it exits 2 and says which address and why.
        """
        import io
        import sys

        from twisted.internet.testing import MemoryReactor

        from estat.config import parse_http_addr
        from estat.tap import build_supervisor

        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        config = Config.defaults(http_addr=parse_http_addr(address), workers=2)
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as e:
            build_supervisor(config, MemoryReactor(), 2, {}, ["twistd", "estat"])
        self.assertEqual(e.exception.code, 2)
        self.assertIn(f"WORKERS=2: cannot listen on {config.http_addr}", stderr.getvalue())

    def test_a_non_tcp_address_is_refused(self) -> None:
        import io
        import sys

        from twisted.internet.testing import MemoryReactor

        from estat.tap import build_supervisor

        config = Config.defaults(http_addr="unix:/tmp/estat-test.sock", workers=2)
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit):
            build_supervisor(config, MemoryReactor(), 2, {}, ["twistd", "estat"])
        self.assertIn("needs a TCP HTTP_ADDR", stderr.getvalue())
