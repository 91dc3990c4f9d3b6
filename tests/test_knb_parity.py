"""kne with ``KNEConfig.preset("knb")`` against a trace of the authors' own KNB trainer.

``tests/data/knb_parity.json`` was computed once with the authors' code -- their EasyEdit fork,
https://github.com/leonz-z/EasyEdit at commit 5d49c472bd4b8447a70d276fb577d28088588e62,
``easyeditor/models/knb/knb_main.py`` (``execute_knb``, ``knb_forward``) with their PEFT fork's
adapter ``easyeditor/models/knb/peft/tuners/knb/layer.py`` on PEFT 0.10.0 -- by
``python tools/knb_parity.py trace`` (see that script for the set-up; CI does not need their code),
on the embedded SmolLM2-135M-Instruct (float32, CPU, one thread, torch 2.13.0, transformers
5.24.0), their settings ``lr 5e-3, weight_decay 0, knb_alpha 1, use_rsknb, knb_dropout 0,
batch_size = number of requests``, the tokenizer padded on the left (as EasyEdit's editor sets it),
the ensemble kne located (stored in the file as the authors' ``knb_dict``) and the adapter's start
set to kne's seeded ``delta_init="authors"`` draw (their own draw was checked to have the same
bound, ``their_init_max_over_bound``). Two cases: "The capital of France is" -> " Rome" on rows
(``this_layer``; the target's leading space gets a second space in their text), stopping at loss
1e-2; and a 3-request batch of unequal answer lengths on columns (``last_layer``: their bound
``1/sqrt(K)``, the token-mean loss), stopping at 0.1.

The tolerance: float32 rounding grows through AdamW (an update ``m / (sqrt(v) + eps)`` turns a
rounding-sized change of a gradient near zero into a full step), so two float32 runs of *their*
code, on one thread and on two, already differ by up to 3.8e-4 relative per step on the first case.
kne's fast path differs from their trace by as much (3.8e-4 and 3.5e-6); the tolerance is 1e-3, the
first loss (before any step) 1e-5, and the step counts must be equal. (``kne.reference.edit``,
dense masked deltas like theirs, gave their float32 losses of the single-request case bit for bit
when the trace was made, and those of the batch to 2.5e-6: they pad on the left, kne on the right.) In
float64 the fast path and their code are bit for bit equal (docs/parity.md, "Parity with the authors
code"). Each switch moves the first loss far past the tolerance (the end of this file).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import kne
from kne.editing import initial_delta

from helpers import assert_state_equal, snapshot

pytestmark = pytest.mark.slow

DATA = json.loads((Path(__file__).parent / "data" / "knb_parity.json").read_text())
CASES = {c["name"]: c for c in DATA["cases"]}
TOL, TOL_FIRST = 1e-3, 1e-5


def _setup(case, model):
    ens = kne.Ensemble.from_knb_dict(case["knb_dict"], neuron_axis=case["neuron_axis"])
    cfg = kne.KNEConfig.preset("knb", neuron_axis=case["neuron_axis"], steps=case["steps"],
                               stop_loss=case["stop_loss"], seed=case["seed"])
    start = sum(float(initial_delta(cfg, site, cfg.neuron_axis, idx.numel(), "cpu").double().sum())
                for site, idx in ens.sites(model))
    assert math.isclose(start, case["start_sum"], rel_tol=1e-12), \
        "kne's seeded start changed since the trace was made: remake it (tools/knb_parity.py trace)"
    return ens, cfg


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("name", list(CASES))
def test_losses_equal_the_authors_trace(name, impl, embedded):
    model, tok = embedded
    case = CASES[name]
    ens, cfg = _setup(case, model)
    snap = snapshot(model)
    edit = kne.fast_edit if impl == "fast" else kne.reference.edit
    res = edit(model, tok, case["requests"], cfg, ensemble=ens)
    try:
        got, want = res.stats["losses"], case["losses"]
        assert res.stats["steps"] == case["their_steps"] and res.stats["stopped_early"]
        assert len(got) == len(want) == case["their_steps"]  # with stop_after_step: one loss per step
        assert abs(got[0] - want[0]) <= TOL_FIRST * want[0], (got[0], want[0])
        for i, (a, b) in enumerate(zip(got, want)):
            assert abs(a - b) <= TOL * abs(b), f"step {i}: kne {a} vs theirs {b}"
        # the size of the change per module instance, against their W + scaling * delta_W
        for site, idx in ens.sites(model):
            key = f"{site.suffix}.{site.layer}"
            dW = (site.weight().detach() - snap[site.path + ".weight"]).double().norm().item()
            assert math.isclose(dW, case["weight_change_norm"][key], rel_tol=2e-2), (key, dW)
    finally:
        res.restore()
    assert_state_equal(model, snap)


@pytest.mark.parametrize("switch, value, name", [
    ("loss_reduction", "request", "batch3-columns"),  # the mean of per-request means
    ("delta_init", "kaiming", "batch3-columns"),      # bound 1/sqrt(in_features) on columns
    ("delta_init", "zeros", "batch3-columns"),       # (on rows the noise moves the first loss by 7.5e-4 only)
    ("always_space", False, "fact-rows"),             # " Rome" without their second space
])
def test_each_switch_is_needed(switch, value, name, embedded):
    """Without one of these switches the first loss (before any step) is already off the trace
    (``stop_after_step`` shows in the step counts above and in tests/test_knb_compat.py)."""
    model, tok = embedded
    case = CASES[name]
    ens, cfg = _setup(case, model)
    snap = snapshot(model)
    res = kne.fast_edit(model, tok, case["requests"], cfg.replace(steps=0, **{switch: value}), ensemble=ens)
    res.restore()
    assert_state_equal(model, snap)
    first, want = res.stats["losses"][0], case["losses"][0]
    assert abs(first - want) > 100 * TOL * want, (switch, first, want)
