"""
Estat: an event-ingestion server.  Events are POSTed over HTTP, queued in
memory, sealed into batches, encoded as gzip JSON Lines and stored in S3 (or
a local directory), with a disk dead-letter queue beside the pipeline.

    http/ (site, routes)  ->  queue  ->  batcher  ->  encoder  ->  uploader  ->  store/
                                                                        |
                                                                       dlq
"""

__version__ = "0.1.0"
