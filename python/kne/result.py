"""What an edit returns: :class:`EditResult` (the edited model, its ensemble, statistics, and a
bit-exact ``restore``), and :class:`EditError`. Below the editors (``kne.editing``, ``kne.reference``,
FT-M) and what reads earlier edits (``kne.nullspace``), so none of them imports another for it."""

from __future__ import annotations

import hashlib
import itertools
import pathlib
import threading
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ._exclusive import exclusive, writing
from ._guard import undo_writes
from .adapters import ModuleSite
from .config import KNEConfig
from .ensemble import Ensemble
from .requests import EditRequest

__all__ = ["CapacityError", "EditError", "EditResult"]


class EditError(RuntimeError):
    """An edit could not be completed; the model was left exactly as it was."""


class CapacityError(EditError):
    """An edit could not land because the keys it must keep fill the key space of the modules it
    edits (``kne.Editor``, ``keep=``); the model was left exactly as it was. ``capacity`` maps each
    edited module instance to the share of its key space the kept keys occupy."""

    def __init__(self, message: str, capacity: Optional[Dict[str, float]] = None):
        super().__init__(message)
        self.capacity = dict(capacity or {})


def _rows(base) -> torch.Tensor:
    """An edit's original rows: a tensor, or a callable that reads them back (``kne.Editor`` keeps
    them in a file, off the heap)."""
    return base() if callable(base) else base


_LOCK = threading.Lock()
_LIVE: "weakref.WeakValueDictionary[int, EditResult]" = weakref.WeakValueDictionary()  # number -> unrestored result
_NUMBERS = itertools.count(1)


