"""Architecture adapters: where the decoder layers and FFN projections of a model live.

A registry maps a Hugging Face ``model_type`` to the dotted path of its decoder-layer list and to
the FFN projections inside one layer under neutral aliases:

* ``ffn_in``: the up projection (``mlp.up_proj``, GPT-2 ``mlp.c_fc``, OPT ``fc1``...),
* ``ffn_gate``: the gate projection of gated FFNs (``mlp.gate_proj``),
* ``ffn_out``: the down projection (``mlp.down_proj``, GPT-2 ``mlp.c_proj``, OPT ``fc2``...).

Target modules may be named by alias or by their suffix inside a layer (``"mlp.down_proj"``). The
weight layout is read from the module class: ``nn.Linear`` stores ``[out, in]``, GPT-2's
``Conv1D`` stores ``[in, out]``; :meth:`ModuleSite.weight` always returns an ``[out, in]`` view,
so every caller can ignore the difference. Other architectures are added with
:func:`register_architecture`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = [
    "Architecture",
    "ModuleSite",
    "register_architecture",
    "get_architecture",
    "supported_model_types",
    "resolve_sites",
    "num_layers",
    "ALIASES",
]

ALIASES = ("ffn_in", "ffn_gate", "ffn_out")


@dataclass(frozen=True)
class Architecture:
    """Where the FFN projections of one family of models live."""

    layers: str
    modules: Tuple[Tuple[str, str], ...]  # (alias, suffix inside a layer)

    def suffix(self, alias: str) -> Optional[str]:
        return dict(self.modules).get(alias)

    def alias(self, suffix: str) -> Optional[str]:
        for a, s in self.modules:
            if s == suffix:
                return a
        return None


_REGISTRY: Dict[str, Architecture] = {}


def register_architecture(
    model_type: str,
    *,
    layers: str,
    ffn_in: Optional[str] = None,
    ffn_gate: Optional[str] = None,
    ffn_out: Optional[str] = None,
    overwrite: bool = False,
) -> Architecture:
    """Teach kne a new ``model_type``.

    ``layers`` is the dotted path from the model to its list of decoder layers
    (``"model.layers"``); ``ffn_in`` / ``ffn_gate`` / ``ffn_out`` are module paths inside one layer
    (``"mlp.up_proj"``). Example::

        kne.register_architecture("my_llama", layers="model.layers",
                                  ffn_in="mlp.up_proj", ffn_gate="mlp.gate_proj", ffn_out="mlp.down_proj")
    """
    if not isinstance(model_type, str) or not model_type:
        raise ValueError("model_type must be a non-empty string such as 'llama'")
    if model_type in _REGISTRY and not overwrite:
        raise ValueError(f"model_type {model_type!r} is already registered; pass overwrite=True to replace it")
    mods = tuple((a, s) for a, s in (("ffn_in", ffn_in), ("ffn_gate", ffn_gate), ("ffn_out", ffn_out)) if s)
    if not mods:
        raise ValueError("register_architecture needs at least one of ffn_in, ffn_gate, ffn_out")
    arch = Architecture(layers=layers, modules=mods)
    _REGISTRY[model_type] = arch
    return arch


for _t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"):
    register_architecture(_t, layers="model.layers", ffn_in="mlp.up_proj", ffn_gate="mlp.gate_proj",
                          ffn_out="mlp.down_proj")
register_architecture("gpt2", layers="transformer.h", ffn_in="mlp.c_fc", ffn_out="mlp.c_proj")
register_architecture("gptj", layers="transformer.h", ffn_in="mlp.fc_in", ffn_out="mlp.fc_out")
register_architecture("gpt_neox", layers="gpt_neox.layers", ffn_in="mlp.dense_h_to_4h", ffn_out="mlp.dense_4h_to_h")
register_architecture("opt", layers="model.decoder.layers", ffn_in="fc1", ffn_out="fc2")


def supported_model_types() -> List[str]:
    return sorted(_REGISTRY)


def _model_type(model: nn.Module) -> Optional[str]:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None)


def get_architecture(model: nn.Module) -> Architecture:
    if not isinstance(model, nn.Module):
        swapped = callable(model) and hasattr(model, "convert_tokens_to_ids")
        raise ValueError(f"model must be a torch.nn.Module (a Hugging Face causal LM), got {type(model).__name__}"
                         + (": that is a tokenizer; pass the model first, then the tokenizer (model, tokenizer)"
                            if swapped else ""))
    mt = _model_type(model)
    if mt in _REGISTRY:
        return _REGISTRY[mt]
    raise ValueError(
        f"kne has no adapter for model_type {mt!r}. Supported: {', '.join(supported_model_types())}. "
        "Name the modules explicitly with kne.register_architecture("
        f"{mt!r}, layers='<path to the decoder layer list, e.g. model.layers>', "
        "ffn_in='<e.g. mlp.up_proj>', ffn_out='<e.g. mlp.down_proj>')."
    )


def _layer_list(model: nn.Module, arch: Architecture) -> nn.ModuleList:
    try:
        layers = model.get_submodule(arch.layers)
    except AttributeError as e:
        raise ValueError(f"model of type {_model_type(model)!r} has no module {arch.layers!r} "
                         "(its registered layer list); re-register it with the right path") from e
    if not isinstance(layers, (nn.ModuleList, nn.Sequential)):
        raise ValueError(f"{arch.layers!r} is a {type(layers).__name__}, not a list of decoder layers")
    return layers


def num_layers(model: nn.Module) -> int:
    return len(_layer_list(model, get_architecture(model)))


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D (GPT-2): weight [in, out], y = x @ W + b
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def weight_transposed(module: nn.Module) -> Optional[bool]:
    """Whether a projection stores its weight ``[in, out]`` (GPT-2's ``Conv1D``: ``True``) or
    ``[out, in]`` (``nn.Linear``: ``False``); ``None`` for a module kne does not edit."""
    if isinstance(module, nn.Linear):
        return False
    return True if _is_conv1d(module) else None


def _align_hook(module: nn.Module):
    """Accelerate's AlignDevicesHook on ``module`` (also inside a SequentialHook), or None."""
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])
    for h in hooks:
        if type(h).__name__ == "AlignDevicesHook":
            return h
    return None


