"""KNEConfig validation, EditRequest / KnowEdit conversion and files, Ensemble files and checks."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import math

import pytest
import torch

import kne
import kne_kernels
from kne import KNEConfig
from kne.requests import first_alias

from conftest import LAYERS
from helpers import AUTHORS, assert_state_equal, snapshot

# The shipped KnowEdit files: records and the sha256 of the published JSON (kne/data/knowedit/README.md).
KNOWEDIT_COUNTS = {"zsre": 1304, "counterfact": 1428, "recent": 570}
KNOWEDIT_SHA256 = {"zsre": "d70ff1f69ddcac101bbe9c6f1d6ee3918bdac96f145d937e90fbbb02fcf85fab",
                   "counterfact": "acdc01922afab1d4122249a2c22ad8c1e0e86506dd7a28eec698f22d175ebf9d",
                   "recent": "5856107412ddeeae2ceea2a15ebd125fd7c86ac8d62b933b095514304a77c73a"}


# ---------------------------------------------------------------------------------------------- KNEConfig
INVALID = [
    ("target_modules", ()),
    ("target_modules", []),
    ("target_modules", ("ffn_out", 3)),
    ("target_modules", ("ffn_out", "")),
    ("target_modules", ("ffn_out", "ffn_out")),
    ("target_modules", None),
    ("target_modules", 5),
    ("neuron_axis", "row"),
    ("neuron_axis", None),
    ("layers", ()),
    ("layers", (0, 0)),
    ("layers", (0, 1.0)),
    ("layers", (True,)),
    ("layers", ("0",)),
    ("layers", 1.5),
    ("exclude_edge_layers", -1),
    ("exclude_edge_layers", 1.5),
    ("exclude_edge_layers", None),
    ("ig_steps", 0),
    ("ig_steps", -2),
    ("ig_steps", 2.0),
    ("ig_steps", True),
    ("ig_steps", "3"),
    ("ig_path", "both"),
    ("objective", "nll"),
    ("percentile", -1),
    ("percentile", 100),
    ("percentile", 100.5),
    ("percentile", float("nan")),
    ("percentile", float("inf")),
    ("percentile", "99"),
    ("percentile", True),
    ("percentile", None),
    ("aggregate", "sum"),
    ("positive_only", 1),
    ("positive_only", "yes"),
    ("lr", 0),
    ("lr", -1e-3),
    ("lr", float("nan")),
    ("lr", float("inf")),
    ("steps", -1),
    ("steps", 3.5),
    ("steps", None),
    ("alpha", 0.0),
    ("alpha", -1.0),
    ("rs_scaling", 0),
    ("dropout", 1.0),
    ("dropout", -0.1),
    ("dropout", float("nan")),
    ("weight_decay", -0.1),
    ("weight_decay", float("inf")),
    ("stop_loss", -1e-3),
    ("stop_loss", float("nan")),
    ("delta_init", "normal"),
    ("delta_init", "Authors"),
    ("stop_after_step", 1),
    ("stop_after_step", None),
    ("loss_reduction", "mean"),
    ("loss_reduction", None),
    ("always_space", "yes"),
    ("add_special_tokens", None),
    ("backend", "rocm"),
    ("seed", 1.5),
    ("seed", "0"),
    ("seed", None),
    ("preserve_weight", -1.0),
    ("preserve_weight", float("nan")),
    ("preserve_count", -1),
    ("preserve_count", 2.5),
    ("preserve_others", -2),
    ("preserve_prompt_positions", 1),
    ("preserve_answer_end", "yes"),
    ("preserve_answer_end", True),  # without preserve_weight: nothing would read that position
    ("preserve_prompt_positions", True),
    ("stop_rule", "gap"),
    ("stop_prob", 0.0),
    ("stop_prob", 1.5),
    ("stop_margin", -0.5),
    ("stop_margin", float("nan")),
    ("delta_l2", -0.1),
    ("project", "yes"),
    ("project_corpus", None),
    ("project_threshold", -1e-2),
    ("keep_positions", "prompt"),
    ("keep_positions", None),
    ("keep_rtol", -1e-5),
    ("keep_rtol", float("nan")),
    ("optimizer", "sgd"),
    ("optimizer", None),
    ("ngd_momentum", 1.0),
    ("ngd_momentum", -0.1),
    ("ngd_momentum", 0.5),  # with adamw: AdamW does not read it
]


def test_ngd_refuses_weight_decay_and_names_the_fix():
    with pytest.raises(ValueError, match=r"KNEConfig.weight_decay.*optimizer='ngd'"):
        KNEConfig(optimizer="ngd", weight_decay=0.01)
    c = KNEConfig(optimizer="ngd", ngd_momentum=0.0, lr=5.0)
    assert (c.optimizer, c.ngd_momentum, c.lr) == ("ngd", 0.0, 5.0)


@pytest.mark.parametrize("field, value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_config_value_names_the_field(field, value):
    with pytest.raises(ValueError) as e:
        KNEConfig(**{field: value})
    assert f"KNEConfig.{field}" in str(e.value)
    # the same through replace() and through the API's keyword overrides
    with pytest.raises(ValueError, match=f"KNEConfig.{field}"):
        KNEConfig().replace(**{field: value})
    with pytest.raises(ValueError, match=f"KNEConfig.{field}"):
        kne.config.resolve_config(None, {field: value})


def test_every_field_has_an_invalid_case():
    fields = {f.name for f in dataclasses.fields(KNEConfig)}
    assert fields == {f for f, _ in INVALID}


def test_valid_config_values_are_normalised():
    c = KNEConfig(target_modules="ffn_in", layers=2, percentile=90, lr=1, alpha=2, dropout=0, weight_decay=0,
                  stop_loss=0, steps=0, seed=-5)
    assert c.target_modules == ("ffn_in",)
    assert c.layers == (2,)
    assert isinstance(c.percentile, float) and c.percentile == 90.0
    assert isinstance(c.lr, float) and isinstance(c.dropout, float)
    c = KNEConfig(target_modules=["ffn_out", "mlp.up_proj"], layers=[2, -1], percentile=0.0)
    assert c.target_modules == ("ffn_out", "mlp.up_proj") and c.layers == (2, -1)
    assert KNEConfig(percentile=99.999).percentile == 99.999
    assert KNEConfig(dropout=0.999).dropout == 0.999


def test_named_backend_that_is_not_live_raises_everywhere(tiny_model, tok, monkeypatch):
    """config.backend="cpu" without a live C++ library is kne_kernels' error, as a direct op call
    with backend="cpu" is, never a silent fall back to auto (tests/test_input_checks.py: cuda and
    triton)."""
    from kne_kernels import _backends

    real = _backends._status
    monkeypatch.setattr(_backends, "_status", lambda b, d: (False, "pretend it is not built") if b == "cpu"
                        else real(b, d))
    _backends.invalidate()
    try:
        model = tiny_model("llama")
        req = {"prompt": "The capital of France is", "target_new": "Rome"}
        snap = snapshot(model)
        msg = r"backend 'cpu' cannot run cpu tensors here: pretend it is not built"
        with pytest.raises(RuntimeError, match=msg):
            kne.fast_edit(model, tok, req, AUTHORS, backend="cpu", steps=1)
        w = torch.randn(4, 3)
        with pytest.raises(RuntimeError, match=msg):
            kne_kernels.weight_attribution(w, w, backend="cpu")
        assert_state_equal(model, snap)
    finally:
        monkeypatch.undo()
        _backends.invalidate()


def test_config_defaults_are_the_authors():
    c = KNEConfig()
    assert (c.target_modules, c.neuron_axis, c.ig_steps, c.percentile, c.lr, c.steps, c.alpha, c.rs_scaling,
            c.dropout, c.weight_decay, c.stop_loss, c.delta_init) == (
        ("ffn_out",), "out", 1, 99.0, 5e-3, 30, 1.0, True, 0.1, 0.0, 1e-2, "zeros")


def test_unknown_override_names_raise(tiny_model, tok):
    with pytest.raises(ValueError) as e:
        KNEConfig().replace(percentil=90)
    assert "percentil" in str(e.value) and "percentile" in str(e.value)  # the unknown name and the valid ones
    with pytest.raises(ValueError, match="unknown KNEConfig field"):
        KNEConfig.from_dict({"lr": 1e-3, "learning_rate": 1e-3})
    model = tiny_model("llama")
    req = {"prompt": "The capital of France is", "target_new": "Rome"}
    for fn in (kne.attribute, kne.locate, kne.fast_edit, kne.reference.attribute, kne.reference.locate,
               kne.reference.edit):
        with pytest.raises(ValueError, match="ig_stepz"):
            fn(model, tok, req, ig_stepz=3)
    # invalid values through the API's keyword overrides too
    snap = snapshot(model)
    with pytest.raises(ValueError, match="KNEConfig.percentile"):
        kne.fast_edit(model, tok, req, AUTHORS, percentile=100)
    with pytest.raises(ValueError, match="KNEConfig.neuron_axis"):
        kne.attribute(model, tok, req, neuron_axis="rows")
    with pytest.raises(ValueError, match="config must be"):
        kne.attribute(model, tok, req, config="fast")
    assert_state_equal(model, snap)


def test_config_overrides_and_dict_round_trip():
    c = KNEConfig(neuron_axis="in", layers=(1, 3), ig_steps=4, percentile=95.5, seed=7)
    d = c.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert KNEConfig.from_dict(d) == c
    r = c.replace(lr=1e-2)
    assert r.lr == 1e-2 and c.lr == 5e-3 and r.neuron_axis == "in"
    # a dict config and overrides combine
    from kne.config import resolve_config

    assert resolve_config({"ig_steps": 2}, {"percentile": 90}) == KNEConfig(ig_steps=2, percentile=90)
    assert resolve_config(c, None) == c and resolve_config(c, None) is not c  # a validated copy


# ---------------------------------------------------------------------------------------------- EditRequest
@pytest.mark.parametrize("kw, field", [
    (dict(prompt="", target_new="Rome"), "prompt"),
    (dict(prompt="   ", target_new="Rome"), "prompt"),
    (dict(prompt=None, target_new="Rome"), "prompt"),
    (dict(prompt=3, target_new="Rome"), "prompt"),
    (dict(prompt="The capital of France is", target_new=""), "target_new"),
    (dict(prompt="The capital of France is", target_new="\n"), "target_new"),
    (dict(prompt="The capital of France is", target_new=["Rome"]), "target_new"),
    (dict(prompt="The capital of France is", target_new="Rome", subject=""), "subject"),
    (dict(prompt="The capital of France is", target_new="Rome", rephrase_prompt=" "), "rephrase_prompt"),
])
def test_edit_request_validation(kw, field):
    with pytest.raises(ValueError, match=f"EditRequest.{field}"):
        kne.EditRequest(**kw)


def test_edit_request_from_dict_and_api_validation(tiny_model, tok):
    for bad in ({"prompt": "x"}, {"target_new": "y"}, {}):
        with pytest.raises(ValueError, match="prompt' and 'target_new'"):
            kne.EditRequest.from_dict(bad)
    with pytest.raises(ValueError, match="EditRequest.prompt"):
        kne.EditRequest.from_dict({"prompt": "", "target_new": "y"})
    with pytest.raises(ValueError, match="target_new"):
        kne.EditRequest.from_dict({"prompt": "x", "target_new": []})
    with pytest.raises(ValueError, match="dict"):
        kne.EditRequest.from_dict(["x", "y"])
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="empty"):
        kne.attribute(model, tok, [])
    with pytest.raises(ValueError, match="requests must be"):
        kne.attribute(model, tok, "The capital of France is Rome")
    with pytest.raises(ValueError, match="EditRequest.target_new"):
        kne.fast_edit(model, tok, {"prompt": "The capital of France is", "target_new": " "}, AUTHORS)


def test_knowedit_dict_conversion_takes_first_aliases():
    rec = {
        "subject": "Eiffel Tower",
        "prompt": "The Eiffel Tower is located in",
        "target_new": ["Rome", "Roma"],
        "ground_truth": [["Paris", "City of Light"], ["Île-de-France"]],
        "rephrase": "Where is the Eiffel Tower? It is in",
        "cond": "ignored",
        "locality": {
            "Relation_Specificity": [{"prompt": "The Eiffel Tower was designed by", "ground_truth": [["Gustave Eiffel", "Eiffel"]]}],
            "Empty": [],
        },
        "portability": {
            "Reasoning": {"prompt": ["The country of the Eiffel Tower's city is"], "ground_truth": [["Italy", "Italia"]]},
            "Subject_Aliasing": [{"prompt": "La tour Eiffel is located in", "ground_truth": "Rome"}],
        },
    }
    r = kne.EditRequest.from_dict(rec)
    assert r.prompt == rec["prompt"] and r.subject == "Eiffel Tower"
    assert r.target_new == "Rome"
    assert r.ground_truth == "Paris"
    assert r.rephrase_prompt == rec["rephrase"]
    assert r.locality == {"Relation_Specificity": [{"prompt": "The Eiffel Tower was designed by",
                                                    "ground_truth": "Gustave Eiffel"}]}
    assert r.portability == {
        "Reasoning": [{"prompt": "The country of the Eiffel Tower's city is", "ground_truth": "Italy"}],
        "Subject_Aliasing": [{"prompt": "La tour Eiffel is located in", "ground_truth": "Rome"}],
    }
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert kne.EditRequest.from_dict(d) == r
    # an empty ground truth string means none
    assert kne.EditRequest.from_dict({"prompt": "a", "target_new": "b", "ground_truth": " "}).ground_truth is None
    # a list rephrase takes its first entry
    assert kne.EditRequest(prompt="a", target_new="b", rephrase_prompt=["c", "d"]).rephrase_prompt == "c"


def test_first_alias_and_bad_probes():
    assert first_alias("x") == "x"
    assert first_alias(["x", "y"]) == "x"
    assert first_alias([["x", "y"], ["z"]]) == "x"
    assert first_alias((("deep",),)) == "deep"
    for bad in ([], [[]], [""], [["  "]], [3], None):
        with pytest.raises(ValueError):
            first_alias(bad)
    base = {"prompt": "a", "target_new": "b"}
    bad_probes = [
        {"locality": ["not a dict"]},
        {"locality": {"k": "not a list"}},
        {"locality": {"k": [{"prompt": "p"}]}},
        {"locality": {"k": [{"prompt": "", "ground_truth": "g"}]}},
        {"portability": {"k": {"prompt": ["p", "q"], "ground_truth": ["g"]}}},
        {"portability": {"k": [{"prompt": "p", "ground_truth": [3]}]}},
    ]
    for extra in bad_probes:
        with pytest.raises(ValueError):
            kne.EditRequest.from_dict(dict(base, **extra))
    # a probe with no answer at all is left out, named, and warned about -- not silently dropped
    with pytest.warns(UserWarning, match=r"portability\['k'\]\[0\]"):
        r = kne.EditRequest.from_dict(dict(base, portability={"k": [{"prompt": "p", "ground_truth": []}]}))
    assert r.portability == {} and r.skipped_probes == ["portability['k'][0]"]


# ---------------------------------------------------------------------------------------------- load_knowedit
def _aliases(answer):
    """Every alias string in a KnowEdit answer (string, list, or nested lists)."""
    if isinstance(answer, str):
        return [answer] if answer.strip() else []
    return [a for x in answer for a in _aliases(x)]


def _first_or_none(answer):
    try:
        return first_alias(answer)
    except ValueError:
        return None


@pytest.mark.parametrize("name", sorted(KNOWEDIT_COUNTS))
def test_load_knowedit_shipped_files(name):
    path = kne.datasets.knowedit_path(name)
    assert path.name.endswith(".json.gz") and path.parent.name == "knowedit"
    raw_bytes = gzip.decompress(path.read_bytes())
    assert hashlib.sha256(raw_bytes).hexdigest() == KNOWEDIT_SHA256[name]  # the published file, byte for byte
    assert {"LICENSE", "README.md"} <= {p.name for p in path.parent.iterdir()}
    if name == "zsre":
        reqs = kne.datasets.knowedit(name)
    else:  # these two files hold a few probes with no answer: left out, with a warning naming them
        with pytest.warns(UserWarning, match="without any answer were left out"):
            reqs = kne.datasets.knowedit(name)
    assert len(reqs) == KNOWEDIT_COUNTS[name]
    with pytest.warns(UserWarning) if name != "zsre" else _no_warning():
        assert kne.load_knowedit(path) == reqs
    raw = json.loads(raw_bytes.decode("utf-8"))
    assert len(raw) == len(reqs)
    for rec, r in zip(raw, reqs):
        assert isinstance(r, kne.EditRequest)
        assert r.prompt == rec["prompt"] and r.target_new == first_alias(rec["target_new"])
        assert r.subject == rec["subject"]
        assert r.ground_truth == _first_or_none(rec.get("ground_truth", []))
        n_unusable = 0
        for section in ("locality", "portability"):
            for kind, items in (rec.get(section) or {}).items():
                # every probe with an answer is kept, in order, with its first alias; the others are named
                usable = [it for it in items if _first_or_none(it["ground_truth"]) is not None]
                n_unusable += len(items) - len(usable)
                got = getattr(r, section).get(kind, [])
                assert [p["prompt"] for p in got] == [it["prompt"] for it in usable]
                assert [p["ground_truth"] for p in got] == [first_alias(it["ground_truth"]) for it in usable]
        assert len(r.skipped_probes) == n_unusable
    if name == "zsre":
        assert all(r.rephrase_prompt for r in reqs)
    if name == "recent":
        assert all(r.ground_truth is None for r in reqs)
    limited = kne.datasets.knowedit(name.upper(), limit=5)  # short names in any case
    assert limited == reqs[:5]


def _no_warning():
    import contextlib
    import warnings

    @contextlib.contextmanager
    def cm():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield

    return cm()


def test_datasets_resolve_names_and_paths(tmp_path):
    assert kne.datasets.resolve_data("counterfact") == kne.datasets.knowedit_path("counterfact")
    f = tmp_path / "mine.json"
    f.write_text(json.dumps([{"prompt": "a", "target_new": "b"}]))
    assert kne.datasets.resolve_data(str(f)) == f
    with pytest.raises(FileNotFoundError, match="zsre, counterfact, recent"):
        kne.datasets.resolve_data(str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="unknown KnowEdit data set 'wikibio'"):
        kne.datasets.knowedit("wikibio")
    gz = tmp_path / "mine.json.gz"
    gz.write_bytes(gzip.compress(f.read_bytes()))
    assert kne.load_knowedit(gz) == kne.load_knowedit(f)


def test_probe_without_answer_does_not_reject_the_record():
    """KnowEdit has locality probes whose ground truth is '' or [[]] (wiki_counterfact record 326,
    wiki_recent record 3): the edit request itself is valid and must load."""
    rec = {"prompt": "The gender of Ingrida Amantova is", "target_new": "female", "subject": "Ingrida Amantova",
           "locality": {"Relation_Specificity": [
               {"prompt": "The place of birth of Ingrida Amantova is", "ground_truth": [["Cesis"]]},
               {"prompt": "The name of the award Ingrida Amantova won is", "ground_truth": [[], ["Honorary Doctor"]]},
               {"prompt": "The name of the father of Ingrida Amantova is", "ground_truth": [[]]},
           ], "Forgetfulness": [{"prompt": "The position held by Ingrida Amantova is", "ground_truth": ""}]}}
    with pytest.warns(UserWarning, match="without any answer"):
        r = kne.EditRequest.from_dict(rec)
    assert r.prompt == rec["prompt"] and r.target_new == "female"
    assert r.skipped_probes == ["locality['Relation_Specificity'][2]", "locality['Forgetfulness'][0]"]
    probes = [p for ps in r.locality.values() for p in ps]
    assert {"prompt": "The place of birth of Ingrida Amantova is", "ground_truth": "Cesis"} in probes
    assert all(isinstance(p["ground_truth"], str) and p["ground_truth"].strip() for p in probes)


def test_load_knowedit_json_lines_and_errors(tmp_path):
    recs = [
        {"prompt": "The capital of France is", "target_new": "Rome", "ground_truth": [["Paris"]]},
        {"prompt": "Alan Turing was born in", "target_new": ["London", "Londres"], "subject": "Alan Turing"},
        {"prompt": "Toko Yasuda plays the", "target_new": "piano",
         "locality": {"R": [{"prompt": "Toko Yasuda was born in", "ground_truth": ["Japan"]}]}},
    ]
    jl = tmp_path / "recs.jsonl"
    jl.write_text("\n" + "\n\n".join(json.dumps(r) for r in recs) + "\n  \n", encoding="utf-8")
    reqs = kne.load_knowedit(jl)
    assert [r.target_new for r in reqs] == ["Rome", "London", "piano"]
    assert reqs[0].ground_truth == "Paris" and reqs[1].subject == "Alan Turing"
    assert reqs[2].locality == {"R": [{"prompt": "Toko Yasuda was born in", "ground_truth": "Japan"}]}
    assert kne.load_knowedit(str(jl), limit=2) == reqs[:2]
    # a JSON array file with the same records loads the same
    arr = tmp_path / "recs.json"
    arr.write_text(json.dumps(recs, indent=2), encoding="utf-8")
    assert kne.load_knowedit(arr) == reqs
    # malformed JSON lines: the error names the file and the line
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(recs[0]) + "\n{\"prompt\": \"x\", \n", encoding="utf-8")
    with pytest.raises(ValueError) as e:
        kne.load_knowedit(bad)
    assert "bad.jsonl:2" in str(e.value)
    # a malformed JSON array
    bad_arr = tmp_path / "bad.json"
    bad_arr.write_text("[" + json.dumps(recs[0]) + ",", encoding="utf-8")
    with pytest.raises(ValueError):
        kne.load_knowedit(bad_arr)
    # a record without target_new: the error names the record
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps(recs[0]) + "\n" + json.dumps({"prompt": "only a prompt"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="record 1"):
        kne.load_knowedit(missing)
    with pytest.raises(FileNotFoundError):
        kne.load_knowedit(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="limit"):
        kne.load_knowedit(jl, limit=0)


# ---------------------------------------------------------------------------------------------- Ensemble
def _ensemble(gen, axis="out"):
    ens = kne.Ensemble(
        indices={"mlp.down_proj": {0: torch.randperm(32, generator=gen)[:4], 2: [31, 0, 5, 5]},
                 "mlp.up_proj": {1: [47]}},
        neuron_axis=axis, thresholds={"mlp.down_proj": 0.123456789012345, "mlp.up_proj": -1.5e-7},
        n_neurons={"mlp.down_proj": 32, "mlp.up_proj": 48}, n_layers={"mlp.down_proj": 3, "mlp.up_proj": 3},
        config=KNEConfig(neuron_axis=axis).to_dict())
    return ens


@pytest.mark.parametrize("axis", ["out", "in"])
def test_ensemble_save_load_round_trip(tmp_path, gen, axis):
    ens = _ensemble(gen, axis)
    # indices are normalised: sorted, unique, long
    assert ens.indices["mlp.down_proj"][2].tolist() == [0, 5, 31]
    assert all(t.dtype == torch.long for _, _, t in ens.items())
    assert len(ens) == 4 + 3 + 1 == ens.size
    path = ens.save(tmp_path / "sub" / "ens.json")
    assert path.is_file()
    back = kne.Ensemble.load(path)
    assert back.neuron_axis == axis
    assert back.to_knb_dict() == ens.to_knb_dict()
    for s, l, t in ens.items():
        assert torch.equal(back.indices[s][l], t)
    assert back.thresholds == ens.thresholds and back.n_neurons == ens.n_neurons and back.n_layers == ens.n_layers
    assert back.config == ens.config
    assert kne.Ensemble.load(path, neuron_axis=axis).to_knb_dict() == ens.to_knb_dict()
    other = "in" if axis == "out" else "out"
    with pytest.raises(ValueError, match="neuron_axis"):
        kne.Ensemble.load(path, neuron_axis=other)
    # the authors' bare knb_dict file
    bare = tmp_path / "knb.json"
    bare.write_text(json.dumps(ens.to_knb_dict()), encoding="utf-8")
    b = kne.Ensemble.load(bare, neuron_axis=axis)
    assert b.to_knb_dict() == ens.to_knb_dict() and b.neuron_axis == axis
    assert kne.Ensemble.load(bare).neuron_axis == "out"


def test_ensemble_from_knb_dict_with_string_layer_keys():
    knb = {"mlp.down_proj": {"2": [7, 3, 3], "0": [1], "1": []}, "down_proj": {}}
    ens = kne.Ensemble.from_knb_dict(knb, neuron_axis="in")
    assert ens.neuron_axis == "in"
    assert list(ens.indices["mlp.down_proj"]) == [0, 2]  # int keys, ascending, empty layers dropped
    assert ens.indices["mlp.down_proj"][2].tolist() == [3, 7]
    assert ens.to_knb_dict() == {"mlp.down_proj": {"0": [1], "2": [3, 7]}, "down_proj": {}}
    assert ens.counts() == {"mlp.down_proj": {0: 1, 2: 2}, "down_proj": {}}
    assert kne.Ensemble.from_knb_dict({"mlp.down_proj": {1: torch.tensor([4, 2])}}).to_knb_dict() == \
        {"mlp.down_proj": {"1": [2, 4]}}
    for bad, match in (({"m": {"x": [1]}}, "integers"), ({"m": {0: [-1, 2]}}, "negative"), ({"m": [1, 2]}, "map"),
                       ([("m", {0: [1]})], "dict")):
        with pytest.raises(ValueError, match=match):
            kne.Ensemble.from_knb_dict(bad)
    with pytest.raises(ValueError, match="neuron_axis"):
        kne.Ensemble.from_knb_dict({"m": {0: [1]}}, neuron_axis="rows")


def test_ensemble_binds_to_a_model_by_suffix_alias_or_short_name(tiny_model):
    model = tiny_model("llama")
    for key in ("mlp.down_proj", "ffn_out", "down_proj"):
        ens = kne.Ensemble.from_knb_dict({key: {"1": [0, 31]}})
        (site, idx), = ens.sites(model)
        assert site.module is model.model.layers[1].mlp.down_proj and idx.tolist() == [0, 31]
    with pytest.raises(ValueError, match="not found"):
        kne.Ensemble.from_knb_dict({"mlp.nothing": {0: [1]}}).sites(model)
    with pytest.raises(ValueError, match=rf"names layer {LAYERS}, but this model has {LAYERS} layers"):
        kne.Ensemble.from_knb_dict({"mlp.down_proj": {LAYERS: [1]}}).sites(model)


@pytest.mark.parametrize("axis, n", [("out", 32), ("in", 48)])
def test_ensemble_index_beyond_the_module_raises_when_used(tiny_model, tok, axis, n):
    model = tiny_model("llama")
    snap = snapshot(model)
    ok = kne.Ensemble.from_knb_dict({"mlp.down_proj": {0: [n - 1]}}, neuron_axis=axis)
    assert len(ok.sites(model)) == 1
    ens = kne.Ensemble.from_knb_dict({"mlp.down_proj": {0: [0, 1], 2: [3, n]}}, neuron_axis=axis)  # fine to build
    with pytest.raises(ValueError) as e:
        ens.sites(model)
    msg = str(e.value)
    assert str(n) in msg and "model.layers.2.mlp.down_proj" in msg and "out of range" in msg
    req = {"prompt": "The capital of France is", "target_new": "Rome"}
    for edit in (kne.fast_edit, kne.reference.edit):
        with pytest.raises(ValueError, match="out of range"):
            edit(model, tok, req, AUTHORS, ensemble=ens, steps=2)
        assert_state_equal(model, snap)
    assert all(not m._forward_hooks for m in model.modules())


def test_locate_result_round_trips_and_reedits_identically(tiny_model, tok, tmp_path, gen):
    """An ensemble saved to disk and loaded back gives the same edit as the in-memory one."""
    model = tiny_model("gpt2")
    reqs = [{"prompt": "The capital of France is", "target_new": "Rome"},
            {"prompt": "Toko Yasuda plays the", "target_new": "piano"}]
    ens = kne.locate(model, tok, reqs, percentile=80.0, target_modules=("ffn_in", "ffn_out"), neuron_axis="in")
    assert ens.config["neuron_axis"] == "in" and ens.config["percentile"] == 80.0
    assert set(ens.n_layers.values()) == {LAYERS}
    back = kne.Ensemble.load(ens.save(tmp_path / "e.json"))
    assert back.thresholds == ens.thresholds
    kw = dict(steps=3, dropout=0.0, stop_loss=0.0)
    a = kne.fast_edit(model, tok, reqs[0], AUTHORS, ensemble=ens, **kw)
    wa = snapshot(model)
    a.restore()
    b = kne.fast_edit(model, tok, reqs[0], AUTHORS, ensemble=back, **kw)
    assert a.stats["losses"] == b.stats["losses"]
    assert_state_equal(model, wa)
    assert math.isclose(a.stats["target_param_fraction"], b.stats["target_param_fraction"])
    b.restore()


def test_presets():
    assert kne.KNEConfig.preset("authors") == kne.KNEConfig()
    t = kne.KNEConfig.preset("tuned", lr=1e-3)
    assert (t.neuron_axis, t.dropout, t.stop_loss, t.lr) == ("in", 0.0, 0.1, 1e-3)
    k = kne.KNEConfig.preset("knb")
    assert (k.stop_after_step, k.loss_reduction, k.delta_init, k.add_special_tokens, k.always_space, k.dropout) == (
        True, "token", "authors", True, True, 0.0)
    # the rest are the authors' YAML values, which are KNEConfig's defaults
    assert k.replace(stop_after_step=False, loss_reduction="request", delta_init="zeros", add_special_tokens=False,
                     always_space=False, dropout=0.1) == kne.KNEConfig()
    d = kne.KNEConfig()
    assert (d.stop_after_step, d.loss_reduction, d.always_space) == (False, "request", False)
    with pytest.raises(ValueError, match="unknown preset 'fastest'"):
        kne.KNEConfig.preset("fastest")
    with pytest.raises(ValueError, match="KNEConfig.dropout"):
        kne.KNEConfig.preset("tuned", dropout=2.0)


def test_every_config_field_is_in_the_usage_settings_table():
    """docs/usage.md's Settings table (rendered from KNEConfig) names every field (docs that match the code)."""
    import dataclasses
    from pathlib import Path

    usage = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text(encoding="utf-8")
    table = usage.split("<!-- table: settings -->")[1].split("<!-- /table -->")[0]
    missing = [f.name for f in dataclasses.fields(KNEConfig) if f"`{f.name}`" not in table]
    assert not missing, f"docs/usage.md Settings lacks {missing}"


