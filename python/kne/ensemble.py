"""Knowledge neuronal ensembles: which neurons of which module instances an edit trains."""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

import kne_kernels

from .adapters import ModuleSite, get_architecture, num_layers, resolve_sites
from ._utils import selection_backend
from .config import KNEConfig, resolve_config
from .io import check_input

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
                layer_i = _layer_key(suffix, layer)
                if layer_i in layers:
                    raise ValueError(f"ensemble[{suffix!r}] names layer {layer_i} twice (keys {layer!r} and another)")
                t = _index_tensor(suffix, layer_i, idx)
                if t.numel() and int(t.min()) < 0:
                    raise ValueError(f"ensemble[{suffix!r}][{layer_i}] has negative neuron indices ({int(t.min())}): "
                                     "neurons are numbered from 0")
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
                                              backend=selection_backend(cfg))
            suffix = attribution.suffixes[name]
            indices[suffix] = {attribution.layers[i]: idx for i, idx in enumerate(sel.indices)}
            thresholds[suffix] = sel.threshold
            n_neurons[suffix] = scores.shape[2]
            n_layers[suffix] = scores.shape[1]
        return cls(indices=indices, neuron_axis=cfg.neuron_axis, thresholds=thresholds, n_neurons=n_neurons,
                   n_layers=n_layers, config=cfg.to_dict(), seconds=attribution.seconds)

    # ------------------------------------------------------------------ binding to a model
    def sites(self, model: nn.Module) -> List[Tuple[ModuleSite, torch.Tensor]]:
        """``(site, indices)`` for every non-empty (module, layer) of the ensemble in ``model``.

        Everything is checked against the model first (the ensemble may have been changed since it
        was made): the neuron axis, each module, each layer number (``0 <= layer < layers``), and
        each index tensor (1-D integers, unique, ``0 <= index < neurons``); a mismatch raises
        ``ValueError`` naming the module and layer."""
        if self.neuron_axis not in ("out", "in"):
            raise ValueError(f"Ensemble.neuron_axis={self.neuron_axis!r} is invalid: use 'out' (rows) or 'in' (columns)")
        arch = get_architecture(model)
        n_layers = num_layers(model)
        out = []
        for suffix, per in self.indices.items():
            if not isinstance(per, Mapping):
                raise ValueError(f"ensemble[{suffix!r}] must map layer -> neuron indices, got {type(per).__name__}")
            per = {l: t for l, t in per.items() if not (isinstance(t, torch.Tensor) and t.numel() == 0)}
            if not per:
                continue
            bad = [l for l in per if not (_is_int(l) and 0 <= l < n_layers)]
            if bad:
                raise ValueError(f"ensemble[{suffix!r}] names layer {bad[0]!r}, but this model has {n_layers} layers "
                                 f"(0..{n_layers - 1}): was the ensemble made for another model?")
            name = _match_suffix(model, arch, suffix)
            for site in resolve_sites(model, [name], sorted(per))[name]:
                idx = per[site.layer]
                where = f"ensemble[{suffix!r}][{site.layer}]"
                if not isinstance(idx, torch.Tensor) or idx.dtype != torch.long or idx.dim() != 1:
                    raise ValueError(f"{where} must be a 1-D int64 tensor of neuron indices, got "
                                     f"{type(idx).__name__} {getattr(idx, 'dtype', '')} {tuple(getattr(idx, 'shape', ()))}")
                n = site.num_neurons(self.neuron_axis)
                lo, hi = int(idx.min()), int(idx.max())
                if lo < 0 or hi >= n:
                    raise ValueError(f"{where}: ensemble index {lo if lo < 0 else hi} is out of range for {site.path} "
                                     f"({n} neurons on axis {self.neuron_axis!r}): was the ensemble made for "
                                     "another model or neuron_axis?")
                if torch.unique(idx).numel() != idx.numel():
                    raise ValueError(f"{where} holds a neuron index more than once: each neuron is edited once")
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
        """Write the ensemble as JSON (whole or not at all: :func:`kne.io.write_text`); missing folders are made."""
        from .io import write_text

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Union[str, Path], neuron_axis: Optional[str] = None) -> "Ensemble":
        """Read a file written by :meth:`save`, or a bare authors' ``knb_dict`` JSON (then
        ``neuron_axis`` says which axis its indices are on; default ``"out"``)."""
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory, not an ensemble file: pass the JSON file itself "
                                    "(written by Ensemble.save, or the authors' knb_dict)")
        check_input(path, "ensemble file")  # missing, a symlink loop, unreadable: said as such
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not an ensemble JSON file ({e}); give a file written by Ensemble.save or "
                             "the authors' knb_dict") from None
        try:
            if isinstance(d, Mapping) and d.get("format") == _FORMAT:
                for key in ("neuron_axis", "knb_dict"):
                    if key not in d:
                        raise ValueError(f"field {key!r} is missing")
                axis = d["neuron_axis"]
                if neuron_axis is not None and neuron_axis != axis:
                    raise ValueError(f"it holds a neuron_axis={axis!r} ensemble, not {neuron_axis!r}")
                return cls(indices=d["knb_dict"], neuron_axis=axis, thresholds=d.get("thresholds") or {},
                           n_neurons=d.get("n_neurons") or {}, n_layers=d.get("n_layers") or {},
                           config=d.get("config"))
            return cls.from_knb_dict(d, neuron_axis=neuron_axis or "out")
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def __repr__(self) -> str:
        per = ", ".join(f"{s}: {sum(self.counts()[s].values())} in {len(p)} layers" for s, p in self.indices.items())
        return f"Ensemble(neuron_axis={self.neuron_axis!r}, size={len(self)}; {per})"


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _layer_key(suffix: str, layer: Any) -> int:
    """A layer key as an int: an integer, or a string of one (JSON object keys are strings)."""
    if _is_int(layer):
        value = int(layer)
    elif isinstance(layer, str) and layer.strip().lstrip("+-").isdigit():
        value = int(layer)
    else:
        raise ValueError(f"ensemble[{suffix!r}] has layer key {layer!r}; layer keys must be integers (or strings of "
                         "integers, as JSON writes them)")
    if value < 0:
        raise ValueError(f"ensemble[{suffix!r}] has layer key {layer!r}; layers are numbered from 0")
    return value


def _index_tensor(suffix: str, layer: int, idx: Any) -> torch.Tensor:
    """Neuron indices as a 1-D int64 CPU tensor; anything but integers is refused (a float index
    would otherwise be truncated silently)."""
    where = f"ensemble[{suffix!r}][{layer}]"
    if isinstance(idx, torch.Tensor):
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise ValueError(f"{where} is a {idx.dtype} tensor; neuron indices must be integers")
        return idx.detach().reshape(-1).to(device="cpu", dtype=torch.long)
    if isinstance(idx, np.ndarray):
        if idx.dtype.kind not in "iu":
            raise ValueError(f"{where} is a numpy array of {idx.dtype}; neuron indices must be integers")
        return torch.from_numpy(idx.astype(np.int64).reshape(-1))
    values = [idx] if _is_int(idx) else idx
    try:
        values = list(values)
    except TypeError:
        raise ValueError(f"{where} is {idx!r}; give a list of integer neuron indices") from None
    for v in values:
        if not _is_int(v):
            raise ValueError(f"{where} holds {v!r} ({type(v).__name__}); neuron indices must be integers")
    return torch.tensor([int(v) for v in values], dtype=torch.long)


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
