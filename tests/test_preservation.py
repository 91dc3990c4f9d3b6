"""Preservation (issue: local edits): neighbour KL, stop rules, L2, null-space projection.

* the fast path agrees with the reference with every lever on (losses per step, final rows);
* the levers off give the edits of kne 0.2.0 bit for bit (a checked-in trace, tools/golden_edits.py);
* neighbours: templates, the same-relation filter, explicit prompts, the subject-less fallback;
* stop rules and the L2 term do what they say;
* the projection keeps the edited module's outputs on every neighbour token unchanged, and the
  corpus statistics are cached per model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

import kne
import kne_kernels
from kne import nullspace, preservation
from kne.requests import EditRequest

from helpers import AUTHORS, assert_state_equal, cpu_fingerprint, rel_err, snapshot, worst

TOL = 1e-4
KERNEL_BACKENDS = ("cpu", "torch", "triton")
REQ = {"prompt": "The capital of France is", "target_new": "Rome", "subject": "France", "ground_truth": "Paris"}
# forced steps, no dropout: every step of both implementations is compared
EDIT_KW = dict(dropout=0.0, stop_loss=0.0, steps=6, lr=2.5e-3, alpha=8.0, percentile=80.0, preserve_count=4)


@pytest.fixture
def small_cache(tmp_path, monkeypatch):
    """The null-space statistics go to a fresh cache folder."""
    monkeypatch.setenv("KNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _corpus_prompts():
    return ["Paris is the capital of", "The Eiffel Tower is in", "Tokyo is a city in", "Gold is a"]


# The tiny models' FFN is 48 wide: a few short neighbours leave most key directions free to edit
# (the templates' ~40 byte-tokens each would span them all and the projection would erase the edit).
SHORT = ["Gold is", "Rome,"]


def _pair(tiny_model, tok, seed, backend, preserve_prompts=None, **kw):
    fast_model = tiny_model("llama", seed=seed % 10_000)
    ref_model = copy.deepcopy(fast_model)
    orig = snapshot(fast_model)
    cfg = kne.KNEConfig(**dict(EDIT_KW, backend=backend, **kw))
    fast = kne.fast_edit(fast_model, tok, REQ, cfg, preserve_prompts=preserve_prompts)
    ref = kne.reference.edit(ref_model, tok, REQ, cfg, preserve_prompts=preserve_prompts)
    return fast_model, ref_model, fast, ref, orig


def _check(fast_model, ref_model, fast, ref, orig):
    lf, lr_ = fast.stats["losses"], ref.stats["losses"]
    assert len(lf) == len(lr_) == EDIT_KW["steps"] + 1
    for i, (a, b) in enumerate(zip(lf, lr_)):
        assert abs(a - b) <= TOL * abs(b), f"step {i}: fast loss {a} vs reference {b}"
    assert lf[-1] < lf[0]
    assert fast.stats["neighbours"] == ref.stats["neighbours"]
    fs, rs = fast_model.state_dict(), ref_model.state_dict()
    moved = 0
    for k, r in rs.items():
        assert rel_err(fs[k], r) <= TOL, f"{k}: {rel_err(fs[k], r):.3g}; {worst(fs[k], r)}"
        if not torch.equal(r, orig[k]):
            moved += 1
            df, dr = fs[k] - orig[k], r - orig[k]
            assert rel_err(df, dr) <= 1e-3, f"{k}: weight change differs, {rel_err(df, dr):.3g}"
    assert moved


# ---------------------------------------------------------------------------------------------- fast == reference
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", [
    dict(preserve_weight=5.0),
    dict(preserve_weight=5.0, preserve_prompt_positions=True, delta_l2=0.5),
    dict(preserve_weight=2.0, neuron_axis="in", delta_init="kaiming"),
    dict(project=True, project_corpus=False, preserve_prompts=SHORT),
    dict(project=True, project_corpus=False, preserve_weight=3.0, weight_decay=0.01, preserve_prompts=SHORT),
    dict(project=True, project_corpus=False, preserve_weight=4.0, preserve_answer_end=True, preserve_prompts=SHORT),
    dict(optimizer="ngd", lr=0.05, preserve_weight=2.0, neuron_axis="in"),
    dict(optimizer="ngd", lr=0.05, ngd_momentum=0.5, project=True, project_corpus=False, preserve_weight=4.0,
         preserve_answer_end=True, preserve_prompts=SHORT),
], ids=["kl", "kl+prompt+l2", "kl-columns-kaiming", "project", "project+kl", "project+answer-end", "ngd-columns-kl",
        "ngd+project+answer-end"])
def test_fast_matches_reference_with_preservation(case, backend, tiny_model, tok, seed):
    live, why = kne_kernels.status(backend, "cpu")
    assert live, why
    fm, rm, fast, ref, orig = _pair(tiny_model, tok, seed, backend, **case)
    _check(fm, rm, fast, ref, orig)
    if case.get("preserve_weight"):
        # a KL near 0 (1e-5 nats) is a difference of near-equal log-probabilities: its rounding depends
        # on the CPU the C++ kernels were built for (4e-7 seen on one machine), so 1e-6 nats absolute
        assert fast.stats["preserve_kl"] == pytest.approx(ref.stats["preserve_kl"], rel=1e-3, abs=1e-6)
        assert fast.stats["neighbor_flips"] == ref.stats["neighbor_flips"]
        assert len(fast.stats["preserve_kls"]) == len(fast.stats["losses"])
        if case.get("project"):  # the projection keeps every neighbour; the KL holds none of them
            assert fast.stats["kl_neighbours"] == [] and fast.stats["neighbor_flips"] is None
            assert fast.stats["neighbours"]
        else:
            assert fast.stats["kl_neighbours"] == fast.stats["neighbours"]
            assert 0.0 <= fast.stats["neighbor_flips"] <= 1.0
    fast.restore()
    assert_state_equal(fm, orig, "fast model after restore()")


@pytest.mark.parametrize("rule, extra", [("margin", {"stop_margin": 0.05}), ("argmax", {})])
def test_fast_and_reference_stop_at_the_same_step(rule, extra, tiny_model, tok, seed):
    """The stop rules live in the objective both share: with the local preset's kind of edit (ngd,
    projection, the KL at the answer's end) fast_edit and the reference stop at the same step, with
    the same losses on the way."""
    fm, rm, fast, ref, orig = _pair(tiny_model, tok, seed, "cpu", preserve_prompts=SHORT, steps=300, lr=5e-2,
                                    percentile=50.0, optimizer="ngd", project=True, project_corpus=False,
                                    preserve_weight=2.0, preserve_answer_end=True, stop_rule=rule, **extra)
    assert fast.stats["stopped_early"] and ref.stats["stopped_early"], rule
    assert fast.stats["steps"] == ref.stats["steps"]
    for i, (a, b) in enumerate(zip(fast.stats["losses"], ref.stats["losses"])):
        assert abs(a - b) <= TOL * abs(b), f"step {i}: fast loss {a} vs reference {b}"
    fast.restore()
    assert_state_equal(fm, orig, "fast model after restore()")


def test_fast_matches_reference_with_corpus_projection(tiny_model, tok, seed, small_cache):
    stats = nullspace.build(tiny_model("llama", seed=seed % 10_000), tok, prompts=_corpus_prompts(), new_tokens=6,
                            progress=False)
    assert stats.meta["tokens"] > 0
    # the edit builds (or loads) the statistics of the default corpus; point it at the small one
    fm, rm, fast, ref, orig = None, None, None, None, None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(preservation, "training_prompts", _corpus_prompts)
        fm, rm, fast, ref, orig = _pair(tiny_model, tok, seed, "cpu", project=True, project_threshold=0.3,
                                        preserve_prompts=SHORT)
    _check(fm, rm, fast, ref, orig)


# ---------------------------------------------------------------------------------------------- levers off == 0.2.0
GOLDEN_FILE = Path(__file__).parent / "data" / "golden_edits.json"


def _golden():
    return json.loads(GOLDEN_FILE.read_text())


def _state_hash(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _golden_wants(name):
    """Every record of ``name``: this CPU's first (``machines``, by :func:`helpers.cpu_fingerprint`),
    then the first one made (``cases``), then the other CPUs'. Two CPUs whose fingerprints differ
    may still round alike (a flag that no kernel reads), so an edit that equals any record of kne
    0.2.0's is kne 0.2.0's edit: a change of the code would not land on another CPU's last bits."""
    g = _golden()
    machines = g.get("machines", {})
    here = cpu_fingerprint()
    out = [(here, machines[here]["cases"][name])] if here in machines else []
    out.append(("the first record", g["cases"][name]))
    out += [(k, m["cases"][name]) for k, m in machines.items() if k != here]
    return out


