"""What a run trains: each task supplies its data, how a batch is drawn and collated, and its loss.

The loop (`lmstack.train.loop`) owns everything else: devices, precision, DDP/FSDP, the optimizer and
schedule, checkpoints and exact resume, logging. A task's batches are a pure function of (seed, step), so a
resumed run sees what the uninterrupted one would have seen.

    pretrain   next-token loss on windows of a token-shard directory
    sft        next-token loss on the assistant / completion tokens of chat, instruction or prompt records
    classify   cross-entropy of a classification head on the last token ({"text", "label"} records)
    reward     Bradley-Terry loss of a scalar head on (prompt, chosen, rejected) pairs
    dpo, ipo, orpo, simpo   preference losses on (prompt, chosen, rejected) pairs
    kto        unpaired (prompt, completion, label) records
    grpo       group-relative policy optimisation with a user reward function over sampled completions
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import re
import sys
from collections.abc import Callable, Iterable
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmstack.data.finetune import (
    collate_packed,
    collate_padded,
    end_of_turn_id,
    load_sft_examples,
    pack_examples,
    pad_right,
    prompt_completion_ids,
    to_example,
)
from lmstack.data.readers import read_jsonl
from lmstack.errors import LMStackError
from lmstack.tokenizer import Tokenizer
from lmstack.train import preference
from lmstack.train.preference import token_logprobs

NEEDS_REFERENCE = ("dpo", "ipo", "kto", "grpo")


EVAL_STREAM = 2**31 - 1  # the generator stream of validation windows, apart from every training step's


def batch_offsets(seed: int, stream: int, count: int, data_len: int, block_size: int) -> np.ndarray:
    """`count` window starts for stream `stream` (a step, or a validation batch), reproducibly."""
    if data_len <= block_size:
        raise LMStackError(f"the data has {data_len} tokens, fewer than block_size + 1 = {block_size + 1}")
    rng = np.random.default_rng([seed, stream])
    return rng.integers(0, data_len - block_size, size=count)


def epoch_order(seed: int, stream: int, count: int, n: int) -> np.ndarray:
    """Items `stream * count ...` of an endless sequence of seeded shuffles of range(n): every item once per
    epoch, in an order fixed by the seed."""
    k = stream * count + np.arange(count)
    out = np.empty(count, dtype=np.int64)
    for epoch in np.unique(k // n):
        sel = k // n == epoch
        out[sel] = np.random.default_rng([seed, int(epoch)]).permutation(n)[k[sel] % n]
    return out


def _shuffled_split(items: list, seed: int, val_fraction: float, val_items: list | None) -> tuple[list, list]:
    """`_split_val` after a fixed shuffle, so neither the split nor the packing depends on the file's order."""
    order = np.random.default_rng([seed, 1]).permutation(len(items))
    return _split_val([items[i] for i in order], val_fraction, val_items)


def _split_val(items: list, val_fraction: float, val_items: list | None) -> tuple[list, list]:
    """Use the given validation items, or hold out the last `val_fraction` (at least one) of the training set;
    with `val_fraction` 0, or a single item, validation scores training items (and says so)."""
    if val_items is not None:
        return items, val_items
    if len(items) < 2 or val_fraction == 0:
        if os.environ.get("RANK", "0") == "0":
            why = "val_fraction is 0" if val_fraction == 0 else "there is a single record"
            print(f"note: {why}: validation scores the training records (give val_data for a held-out set)",
                  file=sys.stderr)
        return items, items
    n_val = max(1, int(round(len(items) * val_fraction)))
    return items[:-n_val], items[-n_val:]


