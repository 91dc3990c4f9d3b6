"""End-to-end on the embedded SmolLM2-135M-Instruct: real edits, real KnowEdit records."""


import pytest
import torch

import kne
from kne.cli import DEMO_PARAPHRASE, DEMO_PROMPT, DEMO_TARGET, greedy
from helpers import AUTHORS

UNRELATED = ("The capital of Japan is", "The chemical symbol for gold is")

pytestmark = pytest.mark.slow



def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(model, snap):
    now = model.state_dict()
    bad = [k for k, v in snap.items() if not torch.equal(now[k], v)]
    assert not bad, f"weights differ from the snapshot: {bad[:5]}"


def test_embedded_model_knows_paris(embedded):
    model, tok = embedded
    ids = tok("The capital of France is", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        p = model(**ids).logits[0, -1].softmax(-1)
    paris = tok(" Paris", add_special_tokens=False)["input_ids"][0]
    assert p.argmax().item() == paris
    assert 0.6 < p[paris].item() < 0.9  # about 0.77


def test_demo_fact_with_the_authors_settings_at_loss_0_1_keeps_unrelated_answers(embedded):
    model, tok = embedded
    snap = snapshot(model)
    before = {u: greedy(model, tok, u) for u in UNRELATED}
    req = kne.EditRequest(prompt=DEMO_PROMPT, target_new=DEMO_TARGET, rephrase_prompt=DEMO_PARAPHRASE,
                          locality={"Unrelated": [{"prompt": u, "ground_truth": before[u]} for u in UNRELATED]})
    pre = kne.evaluate(model, tok, [req])
    res = kne.fast_edit(model, tok, [req], AUTHORS, stop_loss=0.1)  # the authors' settings, stopped at loss 0.1
    try:
        post = kne.evaluate(model, tok, [req], pre=pre).summary()
        assert post["edit_succ"] == 1.0
        assert post["rephrase"] == 1.0
        assert post["locality"] == 1.0
        assert greedy(model, tok, DEMO_PROMPT).strip().startswith(DEMO_TARGET)
        for u in UNRELATED:
            assert greedy(model, tok, u) == before[u], u
        st = res.stats
        assert 0 < st["steps"] <= 30 and st["losses"][-1] < 0.1 and st["stopped_early"]
        assert st["neurons"] == len(res.ensemble) > 0
        assert 0 < st["param_fraction"] < 0.01
        assert abs(st["target_param_fraction"] - 0.01) < 0.002  # p = 99 keeps about 1% of down_proj
        assert all(p.grad is None for p in model.parameters())
    finally:
        res.restore()
    assert_same(model, snap)


@pytest.mark.parametrize("name", ["zsre", "counterfact", "recent"])
def test_three_knowedit_records_edit_with_success(embedded, name):
    model, tok = embedded
    snap = snapshot(model)
    for req in kne.datasets.knowedit(name, limit=3):
        pre = kne.evaluate(model, tok, [req])
        res = kne.fast_edit(model, tok, [req], AUTHORS)
        try:
            s = kne.evaluate(model, tok, [req], pre=pre).summary()
            assert s["edit_succ"] == 1.0, (req.prompt, req.target_new, res.stats["losses"][-3:])
            if req.locality:
                assert s["locality"] is not None and 0.0 <= s["locality"] <= 1.0
        finally:
            res.restore()
        assert_same(model, snap)


def test_dataset_level_ensemble_sequential_edits(embedded, tmp_path):
    model, tok = embedded
    snap = snapshot(model)
    reqs = kne.datasets.knowedit("counterfact", limit=4)
    ens = kne.locate(model, tok, reqs)
    path = ens.save(tmp_path / "ens.json")
    ens2 = kne.Ensemble.load(path)
    assert ens2.to_knb_dict() == ens.to_knb_dict()
    results = []
    try:
        for r in reqs[:2]:
            results.append(kne.fast_edit(model, tok, [r], AUTHORS, ensemble=ens2))
            assert results[-1].stats["locate_seconds"] == 0.0
        s = kne.evaluate(model, tok, reqs[:2]).summary()
        assert s["edit_succ"] >= 0.5
    finally:
        for res in reversed(results):
            res.restore()
    assert_same(model, snap)


def test_non_finite_loss_restores_model(embedded, monkeypatch):
    model, tok = embedded
    snap = snapshot(model)
    # the edit's loss comes from kne.objective.EditObjective (kne.editing.edit_loss is no longer on the
    # edit's path since the preservation objective: patching it poisoned nothing, the edit completed
    # and left this session-wide model edited for every later test)
    real = kne.objective.EditObjective.__call__
    calls = {"n": 0}

    def poisoned(self, logits, penalty=None):
        calls["n"] += 1
        loss, done = real(self, logits, penalty)
        return (loss * float("nan"), done) if calls["n"] == 3 else (loss, done)

    monkeypatch.setattr(kne.objective.EditObjective, "__call__", poisoned)
    with pytest.raises(kne.EditError, match="nan"):
        res = kne.fast_edit(model, tok, {"prompt": DEMO_PROMPT, "target_new": DEMO_TARGET}, AUTHORS, stop_loss=0.0)
        res.restore()  # only reached when the test fails: keep the shared model clean
    assert calls["n"] == 3
    assert_same(model, snap)
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules()), "a hook was left behind"


def test_interrupted_edit_restores_model(embedded):
    model, tok = embedded
    snap = snapshot(model)

    def interrupt(step, loss):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        res = kne.fast_edit(model, tok, {"prompt": DEMO_PROMPT, "target_new": DEMO_TARGET}, AUTHORS, on_step=interrupt)
        res.restore()  # only reached when the test fails: keep the shared model clean
    assert_same(model, snap)
    assert all(not m._forward_hooks for m in model.modules())


def test_ft_m_baseline(embedded):
    model, tok = embedded
    snap = snapshot(model)
    req = kne.datasets.knowedit("counterfact", limit=1)[0]
    pre = kne.evaluate(model, tok, [req])
    res = kne.baselines.ft_m(model, tok, [req])
    try:
        assert res.stats["layers"] == [20]  # round(30 * 21 / 32)
        assert res.stats["params_edited"] == 576 * 1536
        s = kne.evaluate(model, tok, [req], pre=pre).summary()
        assert s["edit_succ"] == 1.0
        changed = not torch.equal(model.model.layers[20].mlp.down_proj.weight, snap["model.layers.20.mlp.down_proj.weight"])
        assert changed
    finally:
        res.restore()
    assert_same(model, snap)


def test_fast_and_reference_agree_on_embedded_model(embedded):
    """The fast path and the reference agree on the real model too (same ensemble, dropout 0)."""
    model, tok = embedded
    snap = snapshot(model)
    req = {"prompt": DEMO_PROMPT, "target_new": DEMO_TARGET}
    kw = dict(dropout=0.0, steps=4, stop_loss=0.0)
    a = kne.fast_edit(model, tok, req, AUTHORS, **kw)
    wa = model.model.layers[5].mlp.down_proj.weight.detach().clone()
    a.restore()
    b = kne.reference.edit(model, tok, req, AUTHORS, ensemble=a.ensemble, **kw)
    wb = model.model.layers[5].mlp.down_proj.weight.detach().clone()
    b.restore()
    assert_same(model, snap)
    la, lb = torch.tensor(a.stats["losses"]), torch.tensor(b.stats["losses"])
    assert torch.allclose(la, lb, rtol=1e-4, atol=0)
    assert (wa - wb).abs().max() <= 1e-4 * wb.abs().max()
