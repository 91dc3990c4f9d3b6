"""Fault injection for the calls that change a model's weights: an exception or a Ctrl-C at every
step boundary must leave the model bit for bit as it was before the call, or completely changed,
never in between.

Sections:

1. The injector: :func:`inject` makes the n-th in-place weight write (``Tensor.index_copy_``, the
   one write every state change of kne goes through) raise before or after it writes, or deliver a
   real SIGINT, and counts the writes of a clean run.
2. Edit files: :func:`kne.apply_edit` and :func:`kne.revert_edit`, a fault at each site's write.
3. (``fast_edit`` and ``EditResult.restore``: their own section, to come.)
"""

from __future__ import annotations

import contextlib
import os
import signal

import pytest
import torch

import kne
from helpers import assert_state_bits, snapshot

REQ = {"prompt": "The capital of France is", "target_new": "Rome"}


# ---------------------------------------------------------------------------------------------- 1. the injector
class Injected(Exception):
    """The exception the injector raises (a plain ``Exception`` subclass nothing else raises)."""


class Writes:
    """Counts in-place weight writes; arms a fault at the n-th."""

    def __init__(self):
        self.calls = 0
        self.fault_at = None
        self.exc = None
        self.when = None

    def arm(self, n: int, exc, when: str) -> None:
        self.calls, self.fault_at, self.exc, self.when = 0, n, exc, when

    def disarm(self) -> None:
        self.calls, self.fault_at = 0, None


@contextlib.contextmanager
def inject(methods=("index_copy_",)):
    """Patch ``torch.Tensor.<method>`` for each of ``methods`` so that every call is counted and the
    armed call fails: ``when="before"`` raises without writing, ``"after"`` writes then raises,
    ``"sigint"`` writes then sends this process a real SIGINT (Python raises ``KeyboardInterrupt``
    at the next bytecode), ``"rollback"`` raises at the armed call and again at the next one (the
    first write of an undo), ``"sigint-in-rollback"`` raises at the armed call and sends a SIGINT
    from the next one. The patch is removed on exit, whatever happens."""
    w = Writes()
    saved = {}
    for name in methods:
        saved[name] = torch.Tensor.__dict__.get(name)
        real = getattr(torch.Tensor, name)

        def patched(self, *args, _real=real, **kwargs):
            w.calls += 1
            n = w.calls
            if w.fault_at is None or n < w.fault_at:
                return _real(self, *args, **kwargs)
            if n == w.fault_at:
                if w.when in ("before", "rollback", "sigint-in-rollback"):
                    raise w.exc(f"injected fault before write {n}")
                out = _real(self, *args, **kwargs)
                if w.when == "sigint":
                    os.kill(os.getpid(), signal.SIGINT)
                    return out
                raise w.exc(f"injected fault after write {n}")
            if w.when == "rollback" and n == w.fault_at + 1:
                raise w.exc(f"injected fault in the undo, write {n}")
            if w.when == "sigint-in-rollback" and n == w.fault_at + 1:
                out = _real(self, *args, **kwargs)
                os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C while the undo runs
                return out
            return _real(self, *args, **kwargs)

        setattr(torch.Tensor, name, patched)
    try:
        yield w
    finally:
        for name, old in saved.items():
            if old is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, old)


def test_injector_counts_and_fires():
    t = torch.zeros(4, 2)
    with inject() as w:
        t.index_copy_(0, torch.tensor([1]), torch.ones(1, 2))
        assert w.calls == 1
        w.arm(2, Injected, "after")
        t.index_copy_(0, torch.tensor([0]), torch.ones(1, 2))
        with pytest.raises(Injected, match="after write 2"):
            t.index_copy_(0, torch.tensor([2]), torch.ones(1, 2))
        assert t[2].eq(1).all(), "'after' writes before raising"
        w.arm(1, KeyboardInterrupt, "before")
        with pytest.raises(KeyboardInterrupt):
            t.index_copy_(0, torch.tensor([3]), torch.ones(1, 2))
        assert t[3].eq(0).all(), "'before' raises without writing"
        w.disarm()
    t.index_copy_(0, torch.tensor([3]), torch.ones(1, 2))
    assert w.calls == 0 and "index_copy_" not in torch.Tensor.__dict__, "the patch is removed"


