"""Triton kernel compilations while a block of code runs.

Triton compiles a kernel once per specialisation: besides its constexprs, an integer argument
equal to 1 or divisible by 16, and a pointer aligned to 16 bytes, each give another binary. A step
shape first met inside a timed run (an eager step of a size no warm-up took) compiles there, and
the seconds it takes land in the throughput figure. ``CompileLog`` hooks Triton's JIT cache to
record every compilation (kernel, cache key, seconds) so a benchmark can show them. A binary
Triton finds in its disk cache is recorded too, with the fraction of a second the load takes.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

try:
    from triton import knobs
except ImportError:  # no Triton, or one older than its knobs: nothing to hook
    knobs = None


@dataclass
class Compilation:
    kernel: str
    cache_key: str
    seconds: float


@dataclass
class CompileLog:
    """Context manager; ``available`` is False when this Triton has no JIT hooks."""

    compilations: list[Compilation] = field(default_factory=list, init=False)
    _started: dict[Any, tuple[float, str, str]] = field(default_factory=dict, init=False)
    _previous: tuple[Any, Any] = field(default=(None, None), init=False)

    @property
    def available(self) -> bool:
        runtime = getattr(knobs, "runtime", None)
        return hasattr(runtime, "jit_cache_hook") and hasattr(runtime, "jit_post_compile_hook")

    def __enter__(self) -> CompileLog:
        if self.available:
            runtime = knobs.runtime
            self._previous = (runtime.jit_cache_hook, runtime.jit_post_compile_hook)
            runtime.jit_cache_hook = self.before_compile
            runtime.jit_post_compile_hook = self.after_compile
        return self

    def __exit__(self, *exc: object) -> None:
        if self.available:
            knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = self._previous

    def before_compile(self, *, key: Any, repr: str, fn: Any, **kwargs: Any) -> bool | None:
        """Triton calls this before it compiles (or loads from its disk cache) a kernel it has
        no binary of in memory; a true return would skip the compilation, so chain the hook
        this one replaced and return what it says."""
        kernel = getattr(fn, "name", str(fn))
        # the cache key spells out each argument's specialisation (type, divisibility, value)
        self._started[_hashable(key)] = (time.perf_counter(), kernel, str(key))
        previous = self._previous[0]
        return previous(key=key, repr=repr, fn=fn, **kwargs) if previous else None

    def after_compile(self, *, key: Any, **kwargs: Any) -> bool | None:
        started = self._started.pop(_hashable(key), None)
        if started is not None:
            begun, kernel, cache_key = started
            self.compilations.append(Compilation(kernel, cache_key, time.perf_counter() - begun))
        previous = self._previous[1]
        return previous(key=key, **kwargs) if previous else None

    def summary(self) -> dict[str, Any]:
        """Counts and seconds per kernel, and each compilation's cache key."""
        return {
            "available": self.available,
            "compilations": len(self.compilations),
            "seconds": sum(c.seconds for c in self.compilations),
            "per_kernel": dict(Counter(c.kernel for c in self.compilations)),
            "cache_keys": [c.cache_key for c in self.compilations],
        }


def _hashable(key: Any) -> Any:
    """Triton's cache keys are nested tuples, sometimes holding lists or dicts."""
    try:
        hash(key)
    except TypeError:
        return repr(key)
    return key
