"""Finetuning data: JSONL records rendered to token ids with loss masks, then packed or padded into batches.

An SFT record comes in one of three forms, told apart by its fields:

    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}
    {"instruction": ..., "input": ..., "output": ...}        (Alpaca; "input" may be empty or absent)
    {"prompt": ..., "completion": ...}

and the loss is taken on the assistant's tokens only (the output, the completion): every other label is -100.
An example is stored already shifted: `labels[t]` is the token that should follow `input_ids[t]`.

Chat records are rendered with the tokenizer's chat template. Assistant turns are found from the template's
`{% generation %}` blocks when it has them, otherwise by rendering the conversation one turn at a time (the
text a turn adds after the generation prompt is the assistant's). Each trained span is tokenized on its own,
so the prompt's tokens end exactly where they end at inference, when the model continues from them.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmstack.data.readers import read_jsonl
from lmstack.errors import LMStackError
from lmstack.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")

# The Stanford Alpaca prompts.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class Example:
    """One training sequence: `labels[t]` is the target after `input_ids[t]` (-100: no loss)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for an instruction, with the "### Input:" section only when there is an input."""
    if input:
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


# ------------------------------------------------------------------------------------------- rendering


def _encode_segments(tokenizer: Tokenizer, segments: Sequence[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """Tokenize the joined (text, trained) segments once, as inference sees the text, and flag each token
    that covers a character of a trained segment. (Tokenized one by one, the segments would come out
    differently: a SentencePiece tokenizer puts its "▁" prefix before each.)"""
    text = "".join(piece for piece, _ in segments)
    # trained[i]: how many trained characters come before character i; a token [a, b) covers one if that grows
    trained = [0, *itertools.accumulate(flag for piece, flag in segments for _ in piece)]
    ids, offsets = tokenizer.encode_with_offsets(text)
    return ids, [trained[b] > trained[a] for a, b in offsets]


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise LMStackError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise LMStackError(f"{where}: message {i} needs 'role' and 'content'")
        if not isinstance(m["content"], str):  # lists of parts (images, tool results) are not read
            raise LMStackError(f"{where}: message {i}: 'content' must be a string, got "
                               f"{type(m['content']).__name__}")
        if m["role"] not in ROLES:
            raise LMStackError(f"{where}: message {i} has unknown role {m['role']!r} (expected one of "
                               f"{', '.join(ROLES)})")


_ANSWER_PLACEHOLDER = "\x00lmstack-answer\x00"  # text no template writes by itself


def _render(tokenizer: Tokenizer, messages: list[dict[str, Any]], template: str | None, **kwargs: Any) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template, **kwargs)


def _render_part(tokenizer: Tokenizer, messages: list[dict[str, Any]], template: str | None,
                 **kwargs: Any) -> str | None:
    """The rendering of part of a conversation, or None where the template refuses it (raise_exception: a
    template that wants a user turn last, or roles alternating from the first)."""
    try:
        return _render(tokenizer, messages, template, **kwargs)
    except LMStackError:
        return None


def _spans_by_prefix(tokenizer: Tokenizer, messages: list[dict[str, Any]], template: str | None,
                     text: str) -> list[tuple[int, int]] | None:
    """Each assistant turn found by rendering the conversation up to it: from the end of the prompt before it
    to the end of its own turn (the template's end-of-turn text included). None where the template renders a
    turn differently once more turns follow, or will not render a part of the conversation."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        upto = _render_part(tokenizer, messages[:i + 1], template)
        if upto is None:
            return None
        if i:
            before = _render_part(tokenizer, messages[:i], template, add_generation_prompt=True)
            start = len(before) if before is not None and upto.startswith(before) else -1
        else:  # an opening answer: no prompt to render before it (a default system prompt may be), so the
            # answer starts where a placeholder put in its place does
            probe = _render_part(tokenizer, [{**m, "content": _ANSWER_PLACEHOLDER}], template) or ""
            start = probe.find(_ANSWER_PLACEHOLDER)
            start = start if start >= 0 and upto.startswith(probe[:start] + m["content"]) else -1
        if not text.startswith(upto) or start < 0:
            return None
        spans.append((start, len(upto.rstrip())))  # the turn's trailing newline is the template's
    return spans


def _spans_by_marker(tokenizer: Tokenizer, messages: list[dict[str, Any]], template: str | None,
                     text: str) -> list[tuple[int, int]] | None:
    """Each answer found where a marker put in its place lands in the whole conversation, up to the special
    token that closes it (ChatML's <|im_end|>, Phi-3's <|end|>, Llama 3's <|eot_id|>, ...), and from the end of
    the generation prompt before it where the conversation starts with that prompt (what the model writes
    after it at inference: Qwen3's empty thinking block too). For templates that render a turn differently
    once more turns follow: Qwen3 gives only the last answer the thinking block, Phi-3 ends the conversation
    with eos, Mistral moves the system prompt into the last user turn. None unless the conversation with the
    answers put back is exactly `text`."""
    marks = {i: f"\x00lmstack-answer-{i}\x00" for i, m in enumerate(messages) if m["role"] == "assistant"}
    probe = _render(tokenizer, [{**m, "content": marks[i]} if i in marks else m for i, m in enumerate(messages)],
                    template)
    closers = sorted((tokenizer.backend.id_to_token(i) for i in tokenizer.special_ids), key=len, reverse=True)
    spans, rebuilt, pos = [], "", 0
    for i, mark in marks.items():
        at = probe.find(mark, pos)
        if at < 0 or probe.count(mark) != 1:
            return None
        rebuilt += probe[pos:at]
        start = len(rebuilt)
        if i:
            before = _render_part(tokenizer, messages[:i], template, add_generation_prompt=True) or ""
            if spans[-1:] and len(before) < spans[-1][1]:
                before = ""  # it reaches into the answer before: not this turn's prompt
            if before and len(before) <= start and text.startswith(before):
                start = len(before)
        rebuilt += messages[i]["content"]
        pos = at + len(mark)
        closer = next((c for c in closers if c and probe.startswith(c, pos)), "")
        spans.append((start, len(rebuilt) + len(closer)))
    rebuilt += probe[pos:]
    return spans if rebuilt == text else None


def chat_segments(tokenizer: Tokenizer, messages: list[dict[str, Any]], where: str = "messages",
                  chat_template: str | None = None) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant) segments: by the template's {% generation %}
    blocks; else by rendering the conversation up to each answer; else, for templates that render earlier
    turns differently, by markers in the answers' place."""
    _check_messages(messages, where)
    template = chat_template or tokenizer.chat_template
    try:
        text, spans = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template,
                                                    return_assistant_spans=True)
        if not spans:
            spans = _spans_by_prefix(tokenizer, messages, template, text)
            if spans is None:
                spans = _spans_by_marker(tokenizer, messages, template, text)
            if spans is None:
                raise LMStackError(f"{where}: the chat template renders turns differently in a longer "
                                   "conversation; add {% generation %} blocks to it to mark assistant turns")
    except LMStackError as e:
        if str(e).startswith(where):
            raise
        raise LMStackError(f"{where}: {e}") from None
    segments, pos = [], 0
    for start, end in spans:
        segments += [(text[pos:start], False), (text[start:end], True)]
        pos = end
    segments.append((text[pos:], False))
    return segments


