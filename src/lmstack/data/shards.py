"""Token shards: a corpus tokenized once into flat memory-mapped arrays that training samples from.

`prepare_shards` reads text, JSONL and Parquet files as a stream (a corpus larger than RAM is fine),
tokenizes them in worker processes, separates documents with eos, and writes

    out_dir/train.bin, out_dir/val.bin   flat uint16 arrays (uint32 when the vocabulary needs it)
    out_dir/meta.json                    dtype, token counts, tokenizer hash, what was skipped or replaced
    out_dir/tokenizer/                   the tokenizer, so a run needs nothing else

The split is deterministic: `tail` keeps the last `val_fraction` of the token stream for validation (nanoGPT's
first 90% / last 10%), `hash` sends whole documents to validation by a hash of their text (of their first
block, for a text file longer than one).

The shards are built in a temporary directory next to out_dir (next to its target, when out_dir is a symlink),
removed if anything fails, and only then put in its place; one left by a killed run is removed by the next.
An existing out_dir is replaced only when it is empty or an earlier output: --output may well name a directory
that holds the corpus.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import socket
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from fractions import Fraction
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lmstack.data.readers import (
    SKIP_HINT,
    ReadStats,
    check_input_file,
    is_record_file,
    iter_record_texts,
    iter_text_chunks,
)
from lmstack.errors import LMStackError
from lmstack.tokenizer import Tokenizer

BLOCK_CHARS = 1 << 20  # text files are read and tokenized in blocks of about this many characters
# Text with no boundary (below) in this many characters (a genome, minified JSON, base64) is cut where it is, so
# that memory and time stay linear; the tokens at such a cut may differ from the whole-file encoding's.
MAX_BLOCK_CHARS = 8 * BLOCK_CHARS
SHARD_FILES = {"meta.json", "train.bin", "val.bin", "tokenizer"}  # what a shard directory holds
_HOST = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())  # in temporary names: whose build it is

# Block boundaries (zero-width): after a newline that follows a non-space character and comes before one; as
# fallbacks for text with few newlines, before a single space between two non-space characters, or before any
# whitespace that follows a letter or digit (paragraphs of text without spaces, such as Chinese, separated by
# blank lines). Every split rule lmstack uses (GPT-2's and Llama 3's pre-tokenizer patterns, characters) cuts
# there anyway. Not after "\n\n", "\r\n" or " \n": before a word GPT-2's `\s+(?!\S)` splits them in two, at a
# block end it can't. A SentencePiece-style tokenizer (its "▁" pieces merge across newlines, but start at
# a space) cuts before a single space only; in text without one, at the others, where a boundary token may
# then differ from the whole-file encoding's.
_NEWLINE_CUT = re.compile(r"(?<=\S\n)(?=\S)")
_SPACE_CUT = re.compile(r"(?<=\S)(?= \S)")
_WORD_END_CUT = re.compile(r"(?<=[^\W_])(?=\s)")
_ANY_CUT = re.compile(r"(?<=\S\n)(?=\S)|(?<=\S)(?= \S)|(?<=[^\W_])(?=\s)")


def _text_blocks(path: Path, stats: ReadStats, spaces_only: bool = False) -> Iterator[str]:
    """A text file as a stream of blocks (decoded as `iter_text_chunks` does). Blocks end at a boundary (above)
    where every split rule lmstack uses would cut anyway, so blockwise tokenization equals whole-file
    tokenization; `spaces_only` for a SentencePiece-style tokenizer."""
    carry = ""
    for chunk in iter_text_chunks(path, stats, BLOCK_CHARS):
        if len(carry) > MAX_BLOCK_CHARS:  # cut only now that more text follows: a file's end is no cut
            stats.forced_cuts += 1
            yield carry
            carry = ""
        # a carry longer than a block has no boundary: don't scan it again (a huge line would be quadratic)
        pieces = list(_cut(carry + chunk, len(carry) - 1 if len(carry) > BLOCK_CHARS else 0, spaces_only))
        carry = pieces.pop() if pieces else ""
        yield from pieces
    if carry:
        yield carry


def _cut(text: str, scanned: int = 0, spaces_only: bool = False) -> Iterator[str]:
    """Blocks of at least BLOCK_CHARS characters; the last one is the rest, which may end anywhere. No boundary
    lies in text[BLOCK_CHARS:scanned]."""
    start = 0
    while start < len(text):
        end = _boundary(text, start + BLOCK_CHARS, scanned, spaces_only)
        yield text[start:end]
        start = end


def _boundary(text: str, lo: int, scanned: int = 0, spaces_only: bool = False) -> int:
    """The first newline boundary in [lo, lo + BLOCK_CHARS), else the first space boundary there, else the first
    word-end boundary there, else the first boundary of any kind after lo (none before `scanned`), else
    len(text). With `spaces_only`, a space boundary in [lo, lo + BLOCK_CHARS) comes first."""
    if lo >= len(text):
        return len(text)
    hi = lo + BLOCK_CHARS
    match = ((spaces_only and _SPACE_CUT.search(text, lo, hi)) or _NEWLINE_CUT.search(text, lo, hi)
             or _SPACE_CUT.search(text, lo, hi) or _WORD_END_CUT.search(text, lo, hi)
             or _ANY_CUT.search(text, max(lo, scanned)))
    return match.start() if match else len(text)


def iter_documents(
    files: Sequence[str | os.PathLike], text_field: str, stats: ReadStats, on_bad_record: str = "fail",
    spaces_only: bool = False,
) -> Iterator[tuple[str, bool]]:
    """Yield `(text_block, ends_document)` over text, JSONL and Parquet files (text files cut as
    `_text_blocks` does)."""
    for file in files:
        path = Path(file)
        check_input_file(path)
        if is_record_file(path):
            for value in iter_record_texts(path, text_field, stats, on_bad_record,
                                           hint=SKIP_HINT):
                if not value:  # nothing to learn, and its eos would follow the last one
                    stats.empty_records += 1
                    continue
                stats.documents += 1
                yield value, True
        else:
            blocks = _text_blocks(path, stats, spaces_only)
            previous = next(blocks, None)
            for block in blocks:
                yield previous, False
                previous = block
            if previous is not None:
                stats.documents += 1
                yield previous, True


# Worker processes hold one tokenizer each, loaded once, and its variant for blocks that continue a document,
# and (when special tokens are read as text) a pattern that finds their strings, to count them.
_WORKER_TOKENIZER: Tokenizer | None = None
_WORKER_CONTINUATION: Tokenizer | None = None
_WORKER_SPECIAL: re.Pattern | None = None


def _can_spawn() -> bool:
    """Whether worker processes can start: a spawned process re-imports the main script, which a script read
    from standard input or typed at a prompt does not have as a file."""
    main_file = getattr(sys.modules["__main__"], "__file__", None)
    return main_file is None or Path(main_file).is_file()


def _exit_with_parent() -> None:
    """In a worker process: end it when its parent dies. A parent killed outright (SIGKILL, out of memory)
    never shuts the pool down, and its workers would wait on their call queue for ever."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        def watch() -> None:
            parent.join()  # returns when the parent's end of the sentinel pipe closes
            os._exit(1)

        threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _init_worker(tokenizer_json: str, parse_special_tokens: bool = False) -> None:
    global _WORKER_TOKENIZER, _WORKER_CONTINUATION, _WORKER_SPECIAL
    from tokenizers import Tokenizer as Backend

    _exit_with_parent()
    _WORKER_TOKENIZER = Tokenizer(Backend.from_str(tokenizer_json))
    continuation = continuation_tokenizer_json(tokenizer_json)
    _WORKER_CONTINUATION = Tokenizer(Backend.from_str(continuation)) if continuation else None
    _WORKER_SPECIAL = None
    if not parse_special_tokens:
        # A corpus that happens to hold "<|endoftext|>" gets its characters, not a document break (nanoGPT's
        # encode_ordinary)
        for tok in (_WORKER_TOKENIZER, _WORKER_CONTINUATION):
            if tok is not None:
                tok.backend.encode_special_tokens = True
        specials = sorted((t.content for t in _WORKER_TOKENIZER.backend.get_added_tokens_decoder().values()
                           if t.special and t.content), key=len, reverse=True)
        _WORKER_SPECIAL = re.compile("|".join(map(re.escape, specials))) if specials else None


