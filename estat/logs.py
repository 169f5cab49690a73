# -*- test-case-name: estat.test.test_logs -*-
"""
Log observers for twistd's C{--logger} option.

    twistd --nodaemon --logger=estat.logs.observer estat

picks text or JSON lines on stdout by C{LOG_FORMAT} (environment or
C{.env}).  A JSON line is one object per log event: time, level,
namespace, message, and the event's own fields; CloudWatch and most log
pipelines read it as is.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from typing import IO

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.failure import Failure

__all__ = ["event_as_json", "json_observer", "observer"]


def _plain(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return repr(value)


def event_as_json(event: dict) -> str:
    """
    One log event as one line of JSON (with the newline).
    """
    t = event.get("log_time")
    record = {
        "time": datetime.datetime.fromtimestamp(t, tz=datetime.timezone.utc)
        .isoformat(timespec="milliseconds").replace("+00:00", "Z") if t is not None else None,
        "level": event["log_level"].name if event.get("log_level") else "info",
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in ("format", "message", "isError", "system",
                                             "time", "why", "failure"):
            continue
        record[key] = _plain(value)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        record["error"] = failure.getErrorMessage()
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False) + "\n"


def json_observer(out: IO[str] | None = None) -> ILogObserver:
    return FileLogObserver(out or sys.stdout, event_as_json)


def observer() -> ILogObserver:
    """
    The observer C{LOG_FORMAT} asks for (C{text}, the default, or C{json}).
    """
    from .config import read_dotenv

    fmt = os.environ.get("LOG_FORMAT") or read_dotenv(os.environ.get("ENV_FILE", ".env")).get("LOG_FORMAT", "text")
    if fmt.strip().lower() == "json":
        return json_observer(sys.stdout)
    return textFileLogObserver(sys.stdout)
