"""Byte-level BPE tokenizers (on Hugging Face `tokenizers`), special tokens and chat templates.

Files are the Hugging Face ones, `tokenizer.json` + `tokenizer_config.json`, so what lmstack saves loads in
`transformers.PreTrainedTokenizerFast` with the same ids and the same chat renderings, and what the Hub
publishes loads here. GPT-2's original `encoder.json` + `vocab.bpe` and the vocabulary in a GGUF file load
too.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from lmstack.atomic import atomic_write_text
from lmstack.errors import LMStackError

# The split rule of GPT-4 / Llama 3: contractions, letters with one leading non-letter, numbers in groups of
# up to three digits, punctuation runs, newlines, other whitespace.
GPT4_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHATML_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- 'You can call these tools. To call one, reply with <tool_call>{\"name\": ..., \"arguments\": ...}"
    "</tool_call>.\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- set messages = messages[1:] if messages[0]['role'] == 'system' else messages %}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}{% generation %}{{- message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{%- else %}{{- message['content'] + '<|im_end|>' }}{%- endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


# ---------------------------------------------------------------------------------------------- templates


class _GenerationTracker(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text, as in Hugging Face templates; the
    character spans it wraps are recorded while tracking is on (used for assistant-only loss masks)."""

    tags = {"generation"}

    def __init__(self, environment: jinja2.Environment) -> None:
        super().__init__(environment)
        environment.extend(track_generation=self.track)
        self._spans: list[tuple[int, int]] | None = None
        self._blocks: list[str] | None = None

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller: Any) -> str:
        text = caller()
        if self._blocks is not None and self._spans is not None:
            start = len("".join(self._blocks))
            self._spans.append((start, start + len(text)))
        return text

    @contextmanager
    def track(self, blocks: list[str], spans: list[tuple[int, int]]) -> Iterator[None]:
        self._blocks, self._spans = blocks, spans
        try:
            yield
        finally:
            self._blocks = self._spans = None


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandbox with the globals and filters Hugging Face templates use."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTracker, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise LMStackError(f"chat template does not parse: {e.message} (template line {e.lineno})") from None


# ---------------------------------------------------------------------------------------------- tokenizer


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json spells a special token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


# tokenizer_config.json keys that `Tokenizer.load` reads (or rewrites on save); the others travel in config_extra.
# extra_special_tokens travels too when it is transformers 5's dict of named extras (a list is read into
# extra_special_tokens and written as additional_special_tokens).
_CONFIG_KEYS_READ = {"tokenizer_class", "added_tokens_decoder", "bos_token", "eos_token", "pad_token", "unk_token",
                     "clean_up_tokenization_spaces", "additional_special_tokens", "model_max_length", "chat_template",
                     "auto_map"}

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' names for a model's reasoning


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    """`message` with its reasoning (under whichever name it came) also as `thinking` and `reasoning_content`,
    the names templates read (gpt-oss's, Qwen3's), as transformers fills them."""
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _tool_schema(tool: Any) -> Any:
    """A tool as templates take it: a JSON schema as given, a Python function converted to one by transformers'
    `get_json_schema` (from its type hints and docstring), as its `apply_chat_template` does."""
    if not callable(tool):
        return tool
    try:
        from transformers.utils import get_json_schema
    except ImportError:
        raise LMStackError(f"tool {getattr(tool, '__name__', tool)!r}: give tools as JSON schemas (converting a "
                           "Python function needs transformers' get_json_schema)") from None
    try:
        return get_json_schema(tool)
    except Exception as e:  # its TypeHintParsingException / DocstringParsingException say what is missing
        raise LMStackError(f"tool {getattr(tool, '__name__', tool)!r}: {e}") from None


MAX_VOCAB = 1 << 24  # far past any real vocabulary (Gemma's 256k); ids stay exact in float32 below it