def _golden_case(name, model, tok):
    preset = name.split("/")[1]
    over = {"percentile": 80.0, "steps": 6} if name.startswith("tiny") else {}
    res = kne.fast_edit(model, tok, REQ, kne.KNEConfig.preset(preset, backend="cpu", **over))
    try:
        got = {"losses": [float(x).hex() for x in res.stats["losses"]], "steps": res.stats["steps"],
               "state_sha256": _state_hash(model)}
    finally:  # the embedded model is shared by the session's tests: a failure here must not edit theirs
        res.restore()
    wants = _golden_wants(name)
    if any(all(got[k] == want[k] for k in got) for _, want in wants):
        return
    label, want = wants[0]  # none matches: show the difference from this CPU's record (else the first)
    assert got["losses"] == want["losses"], f"{name} (against {label})"
    assert got["steps"] == want["steps"], f"{name} (against {label})"
    assert got["state_sha256"] == want["state_sha256"], \
        f"{name}: the edited weights differ from kne 0.2.0's (against {label}; another CPU: tools/golden_edits.py)"


def _same_torch():
    return torch.__version__.split("+")[0] == _golden()["made_with"]["torch"]


@pytest.mark.skipif(not _same_torch(), reason="the golden edits were recorded with another torch version")
@pytest.mark.parametrize("preset", ["authors", "tuned"])
def test_presets_without_preservation_edit_as_kne_0_2_0_did(preset, tok):
    from conftest import build_tiny_model

    _golden_case(f"tiny-llama/{preset}", build_tiny_model("llama", tok, seed=3), tok)


