# -*- test-case-name: estat.test.test_e2e_soak -*-
"""
The reliability soak (C{bench/soak.py}) in its short form: about half a
minute of concurrent load on the real C{twistd estat} while the fault proxy
in front of moto cycles through S3's failures and a short blackhole, with a
SIGTERM and a restart on the same dead-letter directory in the middle.

Every event answered 2xx must be in the bucket exactly once, and every
process stopped with SIGTERM must exit 0.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

pytestmark = pytest.mark.e2e

SOAK = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "bench", "soak.py")


def load_soak():
    """
    C{bench/soak.py} as a module (C{bench/} is not a package).
    """
    if not os.path.exists(SOAK):
        pytest.skip("bench/soak.py is not in this checkout")
    spec = importlib.util.spec_from_file_location("estat_bench_soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_short_chaos_soak_stores_every_acknowledged_event_once():
    soak = load_soak()
    result = soak.run_soak(duration=30, blackout=4, clients=8)
    table = soak.markdown_table(result)
    print(table)

    assert result["acknowledged"] > 10000, table
    assert result["lost"] == 0, f"lost, e.g. {result['lost_examples']}\n{table}"
    assert result["duplicated"] == 0, f"duplicated, e.g. {result['duplicate_examples']}\n{table}"
    assert result["stored_but_rejected"] == 0, table
    assert result["unknown_stored"] == 0, table
    assert [(name, how) for name, how, _ in result["exit_codes"]][:2] == [
        ("first", "SIGTERM"), ("second", "SIGTERM")], table
    assert all(code == 0 for _, _, code in result["exit_codes"]), table
    assert result["passed"], table
    # The faults were met, not just scheduled: S3 failed in each way and
    # the dead-letter queue was used.
    proxied = result["proxy_requests"]
    for mode in ("500", "slowdown", "slow", "blackhole"):
        assert proxied.get(mode, 0) > 0, (mode, table)
    assert result["dlq_peak_files"] > 0, table
    assert result["dlq_left_files"] == 0 and result["dlq_quarantined"] == 0, table
