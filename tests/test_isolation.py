"""What an edit leaves alone besides the weights it edits: each module's own ``training`` flag,
torch's process-wide RNG streams, and the edits other threads run at the same time."""

from __future__ import annotations

import threading

import pytest
import torch

import kne
from kne import nullspace, preservation

from helpers import AUTHORS, assert_state_bits, snapshot

REQ = {"prompt": "The capital of France is", "target_new": "Rome", "subject": "France"}
KW = dict(percentile=80.0, steps=3, stop_loss=0.0, lr=5e-2)


# ---------------------------------------------------------------------------------------------- training flags
def _mixed_modes(model):
    """``train()`` with one decoder layer's MLP and one attention module in ``eval()``: the flags
    every call must hand back module by module."""
    model.train()
    model.model.layers[1].mlp.eval()
    model.model.layers[0].self_attn.eval()
    return {name: m.training for name, m in model.named_modules()}


CALLS = {
    "fast_edit": lambda m, t: kne.fast_edit(m, t, REQ, AUTHORS, **KW),
    "fast_edit+preservation": lambda m, t: kne.fast_edit(m, t, REQ, AUTHORS, preserve_weight=1.0, project=True,
                                                         project_corpus=False, preserve_count=2, **KW),
    "reference.edit": lambda m, t: kne.reference.edit(m, t, REQ, AUTHORS, **KW),
    "ft_m": lambda m, t: kne.baselines.ft_m(m, t, REQ, steps=2),
    "attribute": lambda m, t: kne.attribute(m, t, REQ, ig_steps=2),
    "reference.attribute": lambda m, t: kne.reference.attribute(m, t, REQ),
    "evaluate": lambda m, t: kne.evaluate(m, t, REQ, fluency=True),
    "nullspace.build": lambda m, t: nullspace.build(m, t, prompts=["Gold is", "Rome,"], new_tokens=2, progress=False),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_each_module_keeps_its_own_training_flag(call, tiny_model, tok, tmp_path, monkeypatch):
    monkeypatch.setenv("KNE_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama")
    want = _mixed_modes(model)
    out = CALLS[call](model, tok)
    got = {name: m.training for name, m in model.named_modules()}
    wrong = [n for n in want if got[n] != want[n]]
    assert not wrong, f"{call}: training flags changed on {wrong[:5]}"
    if hasattr(out, "restore"):
        out.restore()
        assert {name: m.training for name, m in model.named_modules()} == want


def test_training_flags_survive_a_failed_edit(tiny_model, tok):
    model = tiny_model("llama")
    want = _mixed_modes(model)
    orig = snapshot(model)

    def stop(step, loss):
        raise RuntimeError("a user callback fails")

    with pytest.raises(RuntimeError, match="user callback"):
        kne.fast_edit(model, tok, REQ, AUTHORS, on_step=stop, **KW)
    assert_state_bits(model, orig)
    assert {name: m.training for name, m in model.named_modules()} == want


# ---------------------------------------------------------------------------------------------- RNG and threads
DROP_KW = dict(percentile=80.0, steps=6, stop_loss=0.0, lr=5e-2, dropout=0.1, delta_init="kaiming")


def _edit(model, tok, req, **kw):
    res = kne.fast_edit(model, tok, req, AUTHORS, **dict(DROP_KW, **kw))
    return res.stats["losses"], snapshot(model)


def test_dropout_masks_reproduce_torch_cpu_dropout_from_a_local_generator():
    """The edit-local dropout draws torch's CPU ``F.dropout`` masks bit for bit (same seed), which is
    why the authors preset (dropout 0.1) still edits exactly as kne 0.2.0 did."""
    import torch.nn.functional as F

    from kne._utils import EditDropout

    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = torch.randn(3, 7, 97).to(dtype)
        with torch.random.fork_rng():
            torch.manual_seed(11)
            want = [F.dropout(x, p=0.1, training=True) for _ in range(3)]
        state = torch.random.get_rng_state()
        drop = EditDropout(0.1, 11)
        got = [drop(x) for _ in range(3)]
        assert torch.equal(torch.random.get_rng_state(), state), "the global generator moved"
        for a, b in zip(got, want):
            assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), dtype
    assert EditDropout(0.0, 1)(x) is x


def test_concurrent_edits_equal_their_solo_runs_and_leave_other_threads_rng_alone(tiny_model, tok):
    """Two threads edit their own model with dropout 0.1 while a third draws from torch's seeded
    global generator: both edits equal their solo runs bit for bit, the third stream is unmoved."""
    reqs = [REQ, {"prompt": "Alan Turing was born in", "target_new": "New York City"}]
    solo = [_edit(tiny_model("llama", seed=s), tok, r) for s, r in zip((0, 1), reqs)]
    assert solo[0][0] != solo[1][0]
    torch.manual_seed(7)
    stream = [torch.rand(4) for _ in range(400)]

    results, errors = [None, None], []
    drawn = []
    start = threading.Barrier(3)
    models = [tiny_model("llama", seed=s) for s in (0, 1)]

    def edit(i):
        try:
            start.wait()
            results[i] = _edit(models[i], tok, reqs[i])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def draw():
        try:
            start.wait()
            torch.manual_seed(7)
            for _ in range(400):
                drawn.append(torch.rand(4))
                threading.Event().wait(0.0005)  # let the edits run in between
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=edit, args=(i,)) for i in range(2)] + [threading.Thread(target=draw)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        assert results[i][0] == solo[i][0], f"thread {i}: losses differ from its solo run"
        assert_state_bits(models[i], solo[i][1], f"thread {i}")
    assert all(torch.equal(a, b) for a, b in zip(drawn, stream)), "the third thread's RNG stream moved"


def test_reference_edit_leaves_the_global_rng_alone_and_matches_fast_dropout(tiny_model, tok):
    """kne.reference.edit draws the same dropout masks from its own generator: with dropout on, the
    fast path and the reference still agree step by step; the global stream does not move."""
    kw = dict(DROP_KW, dropout=0.3, lr=2.5e-3, alpha=8.0)
    fm, rm = tiny_model("llama", seed=5), tiny_model("llama", seed=5)
    torch.manual_seed(3)
    state = torch.random.get_rng_state()
    fast = kne.fast_edit(fm, tok, REQ, AUTHORS, **kw)
    ref = kne.reference.edit(rm, tok, REQ, AUTHORS, **kw)
    assert torch.equal(torch.random.get_rng_state(), state)
    for a, b in zip(fast.stats["losses"], ref.stats["losses"]):
        assert abs(a - b) <= 1e-4 * abs(b)
    fast.restore()
    ref.restore()


@pytest.mark.parametrize("call", ["fast_edit", "reference.edit", "ft_m", "attribute", "reference.attribute"])
def test_the_callers_gradients_are_kept(call, tiny_model, tok):
    """Gradients the caller holds on the model's parameters are there, unchanged, after the call
    (FT-M used to set every .grad to None)."""
    model = tiny_model("llama")
    grads = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters() if "layers.2" in n}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone() if n in grads else None
    out = CALLS[call](model, tok)
    for n, p in model.named_parameters():
        if n in grads:
            assert p.grad is not None and torch.equal(p.grad, grads[n]), f"{call}: {n}.grad changed"
        else:
            assert p.grad is None, f"{call}: {n}.grad appeared"
    if hasattr(out, "restore"):
        out.restore()
