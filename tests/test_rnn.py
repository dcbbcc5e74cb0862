"""Recurrent LMs: the textbook parameter count, training on the shared loop, checkpoints, generation."""

import json
import subprocess
import sys

import pytest
import torch

import lmstack
from lmstack import ModelConfig
from lmstack.generate import generate_ids
from lmstack.models import RNNLM, build_model


def test_elman_parameter_count_textbook():
    # VECTORS.md: vocabulary 32,011, embedding = hidden = 128, two layers of W, U, b, output with bias.
    cfg = ModelConfig(arch="rnn", vocab_size=32011, n_embd=128, n_head=1, n_layer=2, lm_head_bias=True,
                      tie_embeddings=False)
    assert RNNLM(cfg).num_params() == 8_292_619


def test_elman_recurrence_by_hand():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="rnn", vocab_size=11, n_embd=4, n_head=1, n_layer=1, tie_embeddings=False)
    model = RNNLM(cfg).eval()
    ids = torch.tensor([[1, 5, 7]])
    layer = model.layers[0]
    h = torch.zeros(4)
    hs = []
    for t in ids[0]:
        x = model.embed.weight[t]
        h = torch.tanh(layer.W.weight @ x + layer.U.weight @ h + layer.b)
        hs.append(h)
    expected = model.lm_head(torch.stack(hs))
    assert torch.allclose(model(ids)[0], expected, atol=1e-6)


@pytest.mark.parametrize("arch", ["rnn", "lstm", "gru"])
def test_state_carries_across_calls_and_checkpoint_round_trip(arch, tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, vocab_size=50, n_embd=16, n_head=1, n_layer=2)).eval()
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        full = model(ids)
        first, state = model(ids[:, :6], return_state=True)
        rest = model(ids[:, 6:], state=state)
    assert torch.allclose(torch.cat([first, rest], 1), full, atol=1e-5)
    lmstack.save_model(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "lmstack"
    again = lmstack.load_model(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(ids), full)
    out = generate_ids(again, [1, 2, 3], 5, temperature=0)
    assert len(out) == 5
    with pytest.raises(lmstack.LMStackError, match="runs Transformer models.*generate_ids"):
        lmstack.Engine(again, lmstack.Tokenizer.train_chars(["abc"]))  # a clear error, not an AttributeError


def test_lstm_trains_with_the_shared_loop(tmp_path):
    text = "to be or not to be that is the question " * 300
    (tmp_path / "c.txt").write_text(text)
    cli = [sys.executable, "-m", "lmstack.cli"]
    assert subprocess.run([*cli, "data", "prepare", "--input", str(tmp_path / "c.txt"), "--tokenizer", "char",
                           "--output", str(tmp_path / "s"), "--workers", "1"], capture_output=True).returncode == 0
    run = subprocess.run([*cli, "pretrain", "--data", str(tmp_path / "s"), "--out_dir", str(tmp_path / "r"),
                          "--model.arch", "lstm", "--model.n_embd", "64", "--model.n_layer", "1",
                          "--max_steps", "60", "--eval_interval", "30", "--checkpoint_interval", "30",
                          "--batch_size", "8", "--block_size", "32", "--learning_rate", "1e-2",
                          "--warmup_steps", "5", "--progress", "false", "--sample_tokens", "10"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in lines if "val_loss" in r]
    assert val[-1] < 0.6 * val[0]  # a repetitive text is learned
    model = lmstack.load_model(tmp_path / "r" / "checkpoints" / "step-0000060")
    assert isinstance(model, RNNLM) and model.config.arch == "lstm"


def test_native_checkpoints_must_match_their_config(tmp_path):
    """A recurrent LM's checkpoint whose config.json was edited (fewer layers, a tied head over a stored one,
    no lmstack_config) is refused by name, as the Hugging Face loader refuses a mismatch."""
    model = build_model(ModelConfig(arch="lstm", vocab_size=50, n_embd=16, n_head=1, n_layer=2,
                                    tie_embeddings=False))
    lmstack.save_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for change, match in ((dict(n_layer=1), "unexpected tensor 'layers.1"),
                          (dict(tie_embeddings=True), "unexpected tensor 'lm_head.weight'")):
        edited = {**config, "lmstack_config": {**config["lmstack_config"], **change}}
        (tmp_path / "config.json").write_text(json.dumps(edited))
        with pytest.raises(lmstack.LMStackError, match=match):
            lmstack.load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "lmstack"}))
    with pytest.raises(lmstack.LMStackError, match="needs an 'lmstack_config' object"):
        lmstack.load_model(tmp_path)
    with pytest.raises(lmstack.LMStackError, match="not a config.json.*pass the checkpoint directory"):
        lmstack.load_model(tmp_path / "model.safetensors")
    from lmstack.checkpoints.gguf import save_gguf

    with pytest.raises(lmstack.LMStackError, match="recurrent LM"):
        save_gguf(model, lmstack.Tokenizer.train_chars(["abc"]), tmp_path / "m.gguf")
