"""Ctrl-C for the data tools (tools/prepare_data.py, tools/make_test_sets.py): one line and exit 130 at any moment.

Standard library only, so a tool installs the handler before anything heavy is imported (torch takes seconds) and
a Ctrl-C during the imports is never a traceback. ``tools/`` is on ``sys.path`` when a tool runs as a script; the
tools add it themselves when they are loaded as modules (tests).
"""
import signal
import sys
from typing import Callable, Optional


class CtrlC:
    """The SIGINT handler. While ``armed`` it raises ``KeyboardInterrupt``; it always sets ``interrupted``, so a
    Ctrl-C whose ``KeyboardInterrupt`` some library swallowed still ends the run with 130 and no finished output
    (``cdnsr_plugin.preparation.staging.finish_output`` reads it through ``preparation.interrupts``)."""

    def __init__(self) -> None:
        self.interrupted = False
        self.armed = False

    def __call__(self, signum, frame) -> None:
        self.interrupted = True
        if self.armed:
            raise KeyboardInterrupt


def install() -> None:
    signal.signal(signal.SIGINT, CtrlC())


class Program:
    """One tool's run: ``run(main)`` is the program, ``interrupted()`` the one line of a Ctrl-C; ``output`` is the
    run's ``--output`` once known (for that line)."""

    def __init__(self, tool: str) -> None:
        self.tool = tool
        self.output: Optional[object] = None

    def interrupted(self) -> int:
        """Print the one line of a Ctrl-C and return 130; later Ctrl-Cs only count from here on."""
        handler = signal.getsignal(signal.SIGINT)
        if isinstance(handler, CtrlC):
            handler.armed = False
        staging = sys.modules.get('cdnsr_plugin.preparation.staging')
        note = 'nothing was written' if self.output is None or staging is None else staging.interrupted_note(
            self.output)
        print(f'{self.tool}: interrupted; {note}', file=sys.stderr)
        return 130

    def run(self, main: Callable[[], int]) -> int:
        """``main`` as a program: with ``CtrlC`` installed, a Ctrl-C at any moment ends in ``interrupted``."""
        handler = signal.getsignal(signal.SIGINT)
        if not isinstance(handler, CtrlC):
            return main()
        code = None
        try:
            handler.armed = True
            if not handler.interrupted:  # a Ctrl-C before this point was only counted
                code = main()
        except KeyboardInterrupt:
            code = self.interrupted()
        except Exception:
            if not handler.interrupted:
                raise
            code = None  # an error that followed a swallowed Ctrl-C: the Ctrl-C is what to report
        handler.armed = False
        if handler.interrupted and code != 130:
            code = self.interrupted()
        return code
