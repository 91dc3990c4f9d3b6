"""Models dispatched by Accelerate with some layers offloaded by its hooks edit correctly."""

import copy

import pytest
import torch

import kne
from helpers import AUTHORS, rel_err

PROBE = "The capital of France is"
REQ = {"prompt": PROBE, "target_new": "Rome"}


def dispatch(model, tmp_path, layers_path, n_layers, offloaded):
    from accelerate import dispatch_model

    names = {n.rsplit(".", 1)[0] if "." in n else n for n in model.state_dict()}
    device_map = {}
    for n in names:
        head = n
        for i in range(n_layers):
            if n.startswith(f"{layers_path}.{i}."):
                head = f"{layers_path}.{i}"
        device_map[head] = "disk" if head in {f"{layers_path}.{i}" for i in offloaded} else "cpu"
    return dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path / "offload"))


def logits(model, tok):
    ids = tok(PROBE, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**ids).logits.float()


@pytest.mark.parametrize("model_type, layers_path, axis", [("llama", "model.layers", "out"),
                                                           ("gpt2", "transformer.h", "in")])
def test_edit_lands_in_offloaded_weights(model_type, layers_path, axis, tiny_model, tok, tmp_path):
    plain = tiny_model(model_type)
    ref_logits = logits(plain, tok)
    off = dispatch(copy.deepcopy(plain), tmp_path, layers_path, 3, offloaded=(1, 2))
    site = kne.adapters.resolve_sites(off, ["ffn_out"], [1])["ffn_out"][0]
    assert site.offloaded and site.module.weight.device.type == "meta"
    assert torch.equal(logits(off, tok), ref_logits)

    kw = dict(neuron_axis=axis, percentile=90.0, dropout=0.0, steps=5, stop_loss=0.0, lr=5e-2)
    a_plain = kne.attribute(plain, tok, REQ, ig_steps=2, neuron_axis=axis)
    a_off = kne.attribute(off, tok, REQ, ig_steps=2, neuron_axis=axis)
    assert rel_err(a_off.scores["ffn_out"], a_plain.scores["ffn_out"]) < 1e-5
    r_plain = kne.fast_edit(plain, tok, REQ, AUTHORS, **kw)
    r_off = kne.fast_edit(off, tok, REQ, AUTHORS, **kw)
    assert r_off.ensemble.to_knb_dict() == r_plain.ensemble.to_knb_dict()
    assert any(layer in (1, 2) for _, layer, _ in r_off.ensemble.items()), "no offloaded layer in the ensemble"
    torch.testing.assert_close(torch.tensor(r_off.stats["losses"]), torch.tensor(r_plain.stats["losses"]),
                               rtol=1e-5, atol=0)
    # the next forward of the dispatched model loads the edited rows from the offload store
    edited = logits(off, tok)
    assert not torch.equal(edited, ref_logits)
    torch.testing.assert_close(edited, logits(plain, tok), rtol=1e-5, atol=1e-5)
    assert site.module.weight.device.type == "meta", "the hooks must still manage the weight"
    r_off.restore()
    r_plain.restore()
    assert torch.equal(logits(off, tok), ref_logits)
    assert torch.equal(logits(plain, tok), ref_logits)


def test_reference_and_ft_m_refuse_offloaded_weights(tiny_model, tok, tmp_path):
    off = dispatch(tiny_model("llama"), tmp_path, "model.layers", 3, offloaded=(0, 1, 2))
    with pytest.raises(ValueError, match="offloads"):
        kne.reference.attribute(off, tok, REQ)
    with pytest.raises(ValueError, match="offloads"):
        kne.baselines.ft_m(off, tok, REQ, layers=[1])
