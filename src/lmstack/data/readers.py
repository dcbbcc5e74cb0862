"""Readers for text and JSONL corpora that name the file and line of a bad record."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lmstack.errors import LMStackError


def iter_json_lines(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield `(line_number, value)` for each non-blank line; a line that is not JSON raises `LMStackError`
    naming `file:line`."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise LMStackError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line_number, record)` for each JSON object line (`file:line` errors otherwise)."""
    for lineno, record in iter_json_lines(path):
        if not isinstance(record, dict):
            raise LMStackError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        yield lineno, record


def iter_texts(files: Iterable[str | os.PathLike], text_field: str = "text") -> Iterator[str]:
    """Documents from text files (one document per file) and JSONL files (`text_field` of each record)."""
    for file in files:
        path = Path(file)
        if not path.exists():
            raise LMStackError(f"{path}: no such file")
        if path.suffix in (".jsonl", ".json"):
            for lineno, record in read_jsonl(path):
                if text_field not in record:
                    raise LMStackError(f"{path}:{lineno}: record has no field {text_field!r}")
                value = record[text_field]
                if not isinstance(value, str):
                    raise LMStackError(f"{path}:{lineno}: field {text_field!r} is not a string")
                yield value
        else:
            yield path.read_text(encoding="utf-8", errors="replace")
