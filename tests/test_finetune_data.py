"""SFT data: the three record forms, assistant-only label masks, packing with per-example attention."""

import json

import pytest
import torch

from lmstack.config import ModelConfig
from lmstack.data.finetune import (
    alpaca_prompt,
    collate_packed,
    collate_padded,
    load_sft_examples,
    pack_examples,
    render_record,
    to_example,
)
from lmstack.errors import LMStackError
from lmstack.models import build_model
from lmstack.tokenizer import CHATML_TEMPLATE, Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    text = "Hello there! What is two plus two? It is four. Below is an instruction that describes a task.\n" * 20
    return Tokenizer.train([text], 400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                           eos_token="<|im_end|>", chat_template="chatml")


def trained_text(tok, ids, trained):
    return tok.decode([i for i, t in zip(ids, trained) if t])


def test_chat_labels_cover_every_assistant_turn_and_nothing_else(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hello there!"}, {"role": "user", "content": "Two plus two?"},
                {"role": "assistant", "content": "It is four."}]
    ids, trained = render_record({"messages": messages}, tok)
    assert ids == tok.apply_chat_template(messages)  # the same tokens inference sees
    assert trained_text(tok, ids, trained) == "Hello there!<|im_end|>It is four.<|im_end|>"
    # The untrained part is exactly the system, user and role-header text.
    untrained = tok.decode([i for i, t in zip(ids, trained) if not t])
    assert "Hello there" not in untrained and "Two plus two?" in untrained
    ex = to_example(ids, trained)
    assert len(ex.input_ids) == len(ex.labels) == len(ids) - 1
    for t, label in enumerate(ex.labels):  # label t is token t + 1 where trained, -100 elsewhere
        assert label == (ids[t + 1] if trained[t + 1] else -100)


def test_chat_without_generation_blocks_finds_turns_by_prefix(tok):
    template = CHATML_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert "{% generation %}" not in template
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello there!"},
                {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "It is four."}]
    ids, trained = render_record({"messages": messages}, tok, chat_template=template)
    assert trained_text(tok, ids, trained) == "Hello there!<|im_end|>It is four.<|im_end|>"
    # A conversation that opens with the answer, under a template that puts a default system prompt first
    # (SmolLM2's): the answer is trained, not the system prompt before it.
    system = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n{% endif %}"
              + template)
    opening = [{"role": "assistant", "content": "Hello there!"}, *messages[2:]]
    ids, trained = render_record({"messages": opening}, tok, chat_template=system)
    assert trained_text(tok, ids, trained) == "Hello there!<|im_end|>It is four.<|im_end|>"
    for short in ("end", "m", "system"):  # an answer that the template's own text also spells
        ids, trained = render_record({"messages": [{"role": "assistant", "content": short}]}, tok,
                                     chat_template=system)
        assert trained_text(tok, ids, trained) == f"{short}<|im_end|>"


# Templates that render an earlier turn differently once more turns follow (as the released ones do).
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
QWEN3_TEMPLATE = (  # Qwen3's rule: only answers after the last user turn get the thinking block
    "{%- set ns = namespace(last_query_index=0) %}{%- for message in messages %}{%- if message.role == 'user' %}"
    "{%- set ns.last_query_index = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}{%- if message.role == 'assistant' %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or message.reasoning_content) %}"
    "{{- '<|im_start|>assistant\n<think>\n' + (message.reasoning_content or '') + '\n</think>\n\n' + message.content }}"
    "{%- else %}{{- '<|im_start|>assistant\n' + message.content }}{%- endif %}{{- '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
MISTRAL_V3_TEMPLATE = (  # Mistral v0.3's rule: the system prompt goes into the user turn that is last
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}")


@pytest.mark.parametrize("template, special, eos, expected", [
    (PHI3_TEMPLATE, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<|endoftext|>",
     "Hello there!<|end|>It is four.<|end|>"),
    (QWEN3_TEMPLATE, ["<|im_start|>", "<|im_end|>", "<think>", "</think>"], "<|im_end|>",
     "Hello there!<|im_end|><think>\n\n</think>\n\nIt is four.<|im_end|>"),  # the last: what follows its prompt
    # The space the template puts before an answer is in the answer's first token, " It", here
    (MISTRAL_V3_TEMPLATE, ["[INST]", "[/INST]"], "</s>", "Hello there!</s> It is four.</s>"),
], ids=["phi3", "qwen3", "mistral-v0.3"])
def test_chat_turns_are_found_under_templates_that_rewrite_earlier_turns(template, special, eos, expected):
    text = "Hello there! What is two plus two? It is four. Be brief.\n" * 20
    tok = Tokenizer.train([text], 400, special_tokens=["<|endoftext|>", "<s>", "</s>", *special], eos_token=eos,
                          bos_token="<s>", chat_template=template)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hello there!"}, {"role": "user", "content": "Two plus two?"},
                {"role": "assistant", "content": "It is four."}]
    ids, trained = render_record({"messages": messages}, tok)
    assert ids == tok.apply_chat_template(messages)  # the tokens inference sees
    assert trained_text(tok, ids, trained) == expected
    untrained = tok.decode([i for i, t in zip(ids, trained) if not t], skip_special_tokens=False)
    assert "Hello there" not in untrained and "Two plus two?" in untrained