def _offload_hook(module: nn.Module):
    h = _align_hook(module)
    return h if h is not None and getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None else None


def _offloaded_weight(module: nn.Module, name: str = "weight") -> Optional[torch.Tensor]:
    """The persistent tensor behind an offloaded module's parameter ``name`` (loaded once into the
    offload store's in-memory dict when it lives on disk, so writes to it are what later forwards
    load); ``None`` for a module Accelerate does not offload."""
    hook = _offload_hook(module)
    if hook is None:
        return None
    wm = hook.weights_map
    store, key = (wm.dataset, wm.prefix + name) if hasattr(wm, "dataset") and hasattr(wm, "prefix") else (wm, name)
    state = getattr(store, "state_dict", None)
    if isinstance(state, dict):  # accelerate's OffloadedWeightsLoader: memory first, then disk
        if key not in state:
            state[key] = store[key].clone()  # a writable copy of the memory-mapped weight
            if hasattr(store, "all_keys") and key not in store.all_keys:
                store.all_keys.append(key)
        return state[key]
    if isinstance(store, dict):
        return store[key]
    raise ValueError(f"cannot reach the offloaded weight of {type(module).__name__} (offload store "
                     f"{type(store).__name__}); load the model without offloading to edit it")


@dataclass
class ModuleSite:
    """One target module instance: a linear FFN projection of one decoder layer."""

    name: str  # the name the caller used (alias or suffix)
    suffix: str  # path inside the layer, e.g. "mlp.down_proj"
    layer: int
    path: str  # full module path inside the model
    module: nn.Module
    transposed: bool  # weight stored [in, out] (GPT-2 Conv1D)

    def weight(self) -> torch.Tensor:
        """The weight as an ``[out, in]`` view of the tensor that holds its values: the module's
        parameter, or -- for a module whose weights Accelerate offloads (``device_map`` with
        ``"cpu"``/``"disk"`` offload) -- the tensor in the offload store its hooks load from, so an
        in-place write reaches every later forward."""
        w = _offloaded_weight(self.module)
        if w is None:
            w = self.module.weight
        return w.t() if self.transposed else w

    @property
    def offloaded(self) -> bool:
        return _offload_hook(self.module) is not None

    @property
    def device(self) -> torch.device:
        """Where the module computes: the execution device of Accelerate's hook, else its weight's."""
        hook = _align_hook(self.module)
        if hook is not None and getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
        return self.module.weight.device

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """The bias values (for an offloaded module: from the offload store, on the compute device)."""
        b = getattr(self.module, "bias", None)
        if b is not None and b.device.type == "meta":
            stored = _offloaded_weight(self.module, "bias")
            b = None if stored is None else stored.to(self.device)
        return b

    @property
    def out_features(self) -> int:
        return self.weight().shape[0]

    @property
    def in_features(self) -> int:
        return self.weight().shape[1]

    def num_neurons(self, axis: str) -> int:
        return self.out_features if axis == "out" else self.in_features


def require_resident(sites, what: str) -> None:
    """Refuse offloaded modules where an implementation trains parameters through autograd."""
    off = [s.path for s in sites if s.offloaded]
    if off:
        raise ValueError(f"{what} trains parameters through autograd and cannot reach weights that Accelerate "
                         f"offloads ({off[0]}{' ...' if len(off) > 1 else ''}): use kne.fast_edit, or load the model "
                         "without offloading")


