"""
The Segment SDKs the end-to-end tests drive: L{node_modules} installs the
npm packages pinned in C{package-lock.json} (C{npm ci}) into a cache
directory outside the checkout, once per lock file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
NODE_CLIENT = os.path.join(HERE, "node_client.js")
_FILES = ("package.json", "package-lock.json")


def missing(reason: str):
    """
    Skip a test whose tool is missing, except in CI (C{CI=true}), where the
    real-SDK tests must run: there it fails.
    """
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI must run the SDK tests)")
    pytest.skip(reason)


def cache_dir() -> str:
    return os.environ.get("ESTAT_NPM_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "estat-npm")


def node_modules(timeout: float = 300.0) -> str:
    """
    The C{node_modules} directory holding the pinned SDKs, installed with
    C{npm ci} first if this lock file was never installed.  Concurrent test
    runs wait for one another (a lock file).
    """
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing("node and npm are needed for the JavaScript SDK tests")
    digest = hashlib.sha256()
    for name in _FILES:
        with open(os.path.join(HERE, name), "rb") as f:
            digest.update(f.read())
    root = cache_dir()
    target = os.path.join(root, digest.hexdigest()[:16])
    done = os.path.join(target, ".installed")
    if os.path.exists(done):
        return os.path.join(target, "node_modules")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(done):
            shutil.rmtree(target, ignore_errors=True)
            os.makedirs(target)
            for name in _FILES:
                shutil.copy(os.path.join(HERE, name), target)
            try:
                result = subprocess.run(
                    [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
                    cwd=target, stdin=subprocess.DEVNULL, capture_output=True,
                    timeout=timeout)
            except subprocess.TimeoutExpired:
                missing(f"npm ci did not finish within {timeout}s")
            if result.returncode != 0:
                missing("npm ci failed: " + result.stderr.decode("utf-8", "replace")[-2000:])
            with open(done, "w") as f:
                f.write("ok\n")
    return os.path.join(target, "node_modules")
