"""The switches that reproduce the authors' KNB trainer (their EasyEdit fork), one by one:
``stop_after_step``, ``loss_reduction``, ``delta_init="authors"``, ``always_space`` (with
``add_special_tokens``), and ``KNEConfig.preset("knb")`` that sets them. Tiny models; the
side-by-side check against their code itself is tests/test_knb_parity.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import kne
from kne._text import answer_logprobs, encode
from kne.editing import initial_delta
from kne.objective import EditObjective, edit_loss

from helpers import AUTHORS, assert_state_equal, snapshot

EDIT = {"fast": kne.fast_edit, "reference": kne.reference.edit}
KW = dict(dropout=0.0, lr=2.5e-3, alpha=8.0, percentile=80.0)
FACT = [{"prompt": "The capital of France is", "target_new": "Rome"}]
# three requests whose answers are 5, 14 and 8 byte tokens (the space included): padded, unequal in weight
BATCH = [{"prompt": "The capital of France is", "target_new": "Rome"},
         {"prompt": "Alan Turing was born in", "target_new": "New York City"},
         {"prompt": "Toko Yasuda plays the", "target_new": "bassoon"}]


# ---------------------------------------------------------------------------------------------- stop_after_step
@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("neuron_axis", ["out", "in"])
def test_stop_after_step_takes_exactly_one_more_step(impl, neuron_axis, tiny_model, tok):
    """A threshold between the losses before steps 4 and 5 of a forced run: kne stops after 4 steps
    (the loss before step 5 passes); with ``stop_after_step`` the 5th step is taken and the loop
    ends, and the weights are then those of a forced 5-step run, bit for bit."""
    edit = EDIT[impl]
    model = tiny_model("llama", seed=7)
    orig = snapshot(model)
    kw = dict(KW, neuron_axis=neuron_axis)
    ens = kne.locate(model, tok, FACT, **kw)
    forced = edit(model, tok, FACT, AUTHORS, ensemble=ens, steps=8, stop_loss=0.0, **kw)
    L = forced.stats["losses"]
    forced.restore()
    assert all(a > b for a, b in zip(L[:6], L[1:6])), f"the loss must fall over the first steps: {L}"
    thr = (L[3] + L[4]) / 2

    plain = edit(model, tok, FACT, AUTHORS, ensemble=ens, steps=8, stop_loss=thr, **kw)
    assert plain.stats["steps"] == 4 and plain.stats["stopped_early"]
    assert plain.stats["losses"] == L[:5]  # 4 losses before steps, and the one that passed
    plain.restore()

    after = edit(model, tok, FACT, AUTHORS, ensemble=ens, steps=8, stop_loss=thr, stop_after_step=True, **kw)
    assert after.stats["steps"] == 5 and after.stats["stopped_early"]
    assert after.stats["losses"] == L[:5]  # one per step: the last is the loss that passed, stepped on
    w_after = snapshot(model)
    after.restore()
    five = edit(model, tok, FACT, AUTHORS, ensemble=ens, steps=5, stop_loss=0.0, **kw)
    assert_state_equal(model, w_after, "stop_after_step vs a forced 5-step edit")
    assert five.stats["losses"][:5] == L[:5] and len(five.stats["losses"]) == 6
    five.restore()
    assert_state_equal(model, orig)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_stop_after_step_within_the_step_budget(impl, tiny_model, tok):
    """The budget still bounds the steps: a test that never passes runs ``steps`` steps (and kne reads
    the loss after the last); one that passes first at the budget's end takes no extra step."""
    edit = EDIT[impl]
    model = tiny_model("llama", seed=7)
    ens = kne.locate(model, tok, FACT, **KW)
    never = edit(model, tok, FACT, AUTHORS, ensemble=ens, steps=3, stop_loss=0.0, stop_after_step=True, **KW)
    L = never.stats["losses"]
    assert never.stats["steps"] == 3 and len(L) == 4 and not never.stats["stopped_early"]
    never.restore()
    last = edit(model, tok, FACT, AUTHORS, ensemble=ens, steps=3, stop_loss=(L[2] + L[3]) / 2, stop_after_step=True, **KW)
    assert last.stats["steps"] == 3 and last.stats["losses"] == L and last.stats["stopped_early"]
    last.restore()


