"""Compact edit files: only what an edit changed, with what it replaced, verified and checked
against the model before anything is written, and written all-or-nothing.

A file is one safetensors file. Per edited module instance ``i`` it holds ``{i}.index`` (int64
rows or columns, each once), ``{i}.new`` (the edited rows/columns, weight dtype, finite) and
``{i}.orig`` (the original ones, for undo). Its header metadata ``kne`` is a JSON document
(format ``kne.edit/2``) with:

* ``model``: the architecture fingerprint (``model_type``, parameter count, a sha256 of the config
  and of every parameter's name, shape and dtype): the same for every model of one architecture;
* ``values``: the value fingerprint (:func:`value_fingerprint`): a sha256 of sampled values of every
  parameter except the weights of the module kind the edit writes (say every layer's
  ``mlp.down_proj``, which this and other edits may write), so it tells this model from another one
  with the same shapes but other weights: another checkpoint, a fine-tune of any other weight
  (attention, another FFN projection, a merged LoRA), embeddings, norms or biases;
* ``sites``: one entry per module instance (``i``, module ``path``, ``dim``, ``weight_shape``,
  ``dtype``, ``transposed``: GPT-2 ``Conv1D`` stores its weight ``[in, out]``), and the edit's
  ``config``, ``requests`` and ``stats``;
* ``digest``: a sha256 over everything above (the JSON document without ``digest``, sorted keys)
  and every tensor, site by site, as ``name:dtype:shape`` then its bytes. A flipped byte anywhere
  in the file, or a hand-edited field, fails the check.

:func:`read_edit` validates the document field by field and then the digest: a bad file raises
``ValueError`` naming the file and the field. :func:`apply_edit` writes ``new`` where the model
holds ``orig``; :func:`revert_edit` writes ``orig`` back where the model holds ``new``. Both check
every site first (module, shape, dtype, fingerprints, current values bit for bit) and write nothing
on a refusal; if a write fails or is interrupted (``KeyboardInterrupt`` too), the sites already
written are put back, so the model is either fully changed or bit-exact as before.

``force=True`` applies or reverts a file whose fingerprints do not match this model, with a
warning (every other check stays: the rows it writes must hold the values it expects). A site the
model ties to another parameter (an output projection tied to the input embeddings) is refused: a
write there would change that parameter too.

Files of format ``kne.edit/2`` carry the older value fingerprint (parameters with fewer than two
dimensions and the input embeddings only) and are checked with it; ``kne.edit/1`` (kne 0.2.0)
files carry no digest and no value fingerprint: they are still read and applied, with every other
check, and a warning says what is not verified.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._exclusive import holds_model, writing
from ._guard import undo_writes
from .io import check_input, write_bytes

__all__ = ["save_edit", "read_edit", "apply_edit", "revert_edit", "fingerprint", "value_fingerprint"]

FORMAT = "kne.edit/3"
FORMAT_V2 = "kne.edit/2"
FORMAT_V1 = "kne.edit/1"
READABLE = (FORMAT, FORMAT_V2, FORMAT_V1)
KINDS = ("index", "new", "orig")
VALUE_SAMPLE = 65536  # values per parameter that enter the value fingerprint (all of a smaller one)
_VOLATILE = {"_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
             "architectures", "use_cache", "quantization_config"}
_FLOAT_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ---------------------------------------------------------------------------------------------- fingerprints
def fingerprint(model: nn.Module) -> Dict[str, Any]:
    """The architecture fingerprint: ``model_type``, parameter count and a sha256 of the config and
    of every parameter's name, shape and dtype. Equal for every model of one architecture and
    dtype, edited or not."""
    cfg = getattr(model, "config", None)
    cfg_d = {k: v for k, v in (cfg.to_dict() if cfg is not None else {}).items() if k not in _VOLATILE}
    h = hashlib.sha256(json.dumps(cfg_d, sort_keys=True, default=str).encode())
    n = 0
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        n += p.numel()
    return {"model_type": getattr(cfg, "model_type", None), "params": n, "sha256": h.hexdigest()}


def _param_value(model: nn.Module, name: str, p: torch.Tensor) -> torch.Tensor:
    """A parameter's values: the parameter, or where Accelerate offloads it (meta device) the
    tensor its offload store holds."""
    if p.device.type != "meta":
        return p
    from .adapters import _offload_hook

    owner_name, _, local = name.rpartition(".")
    hook = _offload_hook(model.get_submodule(owner_name) if owner_name else model)
    if hook is None:
        raise ValueError(f"cannot read parameter {name}: it is on the meta device and not offloaded by Accelerate "
                         "(load the model's weights first)")
    return hook.weights_map[local]


def _sampled(h, model: nn.Module, name: str, p: torch.Tensor) -> None:
    flat = _param_value(model, name, p).detach().reshape(-1)
    n = flat.numel()
    if n > VALUE_SAMPLE:
        pick = (torch.arange(VALUE_SAMPLE, dtype=torch.int64) * n) // VALUE_SAMPLE
        flat = flat.index_select(0, pick.to(flat.device))
    flat = flat.cpu().contiguous()
    h.update(f"{name}:{tuple(p.shape)}:{p.dtype}\n".encode())
    h.update(flat.view(torch.uint8).numpy())


def _written_by(name: str, suffixes) -> bool:
    return any(name.endswith(f".{s}.weight") or name == f"{s}.weight" for s in suffixes)


def value_fingerprint(model: nn.Module, edited: Sequence[str]) -> Dict[str, Any]:
    """A sha256 of sampled values of every parameter except the weights of the module kinds
    ``edited`` names (module suffixes such as ``"mlp.down_proj"``: in every layer, since other edits
    may have written those rows). Applying or reverting edits of those kinds leaves it unchanged;
    another model of the same shapes (another checkpoint, another seed, a fine-tune or a merged
    adapter of any other weight) gets another one.

    Each parameter enters with its name, shape and dtype and at most ``VALUE_SAMPLE`` (65,536) of
    its values, evenly spaced over the flattened tensor (all of them for smaller parameters), so the
    cost stays at tens of milliseconds for any model size."""
    edited = sorted(set(edited))
    h = hashlib.sha256()
    count = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if _written_by(name, edited):
                continue
            _sampled(h, model, name, p)
            count += 1
    return {"sha256": h.hexdigest(), "parameters": count, "sample": VALUE_SAMPLE, "excluded": edited}


def _value_fingerprint_v2(model: nn.Module) -> str:
    """``kne.edit/2``'s value fingerprint: parameters with fewer than two dimensions and the input
    embedding matrix only."""
    emb = None
    try:
        emb = getattr(model.get_input_embeddings(), "weight", None)
    except (AttributeError, NotImplementedError):
        pass
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and p is not emb:
                continue
            _sampled(h, model, name, p)
    return h.hexdigest()


def tied_to(model: nn.Module, weight: torch.Tensor, name: str) -> List[str]:
    """The other parameters of ``model`` that share ``weight``'s storage (tied weights)."""
    ptr = weight.untyped_storage().data_ptr()
    return [n for n, p in model.named_parameters(remove_duplicate=False)
            if n != name and p.device == weight.device and p.untyped_storage().data_ptr() == ptr]


