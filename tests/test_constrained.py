"""Constrained decoding through llguidance: JSON Schema, regex, choices, Lark grammars, bad constraints."""

import json
import re

import jsonschema
import pytest
import torch

import lmstack
from lmstack import Engine, LMStackError
from tests.conftest import REPO

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "llama"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "weight": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "owner": {"type": "object", "properties": {"first": {"type": "string", "maxLength": 8},
                                                   "verified": {"type": "boolean"}},
                  "required": ["first", "verified"], "additionalProperties": False},
    },
    "required": ["name", "kind", "age", "weight", "tags", "owner"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def random_engine():
    text = (REPO / "data" / "tinyshakespeare.txt").read_text()[:100_000]
    tok = lmstack.Tokenizer.train([text], vocab_size=400, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=400, block_size=512))
    return Engine(model.eval(), tok, max_batch_size=25)


def test_random_model_json_schema_50_of_50(random_engine):
    outs = random_engine.generate("Here:", max_new_tokens=400, temperature=1.0, seed=0, n=50, json_schema=SCHEMA)
    assert len(outs) == 50
    for c in outs:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), SCHEMA)
    assert len({c.text for c in outs}) > 40  # sampled, not one answer repeated


def test_regex_choice_and_grammar(random_engine):
    years = random_engine.generate("x", max_new_tokens=12, temperature=1.0, seed=1, n=5, regex=r"(19|20)[0-9]{2}")
    assert all(re.fullmatch(r"(19|20)[0-9]{2}", c.text) for c in years)
    picks = random_engine.generate("x", max_new_tokens=12, temperature=1.0, seed=2, n=8,
                                   choice=["positive", "negative", "neutral"])
    assert {c.text for c in picks} <= {"positive", "negative", "neutral"}
    sums = random_engine.generate("x", max_new_tokens=40, temperature=1.0, seed=3, n=5,
                                  grammar='start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]{1,2}/')
    for c in sums:
        assert re.fullmatch(r"\(\d{1,2}(\+\d{1,2})*\)", c.text) or c.finish_reason == "length"


@pytest.mark.parametrize("truncation", [dict(top_k=1), dict(top_k=5), dict(top_p=0.05), dict(min_p=0.9),
                                        dict(typical_p=0.2), dict(temperature=0)], ids=str)
def test_truncating_samplers_choose_among_allowed_tokens(random_engine, truncation):
    """The grammar masks the logits before top-k / top-p / min-p / typical-p cut them: a truncation that
    would keep only forbidden tokens still yields valid output."""
    params = dict(dict(temperature=1.0, seed=4), **truncation)
    outs = random_engine.generate("x", max_new_tokens=12, n=4, regex=r"(19|20)[0-9]{2}", **params)
    assert all(re.fullmatch(r"(19|20)[0-9]{2}", c.text) for c in outs)


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=0)], ids=["greedy", "sampled"])
def test_the_grammar_wins_over_processors_that_ban_every_allowed_token(random_engine, sampling):
    """"zzzz" is four "z" tokens; no-repeat-ngram 1 bans "z" once it has come, leaving the grammar nothing: the
    row falls back to the grammar's mask alone (it used to pick token 0, or crash in torch.multinomial)."""
    tok = random_engine.tokenizer
    assert tok.encode("zzzz") == [tok.encode("z")[0]] * 4 and "z" not in tok.decode(tok.encode("x"))
    outs = random_engine.generate("x", max_new_tokens=8, n=3, choice=["zzzz"], no_repeat_ngram_size=1, **sampling)
    assert [c.text for c in outs] == ["zzzz"] * 3 and {c.finish_reason for c in outs} == {"stop"}


def test_without_an_eos_the_grammar_ends_on_its_own_end_token_never_spelled():
    """A tokenizer with no eos: llguidance ends the grammar on a special token of its choosing, which ends the
    row as eos would and is not appended to the text."""
    text = (REPO / "data" / "tinyshakespeare.txt").read_text()[:30_000]
    tok = lmstack.Tokenizer.train([text], vocab_size=300, eos_token=None)
    assert tok.eos_token_id is None
    torch.manual_seed(0)
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=300, block_size=64))
    outs = Engine(model.eval(), tok, max_batch_size=30).generate(
        "a", regex="[0-9]{1,3}", max_new_tokens=8, temperature=3.0, seed=0, n=30)
    assert all(re.fullmatch("[0-9]{1,3}", c.text) and c.finish_reason == "stop" for c in outs)
    ended_early = [c for c in outs if len(c.text) < 3]
    assert ended_early and all(c.stop_token_id == 0 and 0 not in c.token_ids for c in ended_early)


