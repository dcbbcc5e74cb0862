"""Speculative decoding: greedy identical to the target alone, the accept/resample rule preserves the target
distribution, acceptance statistics, prompt lookup."""

from pathlib import Path

import pytest
import torch

import lmstack
from lmstack import Engine, LMStackError
from lmstack.generate.speculative import accept_or_resample, prompt_lookup, speculative_generate
from tests.conftest import REPO


@pytest.fixture(scope="module")
def models():
    text = (REPO / "data" / "tinyshakespeare.txt").read_text()[:100_000]
    tok = lmstack.Tokenizer.train([text], vocab_size=400)
    torch.manual_seed(0)
    target = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=400, n_layer=3)).eval()
    draft = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=400, n_layer=1)).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(20)
        draft.lm_head.weight.copy_(target.lm_head.weight)  # a related drafter, so some proposals pass
        draft.embed.weight.copy_(target.embed.weight)
    return target, draft, tok


@pytest.mark.parametrize("drafter", ["model", "prompt_lookup"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_is_identical_to_the_target(models, drafter, k):
    target, draft, tok = models
    for prompt in ["ROMEO: ROMEO: ROMEO:", "First Citizen:\nBefore we proceed any further"]:
        expected = Engine(target, tok).generate(prompt, max_new_tokens=30, temperature=0, ignore_eos=True)[0]
        out, stats = speculative_generate(target, tok, prompt, draft if drafter == "model" else "prompt_lookup",
                                          k=k, temperature=0, max_new_tokens=30, ignore_eos=True)
        assert out.token_ids == expected.token_ids
        assert stats.target_passes <= 30 and 0 <= stats.acceptance_rate <= 1


def test_accept_resample_preserves_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])  # a poor drafter
    counts = torch.zeros(4)
    n = 40_000
    drafts = torch.multinomial(q, n, replacement=True, generator=g)
    for d in drafts.tolist():
        _, token = accept_or_resample(p, q, d, greedy=False, generator=g)
        counts[token] += 1
    assert torch.allclose(counts / n, p, atol=0.01)


def test_sampled_output_matches_the_target_distribution(models):
    """End to end: the first sampled token's frequencies equal the target's next-token distribution."""
    target, draft, tok = models
    prompt = tok.encode("ROMEO:")
    with torch.no_grad():
        p = target(torch.tensor([prompt]))[0, -1].softmax(-1)
    counts = torch.zeros(p.numel())
    n = 1500
    for seed in range(n):
        out, _ = speculative_generate(target, tok, prompt, draft, k=3, temperature=1.0, max_new_tokens=2,
                                      seed=seed, ignore_eos=True)
        counts[out.token_ids[0]] += 1
    top = p.topk(5).indices
    assert torch.allclose(counts[top] / n, p[top], atol=0.035)


def test_identical_drafter_accepts_everything(models):
    target, _, tok = models
    _, stats = speculative_generate(target, tok, "ROMEO:", target, k=4, temperature=1.0, seed=0,
                                    max_new_tokens=20, ignore_eos=True)
    assert stats.proposed > 0 and stats.acceptance_rate == pytest.approx(1.0)


def test_prompt_lookup():
    assert prompt_lookup([1, 2, 3, 4, 9, 1, 2, 3], 2) == [4, 9]
    assert prompt_lookup([5, 6, 7], 3) == []


def test_greedy_fills_the_context_and_starts_from_an_empty_prompt(models):
    """At the end of the context speculative greedy stops where the engine stops (no slot left unused), and
    an empty prompt starts from the start token, as in the engine."""
    target, draft, tok = models
    prompt = tok.encode("First Citizen:\nBefore we proceed any further, hear me speak.")
    room = target.config.block_size - len(prompt)
    for drafter in (draft, "prompt_lookup"):
        expected = Engine(target, tok).generate([prompt], max_new_tokens=room + 50, temperature=0,
                                                 ignore_eos=True)[0]
        out, _ = speculative_generate(target, tok, prompt, drafter, k=4, temperature=0,
                                      max_new_tokens=room + 50, ignore_eos=True)
        assert len(expected.token_ids) == room and out.token_ids == expected.token_ids
        assert out.finish_reason == "length"
        empty = Engine(target, tok).generate([[]], max_new_tokens=5, temperature=0, ignore_eos=True)[0]
        out, _ = speculative_generate(target, tok, [], drafter, k=2, temperature=0, max_new_tokens=5,
                                      ignore_eos=True)
        assert out.token_ids == empty.token_ids and len(out.token_ids) == 5
    with pytest.raises(LMStackError, match="no logprobs"):
        speculative_generate(target, tok, prompt, "prompt_lookup", logprobs=2)
    with pytest.raises(LMStackError, match="token id 999"):
        speculative_generate(target, tok, [1, 999], "prompt_lookup")


def test_bad_speculative_arguments(models):
    target, _, tok = models
    with pytest.raises(LMStackError, match="k=0"):
        speculative_generate(target, tok, "x", k=0)
    with pytest.raises(LMStackError, match="k=2.5: the tokens drafted per target pass must be an integer"):
        speculative_generate(target, tok, "x", k=2.5)
    import numpy as np  # a numpy integer is an integer

    out, stats = speculative_generate(target, tok, "x", "prompt_lookup", k=np.int64(2), max_new_tokens=3,
                                      temperature=0, ignore_eos=True)
    again, _ = speculative_generate(target, tok, "x", "prompt_lookup", k=2, max_new_tokens=3, temperature=0,
                                    ignore_eos=True)
    assert len(out.token_ids) == 3 and out.token_ids == again.token_ids
    small = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=300))
    with pytest.raises(LMStackError, match="vocabulary"):
        speculative_generate(target, tok, "x", small)
    long = "word " * 500
    with pytest.raises(LMStackError, match="prompt has .* tokens; the context holds .*truncate_prompt"):
        speculative_generate(target, tok, long, max_new_tokens=8)