def _rows_digest(rows: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes: what an edit wrote, kept instead of a copy."""
    t = rows.detach().contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).cpu().numpy())
    return h.hexdigest()


def _overlap(a: Tuple[int, torch.Tensor], b: Tuple[int, torch.Tensor]) -> bool:
    """Whether two row (dim 0) or column (dim 1) index sets of one weight share an element."""
    (da, ia), (db, ib) = a, b
    if not ia.numel() or not ib.numel():
        return False
    if da != db:  # rows and columns of one matrix always cross
        return True
    return bool(torch.isin(ia.cpu(), ib.cpu()).any())


class EditResult:
    """Outcome of one edit: ``model`` (edited in place), ``ensemble``, ``stats`` and ``restore()``.

    ``stats`` holds ``locate_seconds``, ``edit_seconds``, ``total_seconds``, ``steps`` (optimizer
    steps taken), ``losses`` (the loss before each step, and the one that stopped the loop; with
    ``stop_after_step`` the loop ends after the step that loss took, so one per step),
    ``stopped_early``, ``neurons``, ``params_edited``, ``params_total`` (all model parameters),
    ``param_fraction`` and ``target_param_fraction`` (share of the target modules' parameters);
    with ``keep=`` also ``kept_sequences`` (token sequences whose keys the projection kept).

    Every result is numbered in the order it was made (``number``; :meth:`describe` names it) and,
    until restored, kept in a per-process registry of weak references, so :meth:`restore` can name
    the later edit that stands in its way. It keeps the original rows (for ``restore``) and a sha256
    of the rows it wrote (to tell whether they are still there), not a second copy of them.
    """

    def __init__(self, model: nn.Module, ensemble: Optional[Ensemble], stats: Dict[str, Any],
                 config: Optional[KNEConfig], requests: List[EditRequest],
                 saved: List[Tuple[ModuleSite, int, torch.Tensor, torch.Tensor]], *, method: str = "kne.fast_edit"):
        self.model = model
        self.ensemble = ensemble
        self.stats = stats
        self.config = config
        self.requests = requests
        self.method = method
        self._saved = saved  # (site, dim, idx, original rows/cols)
        with torch.no_grad():  # what this edit wrote, as the model holds it now
            self._written = [_rows_digest(site.weight().index_select(dim, idx.to(site.weight().device)))
                             for site, dim, idx, _ in saved]
        self.restored = False
        with _LOCK:
            self.number = next(_NUMBERS)
            _LIVE[self.number] = self

    def describe(self) -> str:
        """``edit #3 (kne.fast_edit: 'The capital of France is' -> 'Rome')``."""
        r = self.requests[0] if self.requests else None
        what = f"{r.prompt!r} -> {r.target_new!r}" if r is not None else "no request"
        more = f" and {len(self.requests) - 1} more request(s)" if len(self.requests) > 1 else ""
        return f"edit #{self.number} ({self.method}: {what}{more})"

    def save(self, path) -> "pathlib.Path":
        """Write only what changed (indices, new and original rows, model fingerprint, config) to a
        safetensors file; :func:`kne.apply_edit` / :func:`kne.revert_edit` apply and undo it.
        Refused (``ValueError``) once a later edit has changed rows this edit wrote."""
        from .editfile import save_edit

        return save_edit(self, path)

    def _changed_sites(self) -> List[ModuleSite]:
        """The module instances whose edited rows no longer hold what this edit wrote."""
        out = []
        with torch.no_grad():
            for (site, dim, idx, _), digest in zip(self._saved, self._written):
                w = site.weight()
                if _rows_digest(w.index_select(dim, idx.to(w.device))) != digest:
                    out.append(site)
        return out

    def _later_edits(self, sites: List[ModuleSite]) -> List["EditResult"]:
        """Live (unrestored) results made after this one that wrote rows of ``sites`` this one
        wrote too, newest first (the order to restore them in)."""
        mine = {id(s.module): (d, i) for s, d, i, _ in self._saved if any(s.module is c.module for c in sites)}
        with _LOCK:
            others = [r for n, r in sorted(_LIVE.items(), reverse=True) if n > self.number]
        return [r for r in others if not r.restored and any(
            id(s.module) in mine and _overlap(mine[id(s.module)], (d, i)) for s, d, i, _ in r._saved)]

    def _conflict(self, verb: str, changed: List[ModuleSite]) -> ValueError:
        names = changed[0].path + (f" (and {len(changed) - 1} more module(s))" if len(changed) > 1 else "")
        later = self._later_edits(changed)
        if later:
            cause = ("a later edit changed those rows: restore " + ", then ".join(r.describe() for r in later) +
                     " first (later edits newest first, as kne.runs does)")
        else:
            cause = ("they were changed after this edit by something kne cannot name (a forced restore of an earlier "
                     "edit, an edit file applied with kne.apply_edit, a later edit whose EditResult is gone, or a "
                     "direct write): undo that first")
        return ValueError(f"cannot {verb} {self.describe()}: {names} no longer holds the rows this edit wrote; {cause}"
                          + ("; or restore(force=True) to write this edit's original rows anyway (the later change "
                             "of those rows is then lost, and its own restore() refuses in turn)"
                             if verb == "restore" else ""))

    def restore(self, *, force: bool = False) -> nn.Module:
        """Put every weight this edit changed back bit for bit; returns the model (idempotent).

        Refuses (``ValueError``, nothing written) when the edited rows no longer hold what this edit
        wrote -- a later edit changed them -- and names that later edit: restore later edits first,
        newest first. ``force=True`` writes the original rows anyway. All or nothing: a failure or
        a Ctrl-C while writing puts back what was written (a second Ctrl-C waits for that)."""
        with exclusive(self.model, f"restore of {self.describe()}"):
            return self._restore(force)

    def _restore(self, force: bool) -> nn.Module:
        if self.restored:
            return self.model
        changed = [] if force else self._changed_sites()
        if changed:
            if self._holds_originals():
                self._done()  # already restored (an interrupted restore, or kne.revert_edit of its file)
                return self.model
            raise self._conflict("restore", changed)
        done = []
        with writing(self.model):  # other threads' forwards wait: none sees a half restore
            try:
                with torch.no_grad():
                    for site, dim, idx, base in reversed(self._saved):
                        w = site.weight()
                        i = idx.to(w.device)
                        rows = _rows(base).to(w.device)  # read first: a failed read writes nothing
                        done.append((site.path, w, dim, i, w.index_select(dim, i)))
                        w.index_copy_(dim, i, rows)
                    self._done()
            except BaseException as e:
                self.restored = False
                with _LOCK:
                    _LIVE[self.number] = self
                undo_writes(done, f"restore of {self.describe()}", e)
                raise
        return self.model

    def _holds_originals(self) -> bool:
        """Whether every edited row already holds its original value again."""
        with torch.no_grad():
            for site, dim, idx, base in self._saved:
                w = site.weight()
                if _rows_digest(w.index_select(dim, idx.to(w.device))) != _rows_digest(_rows(base)):
                    return False
        return True

    def originals(self) -> List[Tuple[ModuleSite, int, torch.Tensor, torch.Tensor]]:
        """``(site, dim, index, original rows)`` of every module instance this edit wrote (the
        rows read back from a ``kne.Editor``'s file where it keeps them)."""
        return [(site, dim, idx, _rows(base)) for site, dim, idx, base in self._saved]

    def _done(self) -> None:
        self.restored = True
        with _LOCK:
            _LIVE.pop(self.number, None)

    def __repr__(self) -> str:
        s = self.stats
        return (f"EditResult(#{self.number}, {self.method}, steps={s.get('steps')}, "
                f"final_loss={s['losses'][-1] if s.get('losses') else None}, "
                f"neurons={s.get('neurons')}, params_edited={s.get('params_edited')}, "
                f"total_seconds={s.get('total_seconds', 0):.3f}, restored={self.restored})")
