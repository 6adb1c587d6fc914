"""Imported only by the fork server of ``parallel.process_map`` (its first preload), never by the tools.

A worker that the fork server forks while the tool is already going away (Ctrl-C, an error) cannot read its
start-up data: the pipe is closed (``EOFError``) or the queue's semaphores are gone (``FileNotFoundError``). The
fork server reports such a failure with ``sys.excepthook``, which printed a traceback after the tool's one-line
message. The tool notices a worker that could not start by itself (``BrokenProcessPool``), so these failures end
silently; any other exception is printed as before.
"""
import sys


def _quiet_start_failures(kind, value, traceback) -> None:
    if issubclass(kind, (EOFError, OSError)):
        return
    sys.__excepthook__(kind, value, traceback)


sys.excepthook = _quiet_start_failures