def test_a_template_that_refuses_part_of_the_conversation_still_marks_the_answers(tok):
    """A template that raises on a shorter conversation (raise_exception) leaves the markers, which render the
    whole one."""
    body = CHATML_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    template = "{% if messages|length < 4 %}{{ raise_exception('four messages, please') }}{% endif %}" + body
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello there!"},
                {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "It is four."}]
    ids, trained = render_record({"messages": messages}, tok, chat_template=template)
    assert trained_text(tok, ids, trained) == "Hello there!<|im_end|>It is four.<|im_end|>"


def test_whitespace_tokens_of_an_answer_are_trained_under_trimmed_offsets():
    """A ByteLevel post-processor with trim_offsets (GPT-NeoX-style tokenizer.json files) reports a run of
    spaces as covering no character; the indentation of a code answer is trained all the same."""
    from tokenizers import processors

    text = "def f():\n    return 1\n  x = 2\n" * 30
    tok = Tokenizer.train([text], 300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                          eos_token="<|im_end|>", chat_template="chatml")
    tok.backend.post_processor = processors.ByteLevel(trim_offsets=True)
    answer = "def f():\n    return 1\n  x = 2"
    messages = [{"role": "user", "content": "code"}, {"role": "assistant", "content": answer}]
    ids, trained = render_record({"messages": messages}, tok)
    assert ids == tok.apply_chat_template(messages)
    assert trained_text(tok, ids, trained) == answer + "<|im_end|>"


