"""The CLI on input that is the wrong thing: an output that would overwrite a training run or the source, a
file where a checkpoint directory is expected, a file that is not UTF-8 text, a count below its minimum, a
plot file of no known format. Each is one `error:` line and exit status 1, never a traceback, and nothing is
written or lost."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import lmstack
from lmstack import LMStackError
from lmstack.cli import main
from tests.conftest import one_error_line

BINARY = bytes(range(128, 256)) * 4  # not UTF-8 from its first byte


@pytest.fixture
def run_dir(model_dir, tmp_path):
    """What a training run directory holds: its recipe, metrics and checkpoints with trainer state."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"task": "pretrain", "model": "tiny-llama", "max_steps": 20}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 - s / 10}) + "\n"
                                               for s in range(0, 21, 5)) + '{"step": 20, "val_loss": 4.0}\n')
    for step in (10, 20):
        ckpt = run / "checkpoints" / f"step-{step:07d}"
        shutil.copytree(model_dir, ckpt)
        (ckpt / "trainer_state").mkdir()
        (ckpt / "trainer_state" / "state.json").write_text(json.dumps({"step": step}))
    return run


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_an_output_that_is_a_training_run_or_the_source_is_refused(model_dir, run_dir, tmp_path, capsys):
    ckpt = run_dir / "checkpoints" / "step-0000020"
    before = snapshot(run_dir)
    assert "a training run directory" in one_error_line(capsys, "quantize", "--model", ckpt, "--output", run_dir)
    assert "a training run directory" in one_error_line(capsys, "convert", ckpt, run_dir)
    assert "a training checkpoint (it holds trainer_state/" in one_error_line(
        capsys, "quantize", "--model", run_dir / "checkpoints" / "step-0000010", "--output", ckpt)
    assert "that is the source model" in one_error_line(capsys, "quantize", "--model", ckpt, "--output", ckpt)
    assert "that is the source model" in one_error_line(capsys, "convert", ckpt, ckpt)
    assert snapshot(run_dir) == before  # the run can still resume
    other = tmp_path / "corpus"
    other.mkdir()
    (other / "train.txt").write_text("keep me")
    assert "not empty and not a checkpoint directory" in one_error_line(
        capsys, "quantize", "--model", model_dir, "--output", other)
    assert snapshot(other) == {"train.txt": b"keep me"}
    # A file where the output directory goes, or above it, is named (not an OS error)
    assert "an existing file; the output is a directory" in one_error_line(
        capsys, "quantize", "--model", model_dir, "--output", other / "train.txt")
    assert "an existing file; the output is a directory" in one_error_line(capsys, "convert", model_dir,
                                                                          other / "train.txt")
    assert f"{other / 'train.txt'} is a file, not a directory" in one_error_line(
        capsys, "convert", model_dir, other / "train.txt" / "x.gguf")
    assert snapshot(other) == {"train.txt": b"keep me"}
    # An earlier output is a checkpoint directory: writing it again replaces it, as before.
    for bits in ("8", "8"):
        assert main(["quantize", "--model", str(model_dir), "--output", str(tmp_path / "q"), "--bits", bits]) == 0
    for dtype in ("float32", "bfloat16"):
        assert main(["convert", str(model_dir), str(tmp_path / "c"), "--dtype", dtype]) == 0
    assert lmstack.load_model(tmp_path / "c").embed.weight.dtype == torch.bfloat16


def test_what_is_not_a_checkpoint_directory_is_named(model_dir, run_dir, tmp_path, capsys):
    weights = model_dir / "model.safetensors"
    for argv in (["info", weights], ["eval", "perplexity", "--model", weights, "--data", weights],
                 ["generate", "hi", "--model", model_dir / "config.json"], ["convert", weights, tmp_path / "o"],
                 ["quantize", "--model", weights, "--output", tmp_path / "o"]):
        assert f"pass the directory that holds it ({model_dir})" in one_error_line(capsys, *argv)
    text = tmp_path / "small.txt"
    text.write_text("just some text\n")
    assert "not a checkpoint directory or .gguf file" in one_error_line(capsys, "info", text)
    err = one_error_line(capsys, "eval", "perplexity", "--model", run_dir, "--data", text)
    assert "a training run directory, not a checkpoint" in err
    assert str(run_dir / "checkpoints" / "step-0000020") in err  # the newest
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    assert "nope: no such checkpoint" in one_error_line(
        capsys, "finetune", "sft", "--model", str(tmp_path / "nope"), "--data", data, "--out_dir", tmp_path / "ft")
    assert not (tmp_path / "ft").exists()


