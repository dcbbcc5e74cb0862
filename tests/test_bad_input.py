"""Bad input across the CLI: one `error:` line and a non-zero exit, never a traceback, and nothing lost or
half-written (a failed save keeps the earlier weights, a run killed mid-line resumes)."""

import json
import subprocess
import sys

import pytest
import torch

import lmstack
from lmstack import LMStackError
from lmstack.cli import main
from tests.conftest import REPO, one_error_line


def test_a_failed_save_keeps_the_earlier_weights(model_dir, tmp_path, monkeypatch):
    import shutil

    from lmstack.checkpoints import hf

    path = tmp_path / "copy"
    shutil.copytree(model_dir, path)
    before = lmstack.load_model(path).state_dict()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        lmstack.save_model(lmstack.load_model(path), path)
    after = lmstack.load_model(path).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not [p.name for p in path.iterdir() if ".tmp" in p.name]  # no half-written file beside them


def test_a_run_killed_mid_line_reads_and_resumes(tmp_path):
    from lmstack.train.metrics import MetricsLog, read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 1.5}\n{"step": 5, "loss": 1.2}\n{"step": 6, "lo')
    assert read_metrics(tmp_path) == [{"step": 0, "loss": 1.5}, {"step": 5, "loss": 1.2}]
    MetricsLog(tmp_path, resume_step=5)
    assert read_metrics(tmp_path) == [{"step": 0, "loss": 1.5}]
    (tmp_path / "metrics.jsonl").write_text('{"step": 0\n{"step": 1}\n')
    with pytest.raises(LMStackError, match=r"metrics.jsonl:1: not valid JSON"):
        read_metrics(tmp_path)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_a_broken_config_is_named(model_dir, tmp_path, capsys, content):
    import shutil

    path = tmp_path / "broken"
    shutil.copytree(model_dir, path)
    (path / "config.json").write_text(content)
    err = one_error_line(capsys, "generate", "hi", "--model", str(path))
    assert f"{path / 'config.json'}:" in err


def test_a_config_without_a_needed_key_or_with_an_unknown_family_is_named(model_dir, tmp_path, capsys):
    import shutil

    path = tmp_path / "cfg"
    shutil.copytree(model_dir, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "hidden_size"}))
    err = one_error_line(capsys, "info", str(path))
    assert f"{path / 'config.json'}: no 'hidden_size', which a 'llama' config needs" in err
    (path / "config.json").write_text(json.dumps({**config, "model_type": "bogus"}))
    assert f"{path / 'config.json'}: model_type 'bogus' is not supported" in one_error_line(
        capsys, "generate", "hi", "--model", str(path))
    # Values of the wrong kind are named too, not a KeyError or TypeError from building the model.
    for changes, message in (({"rope_scaling": {"rope_type": "linear"}}, "'linear' needs a positive number 'factor'"),
                             ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
                              "'llama3' needs a positive number 'low_freq_factor', got None"),
                             ({"num_attention_heads": "4"}, "config.json: num_attention_heads='4': must be a positive integer")):
        broken = {k: v for k, v in config.items() if k != "rope_parameters"}
        (path / "config.json").write_text(json.dumps({**broken, **changes}))
        assert message in one_error_line(capsys, "generate", "hi", "--model", str(path))


def test_quantized_checkpoints_are_not_quantized_or_converted_again(model_dir, tmp_path, capsys):
    assert main(["quantize", "--model", str(model_dir), "--output", str(tmp_path / "q8"), "--bits", "8"]) == 0
    capsys.readouterr()
    assert "holds quantized weights: lmstack cannot quantize it again" in one_error_line(
        capsys, "quantize", "--model", str(tmp_path / "q8"), "--output", str(tmp_path / "q8q"), "--bits", "8")
    assert "cannot convert it" in one_error_line(capsys, "convert", str(tmp_path / "q8"), str(tmp_path / "c"))
    assert not (tmp_path / "q8q").exists() and not (tmp_path / "c").exists()
    config = json.loads((tmp_path / "q8" / "config.json").read_text())
    config["quantization_config"]["modules"] = ["layers.0.attn.nope"]
    (tmp_path / "q8" / "config.json").write_text(json.dumps(config))
    assert "quantization_config does not describe this model" in one_error_line(
        capsys, "generate", "hi", "--model", str(tmp_path / "q8"))


def test_argument_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["quantize", "--model", "m", "--output", "o", "--bits", "3"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: lmstack quantize: argument --bits: invalid choice: '3'") and "--help)" in err