def _not_text(texts: Sequence[Any]) -> LMStackError:
    """The error for what the tokenizers backend refuses to encode: not a string, or one holding a lone
    surrogate (bytes that were not UTF-8, read with Python's surrogateescape, as a command line's are)."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            return LMStackError(f"text {i}: expected a string, got {type(text).__name__}")
        bad = next((j for j, ch in enumerate(text) if 0xD800 <= ord(ch) <= 0xDFFF), None)
        if bad is not None:
            return LMStackError(f"text {i}: character {bad} is a lone surrogate (U+{ord(text[bad]):04X}), not "
                                "Unicode text: bytes that are not UTF-8 (read files with errors='replace')")
    return LMStackError("the tokenizer could not encode the text")


class Tokenizer:
    """A byte-level BPE tokenizer with special tokens and an optional chat template."""

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        model_max_length: int | None = None,
        chat_templates: dict[str, str] | None = None,
        extra_special_tokens: Sequence[str] = (),
        config_extra: dict[str, Any] | None = None,
    ) -> None:
        """`chat_template` is the default template; `chat_templates` holds named others (such as "tool_use",
        which `apply_chat_template` picks when tools are given, as transformers does). `extra_special_tokens`
        are special besides bos / eos / pad / unk (in `special_ids`; like transformers, `decode(skip_special_tokens=True)`
        skips them only where tokenizer.json marks them special). `config_extra` holds the tokenizer_config.json
        keys lmstack does not interpret (padding_side, sep_token, named extra tokens, ...), written back on save."""
        self.backend = backend
        self._untrimmed: tuple[Backend, Backend] | None = None  # (backend, a copy without post-processor)
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        self.chat_template = chat_template
        self.chat_templates = dict(chat_templates or {})
        self.extra_special_tokens = list(extra_special_tokens)
        self.model_max_length = model_max_length
        self.config_extra = dict(config_extra or {})
        self._id_bound = (-1, 0)  # (token count, largest id + 1) for `vocab_size`
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            token = getattr(self, name)
            if token is not None and backend.token_to_id(token) is None:
                raise LMStackError(f"{name} {token!r} is not in the vocabulary (transformers would append it as a "
                                   "new token, past the model's embedding: add it to tokenizer.json's added_tokens "
                                   "and resize the model, or name a token the vocabulary has)")
        for token in self.extra_special_tokens:
            if backend.token_to_id(token) is None:
                raise LMStackError(f"special token {token!r} is not in the vocabulary")

    # ------------------------------------------------------------------------------------ training

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        special_tokens: Sequence[str] = ("<|endoftext|>",),
        *,
        min_frequency: int = 2,
        split_pattern: str | None = GPT4_SPLIT,
        bos_token: str | None = None,
        eos_token: str | None = "<|endoftext|>",
        pad_token: str | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        model_max_length: int | None = None,
        show_progress: bool = False,
    ) -> Tokenizer:
        """Learn a byte-level BPE vocabulary of `vocab_size` tokens (special tokens included) from `texts`.

        `split_pattern` is the pre-tokenizer regex (the GPT-4 / Llama 3 rule by default; None for GPT-2's).
        With `chat_template="chatml"` the ChatML template and its tokens are added.
        """
        if not 0 <= min_frequency < 2**64:  # the trainer's count is unsigned 64-bit
            raise LMStackError(f"min_frequency {min_frequency}: must be >= 0 (and below 2**64)")
        if isinstance(texts, (str, bytes)):  # iterating it would train on its characters, one text each
            raise LMStackError("texts: a list (or other iterable) of texts, not one string; pass [text]")
        if chat_template is not None and chat_template != "chatml" and not re.search(r"\{[{%]", chat_template):
            raise LMStackError(f"chat_template {chat_template!r}: neither 'chatml' nor a Jinja template (one has "
                               "{{ ... }} or {% ... %})")
        if chat_template is not None and chat_template != "chatml":
            compile_template(chat_template)  # a template that does not parse is refused now, not at first use
        if not 0 < vocab_size <= MAX_VOCAB:  # the trainer would try to allocate it all
            raise LMStackError(f"vocab_size {vocab_size}: must be between 1 and {MAX_VOCAB:,}")
        if add_bos and bos_token is None:  # before training, not after
            raise LMStackError("add_bos needs a bos_token")
        named = [("special token", t) for t in special_tokens] + [
            (name, t) for name, t in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token))]
        empty = [name for name, t in named if t == ""]
        if empty:
            raise LMStackError(f"{empty[0]}: an empty token name; give the token's text, e.g. <|endoftext|>")
        special = list(dict.fromkeys(special_tokens))
        if chat_template == "chatml":
            chat_template = CHATML_TEMPLATE
            special += [t for t in CHATML_TOKENS if t not in special]
        for token in (bos_token, eos_token, pad_token):
            if token is not None and token not in special:
                special.append(token)
        if vocab_size < 256 + len(special):
            raise LMStackError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least 256 byte "
                               f"tokens plus {len(special)} special token{'s' if len(special) != 1 else ''}")
        # With a Llama 3-style split, a piece already in the vocabulary is taken whole (ignore_merges), as
        # Llama 3 and llama.cpp's `llama-bpe` tokenizer do.
        backend = Backend(models.BPE(ignore_merges=split_pattern is not None))
        backend.pre_tokenizer = _byte_level_pre_tokenizer(split_pattern)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        backend.train_from_iterator(_lines(texts), trainer=trainer)
        if add_bos:
            if bos_token is None:
                raise LMStackError("add_bos needs a bos_token")
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B",
                special_tokens=[(bos_token, backend.token_to_id(bos_token))],
            )
        return cls(backend, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                   chat_template=chat_template, model_max_length=model_max_length)

    @classmethod
    def train_chars(cls, texts: Iterable[str], special_tokens: Sequence[str] = ()) -> Tokenizer:
        """A character-level tokenizer: one id per distinct character in sorted order (nanoGPT's
        shakespeare_char vocabulary), then `<unk>` for characters the corpus did not have, then
        `special_tokens`. Saved as an ordinary tokenizer.json."""
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        vocab = {c: i for i, c in enumerate(sorted(chars))}
        vocab["<unk>"] = len(vocab)
        backend = Backend(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()
        # `<unk>` is the model's fallback only, not an added token: the text "<unk>" (as in WikiText) stays
        # five characters rather than the id of a character never seen.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
        eos = special_tokens[0] if special_tokens else None
        return cls(backend, eos_token=eos, unk_token="<unk>")

    # ------------------------------------------------------------------------------------ files

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """From a directory with tokenizer.json (+ tokenizer_config.json), a tokenizer.json file, a directory
        with GPT-2's encoder.json + vocab.bpe, or a .gguf file."""
        path = Path(path)
        if path.suffix.lower() == ".gguf":
            from lmstack.checkpoints.gguf import load_gguf_tokenizer

            return load_gguf_tokenizer(path)
        folder = path if path.is_dir() else path.parent
        file = path / "tokenizer.json" if path.is_dir() else path
        if path.is_dir() and not file.exists() and (path / "encoder.json").exists():
            return cls.from_gpt2_files(path / "encoder.json", path / "vocab.bpe")
        if path.name in ("encoder.json", "vocab.bpe") and path.is_file():
            raise LMStackError(f"{path}: one of GPT-2's two tokenizer files: pass the directory that holds "
                               "encoder.json and vocab.bpe")
        if not file.exists():
            raise LMStackError(f"{path}: no tokenizer.json")
        try:
            backend = Backend.from_file(str(file))
        except Exception as e:  # tokenizers raises a plain Exception for malformed files
            raise LMStackError(f"{file}: not a valid tokenizer.json ({e})") from None
        config: dict[str, Any] = {}
        config_file = folder / "tokenizer_config.json"
        if config_file.exists():
            try:
                config = json.loads(config_file.read_text())
            except json.JSONDecodeError as e:
                raise LMStackError(f"{config_file}: not valid JSON ({e})") from None
            if not isinstance(config, dict):
                raise LMStackError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
        templates = _read_chat_templates(folder, config)
        max_len = config.get("model_max_length")
        named = {_token_text(config.get(key)) for key in ("bos_token", "eos_token", "pad_token", "unk_token")}
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        if isinstance(extra, dict):  # transformers 5's named extras: {"image_token": "<image>", ...}
            extra = list(extra.values())
        extra = [t for t in map(_token_text, extra if isinstance(extra, list) else []) if t and t not in named]
        return cls(
            backend,
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")),
            pad_token=_token_text(config.get("pad_token")),
            unk_token=_token_text(config.get("unk_token")),
            chat_template=templates.pop("default", None),
            chat_templates=templates,
            extra_special_tokens=[t for t in dict.fromkeys(extra) if backend.token_to_id(t) is not None],
            model_max_length=max_len if isinstance(max_len, int) and max_len < 10**12 else None,
            config_extra={k: v for k, v in config.items() if k not in _CONFIG_KEYS_READ
                          and not (k == "extra_special_tokens" and not isinstance(v, dict))},
        )

    @classmethod
    def from_gpt2_files(cls, encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike) -> Tokenizer:
        """GPT-2's original release format: `encoder.json` (token -> id) and `vocab.bpe` (merges)."""
        try:
            vocab = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise LMStackError(f"{encoder_json}: not valid JSON ({e})") from None
        lines = Path(vocab_bpe).read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        backend = Backend(models.BPE(vocab=vocab, merges=merges))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        eos = "<|endoftext|>"
        if eos in vocab:
            backend.add_special_tokens([AddedToken(eos, special=True, normalized=False)])
        return cls(backend, bos_token=eos if eos in vocab else None, eos_token=eos if eos in vocab else None,
                   model_max_length=1024)

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json into directory `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        added = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self.backend.get_added_tokens_decoder().items())
        }
        config: dict[str, Any] = {
            **self.config_extra,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "added_tokens_decoder": added,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            # Only an added token: transformers makes the one named here an added special token, which would
            # split `<unk>` out of text where this tokenizer reads its characters (the model's own unknown
            # token in tokenizer.json stands either way).
            "unk_token": self.unk_token if self.unk_token in self._added_contents() else None,
            "clean_up_tokenization_spaces": False,  # decoding must give back exactly what was encoded
        }
        if self.extra_special_tokens:
            config["additional_special_tokens"] = self.extra_special_tokens
        named = config.get("extra_special_tokens")
        if isinstance(named, dict):  # the names of the extras still here (a token taken out loses its name)
            here = {*self.extra_special_tokens, self.bos_token, self.eos_token, self.pad_token, self.unk_token}
            config["extra_special_tokens"] = {k: v for k, v in named.items() if _token_text(v) in here}
        if self.model_max_length:
            config["model_max_length"] = self.model_max_length
        named = {name: t for name, t in self.chat_templates.items() if name != "default"}
        if named:  # both spellings, so every version of transformers reads the same
            default = [{"name": "default", "template": self.chat_template}] if self.chat_template else []
            config["chat_template"] = [*default, *({"name": k, "template": v} for k, v in named.items())]
        elif self.chat_template:
            config["chat_template"] = self.chat_template
        atomic_write_text(path / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        # transformers 5's layout, which takes precedence where present: a template saved earlier into this
        # directory must not outlive this one.
        if self.chat_template:
            atomic_write_text(path / "chat_template.jinja", self.chat_template)
        elif (path / "chat_template.jinja").exists():
            (path / "chat_template.jinja").unlink()
        folder = path / "additional_chat_templates"
        for old in folder.glob("*.jinja") if folder.is_dir() else []:
            if old.stem not in named:
                old.unlink()
        for name, template in named.items():
            if Path(name).name != name or name in ("", ".", ".."):
                raise LMStackError(f"chat template name {name!r} is not a plain file name")
            folder.mkdir(exist_ok=True)
            atomic_write_text(folder / f"{name}.jinja", template)

    # ------------------------------------------------------------------------------------ ids

    @property
    def vocab_size(self) -> int:
        """One more than the largest id, added tokens included: the rows an embedding table needs, and the
        number of tokens unless a loaded vocabulary leaves ids unused."""
        count = self.backend.get_vocab_size(with_added_tokens=True)
        if self._id_bound[0] != count:  # the largest id, looked up once per vocabulary
            largest = max(self.backend.get_vocab(with_added_tokens=True).values(), default=-1)
            self._id_bound = (count, max(count, largest + 1))
        return self._id_bound[1]

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def adds_bos(self) -> bool:
        """Whether `encode` puts the bos token before a text (Llama 2, Mistral, TinyLlama do; GPT-2's do not)."""
        return self.bos_token_id is not None and self.encode("a")[:1] == [self.bos_token_id]

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.token_to_id(self.pad_token)

    @property
    def special_ids(self) -> set[int]:
        """Ids of the special tokens: added tokens marked special, and the tokens tokenizer_config.json
        names (bos, eos, pad, unk, additional ones), as transformers counts them."""
        return self._ids_of(self.bos_token, self.eos_token, self.pad_token, self.unk_token, *self.extra_special_tokens)

    def _added_contents(self) -> set[str]:
        return {t.content for t in self.backend.get_added_tokens_decoder().values()}

    def _ids_of(self, *tokens: str | None) -> set[int]:
        """The added tokens marked special, plus `tokens`."""
        ids = {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        return ids | {i for t in tokens if t is not None and (i := self.backend.token_to_id(t)) is not None}

    def _skipped_ids(self) -> set[int]:
        """What `decode(skip_special_tokens=True)` drops, as transformers: the added tokens marked special and
        bos / eos / pad / unk, also where tokenizer.json does not flag them (not the additional ones)."""
        return self._ids_of(self.bos_token, self.eos_token, self.pad_token, self.unk_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings inside it become their ids. `add_special_tokens` adds
        what the post-processor adds (e.g. a leading bos)."""
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            raise _not_text([text]) from None

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` (no special tokens added) and the (start, end) characters each covers. Read
        without the post-processor, whose ByteLevel `trim_offsets` would shrink a whitespace token to
        nothing (the ids are the same)."""
        if self._untrimmed is None or self._untrimmed[0] is not self.backend:
            plain = Backend.from_str(self.backend.to_str())
            plain.post_processor = None
            self._untrimmed = (self.backend, plain)
        encoding = self._untrimmed[1].encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads)."""
        texts = list(texts)
        try:
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        except TypeError:
            raise _not_text(texts) from None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        if skip_special_tokens:
            special = self._skipped_ids()
            ids = [i for i in ids if i not in special]
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        if skip_special_tokens:
            special = self._skipped_ids()
            batch = [[i for i in ids if i not in special] for ids in batch]
        return self.backend.decode_batch([list(ids) for ids in batch], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------------ chat

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tools: Sequence[dict[str, Any]] | None = None,
        documents: Sequence[dict[str, Any]] | None = None,
        tokenize: bool = True,
        chat_template: str | None = None,
        return_assistant_spans: bool = False,
        continue_final_message: bool | str = False,
        **kwargs: Any,
    ) -> Any:
        """Render `messages` with the chat template, as `transformers`' `apply_chat_template` does.

        Returns the ids (`tokenize=True`, encoded without adding special tokens, as Hugging Face does) or the
        text. `chat_template` is a template or the name of one of `chat_templates`; by default the
        "tool_use" template when `tools` are given and there is one, else the default template.
        `continue_final_message` ends the text inside the last message (a prefilled answer to go on
        from) instead of closing its turn; given a field name ("reasoning_content"), inside that field of
        the last message instead of its content, as transformers 5 takes it. With `return_assistant_spans`, also the (start, end) character
        spans of `{% generation %}` blocks.
        """
        source = self.select_chat_template(chat_template, tools)
        if continue_final_message and add_generation_prompt:
            raise LMStackError("continue_final_message and add_generation_prompt do not combine: the first goes on "
                               "with the last message, the second starts a new one")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise LMStackError(f"message {i} is not a dict with a 'role': {m!r}")
        # As transformers: keys set to None (OpenAI's content=None beside tool_calls) are left out, which templates
        # handle, and reasoning given under any of its names is there under each
        messages = [_alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in messages]
        tools = [_tool_schema(t) for t in tools] if tools is not None else None
        final = None
        if continue_final_message:
            field = continue_final_message if isinstance(continue_final_message, str) else "content"
            final = messages[-1].get(field) if messages else None
            if not isinstance(final, str):
                raise LMStackError(f"continue_final_message needs a last message whose {field!r} is a string")
            # Reasoning is there under each of its names: tag every copy, whichever the template reads
            fields = [f for f in REASONING_FIELDS if messages[-1].get(f) == final] if field in REASONING_FIELDS \
                else [field]
            if not any(f in source for f in fields):
                raise LMStackError(f"continue_final_message={field!r}: the chat template never reads that field")
            for f in fields:
                messages[-1][f] = final + _CONTINUE_TAG
        template = compile_template(source)
        context = dict(
            messages=messages, tools=tools, documents=documents,
            add_generation_prompt=add_generation_prompt, **kwargs,
        )
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):  # as transformers: unset is undefined
            if getattr(self, name) is not None:
                context.setdefault(name, getattr(self, name))
        for name, token in self.named_tokens().items():  # sep / cls / mask and named extras (image_token)
            context.setdefault(name, token)
        spans: list[tuple[int, int]] = []
        try:
            if return_assistant_spans:
                blocks: list[str] = []
                with template.environment.track_generation(blocks, spans):
                    for piece in template.generate(**context):
                        blocks.append(piece)
                text = "".join(blocks)
            else:
                text = template.render(**context)
        except jinja2.exceptions.TemplateError as e:
            raise LMStackError(f"chat template failed to render: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:  # the template's own code failed
            raise LMStackError(f"chat template failed to render: {type(e).__name__}: {e}") from None
        if final is not None:  # cut right after the final message's text, as transformers does
            if _CONTINUE_TAG.strip() not in text or final.strip() not in text:
                raise LMStackError("continue_final_message: the chat template does not show the last message's "
                                   "text as it is, so there is no place to continue from")
            at = text.rindex(_CONTINUE_TAG.strip())
            text = text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
            spans = [(a, min(b, len(text))) for a, b in spans if a < len(text)]
        out: Any = self.encode(text, add_special_tokens=False) if tokenize else text
        return (out, spans) if return_assistant_spans else out

    def named_tokens(self) -> dict[str, str]:
        """The special tokens tokenizer_config.json names besides bos / eos / pad / unk: sep_token, cls_token,
        mask_token and transformers 5's named extras ({"image_token": "<image>"})."""
        named = {k: _token_text(self.config_extra.get(k)) for k in ("sep_token", "cls_token", "mask_token")}
        extras = self.config_extra.get("extra_special_tokens")
        if isinstance(extras, dict):
            named.update({k: _token_text(v) for k, v in extras.items()})
        return {k: v for k, v in named.items() if isinstance(v, str)}

    def select_chat_template(self, chat_template: str | None = None, tools: Any = None) -> str:
        """The template to render, chosen as transformers chooses: `chat_template` by name or as a template,
        else "tool_use" when tools are given and there is one, else the default."""
        if chat_template == "default" and "default" not in self.chat_templates and self.chat_template is not None:
            return self.chat_template
        if chat_template is not None:
            return self.chat_templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if self.chat_template is None:
            names = f" (named ones: {sorted(self.chat_templates)}; pass chat_template=NAME)" if self.chat_templates else ""
            raise LMStackError(f"this tokenizer has no default chat template{names}: train it with one "
                               "(`lmstack tokenizer train --chat-template chatml`, or Tokenizer.train(..., "
                               "chat_template='chatml')), or pass chat_template=... in Python")
        return self.chat_template


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # marks where a continued final message ends in the rendering


def _read_chat_templates(folder: Path, config: dict[str, Any]) -> dict[str, str]:
    """Chat templates by name ("default" the main one) from tokenizer_config.json (a string, or transformers
    4's list of {name, template}), then transformers 5's files, which take precedence: chat_template.jinja
    and additional_chat_templates/NAME.jinja. chat_template.json (a processor's file) serves when nothing
    else gives a default."""
    raw = config.get("chat_template")
    templates: dict[str, str] = {}
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):
        for t in raw:
            if isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str):
                templates[t["name"]] = t["template"]
    if (folder / "chat_template.jinja").exists():
        templates["default"] = (folder / "chat_template.jinja").read_text()
    extra = folder / "additional_chat_templates"
    for file in sorted(extra.glob("*.jinja")) if extra.is_dir() else []:
        templates[file.stem] = file.read_text()
    if "default" not in templates and (folder / "chat_template.json").exists():
        try:
            default = json.loads((folder / "chat_template.json").read_text()).get("chat_template")
        except (json.JSONDecodeError, AttributeError) as e:
            raise LMStackError(f"{folder / 'chat_template.json'}: not a JSON object ({e})") from None
        if isinstance(default, str):
            templates["default"] = default
    return templates


