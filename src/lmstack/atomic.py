"""Files written whole or not at all: through a temporary file beside the target, then a rename."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(str(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after a failure: no half-written file left beside the real one


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write` of a UTF-8 text file."""
    atomic_write(Path(path), lambda p: Path(p).write_text(text, encoding="utf-8"))
