"""
Tests for L{estat._compiled}: which of a hot module's two builds is loaded,
and that every way a compiled build can be missing or wrong ends in the
pure-Python source (with one log line), never in a failed import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from estat import _compiled
from estat._compiled import MANIFEST, MODULES, CompiledFinder, source_digest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUFFIX = __import__("importlib.machinery").machinery.EXTENSION_SUFFIXES[0]


class FinderTests(SynchronousTestCase):
    """
    L{CompiledFinder} on a package of its own in a temporary directory:
    C{fakepkg.hot} has a source, and an "extension" the test writes.
    """

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", self.dir]))
        package = os.path.join(self.dir, "fakepkg")
        os.mkdir(package)
        open(os.path.join(package, "__init__.py"), "w").close()
        self.source = os.path.join(package, "hot.py")
        with open(self.source, "w") as f:
            f.write("WHICH = 'source'\n")
        self.extension = os.path.join(package, "hot" + SUFFIX)
        self.manifest = os.path.join(self.dir, "manifest.json")
        sys.path.insert(0, self.dir)
        self.addCleanup(sys.path.remove, self.dir)
        self.addCleanup(lambda: [sys.modules.pop(n, None) for n in ("fakepkg", "fakepkg.hot")])
        self.logged: list = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def load(self, pure: bool = False):
        finder = CompiledFinder(modules=("fakepkg.hot",), manifest=self.manifest, pure=pure)
        sys.meta_path.insert(0, finder)
        self.addCleanup(sys.meta_path.remove, finder)
        sys.modules.pop("fakepkg.hot", None)
        import fakepkg.hot

        return fakepkg.hot

    def warnings(self) -> list:
        return [e for e in self.logged if e.get("log_namespace") == "estat.compiled"]

    def write_manifest(self) -> None:
        with open(self.manifest, "w") as f:
            json.dump({"fakepkg.hot": source_digest(self.source)}, f)

    def test_not_built(self):
        """
        No extension: the source, and one log line.
        """
        self.assertEqual(self.load().WHICH, "source")
        self.assertEqual(len(self.warnings()), 1)
        self.assertEqual(_compiled.loaded()["fakepkg.hot"], "not built")

    def test_broken_extension(self):
        """
        An extension that cannot be loaded (here: not a shared object at
        all; a build for another Python is the same): the source, one line.
        """
        with open(self.extension, "wb") as f:
            f.write(b"not an ELF file")
        self.write_manifest()
        module = self.load()
        self.assertEqual(module.WHICH, "source")
        self.assertEqual(module.__file__, self.source)
        [warning] = self.warnings()
        self.assertIn("cannot be loaded", warning["log_format"])
        self.assertTrue(_compiled.loaded()["fakepkg.hot"].startswith("extension not loadable"))

    def test_stale_extension(self):
        """
        An extension built from another version of the source (no digest,
        or a different one): the source, one line, and the extension is
        never opened.
        """
        with open(self.extension, "wb") as f:
            f.write(b"never read")
        with open(self.manifest, "w") as f:
            json.dump({"fakepkg.hot": "0" * 64}, f)
        self.assertEqual(self.load().WHICH, "source")
        [warning] = self.warnings()
        self.assertIn("another version", warning["log_format"])

    def test_pure(self):
        """
        C{ESTAT_PURE=1}: the source, silently, even with a good build.
        """
        with open(self.extension, "wb") as f:
            f.write(b"never read")
        self.write_manifest()
        self.assertEqual(self.load(pure=True).WHICH, "source")
        self.assertEqual(self.warnings(), [])
        self.assertEqual(_compiled.loaded()["fakepkg.hot"], "ESTAT_PURE=1")

    def test_extension_failing_at_import(self):
        """
        An extension that loads but raises while it runs its module code
        (as a compiled module did when zope.interface refused its
        compiled methods): the source is run into the module instead, with
        one log line.
        """
        from estat._compiled import _FallbackLoader

        class Failing:
            name = "fakepkg.hot"

            def create_module(self, spec):
                return None

            def exec_module(self, module):
                raise TypeError("Concrete attribute, admit")

        import importlib.util
        import types

        loader = _FallbackLoader(Failing(), self.source)
        spec = importlib.util.spec_from_loader("fakepkg.hot", loader)
        self.assertIsNone(loader.create_module(spec))
        module = types.ModuleType("fakepkg.hot")
        loader.exec_module(module)
        self.assertEqual(module.WHICH, "source")
        self.assertEqual(module.__file__, self.source)
        [warning] = self.warnings()
        self.assertIn("failed as it was imported", warning["log_format"])
        self.assertIn("Concrete attribute", _compiled.loaded()["fakepkg.hot"])

    def test_other_modules_untouched(self):
        finder = CompiledFinder(modules=("fakepkg.hot",), manifest=self.manifest)
        self.assertIsNone(finder.find_spec("json", None))


def _which(environ: dict) -> dict:
    code = ("import json, estat._compiled as c, estat.http.protocol, estat.ingest.core;"
            "print(json.dumps({m: __import__('sys').modules[m].__file__ for m in c.MODULES}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environ,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


class BuildTests(SynchronousTestCase):
    """
    This checkout's own build, in fresh interpreters.
    """

    def test_pure_environment(self):
        """
        C{ESTAT_PURE=1} loads every hot module from its C{.py}.
        """
        files = _which(dict(os.environ, ESTAT_PURE="1"))
        self.assertEqual(sorted(files), sorted(MODULES))
        for name, path in files.items():
            self.assertTrue(path.endswith(".py"), (name, path))

    def test_compiled_when_built(self):
        """
        Once C{setup.py build_ext --inplace} has run (C{make test} runs it
        first), every hot module loads compiled: the build is not silently
        pure Python.
        """
        if os.environ.get("ESTAT_PURE") == "1":
            raise self.skipTest("the pure-Python run")
        if not os.path.exists(MANIFEST):
            raise self.skipTest("not built here (no estat/_compiled.json)")
        with open(MANIFEST) as f:
            built = json.load(f)
        self.assertEqual(sorted(built), sorted(MODULES),
                         "the build did not compile every hot module")
        environ = {k: v for k, v in os.environ.items() if k != "ESTAT_PURE"}
        for name, path in _which(environ).items():
            self.assertTrue(path.endswith(SUFFIX), (name, path))

    def test_core_falls_back_when_metrics_is_not_compiled(self):
        """
        The compiled ingest core uses the compiled counters of
        L{estat.metrics} as C structs: when L{estat.metrics} runs from its
        source (edited since the build), the core's extension cannot load,
        and the core runs from its source too, with a log line; the server
        still answers.  (A copy of the built package in a temporary
        directory, its C{metrics.py} edited.)
        """
        if os.environ.get("ESTAT_PURE") == "1":
            raise self.skipTest("the pure-Python run")
        if not os.path.exists(MANIFEST):
            raise self.skipTest("not built here (no estat/_compiled.json)")
        copy = tempfile.mkdtemp()
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", copy]))
        subprocess.run(["cp", "-r", os.path.join(ROOT, "estat"), copy], check=True)
        with open(os.path.join(copy, "estat", "metrics.py"), "a") as f:
            f.write("\n# edited after the build\n")
        code = (
            "import json, sys\n"
            "from twisted.logger import globalLogBeginner, textFileLogObserver\n"
            "globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])\n"
            "import estat._compiled as c\n"
            "from estat.ingest.core import IngestCore, IngestRequest\n"
            "from estat.ingest.admission import WaitingQueueAdmission\n"
            "from estat.metrics import Metrics\n"
            "from estat.queue import EventQueue\n"
            "from prometheus_client import CollectorRegistry\n"
            "from twisted.internet.task import Clock\n"
            "clock, metrics, queue = Clock(), Metrics(CollectorRegistry()), EventQueue(10)\n"
            "core = IngestCore(admission=WaitingQueueAdmission(queue, clock, metrics),\n"
            "                  metrics=metrics, clock=clock)\n"
            "answer = core.handle(IngestRequest(b'POST', b'/collect', b'', {},\n"
            "                     b'{\"event\":\"x\"}', '192.0.2.1', 1.0), None)\n"
            "sys.__stdout__.write(json.dumps([answer.status, len(queue),\n"
            "    metrics.http_requests.value, sys.modules['estat.ingest.core'].__file__,\n"
            "    c.loaded()]) + '\\n')\n")
        environ = {k: v for k, v in os.environ.items() if k != "ESTAT_PURE"}
        environ["PYTHONPATH"] = copy
        out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=environ,
                             capture_output=True, text=True, check=True)
        status, queued, requests, core_file, chosen = json.loads(
            out.stdout.strip().splitlines()[-1])
        self.assertEqual((status, queued, requests), (202, 1, 1))
        self.assertTrue(core_file.startswith(copy) and core_file.endswith("core.py"), core_file)
        self.assertEqual(chosen["estat.metrics"], "stale: the source changed since the build")
        self.assertIn("extension failed at import", chosen["estat.ingest.core"])
        self.assertIn("estat.ingest.core: the compiled extension failed", out.stderr)
