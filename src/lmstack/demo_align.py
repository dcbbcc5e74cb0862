"""`make demo-align`: SFT, then preference alignment, measured on a verifiable task in minutes on a CPU.

The task is two-digit addition ("47+38=" -> "85"), answered by a tiny character-level Llama-style model:

1. write the data: SFT records for a training split of the sums, held-out test sums (never trained on);
2. build a small random model and a character tokenizer, saved as a checkpoint (the "base");
3. `finetune sft` on prompt/completion records (`recipes/align-sft.yaml`); exact-match accuracy on the test
   sums before and after;
4. build on-policy preference pairs: sample the SFT model on training prompts, keep its wrong answers as
   `rejected` against the right one as `chosen`;
5. `finetune dpo` from the SFT model with the SFT model as the frozen reference (`recipes/align-dpo.yaml`);
   accuracy again.

Greedy decoding through the generation engine; accuracy is the fraction of test sums answered exactly.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lmstack.checkpoints import load_model, load_tokenizer, save_model
from lmstack.config import ModelConfig
from lmstack.generate import Engine, SamplingParams
from lmstack.models import build_model
from lmstack.tokenizer import Tokenizer
from lmstack.train.config import load_config
from lmstack.train.loop import train

REPO = Path(__file__).resolve().parents[2]
EOS = "<eos>"


def addition_records(seed: int = 0, n_test: int = 300) -> tuple[list[dict], list[dict]]:
    """All sums of two numbers below 100, split into training and held-out test records."""
    pairs = [(a, b) for a in range(100) for b in range(100)]
    random.Random(seed).shuffle(pairs)
    records = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in pairs]
    return records[n_test:], records[:n_test]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def exact_match(model: torch.nn.Module, tokenizer: Tokenizer, records: list[dict], batch_size: int = 64) -> float:
    """Fraction of records whose greedy completion is exactly the expected one."""
    engine = Engine(model, tokenizer, max_batch_size=batch_size)
    outputs = engine.generate([r["prompt"] for r in records], SamplingParams(temperature=0, max_new_tokens=6))
    model.clear_kv_cache()
    return sum(o.text == r["completion"] for o, r in zip(outputs, records)) / len(records)


def preference_pairs(model: torch.nn.Module, tokenizer: Tokenizer, records: list[dict], samples: int,
                     seed: int) -> list[dict]:
    """On-policy pairs: for each prompt, the right answer is chosen and each distinct wrong answer the model
    samples (at temperature 1) is rejected."""
    engine = Engine(model, tokenizer, max_batch_size=256)
    outputs = engine.generate([r["prompt"] for r in records],
                              SamplingParams(temperature=1.0, max_new_tokens=6, n=samples, seed=seed))
    model.clear_kv_cache()
    pairs = []
    for i, r in enumerate(records):
        wrong = {o.text for o in outputs[i * samples:(i + 1) * samples] if o.text != r["completion"]}
        pairs += [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": w} for w in sorted(wrong)]
    return pairs


def run(out: Path, overrides: dict[str, list[str]] | None = None, progress: bool = False,
        pair_prompts: int = 2000, samples: int = 4) -> dict[str, float]:
    """The whole demonstration; returns the accuracies and where things were written."""
    overrides = overrides or {}
    if out.exists():
        shutil.rmtree(out)
    train_records, test_records = addition_records()
    write_jsonl(out / "data" / "sft.jsonl", train_records)
    write_jsonl(out / "data" / "test.jsonl", test_records)

    tokenizer = Tokenizer.train_chars(["0123456789+="], special_tokens=[EOS])
    torch.manual_seed(0)
    config = ModelConfig.from_name("tiny-llama", vocab_size=len(tokenizer), block_size=16, n_layer=2,
                                   n_embd=128, n_head=4, n_kv_head=4, intermediate_size=384)
    base = build_model(config)
    save_model(base, out / "base", tokenizer=tokenizer)
    result = {"base": exact_match(base.eval(), tokenizer, test_records)}

    def stage(recipe: str, extra: list[str]) -> dict[str, Any]:
        cfg = load_config(REPO / "recipes" / recipe, [*extra, "--progress", str(progress), *overrides.get(recipe, [])])
        return train(cfg)

    sft = stage("align-sft.yaml", ["--model", str(out / "base"), "--data", str(out / "data" / "sft.jsonl"),
                                   "--out_dir", str(out / "sft")])
    sft_model = load_model(sft["checkpoint"])
    result["sft"] = exact_match(sft_model, tokenizer, test_records)

    pairs = preference_pairs(sft_model, tokenizer, train_records[:pair_prompts], samples, seed=1)
    write_jsonl(out / "data" / "pairs.jsonl", pairs)
    result["pairs"] = len(pairs)
    dpo = stage("align-dpo.yaml", ["--model", sft["checkpoint"], "--data", str(out / "data" / "pairs.jsonl"),
                                   "--out_dir", str(out / "dpo")])
    result["dpo"] = exact_match(load_model(dpo["checkpoint"]), load_tokenizer(dpo["checkpoint"]), test_records)
    result["sft_checkpoint"], result["dpo_checkpoint"] = sft["checkpoint"], dpo["checkpoint"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/align-demo")
    args = parser.parse_args(argv)
    start = time.time()
    r = run(Path(args.out), progress=sys.stderr.isatty())
    print(f"two-digit addition, exact match on {300} held-out sums:")
    print(f"  random base model   {r['base']:6.1%}")
    print(f"  after SFT           {r['sft']:6.1%}   ({r['sft_checkpoint']})")
    print(f"  after DPO           {r['dpo']:6.1%}   ({r['dpo_checkpoint']}; {r['pairs']} on-policy pairs)")
    print(f"done in {time.time() - start:.0f}s; everything is under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def exact_match_reward(prompt: str, completion: str, record: dict[str, Any]) -> float:
    """GRPO's verifiable reward: 1 for exactly the right sum, else 0."""
    return float(completion == record["completion"])


def digit_reward(prompt: str, completion: str, record: dict[str, Any]) -> float:
    """A denser verifiable reward: half for the exact sum, half for the share of its digits in place
    (right-aligned, as the columns of a written sum)."""
    target = record["completion"]
    width = max(len(target), len(completion), 1)
    a, b = completion.rjust(width), target.rjust(width)
    return 0.5 * float(completion == target) + 0.5 * sum(x == y for x, y in zip(a, b)) / width
