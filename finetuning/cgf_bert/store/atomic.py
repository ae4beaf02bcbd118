"""One atomic writer for every file the toolkit leaves behind (checkpoints, records, state).

The bytes go to a temp file in the target's folder, are fsync'ed, and the temp file is renamed
over the target: a crash or a kill at any point leaves either the old file or the new one,
never half of one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable


def atomic_write(path: str | Path, write: Callable[[IO], None], binary: bool = True) -> Path:
    """Call ``write(f)`` on a temp file beside ``path``, fsync it, and rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)  # mkstemp makes files private; checkpoints and records are for sharing
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_leftovers(path: str | Path) -> list[Path]:
    """Delete the temp files that writers of ``path`` killed mid-write left beside it (``path``
    itself is whole: the old file or the new one). Call only where no other process writes ``path``."""
    path = Path(path)
    stale = list(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def check_writable(paths: dict[str, str | Path], folders: dict[str, str | Path] | None = None) -> None:
    """Refuse, before any work and without writing anything, a file or folder a run could not create.

    ``paths`` are files (``-o`` checkpoint), ``folders`` directories the run writes into (results,
    checkpoints); each is named by its option in the error. A path can be created when its first
    existing ancestor is a writable folder (and the path, if it exists, is of the right kind and writable).
    """
    from cgf_bert import CgfBertError

    for option, path, is_dir in [*((o, p, False) for o, p in paths.items()), *((o, p, True) for o, p in (folders or {}).items())]:
        p = Path(path)
        if p.exists():
            if p.is_dir() != is_dir:
                raise CgfBertError(f"{option} {p}: is {'a file' if is_dir else 'a folder'}, not {'a folder' if is_dir else 'a file'}")
            if not os.access(p, os.W_OK):
                raise CgfBertError(f"{option} {p}: not writable")
            continue
        parent = p.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise CgfBertError(f"{option} {p}: cannot be created, {parent} is a file")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise CgfBertError(f"{option} {p}: cannot be created, {parent} is not writable")
