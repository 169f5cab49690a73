# -*- test-case-name: estat.test.test_e2e_contract -*-
"""
The OpenAPI contract, end to end: schemathesis generates requests from the
document C{GET /openapi.json} serves and sends them to a real C{twistd
estat}; no answer may be a 5xx or break the document.

The schema is loaded from L{estat.http.openapi.openapi_document} when the module
is imported (schemathesis' lazy C{from_fixture} loader does not work with
the installed pytest 9), and the first test checks that the running server
serves exactly that document.

Every process started here is ended by its PID, and every wait is bounded.
"""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from estat.http.openapi import openapi_document
from estat.test.harness import EstatProcess

pytestmark = pytest.mark.e2e

DOCUMENT = openapi_document()
# An explicit configuration, so that no schemathesis.toml found on disk
# changes what this test checks.  Every check stays enabled; one is tuned:
#
# negative_data_rejection expects a schema-violating request to be refused
# with one of 400, 401, 403, 404, 405, 406, 409, 415, 422, 428, 429 (or
# 5xx, which not_a_server_error fails anyway).  Estat refuses a batch over
# the document's own "maxItems: 500" with 413, which the document lists
# for exactly that ("body, decompressed body, event or batch too large"):
# a correct refusal, so 413 is added to the accepted refusals.
CONFIG = SchemathesisConfig.from_dict({
    "checks": {
        "negative_data_rejection": {
            "expected-statuses": ["400", "401", "403", "404", "405", "406", "409", "413",
                                  "415", "422", "428", "429", "5XX"],
        },
    },
})
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)

# schemathesis has no serializer for NDJSON and would skip those bodies; an
# NDJSON body is text, sent as it is, like text/plain.
schemathesis.serializer.alias("application/x-ndjson", "text/plain")

#: Request bodies whose schema is C{{"type": "string"}} although their
#: content is JSON (C{sendBeacon}'s text/plain) or NDJSON.  OpenAPI 3.0
#: cannot say "a string holding JSON", and on the wire a text body has no
#: type at all, so for these two media types two checks are meaningless:
#:  - positive_data_acceptance: a "schema-valid" body is arbitrary text,
#:    which the document itself says is answered 400 ("invalid JSON");
#:  - negative_data_rejection: a "schema-violating" body is a non-string
#:    value that schemathesis writes out as text anyway, e.g. C{{}}, which
#:    is a perfectly valid NDJSON line and rightly accepted.
#: Every other check (no 5xx, status codes, content types, headers and
#: response bodies as documented) still applies to them, and both checks
#: still apply to application/json bodies.
STRING_BODIES = ("text/plain", "application/x-ndjson")


@pytest.fixture(scope="module")
def estat():
    server = EstatProcess({"FLUSH_INTERVAL": "1s", "CORS_ALLOWED_ORIGINS": "*",
                           "WRITE_KEYS": ""})
    try:
        server.wait_ready()
        yield server
    finally:
        server.cleanup()


def test_serves_the_tested_document(estat):
    """
    C{GET /openapi.json} is the document the contract test is generated
    from, as JSON.
    """
    status, headers, body = estat.get_with_headers("/openapi.json")
    assert status == 200
    assert headers.get("Content-Type") == "application/json"
    assert json.loads(body) == json.loads(json.dumps(DOCUMENT))
    assert DOCUMENT["openapi"].startswith("3.")


@schema.parametrize()
@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.data_too_large, HealthCheck.large_base_example])
def test_contract(case, estat):
    """
    Every generated request, positive and negative, in the examples,
    coverage and fuzzing phases (stateful does not apply: no links): no
    5xx, status codes, content types, headers and bodies as documented,
    schema-valid data accepted, invalid data refused, undeclared methods
    refused.
    """
    excluded = ([positive_data_acceptance, negative_data_rejection]
                if case.media_type in STRING_BODIES else [])
    if case.path.startswith("/v1/pixel/"):
        # The pixel answers its GIF whatever the data (an e-mail client
        # shows a broken image otherwise): refusals are only counted.
        excluded = [negative_data_rejection]
    case.call_and_validate(base_url=estat.url, excluded_checks=excluded,
                           timeout=10)


def test_server_never_failed(estat):
    """
    After all of that the server is alive, ready, and has logged no
    unhandled error (a failure need not surface as a 5xx to be a bug).
    """
    assert estat.proc.poll() is None, estat.log()[-4000:]
    assert estat.get("/readyz")[0] == 200
    log = estat.log()
    for marker in ("Traceback", "Unhandled Error", "Unhandled error"):
        assert marker not in log, log[-8000:]