def test_character_level_tokenizers_are_constrained_too():
    """llguidance cannot read a character tokenizer's decoder (Fuse) from tokenizer.json: it gets each token's
    bytes instead. A vocabulary that cannot spell the grammar is a clear error, not a crash."""
    tok = lmstack.Tokenizer.train_chars(['0123456789+= abc{}":,-'], special_tokens=["<eos>"])
    torch.manual_seed(0)
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=tok.vocab_size)).eval()
    engine = Engine(model, tok, max_batch_size=8)
    assert {c.text for c in engine.generate(["12+3="] * 8, choice=["15", "16"], temperature=1.0, seed=0)} \
        <= {"15", "16"}
    assert all(re.fullmatch("[0-9]{2,3}", c.text) for c in engine.generate(["1"] * 4, regex="[0-9]{2,3}",
                                                                           temperature=1.0, seed=0))
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"enum": ["ab", "cc"]}},
              "required": ["a", "b"], "additionalProperties": False}
    for c in engine.generate(["x"] * 8, json_schema=schema, temperature=1.0, seed=0, max_new_tokens=200):
        jsonschema.validate(json.loads(c.text), schema)
    no_braces = lmstack.Tokenizer.train_chars(["0123456789 abc"], special_tokens=["<eos>"])
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=no_braces.vocab_size))
    with pytest.raises(LMStackError, match="can the tokenizer spell"):
        Engine(model.eval(), no_braces).generate("x", json_schema={"type": "object"}, max_new_tokens=4)


def test_cli_constraint_flags(tmp_path, capsys):
    """--json-schema reads a file or inline JSON (and names a value that is neither); --choice repeats."""
    from lmstack.cli import main

    text = (REPO / "data" / "tinyshakespeare.txt").read_text()[:50_000]
    tok = lmstack.Tokenizer.train([text], vocab_size=400, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=400))
    lmstack.save_model(model, tmp_path, tokenizer=tok)
    common = ["generate", "x", "--model", str(tmp_path), "--temperature", "0", "--max-new-tokens", "40"]
    schema = {"enum": ["yes", "no", 7]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    for value in (str(tmp_path / "schema.json"), json.dumps(schema)):
        assert main([*common, "--json-schema", value]) == 0
        jsonschema.validate(json.loads(capsys.readouterr().out), schema)
    assert main([*common, "--json-schema", str(tmp_path / "missing.json")]) == 1
    err = capsys.readouterr().err
    assert err == f"error: --json-schema: not JSON and no such file: {tmp_path / 'missing.json'}\n"
    (tmp_path / "bad.json").write_text("{oops")
    assert main([*common, "--json-schema", str(tmp_path / "bad.json")]) == 1
    assert "bad.json: the file is not JSON" in capsys.readouterr().err
    assert main([*common, "--choice", "yes", "--choice", "no"]) == 0
    assert capsys.readouterr().out.strip() in {"yes", "no"}


@pytest.mark.parametrize("kwargs,match", [
    (dict(json_schema={"type": "nonsense"}), "json_schema: the grammar engine rejects it"),
    (dict(json_schema="{not json"), "json_schema is not a JSON object"),
    (dict(regex="(unclosed"), "regex: the grammar engine rejects it"),
    (dict(regex="[a-z"), r"regex: the grammar engine rejects it: .*unclosed character class$"),  # the cause
    (dict(grammar="start: undefined_rule"), "grammar: the grammar engine rejects it"),
    (dict(regex="a", choice=["a"]), "one constraint at a time"),
])
def test_rejected_constraints_name_the_parameter(random_engine, kwargs, match):
    with pytest.raises(LMStackError, match=match):
        random_engine.generate("x", max_new_tokens=5, **kwargs)


def test_smollm2_json_is_valid_and_sensible(smollm2):
    model, tok = smollm2
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                               "country": {"type": "string", "maxLength": 30}},
              "required": ["city", "country"], "additionalProperties": False}
    messages = [{"role": "user", "content": "What is the capital of France? Answer in JSON with the fields "
                                            "city and country."}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    out = Engine(model, tok).generate(prompt, max_new_tokens=60, temperature=0, json_schema=schema)[0]
    answer = json.loads(out.text)
    jsonschema.validate(answer, schema)
    assert answer["city"] == "Paris" and answer["country"].lower() == "france"
