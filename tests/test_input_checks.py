"""Input mistakes that used to end deep in torch, run for minutes, or be silently reinterpreted:
each is now one ``ValueError`` (or ``kne_kernels``' own ``RuntimeError``) naming the problem and
the fix, raised before any work or any write."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kne
from kne import nullspace

from helpers import AUTHORS, assert_state_bits, snapshot

REQ = {"prompt": "The capital of France is", "target_new": "Rome"}
KW = dict(percentile=80.0, steps=2, stop_loss=0.0, lr=5e-2)

CALLS = {
    "fast_edit": lambda m, t, r, **kw: kne.fast_edit(m, t, r, AUTHORS, **dict(KW, **kw)),
    "reference.edit": lambda m, t, r, **kw: kne.reference.edit(m, t, r, AUTHORS, **dict(KW, **kw)),
    "ft_m": lambda m, t, r, **kw: kne.baselines.ft_m(m, t, r, steps=2),
    "attribute": lambda m, t, r, **kw: kne.attribute(m, t, r),
    "reference.attribute": lambda m, t, r, **kw: kne.reference.attribute(m, t, r),
    "locate": lambda m, t, r, **kw: kne.locate(m, t, r),
    "evaluate": lambda m, t, r, **kw: kne.evaluate(m, t, r),
}


# ---------------------------------------------------------------------------------------------- lengths
@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("model_type, field", [("gpt2", "n_positions"), ("llama", "max_position_embeddings")])
def test_text_longer_than_the_model_positions_is_refused_with_the_limit(call, model_type, field, tiny_model, tok):
    """GPT-2 raised an IndexError from its position embedding; a rotary model ran on past its
    positions (12 minutes for a 10k-token prompt on the embedded model)."""
    model = tiny_model(model_type)
    orig = snapshot(model)
    limit = getattr(model.config, field)
    long = {"prompt": "The capital of France is " + "very " * (limit // 5), "target_new": "Rome"}
    with pytest.raises(ValueError, match=rf"is {len(long['prompt']) + 5} tokens, more than the {limit} positions "
                                         rf"this model has \(config.{field}\): shorten it"):
        CALLS[call](model, tok, long)
    assert_state_bits(model, orig)


def test_long_probe_or_preserve_prompt_is_refused(tiny_model, tok):
    model = tiny_model("gpt2")
    far = "x" * 300
    with pytest.raises(ValueError, match=r"prompt 'xxx.*' with its answer 'Paris' is 306 tokens, more than the 256"):
        kne.evaluate(model, tok, dict(REQ, locality={"L": [{"prompt": far, "ground_truth": "Paris"}]}))
    with pytest.raises(ValueError, match=r"prompt 'xxx.*' is 300 tokens, more than the 256 positions"):
        kne.fast_edit(model, tok, REQ, AUTHORS, preserve_weight=1.0, preserve_prompts=[far], **KW)


def test_a_text_that_fits_exactly_is_accepted(tiny_model, tok):
    model = tiny_model("gpt2")
    prompt = "y" * (model.config.n_positions - 5)  # plus " Rome": exactly n_positions tokens
    res = kne.fast_edit(model, tok, {"prompt": prompt, "target_new": "Rome"}, AUTHORS, **KW)
    res.restore()


# ---------------------------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("call", list(CALLS) + ["nullspace.build"])
def test_tokenizer_none_is_a_clear_error(call, tiny_model):
    model = tiny_model("llama")
    fn = CALLS.get(call) or (lambda m, t, r: nullspace.build(m, t, prompts=["Gold is"], progress=False))
    with pytest.raises(ValueError, match=r"tokenizer is None: pass the model's tokenizer"):
        fn(model, None, REQ)


# ---------------------------------------------------------------------------------------------- changed after construction
@pytest.mark.parametrize("field, value, match", [
    ("lr", -1.0, r"KNEConfig.lr=-1.0 is invalid"),
    ("neuron_axis", "sideways", r"KNEConfig.neuron_axis='sideways' is invalid"),
    ("steps", 2.5, r"KNEConfig.steps=2.5 is invalid"),
    ("dropout", 1.0, r"KNEConfig.dropout=1.0 is invalid"),
    ("target_modules", (), r"KNEConfig.target_modules=\(\) is invalid"),
    ("seed", 2**64, r"KNEConfig.seed=18446744073709551616 is invalid: use an integer in \[-2\*\*63, 2\*\*64\)"),
])
@pytest.mark.parametrize("call", ["fast_edit", "reference.edit", "attribute"])
def test_config_fields_reassigned_after_construction_are_checked_at_the_call(call, field, value, match, tiny_model,
                                                                             tok):
    model = tiny_model("llama")
    orig = snapshot(model)
    cfg = kne.KNEConfig(**KW)
    setattr(cfg, field, value)
    fn = {"fast_edit": kne.fast_edit, "reference.edit": kne.reference.edit, "attribute": kne.attribute}[call]
    with pytest.raises(ValueError, match=match):
        fn(model, tok, REQ, cfg)
    assert_state_bits(model, orig)


def test_the_edit_runs_on_a_copy_of_the_config(tiny_model, tok):
    """The config an edit records is its own: the caller changing theirs later changes nothing."""
    cfg = kne.KNEConfig(**KW)
    res = kne.fast_edit(tiny_model("llama"), tok, REQ, cfg)
    cfg.lr = 1.0
    assert res.config.lr == KW["lr"] and res.config is not cfg


@pytest.mark.parametrize("field, value", [("target_new", ""), ("prompt", "  "), ("target_new", 7), ("subject", "")])
@pytest.mark.parametrize("call", ["fast_edit", "reference.edit", "ft_m", "evaluate", "attribute"])
def test_request_fields_reassigned_after_construction_are_checked_at_the_call(call, field, value, tiny_model, tok):
    model = tiny_model("llama")
    req = kne.EditRequest(prompt=REQ["prompt"], target_new=REQ["target_new"], subject="France")
    setattr(req, field, value)
    with pytest.raises(ValueError, match=rf"EditRequest.{field}={value!r} is invalid.*changed after it was made"):
        CALLS[call](model, tok, req)


# ---------------------------------------------------------------------------------------------- seed, numpy scalars
def test_seed_range_is_what_torch_takes():
    for ok in (0, 2**64 - 1, -(2**63), np.uint64(2**64 - 1)):
        assert kne.KNEConfig(seed=ok).seed == int(ok)
    for bad in (2**64, -(2**63) - 1, 1.0, True):
        with pytest.raises(ValueError, match=r"KNEConfig.seed=.* is invalid"):
            kne.KNEConfig(seed=bad)


def test_the_largest_seed_edits_with_dropout(tiny_model, tok):
    res = kne.fast_edit(tiny_model("llama"), tok, REQ, AUTHORS, **dict(KW, dropout=0.1, seed=2**64 - 1))
    assert len(res.stats["losses"]) == KW["steps"] + 1


def test_numpy_scalars_are_the_numbers_they_hold(tiny_model, tok):
    plain = kne.KNEConfig(lr=0.05, steps=2, percentile=80.0, layers=(0, 2), seed=3, stop_loss=0.0, project=False,
                          dropout=0.25)
    npc = kne.KNEConfig(lr=np.float64(0.05), steps=np.int64(2), percentile=np.float32(80.0),
                        layers=np.array([0, 2]), seed=np.uint8(3), stop_loss=np.float16(0), project=np.bool_(False),
                        dropout=np.float64(0.25))
    assert npc == plain
    assert type(npc.steps) is int and type(npc.seed) is int and type(npc.project) is bool
    assert all(type(l) is int for l in npc.layers) and type(npc.lr) is float
    a, b = tiny_model("llama"), tiny_model("llama")
    ra, rb = kne.fast_edit(a, tok, REQ, plain), kne.fast_edit(b, tok, REQ, npc)
    assert ra.stats["losses"] == rb.stats["losses"]
    assert_state_bits(b, snapshot(a))
    # the other numeric arguments
    ft = kne.baselines.ft_m(tiny_model("llama"), tok, REQ, steps=np.int64(2), lr=np.float32(5e-4),
                            layers=[np.int64(1)], stop_loss=np.float64(0.0))
    assert ft.stats["steps"] == 2 and ft.stats["layers"] == [1]
    kne.attribute(a, tok, [REQ, REQ], batch_size=np.int64(1))
    kne.evaluate(a, tok, REQ, seed=np.int64(4), batch_size=np.int32(2))


@pytest.mark.parametrize("bad", [True, 2.5, "3", 0])
def test_integer_arguments_refuse_what_is_not_a_positive_integer(bad, tiny_model, tok):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"batch_size=.* is invalid: use an integer >= 1"):
        kne.attribute(model, tok, REQ, batch_size=bad)
    with pytest.raises(ValueError, match=r"steps=.* is invalid: use an integer >= 1"):
        kne.baselines.ft_m(model, tok, REQ, steps=bad)


# ---------------------------------------------------------------------------------------------- named backends
@pytest.mark.parametrize("call", ["fast_edit", "attribute", "locate", "fast_edit+ensemble"])
def test_a_named_backend_that_is_not_live_raises_kne_kernels_error(call, tiny_model, tok, monkeypatch):
    """backend='cuda' on a CPU model, and 'triton' on CPU without its interpreter: the error
    kne_kernels raises for that backend, never a silent switch to auto."""
    import kne_kernels

    model = tiny_model("llama")
    orig = snapshot(model)
    ens = kne.locate(model, tok, REQ, percentile=80.0)
    fns = {"fast_edit": lambda **kw: kne.fast_edit(model, tok, REQ, AUTHORS, **KW, **kw),
           "attribute": lambda **kw: kne.attribute(model, tok, REQ, **kw),
           "locate": lambda **kw: kne.locate(model, tok, REQ, **kw),
           "fast_edit+ensemble": lambda **kw: kne.fast_edit(model, tok, REQ, AUTHORS, **KW, ensemble=ens, **kw)}
    with pytest.raises(RuntimeError) as theirs:
        kne_kernels.neuron_attribution(torch.ones(2, 3), torch.ones(2, 3), backend="cuda")
    with pytest.raises(RuntimeError) as ours:
        fns[call](backend="cuda")
    assert str(ours.value) == str(theirs.value)
    assert "backend 'cuda' cannot run cpu tensors here" in str(ours.value)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kne_kernels._backends.invalidate()  # the backends' status is cached per process
    try:
        assert not kne_kernels.status("triton", "cpu")[0]
        with pytest.raises(RuntimeError, match=r"backend 'triton' cannot run cpu tensors here: Triton runs on CPU "
                                               r"tensors only through its interpreter"):
            fns[call](backend="triton")
    finally:
        monkeypatch.undo()
        kne_kernels._backends.invalidate()
    assert_state_bits(model, orig)


def test_named_live_backends_still_run(tiny_model, tok):
    for backend in ("cpu", "torch", "triton"):
        res = kne.fast_edit(tiny_model("llama"), tok, REQ, AUTHORS, **KW, backend=backend)
        res.restore()


# ---------------------------------------------------------------------------------------------- ensembles
@pytest.mark.parametrize("knb, match", [
    ({"mlp.down_proj": {-1: [1, 2]}}, r"layer key -1; layers are numbered from 0"),
    ({"mlp.down_proj": {"-1": [1]}}, r"layer key '-1'; layers are numbered from 0"),
    ({"mlp.down_proj": {1.5: [1]}}, r"layer key 1.5; layer keys must be integers"),
    ({"mlp.down_proj": {"1.0": [1]}}, r"layer key '1.0'; layer keys must be integers"),
    ({"mlp.down_proj": {True: [1]}}, r"layer key True; layer keys must be integers"),
    ({"mlp.down_proj": {1: [1.7, 2]}}, r"\[1\] holds 1.7 \(float\); neuron indices must be integers"),
    ({"mlp.down_proj": {1: [True]}}, r"holds True \(bool\); neuron indices must be integers"),
    ({"mlp.down_proj": {1: np.array([1.5])}}, r"numpy array of float64; neuron indices must be integers"),
    ({"mlp.down_proj": {1: torch.tensor([2.0])}}, r"torch.float32 tensor; neuron indices must be integers"),
    ({"mlp.down_proj": {1: [-3]}}, r"negative neuron indices \(-3\)"),
    ({"mlp.down_proj": {1: "12"}}, r"holds '1' \(str\)"),
    ({"mlp.down_proj": {1: [1], "1": [2]}}, r"names layer 1 twice"),
])
def test_ensemble_keys_and_indices_that_are_not_integers_are_refused(knb, match):
    with pytest.raises(ValueError, match=match):
        kne.Ensemble.from_knb_dict(knb)


def test_integer_kinds_are_accepted():
    ens = kne.Ensemble.from_knb_dict({"mlp.down_proj": {np.int64(1): np.array([3, 1], dtype=np.int32), "2": (5,),
                                                        0: torch.tensor([4], dtype=torch.int16)}})
    assert {l: t.tolist() for l, t in ens.indices["mlp.down_proj"].items()} == {0: [4], 1: [1, 3], 2: [5]}


@pytest.mark.parametrize("mutate, match", [
    (lambda e: e.indices["mlp.down_proj"].update({7: torch.tensor([1])}),
     r"names layer 7, but this model has 3 layers \(0..2\)"),
    (lambda e: e.indices["mlp.down_proj"].update({1: torch.tensor([3, 3])}), r"holds a neuron index more than once"),
    (lambda e: e.indices["mlp.down_proj"].update({1: torch.tensor([32])}), r"ensemble index 32 is out of range"),
    (lambda e: e.indices["mlp.down_proj"].update({1: torch.tensor([-1])}), r"ensemble index -1 is out of range"),
    (lambda e: e.indices["mlp.down_proj"].update({1: torch.tensor([1.0])}), r"must be a 1-D int64 tensor"),
    (lambda e: setattr(e, "neuron_axis", "rows"), r"neuron_axis='rows' is invalid"),
])
def test_ensembles_changed_after_construction_are_checked_against_the_model(mutate, match, tiny_model, tok):
    model = tiny_model("llama")
    orig = snapshot(model)
    ens = kne.Ensemble.from_knb_dict({"mlp.down_proj": {0: [1, 2], 1: [4]}})
    mutate(ens)
    with pytest.raises(ValueError, match=match):
        kne.fast_edit(model, tok, REQ, AUTHORS, ensemble=ens, **KW)
    with pytest.raises(ValueError, match=match):
        kne.reference.edit(model, tok, REQ, AUTHORS, ensemble=ens, **KW)
    assert_state_bits(model, orig)


def test_ensemble_file_mistakes_name_the_file(tmp_path):
    with pytest.raises(IsADirectoryError, match=r"is a directory, not an ensemble file"):
        kne.Ensemble.load(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"ensemble file .*nope.json' does not exist"):
        kne.Ensemble.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.json: not an ensemble JSON file"):
        kne.Ensemble.load(bad)
    bad.write_text('{"format": "kne.ensemble/1", "neuron_axis": "out"}')
    with pytest.raises(ValueError, match=r"bad.json: field 'knb_dict' is missing"):
        kne.Ensemble.load(bad)
    bad.write_text('{"mlp.down_proj": {"0": [1.5]}}')
    with pytest.raises(ValueError, match=r"bad.json: ensemble\['mlp.down_proj'\]\[0\] holds 1.5"):
        kne.Ensemble.load(bad)


@pytest.mark.slow
def test_a_10k_token_prompt_on_the_embedded_model_is_refused_at_once(embedded):
    """kne 0.2.0 ran such an edit for 12 minutes at 9.6 GB."""
    import time

    model, tok = embedded
    limit = model.config.max_position_embeddings
    prompt = "The capital of France is " + "really " * 10_000
    t = time.perf_counter()
    with pytest.raises(ValueError, match=rf"is \d+ tokens, more than the {limit} positions this model has "
                                         r"\(config.max_position_embeddings\)"):
        kne.fast_edit(model, tok, {"prompt": prompt, "target_new": "Rome"}, AUTHORS)
    assert time.perf_counter() - t < 5


@pytest.mark.parametrize("call", ["fast_edit", "locate", "evaluate"])
def test_model_and_tokenizer_swapped_is_said(tiny_model, tok, call):
    model = tiny_model("llama")
    req = {"prompt": "The capital of France is", "target_new": "Rome"}
    fn = {"fast_edit": kne.fast_edit, "locate": kne.locate, "evaluate": kne.evaluate}[call]
    with pytest.raises(ValueError, match=r"(model must be a torch.nn.Module .*got PreTrainedTokenizerFast: that is a "
                                         r"tokenizer|tokenizer must be .*got LlamaForCausalLM: that is a model); pass "
                                         r"the model first, then the tokenizer \(model, tokenizer\)"):
        fn(tok, model, [req])
