# -*- test-case-name: estat.test.test_http_reactor -*-
"""
Twisted's epoll reactor, with one shortcut: a read on a connection of the
HTTP listener (a L{DirectWriteServer<estat.http.transport.DirectWriteServer>})
is dispatched straight to its C{doRead}.

Twisted's C{doPoll} wraps every event in C{log.callWithLogger}, which
copies two context dicts, pushes them on a thread-local stack and pops
them again, so that legacy C{log.msg} calls made while handling it carry
the connection's C{logPrefix} as their C{system}.  Per request that is
about a tenth of the server's CPU (C{bench/RESULTS.md}, "Dispatching
reads"); Estat logs with L{twisted.logger}, whose events name their own
namespace and never read that context.  Everything else is Twisted's
C{_doReadOrWrite}, spelled out: an event that is not a plain read, and
every other selectable (the listening port, the waker, client
connections to S3), goes through Twisted's own path.

Install it before the reactor is imported: C{twistd --reactor=estat ...}
(the plugin in C{twisted/plugins/estat_reactor.py}), or L{install}.
"""

from __future__ import annotations

import errno
import select
import sys

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import installReactor
from twisted.internet.posixbase import _NO_FILEDESC
from twisted.python import log

from .transport import DirectWriteServer

__all__ = ["EstatEPollReactor", "install"]

_EPOLLIN = select.EPOLLIN


class EstatEPollReactor(EPollReactor):
    """
    L{EPollReactor} whose plain reads of L{DirectWriteServer}s skip the
    legacy log context (see the module docstring).
    """

    def doPoll(self, timeout):
        if timeout is None:
            timeout = -1
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        drdw = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            if event != _EPOLLIN or type(selectable) is not DirectWriteServer:
                log.callWithLogger(selectable, drdw, selectable, fd, event)
                continue
            # Twisted's _doReadOrWrite for a read event, in place.
            in_read = False
            try:
                if selectable.fileno() == -1:
                    why = _NO_FILEDESC
                else:
                    why = selectable.doRead()
                    in_read = True
            except BaseException:
                why = sys.exc_info()[1]
                log.err()
            if why:
                self._disconnectSelectable(selectable, why, in_read)

    doIteration = doPoll


def install() -> EstatEPollReactor:
    """
    Install L{EstatEPollReactor} as Twisted's reactor.
    """
    reactor = EstatEPollReactor()
    installReactor(reactor)
    return reactor
