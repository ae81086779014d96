"""The kernel options this process runs with: the engine config's `KernelOptions`, installed by
the worker when it is built.

Every executor builds its workers from the engine config (in this process, in a Ray actor, or in
an engine core's own process), so the options set on the driver reach each of them; the kernels
and the sampler read `current()` when they run. A process runs with the options of the last
worker built in it; tests and kernel benchmarks that call kernels directly use `override`.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

from pagedray.common.config import KernelOptions

_current = KernelOptions()


def current() -> KernelOptions:
    return _current


def install(options: KernelOptions) -> None:
    global _current
    _current = options


@contextlib.contextmanager
def override(**changes) -> Iterator[KernelOptions]:
    """The current options with `changes` (KernelOptions fields) for the body of a `with`."""
    saved = _current
    install(dataclasses.replace(saved, **changes))
    try:
        yield _current
    finally:
        install(saved)