class Task:
    """Base class: a dataset split into train and val, drawn as shuffled epochs."""

    name = "task"

    def __init__(self, tokenizer: Tokenizer, seed: int) -> None:
        self.tokenizer = tokenizer
        self.seed = seed
        self.data: dict[str, list[Any]] = {}
        # Set by the loop: the unwrapped model being trained, and the frozen reference for tasks that need
        # one (the policy itself under LoRA, with adapters switched off to get the base back).
        self.policy: torch.nn.Module | None = None
        self.reference: torch.nn.Module | None = None
        self.notes: list[str] = []  # what reading the data cut or left out, for the run to print

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def size(self, split: str) -> int:
        return len(self.data[split])

    def draw(self, split: str, stream: int, count: int) -> np.ndarray:
        """`count` item indices of batch `stream` (a training step, or an evaluation batch)."""
        return epoch_order(self.seed, stream, count, self.size(split))

    def eval_items(self, batch: int, count: int) -> np.ndarray:
        """Items of validation batch `batch`: the validation set in order, each item once (the last batch
        may be short)."""
        return np.arange(batch * count, min((batch + 1) * count, self.size("val")))

    def eval_batches(self, rows: int, limit: int) -> int:
        """How many validation batches of `rows` to run: enough to cover the set once, at most `limit`."""
        return min(limit, math.ceil(self.size("val") / rows))

    def collate(self, split: str, items: np.ndarray) -> dict[str, Any]:
        raise NotImplementedError

    def loss(self, model: Callable, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch's mean loss and metrics to log (scalars)."""
        raise NotImplementedError

    def weight(self, batch: dict[str, Any], items: np.ndarray) -> int:
        """How many things the micro-batch's mean loss averages over (its examples); the loop weighs
        micro-batches and processes by it, so a step's loss is the mean over the whole global batch."""
        return len(items)


# ---------------------------------------------------------------------------------------------- pretraining


class PretrainTask(Task):
    """Random windows of `block_size + 1` tokens from the shards."""

    name = "pretrain"

    def __init__(self, shards: Any, block_size: int, seed: int) -> None:
        super().__init__(shards.tokenizer(), seed)
        self.arrays = {"train": shards["train"], "val": shards["val"]}
        self.vocab_size = shards.meta["vocab_size"]
        self.block_size = block_size
        for split, array in self.arrays.items():
            if len(array) <= block_size:
                hint = " (prepare the data with a larger --val-fraction)" if split == "val" else ""
                raise LMStackError(f"the {split} split has {len(array)} tokens, fewer than block_size + 1 = "
                                   f"{block_size + 1}{hint}")

    def size(self, split: str) -> int:
        return len(self.arrays[split])

    def draw(self, split: str, stream: int, count: int) -> np.ndarray:
        return batch_offsets(self.seed, stream, count, len(self.arrays[split]), self.block_size)

    def eval_items(self, batch: int, count: int) -> np.ndarray:
        return self.draw("val", EVAL_STREAM + batch, count)

    def eval_batches(self, rows: int, limit: int) -> int:
        return limit

    def collate(self, split: str, items: np.ndarray) -> dict[str, Any]:
        data = self.arrays[split]
        rows = torch.from_numpy(np.stack([data[o:o + self.block_size + 1] for o in items]).astype(np.int64))
        return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}

    def weight(self, batch, items):  # every position of a window is a target
        return batch["labels"].numel()

    def loss(self, model, batch):
        _, loss = model(batch["input_ids"], batch["labels"], return_logits=False)
        return loss, {}


# ---------------------------------------------------------------------------------------------- SFT


def sft_notes(path: str, stats: dict[str, int], block_size: int) -> list[str]:
    """What `load_sft_examples` cut and left out of `path`, in words."""
    notes = []
    records = stats["records"]
    if stats["truncated"]:
        dropped = stats["dropped_by_cut"]
        notes.append(f"{stats['truncated']:,} of {records:,} records in {path} are longer than block_size "
                     f"{block_size}: cut to their first {block_size + 1} tokens"
                     + (f", and {dropped:,} of them left out (their answer lay past the cut)" if dropped else ""))
    unanswered = stats["empty"] - stats["dropped_by_cut"]
    if unanswered:
        notes.append(f"{unanswered:,} of {records:,} records in {path} have nothing to train on (an empty answer): "
                     "left out")
    return notes


