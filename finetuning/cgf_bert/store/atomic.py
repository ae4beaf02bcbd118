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
