"""`make demo-align`: SFT on a few demonstrations, then GRPO and DPO against a verifier, in minutes on a CPU.

The task is two-digit addition ("47+38=" -> "85"), answered by a tiny character-level Llama-style model, in
the setting where alignment with verifiable rewards pays off: worked answers are scarce (500 demonstrations),
prompts are plentiful (the other 9,200 training sums, without answers) and any answer can be checked
(`addition_reward` computes the sum from the prompt itself).

1. write the data: the demonstrations, the unlabelled prompts, and 300 held-out test sums that no stage ever
   trains on (nor samples from);
2. build a small random model and a character tokenizer, saved as a checkpoint (the "base");
3. `finetune sft` on the demonstrations (`recipes/align-sft.yaml`): the model learns the format and part of
   the rule and memorises its 500 sums, but answers new ones right only part of the time (more steps and
   stronger weight decay help on some seeds and CPUs, not on others);
4. two second stages, each from the SFT model, each learning from the verifier on the unlabelled prompts:
   - `finetune grpo` (`recipes/align-grpo.yaml`): groups of completions sampled per prompt with the policy,
     rewarded 1 for the right sum and 0 otherwise;
   - `finetune dpo` (`recipes/align-dpo.yaml`): on-policy pairs, made once by sampling the SFT model on
     prompts: a sample the verifier accepts is `chosen`, each distinct one it rejects is `rejected`; with
     RPO's NLL term on the chosen answer, the SFT model as the frozen reference.

Accuracy is the fraction of held-out sums whose greedy completion (through the generation engine) is exactly
right.
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

from lmstack.checkpoints import load_model, save_model
from lmstack.config import ModelConfig
from lmstack.generate import Engine, SamplingParams
from lmstack.models import build_model
from lmstack.tokenizer import Tokenizer
from lmstack.train.config import load_config
from lmstack.train.loop import train

REPO = Path(__file__).resolve().parents[2]
EOS = "<eos>"
STAGES = ("grpo", "dpo")


def addition_records(seed: int = 0, n_test: int = 300) -> tuple[list[dict], list[dict]]:
    """All sums of two numbers below 100, shuffled, split into training and held-out test records."""
    pairs = [(a, b) for a in range(100) for b in range(100)]
    random.Random(seed).shuffle(pairs)
    records = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in pairs]
    return records[n_test:], records[:n_test]


def addition_answer(prompt: str) -> str:
    """The verifier: the right completion of "a+b=", computed from the prompt."""
    a, b = prompt.removesuffix("=").split("+")
    return str(int(a) + int(b))


def addition_reward(prompt: str, completion: str, record: dict[str, Any]) -> float:
    """GRPO's verifiable reward: 1 for exactly the right sum, else 0 (the record's answer is not needed)."""
    return float(completion == addition_answer(prompt))


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def exact_match(model: torch.nn.Module, tokenizer: Tokenizer, records: list[dict], batch_size: int = 64) -> float:
    """Fraction of records whose greedy completion is exactly the expected one."""
    engine = Engine(model, tokenizer, max_batch_size=batch_size)
    outputs = engine.generate([r["prompt"] for r in records], SamplingParams(temperature=0, max_new_tokens=6))
    model.clear_kv_cache()
    return sum(o.text == r["completion"] for o, r in zip(outputs, records)) / len(records)


def verified_pairs(model: torch.nn.Module, tokenizer: Tokenizer, prompts: list[str], samples: int,
                   seed: int) -> list[dict]:
    """On-policy preference pairs without labels: sample `samples` answers per prompt (temperature 1); where
    the verifier accepts some and rejects others, the right answer is chosen against each distinct wrong one."""
    engine = Engine(model, tokenizer, max_batch_size=512)
    outputs = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=6, n=samples, seed=seed))
    model.clear_kv_cache()
    pairs = []
    for i, prompt in enumerate(prompts):
        answer = addition_answer(prompt)
        texts = {o.text for o in outputs[i * samples:(i + 1) * samples]}
        if answer in texts:
            pairs += [{"prompt": prompt, "chosen": answer, "rejected": t} for t in sorted(texts - {answer})]
    return pairs


def run(out: Path, overrides: dict[str, list[str]] | None = None, progress: bool = False, seed: int = 0,
        demonstrations: int = 500, stages: tuple[str, ...] = STAGES, pair_prompts: int | None = None,
        samples: int = 8) -> dict[str, Any]:
    """The whole demonstration: test accuracies ("base", "sft", and one per stage of `stages`), the SFT
    model's accuracy on its own demonstrations ("sft_train"), counts and checkpoints.

    `seed` picks the split of the sums, the initial weights and every stage's training seed; `overrides`
    maps a recipe's file name to extra `--key value` arguments for it. The first `demonstrations` training
    sums are SFT records, the rest prompts without answers; DPO's pairs come from `samples` completions of
    each of the first `pair_prompts` of those (all by default)."""
    overrides = overrides or {}
    if out.exists():
        shutil.rmtree(out)
    train_records, test_records = addition_records(seed)
    labelled, prompts = train_records[:demonstrations], [r["prompt"] for r in train_records[demonstrations:]]
    write_jsonl(out / "data" / "sft.jsonl", labelled)
    write_jsonl(out / "data" / "prompts.jsonl", [{"prompt": p} for p in prompts])
    write_jsonl(out / "data" / "test.jsonl", test_records)
    result: dict[str, Any] = {"demonstrations": len(labelled), "prompts": len(prompts), "test": len(test_records)}

    tokenizer = Tokenizer.train_chars(["0123456789+="], special_tokens=[EOS])
    torch.manual_seed(seed)
    config = ModelConfig.from_name("tiny-llama", vocab_size=len(tokenizer), block_size=16, n_layer=2,
                                   n_embd=128, n_head=4, n_kv_head=4, intermediate_size=384)
    base = build_model(config)
    save_model(base, out / "base", tokenizer=tokenizer)
    result["base"] = exact_match(base.eval(), tokenizer, test_records)

    def stage(recipe: str, model: str, data: Path, name: str) -> str:
        cfg = load_config(REPO / "recipes" / recipe, ["--model", model, "--data", str(data), "--out_dir",
                                                      str(out / name), "--seed", str(seed), "--progress",
                                                      str(progress), *overrides.get(recipe, [])])
        checkpoint = train(cfg)["checkpoint"]
        result[name] = exact_match(load_model(checkpoint), tokenizer, test_records)
        result[f"{name}_checkpoint"] = checkpoint
        return checkpoint

    sft = stage("align-sft.yaml", str(out / "base"), out / "data" / "sft.jsonl", "sft")
    sft_model = load_model(sft)
    result["sft_train"] = exact_match(sft_model, tokenizer, labelled[:len(test_records)])
    for name in stages:
        if name == "grpo":
            stage("align-grpo.yaml", sft, out / "data" / "prompts.jsonl", "grpo")
        elif name == "dpo":
            pairs = verified_pairs(sft_model, tokenizer, prompts[:pair_prompts], samples, seed=seed + 1)
            write_jsonl(out / "data" / "pairs.jsonl", pairs)
            result["pairs"] = len(pairs)
            stage("align-dpo.yaml", sft, out / "data" / "pairs.jsonl", "dpo")
        else:
            raise ValueError(f"unknown stage {name!r}; expected one of {STAGES}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/align-demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.time()
    r = run(Path(args.out), progress=sys.stderr.isatty(), seed=args.seed)
    rows = [("random base model", r["base"], ""),
            (f"SFT on {r['demonstrations']} demonstrations", r["sft"],
             f"({r['sft_train']:.1%} on its own demonstrations)"),
            (f"SFT + GRPO on {r['prompts']:,} prompts", r["grpo"], "(reward: the verifier)"),
            (f"SFT + DPO on {r['pairs']:,} verified pairs", r["dpo"], "(sampled from the SFT model)")]
    print(f"two-digit addition: exact match of the greedy answer on {r['test']} held-out sums")
    for label, accuracy, note in rows:
        print(f"  {label:<36} {accuracy:6.1%}   {note}".rstrip())
    print(f"done in {time.time() - start:.0f}s; data, runs and checkpoints are under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
