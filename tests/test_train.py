"""Pretraining: token shards, recipes, the schedule, exact resume after SIGKILL, DDP and FSDP on gloo."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lmstack import LMStackError, Tokenizer
from lmstack.cli import main
from lmstack.data import shards as shards_mod
from lmstack.data.shards import TokenShards, prepare_shards
from lmstack.tokenizer import GPT4_SPLIT
from lmstack.train.config import TrainConfig, load_config
from lmstack.train.loop import lr_at
from lmstack.train.tasks import batch_offsets
from tests.conftest import REPO, one_error_line

TEXT = (REPO / "data" / "tinyshakespeare.txt").read_text()

CORPUS = REPO / "data" / "tinyshakespeare.txt"
LMSTACK = [sys.executable, "-m", "lmstack.cli"]
TINY = ["--max_steps", "6", "--eval_interval", "3", "--checkpoint_interval", "3", "--block_size", "32",
        "--log_interval", "1", "--warmup_steps", "2", "--progress", "false", "--model.n_layer", "2",
        "--eval_batches", "2"]


@pytest.fixture(scope="module")
def char_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "shakespeare-char"
    text = CORPUS.read_text()
    prepare_shards([CORPUS], Tokenizer.train_chars([text]), out, workers=2, progress=False)
    return out


# ---------------------------------------------------------------------------------------------- data


def test_char_shards_match_nanogpt(char_shards):
    text = CORPUS.read_text()
    chars = sorted(set(text))
    data = TokenShards(char_shards)
    n = len(text)
    assert data.meta["vocab_size"] == 65 + 1 and data.meta["dtype"] == "uint16"  # 65 characters and <unk>
    assert len(data["train"]) == int(n * 0.9) and len(data["val"]) == n - int(n * 0.9)
    stoi = {c: i for i, c in enumerate(chars)}
    expected = np.array([stoi[c] for c in text[int(n * 0.9):]], dtype=np.uint16)
    assert np.array_equal(data["val"], expected)


@pytest.mark.parametrize("case", ["lines", "one-line", "gpt2", "no-spaces", "no-spaces-gpt2"])
def test_blockwise_tokenization_equals_whole(tmp_path, monkeypatch, case):
    text = CORPUS.read_text()[:300_000]
    if case == "one-line":  # no newline to cut at: blocks end before a single space between words instead
        text = text.replace("\n", " ")
    if case.startswith("no-spaces"):  # as Chinese text: no spaces, paragraphs apart by blank lines or CRLF
        lines = text.replace(" ", "").split("\n")
        text = "".join(line + ("\n\n" if i % 2 else "\r\n") for i, line in enumerate(lines))
    if case == "gpt2":  # GPT-2's `\s+(?!\S)` splits "\n\n", "\r\n", " \n" before a word, but not at a block end
        endings = ["\n", "\r\n", " \n", "\n\n", "\t\n", "\n\t"]
        text = "".join(line + endings[i % len(endings)] for i, line in enumerate(text.split("\n")))
        text = text.replace(": ", ":\t")
    tok = Tokenizer.train([text], vocab_size=500, split_pattern=None if case.endswith("gpt2") else GPT4_SPLIT)
    src = tmp_path / "corpus.txt"
    src.write_bytes(text.encode())  # "\r\n" as it is
    monkeypatch.setattr(shards_mod, "BLOCK_CHARS", 4096)  # ~70 blocks
    blocks = list(shards_mod._text_blocks(src, shards_mod.ReadStats()))
    assert "".join(blocks) == text and len(blocks) > 50 and max(map(len, blocks)) <= 2 * 4096  # streamed
    prepare_shards([src], tok, tmp_path / "s", val_fraction=0.0, workers=2, progress=False)
    got = TokenShards(tmp_path / "s")["train"]
    assert got.tolist() == tok.encode(text) + [tok.eos_token_id]


def _sentencepiece_style(text: str, prepend: str) -> Tokenizer:
    """A BPE spelled as SentencePiece's: spaces as "▁", one put in front of the text, no split at newlines
    (Llama 2 and Mistral, and lmstack's GGUF loader for them: `prepend="normalizer"`; newer tokenizer.json
    files: `prepend="metaspace"`)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    backend = Backend(models.BPE(unk_token="<unk>", byte_fallback=True))
    if prepend == "normalizer":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    backend.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>"]))
    return Tokenizer(backend, eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("prepend", ["normalizer", "metaspace"])
def test_blockwise_tokenization_of_a_sentencepiece_style_tokenizer(tmp_path, monkeypatch, prepend):
    """Blocks after the first get no "▁" in front, and end at spaces ("\nt" may be one piece): the shards hold
    the whole-file encoding. lmstack's own byte-level BPE is left as it is."""
    text = CORPUS.read_text()[:60_000]
    tok = _sentencepiece_style(text, prepend)
    assert shards_mod.continuation_tokenizer_json(tok.backend.to_str()) is not None
    assert shards_mod.continuation_tokenizer_json(Tokenizer.train([text[:5000]], 300).backend.to_str()) is None
    src = tmp_path / "corpus.txt"
    src.write_text(text)
    monkeypatch.setattr(shards_mod, "BLOCK_CHARS", 1024)
    assert len(list(shards_mod._text_blocks(src, shards_mod.ReadStats(), spaces_only=True))) > 40
    prepare_shards([src], tok, tmp_path / "s", val_fraction=0.0, workers=1, progress=False)
    assert TokenShards(tmp_path / "s")["train"].tolist() == tok.encode(text) + [tok.eos_token_id]


@pytest.mark.parametrize("add_bos", [True, False])
def test_each_document_opens_with_bos_where_the_tokenizer_adds_one(tmp_path, add_bos):
    """As the tokenizer's encode puts bos before a prompt (Llama 2, Mistral), each document of the shards
    opens with it; a bos the tokenizer only names (GPT-2's) is not added."""
    docs = ["First doc here.", "And a second, longer document."]
    tok = Tokenizer.train(docs * 20, 300, special_tokens=["<s>", "</s>"], bos_token="<s>", eos_token="</s>",
                          add_bos=add_bos)
    assert tok.adds_bos is add_bos
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    meta = prepare_shards([src], tok, tmp_path / "s", val_fraction=0.0, workers=1, progress=False)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    plain = [tok.encode(d, add_special_tokens=False) for d in docs]
    expected = [t for ids in plain for t in ([bos] if add_bos else []) + ids + [eos]]
    assert TokenShards(tmp_path / "s")["train"].tolist() == expected
    assert meta["bos_token_id"] == (bos if add_bos else None)


def test_replacements_are_counted_whatever_the_read_size(tmp_path):
    """Each bad byte sequence counts once, a genuine U+FFFD never, even when its bytes straddle two reads."""
    from lmstack.data.readers import ReadStats, iter_text_chunks

    path = tmp_path / "t.txt"
    path.write_bytes("ab\ufffdcd café ".encode() + b"\xe9 \xff\xfe ok \xe2\x82")
    for size in (1, 2, 3, 4, 100):
        stats = ReadStats()
        assert "".join(iter_text_chunks(path, stats, size)) == "ab\ufffdcd café \ufffd \ufffd\ufffd ok \ufffd"
        assert stats.replacement_chars == 4


def test_parquet_text_that_is_not_utf8_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    offsets = pa.py_buffer(np.array([0, 3], dtype=np.int32).tobytes())  # Arrow does not check the bytes
    column = pa.Array.from_buffers(pa.string(), 1, [None, offsets, pa.py_buffer(b"ok\xff")])
    pq.write_table(pa.table({"text": column}), tmp_path / "bad.parquet")
    with pytest.raises(LMStackError, match=r"bad.parquet: Parquet column 'text' holds bytes that are not UTF-8"):
        prepare_shards([tmp_path / "bad.parquet"], Tokenizer.train_chars(["ok"]), tmp_path / "s", progress=False,
                       workers=1)


def test_jsonl_documents_eos_and_bad_records(tmp_path):
    tok = Tokenizer.train(["hello world, good day"] * 20, vocab_size=300)
    good = tmp_path / "a.jsonl"
    good.write_text('{"text": "hello"}\n{"text": "world"}\n')
    prepare_shards([good], tok, tmp_path / "s", val_fraction=0.0, progress=False, workers=1)
    ids = TokenShards(tmp_path / "s")["train"].tolist()
    eos = tok.eos_token_id
    assert ids == tok.encode("hello") + [eos] + tok.encode("world") + [eos]

    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "hello"}\n{"body": "no text"}\n{"text": "world"}\n')
    with pytest.raises(LMStackError, match=r"b.jsonl:2: record has no field 'text'"):
        prepare_shards([bad], tok, tmp_path / "t", progress=False, workers=1)
    assert not (tmp_path / "t").exists()  # nothing half-written
    meta = prepare_shards([bad], tok, tmp_path / "t", val_fraction=0.0, on_bad_record="skip", progress=False,
                          workers=1)
    assert meta["skipped_records"] == 1 and "b.jsonl:2" in meta["skipped_examples"][0]
    assert meta["train_tokens"] == len(ids)


