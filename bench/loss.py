"""The output head's loss in training: lmstack's chunked `linear_cross_entropy` against the plain
`cross_entropy(lm_head(h).float(), targets)` that transformers computes, forward and backward, in one run.

    python bench/loss.py                                  # SmolLM2's head (576 -> 49,152), 2,048 tokens
    python bench/loss.py --dim 384 --vocab 8192           # bench/train_throughput.py's small Llama
    python bench/loss.py --tokens 8192 --dim 2048 --vocab 128256 --device cuda   # Llama 3's head, on a GPU

`--precision bf16` runs both under bf16 autocast, as the training loop does; float32 runs TF32 products on a
GPU, as the loop does too.

Each variant runs in its own process so that its peak memory is its own: on the CPU the peak resident set
above what the process held before the step, on a GPU torch's peak allocation above the inputs. Prints
seconds per step, peak memory and the ratios.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import resource
import time
from queue import Empty

import torch
import torch.nn.functional as F

from lmstack.models.loss import linear_cross_entropy
from lmstack.train.loop import compute_context


def plain(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=-100)


def chunked(hidden, weight, targets, chunk_rows=None):
    return linear_cross_entropy(hidden, weight, None, targets, chunk_rows)


def measure(variant: str, args: argparse.Namespace) -> tuple[float, float]:
    """(seconds per step, peak MiB above the inputs) of one variant, in this (child) process."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    loss_fn = plain if variant == "plain" else functools.partial(chunked, chunk_rows=args.chunk_rows)
    hidden = torch.randn(args.tokens, args.dim, device=device, requires_grad=True)
    weight = (0.02 * torch.randn(args.vocab, args.dim, device=device)).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    context = compute_context(device, args.precision)  # the training loop's, for both: the same products
    torch.backends.cuda.matmul.allow_tf32 = True

    def step():
        with context:
            loss = loss_fn(hidden, weight, targets)
        loss.backward()
        hidden.grad = weight.grad = None

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # the first step sets the peak (later ones reuse the freed memory)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**10  # KiB on Linux
    best = float("inf")
    for _ in range(args.repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, peak


def _child(variant, args, queue):
    queue.put(measure(variant, args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--chunk-rows", type=int, help="lmstack's rows per chunk (default: its own choice)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"{args.tokens} tokens, head {args.dim} -> {args.vocab}, {args.precision}, {args.device}, "
          f"torch {torch.__version__}")
    spawn = multiprocessing.get_context("spawn")
    results = {}
    for variant in ("plain", "lmstack"):
        queue = spawn.Queue()
        child = spawn.Process(target=_child, args=(variant, args, queue))
        child.start()
        while child.is_alive() or not queue.empty():  # a child that fails puts nothing: do not wait forever
            try:
                results[variant] = queue.get(timeout=5)
                break
            except Empty:
                continue
        child.join()
        if variant not in results:
            raise SystemExit(f"the {variant} run failed (exit code {child.exitcode}); its error is above")
        seconds, peak = results[variant]
        print(f"  {variant:>8}: {seconds * 1e3:9.1f} ms per step, peak {peak:9,.0f} MiB")
    (t_plain, m_plain), (t_ours, m_ours) = results["plain"], results["lmstack"]
    print(f"  speed lmstack / plain: {t_plain / t_ours:.2f}x; memory plain / lmstack: {m_plain / max(m_ours, 1):.1f}x")


if __name__ == "__main__":
    main()
