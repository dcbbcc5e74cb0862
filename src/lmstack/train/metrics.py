"""What a run reports: metrics.jsonl, TensorBoard, the loss-curve plot, and MFU against the device's peak."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lmstack.atomic import atomic_write_text
from lmstack.errors import LMStackError

# Dense peak tensor throughput (FLOP/s) per GPU: (bf16/fp16, tf32). Substring matches on the device name,
# most specific first; MFU is reported only for a device found here, never against a guessed peak.
PEAK_FLOPS: list[tuple[str, float, float]] = [
    ("H100 PCIe", 756e12, 378e12),
    ("H100 NVL", 835e12, 418e12),
    ("H100", 989.4e12, 494.7e12),  # SXM
    ("H200 NVL", 835.5e12, 417.5e12),
    ("GH200", 989.4e12, 494.7e12),  # before "H200", which its name holds
    ("H200", 989.4e12, 494.7e12),  # SXM
    ("B200", 2250e12, 1100e12),
    ("A100", 312e12, 156e12),
    ("A800", 312e12, 156e12),
    ("L40S", 362e12, 183e12),
    ("L40", 181e12, 90.5e12),
    ("L4", 121e12, 60e12),
    ("A10G", 70e12, 35e12),
    ("A10", 125e12, 62.5e12),
    ("RTX 4090", 165.2e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12),
    ("V100", 125e12, 15.7e12),
    ("T4", 65e12, 8.1e12),
]


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak for `precision` (bf16/fp16 tensor cores, or tf32 for fp32), if known."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device), precision)


def peak_flops_of(device_name: str, precision: str) -> float | None:
    """The dense peak of the GPU called `device_name` (as CUDA names it) for `precision`, if known."""
    for key, half, tf32 in PEAK_FLOPS:
        if key in device_name:
            return half if precision in ("bf16", "fp16") else tf32
    return None


class MetricsLog:
    """Appends one JSON object per line to `metrics.jsonl` (and TensorBoard scalars when asked)."""

    def __init__(self, run_dir: Path, tensorboard: bool = False, resume_step: int = 0,
                 keep_evaluation: bool = False) -> None:
        """Records from step `resume_step` on are dropped: a killed run's lines after its last checkpoint are
        about to be redone, and a fresh run (0) starts the file anew. With `keep_evaluation`, the validation
        and sample records at `resume_step` stay: the resumed run does not redo them (a finished run's final
        evaluation, off the `eval_interval` grid, resumed to train longer)."""
        self.path = run_dir / "metrics.jsonl"
        kept_now: list[dict[str, Any]] = []
        if self.path.exists():
            records = read_metrics(run_dir) if resume_step else []
            kept = [r for r in records if r.get("step", 0) < resume_step]
            if keep_evaluation:
                kept_now = [r for r in records if r.get("step") == resume_step and ("val_loss" in r or "sample" in r)]
            # A kill here keeps the old file whole.
            atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in kept + kept_now))
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise LMStackError("tensorboard: true needs the tensorboard package (pip install tensorboard)") \
                    from None
            # TensorBoard reads every event file of the directory: purging from `resume_step` hides what an
            # earlier (killed) run logged from there on, as metrics.jsonl drops it.
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)
            for record in kept_now:  # purged with the rest of their step: written again
                self._scalars(record)

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            self._scalars(record)

    def _scalars(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of `run_dir/metrics.jsonl`. A last line cut off (a run killed while writing it) is left
    out; any other line that is not JSON is an error naming it."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise LMStackError(f"{run_dir}: no metrics.jsonl (not a training run directory)")
    lines = path.read_text().splitlines()
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if lineno < len(lines):
                raise LMStackError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return records


# What a task's validation is judged by, and whether higher is better. Loss for every task but GRPO, whose
# loss is advantage-weighted and so centred on zero by construction: its reward says how the run goes.
_HEADLINE = {"grpo": ("reward", "max")}
_HIGHER_IS_BETTER = ("accuracy", "reward")  # the metrics (besides the headline) whose best is marked


def headline_metric(task: str) -> tuple[str, str]:
    """(metric, "min" or "max"): the validation figure that says how a run of `task` is going."""
    return _HEADLINE.get(task, ("loss", "min"))


def best_validation(records: list[dict[str, Any]], task: str) -> tuple[str, float, int] | None:
    """(metric, best value, its step) of the task's headline validation metric over a run's records."""
    name, goal = headline_metric(task)
    points = [(r[f"val_{name}"], r["step"]) for r in records if f"val_{name}" in r]
    if not points:
        return None
    value, step = (max if goal == "max" else min)(points, key=lambda p: p[0])
    return name, value, step


def plot_panels(records: list[dict[str, Any]], task: str) -> list[str]:
    """The metrics `plot_losses` draws, one panel each: the task's headline, then the loss, then the other
    metrics validation reports (accuracy, rewards, KL, ...); perplexity is the loss again, so it is left out."""
    headline = headline_metric(task)[0]
    names = {k[4:] for r in records for k in r if k.startswith("val_") and k != "val_ppl"}
    if any("loss" in r for r in records):
        names.add("loss")
    return sorted(names, key=lambda n: (n != headline, n != "loss", n))


def _run_task(run_dir: Path) -> str:
    try:
        return json.loads((run_dir / "config.json").read_text()).get("task", "pretrain")
    except (OSError, ValueError, AttributeError):
        return "pretrain"


def plot_losses(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw the run's curves against steps into `loss.png` (or `out`): one panel per metric logged at
    validation (the task's headline first), training and validation together, each best point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    task = _run_task(run_dir)
    headline, goal = headline_metric(task)
    names = plot_panels(records, task)
    if not names:
        raise LMStackError(f"{run_dir}: metrics.jsonl has no losses to plot yet")
    cols = min(len(names), 3)
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(8 if cols == 1 else 4.5 * cols, 4.5 * rows), dpi=120,
                             squeeze=False)
    for ax, name in zip(axes.flat, names):
        train = [(r["step"], r[name]) for r in records if name in r]
        val = [(r["step"], r[f"val_{name}"]) for r in records if f"val_{name}" in r]
        if train:
            ax.plot(*zip(*train), label="train", linewidth=1.0, alpha=0.8)
        if val:
            ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5, markersize=3)
            higher = goal == "max" if name == headline else name in _HIGHER_IS_BETTER
            if name == headline or higher:
                best = (max if higher else min)(val, key=lambda p: p[1])
                ax.annotate(f"best {best[1]:.4f} @ {best[0]}", best, textcoords="offset points",
                            xytext=(0, 10), ha="center", fontsize=8)
        label = "cross-entropy loss (nats/token)" if name == "loss" and task in ("pretrain", "sft") else name
        ax.set_xlabel("step")
        ax.set_ylabel(label.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    if len(names) > 1:
        fig.suptitle(run_dir.name)
    else:
        axes[0, 0].set_title(run_dir.name)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out
