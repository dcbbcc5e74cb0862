"""Training checkpoints: a Hugging Face model directory plus `trainer_state/`, written atomically.

    RUN_DIR/checkpoints/step-0000500/
        config.json, model.safetensors, tokenizer.json, ...   (loads in lmstack and transformers)
        trainer_state/state.json        step, config, python and numpy RNG states, counters
        trainer_state/optimizer.pt      optimizer (and grad scaler) state, read with weights_only=True
        trainer_state/rng-rank{r}.pt    torch CPU and CUDA RNG states of each process

Everything is written into `step-N.tmp/` and renamed when complete, so a kill at any moment leaves either the
previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmstack.errors import LMStackError

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:07d}"


def staging_dir(run_dir: Path, step: int) -> Path:
    path = checkpoint_dir(run_dir, step).with_suffix(".tmp")
    return path


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def host_rng_state() -> dict[str, Any]:
    """Python's and numpy's RNG states as JSON-able values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def set_host_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def write_trainer_state(stage: Path, rank: int, state: dict[str, Any] | None, optimizer_state: Any) -> None:
    """Rank 0 writes the shared state; every rank writes its own RNG state."""
    folder = stage / "trainer_state"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), folder / f"rng-rank{rank}.pt")
    if rank == 0:
        torch.save(optimizer_state, folder / "optimizer.pt")
        (folder / "state.json").write_text(json.dumps({**(state or {}), **host_rng_state()}, indent=1))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(folder: Path) -> None:
    """Flush every file under `folder`, and the directories, to disk: a rename published after a crash of
    the machine (not only of the process) must not name empty files."""
    for path in [*folder.rglob("*"), folder]:
        _fsync(path)


def publish(run_dir: Path, step: int, keep: int) -> Path:
    """Rename the staged checkpoint into place and delete all but the newest `keep`, and any staging
    directory an interrupted save left."""
    final, stage = checkpoint_dir(run_dir, step), staging_dir(run_dir, step)
    _sync_tree(stage)
    if final.exists():
        # The same step saved again: move the old one aside first, so that the name never holds a
        # half-deleted checkpoint.
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        stage.rename(final)
        shutil.rmtree(old)
    else:
        stage.rename(final)
    _fsync(final.parent)  # the rename itself
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    for stale in final.parent.glob("step-*.tmp"):  # a save killed at another step (one save runs at a time)
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (staging directories are not checkpoints)."""
    folder = run_dir / "checkpoints"
    if not folder.exists():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path:
    found = list_checkpoints(run_dir)
    if not found:
        raise LMStackError(f"{run_dir}: no checkpoint to resume from (none written yet)")
    return found[-1]


def read_trainer_state(ckpt: Path, rank: int) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """(state.json, optimizer state, this rank's RNG state); tensors are read with weights_only=True."""
    folder = ckpt / "trainer_state"
    file = folder / "state.json"
    try:
        state = json.loads(file.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no step number")
        file = folder / "optimizer.pt"
        optimizer = torch.load(file, weights_only=True, map_location="cpu")
        file = folder / f"rng-rank{rank}.pt"
        rng = torch.load(file, weights_only=True) if file.exists() else {}
    except (OSError, json.JSONDecodeError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        # missing, cut off, corrupt (weights_only refuses a pickle of anything but tensors and containers)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, pickle.UnpicklingError):  # its message advises weights_only=False: not for a corrupt file
            first = "corrupt, or not tensors alone"
        raise LMStackError(f"{folder}: unreadable trainer state: {file.name} ({first})") from None
    return state, optimizer, rng


def saved_world_size(ckpt: Path, state: dict[str, Any]) -> int:
    """How many processes wrote the checkpoint: state.json says so; before it did, every process wrote one
    RNG file."""
    return state.get("world_size") or max(1, len(list((ckpt / "trainer_state").glob("rng-rank*.pt"))))