def continuation_tokenizer_json(tokenizer_json: str) -> str | None:
    """The tokenizer without what it puts in front of a text (SentencePiece's "▁" from a `Prepend` normalizer
    or a Metaspace pre-tokenizer, a ByteLevel prefix space), for a block that continues a document: there
    the whole-file encoding has no such prefix. None when the tokenizer adds nothing (lmstack's own BPE)."""
    spec = json.loads(tokenizer_json)
    changed = False

    def strip(component: dict | None) -> dict | None:
        nonlocal changed
        if not component:
            return component
        kind = component.get("type")
        if kind == "Sequence":
            key = "normalizers" if "normalizers" in component else "pretokenizers"
            parts = [strip(c) for c in component[key]]
            component[key] = [c for c in parts if c is not None]
        elif kind == "Prepend":
            changed = True
            return None
        elif kind == "Metaspace" and (component.get("prepend_scheme", "always") != "never"
                                      or component.get("add_prefix_space")):  # the older spelling
            component.pop("add_prefix_space", None)
            component["prepend_scheme"], changed = "never", True
        elif kind == "ByteLevel" and component.get("add_prefix_space"):
            component["add_prefix_space"], changed = False, True
        return component

    spec["normalizer"] = strip(spec.get("normalizer"))
    spec["pre_tokenizer"] = strip(spec.get("pre_tokenizer"))
    return json.dumps(spec) if changed else None


