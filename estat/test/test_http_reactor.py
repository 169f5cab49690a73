# -*- test-case-name: estat.test.test_http_reactor -*-
"""
Tests for L{estat.http.reactor}: a real L{EstatEPollReactor} (not
installed, driven one poll at a time) with real sockets on 127.0.0.1,
beside Twisted's own L{EPollReactor} where the two must agree.
"""

from __future__ import annotations

import socket

from twisted.internet import error, tcp
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import Factory, Protocol
from twisted.python import context, log
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from estat.http.reactor import EstatEPollReactor
from estat.http.transport import DirectWritePort, DirectWriteServer


class Echo(Protocol):
    """
    Answers each read with C{b"got " + data}; records the legacy log
    context's C{system} it ran in, and how its connection ended.
    """

    fail = False

    def __init__(self) -> None:
        self.received: list = []
        self.systems: list = []
        self.lost: list = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        self.systems.append(context.get(log.ILogContext, {}).get("system"))
        if self.fail:
            raise ZeroDivisionError("handler bug")
        self.transport.write(b"got " + data)

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)


class ReactorCase(SynchronousTestCase):
    reactor_type = EstatEPollReactor
    port_type = DirectWritePort

    def setUp(self) -> None:
        self.reactor = reactor = self.reactor_type()
        self.addCleanup(self._close_reactor)
        self.protocols: list = []

        def build():
            p = Echo()
            self.protocols.append(p)
            return p

        factory = Factory()
        factory.buildProtocol = lambda addr: build()
        self.port = self.port_type(0, factory, 50, "127.0.0.1", reactor)
        self.port.startListening()
        self.client = socket.create_connection(("127.0.0.1", self.port.getHost().port))
        self.client.settimeout(5)
        self.addCleanup(self.client.close)
        self.turn_until(lambda: self.protocols)
        self.protocol = self.protocols[0]

    def _close_reactor(self) -> None:
        reactor = self.reactor
        for selectable in reactor.removeAll():
            if selectable is not self.port:
                selectable.connectionLost(Failure(error.ConnectionDone()))
        if getattr(self.port, "socket", None) is not None:
            self.port.connectionLost(Failure(error.ConnectionDone()))
        reactor.waker.connectionLost(None)
        reactor._poller.close()

    def turn(self) -> None:
        """
        One turn of the reactor: poll, then what is due (the flush).
        """
        self.reactor.doIteration(0.05)
        self.reactor.runUntilCurrent()

    def answer(self, size: int) -> bytes:
        """
        Turn the reactor until the client has read C{size} bytes.
        """
        self.client.setblocking(False)
        got = bytearray()

        def read():
            try:
                got.extend(self.client.recv(1 << 20))
            except BlockingIOError:
                pass
            return len(got) >= size

        self.turn_until(read)
        return bytes(got)

    def assert_answered_in_its_context(self) -> None:
        """
        A read is answered, and handled in the legacy log context whose
        C{system} is the connection's prefix (Twisted's dispatch).
        """
        self.client.sendall(b"ping")
        self.turn_until(lambda: self.protocol.received)
        self.assertEqual(self.answer(8), b"got ping")
        self.assertEqual(self.protocol.systems, [self.protocol.transport.logstr])

    def turn_until(self, done) -> None:
        for _ in range(200):
            if done():
                return
            self.turn()
        self.fail("the reactor never got there")


class DispatchTests(ReactorCase):

    def test_a_read_is_answered(self) -> None:
        self.client.sendall(b"ping")
        self.turn_until(lambda: self.protocol.received)
        self.assertEqual(self.client.recv(100), b"got ping")
        self.assertEqual(self.protocol.received, [b"ping"])
        self.assertIsInstance(self.protocol.transport, DirectWriteServer)

    def test_reads_skip_the_legacy_log_context(self) -> None:
        self.client.sendall(b"ping")
        self.turn_until(lambda: self.protocol.received)
        # "-": the process's default, not the connection's prefix.
        self.assertEqual(self.protocol.systems, ["-"])

    def test_peer_closing_ends_the_connection_cleanly(self) -> None:
        self.client.sendall(b"last")
        self.client.shutdown(socket.SHUT_WR)
        self.turn_until(lambda: self.protocol.lost)
        self.assertEqual(self.protocol.received, [b"last"])
        self.protocol.lost[0].trap(error.ConnectionDone)
        self.assertNotIn(self.protocol.transport, self.reactor.getReaders())

    def test_peer_reset_ends_the_connection(self) -> None:
        self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.client.close()
        self.turn_until(lambda: self.protocol.lost)
        self.assertEqual(len(self.protocol.lost), 1)
        self.assertNotIn(self.protocol.transport, self.reactor.getReaders())

    def test_an_exception_is_logged_and_drops_the_connection(self) -> None:
        self.protocol.fail = True
        self.client.sendall(b"boom")
        self.turn_until(lambda: self.protocol.lost)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.protocol.lost[0].trap(ZeroDivisionError)
        self.assertEqual(self.client.recv(100), b"")

    def test_a_lost_descriptor_drops_the_connection(self) -> None:
        transport = self.protocol.transport
        transport.fileno = lambda: -1
        self.client.sendall(b"ping")
        self.turn_until(lambda: self.protocol.lost)
        self.assertEqual(self.protocol.received, [])
        self.protocol.lost[0].trap(error.ConnectionFdescWentAway)

    def test_writes_waiting_for_room(self) -> None:
        # A big answer the kernel cannot take at once: the connection is
        # registered for writing until its EPOLLOUT events have sent it;
        # every byte arrives, in order.
        big = b"x" * (8 << 20)
        self.protocol.transport.write(big)
        self.turn()
        self.assertIn(self.protocol.transport, self.reactor.getWriters())
        self.assertEqual(self.answer(len(big)), big)
        self.turn()
        self.assertNotIn(self.protocol.transport, self.reactor.getWriters())


class OtherSelectablesTests(ReactorCase):
    """
    Connections that are not the HTTP listener's keep Twisted's dispatch,
    log context included.
    """

    port_type = tcp.Port

    def test_context_kept(self) -> None:
        self.assert_answered_in_its_context()


class StockReactorTests(ReactorCase):
    """
    What the shortcut leaves out, on Twisted's own reactor: the context.
    """

    reactor_type = EPollReactor

    def test_stock_reactor_sets_the_context(self) -> None:
        self.assert_answered_in_its_context()


class PluginTests(SynchronousTestCase):

    def test_twistd_knows_it(self) -> None:
        from twisted.application.reactors import getReactorTypes

        found = {r.shortName: r.moduleName for r in getReactorTypes()}
        self.assertEqual(found.get("estat"), "estat.http.reactor")