# ---------------------------------------------------------------------------------------------- the file
@dataclass
class _Site:
    """One validated site of an edit file."""

    field: str  # "sites[j]", for messages
    i: int
    path: str
    dim: int
    transposed: bool
    weight_shape: Tuple[int, int]
    dtype: torch.dtype
    index: torch.Tensor
    new: torch.Tensor
    orig: torch.Tensor


def _digest(doc: Dict[str, Any], tensors: Dict[str, torch.Tensor], names: List[str]) -> str:
    """sha256 of the metadata document (without ``digest``; sorted keys) and of ``tensors`` in the
    order of ``names``, each as ``name:dtype:shape`` and its bytes."""
    h = hashlib.sha256()
    body = {k: v for k, v in doc.items() if k != "digest"}
    h.update(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode())
    for name in names:
        t = tensors[name].contiguous()
        h.update(f"\n{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _tensor_names(sites: List[Dict[str, Any]]) -> List[str]:
    return [f"{s['i']}.{k}" for s in sites for k in KINDS]


def save_edit(result, path: Union[str, Path]) -> Path:
    """Write ``result`` (a :class:`kne.EditResult` that is not restored) to ``path`` (a file name;
    its folder is created). The file is written to a temporary name and renamed, so an interrupted
    save never leaves a partial file at ``path``; a full disk or a read-only folder is an
    ``OSError`` naming the path (:mod:`kne.io`)."""
    from safetensors.torch import save as safetensors_bytes

    if result.restored:
        raise ValueError("this edit was restored: there is nothing to save (save before restore())")
    changed = result._changed_sites()
    if changed:  # the rows now hold a later edit's change too: a file of them would apply both
        raise result._conflict("save", changed)
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory: give the edit file a name, e.g. {path / 'edit.safetensors'}")
    tensors: Dict[str, torch.Tensor] = {}
    sites: List[Dict[str, Any]] = []
    for i, (site, dim, idx, base) in enumerate(result.originals()):
        w = site.weight()
        new = w.index_select(dim, idx.to(w.device)).detach().cpu().contiguous()
        if new.is_floating_point() and not bool(torch.isfinite(new).all()):
            raise ValueError(f"the edited rows of {site.path} hold NaN or infinity: refusing to save an edit that "
                             "apply_edit would refuse (the edit diverged; restore() it)")
        tensors[f"{i}.index"] = idx.detach().cpu().to(torch.int64).contiguous()
        tensors[f"{i}.new"] = new
        tensors[f"{i}.orig"] = base.detach().cpu().contiguous()
        sites.append({"i": i, "path": site.path, "layer": site.layer, "suffix": site.suffix, "dim": dim,
                      "transposed": site.transposed, "weight_shape": list(w.shape), "dtype": str(w.dtype)})
    meta = {"format": FORMAT, "model": fingerprint(result.model),
            "values": value_fingerprint(result.model, [s["suffix"] for s in sites]),
            "sites": sites, "config": result.config.to_dict() if result.config is not None else None,
            "requests": [r.to_dict() for r in result.requests],
            "stats": {k: v for k, v in result.stats.items() if isinstance(v, (int, float, str, bool, list, type(None)))}}
    doc = json.loads(json.dumps(meta, default=str))  # the document exactly as read_edit will see it
    doc["digest"] = {"sha256": _digest(doc, tensors, _tensor_names(sites)),
                     "covers": "the kne metadata without 'digest' (JSON, sorted keys) and every tensor "
                               "(name:dtype:shape, bytes), site by site"}
    data = safetensors_bytes(tensors, metadata={"kne": json.dumps(doc)})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: cannot make its folder {path.parent} ({e.strerror})") from None
    return write_bytes(path, data)


class _Fields:
    """Field checks that raise ``ValueError`` naming the file and the field."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, field: str, problem: str) -> ValueError:
        return ValueError(f"{self.path}: bad edit file: field {field!r} {problem} (the file is damaged or was "
                          "edited by hand; save the edit again)")

    def get(self, obj: Dict[str, Any], key: str, field: str, kind, what: str):
        if key not in obj:
            raise self.fail(field, "is missing")
        v = obj[key]
        if not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool):  # JSON true is no integer here
            raise self.fail(field, f"must be {what}, got {v!r}")
        return v


def _read_raw(path: Path) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    from safetensors import safe_open

    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not an edit file: pass the .safetensors file itself")
    check_input(path, "edit file")  # missing, a symlink loop, unreadable: said as such
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("kne")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except OSError:
        raise
    except Exception as e:  # safetensors' SafetensorError (and friends): a damaged header or data
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); the file is damaged "
                         "or is not an edit file") from None
    if raw is None:
        raise ValueError(f"{path} is a safetensors file but not a kne edit (no 'kne' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: bad edit file: field 'kne' of the header is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: bad edit file: field 'kne' must be a JSON object, got {type(meta).__name__}")
    return meta, tensors


def _validate(path: Path, meta: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> List[_Site]:
    F = _Fields(path)
    fmt = meta.get("format")
    if fmt not in READABLE:
        raise ValueError(f"{path}: unknown edit format {fmt!r} (field 'format'); this kne reads "
                         f"{', '.join(READABLE)}: a newer kne wrote it, or the file is damaged")
    model = F.get(meta, "model", "model", dict, "an object (the architecture fingerprint)")
    F.get(model, "sha256", "model.sha256", str, "a hex string")
    F.get(model, "params", "model.params", int, "an integer")
    if fmt != FORMAT_V1:
        values = F.get(meta, "values", "values", dict, "an object (the value fingerprint)")
        F.get(values, "sha256", "values.sha256", str, "a hex string")
        if fmt == FORMAT:
            excluded = F.get(values, "excluded", "values.excluded", list, "a list of module suffixes")
            if not all(isinstance(x, str) and x for x in excluded):
                raise F.fail("values.excluded", f"must hold module suffixes, got {excluded!r}")
        digest = F.get(meta, "digest", "digest", dict, "an object")
        F.get(digest, "sha256", "digest.sha256", str, "a hex string")
    raw_sites = F.get(meta, "sites", "sites", list, "a list")
    sites: List[_Site] = []
    seen_i, seen_path = set(), {}
    for j, s in enumerate(raw_sites):
        fld = f"sites[{j}]"
        if not isinstance(s, dict):
            raise F.fail(fld, f"must be an object, got {s!r}")
        i = F.get(s, "i", f"{fld}.i", int, "an integer")
        if i < 0 or i in seen_i:
            raise F.fail(f"{fld}.i", f"must be a non-negative integer used once, got {i}")
        seen_i.add(i)
        mpath = F.get(s, "path", f"{fld}.path", str, "a module path")
        if not mpath:
            raise F.fail(f"{fld}.path", "is empty")
        if mpath in seen_path:
            raise F.fail(f"{fld}.path", f"names {mpath!r} again (also sites[{seen_path[mpath]}]): two sites would "
                                        "write one weight")
        seen_path[mpath] = j
        dim = F.get(s, "dim", f"{fld}.dim", int, "0 (rows) or 1 (columns)")
        if dim not in (0, 1):
            raise F.fail(f"{fld}.dim", f"must be 0 (rows) or 1 (columns), got {dim}")
        transposed = F.get(s, "transposed", f"{fld}.transposed", bool, "true or false")
        shape = F.get(s, "weight_shape", f"{fld}.weight_shape", list, "[out, in]")
        if len(shape) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
            raise F.fail(f"{fld}.weight_shape", f"must be [out, in] (two non-negative integers), got {shape!r}")
        dname = F.get(s, "dtype", f"{fld}.dtype", str, "a dtype name")
        if dname not in _FLOAT_DTYPES:
            raise F.fail(f"{fld}.dtype", f"must be one of {', '.join(_FLOAT_DTYPES)}, got {dname!r}")
        dtype = _FLOAT_DTYPES[dname]
        got = {}
        for kind in KINDS:
            name = f"{i}.{kind}"
            if name not in tensors:
                raise F.fail(name, f"(the {kind} tensor of {fld}) is missing")
            got[kind] = tensors[name]
        idx, new, orig = got["index"], got["new"], got["orig"]
        limit = shape[dim]
        if idx.dtype != torch.int64 or idx.dim() != 1:
            raise F.fail(f"{i}.index", f"must be a 1-D int64 tensor, got {idx.dtype} {tuple(idx.shape)}")
        K = idx.numel()
        if K:
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= limit:
                raise F.fail(f"{i}.index", f"holds {lo if lo < 0 else hi}, outside [0, {limit}) (weight_shape[{dim}] "
                                           f"of {mpath})")
            if torch.unique(idx).numel() != K:
                raise F.fail(f"{i}.index", "holds a row/column more than once")
        want = (K, shape[1]) if dim == 0 else (shape[0], K)
        for kind, t in (("new", new), ("orig", orig)):
            if t.dtype != dtype or tuple(t.shape) != want:
                raise F.fail(f"{i}.{kind}", f"must be {dname} {list(want)} (the {K} "
                                            f"{'rows' if dim == 0 else 'columns'} of {mpath}), got {t.dtype} "
                                            f"{list(t.shape)}")
        if not bool(torch.isfinite(new).all()):
            raise F.fail(f"{i}.new", "holds NaN or infinity: applying it would break the model")
        sites.append(_Site(field=fld, i=i, path=mpath, dim=dim, transposed=transposed, weight_shape=tuple(shape),
                           dtype=dtype, index=idx, new=new, orig=orig))
    expected = set(_tensor_names(raw_sites))
    extra = sorted(set(tensors) - expected)
    if extra:
        raise F.fail(extra[0], "is a tensor that belongs to no site")
    if fmt != FORMAT_V1:
        actual = _digest(meta, tensors, _tensor_names(raw_sites))
        if actual != meta["digest"]["sha256"]:
            raise ValueError(f"{path}: the content digest does not match (field 'digest.sha256': file says "
                             f"{meta['digest']['sha256'][:16]}..., contents hash to {actual[:16]}...): the file was "
                             "changed after it was written (a damaged copy or a hand edit); do not apply it")
    else:
        warnings.warn(f"{path.name} is a {FORMAT_V1} file (kne 0.2.0): it carries no content digest and no value "
                      "fingerprint, so a damaged copy or another model with the same shapes is caught only by the "
                      f"checks of every row; edits saved by this kne ({FORMAT}) carry both", UserWarning, stacklevel=5)
    return sites


def read_edit(path: Union[str, Path]):
    """``(metadata, tensors)`` of an edit file, after checking every field, every tensor (dtype,
    shape, index range and uniqueness, finite ``new``) and the content digest."""
    path = Path(path)
    meta, tensors = _read_raw(path)
    _validate(path, meta, tensors)
    return meta, tensors


# ---------------------------------------------------------------------------------------------- apply / revert
def _check_model(path: Path, meta: Dict[str, Any], model: nn.Module, force: bool, verb: str) -> None:
    """The model is the one the file was made on (architecture and value fingerprints); with
    ``force`` a mismatch is a warning instead of a refusal."""
    problems = []
    fp, want = fingerprint(model), meta["model"]
    if fp != want:
        diff = ", ".join(f"{k}: file {want.get(k)!r} vs model {fp.get(k)!r}" for k in fp if fp.get(k) != want.get(k))
        problems.append(f"architecture fingerprint differs: {diff}")
    if meta["format"] == FORMAT:
        excluded = meta["values"]["excluded"]
        vf, vwant = value_fingerprint(model, excluded)["sha256"], meta["values"]["sha256"]
        if vf != vwant:
            problems.append(f"fingerprint {vwant[:16]} of every weight but the edited kind ({', '.join(excluded)}); "
                            f"this model's is {vf[:16]}: same architecture and shapes, other weights (another "
                            "checkpoint, or a fine-tune or merged adapter of some other weight)")
    elif meta["format"] == FORMAT_V2:
        vf, vwant = _value_fingerprint_v2(model), meta["values"]["sha256"]
        if vf != vwant:
            problems.append(f"fingerprint {vwant[:16]} of the weights no edit changes -- embeddings, norms, biases; "
                            f"this model's is {vf[:16]}: same architecture and shapes, other weights")
    if not problems:
        return
    if not force:
        raise ValueError(f"{path}: this file was made for another model ({'; '.join(problems)}). Apply it to the "
                         f"model it was saved from, or pass force=True (--force) to {verb} it anyway")
    warnings.warn(f"{path.name}: {verb} with force=True on a model the file was not made for ({'; '.join(problems)}); "
                  "the rows it writes hold the values it expects, nothing else was checked", UserWarning, stacklevel=5)


def _weight(model: nn.Module, site: _Site, path: Path) -> torch.Tensor:
    from .adapters import _offloaded_weight, weight_transposed

    try:
        mod = model.get_submodule(site.path)
    except AttributeError:
        raise ValueError(f"{path}: the model has no module {site.path!r} (field {site.field}.path): this edit was made "
                         "for another architecture") from None
    transposed = weight_transposed(mod)
    if transposed is None:
        raise ValueError(f"{path}: {site.path} (field {site.field}.path) is a {type(mod).__name__}, not a linear "
                         "projection that kne edits")
    if transposed != site.transposed:
        raise ValueError(f"{path}: field {site.field}.transposed is {site.transposed} but {site.path} is a "
                         f"{type(mod).__name__} (transposed={transposed}): this edit was made for another architecture")
    w = _offloaded_weight(mod)
    if w is None:
        w = mod.weight
        tied = tied_to(model, w, f"{site.path}.weight")
        if tied:
            raise ValueError(f"{path}: {site.path} (field {site.field}.path) shares its weight with "
                             f"{', '.join(tied)} (tied weights): a write there would change those too, and kne edits "
                             "only weights of their own; this file was not made by kne for this model")
    w = w.t() if transposed else w
    if tuple(w.shape) != site.weight_shape or w.dtype != site.dtype:
        raise ValueError(f"{path}: {site.path} is {tuple(w.shape)} {w.dtype} in the model but "
                         f"{site.weight_shape} {site.dtype} in the file")
    return w


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        v = _INT_VIEW[a.element_size()]
        return torch.equal(a.contiguous().view(v), b.contiguous().view(v))
    return torch.equal(a, b)


def _write_rows(weight: torch.Tensor, dim: int, index: torch.Tensor, rows: torch.Tensor) -> None:
    """The one write of apply/revert: ``weight[index] = rows`` along ``dim``, in place (the fault
    tests replace it to fail at chosen sites)."""
    weight.index_copy_(dim, index, rows)


def _transfer(model: nn.Module, path: Union[str, Path], expect: str, write: str, verb: str, force: bool = False) -> int:
    path = Path(path)
    if not isinstance(force, bool):
        raise ValueError(f"force={force!r} is invalid: use True or False")
    meta, tensors = _read_raw(path)
    sites = _validate(path, meta, tensors)
    _check_model(path, meta, model, force, verb)
    # Every check before the first write: modules, shapes, dtypes, current values bit for bit.
    plan = []
    with torch.no_grad():
        for site in sites:
            w = _weight(model, site, path)
            idx = site.index.to(w.device)
            now = w.index_select(site.dim, idx)
            if not _same_bits(now, getattr(site, expect).to(now.device)):
                other = "new" if expect == "orig" else "orig"
                if _same_bits(now, getattr(site, other).to(now.device)):
                    hint = (" (it already holds the edited values: was the edit applied already?)" if expect == "orig"
                            else " (it holds the original values: was the edit never applied, or reverted already?)")
                else:
                    hint = " (another edit changed these values: revert the later edits first)"
                raise ValueError(f"cannot {verb} {path.name}: {site.path} does not hold the values the edit expects"
                                 + hint)
            plan.append((site, w, idx, now, getattr(site, write).to(w.device)))
    # All or nothing: a failure or an interrupt while writing puts back every site touched so far.
    done = []
    with writing(model):  # other threads' forwards wait: none sees a half-applied file
        try:
            with torch.no_grad():
                for site, w, idx, now, rows in plan:
                    done.append((site, w, idx, now))  # before the write: a write that fails half-way is undone too
                    _write_rows(w, site.dim, idx, rows)
        except BaseException as e:
            _rollback(done, path, verb, e)
            raise
    return len(plan)


def _rollback(done, path: Path, verb: str, error: BaseException) -> None:
    undo_writes([(site.path, w, site.dim, idx, now) for site, w, idx, now in done], f"{verb} {path.name}", error)


@holds_model("kne.apply_edit")
def apply_edit(model: nn.Module, path: Union[str, Path], *, force: bool = False) -> int:
    """Apply the edit stored at ``path`` to ``model`` in place; returns the module instances written.

    Refuses (``ValueError``, nothing written) a damaged file, a model that is not the one the edit
    was made on (architecture or value fingerprint; ``force=True`` applies it anyway, with a
    warning), a site tied to another parameter, and rows that do not hold the original values.
    All or nothing: if writing fails or is interrupted, the model is put back as it was."""
    return _transfer(model, path, expect="orig", write="new", verb="apply", force=force)


@holds_model("kne.revert_edit")
def revert_edit(model: nn.Module, path: Union[str, Path], *, force: bool = False) -> int:
    """Undo the edit stored at ``path`` (bit for bit); refuses a model that does not hold it. All or
    nothing, as :func:`apply_edit` (and ``force`` as there)."""
    return _transfer(model, path, expect="new", write="orig", verb="revert", force=force)
