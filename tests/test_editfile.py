"""Compact edit files: save / apply / revert round trips, refusals."""

import pytest
import torch

import kne
from helpers import assert_state_equal, snapshot

REQ = {"prompt": "The capital of France is", "target_new": "Rome"}


@pytest.mark.parametrize("model_type, axis", [("llama", "out"), ("gpt2", "in"), ("opt", "out")])
def test_save_apply_revert_round_trip_bit_exact(model_type, axis, tiny_model, tok, tmp_path):
    model = tiny_model(model_type)
    orig = snapshot(model)
    res = kne.fast_edit(model, tok, REQ, neuron_axis=axis, percentile=90.0, steps=4, lr=5e-2)
    edited = snapshot(model)
    path = res.save(tmp_path / "edit.safetensors")
    meta, tensors = kne.read_edit(path)
    assert meta["format"] == "kne.edit/1" and meta["requests"][0]["target_new"] == "Rome"
    assert len(meta["sites"]) == len(res._saved) > 0
    # only what changed: the file holds the edited rows twice (new, orig) plus indices
    n_rows = sum(t.numel() for k, t in tensors.items() if not k.endswith(".index"))
    assert n_rows == 2 * res.stats["params_edited"]
    res.restore()
    assert_state_equal(model, orig, "after restore")
    assert kne.apply_edit(model, path) == len(meta["sites"])
    assert_state_equal(model, edited, "after apply_edit")
    with pytest.raises(ValueError, match="already holds the edited values"):
        kne.apply_edit(model, path)
    assert kne.revert_edit(model, path) == len(meta["sites"])
    assert_state_equal(model, orig, "after revert_edit")
    with pytest.raises(ValueError, match="never applied, or reverted already"):
        kne.revert_edit(model, path)


def test_refuses_another_model_and_changed_rows(tiny_model, tok, tmp_path):
    model = tiny_model("llama")
    res = kne.fast_edit(model, tok, REQ, percentile=90.0, steps=3, lr=5e-2)
    path = res.save(tmp_path / "e.safetensors")
    res.restore()
    other = tiny_model("gpt2")
    snap = snapshot(other)
    with pytest.raises(ValueError, match="made for another model"):
        kne.apply_edit(other, path)
    assert_state_equal(other, snap, "a refused model")
    # same architecture, but the rows the edit replaces were changed meanwhile
    site, dim, idx, _ = res._saved[0]
    with torch.no_grad():
        site.weight().index_fill_(dim, idx[:1], 0.5)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="another edit changed these values"):
        kne.apply_edit(model, path)
    assert_state_equal(model, snap, "nothing is written on a refusal")


def test_save_after_restore_and_bad_files(tiny_model, tok, tmp_path):
    model = tiny_model("llama")
    res = kne.fast_edit(model, tok, REQ, percentile=90.0, steps=2)
    res.restore()
    with pytest.raises(ValueError, match="was restored"):
        res.save(tmp_path / "x.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a kne edit"):
        kne.read_edit(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError):
        kne.apply_edit(model, tmp_path / "missing.safetensors")


@pytest.mark.slow
def test_embedded_model_edit_file_is_small(embedded, tmp_path):
    model, tok = embedded
    snap = snapshot(model)
    res = kne.fast_edit(model, tok, REQ, stop_loss=0.1)
    path = res.save(tmp_path / "france.safetensors")
    edited = {k: v.clone() for k, v in model.state_dict().items() if not torch.equal(v, snap[k])}
    res.restore()
    size = path.stat().st_size
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert size < 0.01 * model_bytes, (size, model_bytes)  # about 2 MB against 540 MB
    kne.apply_edit(model, path)
    for k, v in edited.items():
        assert torch.equal(model.state_dict()[k], v)
    kne.revert_edit(model, path)
    assert_state_equal(model, snap)
