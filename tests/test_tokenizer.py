"""Byte-level BPE: training, exact round trips, Hugging Face compatibility of files and chat templates."""

import json
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerFast

from lmstack import LMStackError, Tokenizer, load_tokenizer
from lmstack.tokenizer import train_tokenizer
from tests.conftest import REPO

CORPUS = REPO / "data" / "tinyshakespeare.txt"
TRICKY = [
    "",
    " ",
    "   leading and trailing   ",
    "Hello world",
    "emoji 🦙🚀 and 😶‍🌫️ zwj",
    "CJK 我想在apple工作 日本語のテキスト 한국어",
    "combining e\u0301 a\u0308 \u0915\u094d\u0937",
    "control \x00\x01\x07\x1b[0m\t\r\n\x7f end",
    "numbers 1234567 3.14159 -42",
    "special <|endoftext|> inside",
    "x" * 20000,
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    text = CORPUS.read_text()[:200_000]
    return Tokenizer.train([text], vocab_size=600, special_tokens=["<|endoftext|>"], chat_template="chatml",
                           bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")


def test_training_learns_merges(tok):
    assert tok.vocab_size == 600
    ids = tok.encode("And thou shalt")
    assert len(ids) < len("And thou shalt")  # merges compress common English
    assert tok.token_to_id("<|im_start|>") is not None and tok.eos_token_id == tok.token_to_id("<|im_end|>")


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_round_trip_property(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_batch_encoding_matches_single(tok):
    texts = ["one", "two words", "", "🦙"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.decode_batch(tok.encode_batch(texts)) == texts


def test_special_tokens_are_single_ids(tok):
    ids = tok.encode("a<|im_start|>b")
    assert tok.token_to_id("<|im_start|>") in ids
    assert tok.decode(ids, skip_special_tokens=True) == "ab"


def test_transformers_loads_our_files(tok, tmp_path):
    tok.save(tmp_path)
    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    for text in TRICKY[:-1]:
        assert hf.encode(text) == tok.encode(text)
        assert auto.decode(tok.encode(text)) == text
    assert hf.eos_token == "<|im_end|>" and hf.pad_token_id == tok.pad_token_id
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi 🦙"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again?"},
    ]
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    for kwargs in ({}, {"add_generation_prompt": True}, {"tools": tools}):
        ours = tok.apply_chat_template(messages, tokenize=False, **kwargs)
        theirs = hf.apply_chat_template(messages, tokenize=False, **kwargs)
        assert ours == theirs
        assert tok.apply_chat_template(messages, **kwargs) == hf.encode(theirs, add_special_tokens=False)


TOOL_TEMPLATE = "{% for t in tools %}TOOL:{{ t.function.name }}\n{% endfor %}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
MESSAGES = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The answer is"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("layout", ["transformers-5-files", "legacy-list"])
def test_named_chat_templates_are_read_chosen_and_written_as_transformers_does(tok, tmp_path, layout):
    """A tokenizer with a default and a "tool_use" template: lmstack reads both (transformers 5's
    additional_chat_templates/ files, or the older list in tokenizer_config.json), picks "tool_use" when
    tools are given or by name, and writes both back where transformers finds them."""
    tok.save(tmp_path / "ours")
    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path / "ours")
    hf.chat_template = {"default": tok.chat_template, "tool_use": TOOL_TEMPLATE}
    hf.save_pretrained(tmp_path / "hf", save_jinja_files=layout == "transformers-5-files")
    assert (tmp_path / "hf" / "additional_chat_templates").exists() == (layout == "transformers-5-files")
    loaded = Tokenizer.load(tmp_path / "hf")
    assert loaded.chat_templates == {"tool_use": TOOL_TEMPLATE} and loaded.chat_template == tok.chat_template
    for kwargs in ({}, {"tools": TOOLS}, {"chat_template": "tool_use", "tools": TOOLS}, {"add_generation_prompt": True},
                   {"chat_template": "default", "tools": TOOLS}):
        assert loaded.apply_chat_template(MESSAGES, tokenize=False, **kwargs) == hf.apply_chat_template(
            MESSAGES, tokenize=False, **kwargs)
    loaded.save(tmp_path / "again")
    again = PreTrainedTokenizerFast.from_pretrained(tmp_path / "again")
    assert again.chat_template == hf.chat_template
    assert Tokenizer.load(tmp_path / "again").chat_templates == {"tool_use": TOOL_TEMPLATE}


def test_a_saved_template_replaces_one_saved_earlier_into_the_same_directory(tok, tmp_path):
    hf = PreTrainedTokenizerFast.from_pretrained(tok.save(tmp_path) or tmp_path)
    hf.save_pretrained(tmp_path)  # transformers 5 writes chat_template.jinja, which takes precedence
    assert (tmp_path / "chat_template.jinja").exists()
    loaded = Tokenizer.load(tmp_path)
    loaded.chat_template = TOOL_TEMPLATE
    loaded.save(tmp_path)
    assert Tokenizer.load(tmp_path).chat_template == TOOL_TEMPLATE
    assert PreTrainedTokenizerFast.from_pretrained(tmp_path).chat_template == TOOL_TEMPLATE


def test_continue_final_message_matches_transformers(tok, tmp_path):
    tok.save(tmp_path)
    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    ours = tok.apply_chat_template(MESSAGES, tokenize=False, continue_final_message=True)
    assert ours == hf.apply_chat_template(MESSAGES, tokenize=False, continue_final_message=True)
    assert ours.endswith("<|im_start|>assistant\nThe answer is")
    with pytest.raises(LMStackError, match="do not combine"):
        tok.apply_chat_template(MESSAGES, continue_final_message=True, add_generation_prompt=True)


def test_continue_final_message_can_continue_the_reasoning_field(tok, tmp_path):
    """transformers 5 takes a field name: the text ends inside the last message's reasoning, whichever of its
    names the template reads."""
    tok.save(tmp_path)
    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    template = ("{% for m in messages %}{{ m.role }}:{% if m.thinking %}<think>{{ m.thinking }}</think>{% endif %}"
                "{{ m.content }}\n{% endfor %}")
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "", "reasoning_content": "Two and two"}]
    kwargs = dict(tokenize=False, chat_template=template, continue_final_message="reasoning_content")
    ours = tok.apply_chat_template(messages, **kwargs)
    assert ours == hf.apply_chat_template(messages, **kwargs) and ours.endswith("assistant:<think>Two and two")
    with pytest.raises(LMStackError, match="'tool_notes': the chat template never reads that field"):
        tok.apply_chat_template([{**messages[-1], "tool_notes": "x"}], chat_template=template,
                                continue_final_message="tool_notes")
    with pytest.raises(LMStackError, match="whose 'reasoning' is a string"):
        tok.apply_chat_template(messages[:1], chat_template=template, continue_final_message="reasoning")


