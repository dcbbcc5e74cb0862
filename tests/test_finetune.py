"""Finetuning tasks through the one training loop: SFT (full, LoRA, packed), classification, reward model, the
DPO family and GRPO, with checkpoints, exact resume, the CLI and evaluation."""

import json
import math
import random
from pathlib import Path

import pytest
import torch

from lmstack import LMStackError
from lmstack.checkpoints import load_model, load_tokenizer, save_model
from lmstack.cli import main, summary_line
from lmstack.config import ModelConfig
from lmstack.evaluate.classification import classification_metrics
from lmstack.evaluate.classify import predict_labels
from lmstack.models import build_model
from lmstack.models.classifier import SequenceClassifier
from lmstack.tokenizer import Tokenizer
from lmstack.train.config import load_config
from lmstack.train.loop import train
from lmstack.train.metrics import read_metrics
from tests.conftest import REPO

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "log", "good", "bad", "great", "awful", "film", "book", "day", "night"]


def _sentence(rng: random.Random, n: int = 6) -> str:
    return " ".join(rng.choice(WORDS[:10]) for _ in range(n))  # no sentiment words


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random Llama-style checkpoint with a ChatML BPE tokenizer."""
    rng = random.Random(0)
    text = "\n".join(_sentence(rng, 12) + " good bad great awful film book day night" for _ in range(200))
    tok = Tokenizer.train([text], 300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                          eos_token="<|im_end|>", chat_template="chatml")
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("tiny-llama", vocab_size=len(tok), block_size=64))
    path = tmp_path_factory.mktemp("base") / "model"
    save_model(model, path, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def gpt2_base(base, tmp_path_factory):
    """A tiny random GPT-2 checkpoint (q/k/v fused into c_attn on the Hugging Face side), same tokenizer."""
    tok = load_tokenizer(base)
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("tiny-gpt2", vocab_size=len(tok), block_size=64))
    path = tmp_path_factory.mktemp("gpt2") / "model"
    save_model(model, path, tokenizer=tok)
    return path


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _run(base, tmp_path, task, data, resume=False, **settings):
    values = dict(task=task, model=str(base), data=str(data), out_dir=str(tmp_path / task), batch_size=8,
                  block_size=64, max_steps=20, learning_rate=3e-3, min_lr=3e-4, warmup_steps=2, eval_interval=10,
                  eval_batches=4, log_interval=1, checkpoint_interval=100, progress=False, weight_decay=0.0,
                  val_fraction=0.1, precision="fp32", device="cpu")
    values.update(settings)
    overrides = [x for k, v in values.items() for x in (f"--{k}", json.dumps(v) if isinstance(v, list) else str(v))]
    return train(load_config(None, overrides), resume=resume), read_metrics(values["out_dir"])


def _resumes_exactly(base, tmp_path, data, settings):
    """Run `settings` straight, and again stopped after step 3 and resumed: the losses of steps 3-5 must be
    the same. Returns the straight run's metrics."""
    _, straight = _run(base, tmp_path / "a", "sft", data, **settings)
    _run(base, tmp_path / "b", "sft", data, **{**settings, "max_steps": 3})
    _run(base, tmp_path / "b", "sft", data, resume=True, **settings)
    losses = {r["step"]: r["loss"] for r in straight if "loss" in r}
    again = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "b" / "sft") if "loss" in r}
    assert [again[s] for s in (3, 4, 5)] == [losses[s] for s in (3, 4, 5)]
    return straight


def _val(metrics, key="val_loss"):
    return [r[key] for r in metrics if key in r]


def _chats(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = _sentence(rng, 4)
        out.append({"messages": [{"role": "user", "content": s},
                                 {"role": "assistant", "content": " ".join(reversed(s.split()))}]})
    return out


def test_sft_through_the_cli_learns_the_assistant_turns(base, tmp_path):
    data = _write(tmp_path / "chat.jsonl", _chats(200))
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"model: {base}\ndata: {data}\nbatch_size: 8\nblock_size: 64\nmax_steps: 40\n"
                      "learning_rate: 3.0e-3\nwarmup_steps: 2\neval_interval: 20\neval_batches: 4\n"
                      "checkpoint_interval: 100\nprogress: false\npacking: true\ndevice: cpu\n")
    assert main(["finetune", "sft", "--config", str(recipe), "--out_dir", str(tmp_path / "run")]) == 0
    val = _val(read_metrics(tmp_path / "run"))
    assert val[-1] < val[0] - 1.0  # the reversal of the user's words is learnable: the loss falls a lot
    model = load_model(tmp_path / "run" / "checkpoints" / "step-0000040")
    assert model.config.vocab_size == load_model(base).config.vocab_size


