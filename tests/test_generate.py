"""Samplers against hand-computed distributions and `transformers`' processors; the engine against
`transformers` generate, itself batched vs unbatched, streaming, stopping and bad input."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

import lmstack
from lmstack import Engine, LMStackError, SamplingParams
from lmstack.generate.sampling import (
    apply_frequency_presence,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    apply_typical_p,
    banned_ngram_tokens,
    process_logits,
)
from tests.conftest import REPO

LOGITS = torch.tensor([[3.0, 2.0, 1.0, 0.1]])


def probs(logits):
    return logits.softmax(-1)[0]


# ---------------------------------------------------------------------------------------------- samplers


def test_softmax_and_temperature_hand_values():
    assert torch.allclose(probs(torch.tensor([[2.0, 1.0, 0.5]])), torch.tensor([0.63, 0.23, 0.14]), atol=0.005)
    for t, expected in ((0.5, [0.98, 0.02, 0.00]), (1.0, [0.87, 0.12, 0.02]), (2.0, [0.67, 0.24, 0.09])):
        out = process_logits(torch.tensor([[4.0, 2.0, 0.0]]), SamplingParams(temperature=t))
        assert torch.allclose(probs(out), torch.tensor(expected), atol=0.006)


def test_top_p_keeps_the_crossing_token():
    out = probs(apply_top_p(LOGITS, 0.9))
    assert torch.allclose(out, torch.tensor([0.665241, 0.244728, 0.090031, 0.0]), atol=1e-6)


def test_top_k_and_greedy():
    assert torch.allclose(probs(apply_top_k(LOGITS, 2)), torch.tensor([0.731059, 0.268941, 0, 0]), atol=1e-6)
    assert process_logits(LOGITS, SamplingParams(temperature=0)).argmax().item() == 0


def test_penalties_hand_values():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 0.5, 1.0]]
    counts = torch.tensor([[3.0, 0.0, 1.0, 0.0]])
    out = apply_frequency_presence(logits, counts, frequency=0.5, presence=0.25)
    assert out.tolist() == [[2.0 - 1.5 - 0.25, -1.0, 0.5 - 0.5 - 0.25, 1.0]]


def test_min_p_hand_values():
    # probabilities [0.642, 0.236, 0.087, 0.035]; min_p 0.1 drops those under 0.0642
    out = apply_min_p(LOGITS, 0.1)
    assert torch.isinf(out[0, 3]) and torch.isfinite(out[0, :3]).all()


def test_typical_p_hand_values():
    # p = [1/2, 1/4, 1/8, 1/8]: surprises -log2 p = [1, 2, 3, 3] bits, entropy H = 1.75 bits, so the distances
    # |surprise - H| = [0.75, 0.25, 1.25, 1.25]. Nearest first: token 1, token 0, then tokens 2 and 3 (tied),
    # with cumulative mass 0.25, 0.75, 1.0. typical_p keeps the smallest such set whose mass reaches it (the
    # crossing token included), and ties with the last kept one:
    #   0.2 -> {1}: [0, 1, 0, 0];  0.5 -> {1, 0}: renormalised [0.5, 0.25] / 0.75 = [2/3, 1/3, 0, 0];
    #   0.8 -> {1, 0, 2} and 3 (tied with 2): everything, unchanged.
    logits = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()
    for mass, expected in ((0.2, [0.0, 1.0, 0.0, 0.0]), (0.5, [2 / 3, 1 / 3, 0.0, 0.0]), (0.8, [0.5, 0.25, 0.125, 0.125])):
        assert torch.allclose(probs(apply_typical_p(logits, mass)), torch.tensor(expected), atol=1e-6), mass


def test_no_repeat_ngram():
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == {3}
    assert banned_ngram_tokens([1, 2, 3, 4], 3) == set()


def test_logit_bias_and_bans_leave_the_input_alone():
    """Processors return new logits: the engine reports logprobs from the model's own, untouched ones."""
    logits = LOGITS.clone()
    params = SamplingParams(temperature=0, logit_bias={1: 2.5, 3: -1.0}, no_repeat_ngram_size=2)
    out = process_logits(logits, params, histories=[[0, 2, 0]])  # 0 -> 2 seen: 2 is banned after 0
    assert torch.allclose(out, torch.tensor([[3.0, 4.5, float("-inf"), -0.9]]))
    assert torch.equal(logits, LOGITS)


def test_logit_bias_comes_before_the_repetition_penalty_as_in_transformers():
    """transformers (and vLLM) add the bias first: a seen token's biased logit is then penalised."""
    from transformers import RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor

    logits = torch.tensor([[-2.0, 1.0, 0.5, 3.0]])
    params = SamplingParams(temperature=0, repetition_penalty=1.5, logit_bias={0: 5.0, 1: 1.0})
    seen = torch.tensor([[True, True, False, False]])
    ours = process_logits(logits, params, seen=seen)
    assert torch.allclose(ours, torch.tensor([[3.0 / 1.5, 2.0 / 1.5, 0.5, 3.0]]))  # (x + b) / penalty
    ids = torch.tensor([[0, 1]])
    theirs = SequenceBiasLogitsProcessor({(0,): 5.0, (1,): 1.0})(ids, logits.clone())
    theirs = RepetitionPenaltyLogitsProcessor(1.5)(ids, theirs)
    assert torch.allclose(ours, theirs)


def test_generate_ids_fills_what_was_asked():
    """The training loop's samples: an empty prompt starts from token 0, and a prompt that fills the context
    keeps its end with room for the reply, rather than returning nothing."""
    from lmstack.generate import generate_ids

    torch.manual_seed(0)
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=64, block_size=32)).eval()
    assert len(generate_ids(model, [], 10)) == 10
    assert len(generate_ids(model, list(range(40)), 10)) == 10
    assert generate_ids(model, list(range(40)), 10) == generate_ids(model, list(range(40))[-22:], 10)  # 32 - 10 kept
    assert len(generate_ids(model, list(range(28)), 10)) == 4  # fits: kept whole, the context decides


