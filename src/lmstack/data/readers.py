"""Readers for text, JSONL and Parquet corpora that name the file and line of a bad record."""

from __future__ import annotations

import codecs
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmstack.errors import LMStackError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
RECORD_SUFFIXES = (*JSONL_SUFFIXES, ".parquet")  # files of records whose `text_field` is the text

_COMPRESSED_SUFFIXES = (".gz", ".tgz", ".bz2", ".tbz2", ".xz", ".txz", ".lzma", ".zst", ".lz4", ".br", ".zip",
                        ".7z", ".tar", ".rar")
# What compressed files and archives start with, whatever their name: gzip, xz, zstd, lz4, zip, 7z, rar (and
# bzip2: "BZh", its level, then a block's magic number)
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd", b"\x04\x22\x4d\x18",
                     b"PK\x03\x04", b"7z\xbc\xaf\x27\x1c", b"Rar!\x1a\x07")


def check_input_file(path: Path) -> None:
    """Refuse an input that is missing or a directory, naming it."""
    if not path.exists():
        raise LMStackError(f"{path}: no such file")
    if path.is_dir():
        raise LMStackError(f"{path}: a directory; give the files in it (such as {path}/*.txt)")


def is_record_file(path: Path) -> bool:
    """Whether `path` holds records (JSONL or Parquet, by its suffix in any case) rather than plain text. A
    compressed file (by its suffix or its first bytes) is refused: read as text, its bytes would be tokenized."""
    suffix = path.suffix.lower()
    compressed = suffix in _COMPRESSED_SUFFIXES
    if not compressed and suffix != ".parquet" and path.is_file():
        with open(path, "rb") as f:
            head = f.read(10)
        compressed = head.startswith(_COMPRESSED_MAGIC) or (head[:3] == b"BZh" and head[4:] == b"1AY&SY")
    if compressed:
        how = suffix if suffix in _COMPRESSED_SUFFIXES else "by its first bytes"
        raise LMStackError(f"{path}: a compressed file or archive ({how}); decompress it first (lmstack reads "
                           "text, JSONL and Parquet files)")
    return suffix in RECORD_SUFFIXES


CHUNK_CHARS = 1 << 20  # text files are read in chunks of about this many characters

_SURROGATE = re.compile("[\ud800-\udfff]")  # a JSON escape such as "\ud800" alone: valid JSON, but not text
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how such an escape, paired or not, is spelled


# errors="replace" that also counts what it replaces: counting U+FFFD in the output would also count genuine
# ones, and one whose bytes straddle two reads could not be told from a replacement.
_COUNTING_REPLACE = "lmstack-counting-replace"
_replaced = [0]


def _count_and_replace(error: UnicodeDecodeError) -> tuple[str, int]:
    _replaced[0] += 1
    return "\ufffd", error.end


codecs.register_error(_COUNTING_REPLACE, _count_and_replace)


@dataclass
class ReadStats:
    documents: int = 0
    empty_records: int = 0  # records whose text is "": no document, so no lone eos (data.shards)
    replaced_bytes_files: list[str] = field(default_factory=list)  # files that were not valid UTF-8
    replacement_chars: int = 0
    skipped_records: list[str] = field(default_factory=list)  # "file:line: why"
    forced_cuts: int = 0  # places a text without a boundary in MAX_BLOCK_CHARS was cut (data.shards)

    def count_replaced(self, path: str | os.PathLike, n: int) -> None:
        if n > 0:
            self.replacement_chars += n
            if str(path) not in self.replaced_bytes_files:
                self.replaced_bytes_files.append(str(path))


def iter_text_chunks(
    path: str | os.PathLike, stats: ReadStats | None = None, size: int = CHUNK_CHARS
) -> Iterator[str]:
    """A UTF-8 text file as a stream of chunks of about `size` characters, newlines as they are ("\\r\\n" stays
    two characters: the tokenizer sees the file's own bytes). A byte order mark at the start is dropped. Bytes
    that are not UTF-8 become U+FFFD and are counted in `stats` (a genuine U+FFFD is not)."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors=_COUNTING_REPLACE)
    with open(path, "rb") as f:
        while True:
            raw = f.read(size)
            before = _replaced[0]
            chunk = decoder.decode(raw, final=not raw)  # the final call turns a cut-off sequence into U+FFFD
            if stats is not None:
                stats.count_replaced(path, _replaced[0] - before)
            if chunk:
                yield chunk
            if not raw:
                return


def _text_lines(path: str | os.PathLike, stats: ReadStats | None = None) -> Iterator[tuple[int, str]]:
    """`(line_number, line)` of a UTF-8 file, without a byte order mark at the start. Bytes that are not UTF-8
    become U+FFFD and are counted in `stats` as for a text file (one U+FFFD per maximal bad sequence); a genuine
    U+FFFD is not counted. Lines end at "\n" only (a "\r\n" ending is kept): JSON allows a lone "\r" as
    whitespace inside a record, and line numbers must be those an editor shows."""
    with open(path, encoding="utf-8-sig", errors=_COUNTING_REPLACE, newline="\n") as f:
        for lineno in itertools.count(1):
            before = _replaced[0]
            line = f.readline()
            if stats is not None:
                stats.count_replaced(path, _replaced[0] - before)
            if not line:
                return
            yield lineno, line


def iter_json_lines(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield `(line_number, value)` for each non-blank line; a line that is not JSON raises `LMStackError`
    naming `file:line`."""
    for lineno, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise LMStackError(f"{path}:{lineno}: not valid JSON ({_json_error(e)})") from None
        if _SURROGATE_ESCAPE.search(line):  # a lone "\ud800" is valid JSON but no text: U+FFFD instead
            value = _replace_surrogates(value)
        yield lineno, value


