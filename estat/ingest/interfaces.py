# -*- test-case-name: estat.test.test_ingest -*-
"""
The ingest core's seams, apart from the core so that the core can be
compiled (zope.interface takes only plain Python functions in an
L{Interface}).
"""

from zope.interface import Interface

__all__ = ["IAdmission"]


class IAdmission(Interface):
    """
    Where accepted events go, and when they count as acknowledged: the
    seam of the acknowledgement modes (C{ACK_MODE}).
    """

    def admit(events, done):
        """
        Take C{events}, a list of L{estat.event.QueuedEvent}.

        Call C{done(None)} exactly once when they are admitted by this
        mode's rule, or C{done(refusal)} with a L{Refusal}.  C{done} may be
        called before C{admit} returns.
        """
