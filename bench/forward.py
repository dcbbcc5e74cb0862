"""Forward (inference) and forward+backward (training step) throughput: lmstack vs transformers, same weights.

    python bench/forward.py [--preset tiny-llama] [--batch 8] [--seq 256] [--dtype float32] [--device cpu]

Builds the model in lmstack, saves it, loads the same weights in `transformers` (SDPA attention) and times
both in one run, printing tokens/s and the ratio lmstack / transformers (> 1 means lmstack is faster).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import lmstack


def tokens_per_second(step, tokens: int, device: str, warmup: int = 2, repeat: int = 5) -> float:
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return tokens * repeat / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-llama")
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--n-embd", type=int, default=384)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dtype = lmstack.checkpoints.parse_dtype(args.dtype)
    cfg = lmstack.ModelConfig.from_name(args.preset, n_layer=args.n_layer, n_embd=args.n_embd,
                                        n_head=args.n_embd // 64, n_kv_head=args.n_embd // 128,
                                        intermediate_size=int(args.n_embd * 8 / 3) // 32 * 32,
                                        block_size=max(args.seq, 256), vocab_size=8192)
    ours = lmstack.DecoderLM(cfg)
    with tempfile.TemporaryDirectory() as d:
        lmstack.save_model(ours, d)
        theirs = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa", dtype=torch.float32)
    ours, theirs = ours.to(args.device, dtype), theirs.to(args.device, dtype)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=args.device)
    tokens = args.batch * args.seq

    def ours_fwd():
        with torch.no_grad():
            ours(ids)

    def theirs_fwd():
        with torch.no_grad():
            theirs(ids)

    def ours_train():
        _, loss = ours(ids, ids)
        loss.backward()

    def theirs_train():
        theirs(ids, labels=ids).loss.backward()

    print(f"{args.preset}-shaped, {ours.num_params():,} parameters, batch {args.batch} x {args.seq}, "
          f"{args.dtype} on {args.device}")
    for name, a, b in (("forward", ours_fwd, theirs_fwd), ("forward+backward", ours_train, theirs_train)):
        x, y = tokens_per_second(a, tokens, args.device), tokens_per_second(b, tokens, args.device)
        print(f"{name:>17}: lmstack {x:10.0f} tok/s | transformers {y:10.0f} tok/s | ratio {x / y:.2f}")


if __name__ == "__main__":
    main()
