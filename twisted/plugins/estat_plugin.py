from twisted.application.service import ServiceMaker

estat = ServiceMaker(
    "Estat ingest server", "estat.tap", "Collect events over HTTP into S3 as gzip JSON Lines.", "estat"
)

from twisted.application.reactors import Reactor  # noqa: E402

#: C{twistd --reactor=estat}: Twisted's epoll reactor with Estat's faster
#: dispatch of reads on its HTTP connections (estat/http/reactor.py).
estat_reactor = Reactor(
    "estat", "estat.http.reactor",
    "epoll, reads on Estat's HTTP connections dispatched without the legacy log context")
