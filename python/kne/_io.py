"""Output files, written whole or not at all (no torch import: the CLI checks its paths first)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

__all__ = ["check_output", "write_text_atomic"]


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


def write_text_atomic(path, text: str) -> Path:
    """Write ``path`` whole or not at all: a temporary name beside it, then renamed over it, so an
    interrupted or failed write leaves the file as it was."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p
