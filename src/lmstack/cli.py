"""`lmstack <verb>`: a thin layer that parses arguments and calls one library function per verb.

Bad input raises `LMStackError`; it is printed as one line (`error: ...`) with exit status 1, and the
traceback only with `--debug`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from lmstack.errors import LMStackError


def _tokenizer_train(args: argparse.Namespace) -> None:
    from lmstack.tokenizer import train_tokenizer

    template = args.chat_template
    if template and template != "chatml":
        path = Path(template)
        if not path.exists():
            raise LMStackError(f"--chat-template {template!r}: not 'chatml' and no such file")
        template = path.read_text()
    tok = train_tokenizer(
        args.input, args.vocab_size, text_field=args.text_field, special_tokens=args.special_tokens,
        min_frequency=args.min_frequency, bos_token=args.bos_token, eos_token=args.eos_token,
        pad_token=args.pad_token, add_bos=args.add_bos, chat_template=template,
        model_max_length=args.model_max_length, show_progress=sys.stderr.isatty(),
    )
    tok.save(args.output)
    print(f"trained a byte-level BPE of {tok.vocab_size} tokens; wrote {args.output}/tokenizer.json "
          f"and tokenizer_config.json")


def _tokenizer_encode(args: argparse.Namespace) -> None:
    from lmstack.checkpoints import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    ids = tok.encode(args.text, add_special_tokens=not args.no_special)
    print(json.dumps(ids))
    if args.show_tokens:
        print(json.dumps([tok.decode([i]) for i in ids], ensure_ascii=False))


def _convert(args: argparse.Namespace) -> None:
    from lmstack.checkpoints import load_model, load_tokenizer, save_model

    src, dst = Path(args.source), Path(args.destination)
    model = load_model(src, dtype=args.dtype)
    tokenizer = None
    try:
        tokenizer = load_tokenizer(src)
    except LMStackError as e:
        print(f"note: no tokenizer written ({e})", file=sys.stderr)
    if dst.suffix == ".gguf":
        from lmstack.checkpoints.gguf import save_gguf

        if tokenizer is None:
            raise LMStackError(f"{src}: a GGUF file carries the tokenizer, and none could be loaded")
        save_gguf(model, tokenizer, dst, tensor_type=args.gguf_type)
    else:
        save_model(model, dst, tokenizer=tokenizer, max_shard_size=args.max_shard_size)
    print(f"wrote {dst} ({model.num_params():,} parameters, {model.embed.weight.dtype})")


def _info(args: argparse.Namespace) -> None:
    from lmstack.checkpoints.hf import config_from_hf

    path = Path(args.model)
    if path.suffix == ".gguf":
        from lmstack.checkpoints import load_model

        config = load_model(path).config
    else:
        config = config_from_hf(path)
    import torch

    from lmstack.models import DecoderLM

    with torch.device("meta"):
        model = DecoderLM(config)
    print(json.dumps({"parameters": model.num_params(),
                      "non_embedding_parameters": model.num_params(non_embedding=True),
                      "config": config.to_dict()}, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmstack", description="The language-model stack on PyTorch.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    verbs = parser.add_subparsers(dest="verb", required=True)

    tok = verbs.add_parser("tokenizer", help="train and use BPE tokenizers")
    tok_verbs = tok.add_subparsers(dest="tokenizer_verb", required=True)
    train = tok_verbs.add_parser("train", help="learn a byte-level BPE from text / JSONL files")
    train.add_argument("--input", nargs="+", required=True, help="text files, or JSONL with a text field")
    train.add_argument("--output", required=True, help="directory for tokenizer.json + tokenizer_config.json")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    train.add_argument("--special-tokens", nargs="*", default=["<|endoftext|>"])
    train.add_argument("--min-frequency", type=int, default=2)
    train.add_argument("--bos-token", default=None)
    train.add_argument("--eos-token", default="<|endoftext|>")
    train.add_argument("--pad-token", default=None)
    train.add_argument("--add-bos", action="store_true", help="prepend the bos token when encoding")
    train.add_argument("--chat-template", default=None, help="'chatml' or a Jinja template file")
    train.add_argument("--model-max-length", type=int, default=None)
    train.set_defaults(func=_tokenizer_train)
    enc = tok_verbs.add_parser("encode", help="print the ids of a text")
    enc.add_argument("--tokenizer", required=True, help="checkpoint dir, tokenizer.json or .gguf")
    enc.add_argument("text")
    enc.add_argument("--no-special", action="store_true", help="do not add bos/eos")
    enc.add_argument("--show-tokens", action="store_true")
    enc.set_defaults(func=_tokenizer_encode)

    conv = verbs.add_parser("convert", help="Hugging Face dir <-> GGUF file, or a Hugging Face dir re-saved")
    conv.add_argument("source", help="a Hugging Face checkpoint directory or a .gguf file")
    conv.add_argument("destination", help="output directory (Hugging Face format), or a path ending in .gguf")
    conv.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    conv.add_argument("--max-shard-size", default="5GB")
    conv.add_argument("--gguf-type", default="f32", choices=["f32", "f16", "q8_0"],
                      help="tensor type of the 2-D weights when writing a .gguf file")
    conv.set_defaults(func=_convert)

    info = verbs.add_parser("info", help="print a checkpoint's config and parameter count")
    info.add_argument("model")
    info.set_defaults(func=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LMStackError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
