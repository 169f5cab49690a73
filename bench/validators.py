"""
Which JSON Schema validator the tracking plan uses (estat.schema.plan):
fastjsonschema against jsonschema-rs on the bench's events and a
15-property schema (bench/schemas/bench-plan-event.json), the cost of a
valid and of an invalid event, what each error names (the failing JSON
Pointer and keyword), and how each copes with a pattern that backtracks
catastrophically (C{^(a+)+$} on C{"aaaa...!"}).

    .venv/bin/python bench/validators.py

Figures are CPU time per event (time.process_time), best of 5 runs of
20,000 events.  fastjsonschema knows drafts 4, 6 and 7 only: its run is
on the same schema with the 2020-12 C{$schema} replaced by draft-07 (the
keywords used mean the same in both).
"""

from __future__ import annotations

import copy
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from encoders import event  # noqa: E402

N = 20000
SCHEMA = os.path.join(HERE, "schemas", "bench-plan-event.json")
HOSTILE = "a" * 30 + "!"


def events(invalid: bool) -> list:
    rng = random.Random(7)
    out = []
    for n in range(N):
        e = event(n, rng)
        del e["_estat"]
        if invalid:
            # The two typos of the issue: a renamed field, a price as text.
            e["userid"] = e.pop("user_id")
            e["value"] = "12,50"
        out.append(e)
    return out


def per_event(check, items: list, reps: int = 5) -> float:
    best = None
    for _ in range(reps):
        start = time.process_time()
        for item in items:
            check(item)
        spent = time.process_time() - start
        best = spent if best is None else min(best, spent)
    return best / len(items) * 1e6


def hostile_seconds(check) -> str:
    start = time.perf_counter()
    try:
        outcome = check(HOSTILE)
    except Exception as e:  # noqa: BLE001 - the point is what it raises
        outcome = f"raised {type(e).__name__}"
    spent = time.perf_counter() - start
    return f"{spent * 1e3:.3f} ms ({outcome})"


def main() -> int:
    import fastjsonschema
    import jsonschema_rs

    with open(SCHEMA) as f:
        schema = json.load(f)
    good, bad = events(False), events(True)
    print(f"{N:,} events, schema {os.path.relpath(SCHEMA)} "
          f"({len(schema['properties'])} properties)\n")

    rs = jsonschema_rs.validator_for(schema)
    assert all(rs.is_valid(e) for e in good) and not any(rs.is_valid(e) for e in bad)

    def rs_errors(e):
        return [(err.instance_path, err.kind.name) for err in rs.iter_errors(e)]

    draft7 = copy.deepcopy(schema)
    draft7["$schema"] = "http://json-schema.org/draft-07/schema#"
    draft7["definitions"] = draft7.pop("$defs")
    draft7["properties"]["screen"] = {"$ref": "#/definitions/screen"}
    fjs = fastjsonschema.compile(draft7)

    def fjs_errors(e):
        try:
            fjs(e)
        except fastjsonschema.JsonSchemaValueException as err:
            return [(err.path, err.rule)]
        return []

    rows = [
        ("jsonschema-rs is_valid", lambda e: rs.is_valid(e)),
        ("jsonschema-rs iter_errors (all errors)", rs_errors),
        ("fastjsonschema (first error)", fjs_errors),
    ]
    print("| validator | valid event, us | invalid event, us |")
    print("| --- | --- | --- |")
    figures = {}
    for name, check in rows:
        figures[name] = (per_event(check, good), per_event(check, bad))
        print(f"| {name} | {figures[name][0]:.2f} | {figures[name][1]:.2f} |")
    sample = bad[0]
    print("\nwhat the errors say about", json.dumps({"userid": sample["userid"],
                                                       "value": sample["value"]}))
    for err in rs.iter_errors(sample):
        pointer = "".join("/" + str(p).replace("~", "~0").replace("/", "~1")
                          for p in err.instance_path)
        print(f"  jsonschema-rs:  pointer {pointer!r} keyword {err.kind.name!r}: {err.message}")
    try:
        fjs(sample)
    except fastjsonschema.JsonSchemaValueException as err:
        print(f"  fastjsonschema: path {err.path!r} rule {err.rule!r}: {err.message} "
              "(the first error only)")

    print(f"\ncatastrophic pattern ^(a+)+$ on {len(HOSTILE)} characters:")
    hostile = {"type": "string", "pattern": "^(a+)+$"}
    rs_hostile = jsonschema_rs.validator_for(hostile)
    print("  jsonschema-rs (Rust regex, linear time):", hostile_seconds(rs_hostile.is_valid))
    fjs_hostile = fastjsonschema.compile(hostile)

    def fjs_check(s):
        try:
            fjs_hostile(s)
            return True
        except fastjsonschema.JsonSchemaValueException:
            return False

    short = "a" * 24 + "!"
    start = time.perf_counter()
    fjs_check(short)
    spent = time.perf_counter() - start
    print(f"  fastjsonschema (Python re, backtracking): {spent:.2f} s on {len(short)} characters, "
          "doubling with each one more")
    return 0


if __name__ == "__main__":
    sys.exit(main())