@pytest.mark.parametrize("seed", range(3))
def test_processors_match_transformers(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(4, 50, generator=g) * 3
    ids = torch.randint(0, 50, (4, 12), generator=g)
    assert torch.equal(apply_top_k(scores, 7), TopKLogitsWarper(7)(ids, scores.clone()))
    assert torch.equal(apply_top_p(scores, 0.8), TopPLogitsWarper(0.8)(ids, scores.clone()))
    assert torch.equal(apply_min_p(scores, 0.05), MinPLogitsWarper(0.05)(ids, scores.clone()))
    assert torch.equal(apply_typical_p(scores, 0.7), TypicalLogitsWarper(0.7)(ids, scores.clone()))
    seen = torch.zeros(4, 50, dtype=torch.bool).scatter(1, ids, True)
    assert torch.allclose(apply_repetition_penalty(scores, seen, 1.3),
                          RepetitionPenaltyLogitsProcessor(1.3)(ids, scores.clone()))
    ours = process_logits(scores.clone(), SamplingParams(no_repeat_ngram_size=2),
                          histories=ids.tolist())
    assert torch.equal(ours, NoRepeatNGramLogitsProcessor(2)(ids, scores.clone()))


@pytest.mark.parametrize("sampler", ["multinomial", "exponential_race"])
def test_sampled_frequencies_match_the_distribution(sampler):
    """The CPU draws with torch.multinomial, a GPU with the exponential race (no host sync): both sample p."""
    from lmstack.generate.sampling import exponential_race, sample_from

    params = SamplingParams(temperature=0.7, top_p=0.9)
    processed = process_logits(LOGITS.repeat(20000, 1), params)
    g = torch.Generator().manual_seed(0)
    if sampler == "multinomial":
        draws = sample_from(processed, False, g)
    else:
        draws = exponential_race(processed.softmax(dim=-1), g)
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(freq, probs(processed[:1]), atol=0.01)
    assert freq[3] == 0


@pytest.mark.parametrize("bad,match", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(temperature=-1), "temperature"),
    (dict(stop=[5]), "stop"), (dict(n=0), "n="), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(top_k=2.5), "top_k"), (dict(n=2.5), "n="), (dict(temperature=None), "temperature"),
    (dict(top_p="0.5"), "top_p"), (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(stop_token_ids=5), "stop_token_ids"), (dict(stop_token_ids=[-5]), "stop_token_ids"),
    (dict(logit_bias={"a": 1.0}), "logit_bias"), (dict(choice="yes"), "choice"),
    (dict(regex=5), "regex=5: must be a string"), (dict(grammar=5), "grammar=5: must be a string"),
    (dict(json_schema=5), "json_schema=5"), (dict(ignore_eos="false"), "ignore_eos='false': must be True or"),
    (dict(truncate_prompt="no"), "truncate_prompt"), (dict(logit_bias={5: True}), "logit_bias"),
    (dict(logit_bias={5: float("inf")}), "logit_bias"), (dict(logit_bias={5: 1e39}), "logit_bias"),
    (dict(frequency_penalty=1e39), "frequency_penalty=1e\\+39: must be a finite number \\(within float32"),
    (dict(temperature=torch.tensor(0.5)), "temperature"),
])
def test_bad_sampling_parameters_name_the_parameter(bad, match):
    with pytest.raises(LMStackError, match=match):
        SamplingParams(**bad)


def test_numpy_scalars_are_numbers():
    """Settings computed with numpy are taken, as Python's numbers (a bool is not a number)."""
    params = SamplingParams(temperature=np.float32(0.5), top_p=np.float64(0.9), top_k=np.int64(3),
                            max_new_tokens=np.int32(7), seed=np.int64(4), logit_bias={np.int64(2): np.float32(1)})
    assert (params.temperature, params.top_k, params.max_new_tokens, params.seed) == (0.5, 3, 7, 4)
    assert type(params.temperature) is float and type(params.top_k) is int
    assert torch.equal(process_logits(LOGITS, params), process_logits(LOGITS, SamplingParams(
        temperature=0.5, top_p=0.9, top_k=3, logit_bias={2: 1.0})))
    with pytest.raises(LMStackError, match="top_k=True"):
        SamplingParams(top_k=True)


def test_extreme_settings_never_give_nan():
    """A bias or penalty that overflows float32 after the temperature still makes that token the pick (not
    NaN, whose argmax would silently be token 0); a -inf bias bans a token; banning all of them is an error."""
    from lmstack.generate.sampling import exponential_race, sample_from

    g = torch.Generator().manual_seed(0)
    for params in (SamplingParams(logit_bias={2: 1e38}, temperature=0.01),
                   SamplingParams(logit_bias={2: 3e38}, temperature=1.0, top_p=0.5, min_p=0.1, typical_p=0.9)):
        processed = process_logits(LOGITS, params)
        assert not processed.isnan().any()
        assert sample_from(processed, False, g).tolist() == [2]
        assert exponential_race(processed.softmax(-1), g).tolist() == [2]
    penalised = process_logits(LOGITS, SamplingParams(repetition_penalty=1e-38, temperature=0.5),
                               seen=torch.tensor([[True, False, False, False]]))
    assert not penalised.isnan().any() and sample_from(penalised, False, g).tolist() == [0]
    banned = process_logits(LOGITS.repeat(200, 1), SamplingParams(logit_bias={0: float("-inf")}))
    assert 0 not in sample_from(banned, False, g).tolist()
    with pytest.raises(LMStackError, match="every one of the 4 tokens is banned"):
        process_logits(LOGITS, SamplingParams(logit_bias={i: float("-inf") for i in range(4)}))


def test_a_tiny_temperature_is_greedy():
    """Dividing by 1e-40 overflows the logits to NaN (an empty or failed sample); below 1e-5 is greedy."""
    from lmstack.generate.sampling import sample_from

    params = SamplingParams(temperature=1e-40)
    assert params.greedy and not SamplingParams(temperature=1e-4).greedy
    g = torch.Generator().manual_seed(0)
    assert sample_from(process_logits(LOGITS, params), params.greedy, g).tolist() == [0]


# ---------------------------------------------------------------------------------------------- engine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with a real BPE tokenizer, saved so transformers loads the same weights."""
    text = (REPO / "data" / "tinyshakespeare.txt").read_text()[:100_000]
    tok = lmstack.Tokenizer.train([text], vocab_size=400, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=400)).eval()
    with torch.no_grad():  # sharper distributions than the 0.02 init, so greedy paths are not all ties
        model.lm_head.weight.mul_(20)
    path = tmp_path_factory.mktemp("tiny")
    lmstack.save_model(model, path, tokenizer=tok)
    return model, tok, path


PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed", "O"]


def test_greedy_equals_transformers(tiny):
    model, tok, path = tiny
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    engine = Engine(model, tok)
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        ours = engine.generate(prompt, max_new_tokens=20, temperature=0, ignore_eos=True)[0]
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(ids):].tolist()
        assert ours.token_ids == theirs
        assert ours.finish_reason == "length"