def _json_error(e: ValueError | RecursionError) -> str:
    """Why a line is not JSON; Python's parser gives up on deep nesting with a RecursionError."""
    return "nested too deeply" if isinstance(e, RecursionError) else e.msg


def _replace_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_replace_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {k: _replace_surrogates(v) for k, v in value.items()}
    return value


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line_number, record)` for each JSON object line (`file:line` errors otherwise)."""
    for lineno, record in iter_json_lines(path):
        if not isinstance(record, dict):
            raise LMStackError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        yield lineno, record


SKIP_HINT = " (use --on-bad-record skip to skip such records)"  # for errors met through the CLI


def iter_record_texts(
    path: Path, text_field: str, stats: ReadStats, on_bad_record: str = "fail", hint: str = ""
) -> Iterator[str]:
    """The `text_field` string of each record of a JSONL or Parquet file. A JSONL line that is not JSON, not an
    object or without the string field raises `LMStackError` naming `file:line` (+ `hint`), or with
    `on_bad_record="skip"` is recorded in `stats.skipped_records` and reading goes on with the next line."""
    if path.suffix.lower() == ".parquet":
        yield from _parquet_texts(path, text_field, stats, on_bad_record, hint)
        return
    for lineno, line in _text_lines(path, stats):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            why = f"not valid JSON ({_json_error(e)})"
        else:
            if not isinstance(record, dict):
                why = f"expected a JSON object, got {type(record).__name__}"
            elif text_field not in record:
                why = f"record has no field {text_field!r}"
            elif not isinstance(record[text_field], str):
                why = f"field {text_field!r} is not a string"
            else:
                # a lone surrogate escape would crash the tokenizer: it becomes U+FFFD, counted as bad UTF-8 is
                text, n = _SURROGATE.subn("\ufffd", record[text_field])
                stats.count_replaced(path, n)
                yield text
                continue
        if on_bad_record == "fail":
            raise LMStackError(f"{path}:{lineno}: {why}{hint}")
        stats.skipped_records.append(f"{path}:{lineno}: {why}")


def _parquet_texts(path: Path, text_field: str, stats: ReadStats, on_bad_record: str = "fail",
                   hint: str = "") -> Iterator[str]:
    """The `text_field` strings of a Parquet file; a null is a bad record, as in JSONL (`file: row N`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    # A damaged file can fail anywhere, from opening it to its last page, and not only as Arrow errors.
    damaged = (pa.ArrowException, OSError, ValueError, UnicodeDecodeError)
    try:
        table = pq.ParquetFile(path)
    except damaged as e:
        raise LMStackError(f"{path}: not a readable Parquet file ({e})") from None
    schema = table.schema_arrow
    if text_field not in schema.names:
        raise LMStackError(f"{path}: Parquet file has no column {text_field!r} (columns: {schema.names})")
    kind = schema.field(text_field).type
    value_kind = kind.value_type if pa.types.is_dictionary(kind) else kind
    is_string_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
    if not (pa.types.is_string(value_kind) or pa.types.is_large_string(value_kind) or is_string_view(value_kind)):
        # checked here: the tokenizer would fail on the first value, with a traceback from a worker process
        raise LMStackError(f"{path}: Parquet column {text_field!r} holds {kind}, not text "
                           "(name the text column with --text-field)")
    batches = table.iter_batches(columns=[text_field], batch_size=1024)
    row = 0  # 1-based, as a file's lines are
    while True:
        try:
            batch = next(batches, None)
            if batch is None:
                break
            values = batch.column(0).to_pylist()
        except UnicodeDecodeError as e:  # Arrow does not check that a string column holds UTF-8
            raise LMStackError(f"{path}: Parquet column {text_field!r} holds bytes that are not UTF-8 ({e.reason} "
                               f"at byte {e.start}); re-encode the file") from None
        except damaged as e:
            raise LMStackError(f"{path}: not a readable Parquet file ({e})") from None
        for value in values:
            row += 1
            if value is not None:
                yield value
            elif on_bad_record == "fail":
                raise LMStackError(f"{path}: row {row}: field {text_field!r} is null{hint}")
            else:
                stats.skipped_records.append(f"{path}: row {row}: field {text_field!r} is null")


def iter_texts(
    files: Iterable[str | os.PathLike], text_field: str = "text", on_bad_record: str = "fail",
    stats: ReadStats | None = None, *, chunked: bool = False, hint: str = "",
) -> Iterator[str]:
    """Documents from text files (one document per file) and JSONL / Parquet files (`text_field` of each
    record; see `iter_record_texts` for bad records and `hint`). With `chunked=True` a text file comes as a
    stream of chunks instead (enough for a character vocabulary, and a file larger than memory is fine)."""
    stats = stats if stats is not None else ReadStats()
    for file in files:
        path = Path(file)
        check_input_file(path)
        if is_record_file(path):
            yield from iter_record_texts(path, text_field, stats, on_bad_record, hint)
        elif chunked:
            yield from iter_text_chunks(path, stats, CHUNK_CHARS)
        else:
            yield "".join(iter_text_chunks(path, stats, CHUNK_CHARS))
