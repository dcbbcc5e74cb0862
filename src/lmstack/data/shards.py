"""Token shards: a corpus tokenized once into flat memory-mapped arrays that training samples from.

`prepare_shards` reads text, JSONL and Parquet files as a stream (a corpus larger than RAM is fine),
tokenizes them in worker processes, separates documents with eos, and writes

    out_dir/train.bin, out_dir/val.bin   flat uint16 arrays (uint32 when the vocabulary needs it)
    out_dir/meta.json                    dtype, token counts, tokenizer hash, what was skipped or replaced
    out_dir/tokenizer/                   the tokenizer, so a run needs nothing else

The split is deterministic: `tail` keeps the last `val_fraction` of the token stream for validation (nanoGPT's
first 90% / last 10%), `hash` sends whole documents to validation by a hash of their text.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lmstack.errors import LMStackError
from lmstack.tokenizer import Tokenizer

BLOCK_CHARS = 1 << 20  # text files are read and tokenized in blocks of about this many characters


@dataclass
class ReadStats:
    documents: int = 0
    replaced_bytes_files: list[str] = field(default_factory=list)  # files that were not valid UTF-8
    replacement_chars: int = 0
    skipped_records: list[str] = field(default_factory=list)  # "file:line: why"


def _text_blocks(path: Path, stats: ReadStats) -> Iterator[str]:
    """A text file as a stream of blocks. Bytes that are not UTF-8 become U+FFFD and are counted. Blocks end
    after a newline that precedes a non-space character, where every split rule lmstack uses would cut
    anyway, so blockwise tokenization equals whole-file tokenization."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    replacement = "\ufffd".encode()
    carry = ""
    with open(path, "rb") as f:
        while True:
            raw = f.read(BLOCK_CHARS)
            chunk = decoder.decode(raw, final=not raw)
            bad = chunk.count("\ufffd") - raw.count(replacement)  # genuine U+FFFD characters are not errors
            if bad > 0:
                stats.replacement_chars += bad
                if str(path) not in stats.replaced_bytes_files:
                    stats.replaced_bytes_files.append(str(path))
            if not raw:
                break
            pieces = list(_cut(carry + chunk))
            carry = pieces.pop() if pieces else ""
            yield from pieces
    if carry:
        yield carry


def _cut(text: str) -> Iterator[str]:
    start = 0
    while start < len(text):
        end = start + BLOCK_CHARS
        while end < len(text) and not (text[end - 1] == "\n" and not text[end].isspace()):
            end += 1
        yield text[start:end]
        start = end


def iter_documents(
    files: Sequence[str | os.PathLike], text_field: str, stats: ReadStats, on_bad_record: str = "fail"
) -> Iterator[tuple[str, bool]]:
    """Yield `(text_block, ends_document)` over text, JSONL and Parquet files."""
    from lmstack.data.readers import read_jsonl

    for file in files:
        path = Path(file)
        if not path.exists():
            raise LMStackError(f"{path}: no such file")
        if path.suffix in (".jsonl", ".json"):
            try:
                for lineno, record in read_jsonl(path):
                    value = record.get(text_field)
                    if not isinstance(value, str):
                        why = f"{path}:{lineno}: " + (f"record has no field {text_field!r}" if value is None
                                                       else f"field {text_field!r} is not a string")
                        if on_bad_record == "fail":
                            raise LMStackError(why + " (use --on-bad-record skip to skip such records)")
                        stats.skipped_records.append(why)
                        continue
                    stats.documents += 1
                    yield value, True
            except LMStackError as e:
                if on_bad_record == "fail" or "not valid JSON" not in str(e):
                    raise
                stats.skipped_records.append(str(e))  # read_jsonl stops at a broken line: skip the rest
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.ParquetFile(path)
            if text_field not in table.schema_arrow.names:
                raise LMStackError(f"{path}: Parquet file has no column {text_field!r} "
                                   f"(columns: {table.schema_arrow.names})")
            for batch in table.iter_batches(columns=[text_field], batch_size=1024):
                for value in batch.column(0).to_pylist():
                    if value is None:
                        continue
                    stats.documents += 1
                    yield value, True
        else:
            blocks = _text_blocks(path, stats)
            previous = next(blocks, None)
            for block in blocks:
                yield previous, False
                previous = block
            if previous is not None:
                stats.documents += 1
                yield previous, True


# Worker processes hold one tokenizer each, loaded once.
_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer_json: str) -> None:
    global _WORKER_TOKENIZER
    from tokenizers import Tokenizer as Backend

    _WORKER_TOKENIZER = Tokenizer(Backend.from_str(tokenizer_json))


def _encode_batch(job: tuple[list[str], list[bool], str, float]) -> list[tuple[list[int], bool, str]]:
    """Token ids, end-of-document flag and destination split of each text block of a batch."""
    texts, ends, split, val_fraction = job
    assert _WORKER_TOKENIZER is not None
    ids = _WORKER_TOKENIZER.encode_batch(texts, add_special_tokens=False)
    where = [_hash_split(t, val_fraction) if split == "hash" else "all" for t in texts]
    return list(zip(ids, ends, where))