@pytest.mark.skipif(not _same_torch(), reason="the golden edits were recorded with another torch version")
def test_the_golden_check_fails_when_no_record_matches(tok, tmp_path, monkeypatch):
    """Every record's weights changed by one bit of their digest: the edit matches none, and fails."""
    from conftest import build_tiny_model

    g = _golden()
    flip = lambda h: ("0" if h[0] != "0" else "1") + h[1:]  # noqa: E731
    g["cases"]["tiny-llama/tuned"]["state_sha256"] = flip(g["cases"]["tiny-llama/tuned"]["state_sha256"])
    for m in g.get("machines", {}).values():
        m["cases"]["tiny-llama/tuned"]["state_sha256"] = flip(m["cases"]["tiny-llama/tuned"]["state_sha256"])
    path = tmp_path / "golden.json"
    path.write_text(json.dumps(g))
    monkeypatch.setattr(sys.modules[__name__], "GOLDEN_FILE", path)
    with pytest.raises(AssertionError, match="tiny-llama/tuned"):
        _golden_case("tiny-llama/tuned", build_tiny_model("llama", tok, seed=3), tok)


@pytest.mark.slow
@pytest.mark.skipif(not _same_torch(), reason="the golden edits were recorded with another torch version")
@pytest.mark.parametrize("preset", ["authors", "tuned"])
def test_presets_on_the_embedded_model_edit_as_kne_0_2_0_did(preset, embedded):
    model, tok = embedded
    _golden_case(f"smollm2/{preset}", model, tok)


def test_preserve_weight_zero_is_the_plain_edit(tiny_model, tok, seed):
    """``preserve_weight=0`` with the other levers at their defaults runs the plain edit exactly."""
    a, b = tiny_model("llama", seed=seed % 10_000), tiny_model("llama", seed=seed % 10_000)
    kw = dict(EDIT_KW, stop_loss=0.05, steps=10)
    ra = kne.fast_edit(a, tok, REQ, AUTHORS, **kw)
    rb = kne.fast_edit(b, tok, REQ, AUTHORS, **dict(kw, preserve_weight=0.0, preserve_count=99, stop_rule="loss",
                                           delta_l2=0.0, project=False))
    assert ra.stats["losses"] == rb.stats["losses"]
    assert_state_equal(a, snapshot(b))
    assert "neighbours" not in ra.stats and "preserve_kl" not in ra.stats


# ---------------------------------------------------------------------------------------------- neighbours
def test_neighbours_fill_templates_with_the_subject_and_drop_the_edited_relation():
    req = EditRequest(prompt="The place of birth of Ada Lovelace is", target_new="Paris", subject="Ada Lovelace")
    kept, dropped = preservation.neighbour_prompts(req, 12)
    assert len(kept) == 12 + len(preservation.GENERIC_TEMPLATES)
    assert all("Ada Lovelace" in p for p in kept)
    assert "The place of birth of Ada Lovelace is" not in kept
    assert "The place of birth of Ada Lovelace is" in dropped
    assert "The gender of Ada Lovelace is" in kept and "Ada Lovelace," in kept
    # the edit's own relation asked of other subjects: subjects the training records ask it of
    kept, _ = preservation.neighbour_prompts(req, 12, other_count=3)
    others = [p for p in kept if "Ada Lovelace" not in p]
    assert len(others) == 3 and all(p.startswith("The place of birth of ") for p in others)
    births = preservation.template_subjects()["The place of birth of {} is"]
    assert others[0] == f"The place of birth of {births[0]} is"
    # other wording of the same relation is recognised by its relation words
    assert preservation.same_relation("The place of birth of {} is", "Where was Ada Lovelace born? Her place of birth:",
                                      "Ada Lovelace")
    assert preservation.same_relation("The name of the country of citizenship of {} is",
                                      "Which country's citizenship does Ada Lovelace hold?", "Ada Lovelace")
    assert not preservation.same_relation("The gender of {} is", "The place of birth of Ada Lovelace is",
                                          "Ada Lovelace")
    assert preservation.same_relation("The name of the capital city of the country {} is associated with is",
                                      "The capital of France is", "France")
    assert not preservation.same_relation("The official language of {} is", "The capital of France is", "France")


def test_templates_come_from_training_records_only():
    data = json.loads((Path(preservation.__file__).parent / "data" / "preservation.json").read_text())
    assert "records 100+" in data["source"]
    assert len(preservation.templates()) >= 32 and all(t.count("{}") == 1 for t in preservation.templates())
    assert len(preservation.training_prompts()) >= 512