def test_corrupt_trainer_state_and_shards_are_named(tmp_path):
    from lmstack.data.shards import TokenShards, prepare_shards
    from lmstack.train.checkpoint import read_trainer_state

    state = tmp_path / "step-1" / "trainer_state"
    state.mkdir(parents=True)
    (state / "state.json").write_text("{}")
    (state / "optimizer.pt").write_bytes(b"PK\x03\x04 cut off")
    with pytest.raises(LMStackError, match="trainer_state: unreadable trainer state"):
        read_trainer_state(tmp_path / "step-1", 0)

    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n" * 100)
    prepare_shards([corpus], lmstack.Tokenizer.train_chars([corpus.read_text()]), tmp_path / "s", progress=False,
                   workers=1)
    train = tmp_path / "s" / "train.bin"
    train.write_bytes(train.read_bytes()[:101])
    with pytest.raises(LMStackError, match=r"train.bin: 101 bytes, but meta.json counts 1,080 uint16 tokens"):
        TokenShards(tmp_path / "s")
    (tmp_path / "s" / "meta.json").write_text(json.dumps({"dtype": "uint16"}))
    with pytest.raises(LMStackError, match="not the meta.json of `lmstack data prepare`"):
        TokenShards(tmp_path / "s")


def test_recipe_and_override_mistakes_are_one_line(tmp_path, capsys):
    from lmstack.train.config import load_config

    recipe = tmp_path / "bad.yaml"
    recipe.write_text("a: [1\nb: 2\n")
    err = one_error_line(capsys, "pretrain", "--config", str(recipe))
    assert "bad.yaml: not valid YAML (line 2, column 2: expected ',' or ']'" in err
    err = one_error_line(capsys, "pretrain", "--data", "d", "--model_overrides", "{vocab_size:300}")
    assert "model_overrides: unknown setting(s) ['vocab_size:300']" in err
    cfg = load_config(None, ["--data", "d", "--model_overrides", "{n_layer: 2}", "--model.n_head", "4"])
    assert cfg.model_overrides == {"n_layer": 2, "n_head": 4}