def _jobs(docs: Iterator[tuple[str, bool]], size: int, split: str, val_fraction: float) -> Iterator[tuple]:
    texts, ends = [], []
    for text, end in docs:
        texts.append(text)
        ends.append(end)
        if len(texts) == size:
            yield texts, ends, split, val_fraction
            texts, ends = [], []
    if texts:
        yield texts, ends, split, val_fraction


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest()


def prepare_shards(
    files: Sequence[str | os.PathLike],
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    *,
    text_field: str = "text",
    val_fraction: float = 0.1,
    split: str = "tail",
    workers: int | None = None,
    on_bad_record: str = "fail",
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize `files` into `out_dir` (see the module docstring); returns the metadata written."""
    if not files:
        raise LMStackError("no input files given")
    if split not in ("tail", "hash"):
        raise LMStackError(f"split {split!r} is not 'tail' or 'hash'")
    if not 0.0 <= val_fraction < 1.0:
        raise LMStackError(f"val_fraction {val_fraction} must be in [0, 1)")
    if on_bad_record not in ("fail", "skip"):
        raise LMStackError(f"on_bad_record {on_bad_record!r} is not 'fail' or 'skip'")
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    eos = tokenizer.eos_token_id
    stats = ReadStats()
    counts = {"train": 0, "val": 0}
    workers = workers or max(1, min(8, (os.cpu_count() or 1)))
    docs = iter_documents(files, text_field, stats, on_bad_record)
    with ExitStack() as stack:
        sinks = {name: stack.enter_context(open(tmp / f"{name}.bin", "wb"))
                 for name in (["all"] if split == "tail" else ["train", "val"])}
        bar = stack.enter_context(tqdm(unit="tok", unit_scale=True, desc="tokenizing", disable=not progress,
                                       mininterval=0.5))
        pool = stack.enter_context(get_context("spawn").Pool(workers, _init_worker,
                                                             (tokenizer.backend.to_str(),)))
        # imap keeps the corpus order, so the shards are the same whatever the number of workers.
        for results in pool.imap(_encode_batch, _jobs(docs, 64, split, val_fraction)):
            for ids, end, target in results:
                if end and eos is not None:
                    ids = [*ids, eos]
                array = np.asarray(ids, dtype=dtype)
                sinks[target].write(array.tobytes())
                counts["train" if target == "all" else target] += len(array)
                bar.update(len(array))
    total = counts["train"] + counts["val"]
    if total == 0:
        shutil.rmtree(tmp)
        raise LMStackError(f"the corpus is empty: no text in {[str(f) for f in files]}")
    if split == "tail":
        n_train = int(total * (1 - val_fraction))  # nanoGPT's data[:int(n * 0.9)]
        counts = {"train": n_train, "val": total - n_train}
        _split_tail(tmp / "all.bin", tmp / "train.bin", tmp / "val.bin", counts["train"], np.dtype(dtype).itemsize)
    tokenizer.save(tmp / "tokenizer")
    meta = {
        "dtype": np.dtype(dtype).name,
        "vocab_size": tokenizer.vocab_size,
        "eos_token_id": eos,
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "documents": stats.documents,
        "split": split,
        "val_fraction": val_fraction,
        "sources": [str(f) for f in files],
        "files_not_utf8": stats.replaced_bytes_files,
        "replacement_chars": stats.replacement_chars,
        "skipped_records": len(stats.skipped_records),
        "skipped_examples": stats.skipped_records[:10],
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return meta


def _hash_split(text: str, val_fraction: float) -> str:
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "little")
    return "val" if h / 2**64 < val_fraction else "train"


def _split_tail(src: Path, train: Path, val: Path, n_train: int, itemsize: int) -> None:
    """Move the first `n_train` tokens of `src` to `train` and the rest to `val`, a chunk at a time."""
    with open(src, "rb") as f, open(train, "wb") as t:
        remaining = n_train * itemsize
        while remaining:
            chunk = f.read(min(remaining, 1 << 24))
            t.write(chunk)
            remaining -= len(chunk)
        with open(val, "wb") as v:
            shutil.copyfileobj(f, v, 1 << 24)
    src.unlink()


class TokenShards:
    """The prepared splits of a shard directory, memory-mapped."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.exists():
            raise LMStackError(f"{self.path}: no meta.json (prepare it with `lmstack data prepare`)")
        self.meta = json.loads(meta_file.read_text())
        self.dtype = np.dtype(self.meta["dtype"])
        self.splits = {}
        for name in ("train", "val"):
            file = self.path / f"{name}.bin"
            n = self.meta[f"{name}_tokens"]
            self.splits[name] = np.memmap(file, dtype=self.dtype, mode="r", shape=(n,)) if n else \
                np.zeros(0, dtype=self.dtype)

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.path / "tokenizer")

    def __getitem__(self, split: str) -> np.ndarray:
        return self.splits[split]
