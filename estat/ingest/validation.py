# -*- test-case-name: estat.test.test_ingest_validation -*-
"""
The tracking plan's rules at the edge: each event of a request is checked
against its schema (L{estat.schema.plan}) as the client sent it, and
sorted by its mode into good events, events to flag, events to quarantine
as bad rows, and reasons to refuse the whole request.

Both the C{/collect} core and the Segment routes use one
L{EventValidation}, so a plan reloaded on C{SIGHUP} (L{replace}) applies
to both at once, between two requests.

Nothing here does I/O or touches the reactor.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import attr
from twisted.logger import Logger

from ..event import make_line
from ..metrics import Metrics
from ..schema.plan import Plan, SchemaCheck

__all__ = ["EventValidation", "Sorting", "MAX_ANSWER_ERRORS", "bad_row", "admit_both"]

#: Errors a 400 names, in all, whatever the number of events or errors.
MAX_ANSWER_ERRORS = 10
#: The kind of a bad row (the C{bad_row} field).
SCHEMA_VIOLATION = "schema_violation"


class Sorting(NamedTuple):
    """
    What the plan says about a request's events, when any failed.

    @ivar rejected: the 400's C{errors} (at most L{MAX_ANSWER_ERRORS}), or
        empty when the request is not refused.
    @ivar quarantined: C{{index: SchemaCheck}} of events to store as bad rows.
    @ivar flagged: C{{index: SchemaCheck}} of events to store with their errors.
    """

    rejected: list
    quarantined: dict
    flagged: dict


def errors_field(check: SchemaCheck) -> list:
    return [e.as_dict() for e in check.errors]


def bad_row(stream: str, check: SchemaCheck, payload, server_fields: dict,
            kind: str | None = None):
    """
    The line of a quarantined event (see docs/schemas.md): the event whole
    and unchanged under C{payload}, why it failed, then C{_estat}.

    @param kind: a Segment message's type as its route gave it (a
        C{/v1/track} body may leave C{type} out), so that the message can
        be re-validated and stored later (C{estat-badrows resubmit}).
    """
    row = {
        "bad_row": SCHEMA_VIOLATION,
        "stream": stream,
        "schema": check.schema,
        "errors": errors_field(check),
        "errors_total": check.total,
        "payload": payload,
    }
    if kind is not None:
        row["type"] = kind
    return make_line(row, server_fields, None)


def admit_both(good_admission, good: list, bad_admission, bad: list,
               done: Callable) -> None:
    """
    Admit C{good} and C{bad} (each to its own stream) at once; C{done} is
    called once, when both are admitted (C{None}) or with the first
    refusal.

    A refused request is retried by its client, so what one stream took
    would be stored twice: both admissions are asked first whether they
    have room (C{refusal_for}, on the reactor thread, so nothing takes the
    room between the question and the offers), and a request one of them
    would refuse goes to neither.  What remains is a write-ahead log that
    fails or fills between the two (C{ACK_MODE=disk}): documented.
    """
    if not bad:
        good_admission.admit(good, done)
        return
    if not good:
        bad_admission.admit(bad, done)
        return
    for admission, events in ((good_admission, good), (bad_admission, bad)):
        check = getattr(admission, "refusal_for", None)
        refusal = check(len(events)) if check is not None else None
        if refusal is not None:
            done(refusal)
            return
    state = {"waiting": 2, "refusal": None}

    def one(refusal) -> None:
        if refusal is not None and state["refusal"] is None:
            state["refusal"] = refusal
        state["waiting"] -= 1
        if state["waiting"] == 0:
            done(state["refusal"])

    bad_admission.admit(bad, one)
    good_admission.admit(good, one)


@attr.s
class EventValidation:
    """
    The running plan and its metrics.

    @ivar plan: the compiled plan, or C{None} (nothing is checked).
    """

    log = Logger()

    plan: Plan | None = attr.ib()
    metrics: Metrics = attr.ib()
    _counters: dict = attr.ib(factory=dict, init=False)

    def replace(self, plan: Plan) -> None:
        """
        Use C{plan} from the next request on.
        """
        self.plan = plan

    def checks(self, stream: str) -> bool:
        plan = self.plan
        return plan is not None and plan.checks(stream)

    def _count(self, stream: str, schema: str, result: str, amount: int = 1) -> None:
        key = (stream, schema, result)
        counter = self._counters.get(key)
        if counter is None:
            counter = self.metrics.schema_events.labels(stream, schema, result)
            if len(self._counters) < 10000:
                self._counters[key] = counter
        counter.inc(amount)

    def sort(self, stream: str, events: list, names: list | None = None) -> Sorting | None:
        """
        Check C{events} (the client's objects, as sent); C{names} are the
        names that pick each one's schema when the caller knows them.

        @return: C{None} when every event is valid or unchecked (the usual
            case: the caller goes on as without a plan), else a L{Sorting}.
        """
        plan = self.plan
        if plan is None:
            return None
        if len(events) == 1:
            # The usual request: one event, valid.
            check = plan.check(stream, events[0], names[0] if names is not None else None)
            if check is None:
                return None
            if not check.total:
                self._count(stream, check.schema, "valid")
                return None
            known = check
        else:
            known = None
        failed = None
        checks = []
        for index, event in enumerate(events):
            if known is not None:
                check = known
            else:
                check = plan.check(stream, event, names[index] if names is not None else None)
            checks.append(check)
            if check is not None and check.total:
                if failed is None:
                    failed = []
                failed.append(index)
        if failed is None:
            for check in checks:
                if check is not None:
                    self._count(stream, check.schema, "valid")
            return None
        errors_metric = self.metrics.schema_errors
        for check in checks:
            if check is not None and check.total:
                for error in check.errors:
                    errors_metric.labels(stream, check.schema, error.keyword).inc()
        rejected = [i for i in failed if checks[i].mode == "reject"]
        if rejected:
            # Nothing of the request is stored: every checked event of it
            # counts as invalid.
            for check in checks:
                if check is not None:
                    self._count(stream, check.schema, "invalid")
            answer = []
            for index in rejected:
                for error in checks[index].errors:
                    if len(answer) == MAX_ANSWER_ERRORS:
                        break
                    answer.append({"index": index, **error.as_dict()})
            return Sorting(answer, {}, {})
        quarantined, flagged = {}, {}
        for index, check in enumerate(checks):
            if check is None:
                continue
            if not check.total:
                self._count(stream, check.schema, "valid")
                continue
            self._count(stream, check.schema, "invalid")
            if check.mode == "quarantine":
                quarantined[index] = check
            else:
                flagged[index] = check
        return Sorting([], quarantined, flagged)
