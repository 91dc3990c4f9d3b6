"""EasyEdit drop-in: read the authors' ``alg_name: KNB`` YAML and edit as EasyEdit's editors expect.

Register it in an EasyEdit checkout (three lines)::

    from easyeditor.util.alg_dict import ALG_DICT
    from kne.integrations.easyedit import KNEHyperParams, apply_kne_to_model
    ALG_DICT["KNB"] = ALG_DICT["KNE"] = apply_kne_to_model

then ``BaseEditor.from_hparams(KNEHyperParams.from_hparams("hparams/KNB/llama2-7b.yaml"))`` edits
with kne (``kne/integrations/hparams/KNE/smollm2-135m.yaml`` ships as an example).

``preset`` (a key kne adds; default ``local``, :data:`kne.config.DEFAULT_PRESET`) is the base of the
settings. With ``local`` the YAML's localisation keys apply (``target_modules``, ``layers``, ``p``,
``ig_steps``, ``ig_path``, ``aggregate``, ``seed``) and the local preset trains its own way; the
authors' training keys a YAML gives (``num_steps``, ``lr``, ``weight_decay``, ``knb_alpha``,
``knb_dropout``, ``use_rsknb``, ``t_loss``) are then left out with one warning naming them, and
``knb_layer: last_layer`` is refused (local edits rows). ``preset: authors`` (or ``tuned``, ``knb``)
applies every key, as the authors' trainer reads them: ``num_steps`` -> ``steps``,
``lr``, ``weight_decay``, ``knb_alpha`` -> ``alpha``, ``knb_dropout`` -> ``dropout``, ``use_rsknb``
-> ``rs_scaling``, ``target_modules``, ``knb_layer`` (``this_layer`` -> ``neuron_axis="out"``,
``last_layer`` -> ``"in"``), ``t_loss`` -> ``stop_loss``, ``p`` -> ``percentile`` (``null``: 99),
``layers`` (``[]``: all), ``ig_steps``/``ig_path``/``aggregate`` when present. ``bf16``/``fp16``
say how EasyEdit loaded the model (kne edits it in its own dtype); EasyEdit's bookkeeping keys
(``device``, ``model_name``, ``batch_size``, ``max_length``, ``model_parallel``, ``kl_factor``,
``norm_constraint``, ``bias``) are kept on the object and otherwise unused.
"""

from __future__ import annotations

import copy as _copy
import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._warn import KNEWarning, warn
from ..config import DEFAULT_PRESET, PRESETS, KNEConfig
from ..editing import fast_edit
from ..ensemble import Ensemble
from ..requests import as_requests

__all__ = ["KNEHyperParams", "apply_kne_to_model"]

#: the authors' training keys: applied with preset authors / tuned / knb, replaced by the local preset's own
_TRAINING = ("num_steps", "lr", "weight_decay", "knb_alpha", "knb_dropout", "use_rsknb", "t_loss")
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _number(v: Any) -> Any:
    """YAML 1.1 reads ``5e-3`` as a string: turn such strings into floats (as EasyEdit does)."""
    if isinstance(v, str) and _FLOAT.match(v.strip()):
        return float(v)
    return v


