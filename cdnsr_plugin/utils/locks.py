"""One lock per thing a run writes: an experiment, a tester ``--out``, a prepared data set.

A run takes the lock before it writes anything and keeps it until it ends. The lock is an OS file lock
(``flock``) on a small file beside the thing (``<path>.lock``) that holds who took it (pid, host, command,
start time) and a marker saying these tools wrote it:

* a second run on the same thing fails at once with ``Busy``, naming the first run's process and command;
* the OS drops the lock when the holder dies, even on SIGKILL: the next run takes it over and says so once
  ("taking over the lock of process N, which is no longer running");
* a file at the lock's path that these tools did not write (no marker) is never used, changed or removed:
  ``ForeignFile`` asks the user to move it.

Why ``flock`` and not a pid file alone: a pid can be reused after a crash and a pid file cannot tell a
dead holder from a live one on another mount; the OS lock can, and the pid in the file is only there to
name the holder in messages.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Optional

MARKER = 'cdnsr_plugin lock'
_held: dict[Path, 'RunLock'] = {}  # lock path -> the lock this process holds on it


class Busy(FileExistsError):
    """Another live run holds the lock (a ``FileExistsError``, so the tools' one-line handlers report it)."""


class ForeignFile(FileExistsError):
    """A file these tools did not write sits where the lock file goes; it is left alone."""


def lock_path(target: Path | str) -> Path:
    """``<target>.lock`` beside ``target`` (a folder or a file that the run will write)."""
    target = Path(target)
    return target.with_name(target.name + '.lock')


def _describe(info: dict) -> str:
    command = info.get('command') or '?'
    if len(command) > 160:
        command = command[:157] + '...'
    host = info.get('host')
    where = f' on {host}' if host and host != socket.gethostname() else ''
    since = info.get('started')
    when = f', started {since}' if since else ''
    return f"process {info.get('pid', '?')}{where} ({command}{when})"


def _read(handle) -> Optional[dict]:
    """The lock file's content if these tools wrote it, else None."""
    handle.seek(0)
    text = handle.read()
    try:
        info = json.loads(text)
    except ValueError:
        return None
    return info if isinstance(info, dict) and info.get('tool') == MARKER else None


class RunLock:
    """An exclusive lock on ``<target>.lock`` (see the module docstring). Use as a context manager, or call
    ``acquire``/``release``; ``release`` removes the lock file."""

    def __init__(self, target: Path | str, what: str = 'output', hint: str = 'pick another one'):
        self.target = Path(target)
        self.path = lock_path(self.target)
        self.what = what
        self.hint = hint
        self._handle = None

    @property
    def held(self) -> bool:
        return self._handle is not None

    def acquire(self, log: Callable[[str], None] = print) -> 'RunLock':
        """Take the lock or raise ``Busy`` / ``ForeignFile``. A lock this process already holds on the same
        target (an earlier attempt that failed before releasing it) is released and taken again.

        The lock file appears at its path already holding its content (written under a temporary name, then
        linked or renamed into place), so a run killed or interrupted while taking the lock never leaves an
        empty or half-written lock file, which every later run would take for a file that is not the tools'."""
        if self.held:
            return self
        earlier = _held.get(self.path.absolute())
        if earlier is not None:  # this process's own earlier run on the same target (one that failed): superseded
            earlier.release()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):  # retried only when the file was replaced between open and lock (another run's release)
            try:
                fd = os.open(self.path, os.O_RDWR)
            except FileNotFoundError:
                handle = self._create()
                if handle is None:  # another run created it first: look at theirs
                    continue
            else:
                handle = self._take_over(os.fdopen(fd, 'r+'), log)
                if handle is None:
                    continue
            self._handle = handle
            _held[self.path.absolute()] = self
            return self
        raise Busy(f'could not take the lock {self.path}: other runs keep replacing it; try again')

    def _content(self) -> str:
        return json.dumps({
            'tool': MARKER,
            'pid': os.getpid(),
            'host': socket.gethostname(),
            'command': ' '.join(sys.argv),
            'started': time.strftime('%Y-%m-%d %H:%M:%S'),
            'target': str(self.target),
        })

    def _staged(self) -> tuple:
        """A new, locked file beside the lock holding this run's content, and its temporary path."""
        tmp = self.path.with_name(f'.{self.path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp')
        handle = os.fdopen(os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), 'r+')
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else knows the file: never blocks
            handle.write(self._content())
            handle.flush()
        except BaseException:
            handle.close()
            tmp.unlink()
            raise
        return handle, tmp

    def _create(self):
        """Put a new lock file at the path; ``None`` if another run put one there first."""
        handle, tmp = self._staged()
        try:
            os.link(tmp, self.path)  # atomic, and fails if the path exists
        except FileExistsError:
            handle.close()
            return None
        except OSError as exc:  # a file system without hard links: create the file, then write into it
            handle.close()
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            return self._create_in_place()
        except BaseException:
            handle.close()
            raise
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return handle

    def _create_in_place(self):
        try:
            handle = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), 'r+')
        except FileExistsError:
            return None
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.write(self._content())
        handle.flush()
        return handle

    def _take_over(self, handle, log: Callable[[str], None]):
        """Lock the existing lock file ``handle`` and replace it with this run's; ``Busy`` if its run is alive,
        ``ForeignFile`` if these tools did not write it, ``None`` if it was replaced meanwhile (try again)."""
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            info = _read(handle)
            handle.close()
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            if info is None:
                raise ForeignFile(self._foreign_message()) from None
            raise Busy(f'another run is writing the {self.what} {self.target}: {_describe(info)} holds '
                       f'{self.path}; wait for it to finish or {self.hint}') from None
        try:
            try:
                same = os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder released (and removed) the file while we opened it: start again
                return None
            info = _read(handle)
            if info is None:
                raise ForeignFile(self._foreign_message())
            new, tmp = self._staged()
            try:
                os.replace(tmp, self.path)  # the old holder's file is never emptied: it is replaced whole
            except BaseException:
                new.close()
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
        finally:
            handle.close()
        log(f'note: taking over the lock on the {self.what} {self.target} left by {_describe(info)}, '
            'which is no longer running')
        return new

    def _foreign_message(self) -> str:
        return (f'{self.path} exists and was not written by these tools (it is not a lock of theirs); it is left '
                f'as it is: move or delete it yourself, or {self.hint}')

    def release(self) -> None:
        handle, self._handle = self._handle, None
        if handle is None:
            return
        _held.pop(self.path.absolute(), None)
        with contextlib.suppress(OSError):
            if os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        handle.close()

    def __enter__(self) -> 'RunLock':
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def owned_by_tools(path: Path | str) -> bool:
    """Whether ``path`` is a lock file these tools wrote (used before removing anything named ``*.lock``)."""
    try:
        with open(path) as handle:
            return _read(handle) is not None
    except (OSError, UnicodeDecodeError):
        return False
