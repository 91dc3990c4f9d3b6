"""Architecture adapters: every registered model type resolves its FFN projections correctly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import kne
from kne import adapters
from kne.adapters import resolve_sites

from conftest import HIDDEN, INTERMEDIATE, LAYERS
from helpers import AUTHORS, assert_state_equal, rel_err, requests, snapshot

TYPES = kne.supported_model_types()
EXPECTED_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2", "gptj", "gpt_neox", "opt"}


def test_registry_lists_the_documented_types():
    assert EXPECTED_TYPES <= set(TYPES)
    assert TYPES == sorted(TYPES)
    for t in EXPECTED_TYPES:
        arch = adapters._REGISTRY[t]
        aliases = [a for a, _ in arch.modules]
        assert "ffn_in" in aliases and "ffn_out" in aliases, t
        gated = t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
        assert ("ffn_gate" in aliases) == gated, t


# (out_features, in_features) of every alias in the tiny models
SHAPES = {"ffn_in": (INTERMEDIATE, HIDDEN), "ffn_gate": (INTERMEDIATE, HIDDEN), "ffn_out": (HIDDEN, INTERMEDIATE)}


@pytest.mark.parametrize("model_type", TYPES)
def test_resolve_sites_finds_every_alias_with_out_in_weight_view(model_type, tiny_model, seed):
    model = tiny_model(model_type, seed=seed % 1000)
    arch = adapters._REGISTRY[model_type]
    aliases = [a for a, _ in arch.modules]
    sites = resolve_sites(model, aliases)
    assert list(sites) == aliases
    assert adapters.num_layers(model) == LAYERS
    g = torch.Generator().manual_seed(seed)
    for alias in aliases:
        ss = sites[alias]
        assert [s.layer for s in ss] == list(range(LAYERS))
        for s in ss:
            assert s.suffix == arch.suffix(alias)
            assert s.path == f"{arch.layers}.{s.layer}.{s.suffix}"
            assert model.get_submodule(s.path) is s.module
            # gpt2 stores Conv1D weights [in, out]; every other type uses nn.Linear [out, in]
            assert s.transposed == (model_type == "gpt2")
            assert isinstance(s.module, nn.Linear) != s.transposed
            w = s.weight()
            assert tuple(w.shape) == SHAPES[alias], (alias, tuple(w.shape))
            assert (s.out_features, s.in_features) == SHAPES[alias]
            assert s.num_neurons("out") == SHAPES[alias][0] and s.num_neurons("in") == SHAPES[alias][1]
            if s.transposed:
                assert tuple(s.module.weight.shape) == SHAPES[alias][::-1]
            # a view sharing storage with the parameter
            assert w.data_ptr() == s.module.weight.data_ptr()
            # the view is what the module computes with: module(x) == x @ W^T + b
            x = torch.randn(2, 5, s.in_features, generator=g)
            with torch.no_grad():
                y = s.module(x)
                expect = x @ w.t()
                if s.bias is not None:
                    expect = expect + s.bias
            assert y.shape == (2, 5, s.out_features)
            assert torch.allclose(y, expect, rtol=1e-5, atol=1e-6), (alias, (y - expect).abs().max())
            # and writing through the view changes the module's output accordingly
            with torch.no_grad():
                old = w[0].clone()
                w[0] += 1.0
                y2 = s.module(x)
                w[0] = old
            moved = (y2 - y).abs().amax(dim=(0, 1))
            assert torch.allclose((y2 - y)[..., 0], x.sum(-1), rtol=1e-4, atol=1e-4)
            assert moved[1:].max() <= 1e-5, "changing row 0 of the [out, in] view moved other outputs"


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_suffix_names_resolve_like_aliases(model_type, tiny_model):
    model = tiny_model(model_type)
    arch = adapters._REGISTRY[model_type]
    for alias, suffix in arch.modules:
        by_alias = resolve_sites(model, [alias])[alias]
        by_suffix = resolve_sites(model, [suffix])[suffix]
        assert [s.module for s in by_alias] == [s.module for s in by_suffix]
        assert by_suffix[0].name == suffix and by_alias[0].name == alias


def test_layers_subset_and_negative_indices(tiny_model):
    model = tiny_model("llama")
    ss = resolve_sites(model, ["ffn_out"], [-1, 0])["ffn_out"]
    assert [s.layer for s in ss] == [0, LAYERS - 1]
    assert ss[1].module is model.model.layers[LAYERS - 1].mlp.down_proj


def test_gpt2_sites_are_transposed_conv1d(tiny_model):
    model = tiny_model("gpt2")
    s = resolve_sites(model, ["ffn_in"])["ffn_in"][1]
    assert type(s.module).__name__ == "Conv1D"
    assert s.transposed
    assert tuple(s.module.weight.shape) == (HIDDEN, INTERMEDIATE)
    assert tuple(s.weight().shape) == (INTERMEDIATE, HIDDEN)
    assert torch.equal(s.weight(), s.module.weight.t())


# ---------------------------------------------------------------------------------------------- errors
class _Nope(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(model_type="nope")
        self.layers = nn.ModuleList([nn.Linear(4, 4)])


def test_unsupported_model_type_lists_supported_types_and_register_architecture(tok):
    model = _Nope()
    with pytest.raises(ValueError) as e:
        resolve_sites(model, ["ffn_out"])
    msg = str(e.value)
    assert "'nope'" in msg
    for t in TYPES:
        assert t in msg
    assert "register_architecture" in msg
    with pytest.raises(ValueError, match="register_architecture"):
        kne.attribute(model, tok, {"prompt": "a b", "target_new": "c"})
    with pytest.raises(ValueError, match="register_architecture"):
        kne.fast_edit(model, tok, {"prompt": "a b", "target_new": "c"}, AUTHORS)


def test_model_without_config_is_unsupported():
    with pytest.raises(ValueError, match="register_architecture"):
        adapters.get_architecture(nn.Linear(2, 2))


@pytest.mark.parametrize("name", ["mlp.nope", "nope", "mlp.down_projx", "self_attn.q_proj.bogus"])
def test_unknown_target_module_is_a_clear_error(tiny_model, name):
    model = tiny_model("llama")
    with pytest.raises(ValueError) as e:
        resolve_sites(model, [name])
    msg = str(e.value)
    assert repr(name) in msg and "not found" in msg
    assert "ffn_out=mlp.down_proj" in msg  # the fix: the available aliases


def test_missing_alias_is_a_clear_error(tiny_model):
    model = tiny_model("gpt2")  # no gate projection
    with pytest.raises(ValueError) as e:
        resolve_sites(model, ["ffn_out", "ffn_gate"])
    assert "'ffn_gate'" in str(e.value) and "gpt2" in str(e.value)
    assert "mlp.c_proj" in str(e.value)


def test_non_linear_target_module_is_rejected(tiny_model):
    model = tiny_model("llama")
    for name in ("mlp", "mlp.act_fn", "input_layernorm"):
        with pytest.raises(ValueError, match="nn.Linear"):
            resolve_sites(model, [name])


def test_alias_and_suffix_of_the_same_module_is_rejected(tiny_model):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="same module twice"):
        resolve_sites(model, ["ffn_out", "mlp.down_proj"])


@pytest.mark.parametrize("layers", [(3,), (0, 7), (-4,), (100,)])
def test_bad_layer_indices_are_clear_errors(tiny_model, tok, layers):
    model = tiny_model("llama")
    with pytest.raises(ValueError) as e:
        resolve_sites(model, ["ffn_out"], layers)
    msg = str(e.value)
    assert "KNEConfig.layers" in msg and "outside" in msg and f"[0, {LAYERS - 1}]" in msg
    with pytest.raises(ValueError, match="KNEConfig.layers"):
        kne.attribute(model, tok, {"prompt": "a b", "target_new": "c"}, layers=layers)


def test_exclude_edge_layers_leaves_out_the_first_and_last(tiny_model, tok):
    model = tiny_model("llama")
    layers = lambda **kw: [s.layer for s in resolve_sites(model, ["ffn_out"], **kw)["ffn_out"]]
    assert layers(exclude_edge=1) == list(range(1, LAYERS - 1))
    assert layers(layers=[0, 1, -1], exclude_edge=1) == [1]  # the given layers, less the edges
    assert layers(exclude_edge=0) == list(range(LAYERS))
    for edge, given in ((LAYERS // 2 + 1, None), (1, [0, LAYERS - 1])):
        with pytest.raises(ValueError, match="exclude_edge_layers.*smaller number"):
            resolve_sites(model, ["ffn_out"], given, edge)
    att = kne.attribute(model, tok, {"prompt": "a b", "target_new": "c"}, exclude_edge_layers=1)
    assert att.layers == tuple(range(1, LAYERS - 1))
    res = kne.fast_edit(model, tok, {"prompt": "a b", "target_new": "c"}, AUTHORS, percentile=0.0, positive_only=False,
                        steps=1, exclude_edge_layers=1)
    try:
        (per,) = res.ensemble.indices.values()
        assert sorted(per) == list(range(1, LAYERS - 1))  # every inner layer has neurons, no edge layer
        w = resolve_sites(model, ["ffn_out"])["ffn_out"][0].module.weight.numel()
        assert res.stats["params_edited"] / res.stats["target_param_fraction"] == pytest.approx(w * (LAYERS - 2))
    finally:
        res.restore()


def test_same_layer_twice_through_negative_index_is_rejected(tiny_model):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="twice"):
        resolve_sites(model, ["ffn_out"], [0, -LAYERS])


# ---------------------------------------------------------------------------------------------- custom types
class _ToyBlock(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.ff = nn.ModuleDict({"up": nn.Linear(d, f), "down": nn.Linear(f, d)})

    def forward(self, h):
        return h + self.ff["down"](torch.tanh(self.ff["up"](self.norm(h))))


class _ToyLM(nn.Module):
    """A minimal causal LM of a type transformers does not know (no attention: a bag of prefixes)."""

    def __init__(self, vocab, d=16, f=24, n=2, model_type="kne_test_toy"):
        super().__init__()
        self.config = SimpleNamespace(model_type=model_type)
        self.emb = nn.Embedding(vocab, d)
        self.body = nn.Module()
        self.body.blocks = nn.ModuleList([_ToyBlock(d, f) for _ in range(n)])
        self.head = nn.Linear(d, vocab, bias=False)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.emb(input_ids).cumsum(1)  # causal: position t sees tokens <= t
        for b in self.body.blocks:
            h = b(h)
        return SimpleNamespace(logits=self.head(h))


def test_register_architecture_makes_a_custom_type_work(tok, seed):
    name = "kne_test_toy"
    assert name not in adapters._REGISTRY
    torch.manual_seed(seed)
    model = _ToyLM(len(tok))
    with pytest.raises(ValueError, match="register_architecture"):
        resolve_sites(model, ["ffn_out"])
    try:
        arch = kne.register_architecture(name, layers="body.blocks", ffn_in="ff.up", ffn_out="ff.down")
        assert name in kne.supported_model_types()
        assert arch.suffix("ffn_out") == "ff.down" and arch.alias("ff.up") == "ffn_in"
        sites = resolve_sites(model, ["ffn_in", "ffn_out"])
        assert [s.module for s in sites["ffn_out"]] == [b.ff["down"] for b in model.body.blocks]
        with pytest.raises(ValueError, match="ffn_gate"):
            resolve_sites(model, ["ffn_gate"])
        # registering the same name twice needs overwrite=True
        with pytest.raises(ValueError, match="overwrite"):
            kne.register_architecture(name, layers="body.blocks", ffn_out="ff.down")
        # attribution, selection and an edit all work on it, fast == reference
        reqs = requests(torch.Generator().manual_seed(seed), 2)
        kw = dict(target_modules=("ffn_in", "ffn_out"), ig_steps=2)
        fast = kne.attribute(model, tok, reqs, **kw)
        ref = kne.reference.attribute(model, tok, reqs, **kw)
        for k in ref.scores:
            assert ref.scores[k].abs().max() > 0
            assert rel_err(fast.scores[k], ref.scores[k]) < 1e-4, k
        snap = snapshot(model)
        res = kne.fast_edit(model, tok, reqs[0], AUTHORS, percentile=50, dropout=0.0, steps=3, stop_loss=0.0, lr=0.05)
        assert res.stats["steps"] == 3 and len(res.ensemble) > 0
        assert res.stats["losses"][-1] < res.stats["losses"][0]
        res.restore()
        assert_state_equal(model, snap)
        # a wrong layer path is a clear error at use
        kne.register_architecture(name, layers="body.nothing", ffn_out="ff.down", overwrite=True)
        with pytest.raises(ValueError, match="body.nothing"):
            resolve_sites(model, ["ffn_out"])
        kne.register_architecture(name, layers="head", ffn_out="ff.down", overwrite=True)
        with pytest.raises(ValueError, match="not a list of decoder layers"):
            resolve_sites(model, ["ffn_out"])
    finally:
        adapters._REGISTRY.pop(name, None)
    assert name not in kne.supported_model_types()


def test_register_architecture_on_an_existing_hf_model_matches_builtin(tiny_model, tok, seed):
    """A llama registered under a new name with the same paths scores exactly like the built-in entry."""
    name = "kne_test_llama_alias"
    model = tiny_model("llama", seed=seed % 1000)
    reqs = requests(torch.Generator().manual_seed(seed), 1)
    builtin = kne.attribute(model, tok, reqs, target_modules=("ffn_gate",))
    try:
        kne.register_architecture(name, layers="model.layers", ffn_gate="mlp.gate_proj")
        model.config.model_type = name
        custom = kne.attribute(model, tok, reqs, target_modules=("ffn_gate",))
        assert torch.equal(custom.scores["ffn_gate"], builtin.scores["ffn_gate"])
        with pytest.raises(ValueError, match="ffn_out"):
            kne.attribute(model, tok, reqs, target_modules=("ffn_out",))
    finally:
        adapters._REGISTRY.pop(name, None)


@pytest.mark.parametrize("kwargs, match", [
    (dict(model_type="", layers="x", ffn_out="y"), "non-empty"),
    (dict(model_type=3, layers="x", ffn_out="y"), "non-empty"),
    (dict(model_type="kne_test_empty", layers="x"), "at least one"),
    (dict(model_type="llama", layers="model.layers", ffn_out="mlp.down_proj"), "already registered"),
])
def test_register_architecture_rejects_bad_arguments(kwargs, match):
    before = dict(adapters._REGISTRY)
    try:
        mt = kwargs.pop("model_type")
        with pytest.raises(ValueError, match=match):
            kne.register_architecture(mt, **kwargs)
        assert adapters._REGISTRY == before
    finally:
        adapters._REGISTRY.clear()
        adapters._REGISTRY.update(before)
