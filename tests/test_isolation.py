"""What an edit leaves alone besides the weights it edits: each module's own ``training`` flag,
torch's process-wide RNG streams, and the edits other threads run at the same time."""

from __future__ import annotations

import threading

import pytest
import torch

import kne
from kne import nullspace, preservation

from helpers import assert_state_bits, snapshot

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
    "fast_edit": lambda m, t: kne.fast_edit(m, t, REQ, **KW),
    "fast_edit+preservation": lambda m, t: kne.fast_edit(m, t, REQ, preserve_weight=1.0, project=True,
                                                         project_corpus=False, preserve_count=2, **KW),
    "reference.edit": lambda m, t: kne.reference.edit(m, t, REQ, **KW),
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
        kne.fast_edit(model, tok, REQ, on_step=stop, **KW)
    assert_state_bits(model, orig)
    assert {name: m.training for name, m in model.named_modules()} == want