def _encode_batch(job: tuple[list[str], list[bool], list[bool], str, float]
                  ) -> tuple[list[tuple[np.ndarray, bool, str]], int]:
    """Token ids, end-of-document flag and destination split of each text block of a batch (`job`: the
    blocks, whether each starts a document, whether it ends one, the split and val_fraction; with
    split="hash", the split of a document's first block holds for the whole document), and how many special
    token strings the blocks hold that were read as text."""
    texts, starts, ends, split, val_fraction = job
    assert _WORKER_TOKENIZER is not None
    ids: list = _WORKER_TOKENIZER.encode_batch(texts, add_special_tokens=False)
    if _WORKER_CONTINUATION is not None:  # blocks inside a document get no "▁" or space in front
        inside = [i for i, start in enumerate(starts) if not start]
        for i, encoded in zip(inside, _WORKER_CONTINUATION.encode_batch([texts[i] for i in inside],
                                                                         add_special_tokens=False)):
            ids[i] = encoded
    ids = [np.asarray(x, dtype=np.uint32) for x in ids]
    where = [_hash_split(t, val_fraction) if split == "hash" else "all" for t in texts]
    specials = sum(len(_WORKER_SPECIAL.findall(t)) for t in texts) if _WORKER_SPECIAL is not None else 0
    return list(zip(ids, ends, where)), specials  # arrays: far smaller than lists of ints, to hold and to send


def _jobs(docs: Iterator[tuple[str, bool]], split: str, val_fraction: float, max_items: int = 1024,
          max_chars: int = 4 * BLOCK_CHARS) -> Iterator[tuple]:
    """Batches of text blocks for the workers: many short records per batch, few long blocks (a worker's
    memory grows with the characters it encodes at once)."""
    texts, starts, ends, chars = [], [], [], 0
    starts_document = True
    for text, end in docs:
        texts.append(text)
        starts.append(starts_document)
        ends.append(end)
        starts_document = end
        chars += len(text)
        if len(texts) == max_items or chars >= max_chars:
            yield texts, starts, ends, split, val_fraction
            texts, starts, ends, chars = [], [], [], 0
    if texts:
        yield texts, starts, ends, split, val_fraction


