"""The training loop's pieces: gradient accumulation, weight-decay groups, the GPU peak table, data checks."""

import json

import pytest

import lmstack
from lmstack import LMStackError
from lmstack.data.shards import prepare_shards
from lmstack.train.config import load_config
from lmstack.train.loop import optimizer_groups, train
from lmstack.train.metrics import peak_flops_of
from tests.conftest import REPO


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    corpus.write_text((REPO / "data" / "tinyshakespeare.txt").read_text()[:200_000])
    out = tmp_path_factory.mktemp("shards") / "char"
    prepare_shards([corpus], lmstack.Tokenizer.train_chars([corpus.read_text()]), out, workers=1, progress=False)
    return out


def run(shards, out, *args):
    cfg = load_config(None, ["--data", str(shards), "--out_dir", str(out), "--max_steps", "5", "--block_size", "32",
                             "--log_interval", "1", "--eval_interval", "5", "--eval_batches", "1", "--progress",
                             "false", "--model.n_layer", "1", "--model.dropout", "0", "--warmup_steps", "2", *args])
    train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_gradient_accumulation_equals_the_larger_batch(shards, tmp_path):
    """Two micro-batches of 2 accumulate to the step that one batch of 4 (the same rows) takes."""
    whole = run(shards, tmp_path / "whole", "--batch_size", "4")
    accumulated = run(shards, tmp_path / "accum", "--batch_size", "2", "--grad_accum", "2")
    assert len(whole) == 5 and max(abs(a - b) for a, b in zip(whole, accumulated)) < 1e-5
    clipped = run(shards, tmp_path / "clipped", "--batch_size", "4", "--grad_clip", "1e-4")
    assert clipped[0] == pytest.approx(whole[0], abs=1e-6) and clipped[-1] > whole[-1] + 1e-3  # tiny steps


def test_a_split_too_small_is_named(shards, tmp_path):
    with pytest.raises(LMStackError, match=r"the val split has \d+ tokens, fewer than block_size \+ 1"):
        run(shards, tmp_path / "big", "--block_size", "100000", "--model.block_size", "100000")


def test_weight_decay_on_matrices_only():
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("gpt2", n_layer=1, n_embd=32, n_head=2,
                                                            vocab_size=64, block_size=16))
    decay, no_decay = optimizer_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in decay["params"]} == {n for n, p in model.named_parameters() if p.dim() == 2}
    assert all("norm" in names[id(p)] or "bias" in names[id(p)] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("name,precision,peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4e12), ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA A100-SXM4-80GB", "fp32", 156e12), ("NVIDIA GeForce RTX 4090", "fp16", 165.2e12),
    ("NVIDIA H200", "bf16", 989.4e12), ("NVIDIA H200 NVL", "bf16", 835.5e12), ("Some Future GPU", "bf16", None),
])
def test_mfu_peak_is_looked_up_by_device_name(name, precision, peak):
    assert peak_flops_of(name, precision) == peak


def test_mfu_counts_what_each_kind_of_run_computes():
    """6 N + attention for full training (nanoGPT's count); LoRA and QLoRA skip the frozen weights' gradients
    (4 N); a frozen reference scoring the same tokens adds its forward pass (2 N); a classifier has no LM head;
    attention is counted at the batch's own length; GRPO reports no MFU."""
    from lmstack.models import active_params, flops_per_token
    from lmstack.train.loop import run_flops_per_token
    from lmstack.train.lora import apply_lora, prepare_qlora

    config = lmstack.ModelConfig.from_name("tiny-llama", vocab_size=512, n_embd=128, n_head=4, n_kv_head=4)
    model = lmstack.DecoderLM(config)
    n = active_params(model)
    full = flops_per_token(config, n, 64)

    def flops(model, *args, seq_len=64):
        at = run_flops_per_token(load_config(None, ["--data", "d", "--block_size", "64", *args]), model)
        return at if at is None else at(seq_len)

    assert flops(model) == full
    assert flops(model, "--task", "sft", seq_len=16) == flops_per_token(config, n, 16) < full  # a short batch
    assert flops(model, "--task", "dpo") == full + 2 * n
    assert flops(model, "--task", "simpo") == full  # no reference
    assert flops(model, "--task", "grpo") is None
    head = config.vocab_size * config.n_embd  # untied: the head is a matrix of its own either way
    assert flops(model, "--task", "classify") == flops(model, "--task", "reward") == full - 6 * head
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets=["q", "v"])
    assert flops(model, "--task", "sft", "--lora_r", "4") == full - 2 * n
    qlora = lmstack.DecoderLM(config)
    prepare_qlora(qlora, r=4, alpha=8, dropout=0.0, targets=["q", "v"])  # 4-bit weights are buffers
    assert flops(qlora, "--task", "dpo", "--lora_r", "4", "--qlora", "true") == full