def test_lora_sft_resumes_exactly_and_its_adapter_loads_merged(base, tmp_path):
    data = _write(tmp_path / "chat.jsonl", _chats(100))
    settings = dict(lora_r=4, lora_alpha=8, lora_targets=["q", "v", "down"], lora_rslora=True, max_steps=6,
                    checkpoint_interval=3, eval_interval=3)
    straight = _resumes_exactly(base, tmp_path, data, settings)

    # Trainable parameters: r * (in + out) for q [64->64], v [64->32] and down [160->64] in each of 2 layers.
    counts = next(r for r in straight if "trainable_params" in r)
    assert counts["trainable_params"] == 2 * 4 * ((64 + 64) + (64 + 32) + (160 + 64))

    # The checkpoint holds a PEFT adapter; loading it applies it to the base and merges.
    ckpt = tmp_path / "a" / "sft" / "checkpoints" / "step-0000006"
    assert (ckpt / "adapter_config.json").exists() and not (ckpt / "model.safetensors").exists()
    assert json.loads((ckpt / "adapter_config.json").read_text())["use_rslora"] is True  # alpha / sqrt(r)
    merged = load_model(ckpt)
    from lmstack.train.lora import load_peft

    adapted = load_peft(load_model(base), ckpt)
    ids = torch.tensor([[5, 17, 42, 9, 77]])
    with torch.no_grad():
        assert torch.allclose(merged(ids), adapted(ids), atol=1e-5)
        assert not torch.allclose(merged(ids), load_model(base)(ids), atol=1e-4)  # the adapter did train