def _ordered_map(executor: Executor, fn: Callable, jobs: Iterable, in_flight: int) -> Iterator:
    """`executor.map(fn, jobs)` with at most `in_flight` jobs submitted ahead: Executor.map would read all of
    `jobs` at once, that is the whole corpus into memory."""
    pending: deque[Future] = deque()
    for job in jobs:
        pending.append(executor.submit(fn, job))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


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
    parse_special_tokens: bool = False,
) -> dict[str, Any]:
    """Tokenize `files` into `out_dir` (see the module docstring); returns the metadata written.

    Special-token strings in the text (a literal "<|endoftext|>") are tokenized as the characters they are,
    counted in meta.json's `special_token_strings`; `parse_special_tokens` reads them as the special tokens
    (for text already rendered with a chat template)."""
    if not files:
        raise LMStackError("no input files given")
    if split not in ("tail", "hash"):
        raise LMStackError(f"split {split!r} is not 'tail' or 'hash'")
    if not 0.0 <= val_fraction < 1.0:
        raise LMStackError(f"val_fraction {val_fraction} must be in [0, 1)")
    if on_bad_record not in ("fail", "skip"):
        raise LMStackError(f"on_bad_record {on_bad_record!r} is not 'fail' or 'skip'")
    out = Path(out_dir)
    if out.is_symlink() and out.is_dir():
        out = out.resolve()  # build next to the target and replace it, so the link keeps pointing at the shards
    out = Path(os.path.abspath(out))  # has a name even for "." or "dir/..", and means the same throughout
    if Path.cwd().resolve().is_relative_to(out.resolve()):  # it could not be renamed aside at the end
        raise LMStackError(f"output {out_dir} is the current directory or holds it: name another output directory")
    _check_replaceable(out)  # before the work, not after an hour of tokenizing
    _remove_stale_builds(out)
    # The host in the name too: on a shared file system, a build of another machine is not this one's to clean.
    tmp = out.with_name(f".{out.name}.tmp{_HOST}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = _write_shards(files, tokenizer, tmp, text_field=text_field, val_fraction=val_fraction, split=split,
                             workers=workers or max(1, min(8, (os.cpu_count() or 1))),
                             on_bad_record=on_bad_record, progress=progress,
                             parse_special_tokens=parse_special_tokens)
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # whatever failed, no partial shards are left behind
    return meta


