# -*- test-case-name: estat.test.test_schema_reloader -*-
"""
Reloading the tracking plan on C{SIGHUP}: the plan is read and compiled in
a worker thread, then swapped in on the reactor thread between two
requests, so no connection or event in flight is touched.  A plan that
does not load leaves the running one in place, with a log line saying why.

It never reads or compiles a plan on the reactor thread.
"""

from __future__ import annotations

from typing import Callable

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ..metrics import Metrics
from .plan import PlanError, load_plan

__all__ = ["PlanReloader"]


@attr.s(eq=False)
class PlanReloader(Service):
    """
    @ivar path: the plan file (C{SCHEMAS}).
    @ivar validation: the L{estat.ingest.validation.EventValidation} whose
        plan is replaced.
    @ivar run_in_thread: C{deferToThreadPool}-like.
    @ivar on_signal: installs a callable to run on the reactor thread at
        each C{SIGHUP} (and returns a callable that uninstalls it).
    """

    log = Logger()

    path: str = attr.ib()
    validation = attr.ib()
    metrics: Metrics = attr.ib()
    run_in_thread: Callable = attr.ib()
    on_signal: Callable = attr.ib()
    load: Callable = attr.ib(default=load_plan)
    _uninstall: Callable | None = attr.ib(default=None, init=False)
    _loading: Deferred | None = attr.ib(default=None, init=False)
    _again: bool = attr.ib(default=False, init=False)

    def startService(self) -> None:
        Service.startService(self)
        self._uninstall = self.on_signal(self.reload)

    def stopService(self):
        Service.stopService(self)
        if self._uninstall is not None:
            self._uninstall()
            self._uninstall = None
        return self._loading

    def reload(self) -> Deferred | None:
        """
        Load the plan again; a signal that comes during a load runs one
        more load after it (so the last edit always wins).
        """
        if self._loading is not None:
            self._again = True
            return self._loading
        self.log.info("SIGHUP: reloading the tracking plan {path}", path=self.path)
        d = self.run_in_thread(self.load, self.path)
        d.addCallbacks(self._loaded, self._failed)
        d.addBoth(self._done)
        self._loading = d
        return d

    def _loaded(self, plan) -> None:
        self.validation.replace(plan)
        self.metrics.schema_plan_reloads.labels("loaded").inc()
        self.log.info("tracking plan {path} loaded", path=self.path)

    def _failed(self, failure) -> None:
        self.metrics.schema_plan_reloads.labels("failed").inc()
        if failure.check(PlanError):
            self.log.error("tracking plan not reloaded, the running plan is kept: {reason}",
                           reason=str(failure.value))
        else:
            self.log.failure("tracking plan not reloaded, the running plan is kept",
                             failure)

    def _done(self, _) -> None:
        self._loading = None
        if self._again:
            self._again = False
            self.reload()
