"""Helpers for state changes that must be all-or-nothing.

:func:`deferred_interrupt` holds a Ctrl-C (SIGINT) that arrives inside a block -- a rollback, say --
until the block has finished, then delivers it as the ``KeyboardInterrupt`` it would have been. A
write that is rolled back can therefore not be interrupted half-way through its undo.
:func:`undo_writes` is that rollback: every weight write of a failed call put back, newest first.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

#: One write to undo: ``(label, weight, dim, index, before)`` -- ``weight[index] = before`` along
#: ``dim`` puts it back (``index`` ``None``: the whole tensor, ``weight.copy_(before)``).
Write = Tuple[str, torch.Tensor, int, Optional[torch.Tensor], torch.Tensor]


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


def undo_writes(done: Sequence[Write], what: str, error: BaseException) -> None:
    """Put back every write in ``done`` (newest first) after ``error`` stopped ``what``; a Ctrl-C
    during the undo waits until it has finished. If a put-back fails, the others still run and a
    ``RuntimeError`` (chained to ``error``) names the weights left partly written; otherwise
    ``error`` gets a note that the call was rolled back."""
    failed = []
    with deferred_interrupt(), torch.no_grad():  # a second Ctrl-C waits until the model is whole again
        for label, weight, dim, index, before in reversed(done):
            try:
                if index is None:
                    weight.copy_(before)
                else:
                    weight.index_copy_(dim, index, before)
            except Exception as e:  # keep undoing the other writes
                failed.append(f"{label} ({type(e).__name__}: {e})")
    if failed:
        raise RuntimeError(f"{what} failed ({type(error).__name__}: {error}) and could not be undone at "
                           f"{', '.join(failed)}: those weights are left partly written; reload the model") from error
    if hasattr(error, "add_note"):
        error.add_note(f"kne: {what} was rolled back; the model is unchanged")
