"""Edits of linear projections other than the FFN: supported and held to the reference.

kne's machinery is defined for any linear projection ``y = x W^T (+ b)`` inside a decoder layer
(``nn.Linear`` or GPT-2's ``Conv1D``): the attribution identity, the compact delta and its hook,
the merge, ``restore()``, edit files and the null-space projection never look at what the module
computes. The FFN aliases stay the default (the paper's knowledge neurons); an attention
projection named by its path inside a layer (``self_attn.o_proj``) is edited the same way, and
these tests hold the fast path to the reference on it.
"""

from __future__ import annotations

import copy

import pytest
import torch

import kne

from helpers import AUTHORS, assert_state_bits, rel_err, snapshot, worst

REQ = {"prompt": "The capital of France is", "target_new": "Rome"}
TOL = 1e-4
# (model type, attention projection): Linear without bias, GPT-2 Conv1D (stored [in, out]) with
# bias, OPT Linear with bias, a query projection (GQA: out 32, in 32 on the tiny model)
CASES = [("llama", "self_attn.o_proj"), ("gpt2", "attn.c_proj"), ("opt", "self_attn.out_proj"),
         ("llama", "self_attn.q_proj")]


@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize("model_type, module", CASES)
def test_attention_projection_attribution_and_edit_match_the_reference(model_type, module, axis, tiny_model, tok):
    model = tiny_model(model_type, seed=1)
    ref_model = copy.deepcopy(model)
    orig = snapshot(model)
    kw = dict(target_modules=(module,), neuron_axis=axis, ig_steps=2, dropout=0.0, stop_loss=0.0, steps=5, lr=1e-2,
              alpha=8.0, percentile=80.0)
    fa, ra = kne.attribute(model, tok, REQ, **kw), kne.reference.attribute(model, tok, REQ, **kw)
    f, r = fa.scores[module], ra.scores[module]
    assert r.abs().max() > 0
    assert rel_err(f, r) < TOL, worst(f, r)
    fast = kne.fast_edit(model, tok, REQ, AUTHORS, **kw)
    ref = kne.reference.edit(ref_model, tok, REQ, AUTHORS, **kw)
    assert fast.ensemble.counts() == ref.ensemble.counts() and len(fast.ensemble) > 0
    for a, b in zip(fast.stats["losses"], ref.stats["losses"]):
        assert abs(a - b) <= TOL * abs(b)
    assert fast.stats["losses"][-1] < fast.stats["losses"][0]
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, orig[k])]
    assert changed and all(module in k for k in changed), changed
    for k in changed:
        assert rel_err(model.state_dict()[k], ref_model.state_dict()[k]) < TOL
    fast.restore()
    assert_state_bits(model, orig)


def test_attention_projection_edit_file_round_trip(tiny_model, tok, tmp_path):
    model = tiny_model("gpt2", seed=2)
    orig = snapshot(model)
    res = kne.fast_edit(model, tok, REQ, AUTHORS, target_modules=("attn.c_proj", "ffn_out"), percentile=80.0, steps=3, lr=5e-2)
    edited = snapshot(model)
    path = res.save(tmp_path / "attn.safetensors")
    res.restore()
    assert_state_bits(model, orig)
    assert kne.apply_edit(model, path) == len(res._saved)
    assert_state_bits(model, edited)
    kne.revert_edit(model, path)
    assert_state_bits(model, orig)


def test_a_module_that_is_not_a_projection_is_refused(tiny_model, tok):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"is a LlamaRMSNorm; kne edits nn.Linear and GPT-2 Conv1D projections only"):
        kne.fast_edit(model, tok, REQ, AUTHORS, target_modules=("input_layernorm",))
    with pytest.raises(ValueError, match=r"not found in layer 0 .* use an alias \(ffn_in=mlp.up_proj"):
        kne.fast_edit(model, tok, REQ, AUTHORS, target_modules=("self_attn.nope",))