# ---------------------------------------------------------------------------------------------- loss_reduction
def _by_hand(model, tok, reqs):
    """Per-request lists of answer-token log-probabilities, each request on its own (no padding)."""
    out = []
    with torch.no_grad():
        for r in reqs:
            b = encode(tok, [r["prompt"]], [r["target_new"]])
            out.append(answer_logprobs(model(input_ids=b.input_ids).logits, b).double())
    return out


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_token_and_request_reduction_on_a_padded_three_request_batch(impl, tiny_model, tok):
    model = tiny_model("llama", seed=11)
    per = _by_hand(model, tok, BATCH)
    lens = [p.numel() for p in per]
    assert lens == [5, 14, 8]
    token = float(-torch.cat(per).sum() / sum(lens))
    request = float(sum(-p.mean() for p in per) / 3)
    # a random tiny model predicts nearly uniformly (about ln 258 per token), so the two means differ by
    # 0.3% here: 60 times the tolerance below
    assert abs(token - request) > 1e-3 * request, "the batch must tell the two apart"
    ens = kne.locate(model, tok, BATCH, **KW)
    got = {}
    for red in ("token", "request"):
        res = EDIT[impl](model, tok, BATCH, AUTHORS, ensemble=ens, steps=0, loss_reduction=red, **KW)
        got[red] = res.stats["losses"][0]
        res.restore()
    assert math.isclose(got["token"], token, rel_tol=1e-5), (got, token)
    assert math.isclose(got["request"], request, rel_tol=1e-5), (got, request)
    # edit_loss on the padded batch's full logits says the same
    b = encode(tok, [r["prompt"] for r in BATCH], [r["target_new"] for r in BATCH])
    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    assert math.isclose(float(edit_loss(logits, b, "token")), token, rel_tol=1e-5)
    assert math.isclose(float(edit_loss(logits, b)), request, rel_tol=1e-5)
    with pytest.raises(ValueError, match="loss reduction 'mean'"):
        edit_loss(logits, b, "mean")


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_token_reduction_stops_on_the_token_mean(impl, tiny_model, tok):
    """The stop test reads the loss as reduced: a threshold between the two means of the unedited
    batch stops one reduction at step 0 and not the other."""
    model = tiny_model("llama", seed=11)
    per = _by_hand(model, tok, BATCH)
    token = float(-torch.cat(per).mean())
    request = float(sum(-p.mean() for p in per) / 3)
    thr = (token + request) / 2
    ens = kne.locate(model, tok, BATCH, **KW)
    res = {}
    for red in ("token", "request"):
        res[red] = EDIT[impl](model, tok, BATCH, AUTHORS, ensemble=ens, steps=2, stop_loss=thr, loss_reduction=red, **KW)
        res[red].restore()
    low, high = ("token", "request") if token < request else ("request", "token")
    assert res[low].stats["steps"] == 0 and res[low].stats["stopped_early"]
    assert res[high].stats["steps"] > 0


# ---------------------------------------------------------------------------------------------- delta_init
@pytest.mark.parametrize("axis", ["out", "in"])
def test_authors_init_bound_per_axis(axis, tiny_model, tok):
    """``"authors"``: the bound ``nn.init.kaiming_uniform_(a=sqrt(5))`` gives a tensor of the compact
    delta's shape (their ``knb_W``), ``1/sqrt(fan_in)``: ``in_features`` for rows ``[K, in]``, ``K``
    for columns ``[out, K]``; ``"kaiming"`` keeps ``1/sqrt(in_features)`` on both axes."""
    model = tiny_model("llama", seed=3)
    site = kne.adapters.resolve_sites(model, ["ffn_out"])["ffn_out"][1]  # down_proj: [32, 48]
    K = 5
    a = initial_delta(kne.KNEConfig(delta_init="authors", seed=4), site, axis, K, "cpu")
    k = initial_delta(kne.KNEConfig(delta_init="kaiming", seed=4), site, axis, K, "cpu")
    shape = (K, site.in_features) if axis == "out" else (site.out_features, K)
    assert tuple(a.shape) == tuple(k.shape) == shape
    # their bound, from torch's own formula for kaiming_uniform_(a=sqrt(5)) on that shape
    fan_in = nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))[0]
    theirs = nn.init.calculate_gain("leaky_relu", math.sqrt(5)) * math.sqrt(3.0 / fan_in)
    assert fan_in == (site.in_features if axis == "out" else K)
    assert math.isclose(theirs, 1 / math.sqrt(fan_in), rel_tol=1e-12)
    assert a.abs().max() <= theirs and a.abs().max() > 0.9 * theirs
    assert k.abs().max() <= 1 / math.sqrt(site.in_features) and k.abs().max() > 0.9 / math.sqrt(site.in_features)
    # the same draws, scaled: only the bound differs
    ratio = theirs * math.sqrt(site.in_features)
    assert torch.allclose(a, k * ratio, rtol=1e-5, atol=1e-7)
    if axis == "out":
        assert torch.equal(a, k)
    else:
        assert ratio > 2  # 1/sqrt(5) against 1/sqrt(48)