def test_a_fresh_run_starts_its_metrics_anew(shards, tmp_path):
    """A run killed before its first checkpoint leaves metrics.jsonl but nothing to resume: running the same
    command again must not append to the old records."""
    first = run(shards, tmp_path / "r", "--batch_size", "2")
    import shutil

    shutil.rmtree(tmp_path / "r" / "checkpoints")
    assert run(shards, tmp_path / "r", "--batch_size", "2") == first  # the same five losses, not ten


def test_throughput_counts_training_steps_only(shards, tmp_path, monkeypatch):
    """Checkpoints and evaluations stop the clock; the first step (compilation, warm-up) reports none."""
    import time

    from lmstack.train import checkpoint

    # A fake clock that each checkpoint moves on by 1000 s: a window that held one would read 64 tokens /
    # 1000 s, whatever the machine's speed.
    offset, perf_counter, publish = [0.0], time.perf_counter, checkpoint.publish
    monkeypatch.setattr(time, "perf_counter", lambda: perf_counter() + offset[0])

    def slow_publish(*args, **kwargs):
        offset[0] += 1000.0
        return publish(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "publish", slow_publish)
    run(shards, tmp_path / "r", "--batch_size", "2", "--checkpoint_interval", "2", "--eval_interval", "2")
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert offset[0] == 3000.0  # saves at steps 2 and 4, and the final one
    assert "tok_per_s" not in steps[0] and all("tok_per_s" in r for r in steps[1:])
    assert min(r["tok_per_s"] for r in steps[1:]) > 1


def test_resuming_with_another_number_of_processes_is_refused(shards, tmp_path):
    run(shards, tmp_path / "r", "--batch_size", "2", "--checkpoint_interval", "3")
    state_file = tmp_path / "r" / "checkpoints" / "step-0000005" / "trainer_state" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["world_size"] == 1
    state_file.write_text(json.dumps({**state, "world_size": 2}))
    cfg = load_config(None, ["--data", str(shards), "--out_dir", str(tmp_path / "r"), "--max_steps", "8",
                             "--block_size", "32", "--log_interval", "1", "--eval_interval", "5", "--eval_batches",
                             "1", "--progress", "false", "--model.n_layer", "1", "--model.dropout", "0",
                             "--warmup_steps", "2", "--batch_size", "2", "--checkpoint_interval", "3"])
    with pytest.raises(LMStackError, match="different number of processes: the run had 2, now 1"):
        train(cfg, resume=True)
    # A checkpoint from before state.json named it: every process wrote its own RNG file.
    import shutil

    del state["world_size"]
    state_file.write_text(json.dumps(state))
    shutil.copy(state_file.parent / "rng-rank0.pt", state_file.parent / "rng-rank1.pt")
    with pytest.raises(LMStackError, match="the run had 2, now 1"):
        train(cfg, resume=True)
    (state_file.parent / "rng-rank1.pt").unlink()
    assert train(cfg, resume=True)["steps"] == 8


