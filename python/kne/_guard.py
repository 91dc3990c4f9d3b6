"""Helpers for state changes that must be all-or-nothing.

:func:`deferred_interrupt` holds a Ctrl-C (SIGINT) that arrives inside a block -- a rollback, say --
until the block has finished, then delivers it as the ``KeyboardInterrupt`` it would have been. A
write that is rolled back can therefore not be interrupted half-way through its undo.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, List


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold SIGINT until the block ends, then deliver it (with the handler that was installed before).

    Only the main thread of the main interpreter receives signals in Python; elsewhere (and where the
    handler cannot be replaced) this is a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: List[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except (ValueError, OSError):  # not the main interpreter, or signals unavailable
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, None)  # default_int_handler raises KeyboardInterrupt
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt
            # SIG_IGN: the caller ignores Ctrl-C; so do we
