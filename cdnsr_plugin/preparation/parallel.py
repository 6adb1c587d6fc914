"""An ordered, memory-bounded parallel map over worker processes, for the data tools.

Workers come from a fork server that imports torch/basicsr once (``spawn`` would import them in
every worker; plain ``fork`` would copy a parent whose OpenMP threads may already have run, which
is not fork-safe). Each worker uses one torch thread: one process per core. Workers end within a second of the
parent's death, even a SIGKILL (a worker watches the parent's pid: its own parent is the fork server, which does
not notice).

Ctrl-C reaches the whole foreground process group, but only the parent acts on it (one message):

* the fork server is started with SIGINT blocked, so neither it (while it imports torch for seconds) nor the
  workers it forks (which also ignore SIGINT once started) ever see it;
* when the map ends early (Ctrl-C, an error in the caller), the workers are stopped at once instead of finishing
  the tasks queued for them;
* a worker that is still starting when the parent goes away fails to read its start-up data; the fork server
  imports ``forkserver_quiet`` first, which makes such a failure end silently instead of printing a traceback.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Callable, Iterable, Iterator, Optional, TypeVar

from cdnsr_plugin.preparation.interrupts import deferred_sigint

T = TypeVar('T')
R = TypeVar('R')
QUIET = 'cdnsr_plugin.preparation.forkserver_quiet'


def _worker_init(parent: int) -> None:
    import os
    import signal
    import threading
    import time

    import torch
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C: one message, not one per worker

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(parent, 0)
            except ProcessLookupError:  # the parent is gone (killed): nobody will read our results
                os._exit(1)
            except PermissionError:  # alive, owned by someone else (cannot happen for our own parent)
                pass

    threading.Thread(target=watch, daemon=True).start()


def _start_fork_server() -> None:
    """Start the fork server (and the resource tracker) with SIGINT blocked: they and every worker forked from
    the server inherit the blocked signal. A Ctrl-C meanwhile stays pending here and is delivered after."""
    from multiprocessing import forkserver, resource_tracker
    resource_tracker.ensure_running()  # first: it unblocks SIGINT after starting itself
    if not hasattr(signal, 'pthread_sigmask'):
        forkserver.ensure_running()
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _context(preload: list[str]) -> multiprocessing.context.BaseContext:
    try:
        context = multiprocessing.get_context('forkserver')
    except ValueError:  # no fork server on this platform (Windows)
        return multiprocessing.get_context('spawn')
    context.set_forkserver_preload(preload)
    _start_fork_server()
    return context


def _stop(pool: ProcessPoolExecutor) -> None:
    """End a map early: the pool's own thread drops the queued tasks, the workers are stopped now (their results
    are not wanted) instead of finishing them, then the pool's thread is joined."""
    processes = list((getattr(pool, '_processes', None) or {}).values())
    manager = getattr(pool, '_executor_manager_thread', None)
    pool.shutdown(wait=False, cancel_futures=True)  # first: cancelled tasks leave the pool's books before the
    for process in processes:  # workers' deaths mark the rest broken
        with contextlib.suppress(Exception):
            process.terminate()
    if manager is not None:
        manager.join(timeout=30)


def process_map(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: Optional[int] = None) -> Iterator[R]:
    """``map(fn, items)`` in input order, in ``workers`` processes (0: in this process).

    At most ``ahead`` (default ``2 * workers``) results are pending, so memory holds only a few
    items' results at a time. ``fn`` must be picklable (a module-level function or class instance).
    Close the iterator when leaving early (``contextlib.closing``): that stops the workers at once.
    """
    if workers <= 0:
        yield from map(fn, items)
        return
    preload = [QUIET, getattr(fn, '__module__', type(fn).__module__), 'basicsr.utils.matlab_functions']
    pending: deque[Future] = deque()
    pool = ProcessPoolExecutor(
        workers, mp_context=_context(preload), initializer=_worker_init, initargs=(os.getpid(), ))
    complete = False
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= (ahead or 2 * workers):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
        complete = True
    finally:
        with deferred_sigint():
            if complete:
                pool.shutdown(wait=True)
            else:
                _stop(pool)
