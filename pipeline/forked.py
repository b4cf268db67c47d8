"""One answer from a forked child, the pattern the bootstrap's deferred walk
(envmanifest.DeferredWalk) and the early bundle check (runner/bundlecheck.py) share.

Standard library only: the bootstrap uses it before site-packages has been checked.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from collections.abc import Callable


def may_fork() -> bool:
    """Only a single-threaded process forks here: a thread holding a lock at the fork (the
    import lock, a logging handler's) would leave the child stuck on it."""
    threads = sys.modules.get("threading")
    return threads is None or threads.active_count() == 1


def start(work: Callable[[], bytes]) -> tuple[int, int] | None:
    """(pid, descriptor to read the answer from) of a child that writes what `work` returns
    and exits without any cleanup (exit status 1 when `work` raised); None when no pipe or
    child can be had (EMFILE, EAGAIN under a process limit, ENOMEM)."""
    try:
        read, write = os.pipe()
    except OSError:
        return None
    try:
        pid = os.fork()
    except OSError:
        os.close(read)
        os.close(write)
        return None
    if pid == 0:
        code = 1
        try:
            os.close(read)
            view = memoryview(work())
            while view:
                view = view[os.write(write, view) :]
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    return pid, read


def read_answer(fd: int, limit: int, timeout: float | None = None) -> bytes | None:
    """What the child wrote, read to its end; None when it is over `limit` bytes or not
    complete within `timeout` seconds (None: as long as it takes). The caller closes `fd`."""
    data = b""
    deadline = None if timeout is None else time.monotonic() + timeout
    while len(data) <= limit:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
        chunk = os.read(fd, 65536)
        if not chunk:
            return data
        data += chunk
    return None


def reap(pid: int, *, kill: bool = False) -> int:
    """The child's wait status (-1 when it is not this process's to wait for), after a
    SIGKILL with `kill`."""
    if kill:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return -1
