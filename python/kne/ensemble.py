"""Knowledge neuronal ensembles: which neurons of which module instances an edit trains."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

import kne_kernels

from .adapters import ModuleSite, get_architecture, resolve_sites
from ._utils import kernel_backend
from .config import KNEConfig, resolve_config

__all__ = ["Ensemble"]

_FORMAT = "kne.ensemble/1"


@dataclass
class Ensemble:
    """Per module suffix and layer, the ascending indices of the ensemble neurons.

    ``indices[suffix][layer]`` is a LongTensor (rows of ``W`` for ``neuron_axis="out"``, columns
    for ``"in"``). Layers with no ensemble neuron are absent. ``thresholds[suffix]`` is the global
    percentile the selection used (when it came from :func:`kne.locate`), ``n_neurons[suffix]`` the
    neurons per module instance and ``n_layers[suffix]`` the layers scored.
    """

    indices: Dict[str, Dict[int, torch.Tensor]]
    neuron_axis: str = "out"
    thresholds: Dict[str, float] = field(default_factory=dict)
    n_neurons: Dict[str, int] = field(default_factory=dict)
    n_layers: Dict[str, int] = field(default_factory=dict)
    config: Optional[Dict[str, Any]] = None
    seconds: float = 0.0  # time the attribution behind it took (0 when loaded or built by hand)

    def __post_init__(self) -> None:
        if self.neuron_axis not in ("out", "in"):
            raise ValueError(f"neuron_axis={self.neuron_axis!r} is invalid: use 'out' (rows) or 'in' (columns)")
        clean: Dict[str, Dict[int, torch.Tensor]] = {}
        for suffix, per_layer in self.indices.items():
            if not isinstance(per_layer, Mapping):
                raise ValueError(f"ensemble[{suffix!r}] must map layer -> list of neuron indices")
            layers: Dict[int, torch.Tensor] = {}
            for layer, idx in per_layer.items():
                try:
                    layer_i = int(layer)
                except (TypeError, ValueError):
                    raise ValueError(f"ensemble[{suffix!r}] has layer key {layer!r}; layer keys must be integers") from None
                t = torch.as_tensor(idx, dtype=torch.long).reshape(-1).cpu()
                if t.numel() and int(t.min()) < 0:
                    raise ValueError(f"ensemble[{suffix!r}][{layer_i}] has negative neuron indices")
                t = torch.unique(t)  # sorted ascending, duplicates dropped
                if t.numel():
                    layers[layer_i] = t
            clean[str(suffix)] = dict(sorted(layers.items()))
        self.indices = clean

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        return sum(int(t.numel()) for per in self.indices.values() for t in per.values())

    @property
    def size(self) -> int:
        """Number of ensemble neurons over all modules and layers."""
        return len(self)

    def counts(self) -> Dict[str, Dict[int, int]]:
        return {s: {l: int(t.numel()) for l, t in per.items()} for s, per in self.indices.items()}

    def items(self) -> Iterator[Tuple[str, int, torch.Tensor]]:
        for suffix, per in self.indices.items():
            for layer, idx in per.items():
                yield suffix, layer, idx

    # ------------------------------------------------------------------ selection
    @classmethod
    def from_attribution(cls, attribution) -> "Ensemble":
        cfg = attribution.config
        indices, thresholds, n_neurons, n_layers = {}, {}, {}, {}
        for name, scores in attribution.scores.items():
            sel = kne_kernels.ensemble_select(scores, percentile=cfg.percentile, aggregate=cfg.aggregate,
                                              positive_only=cfg.positive_only,
                                              backend=kernel_backend(cfg, scores.device))
            suffix = attribution.suffixes[name]
            indices[suffix] = {attribution.layers[i]: idx for i, idx in enumerate(sel.indices)}
            thresholds[suffix] = sel.threshold
            n_neurons[suffix] = scores.shape[2]
            n_layers[suffix] = scores.shape[1]
        return cls(indices=indices, neuron_axis=cfg.neuron_axis, thresholds=thresholds, n_neurons=n_neurons,
                   n_layers=n_layers, config=cfg.to_dict(), seconds=attribution.seconds)

    # ------------------------------------------------------------------ binding to a model
    def sites(self, model: nn.Module) -> List[Tuple[ModuleSite, torch.Tensor]]:
        """``(site, indices)`` for every non-empty (module, layer) of the ensemble in ``model``,
        checking that every index fits the module."""
        arch = get_architecture(model)
        out = []
        for suffix, per in self.indices.items():
            if not per:
                continue
            name = _match_suffix(model, arch, suffix)
            for site in resolve_sites(model, [name], sorted(per))[name]:
                idx = per[site.layer]
                n = site.num_neurons(self.neuron_axis)
                if int(idx.max()) >= n:
                    raise ValueError(f"ensemble index {int(idx.max())} is out of range for {site.path} "
                                     f"({n} neurons on axis {self.neuron_axis!r}): was the ensemble made for "
                                     "another model or neuron_axis?")
                out.append((site, idx))
        return out

    # ------------------------------------------------------------------ knb_dict and files
    def to_knb_dict(self) -> Dict[str, Dict[str, List[int]]]:
        """The authors' ``{module_suffix: {layer: [idx]}}`` form (JSON-ready: layer keys are strings)."""
        return {s: {str(l): t.tolist() for l, t in per.items()} for s, per in self.indices.items()}

    @classmethod
    def from_knb_dict(cls, knb_dict: Mapping[str, Mapping[Any, Any]], neuron_axis: str = "out") -> "Ensemble":
        """From the authors' ``{module_suffix: {layer: [idx]}}`` (layer keys int or str)."""
        if not isinstance(knb_dict, Mapping):
            raise ValueError("knb_dict must be a dict {module_suffix: {layer: [neuron indices]}}")
        return cls(indices=dict(knb_dict), neuron_axis=neuron_axis)

    def to_dict(self) -> Dict[str, Any]:
        return {"format": _FORMAT, "neuron_axis": self.neuron_axis, "knb_dict": self.to_knb_dict(),
                "thresholds": self.thresholds, "n_neurons": self.n_neurons, "n_layers": self.n_layers,
                "config": self.config}

    def save(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: Union[str, Path], neuron_axis: Optional[str] = None) -> "Ensemble":
        """Read a file written by :meth:`save`, or a bare authors' ``knb_dict`` JSON (then
        ``neuron_axis`` says which axis its indices are on; default ``"out"``)."""
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        if isinstance(d, Mapping) and d.get("format") == _FORMAT:
            axis = d["neuron_axis"]
            if neuron_axis is not None and neuron_axis != axis:
                raise ValueError(f"{path} holds a neuron_axis={axis!r} ensemble, not {neuron_axis!r}")
            return cls(indices=d["knb_dict"], neuron_axis=axis, thresholds=d.get("thresholds") or {},
                       n_neurons=d.get("n_neurons") or {}, n_layers=d.get("n_layers") or {},
                       config=d.get("config"))
        return cls.from_knb_dict(d, neuron_axis=neuron_axis or "out")

    def __repr__(self) -> str:
        per = ", ".join(f"{s}: {sum(self.counts()[s].values())} in {len(p)} layers" for s, p in self.indices.items())
        return f"Ensemble(neuron_axis={self.neuron_axis!r}, size={len(self)}; {per})"


def _match_suffix(model: nn.Module, arch, key: str) -> str:
    """A module name ``resolve_sites`` understands for an ensemble key: the suffix itself, an alias,
    or a unique registered suffix ending with ``key`` (the authors sometimes write ``down_proj``)."""
    registered = [s for _, s in arch.modules]
    if key in registered or arch.suffix(key) is not None:
        return key
    ends = [s for s in registered if s.endswith("." + key)]
    if len(ends) == 1:
        return ends[0]
    return key  # a path inside the layer that is not registered: resolve_sites checks it
