"""kne where its users already work: the EasyEdit drop-in."""

import textwrap

import pytest
import torch

import kne
from kne.integrations.easyedit import KNEHyperParams, apply_kne_to_model
from helpers import assert_state_equal, snapshot

# The authors' hparams/KNB/llama2-7b.yaml layout (their comments, scientific notation that YAML 1.1
# reads as a string, p: null set on the command line).
AUTHORS_YAML = textwrap.dedent("""\
    alg_name: KNB
    model_name: llama2-7b
    device: 0

    layers: []
    num_steps: 30
    batch_size: 1
    max_length: 30
    lr: 5e-3
    weight_decay: 0 # 1e-3 ~ 1e-5
    kl_factor: 0
    norm_constraint: false
    model_parallel: true
    knb_alpha: 1 # alpha / sqrt(len)
    knb_dropout: 0 # 0 first, for accuracy
    use_rsknb: true # knb_alpha/sqrt(knb_len)
    target_modules: ['mlp.down_proj']
    bias: none
    p: null # set from the command line
    t_loss: 1e-2
    bf16: true
    """)

# EasyEdit's request dicts (BaseEditor._prepare_requests): locality/portability as {key: {prompt, ground_truth}}.
EASYEDIT_REQUESTS = [{
    "prompt": "The capital of France is", "target_new": "Rome", "ground_truth": "Paris", "subject": "France",
    "portability": {}, "locality": {"neighborhood": {"prompt": ["The capital of Japan is"], "ground_truth": ["Tokyo"]}},
}]


@pytest.fixture
def yaml_path(tmp_path):
    p = tmp_path / "llama2-7b.yaml"
    p.write_text(AUTHORS_YAML, encoding="utf-8")
    return p


def test_hparams_from_authors_yaml(yaml_path):
    hp = KNEHyperParams.from_hparams(str(yaml_path)[:-5])  # EasyEdit appends .yaml itself
    assert hp.alg_name == "KNB" and hp.lr == 5e-3 and hp.t_loss == 1e-2 and hp.p is None
    assert hp.preset == "local"  # kne's default, and the YAML names none
    # the local preset takes the YAML's localisation keys and says which training keys it does not use
    with pytest.warns(kne._warn.KNEWarning, match=r"training key\(s\) num_steps, lr, weight_decay, knb_alpha, "
                      r"knb_dropout, use_rsknb, t_loss are not used; give preset: authors"):
        cfg = hp.to_config()
    assert cfg == kne.KNEConfig.preset("local", target_modules=("mlp.down_proj",))
    # preset: authors reads every key, as the authors' trainer does
    hp.preset = "authors"
    cfg = hp.to_config()
    assert cfg.lr == 5e-3 and cfg.steps == 30 and cfg.stop_loss == 1e-2 and cfg.dropout == 0.0
    assert cfg.alpha == 1.0 and cfg.rs_scaling and cfg.neuron_axis == "out" and cfg.percentile == 99.0
    assert cfg.target_modules == ("mlp.down_proj",) and cfg.layers is None and cfg.optimizer == "adamw"
    assert hp.to_config(percentile=95.0).percentile == 95.0