def test_resuming_with_more_steps_says_how_the_schedule_changes(shards, tmp_path, capsys):
    run(shards, tmp_path / "r", "--batch_size", "2", "--checkpoint_interval", "5")
    common = ["--data", str(shards), "--out_dir", str(tmp_path / "r"), "--block_size", "32", "--log_interval", "1",
              "--eval_interval", "5", "--eval_batches", "1", "--progress", "false", "--model.n_layer", "1",
              "--model.dropout", "0", "--warmup_steps", "2", "--batch_size", "2", "--checkpoint_interval", "5"]
    capsys.readouterr()
    train(load_config(None, [*common, "--max_steps", "7", "--lr_decay_steps", "5"]), resume=True)
    assert "note: max_steps" not in capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if r.get("step", 0) >= 5 and "lr" in r] == [pytest.approx(6e-5)] * 2  # min_lr
    train(load_config(None, [*common, "--max_steps", "9"]), resume=True)
    assert "note: the cosine decay now ends at step 9 (it ended at 5); --lr_decay_steps 5 keeps" in \
        capsys.readouterr().err


@pytest.mark.parametrize("eval_interval, expected", [("3", [0, 3, 5, 6, 8]), ("5", [0, 5, 8])])
def test_a_finished_run_trained_longer_keeps_its_last_evaluation(shards, tmp_path, eval_interval, expected):
    """The final evaluation of a run, off the eval grid, is not redone on resume: it stays in the log (on the
    grid it is redone, and logged once)."""
    run(shards, tmp_path / "r", "--eval_interval", eval_interval, "--checkpoint_interval", "5")
    common = ["--data", str(shards), "--out_dir", str(tmp_path / "r"), "--block_size", "32", "--log_interval", "1",
              "--eval_interval", eval_interval, "--eval_batches", "1", "--progress", "false", "--model.n_layer",
              "1", "--model.dropout", "0", "--warmup_steps", "2", "--checkpoint_interval", "5"]
    before = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    train(load_config(None, [*common, "--max_steps", "8"]), resume=True)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == expected
    at_5 = [r["val_loss"] for r in rows if "val_loss" in r and r["step"] == 5]
    assert at_5 == [pytest.approx(r["val_loss"]) for r in before if "val_loss" in r and r["step"] == 5]


def test_resuming_in_another_precision_says_so(shards, tmp_path, capsys):
    """precision auto resolves by device: a run from a GPU (bf16) resumed on the CPU (fp32) is told."""
    run(shards, tmp_path / "r", "--checkpoint_interval", "5")
    state_file = next((tmp_path / "r" / "checkpoints").glob("step-*")) / "trainer_state" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["precision"] == "fp32"  # what the CPU run trained in is saved
    common = ["--data", str(shards), "--out_dir", str(tmp_path / "r"), "--block_size", "32", "--log_interval", "1",
              "--eval_interval", "5", "--eval_batches", "1", "--progress", "false", "--model.n_layer", "1",
              "--model.dropout", "0", "--warmup_steps", "2", "--checkpoint_interval", "5"]
    capsys.readouterr()
    train(load_config(None, [*common, "--max_steps", "6"]), resume=True)
    assert "note: this run trained in" not in capsys.readouterr().err
    state_file = tmp_path / "r" / "checkpoints" / "step-0000006" / "trainer_state" / "state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "precision": "bf16"}))
    train(load_config(None, [*common, "--max_steps", "7"]), resume=True)
    assert "note: this run trained in bf16 and continues in fp32 (precision auto on cpu)" in capsys.readouterr().err