def test_special_token_strings_in_the_text_are_text(tmp_path, capsys):
    """A literal "<|endoftext|>" in a document is its characters, not a document break (counted and noted);
    --parse-special-tokens reads it as the token, for text rendered with a chat template."""
    from lmstack.cli import main

    tok = Tokenizer.train(["say hello now, good day"] * 20, vocab_size=300)
    tok.save(tmp_path / "tok")
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "say <|endoftext|> now"}\n')
    eos = tok.eos_token_id
    for workers in (1, 2):
        meta = prepare_shards([src], tok, tmp_path / "s", val_fraction=0.0, progress=False, workers=workers)
        ids = TokenShards(tmp_path / "s")["train"].tolist()
        assert ids.count(eos) == 1 and ids[-1] == eos and meta["special_token_strings"] == 1
        assert tok.decode(ids[:-1]) == "say <|endoftext|> now"
    assert main(["data", "prepare", "--input", str(src), "--tokenizer", str(tmp_path / "tok"), "--output",
                 str(tmp_path / "p"), "--val-fraction", "0", "--parse-special-tokens"]) == 0
    assert TokenShards(tmp_path / "p")["train"].tolist().count(eos) == 2
    assert main(["data", "prepare", "--input", str(src), "--tokenizer", str(tmp_path / "tok"), "--output",
                 str(tmp_path / "q"), "--val-fraction", "0"]) == 0
    assert "1 special-token strings (such as <|endoftext|>), tokenized as text" in capsys.readouterr().err


def test_text_without_boundaries_is_cut_to_bounded_blocks(tmp_path, monkeypatch):
    """A file with no space or newline (a genome) streams in blocks of bounded size, each cut counted, and
    the blocks put together are the file."""
    monkeypatch.setattr(shards_mod, "BLOCK_CHARS", 64)
    monkeypatch.setattr(shards_mod, "MAX_BLOCK_CHARS", 256)
    text = "ACGT" * 1000
    (tmp_path / "g.txt").write_text(text)
    stats = shards_mod.ReadStats()
    blocks = list(shards_mod._text_blocks(tmp_path / "g.txt", stats))
    assert "".join(blocks) == text
    assert max(map(len, blocks)) <= 256 + 64 and stats.forced_cuts == len(blocks) - 1 > 10
    for size in (257, 300):  # past the limit only in the last read: the file's end, no cut
        (tmp_path / "short.txt").write_text("A" * size)
        stats = shards_mod.ReadStats()
        assert list(shards_mod._text_blocks(tmp_path / "short.txt", stats)) == ["A" * size]
        assert stats.forced_cuts == 0
    tok = Tokenizer.train_chars(["ACGT"])
    meta = prepare_shards([tmp_path / "g.txt"], tok, tmp_path / "s", val_fraction=0.0, progress=False, workers=1)
    assert tok.decode(TokenShards(tmp_path / "s")["train"].tolist()) == text and meta["forced_cuts"] > 10


def test_records_of_empty_text_are_an_empty_corpus(tmp_path):
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    tok = Tokenizer.train(["hello world"] * 10, vocab_size=270)
    with pytest.raises(LMStackError, match="the corpus is empty"):
        prepare_shards([tmp_path / "e.jsonl"], tok, tmp_path / "s", progress=False, workers=1)


def test_a_corpus_of_skipped_records_says_so(tmp_path, capsys):
    """Every record lacks the field: the empty-corpus error says they were skipped, and why."""
    (tmp_path / "b.jsonl").write_text('{"body": "hello"}\n{"body": "world"}\n')
    Tokenizer.train(["hello world"] * 10, vocab_size=270).save(tmp_path / "tok")
    err = one_error_line(capsys, "data", "prepare", "--input", str(tmp_path / "b.jsonl"), "--tokenizer",
                         str(tmp_path / "tok"), "--output", str(tmp_path / "s"), "--on-bad-record", "skip")
    assert "the corpus is empty" in err and "2 bad records were skipped" in err and "b.jsonl:1:" in err


