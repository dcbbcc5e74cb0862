"""ROUGE and BLEU, through the reference implementations (`rouge-score`, Google's; `sacrebleu`).

These are the scores papers report, so lmstack calls the packages that define them rather than re-deriving
them; what is lmstack's is reading prediction/reference files and aggregating.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from lmstack.errors import LMStackError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
ROUGE_TOKENIZERS = ("default", "whitespace", "char")


class _SplitTokenizer:
    """rouge-score's tokenizer interface for text in any script: lowercased words apart by whitespace, or
    ("char") every character but whitespace, as ROUGE is often computed for Chinese and Japanese."""

    def __init__(self, chars: bool):
        self.chars = chars

    def tokenize(self, text: str) -> list[str]:
        text = text.lower()
        return [c for c in text if not c.isspace()] if self.chars else text.split()


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise LMStackError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise LMStackError("no predictions to score")


def rouge(predictions: Sequence[str], references: Sequence[str], rouge_types: Sequence[str] = ROUGE_TYPES,
          use_stemmer: bool = False, tokenizer: str = "default") -> dict[str, dict[str, float]]:
    """Mean precision, recall and F1 of each ROUGE type over the pairs (rougeLsum splits on newlines).

    `tokenizer` "default" is rouge-score's (and HF evaluate's): lowercased runs of ASCII letters and digits,
    so text in other scripts scores 0, with a warning; "whitespace" splits words of any script and "char"
    takes each character (Chinese, Japanese)."""
    from rouge_score import rouge_scorer
    from rouge_score.tokenize import tokenize as default_tokenize

    _check_pairs(predictions, references)
    unknown = set(rouge_types) - set(ROUGE_TYPES)
    if unknown:
        raise LMStackError(f"unknown ROUGE types {sorted(unknown)}; choose from {list(ROUGE_TYPES)}")
    if tokenizer not in ROUGE_TOKENIZERS:
        raise LMStackError(f"unknown ROUGE tokenizer {tokenizer!r}; choose from {list(ROUGE_TOKENIZERS)}")
    if use_stemmer and tokenizer != "default":
        raise LMStackError(f"use_stemmer: the Porter stemmer is the default tokenizer's, not {tokenizer!r}'s")
    if tokenizer == "default":
        # Text with letters that the default tokenizer reads as nothing (Cyrillic, Chinese) would score 0 silently
        unread = sum(any(c.isalnum() for c in t) and not default_tokenize(t, None)
                     for t in (*predictions, *references))
        if unread:
            warnings.warn(f"ROUGE: {unread:,} texts hold letters but no ASCII letter or digit, which rouge-score's "
                          "default tokenizer keeps, so they score 0; tokenizer='whitespace' or 'char' reads any "
                          "script", stacklevel=2)
    scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer,
                                      tokenizer=None if tokenizer == "default" else _SplitTokenizer(tokenizer == "char"))
    totals = {t: {"precision": 0.0, "recall": 0.0, "f1": 0.0} for t in rouge_types}
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)  # rouge-score takes (target, prediction)
        for t in rouge_types:
            totals[t]["precision"] += scores[t].precision
            totals[t]["recall"] += scores[t].recall
            totals[t]["f1"] += scores[t].fmeasure
    n = len(predictions)
    return {t: {k: v / n for k, v in d.items()} for t, d in totals.items()}


def bleu(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]],
         tokenize: str = "13a") -> dict[str, float | list[float]]:
    """Corpus BLEU as sacrebleu computes it. `references` is one list per reference set, or a single list."""
    import sacrebleu

    ref_sets = [list(references)] if references and isinstance(references[0], str) else [list(r) for r in references]
    for refs in ref_sets or [[]]:  # no reference set at all is as many references as none
        _check_pairs(predictions, refs)
    result = sacrebleu.corpus_bleu(list(predictions), ref_sets, tokenize=tokenize)
    return {"bleu": result.score, "precisions": list(result.precisions), "brevity_penalty": result.bp,
            "hyp_len": result.sys_len, "ref_len": result.ref_len}


def read_lines(path: str | os.PathLike) -> list[str]:
    """One example per line (a JSONL file: one JSON string per line, so examples may hold newlines). Lines end
    at "\n" (or "\r\n") only: `str.splitlines` would also split at form feeds, U+2028 and other separators a
    text may hold, and pair predictions with the wrong references."""
    from lmstack.data.readers import check_input_file, iter_json_lines

    path = Path(path)
    check_input_file(path)
    if path.suffix != ".jsonl":
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise LMStackError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()  # the newline that ends the last line
        return [line.removesuffix("\r") for line in lines]
    out = []
    for lineno, value in iter_json_lines(path):
        if not isinstance(value, str):
            raise LMStackError(f"{path}:{lineno}: expected a JSON string")
        out.append(value)
    return out
