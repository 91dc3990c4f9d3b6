"""The KnowEdit records shipped inside the package (MIT licence; see ``kne/data/knowedit/``).

>>> import kne
>>> reqs = kne.datasets.knowedit("counterfact", limit=3)   # a list of kne.EditRequest
>>> kne.datasets.knowedit_path("zsre")                       # .../kne/data/knowedit/ZsRE-test-all.json.gz

Short names: ``zsre`` (ZsRE-test-all, 1304 records), ``counterfact`` (wiki_counterfact-train,
1428) and ``recent`` (wiki_recent-train, 570). The files are the published JSON, gzip-compressed;
their licence and the citation lie beside them (``knowedit_path(name).parent``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from .requests import EditRequest, load_knowedit

__all__ = ["KNOWEDIT", "data_files", "knowedit", "knowedit_path", "resolve_data"]

#: short name -> file under kne/data/knowedit (the published name plus ``.gz``)
KNOWEDIT: Dict[str, str] = {
    "zsre": "ZsRE-test-all.json.gz",
    "counterfact": "wiki_counterfact-train.json.gz",
    "recent": "wiki_recent-train.json.gz",
}

_DIR = Path(__file__).resolve().parent / "data" / "knowedit"


def knowedit_path(name: str) -> Path:
    """The shipped file of a KnowEdit short name (``zsre``, ``counterfact``, ``recent``; any case)."""
    key = str(name).strip().lower()
    if key not in KNOWEDIT:
        raise ValueError(f"unknown KnowEdit data set {name!r}: use one of {', '.join(KNOWEDIT)} (or give a file path)")
    path = _DIR / KNOWEDIT[key]
    if not path.is_file():
        raise FileNotFoundError(f"the shipped KnowEdit file {path} is missing: the kne installation is incomplete "
                                "(reinstall kne; a source checkout has it under python/kne/data/knowedit)")
    return path


def knowedit(name: str, limit: Optional[int] = None) -> List[EditRequest]:
    """The records of a shipped KnowEdit file as :class:`kne.EditRequest` (``limit``: the first N)."""
    return load_knowedit(knowedit_path(name), limit=limit)


def resolve_data(name_or_path: Union[str, Path]) -> Path:
    """A KnowEdit short name (``zsre``, ``counterfact``, ``recent``) -> its shipped file; anything
    else is taken as a path (a JSON, JSON-lines or ``.gz`` file) and must exist. (A file in the
    current folder that is called like a short name: write ``./zsre``.)"""
    if isinstance(name_or_path, str) and name_or_path.strip().lower() in KNOWEDIT:
        return knowedit_path(name_or_path)
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"KnowEdit file {str(path)!r} does not exist; give a path or one of the shipped "
                                f"data sets: {', '.join(KNOWEDIT)}")
    return path


def data_files(data: Optional[Sequence[Union[str, Path]]], all_: bool) -> List[Path]:
    """The files ``kne eval`` reads: those of ``data`` (short names or paths, :func:`resolve_data`)
    or, with ``all_``, the three shipped files; exactly one of the two must be given."""
    if all_ == bool(data):
        raise ValueError("give either --data (zsre, counterfact, recent or a file path) or --all (the three shipped "
                         "KnowEdit files)")
    return [resolve_data(d) for d in (data or list(KNOWEDIT))]