@dataclass
class KNEHyperParams:
    """EasyEdit-style hyper-parameters of a KNE (the authors' "KNB") edit."""

    alg_name: str = "KNB"
    model_name: str = ""
    device: Union[int, str] = 0
    layers: List[int] = field(default_factory=list)
    num_steps: int = 30
    batch_size: int = 1
    max_length: int = 30
    lr: float = 5e-3
    weight_decay: float = 0.0
    kl_factor: float = 0.0
    norm_constraint: Any = False
    model_parallel: bool = False
    knb_alpha: float = 1.0
    knb_dropout: float = 0.1
    use_rsknb: bool = True
    target_modules: List[str] = field(default_factory=lambda: ["mlp.down_proj"])
    knb_layer: str = "this_layer"
    bias: str = "none"
    p: Optional[float] = None
    t_loss: float = 1e-2
    bf16: bool = False
    fp16: bool = False
    ig_steps: int = 1
    ig_path: str = "layerwise"
    aggregate: str = "max"
    seed: int = 0
    preset: str = DEFAULT_PRESET
    extra: Dict[str, Any] = field(default_factory=dict)
    given: Optional[List[str]] = field(default=None, repr=False)  # the keys a YAML gave (None: built in Python)

    @classmethod
    def from_hparams(cls, hparams_name_or_path: Union[str, Path]) -> "KNEHyperParams":
        """Read an EasyEdit YAML (``.yaml`` may be omitted), such as the authors' ``hparams/KNB/*.yaml``."""
        import yaml

        path = Path(hparams_name_or_path)
        if path.suffix != ".yaml":
            path = path.with_name(path.name + ".yaml")
        if not path.is_file():
            raise FileNotFoundError(f"hparams file {str(path)!r} does not exist")
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a YAML mapping of hyper-parameters")
        alg = str(raw.get("alg_name", "KNB"))
        if alg.upper() not in ("KNB", "KNE"):
            raise ValueError(f"{path}: alg_name is {alg!r}; KNEHyperParams reads alg_name: KNB (or KNE) files")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "given"}
        kwargs = {k: _number(v) for k, v in raw.items() if k in known}
        kwargs["extra"] = {k: v for k, v in raw.items() if k not in known}
        kwargs["given"] = sorted(k for k in raw if k in known)
        hp = cls(**kwargs)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", KNEWarning)  # said once, when the editor edits
                hp.to_config()  # validate now, with the file named in the error
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return hp

    def _given(self) -> List[str]:
        """The training keys set: those the YAML gave, or (built in Python) those not at their default."""
        if self.given is not None:
            return [k for k in _TRAINING if k in self.given]
        return [f.name for f in dataclasses.fields(self)
                if f.name in _TRAINING and getattr(self, f.name) != f.default]

    def to_config(self, **overrides: Any) -> KNEConfig:
        """The :class:`kne.KNEConfig` these hyper-parameters describe (``preset``, then the keys it
        takes, then ``overrides``)."""
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is invalid: use one of {', '.join(PRESETS)}")
        axis = {"this_layer": "out", "last_layer": "in", "out": "out", "in": "in"}.get(self.knb_layer)
        if axis is None:
            raise ValueError(f"knb_layer={self.knb_layer!r} is invalid: use this_layer (rows) or last_layer (columns)")
        modules = self.target_modules
        if isinstance(modules, str):
            modules = [modules]
        cfg = dict(target_modules=tuple(modules), layers=tuple(self.layers) if self.layers else None,
                   percentile=99.0 if self.p is None else float(self.p), ig_steps=int(self.ig_steps),
                   ig_path=self.ig_path, aggregate=self.aggregate, seed=int(self.seed))
        if self.preset == "local":
            if axis != "out":
                raise ValueError(f"knb_layer={self.knb_layer!r} edits columns, and the local preset edits rows (its "
                                 "projection keeps what the model knows only on rows): use knb_layer: this_layer, or "
                                 "preset: authors")
            left = self._given()
            if left:
                warn(f"the local preset trains its own way (kne.KNEConfig.preset('local')): the authors' training "
                     f"key(s) {', '.join(left)} are not used; give preset: authors to train with them", stacklevel=3)
        else:
            cfg.update(neuron_axis=axis, steps=int(self.num_steps), lr=float(self.lr),
                       weight_decay=float(self.weight_decay), alpha=float(self.knb_alpha),
                       dropout=float(self.knb_dropout), rs_scaling=bool(self.use_rsknb), stop_loss=float(self.t_loss))
        cfg.update(overrides)
        return KNEConfig.preset(self.preset, **cfg)


def apply_kne_to_model(model: nn.Module, tok, requests: Sequence[Dict[str, Any]], hparams: KNEHyperParams,
                       copy: bool = False, return_orig_weights: bool = False, keep_original_weight: bool = False,
                       **kwargs: Any) -> Tuple[nn.Module, Dict[str, torch.Tensor]]:
    """EasyEdit's ``apply_<alg>_to_model`` contract, backed by :func:`kne.fast_edit`.

    ``requests`` are EasyEdit request dicts (``prompt``, ``target_new``, ``ground_truth``,
    ``subject``, ``locality``/``portability``...). Returns ``(edited_model, weights_copy)``:
    ``weights_copy`` maps each edited parameter name to its original value when
    ``return_orig_weights`` (EasyEdit restores from it), else ``{}``. ``copy=True`` edits a deep
    copy and leaves ``model`` untouched. ``knb_dict=`` (the authors' ``{module: {layer: [idx]}}``,
    or a :class:`kne.Ensemble`, or a path to its JSON) edits with that precomputed ensemble;
    other keyword arguments that EasyEdit passes (``train_ds``...) are ignored.
    ``keep_original_weight`` is accepted for signature compatibility: kne always merges the edit.
    """
    if not isinstance(hparams, KNEHyperParams):
        raise ValueError(f"hparams must be a KNEHyperParams (KNEHyperParams.from_hparams(path)), got "
                         f"{type(hparams).__name__}")
    cfg = hparams.to_config()
    knb = kwargs.get("knb_dict")
    ensemble = None
    if knb is not None:
        if isinstance(knb, Ensemble):
            ensemble = knb
        elif isinstance(knb, (str, Path)):
            ensemble = Ensemble.load(knb, neuron_axis=cfg.neuron_axis)
        else:
            ensemble = Ensemble.from_knb_dict(knb, neuron_axis=cfg.neuron_axis)
    if copy:
        model = _copy.deepcopy(model)
    reqs = as_requests(list(requests))
    result = fast_edit(model, tok, reqs, cfg, ensemble=ensemble)
    weights_copy: Dict[str, torch.Tensor] = {}
    if return_orig_weights:
        for site, dim, idx, base in result.originals():
            w = site.weight()
            orig = (w.t() if site.transposed else w).detach().clone()  # the parameter's own layout
            view = orig.t() if site.transposed else orig
            view.index_copy_(dim, idx.to(view.device), base.to(view.device))
            weights_copy[site.path + ".weight"] = orig
    return model, weights_copy