def test_a_file_that_is_not_utf8_text_is_named(model_dir, tmp_path, capsys, monkeypatch):
    binary = tmp_path / "binary.bin"
    binary.write_bytes(BINARY)
    assert f"--grammar {binary}: not UTF-8 text" in one_error_line(
        capsys, "generate", "hi", "--model", model_dir, "--grammar", binary)
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text to learn from\n" * 20)
    assert f"--chat-template {binary}: not UTF-8 text" in one_error_line(
        capsys, "tokenizer", "train", "--input", corpus, "--vocab-size", "300", "--output", tmp_path / "tok",
        "--chat-template", binary)
    recipe = tmp_path / "binary.yaml"
    recipe.write_bytes(BINARY)
    assert f"--config {recipe}: not UTF-8 text" in one_error_line(capsys, "pretrain", "--config", recipe)
    # The last resort: text read anywhere else that is not UTF-8 still makes one line.
    from lmstack.checkpoints import hf

    monkeypatch.setattr(hf, "read_hf_config", lambda path: json.loads(binary.read_text()))
    assert "error: a file read as text is not UTF-8" in one_error_line(capsys, "info", model_dir)


def test_counts_below_their_minimum_are_refused(model_dir, tmp_path, capsys):
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in [("a", "x"), ("b", "y")]))
    for size in ("0", "-1"):
        assert f"--batch-size {size}: must be >= 1" in one_error_line(
            capsys, "eval", "classify", "--model", model_dir, "--data", data, "--batch-size", size)
    for chars in ("0", "-3"):
        assert f"--max-chars {chars}: must be >= 1" in one_error_line(
            capsys, "eval", "perplexity", "--model", model_dir, "--data", data, "--max-chars", chars)
    assert "--eval-chars -1: must be >= 1" in one_error_line(
        capsys, "quantize", "--model", model_dir, "--output", tmp_path / "q", "--eval-data", data,
        "--eval-chars", "-1")
    assert not (tmp_path / "q").exists()
    assert "--min-frequency -1: must be >= 0" in one_error_line(
        capsys, "tokenizer", "train", "--input", data, "--vocab-size", "300", "--output", tmp_path / "t",
        "--min-frequency", "-1")
    with pytest.raises(LMStackError, match="min_frequency -1: must be >= 0"):
        lmstack.Tokenizer.train(["some text"], vocab_size=300, min_frequency=-1)


def test_plot_writes_the_file_it_names_or_refuses(run_dir, tmp_path, capsys):
    for name in ("x.foo", "noext"):
        assert "must end in .png, .pdf, .svg" in one_error_line(capsys, "plot", run_dir, "--output",
                                                                tmp_path / name)
        assert not list(tmp_path.glob(name + "*"))
    for out, written in ((tmp_path / "curve.pdf", tmp_path / "curve.pdf"),
                         (tmp_path / "curve.svg", tmp_path / "curve.svg"), (tmp_path, tmp_path / "loss.png"),
                         (f"{tmp_path / 'new' / 'plots'}/", tmp_path / "new" / "plots" / "loss.png")):  # made
        assert main(["plot", str(run_dir), "--output", str(out)]) == 0
        assert capsys.readouterr().out == f"wrote {written}\n"
        assert written.stat().st_size > 0


