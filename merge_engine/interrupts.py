"""Ctrl-C and SIGTERM become exceptions, raised only where raising is safe.

Python runs a signal handler in the main thread between any two bytecodes. An exception raised from
the handler can therefore land inside a thread pool's bookkeeping, a lock's acquire/release pair or a
library's own cleanup, and leave a lock held or a worker thread waiting forever: a merge that hangs
after SIGTERM instead of cleaning up. Blocking the signals with pthread_sigmask does not help either,
because the kernel then delivers them to another thread and Python still runs the handler in the
main thread at the next bytecode.

So the handler only records the signal while a `deferred()` region is active; inside one, the code
calls `check()` at the points it chooses (between tensors), and the region raises what arrived
during it when it ends. Outside any region the handler raises at once, as Python's default
Ctrl-C does, so single-threaded work (planning, reading a config) stops immediately.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same cleanup runs."""


class _State:
    def __init__(self) -> None:
        self.received: int | None = None  # the last signal seen, for the caller's message
        self.pending = False  # received and not yet raised
        self.depth = 0  # nested deferred() regions in the main thread


_state = _State()


def _exception(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _handler(signum: int, frame: FrameType | None) -> None:
    _state.received = signum
    _state.pending = True
    if _state.depth == 0:
        check()


def check() -> None:
    """Raise the signal received since the last raise (KeyboardInterrupt, or Terminated for SIGTERM)."""
    if _state.pending and _state.received is not None:
        _state.pending = False
        raise _exception(_state.received)


def received() -> int | None:
    """The last SIGINT/SIGTERM received while handled here, or None."""
    return _state.received


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold signals back (recorded, not raised) until check() or the end of the block. A no-op outside
    the main thread, where Python never runs signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
    if _state.depth == 0:
        check()


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Install the handler for SIGINT and SIGTERM for the duration of the block (main thread only;
    elsewhere the process's handlers are left alone), restoring the previous ones after."""
    previous: dict[signal.Signals, object] = {}
    for sig in SIGNALS:
        with contextlib.suppress(ValueError):  # not the main thread
            previous[sig] = signal.signal(sig, _handler)
    _state.received, _state.pending = None, False
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
