# -*- test-case-name: estat.test.test_e2e_contract -*-
"""
The OpenAPI 3 document of Estat's HTTP API, served at C{/openapi.json}.
The contract test runs schemathesis against a live server with it.
"""

from __future__ import annotations

from .. import __version__

__all__ = ["openapi_document"]

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string"},
        "index": {"type": "integer", "minimum": 0,
                  "description": "index of the first bad element of a batch"},
        "limit": {"type": "integer"},
    },
}


def _error(description: str, headers: dict | None = None) -> dict:
    response = {"description": description,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    if headers:
        response["headers"] = headers
    return response


_ID = {"anyOf": [{"type": "string", "minLength": 1}, {"type": "number"}]}
_USER = {"anyOf": [{"required": ["userId"], "properties": {"userId": _ID}},
                   {"required": ["anonymousId"], "properties": {"anonymousId": _ID}}]}
#: What Segment checks per type, beyond a userId or an anonymousId.
_TYPE_FIELDS = {
    "track": {"required": ["event"],
              "properties": {"event": {"type": "string", "minLength": 1}}},
    "group": {"required": ["groupId"], "properties": {"groupId": _ID}},
    "alias": {"required": ["previousId"], "properties": {"previousId": _ID}},
}
_SHORT = {"track": "t", "identify": "i", "page": "p", "screen": "s", "group": "g",
          "alias": "a"}


def _message(kind: str | None) -> dict:
    """
    The schema of one Segment message of type C{kind} (C{None}: any, as a
    batch element, with its C{type}).
    """
    common = {
        "type": "object",
        "not": {"required": ["_estat"]},
        "properties": {
            "messageId": {"type": "string", "minLength": 1, "nullable": True,
                          "description": "a retry with the same id is stored once"},
            "context": {"type": "object", "nullable": True},
            "integrations": {"type": "object", "nullable": True},
            "timestamp": {"description": "ISO 8601; stored as originalTimestamp, and "
                                         "corrected for clock skew with sentAt"},
        },
        "additionalProperties": True,
    }
    if kind is not None:
        return {"allOf": [common, _USER] + ([_TYPE_FIELDS[kind]] if kind in _TYPE_FIELDS
                                            else [])}
    variants = []
    for name in _SHORT:
        typed = {"required": ["type"], "properties": {"type": {"type": "string",
                                                               "enum": [name]}}}
        variants.append({"allOf": [typed] + ([_TYPE_FIELDS[name]] if name in _TYPE_FIELDS
                                             else [])})
    return {"allOf": [common, _USER, {"oneOf": variants}]}


_SEGMENT_REFUSALS = {
    "400": _error("not JSON, a message Segment would refuse (the first bad one's index "
                  "is named), a message over 32 KB or a body over 500 KB"),
    "401": _error("write key missing or wrong"),
    "413": _error("body larger than MAX_BATCH_BODY_SIZE on the wire"),
    "415": _error("unsupported Content-Encoding"),
    "503": _error("queue full, or this batch is still being stored; retry later",
                  {"Retry-After": {"schema": {"type": "integer"}}}),
}
_WRITE_KEY_QUERY = {"name": "writeKey", "in": "query", "required": False,
                    "schema": {"type": "string"},
                    "description": "write key (also: HTTP Basic with the key as user name, "
                                   "or writeKey in the body)"}
_PREFLIGHT = {"summary": "CORS preflight", "responses": {"204": {"description": "preflight"}}}


def _segment_call(summary: str, body_schema: dict) -> dict:
    return {
        "post": {
            "summary": summary,
            "tags": ["Segment"],
            "parameters": [_WRITE_KEY_QUERY],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": body_schema},
                "text/plain": {"schema": {"type": "string"},
                               "description": "JSON, as analytics.js sends it"},
            }},
            "responses": {
                "200": {"description": "every message stored (or already stored: a retry)",
                        "content": {"application/json": {"schema": {
                            "type": "object", "required": ["success"],
                            "properties": {"success": {"type": "boolean"}}}}}},
                **_SEGMENT_REFUSALS,
            },
        },
        "options": _PREFLIGHT,
    }