def test_inputs_and_models_are_never_overwritten_and_unused_flags_refused(model_dir, tmp_path, capsys):
    """An --output that is the --data, a tokenizer written over a model's, and flags that would do nothing:
    each one error line before any work, and the files stay as they were."""
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in [("a", "x"), ("b", "y")]))
    before = data.read_text()
    err = one_error_line(capsys, "eval", "classify", "--model", model_dir, "--data", data, "--labels", "x,y",
                         "--output", data)
    assert "that is an input file, which the result would replace" in err and data.read_text() == before
    assert "no directory" in one_error_line(capsys, "eval", "classify", "--model", model_dir, "--data", data,
                                            "--labels", "x,y", "--output", tmp_path / "missing" / "m.json")
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    tokenizer = (copy / "tokenizer.json").read_bytes()
    err = one_error_line(capsys, "tokenizer", "train", "--input", data, "--vocab-size", "300", "--output", copy)
    assert "holds a model" in err and (copy / "tokenizer.json").read_bytes() == tokenizer
    for argv, message in (
        (["quantize", "--model", model_dir, "--output", tmp_path / "q", "--bits", "8", "--group-size", "32"],
         "--group-size applies to --bits 4 and nf4"),
        (["convert", model_dir, tmp_path / "c", "--gguf-type", "q8_0"], "--gguf-type applies to a .gguf destination"),
        (["convert", model_dir, tmp_path / "c.gguf", "--max-shard-size", "1KB"], "a GGUF file is one file"),
        # Given at their defaults they are refused too: the flag was meant for the other kind of destination.
        (["convert", model_dir, tmp_path / "c", "--gguf-type", "f32"], "--gguf-type applies to a .gguf destination"),
        (["convert", model_dir, tmp_path / "c.gguf", "--max-shard-size", "5GB"], "a GGUF file is one file"),
        (["chat", "--model", model_dir, "--n", "2"], "--n 2: a chat streams one reply per turn"),
        (["data", "prepare", "--input", data, "--tokenizer", "char", "--output", tmp_path / "s", "--workers", "0"],
         "--workers 0: must be >= 1"),
    ):
        assert message in one_error_line(capsys, *argv)
    assert not any((tmp_path / name).exists() for name in ("q", "c", "c.gguf", "s"))


def test_generative_classification_keeps_the_end_of_a_text_longer_than_the_context(model_dir):
    from lmstack.evaluate.classify import predict_labels

    model, tok = lmstack.load_model(model_dir), lmstack.load_tokenizer(model_dir)
    long = "word " * (2 * model.config.block_size)
    assert predict_labels(model, tok, [long, "short"], ["yes", "no"]) [0] in ("yes", "no")