def _write_shards(
    files: Sequence[str | os.PathLike], tokenizer: Tokenizer, tmp: Path, *, text_field: str, val_fraction: float,
    split: str, workers: int, on_bad_record: str, progress: bool, parse_special_tokens: bool = False,
) -> dict[str, Any]:
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    eos = tokenizer.eos_token_id
    # A tokenizer that puts bos before a text (Llama 2, Mistral) has it open each document, as its encode does
    # for the prompts the model will see (and as transformers' run_clm tokenizes a corpus)
    bos = tokenizer.bos_token_id if tokenizer.adds_bos else None
    stats = ReadStats()
    counts = {"train": 0, "val": 0}
    # a tokenizer that prefixes texts is SentencePiece-style: blocks end at spaces, and go to the variant without
    # the prefix when they continue a document
    spaces_only = continuation_tokenizer_json(tokenizer.backend.to_str()) is not None
    docs = iter_documents(files, text_field, stats, on_bad_record, spaces_only)
    with ExitStack() as stack:
        sinks = {name: stack.enter_context(open(tmp / f"{name}.bin", "wb"))
                 for name in (["all"] if split == "tail" else ["train", "val"])}
        bar = stack.enter_context(tqdm(unit="tok", unit_scale=True, desc="tokenizing", disable=not progress,
                                       mininterval=0.5))
        jobs = _jobs(docs, split, val_fraction)
        if workers > 1 and _can_spawn():
            # not multiprocessing.Pool: that waits forever for a worker that died, this raises BrokenProcessPool
            pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                       initargs=(tokenizer.backend.to_str(), parse_special_tokens))
            stack.callback(pool.shutdown, cancel_futures=True)
            encoded = _ordered_map(pool, _encode_batch, jobs, in_flight=2 * workers)
        else:  # one worker: this process (the tokenizer's encode_batch is multi-threaded anyway)
            _init_worker(tokenizer.backend.to_str(), parse_special_tokens)
            encoded = map(_encode_batch, jobs)
        # Both keep the corpus order, so the shards are the same whatever the number of workers.
        starts_document, content, special_strings = True, 0, 0
        try:
            for results, specials in encoded:
                special_strings += specials
                for ids, end, target in results:
                    content += len(ids)
                    if starts_document:
                        document_target = target  # all blocks of a document go where its first one goes
                        if bos is not None:
                            ids = np.insert(ids, 0, bos)
                    starts_document = end
                    if end and eos is not None:
                        ids = np.append(ids, eos)
                    array = ids.astype(dtype, copy=False)
                    sinks[document_target].write(array.tobytes())
                    counts["train" if document_target == "all" else document_target] += len(array)
                    bar.update(len(array))
        except BrokenProcessPool:
            raise LMStackError(
                "a tokenizer worker process died (killed, e.g. out of memory, or it re-ran the script that "
                "started it): guard the script's entry point with `if __name__ == \"__main__\":`, or use "
                "workers=1") from None
    total = counts["train"] + counts["val"]
    if content == 0:  # eos tokens alone (records of empty text) are no corpus either
        skipped = (f"; {len(stats.skipped_records):,} bad records were skipped, e.g. {stats.skipped_records[0]}"
                   if stats.skipped_records else "")
        raise LMStackError(f"the corpus is empty: no text in {[str(f) for f in files]}{skipped}")
    if split == "tail":
        # nanoGPT's data[:int(n * 0.9)], in exact arithmetic: 1 - 0.3 is 0.6999... in floating point
        n_train = math.floor(total * (1 - Fraction(str(val_fraction))))
        counts = {"train": n_train, "val": total - n_train}
        _split_tail(tmp / "all.bin", tmp / "train.bin", tmp / "val.bin", counts["train"], np.dtype(dtype).itemsize)
    tokenizer.save(tmp / "tokenizer")
    meta = {
        "dtype": np.dtype(dtype).name,
        "vocab_size": tokenizer.vocab_size,
        "eos_token_id": eos,
        "bos_token_id": bos,
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "documents": stats.documents,
        "split": split,
        "val_fraction": val_fraction,
        "sources": [str(f) for f in files],
        "files_not_utf8": stats.replaced_bytes_files,
        "replacement_chars": stats.replacement_chars,
        "empty_records": stats.empty_records,
        "skipped_records": len(stats.skipped_records),
        "skipped_examples": stats.skipped_records[:10],
        "special_token_strings": special_strings,
        "forced_cuts": stats.forced_cuts,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _check_replaceable(out: Path) -> None:
    """Refuse an `out` that is anything but missing, an empty directory or an earlier output: replacing it
    deletes what it holds, and --output may name the folder of the corpus."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir():
        names = {p.name for p in out.iterdir()}
        if not names:
            return
        try:
            meta = json.loads((out / "meta.json").read_text())
        except (OSError, ValueError):
            meta = None
        if isinstance(meta, dict) and "train_tokens" in meta and names <= SHARD_FILES:
            return
    raise LMStackError(f"{out} exists and is not a shard directory from `lmstack data prepare` (nor empty): "
                       "not replacing it, since that would delete what it holds; name a new or empty --output")


def _remove_stale_builds(full: Path) -> None:
    """Remove the temporary directories (`.<name>.tmp<PID>`, and their `.old`) that runs which were killed
    left next to `full`: those whose process is gone."""
    if os.name != "posix":  # os.kill(pid, 0) only asks on POSIX; elsewhere it would end the process
        return
    if not full.parent.is_dir():
        return
    stale = re.compile(rf"\.{re.escape(full.name)}\.tmp{re.escape(_HOST)}-(\d+)(\.old)?")
    for path in full.parent.iterdir():
        match = stale.fullmatch(path.name)
        if not match or int(match[1]) == os.getpid():
            continue
        try:
            os.kill(int(match[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (PermissionError, OverflowError):  # alive, another user's; or not a PID at all
            pass


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the finished `tmp` at `out`. An old output is first renamed aside, so `out` is never half-written
    and the old one is back if the rename fails."""
    if not out.exists() and not out.is_symlink():
        os.replace(tmp, out)
        return
    _check_replaceable(out)  # again: it may have changed while tokenizing
    old = tmp.with_name(f"{tmp.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)
        raise
    if old.is_symlink():  # --output was a link to a shard directory: the link is replaced, its target is kept
        old.unlink()
    else:
        shutil.rmtree(old)


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
        try:
            self.meta = json.loads(meta_file.read_text())
            self.dtype = np.dtype(self.meta["dtype"])
            sizes = {name: int(self.meta[f"{name}_tokens"]) for name in ("train", "val")}
        except (ValueError, TypeError, KeyError) as e:
            raise LMStackError(f"{meta_file}: not the meta.json of `lmstack data prepare` ({e!r})") from None
        self.splits = {}
        for name, n in sizes.items():
            file = self.path / f"{name}.bin"
            if n and (not file.exists() or file.stat().st_size < n * self.dtype.itemsize):
                have = file.stat().st_size if file.exists() else 0
                raise LMStackError(f"{file}: {have:,} bytes, but meta.json counts {n:,} {self.dtype} tokens "
                                   f"({n * self.dtype.itemsize:,} bytes): prepare the data again")
            self.splits[name] = np.memmap(file, dtype=self.dtype, mode="r", shape=(n,)) if n else \
                np.zeros(0, dtype=self.dtype)

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.path / "tokenizer")

    def __getitem__(self, split: str) -> np.ndarray:
        return self.splits[split]