def test_request_without_subject_falls_back_with_a_warning(tiny_model, tok, seed):
    bare = EditRequest(prompt="The capital of France is", target_new="Rome")
    with pytest.warns(UserWarning, match="the other requests' neighbours"):
        kept, _ = preservation.neighbour_prompts(bare, 2, others=["Turing,", "Turing was", "x"])
    assert kept == ["Turing,", "Turing was"]
    with pytest.warns(UserWarning, match="shipped training prompts"):
        kept, _ = preservation.neighbour_prompts(bare, 4)
    assert kept == preservation.training_prompts()[:4]
    # in one call: the subject-less request takes the other request's neighbours, and no prompt the
    # call edits is ever preserved
    model = tiny_model("llama", seed=seed % 10_000)
    other = {"prompt": "Alan Turing was born in", "target_new": "New York City", "subject": "Alan Turing"}
    with pytest.warns(UserWarning, match="has no subject"):
        res = kne.fast_edit(model, tok, [bare, other], AUTHORS, **dict(EDIT_KW, preserve_weight=1.0, preserve_others=2))
    got = set(res.stats["neighbours"]) | set(res.stats["neighbours_dropped"])
    # Turing's neighbours: templates with his name, and his own prompt asked of other subjects
    assert got and all("Alan Turing" in p or p.endswith(" was born in") for p in got)
    assert any(p.endswith(" was born in") and "Alan Turing" not in p for p in got)
    assert not got & {bare.prompt, other["prompt"]}


def test_explicit_preserve_prompts_are_used_as_given(tiny_model, tok, seed):
    model = tiny_model("llama", seed=seed % 10_000)
    prompts = ["The capital of Japan is", "Gold is a"]
    res = kne.fast_edit(model, tok, REQ, AUTHORS, preserve_prompts=prompts, **dict(EDIT_KW, preserve_weight=1.0))
    assert res.stats["neighbours"] == prompts
    with pytest.raises(ValueError, match="preserve_weight"):
        kne.fast_edit(model, tok, REQ, AUTHORS, preserve_prompts=prompts, **EDIT_KW)
    with pytest.raises(ValueError, match="list of non-empty"):
        kne.fast_edit(model, tok, REQ, AUTHORS, preserve_prompts="Gold is a", **dict(EDIT_KW, preserve_weight=1.0))


def test_neighbour_predicting_the_old_answer_is_dropped(tiny_model, tok, seed):
    """A neighbour whose top token before the edit is the old answer's first token asks the edited
    relation: it is not preserved."""
    model = tiny_model("llama", seed=seed % 10_000)
    from kne.objective import EditObjective
    from kne._utils import logits_at

    cfg = kne.KNEConfig(**dict(EDIT_KW, preserve_weight=1.0))
    obj = EditObjective(tok, kne.requests.as_requests(REQ), cfg, "cpu")
    nb = list(obj.preservation.prompts)
    with torch.no_grad():
        sel = obj.preservation.selection()
        logits = logits_at(model, obj.preservation.input_ids, obj.preservation.attention_mask, *sel)
    top = logits[obj.preservation.num_edit_positions:][: len(nb)].argmax(-1)
    # make the first neighbour's top token the old answer's first token
    obj.preservation.old_answer_tokens = [int(top[0])] + [None] * (len(nb) - 1)
    obj.capture(lambda *s: logits_at(model, *s))
    assert obj.preservation.prompts == nb[1:]
    assert nb[0] in obj.preservation.dropped
    assert obj.preservation.logp_before.shape[0] == len(nb) - 1
    assert obj.batch.input_ids.shape[0] == 1 + len(nb) - 1


# ---------------------------------------------------------------------------------------------- stop rules, L2
def test_stop_rules(tiny_model, tok, seed):
    """Each rule stops the edit once it holds (a tiny random model cannot become confident: its
    output projection is small, so the thresholds are low)."""
    kw = dict(EDIT_KW, steps=300, lr=5e-2, stop_loss=0.0, percentile=50.0)
    model = tiny_model("llama", seed=seed % 10_000)
    from kne._text import encode

    batch = encode(tok, [REQ["prompt"]], [REQ["target_new"]])
    from kne._text import answer_margins

    for rule, extra in (("argmax", {}), ("min_prob", {"stop_prob": 0.005}), ("loss", {"stop_loss": 5.2}),
                        ("margin", {"stop_margin": 0.05})):
        res = kne.fast_edit(model, tok, REQ, AUTHORS, **dict(kw, stop_rule=rule, **extra))
        assert res.stats["stopped_early"], rule
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=batch.input_ids).logits[batch.rows, batch.cols - 1], -1)
        if rule == "argmax":
            assert bool((lp.argmax(-1) == batch.targets).all())
        elif rule == "min_prob":
            assert float(lp.gather(1, batch.targets[:, None]).exp().min()) >= 0.005 * (1 - 1e-4)
        elif rule == "margin":
            assert float(answer_margins(lp, batch).min()) >= 0.05 - 1e-4
        else:
            assert res.stats["losses"][-1] < 5.2
        res.restore()
    # a stricter threshold takes at least as many steps
    a = kne.fast_edit(model, tok, REQ, AUTHORS, **dict(kw, stop_rule="min_prob", stop_prob=0.0045))
    steps_a = a.stats["steps"]
    a.restore()
    b = kne.fast_edit(model, tok, REQ, AUTHORS, **dict(kw, stop_rule="min_prob", stop_prob=0.006))
    assert steps_a <= b.stats["steps"]
    b.restore()
    # a margin of 0 stops where the argmax rule does (ties aside, which random logits do not make)
    c = kne.fast_edit(model, tok, REQ, AUTHORS, **dict(kw, stop_rule="margin", stop_margin=0.0))
    steps_c = c.stats["steps"]
    c.restore()
    d = kne.fast_edit(model, tok, REQ, AUTHORS, **dict(kw, stop_rule="argmax"))
    assert steps_c == d.stats["steps"]
    d.restore()