class SFTTask(Task):
    """Supervised finetuning; with `packing`, examples share rows without attending across each other."""

    name = "sft"

    def __init__(self, tokenizer: Tokenizer, seed: int, data: str, val_data: str | None, block_size: int,
                 packing: bool, val_fraction: float = 0.05, chat_template: str | None = None) -> None:
        super().__init__(tokenizer, seed)
        train, self.stats = load_sft_examples(data, tokenizer, block_size, chat_template)
        self.notes += sft_notes(data, self.stats, block_size)
        val = None
        if val_data:
            val, val_stats = load_sft_examples(val_data, tokenizer, block_size, chat_template)
            self.notes += sft_notes(val_data, val_stats, block_size)
        train, val = _shuffled_split(train, seed, val_fraction, val)
        self.block_size, self.packing = block_size, packing
        self.data = {"train": pack_examples(train, block_size) if packing else train,
                     "val": pack_examples(val, block_size) if packing else val}

    def collate(self, split, items):
        rows = [self.data[split][i] for i in items]
        if self.packing:
            return collate_packed(rows, self.block_size, self.pad_id)
        return collate_padded(rows, self.pad_id)

    def weight(self, batch, items):  # token-level loss: each trained token counts once in the step
        return int((batch["labels"] != -100).sum())

    def loss(self, model, batch):
        extra = {k: batch[k] for k in ("position_ids", "document_ids") if k in batch}
        if getattr(getattr(self.policy, "config", None), "n_expert", 0):  # padding out of the router loss
            extra["token_mask"] = batch["token_mask"]
        _, loss = model(batch["input_ids"], batch["labels"], return_logits=False, **extra)
        return loss, {}


# ---------------------------------------------------------------------------------------------- classification


def read_classification(path: str, where_labels: list[str] | None = None
                        ) -> tuple[list[str], list[Any]]:
    """Texts and labels of {"text": ..., "label": ...} records (file:line errors)."""
    texts, labels = [], []
    for lineno, record in read_jsonl(path):
        if "text" not in record or "label" not in record:
            raise LMStackError(f"{path}:{lineno}: a classification record needs 'text' and 'label'")
        if where_labels is not None and str(record["label"]) not in where_labels:
            raise LMStackError(f"{path}:{lineno}: label {record['label']!r} is not one of {where_labels}")
        texts.append(str(record["text"]))
        labels.append(str(record["label"]))
    if not texts:
        raise LMStackError(f"{path}: no records")
    return texts, labels


def label_order(names: Iterable[str]) -> list[str]:
    """The label set in id order: numerically when every label is an integer (0, 1, ..., 10, 11, as their
    ids then equal them), else sorted."""
    names = list(names)
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


class ClassifyTask(Task):
    """A head on the last token; the label set comes from the config or the training data (`label_order`)."""

    name = "classify"

    def __init__(self, tokenizer: Tokenizer, seed: int, data: str, val_data: str | None, block_size: int,
                 labels: list[str] | None, val_fraction: float = 0.05) -> None:
        super().__init__(tokenizer, seed)
        texts, names = read_classification(data, labels)
        self.labels = labels or label_order(set(names))
        if len(self.labels) < 2:
            raise LMStackError(f"{data}: classification needs at least two labels, the "
                               f"{'labels setting gives' if labels else 'data has'} only {self.labels}")
        index = {name: i for i, name in enumerate(self.labels)}

        def encode(texts: list[str], names: list[str]) -> list[tuple[list[int], int]]:
            ids = tokenizer.encode_batch(texts, add_special_tokens=True)
            return [(x[-block_size:], index[n]) for x, n in zip(ids, names)]

        train = encode(texts, names)
        val = encode(*read_classification(val_data, self.labels)) if val_data else None
        train, val = _shuffled_split(train, seed, val_fraction, val)
        self.data = {"train": train, "val": val}

    def collate(self, split, items):
        rows = [self.data[split][i] for i in items]
        ids, real = pad_right([r[0] for r in rows], self.pad_id)
        return {"input_ids": ids, "key_padding": real, "labels": torch.tensor([r[1] for r in rows])}

    def loss(self, model, batch):
        logits, loss = model(batch["input_ids"], key_padding=batch["key_padding"], labels=batch["labels"])
        return loss, {"accuracy": (logits.argmax(-1) == batch["labels"]).float().mean()}


