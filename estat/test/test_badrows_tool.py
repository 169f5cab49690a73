# -*- test-case-name: estat.test.test_badrows_tool -*-
from __future__ import annotations

import gzip
import io
import json
import os

from twisted.trial.unittest import SynchronousTestCase

from estat.badrows_tool import main


class ListTests(SynchronousTestCase):
    def test_list_by_schema_and_error(self) -> None:
        store = self.mktemp()
        path = os.path.join(store, "bad", "collect", "dt=2026-12-01", "hour=08")
        os.makedirs(path)
        rows = [{"stream": "collect", "schema": "event.json",
                 "errors": [{"pointer": "/price", "keyword": "type", "message": "m"}]}] * 3 + \
               [{"stream": "collect", "schema": "event.json",
                 "errors": [{"pointer": "", "keyword": "required", "message": "m"}]}]
        with gzip.open(os.path.join(path, "x.jsonl.gz"), "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        out = io.StringIO()
        self.assertEqual(main(["list", store], out=out), 0)
        self.assertEqual(out.getvalue().splitlines(), [
            "collect event.json: 4 events",
            "         3  type                 /price",
            "         1  required             (the event)",
        ])