def test_answer_margins_against_a_sort():
    """``answer_margins``: the answer token's logit minus the best other, full or selected logits."""
    from kne._text import Batch
    from kne._text import answer_margins

    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 5, 11, generator=g)
    ids = torch.randint(0, 11, (3, 5), generator=g)
    rows, cols = torch.tensor([0, 0, 1, 2]), torch.tensor([2, 3, 4, 1])
    b = Batch(ids, torch.ones_like(ids), rows, cols, [2, 1, 1])
    logits[1, 3, ids[1, 4]] = 50.0  # a clear argmax: its margin is positive
    got = answer_margins(logits, b)
    sel = logits[rows, cols - 1]
    for i in range(4):
        t = int(ids[rows[i], cols[i]])
        others = torch.cat([sel[i, :t], sel[i, t + 1:]])
        assert float(got[i]) == pytest.approx(float(sel[i, t] - others.max()), abs=1e-6)
    assert float(got[2]) > 0
    assert torch.equal(answer_margins(sel, b), got)


def test_delta_l2_shrinks_the_change(tiny_model, tok, seed):
    norms = []
    for l2 in (0.0, 50.0):
        model = tiny_model("llama", seed=seed % 10_000)
        orig = snapshot(model)
        res = kne.fast_edit(model, tok, REQ, AUTHORS, **dict(EDIT_KW, delta_l2=l2))
        norms.append(sum(float((v - orig[k]).pow(2).sum()) for k, v in model.state_dict().items()))
        res.restore()
    assert norms[1] < norms[0]


def test_kl_keeps_neighbours_closer(tiny_model, tok, seed):
    kls = []
    for w in (1e-6, 20.0):
        model = tiny_model("llama", seed=seed % 10_000)
        res = kne.fast_edit(model, tok, REQ, AUTHORS, **dict(EDIT_KW, preserve_weight=w, steps=15, lr=1e-2))
        kls.append(res.stats["preserve_kl"])
        res.restore()
    assert kls[1] < kls[0]


def test_answer_end_keeps_what_follows_the_answer(tiny_model, tok, seed):
    """preserve_answer_end: the KL reads each edit sequence's last answer token (once, after the
    neighbours), its p_before is the unedited model's prediction there, and a heavy weight keeps
    that prediction closer than a negligible one."""
    from kne._text import encode
    from kne.objective import EditObjective

    model = tiny_model("llama", seed=seed % 10_000)
    cfg = kne.KNEConfig(**dict(EDIT_KW, preserve_weight=1.0, preserve_answer_end=True))
    req = EditRequest.from_dict(REQ)
    obj = EditObjective(tok, [req], cfg, torch.device("cpu"), preserve_prompts=SHORT)
    pres = obj.preservation
    batch = encode(tok, [req.prompt], [req.target_new])
    end = int(batch.attention_mask[0].sum()) - 1  # the answer's last token
    assert (int(pres.rows[-1]), int(pres.pos[-1])) == (0, end)
    assert pres.rows.numel() == pres.num_neighbours + 1
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[0, end]
        obj.capture(lambda ids, mask, rows, pos: model(input_ids=ids, attention_mask=mask).logits[rows, pos])
    torch.testing.assert_close(obj.preservation.logp_before[-1], torch.log_softmax(logits.float(), -1))

    def after(w):
        m = tiny_model("llama", seed=seed % 10_000)
        res = kne.fast_edit(m, tok, REQ, AUTHORS, **dict(EDIT_KW, preserve_weight=w, preserve_answer_end=True,
                                               preserve_prompts=["Gold is"], steps=15, lr=1e-2))
        with torch.no_grad():
            lp = torch.log_softmax(m(input_ids=batch.input_ids).logits[0, end].float(), -1)
        res.restore()
        return float(torch.sum(torch.exp(lp0) * (lp0 - lp)))

    lp0 = torch.log_softmax(logits.float(), -1)
    assert after(50.0) < after(1e-6)


# ---------------------------------------------------------------------------------------------- projection
def test_projection_leaves_the_module_output_on_every_neighbour_token_unchanged(tiny_model, tok, seed):
    model = tiny_model("llama", seed=seed % 10_000)
    orig = snapshot(model)
    kw = dict(EDIT_KW, project=True, project_corpus=False, lr=1e-2)
    res = kne.fast_edit(model, tok, REQ, AUTHORS, preserve_prompts=SHORT, **kw)
    pres = preservation.build_preservation(tok, kne.requests.as_requests(REQ), res.config, "cpu", SHORT)
    sites = [s for s, _ in res.ensemble.sites(model)]
    res.restore()
    with nullspace.KeyCapture(sites, pres.neighbour_rows(), pres.attention_mask) as kc, torch.no_grad():
        model(input_ids=pres.input_ids, attention_mask=pres.attention_mask)
    kept = torch.tensor([p in res.stats["neighbours"] for p in pres.prompts])
    keys = kc.keys(kept)
    res2 = kne.fast_edit(model, tok, REQ, AUTHORS, ensemble=res.ensemble, preserve_prompts=SHORT, **kw)
    assert res2.stats["losses"][-1] < res2.stats["losses"][0]
    for site, k in zip(sites, keys):
        w_new = site.weight().detach().double()
        w_old = orig[site.path + ".weight"].double()
        change = (w_new - w_old) @ k.double().t()
        moved = (w_new - w_old).abs().max()
        assert moved > 0
        assert float(change.abs().max()) <= 1e-4 * float(moved) * float(k.abs().max()) * k.shape[1], site.path
    res2.restore()
    assert_state_equal(model, orig)