def test_deferred_interrupt_holds_ctrl_c_until_the_block_ends():
    from kne._guard import deferred_interrupt

    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # plenty of bytecode boundaries where Python would raise
                done.append(1)
    assert len(done) == 1000
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---------------------------------------------------------------------------------------------- 2. edit files
@pytest.fixture
def edit_file(tiny_model, tok, tmp_path):
    """``(model, path, original state, edited state, sites)``: a saved and restored edit of a tiny
    llama over ffn_in and ffn_out, with several sites."""
    model = tiny_model("llama")
    orig = snapshot(model)
    res = kne.fast_edit(model, tok, REQ, target_modules=("ffn_in", "ffn_out"), percentile=90.0, steps=3, lr=5e-2)
    n = len(res._saved)
    assert n >= 3, "the fault tests need several sites"
    edited = snapshot(model)
    path = res.save(tmp_path / "edit.safetensors")
    res.restore()
    return model, path, orig, edited, n


OPS = {"apply_edit": (kne.apply_edit, "orig", "edited"), "revert_edit": (kne.revert_edit, "edited", "orig")}


def _start(model, path, op):
    """The model in the state ``op`` starts from (edited, for a revert)."""
    if op == "revert_edit":
        kne.apply_edit(model, path)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("exc", [Injected, KeyboardInterrupt], ids=["exception", "KeyboardInterrupt"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_edit_file_fault_at_every_site_write(edit_file, op, exc, when):
    """A fault at the write of site n (n = 1..sites), before or after it writes: the model is bit
    for bit as it was before the call; then the same call without a fault completes."""
    model, path, orig, edited, n_sites = edit_file
    fn, start_name, goal_name = OPS[op]
    states = {"orig": orig, "edited": edited}
    _start(model, path, op)
    start, goal = states[start_name], states[goal_name]
    with inject() as writes:
        assert fn(model, path) == n_sites  # a clean run: one write per site
        assert writes.calls == n_sites
        assert_state_bits(model, goal, f"{op} without a fault")
        (kne.revert_edit if op == "apply_edit" else kne.apply_edit)(model, path)
        assert_state_bits(model, start)
        for n in range(1, n_sites + 1):
            writes.arm(n, exc, when)
            with pytest.raises(exc, match=f"injected fault {when} write {n}"):
                fn(model, path)
            assert_state_bits(model, start, f"{op} with a fault {when} site write {n} of {n_sites}")
        writes.disarm()
        assert fn(model, path) == n_sites
    assert_state_bits(model, goal, f"{op} after the faults")


@pytest.mark.parametrize("op", list(OPS))
def test_edit_file_real_sigint_during_writes(edit_file, op):
    """A real Ctrl-C (SIGINT) arriving while sites are written, and a second one while the undo runs."""
    model, path, orig, edited, n_sites = edit_file
    fn, start_name, _ = OPS[op]
    _start(model, path, op)
    start = {"orig": orig, "edited": edited}[start_name]
    with inject() as writes:
        for when in ("sigint", "sigint-in-rollback"):
            for n in range(1, n_sites + 1):
                writes.arm(n, KeyboardInterrupt, when)
                with pytest.raises(KeyboardInterrupt):
                    fn(model, path)
                assert_state_bits(model, start, f"{op}: Ctrl-C ({when}) at site write {n}")


@pytest.mark.parametrize("op", list(OPS))
def test_edit_file_undo_that_fails_says_so(edit_file, op):
    """If the undo itself fails, the error says which weights are left partly written."""
    model, path, _, _, n_sites = edit_file
    fn = OPS[op][0]
    _start(model, path, op)
    with inject() as writes:
        writes.arm(2, Injected, "rollback")
        with pytest.raises(RuntimeError, match=r"could not be undone at model\.layers\.\d+\..*reload the model"):
            fn(model, path)


@pytest.mark.parametrize("op", list(OPS))
def test_edit_file_refusals_write_nothing(edit_file, op):
    """Every refusal happens before the first write: no index_copy_ at all."""
    model, path, orig, edited, _ = edit_file
    fn = OPS[op][0]
    if op == "apply_edit":
        kne.apply_edit(model, path)  # already applied: refused
    with inject() as writes:
        with pytest.raises(ValueError, match="already holds the edited values|never applied, or reverted already"):
            fn(model, path)
        assert writes.calls == 0
