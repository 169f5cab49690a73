"""
Estat: an event-ingestion server.  Events are POSTed over HTTP, queued in
memory, sealed into batches, encoded as gzip JSON Lines and stored in S3 (or
a local directory), with a disk dead-letter queue beside the pipeline.

    http/ (site, routes)  ->  queue  ->  batcher  ->  encoder  ->  uploader  ->  store/
                                                                        |
                                                                       dlq
"""

__version__ = "0.1.0"

# The hot modules load compiled when built from their current source, else
# pure Python (ESTAT_PURE=1 asks for pure Python): see estat/_compiled.py.
from . import _compiled  # noqa: E402

_compiled.install()
