"""An ordered, memory-bounded parallel map over worker processes, for the data tools.

Workers come from a fork server that imports torch/basicsr once (``spawn`` would import them in
every worker; plain ``fork`` would copy a parent whose OpenMP threads may already have run, which
is not fork-safe). Each worker uses one torch thread: one process per core. Workers ignore Ctrl-C (the
parent reports it once) and end within a second of the parent's death, even a SIGKILL (a worker watches the
parent's pid: its own parent is the fork server, which does not notice). A worker that the fork server is
still starting when the parent exits can still print a traceback of its own (issue 13, open).
"""
from __future__ import annotations

import multiprocessing
import os
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Callable, Iterable, Iterator, Optional, TypeVar

T = TypeVar('T')
R = TypeVar('R')


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


def _context(preload: list[str]) -> multiprocessing.context.BaseContext:
    try:
        context = multiprocessing.get_context('forkserver')
    except ValueError:  # no fork server on this platform (Windows)
        return multiprocessing.get_context('spawn')
    context.set_forkserver_preload(preload)
    return context


def process_map(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: Optional[int] = None) -> Iterator[R]:
    """``map(fn, items)`` in input order, in ``workers`` processes (0: in this process).

    At most ``ahead`` (default ``2 * workers``) results are pending, so memory holds only a few
    items' results at a time. ``fn`` must be picklable (a module-level function or class instance).
    """
    if workers <= 0:
        yield from map(fn, items)
        return
    preload = [getattr(fn, '__module__', type(fn).__module__), 'basicsr.utils.matlab_functions']
    pending: deque[Future] = deque()
    with ProcessPoolExecutor(
            workers, mp_context=_context(preload), initializer=_worker_init, initargs=(os.getpid(), )) as pool:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= (ahead or 2 * workers):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