def test_an_empty_recipe_key_is_an_empty_setting(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: d\nmodel_overrides:\nsample_prompts:\n")
    cfg = load_config(recipe, ["--model.n_layer", "1"])
    assert cfg.model_overrides == {"n_layer": 1} and cfg.sample_prompts == []


def _common(shards, out):
    return ["--data", str(shards), "--out_dir", str(out), "--block_size", "32", "--log_interval", "1",
            "--eval_interval", "5", "--eval_batches", "1", "--progress", "false", "--model.n_layer", "1",
            "--model.dropout", "0", "--warmup_steps", "2", "--batch_size", "2", "--checkpoint_interval", "5"]


def test_resuming_at_or_below_the_checkpoints_step_is_refused(shards, tmp_path):
    run(shards, tmp_path / "r", "--batch_size", "2", "--checkpoint_interval", "5")
    metrics = (tmp_path / "r" / "metrics.jsonl").read_text()
    for steps in ("3", "5"):
        cfg = load_config(None, [*_common(shards, tmp_path / "r"), "--max_steps", steps])
        with pytest.raises(LMStackError, match=rf"max_steps {steps} is not past the last checkpoint's step 5 "
                                               r"\(.*step-0000005\)"):
            train(cfg, resume=True)
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == metrics  # nothing appended
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == ["step-0000005"]


@pytest.mark.parametrize("stop_at,expected", [
    (7, r"stopped: the last checkpoint is \S+step-0000005; continue the run with `lmstack pretrain --resume \S+r`"),
    (2, r"stopped before the first checkpoint of \S+r \(checkpoint_interval 5\): nothing to resume from"),
])
def test_ctrl_c_says_where_the_last_checkpoint_is(shards, tmp_path, monkeypatch, capsys, stop_at, expected):
    import re

    from lmstack.cli import main
    from lmstack.train import loop

    real = loop.lr_at

    def lr_at(step, cfg):
        if step == stop_at:
            raise KeyboardInterrupt
        return real(step, cfg)

    monkeypatch.setattr(loop, "lr_at", lr_at)
    assert main(["pretrain", *_common(shards, tmp_path / "r"), "--max_steps", "10"]) == 130
    err = capsys.readouterr().err
    assert re.search(expected, err) and err.endswith("interrupted\n") and "Traceback" not in err, err
    if stop_at == 7:  # nothing was written from the interrupted step, and the command given works
        assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == ["step-0000005"]
        monkeypatch.setattr(loop, "lr_at", real)
        assert main(["pretrain", "--resume", str(tmp_path / "r")]) == 0


def test_pretraining_from_a_checkpoint_checks_its_tokenizer_and_vocabulary(shards, tmp_path):
    import torch

    run(shards, tmp_path / "r", "--batch_size", "2")
    own = tmp_path / "r" / "checkpoints" / "step-0000005"
    base = ["--data", str(shards), "--block_size", "32", "--max_steps", "1", "--eval_interval", "5",
            "--eval_batches", "1", "--progress", "false", "--batch_size", "2", "--init_from", "checkpoint"]
    assert train(load_config(None, [*base, "--out_dir", str(tmp_path / "a"), "--model", str(own)]))["steps"] == 1

    small = tmp_path / "small"  # no tokenizer to compare: the vocabulary is still checked
    config = lmstack.ModelConfig.from_name("tiny-llama", vocab_size=10, n_layer=1, block_size=32)
    torch.manual_seed(0)
    lmstack.save_model(lmstack.DecoderLM(config), small)
    with pytest.raises(LMStackError, match=rf"the checkpoint {small} has vocab_size 10, smaller than the data's "
                                           r"\d+ .*token ids would be out of range"):
        train(load_config(None, [*base, "--out_dir", str(tmp_path / "b"), "--model", str(small)]))

    other = tmp_path / "other"  # a larger vocabulary, but another tokenizer
    text = (REPO / "data" / "tinyshakespeare.txt").read_text()[:20_000]
    tok = lmstack.Tokenizer.train([text], vocab_size=300)
    config = lmstack.ModelConfig.from_name("tiny-llama", vocab_size=300, n_layer=1, block_size=32)
    lmstack.save_model(lmstack.DecoderLM(config), other, tokenizer=tok)
    with pytest.raises(LMStackError, match=rf"the checkpoint {other} has another tokenizer \(sha256 \w+\) than the "
                                           rf"data {shards} was prepared with \(sha256 \w+\)"):
        train(load_config(None, [*base, "--out_dir", str(tmp_path / "c"), "--model", str(other)]))
