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
                                "properties": {"accepted": {"type": "integer", "minimum": 1}},
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