# ---------------------------------------------------------------------------------------------- preferences


def _prompt_completion(tokenizer: Tokenizer, prompt: Any, completion: Any, where: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids): the completion is everything from the first trained token on."""
    if not isinstance(prompt, (str, list)) or not isinstance(completion, str):
        raise LMStackError(f"{where}: 'prompt' must be text or a list of messages and the completion text")
    ids, trained = prompt_completion_ids(tokenizer, prompt, completion, where)
    k = trained.index(True)
    end = len(trained) - trained[::-1].index(True)  # what the template adds after the turn is not the answer
    return ids[:k], ids[k:end]


def _completion_batch(pairs: list[tuple[list[int], list[int]]], block_size: int, pad_id: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt + completion rows, labels (shifted) on the completion only; the prompt is cut
    from the left when a row is too long."""
    examples = []
    for prompt, completion in pairs:
        ids = (prompt + completion)[-(block_size + 1):]
        n_completion = min(len(completion), len(ids) - 1)
        examples.append(to_example(ids, [False] * (len(ids) - n_completion) + [True] * n_completion))
    batch = collate_padded(examples, pad_id)
    return batch["input_ids"], batch["labels"]


class PreferenceTask(Task):
    """(prompt, chosen, rejected) pairs for the reward model and the DPO family; KTO reads unpaired
    (prompt, completion, label) records."""

    def __init__(self, name: str, tokenizer: Tokenizer, seed: int, data: str, val_data: str | None,
                 block_size: int, beta: float, val_fraction: float = 0.05, **options: float) -> None:
        super().__init__(tokenizer, seed)
        self.name, self.block_size, self.beta, self.options = name, block_size, beta, options
        train, val = _shuffled_split(self._read(data), seed, val_fraction,
                                     self._read(val_data) if val_data else None)
        self.data = {"train": train, "val": val}

    def _note_cuts(self, path: str, records: list[tuple]) -> None:
        """Count the records whose rows `collate` will cut (prompt first, from the left, as TRL's keep_end)."""
        room = self.block_size + (self.name != "reward")  # a completion row holds block_size + 1 tokens
        completions = [1] if self.name == "kto" else [1, 2]
        cut = sum(any(len(r[0]) + len(r[i]) > room for i in completions) for r in records)
        if cut:
            self.notes.append(f"{cut:,} of {len(records):,} records in {path} are longer than block_size "
                              f"{self.block_size}: their prompts are cut from the left")

    def _read(self, path: str) -> list[tuple]:
        records = []
        for lineno, r in read_jsonl(path):
            where = f"{path}:{lineno}"
            if self.name == "kto":
                if not {"prompt", "completion", "label"} <= set(r):
                    raise LMStackError(f"{where}: a KTO record needs 'prompt', 'completion' and 'label'")
                if not isinstance(r["label"], bool):
                    raise LMStackError(f"{where}: a KTO 'label' is true (desirable) or false, got {r['label']!r}")
                records.append((*_prompt_completion(self.tokenizer, r["prompt"], r["completion"], where),
                                r["label"]))
            else:
                if not {"prompt", "chosen", "rejected"} <= set(r):
                    raise LMStackError(f"{where}: a preference record needs 'prompt', 'chosen' and 'rejected'")
                prompt, chosen = _prompt_completion(self.tokenizer, r["prompt"], r["chosen"], where)
                records.append((prompt, chosen, _prompt_completion(self.tokenizer, r["prompt"], r["rejected"],
                                                                   where)[1]))
        if not records:
            raise LMStackError(f"{path}: no records")
        self._note_cuts(path, records)
        return records

    def collate(self, split, items):
        rows = [self.data[split][i] for i in items]
        if self.name == "kto":
            # The KL reference point: each prompt with the next row's completion (mismatched pairs, as in
            # the KTO paper), scored without gradient.
            pairs = [(p, c) for p, c, _ in rows]
            mismatched = [(rows[i][0], rows[(i + 1) % len(rows)][1]) for i in range(len(rows))]
            ids, labels = _completion_batch(pairs + mismatched, self.block_size, self.pad_id)
            return {"input_ids": ids, "labels": labels, "desirable": torch.tensor([r[2] for r in rows])}
        pairs = [(p, c) for p, c, _ in rows] + [(p, r) for p, _, r in rows]
        if self.name == "reward":
            # The head reads the whole text, but pools as transformers does (see last_token_index): not a
            # closing token equal to the pad id (pad = eos = <|im_end|> ends every answer), so the exported
            # model scores the same there.
            ids, real = pad_right([(p + c)[-self.block_size:] for p, c in pairs], self.pad_id)
            return {"input_ids": ids, "key_padding": real}
        ids, labels = _completion_batch(pairs, self.block_size, self.pad_id)
        return {"input_ids": ids, "labels": labels}

    def _reference_logprobs(self, batch) -> torch.Tensor:
        return reference_token_logprobs(self, batch["input_ids"], batch["labels"]).sum(-1)

    def loss(self, model, batch):
        if self.name == "reward":
            scores = model(batch["input_ids"], key_padding=batch["key_padding"]).squeeze(-1)
            chosen, rejected = scores.chunk(2)
            return preference.bradley_terry_loss(chosen, rejected), {"accuracy": (chosen > rejected).float().mean()}
        ids, labels = batch["input_ids"], batch["labels"]
        total, mean = preference.sequence_logprobs(model, ids, labels, head=getattr(self.policy, "lm_head", None))
        if self.name == "kto":
            n = len(batch["desirable"])
            ref = self._reference_logprobs(batch)
            # The reference point over every process's rows, as TRL gathers it (each micro-batch its own)
            kl = (total[n:] - ref[n:]).detach().mean()
            kl = mean_over_processes(kl, 0.0 if batch.get("placeholder") else 1.0).clamp(min=0)
            return preference.kto_loss(total[:n], ref[:n], batch["desirable"].to(total.device), kl, self.beta,
                                       **self.options), {"kl": kl}
        chosen, rejected = total.chunk(2)
        chosen_mean, rejected_mean = mean.chunk(2)
        if self.name == "orpo":  # the SFT term is the chosen answers' per-token NLL
            loss = preference.orpo_loss(chosen_mean, rejected_mean, -chosen_mean, lam=self.beta)
            return loss, {"accuracy": (chosen_mean > rejected_mean).float().mean()}
        if self.name == "simpo":
            loss = preference.simpo_loss(chosen_mean, rejected_mean, beta=self.beta, **self.options)
            return loss, {"accuracy": (chosen_mean > rejected_mean).float().mean()}
        ref_chosen, ref_rejected = self._reference_logprobs(batch).chunk(2)
        if self.name == "ipo":  # IPO works on length-averaged log-probabilities
            n_tokens = (labels != -100).sum(-1).clamp(min=1)
            rc, rr = (ref_chosen / n_tokens.chunk(2)[0]), (ref_rejected / n_tokens.chunk(2)[1])
            loss = preference.ipo_loss(chosen_mean, rejected_mean, rc, rr, beta=self.beta)
            return loss, {"accuracy": ((chosen_mean - rc) > (rejected_mean - rr)).float().mean()}
        options = dict(self.options)
        rpo_alpha = options.pop("rpo_alpha", 0.0)
        loss, metrics = preference.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=self.beta, **options)
        if rpo_alpha:  # RPO (Pang et al. 2024): keep the chosen answers likely while separating the pairs
            loss = loss - rpo_alpha * chosen_mean.mean()
        return loss, metrics