def _sentiment(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        words = _sentence(rng, 5).split()
        words.insert(rng.randrange(len(words) + 1), rng.choice(["good", "great"] if label == "positive"
                                                                else ["bad", "awful"]))
        out.append({"text": " ".join(words), "label": label})
    return out


def test_classifier_head_learns_and_eval_classify_reports_its_metrics(base, tmp_path):
    train_file = _write(tmp_path / "train.jsonl", _sentiment(300, 0))
    test_file = _write(tmp_path / "test.jsonl", _sentiment(60, 1))
    summary, metrics = _run(base, tmp_path, "classify", train_file, max_steps=80)
    assert _val(metrics, "val_accuracy")[-1] >= 0.9
    model = load_model(summary["checkpoint"])
    assert isinstance(model, SequenceClassifier) and model.labels == ["negative", "positive"]

    out = tmp_path / "report.json"
    assert main(["eval", "classify", "--model", summary["checkpoint"], "--data", str(test_file),
                 "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    records = [json.loads(line) for line in test_file.read_text().splitlines()]
    from lmstack.checkpoints import load_tokenizer

    predicted = predict_labels(model, load_tokenizer(summary["checkpoint"]), [r["text"] for r in records])
    assert report == classification_metrics([r["label"] for r in records], predicted,
                                            labels=["negative", "positive"])
    assert report["accuracy"] >= 0.9


def test_integer_labels_keep_their_numeric_order_and_one_label_is_refused(base, tmp_path):
    """Labels 0..11 from the data get the ids 0..11 (a string sort would give "10" id 2); a single label is
    no classification."""
    from lmstack.checkpoints import load_tokenizer
    from lmstack.errors import LMStackError
    from lmstack.train.tasks import ClassifyTask, label_order

    assert label_order({"10", "2", "0", "-1"}) == ["-1", "0", "2", "10"]
    assert label_order({"b", "a", "10", "2"}) == ["10", "2", "a", "b"]
    tok = load_tokenizer(base)
    data = _write(tmp_path / "n.jsonl", [{"text": f"film {i}", "label": i % 12} for i in range(48)])
    assert ClassifyTask(tok, 0, str(data), None, 64, None).labels == [str(i) for i in range(12)]
    one = _write(tmp_path / "one.jsonl", [{"text": "good film", "label": "pos"}] * 4)
    with pytest.raises(LMStackError, match=r"one.jsonl: classification needs at least two labels, the data has only"):
        ClassifyTask(tok, 0, str(one), None, 64, None)


def test_cut_and_left_out_records_are_noted(base, tmp_path):
    """SFT and preference records longer than block_size are cut, and the run says how many (and which SFT
    records lost their whole answer to the cut)."""
    from lmstack.checkpoints import load_tokenizer
    from lmstack.train.tasks import PreferenceTask, SFTTask

    tok = load_tokenizer(base)
    rng = random.Random(0)
    long_prompt = [{"prompt": _sentence(rng, 60), "completion": "good"} for _ in range(3)]
    long_answer = [{"prompt": "a", "completion": _sentence(rng, 60)} for _ in range(2)]
    data = _write(tmp_path / "sft.jsonl", long_prompt + long_answer + [{"prompt": "a", "completion": "b"}] * 5)
    notes = SFTTask(tok, 0, str(data), None, 32, packing=False).notes
    assert notes == [f"5 of 10 records in {data} are longer than block_size 32: cut to their first 33 tokens, "
                     "and 3 of them left out (their answer lay past the cut)"]
    pairs = _write(tmp_path / "pairs.jsonl", [{"prompt": _sentence(rng, 40), "chosen": "good", "rejected": "bad"},
                                              {"prompt": "a", "chosen": "good", "rejected": "bad"}])
    assert PreferenceTask("dpo", tok, 0, str(pairs), None, 32, 0.1).notes == [
        f"1 of 2 records in {pairs} are longer than block_size 32: their prompts are cut from the left"]


def test_text_records_train_every_token(base, tmp_path):
    """`{"text": ...}` is plain language modelling (TRL's text datasets): every token and eos are trained."""
    from lmstack.checkpoints import load_tokenizer
    from lmstack.data.finetune import load_sft_examples

    tok = load_tokenizer(base)
    data = _write(tmp_path / "t.jsonl", [{"text": "good film day"}])
    (example,), _ = load_sft_examples(data, tok, 64)
    ids = tok.encode("good film day", add_special_tokens=True) + [tok.eos_token_id]
    assert example.input_ids == ids[:-1] and example.labels == ids[1:]


def test_a_reference_with_another_vocabulary_is_refused(base, tmp_path):
    data = _write(tmp_path / "pairs.jsonl", _pairs(8, 0))
    tok = Tokenizer.train(["good bad film day night"] * 20, 280, special_tokens=["<|im_end|>"], eos_token="<|im_end|>")
    other = tmp_path / "other"
    save_model(build_model(ModelConfig.from_name("tiny-llama", vocab_size=len(tok), block_size=64)), other,
               tokenizer=tok)
    from lmstack.errors import LMStackError

    with pytest.raises(LMStackError, match=rf"reference {other} has vocab_size {len(tok)}, the model {base} "):
        _run(base, tmp_path, "dpo", data, reference=str(other), max_steps=1)
    # The same size, other tokens: the tokenizers' hashes differ
    text = (REPO / "data" / "tinyshakespeare.txt").read_text()[:20_000]
    same_size = Tokenizer.train([text], 300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                eos_token="<|im_end|>", chat_template="chatml")
    assert len(same_size) == len(load_tokenizer(base))
    save_model(build_model(ModelConfig.from_name("tiny-llama", vocab_size=len(same_size), block_size=64)), other,
               tokenizer=same_size)
    with pytest.raises(LMStackError, match=rf"reference {other} has another tokenizer"):
        _run(base, tmp_path, "dpo", data, reference=str(other), max_steps=1)


def test_generative_classification_answers_only_with_labels(base):
    from lmstack.checkpoints import load_tokenizer

    labels = ["positive", "negative", "neutral"]
    texts = [r["text"] for r in _sentiment(12, 2)]
    predicted = predict_labels(load_model(base), load_tokenizer(base), texts, labels)
    assert len(predicted) == 12 and set(predicted) <= set(labels)


def _pairs(n, seed):
    rng = random.Random(seed)
    return [{"prompt": _sentence(rng, 3), "chosen": _sentence(rng, 2) + " good", "rejected": _sentence(rng, 2)
             + " bad"} for _ in range(n)]


def test_reward_model_learns_the_preference(base, tmp_path):
    data = _write(tmp_path / "pairs.jsonl", _pairs(200, 0))
    summary, metrics = _run(base, tmp_path, "reward", data, max_steps=30)
    assert _val(metrics, "val_accuracy")[0] < 0.8 and _val(metrics, "val_accuracy")[-1] >= 0.95
    assert load_model(summary["checkpoint"]).labels == ["score"]


@pytest.mark.parametrize("task", ["dpo", "ipo", "kto", "orpo", "simpo"])
def test_preference_objectives_improve_on_their_pairs(base, tmp_path, task):
    records = _pairs(120, 0)
    if task == "kto":  # unpaired: each answer with its own label
        records = [r for p in records for r in ({"prompt": p["prompt"], "completion": p["chosen"], "label": True},
                                                {"prompt": p["prompt"], "completion": p["rejected"],
                                                 "label": False})]
    data = _write(tmp_path / "data.jsonl", records)
    _, metrics = _run(base, tmp_path, task, data, max_steps=15, learning_rate=1e-3, beta=0.5 if task == "ipo"
                      else 0.1)
    val = _val(metrics)
    if task == "dpo":
        assert val[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the start
    assert val[-1] < val[0] - 0.05


def test_preference_training_runs_without_the_models_dropout(base, tmp_path):
    """As TRL's disable_dropout: under a checkpoint with dropout 0.1 (GPT-2's), DPO's first training loss is
    exactly log 2 (the policy equals its reference, not dropout noise); the saved model keeps its rate."""
    tok = load_tokenizer(base)
    torch.manual_seed(0)
    noisy = tmp_path / "noisy"
    save_model(build_model(ModelConfig.from_name("tiny-llama", vocab_size=len(tok), block_size=64, dropout=0.1)),
               noisy, tokenizer=tok)
    data = _write(tmp_path / "pairs.jsonl", _pairs(40, 0))
    summary, metrics = _run(noisy, tmp_path, "dpo", data, max_steps=1, learning_rate=1e-9, min_lr=0.0,
                            warmup_steps=0)
    assert [r["loss"] for r in metrics if "loss" in r][0] == pytest.approx(math.log(2), abs=1e-6)
    assert load_model(summary["checkpoint"]).config.dropout == 0.1


def test_kto_weights_scale_its_loss(base, tmp_path):
    """kto_desirable_weight / kto_undesirable_weight reach the loss: both doubled, the first step's loss
    (same batch, same weights) doubles."""
    records = [r for p in _pairs(40, 0) for r in ({"prompt": p["prompt"], "completion": p["chosen"], "label": True},
                                                 {"prompt": p["prompt"], "completion": p["rejected"], "label": False})]
    data = _write(tmp_path / "kto.jsonl", records)
    first = [next(r["loss"] for r in _run(base, tmp_path / str(w), "kto", data, max_steps=1,
                                          kto_desirable_weight=w, kto_undesirable_weight=w)[1] if "loss" in r)
             for w in (1.0, 2.0)]
    assert first[1] == pytest.approx(2 * first[0], rel=1e-5)


def test_kto_reference_point_is_averaged_over_processes(base, tmp_path, monkeypatch):
    """KTO's KL reference point goes through mean_over_processes (TRL gathers it over processes): what that
    returns is the point the loss uses and the `kl` logged."""
    from lmstack.train import tasks

    records = [{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in _pairs(20, 0)]
    data = _write(tmp_path / "kto.jsonl", records)
    seen = []

    def other_ranks(value, weight):
        seen.append((value.item(), weight))
        return torch.full_like(value, 0.25)

    monkeypatch.setattr(tasks, "mean_over_processes", other_ranks)
    _, metrics = _run(base, tmp_path, "kto", data, max_steps=1, eval_interval=100)
    assert seen and [r["kl"] for r in metrics if "kl" in r and "loss" in r] == [pytest.approx(0.25)]
    monkeypatch.undo()
    assert torch.equal(tasks.mean_over_processes(torch.tensor(0.7)), torch.tensor(0.7))  # one process: itself


def _mean_over_two(rank, init_file, out_dir):
    import torch.distributed as dist

    from lmstack.train.tasks import mean_over_processes

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        value = torch.tensor([1.0, 5.0][rank])
        results = [mean_over_processes(value).item(), mean_over_processes(value, [1.0, 0.0][rank]).item()]
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def test_mean_over_processes_on_two_gloo_processes(tmp_path):
    """The mean of each process's value; a placeholder (weight 0) counts for nothing."""
    import torch.multiprocessing as mp

    mp.spawn(_mean_over_two, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [[3.0, 1.0]] * 2


@pytest.mark.parametrize("distributed", ["fsdp", "ddp"])
def test_dpo_with_two_processes_matches_one(base, tmp_path, distributed):
    """Over two gloo processes, DDP, or FSDP with policy and frozen reference both sharded: the losses of one
    process with the same global batch, within 1e-5 (the policy's tokens are scored through its output head
    outside the wrapped forward, which both wrappers must see)."""
    import os
    import subprocess
    import sys

    data = _write(tmp_path / "pairs.jsonl", _pairs(80, 0))
    settings = dict(max_steps=4, eval_interval=2, learning_rate=1e-3)
    _, one = _run(base, tmp_path / "one", "dpo", data, batch_size=4, **settings)
    args = ["finetune", "dpo", "--model", str(base), "--data", str(data), "--out_dir", str(tmp_path / "two"),
            "--batch_size", "2", "--distributed", distributed, "--block_size", "64", "--learning_rate", "1e-3",
            "--min_lr", "3e-4", "--warmup_steps", "2", "--max_steps", "4", "--eval_interval", "2",
            "--eval_batches", "4", "--log_interval", "1", "--checkpoint_interval", "100", "--progress", "false",
            "--weight_decay", "0.0", "--val_fraction", "0.1", "--precision", "fp32", "--device", "cpu"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                           "lmstack.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    two = read_metrics(tmp_path / "two")
    losses = [(r["step"], r["loss"]) for r in one if "loss" in r], [(r["step"], r["loss"]) for r in two if "loss" in r]
    assert [s for s, _ in losses[0]] == [s for s, _ in losses[1]] == [0, 1, 2, 3]
    assert max(abs(a - b) for (_, a), (_, b) in zip(*losses)) < 1e-5
    assert _val(one) == pytest.approx(_val(two), abs=1e-5)


def test_dora_sft_on_gpt2_fused_attention_resumes_exactly(gpt2_base, tmp_path):
    """GPT-2's checkpoints fuse q, k and v into c_attn: the DoRA adapters on q and v are saved as one on c_attn
    and read back apart on resume, magnitudes included, so the resumed run logs the same losses, and the
    adapter loads merged."""
    data = _write(tmp_path / "chat.jsonl", _chats(100))
    settings = dict(lora_r=4, lora_alpha=8, lora_targets=["q", "v", "up"], lora_dora=True, max_steps=6,
                    checkpoint_interval=3, eval_interval=3)
    _resumes_exactly(gpt2_base, tmp_path, data, settings)
    ckpt = tmp_path / "a" / "sft" / "checkpoints" / "step-0000006"
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["target_modules"] == ["c_attn", "c_fc"] and config["rank_pattern"] == {
        f"h.{i}.attn.c_attn": 8 for i in range(2)} and config["use_dora"] is True
    ids = torch.tensor([[5, 17, 42, 9, 77]])
    with torch.no_grad():
        assert not torch.allclose(load_model(ckpt)(ids), load_model(gpt2_base)(ids), atol=1e-4)


def test_lora_on_experts_is_refused_before_training(base, tmp_path):
    tok = load_tokenizer(base)
    save_model(build_model(ModelConfig.from_name("tiny-mixtral", vocab_size=len(tok), block_size=64)),
               tmp_path / "moe", tokenizer=tok)
    data = _write(tmp_path / "chat.jsonl", _chats(20))
    with pytest.raises(LMStackError, match=r"experts of a mixture-of-experts model .*target the attention"):
        _run(tmp_path / "moe", tmp_path, "sft", data, lora_r=4, lora_targets=["q", "down"])
    assert not (tmp_path / "sft" / "checkpoints").exists()


def test_dpo_under_lora_uses_the_base_as_reference(base, tmp_path):
    data = _write(tmp_path / "pairs.jsonl", _pairs(80, 0))
    _, metrics = _run(base, tmp_path, "dpo", data, max_steps=20, lora_r=4, learning_rate=1e-2)
    val = _val(metrics)
    assert val[0] == pytest.approx(math.log(2), abs=1e-6) and val[-1] < val[0] - 0.05
    margins = _val(metrics, "val_margin")
    assert margins[0] == 0 and margins[-1] > 0


def test_grpo_raises_a_verifiable_reward(base, tmp_path):
    reward = tmp_path / "reward.py"
    reward.write_text("def reward(prompt, completion, record):\n"
                      "    return completion.count(record['letter']) / max(1, len(completion))\n")
    rng = random.Random(0)
    data = _write(tmp_path / "prompts.jsonl", [{"prompt": _sentence(rng, 3), "letter": "o"} for _ in range(64)])
    summary, metrics = _run(base, tmp_path, "grpo", data, reward_function=f"{reward}:reward", group_size=8,
                            max_new_tokens=8, batch_size=4, max_steps=30, learning_rate=1e-2, beta=0.01,
                            eval_interval=15, val_fraction=0.25)
    rewards = _val(metrics, "val_reward")
    assert rewards[-1] > rewards[0] + 0.2
    # The run is judged by its reward (its loss is centred on zero by construction), and says so.
    steps = [r["step"] for r in metrics if "val_reward" in r]
    assert summary["best"] == ("reward", max(rewards), steps[rewards.index(max(rewards))])
    line = summary_line(summary)
    assert line.startswith(f"done: 30 steps; validation reward {rewards[-1]:.4f} (best {max(rewards):.4f} at step ")
    assert "; kl " in line and ", loss " in line
    assert not any("tok_per_s" in r for r in metrics)  # its batches hold no token ids: no throughput figure


def test_grpo_scores_at_its_sampling_temperature_and_passes_chat_prompts_as_messages(base, tmp_path, monkeypatch):
    """At temperature T the policy gradient and the KL use log_softmax(logits / T), the distribution the
    completions were sampled from (as TRL); a chat prompt reaches the reward function as its messages."""
    from lmstack.train import tasks
    from lmstack.train.preference import token_logprobs

    logits = torch.tensor([[[2.0, 0.5, -1.0]]])
    model = lambda ids: logits  # noqa: E731
    assert token_logprobs(model, torch.zeros(1, 1, dtype=torch.long), torch.tensor([[1]]), 0.5).item() == \
        pytest.approx((logits / 0.5).log_softmax(-1)[0, 0, 1].item())
    temperatures = []
    monkeypatch.setattr(tasks, "token_logprobs", lambda m, i, la, t=1.0, head=None: (
        temperatures.append(t), token_logprobs(m, i, la, t, head=head))[1])
    reward = tmp_path / "reward.py"
    reward.write_text("def reward(prompt, completion, record):\n"
                      "    assert prompt == record['prompt'] and prompt[0]['role'] == 'user', prompt\n"
                      "    return float(len(completion))\n")
    rng = random.Random(0)
    data = _write(tmp_path / "prompts.jsonl", [{"prompt": [{"role": "user", "content": _sentence(rng, 3)}]}
                                               for _ in range(16)])
    # block_size is no GRPO setting (its rows are the prompts and samples): one past the context is no error
    _run(base, tmp_path, "grpo", data, reward_function=f"{reward}:reward", group_size=2, max_new_tokens=4,
         batch_size=2, max_steps=1, eval_interval=1, eval_batches=1, temperature=0.7, beta=0.1, block_size=256)
    assert temperatures and set(temperatures) == {0.7}  # the policy's and the reference's


def test_a_reward_function_that_cannot_score_is_named(base, tmp_path):
    """A reward function of the wrong signature is refused before training; one that fails or returns no
    number is named with the completion it was scoring."""
    from lmstack.checkpoints import load_tokenizer
    from lmstack.errors import LMStackError
    from lmstack.train.tasks import GRPOTask

    reward = tmp_path / "reward.py"
    reward.write_text("def two(prompt, completion):\n    return 1.0\n"
                      "def none(prompt, completion, record):\n    return None\n"
                      "def fails(prompt, completion, record):\n    return 1 / 0\n"
                      "def numpy(prompt, completion, record):\n    import numpy\n    return numpy.float32(0.5)\n")
    data = _write(tmp_path / "prompts.jsonl", [{"prompt": "a b"}, {"prompt": "c d"}])
    tok = load_tokenizer(base)

    def task(name):
        return GRPOTask(tok, 0, str(data), None, f"{reward}:{name}", group_size=2, beta=0.0, max_new_tokens=2,
                        temperature=1.0)

    with pytest.raises(LMStackError, match=r"reward function '.*:two' must take \(prompt, completion, record\)"):
        task("two")
    with pytest.raises(LMStackError, match=r"returned None for the completion 'xy': it must return a finite number"):
        task("none")._reward({"prompt": "a b"}, "xy")
    with pytest.raises(LMStackError, match=r"failed \(ZeroDivisionError: division by zero\) on the completion 'xy'"):
        task("fails")._reward({"prompt": "a b"}, "xy")
    assert task("numpy")._reward({"prompt": "a b"}, "xy") == 0.5


def test_qlora_sft_trains_adapters_on_an_nf4_base(base, tmp_path):
    from lmstack.quantize import NF4Linear

    data = _write(tmp_path / "chat.jsonl", _chats(100))
    summary, metrics = _run(base, tmp_path, "sft", data, lora_r=8, qlora=True, max_steps=20, learning_rate=1e-2)
    val = _val(metrics)
    assert val[-1] < val[0] - 0.3
    # The adapter is an ordinary PEFT adapter: it applies to the float base.
    merged = load_model(summary["checkpoint"])
    assert not any(isinstance(m, NF4Linear) for m in merged.modules())
    # The printed total counts the NF4 base's weights, which are buffers of codes: the float model's count.
    counts = next(r for r in metrics if "trainable_params" in r)
    assert counts["total_params"] == sum(p.numel() for p in merged.parameters()) + counts["trainable_params"]


def test_smollm2_lora_recipe_lowers_the_validation_loss(smollm2_gguf, tmp_path):
    """The real SmolLM2-135M-Instruct, LoRA on the bundled help conversations, a few steps on the CPU."""
    from lmstack.train.config import load_config

    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "recipes" / "smollm2-lora.yaml",
                      ["--model", str(smollm2_gguf), "--data", str(repo / "data" / "sft" / "lmstack-help.jsonl"),
                       "--out_dir", str(tmp_path / "run"), "--max_steps", "4", "--batch_size", "2",
                       "--block_size", "64", "--eval_interval", "4", "--eval_batches", "1", "--progress", "false",
                       "--lora_targets", "[q, v]", "--learning_rate", "2e-3", "--warmup_steps", "0"])
    summary = train(cfg)
    val = _val(read_metrics(tmp_path / "run"))
    assert val[-1] < val[0] - 0.2
    assert (__import__("pathlib").Path(summary["checkpoint"]) / "adapter_model.safetensors").exists()


def test_sft_on_two_processes_matches_one(base, tmp_path):
    """Examples of different lengths: the step's loss is the mean over every trained token of the global
    batch, so 2 processes x 2 rows train exactly like 1 process x 4 rows (and like 2 accumulated micro-batches)."""
    import os
    import subprocess
    import sys

    data = _write(tmp_path / "chat.jsonl", _chats(64))
    args = ["finetune", "sft", "--model", str(base), "--data", str(data), "--max_steps", "4", "--eval_interval",
            "2", "--eval_batches", "2", "--log_interval", "1", "--warmup_steps", "1", "--progress", "false",
            "--block_size", "64", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"one": ["--batch_size", "4"], "accum": ["--batch_size", "2", "--grad_accum", "2"]}
    for name, extra in runs.items():
        r = subprocess.run([sys.executable, "-m", "lmstack.cli", *args, *extra, "--out_dir", str(tmp_path / name)],
                           capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                          "lmstack.cli", *args, "--batch_size", "2", "--out_dir", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    losses = {name: [r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r]
              for name in ("one", "accum", "two")}
    assert len(losses["one"]) == 4
    for name in ("accum", "two"):
        assert max(abs(a - b) for a, b in zip(losses["one"], losses[name])) < 1e-5


def test_lora_classifier_checkpoint_loads_with_its_head(base, tmp_path):
    train_file = _write(tmp_path / "train.jsonl", _sentiment(300, 0))
    summary, _ = _run(base, tmp_path, "classify", train_file, max_steps=60, lora_r=8, lora_targets=["q", "v"])
    model = load_model(summary["checkpoint"])  # adapters merged into the base, plus the trained head
    assert isinstance(model, SequenceClassifier) and model.labels == ["negative", "positive"]
    from lmstack.checkpoints import load_tokenizer

    records = _sentiment(60, 1)
    predicted = predict_labels(model, load_tokenizer(summary["checkpoint"]), [r["text"] for r in records])
    assert sum(p == r["label"] for p, r in zip(predicted, records)) / len(records) >= 0.85
    # ... and it is a PEFT SEQ_CLS adapter: peft puts it on transformers' classifier of the base, same logits
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, pad_token_id=model.pad_token_id)
    theirs = PeftModel.from_pretrained(hf, summary["checkpoint"]).eval()
    ids = torch.tensor([load_tokenizer(summary["checkpoint"]).encode(records[0]["text"])])
    with torch.no_grad():
        assert (theirs(ids).logits - model(ids)).abs().max() < 1e-4


def test_reference_under_lora_is_deterministic_and_adapter_free(base):
    from lmstack.train.lora import apply_lora
    from lmstack.train.tasks import Task, reference_token_logprobs

    model = load_model(base, dtype=torch.float32)
    for m in model.modules():  # a model that trains with dropout
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    plain = load_model(base, dtype=torch.float32).eval()
    apply_lora(model, r=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.1)  # adapters that change the output
    model.train()
    task = Task(tokenizer=None, seed=0)
    task.policy = task.reference = model
    ids = torch.tensor([[5, 17, 42, 9, 77, 3]])
    labels = torch.tensor([[17, 42, 9, 77, 3, -100]])
    first, second = reference_token_logprobs(task, ids, labels), reference_token_logprobs(task, ids, labels)
    assert torch.equal(first, second) and model.training  # no dropout in the reference; mode restored
    from lmstack.train.preference import token_logprobs

    with torch.no_grad():
        assert torch.allclose(first, token_logprobs(plain, ids, labels), atol=1e-5)


def test_bad_finetuning_settings_are_named(base, tmp_path):
    from lmstack.errors import LMStackError

    with pytest.raises(LMStackError, match="group_size must be >= 2"):
        load_config(None, ["--task", "grpo", "--group_size", "1"])
    data = _write(tmp_path / "kto.jsonl", [{"prompt": "a", "completion": "b", "label": "false"}])
    with pytest.raises(LMStackError, match=r"kto.jsonl:1: a KTO 'label' is true"):
        _run(base, tmp_path, "kto", data)
    sft = _write(tmp_path / "sft.jsonl", _chats(10))
    with pytest.raises(LMStackError, match="model_overrides"):
        _run(base, tmp_path, "sft", sft, **{"model.dropout": 0.1})


def test_recipe_list_items_take_the_item_type(base, tmp_path):
    from lmstack.checkpoints import load_tokenizer
    from lmstack.errors import LMStackError
    from lmstack.train.tasks import ClassifyTask

    # Integer class labels in YAML (and in the data) are the labels "0" and "1", as read_classification compares.
    data = _write(tmp_path / "digits.jsonl", [{"text": f"the cat {i}", "label": i % 2} for i in range(20)])
    recipe = tmp_path / "classify.yaml"
    recipe.write_text("task: classify\nlabels: [0, 1]\n")
    cfg = load_config(recipe)
    assert cfg.labels == ["0", "1"]
    assert load_config(None, ["--labels", "[0, 1]"]).labels == ["0", "1"]
    assert load_config(None, ["--labels", "neg, pos"]).labels == ["neg", "pos"]  # as eval classify takes them
    task = ClassifyTask(load_tokenizer(base), 0, str(data), None, 64, cfg.labels, val_fraction=0.1)
    assert task.labels == ["0", "1"] and len(task.data["train"]) + len(task.data["val"]) == 20
    recipe.write_text("labels: [negative, [positive]]\n")
    with pytest.raises(LMStackError, match=r"labels\[1\]: expected a string, got \['positive'\]"):
        load_config(recipe)
    with pytest.raises(LMStackError, match=r"sample_prompts\[0\]: expected a string, got None"):
        load_config(None, ["--sample_prompts", "[null]"])


def test_val_fraction_zero_validates_on_the_training_records(capsys):
    from lmstack.train.tasks import _split_val

    items = list(range(10))
    assert _split_val(items, 0.2, None) == (items[:8], items[8:])
    assert _split_val(items, 0.01, None) == (items[:9], items[9:])  # at least one held out
    assert _split_val(items, 0.0, None) == (items, items)
    assert "note: val_fraction is 0: validation scores the training records" in capsys.readouterr().err
    assert _split_val(items, 0.0, [42]) == (items, [42])
