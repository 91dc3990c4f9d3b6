"""Every file kne writes, and every input path it reads, through one place (no torch import: the
CLI checks its paths before torch loads).

:func:`write_atomic` (and :func:`write_text`, :func:`write_bytes`) writes an output whole or not at
all, and respects what is already there:

* a new path, or an existing regular file: the writer writes a temporary file beside it, which is
  then renamed over it (an interrupted or failed write leaves the old file and no temporary one);
* a symlink: followed; a link to a regular file replaces that file (the link stays), a link to
  anything else is written through, as the target itself would be;
* an existing device, FIFO or other special file (``/dev/null``, ``/dev/stdout``, a named pipe):
  written in place, never replaced: the writer writes a temporary file elsewhere and its bytes are
  copied into the target.

Every failure is an :class:`OSError` naming the path and what went wrong: a full device, a
read-only folder, a symlink loop, a directory in the way.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, Tuple

__all__ = ["check_input", "check_output", "csv_text", "write_atomic", "write_bytes", "write_text"]

_REASONS = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "the file is too large for the device",
            errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted", errno.ELOOP: "a symlink loop (the link points back at itself)",
            errno.ENAMETOOLONG: "the name is too long", errno.EDQUOT: "disk quota exceeded"}


def _error(e: OSError, path, doing: str) -> OSError:
    """``e`` again, as an OSError of the same class whose message names ``path`` (its ``errno`` kept)."""
    reason = _REASONS.get(e.errno) or e.strerror or str(e)
    out = type(e)(f"cannot {doing} {path}: {reason}")
    out.errno = e.errno
    return out


def _stat(path: Path, doing: str) -> Optional[os.stat_result]:
    """``os.stat`` (symlinks followed), ``None`` when nothing is there; a loop or a refused lookup
    is an OSError naming the path."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # a missing path (a file where a folder should be)
        return None
    except OSError as e:
        raise _error(e, path, doing) from None


def check_input(path, what: str = "input file") -> Path:
    """``path`` as a :class:`Path`, checked to be a readable regular file (symlinks followed):
    ``FileNotFoundError`` / ``IsADirectoryError`` / ``OSError`` (a symlink loop, no permission)
    naming it and ``what`` it should be."""
    p = Path(path)
    st = _stat(p, f"read {what}")
    if st is None:
        dangling = " (a symlink to a missing file)" if p.is_symlink() else ""
        raise FileNotFoundError(f"{what} {str(p)!r} does not exist{dangling}")
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{what} {str(p)!r} is a directory, not a file")
    if not os.access(p, os.R_OK):
        raise PermissionError(f"cannot read {what} {p}: permission denied")
    return p


def check_output(path: Optional[str], flag: str, *, create: bool = False) -> None:
    """An output path checked before any work: not a directory, not a symlink loop; its folder
    exists (or, with ``create``, can be made: the nearest existing ancestor is a folder). An
    existing special file (``/dev/null``, a FIFO) is a valid output."""
    if not path:
        return
    p = Path(path)
    st = _stat(p, f"write {flag}")
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(f"{flag} {path}: is a directory; give a file name, e.g. {p / 'out.json'}")
        return  # an existing file (regular or special) is written through write_atomic's rules
    parent = probe = p.parent
    if create:  # the missing folders are made when the file is written
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
    if not probe.exists():
        raise FileNotFoundError(f"{flag} {path}: the folder {str(parent)!r} does not exist; create it first")
    if not probe.is_dir():
        raise NotADirectoryError(f"{flag} {path}: {str(probe)!r} is not a folder")


def _target(path: Path) -> Tuple[Path, bool]:
    """``(where to write, special)``: the path with symlinks resolved, and whether it is an existing
    file that is not a regular one (written in place)."""
    st = _stat(path, "write")
    if st is None:
        # a new file, or a dangling symlink: the link's (final) target is made
        return (Path(os.path.realpath(path)) if path.is_symlink() else path), False
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, f"cannot write {path}: it is a directory", str(path))
    if stat.S_ISREG(st.st_mode):
        return Path(os.path.realpath(path)), False
    return path, True


def write_atomic(path, write: Callable[[Path], object]) -> Path:
    """Write ``path`` whole or not at all, with ``write(tmp)`` writing a temporary file (its name
    keeps ``path``'s suffix, so a writer that reads the format from the name, like matplotlib's
    ``savefig``, sees the right one). A regular file or a new path is replaced by a rename; a
    special file (device, FIFO) is written in place; symlinks are followed (module docstring).
    Returns ``path``. Failures are :class:`OSError` naming the path."""
    p = Path(path)
    target, special = _target(p)
    if special:
        fd, name = tempfile.mkstemp(prefix=".kne-", suffix=p.suffix)
        os.close(fd)
        tmp = Path(name)
        try:
            write(tmp)
            try:
                with open(tmp, "rb") as src, open(p, "wb") as out:
                    shutil.copyfileobj(src, out)
                    out.flush()
            except OSError as e:
                raise _error(e, p, "write") from None
        finally:
            tmp.unlink(missing_ok=True)
        return p
    tmp = target.with_name(f".{target.stem}.{os.getpid()}.tmp{target.suffix}")
    try:
        try:
            write(tmp)
        except OSError as e:
            if e.filename is not None and Path(e.filename) != tmp:
                raise  # the writer's own input, not the output
            raise _error(e, p, "write") from None
        try:
            os.replace(tmp, target)
        except OSError as e:
            raise _error(e, p, "write") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only folder: the temporary file was never made
            pass
    return p


def write_bytes(path, data: bytes) -> Path:
    """``data`` written to ``path`` by :func:`write_atomic`."""
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text(path, text: str, encoding: str = "utf-8") -> Path:
    """``text`` written to ``path`` (UTF-8 unless told) by :func:`write_atomic`."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def csv_text(rows: Iterable[Mapping], fieldnames: Sequence[str]) -> str:
    """``rows`` as CSV text with a header (``csv.DictWriter``; a key not in ``fieldnames`` is an
    error, a missing one an empty cell), for :func:`write_text`."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(fieldnames))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
