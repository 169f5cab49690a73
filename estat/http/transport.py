# -*- test-case-name: estat.test.test_http_transport -*-
"""
The TCP transport of the HTTP listener: Twisted's own, except that the
answers written during one turn of the reactor are sent at the end of that
turn, each connection's in one C{send}, with no registration for writing.

Twisted's L{FileDescriptor.write<twisted.internet.abstract.FileDescriptor.write>}
buffers every write and registers the socket for writing; the next turn
sends the buffer and unregisters it: two C{epoll_ctl} and one more reactor
dispatch per answer.  Here the socket is registered for writing only when
the kernel does not take all the bytes (or refuses them for now), as
asyncio's selector transports do.

Why at the end of the turn, not at once (as asyncio) or at the end of each
read: the client is woken by the first answer that reaches it.  Answers
sent one per read, between the reads of the other connections, reach a
client (wrk, a load balancer) that has just gone back to sleep, and wake it
again, most of a time per request on a 2-CPU VM (an IPI, a VM exit; the
C{send} pays it): that measured slower than Twisted's buffer despite half
the system calls.  Sent back to back once every read of the turn is done,
as Twisted's buffer sends them, one wake-up serves many answers
(C{bench/syscalls.py}, C{bench/RESULTS.md}).

What must never change against Twisted's transport: the order of the
bytes, C{loseConnection} and C{loseWriteConnection} after what was
written, C{abortConnection} dropping it, the streaming producer paused
above C{bufferSize} of unsent bytes and resumed once they are sent, and a
connection lost on a C{send} reported by the reactor (never from inside
C{write}).  No TLS.
"""

from __future__ import annotations

import os
import socket
from errno import EWOULDBLOCK

import attr
from twisted.internet import defer, main, tcp
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger
from zope.interface import implementer

__all__ = ["AdoptedEndpoint", "DirectWriteServer", "DirectWritePort", "DirectWriteTCPEndpoint",
           "server_endpoint"]


class _TurnFlusher:
    """
    The connections written to during this turn of the reactor, sent at
    its end, one after the other.
    """

    log = Logger()

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self._waiting: list = []
        self._call = None

    def add(self, transport: "DirectWriteServer") -> None:
        self._waiting.append(transport)
        if self._call is None:
            self._call = self._reactor.callLater(0, self.flush)

    def flush(self) -> None:
        self._call = None
        waiting, self._waiting = self._waiting, []
        for transport in waiting:
            try:
                transport._send_gathered()
            except Exception:
                self.log.failure("error sending an answer; left to the reactor")
                transport.startWriting()


class DirectWriteServer(tcp.Server):
    """
    A server-side TCP connection whose writes of one reactor turn are sent
    at the end of that turn, with no registration for writing unless the
    kernel does not take them all (see the module docstring).
    """

    #: Waiting in the port's flusher for the end of this turn.
    _queued = False
    #: Registered with the reactor for writability.
    _writing = False

    def startWriting(self) -> None:
        self._writing = True
        super().startWriting()

    def stopWriting(self) -> None:
        self._writing = False
        super().stopWriting()

    def doRead(self):
        # tcp.Connection's doRead and _dataReceived in one call.
        try:
            data = self.socket.recv(self.bufferSize)
        except OSError as e:
            if e.args[0] == EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        if not data:
            return main.CONNECTION_DONE
        self.protocol.dataReceived(data)
        return None

    def startTLS(self, ctx, normal=True):
        raise NotImplementedError("the direct-write transport does not do TLS")

    def write(self, data: bytes) -> None:
        if type(data) is not bytes:
            return super().write(data)  # its TypeError for str
        if not self.connected or self._writeDisconnected or not data:
            return
        self._tempDataBuffer.append(data)
        self._tempDataLen += len(data)
        if self._writing:
            # doWrite sends it, after what is already waiting.
            self._maybePauseProducer()
        elif not self._queued:
            self._queued = True
            self.server.flusher.add(self)

    def writeSequence(self, iovec) -> None:
        iovec = list(iovec)
        for data in iovec:
            if type(data) is not bytes:
                return super().writeSequence(iovec)
        self.write(b"".join(iovec))

    def _send_gathered(self) -> None:
        """
        Send what was written during this turn, in one C{send}.
        """
        self._queued = False
        if self._aborting or not self.connected or not self._tempDataLen:
            return
        if self.dataBuffer:
            # Bytes written earlier still wait for the socket: these go
            # after them, from doWrite.
            self._maybePauseProducer()
            self.startWriting()
            return
        gathered = self._tempDataBuffer
        data = gathered[0] if len(gathered) == 1 else b"".join(gathered)
        self._tempDataBuffer = []
        self._tempDataLen = 0
        try:
            sent = self.socket.send(data)
        except OSError:
            # EAGAIN/ENOBUFS: the kernel's buffer is full, wait for room.
            # Any other error (EPIPE, ECONNRESET): doWrite meets it again
            # and the reactor reports the connection lost, as for Twisted's
            # own transport (never from inside write()).
            sent = 0
        if sent == len(data):
            return
        self.dataBuffer = data
        self.offset = sent
        self._maybePauseProducer()
        self.startWriting()


class DirectWritePort(tcp.Port):
    """
    A TCP listening port whose connections are L{DirectWriteServer}s.
    """

    transport = DirectWriteServer

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.flusher = _TurnFlusher(self.reactor)


@implementer(IStreamServerEndpoint)
@attr.s(frozen=True)
class DirectWriteTCPEndpoint:
    """
    Listens like L{twisted.internet.endpoints.TCP4ServerEndpoint} (and its
    IPv6 twin: the interface decides), with a L{DirectWritePort}.
    """

    reactor = attr.ib()
    port: int = attr.ib()
    backlog: int = attr.ib(default=50)
    interface: str = attr.ib(default="")

    def listen(self, factory):
        return defer.execute(self._listen, factory)

    def _listen(self, factory):
        port = DirectWritePort(self.port, factory, self.backlog, self.interface, self.reactor)
        port.startListening()
        return port


def server_endpoint(reactor, description: str):
    """
    The endpoint of a server description (C{tcp:8080:interface=...}): for
    TCP on one of Twisted's POSIX reactors (epoll, poll, select), a
    L{DirectWriteTCPEndpoint}; anything else (C{unix:}, another reactor)
    as L{serverFromString} makes it.
    """
    endpoint = serverFromString(reactor, description)
    # TCP4ServerEndpoint and TCP6ServerEndpoint share these attributes.
    if isinstance(reactor, PosixReactorBase) and isinstance(
            endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint)):
        return DirectWriteTCPEndpoint(reactor, endpoint._port, endpoint._backlog,
                                      endpoint._interface)
    return endpoint


@implementer(IStreamServerEndpoint)
@attr.s(frozen=True)
class AdoptedEndpoint:
    """
    Listens on an inherited listening socket (descriptor C{fd}) with a
    L{DirectWritePort}, as the supervisor's other workers do.
    """

    reactor = attr.ib()
    fd: int = attr.ib()

    def listen(self, factory):
        return defer.execute(self._listen, factory)

    def _listen(self, factory):
        with socket.socket(fileno=os.dup(self.fd)) as probe:
            family = probe.family
        port = DirectWritePort._fromListeningDescriptor(self.reactor, self.fd, family, factory)
        port.startListening()
        # The port holds its own duplicate of the socket.
        os.close(self.fd)
        return port
