"""Builds the compiled HTTP/1 accounting (agent/proxy/http1_framer.pyx); everything else is in
pyproject.toml. The extension is optional: without Cython or a C compiler the build goes on
without it and the agent counts requests with the pure-Python accounting (agent/proxy/http1.py),
which costs more CPU per request (README, "Benchmarks")."""

from __future__ import annotations

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """A failed compile is a warning, not a failed install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler at all
            self.warn(f"meshagent: compiled HTTP accounting not built ({exc}); using the Python one")

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # a compiler, but the build failed (no Python headers, say)
            self.warn(f"meshagent: {ext.name} not built ({exc}); using the Python accounting")


def extensions() -> list[Extension]:
    try:
        from Cython.Build import cythonize
    except ImportError:
        return []
    return cythonize(
        [Extension("agent.proxy.http1_framer", ["agent/proxy/http1_framer.pyx"])],
        quiet=True,
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