def mean_over_processes(value: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """`value` averaged over the processes of a distributed run, each counted `weight` times (0 for a
    placeholder batch of a process with no rows left); itself in a single process. A sum, not ReduceOp.AVG,
    which older gloo builds lack."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    both = torch.stack([value.float() * weight, value.new_tensor(weight, dtype=torch.float32)])
    dist.all_reduce(both)
    return (both[0] / both[1].clamp(min=1e-12)).to(value.dtype)


def reference_token_logprobs(task: Task, ids: torch.Tensor, labels: torch.Tensor,
                             temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probabilities under the task's reference model, without gradient."""
    from lmstack.train.lora import set_adapters_enabled

    if task.reference is None:
        raise LMStackError(f"{task.name} needs a reference model")
    with torch.no_grad():
        if task.reference is not task.policy:
            return token_logprobs(task.reference, ids, labels, temperature,
                                  head=getattr(task.reference, "lm_head", None))
        # The base is the policy with its adapters off, and in eval mode: a reference is deterministic.
        was_training = task.policy.training
        set_adapters_enabled(task.policy, False)
        task.policy.eval()
        try:
            return token_logprobs(task.policy, ids, labels, temperature, head=getattr(task.policy, "lm_head", None))
        finally:
            set_adapters_enabled(task.policy, True)
            task.policy.train(was_training)


# ---------------------------------------------------------------------------------------------- GRPO


def load_reward_function(spec: str) -> Callable[..., float]:
    """`path/to/file.py:function` or `package.module:function`; called as fn(prompt, completion, record)."""
    if ":" not in spec:
        raise LMStackError(f"reward function {spec!r}: expected 'file.py:function' or 'module:function'")
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py") and not Path(target).exists():
        raise LMStackError(f"reward function file {target} does not exist")
    try:
        if target.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except Exception as e:  # the user's code: whatever it raises, say where it came from
        raise LMStackError(f"reward function {spec!r}: importing {target} failed ({type(e).__name__}: {e})") \
            from None
    if not hasattr(module, name):
        raise LMStackError(f"reward function {spec!r}: {target} has no {name!r}")
    return getattr(module, name)


class GRPOTask(Task):
    """GRPO (Shao et al. 2024): sample a group of completions per prompt with the current policy, score them
    with the reward function, and push up the log-probability of those better than their group's mean.

    One policy update per sampled batch, so the importance ratio is 1 (its gradient still flows through
    exp(logp - logp.detach())); the KL to the reference is the k3 estimator exp(d) - d - 1, d = ref - logp.
    """

    name = "grpo"

    def __init__(self, tokenizer: Tokenizer, seed: int, data: str, val_data: str | None, reward: str | Callable,
                 group_size: int, beta: float, max_new_tokens: int, temperature: float,
                 val_fraction: float = 0.05) -> None:
        super().__init__(tokenizer, seed)
        self.reward = load_reward_function(reward) if isinstance(reward, str) else reward
        self.reward_name = reward if isinstance(reward, str) else getattr(reward, "__name__", repr(reward))
        try:
            inspect.signature(self.reward).bind("prompt", "completion", {})
        except TypeError as e:
            raise LMStackError(f"reward function {self.reward_name!r} must take (prompt, completion, record): "
                               f"{e}") from None
        except ValueError:  # a builtin without a signature: called as it is
            pass
        self.group_size, self.beta = group_size, beta
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        train = self._read(data)
        train, val = _split_val(train, val_fraction, self._read(val_data) if val_data else None)
        self.data = {"train": train, "val": val}
        # Chat prompts end their answer at the template's end of turn, which may not be the eos token.
        chat = any(isinstance(r["prompt"], list) for r in train + val)
        self.turn_end = end_of_turn_id(tokenizer) if chat else None

    def _read(self, path: str) -> list[dict[str, Any]]:
        records = []
        for lineno, r in read_jsonl(path):
            if "prompt" not in r:
                raise LMStackError(f"{path}:{lineno}: a GRPO record needs a 'prompt'")
            records.append(r)
        if not records:
            raise LMStackError(f"{path}: no records")
        return records

    def prompt_ids(self, record: dict[str, Any]) -> list[int]:
        prompt = record["prompt"]
        if isinstance(prompt, list):
            return self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def collate(self, split, items):
        seed = int(np.random.default_rng([self.seed, *map(int, items)]).integers(2**31))
        return {"records": [self.data[split][i] for i in items], "seed": seed}

    def sample(self, records: list[dict[str, Any]], seed: int) -> tuple[list[list[int]], list[Any], torch.Tensor]:
        """Sampled completions (ids, completions) and their rewards, group by group."""
        from lmstack.generate import Engine, SamplingParams

        model = self.policy
        was_training = model.training
        engine = Engine(model, self.tokenizer, max_batch_size=len(records) * self.group_size)
        prompts = [self.prompt_ids(r) for r in records]
        params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                n=self.group_size,
                                stop_token_ids=[self.turn_end] if self.turn_end is not None else [])
        # One seed per prompt: each of the batch's rows draws its own noise, even for a prompt drawn twice.
        completions = engine.generate(prompts, params, seeds=[seed + i * self.group_size for i in range(len(prompts))])
        model.clear_kv_cache()
        model.train(was_training)
        rewards = []
        for i, c in enumerate(completions):
            record = records[i // self.group_size]
            # the prompt as the record has it: text, or a list of chat messages (as TRL passes them)
            rewards.append(self._reward(record, c.text))
        return prompts, completions, torch.tensor(rewards)

    def _reward(self, record: dict[str, Any], completion: str) -> float:
        """The reward function's number for one completion; what goes wrong in it is named as its."""
        try:
            value = self.reward(record["prompt"], completion, record)
        except Exception as e:  # the user's code: say whose it is (`--debug` shows the traceback)
            raise LMStackError(f"reward function {self.reward_name!r} failed ({type(e).__name__}: {e}) on the "
                               f"completion {completion[:60]!r}") from e
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise LMStackError(f"reward function {self.reward_name!r} returned {value!r} for the completion "
                               f"{completion[:60]!r}: it must return a finite number")
        return float(value)

    def loss(self, model, batch):
        prompts, completions, rewards = self.sample(batch["records"], batch["seed"])
        G = self.group_size
        grouped = rewards.view(-1, G)
        advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
        pairs = []
        for i, c in enumerate(completions):
            tail = list(c.token_ids)
            if c.stop_token_id is not None:
                tail.append(c.stop_token_id)  # the model chose to stop: that choice is trained too
            pairs.append((prompts[i // G], tail or [self.pad_id]))
        block = self.policy.config.block_size
        ids, labels = _completion_batch(pairs, block - 1, self.pad_id)
        device = next(self.policy.parameters()).device
        ids, labels, advantages = ids.to(device), labels.to(device), advantages.to(device)
        mask = labels != -100
        # Scored at the sampling temperature, as TRL does: the policy gradient is that of the distribution the
        # completions came from, and the KL is measured between those distributions.
        logp = token_logprobs(model, ids, labels, self.temperature, head=getattr(self.policy, "lm_head", None))
        ratio = torch.exp(logp - logp.detach())
        per_token = -ratio * advantages[:, None]
        metrics = {"reward": rewards.mean()}
        if self.beta:
            ref_logp = reference_token_logprobs(self, ids, labels, self.temperature)
            d = ref_logp - logp
            kl = torch.exp(d) - d - 1
            per_token = per_token + self.beta * kl
            metrics["kl"] = ((kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean().detach()
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
        return loss, metrics