def test_messages_are_normalised_as_transformers_does(tok, tmp_path):
    """None-valued keys left out (OpenAI's content=None beside tool_calls), reasoning under any of its names
    seen under each, Python functions as tools converted to JSON schemas; a template's own failure is an
    LMStackError."""
    tok.save(tmp_path)
    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path)

    def get_weather(city: str) -> str:
        """Today's weather.

        Args:
            city: where
        """
        return "sunny"

    template = ("{% for t in tools or [] %}{{ t | tojson }}\n{% endfor %}{% for m in messages %}{{ m.role }}: "
                "{{ m.content }}{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}"
                "{% if 'tool_calls' in m %}[{{ m.tool_calls | length }} calls]{% endif %}\n{% endfor %}")
    messages = [{"role": "user", "content": "weather?", "tool_calls": None},
                {"role": "assistant", "content": None, "reasoning": "look it up",
                 "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}]
    ours = tok.apply_chat_template(messages, tokenize=False, chat_template=template, tools=[get_weather])
    assert ours == hf.apply_chat_template(messages, tokenize=False, chat_template=template, tools=[get_weather])
    assert '"name": "get_weather"' in ours and "None" not in ours and "<think>look it up</think>" in ours
    with pytest.raises(LMStackError, match="chat template failed to render: TypeError"):
        tok.apply_chat_template(messages, chat_template="{{ messages[0].content + 1 }}")


def test_config_keys_lmstack_does_not_read_survive_a_save(tok, tmp_path):
    """padding_side, sep / mask tokens and named extras come back as they were, in transformers too, and the
    named tokens reach templates (as transformers passes its special tokens map)."""
    tok.save(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    config.update(padding_side="left", sep_token="<|endoftext|>", extra_special_tokens={"image_token": "<|im_start|>"})
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = Tokenizer.load(tmp_path / "a")
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                      chat_template="{{ image_token }}|{{ sep_token }}") == "<|im_start|>|<|endoftext|>"
    loaded.save(tmp_path / "b")
    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path / "b")
    assert (hf.padding_side, hf.sep_token, hf.image_token) == ("left", "<|endoftext|>", "<|im_start|>")
    loaded.extra_special_tokens = []  # a named extra taken out does not come back from its name
    loaded.save(tmp_path / "c")
    assert Tokenizer.load(tmp_path / "c").named_tokens().get("image_token") is None


def test_tokens_that_tokenizer_config_calls_special_are_special(tmp_path):
    """An added token not flagged special in tokenizer.json but named eos in tokenizer_config.json is special to
    transformers, skipped by decode(skip_special_tokens=True); an additional special token counts among the
    special ids, but decoding keeps it, as transformers does."""
    from tokenizers import AddedToken

    base = Tokenizer.train([CORPUS.read_text()[:50_000]], vocab_size=400)
    base.backend.add_tokens([AddedToken("<|end|>", special=False, normalized=False),
                             AddedToken("<tool>", special=False, normalized=False)])
    Tokenizer(base.backend, eos_token="<|end|>", extra_special_tokens=["<tool>"]).save(tmp_path)
    tokenizer_json = json.loads((tmp_path / "tokenizer.json").read_text())
    assert not any(t["special"] for t in tokenizer_json["added_tokens"] if t["content"] in ("<|end|>", "<tool>"))
    ours, hf = Tokenizer.load(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    ids = ours.encode("Hi<tool>x<|end|>")
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True) == "Hi<tool>x"
    assert ours.special_ids >= {ours.token_to_id("<|end|>"), ours.token_to_id("<tool>")}
    assert set(hf.all_special_ids) <= ours.special_ids
    assert ours.decode(ids) == hf.decode(ids) == "Hi<tool>x<|end|>"


def test_chatml_rendering_by_hand(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_unset_special_tokens_are_undefined_in_templates(tok):
    """As in transformers: a template can tell an unset token from an empty one (`is defined`, `default`)."""
    assert tok.unk_token is None and tok.eos_token is not None
    source = "{{ unk_token | default('[U]') }}{% if eos_token is defined %}[E]{% endif %}{{ messages[0].content }}"
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages, chat_template=source, tokenize=False) == "[U][E]Hi"
    # a keyword argument still overrides a token, rather than clashing with it
    assert tok.apply_chat_template(messages, chat_template=source, tokenize=False, unk_token="?") == "?[E]Hi"


def test_char_tokenizer_spells_unk_as_text():
    """`<unk>` in the text is five characters; only a character the corpus lacks becomes the unknown id."""
    tok = Tokenizer.train_chars(["the <unk> sat"])
    ids = tok.encode("the <unk> sat")
    assert len(ids) == 13 and tok.decode(ids, skip_special_tokens=True) == "the <unk> sat"
    assert tok.encode("Z") == [tok.token_to_id("<unk>")] and tok.token_to_id("<unk>") not in ids
    assert tok.vocab_size == len(set("the <unk> sat")) + 1


def test_vocab_size_covers_the_largest_id():
    """A loaded vocabulary may leave ids unused: `vocab_size` is the rows an embedding needs, so that the data
    shards pick a dtype that holds every id."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    tok = Tokenizer(Backend(models.WordLevel({"a": 0, "<unk>": 1, "</s>": 70_000}, unk_token="<unk>")),
                    eos_token="</s>")
    assert tok.vocab_size == 70_001 and tok.eos_token_id == 70_000


def test_assistant_spans(tok):
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A!"}]
    text, spans = tok.apply_chat_template(messages, tokenize=False, return_assistant_spans=True)
    assert [text[a:b] for a, b in spans] == ["A!<|im_end|>"]


def test_bos_post_processor(tmp_path):
    tok = Tokenizer.train(["abc abc abd"] * 10, vocab_size=280, special_tokens=["<s>", "</s>"],
                          bos_token="<s>", eos_token="</s>", add_bos=True)
    assert tok.encode("abc")[0] == tok.bos_token_id
    assert tok.encode("abc", add_special_tokens=False)[0] != tok.bos_token_id
    tok.save(tmp_path)
    assert PreTrainedTokenizerFast.from_pretrained(tmp_path).encode("abc abd") == tok.encode("abc abd")


def test_train_from_jsonl_and_bad_lines(tmp_path):
    good = tmp_path / "docs.jsonl"
    good.write_text("\n".join(json.dumps({"body": f"document number {i} " * 5}) for i in range(50)))
    tok = train_tokenizer([good], vocab_size=300, text_field="body")
    assert tok.decode(tok.encode("document number 7")) == "document number 7"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json}\n')
    with pytest.raises(LMStackError, match=r"bad.jsonl:2"):
        train_tokenizer([bad], vocab_size=300)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"text": "fine"}\n{"other": 1}\n')
    with pytest.raises(LMStackError, match=r"missing.jsonl:2: record has no field 'text'"):
        train_tokenizer([missing], vocab_size=300)


def test_vocab_too_small():
    with pytest.raises(LMStackError, match="vocab_size 100 is too small"):
        Tokenizer.train(["abc"], vocab_size=100)


def test_malformed_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{ this is not json")
    with pytest.raises(LMStackError, match="tokenizer.json: not a valid tokenizer.json"):
        load_tokenizer(tmp_path)


def test_template_syntax_error(tok):
    with pytest.raises(LMStackError, match="chat template does not parse"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{% for %}")


def test_gpt2_original_files_match_transformers(gpt2_files, tmp_path):
    ours = load_tokenizer(gpt2_files)
    # transformers reads the same two files under their Hub names.
    shutil.copy(gpt2_files / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(gpt2_files / "vocab.bpe", tmp_path / "merges.txt")
    theirs = GPT2TokenizerFast.from_pretrained(tmp_path)
    assert ours.encode("Hello world") == [15496, 995]
    for text in TRICKY:
        assert ours.encode(text) == theirs.encode(text)
        assert ours.decode(ours.encode(text)) == text


def test_train_refuses_one_string_and_a_template_that_is_neither_a_name_nor_jinja():
    with pytest.raises(LMStackError, match=r"not one string; pass \[text\]"):
        Tokenizer.train("To be, or not to be", vocab_size=300)
    with pytest.raises(LMStackError, match="chat_template 'chat-ml': neither 'chatml' nor a Jinja template"):
        Tokenizer.train(["To be, or not to be"], vocab_size=300, chat_template="chat-ml")
    tok = Tokenizer.train(["To be, or not to be"], vocab_size=300, chat_template="{{ messages[0]['content'] }}")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"


def test_unk_in_text_reads_as_transformers_reads_it(tmp_path):
    """A SentencePiece vocabulary's `<unk>` is a special token (as transformers' converters and llama.cpp make
    it), so "<unk>" in text is that token; a character vocabulary's `<unk>`, not an added token, is not named in
    tokenizer_config.json, where transformers would make it one: both give the ids transformers gives."""
    from transformers import AutoTokenizer

    from lmstack.checkpoints import load_tokenizer
    from tests.conftest import VOCAB_DIR

    chars = Tokenizer.train_chars(["hello <unk> x"], special_tokens=["<eot>"])
    spm = VOCAB_DIR / "ggml-vocab-llama-spm.gguf"
    cases = [(chars, "x<unk>y"), *([(load_tokenizer(spm), "Hello <unk> world")] if spm.exists() else [])]
    for i, (tok, text) in enumerate(cases):
        tok.save(tmp_path / str(i))
        assert AutoTokenizer.from_pretrained(tmp_path / str(i)).encode(text) == tok.encode(text)
    assert len(chars.encode("x<unk>y")) == 7  # the characters, as the corpus had them
    if spm.exists():
        assert cases[1][0].encode("Hello <unk> world") == [1, 15043, 29871, 0, 29871, 3186]  # Llama 2's ids


def test_bad_training_settings_are_refused_before_training():
    """Each named before the trainer runs (a huge vocabulary would exhaust memory in it)."""
    from lmstack import LMStackError

    for changes, match in [(dict(vocab_size=10**11), r"vocab_size 100000000000: must be between 1 and"),
                            (dict(eos_token=""), r"eos_token: an empty token name"),
                            (dict(special_tokens=[""]), r"special token: an empty token name"),
                            (dict(add_bos=True), r"add_bos needs a bos_token"),
                            (dict(chat_template="{% for m in messages %}{{ m.content }"),
                             r"chat template does not parse")]:
        with pytest.raises(LMStackError, match=match):
            Tokenizer.train(["hello world"] * 10, **{"vocab_size": 300, **changes})


def test_text_that_is_not_unicode_is_named(tmp_path, capsys):
    """A lone surrogate (bytes that were not UTF-8, as a command line reads them) is named with its place,
    through the API and the CLI (one error line, not the backend's TypeError)."""
    from lmstack import LMStackError
    from lmstack.cli import main

    tok = Tokenizer.train(["hello world"] * 10, 300)
    with pytest.raises(LMStackError, match=r"text 0: character 3 is a lone surrogate \(U\+DCFF\)"):
        tok.encode("abc\udcff")
    with pytest.raises(LMStackError, match=r"text 1: character 1 is a lone surrogate \(U\+D800\)"):
        tok.encode_batch(["a", "b\ud800"])
    tok.save(tmp_path / "tok")
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "tok"), "abc\udcff"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: text 0: character 3 is a lone surrogate") and err.count("\n") == 1