def test_sentencepiece_answers_are_tokenized_as_in_the_whole_conversation():
    """Phi-3's real template and SentencePiece vocabulary (llama.cpp's test file): the answers' tokens are
    those of the whole rendered conversation; tokenized on their own they would start with a "▁"."""
    from lmstack.checkpoints import load_tokenizer
    from tests.conftest import VOCAB_DIR

    if not (VOCAB_DIR / "ggml-vocab-phi-3.gguf").exists():
        pytest.skip("llama.cpp's vocabularies are not fetched (make fetch-test-data)")
    tok = load_tokenizer(VOCAB_DIR / "ggml-vocab-phi-3.gguf")
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello there!"},
                {"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "It is four."}]
    ids, trained = render_record({"messages": messages}, tok)
    assert ids == tok.apply_chat_template(messages)
    assert [tok.backend.id_to_token(i) for i, t in zip(ids, trained) if t] == [
        "Hello", "▁there", "!", "<|end|>", "It", "▁is", "▁four", ".", "<|end|>"]


def test_instruction_and_prompt_completion_forms(tok):
    ids, trained = render_record({"instruction": "Add.", "input": "2 and 2", "output": "four"}, tok)
    text = tok.decode(ids)
    assert text == alpaca_prompt("Add.", "2 and 2") + "four<|im_end|>"
    assert "### Input:\n2 and 2" in text and text.count("### Response:\n") == 1
    assert trained_text(tok, ids, trained) == "four<|im_end|>"
    ids, _ = render_record({"instruction": "Greet.", "output": "Hello"}, tok)
    assert "### Input" not in tok.decode(ids)
    assert render_record({"instruction": "Greet.", "input": None, "output": "Hello"}, tok)[0] == ids  # null: none
    with pytest.raises(LMStackError, match="field 'output' is null"):
        render_record({"instruction": "Greet.", "output": None}, tok, "f.jsonl:3")
    ids, trained = render_record({"prompt": "Two plus two is", "completion": " four"}, tok)
    assert trained_text(tok, ids, trained) == " four<|im_end|>"
    assert tok.decode([i for i, t in zip(ids, trained) if not t]) == "Two plus two is"


def test_bad_records_name_file_and_line(tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n"
                    + json.dumps({"messages": [{"role": "wizard", "content": "x"}]}) + "\n")
    with pytest.raises(LMStackError, match=r"bad.jsonl:2: .*unknown role 'wizard'"):
        load_sft_examples(path, tok, 64)
    path.write_text(json.dumps({"instruction": "a"}) + "\n")
    with pytest.raises(LMStackError, match=r"bad.jsonl:1: .*'output'"):
        load_sft_examples(path, tok, 64)
    path.write_text(json.dumps({"question": "a"}) + "\n")
    with pytest.raises(LMStackError, match=r"bad.jsonl:1: expected 'messages'"):
        load_sft_examples(path, tok, 64)
    for content, kind in ((None, "NoneType"), ([{"type": "text", "text": "hi"}], "list"), (4, "int")):
        path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": content}]}) + "\n")
        with pytest.raises(LMStackError, match=rf"bad.jsonl:1: message 1: 'content' must be a string, got {kind}"):
            load_sft_examples(path, tok, 64)


def test_truncation_and_empty_examples_are_counted(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "Hello " * 50, "completion": "four"}) + "\n"
                    + json.dumps({"prompt": "Hello", "completion": "four"}) + "\n")
    examples, stats = load_sft_examples(path, tok, 16)
    assert stats == {"records": 2, "truncated": 1, "empty": 1, "dropped_by_cut": 1} and len(examples) == 1
    # When nothing is left, the error says why: answers cut off at the block size, or no answers at all.
    path.write_text(json.dumps({"prompt": "Hello " * 50, "completion": "four"}) + "\n")
    with pytest.raises(LMStackError, match=r"in 1 of 1 records every trained token .* past the first 17 tokens, "
                                           r"where they are cut; raise block_size"):
        load_sft_examples(path, tok, 16)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hello"}]}) + "\n")
    with pytest.raises(LMStackError, match=r"\(1 records, none with a token to train on"):
        load_sft_examples(path, tok, 16)


def test_packing_keeps_examples_apart(tok):
    texts = [("Hello", " there!"), ("Two plus two is", " four."), ("What is", " it?")]
    examples = [to_example(*_pc(tok, p, c)) for p, c in texts]
    rows = pack_examples(examples, block_size=24)
    assert sum(len(r) for r in rows) == 3 and all(sum(len(e) for e in r) <= 24 for r in rows)
    batch = collate_packed(rows, 24)
    row0 = rows[0]
    # Positions restart with each example and labels are each example's own.
    t = 0
    for d, ex in enumerate(row0):
        n = len(ex)
        assert batch["position_ids"][0, t:t + n].tolist() == list(range(n))
        assert batch["document_ids"][0, t:t + n].tolist() == [d] * n
        assert batch["labels"][0, t:t + n].tolist() == ex.labels
        t += n
    assert (batch["labels"][0, t:] == -100).all()

    # A packed forward gives each example the logits it has alone.
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("tiny-llama", vocab_size=len(tok), block_size=32)).eval()
    with torch.no_grad():
        packed = model(batch["input_ids"][:1], position_ids=batch["position_ids"][:1],
                       document_ids=batch["document_ids"][:1])
        t = 0
        for ex in row0:
            alone = model(torch.tensor([ex.input_ids]))
            assert torch.allclose(packed[0, t:t + len(ex)], alone[0], atol=1e-5)
            t += len(ex)
        # Without the document mask the second example would see the first: the logits differ.
        leaky = model(batch["input_ids"][:1], position_ids=batch["position_ids"][:1])
        n0 = len(row0[0])
        assert not torch.allclose(leaky[0, n0:n0 + len(row0[1])], packed[0, n0:n0 + len(row0[1])], atol=1e-3)