def test_repeated_inputs_add_up(tmp_path):
    """`--input a --input b` reads both files, as `--input a b` does (argparse would keep only the last)."""
    (tmp_path / "a.txt").write_text("first file\n")
    (tmp_path / "b.txt").write_text("second file\n")
    Tokenizer.train(["first second file"] * 10, vocab_size=270).save(tmp_path / "tok")
    assert main(["data", "prepare", "--input", str(tmp_path / "a.txt"), "--input", str(tmp_path / "b.txt"),
                 "--tokenizer", str(tmp_path / "tok"), "--output", str(tmp_path / "s"), "--val-fraction", "0",
                 "--workers", "1"]) == 0
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert [Path(f).name for f in meta["sources"]] == ["a.txt", "b.txt"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process parents from /proc (Linux)")
def test_workers_end_when_data_prepare_is_killed(tmp_path):
    """`kill -9` of `lmstack data prepare` never shuts its pool down: the workers (and multiprocessing's
    resource tracker) must notice on their own, or they wait on their queue for ever."""
    (tmp_path / "big.txt").write_text(TEXT * 20)
    Tokenizer.train([TEXT[:50_000]], vocab_size=300).save(tmp_path / "tok")
    proc = subprocess.Popen([sys.executable, "-m", "lmstack.cli", "data", "prepare", "--input",
                             str(tmp_path / "big.txt"), "--tokenizer", str(tmp_path / "tok"), "--output",
                             str(tmp_path / "s"), "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children(pid: int) -> list[int]:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(stat.parent.name))
        return found

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 60
    while len(workers := children(proc.pid)) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)  # two workers and the resource tracker
    time.sleep(1.0)  # the workers are past their start-up, reading their queue
    if proc.poll() is not None:
        pytest.skip("data prepare finished before it could be killed")
    assert len(workers) >= 3
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 20
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [w for w in workers if alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, "worker processes outlived their parent"


def test_a_field_added_since_a_run_started_is_no_config_change():
    """A run saved before a field existed ran with its default: resuming it is not refused for that field."""
    from lmstack.train.config import config_differences

    cfg = load_config(None, ["--data", "d"])
    saved = cfg.to_dict()
    del saved["kto_desirable_weight"]
    assert config_differences(saved, cfg) == []
    saved["seed"] = 7
    assert config_differences(saved, cfg) == [f"seed: run has 7, now {cfg.seed}"]


@pytest.mark.parametrize("fraction,total,train", [(0.3, 90, 63), (0.07, 100, 93), (0.1, 90, 81)])
def test_tail_split_is_exact(tmp_path, fraction, total, train):
    """floor(total * (1 - val_fraction)) in exact arithmetic: 1 - 0.3 is 0.6999... in floating point, which
    would give 62 of 90."""
    (tmp_path / "t.txt").write_text("a" * total)
    meta = prepare_shards([tmp_path / "t.txt"], Tokenizer.train_chars(["a"]), tmp_path / "s",
                          val_fraction=fraction, progress=False, workers=1)
    assert (meta["train_tokens"], meta["val_tokens"]) == (train, total - train)


def test_not_utf8_is_replaced_and_counted(tmp_path):
    tok = Tokenizer.train(["abc"] * 10, vocab_size=260)
    src = tmp_path / "latin1.txt"
    src.write_bytes("café déjà vu \ufffd".encode() + b" \xe9\xff end")
    meta = prepare_shards([src], tok, tmp_path / "s", val_fraction=0.0, progress=False, workers=1)
    assert meta["replacement_chars"] == 2 and meta["files_not_utf8"] == [str(src)]


def test_empty_corpus(tmp_path):
    src = tmp_path / "empty.txt"
    src.write_text("")
    tok = Tokenizer.train_chars(["ab"])
    with pytest.raises(LMStackError, match="the corpus is empty"):
        prepare_shards([src], tok, tmp_path / "s", progress=False, workers=1)


def test_a_damaged_parquet_file_is_named_wherever_it_breaks(tmp_path):
    """One byte changed anywhere in a Parquet file: its texts, or an error naming the file, never a traceback
    from pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmstack.data.readers import iter_texts

    pq.write_table(pa.table({"text": [f"document {i} " * 20 for i in range(30)]}), tmp_path / "good.parquet")
    data = (tmp_path / "good.parquet").read_bytes()
    for offset in range(0, len(data), max(1, len(data) // 150)):
        damaged = bytearray(data)
        damaged[offset] ^= 0xFF
        (tmp_path / "bad.parquet").write_bytes(bytes(damaged))
        try:
            list(iter_texts([tmp_path / "bad.parquet"]))
        except LMStackError as e:
            assert "bad.parquet" in str(e)


def test_parquet_and_hash_split(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"document {i} " * 3 for i in range(200)]
    pq.write_table(pa.table({"content": docs}), tmp_path / "d.parquet")
    tok = Tokenizer.train(docs, vocab_size=300)
    meta = prepare_shards([tmp_path / "d.parquet"], tok, tmp_path / "s", text_field="content", split="hash",
                          val_fraction=0.2, progress=False, workers=2)
    assert meta["documents"] == 200
    assert 0.1 < meta["val_tokens"] / (meta["train_tokens"] + meta["val_tokens"]) < 0.3
    again = prepare_shards([tmp_path / "d.parquet"], tok, tmp_path / "s2", text_field="content", split="hash",
                           val_fraction=0.2, progress=False, workers=1)
    assert again["val_tokens"] == meta["val_tokens"]  # deterministic, whatever the number of workers
    with pytest.raises(LMStackError, match="no column 'text'"):
        prepare_shards([tmp_path / "d.parquet"], tok, tmp_path / "s3", progress=False, workers=1)
    # a null is a bad record, as a JSONL null is: named by its row, or skipped and counted
    pq.write_table(pa.table({"text": ["one document", None, "another"]}), tmp_path / "n.parquet")
    with pytest.raises(LMStackError, match=r"n.parquet: row 2: field 'text' is null"):
        prepare_shards([tmp_path / "n.parquet"], tok, tmp_path / "s4", progress=False, workers=1)
    meta = prepare_shards([tmp_path / "n.parquet"], tok, tmp_path / "s4", progress=False, workers=1,
                          on_bad_record="skip")
    assert meta["documents"] == 2 and meta["skipped_records"] == 1
    from lmstack.cli import main

    assert main(["tokenizer", "train", "--input", str(tmp_path / "n.parquet"), "--vocab-size", "270", "--output",
                 str(tmp_path / "tok"), "--on-bad-record", "skip"]) == 0


def test_prepare_replaces_only_shard_directories(tmp_path):
    tok = Tokenizer.train_chars(["abc\n"])
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "corpus.txt").write_text("abcabc\n" * 50)
    (precious / "notes.md").write_text("x\n")
    with pytest.raises(LMStackError, match="precious exists and is not a shard directory"):
        prepare_shards([precious / "corpus.txt"], tok, precious, progress=False, workers=1)
    assert sorted(p.name for p in precious.iterdir()) == ["corpus.txt", "notes.md"]
    assert [p.name for p in tmp_path.iterdir()] == ["precious"]  # no temporary directory left behind

    out = tmp_path / "shards"
    out.mkdir()  # an empty directory is fine
    prepare_shards([precious / "corpus.txt"], tok, out, progress=False, workers=1)
    (out / "train.bin").write_bytes(b"")  # an earlier output is replaced as a whole
    meta = prepare_shards([precious / "corpus.txt"], tok, out, val_fraction=0.0, progress=False, workers=1)
    assert len(TokenShards(out)["train"]) == meta["train_tokens"] == 350
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious", "shards"]
    (out / "notes.md").write_text("x\n")  # a shard directory that holds something else is left alone too
    with pytest.raises(LMStackError, match="not a shard directory"):
        prepare_shards([precious / "corpus.txt"], tok, out, progress=False, workers=1)
    assert (out / "notes.md").exists()


def test_jsonl_skip_drops_only_bad_lines(tmp_path):
    from lmstack.data.readers import iter_json_lines, iter_texts

    tok = Tokenizer.train(["hello world, good day"] * 20, vocab_size=300)
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "hello"}\nnot json\n{"text": "a"}\n[1, 2]\n{"text": 3}\n{"text": "b"}\n')
    meta = prepare_shards([bad], tok, tmp_path / "s", val_fraction=0.0, on_bad_record="skip", progress=False,
                          workers=1)
    assert meta["documents"] == 3 and meta["skipped_records"] == 3
    assert [e.split(": ")[0] for e in meta["skipped_examples"]] == [f"{bad}:2", f"{bad}:4", f"{bad}:5"]
    eos = tok.eos_token_id
    assert TokenShards(tmp_path / "s")["train"].tolist() == [
        *tok.encode("hello"), eos, *tok.encode("a"), eos, *tok.encode("b"), eos]
    # an empty text is no document (no second eos in a row); a line nested too deep for Python's parser is bad
    deep = '{"text": "x", "meta": ' + "[" * 5000 + "]" * 5000 + "}"
    bad.write_text(f'{{"text": "hello"}}\n{{"text": ""}}\n{deep}\n{{"text": "a"}}\n')
    meta = prepare_shards([bad], tok, tmp_path / "e", val_fraction=0.0, on_bad_record="skip", progress=False,
                          workers=1)
    assert (meta["documents"], meta["empty_records"], meta["skipped_records"]) == (2, 1, 1)
    assert meta["skipped_examples"] == [f"{bad}:3: not valid JSON (nested too deeply)"]
    assert TokenShards(tmp_path / "e")["train"].tolist() == [*tok.encode("hello"), eos, *tok.encode("a"), eos]
    with pytest.raises(LMStackError, match=r"b.jsonl:3: not valid JSON \(nested too deeply\)"):
        prepare_shards([bad], tok, tmp_path / "f", progress=False, workers=1)
    with pytest.raises(LMStackError, match=r"b.jsonl:3: not valid JSON \(nested too deeply\)"):
        list(iter_json_lines(bad))  # finetuning and metric files are read through it
    bad.write_text('{"text": "hello"}\n[1, 2]\n')
    with pytest.raises(LMStackError, match=r"b.jsonl:2: expected a JSON object, got list"):
        prepare_shards([bad], tok, tmp_path / "t", progress=False, workers=1)
    # the --tokenizer char path reads the corpus through iter_texts first
    bad.write_text('{"text": "hello"}\nnot json\n{"text": "xyz"}\n')
    with pytest.raises(LMStackError, match=r"b.jsonl:2: not valid JSON"):
        list(iter_texts([bad]))
    assert list(iter_texts([bad], on_bad_record="skip")) == ["hello", "xyz"]
    # a lone "\r" is JSON whitespace, not a line end: the record parses and later line numbers stay right
    bad.write_bytes(b'{"text": "one",\r "id": 1}\r\n{"text": "two"}\nnot json\n')
    assert list(iter_texts([bad], on_bad_record="skip")) == ["one", "two"]
    with pytest.raises(LMStackError, match=r"b.jsonl:3: not valid JSON"):
        list(iter_texts([bad]))
    # ... and so does the CLI, which also says that a char tokenizer has no eos to separate documents
    cli = _run(["data", "prepare", "--input", str(bad), "--tokenizer", "char", "--output", str(tmp_path / "c"),
                "--on-bad-record", "skip", "--val-fraction", "0.3"])
    assert cli.returncode == 0, cli.stderr
    assert "from 2 documents" in cli.stdout and "skipped 1 bad records, e.g. " in cli.stderr
    assert "no eos token, so the 2 documents follow each other" in cli.stderr


def test_failed_prepare_leaves_no_temporary_directory(tmp_path):
    tok = Tokenizer.train_chars(["ab"])
    bad = tmp_path / "in" / "b.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"text": "ab"}\n' * 500 + "not json\n")
    with pytest.raises(LMStackError, match="not valid JSON"):
        prepare_shards([bad], tok, tmp_path / "out", progress=False, workers=1)
    good = tmp_path / "in" / "good.txt"
    good.write_text("ab\n" * 500)
    with pytest.raises(LMStackError, match="no such file"):
        prepare_shards([good, tmp_path / "missing.txt"], tok, tmp_path / "out", progress=False, workers=1)
    assert [p.name for p in tmp_path.iterdir()] == ["in"]


def test_char_tokenizer_reads_parquet_and_jsonl_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmstack.data.readers import iter_texts

    pq.write_table(pa.table({"content": ["abc", "cab"]}), tmp_path / "d.parquet")
    (tmp_path / "d.jsonl").write_text('{"content": "xyz"}\n')
    texts = list(iter_texts([tmp_path / "d.parquet", tmp_path / "d.jsonl"], "content"))
    assert texts == ["abc", "cab", "xyz"]
    assert Tokenizer.train_chars(texts).vocab_size == 6 + 1


def test_parquet_column_that_is_not_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmstack.data.readers import iter_texts

    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "n.parquet")
    tok = Tokenizer.train_chars(["ab"])
    with pytest.raises(LMStackError, match=r"n.parquet: Parquet column 'text' holds int64, not text"):
        prepare_shards([tmp_path / "n.parquet"], tok, tmp_path / "s", progress=False, workers=1)
    with pytest.raises(LMStackError, match=r"n.parquet: Parquet column 'text'"):
        list(iter_texts([tmp_path / "n.parquet"]))


def test_jsonl_not_utf8_is_replaced_and_counted(tmp_path):
    tok = Tokenizer.train_chars(["cafe"])
    src = tmp_path / "l1.jsonl"
    src.write_bytes(b'{"text": "caf\xe9"}\n{"text": "ok \xef\xbf\xbd"}\n{"text": "\xe2\x82 x"}\n')
    meta = prepare_shards([src], tok, tmp_path / "s", val_fraction=0.0, progress=False, workers=1)
    # a genuine U+FFFD is not an error; a cut-off sequence is one replacement, as in a text file
    assert meta["files_not_utf8"] == [str(src)] and meta["replacement_chars"] == 2
    assert meta["documents"] == 3


def test_jsonl_lone_surrogate_is_replaced_and_counted(tmp_path):
    from lmstack.data.readers import iter_texts

    tok = Tokenizer.train(["ab"] * 10, vocab_size=260)
    src = tmp_path / "s.jsonl"
    src.write_text('{"text": "a\\ud800b"}\n')  # valid JSON, but no text: the tokenizer cannot take it
    meta = prepare_shards([src], tok, tmp_path / "s", val_fraction=0.0, progress=False, workers=1)
    assert meta["files_not_utf8"] == [str(src)] and meta["replacement_chars"] == 1
    assert TokenShards(tmp_path / "s")["train"].tolist() == tok.encode("a\ufffdb") + [tok.eos_token_id]
    assert list(iter_texts([src])) == ["a\ufffdb"]  # the --tokenizer char path


def test_cut_off_utf8_at_end_of_file_is_kept(tmp_path):
    src = tmp_path / "t.txt"
    src.write_bytes(b"caf\xc3\xa9 \xe9")
    stats = shards_mod.ReadStats()
    assert list(shards_mod._text_blocks(src, stats)) == ["café \ufffd"] and stats.replacement_chars == 1


def test_char_vocabulary_keeps_crlf_and_drops_bom(tmp_path, monkeypatch):
    from lmstack.data import readers
    from lmstack.data.readers import iter_texts

    src = tmp_path / "crlf.txt"
    src.write_bytes("\ufeffab\r\ncd\r\n".encode() * 40)
    text = "ab\r\ncd\r\n" + "\ufeffab\r\ncd\r\n" * 39  # a BOM is dropped at the start of the file only
    assert list(iter_texts([src])) == [text]
    monkeypatch.setattr(readers, "CHUNK_CHARS", 16)
    chunks = list(iter_texts([src], chunked=True))  # streamed, for a character vocabulary
    assert len(chunks) > 10 and "".join(chunks) == text
    tok = Tokenizer.train_chars(chunks)
    prepare_shards([src], tok, tmp_path / "s", val_fraction=0.0, progress=False, workers=1)
    ids = TokenShards(tmp_path / "s")["train"].tolist()
    assert tok.token_to_id("<unk>") not in ids and tok.decode(ids) == text


def test_byte_order_mark_is_not_text(tmp_path):
    tok = Tokenizer.train(["hello world"] * 10, vocab_size=300)
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_bytes('\ufeff{"text": "hello"}\n'.encode())
    txt = tmp_path / "b.txt"
    txt.write_bytes("\ufeffworld".encode())
    prepare_shards([jsonl, txt], tok, tmp_path / "s", val_fraction=0.0, progress=False, workers=1)
    eos = tok.eos_token_id
    assert TokenShards(tmp_path / "s")["train"].tolist() == [*tok.encode("hello"), eos, *tok.encode("world"), eos]


def test_hash_split_keeps_a_long_text_file_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(shards_mod, "BLOCK_CHARS", 64)
    files = []
    for i in range(6):  # six documents of ~10 blocks each
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text("".join(f"line {i} {j} abc\n" for j in range(40)))
    tok = Tokenizer.train_chars(f.read_text() for f in files)
    meta = prepare_shards(files, tok, tmp_path / "s", split="hash", val_fraction=0.5, progress=False, workers=1)
    val = tok.decode(TokenShards(tmp_path / "s")["val"].tolist())
    assert all(val.count(f"line {i} ") in (0, 40) for i in range(6))  # each document whole in one split
    assert 0 < meta["val_tokens"] < meta["train_tokens"] + meta["val_tokens"]  # (and both splits have some)


def test_output_that_is_the_current_directory_is_refused(tmp_path, monkeypatch):
    src = tmp_path / "c.txt"
    src.write_text("ab\n")
    work = tmp_path / "empty"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", str(work), "../empty"):
        with pytest.raises(LMStackError, match="current directory"):
            prepare_shards([src], Tokenizer.train_chars(["ab\n"]), out, progress=False, workers=1)
    assert list(work.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "empty"]


def test_output_symlink_to_a_directory_is_followed(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("ab\n" * 10)
    tok = Tokenizer.train_chars(["ab\n"])
    (tmp_path / "real").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real", target_is_directory=True)
    for _ in range(2):  # a new output, then an earlier one replaced
        prepare_shards([src], tok, link, val_fraction=0.0, progress=False, workers=1)
        assert link.is_symlink() and (tmp_path / "real" / "meta.json").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "link", "real"]
    assert TokenShards(link).meta["train_tokens"] == 30


def test_stale_temporary_directories_are_removed(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("ab\n")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a process that has exited: its PID is free
    here = f".s.tmp{shards_mod._HOST}-"
    kept = [f"{here}{os.getppid()}", ".s.tmpx", f".t.tmp{shards_mod._HOST}-{dead}", f".s.tmpother-host-{dead}"]
    for name in (f"{here}{dead}", f"{here}{dead}.old", *kept):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.bin").write_bytes(b"\0" * 8)
    prepare_shards([src], Tokenizer.train_chars(["ab\n"]), tmp_path / "s", progress=False, workers=1)
    # live, another machine's, or not a build of this output: kept
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "c.txt", "s"])


def test_dead_tokenizer_worker_is_an_error_not_a_hang(tmp_path):
    # A script without a main guard: each spawned worker re-runs it on import, and dies starting its own.
    (tmp_path / "c.txt").write_text("ab\n" * 100)
    script = tmp_path / "prep.py"
    script.write_text("from lmstack import Tokenizer\nfrom lmstack.data.shards import prepare_shards\n"
                      "prepare_shards(['c.txt'], Tokenizer.train_chars(['ab\\n']), 'out', workers=2, progress=False)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode != 0 and "a tokenizer worker process died" in run.stderr
    assert 'if __name__ == "__main__":' in run.stderr.splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "prep.py"]  # no shards, no temporary directory


# ---------------------------------------------------------------------------------------------- config


def test_recipe_unknown_key_lists_valid_ones(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 1e-3\nlearnin_rate: 2\n")
    with pytest.raises(LMStackError, match=r"unknown key 'learnin_rate'; valid keys: .*learning_rate"):
        load_config(recipe)


def test_overrides_are_typed(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_steps: 10\nmodel_overrides: {n_layer: 2}\n")
    cfg = load_config(recipe, ["--max_steps", "20", "--learning_rate=3e-4", "--compile", "true",
                               "--model.n_embd", "128", "--lr_decay_steps", "none"])
    assert cfg.max_steps == 20 and cfg.learning_rate == 3e-4 and cfg.compile is True
    assert cfg.model_overrides == {"n_layer": 2, "n_embd": 128} and cfg.lr_decay_steps is None
    with pytest.raises(LMStackError, match="max_steps: expected an integer"):
        load_config(recipe, ["--max_steps", "ten"])
    # A whole mapping replaces the recipe's (so `{}` clears it, for a run that starts from a checkpoint);
    # --model.KEY values still add to it, in any order.
    # A prompt is free text: one prompt, colon and comma included; a YAML list gives several
    assert load_config(recipe, ["--sample_prompts", "ROMEO:"]).sample_prompts == ["ROMEO:"]
    assert load_config(recipe, ["--sample_prompts", "Hello, world"]).sample_prompts == ["Hello, world"]
    assert load_config(recipe, ["--sample_prompts", '["a", "b:"]']).sample_prompts == ["a", "b:"]
    assert load_config(recipe, ["--lora_targets", "q,v"]).lora_targets == ["q", "v"]
    assert load_config(recipe, ["--model_overrides", "{}"]).model_overrides == {}
    assert load_config(recipe, ["--model_overrides", "null"]).model_overrides == {}
    cfg = load_config(recipe, ["--model.n_head", "4", "--model_overrides", "{n_embd: 64}"])
    assert cfg.model_overrides == {"n_embd": 64, "n_head": 4}


def test_model_overrides_take_their_field_types(tmp_path):
    """YAML reads `1e-06` (no dot, as Python writes small floats to a run's config.json) as a string: a model
    override is converted to its ModelConfig type, so a run resumes and the model builds."""
    from lmstack.train.config import config_differences

    cfg = load_config(None, ["--data", "d", "--model.norm_eps", "1e-6", "--model.dropout", "1e-1",
                             "--model.sliding_window", "none", "--model.tie_embeddings", "false"])
    assert cfg.model_overrides == {"norm_eps": 1e-6, "dropout": 0.1, "sliding_window": None,
                                   "tie_embeddings": False}
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(cfg.saved_dict()))
    assert "1e-06" in saved.read_text()
    again = load_config(saved)
    assert again.model_overrides["norm_eps"] == 1e-6 and config_differences(cfg.saved_dict(), again) == []
    assert again.model_config(vocab_size=65).norm_eps == 1e-6
    with pytest.raises(LMStackError, match="model_overrides.norm_eps: expected a number, got 'small'"):
        load_config(None, ["--data", "d", "--model.norm_eps", "small"])


@pytest.mark.parametrize("line", ["learning_rate: true", "grad_clip: false", "weight_decay: yes"])
def test_yaml_booleans_are_not_numbers(tmp_path, line):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(line + "\n")
    with pytest.raises(LMStackError, match=f"{line.split(':')[0]}: expected a number, got (True|False)"):
        load_config(recipe, ["--data", "d"])


def test_a_run_resumes_from_another_directory(tmp_path, monkeypatch):
    """Files a run names are saved absolute and compared by where they are, however they were named."""
    from lmstack.train.config import config_differences

    (tmp_path / "shards").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["--data", "shards"])
    saved = cfg.saved_dict()
    assert saved["data"] == str(tmp_path / "shards") and cfg.data == "shards"
    old = cfg.to_dict()  # a run saved before paths were made absolute, resumed from where it started
    assert config_differences(old, load_config(None, ["--data", str(tmp_path / "shards")])) == []
    monkeypatch.chdir(tmp_path.parent)
    assert config_differences(saved, load_config(None, ["--data", str(tmp_path / "shards")])) == []
    assert config_differences(saved, load_config(None, ["--data", "elsewhere"])) == [
        f"data: run has {str(tmp_path / 'shards')!r}, now 'elsewhere'"]


def test_precision_refusals():
    from lmstack.train.loop import resolve_precision

    fp16 = load_config(None, ["--data", "d", "--precision", "fp16", "--distributed", "fsdp"])
    assert resolve_precision(fp16, torch.device("cuda")) == "fp16"
    with pytest.raises(LMStackError, match="fp16 is not supported with distributed: fsdp"):
        resolve_precision(fp16, torch.device("cuda"), sharded=True)
    with pytest.raises(LMStackError, match="fp16 needs a GPU"):
        resolve_precision(fp16, torch.device("cpu"))


def test_one_gpu_index_under_torchrun_is_refused(monkeypatch):
    from lmstack.train.loop import setup_runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LMStackError, match="would put all 2 processes on one GPU"):
        setup_runtime(load_config(None, ["--data", "d", "--device", "cuda:1"]))


def test_recipes_parse():
    for recipe in (REPO / "recipes").glob("*.yaml"):
        cfg = load_config(recipe)
        if cfg.task == "pretrain":  # finetuning recipes start from a checkpoint, not a preset
            cfg.model_config(vocab_size=65)


def test_lr_schedule_hand_values():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-3 / 11)
    assert lr_at(9, cfg) == pytest.approx(1e-3 * 10 / 11)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.5 * 0.9e-3)  # halfway: cos = 0
    assert lr_at(110, cfg) == pytest.approx(1e-4)


def test_batches_depend_only_on_seed_and_step():
    a = batch_offsets(1, 5, 8, 1000, 32)
    assert np.array_equal(a, batch_offsets(1, 5, 8, 1000, 32))
    assert not np.array_equal(a, batch_offsets(1, 6, 8, 1000, 32))
    assert a.max() <= 1000 - 32 - 1
    with pytest.raises(LMStackError, match="fewer than block_size"):
        batch_offsets(1, 0, 1, 20, 32)


def test_activation_checkpointing_same_gradients():
    from lmstack import DecoderLM, ModelConfig

    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_name("tiny-llama"))
    ids = torch.randint(0, 256, (2, 16))
    _, loss = model(ids, ids)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = True
    _, loss2 = model(ids, ids)
    loss2.backward()
    assert torch.equal(loss, loss2)
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(grads, model.parameters()))


# ---------------------------------------------------------------------------------------------- runs


def _run(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*LMSTACK, *args], capture_output=True, text=True, env=env, **kw)


def _losses(run_dir, key="loss"):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in lines if key in r]


def test_resume_after_sigkill_logs_identical_losses(char_shards, tmp_path):
    args = ["pretrain", "--data", str(char_shards), "--max_steps", "150", "--eval_interval", "25",
            "--checkpoint_interval", "20", "--batch_size", "4", "--block_size", "32", "--log_interval", "1",
            "--warmup_steps", "5", "--model.dropout", "0.1", "--model.n_layer", "1", "--progress", "false"]
    full = _run([*args, "--out_dir", str(tmp_path / "a")])
    assert full.returncode == 0, full.stderr
    run = tmp_path / "b"
    proc = subprocess.Popen([*LMSTACK, *args, "--out_dir", str(run)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step-0000040").exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "checkpoints" / "step-0000150").exists()  # it was killed mid-run
    assert not list((run / "checkpoints").glob("*.tmp"))
    resumed = _run(["pretrain", "--resume", str(run), "--progress", "false"])
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(run) == _losses(tmp_path / "a")
    assert _losses(run, "val_loss") == _losses(tmp_path / "a", "val_loss")
    assert (run / "loss.png").stat().st_size > 10_000

    changed = _run(["pretrain", "--resume", str(run), "--batch_size", "8"])
    assert changed.returncode == 1
    assert "cannot resume with a different config: batch_size: run has 4, now 8" in changed.stderr
    again = _run([*args, "--out_dir", str(run)])
    assert again.returncode == 1 and "already holds a run" in again.stderr


def test_shakespeare_recipe_at_a_tiny_size_trains_and_resumes(char_shards, tmp_path):
    """recipes/shakespeare-char.yaml is nanoGPT's bias-free GPT: no bias in any linear layer or LayerNorm
    (its GPT-2 checkpoints hold them as zeros, which a resume drops again), exact GELU; a run stopped at
    step 3 and resumed to 6 logs the losses of one straight run to 6."""
    args = ["pretrain", "--config", str(REPO / "recipes" / "shakespeare-char.yaml"), "--data", str(char_shards),
            *TINY, "--model.n_embd", "48", "--model.n_head", "2", "--batch_size", "4", "--sample_tokens", "8"]
    straight = _run([*args, "--out_dir", str(tmp_path / "a")])
    assert straight.returncode == 0, straight.stderr
    stopped = _run([*args, "--out_dir", str(tmp_path / "b"), "--max_steps", "3"])
    assert stopped.returncode == 0, stopped.stderr
    resumed = _run(["pretrain", "--resume", str(tmp_path / "b"), "--max_steps", "6", "--progress", "false"])
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
    assert _losses(tmp_path / "b", "val_loss") == _losses(tmp_path / "a", "val_loss")

    import lmstack

    model = lmstack.DecoderLM(load_config(REPO / "recipes" / "shakespeare-char.yaml").model_config(vocab_size=65))
    assert not [name for name, _ in model.named_parameters() if name.endswith("bias")]
    assert model.config.gelu_approximate == "none" and model.num_params() == 10_745_088  # nanoGPT: 10.65M + 256 x 384 positions
    saved = lmstack.load_model(tmp_path / "a" / "checkpoints" / "step-0000006")
    assert all(not p.any() for name, p in saved.named_parameters() if name.endswith("bias"))


def test_compiled_training_equals_eager_and_compiles_twice(char_shards, tmp_path):
    """`compile: true` logs the eager run's losses, tracing two graphs in all (training, and evaluation
    without gradients): no recompilation as the step, learning rate or data change, nor after sampling at
    evaluation (which allocates and frees a KV cache in the model)."""
    from torch._dynamo.utils import counters

    from lmstack.train.loop import pretrain

    losses = {}
    for compiled in ("false", "true"):
        torch._dynamo.reset()
        counters.clear()
        out = tmp_path / compiled
        pretrain(load_config(None, ["--data", str(char_shards), "--out_dir", str(out), "--compile", compiled,
                                    *TINY, "--batch_size", "4", "--sample_tokens", "5"]))
        losses[compiled] = _losses(out) + _losses(out, "val_loss")
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    assert [s for s, _ in losses["true"]] == [s for s, _ in losses["false"]]
    assert max(abs(a - b) for (_, a), (_, b) in zip(losses["true"], losses["false"])) < 1e-5


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(char_shards, tmp_path, strategy):
    single = _run(["pretrain", "--data", str(char_shards), *TINY, "--batch_size", "4",
                   "--out_dir", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    multi = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lmstack.cli",
         "pretrain", "--data", str(char_shards), *TINY, "--batch_size", "2", "--distributed", strategy,
         "--out_dir", str(tmp_path / "two")], capture_output=True, text=True, env=env)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in one] == [s for s, _ in two]
    assert max(abs(a - b) for (_, a), (_, b) in zip(one, two)) < 1e-5
    # the checkpoint gathered from two processes loads like any other
    import lmstack

    a = lmstack.load_model(tmp_path / "one" / "checkpoints" / "step-0000006")
    b = lmstack.load_model(tmp_path / "two" / "checkpoints" / "step-0000006")
    assert max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters())) < 1e-5


def test_plot_and_tensorboard(char_shards, tmp_path):
    out = tmp_path / "run"
    r = _run(["pretrain", "--data", str(char_shards), *TINY, "--batch_size", "2", "--tensorboard", "true",
              "--out_dir", str(out)])
    assert r.returncode == 0, r.stderr
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    (out / "loss.png").unlink()
    assert _run(["plot", str(out)]).returncode == 0
    assert (out / "loss.png").stat().st_size > 10_000
    val = _losses(out, "val_loss")
    assert [s for s, _ in val] == [0, 3, 6] and all(math.isfinite(v) for _, v in val)


def test_curves_and_best_follow_the_task_headline(tmp_path):
    from lmstack.train.metrics import best_validation, plot_losses, plot_panels

    grpo = [{"step": 0, "loss": 0.01, "reward": 0.2, "kl": 0.0}, {"step": 0, "val_loss": 0.0, "val_reward": 0.3,
             "val_kl": 0.0}, {"step": 5, "val_loss": -0.02, "val_reward": 0.6, "val_kl": 0.1},
            {"step": 9, "val_loss": -0.05, "val_reward": 0.5, "val_kl": 0.2}]
    assert plot_panels(grpo, "grpo") == ["reward", "loss", "kl"]
    assert best_validation(grpo, "grpo") == ("reward", 0.6, 5)  # the highest reward, not the lowest loss
    assert best_validation(grpo, "dpo") == ("loss", -0.05, 9)
    dpo = [{"step": 0, "val_loss": 0.69, "val_ppl": 2.0, "val_accuracy": 0.5}, {"step": 1, "loss": 0.6}]
    assert plot_panels(dpo, "dpo") == ["loss", "accuracy"]
    assert plot_panels([{"step": 0, "loss": 1.0}], "pretrain") == ["loss"]
    assert best_validation([{"step": 0, "loss": 1.0}], "pretrain") is None
    (tmp_path / "config.json").write_text(json.dumps({"task": "grpo"}))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in grpo))
    assert plot_losses(tmp_path).stat().st_size > 10_000


@pytest.mark.parametrize("wrapped", [False, True])
def test_out_of_memory_says_what_to_change(char_shards, tmp_path, monkeypatch, wrapped):
    """Also when torch.compile wraps the OOM it met while compiling or autotuning in its own error."""
    from torch._dynamo.exc import BackendCompilerFailed

    from lmstack import DecoderLM
    from lmstack.train.loop import pretrain

    def oom(*args, **kwargs):
        error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        raise BackendCompilerFailed("inductor", error, None) if wrapped else error

    monkeypatch.setattr(DecoderLM, "forward", oom)
    cfg = load_config(None, ["--data", str(char_shards), "--out_dir", str(tmp_path / "r"), *TINY])
    with pytest.raises(LMStackError, match="out of GPU memory at batch_size=8.*activation_checkpointing"):
        pretrain(cfg)


def test_a_model_that_could_not_be_saved_is_refused_before_training(char_shards, tmp_path, monkeypatch):
    """Checkpoints are Hugging Face directories: a config the family cannot hold stops the run at its start,
    not after every step has trained."""
    from lmstack import DecoderLM
    from lmstack.train.loop import pretrain

    def no_training(*args, **kwargs):
        raise AssertionError("a step ran")

    monkeypatch.setattr(DecoderLM, "forward", no_training)
    cfg = load_config(None, ["--data", str(char_shards), "--out_dir", str(tmp_path / "r"), *TINY,
                             "--model", "tiny-llama", "--model.rotary_fraction", "0.5"])
    with pytest.raises(LMStackError, match="rotary_fraction=0.5"):
        pretrain(cfg)


def test_publishing_a_step_again_replaces_it_whole(tmp_path):
    from lmstack.train import checkpoint as ckpt

    for content in ("first", "second"):
        stage = ckpt.staging_dir(tmp_path, 7)
        stage.mkdir(parents=True)
        (stage / "weights").write_text(content)
        final = ckpt.publish(tmp_path, 7, keep=2)
    assert (final / "weights").read_text() == "second"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [final.name]


def test_publishing_flushes_and_clears_stale_stages(tmp_path, monkeypatch):
    """Every staged file is fsynced before the rename (a machine crash must not publish empty files), and a
    staging directory a killed save left at another step is removed."""
    from lmstack.train import checkpoint as ckpt

    stale = ckpt.staging_dir(tmp_path, 3)
    stale.mkdir(parents=True)
    (stale / "half").write_text("x")
    stage = ckpt.staging_dir(tmp_path, 5)
    (stage / "trainer_state").mkdir(parents=True)
    (stage / "trainer_state" / "state.json").write_text("{}")
    synced, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd)))
    final = ckpt.publish(tmp_path, 5, keep=2)
    assert str(stage / "trainer_state" / "state.json") in synced and str(stage) in synced
    assert str(final.parent) in synced  # the rename itself
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [final.name]


def test_unknown_model_setting_and_command_line_key_are_named(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: d\nmodel_overrides: {n_layers: 2}\n")
    with pytest.raises(LMStackError, match=r"model_overrides: unknown setting\(s\) \['n_layers'\]; valid ones: .*n_layer"):
        load_config(recipe)
    recipe.write_text("data: d\n")
    with pytest.raises(LMStackError, match="command line: unknown key 'max_stepz'"):
        load_config(recipe, ["--max_stepz", "3"])
    with pytest.raises(LMStackError, match=r"unknown setting\(s\) \['n_layr'\]"):
        load_config(recipe, ["--model.n_layr", "3"])


def test_prepare_from_a_script_on_standard_input(tmp_path):
    """Spawned workers re-import the main script; one read from stdin has no file, so the work stays in-process
    (it used to hang) and gives the same shards as worker processes."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS.read_text()[:50_000])
    script = (f"from lmstack.data.shards import prepare_shards\nfrom lmstack import Tokenizer\n"
              f"text = open({str(corpus)!r}).read()\n"
              f"prepare_shards([{str(corpus)!r}], Tokenizer.train_chars([text]), {str(tmp_path / 'a')!r}, "
              f"workers=2, progress=False)\n")
    done = subprocess.run([sys.executable, "-"], input=script, text=True, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    prepare_shards([corpus], Tokenizer.train_chars([corpus.read_text()]), tmp_path / "b", workers=2, progress=False)
    assert (tmp_path / "a" / "train.bin").read_bytes() == (tmp_path / "b" / "train.bin").read_bytes()


@pytest.mark.parametrize("args,message", [
    (["--min_lr", "-1e-5"], "min_lr must be >= 0, got -1e-05"),
    (["--learning_rate", "0"], "learning_rate must be > 0, got 0.0"),
    (["--learning_rate", "-1"], "learning_rate must be > 0"),
    (["--learning_rate", "nan"], "learning_rate must be a finite number, got nan"),
    (["--beta1", "1"], r"beta1 must be in \[0, 1\), got 1.0"),
    (["--beta2", "-0.1"], r"beta2 must be in \[0, 1\)"),
    (["--weight_decay", "-0.1"], "weight_decay must be >= 0"),
    (["--task", "dpo", "--beta", "-0.1"], "beta must be >= 0"),
    (["--task", "dpo", "--beta", "0"], "beta must be > 0 for dpo"),
    (["--val_fraction", "1"], r"val_fraction must be in \[0, 1\)"),
    (["--val_fraction", "-0.1"], r"val_fraction must be in \[0, 1\)"),
    (["--seed", "-1"], "seed must be >= 0, got -1"),
    (["--sample_tokens", "-3"], "sample_tokens must be >= 0, got -3"),
    (["--warmup_steps", "-1"], "warmup_steps must be >= 0"),
    (["--grad_clip", "-1"], "grad_clip must be >= 0"),
    (["--keep_checkpoints", "-1"], "keep_checkpoints must be >= 0"),
    (["--lr_decay_steps", "0"], "lr_decay_steps must be >= 1"),
    (["--sample_top_k", "-1"], "sample_top_k must be >= 0"),
    (["--lora_r", "-2"], "lora_r must be >= 0"),
    (["--lora_dropout", "1"], r"lora_dropout must be in \[0, 1\)"),
    (["--label_smoothing", "0.5"], r"label_smoothing must be in \[0, 0.5\)"),
    (["--task", "grpo", "--temperature", "0"], "temperature must be > 0 for GRPO"),
    (["--batch_size", "0"], "batch_size must be >= 1, got 0"),
    (["--grad_accum", "-1"], "grad_accum must be >= 1"),
    (["--max_steps", "0"], "max_steps must be >= 1"),
    (["--eval_interval", "0"], "eval_interval must be >= 1"),
    (["--learning_rate", "1e-5", "--min_lr", "6e-5"], "min_lr 6e-05 is above learning_rate 1e-05"),
    (["--warmup_steps", "5", "--lr_decay_steps", "3"], "lr_decay_steps 3 must be after warmup_steps 5"),
    (["--qlora", "true"], "qlora set without lora_r"),
    (["--lora_rslora", "true", "--lora_dropout", "0.1"], "lora_rslora, lora_dropout set without lora_r"),
    (["--lora_dora", "true"], "lora_dora set without lora_r"),
    (["--lora_r", "4"], "lora_r on a model built from scratch would train adapters on a frozen random base"),
    (["--task", "kto", "--batch_size", "1"], "batch_size must be >= 2 for KTO"),
])
def test_settings_out_of_range_are_named(args, message):
    with pytest.raises(LMStackError, match=message):
        load_config(None, ["--data", "d", *args])


def test_min_lr_defaults_to_a_tenth_of_the_learning_rate():
    assert load_config(None, ["--data", "d", "--learning_rate", "1e-5"]).min_lr == pytest.approx(1e-6)
    assert load_config(None, ["--data", "d", "--learning_rate", "1e-5", "--min_lr", "0"]).min_lr == 0


def test_tensorboard_drops_what_a_killed_run_logged_past_its_checkpoint(tmp_path):
    """metrics.jsonl is cut back to the resumed step; TensorBoard, which reads every event file of the run,
    is purged from there too."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lmstack.train.metrics import MetricsLog, read_metrics

    first = MetricsLog(tmp_path, tensorboard=True)
    for step in range(6):
        first.log({"step": step, "loss": 5.0 - step})
    first.close()
    time.sleep(1.1)  # event files are named by the second they were opened in
    resumed = MetricsLog(tmp_path, tensorboard=True, resume_step=3)
    for step in (3, 4):
        resumed.log({"step": step, "loss": 1.0})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(0, 5.0), (1, 4.0), (2, 3.0), (3, 1.0), (4, 1.0)]
    # a finished run's last evaluation, off the eval grid, kept on resume: in both logs, once
    time.sleep(1.1)
    final = MetricsLog(tmp_path, tensorboard=True)
    final.log({"step": 5, "loss": 0.5})
    final.log({"step": 5, "val_loss": 0.75})
    final.close()
    time.sleep(1.1)
    longer = MetricsLog(tmp_path, tensorboard=True, resume_step=5, keep_evaluation=True)
    longer.log({"step": 6, "val_loss": 0.25})
    longer.close()
    assert [(r["step"], r["val_loss"]) for r in read_metrics(tmp_path)] == [(5, 0.75), (6, 0.25)]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("val_loss")] == [(5, 0.75), (6, 0.25)]
    assert events.Scalars("loss") == []  # the step-5 training record is redone: dropped, not kept


def test_settings_at_the_edges_of_their_ranges_are_accepted():
    cfg = load_config(None, ["--data", "d", "--min_lr", "0", "--beta1", "0", "--weight_decay", "0", "--seed", "0",
                             "--val_fraction", "0", "--sample_top_k", "0", "--grad_clip", "0", "--warmup_steps", "0",
                             "--lr_decay_steps", "none", "--task", "grpo", "--beta", "0"])
    assert cfg.beta == 0 and cfg.sample_top_k == 0  # GRPO without the KL penalty, sampling without top-k
