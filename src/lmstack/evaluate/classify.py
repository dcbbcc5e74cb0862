"""Classifying texts with a model: a classification head, or generation constrained to the label set.

`predict_labels` takes either a `SequenceClassifier` (the argmax of its head on the last token) or a
language model, which is prompted (`prompt` with `{text}` filled in) and decodes greedily under a choice
constraint, so its answer is always exactly one of the labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmstack.data.finetune import pad_right
from lmstack.errors import LMStackError
from lmstack.models.classifier import SequenceClassifier
from lmstack.onednn import onednn_linears
from lmstack.tokenizer import Tokenizer

DEFAULT_PROMPT = "{text}\nLabel: "


def predict_labels(model: torch.nn.Module, tokenizer: Tokenizer, texts: Sequence[str],
                   labels: Sequence[str] | None = None, prompt: str = DEFAULT_PROMPT, batch_size: int = 16,
                   chat: bool = False) -> list[str]:
    """The predicted label of each text. `labels` is required for a language model (the choices) and, for a
    classifier, must match its own label names when given. With `chat`, the prompt goes through the chat
    template as a user turn."""
    if batch_size < 1:
        raise LMStackError(f"batch_size {batch_size}: must be >= 1")
    if isinstance(model, SequenceClassifier):
        if labels is not None and list(labels) != model.labels:
            raise LMStackError(f"the classifier's labels are {model.labels}, not {list(labels)}")
        return _head_predictions(model, tokenizer, texts, batch_size)
    if not labels:
        raise LMStackError("generative classification needs the label set (labels=...)")
    if "{text}" not in prompt:
        raise LMStackError("the prompt template must contain {text}")
    from lmstack.generate import Engine, SamplingParams

    prompts: list = [prompt.replace("{text}", t) for t in texts]
    if chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                   for p in prompts]
    longest = max(len(tokenizer.encode(label, add_special_tokens=False)) for label in labels)
    # A text longer than the context keeps its end (the question and the answer cue), as the head path does.
    params = SamplingParams(temperature=0, max_new_tokens=longest + 2, choice=list(labels), truncate_prompt=True)
    engine = Engine(model, tokenizer, max_batch_size=batch_size)
    return [c.text for c in engine.generate(prompts, params)]


def _head_predictions(model: SequenceClassifier, tokenizer: Tokenizer, texts: Sequence[str],
                      batch_size: int) -> list[str]:
    model.eval()
    device = model.score.weight.device
    block = model.config.block_size
    out: list[str] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(texts), batch_size):
        ids = [x[-block:] for x in tokenizer.encode_batch(list(texts[start:start + batch_size]))]
        batch, real = pad_right(ids, pad)
        with torch.no_grad(), onednn_linears():
            logits = model(batch.to(device), key_padding=real.to(device))
        out += [model.labels[i] for i in logits.argmax(-1).tolist()]
    return out