# A short earlier edit for keep=: its prompt + answer and its neighbour leave most of the tiny
# models' 48 key directions free for the next edit.
EARLIER = {"prompt": "Tin is", "target_new": "red", "subject": "Tin"}


def _earlier(model, tok, **kw):
    return kne.fast_edit(model, tok, EARLIER, AUTHORS, preserve_prompts=["Rome,"], **kw)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_fast_matches_reference_keeping_an_earlier_edit(backend, tiny_model, tok, seed):
    model = tiny_model("llama", seed=seed % 10_000)
    kw = dict(EDIT_KW, project=True, project_corpus=False, backend=backend)
    first = _earlier(model, tok, **kw)
    ref_model = copy.deepcopy(model)
    orig = snapshot(model)
    fast = kne.fast_edit(model, tok, REQ, AUTHORS, preserve_prompts=SHORT, keep=[first], **kw)
    ref = kne.reference.edit(ref_model, tok, REQ, AUTHORS, preserve_prompts=SHORT, keep=[first], **kw)
    assert fast.stats["kept_sequences"] == ref.stats["kept_sequences"] == 2
    _check(model, ref_model, fast, ref, orig)
    plain = copy.deepcopy(ref_model)  # the same edit without keep moves other weights
    fast.restore()
    assert_state_equal(model, orig)
    without = kne.fast_edit(model, tok, REQ, AUTHORS, preserve_prompts=SHORT, **kw)
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    without.restore()
    first.restore()


@pytest.mark.parametrize("positions", ["answer", "all"])
def test_keep_leaves_the_earlier_edit_and_its_neighbours_alone(positions, tiny_model, tok, seed):
    """A later edit given keep=[earlier] changes no edited module's output on the earlier edit's
    answer positions (or, keep_positions="all", every position of its prompt and answer) or on the
    last token of the neighbours it kept (keys read after the earlier edit)."""
    model = tiny_model("llama", seed=seed % 10_000)
    kw = dict(EDIT_KW, project=True, project_corpus=False, lr=1e-2, keep_positions=positions, keep_rtol=1e-6)
    first = _earlier(model, tok, **kw)
    seqs = nullspace.kept_texts([first], tok, first.config)
    n_prompt, n_answer, n_nb = (len(tok(t, add_special_tokens=False)["input_ids"]) for t in ("Tin is", " red", "Rome,"))
    # the positions predicting the answer ("Tin is| re|d") or all of "Tin is re|d", then the neighbour's last token
    n = n_prompt + n_answer - 1
    assert [(len(i), a, b) for i, a, b in seqs] == [(n, n_prompt - 1 if positions == "answer" else 0, n),
                                                    (n_nb, n_nb - 1, n_nb)]
    after_first = snapshot(model)
    loc = kne.locate(model, tok, REQ, kne.KNEConfig(**kw))
    sites = [s for s, _ in loc.sites(model)]
    keys = nullspace.kept_keys(model, tok, sites, seqs)
    assert all(k.shape[0] == sum(b - a for _, a, b in seqs) for k in keys)
    second = kne.fast_edit(model, tok, REQ, AUTHORS, ensemble=loc, preserve_prompts=SHORT, keep=[first], **kw)
    assert second.stats["losses"][-1] < second.stats["losses"][0]
    for site, k in zip(sites, keys):
        d = site.weight().detach().double() - after_first[site.path + ".weight"].double()
        assert d.abs().max() > 0
        change = d @ k.double().t()
        assert float(change.abs().max()) <= 1e-4 * float(d.abs().max()) * float(k.abs().max()) * k.shape[1], site.path
    second.restore()
    # without keep the same edit does move those outputs
    third = kne.fast_edit(model, tok, REQ, AUTHORS, ensemble=loc, preserve_prompts=SHORT, **kw)
    worst_change = max(float(((s.weight().detach().double() - after_first[s.path + ".weight"].double())
                              @ k.double().t()).abs().max()) for s, k in zip(sites, keys))
    assert worst_change > 1e-3
    third.restore()
    first.restore()