def test_evaluation_mismatches_name_their_files(model_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a\nb\n")
    (tmp_path / "r.txt").write_text("a\n")
    err = one_error_line(capsys, "eval", "rouge", "--predictions", str(tmp_path / "p.txt"), "--references",
                         str(tmp_path / "r.txt"))
    assert f"{tmp_path / 'p.txt'} has 2 lines but {tmp_path / 'r.txt'} has 1" in err
    big = lmstack.Tokenizer.train([(REPO / "data" / "tinyshakespeare.txt").read_text()[:50_000]], vocab_size=400)
    big.save(tmp_path / "big-tokenizer")
    (tmp_path / "t.txt").write_text((REPO / "data" / "tinyshakespeare.txt").read_text()[:5_000])
    err = one_error_line(capsys, "eval", "perplexity", "--model", str(model_dir), "--data", str(tmp_path / "t.txt"),
                         "--tokenizer", str(tmp_path / "big-tokenizer"))
    assert "outside the model's vocabulary of 300: is it the model's own tokenizer?" in err


def test_broken_side_files_and_user_code_are_named(model_dir, tmp_path):
    import shutil

    from lmstack.checkpoints import load_adapter_model, load_tokenizer
    from lmstack.train.tasks import load_reward_function

    bad = tmp_path / "bad_reward.py"
    bad.write_text("import not_a_module_anywhere\n")
    with pytest.raises(LMStackError, match=r"importing .*bad_reward.py failed \(ModuleNotFoundError"):
        load_reward_function(f"{bad}:reward")
    path = tmp_path / "tok"
    shutil.copytree(model_dir, path)
    (path / "tokenizer_config.json").write_text("[1]")
    with pytest.raises(LMStackError, match=r"tokenizer_config.json: expected a JSON object, got list"):
        load_tokenizer(path)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(LMStackError, match=r"adapter_config.json: not valid JSON"):
        load_adapter_model(adapter)


def test_a_tokenizer_from_an_empty_corpus_is_refused(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text(" \n")
    err = one_error_line(capsys, "tokenizer", "train", "--input", str(tmp_path / "empty.txt"), "--vocab-size", "300",
                         "--output", str(tmp_path / "tok"))
    assert "the corpus is empty" in err and not (tmp_path / "tok").exists()


def test_gguf_metadata_without_the_shape_is_named():
    from lmstack.checkpoints.gguf import config_from_gguf

    with pytest.raises(LMStackError, match=r"GGUF metadata lacks llama.attention.head_count"):
        config_from_gguf({"general.architecture": "llama", "llama.embedding_length": 64}, set())


def test_compare_checks_everything_before_it_writes(tmp_path, capsys):
    """Bad settings, a corpus inside the output and an output holding other files are refused before a file is
    written or removed (the corpus was once cut to its first 90% by a failed call)."""
    err = one_error_line(capsys, "compare", "--orders", "0", "--output", str(tmp_path / "cmp"))
    assert "n-gram orders must be >= 1" in err and not (tmp_path / "cmp").exists()
    corpus = tmp_path / "cmp" / "train.txt"
    corpus.parent.mkdir()
    corpus.write_text((REPO / "data" / "tinyshakespeare.txt").read_text()[:20_000])
    (tmp_path / "cmp" / "shards" / "mine").mkdir(parents=True)
    for argv, message in ((["--vocab-size", "1"], "too small"), (["--steps", "0"], "steps must be >= 1")):
        err = one_error_line(capsys, "compare", "--data", corpus, "--output", tmp_path / "elsewhere", *argv)
        assert message in err and not (tmp_path / "elsewhere").exists()
    err = one_error_line(capsys, "compare", "--data", corpus, "--output", tmp_path / "cmp")
    assert "not empty and not an earlier `lmstack compare` output" in err
    (tmp_path / "cmp" / ".lmstack-compare").touch()
    assert "lies inside --output" in one_error_line(capsys, "compare", "--data", corpus, "--output", tmp_path / "cmp")
    assert len(corpus.read_text()) == 20_000 and (tmp_path / "cmp" / "shards" / "mine").is_dir()


def test_perplexity_notes_text_that_is_not_utf8(model_dir, tmp_path, capsys):
    """Bad bytes read as U+FFFD, counted in one stderr note as `data prepare` gives it."""
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me, ".encode("latin-1") * 20)
    assert main(["eval", "perplexity", "--model", str(model_dir), "--data", str(tmp_path / "latin1.txt")]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["perplexity"] > 0
    assert captured.err == (f"note: 40 invalid UTF-8 sequences replaced with U+FFFD in {tmp_path / 'latin1.txt'}"
                            "\n")


def test_perplexity_skips_bad_records_when_asked(model_dir, tmp_path, capsys):
    data = tmp_path / "e.jsonl"
    data.write_text('{"text": "To be, or not to be"}\nnot json\n{"text": "that is the question"}\n')
    err = one_error_line(capsys, "eval", "perplexity", "--model", str(model_dir), "--data", str(data))
    assert "e.jsonl:2: not valid JSON" in err and "--on-bad-record skip" in err
    assert main(["eval", "perplexity", "--model", str(model_dir), "--data", str(data), "--on-bad-record", "skip"]) == 0
    captured = capsys.readouterr()
    assert "note: skipped 1 bad records, e.g. " in captured.err and f"{data}:2" in captured.err
    whole = json.loads(captured.out)
    data.write_text('{"text": "To be, or not to be"}\n{"text": "that is the question"}\n')
    assert main(["eval", "perplexity", "--model", str(model_dir), "--data", str(data)]) == 0
    assert json.loads(capsys.readouterr().out) == whole  # the bad line left out, nothing else
    data.write_text('{"text": "To be, or not to be"}\n{"text": ""}\n{"text": "that is the question"}\n')
    assert main(["eval", "perplexity", "--model", str(model_dir), "--data", str(data)]) == 0
    assert json.loads(capsys.readouterr().out) == whole  # an empty record adds no blank line


def test_a_bad_record_in_the_char_vocabulary_pass_gives_the_hint(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"text": "hello"}\n[1, 2]\n')
    err = one_error_line(capsys, "data", "prepare", "--input", str(tmp_path / "d.jsonl"), "--tokenizer", "char",
                         "--output", str(tmp_path / "out"))
    assert "d.jsonl:2: expected a JSON object, got list (use --on-bad-record skip to skip such records)" in err
    assert main(["data", "prepare", "--input", str(tmp_path / "d.jsonl"), "--tokenizer", "char", "--output",
                 str(tmp_path / "out"), "--on-bad-record", "skip", "--val-fraction", "0"]) == 0
    assert "skipped 1 bad records" in capsys.readouterr().err


def test_an_optimizer_state_that_is_not_a_pickle_of_tensors_is_named(tmp_path):
    import pickle

    from lmstack.train.checkpoint import read_trainer_state

    state = tmp_path / "step-1" / "trainer_state"
    state.mkdir(parents=True)
    (state / "state.json").write_text(json.dumps({"step": 1}))
    for content in (b"garbage, not a pickle" * 4, pickle.dumps(object)):
        (state / "optimizer.pt").write_bytes(content)
        with pytest.raises(LMStackError, match=r"trainer_state: unreadable trainer state: optimizer.pt \(corrupt"):
            read_trainer_state(tmp_path / "step-1", 0)
    (state / "state.json").write_text("[1]")
    with pytest.raises(LMStackError, match=r"unreadable trainer state: state.json \(no step number\)"):
        read_trainer_state(tmp_path / "step-1", 0)


def test_record_files_are_known_by_suffix_in_any_case_and_compressed_ones_refused(tmp_path, capsys):
    """`data.JSONL` holds records, not text to tokenize with its JSON syntax; `data.jsonl.gz` would be
    tokenized as gzip bytes, so it is refused."""
    import gzip

    from lmstack.data.shards import TokenShards

    records = '{"text": "To be or not to be"}\n{"text": "that is the question"}\n'
    (tmp_path / "d.JSONL").write_text(records)
    assert main(["data", "prepare", "--input", str(tmp_path / "d.JSONL"), "--tokenizer", "char", "--output",
                 str(tmp_path / "out"), "--val-fraction", "0"]) == 0
    capsys.readouterr()
    shards = TokenShards(tmp_path / "out")
    assert shards.meta["documents"] == 2  # as text it would be one document, JSON syntax and all
    assert shards.meta["train_tokens"] < len("To be or not to bethat is the question") + 3
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(records.encode()))
    err = one_error_line(capsys, "data", "prepare", "--input", str(tmp_path / "d.jsonl.gz"), "--tokenizer", "char",
                         "--output", str(tmp_path / "out2"))
    assert "d.jsonl.gz: a compressed file or archive (.gz); decompress it first" in err
    import bz2

    for name, data in (("d.tgz", gzip.compress(records.encode())), ("d.txt", gzip.compress(records.encode())),
                       ("corpus", bz2.compress(records.encode()))):
        (tmp_path / name).write_bytes(data)  # by suffix, or by the first bytes whatever the name
        err = one_error_line(capsys, "data", "prepare", "--input", str(tmp_path / name), "--tokenizer", "char",
                             "--output", str(tmp_path / "out2"))
        assert f"{name}: a compressed file or archive" in err
    (tmp_path / "d.ndjson").write_text(records)  # newline-delimited JSON: records too
    assert main(["data", "prepare", "--input", str(tmp_path / "d.ndjson"), "--tokenizer", "char", "--output",
                 str(tmp_path / "out3"), "--val-fraction", "0"]) == 0
    assert TokenShards(tmp_path / "out3").meta["documents"] == 2


def test_a_model_that_cannot_hold_the_run_is_named(model_dir, tmp_path, capsys):
    """A block_size past the model's context, and model settings for a model loaded as it is, are named
    before the first step (not a traceback from the first forward pass, not silently ignored)."""
    text = tmp_path / "t.txt"
    text.write_text((REPO / "data" / "tinyshakespeare.txt").read_text()[:20_000])
    assert main(["data", "prepare", "--input", str(text), "--tokenizer", str(model_dir), "--output",
                 str(tmp_path / "shards")]) == 0
    capsys.readouterr()
    common = ["pretrain", "--data", tmp_path / "shards", "--max_steps", "2", "--warmup_steps", "0", "--batch_size", "2",
              "--device", "cpu", "--progress", "false"]
    err = one_error_line(capsys, *common, "--out_dir", tmp_path / "a", "--model.block_size", "8", "--block_size", "16")
    assert "block_size 16 is longer than the model's context (8 positions): lower block_size to at most 8" in err
    from_checkpoint = [*common, "--init_from", "checkpoint", "--model", model_dir]
    err = one_error_line(capsys, *from_checkpoint, "--out_dir", tmp_path / "b", "--model.n_layer", "4")
    assert "model_overrides (n_layer) apply when a model is built; init_from: checkpoint starts from" in err
    assert "--model_overrides '{}' clears a recipe's" in err


def test_resume_names_what_it_was_given_in_place_of_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    step = run / "checkpoints" / "step-0000010"
    (step / "trainer_state").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (step / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    err = one_error_line(capsys, "pretrain", "--resume", step)
    assert f"a checkpoint of a run, not the run; pass the run directory ({run})" in err
    err = one_error_line(capsys, "pretrain", "--resume", run, "--out_dir", tmp_path / "elsewhere")
    assert f"a resumed run continues in its own directory ({run}); to start a new run from its weights" in err
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    err = one_error_line(capsys, "pretrain", "--resume", model)
    assert "a model, not a training run directory; to train from it, use --init_from checkpoint" in err


def test_missing_or_directory_inputs_are_named(tmp_path, capsys):
    err = one_error_line(capsys, "generate", "--model", tmp_path, "x", "--grammar", tmp_path / "none.lark")
    assert f"--grammar {tmp_path / 'none.lark'}: no such file" in err
    err = one_error_line(capsys, "data", "prepare", "--input", tmp_path, "--tokenizer", "char", "--output",
                         tmp_path / "out")
    assert f"{tmp_path}: a directory; give the files in it" in err


def test_a_closed_pipe_ends_the_output_quietly(model_dir):
    """`lmstack ... | head`: the reader leaving is no error (no message, the shell's SIGPIPE status)."""
    proc = subprocess.Popen([sys.executable, "-m", "lmstack.cli", "generate", "--model", str(model_dir), "ROMEO:",
                             "--max-new-tokens", "200", "--temperature", "0", "--ignore-eos"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(1)
    proc.stdout.close()
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == b""


def test_a_classifier_checkpoint_is_refused_where_a_language_model_is_needed(model_dir, tmp_path, capsys):
    """A score head in place of the LM head: generation, perplexity, quantization and GGUF name the verb that
    takes it; convert to a directory writes it back as a classifier, and info counts its real parameters."""
    from lmstack.models.classifier import SequenceClassifier

    torch.manual_seed(0)
    clf = SequenceClassifier.from_decoder(lmstack.load_model(model_dir), ["neg", "mid", "pos"], 0)
    path = lmstack.save_model(clf, tmp_path / "clf", tokenizer=lmstack.load_tokenizer(model_dir))
    text = tmp_path / "t.txt"
    text.write_text("To be or not to be")
    for argv in (["generate", "hi", "--model", path], ["eval", "perplexity", "--model", path, "--data", text],
                 ["quantize", "--model", path, "--output", tmp_path / "q"], ["convert", path, tmp_path / "c.gguf"]):
        err = one_error_line(capsys, *argv)
        assert "a classification model" in err, err
    assert main(["convert", str(path), str(tmp_path / "copy")]) == 0
    again = lmstack.load_model(tmp_path / "copy")
    assert again.labels == ["neg", "mid", "pos"] and torch.equal(again.score.weight, clf.score.weight)
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    info = json.loads(out[out.index("{"):])
    assert info["parameters"] == sum(p.numel() for p in clf.parameters()) and info["labels"] == ["neg", "mid", "pos"]


def test_a_peft_adapter_without_tokenizer_files_uses_its_bases(model_dir, tmp_path, capsys):
    """peft writes no tokenizer beside an adapter: the CLI takes the base model's (`base_model_name_or_path`)."""
    from lmstack.checkpoints import load_tokenizer
    from lmstack.train.lora import apply_lora, save_peft

    model = lmstack.load_model(model_dir)
    apply_lora(model, r=2, targets=("q", "v"))
    save_peft(model, tmp_path / "adapter", base_model_name_or_path=str(model_dir))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "adapter" / name).unlink(missing_ok=True)
    assert load_tokenizer(tmp_path / "adapter").encode("To be") == load_tokenizer(model_dir).encode("To be")
    outputs = []
    for path in (tmp_path / "adapter", model_dir):  # B starts at zero: the adapter's model is the base
        assert main(["generate", "--model", str(path), "To be", "--max-new-tokens", "3", "--temperature", "0",
                     "--no-stream"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].strip()


def test_gpt2_tokenizer_files_point_to_their_directory(tmp_path, capsys):
    (tmp_path / "encoder.json").write_text('{"a": 0}')
    err = one_error_line(capsys, "tokenizer", "encode", "--tokenizer", str(tmp_path / "encoder.json"), "x")
    assert "one of GPT-2's two tokenizer files: pass the directory" in err
