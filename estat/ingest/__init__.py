"""
The ingest core: every rule of accepting an event, with no transport.

 - L{estat.ingest.core}: C{/collect}'s requests to answers, the admission
   seam and the answer and refusal types;
 - L{estat.ingest.access}: write keys and the CORS policy;
 - L{estat.ingest.body}: content decoding with a hard cap, and the limits;
 - L{estat.ingest.segment_rules}: Segment's message rules (shape, limits,
   normalising, the stored line);
 - L{estat.ingest.segment_api}: Segment's requests to answers, over those
   rules.

L{estat.http} parses bytes into L{estat.ingest.core.IngestRequest} and
writes L{estat.ingest.core.Answer} back; nothing here imports it.
"""