def test_generation_config_eos_ids_stop_as_in_transformers(tiny, tmp_path):
    """generation_config.json's list of eos ids (Llama 3, Qwen2.5) ends generation at any of them, as in
    transformers; a save keeps the list."""
    import json
    import shutil

    _, tok, path = tiny
    free = Engine(lmstack.load_model(path), tok).generate("ROMEO:", max_new_tokens=12, temperature=0,
                                                          ignore_eos=True)[0]
    stop = free.token_ids[4]  # a token greedy decoding reaches, first at or before its fifth step
    first = free.token_ids.index(stop)
    listed = tmp_path / "listed"
    shutil.copytree(path, listed)
    config = json.loads((listed / "generation_config.json").read_text())
    config["eos_token_id"] = [tok.eos_token_id, stop]
    (listed / "generation_config.json").write_text(json.dumps(config))
    model = lmstack.load_model(listed)
    assert model.config.eos_token_id == [tok.eos_token_id, stop]
    out = Engine(model, tok).generate("ROMEO:", max_new_tokens=12, temperature=0)[0]
    assert (out.token_ids, out.finish_reason, out.stop_token_id) == (free.token_ids[:first], "stop", stop)
    ids = tok.encode("ROMEO:")
    hf = AutoModelForCausalLM.from_pretrained(listed).eval()
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(ids):]
    assert theirs.tolist() == free.token_ids[:first] + [stop]
    again = Engine(model, tok).generate("ROMEO:", max_new_tokens=12, temperature=0, ignore_eos=True)[0]
    assert again.token_ids == free.token_ids  # ignore_eos ignores every eos id
    lmstack.save_model(model, tmp_path / "resaved", tokenizer=tok)
    saved = json.loads((tmp_path / "resaved" / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [tok.eos_token_id, stop]
    (listed / "generation_config.json").write_text('{"eos_token_id": "</s>"}')
    with pytest.raises(LMStackError, match="generation_config.json: eos_token_id must be a token id"):
        lmstack.load_model(listed)


def test_batched_equals_one_by_one(tiny):
    model, tok, _ = tiny
    engine = Engine(model, tok, max_batch_size=8)
    batched = engine.generate(PROMPTS, max_new_tokens=15, temperature=0, ignore_eos=True)
    single = [engine.generate(p, max_new_tokens=15, temperature=0, ignore_eos=True)[0] for p in PROMPTS]
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]
    as_ids = engine.generate(tok.encode(PROMPTS[0]), max_new_tokens=15, temperature=0, ignore_eos=True)
    assert len(as_ids) == 1 and as_ids[0].token_ids == single[0].token_ids  # one prompt given as token ids
    import numpy as np

    as_numpy = engine.generate(np.array(tok.encode(PROMPTS[0])), max_new_tokens=15, temperature=0, ignore_eos=True)
    assert as_numpy[0].token_ids == single[0].token_ids
    for bad in ([5, 400], [-1, 5]):
        with pytest.raises(LMStackError, match=f"prompt 0 holds token id {bad[0] if bad[0] < 0 else 400}, outside"):
            engine.generate([bad], max_new_tokens=2)


def test_seeded_samples_are_reproducible(tiny):
    model, tok, _ = tiny
    engine = Engine(model, tok)
    a = engine.generate("ROMEO:", max_new_tokens=12, temperature=1.0, seed=7, n=3, ignore_eos=True)
    b = engine.generate("ROMEO:", max_new_tokens=12, temperature=1.0, seed=7, n=3, ignore_eos=True)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert len({tuple(c.token_ids) for c in a}) > 1  # n samples differ from each other


def test_a_seeded_completion_does_not_depend_on_its_batch(tiny):
    """Each row draws from its own generator (seed + sample index): the same prompt and seed give the same
    completion alone, beside other prompts, split over smaller batches, and streamed."""
    model, tok, _ = tiny
    params = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=11, ignore_eos=True)
    alone = Engine(model, tok).generate("ROMEO:", n=2, **params)
    crowd = Engine(model, tok, max_batch_size=8).generate(["JULIET: O", "ROMEO:", "To be"], n=2, **params)
    split = Engine(model, tok, max_batch_size=3).generate(["JULIET: O", "ROMEO:"], n=2, **params)
    assert [c.token_ids for c in crowd[2:4]] == [c.token_ids for c in alone] == [c.token_ids for c in split[2:]]
    assert "".join(Engine(model, tok).stream("ROMEO:", **params)) == alone[0].text
    assert alone[0].token_ids != alone[1].token_ids and crowd[0].token_ids != alone[0].token_ids


def test_a_short_prompt_beside_a_long_one_keeps_its_own_room(tiny):
    """Each row stops at its own end of the context: a prompt batched with one that nearly fills the context
    still gets max_new_tokens, the same tokens as alone."""
    model, tok, _ = tiny
    block = model.config.block_size
    short = tok.encode("ROMEO:")
    long = (tok.encode("First Citizen: " * block))[:block - 6]
    params = dict(max_new_tokens=30, temperature=0, ignore_eos=True)
    alone = Engine(model, tok).generate([short], **params)[0]
    batched = Engine(model, tok).generate([short, long], **params)
    assert len(alone.token_ids) == 30 and batched[0].token_ids == alone.token_ids
    assert len(batched[1].token_ids) == 6 and batched[1].finish_reason == "length"
    assert batched[1].token_ids == Engine(model, tok).generate([long], **params)[0].token_ids


