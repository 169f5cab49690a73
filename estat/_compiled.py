# -*- test-case-name: estat.test.test_compiled -*-
"""
The compiled build: the hot modules, one source each, compiled by Cython.

Each module named in L{MODULES} is plain Python (its C{.py}), and Cython
compiles that same file into an extension beside it (C{setup.py
build_ext --inplace}, which C{make venv} runs), with the C types of its
hot classes declared in the C{.pxd} of the same name (Cython's
"augmenting .pxd": the C{.py} is not changed by it).

At import, L{install} decides, per module, which of the two is loaded:

 - the extension, when it was built from the C{.py} as it is now (the
   build writes the sources' SHA-256 into C{_compiled.json});
 - the C{.py}, with one log line, when there is no extension (no
   compiler, a failed build), when it was built from another version of
   the source (edited since), or when it cannot be loaded;
 - the C{.py}, silently, when C{ESTAT_PURE=1}: the test suites run both.

Never a crash: the worst case is the pure-Python speed.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys

__all__ = ["MODULES", "MANIFEST", "install", "describe", "loaded"]

#: The modules compiled, and the sources they are built from.
MODULES = ("estat.http.protocol", "estat.ingest.core", "estat.metrics", "estat.event")

HERE = os.path.dirname(os.path.abspath(__file__))
#: Written by the build: {module: SHA-256 of the source it was built from}.
MANIFEST = os.path.join(HERE, "_compiled.json")

#: module -> "compiled" or the reason it is pure Python ("ESTAT_PURE=1", ...)
_CHOSEN: dict = {}


def source_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _log(message: str, **fields) -> None:
    # Imported here: estat/__init__ runs this before anything else.  Early
    # events are buffered by twisted.logger until twistd begins logging.
    from twisted.logger import Logger

    Logger(namespace="estat.compiled").warn(message, **fields)


class _FallbackLoader:
    """
    Loads the extension, or (if it cannot be loaded) the source, with one
    log line.
    """

    def __init__(self, extension, source: str) -> None:
        self.extension = extension
        self.source = importlib.machinery.SourceFileLoader(extension.name, source)
        self.chosen = None

    def create_module(self, spec):
        try:
            module = self.extension.create_module(spec)
        except ImportError as e:
            _CHOSEN[spec.name] = f"extension not loadable: {e}"
            _log("{module}: the compiled extension cannot be loaded ({error}); "
                 "running the pure-Python source", module=spec.name, error=str(e)[:200])
            spec.origin = self.source.path
            self.chosen = self.source
            return None
        _CHOSEN[spec.name] = "compiled"
        self.chosen = self.extension
        return module

    def exec_module(self, module) -> None:
        if self.chosen is self.source:
            self.source.exec_module(module)
            return
        try:
            self.extension.exec_module(module)
        except Exception as e:
            # Built, loadable, but failing as it starts: the source instead.
            name = module.__name__
            _CHOSEN[name] = f"extension failed at import: {e!r}"[:300]
            _log("{module}: the compiled extension failed as it was imported ({error}); "
                 "running the pure-Python source", module=name, error=repr(e)[:200])
            module.__file__ = self.source.path
            self.source.exec_module(module)


class CompiledFinder:
    """
    A C{sys.meta_path} finder for L{MODULES}: see the module docstring.

    @param manifest: the build's record of source digests.
    @param pure: load every source, never an extension.
    """

    def __init__(self, modules=MODULES, manifest: str = MANIFEST, pure: bool = False) -> None:
        self.modules = frozenset(modules)
        self.manifest = manifest
        self.pure = pure
        self._built: dict | None = None
        self._told_not_built = False

    def built(self) -> dict:
        if self._built is None:
            try:
                with open(self.manifest, "rb") as f:
                    self._built = json.load(f)
            except (OSError, ValueError):
                self._built = {}
        return self._built

    def find_spec(self, name, path, target=None):
        if name not in self.modules:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.origin is None:
            return spec
        folder = os.path.dirname(spec.origin)
        source = os.path.join(folder, name.rpartition(".")[2] + ".py")
        if not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            # No extension: a checkout never built, or no compiler.
            _CHOSEN[name] = "not built"
            if not self.pure and not self._told_not_built:
                self._told_not_built = True
                _log("{module} and the other hot modules are not compiled (no build, or "
                     "no compiler when it ran); running pure Python", module=name)
            return spec
        if self.pure:
            _CHOSEN[name] = "ESTAT_PURE=1"
            return importlib.util.spec_from_file_location(name, source)
        if not os.path.exists(source):
            # An installed wheel may ship the extension alone.
            _CHOSEN[name] = "compiled"
            return spec
        if self.built().get(name) != source_digest(source):
            _CHOSEN[name] = "stale: the source changed since the build"
            _log("{module}: the compiled extension was built from another version of "
                 "{source}; running the source (rebuild: make compiled)",
                 module=name, source=source)
            return importlib.util.spec_from_file_location(name, source)
        spec.loader = _FallbackLoader(spec.loader, source)
        return spec


def install(environ=os.environ) -> None:
    """
    Put the finder first on C{sys.meta_path} (once).
    """
    if any(isinstance(f, CompiledFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, CompiledFinder(pure=environ.get("ESTAT_PURE", "") == "1"))


def loaded() -> dict:
    """
    Each compiled module imported so far: C{"compiled"}, or why it runs
    from its source.
    """
    return dict(_CHOSEN)


def describe() -> str:
    """
    One phrase: which build the imported hot modules are.
    """
    for name in MODULES:
        __import__(name)
    chosen = loaded()
    if chosen and all(v == "compiled" for v in chosen.values()):
        return "compiled"
    if all(v != "compiled" for v in chosen.values()):
        return "pure Python"
    return "mixed: " + ", ".join(f"{k} {v}" for k, v in sorted(chosen.items()))