def _segment_paths() -> dict:
    """
    Segment's HTTP tracking API (estat.ingest.segment_api).
    """
    paths = {}
    # analytics.js's short forms (/v1/t ... /v1/b) are the same handlers:
    # named in each summary, not repeated (the contract run stays short).
    for kind, short in _SHORT.items():
        paths[f"/v1/{kind}"] = _segment_call(
            f"Segment {kind} call (also at /v1/{short}, analytics.js's short form)",
            _message(kind))
    batch = {"type": "object", "required": ["batch"], "properties": {
        "batch": {"type": "array", "items": _message(None), "minItems": 1, "maxItems": 500},
        "context": {"type": "object", "nullable": True,
                    "description": "merged under each message's own"},
        "integrations": {"type": "object", "nullable": True},
        "sentAt": {"description": "ISO 8601, when the batch was sent"},
    }, "additionalProperties": True}
    paths["/v1/batch"] = _segment_call("Segment batch: messages of any type (also at /v1/b)",
                                       batch)
    gif = {"200": {"description": "a 1x1 GIF, whatever the data (refusals are only counted)",
                   "content": {"image/gif": {"schema": {"type": "string",
                                                        "format": "binary"}}}}}
    for kind in ("track", "page"):
        paths[f"/v1/pixel/{kind}"] = {
            "get": {"summary": f"Segment pixel: a {kind} call in an image URL", "tags": ["Segment"],
                    "parameters": [{"name": "data", "in": "query", "required": False,
                                    "schema": {"type": "string"},
                                    "description": "base64 of the message's JSON, with its "
                                                   "writeKey"}],
                    "responses": gif},
            "options": _PREFLIGHT,
        }
    paths["/v1/projects/{writeKey}/settings"] = {
        "parameters": [{"name": "writeKey", "in": "path", "required": True,
                        "schema": {"type": "string", "minLength": 1}}],
        "get": {"summary": "Source settings for analytics.js (cdnURL): this server is "
                           "Segment.io's apiHost",
                "tags": ["Segment"],
                "responses": {
                    "200": {"description": "settings", "content": {"application/json": {
                        "schema": {"type": "object", "required": ["integrations"]}}}},
                    "400": _error("no Host header and no PUBLIC_URL"),
                    "401": _error("unknown write key"),
                    "404": _error("not a write key"),
                }},
        "options": _PREFLIGHT,
    }
    return paths


def openapi_document() -> dict:
    event = {"$ref": "#/components/schemas/Event"}
    events_body = {
        "oneOf": [
            event,
            {"type": "array", "items": event, "minItems": 1, "maxItems": 500},
        ]
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Estat ingest API",
            "version": __version__,
            "description": "Collect user-activity events; they are stored as gzip JSON Lines.",
        },
        "paths": {
            "/collect": {
                "post": {
                    "summary": "Submit one event, a JSON array of events, or NDJSON",
                    "parameters": [
                        {"name": "write_key", "in": "query", "required": False,
                         "schema": {"type": "string"},
                         "description": "write key, for clients that cannot set headers (sendBeacon)"},
                        {"name": "X-Write-Key", "in": "header", "required": False,
                         "schema": {"type": "string"}},
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": events_body},
                            "text/plain": {"schema": {"type": "string"},
                                           "description": "JSON sent by navigator.sendBeacon"},
                            "application/x-ndjson": {"schema": {"type": "string"},
                                                     "description": "one JSON object per line"},
                        },
                    },
                    "responses": {
                        "202": {
                            "description": "all events queued",
                            "content": {"application/json": {"schema": {
                                "type": "object", "required": ["accepted"],
                                "properties": {
                                    "accepted": {"type": "integer", "minimum": 1},
                                    "duplicates": {
                                        "type": "integer", "minimum": 1,
                                        "description": "events whose messageId was admitted "
                                                       "within DEDUP_WINDOW: not stored again"},
                                },
                            }}},
                        },
                        "400": _error("invalid JSON, not an object, or a bad batch element"),
                        "401": _error("write key missing or wrong"),
                        "413": _error("body, decompressed body, event or batch too large"),
                        "415": _error("unsupported Content-Encoding"),
                        "503": _error("event queue full; retry later",
                                      {"Retry-After": {"schema": {"type": "integer"}}}),
                    },
                },
                "options": {
                    "summary": "CORS preflight",
                    "responses": {"204": {"description": "preflight answer"}},
                },
            },
            "/healthz": {"get": {"summary": "Liveness", "responses": {
                "200": {"description": "alive", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Status"}}}}}}},
            "/readyz": {"get": {"summary": "Readiness", "responses": {
                "200": {"description": "ready", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Status"}}}},
                "503": {"description": "shutting down", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Status"}}}}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
                "200": {"description": "text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {
                "200": {"description": "OpenAPI 3 document",
                        "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            **_segment_paths(),
        },
        "components": {
            "schemas": {
                "Event": {
                    "type": "object",
                    "description": "Any JSON object without an '_estat' field.",
                    "not": {"required": ["_estat"]},
                    "additionalProperties": True,
                },
                "Error": _ERROR,
                "Status": {"type": "object", "required": ["status"],
                           "properties": {"status": {"type": "string"}}},
            }
        },
    }
