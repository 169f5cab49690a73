"""
Twisted's epoll reactor, with one shortcut: an event on a connection of
the HTTP listener (a L{DirectWriteServer<estat.http.transport.DirectWriteServer>})
goes to Twisted's own C{_doReadOrWrite} without the legacy log context.

Twisted's C{doPoll} wraps every event in C{log.callWithLogger}, which
copies two context dicts, pushes them on a thread-local stack and pops
them again, so that legacy C{log.msg} calls made while handling it carry
the connection's C{logPrefix} as their C{system}.  Per request that is
about a tenth of the server's CPU (C{bench/RESULTS.md}, "Dispatching
reads"); Estat logs with L{twisted.logger}, whose events name their own
namespace and never read that context.  Every other selectable (the
listening port, the waker, client connections to S3) keeps the context.

Install it before the reactor is imported: C{twistd --reactor=estat ...}
(the reactor plugin in C{twisted/plugins/estat_plugin.py}), or L{install}.
"""

from __future__ import annotations

import errno

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import installReactor
from twisted.python import log

from .transport import DirectWriteServer

__all__ = ["EstatEPollReactor", "install"]


class EstatEPollReactor(EPollReactor):
    """
    L{EPollReactor} whose events on L{DirectWriteServer}s skip the legacy
    log context (see the module docstring).
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
            if type(selectable) is DirectWriteServer:
                drdw(selectable, fd, event)
            else:
                log.callWithLogger(selectable, drdw, selectable, fd, event)

    doIteration = doPoll


def install() -> EstatEPollReactor:
    """
    Install L{EstatEPollReactor} as Twisted's reactor.
    """
    reactor = EstatEPollReactor()
    installReactor(reactor)
    return reactor
