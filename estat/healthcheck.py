"""
A health check for container runtimes, with nothing but Python:

    python -m estat.healthcheck [/healthz|/readyz]

It finds the port the way the server does (HTTP_ADDR from the environment
or the .env file, Go or Twisted syntax) and exits 0 if the path answers 200.
"""

from __future__ import annotations

import os
import re
import sys
import urllib.request

from .config import SETTINGS_BY_ENV, read_dotenv


def port_of(http_addr: str) -> int:
    description = SETTINGS_BY_ENV["HTTP_ADDR"].parse(http_addr)
    m = re.match(r"^(?:tcp6?|ssl):(?:port=)?(\d+)", description)
    if m is None:
        raise ValueError(f"cannot health-check a non-TCP HTTP_ADDR: {http_addr!r}")
    return int(m.group(1))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else "/healthz"
    addr = (os.environ.get("HTTP_ADDR")
            or read_dotenv(os.environ.get("ENV_FILE", ".env")).get("HTTP_ADDR")
            or SETTINGS_BY_ENV["HTTP_ADDR"].default)
    try:
        url = f"http://127.0.0.1:{port_of(addr)}{path}"
        with urllib.request.urlopen(url, timeout=2) as response:
            return 0 if response.status == 200 else 1
    except Exception as e:  # any failure is "unhealthy"
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
