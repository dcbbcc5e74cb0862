"""What a run reports: metrics.jsonl, TensorBoard, the loss-curve plot, and MFU against the device's peak."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lmstack.errors import LMStackError

# Dense peak tensor throughput (FLOP/s) per GPU: (bf16/fp16, tf32). Substring matches on the device name,
# most specific first; MFU is reported only for a device found here, never against a guessed peak.
PEAK_FLOPS: list[tuple[str, float, float]] = [
    ("H100 PCIe", 756e12, 378e12),
    ("H100 NVL", 835e12, 418e12),
    ("H100", 989.4e12, 494.7e12),  # SXM
    ("H200 NVL", 835.5e12, 417.5e12),
    ("H200", 989.4e12, 494.7e12),  # SXM
    ("GH200", 989.4e12, 494.7e12),
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

    def __init__(self, run_dir: Path, tensorboard: bool = False, resume_step: int = 0) -> None:
        """Records from step `resume_step` on are dropped: a killed run's lines after its last checkpoint are
        about to be redone, and a fresh run (0) starts the file anew."""
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) < resume_step] if resume_step else []
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))
            os.replace(tmp, self.path)  # a kill here keeps the old file whole
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise LMStackError("tensorboard: true needs the tensorboard package (pip install tensorboard)") \
                    from None
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
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


def plot_losses(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw training and validation loss against steps into `loss.png` (or `out`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        raise LMStackError(f"{run_dir}: metrics.jsonl has no losses to plot yet")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1.0, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5, markersize=3)
        best = min(val, key=lambda p: p[1])
        ax.annotate(f"best {best[1]:.4f} @ {best[0]}", best, textcoords="offset points", xytext=(0, 10),
                    ha="center", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out