def test_keep_errors(tiny_model, tok, seed):
    model = tiny_model("llama", seed=seed % 10_000)
    orig = snapshot(model)
    kw = dict(EDIT_KW, project=True, project_corpus=False)
    first = _earlier(model, tok, **kw)
    with pytest.raises(ValueError, match="keep= needs the null-space projection"):
        kne.fast_edit(model, tok, REQ, AUTHORS, keep=[first], **dict(kw, project=False))
    for bad, msg in [(first, "must be a list"), ("Tin is", "must be a list"), ([3], "keep holds a int"),
                     ([""], "empty prompt"), (7, "must be a list")]:
        for edit in (kne.fast_edit, kne.reference.edit):
            with pytest.raises(ValueError, match=msg):
                edit(model, tok, REQ, AUTHORS, preserve_prompts=SHORT, keep=bad, **kw)
    first.restore()
    assert_state_equal(model, orig)
    with pytest.raises(ValueError, match="which was restored"):
        kne.fast_edit(model, tok, REQ, AUTHORS, preserve_prompts=SHORT, keep=[first], **kw)
    # a failure while reading the earlier edits' keys leaves the model as the earlier edit left it
    first = _earlier(model, tok, **kw)
    after_first = snapshot(model)

    def broken(*a, **k):
        raise RuntimeError("injected")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nullspace, "kept_keys", broken)
        with pytest.raises(RuntimeError, match="injected"):
            kne.fast_edit(model, tok, REQ, AUTHORS, preserve_prompts=SHORT, keep=[first], **kw)
    assert_state_equal(model, after_first)
    first.restore()
    assert_state_equal(model, orig)
    # strings are kept too (their last token)
    res = kne.fast_edit(model, tok, REQ, AUTHORS, preserve_prompts=SHORT, keep=["Tin is red"], **kw)
    assert res.stats["kept_sequences"] == 1
    res.restore()
    assert_state_equal(model, orig)


def test_projection_needs_rows():
    with pytest.raises(ValueError, match="null space is empty"):
        kne.KNEConfig(project=True, neuron_axis="in")


def test_corpus_statistics_are_cached_per_model(tiny_model, tok, seed, small_cache):
    model = tiny_model("llama", seed=seed % 10_000)
    assert nullspace.load(model, prompts=_corpus_prompts(), new_tokens=4) is None
    s1 = nullspace.build(model, tok, prompts=_corpus_prompts(), new_tokens=4, progress=False)
    vals, vecs = s1.eig("mlp.down_proj", 1)
    assert vals.shape == (vecs.shape[0],) and bool((vals[1:] >= vals[:-1]).all())
    assert torch.allclose(vecs.t() @ vecs, torch.eye(vecs.shape[0]), atol=1e-5)
    again = nullspace.load(model, prompts=_corpus_prompts(), new_tokens=4)
    assert again is not None and again.folder == s1.folder
    # an FFN edit keeps the key; another model gets another one
    key = nullspace.model_key(model, ["mlp.down_proj", "mlp.up_proj", "mlp.gate_proj"])
    res = kne.fast_edit(model, tok, REQ, AUTHORS, **EDIT_KW)
    assert nullspace.model_key(model, ["mlp.down_proj", "mlp.up_proj", "mlp.gate_proj"]) == key
    res.restore()
    other = tiny_model("llama", seed=seed % 10_000 + 1)
    assert nullspace.load(other, prompts=_corpus_prompts(), new_tokens=4) is None
    # a basis above a (relative) threshold is orthonormal and keeps the large-eigenvalue directions
    B = s1.basis("mlp.down_proj", 1, float(vals.median() / vals.max()))
    assert B.shape[1] == int((vals > vals.median()).sum())
    assert torch.allclose(B.t() @ B, torch.eye(B.shape[1]), atol=1e-5)


# ---------------------------------------------------------------------------------------------- FT-M + KL
def test_ft_m_with_the_neighbour_kl(tiny_model, tok, seed):
    """FT-M's baseline with kne's neighbour KL: without it FT-M is unchanged; with it the KL is in the
    loss (the first loss equals FT-M's: p_after == p_before), neighbours kept closer."""
    a, b = tiny_model("llama", seed=seed % 10_000), tiny_model("llama", seed=seed % 10_000)
    plain = kne.baselines.ft_m(a, tok, REQ, lr=5e-3, steps=8, stop_loss=0.0)
    kl = kne.baselines.ft_m(b, tok, REQ, lr=5e-3, steps=8, stop_loss=0.0, preserve_weight=50.0, preserve_count=4)
    assert "neighbours" not in plain.stats and kl.stats["neighbours"]
    assert kl.stats["losses"][0] == pytest.approx(plain.stats["losses"][0], rel=1e-6)
    assert kl.stats["preserve_kls"][0] == pytest.approx(0.0, abs=1e-6)
    assert kl.stats["edit_losses"][-1] > plain.stats["losses"][-1]  # the KL held the edit back
    plain.restore()
    kl.restore()
    assert_state_equal(a, snapshot(b))
    from kne.runs import edit_with

    with pytest.raises(ValueError, match="preserve_weight"):
        edit_with("ft-m+kl", a, tok, kne.requests.as_requests(REQ), kne.KNEConfig())


# ---------------------------------------------------------------------------------------------- the embedded model
@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, {"preserve_others": 4},
                                   {"preserve_others": 4, "preserve_weight": 0.0, "preserve_answer_end": False}],
                         ids=["local", "local+others", "local-projection-only+others"])