def resolve_sites(model: nn.Module, target_modules: Sequence[str],
                  layers: Optional[Sequence[int]] = None, exclude_edge: int = 0) -> Dict[str, List[ModuleSite]]:
    """``{name: [ModuleSite per layer]}`` for every target module name, layers ascending: the
    ``layers`` given (``None``: all) less the first and the last ``exclude_edge`` decoder layers
    (``KNEConfig.exclude_edge_layers``)."""
    arch = get_architecture(model)
    layer_list = _layer_list(model, arch)
    n = len(layer_list)
    if layers is None:
        idx = list(range(n))
    else:
        bad = [l for l in layers if not -n <= l < n]
        if bad:
            raise ValueError(f"KNEConfig.layers={tuple(layers)} has indices {bad} outside the model's "
                             f"{n} layers: use indices in [0, {n - 1}] or None for all layers")
        idx = sorted({l % n for l in layers})
        if len(idx) != len(layers):
            raise ValueError(f"KNEConfig.layers={tuple(layers)} names a layer twice")
    if exclude_edge:
        idx = [l for l in idx if exclude_edge <= l < n - exclude_edge]
        if not idx:
            raise ValueError(f"KNEConfig.exclude_edge_layers={exclude_edge} leaves none of the "
                             f"{'model' if layers is None else 'given'} layers of this {n}-layer model: use a "
                             f"smaller number (at most {max(0, (n - 1) // 2)}) or other layers")
    out: Dict[str, List[ModuleSite]] = {}
    for name in target_modules:
        suffix = arch.suffix(name) or name
        if name in ALIASES and arch.suffix(name) is None:
            raise ValueError(f"model_type {_model_type(model)!r} has no {name!r} module; available: "
                             + ", ".join(f"{a} ({s})" for a, s in arch.modules))
        sites = []
        for l in idx:
            try:
                mod = layer_list[l].get_submodule(suffix)
            except AttributeError:
                raise ValueError(
                    f"target module {name!r} not found in layer {l} of a {_model_type(model)!r} model; use an "
                    "alias (" + ", ".join(f"{a}={s}" for a, s in arch.modules) + ") or a module path inside "
                    "a decoder layer such as 'mlp.down_proj'") from None
            transposed = weight_transposed(mod)
            if transposed is None:
                raise ValueError(f"target module {name!r} ({arch.layers}.{l}.{suffix}) is a "
                                 f"{type(mod).__name__}; kne edits nn.Linear and GPT-2 Conv1D projections only")
            sites.append(ModuleSite(name=name, suffix=suffix, layer=l, path=f"{arch.layers}.{l}.{suffix}",
                                    module=mod, transposed=transposed))
        out[name] = sites
    suffixes = [s[0].suffix for s in out.values()]
    if len(set(suffixes)) != len(suffixes):
        raise ValueError(f"target_modules {tuple(target_modules)} name the same module twice (alias and suffix)")
    return out


def distinct_sites(sites) -> None:
    """Refuse two sites that are one module object (a module shared by two layers) or one weight
    (tied weights): an edit would write it twice, and the model would not be the one trained."""
    seen: Dict[int, str] = {}
    for s in sites:
        keys = [id(s.module)]
        w = getattr(s.module, "weight", None)
        if isinstance(w, torch.Tensor) and w.device.type != "meta":
            keys.append(w.untyped_storage().data_ptr())
        for k in keys:
            if k in seen and seen[k] != s.path:
                raise ValueError(f"{s.path} is the same module (or weight) as {seen[k]}: the model shares one module "
                                 "between layers, and an edit would write it twice; give each layer its own module "
                                 "(copy.deepcopy it) or leave one of the layers out (KNEConfig.layers)")
        for k in keys:
            seen[k] = s.path


def check_model(model: nn.Module, config):
    """The checks an attribution or edit runs on the model before any work; returns ``config``
    with ``layers`` as non-negative indices (``-1`` is the last layer, as in Python).

    The model has kne's adapter and loaded weights (a parameter on the meta device that Accelerate
    does not offload is refused: it holds no values), ``config.layers`` are layers of this model,
    each named once, and no two target sites are one module or one weight (:func:`distinct_sites`)."""
    get_architecture(model)
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            if _offload_hook(owner) is None:
                raise ValueError(f"the model's parameter {name} is on the meta device: it holds no values (the "
                                 "model was built without loading its weights). Load them first (from_pretrained, or "
                                 "model.to_empty(device=...) then load_state_dict), or use device_map='auto'")
    n = num_layers(model)
    layers = config.layers
    if layers is not None:
        bad = [l for l in layers if not -n <= l < n]
        if bad:
            raise ValueError(f"KNEConfig.layers={tuple(layers)} has indices {bad} outside this model's {n} layers: use "
                             f"indices in [0, {n - 1}] (or -{n}..-1, counted from the end), or None for all layers")
        norm = tuple(l % n for l in layers)
        if len(set(norm)) != len(norm):
            raise ValueError(f"KNEConfig.layers={tuple(layers)} names a layer twice (as {norm}: -1 is layer {n - 1})")
        if norm != tuple(layers):
            config = config.replace(layers=norm)
    sites = resolve_sites(model, config.target_modules, config.layers, config.exclude_edge_layers)
    distinct_sites(s for ss in sites.values() for s in ss)
    return config
