"""Ctrl-C in the data tools: short steps that must run to their end, and Ctrl-Cs that library code swallowed.

``tools/prepare_data.py`` and ``tools/make_test_sets.py`` install their SIGINT handler before they import anything
heavy; it raises ``KeyboardInterrupt`` and sets its ``interrupted`` attribute. A ``KeyboardInterrupt`` that some
library swallows (a bare ``except:`` around an optional import) would otherwise let the run go on to a complete
output and exit 0; ``interrupt_pending`` tells ``staging.finish_output`` that a Ctrl-C came, so it finishes
nothing.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


def interrupt_pending() -> bool:
    """Whether the process's SIGINT handler says a Ctrl-C came (the tools' handlers have ``interrupted``)."""
    return bool(getattr(signal.getsignal(signal.SIGINT), 'interrupted', False))


@contextlib.contextmanager
def deferred_sigint() -> Iterator[None]:
    """Hold a Ctrl-C back while the block runs (renames, stopping workers; short steps that leave things
    half-done when cut), then deliver it to the handler that was in place: at most a moment's delay, never lost.
    Outside the main thread (where Python runs signal handlers) the block runs as it is."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:  # None: not set from Python
        yield
        return
    caught = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(signal.SIGINT, None)  # raises KeyboardInterrupt (Python's handler, or the tool's)
        elif caught and previous == signal.SIG_DFL:
            signal.raise_signal(signal.SIGINT)
