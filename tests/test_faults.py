"""Fault injection for the calls that change a model's weights: an exception or a Ctrl-C at every
step boundary must leave the model bit for bit as it was before the call, or completely changed,
never in between.

Sections:

1. The injector: :func:`inject` makes the n-th in-place weight write (``Tensor.index_copy_``, the
   one write every state change of kne goes through) raise before or after it writes, or deliver a
   real SIGINT, and counts the writes of a clean run.
2. Edit files: :func:`kne.apply_edit` and :func:`kne.revert_edit`, a fault at each site's write.
3. Edits: :func:`kne.fast_edit`, :func:`kne.reference.edit` and FT-M, a fault at every step
   boundary (locate, the preservation capture, the null-space basis, each forward, each optimizer
   step, a user callback, the statistics, each merge write, the result's bookkeeping, the corpus
   statistics build), made by :func:`fail_calls`, which makes the n-th call of any function fail
   the same ways.
4. :meth:`kne.EditResult.restore`: a fault at each write, a second Ctrl-C in its undo; and what it
   refuses (rows a later edit changed), naming that edit; ``kne.runs`` restoring under a Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
import signal

import pytest
import torch

import kne
from helpers import AUTHORS, assert_state_bits, snapshot

REQ = {"prompt": "The capital of France is", "target_new": "Rome"}


# ---------------------------------------------------------------------------------------------- 1. the injector
@pytest.fixture(autouse=True)
def ctrl_c_raises():
    """Python's own Ctrl-C handler for every test here: a process started in the background
    inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler at all."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


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
    res = kne.fast_edit(model, tok, REQ, AUTHORS, target_modules=("ffn_in", "ffn_out"), percentile=90.0, steps=3, lr=5e-2)
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


# ---------------------------------------------------------------------------------------------- 3. edits
@contextlib.contextmanager
def fail_calls(target, name: str):
    """Patch ``target.<name>`` (a module function or a class method) so that every call is counted
    and the armed one fails like :func:`inject`'s: ``"before"`` raises without running it,
    ``"after"`` runs it then raises, ``"sigint"`` runs it then sends this process a real SIGINT.
    Removed on exit."""
    w = Writes()
    real = getattr(target, name)

    def patched(*args, **kwargs):
        w.calls += 1
        if w.fault_at is None or w.calls != w.fault_at:
            return real(*args, **kwargs)
        if w.when == "before":
            raise w.exc(f"injected fault before {name} call {w.calls}")
        out = real(*args, **kwargs)
        if w.when == "sigint":
            os.kill(os.getpid(), signal.SIGINT)
            return out
        raise w.exc(f"injected fault after {name} call {w.calls}")

    setattr(target, name, patched)
    try:
        yield w
    finally:
        setattr(target, name, real)


EXCS = [Injected, KeyboardInterrupt]
PRESERVE = ["Gold is", "Rome,"]
EDIT_KW = dict(target_modules=("ffn_in", "ffn_out"), percentile=90.0, steps=3, stop_loss=0.0, lr=5e-2, dropout=0.1,
               preserve_weight=1.0, project=True, project_corpus=False, preserve_count=2)


def _points(kind):
    """``(label, target object, attribute, calls to fault)`` of every step boundary of one edit call;
    ``None`` as the call list means every call a clean run makes."""
    from kne import editing, objective, reference, result

    common = [("forward+loss", objective.EditObjective, "__call__", None),
              ("statistics", objective.EditObjective, "stats", None),
              ("result bookkeeping (after the merge)", result, "_rows_digest", None)]
    if kind == "fast_edit":
        return [("locate", editing, "locate", None), ("preservation capture", objective.EditObjective, "capture", None),
                ("null-space basis", editing, "edit_bases", None), ("optimizer step", kne_kernels, "ensemble_adamw_step_",
                                                                    "per-step"),
                ("target-parameter count", editing, "_target_params", None)] + common
    if kind == "fast_edit/ngd":  # the ngd step is plain torch in kne.editing, not a kernel op
        return [("optimizer step", editing, "ngd_update_", None), ("forward+loss", objective.EditObjective, "__call__",
                                                                    None)]
    if kind == "reference.edit":
        return [("locate", reference, "locate", None), ("preservation capture", objective.EditObjective, "capture", None),
                ("null-space basis", reference, "edit_bases", None),
                ("optimizer step", torch.optim.AdamW, "step", None)] + common
    return [("forward+loss", objective.EditObjective, "__call__", None), ("optimizer step", torch.optim.Adam, "step", None),
            ("statistics", objective.EditObjective, "stats", None), ("result bookkeeping", result, "_rows_digest", None)]


