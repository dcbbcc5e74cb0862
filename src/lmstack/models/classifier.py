"""A sequence-classification (or reward) head on a decoder: Hugging Face's `XForSequenceClassification`.

The decoder reads the whole sequence; the hidden state of its last real token, which has seen every other
token, goes through one linear layer `score` to give a logit per class (one scalar for a reward model). The
checkpoint layout is Hugging Face's: the decoder's tensors under `model.*` (GPT-2: `transformer.*`) plus
`score.weight`, with `id2label` / `label2id` / `pad_token_id` in config.json. "Real" means Hugging Face's rule:
not the pad id (see `last_token_index`), so an exported model scores the same in transformers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.config import ModelConfig
from lmstack.errors import LMStackError
from lmstack.models.decoder import DecoderLM

# Hugging Face's sequence-classification class of each family (see hf.ARCHITECTURES for the causal LMs).
ARCHITECTURES = {
    "gpt2": "GPT2ForSequenceClassification",
    "llama": "LlamaForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "mixtral": "MixtralForSequenceClassification",
    "phi3": "Phi3ForSequenceClassification",
}


def _label_names(labels: Sequence[str] | int) -> list[str]:
    if isinstance(labels, int):
        if labels < 1:
            raise LMStackError(f"a classifier needs at least one label, got num_labels={labels}")
        return [f"LABEL_{i}" for i in range(labels)]  # Hugging Face's default names
    names = [str(x) for x in labels]
    if not names:
        raise LMStackError("a classifier needs at least one label; labels is empty")
    if len(set(names)) != len(names):
        dup = next(x for x in names if names.count(x) > 1)
        raise LMStackError(f"label {dup!r} is listed more than once")
    return names


def last_token_index(
    input_ids: torch.Tensor, key_padding: torch.Tensor | None = None, pad_token_id: int | None = None
) -> torch.Tensor:
    """The position each row is pooled at, [B]: its rightmost token that is not `pad_token_id` (and is real,
    True in `key_padding`, when that is given); without `pad_token_id`, the last real position by
    `key_padding`, else the last position.

    Hugging Face's `XForSequenceClassification` pools the rightmost token that is not `pad_token_id`, whatever
    the attention mask says. So a real token equal to the pad id is skipped there: with pad = eos
    (SmolLM2-Instruct's `<|im_end|>`, or GPT-2's `<|endoftext|>` set as pad) that is the eos or end of turn
    closing every reward-model input. Skipping it here too, in training and in scoring, makes lmstack's
    classifiers score in transformers (and TRL, which pools the same way) exactly as in lmstack. A pad id of
    our own that never collides would not do: transformers users pad with the tokenizer's pad token, so
    config.json must name that one.
    """
    B, T = input_ids.shape
    real = key_padding.bool() if key_padding is not None else None
    if pad_token_id is not None:
        not_pad = input_ids != pad_token_id
        real = not_pad if real is None else real & not_pad
    if real is None:
        return torch.full((B,), T - 1, dtype=torch.long, device=input_ids.device)
    positions = torch.arange(T, device=input_ids.device)
    return (positions * real).argmax(dim=-1)  # the largest such position (0 when a row has none, as in HF)


class SequenceClassifier(nn.Module):
    """A `DecoderLM` body with a linear `score` head on its last real token.

    `model(input_ids)` returns logits [B, num_labels]; `model(input_ids, labels=labels)` returns
    `(logits, loss)`: cross-entropy over class ids (-100 ignored) or, with one label (a scalar score, as in
    a reward model), mean squared error against float targets, as Hugging Face does. The body's LM head is
    dropped. `labels` are the class names in id order (an int n gives Hugging Face's LABEL_0..LABEL_{n-1});
    `pad_token_id` (default: the config's) is never pooled: the head reads the rightmost token that is not
    it, as Hugging Face does, among the real ones when `key_padding` is passed. `model` wraps an existing
    decoder instead of building a fresh one (see `from_decoder`).
    """

    def __init__(
        self, config: ModelConfig, labels: Sequence[str] | int, pad_token_id: int | None = None,
        model: DecoderLM | None = None,
    ) -> None:
        super().__init__()
        if config.arch != "transformer":
            raise LMStackError(f"a sequence classifier needs a transformer decoder, not arch={config.arch!r}")
        self.config = config
        self.model = model if model is not None else DecoderLM(config)
        self.model.lm_head = None  # unused: the score head replaces it (and a vocabulary-sized matrix goes)
        self.labels = _label_names(labels)
        self.pad_token_id = pad_token_id if pad_token_id is not None else config.pad_token_id
        weight = self.model.embed.weight
        self.score = nn.Linear(config.n_embd, len(self.labels), bias=False, device=weight.device,
                               dtype=weight.dtype)
        nn.init.normal_(self.score.weight, mean=0.0, std=config.init_std)

    @classmethod
    def from_decoder(
        cls, decoder: DecoderLM, labels: Sequence[str] | int, pad_token_id: int | None = None
    ) -> SequenceClassifier:
        """A fresh head (normal, std `init_std`) on a pretrained `decoder`, which becomes the body: its LM
        head is removed."""
        return cls(decoder.config, labels, pad_token_id, model=decoder)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def forward(
        self, input_ids: torch.Tensor, key_padding: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, num_labels] at each row's last real token (and the loss, given `labels` [B]).

        Right padding is the natural layout; with `key_padding` ([B, T], True = real token) a left-padded
        row gets positions counted from its first real token, so it scores as it would unpadded.
        """
        position_ids = None
        if key_padding is not None:
            key_padding = key_padding.bool()
            # Count positions over real tokens only; for right padding this is the plain 0..T-1 on them.
            position_ids = (key_padding.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.model(input_ids, key_padding=key_padding, position_ids=position_ids, return_hidden=True)
        last = last_token_index(input_ids, key_padding, self.pad_token_id)
        logits = self.score(hidden[torch.arange(hidden.size(0), device=hidden.device), last])
        if labels is None:
            return logits
        if self.num_labels == 1:
            loss = F.mse_loss(logits.float().squeeze(-1), labels.float().view(-1))
        else:
            loss = F.cross_entropy(logits.float(), labels.view(-1), ignore_index=-100)
        return logits, loss


# ---------------------------------------------------------------------------------------------- checkpoints


def save_classifier(
    model: SequenceClassifier, path: str | os.PathLike, tokenizer: Any = None, max_shard_size: int | str = "5GB"
) -> Path:
    """Write `model` as a Hugging Face sequence-classification directory (config.json with the labels and
    pad token, safetensors weights written atomically) that `AutoModelForSequenceClassification` loads."""
    # Imported here: lmstack.checkpoints imports lmstack.models, which imports this module.
    from lmstack.checkpoints.hf import family_of, hf_config_of, hf_state_dict, write_json, write_safetensors

    path = Path(path)
    hf_config = hf_config_of(model.model, tokenizer)  # checks first that the family can be written
    hf_config["architectures"] = [ARCHITECTURES[family_of(model.config)]]
    if model.pad_token_id is not None:
        hf_config["pad_token_id"] = model.pad_token_id
    hf_config.update(
        num_labels=model.num_labels,
        id2label={str(i): name for i, name in enumerate(model.labels)},
        label2id={name: i for i, name in enumerate(model.labels)},
    )
    state = hf_state_dict(model.model, lm_head=False)
    state["score.weight"] = model.score.weight.detach().contiguous().cpu()
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, state, max_shard_size)
    write_json(path / "config.json", hf_config)
    if tokenizer is not None:
        tokenizer.save(path)
    return path


def _labels_from_hf(hf: dict[str, Any], where: Path) -> list[str]:
    id2label = hf.get("id2label")
    if not id2label:
        return _label_names(int(hf.get("num_labels", 2)))  # 2: Hugging Face's default
    if not isinstance(id2label, dict):
        raise LMStackError(f"{where}/config.json: id2label must map label ids to names, got {id2label!r}")
    try:
        by_id = {int(i): name for i, name in id2label.items()}  # JSON keys are strings: "0", "1", ...
    except ValueError:
        raise LMStackError(f"{where}/config.json: id2label keys must be integers, got {list(id2label)}") from None
    if sorted(by_id) != list(range(len(by_id))):
        raise LMStackError(f"{where}/config.json: id2label must number the labels 0..{len(by_id) - 1}, "
                           f"got {sorted(by_id)}")
    if "num_labels" in hf and hf["num_labels"] != len(by_id):
        raise LMStackError(f"{where}/config.json: num_labels is {hf['num_labels']} but id2label has {len(by_id)}")
    return _label_names([by_id[i] for i in range(len(by_id))])


def load_classifier(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> SequenceClassifier:
    """Load a Hugging Face sequence-classification directory (written by `save_classifier` or by
    transformers' `save_pretrained`) into a `SequenceClassifier` in eval mode, checking every tensor's name
    and shape."""
    from lmstack.checkpoints.hf import (
        Rule,
        TensorSource,
        config_from_hf,
        convert_to_ours,
        read_hf_config,
        safetensors_files,
        weight_rules,
    )

    path = Path(path)
    hf = read_hf_config(path)
    config = config_from_hf(path)
    labels = _labels_from_hf(hf, path)
    source = TensorSource(safetensors_files(path))
    keys = source.keys()
    if "score.weight" not in source.where:
        raise LMStackError(f"{path}: no 'score.weight' tensor, so not a sequence classifier (architectures "
                           f"{hf.get('architectures')}); to put a new head on a language model use "
                           "SequenceClassifier.from_decoder(load_model(path), labels)")
    prefix = "transformer." if any(k.startswith("transformer.") for k in keys) else ""
    # The decoder's rules, moved under the classifier's `model.`, plus the head.
    rules = [Rule(r.hf, tuple(f"model.{o}" for o in r.ours), r.transpose)
             for r in weight_rules(config, gpt2_prefix=prefix, lm_head=False)]
    rules.append(Rule("score.weight", ("score.weight",)))
    with torch.device("meta"):  # no weights built twice: the loaded tensors are assigned in
        model = SequenceClassifier(config, labels, hf.get("pad_token_id"))
    expected = {k: v.shape for k, v in model.state_dict().items()}

    def convert(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device or "cpu", dtype=dtype or t.dtype)

    files = ", ".join(sorted({p.name for p in source.file_of.values()}))
    state = convert_to_ours(rules, expected, keys, source.get, f"{path} ({files})", convert,
                            file_of=source.file_of)
    model.load_state_dict(state, strict=True, assign=True)
    model.model.init_buffers(device or "cpu")
    return model.eval()


HEAD_FILE = "classifier_head.safetensors"  # a LoRA-trained classifier's head, beside its adapters
# Where PEFT keeps a sequence classifier's head in adapter_model.safetensors (task_type SEQ_CLS, the head a
# module saved whole): lmstack writes it there for PEFT and keeps its own copy, with the label names, in
# HEAD_FILE.
HEAD_KEY = "base_model.model.score.weight"


def save_head(model: SequenceClassifier, path: str | os.PathLike) -> Path:
    """Write the head of a classifier whose body is saved as LoRA adapters: `score.weight`, with the label
    names and pad id in the file's metadata."""
    from safetensors.torch import save_file

    out = Path(path) / HEAD_FILE
    save_file({"score.weight": model.score.weight.detach().cpu().contiguous()}, str(out),
              metadata={"labels": json.dumps(model.labels), "pad_token_id": json.dumps(model.pad_token_id)})
    return out


def read_head(path: str | os.PathLike) -> tuple[torch.Tensor, list[str], int | None]:
    """(score.weight, labels, pad_token_id) of the classifier adapter in directory `path`: from `save_head`'s
    file, or else (an adapter PEFT trained) from the head in adapter_model.safetensors, with Hugging Face's
    default label names and the base config's pad id (None here)."""
    from safetensors import safe_open

    path = Path(path)
    if (path / HEAD_FILE).exists():
        with safe_open(str(path / HEAD_FILE), framework="pt") as f:
            meta = f.metadata() or {}
            return (f.get_tensor("score.weight"), json.loads(meta["labels"]),
                    json.loads(meta.get("pad_token_id", "null")))
    adapter = path / "adapter_model.safetensors"
    with safe_open(str(adapter), framework="pt") as f:
        if HEAD_KEY not in set(f.keys()):  # a safe_open handle has no __contains__
            raise LMStackError(f"{path}: a SEQ_CLS adapter without its head (no {HEAD_FILE}, and no {HEAD_KEY} in "
                               f"{adapter.name})")
        weight = f.get_tensor(HEAD_KEY)
    return weight, _label_names(weight.shape[0]), None


def attach_head(decoder: DecoderLM, path: str | os.PathLike) -> SequenceClassifier:
    """The classifier made of `decoder` and the head saved in directory `path`."""
    weight, labels, pad = read_head(path)
    model = SequenceClassifier.from_decoder(decoder, labels, pad)
    if weight.shape != model.score.weight.shape:
        raise LMStackError(f"{Path(path)}: the classifier head score.weight has shape {list(weight.shape)}, the model "
                           f"needs {list(model.score.weight.shape)}")
    with torch.no_grad():
        model.score.weight.copy_(weight)
    return model