def _byte_level_pre_tokenizer(split_pattern: str | None) -> pre_tokenizers.PreTokenizer:
    if split_pattern is None:  # GPT-2's own rule, built into the ByteLevel pre-tokenizer
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _lines(texts: Iterable[str], chunk: int = 1 << 16) -> Iterator[str]:
    """Feed the trainer pieces of bounded size (split on newlines) so a huge document streams."""
    for text in texts:
        start = 0
        while start < len(text):
            end = text.find("\n", start + chunk)
            end = len(text) if end == -1 else end + 1
            yield text[start:end]
            start = end


def train_tokenizer(
    files: Sequence[str | os.PathLike], vocab_size: int, text_field: str = "text", on_bad_record: str = "fail",
    stats: Any = None, **kwargs: Any,
) -> Tokenizer:
    """Train a byte-level BPE on text / JSONL / Parquet `files` (see `Tokenizer.train` for the options; a bad
    record stops with its file and line, or with `on_bad_record="skip"` is left out). `stats` (a
    `lmstack.data.readers.ReadStats`) counts what reading replaced or skipped."""
    from lmstack.data.readers import iter_texts

    if not files:
        raise LMStackError("no training files given")
    seen = [0]

    def texts():
        for text in iter_texts(files, text_field, on_bad_record=on_bad_record, stats=stats):
            seen[0] += len(text.strip())
            yield text

    tokenizer = Tokenizer.train(texts(), vocab_size, **kwargs)
    if not seen[0]:
        raise LMStackError(f"the corpus is empty: no text in {[str(f) for f in files]}")
    return tokenizer
