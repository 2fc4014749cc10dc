"""Builds the compiled HTTP/1 accounting (agent/proxy/http1_framer.pyx), the compiled relay
(agent/proxy/native_relay.pyx) and the certificate-chain verification cache
(agent/proxy/verify_cache.pyx; both need OpenSSL's headers); everything else is in
pyproject.toml. All are optional: without Cython, a C compiler or the headers the build goes on
without them, and the agent counts requests with the pure-Python accounting (agent/proxy/http1.py),
relays in Python (agent/proxy/relay.py) and verifies every peer chain in full, which costs more
CPU per request and per new connection (README, "Benchmarks")."""

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
            self.warn(f"meshagent: {ext.name} not built ({exc}); using its Python counterpart")


def extensions() -> list[Extension]:
    try:
        from Cython.Build import cythonize
    except ImportError:
        return []
    return cythonize(
        [
            Extension("agent.proxy.http1_framer", ["agent/proxy/http1_framer.pyx"]),
            # Links the libssl CPython's _ssl uses (the system's); the relay checks it at attach.
            Extension(
                "agent.proxy.native_relay",
                ["agent/proxy/native_relay.pyx"],
                libraries=["ssl", "crypto"],
            ),
            Extension(
                "agent.proxy.verify_cache",
                ["agent/proxy/verify_cache.pyx"],
                libraries=["ssl", "crypto"],
            ),
        ],
        quiet=True,
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
