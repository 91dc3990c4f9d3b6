"""Output files, written whole or not at all: every file kne, its benchmarks and its tools write goes
through :func:`write_atomic` / :func:`write_text` (no torch import: the CLI checks its paths first)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

__all__ = ["check_output", "csv_text", "write_atomic", "write_text"]


def check_output(path: Optional[str], flag: str, *, create: bool = False) -> None:
    """An output path checked before any work: not a directory; its folder exists (or, with
    ``create``, can be made: the nearest existing ancestor is a folder)."""
    if not path:
        return
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"{flag} {path}: is a directory; give a file name, e.g. {p / 'out.json'}")
    parent = probe = p.parent
    if create:  # the missing folders are made when the file is written
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
    if not probe.exists():
        raise FileNotFoundError(f"{flag} {path}: the folder {str(parent)!r} does not exist; create it first")
    if not probe.is_dir():
        raise NotADirectoryError(f"{flag} {path}: {str(probe)!r} is not a folder")


def write_atomic(path, write: Callable[[Path], object]) -> Path:
    """Write ``path`` whole or not at all: ``write(tmp)`` writes a temporary file beside it (same
    suffix, so a writer that reads the format from the name, like matplotlib's ``savefig``, sees
    the right one), which is then renamed over ``path``; an interrupted or failed write leaves
    ``path`` as it was and no temporary file."""
    p = Path(path)
    tmp = p.with_name(f".{p.stem}.{os.getpid()}.tmp{p.suffix}")
    try:
        write(tmp)
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


def write_text(path, text: str, encoding: str = "utf-8") -> Path:
    """``text`` written to ``path`` (UTF-8 unless told) whole or not at all (:func:`write_atomic`)."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def csv_text(rows: Iterable[Mapping], fieldnames: Sequence[str]) -> str:
    """``rows`` as CSV text with a header (``csv.DictWriter``; a key not in ``fieldnames`` is an
    error, a missing one an empty cell), for :func:`write_text`."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(fieldnames))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
