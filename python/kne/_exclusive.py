"""One model, one state change at a time; forwards in other threads never see a half edit.

Every kne call that hooks a model or writes its weights (``kne.attribute`` / ``kne.locate``,
``kne.fast_edit``, ``kne.reference`` 's, FT-M, ``apply_edit``, ``revert_edit``,
``EditResult.restore``) runs inside :func:`exclusive`:

* a second such call on the same model from another thread, while one runs, raises
  :class:`ModelBusyError` at once and changes nothing (the same thread may nest: ``fast_edit``
  locates inside its own call);
* kne's hooks act only in the thread of the call that installed them (:func:`own_thread`), so a
  forward pass in another thread (``model(...)``, ``generate()``) runs the model as its weights are,
  without the edit's delta, and its activations never reach the edit;
* writes to the weights (:meth:`Gate.writing`: the merge of an edit, every step of FT-M, the
  writes of apply, revert and restore) wait for the other threads' forwards in flight to finish and
  hold new ones at their start until the writes are done, so each of those forwards runs wholly
  before or wholly after them.

A forward that was already running when the call began is not tracked (the gate is installed for
the call only: no hook stays on the model).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from typing import Callable, Dict, Iterator, Optional

from torch import nn

__all__ = ["ModelBusyError", "exclusive", "holds_model", "own_thread", "writing"]


class ModelBusyError(RuntimeError):
    """Another kne call is changing this model in another thread: kne edits one model one call at a
    time (wait for it, or edit a copy)."""


class Gate:
    """The per-model state of :func:`exclusive`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner: Optional[int] = None
        self.depth = 0
        self.what = ""
        self.cond = threading.Condition()
        self.readers: Dict[int, int] = {}  # thread -> foreign forwards in flight
        self.closed = False

    # the model's root forward hooks, installed for the call
    def enter(self, module, args) -> None:
        tid = threading.get_ident()
        if tid == self.owner:
            return
        with self.cond:
            while self.closed:
                self.cond.wait()
            self.readers[tid] = self.readers.get(tid, 0) + 1

    def leave(self, module, args, output) -> None:
        tid = threading.get_ident()
        if tid == self.owner:
            return
        with self.cond:
            n = self.readers.get(tid, 0)
            if n > 1:
                self.readers[tid] = n - 1
            elif n == 1:
                del self.readers[tid]
                self.cond.notify_all()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Other threads' forwards finished before, and held until after, the writes inside."""
        with self.cond:
            self.closed = True
            while self.readers:
                self.cond.wait()
        try:
            yield
        finally:
            with self.cond:
                self.closed = False
                self.cond.notify_all()


_GATES: "weakref.WeakKeyDictionary[nn.Module, Gate]" = weakref.WeakKeyDictionary()
_REGISTRY = threading.Lock()


def _gate(model: nn.Module) -> Gate:
    with _REGISTRY:
        gate = _GATES.get(model)
        if gate is None:
            gate = _GATES[model] = Gate()
        return gate


@contextlib.contextmanager
def exclusive(model: nn.Module, what: str) -> Iterator[Gate]:
    """Hold ``model`` for the call ``what`` (module docstring); yields its :class:`Gate`."""
    if not isinstance(model, nn.Module):  # the callers' own checks name the mistake
        yield Gate()
        return
    gate = _gate(model)
    tid = threading.get_ident()
    if gate.owner == tid:  # a nested call of the same thread (fast_edit's own locate)
        gate.depth += 1
        try:
            yield gate
        finally:
            gate.depth -= 1
        return
    if not gate.lock.acquire(blocking=False):
        raise ModelBusyError(f"{what}: this model is being changed by {gate.what or 'another kne call'} in another "
                             "thread; kne changes one model one call at a time: wait for that call to finish (or "
                             "edit a copy of the model); nothing was changed")
    gate.owner, gate.what, gate.depth = tid, what, 1
    with gate.cond:  # forwards an earlier call saw start but not end are no longer tracked
        gate.readers.clear()
        gate.closed = False
    handles = []
    try:
        handles = [model.register_forward_pre_hook(gate.enter),
                   model.register_forward_hook(gate.leave, always_call=True)]
        yield gate
    finally:
        for h in handles:
            h.remove()
        gate.owner, gate.what, gate.depth = None, "", 0
        gate.lock.release()


def own_thread(hook: Callable) -> Callable:
    """``hook`` acting only in the thread that made it: in any other thread it returns ``None``
    (a forward hook then leaves the output as it is)."""
    tid = threading.get_ident()

    def guarded(*args, **kwargs):
        if threading.get_ident() != tid:
            return None
        return hook(*args, **kwargs)

    return guarded


def holds_model(what: str) -> Callable:
    """Decorator: the call (whose first argument is the model) runs inside ``exclusive(model, what)``."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def call(model, *args, **kwargs):
            with exclusive(model, what):
                return fn(model, *args, **kwargs)

        return call

    return deco


def writing(model: nn.Module):
    """The gate's :meth:`Gate.writing` when this thread holds ``model``, else a no-op context."""
    gate = _GATES.get(model) if isinstance(model, nn.Module) else None
    if gate is None or gate.owner != threading.get_ident():
        return contextlib.nullcontext()
    return gate.writing()