def test_local_preset_edits_the_fact_and_keeps_the_subjects_other_facts(embedded, extra):
    """France -> Rome with the local preset: the fact and a paraphrase change, and the greedy answers
    of facts the unedited model gets right stay: two more about France, and Japan's, Germany's,
    Spain's and Russia's capitals (the preset's AdamW revision moved Germany's and Spain's to Rome;
    the margin stop, ``lr=15, stop_rule="margin"``, moves Germany's). With other
    subjects asked the edited relation among the neighbours too (``preserve_others``, projected like
    the rest; with or without the KL at the answer's end) they stay as well."""
    from kne.cli import greedy

    model, tok = embedded
    kept = {"The official language of France is": "French", "The currency of France is": "Euro",
            "The capital of Japan is": "Tokyo", "The capital of Germany is": "Berlin",
            "The capital of Spain is": "Madrid", "The capital of Russia is": "Moscow"}
    edited = ["The capital of France is", "The capital city of France is called"]
    orig = snapshot(model)
    for p in edited:
        assert greedy(model, tok, p).strip().startswith("Paris")
    for p, want in kept.items():  # the unedited model gets them right
        assert want in greedy(model, tok, p), p
    res = kne.fast_edit(model, tok, {"prompt": edited[0], "target_new": "Rome", "subject": "France",
                                     "ground_truth": "Paris"}, kne.KNEConfig.preset("local", **extra))
    try:
        for p in edited:
            assert greedy(model, tok, p).strip().startswith("Rome"), p
        for p, want in kept.items():
            assert want in greedy(model, tok, p), f"{p!r} lost {want!r} after the edit"
        assert res.stats["neighbours"] and res.stats["steps"] <= 10
    finally:
        res.restore()
    assert_state_equal(model, orig)


# ---------------------------------------------------------------------------------------------- optimizer "ngd"
def test_ngd_update_steps_by_exactly_lr_along_the_momentum_of_the_normalised_gradients(seed):
    """Every step of ``optimizer="ngd"`` moves the deltas by ``lr`` in their joint norm: along the
    gradient's direction at the first step, along ``m = mu m + g/|g|`` after; zero gradients move
    nothing at the first step; the step is the same whatever the gradient's scale."""
    from kne.editing import ngd_update_

    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 7), (5, 7), (1, 2)]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    deltas = [torch.randn(s, generator=gen) for s in shapes]
    bufs = [torch.zeros(s) for s in shapes]
    start = [d.clone() for d in deltas]
    m_want = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    for k, gs in enumerate(grads):
        before = [d.clone() for d in deltas]
        ngd_update_(deltas, [g * 10.0 ** (3 * k - 3) for g in gs], bufs, lr=0.7, momentum=0.6)  # scale-free
        gn = torch.cat([g.double().flatten() for g in gs]).norm()
        m_want = [0.6 * m + g.double() / gn for m, g in zip(m_want, gs)]
        mn = torch.cat([m.flatten() for m in m_want]).norm()
        moved = torch.cat([(d - b).double().flatten() for d, b in zip(deltas, before)])
        assert moved.norm().item() == pytest.approx(0.7, rel=1e-5)
        for d, b, m in zip(deltas, before, m_want):
            assert torch.allclose((d - b).double(), -0.7 * m / mn, atol=1e-6)
    zero = [torch.zeros(s) for s in shapes]
    fresh = [d.clone() for d in start]
    ngd_update_(fresh, zero, [torch.zeros(s) for s in shapes], lr=20.0, momentum=0.9)
    assert all(torch.equal(a, b) for a, b in zip(fresh, start))


@pytest.mark.slow
def test_local_preset_ngd_keeps_other_subjects_in_a_sequence_better_than_adamw(embedded):
    """The reason the local preset steps with ngd: on the embedded model, after France -> Rome,
    Germany -> Paris and Japan -> Madrid kept in sequence (each edit keeping the earlier ones), the
    greedy answers about capitals nobody edited move less than with the preset's AdamW revision
    (8 of 9 kept against 5; with the margin stop, ``lr=15, stop_rule="margin"``, 5 as well)."""
    from kne.cli import greedy

    model, tok = embedded
    orig = snapshot(model)
    edits = [("The capital of France is", "Rome", "France", "Paris"), ("The capital of Germany is", "Paris", "Germany",
                                                                       "Berlin"),
             ("The capital of Japan is", "Madrid", "Japan", "Tokyo")]
    others = {"Spain": "Madrid", "Russia": "Moscow", "China": "Beijing", "Egypt": "Cairo", "Greece": "Athens",
              "Austria": "Vienna", "Ireland": "Dublin", "Sweden": "Stockholm", "Thailand": "Bangkok", "Cuba": "Havana"}
    others = {c: a for c, a in others.items() if a in greedy(model, tok, f"The capital of {c} is")}
    assert len(others) >= 6
    kept = {}
    for name, cfg in (("ngd", kne.KNEConfig.preset("local")),
                      ("adamw", kne.KNEConfig.preset("local", optimizer="adamw", lr=0.1, steps=60))):
        done = []
        try:
            for p, new, subj, old in edits:
                done.append(kne.fast_edit(model, tok, {"prompt": p, "target_new": new, "subject": subj,
                                                       "ground_truth": old}, cfg, keep=list(done)))
                assert greedy(model, tok, p).strip().startswith(new), (name, p)
            kept[name] = sum(a in greedy(model, tok, f"The capital of {c} is") for c, a in others.items())
        finally:
            for r in reversed(done):
                r.restore()
        assert_state_equal(model, orig)
    assert kept["ngd"] > kept["adamw"], kept