@pytest.mark.parametrize("preset,changes", [("tiny-gpt2", {}),  # learned positions: a table of block_size rows
                                            ("tiny-llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})])
def test_rows_past_their_limit_touch_nothing_beside_them(preset, changes):
    """A long prompt's row stops early while a short one runs on; the stopped row, still fed, must neither
    index past a learned position table nor move a dynamic NTK base (from the batch's longest position)."""
    tok = lmstack.Tokenizer.train([(REPO / "data" / "tinyshakespeare.txt").read_text()[:20_000]], vocab_size=300)
    torch.manual_seed(0)
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name(preset, vocab_size=300, block_size=16, **changes)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    short, long = [5], list(range(20, 32))
    params = dict(max_new_tokens=100, temperature=0, ignore_eos=True, logprobs=0)
    # Within block_size (dynamic NTK runs on past it, its base then following the batch's longest position,
    # as in transformers)
    alone = Engine(model, tok, max_seq_len=16).generate([short], **params)[0]
    batched = Engine(model, tok, max_seq_len=16).generate([short, long], **params)
    assert [len(c.token_ids) for c in batched] == [15, 4] and batched[0].token_ids == alone.token_ids
    assert max(abs(a.logprob - b.logprob) for a, b in zip(alone.logprobs, batched[0].logprobs)) < 1e-4


def test_seeds_per_prompt_give_each_its_own_noise(tiny):
    model, tok, _ = tiny
    engine = Engine(model, tok)
    params = dict(max_new_tokens=12, temperature=1.0, ignore_eos=True, n=2)
    same = engine.generate(["ROMEO:", "ROMEO:"], seed=3, **params)
    assert same[0].token_ids == same[2].token_ids  # one seed for the call: a repeated prompt repeats
    own = engine.generate(["ROMEO:", "ROMEO:"], seeds=[3, 5], **params)
    assert own[0].token_ids == same[0].token_ids and own[2].token_ids != own[0].token_ids
    assert own[2].token_ids == engine.generate(["ROMEO:"], seed=5, **params)[0].token_ids
    with pytest.raises(LMStackError, match="seeds: 1 given for 2 prompts"):
        engine.generate(["a", "b"], seeds=[1], **params)


def test_one_engine_runs_one_generation_at_a_time(tiny):
    """Two streams interleaved on one engine would overwrite each other's cache rows: the second is refused
    until the first is done, and then runs."""
    model, tok, _ = tiny
    engine = Engine(model, tok)
    params = dict(max_new_tokens=10, temperature=0, ignore_eos=True)
    first = engine.stream("ROMEO:", **params)
    head = next(first)
    with pytest.raises(LMStackError, match="in the middle of another generation"):
        next(engine.stream("O", **params))
    with pytest.raises(LMStackError, match="in the middle of another generation"):
        engine.generate("O", **params)
    assert head + "".join(first) == engine.generate("ROMEO:", **params)[0].text


def test_prompts_as_tensors_and_edge_sizes(tiny):
    model, tok, _ = tiny
    engine = Engine(model, tok)
    ids = tok.encode("ROMEO:")
    params = dict(max_new_tokens=6, temperature=0, ignore_eos=True)
    expected = engine.generate([ids], **params)[0].token_ids
    assert engine.generate(torch.tensor(ids), **params)[0].token_ids == expected
    assert engine.generate(torch.tensor([ids, ids]), **params)[1].token_ids == expected
    assert "".join(engine.stream(torch.tensor([ids]), **params)) == tok.decode(expected)
    beams = engine.beam_search(ids, num_beams=2, max_new_tokens=6)[0].token_ids
    assert len(beams) == 6 and engine.beam_search(torch.tensor(ids), num_beams=2, max_new_tokens=6)[0].token_ids == beams
    empty = engine.beam_search("ROMEO:", num_beams=2, max_new_tokens=0, num_return_sequences=2)
    assert [(c.token_ids, c.finish_reason) for c in empty] == [([], "length")] * 2
    for bad in (dict(max_batch_size=0), dict(max_batch_size=2.5), dict(max_seq_len=True), dict(max_seq_len=0)):
        name, value = next(iter(bad.items()))
        with pytest.raises(LMStackError, match=f"{name}={value!r}: must be an integer >= 1"):
            Engine(model, tok, **bad)
    with pytest.raises(LMStackError, match=r"prompt 0: token ids must be integers, got 1.5"):
        engine.generate([[ids[0], 1.5]], **params)
    with pytest.raises(LMStackError, match="token ids must be integers"):
        engine.generate(torch.tensor([[1.0, 2.0]]), **params)
    for flat in ([1.0, 2.0], [ids[0], 2.5], torch.tensor([1.0, 2.0]), np.array([1.0, 2.0])):  # one prompt, flat
        with pytest.raises(LMStackError, match="prompt 0: token ids must be integers"):
            engine.generate(flat, **params)
    assert engine.generate(np.array(ids), **params)[0].token_ids == expected
    with pytest.raises(LMStackError, match=r"seeds=\[1.7\]: must be integers"):
        engine.generate([ids], seeds=[1.7], **params)
    with pytest.raises(LMStackError, match="one prompt is expected here, got a batch of 2"):
        engine.beam_search(torch.tensor([ids, ids]))


@pytest.mark.parametrize("bad, match", [
    (dict(num_beams=0), "num_beams=0: must be an integer >= 1"),
    (dict(num_beams=2.0), "num_beams=2.0: must be an integer"),
    (dict(num_return_sequences=True), "num_return_sequences=True"),
    (dict(num_beams=2, num_return_sequences=3), r"between 1 and num_beams \(2\)"),
    (dict(length_penalty=float("nan")), "length_penalty=nan: must be a finite number"),
    (dict(length_penalty="1"), "length_penalty='1'"), (dict(length_penalty=True), "length_penalty=True"),
])
def test_bad_beam_parameters_name_the_parameter(tiny, bad, match):
    model, tok, _ = tiny
    engine = Engine(model, tok)
    with pytest.raises(LMStackError, match=match):
        engine.beam_search("ROMEO:", **{"max_new_tokens": 4, **bad})
    assert len(engine.generate("ROMEO:", max_new_tokens=4, ignore_eos=True)[0].token_ids) == 4  # still works


def test_numpy_sizes_are_accepted(tiny):
    import numpy as np

    model, tok, _ = tiny
    engine = Engine(model, tok, max_batch_size=np.int64(2), max_seq_len=np.int32(64))
    beams = engine.beam_search("ROMEO:", num_beams=np.int64(2), num_return_sequences=np.int64(2),
                               length_penalty=np.float32(1.0), max_new_tokens=4, ignore_eos=True)
    assert len(beams) == 2 and all(len(b.token_ids) == 4 for b in beams)
    assert beams[0].token_ids == Engine(model, tok).beam_search("ROMEO:", num_beams=2, max_new_tokens=4,
                                                                ignore_eos=True)[0].token_ids


def test_a_failed_cache_allocation_leaves_the_engine_usable(tiny, monkeypatch):
    """Out of memory part way through growing the cache (at the second layer) leaves no layers of two sizes:
    the next call allocates afresh and generates what it would have."""
    import lmstack.models.decoder as decoder

    model, tok, _ = tiny
    engine = Engine(model, tok, max_batch_size=8)
    params = dict(max_new_tokens=4, temperature=0, ignore_eos=True)
    expected = [c.token_ids for c in engine.generate(["ROMEO:", "JULIET:"] * 4, **params)]
    model.clear_kv_cache()
    engine = Engine(model, tok, max_batch_size=8)
    engine.generate("ROMEO:", **params)  # a cache for one row
    real, made = decoder.KVCache, []

    def second_layer_fails(*args, **kwargs):
        made.append(1)
        if len(made) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(decoder, "KVCache", second_layer_fails)
    with pytest.raises(torch.OutOfMemoryError):
        engine.generate(["ROMEO:", "JULIET:"] * 4, **params)
    assert all(block.attn.kv_cache is None for block in model.layers)  # freed, not left half grown
    monkeypatch.setattr(decoder, "KVCache", real)
    assert [c.token_ids for c in engine.generate(["ROMEO:", "JULIET:"] * 4, **params)] == expected


def test_logprobs_beyond_a_small_vocabulary_give_every_token(tmp_path):
    tok = lmstack.Tokenizer.train_chars(["abcde fgh"])
    torch.manual_seed(0)
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=tok.vocab_size)).eval()
    out = Engine(model, tok).generate("abc", max_new_tokens=3, temperature=0, logprobs=20, ignore_eos=True)[0]
    assert all(len(t.top) == tok.vocab_size for t in out.logprobs)


def test_the_one_call_generate_leaves_a_training_model_training(tiny):
    model, tok, _ = tiny
    model.train()
    try:
        lmstack.generate(model, tok, "ROMEO:", max_new_tokens=2, temperature=0)
        assert model.training
    finally:
        model.eval()


def test_tokens_of_a_text_cut_at_a_stop_string_spell_whole_characters():
    """A stop string right after a multi-byte character: the kept tokens end with the character's last byte,
    not in the middle of it (a partial character decodes to one U+FFFD, as long as a whole one)."""
    from lmstack.generate.engine import tokens_spelling

    tok = lmstack.Tokenizer.train(["plain ascii text only " * 40], vocab_size=300)
    ids = tok.encode("caf\u00e9!done")
    assert len(ids) > len(tok.encode("caf!done"))  # the e-acute is its two bytes, one token each
    kept = tokens_spelling(tok, ids, "caf\u00e9")
    assert tok.decode(kept) == "caf\u00e9"


def test_stop_strings_ids_and_logprobs(tiny):
    model, tok, _ = tiny
    engine = Engine(model, tok)
    free = engine.generate("ROMEO:", max_new_tokens=20, temperature=0, ignore_eos=True, logprobs=3)[0]
    assert len(free.logprobs) == 20 and len(free.logprobs[0].top) == 3
    assert free.logprobs[0].top[0][1] >= free.logprobs[0].logprob - 1e-6
    target = free.text[5:8]
    stopped = engine.generate("ROMEO:", max_new_tokens=20, temperature=0, ignore_eos=True, stop=[target])[0]
    assert stopped.finish_reason == "stop" and stopped.text == free.text[:free.text.find(target)]
    by_id = engine.generate("ROMEO:", max_new_tokens=20, temperature=0, stop_token_ids=[free.token_ids[4]],
                            ignore_eos=True)[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == free.token_ids[:free.token_ids.index(
        free.token_ids[4])]


def test_stream_deltas_join_to_the_text(tiny):
    model, tok, _ = tiny
    engine = Engine(model, tok)
    params = dict(max_new_tokens=25, temperature=0.9, seed=3, ignore_eos=True)
    deltas = list(engine.stream("ROMEO:", **params))
    assert len(deltas) > 1 and "".join(deltas) == engine.generate("ROMEO:", **params)[0].text


def test_stream_never_splits_a_character_or_a_stop_string(tiny):
    """Feed a 4-byte emoji one byte-token at a time: nothing shows until it is whole; text that may begin a
    stop string is held back until it cannot."""
    from lmstack.generate.engine import _Row

    model, tok, _ = tiny
    engine = Engine(model, tok)
    ids = tok.encode("ab🦙", add_special_tokens=False)
    assert len(ids) > 2
    row, params, deltas = _Row([0]), SamplingParams(stop=["🦙!"]), []
    for k in range(1, len(ids) + 1):
        row.tokens = ids[:k]
        row.text = tok.decode(row.tokens)
        deltas.append(engine._safe_delta(row, params))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == "ab"  # the emoji could start the stop string "🦙!": held back
    row.finish_reason = "length"
    assert engine._safe_delta(row, params) == "🦙"


def test_prompt_too_long(tiny):
    model, tok, _ = tiny
    long = "word " * 500
    with pytest.raises(LMStackError, match="prompt 0 has .* tokens.*truncate_prompt"):
        Engine(model, tok).generate(long, max_new_tokens=10)
    out = Engine(model, tok).generate(long, max_new_tokens=10, truncate_prompt=True, ignore_eos=True)[0]
    assert out.prompt_tokens + 10 == model.config.block_size and len(out.token_ids) == 10
    S, short = model.config.block_size, tok.encode("ROMEO:")
    # a short prompt and more new tokens than fit: generation stops at the end of the context
    out = Engine(model, tok).generate("ROMEO:", max_new_tokens=S + 50, ignore_eos=True, temperature=0)[0]
    assert len(out.token_ids) == S - len(short) and out.finish_reason == "length"
    # a context of one token: truncation keeps one prompt token, and nothing fits after it
    out = Engine(model, tok, max_seq_len=1).generate(long, max_new_tokens=5, truncate_prompt=True)[0]
    assert out.prompt_tokens == 1 and out.token_ids == [] and out.finish_reason == "length"
    # truncation keeps at least half the context for the prompt
    out = Engine(model, tok).generate(long, max_new_tokens=S + 50, truncate_prompt=True, ignore_eos=True)[0]
    assert out.prompt_tokens == S - S // 2 and len(out.token_ids) == S // 2
    # a prompt that fits is kept whole, truncate_prompt or not (as generate_ids and transformers do)
    fits = tok.encode(long)[:S - 10]
    for truncate in (False, True):
        out = Engine(model, tok).generate([fits], max_new_tokens=50, truncate_prompt=truncate, ignore_eos=True)[0]
        assert out.prompt_tokens == S - 10 and len(out.token_ids) == 10 and out.finish_reason == "length"


def test_smollm2_engine_answers_and_matches_transformers(smollm2, hf_smollm2):
    model, tok = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    out = lmstack.generate(model, tok, prompt, max_new_tokens=20, temperature=0)[0]
    assert "Paris" in out.text and out.finish_reason == "stop"
    hf = hf_smollm2[0]
    ids = tok.encode(prompt)
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    assert out.token_ids == [t for t in theirs if t != tok.eos_token_id]


@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_search_equals_transformers(tiny, num_beams):
    model, tok, path = tiny
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    engine = Engine(model, tok, max_batch_size=1)
    changed = []
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        ours = engine.beam_search(prompt, num_beams=num_beams, max_new_tokens=12, ignore_eos=True)[0]
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=12, num_beams=num_beams, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert ours.token_ids == theirs and ours.finish_reason == "length"
        # a stop token ends beams as an eos id does in transformers (here the one the best beam takes third)
        free, stop = theirs, theirs[2]
        ours = engine.beam_search(prompt, num_beams=num_beams, max_new_tokens=12, ignore_eos=True,
                                  stop_token_ids=[stop])[0]
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=12, num_beams=num_beams, do_sample=False,
                             eos_token_id=stop, pad_token_id=0)[0, len(ids):].tolist()
        assert ours.token_ids == [t for t in theirs if t != stop]
        ended = stop in theirs  # the stop token is reported as generate() reports it, and never in token_ids
        assert (ours.finish_reason, ours.stop_token_id) == (("stop", stop) if ended else ("length", None))
        changed.append(ours.token_ids != free)
    assert any(changed)  # the stop token changed the search's outcome somewhere


def test_beam_search_with_eos_equals_transformers(smollm2, hf_smollm2):
    model, tok = smollm2
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name a fruit."}], add_generation_prompt=True,
                                     tokenize=False)
    ours = Engine(model, tok).beam_search(prompt, num_beams=3, max_new_tokens=16)[0]
    hf = hf_smollm2[0]
    ids = tok.encode(prompt)
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=16, num_beams=3, do_sample=False)[0, len(ids):]
    assert ours.token_ids == [t for t in theirs.tolist() if t != tok.eos_token_id]


