import json
import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

#: The modules Cython compiles (estat/_compiled.py loads them, or their
#: source when they are missing or stale).
COMPILED = ("estat.http.protocol", "estat.ingest.core", "estat.metrics", "estat.event")


def _source(module: str) -> str:
    return os.path.join(*module.split(".")) + ".py"


def _digest(path: str) -> str:
    import hashlib

    with open(os.path.join(HERE, path), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class OptionalBuildExt(build_ext):
    """
    Compile the hot modules if Cython and a C compiler are here; if not,
    say so in one line and install pure Python (never a failed install).
    Writes estat/_compiled.json: the digest of each source compiled.
    """

    def run(self):
        try:
            super().run()
        except Exception as e:  # no compiler, a Cython error, ...
            print(f"estat: not compiled ({e}); installing pure Python", file=sys.stderr)
            return
        built = {}
        for ext in self.extensions:
            if os.path.exists(self.get_ext_fullpath(ext.name)):
                built[ext.name] = _digest(_source(ext.name))
        target = os.path.join("estat", "_compiled.json")
        if not self.inplace:
            target = os.path.join(self.build_lib, target)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w") as f:
            json.dump(built, f, indent=1, sort_keys=True)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:
            print(f"estat: {ext.name} not compiled ({e}); it runs as pure Python",
                  file=sys.stderr)


def _extensions() -> list:
    if os.environ.get("ESTAT_PURE") == "1":
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("estat: Cython is not installed; installing pure Python", file=sys.stderr)
        return []
    try:
        return cythonize([_source(m) for m in COMPILED], quiet=True, force=True,
                         compiler_directives={"language_level": 3,
                                              # the .py is plain Python: its annotations
                                              # type nothing; the .pxd declares the C types.
                                              "annotation_typing": False})
    except Exception as e:
        print(f"estat: Cython failed ({e}); installing pure Python", file=sys.stderr)
        return []


# The twistd plugin lives in the twisted.plugins namespace (no __init__.py
# there, on purpose): list it by hand so that `twistd estat` is found after
# a plain `pip install .`.
setup(
    packages=find_packages(include=["estat", "estat.*"]) + ["twisted.plugins"],
    # The .pxd files are the compiled build's C types: an sdist built elsewhere
    # compiles the same.
    package_data={"twisted.plugins": ["estat_plugin.py"], "estat": ["*.json", "*.pxd"],
                  "estat.http": ["*.pxd"], "estat.ingest": ["*.pxd"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
)
