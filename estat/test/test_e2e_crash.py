# -*- test-case-name: estat.test.test_e2e_crash -*-
"""
The crash harness (C{bench/crash.py}) in its short form: the real C{twistd
estat} under load, killed with SIGKILL at random moments and restarted on
the same directories, then stopped with SIGTERM.  In C{ACK_MODE=disk} and
C{ACK_MODE=stored}, on the local store and on moto S3 behind the fault
proxy, every event answered 2xx must be stored exactly once.  (About 50 s
in all; C{make crash-soak} runs the long version.)
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

pytestmark = pytest.mark.e2e

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "bench")


def load_crash():
    path = os.path.join(BENCH, "crash.py")
    if not os.path.exists(path):
        pytest.skip("bench/crash.py is not in this checkout")
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location("estat_bench_crash", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode,store", [("disk", "local"), ("stored", "local"),
                                        ("disk", "s3"), ("stored", "s3")])
def test_sigkill_loses_and_duplicates_nothing_acknowledged(mode, store):
    crash = load_crash()
    result = crash.run_crash(mode, store, duration=8, kills=3, clients=6, rate=40)
    text = crash.summary(result)
    assert result["kills"] >= 2, text
    assert result["acknowledged"] > 300, text
    assert result["lost"] == 0, f"lost, e.g. {result['lost_examples']}: {text}"
    assert result["duplicated"] == 0, text
    assert result["stored_but_rejected"] == 0, text
    assert result["exit_code"] == 0, text
    assert result["passed"], text