def test_authors_init_is_what_the_edit_starts_from(tiny_model, tok):
    """steps=0 on columns: the merged columns are W + s * (the authors' noise), s = alpha/sqrt(K)."""
    model = tiny_model("llama", seed=3)
    orig = snapshot(model)
    ens = kne.Ensemble.from_knb_dict({"mlp.down_proj": {0: [1, 5, 7], 2: [0, 31, 40, 47]}}, neuron_axis="in")
    cfg = kne.KNEConfig(delta_init="authors", steps=0, neuron_axis="in", seed=9)
    res = kne.fast_edit(model, tok, FACT, cfg, ensemble=ens)
    for site, idx in ens.sites(model):
        K = idx.numel()
        noise = initial_delta(cfg, site, "in", K, "cpu")
        assert noise.abs().max() > 0.9 / math.sqrt(K)
        w0 = orig[site.path + ".weight"]
        assert torch.allclose(site.weight()[:, idx], w0[:, idx] + noise / math.sqrt(K), rtol=0, atol=1e-6)
    res.restore()
    assert_state_equal(model, orig)


# ---------------------------------------------------------------------------------------------- tokenisation
def test_always_space_and_special_tokens_make_the_authors_training_text(tok):
    """Their trainer tokenises ``f"{prompt} {target}"`` with the tokenizer's special tokens; kne's
    default joins without a second space and without them."""
    from test_easyedit_parity import parity_tokenizer

    bos_tok = parity_tokenizer()
    reqs = [kne.EditRequest(prompt="The capital of France is", target_new=" Rome")]
    for t in (tok, bos_tok):
        cases = {(False, False): "The capital of France is Rome", (True, True): "The capital of France is  Rome"}
        for (space, special), text in cases.items():
            cfg = kne.KNEConfig(always_space=space, add_special_tokens=special)
            b = EditObjective(t, reqs, cfg, "cpu").batch
            want = t(text, add_special_tokens=special)["input_ids"]
            assert b.input_ids[0].tolist() == want
            n_prompt = len(t("The capital of France is", add_special_tokens=special)["input_ids"])
            assert b.cols.tolist() == list(range(n_prompt, len(want)))
            # attribution scores the same text the edit trains
            from kne.attribution import request_batch

            assert request_batch(t, reqs, cfg, "cpu").input_ids.tolist() == b.input_ids.tolist()
    assert bos_tok("a")["input_ids"][0] == bos_tok.bos_token_id
    b = EditObjective(bos_tok, reqs, kne.KNEConfig.preset("knb"), "cpu").batch
    assert b.input_ids[0, 0].item() == bos_tok.bos_token_id


def test_knb_preset_sets_every_switch_and_the_cli_offers_it():
    cfg = kne.KNEConfig.preset("knb")
    assert (cfg.stop_after_step, cfg.loss_reduction, cfg.delta_init, cfg.add_special_tokens, cfg.always_space,
            cfg.dropout) == (True, "token", "authors", True, True, 0.0)
    assert (cfg.neuron_axis, cfg.target_modules, cfg.lr, cfg.steps, cfg.stop_loss, cfg.alpha, cfg.rs_scaling,
            cfg.weight_decay) == ("out", ("ffn_out",), 5e-3, 30, 1e-2, 1.0, True, 0.0)
    from kne.cli import _config, build_parser

    args = build_parser().parse_args(["edit", "--prompt", "a", "--target", "b", "--preset", "knb",
                                      "--no-stop-after-step", "--loss-reduction", "request", "--delta-init", "kaiming"])
    c = _config(args)
    assert (c.stop_after_step, c.loss_reduction, c.delta_init, c.always_space) == (False, "request", "kaiming", True)


# ---------------------------------------------------------------------------------------------- float64
@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("axis", ["out", "in"])
def test_float64_model_rows_are_merged_in_float64(impl, axis, tiny_model, tok):
    """``W[idx] + s * delta`` in float64 for a float64 model, as the authors' adapter computes
    ``W + scaling * delta_W``: the original rows are not rounded to float32 on the way (the float64
    side-by-side with their code is bit for bit only so)."""
    model = tiny_model("llama", seed=5).to(torch.float64)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # weights that float32 cannot hold
        for p in model.parameters():
            p.add_(torch.rand(p.shape, generator=g, dtype=torch.float64) * 1e-9)
    orig = snapshot(model)
    ens = kne.Ensemble.from_knb_dict({"mlp.down_proj": {0: [1, 5, 7], 2: [3, 30]}}, neuron_axis=axis)
    cfg = kne.KNEConfig(delta_init="authors", steps=0, neuron_axis=axis)
    res = EDIT[impl](model, tok, FACT, cfg, ensemble=ens)
    dim = 0 if axis == "out" else 1
    for site, idx in ens.sites(model):
        noise = initial_delta(cfg, site, axis, idx.numel(), "cpu").double()
        w0 = orig[site.path + ".weight"].index_select(dim, idx)
        assert not torch.equal(w0, w0.float().double()), "the rows must need float64 to tell the rounding"
        assert torch.equal(site.weight().index_select(dim, idx), w0 + (1 / math.sqrt(idx.numel())) * noise)
    res.restore()
    assert_state_equal(model, orig)