def test_hparams_preset_key(tmp_path):
    path = tmp_path / "knb.yaml"
    path.write_text(AUTHORS_YAML + "preset: knb\nknb_layer: last_layer\n", encoding="utf-8")
    cfg = KNEHyperParams.from_hparams(path).to_config()
    assert cfg == kne.KNEConfig.preset("knb", target_modules=("mlp.down_proj",), neuron_axis="in", dropout=0.0)
    path.write_text(AUTHORS_YAML + "knb_layer: last_layer\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"knb.yaml: knb_layer='last_layer' edits columns, and the local preset edits "
                                         r"rows.*preset: authors"):
        KNEHyperParams.from_hparams(path)
    path.write_text("alg_name: KNE\npreset: fast\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"preset='fast' is invalid: use one of authors, tuned, local, knb"):
        KNEHyperParams.from_hparams(path)
    # built in Python: the training keys changed from their defaults are the ones named
    with pytest.warns(kne._warn.KNEWarning, match=r"training key\(s\) lr are not used"):
        KNEHyperParams(lr=0.1).to_config()


def test_shipped_yaml_edits_with_the_local_preset():
    from importlib import resources

    path = resources.files("kne") / "data" / "hparams" / "KNE" / "smollm2-135m.yaml"
    hp = KNEHyperParams.from_hparams(str(path))
    assert hp.alg_name == "KNE" and hp.preset == "local"
    assert hp.to_config() == kne.KNEConfig.preset("local")


def test_hparams_errors(tmp_path):
    bad = tmp_path / "rome.yaml"
    bad.write_text("alg_name: ROME\nlr: 1e-3\n")
    with pytest.raises(ValueError, match="alg_name is 'ROME'"):
        KNEHyperParams.from_hparams(bad)
    odd = tmp_path / "odd.yaml"
    odd.write_text("alg_name: KNB\nknb_layer: middle_layer\n")
    with pytest.raises(ValueError, match="knb_layer='middle_layer'"):
        KNEHyperParams.from_hparams(odd)
    with pytest.raises(FileNotFoundError):
        KNEHyperParams.from_hparams(tmp_path / "missing")


def test_apply_kne_to_model_like_easyedit(yaml_path, tiny_model, tok):
    model = tiny_model("llama")
    snap = snapshot(model)
    hp = KNEHyperParams.from_hparams(yaml_path)
    hp.preset = "authors"
    hp.p = 90.0
    hp.lr = 5e-2
    edited, weights_copy = apply_kne_to_model(model, tok, EASYEDIT_REQUESTS, hp, copy=False,
                                              return_orig_weights=True, keep_original_weight=False,
                                              train_ds=None)
    assert edited is model
    assert weights_copy and all(k.endswith("mlp.down_proj.weight") for k in weights_copy)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, snap[k])]
    assert changed and set(changed) <= set(weights_copy)
    # EasyEdit restores from weights_copy: nethook.get_parameter(model, k)[...] = v
    with torch.no_grad():
        params = dict(model.named_parameters())
        for k, v in weights_copy.items():
            params[k][...] = v
    assert_state_equal(model, snap, "after EasyEdit's restore from weights_copy")


def test_apply_kne_copy_and_knb_dict(yaml_path, tiny_model, tok, tmp_path):
    model = tiny_model("gpt2")
    snap = snapshot(model)
    hp = KNEHyperParams.from_hparams(yaml_path)
    hp.preset = "authors"
    hp.target_modules = ["mlp.c_proj"]
    knb_dict = {"mlp.c_proj": {"0": [3, 5], "2": [7]}}  # the authors' JSON form
    edited, weights_copy = apply_kne_to_model(model, tok, EASYEDIT_REQUESTS, hp, copy=True, knb_dict=knb_dict)
    assert edited is not model and weights_copy == {}
    assert_state_equal(model, snap, "the original model under copy=True")
    diff = {k for k, v in edited.state_dict().items() if not torch.equal(v, snap[k])}
    assert diff == {"transformer.h.0.mlp.c_proj.weight", "transformer.h.2.mlp.c_proj.weight"}
    w0 = edited.transformer.h[0].mlp.c_proj.weight  # Conv1D: [in, out]; neuron i is column i
    rows_changed = (w0 != snap["transformer.h.0.mlp.c_proj.weight"]).any(0).nonzero().flatten().tolist()
    assert rows_changed == [3, 5]
    # the same through a saved ensemble file
    path = kne.Ensemble.from_knb_dict(knb_dict).save(tmp_path / "knb.json")
    edited2, _ = apply_kne_to_model(model, tok, EASYEDIT_REQUESTS, hp, copy=True, knb_dict=str(path))
    assert all(torch.equal(edited2.state_dict()[k], v) for k, v in edited.state_dict().items())
