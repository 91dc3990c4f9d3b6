"""Compact edit files: only what an edit changed, with what it replaced, checked against the model.

A file is one safetensors file. Per edited module instance ``i`` it holds ``{i}.index`` (int64
rows or columns), ``{i}.new`` (the edited rows/columns, weight dtype) and ``{i}.orig`` (the
original ones, for undo); its header metadata ``kne`` is a JSON document with the format name, the
model fingerprint (``model_type``, parameter count, a hash of the config and of every parameter's
name, shape and dtype), one entry per module instance (module path, ``dim``, weight shape and
dtype, whether the parameter is stored transposed), the edit's config, requests and stats.

:func:`apply_edit` writes ``new`` where the model holds ``orig``; :func:`revert_edit` writes
``orig`` back where the model holds ``new``. Both refuse a model whose fingerprint, shapes or
current values do not match, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Union

import torch
from torch import nn

__all__ = ["save_edit", "read_edit", "apply_edit", "revert_edit", "fingerprint"]

FORMAT = "kne.edit/1"
_VOLATILE = {"_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
             "architectures", "use_cache", "quantization_config"}


def fingerprint(model: nn.Module) -> Dict[str, Any]:
    """What an edit file checks a model against: the architecture, not the (edited) values."""
    cfg = getattr(model, "config", None)
    cfg_d = {k: v for k, v in (cfg.to_dict() if cfg is not None else {}).items() if k not in _VOLATILE}
    h = hashlib.sha256(json.dumps(cfg_d, sort_keys=True, default=str).encode())
    n = 0
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        n += p.numel()
    return {"model_type": getattr(cfg, "model_type", None), "params": n, "sha256": h.hexdigest()}


def _weight(model: nn.Module, path: str, transposed: bool) -> torch.Tensor:
    try:
        mod = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"the model has no module {path!r}: this edit was made for another architecture") from None
    w = mod.weight
    return w.t() if transposed else w


def save_edit(result, path: Union[str, Path]) -> Path:
    """Write ``result`` (a :class:`kne.EditResult` that is not restored) to ``path``."""
    from safetensors.torch import save_file

    if result.restored:
        raise ValueError("this edit was restored: there is nothing to save (save before restore())")
    path = Path(path)
    tensors: Dict[str, torch.Tensor] = {}
    sites: List[Dict[str, Any]] = []
    for i, (site, dim, idx, base) in enumerate(result._saved):
        w = site.weight()
        new = w.index_select(dim, idx.to(w.device)).detach().cpu().contiguous()
        tensors[f"{i}.index"] = idx.detach().cpu().contiguous()
        tensors[f"{i}.new"] = new
        tensors[f"{i}.orig"] = base.detach().cpu().contiguous()
        sites.append({"i": i, "path": site.path, "layer": site.layer, "suffix": site.suffix, "dim": dim,
                      "transposed": site.transposed, "weight_shape": list(w.shape), "dtype": str(w.dtype)})
    meta = {"format": FORMAT, "model": fingerprint(result.model), "sites": sites,
            "config": result.config.to_dict() if result.config is not None else None,
            "requests": [r.to_dict() for r in result.requests],
            "stats": {k: v for k, v in result.stats.items() if isinstance(v, (int, float, str, bool, list, type(None)))}}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"kne": json.dumps(meta, default=str)})
    return path


def read_edit(path: Union[str, Path]):
    """``(metadata, tensors)`` of an edit file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"edit file {str(path)!r} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get("kne")
        if meta is None:
            raise ValueError(f"{path} is a safetensors file but not a kne edit (no 'kne' metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(meta)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown edit format {meta.get('format')!r} (this kne reads {FORMAT})")
    return meta, tensors


def _check_model(meta: Dict[str, Any], model: nn.Module, path: Path) -> None:
    fp, want = fingerprint(model), meta["model"]
    if fp != want:
        diff = ", ".join(f"{k}: file {want.get(k)!r} vs model {fp.get(k)!r}" for k in fp if fp.get(k) != want.get(k))
        raise ValueError(f"{path} was made for another model ({diff})")


def _transfer(model: nn.Module, path: Union[str, Path], expect: str, write: str, verb: str) -> int:
    path = Path(path)
    meta, tensors = read_edit(path)
    _check_model(meta, model, path)
    plan = []
    for s in meta["sites"]:
        w = _weight(model, s["path"], s["transposed"])
        if list(w.shape) != s["weight_shape"] or str(w.dtype) != s["dtype"]:
            raise ValueError(f"{path}: {s['path']} is {tuple(w.shape)} {w.dtype} in the model but "
                             f"{tuple(s['weight_shape'])} {s['dtype']} in the file")
        idx = tensors[f"{s['i']}.index"].to(w.device)
        now = w.index_select(s["dim"], idx)
        if not torch.equal(now.cpu(), tensors[f"{s['i']}.{expect}"]):
            other = "new" if expect == "orig" else "orig"
            hint = (" (it already holds the edited values: was the edit applied already?)" if expect == "orig" else
                    " (it holds the original values: was the edit never applied, or reverted already?)") \
                if torch.equal(now.cpu(), tensors[f"{s['i']}.{other}"]) else " (another edit changed these values)"
            raise ValueError(f"cannot {verb} {path.name}: {s['path']} does not hold the values the edit expects"
                             + hint)
        plan.append((w, s["dim"], idx, tensors[f"{s['i']}.{write}"]))
    with torch.no_grad():  # every check passed: now write (nothing is written on a refusal)
        for w, dim, idx, rows in plan:
            w.index_copy_(dim, idx, rows.to(device=w.device, dtype=w.dtype))
    return len(plan)


def apply_edit(model: nn.Module, path: Union[str, Path]) -> int:
    """Apply the edit stored at ``path`` to ``model`` in place; returns the module instances written.
    Refuses (``ValueError``, nothing written) a model that is not the one the edit was made on."""
    return _transfer(model, path, expect="orig", write="new", verb="apply")


def revert_edit(model: nn.Module, path: Union[str, Path]) -> int:
    """Undo the edit stored at ``path`` (bit for bit); refuses a model that does not hold it."""
    return _transfer(model, path, expect="new", write="orig", verb="revert")