@pytest.mark.parametrize("room", [1, 2, 5])
def test_speculative_runs_up_to_the_end_of_the_context_as_the_engine_does(models, room):
    """A prompt a few tokens short of the context gets those tokens, as from the engine: proposals are cut
    to the room that is left, so no slots are held back for them."""
    target, draft, tok = models
    block = target.config.block_size
    prompt = (tok.encode("ROMEO: " * block) * 2)[:block - room]
    alone = Engine(target, tok).generate([prompt], max_new_tokens=8, temperature=0, ignore_eos=True)[0]
    assert len(alone.token_ids) == min(room, 8)
    for drafter in (draft, "prompt_lookup"):
        out, _ = speculative_generate(target, tok, prompt, drafter, k=4, temperature=0, max_new_tokens=8,
                                      ignore_eos=True)
        assert out.token_ids == alone.token_ids and out.finish_reason == "length"


def test_draft_device_context_and_stop_ids_are_checked(models):
    target, draft, tok = models
    with torch.device("meta"):
        elsewhere = lmstack.DecoderLM(draft.config)
    with pytest.raises(LMStackError, match="draft is on meta but the target is on cpu"):
        speculative_generate(target, tok, "x", elsewhere)
    short = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=400, n_layer=1,
                                                            block_size=16)).eval()
    with pytest.raises(LMStackError, match="draft: its context of 16 is smaller than the"):
        speculative_generate(target, tok, "ROMEO:", short, max_new_tokens=20)
    out, _ = speculative_generate(target, tok, "ROMEO:", short, max_new_tokens=4, k=2, temperature=0)
    assert len(out.token_ids) <= 4  # a request the short draft holds runs
    with pytest.raises(LMStackError, match="stop_token_ids: token id 400 is outside the vocabulary of 400"):
        speculative_generate(target, tok, "x", stop_token_ids=[400])


def test_no_new_tokens_is_an_empty_completion(models):
    target, draft, tok = models
    for drafter in (draft, "prompt_lookup"):
        out, stats = speculative_generate(target, tok, "ROMEO:", drafter, max_new_tokens=0)
        assert (out.text, out.token_ids, out.finish_reason) == ("", [], "length")
        assert out.prompt_tokens == len(tok.encode("ROMEO:")) and stats.target_passes == 0


def test_stop_strings_trim_tokens_as_the_engine_does(models):
    """Cut at a stop string, the completion keeps the tokens that spell its text, as the engine's does."""
    target, draft, tok = models
    params = dict(max_new_tokens=30, temperature=0, ignore_eos=True)
    free = Engine(target, tok).generate("ROMEO:", **params)[0]
    ids = free.token_ids
    stop = tok.decode(ids[:8])[len(tok.decode(ids[:6])):]  # tokens 6 and 7: the stop begins on a token
    expected = Engine(target, tok).generate("ROMEO:", stop=[stop], **params)[0]
    assert expected.token_ids == ids[:6]  # the engine drops the tokens that spell the stop string
    for drafter in (draft, "prompt_lookup"):
        out, _ = speculative_generate(target, tok, "ROMEO:", drafter, k=3, stop=[stop], **params)
        assert (out.text, out.token_ids, out.finish_reason) == (expected.text, expected.token_ids, "stop")


def test_overrides_and_truncation(models):
    """Keyword overrides apply on top of `params`; truncate_prompt keeps as much of the prompt's end as fits."""
    target, _, tok = models
    base = lmstack.SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)
    out, _ = speculative_generate(target, tok, "ROMEO:", params=base, max_new_tokens=5)
    assert len(out.token_ids) == 5
    long = "word " * 500
    out, _ = speculative_generate(target, tok, long, params=base, truncate_prompt=True, max_new_tokens=8, k=4)
    assert len(out.token_ids) == 8 and out.prompt_tokens == target.config.block_size - 8  # as the engine keeps
    fits = tok.encode(long)[:target.config.block_size - 4]  # a prompt that fits is kept whole
    out, _ = speculative_generate(target, tok, fits, params=base, truncate_prompt=True, max_new_tokens=8, k=4)
    assert out.prompt_tokens == target.config.block_size - 4 and len(out.token_ids) == 4


def test_cli_speculative(models, tmp_path, capsys):
    from lmstack.cli import main

    target, _, tok = models
    lmstack.save_model(target, tmp_path, tokenizer=tok)
    args = ["generate", "ROMEO: ROMEO:", "--model", str(tmp_path), "--temperature", "0", "--max-new-tokens", "12",
            "--ignore-eos"]
    assert main([*args, "--no-stream"]) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--speculative", "prompt_lookup", "--draft-k", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and "drafted tokens accepted" in captured.err


def test_cli_loads_the_draft_on_the_targets_device(models, tmp_path, monkeypatch, capsys):
    import lmstack.checkpoints
    from lmstack.cli import main

    target, draft, tok = models
    lmstack.save_model(target, tmp_path / "target", tokenizer=tok)
    lmstack.save_model(draft, tmp_path / "draft", tokenizer=tok)
    devices, load = {}, lmstack.checkpoints.load_model

    def spy(path, *args, **kwargs):
        devices[Path(path).name] = kwargs.get("device")
        return load(path, *args, **kwargs)

    monkeypatch.setattr(lmstack.checkpoints, "load_model", spy)
    assert main(["generate", "ROMEO:", "--model", str(tmp_path / "target"), "--temperature", "0",
                 "--max-new-tokens", "6", "--speculative", str(tmp_path / "draft"), "--device", "cpu"]) == 0
    assert devices == {"target": "cpu", "draft": "cpu"}
