"""Float32 linear layers on the CPU: PyTorch's default (`F.linear`, MKL) against oneDNN with a packed weight.

    python bench/matmul.py                      # SmolLM2-135M's shapes, 1 to 2048 rows
    python bench/matmul.py --rows 1 64 --shape 2048x5632

Why the engine packs its float32 weights for oneDNN (`lmstack/onednn.py`): prints, for each
weight shape and number of rows, the time of each path, its GFLOP/s (rows > 1) or the GB/s at which it reads
the weight (1 row, where decoding is bound by memory), and the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lmstack.onednn import PackedLinear, onednn_available


def timed(fn, min_time: float = 0.2) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_time:
        fn()
        n += 1
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs="+", default=["576x1536", "1536x576", "576x49152"],
                        help="in x out features (default: SmolLM2-135M's MLP and output head)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 512, 2048])
    args = parser.parse_args()
    if not onednn_available():
        raise SystemExit("this PyTorch has no usable oneDNN")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32")
    for shape in args.shape:
        n_in, n_out = (int(v) for v in shape.split("x"))
        linear = torch.nn.Linear(n_in, n_out, bias=False)
        packed = PackedLinear(linear)
        w = linear.weight.detach()
        for rows in args.rows:
            x = torch.randn(rows, n_in)
            with torch.no_grad():
                err = (packed(x) - F.linear(x, w)).abs().max().item()
                t_default = timed(lambda x=x, w=w: F.linear(x, w))
                t_packed = timed(lambda x=x, packed=packed: packed(x))
            if rows == 1:
                unit, work = "GB/s", w.numel() * 4
            else:
                unit, work = "GFLOP/s", 2 * rows * n_in * n_out
            print(f"  {n_in:>5} x {n_out:<6} rows {rows:>5}: default {t_default * 1e6:9.1f} us "
                  f"({work / t_default / 1e9:6.1f} {unit}), oneDNN packed {t_packed * 1e6:9.1f} us "
                  f"({work / t_packed / 1e9:6.1f} {unit}), ratio {t_default / t_packed:5.2f}, "
                  f"max |diff| {err:.1e}")


if __name__ == "__main__":
    main()