def test_padded_batch_loss_equals_per_example_loss(tok):
    examples = [to_example(*_pc(tok, "Hello", " there!")), to_example(*_pc(tok, "Two plus two is", " four."))]
    batch = collate_padded(examples)
    assert batch["input_ids"].shape == (2, max(len(e) for e in examples))
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("tiny-llama", vocab_size=len(tok), block_size=32)).eval()
    with torch.no_grad():
        _, loss = model(batch["input_ids"], batch["labels"])
        logits = [model(torch.tensor([e.input_ids]))[0] for e in examples]
    # Token-mean cross-entropy over the trained tokens of both examples, computed one example at a time.
    nll = torch.cat([torch.nn.functional.cross_entropy(lg, torch.tensor(e.labels), ignore_index=-100,
                                                       reduction="none")[torch.tensor(e.labels) != -100]
                     for lg, e in zip(logits, examples)])
    assert torch.allclose(loss, nll.mean(), atol=1e-5)


def _pc(tok, prompt, completion):
    return render_record({"prompt": prompt, "completion": completion}, tok)


def test_preference_completion_stops_at_the_end_of_turn(tok):
    from lmstack.train.tasks import _prompt_completion

    prompt, completion = _prompt_completion(tok, [{"role": "user", "content": "Two plus two?"}], "It is four.", "x")
    assert tok.decode(completion) == "It is four.<|im_end|>"  # not the template's newline after it
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    prompt, completion = _prompt_completion(tok, "Two plus two is", " four.", "x")
    assert tok.decode(completion) == " four.<|im_end|>"


def test_end_of_turn_is_found_from_the_template_and_stops_generation(tok):
    from lmstack.data.finetune import end_of_turn_id
    from lmstack.generate import Engine, SamplingParams

    eot = tok.token_to_id("<|im_end|>")
    assert end_of_turn_id(tok) == eot
    bare = Tokenizer(tok.backend, eos_token="<|endoftext|>")  # no template: nothing to stop at
    assert end_of_turn_id(bare) is None

    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("tiny-llama", vocab_size=len(tok), block_size=32)).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[eot] = 0  # a head that always prefers <|im_end|>: every logit 0 but its bias
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tok)))
        model.lm_head.bias[eot] = 10.0
    out = Engine(model, tok).generate(["Hello"], SamplingParams(temperature=0, max_new_tokens=5,
                                                                stop_token_ids=[eot]))[0]
    assert out.finish_reason == "stop" and out.stop_token_id == eot and out.token_ids == []


def test_jsonl_lone_surrogates_become_replacement_characters(tmp_path):
    """A lone "\\ud800" escape is valid JSON but not text (the tokenizer would fail on it): U+FFFD instead,
    anywhere in a record; an escaped surrogate pair stays the character it spells."""
    from lmstack.data.readers import read_jsonl

    path = tmp_path / "chat.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "a\\ud800b"}], "x": "\\ud83d\\ude00"}\n')
    [(_, record)] = list(read_jsonl(path))
    assert record == {"messages": [{"role": "user", "content": "a\ufffdb"}], "x": "\U0001F600"}


@pytest.mark.parametrize("packing", [False, True])
def test_sft_keeps_padding_out_of_the_router_loss(tok, tmp_path, packing):
    from lmstack.train.tasks import SFTTask

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in
                            [("Hello", " there!"), ("Two plus two is", " four."), ("What is", " it? It is four.")]))
    task = SFTTask(tok, 0, str(data), None, 24, packing, val_fraction=0.0)
    items = task.draw("train", 0, task.size("train"))
    batch = task.collate("train", items)
    real = batch["token_mask"]
    rows = [task.data["train"][i] for i in items]
    lengths = [sum(len(e) for e in r) if packing else len(r) for r in rows]
    assert real.sum(dim=1).tolist() == lengths and not real.all()  # padding and real tokens both present
    assert all(real[b, :n].all() for b, n in enumerate(lengths))
    torch.manual_seed(0)
    task.policy = build_model(ModelConfig.from_name("tiny-mixtral", vocab_size=len(tok), block_size=32,
                                                    moe_aux_loss_coef=0.5))
    loss, _ = task.loss(task.policy, batch)
    extra = {k: batch[k] for k in ("position_ids", "document_ids") if k in batch}
    _, masked = task.policy(batch["input_ids"], batch["labels"], token_mask=real, **extra)
    _, unmasked = task.policy(batch["input_ids"], batch["labels"], **extra)
    assert torch.allclose(loss, masked) and not torch.allclose(loss, unmasked, atol=1e-5)