def end_of_turn_id(tokenizer: Tokenizer, chat_template: str | None = None) -> int | None:
    """The special token the chat template closes an assistant turn with (ChatML's `<|im_end|>`), which
    generation should stop at; None without a template or when the turn ends in ordinary text."""
    if (chat_template or tokenizer.chat_template) is None:
        return None
    messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "ok"}]
    try:
        turn = [text for text, trained in chat_segments(tokenizer, messages, "template", chat_template) if trained]
    except LMStackError:
        return None
    ids = tokenizer.encode(turn[-1], add_special_tokens=False) if turn else []
    return ids[-1] if ids and ids[-1] in tokenizer.special_ids else None


def render_record(record: dict[str, Any], tokenizer: Tokenizer, where: str = "record",
                  chat_template: str | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of an SFT record and which of them the model is trained to produce."""
    if "messages" in record:
        return _encode_segments(tokenizer, chat_segments(tokenizer, record["messages"], where, chat_template))
    if "instruction" in record:
        prompt = alpaca_prompt(_text(record, "instruction", where), _text(record, "input", where, ""))
        return prompt_completion_ids(tokenizer, prompt, _text(record, "output", where))
    if "prompt" in record:
        return prompt_completion_ids(tokenizer, _text(record, "prompt", where), _text(record, "completion", where))
    if "text" in record:  # plain language modelling (TRL's "text" datasets): every token, and eos
        return prompt_completion_ids(tokenizer, "", _text(record, "text", where))
    raise LMStackError(f"{where}: expected 'messages', 'instruction'/'output', 'prompt'/'completion' or 'text'; "
                       f"the record has {sorted(record)}")


def prompt_completion_ids(tokenizer: Tokenizer, prompt: str | list[dict[str, Any]], completion: str,
                          where: str = "record", chat_template: str | None = None
                          ) -> tuple[list[int], list[bool]]:
    """A prompt (text, or chat messages) followed by a trained completion: the end-of-sequence token closes a
    text completion, the template's end of turn a chat one."""
    if isinstance(prompt, list):
        messages = [*prompt, {"role": "assistant", "content": completion}]
        segments = chat_segments(tokenizer, messages, where, chat_template)
        # Train on this last answer only; earlier assistant turns in the prompt are context.
        last = max(i for i, (_, trained) in enumerate(segments) if trained)
        segments = [(text, trained and i == last) for i, (text, trained) in enumerate(segments)]
        return _encode_segments(tokenizer, segments)
    head = tokenizer.encode(prompt, add_special_tokens=True)
    tail = tokenizer.encode(completion, add_special_tokens=False)
    if tokenizer.eos_token_id is not None:
        tail.append(tokenizer.eos_token_id)
    return head + tail, [False] * len(head) + [True] * len(tail)


def _text(record: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = record.get(key)
    if value is None and default is not None:  # an optional field left out or null: empty
        return default
    if value is None:
        raise LMStackError(f"{where}: field {key!r} is null" if key in record else f"{where}: missing field {key!r}")
    if not isinstance(value, str):
        raise LMStackError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def to_example(ids: list[int], trained: list[bool]) -> Example:
    """Shift by one: position t predicts token t + 1, scored only where that token is trained."""
    return Example(ids[:-1], [tok if flag else -100 for tok, flag in zip(ids[1:], trained[1:])])


def load_sft_examples(path: str | os.PathLike, tokenizer: Tokenizer, max_length: int,
                      chat_template: str | None = None) -> tuple[list[Example], dict[str, int]]:
    """Read an SFT JSONL file into examples of at most `max_length` tokens (longer ones are cut, and
    examples left with nothing to learn are dropped; both counted in the returned stats)."""
    examples, stats = [], {"records": 0, "truncated": 0, "empty": 0, "dropped_by_cut": 0}
    emptied_by_cut = 0  # records whose trained tokens all lay past max_length
    for lineno, record in read_jsonl(path):
        stats["records"] += 1
        ids, trained = render_record(record, tokenizer, f"{path}:{lineno}", chat_template)
        cut = len(ids) > max_length + 1
        if cut:
            stats["truncated"] += 1
        example = to_example(ids[:max_length + 1], trained[:max_length + 1])
        if all(label == -100 for label in example.labels):
            stats["empty"] += 1
            emptied_by_cut += cut and any(trained[1:])
            continue
        examples.append(example)
    if not examples:
        if emptied_by_cut:
            raise LMStackError(
                f"{path}: no usable examples: in {emptied_by_cut} of {stats['records']} records every trained "
                f"token (the answer) lies past the first {max_length + 1} tokens, where they are cut; raise "
                "block_size, or shorten the prompts")
        raise LMStackError(f"{path}: no usable examples ({stats['records']} records, none with a token to train "
                           "on: an empty answer, or nothing marked as the assistant's)")
    stats["dropped_by_cut"] = emptied_by_cut
    return examples, stats


# ------------------------------------------------------------------------------------------- batching


def pack_examples(examples: Sequence[Example], block_size: int) -> list[list[Example]]:
    """Group examples, in order, into rows of at most `block_size` tokens (next fit: an example that does not
    fit the current row starts a new one)."""
    rows: list[list[Example]] = []
    used = block_size + 1
    for ex in examples:
        if used + len(ex) > block_size:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += len(ex)
    return rows


def collate_packed(rows: Sequence[Sequence[Example]], block_size: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Packed rows as tensors: each example gets its own document id (attention stays inside it) and
    positions that restart at 0; the tail of a row is padding with no loss."""
    B = len(rows)
    input_ids = np.full((B, block_size), pad_id, dtype=np.int64)
    labels = np.full((B, block_size), -100, dtype=np.int64)
    positions = np.zeros((B, block_size), dtype=np.int64)
    documents = np.zeros((B, block_size), dtype=np.int64)
    real = np.zeros((B, block_size), dtype=bool)
    for b, row in enumerate(rows):
        t = 0
        for d, ex in enumerate(row):
            n = len(ex)
            input_ids[b, t:t + n], labels[b, t:t + n] = ex.input_ids, ex.labels
            positions[b, t:t + n], documents[b, t:t + n] = np.arange(n), d
            t += n
        real[b, :t] = True
        positions[b, t:] = np.arange(block_size - t)
        documents[b, t:] = len(row)  # the padding is a document of its own
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(positions), "document_ids": torch.from_numpy(documents),
            "token_mask": torch.from_numpy(real)}


def pad_right(seqs: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences right-padded with `value` to the longest, [B, T], and the mask of real entries."""
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), value, dtype=torch.long)
    real = torch.zeros((len(seqs), T), dtype=torch.bool)
    for b, s in enumerate(seqs):
        out[b, :len(s)], real[b, :len(s)] = torch.tensor(list(s), dtype=torch.long), True
    return out, real


def collate_padded(examples: Sequence[Example], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded to the longest example. No attention mask is needed: under the causal mask a real
    token never sees the padding to its right, and padded positions carry no loss; `token_mask` (the real
    tokens) keeps the padding out of a mixture of experts' router loss."""
    input_ids, real = pad_right([ex.input_ids for ex in examples], pad_id)
    labels, _ = pad_right([ex.labels for ex in examples], -100)
    return {"input_ids": input_ids, "labels": labels, "token_mask": real}
