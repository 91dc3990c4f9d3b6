"""One editor for a whole sequence of edits: :class:`Editor`.

``fast_edit(..., keep=[earlier results])`` re-reads the keys of every earlier edit from the model
at each new edit: ``O(N)`` work per edit, and an exact span of keys that fills the key space of a
module after a few dozen edits. An :class:`Editor` lives for the sequence instead:

* **Kept keys, updated, not recomputed.** With ``project`` (the ``local`` preset) it holds, per
  module instance of the target modules, a Frequent-Directions sketch of every key the edits so far
  asked to keep (:class:`kne.nullspace.KeySketch`): after each edit, the keys of its ``prompt +
  answer`` and the last token of each neighbour it kept (:func:`kne.nullspace.kept_texts`) are read
  once, from the edited model, and added. The next edit's null space is read from the sketch.
  Memory: ``8 * rank * sum(widths)`` bytes, fixed when the editor is made (``sketch_rank``, by
  default the largest rank whose buffers fit ``state_budget`` = 10% of the model's bytes); work per
  edit: independent of how many edits came before.
* **Capacity, visible.** :attr:`stats` gives, per module instance, the share of its key space the
  kept keys occupy. An edit that does not land within its step budget is refused (the model put
  back) with :class:`kne.CapacityError`, which names that share and the options.
* **Undo data off the heap.** Each edit's original rows, and the rows it wrote, go to an
  append-only file in the editor's folder (``directory``, by default a temporary one); the
  :class:`kne.EditResult` reads them back when asked. RSS stays flat as edits accumulate.
* :meth:`undo` / :meth:`undo_all` (bit-exact), :attr:`edits`, :meth:`save` / :meth:`load` (a
  sequence resumed in another process, all or nothing).

>>> ed = kne.Editor(model, tok)
>>> ed.edit({"prompt": "The capital of France is", "target_new": "Rome", "subject": "France"})
>>> ed.stats["capacity_max"], ed.undo_all()
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
import weakref
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._exclusive import exclusive, writing
from ._guard import deferred_interrupt, undo_writes
from ._text import check_tokenizer
from ._utils import Timer, as_float, as_int
from .adapters import ModuleSite, check_model, resolve_sites
from .config import KNEConfig, edit_config
from .editing import capacity_options
from .nullspace import KeySketch, kept_keys, kept_texts
from .nullspace import sketch_rank as fit_rank
from .requests import EditRequest
from .result import CapacityError, EditError, EditResult, _rows_digest

__all__ = ["Editor", "FORMAT"]

FORMAT = "kne.editor/1"
_METHODS = ("kne", "reference")


def _dtype(name: str) -> torch.dtype:
    d = getattr(torch, name.replace("torch.", ""), None)
    if not isinstance(d, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in an editor's row index")
    return d


class _RowFile:
    """An append-only file of tensors (the edits' original and written rows), read back with
    ``pread``: nothing of it stays on the heap."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self.size = os.fstat(self._fd).st_size
        self._close = weakref.finalize(self, os.close, self._fd)

    def put(self, t: torch.Tensor) -> Dict[str, Any]:
        t = t.detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        off = self.size
        n = os.pwrite(self._fd, data, off)
        if n != len(data):
            raise OSError(f"{self.path}: wrote {n} of {len(data)} bytes (is the disk full?)")
        self.size = off + n
        return {"offset": off, "nbytes": len(data), "dtype": str(t.dtype), "shape": list(t.shape)}

    def get(self, ref: Dict[str, Any]) -> torch.Tensor:
        data = os.pread(self._fd, int(ref["nbytes"]), int(ref["offset"]))
        if len(data) != int(ref["nbytes"]):
            raise OSError(f"{self.path} is shorter than its index says (offset {ref['offset']}, {ref['nbytes']} bytes): "
                          "the editor's folder was changed or truncated")
        t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return t.view(_dtype(ref["dtype"])).reshape(ref["shape"])

    def loader(self, ref: Dict[str, Any]) -> Callable[[], torch.Tensor]:
        return lambda: self.get(ref)

    def truncate(self, size: int) -> None:
        os.ftruncate(self._fd, size)
        self.size = size

    def copy_to(self, target: Path) -> None:
        with open(target, "wb") as out:
            done = 0
            while done < self.size:
                chunk = os.pread(self._fd, min(1 << 24, self.size - done), done)
                if not chunk:
                    raise OSError(f"{self.path} ended at byte {done} of {self.size}")
                out.write(chunk)
                done += len(chunk)
            out.flush()
            os.fsync(out.fileno())

    def close(self) -> None:
        self._close()


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


class Editor:
    """Edit one model fact after fact (or batch after batch) at a cost that does not grow.

    ``config`` / ``overrides``: the settings of every edit (default ``KNEConfig.preset("local")``,
    as :func:`kne.fast_edit`). ``method``: ``"kne"`` (:func:`kne.fast_edit`) or ``"reference"``
    (:func:`kne.reference.edit`; same state, same rows within tolerance). With ``config.project``
    the kept keys of every edit live in a :class:`kne.nullspace.KeySketch` of rank ``sketch_rank``
    (default: the largest whose buffers fit ``state_budget`` times the model's parameter bytes).
    ``directory``: where the undo rows are written (created; must not hold anything else); default
    a temporary folder removed by :meth:`close` or when the editor is collected.
    ``require_landed``: an edit whose stop test never passed within ``config.steps`` is refused and
    put back (:class:`kne.CapacityError` when the projection is on, else :class:`kne.EditError`).

    Not thread-safe for one model: each call holds the model (a second kne call that changes it,
    from another thread, gets ``kne.ModelBusyError``).
    """

    def __init__(self, model: nn.Module, tokenizer, config: Optional[KNEConfig] = None, *, method: str = "kne",
                 sketch_rank: Optional[int] = None, state_budget: float = 0.1,
                 directory: Optional[Union[str, os.PathLike]] = None, require_landed: bool = True,
                 **overrides: Any):
        if method not in _METHODS:
            raise ValueError(f"method must be one of {', '.join(_METHODS)}, got {method!r}")
        check_tokenizer(tokenizer)
        cfg = check_model(model, edit_config(config, overrides))
        self.model, self.tokenizer, self.config, self.method = model, tokenizer, cfg, method
        self.require_landed = bool(require_landed)
        sites = resolve_sites(model, list(cfg.target_modules), cfg.layers, cfg.exclude_edge_layers)
        self._sites: Dict[str, ModuleSite] = {s.path: s for name in cfg.target_modules for s in sites[name]}
        self.state: Optional[KeySketch] = None
        if cfg.project:
            widths = {p: s.in_features for p, s in self._sites.items()}
            budget = as_float(state_budget, "state_budget", lo=0.0, lo_open=True)
            model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            rank = fit_rank(list(widths.values()), budget * model_bytes) if sketch_rank is None \
                else as_int(sketch_rank, "sketch_rank", 1)
            self.state = KeySketch(widths, rank)
        if directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="kne-editor-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.directory), True)
        else:
            self.directory = Path(directory)
            if self.directory.exists() and (not self.directory.is_dir() or any(self.directory.iterdir())):
                raise FileExistsError(f"{self.directory} exists and is not an empty folder: give the editor a new or "
                                      "empty folder for its undo rows (Editor.save writes elsewhere)")
            self.directory.mkdir(parents=True, exist_ok=True)
            self._cleanup = None
        self._rows = _RowFile(self.directory / "rows.bin")
        self._results: List[EditResult] = []
        self._refs: List[List[Dict[str, Any]]] = []  # per edit, per site: path, dim, index, orig/new refs
        self._seconds: List[float] = []

    # ------------------------------------------------------------------------------------------ edits
    @property
    def edits(self) -> List[EditResult]:
        """The edits applied, oldest first."""
        return list(self._results)

    def __len__(self) -> int:
        return len(self._results)

    def edit(self, requests, *, ensemble=None, preserve_prompts: Optional[List[str]] = None) -> EditResult:
        """Edit one fact or several (one attribution pass and one training loop for all of them),
        keeping every earlier edit's keys; returns the :class:`kne.EditResult` (also in
        :attr:`edits`). All or nothing: on any error or interrupt the model, the kept state and
        the undo file are left as they were."""
        from . import reference
        from .editing import fast_edit

        timer = Timer()
        fn = fast_edit if self.method == "kne" else reference.edit
        with exclusive(self.model, "kne.Editor.edit"):
            res = fn(self.model, self.tokenizer, requests, self.config, ensemble=ensemble,
                     preserve_prompts=preserve_prompts, state=self.state)
            size = self._rows.size
            try:
                if self.require_landed and not res.stats.get("stopped_early"):
                    raise self._not_landed(res)
                keys = self._kept_keys(res) if self.state is not None else {}
                refs = []
                with torch.no_grad():
                    for site, dim, idx, base in res._saved:
                        w = site.weight()
                        new = w.index_select(dim, idx.to(w.device))
                        refs.append({"path": site.path, "dim": dim, "index": idx.detach().cpu().to(torch.int64),
                                     "orig": self._rows.put(base), "new": self._rows.put(new),
                                     "orig_sha": _rows_digest(base), "new_sha": _rows_digest(new)})
                with deferred_interrupt():  # the bookkeeping below is not cut in half by a Ctrl-C
                    for path, k in keys.items():
                        self.state.add(path, k)
                    res._saved = [(site, dim, idx, self._rows.loader(r["orig"]))
                                  for (site, dim, idx, _), r in zip(res._saved, refs)]
                    self._results.append(res)
                    self._refs.append(refs)
                    self._seconds.append(timer())
                    res.stats["editor_seconds"] = self._seconds[-1]
            except BaseException:
                with deferred_interrupt():
                    res.restore(force=True)
                    self._rows.truncate(size)
                raise
        return res

    def _kept_keys(self, res: EditResult) -> Dict[str, torch.Tensor]:
        """The keys this edit asks later edits to keep, at every module instance of the state, read
        once from the model with the edit applied; checked finite before any is added."""
        seqs = kept_texts([res], self.tokenizer, self.config)
        paths = list(self._sites)
        keys = kept_keys(self.model, self.tokenizer, [self._sites[p] for p in paths], seqs)
        for p, k in zip(paths, keys):
            if not bool(torch.isfinite(k).all()):
                raise EditError(f"the edited model gives non-finite keys at {p} on the edit's own prompt: the edit "
                                "was refused and the model put back")
        return dict(zip(paths, keys))

    def _not_landed(self, res: EditResult) -> EditError:
        cfg, s = self.config, res.stats
        losses = s.get("edit_losses") or s.get("losses") or []
        what = (f"{res.describe()} did not land within {s.get('steps')} steps (stop rule {cfg.stop_rule!r}; answer "
                f"loss {losses[0]:.3g} -> {losses[-1]:.3g})" if losses else f"{res.describe()} did not land")
        survived = s.get("step_survived")
        if self.state is None or (survived is not None and survived >= 0.5):
            why = "" if survived is None else (f" (the projection let {100 * survived:.0f}% of each step through: the "
                                               "kept keys are not what stopped it)")
            return EditError(f"{what}{why}; the edit was refused and the model put back. Allow more steps "
                             f"(KNEConfig.steps, now {cfg.steps}), a larger step (lr, now {cfg.lr:g}) or a larger "
                             f"ensemble (a lower KNEConfig.percentile, now {cfg.percentile:g}), or pass "
                             "Editor(require_landed=False) to keep edits that did not land")
        occ = {site.path: self.state.occupancy(site.path, cfg.keep_rtol) for site, _, _, _ in res._saved}
        worst = max(occ, key=occ.get)
        through = "" if survived is None else f"; the projection let only {100 * survived:.0f}% of each step through"
        return CapacityError(f"{what} after {len(self._results)} earlier edit(s){through}: the kept keys occupy "
                             f"{100 * sum(occ.values()) / len(occ):.0f}% of the key space of the {len(occ)} module "
                             f"instance(s) it edits on average ({worst}: {100 * occ[worst]:.0f}%). The edit was "
                             f"refused and the model put back. To go on: {capacity_options(cfg)}; or allow more "
                             f"steps (KNEConfig.steps, now {cfg.steps})", occ)

    # ------------------------------------------------------------------------------------------- undo
    def undo(self) -> EditResult:
        """Undo the last edit, bit for bit; returns it. Its keys stay in the kept state (a sketch
        cannot subtract): later edits keep protecting them. Nothing to undo: ``ValueError``."""
        if not self._results:
            raise ValueError("nothing to undo: this editor has made no edit (or every edit was undone)")
        with exclusive(self.model, "kne.Editor.undo"):
            res = self._results[-1]
            res.restore()
            with deferred_interrupt():
                self._rows.truncate(self._refs[-1][0]["orig"]["offset"] if self._refs[-1] else self._rows.size)
                self._results.pop()
                self._refs.pop()
                self._seconds.pop()
        return res

    def undo_all(self) -> nn.Module:
        """Undo every edit, newest first, bit for bit, and empty the kept state; returns the model.
        All or nothing: if one undo fails, the edits undone before it are applied again."""
        with exclusive(self.model, "kne.Editor.undo_all"):
            done: List[int] = []
            try:
                for i in reversed(range(len(self._results))):
                    self._results[i].restore()
                    done.append(i)
            except BaseException:
                with deferred_interrupt():
                    for i in reversed(done):
                        self._reapply(i)
                raise
            with deferred_interrupt():
                self._rows.truncate(0)
                self._results, self._refs, self._seconds = [], [], []
                if self.state is not None:
                    self.state = KeySketch(self.state.widths, self.state.rank)
        return self.model

    def _reapply(self, i: int) -> None:
        """Write edit ``i``'s rows again (after its restore), and mark its result live."""
        res = self._results[i]
        with torch.no_grad(), writing(self.model):
            for (site, dim, idx, _), r in zip(res._saved, self._refs[i]):
                w = site.weight()
                w.index_copy_(dim, idx.to(w.device), self._rows.get(r["new"]).to(w.device))
        res.restored = False
        from .result import _LIVE, _LOCK

        with _LOCK:
            _LIVE[res.number] = res

    # ------------------------------------------------------------------------------------------ stats
    @property
    def stats(self) -> Dict[str, Any]:
        """``edits``; ``state_bytes`` (the sketch's buffers) and ``sketch_rank``; ``capacity``
        (per module instance: the share of its key space the kept keys occupy, at
        ``config.keep_rtol``) and ``capacity_max``; ``undo_bytes`` (the undo file);
        ``seconds`` (per edit); ``state_ops`` (multiply-adds spent on the state so far)."""
        out: Dict[str, Any] = {"edits": len(self._results), "method": self.method,
                               "undo_bytes": self._rows.size, "seconds": list(self._seconds)}
        if self.state is not None:
            cap = {p: self.state.occupancy(p, self.config.keep_rtol) for p in self._sites}
            out.update(state_bytes=self.state.nbytes, sketch_rank=self.state.rank, capacity=cap,
                       capacity_max=max(cap.values()) if cap else 0.0, state_ops=self.state.ops,
                       kept_rows=sum(self.state.rows_added.values()))
        else:
            out.update(state_bytes=0, sketch_rank=None, capacity={}, capacity_max=0.0, state_ops=0, kept_rows=0)
        return out

    def close(self) -> None:
        """Close the undo file (and remove the temporary folder the editor made). The edits stay
        on the model; their results can no longer restore."""
        self._rows.close()
        if self._cleanup is not None:
            self._cleanup()

    # -------------------------------------------------------------------------------------- save/load
    def save(self, directory: Union[str, os.PathLike]) -> Path:
        """Write the sequence (config, kept state, every edit's rows, fingerprints of the model) to
        ``directory``, all or nothing: the new contents go to a fresh folder inside it and a
        ``HEAD`` file is replaced atomically to name it, so an interrupted save leaves the previous
        save whole. :meth:`load` resumes it. Returns the folder."""
        from safetensors.torch import save_file

        from .editfile import fingerprint, value_fingerprint

        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"{directory} is a file: Editor.save writes a folder")
        if directory.is_dir() and any(directory.iterdir()) and not (directory / "HEAD").is_file():
            raise FileExistsError(f"{directory} holds files but no saved editor (no HEAD file): give a new or empty "
                                  "folder, or one an earlier Editor.save wrote")
        directory.mkdir(parents=True, exist_ok=True)
        gen = directory / f"gen-{uuid.uuid4().hex[:12]}"
        try:
            gen.mkdir()
            self._rows.copy_to(gen / "rows.bin")
            if self.state is not None:
                save_file({p.replace(".", "/"): t for p, t in self.state.state_dict().items()},
                          str(gen / "state.safetensors"))
            suffixes = sorted({s.suffix for s in self._sites.values()})
            doc = {"format": FORMAT, "method": self.method, "config": self.config.to_dict(),
                   "require_landed": self.require_landed,
                   "model": fingerprint(self.model), "values": value_fingerprint(self.model, suffixes),
                   "state": self.state.meta() if self.state is not None else None,
                   "rows_bytes": self._rows.size, "seconds": self._seconds,
                   "edits": [{"number": r.number, "method": r.method,
                              "requests": [q.to_dict() for q in r.requests],
                              "stats": _json_safe({k: v for k, v in r.stats.items() if k != "neighbours"}),
                              "neighbours": list(r.stats.get("neighbours") or []),
                              "sites": [{**{k: v for k, v in ref.items() if k != "index"},
                                         "index": ref["index"].tolist()} for ref in refs]}
                             for r, refs in zip(self._results, self._refs)]}
            text = json.dumps(doc, indent=1)
            doc_sha = hashlib.sha256(text.encode()).hexdigest()
            with open(gen / "editor.json", "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            tmp = directory / f".HEAD-{uuid.uuid4().hex[:8]}"
            tmp.write_text(f"{gen.name} {doc_sha}\n")
            os.replace(tmp, directory / "HEAD")  # the one step that switches to the new save
        except BaseException:
            shutil.rmtree(gen, ignore_errors=True)
            for t in directory.glob(".HEAD-*"):
                t.unlink(missing_ok=True)
            raise
        for old in directory.glob("gen-*"):  # the previous save, and any an interrupted save left
            if old.name != gen.name:
                shutil.rmtree(old, ignore_errors=True)
        return directory

    @classmethod
    def load(cls, model: nn.Module, tokenizer, directory: Union[str, os.PathLike], *,
             work_directory: Optional[Union[str, os.PathLike]] = None,
             require_landed: Optional[bool] = None) -> "Editor":
        """Resume a saved sequence on ``model``: the model the sequence started from, unedited (a
        freshly loaded copy). Checks the model's fingerprints and, before each edit is applied
        again, that its rows hold what that edit started from; all or nothing (a mismatch or an
        interrupt leaves the model as it was). The saved folder is only read. ``require_landed``:
        as saved unless given."""
        from safetensors.torch import load_file

        from .editfile import _check_model

        directory = Path(directory)
        head = directory / "HEAD"
        if not head.is_file():
            raise FileNotFoundError(f"{directory} holds no saved editor (no HEAD file): give the folder Editor.save "
                                    "wrote")
        parts = head.read_text().split()
        if len(parts) != 2:
            raise ValueError(f"{head} is damaged: it should name a saved folder and its sha256")
        gen = directory / parts[0]
        try:
            text = (gen / "editor.json").read_text()
        except (FileNotFoundError, UnicodeDecodeError) as e:
            raise ValueError(f"{directory}: the saved editor {parts[0]} is missing or unreadable ({e})") from None
        if hashlib.sha256(text.encode()).hexdigest() != parts[1]:
            raise ValueError(f"{gen / 'editor.json'} differs from the sha256 its HEAD names: the save was changed "
                             "after it was written")
        doc = json.loads(text)
        if doc.get("format") != FORMAT:
            raise ValueError(f"{gen / 'editor.json'} has format {doc.get('format')!r}; this kne reads {FORMAT!r}")
        _check_model(gen / "editor.json", {"format": "kne.edit/3", "model": doc["model"], "values": doc["values"]},
                     model, False, "load")
        cfg = KNEConfig.from_dict(doc["config"])
        st = doc["state"]
        ed = cls(model, tokenizer, cfg, method=doc["method"], sketch_rank=st["rank"] if st else None,
                 directory=work_directory,
                 require_landed=doc["require_landed"] if require_landed is None else require_landed)
        if os.path.getsize(gen / "rows.bin") != int(doc["rows_bytes"]):
            raise ValueError(f"{gen / 'rows.bin'} holds {os.path.getsize(gen / 'rows.bin')} bytes, its index "
                             f"{doc['rows_bytes']}: the save is damaged")
        if st is not None:
            tensors = load_file(str(gen / "state.safetensors"))
            ed.state = KeySketch.from_state(st, {p.replace("/", "."): t for p, t in tensors.items()})
        ed._rows.close()
        os.unlink(ed._rows.path)
        shutil.copyfile(gen / "rows.bin", ed._rows.path)
        ed._rows = _RowFile(ed._rows.path)
        written: List[Tuple[str, torch.Tensor, int, torch.Tensor, torch.Tensor]] = []
        with exclusive(model, "kne.Editor.load"):
            try:
                with torch.no_grad(), writing(model):
                    for e in doc["edits"]:
                        saved, refs = [], []
                        for s in e["sites"]:
                            site = ed._sites.get(s["path"])
                            if site is None:
                                raise ValueError(f"the saved edit #{e['number']} wrote {s['path']}, which is not a "
                                                 "target module of this model")
                            w = site.weight()
                            idx = torch.tensor(s["index"], dtype=torch.int64)
                            now = w.index_select(s["dim"], idx.to(w.device))
                            if _rows_digest(now) != s["orig_sha"]:
                                raise ValueError(f"{s['path']} does not hold the rows the saved edit #{e['number']} "
                                                 "started from: Editor.load needs the model the sequence started from, "
                                                 "unedited (a freshly loaded copy); nothing was changed")
                            new = ed._rows.get(s["new"])
                            if _rows_digest(new) != s["new_sha"]:
                                raise ValueError(f"{gen / 'rows.bin'}: the rows of edit #{e['number']} at {s['path']} "
                                                 "differ from their sha256: the save is damaged")
                            written.append((site.path, w, s["dim"], idx.to(w.device), now.clone()))
                            w.index_copy_(s["dim"], idx.to(w.device), new.to(w.device))
                            saved.append((site, s["dim"], idx, ed._rows.loader(s["orig"])))
                            refs.append({**s, "index": idx})
                        reqs = [EditRequest.from_dict(r) for r in e["requests"]]
                        stats = dict(e["stats"], neighbours=e["neighbours"])
                        res = EditResult(model, None, stats, cfg, reqs, saved, method=e["method"])
                        ed._results.append(res)
                        ed._refs.append(refs)
            except BaseException as err:
                ed._results = []
                undo_writes(written, "kne.Editor.load", err)
                ed.close()
                raise
        ed._seconds = [float(x) for x in doc["seconds"]]
        return ed

    def __repr__(self) -> str:
        return (f"Editor({len(self._results)} edit(s), method={self.method}, "
                f"sketch_rank={self.state.rank if self.state is not None else None}, directory={str(self.directory)!r})")