def test_a_recurrent_lm_is_scored_by_perplexity_and_refused_by_generate(tmp_path, capsys):
    """An LSTM is a language model: `eval perplexity` scores it (as the Python function does); `generate`,
    whose engine runs Transformers, says so and names the function that continues one."""
    from lmstack.evaluate import perplexity
    from lmstack.models import build_model

    text = "To be, or not to be, that is the question.\n" * 20
    tok = lmstack.Tokenizer.train([text], vocab_size=300, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    model = build_model(lmstack.ModelConfig(arch="lstm", vocab_size=300, n_embd=16, n_head=1, n_layer=1,
                                            block_size=64)).eval()
    lmstack.save_model(model, tmp_path / "lstm", tokenizer=tok)
    # the tokenizer's eos, which the config lacked, is saved with the model (as a Transformer's is)
    assert lmstack.load_model(tmp_path / "lstm").config.eos_token_id == tok.eos_token_id is not None
    data = tmp_path / "held-out.txt"
    data.write_text(text)
    assert main(["eval", "perplexity", "--model", str(tmp_path / "lstm"), "--data", str(data)]) in (0, None)
    reported = json.loads(capsys.readouterr().out)
    assert reported["perplexity"] == pytest.approx(perplexity(model, tok, text).perplexity, rel=1e-5)
    err = one_error_line(capsys, "generate", "--model", tmp_path / "lstm", "ROMEO:")
    assert "a recurrent LM (arch 'lstm'); generation runs Transformer models" in err and "generate_ids" in err
    err = one_error_line(capsys, "convert", tmp_path / "lstm", tmp_path / "l.gguf")
    assert "a recurrent LM; GGUF holds Transformer language models" in err


def test_a_gguf_name_in_capitals_is_a_gguf_file(model_dir, tmp_path, capsys):
    assert main(["convert", str(model_dir), str(tmp_path / "M.GGUF")]) == 0
    assert (tmp_path / "M.GGUF").is_file()
    capsys.readouterr()
    assert main(["info", str(tmp_path / "M.GGUF")]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["vocab_size"] == 300


def test_python_load_model_names_a_training_run(run_dir):
    with pytest.raises(LMStackError, match=r"a training run directory, not a checkpoint; pass one of its "
                                           r"checkpoints, RUN/checkpoints/step-N \(the newest: .*step-0000020\)"):
        lmstack.load_model(run_dir)


def test_tokenizer_train_notes_what_it_replaced_and_a_short_vocabulary(tmp_path, capsys):
    data = tmp_path / "t.txt"
    data.write_bytes(b"To be, or not to be \xff\xfe that is the question.\n" * 50)
    assert main(["tokenizer", "train", "--input", str(data), "--vocab-size", "5000", "--output",
                 str(tmp_path / "tok")]) == 0
    err = capsys.readouterr().err
    assert "note: 100 invalid UTF-8 sequences replaced with U+FFFD in" in err
    assert "fewer than --vocab-size 5,000 (more text gives more)" in err


def test_compare_checks_the_corpus_and_output_before_writing(tmp_path, capsys):
    data = tmp_path / "tiny.txt"
    data.write_text("To be, or not to be, that is the question.\n" * 30)
    err = one_error_line(capsys, "compare", "--data", data, "--output", tmp_path / "cmp", "--steps", "2",
                         "--vocab-size", "300")
    assert "its last 10% is" in err and "give a larger corpus" in err
    assert not (tmp_path / "cmp").exists()
    (tmp_path / "file.md").write_text("x")
    assert "a file; compare writes a directory" in one_error_line(capsys, "compare", "--data", data, "--output",
                                                                  tmp_path / "file.md")
    assert f"{tmp_path}: a directory; give the files in it" in one_error_line(
        capsys, "eval", "bleu", "--predictions", tmp_path, "--references", data)


def test_a_missing_chat_template_says_how_to_get_one(model_dir, capsys):
    for argv in (["generate", "--model", model_dir, "--chat", "hi"], ["chat", "--model", model_dir]):
        err = one_error_line(capsys, *argv)
        assert "lmstack tokenizer train --chat-template chatml" in err and "in Python" not in err


@pytest.mark.parametrize("argv", [["pretrain"], ["pretrain", "--config", "recipes/demo.yaml", "--max_steps"],
                                  ["pretrain", "--config", "recipes/demo.yaml", "max_steps", "10"],
                                  # the verb names the task: another --task would be silently overridden
                                  ["finetune", "orpo", "--config", "recipes/align-preference.yaml", "--task", "simpo"],
                                  ["finetune", "orpo", "--config", "recipes/align-preference.yaml", "--task=kto"]])
def test_a_malformed_command_line_exits_2(argv, capsys, monkeypatch):
    from tests.conftest import REPO

    monkeypatch.chdir(REPO)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]


def test_a_missing_verb_lists_the_verbs(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval"])
    assert exit_.value.code == 2
    assert "the following arguments are required: {perplexity,classify,rouge,bleu}" in capsys.readouterr().err


def test_an_unknown_flag_names_its_verbs_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", "m", "hi", "--temprature", "0.5"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.strip() == (
        "error: lmstack generate: unrecognized arguments: --temprature 0.5 (see lmstack generate --help)")


def test_chat_help_lists_only_the_flags_chat_takes(capsys):
    for verb, listed in (("chat", False), ("generate", True)):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        out = capsys.readouterr().out
        assert ("--n N" in out) is listed and ("--truncate-prompt" in out) is listed, verb
        assert "--temperature" in out and "--max-new-tokens" in out