def test_cli_generate_and_chat(tmp_path, monkeypatch, capsys):
    import io

    from lmstack.cli import main

    text = (REPO / "data" / "tinyshakespeare.txt").read_text()[:50_000]
    tok = lmstack.Tokenizer.train([text], vocab_size=400, chat_template="chatml", eos_token="<|im_end|>")
    torch.manual_seed(0)
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=400))
    lmstack.save_model(model, tmp_path, tokenizer=tok)
    common = ["--model", str(tmp_path), "--temperature", "0", "--max-new-tokens", "8", "--ignore-eos"]

    assert main(["generate", "ROMEO:", *common]) == 0
    streamed = capsys.readouterr().out.rstrip("\n")
    expected = Engine(model, tok).generate("ROMEO:", max_new_tokens=8, temperature=0, ignore_eos=True)[0].text
    assert streamed == expected
    assert main(["generate", "ROMEO:", *common, "--n", "2", "--seed", "1", "--temperature", "1"]) == 0
    assert capsys.readouterr().out.count("--- sample") == 2
    assert main(["generate", "ROMEO:", *common, "--compile"]) == 0  # the compiled decode step: the same text
    assert capsys.readouterr().out.rstrip("\n") == expected

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nHello again\n/reset\nHello\n/system Be terse.\nHi\n"))
    assert main(["chat", *common]) == 0
    lines = capsys.readouterr().out.splitlines()
    replies = [line for line in lines if not line.startswith("(")]
    assert "(conversation cleared)" in lines and any("system prompt set" in line for line in lines)
    assert replies[0] == replies[2]  # after /reset the same question gets the same (greedy) answer
    assert main(["generate", "x", "--model", str(tmp_path), "--temperature", "-1"]) == 1
    assert "--temperature -1.0: must be >= 0" in capsys.readouterr().err
    assert main(["generate", "ROMEO:", *common, "--logprobs", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == expected and len(lines) == 9 and all(line.count("|") == 1 for line in lines[1:])
    assert main(["generate", "ROMEO:", *common, "--num-beams", "2", "--length-penalty", "0.5"]) == 0
    assert capsys.readouterr().out.strip()
    # bad input: one line naming what is wrong, no traceback
    for args, message in (
            (["--grammar", str(tmp_path / "missing.lark")], "missing.lark: no such file"),
            (["--num-beams", "0"], "--num-beams 0: must be >= 1"),
            (["--logit-bias", "99999=1"], "token id 99999 is outside the vocabulary of 400"),
            (["--stop-token-ids", "-5"], "--stop-token-ids [-5]: "),
            (["--device", "tpu9"], "unknown device 'tpu9'"),
            (["--logprobs", "2", "--num-beams", "2"], "--logprobs works with sampling and greedy decoding"),
            (["--compile", "--speculative", "prompt_lookup"], "beam search and --speculative do not use")):
        assert main(["generate", "x", *common, *args]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    if not torch.cuda.is_available():
        assert main(["generate", "x", *common, "--device", "cuda"]) == 1
        assert "this PyTorch has no CUDA, or no GPU is visible" in capsys.readouterr().err


@pytest.mark.parametrize("option", [{"pack_weights": False}, {"pack_weights": True}, {"compile": True}],
                         ids=["unpacked", "packed", "compiled"])
def test_engine_options_give_the_same_tokens(tiny, option):
    model, tok, _ = tiny
    default = Engine(model, tok).generate(PROMPTS, max_new_tokens=10, temperature=0, ignore_eos=True)
    other = Engine(model, tok, **option).generate(PROMPTS, max_new_tokens=10, temperature=0, ignore_eos=True)
    assert [c.token_ids for c in other] == [c.token_ids for c in default]


@pytest.mark.parametrize("pack_weights", [False, True], ids=["plain", "packed"])
def test_compiled_decode_step_compiles_once(tiny, pack_weights):
    """The compiled decode step is one graph, traced once: positions advancing, other prompts and other
    sampling settings reuse it (a recompile or graph break per step would forfeit the GPU's CUDA graph)."""
    from torch._dynamo.utils import counters

    model, tok, _ = tiny
    torch._dynamo.reset()  # forget compilations of earlier tests, which this one may otherwise reuse
    counters.clear()
    engine = Engine(model, tok, compile=True, pack_weights=pack_weights)
    engine.generate(PROMPTS, max_new_tokens=6, temperature=0, ignore_eos=True)
    traced = counters["stats"]["unique_graphs"]
    engine.generate(PROMPTS[::-1], max_new_tokens=12, temperature=0.7, top_p=0.9, seed=3, ignore_eos=True,
                    repetition_penalty=1.2, logprobs=2)
    assert traced == 1 and counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


@pytest.mark.parametrize("batch, bits", [(1, None), (3, None), (1, 8)], ids=["batch1", "batch3", "batch1-int8"])
def test_compiled_mixture_of_experts_is_one_graph(tiny, batch, bits):
    """A mixture of experts' eager routing picks each expert's tokens with data-dependent shapes; compiled, it
    mixes with static ones (batch 1 gathers its 2 of 4 experts' weights, batch 3 weights all 4), so the decode
    step is one graph traced once (a CUDA graph on a GPU), and its greedy tokens and logits are the eager
    engine's."""
    from torch._dynamo.utils import counters

    from lmstack.quantize import quantize_model

    _, tok, _ = tiny
    torch.manual_seed(0)
    moe = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-mixtral", vocab_size=len(tok))).eval()
    if bits:
        quantize_model(moe, bits, dtype=torch.float32)
    prompts = (PROMPTS * 2)[:batch]
    kw = dict(max_new_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    eager = Engine(moe, tok).generate(prompts, **kw)
    torch._dynamo.reset()
    counters.clear()
    compiled = Engine(moe, tok, compile=True).generate(prompts, **kw)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert all(layer.mlp.stacked for layer in moe.layers)
    assert [c.token_ids for c in compiled] == [c.token_ids for c in eager]
    for c, e in zip(compiled, eager):
        assert [t.logprob for t in c.logprobs] == pytest.approx([t.logprob for t in e.logprobs], abs=1e-5)


LOOKAHEAD_CASES = {
    "greedy-stop-string-logprobs": dict(temperature=0, max_new_tokens=12, stop=["e"], logprobs=2),
    "sampled-penalties-stop-ids": dict(temperature=0.8, top_p=0.9, seed=5, n=2, max_new_tokens=12,
                                       repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2,
                                       logit_bias={5: 3.0}),
}


@pytest.mark.parametrize("case", LOOKAHEAD_CASES, ids=list(LOOKAHEAD_CASES))
def test_lookahead_gives_the_same_completions(tiny, case):
    """Queueing step t + 1 before reading step t's tokens (a GPU's default) changes nothing: rows that stop
    early, stop strings, seeded sampling with penalties and logprobs all come out the same as in lockstep."""
    from dataclasses import asdict

    model, tok, _ = tiny
    params = LOOKAHEAD_CASES[case]
    if params["temperature"]:  # stop on a token the first sample draws at its fourth step
        free = Engine(model, tok, lookahead=False).generate(PROMPTS, **params, ignore_eos=True)
        params = dict(params, stop_token_ids=[free[0].token_ids[3]])
    lockstep = Engine(model, tok, lookahead=False).generate(PROMPTS, **params)
    ahead = Engine(model, tok, lookahead=True).generate(PROMPTS, **params)
    assert [asdict(c) for c in ahead] == [asdict(c) for c in lockstep]
    assert {c.finish_reason for c in lockstep} == {"stop", "length"}  # rows stop at different steps
    one = dict(params, n=1)
    assert list(Engine(model, tok, lookahead=True).stream(PROMPTS[0], **one)) == \
        list(Engine(model, tok, lookahead=False).stream(PROMPTS[0], **one))


def test_engines_sharing_a_model_keep_working(tiny):
    """The KV cache lives in the model: an engine reallocates it when another user replaced or freed it."""
    from lmstack.generate import generate_ids

    model, tok, _ = tiny
    params = dict(max_new_tokens=8, temperature=0, ignore_eos=True)
    first = Engine(model, tok, max_batch_size=4, max_seq_len=64)
    before = first.generate(PROMPTS, **params)
    lmstack.generate(model, tok, "O", **params)
    Engine(model, tok, max_seq_len=32).generate("ROMEO:", **params)
    generate_ids(model, tok.encode("ROMEO:"), 4)  # frees the cache when done
    after = first.generate(PROMPTS, **params)
    assert [c.token_ids for c in after] == [c.token_ids for c in before]


def test_cache_holds_the_request_not_the_whole_context(tiny):
    """A model with a long context reserves cache slots for what a call needs (a power of two, at least
    256), growing when a longer call comes; the tokens do not depend on the cache's size."""
    model, tok, _ = tiny
    long_model = lmstack.DecoderLM(dataclasses.replace(model.config, block_size=4096)).eval()
    long_model.load_state_dict(model.state_dict())
    engine = Engine(long_model, tok)
    slots = lambda: long_model.layers[0].attn.kv_cache.k.shape[2]  # noqa: E731
    params = dict(max_new_tokens=8, temperature=0, ignore_eos=True)
    short = engine.generate(PROMPTS, **params)
    assert slots() == 256
    prompt = tok.encode("ROMEO: " * 100)[:290]
    longer = engine.generate([prompt], **params)
    assert slots() == 512
    assert [c.token_ids for c in engine.generate(PROMPTS, **params)] == [c.token_ids for c in short]
    ids, expected = torch.tensor([prompt]), []
    with torch.no_grad():  # greedy from full forward passes, no cache
        for _ in range(8):
            expected.append(long_model(ids)[0, -1].argmax().item())
            ids = torch.cat([ids, torch.tensor([expected[-1:]])], dim=1)
    assert longer[0].token_ids == expected

@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_incremental_text_is_the_full_decoding(tiny, kind):
    """Token by token, the text decoded from the last few tokens is the decoding of all of them, but for an
    incomplete UTF-8 character at the end, kept back (byte-level BPE and SentencePiece-style tokenizers)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from lmstack.generate.engine import _Row
    from lmstack.tokenizer import Tokenizer

    model, tok, _ = tiny
    if kind == "metaspace":
        backend = Backend(models.BPE(unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Metaspace()
        text = (REPO / "data" / "tinyshakespeare.txt").read_text()[:50_000]
        backend.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
        tok = Tokenizer(backend)
    engine = Engine(model, tok)
    g = torch.Generator().manual_seed(0)
    ids = tok.encode("héllo wörld 🦙 and more: the llama's ünïcode", add_special_tokens=False)
    for trial in range(20):  # real token sequences, and random ones (which may split characters anywhere)
        tokens = ids if trial == 0 else torch.randint(0, tok.vocab_size, (40,), generator=g).tolist()
        row = _Row([0])
        for t in tokens:
            row.tokens.append(t)
            engine._extend_text(row)
            full = tok.decode(row.tokens)
            assert full.startswith(row.text) and (row.text == full or full.endswith("\ufffd"))
        if trial == 0:
            assert row.text == tok.decode(ids)


def test_a_stop_string_before_an_incomplete_character_still_stops(tiny):
    """A token may end in the first byte of the next character: the text before it is whole and held back
    with it until the character completes, yet a stop string in it must stop the row at once."""
    from lmstack.generate.engine import _Row

    class ByteTokens:  # token 1 is "λ" plus the lead byte of "α", token 2 the rest of "α"
        eos_token_id = pad_token_id = bos_token_id = None
        pieces = {1: "λ".encode() + b"\xce", 2: b"\xb1"}

        def decode(self, ids):
            return b"".join(self.pieces.get(i, b"x") for i in ids).decode("utf-8", errors="replace")

        def encode(self, text):
            return [3]

    model, _, _ = tiny
    engine = Engine(model, ByteTokens())
    row = _Row([3])
    engine._take([row], SamplingParams(stop=["λ"], max_new_tokens=5), set(), None, True, [1])
    assert row.finish_reason == "stop" and row.text == ""
    forced = dict(logit_bias={1: 1e4}, temperature=0, max_new_tokens=3)
    assert engine.generate([[3]], stop=["λ"], **forced)[0].text == ""
    assert "".join(engine.stream([3], stop=["λ"], **forced)) == ""
    ended = engine.generate([[3]], stop=["zz"], **dict(forced, max_new_tokens=1))[0]
    assert ended.text == "λ\ufffd" and ended.finish_reason == "length"  # the whole decoding once it ends


def test_stop_token_ids_outside_the_vocabulary_are_named(tiny):
    model, tok, _ = tiny
    engine = Engine(model, tok)
    with pytest.raises(LMStackError, match="stop_token_ids: token id 400 is outside the vocabulary of 400"):
        engine.generate("x", max_new_tokens=2, stop_token_ids=[400])
    with pytest.raises(LMStackError, match="stop_token_ids: token id 999"):
        engine.beam_search("x", num_beams=2, max_new_tokens=2, stop_token_ids=[3, 999])


def _chat_model(path, block_size=128, **tokenizer_options):
    text = (REPO / "data" / "tinyshakespeare.txt").read_text()[:50_000]
    options = {"chat_template": "chatml", "eos_token": "<|im_end|>", **tokenizer_options}
    tok = lmstack.Tokenizer.train([text], vocab_size=400, **options)
    torch.manual_seed(0)
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=400, block_size=block_size))
    lmstack.save_model(model, path, tokenizer=tok)
    return model, tok


def _spy_prompts(monkeypatch) -> list[list[int]]:
    """Every prompt the engine encodes, as the ids it runs on."""
    seen, encode = [], Engine._encode

    def spy(self, prompts, params):
        out = encode(self, prompts, params)
        seen.extend(out)
        return out

    monkeypatch.setattr(Engine, "_encode", spy)
    return seen


def test_cli_chat_template_gets_one_bos(tmp_path, monkeypatch, capsys):
    """A tokenizer that adds bos and a template that writes {{ bos_token }}: the prompt starts with one bos."""
    import io

    from lmstack.cli import main

    template = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    _, tok = _chat_model(tmp_path, bos_token="<s>", add_bos=True, special_tokens=["<s>", "<|im_end|>"])
    tok.chat_template = template
    tok.save(tmp_path)
    assert tok.encode("hi")[0] == tok.bos_token_id  # the tokenizer does add bos to plain text
    seen = _spy_prompts(monkeypatch)
    common = ["--model", str(tmp_path), "--temperature", "0", "--max-new-tokens", "2"]
    assert main(["generate", "Hello", "--chat", *common]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    assert main(["chat", *common]) == 0
    assert len(seen) == 2
    for ids in seen:
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_cli_beam_search_refuses_the_flags_it_ignores(tmp_path, capsys):
    from lmstack.cli import main

    _chat_model(tmp_path)
    common = ["generate", "ROMEO:", "--model", str(tmp_path), "--max-new-tokens", "4", "--num-beams", "2"]
    for flags, named in ((["--temperature", "0.9"], "--temperature"), (["--top-p", "0.5"], "--top-p"),
                         (["--stop", "x", "--seed", "1"], "--stop, --seed"), (["--regex", "a+"], "--regex"),
                         (["--repetition-penalty", "1.2"], "--repetition-penalty"),
                         (["--speculative", "prompt_lookup"], "--speculative and --num-beams"),
                         (["--n", "3"], "--n 3 with --num-beams 2")):
        assert main([*common, *flags]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and named in err and err.count("\n") == 1, err
    # what beam search does use: greedy, stop ids, the prompt's end
    assert main([*common, "--temperature", "0", "--stop-token-ids", "5", "--truncate-prompt"]) == 0
    assert main([*common, "--temperature", "1e-6"]) == 0  # greedy too
    # flags of one mode given without it are refused, not ignored
    plain = common[:-2]
    for flags, named in ((["--length-penalty", "0.5"], "--length-penalty scores finished beams"),
                         (["--draft-k", "3"], "--draft-k is the number"),
                         (["--speculative", "prompt_lookup", "--draft-k", "0"], "--draft-k 0: must be >= 1")):
        assert main([*plain, *flags]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and named in err and err.count("\n") == 1, err


def test_cli_names_what_speculative_decoding_does_not_take_and_separates_beams(tmp_path, capsys):
    from lmstack.cli import main

    _chat_model(tmp_path)
    common = ["generate", "ROMEO:", "--model", str(tmp_path), "--max-new-tokens", "4"]
    for flags, named in ((["--n", "3"], "--n 3"), (["--choice", "a", "--choice", "b"], "--choice"),
                         (["--frequency-penalty", "0.5", "--regex", "a+"], "--frequency-penalty, --regex")):
        assert main([*common, "--speculative", "prompt_lookup", *flags]) == 1
        err = capsys.readouterr().err
        assert "speculative decoding (--speculative) makes one completion" in err and named in err, err
    assert main([*common, "--speculative", "prompt-lookup", "--temperature", "0"]) == 0  # either spelling
    assert "drafted tokens accepted" in capsys.readouterr().err
    assert main([*common, "--num-beams", "3", "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("--- beam 1 (") and "\n--- beam 2 (" in out


def test_cli_samples_as_the_models_generation_config_says(tmp_path, capsys):
    """transformers' generate and vLLM start from a checkpoint's generation_config.json sampling settings:
    so do `lmstack generate` and `chat`, each flag overriding its own, and saves carry them."""
    from lmstack.cli import main
    from lmstack.generate.sampling import model_sampling_defaults

    _chat_model(tmp_path / "m")
    config_file = tmp_path / "m" / "generation_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 0,
                                       "min_p": None}))  # null: unset, as transformers 5 writes its defaults
    model = lmstack.load_model(tmp_path / "m")
    assert model_sampling_defaults(model) == {"temperature": 0.6, "top_p": 0.9, "top_k": None}
    lmstack.save_model(model, tmp_path / "again")  # the settings travel with the model
    assert json.loads((tmp_path / "again" / "generation_config.json").read_text())["top_p"] == 0.9
    assert main(["quantize", "--model", str(tmp_path / "m"), "--output", str(tmp_path / "q"), "--bits", "8"]) == 0
    assert model_sampling_defaults(lmstack.load_model(tmp_path / "q"))["temperature"] == 0.6
    (tmp_path / "q" / "generation_config.json").write_text('{"do_sample": false}')  # the file, edited, wins
    assert model_sampling_defaults(lmstack.load_model(tmp_path / "q")) == {"temperature": 0.0}
    capsys.readouterr()
    assert main(["info", str(tmp_path / "q")]) == 0  # info names the quantization too
    assert json.loads(capsys.readouterr().out)["quantization"]["bits"] == 8

    common = ["generate", "ROMEO:", "--model", str(tmp_path / "m"), "--max-new-tokens", "8", "--no-stream"]
    assert main([*common, "--temperature", "0.9", "--seed", "1"]) == 0
    err = capsys.readouterr().err
    assert "generation_config.json settings top_p 0.9, top_k none (flags override them)" in err, err
    # do_sample false is greedy, as transformers reads it: the same text as --temperature 0
    config_file.write_text(json.dumps({**config, "do_sample": False, "temperature": 0.6}))
    assert main([*common, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert main(common) == 0
    out = capsys.readouterr()
    assert out.out == greedy and "settings temperature 0.0" in out.err
    # a setting that is out of range is named as the model's
    config_file.write_text(json.dumps({**config, "do_sample": True, "top_p": 0.0}))
    assert main(common) == 1
    assert "its generation_config.json sets top_p 0.0, which must be in (0, 1]; pass --top-p to override it" in \
        capsys.readouterr().err


def test_cli_list_flags_repeat_and_leave_the_prompt_alone(tmp_path, monkeypatch, capsys):
    """`--stop END "ROMEO:"`: the prompt after a repeatable flag is the prompt, not a second stop string."""
    from lmstack.cli import main

    model, tok = _chat_model(tmp_path)
    seen = _spy_prompts(monkeypatch)
    common = ["--model", str(tmp_path), "--temperature", "0", "--max-new-tokens", "6", "--no-stream"]
    assert main(["generate", *common, "--stop", "END", "--stop", "zz", "--stop-token-ids", "7",
                 "--stop-token-ids", "8", "--logit-bias", "5=1", "--logit-bias", "6=-1", "ROMEO:"]) == 0
    assert seen == [tok.encode("ROMEO:")]
    expected = Engine(model, tok).generate("ROMEO:", max_new_tokens=6, temperature=0, stop=["END", "zz"],
                                           stop_token_ids=[7, 8], logit_bias={5: 1.0, 6: -1.0})[0].text
    assert capsys.readouterr().out == expected + "\n"


def test_cli_chat_drops_old_turns_and_survives_a_message_too_long(tmp_path, monkeypatch, capsys):
    """The conversation outgrows a 64-token context: the oldest turns go (the system prompt stays), with one
    note; a message that alone does not fit fails that turn only, and the chat goes on."""
    import io

    from lmstack.cli import main

    _, tok = _chat_model(tmp_path, block_size=64)
    seen = _spy_prompts(monkeypatch)
    turns = ["Good morrow, cousin.", "What news from the court?", "Is the king well?", "word " * 80,
             "Farewell then."]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(turns) + "\n"))
    assert main(["chat", "--model", str(tmp_path), "--temperature", "0", "--max-new-tokens", "8",
                 "--ignore-eos", "--system", "Be brief."]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(seen) == 4  # every turn but the one too long was answered
    assert all(len(ids) <= 64 - 8 and tok.decode(ids).count("Be brief.") == 1 for ids in seen)
    assert "Farewell then." in tok.decode(seen[-1]) and "Good morrow" not in tok.decode(seen[-1])
    notes = [line for line in err if line.startswith("note: dropped the")]
    errors = [line for line in err if line.startswith("error:")]
    assert notes and len(errors) == 1 and "does not fit the context of 64 tokens" in errors[0], err


def test_cli_chat_commands_and_a_turn_the_template_refuses(tmp_path, monkeypatch, capsys):
    """A mistyped command is not sent as a message, `//text` sends `/text`, `/systematic` is not `/system`,
    and a turn the template refuses (it raises on a system prompt) fails alone: the chat goes on."""
    import io

    from lmstack.cli import main

    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
                "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    _, tok = _chat_model(tmp_path, chat_template=template)
    seen = _spy_prompts(monkeypatch)
    lines = ["/bogus", "//etc is a folder", "/systematic", "/system be nice", "hello", "/system", "hello again"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", "--model", str(tmp_path), "--temperature", "0", "--max-new-tokens", "4"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err[0].startswith("error: unknown command /bogus") and err[1].startswith("error: unknown command /systematic")
    assert "no system role" in err[2] and len(err) == 3
    assert len(seen) == 2  # "/etc is a folder" and, with the system prompt cleared, "hello again"
    assert "user\n/etc is a folder" in tok.decode(seen[0]) and "hello again" in tok.decode(seen[1])
    assert "hello<" not in tok.decode(seen[1])  # the refused turn left no trace


def test_cli_chat_ctrl_c_stops_a_reply_not_the_chat(tmp_path, monkeypatch, capsys):
    import builtins
    import io

    from lmstack.cli import main

    _, tok = _chat_model(tmp_path)
    prompts = []

    def interrupted_stream(self, prompt, params=None, **overrides):
        prompts.append(list(prompt))
        yield "Half a"
        if len(prompts) == 1:
            raise KeyboardInterrupt  # Ctrl-C while the first reply streams

    monkeypatch.setattr(Engine, "stream", interrupted_stream)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nAgain\n"))
    assert main(["chat", "--model", str(tmp_path), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == "Half a\nHalf a\n"
    assert len(prompts) == 2 and "assistant\nHalf a" in tok.decode(prompts[1])  # the cut reply was kept

    def ctrl_c(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr(builtins, "input", ctrl_c)  # Ctrl-C at the prompt ends the chat cleanly
    assert main(["chat", "--model", str(tmp_path)]) == 0


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 3.35e12), ("NVIDIA H100 PCIe", 2.0e12),
                                       ("NVIDIA H100 NVL", 3.9e12), ("NVIDIA H200", 4.8e12),
                                       ("NVIDIA H200 NVL", 4.8e12), ("NVIDIA L40S", 0.864e12),
                                       ("NVIDIA L4", 0.3e12), ("Some GPU", None)])
def test_decode_bench_peak_bandwidth_by_device_name(name, peak):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_decode", REPO / "bench" / "decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.peak_bandwidth(name) == peak


def test_lmstack_generate_is_the_function_and_the_package(tiny):
    """`lmstack.generate(...)` generates, and its submodules are reached through it as paths."""
    import importlib

    import lmstack.generate.speculative

    model, tok, _ = tiny
    assert lmstack.generate(model, tok, "O", max_new_tokens=3, temperature=0)[0].token_ids == \
        Engine(model, tok).generate("O", max_new_tokens=3, temperature=0)[0].token_ids
    assert lmstack.generate.speculative.speculative_generate is not None
    assert importlib.import_module("lmstack.generate.sampling").SamplingParams is SamplingParams


def test_the_one_call_generate_runs_n_samples_of_one_prompt_together(tiny, monkeypatch):
    model, tok, _ = tiny
    batches = []
    run = Engine._run
    monkeypatch.setattr(Engine, "_run", lambda self, rows, params: (batches.append(len(rows)), run(self, rows, params))[1])
    outs = lmstack.generate(model, tok, "O", max_new_tokens=3, temperature=1.0, seed=0, n=8)
    assert len(outs) == 8 and batches == [8]
