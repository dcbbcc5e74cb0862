"""What a path on disk is (a GGUF file, a training run directory): the loaders and the CLI's argument checks
ask the same questions."""

from __future__ import annotations

import os
from pathlib import Path

from lmstack.errors import LMStackError


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` names a GGUF file (by its suffix, in any case: llama.cpp's tools take M.GGUF too)."""
    return Path(path).suffix.lower() == ".gguf"


def is_training_run(path: Path) -> bool:
    """A training run's directory (its metrics.jsonl or checkpoints/), which holds checkpoints, not a model."""
    return path.is_dir() and ((path / "metrics.jsonl").exists() or (path / "checkpoints").is_dir())


def newest_checkpoint(run: Path) -> Path | None:
    steps = sorted(p for p in (run / "checkpoints").glob("step-*") if p.is_dir())
    return steps[-1] if steps else None


def training_run_error(path: Path, flag: str = "") -> LMStackError:
    """What to pass in place of a training run directory."""
    newest = newest_checkpoint(path)
    instead = (f"pass one of its checkpoints, RUN/checkpoints/step-N (the newest: {newest})" if newest
               else "it has no checkpoint yet")
    return LMStackError(f"{flag}{' ' if flag else ''}{path}: a training run directory, not a checkpoint; {instead}")