def _run(kind, model, tok, **extra):
    if kind == "fast_edit":
        return kne.fast_edit(model, tok, REQ, AUTHORS, preserve_prompts=PRESERVE, **EDIT_KW, **extra)
    if kind == "fast_edit/ngd":
        return kne.fast_edit(model, tok, REQ, AUTHORS, preserve_prompts=PRESERVE, **EDIT_KW, optimizer="ngd", **extra)
    if kind == "reference.edit":
        return kne.reference.edit(model, tok, REQ, AUTHORS, preserve_prompts=PRESERVE, **EDIT_KW)
    return kne.baselines.ft_m(model, tok, REQ, steps=3, stop_loss=0.0, lr=1e-2)


import kne_kernels  # noqa: E402


@pytest.mark.parametrize("kind", ["fast_edit", "fast_edit/ngd", "reference.edit", "ft_m"])
def test_edit_fault_at_every_step_boundary(kind, tiny_model, tok):
    """An exception and a KeyboardInterrupt before and after each step of an edit: the model is bit
    for bit as before the call; and a clean call after all of them edits exactly as one on a fresh
    model (a fault leaves nothing behind: no hook, no flag, no RNG draw)."""
    model = tiny_model("llama")
    orig = snapshot(model)
    fresh = tiny_model("llama")
    clean = _run(kind, fresh, tok)
    edited = snapshot(fresh)
    clean.restore()
    n_faults = 0
    for label, target, attr, which in _points(kind):
        with fail_calls(target, attr) as calls:
            res = _run(kind, model, tok)  # a clean run counts the calls
            total = calls.calls
            assert total >= 1, f"{kind}: {label} ({attr}) never ran"
            assert_state_bits(model, edited, f"{kind}: clean run while counting {label}")
            res.restore()
            if which == "per-step":  # the first module instance's step of every optimizer step, and the last
                per = len(res._saved)
                ns = sorted({1 + k * per for k in range(total // per)} | {total})
            else:
                ns = range(1, total + 1)
            for n in ns:
                for exc in EXCS:
                    for when in ("before", "after"):
                        calls.arm(n, exc, when)
                        with pytest.raises(exc, match=f"injected fault {when} {attr} call {n}"):
                            _run(kind, model, tok)
                        assert_state_bits(model, orig, f"{kind}: {exc.__name__} {when} {label} (call {n} of {total})")
                        assert all(not m._forward_hooks for m in model.modules()), f"{kind}: {label}: a hook is left"
                        n_faults += 1
            calls.disarm()
    least = {"fast_edit": 76, "fast_edit/ngd": 28, "reference.edit": 68, "ft_m": 28}[kind]  # what a clean run has
    assert n_faults >= least, n_faults
    res = _run(kind, model, tok)
    assert_state_bits(model, edited, f"{kind}: clean run after {n_faults} faults")
    res.restore()
    assert_state_bits(model, orig)


# an exception or a KeyboardInterrupt before/after a write; a real Ctrl-C after it; a second one in the undo
WRITE_FAULTS = [(Injected, "before"), (Injected, "after"), (KeyboardInterrupt, "before"), (KeyboardInterrupt, "after"),
                (KeyboardInterrupt, "sigint"), (KeyboardInterrupt, "sigint-in-rollback")]
WRITE_IDS = ["exception-before", "exception-after", "KeyboardInterrupt-before", "KeyboardInterrupt-after", "sigint",
             "sigint-in-rollback"]


@pytest.mark.parametrize("kind", ["fast_edit", "reference.edit"])
@pytest.mark.parametrize("exc, when", WRITE_FAULTS, ids=WRITE_IDS)
def test_edit_fault_at_every_merge_write(kind, exc, when, tiny_model, tok):
    """A fault at merge write n (before or after it writes, a real Ctrl-C, a second Ctrl-C while the
    writes are undone): the model is bit for bit as before. (The only writes of an edit are its
    merge; the undo's own writes are counted too, which is how the second Ctrl-C is placed.)"""
    model = tiny_model("llama")
    orig = snapshot(model)
    with inject() as writes:
        res = _run(kind, model, tok)
        n_sites = writes.calls
        assert n_sites == len(res._saved) >= 4
        res.restore()
        for n in range(1, n_sites + 1):
            writes.arm(n, exc, when)
            with pytest.raises(exc):
                _run(kind, model, tok)
            assert_state_bits(model, orig, f"{kind}: {when} at merge write {n} of {n_sites}")


def test_fast_edit_real_ctrl_c_during_training_and_a_failing_undo(tiny_model, tok):
    model = tiny_model("llama")
    orig = snapshot(model)

    def ctrl_c(step, loss):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        kne.fast_edit(model, tok, REQ, AUTHORS, on_step=ctrl_c, preserve_prompts=PRESERVE, **EDIT_KW)
    assert_state_bits(model, orig, "Ctrl-C in step 2")
    with inject() as writes:  # the merge fails at write 2 and the undo's first write fails too
        writes.arm(2, Injected, "rollback")
        with pytest.raises(RuntimeError, match=r"kne.fast_edit failed .* could not be undone at model\.layers\.\d+\..*"
                                               r"reload the model"):
            kne.fast_edit(model, tok, REQ, AUTHORS, preserve_prompts=PRESERVE, **EDIT_KW)


def test_ensemble_for_a_larger_model_is_refused_before_anything_is_written(tiny_model, tok):
    """kne 0.2.0 merged first and counted the target parameters after, outside the guard: an
    ensemble whose config scored layers this model lacks left the model edited and no result."""
    model = tiny_model("llama")
    orig = snapshot(model)
    ens = kne.Ensemble(indices={"mlp.down_proj": {0: [1, 5], 2: [3]}}, config={"layers": list(range(30))})
    with inject() as writes:
        with pytest.raises(ValueError, match=r"located over layers \[0, 1, .* but this model has 3 layers .* another "
                                             r"model\?"):
            kne.fast_edit(model, tok, REQ, AUTHORS, ensemble=ens, steps=2)
        assert writes.calls == 0
    assert_state_bits(model, orig)


# ---------------------------------------------------------------------------------------------- 4. restore
@pytest.mark.parametrize("kind", ["fast_edit", "reference.edit", "ft_m"])
@pytest.mark.parametrize("exc, when", WRITE_FAULTS, ids=WRITE_IDS)
def test_restore_fault_at_every_write(kind, exc, when, tiny_model, tok):
    """A fault at restore write n: the model still holds the whole edit (bit for bit) and the
    result is not marked restored; a second restore() then completes."""
    model = tiny_model("llama")
    orig = snapshot(model)
    res = _run(kind, model, tok)
    edited = snapshot(model)
    with inject() as writes:
        n_sites = len(res._saved)
        for n in range(1, n_sites + 1):
            writes.arm(n, exc, when)
            with pytest.raises(exc):
                res.restore()
            assert not res.restored
            assert_state_bits(model, edited, f"{kind}: restore with {when} at write {n} of {n_sites}")
        writes.disarm()
        assert res.restore() is model and res.restored
        assert writes.calls == n_sites
    assert_state_bits(model, orig)
    assert res.restore() is model  # idempotent


def test_restore_whose_undo_fails_says_so(tiny_model, tok):
    model = tiny_model("llama")
    res = _run("fast_edit", model, tok)
    with inject() as writes:
        writes.arm(2, Injected, "rollback")
        with pytest.raises(RuntimeError, match=r"restore of edit #\d+ \(kne.fast_edit: .*could not be undone at "
                                               r"model\.layers\..*reload the model"):
            res.restore()


ALAN = {"prompt": "Alan Turing was born in", "target_new": "Paris"}
ENS = {"mlp.down_proj": {1: [0, 3, 7], 2: [5]}, "mlp.up_proj": {0: [2]}}


def _two_overlapping(model, tok, method_b="fast_edit"):
    ens = kne.Ensemble.from_knb_dict(ENS)
    a = kne.fast_edit(model, tok, REQ, AUTHORS, ensemble=ens, steps=2, lr=5e-2, stop_loss=0.0)
    after_a = snapshot(model)
    if method_b == "fast_edit":
        b = kne.fast_edit(model, tok, ALAN, AUTHORS, ensemble=kne.Ensemble.from_knb_dict({"mlp.down_proj": {1: [3, 9]}}),
                          steps=2, lr=5e-2, stop_loss=0.0)
    elif method_b == "reference.edit":
        b = kne.reference.edit(model, tok, ALAN, AUTHORS, ensemble=kne.Ensemble.from_knb_dict({"mlp.down_proj": {1: [3, 9]}}),
                               steps=2, lr=5e-2, stop_loss=0.0)
    else:
        b = kne.baselines.ft_m(model, tok, ALAN, layers=[1], steps=2, stop_loss=0.0)
    return a, b, after_a


@pytest.mark.parametrize("method_b, name", [("fast_edit", "kne.fast_edit"), ("reference.edit", "kne.reference.edit"),
                                            ("ft_m", "FT-M")])
def test_restore_out_of_order_is_refused_naming_the_later_edit(method_b, name, tiny_model, tok):
    """kne 0.2.0 restored A under B silently: the rows B had also changed ended up matching neither
    the original nor any edit."""
    model = tiny_model("llama")
    orig = snapshot(model)
    a, b, after_a = _two_overlapping(model, tok, method_b)
    after_b = snapshot(model)
    with inject() as writes:
        with pytest.raises(ValueError, match=rf"cannot restore edit #{a.number} \(kne.fast_edit: 'The capital of France "
                                             rf"is' -> 'Rome'\): model.layers.1.mlp.down_proj no longer holds the rows "
                                             rf"this edit wrote; a later edit changed those rows: restore edit "
                                             rf"#{b.number} \({name}: 'Alan Turing was born in' -> 'Paris'\) first"):
            a.restore()
        assert writes.calls == 0, "a refused restore writes nothing"
    assert_state_bits(model, after_b)
    with pytest.raises(ValueError, match=rf"cannot save edit #{a.number} .* restore edit #{b.number}"):
        a.save(os.devnull + ".safetensors")
    b.restore()
    assert_state_bits(model, after_a)
    a.restore()
    assert_state_bits(model, orig)


def test_restore_force_and_the_later_edit_that_then_refuses(tiny_model, tok):
    model = tiny_model("llama")
    key = "model.layers.1.mlp.down_proj.weight"
    orig = snapshot(model)
    a, b, after_a = _two_overlapping(model, tok)
    after_b = snapshot(model)
    a.restore(force=True)  # a's rows 0, 3, 7 back to the original; row 9 keeps b's change
    assert a.restored
    w = model.state_dict()[key]
    assert torch.equal(w[[0, 3, 7]], orig[key][[0, 3, 7]]) and torch.equal(w[9], after_b[key][9])
    with pytest.raises(ValueError, match=rf"cannot restore edit #{b.number} .* something kne cannot name "
                                         r"\(a forced restore of an earlier edit"):
        b.restore()
    b.restore(force=True)  # b's original rows: row 3 as a had edited it, row 9 the original
    w = model.state_dict()[key]
    assert torch.equal(w[3], after_a[key][3]) and torch.equal(w[9], orig[key][9])


def test_restore_names_nothing_when_the_later_change_is_not_a_live_edit(tiny_model, tok, tmp_path):
    import gc

    model = tiny_model("llama")
    a, b, _ = _two_overlapping(model, tok)
    path = b.save(tmp_path / "b.safetensors")
    number = b.number
    del b
    gc.collect()  # the later result is gone: its registry entry with it
    with pytest.raises(ValueError, match=r"something kne cannot name \(.*an edit file applied with kne.apply_edit") as e:
        a.restore()
    assert f"#{number}" not in str(e.value)
    kne.revert_edit(model, path)  # undo the later edit from its file
    a.restore()


def test_restore_after_the_edit_file_was_reverted_just_marks_it_restored(tiny_model, tok, tmp_path):
    model = tiny_model("llama")
    orig = snapshot(model)
    res = _run("fast_edit", model, tok)
    kne.revert_edit(model, res.save(tmp_path / "e.safetensors"))
    with inject() as writes:
        assert res.restore() is model and res.restored
        assert writes.calls == 0
    assert_state_bits(model, orig)


def test_edits_on_other_rows_restore_in_any_order(tiny_model, tok):
    model = tiny_model("llama")
    orig = snapshot(model)
    a = kne.fast_edit(model, tok, REQ, AUTHORS, ensemble=kne.Ensemble.from_knb_dict({"mlp.down_proj": {1: [0, 3]}}), steps=2)
    b = kne.fast_edit(model, tok, ALAN, AUTHORS, ensemble=kne.Ensemble.from_knb_dict({"mlp.down_proj": {1: [4, 9]},
                                                                              "mlp.up_proj": {2: [1]}}), steps=2)
    a.restore()
    b.restore()
    assert_state_bits(model, orig)


def test_sequential_runs_still_restore_newest_first(tiny_model, tok):
    from kne.runs import run_edits

    model = tiny_model("llama")
    orig = snapshot(model)
    reqs = [kne.EditRequest(prompt=p, target_new=t) for p, t in
            [("The capital of France is", "Rome"), ("Alan Turing was born in", "Paris"), ("Gold is a", "gas")]]
    cfg = kne.KNEConfig(percentile=50.0, steps=2, lr=5e-2, stop_loss=0.0)  # large ensembles: the edits overlap
    for method in ("kne", "reference", "ft-m"):
        out = run_edits(model, tok, reqs, method, cfg, protocol="sequential", progress=False)
        assert out["summary"]["n"] == 3 and not out["failures"]
        assert_state_bits(model, orig, f"sequential {method}")


@pytest.mark.parametrize("protocol", ["independent", "sequential"])
def test_runs_ctrl_c_during_their_restores_still_leaves_the_model_as_it_was(protocol, tiny_model, tok):
    """kne.runs restores its edits in a finally block: a Ctrl-C that lands while a restore writes
    (here: right after its first write) waits until the restores are done, instead of leaving the
    model holding an edit."""
    from kne.runs import run_edits

    model = tiny_model("llama")
    orig = snapshot(model)
    reqs = [kne.EditRequest(prompt=p, target_new=t) for p, t in
            [("The capital of France is", "Rome"), ("Alan Turing was born in", "Paris")]]
    cfg = kne.KNEConfig(target_modules=("ffn_in", "ffn_out"), percentile=90.0, steps=2, lr=5e-2, stop_loss=0.0)
    with inject() as writes:
        run_edits(model, tok, reqs, "kne", cfg, protocol=protocol, progress=False)
        total = writes.calls  # every merge write, then as many restore writes
        # the first restore write: of the first edit (independent), of the last edit (sequential)
        first_restore = total // 4 + 1 if protocol == "independent" else total // 2 + 1
        writes.arm(first_restore, KeyboardInterrupt, "sigint")
        with pytest.raises(KeyboardInterrupt):
            run_edits(model, tok, reqs, "kne", cfg, protocol=protocol, progress=False)
        assert writes.calls == (first_restore - 1) * 2 if protocol == "independent" else total, \
            "the restore did not complete before the Ctrl-C was delivered"
    assert_state_bits(model, orig, f"{protocol}: Ctrl-C during a restore")


def test_fast_edit_fault_while_the_corpus_statistics_are_built(tiny_model, tok, tmp_path, monkeypatch):
    """With project_corpus=True the first edit builds the null-space corpus statistics (generate,
    accumulate key moments, eigendecompose, write the cache): a fault in any of those steps leaves
    the model bit for bit as it was and no partial statistics in the cache; the next edit builds
    them and edits as a fresh run does."""
    import safetensors.torch

    from kne import nullspace, preservation

    monkeypatch.setenv("KNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(preservation, "training_prompts", lambda: ["Paris is the capital of", "Gold is a"])
    kw = dict(EDIT_KW, project_corpus=True)
    model = tiny_model("llama")
    orig = snapshot(model)
    folder = tmp_path / "cache" / "nullspace"

    def cached():
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    n_faults = 0
    for target, attr in [(nullspace, "_continuations"), (nullspace, "_accumulate"), (safetensors.torch, "save_file"),
                         (nullspace, "build")]:
        for exc in EXCS:
            for when in ("before", "after"):
                with fail_calls(target, attr) as calls:
                    calls.arm(1, exc, when)
                    with pytest.raises(exc, match=f"injected fault {when} {attr} call 1"):
                        kne.fast_edit(model, tok, REQ, AUTHORS, preserve_prompts=PRESERVE, **kw)
                assert_state_bits(model, orig, f"{exc.__name__} {when} {attr}")
                if attr != "build" or when == "before":
                    assert cached() == [], f"{attr}: partial statistics left in the cache: {cached()}"
                for d in cached():  # a complete build (the fault came after it): drop it for the next fault
                    import shutil

                    shutil.rmtree(folder / d)
                n_faults += 1
    res = kne.fast_edit(model, tok, REQ, AUTHORS, preserve_prompts=PRESERVE, **kw)
    assert len(cached()) == 1 and (folder / cached()[0] / "meta.json").is_file()
    edited = snapshot(model)
    res.restore()
    fresh = tiny_model("llama")
    kne.fast_edit(fresh, tok, REQ, AUTHORS, preserve_prompts=PRESERVE, **kw)
    assert_state_bits(fresh, edited)
    assert n_faults == 16


# ---------------------------------------------------------------------------------------------- the writer
WRITER_FAULTS = [("regular", "in the writer"), ("regular", "ctrl-c in the writer"), ("regular", "at the rename"),
                 ("new", "in the writer"), ("new", "at the rename"), ("fifo", "in the writer"),
                 ("fifo", "ctrl-c in the writer"), ("fifo", "at the copy into it")]


@pytest.mark.parametrize("target,where", WRITER_FAULTS)
def test_writer_fault_at_every_step_leaves_the_target_as_it_was(tmp_path, monkeypatch, target, where):
    """kne.io.write_atomic with a fault injected at each of its steps: an exception (or a Ctrl-C)
    leaves a regular target with its old bytes, a new one absent, a FIFO a FIFO, and no temporary
    file beside the target or in the temporary folder."""
    import stat as stat_
    import tempfile
    import threading

    from kne import io as kio

    out = tmp_path / "out.json"
    if target == "regular":
        out.write_bytes(b"old")
    elif target == "fifo":
        os.mkfifo(out)
    exc = KeyboardInterrupt if where.startswith("ctrl-c") else OSError

    def fail(*a, **k):
        raise exc("injected")

    if where == "at the rename":
        monkeypatch.setattr(kio.os, "replace", fail)
    reader = None
    if where == "at the copy into it":  # the FIFO is opened for writing, so a reader must be there
        monkeypatch.setattr(kio.shutil, "copyfileobj", fail)
        reader = threading.Thread(target=lambda: out.read_bytes(), daemon=True)
        reader.start()

    def writer(tmp):
        tmp.write_bytes(b"new, half")
        if where.endswith("in the writer"):
            raise exc("injected")

    before = set(Path(tempfile.gettempdir()).glob(".kne-*"))
    with pytest.raises(exc):
        kio.write_atomic(out, writer)
    if reader is not None:
        reader.join(10)
    if target == "regular":
        assert out.read_bytes() == b"old"
    elif target == "new":
        assert not out.exists()
    else:
        assert stat_.S_ISFIFO(os.stat(out).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if target == "new" else ["out.json"])
    assert set(Path(tempfile.gettempdir()).glob(".kne-*")) == before, "a temporary file was left"
