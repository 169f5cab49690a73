# -*- test-case-name: estat.test.test_http_transport -*-
"""
Tests for L{estat.http.transport}: the write path of the listener's TCP
transport over a real socket pair, with a L{Clock} and a reactor that
records what it is asked to watch (each registration for writing is an
C{epoll_ctl} on the real reactor), and doWrite called where the reactor
would call it.
"""

from __future__ import annotations

import socket

from twisted.internet import error, main
from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from estat.http.transport import (DirectWriteServer, DirectWriteTCPEndpoint, _TurnFlusher,
                                  server_endpoint)


class WatchingClock(Clock):
    """
    A clock that is also the reactor's file-descriptor set: records what
    is watched for reading and writing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.readers: set = set()
        self.writers: set = set()
        self.writer_registrations = 0

    def addReader(self, reader) -> None:
        self.readers.add(reader)

    def removeReader(self, reader) -> None:
        self.readers.discard(reader)

    def addWriter(self, writer) -> None:
        if writer not in self.writers:
            self.writer_registrations += 1
        self.writers.add(writer)

    def removeWriter(self, writer) -> None:
        self.writers.discard(writer)


class CountingSocket:
    """
    A socket whose C{send} calls are counted.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.sends = 0

    def send(self, data) -> int:
        self.sends += 1
        return self._sock.send(data)

    def __getattr__(self, name):
        return getattr(self._sock, name)


class RecordingProtocol(Protocol):
    def __init__(self) -> None:
        self.lost: list = []

    def connectionLost(self, reason) -> None:
        self.lost.append(reason)


class RecordingProducer:
    def __init__(self) -> None:
        self.events: list = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


class FakePort:
    _realPortNumber = 8080

    def __init__(self, reactor) -> None:
        self.flusher = _TurnFlusher(reactor)


class DirectWriteServerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = WatchingClock()
        server, self.peer = socket.socketpair()
        self.peer.setblocking(False)
        self.addCleanup(self.peer.close)
        self.addCleanup(server.close)
        self.socket = CountingSocket(server)
        self.protocol = RecordingProtocol()
        self.transport = DirectWriteServer(self.socket, self.protocol, ("127.0.0.1", 4321),
                                           FakePort(self.reactor), 1, self.reactor)
        self.protocol.makeConnection(self.transport)

    def received(self) -> bytes:
        """
        Everything the peer can read now.
        """
        parts = []
        while True:
            try:
                data = self.peer.recv(1 << 20)
            except BlockingIOError:
                break
            if not data:
                parts.append(b"<EOF>")
                break
            parts.append(data)
        return b"".join(parts)

    def fill_kernel_buffer(self) -> None:
        """
        Leave the transport's socket with no room in the kernel.
        """
        chunk = b"f" * 65536
        while True:
            try:
                self.socket._sock.send(chunk)
            except BlockingIOError:
                return

    def drain(self) -> bytes:
        """
        Read on the peer and write on the transport, as the reactor would
        once the socket is writable, until nothing is left to write.
        """
        got = []
        for _ in range(10000):
            got.append(self.received())
            if self.transport not in self.reactor.writers:
                break
            self.transport.doWrite()
        got.append(self.received())
        return b"".join(got)

    def test_read_gives_the_protocol_what_arrived(self):
        received = []
        self.protocol.dataReceived = received.append
        self.peer.send(b"GET / HTTP/1.1\r\n\r\n")
        self.assertIsNone(self.transport.doRead())
        self.assertEqual(received, [b"GET / HTTP/1.1\r\n\r\n"])

    def test_read_with_nothing_there_is_not_an_end(self):
        received = []
        self.protocol.dataReceived = received.append
        self.assertIsNone(self.transport.doRead())
        self.assertEqual(received, [])

    def test_read_of_the_peer_closing_is_connection_done(self):
        self.peer.close()
        self.assertIs(self.transport.doRead(), main.CONNECTION_DONE)

    def test_read_error_is_connection_lost(self):
        def recv(size):
            raise ConnectionResetError(104, "Connection reset by peer")

        self.socket.recv = recv
        self.assertIs(self.transport.doRead(), main.CONNECTION_LOST)

    def test_writes_of_a_turn_leave_in_one_send_at_its_end(self):
        """
        With nothing buffered, what is written during a turn of the reactor
        is sent in one C{send} at the end of the turn, and the socket is
        never registered for writing.
        """
        self.transport.write(b"HTTP/1.1 202 Accepted\r\n\r\n")
        self.transport.writeSequence([b"HTTP/1.1 ", b"204 No Content\r\n\r\n"])
        self.assertEqual(self.received(), b"")
        self.reactor.advance(0)
        self.assertEqual(self.received(),
                         b"HTTP/1.1 202 Accepted\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(self.socket.sends, 1)
        self.assertEqual(self.reactor.writer_registrations, 0)
        self.assertEqual(self.transport.dataBuffer, b"")

        # The next turn's answers: the same again.
        self.transport.write(b"again")
        self.reactor.advance(0)
        self.assertEqual(self.received(), b"again")
        self.assertEqual((self.socket.sends, self.reactor.writer_registrations), (2, 0))

    def test_connections_of_a_turn_share_one_flush(self):
        """
        Every connection written to during a turn is sent by one call at the
        end of the turn.
        """
        other_server, other_peer = socket.socketpair()
        self.addCleanup(other_server.close)
        self.addCleanup(other_peer.close)
        other = DirectWriteServer(other_server, RecordingProtocol(), ("127.0.0.1", 4322),
                                  self.transport.server, 2, self.reactor)
        self.transport.write(b"one")
        other.write(b"two")
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.reactor.advance(0)
        self.assertEqual(self.received(), b"one")
        self.assertEqual(other_peer.recv(10), b"two")
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_partial_send_buffers_the_rest_and_registers_for_writing(self):
        """
        What the kernel does not take waits in the transport, which is then
        registered for writing; later writes go after it; doWrite sends it
        in order and unregisters.
        """
        data = bytes(range(256)) * 16384  # 4 MiB: more than the socket pair holds
        self.transport.write(data)
        self.reactor.advance(0)
        self.assertIn(self.transport, self.reactor.writers)
        self.assertGreater(self.transport.offset, 0)
        self.assertLess(self.transport.offset, len(data))
        self.transport.write(b"after")
        self.assertEqual(self.reactor.getDelayedCalls(), [], "left to doWrite")

        self.assertEqual(self.drain(), data + b"after")
        self.assertNotIn(self.transport, self.reactor.writers)
        self.assertEqual(self.reactor.writer_registrations, 1)

    def test_kernel_buffer_full(self):
        """
        C{send} refused for now (EAGAIN): nothing is lost, the socket is
        registered for writing, and the bytes go once it is writable.
        """
        self.fill_kernel_buffer()
        self.transport.write(b"answer")
        self.reactor.advance(0)
        self.assertEqual(self.socket.sends, 1)
        self.assertIn(self.transport, self.reactor.writers)
        self.assertEqual(self.transport.dataBuffer, b"answer")
        got = self.drain()
        self.assertTrue(got.endswith(b"f" + b"answer"), got[-20:])
        self.assertNotIn(self.transport, self.reactor.writers)

    def test_producer_paused_at_high_water_and_resumed_when_sent(self):
        """
        More than C{bufferSize} left unsent pauses the streaming producer (the
        HTTP protocol then stops reading); it is resumed once all is sent.
        """
        producer = RecordingProducer()
        self.transport.registerProducer(producer, True)
        self.fill_kernel_buffer()
        self.transport.write(b"x" * (self.transport.bufferSize // 2))
        self.reactor.advance(0)
        self.assertEqual(producer.events, [], "below the high-water mark")
        self.transport.write(b"y" * self.transport.bufferSize)
        self.assertEqual(producer.events, ["pause"])
        self.drain()
        self.assertEqual(producer.events, ["pause", "resume"])

    def test_gathered_beyond_high_water_and_all_sent_does_not_pause(self):
        """
        A turn that writes more than C{bufferSize} which the kernel then takes
        whole never pauses the producer.
        """
        producer = RecordingProducer()
        self.transport.registerProducer(producer, True)
        self.transport.write(b"z" * (self.transport.bufferSize + 1))
        self.reactor.advance(0)
        self.assertEqual(self.received(), b"z" * (self.transport.bufferSize + 1))
        self.assertEqual(producer.events, [])

    def test_connection_lost_on_send(self):
        """
        A C{send} that fails because the peer is gone raises nothing from the
        flush and reports nothing from inside it: the socket is registered
        for writing and doWrite returns the lost connection, for the reactor
        to report as with Twisted's own transport.
        """
        self.peer.close()
        self.transport.write(b"answer")
        self.reactor.advance(0)
        self.assertEqual(self.protocol.lost, [])
        self.assertIn(self.transport, self.reactor.writers)
        self.assertIsInstance(self.transport.doWrite(), error.ConnectionLost)

    def test_connection_lost_before_the_flush(self):
        """
        A connection that ends between the write and the end of the turn
        sends nothing.
        """
        self.transport.write(b"answer")
        self.transport.connectionLost(Failure(error.ConnectionDone()))
        self.reactor.advance(0)
        self.assertEqual(self.socket.sends, 0)

    def test_write_after_connection_lost(self):
        self.transport.connectionLost(Failure(error.ConnectionDone()))
        self.transport.write(b"late")
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_abort_drops_what_was_written(self):
        self.transport.write(b"answer")
        self.transport.abortConnection()
        self.reactor.advance(0)
        self.assertEqual(self.socket.sends, 0)
        self.assertEqual(len(self.protocol.lost), 1)
        self.assertIsInstance(self.protocol.lost[0].value, error.ConnectionAborted)

    def test_lose_connection_after_the_answer(self):
        """
        C{loseConnection} closes once what was written is sent.
        """
        self.transport.write(b"answer")
        self.transport.loseConnection()
        self.reactor.advance(0)
        self.assertEqual(self.received(), b"answer")
        self.assertIsInstance(self.transport.doWrite(), error.ConnectionDone)

    def test_half_close_after_the_answer(self):
        """
        C{loseWriteConnection} shuts the write side once what was written is
        sent; the peer reads the answer, then the end.
        """
        self.transport.write(b"answer")
        self.transport.loseWriteConnection()
        self.transport.write(b", and more")
        self.reactor.advance(0)
        self.assertIsNone(self.transport.doWrite())
        self.assertEqual(self.received(), b"answer, and more<EOF>")
        self.transport.write(b"never")
        self.reactor.advance(0)
        self.assertEqual(self.received(), b"<EOF>")

    def test_str_is_refused(self):
        self.assertRaises(TypeError, self.transport.write, "text")
        self.assertRaises(TypeError, self.transport.writeSequence, [b"a", "text"])

    def test_no_tls(self):
        self.assertRaises(NotImplementedError, self.transport.startTLS, None)

    def test_flush_error_leaves_the_bytes_to_the_reactor(self):
        """
        An unexpected error while sending one connection's bytes is logged
        and leaves them to doWrite; the other connections of the turn are
        still sent.
        """
        class Broken:
            def _send_gathered(self):
                raise RuntimeError("boom")

            def startWriting(self):
                self.writing = True

        broken = Broken()
        flusher = self.transport.server.flusher
        flusher.add(broken)
        self.transport.write(b"answer")
        self.reactor.advance(0)
        self.assertTrue(broken.writing)
        self.assertEqual(self.received(), b"answer")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ServerEndpointTests(SynchronousTestCase):
    def test_tcp_on_a_posix_reactor(self):
        reactor = SelectReactor()
        self.addCleanup(reactor.waker.connectionLost, None)
        endpoint = server_endpoint(reactor, "tcp:8080:interface=127.0.0.1:backlog=1024")
        self.assertEqual(endpoint, DirectWriteTCPEndpoint(reactor, 8080, 1024, "127.0.0.1"))
        self.assertTrue(verifyObject(IStreamServerEndpoint, endpoint))
        six = server_endpoint(reactor, r"tcp6:8080:interface=\:\:1")
        self.assertEqual((six.port, six.interface), (8080, "::1"))

    def test_anything_else_as_twisted_makes_it(self):
        self.assertIsInstance(server_endpoint(MemoryReactor(), "tcp:8080"), TCP4ServerEndpoint)
        reactor = SelectReactor()
        self.addCleanup(reactor.waker.connectionLost, None)
        self.assertIsInstance(server_endpoint(reactor, "unix:/tmp/estat.sock"),
                              UNIXServerEndpoint)