def test_describe_names_the_preset_and_what_differs():
    from kne.config import describe

    assert describe(kne.KNEConfig.preset("local")) == "local"
    assert describe(kne.KNEConfig()) == "authors"
    assert describe(kne.KNEConfig.preset("tuned")) == "tuned"
    assert describe(kne.KNEConfig.preset("knb")) == "knb"
    assert describe(kne.KNEConfig.preset("local", lr=15.0, stop_rule="margin")) == \
        "local with lr=15.0, stop_rule='margin'"
    assert describe(kne.KNEConfig(steps=5)) == "authors with steps=5"


@pytest.mark.parametrize("edit", ["fast_edit", "reference.edit"])
def test_an_edit_given_no_config_uses_the_local_preset(tiny_model, tok, edit):
    """kne.config.DEFAULT_PRESET: an edit with no config is a local edit (rows projected off the
    subject's neighbours, ngd, the argmax stop); overrides apply on top of it."""
    assert kne.config.DEFAULT_PRESET == "local"
    fn = kne.fast_edit if edit == "fast_edit" else kne.reference.edit
    model = tiny_model("llama")
    snap = snapshot(model)
    req = {"prompt": "The capital of France is", "target_new": "Rome", "subject": "France"}
    res = fn(model, tok, req, steps=3, percentile=90.0)
    try:
        assert res.config == kne.KNEConfig.preset("local", steps=3, percentile=90.0)
        assert res.stats["preset"] == "local with percentile=90.0, steps=3"
        assert "neighbours" in res.stats  # the local preset's neighbour prompts were kept
    finally:
        res.restore()
    assert_state_equal(model, snap)
    res = fn(model, tok, req, kne.KNEConfig.preset("authors"), steps=2, percentile=90.0)
    try:
        assert res.config.optimizer == "adamw" and res.stats["preset"] == "authors with percentile=90.0, steps=2"
    finally:
        res.restore()
