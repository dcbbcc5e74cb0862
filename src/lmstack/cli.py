"""`lmstack <verb>`: a thin layer that parses arguments and calls one library function per verb.

Bad input raises `LMStackError`; it is printed as one line (`error: ...`) with exit status 1, and the
traceback only with `--debug`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import select
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from lmstack.errors import LMStackError, UsageError
from lmstack.paths import is_gguf, is_training_run, training_run_error


def _at_least(value: int | None, minimum: int, flag: str) -> None:
    """Refuse a numeric flag below `minimum` (None, the flag not given, passes)."""
    if value is not None and value < minimum:
        raise LMStackError(f"{flag} {value}: must be >= {minimum}")


def _read_text_file(value: str, flag: str, what: str) -> str:
    """The text of the file a flag names, with one line (naming the file) when it is not UTF-8 text."""
    path = Path(value)
    if path.is_dir():
        raise LMStackError(f"{flag} {value}: a directory, not {what}")
    if not path.exists():
        raise LMStackError(f"{flag} {value}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:  # unreadable: permissions, a broken link
        raise LMStackError(f"{flag} {value}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise LMStackError(f"{flag} {value}: not UTF-8 text (byte {e.start}), so not {what}") from None


# What a checkpoint directory holds: a file among these given as --model means its directory was meant.
_CHECKPOINT_FILE_SUFFIXES = (".safetensors", ".json", ".jinja", ".bin", ".pt")


def _check_model(value: str | os.PathLike, flag: str = "--model") -> None:
    """Refuse, with what to pass instead, a model path that cannot be a checkpoint: a missing path, a file
    that is not a .gguf (a checkpoint's own file, or anything else), or a training run directory."""
    path = Path(value)
    if not path.exists():
        raise LMStackError(f"{flag} {value}: no such checkpoint (expected a checkpoint directory or .gguf file)")
    if path.is_file():
        if is_gguf(path):
            return
        if path.suffix in _CHECKPOINT_FILE_SUFFIXES:
            raise LMStackError(f"{flag} {value}: a file, where a checkpoint directory is expected; pass the "
                               f"directory that holds it ({path.parent})")
        raise LMStackError(f"{flag} {value}: not a checkpoint directory or .gguf file")
    if is_training_run(path) and not any(path.glob("*.safetensors")):
        raise training_run_error(path, flag)


def _check_result_file(output: str | None, inputs: list[str], flag: str = "--output") -> None:
    """Before any work: a result file must not be one of the inputs, and its directory must exist."""
    if not output:
        return
    out = Path(output)
    for given in inputs:
        if out.exists() and Path(given).exists() and out.resolve() == Path(given).resolve():
            raise LMStackError(f"{flag} {output}: that is an input file, which the result would replace; write it "
                               "elsewhere")
    if out.is_dir():
        raise LMStackError(f"{flag} {output}: a directory; name the file to write")
    if not out.parent.is_dir():
        raise LMStackError(f"{flag} {output}: no directory {out.parent} to write it in")


def _load_lm(path: str | os.PathLike, flag: str, purpose: str, recurrent_ok: bool = False, **kwargs):
    """`load_model(path)`, refused with the verb that takes it when it is a classification or reward model
    (a score head in place of the language-model head), which cannot be used for `purpose`; a recurrent LM
    only where `recurrent_ok`."""
    from lmstack.checkpoints import load_model
    from lmstack.models.decoder import DecoderLM
    from lmstack.models.rnn import RNNLM

    model = load_model(path, **kwargs)
    if isinstance(model, RNNLM) and not recurrent_ok:
        hint = (" (in Python, lmstack.generate.generate_ids(model, prompt_ids, n) continues a recurrent LM)"
                if purpose == "generation" else "")
        raise LMStackError(f"{flag} {path}: a recurrent LM (arch {model.config.arch!r}); {purpose} runs "
                           f"Transformer models{hint}")
    if not isinstance(model, (DecoderLM, RNNLM)):
        labels = getattr(model, "labels", None)
        what = f"a classification model (a score head over {len(labels)} labels)" if labels else type(model).__name__
        raise LMStackError(f"{flag} {path}: {what}, with no language-model head for {purpose}; it scores texts "
                           "with `lmstack eval classify`")
    return model


def _check_output(source: str | os.PathLike, output: str | os.PathLike, flag: str, file: bool = False) -> None:
    """Refuse an output that is the source, or a directory holding something other than a checkpoint (an
    earlier output is replaced; a training run or a training checkpoint, which a resumed run reads, is not).
    The output is a directory, or with `file` a file (an existing one is replaced)."""
    src, dst = Path(source), Path(output)
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise LMStackError(f"{flag} {output}: that is the source model; write the output elsewhere")
    above = next((parent for parent in dst.parents if parent.exists()), None)
    if above is not None and not above.is_dir():
        raise LMStackError(f"{flag} {output}: {above} is a file, not a directory")
    if dst.exists() and not dst.is_dir() and not file:
        raise LMStackError(f"{flag} {output}: an existing file; the output is a directory: pass a new or empty one")
    if not dst.is_dir() or not any(dst.iterdir()):
        return
    if is_training_run(dst):
        raise LMStackError(f"{flag} {output}: a training run directory (it holds metrics.jsonl or checkpoints/), "
                           "which the output would overwrite; write it elsewhere")
    if (dst / "trainer_state").exists():
        raise LMStackError(f"{flag} {output}: a training checkpoint (it holds trainer_state/, which a resumed run "
                           "reads); write the output elsewhere")
    if not (dst / "config.json").is_file() or not any(dst.glob("*.safetensors")):
        raise LMStackError(f"{flag} {output}: not empty and not a checkpoint directory; pass a new or empty "
                           "directory (or an earlier output, to replace it)")


def _tokenizer_train(args: argparse.Namespace) -> None:
    from lmstack.data.readers import ReadStats
    from lmstack.tokenizer import train_tokenizer

    _at_least(args.min_frequency, 0, "--min-frequency")
    if args.model_max_length is not None:
        _at_least(args.model_max_length, 1, "--model-max-length")
    out = Path(args.output)
    if is_training_run(out) or (out / "config.json").is_file() or any(out.glob("*.safetensors")):
        raise LMStackError(f"--output {args.output}: holds a model (or a training run), whose weights go with the "
                           "tokenizer it has; write the new tokenizer elsewhere")
    template = args.chat_template
    if template and template != "chatml":
        path = Path(template)
        if not path.exists():
            raise LMStackError(f"--chat-template {template!r}: not 'chatml' and no such file")
        template = _read_text_file(template, "--chat-template", "a Jinja template")
    stats = ReadStats()
    tok = train_tokenizer(
        args.input, args.vocab_size, text_field=args.text_field, on_bad_record=args.on_bad_record, stats=stats,
        special_tokens=args.special_tokens,
        min_frequency=args.min_frequency, bos_token=args.bos_token, eos_token=args.eos_token,
        pad_token=args.pad_token, add_bos=args.add_bos, chat_template=template,
        model_max_length=args.model_max_length, show_progress=sys.stderr.isatty(),
    )
    tok.save(args.output)
    print(f"trained a byte-level BPE of {tok.vocab_size} tokens; wrote {args.output}/tokenizer.json "
          f"and tokenizer_config.json")
    _note_reading(stats)
    if tok.vocab_size < args.vocab_size:
        print(f"note: the corpus has merges for {tok.vocab_size:,} tokens, fewer than --vocab-size "
              f"{args.vocab_size:,} (more text gives more)", file=sys.stderr)


def _tokenizer_encode(args: argparse.Namespace) -> None:
    from lmstack.checkpoints import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    ids = tok.encode(args.text, add_special_tokens=not args.no_special)
    print(json.dumps(ids))
    if args.show_tokens:
        print(json.dumps([tok.decode([i]) for i in ids], ensure_ascii=False))


def _refuse_quantized(path: Path, what: str, instead: str) -> None:
    from lmstack.quantize import is_quantized_checkpoint

    if path.is_dir() and is_quantized_checkpoint(path):
        raise LMStackError(f"{path} holds quantized weights: lmstack cannot {what}; {instead}")


def _convert(args: argparse.Namespace) -> None:
    from lmstack.checkpoints import load_model, load_tokenizer, save_model

    src, dst = Path(args.source), Path(args.destination)
    if is_gguf(dst) and args.max_shard_size is not None:
        raise LMStackError("--max-shard-size shards a Hugging Face directory; a GGUF file is one file")
    if not is_gguf(dst) and args.gguf_type is not None:
        raise LMStackError(f"--gguf-type applies to a .gguf destination, not the directory {dst} (--dtype sets a "
                           "directory's precision)")
    _check_model(src, "convert source")
    _check_output(src, dst, "convert destination", file=is_gguf(dst))
    _refuse_quantized(src, "convert it", "convert the model it was quantized from")
    model = load_model(src, dtype=args.dtype)
    tokenizer = None
    try:
        tokenizer = load_tokenizer(src)
    except LMStackError as e:
        print(f"note: no tokenizer written ({e})", file=sys.stderr)
    if is_gguf(dst):
        from lmstack.checkpoints.gguf import save_gguf
        from lmstack.models.decoder import DecoderLM

        if not isinstance(model, DecoderLM):
            what = ("a recurrent LM; GGUF holds Transformer language models" if model.config.arch != "transformer"
                    else "a classification model; GGUF holds language models only")
            raise LMStackError(f"convert source {src}: {what}")
        if tokenizer is None:
            raise LMStackError(f"{src}: a GGUF file carries the tokenizer, and none could be loaded")
        save_gguf(model, tokenizer, dst, tensor_type=args.gguf_type or "f32")
    else:
        save_model(model, dst, tokenizer=tokenizer, max_shard_size=args.max_shard_size or "5GB")
    stored = f"{args.gguf_type or 'f32'} GGUF" if is_gguf(dst) else str(next(model.parameters()).dtype)
    print(f"wrote {dst} ({sum(p.numel() for p in model.parameters()):,} parameters, {stored})")


def _note_reading(stats) -> None:
    """Notes on what reading the input replaced (bytes that are not UTF-8) or skipped (bad records)."""
    _note_not_utf8(stats.replaced_bytes_files, stats.replacement_chars)
    if stats.skipped_records:
        print(f"note: skipped {len(stats.skipped_records):,} bad records, e.g. {stats.skipped_records[0]}",
              file=sys.stderr)


def _note_not_utf8(files: list[str], replaced: int) -> None:
    """One stderr note for input that was not valid UTF-8 (its bad bytes were read as U+FFFD)."""
    if files:
        print(f"note: {replaced:,} invalid UTF-8 sequences replaced with U+FFFD in {', '.join(files)}",
              file=sys.stderr)


def _data_prepare(args: argparse.Namespace) -> None:
    from lmstack.checkpoints import load_tokenizer
    from lmstack.data.readers import SKIP_HINT, iter_texts
    from lmstack.data.shards import MAX_BLOCK_CHARS, prepare_shards
    from lmstack.tokenizer import Tokenizer

    if args.workers is not None:
        _at_least(args.workers, 1, "--workers")
    if args.tokenizer == "char":
        tokenizer = Tokenizer.train_chars(iter_texts(args.input, args.text_field, on_bad_record=args.on_bad_record,
                                                     chunked=True, hint=SKIP_HINT))
    else:
        tokenizer = load_tokenizer(args.tokenizer)
    meta = prepare_shards(args.input, tokenizer, args.output, text_field=args.text_field,
                          val_fraction=args.val_fraction, split=args.split, workers=args.workers,
                          on_bad_record=args.on_bad_record, progress=sys.stderr.isatty(),
                          parse_special_tokens=args.parse_special_tokens)
    print(f"wrote {args.output}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} validation tokens "
          f"({meta['dtype']}) from {meta['documents']:,} document{'s' if meta['documents'] != 1 else ''}")
    _note_not_utf8(meta["files_not_utf8"], meta["replacement_chars"])
    if meta["skipped_records"]:
        print(f"note: skipped {meta['skipped_records']:,} bad records, e.g. {meta['skipped_examples'][0]}",
              file=sys.stderr)
    if meta["empty_records"]:
        print(f"note: left out {meta['empty_records']:,} records with empty text", file=sys.stderr)
    if meta["special_token_strings"]:
        print(f"note: the text holds {meta['special_token_strings']:,} special-token strings (such as "
              "<|endoftext|>), tokenized as text; --parse-special-tokens reads them as the tokens", file=sys.stderr)
    if meta["forced_cuts"]:
        print(f"note: {meta['forced_cuts']:,} stretches of over {MAX_BLOCK_CHARS:,} characters without a space "
              "or newline were cut where they were; tokens there may differ from one whole encoding",
              file=sys.stderr)
    empty = [name for name in ("train", "val") if not meta[f"{name}_tokens"]]
    if empty and meta["val_fraction"] > 0:
        advice = "use more documents or --split tail" if meta["split"] == "hash" else "use more text"
        print(f"note: the {empty[0]} split is empty (--split {meta['split']} with {meta['documents']:,} "
              f"documents); {advice}", file=sys.stderr)
    if meta["eos_token_id"] is None and meta["documents"] > 1:
        print(f"note: the tokenizer has no eos token, so the {meta['documents']:,} documents follow each other "
              "without a separator", file=sys.stderr)


def _pretrain(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmstack.train.config import load_config, parse_overrides
    from lmstack.train.loop import train

    if args.resume:
        run = Path(args.resume)
        saved = run / "config.json"
        if (run / "trainer_state").is_dir():
            where = f" ({run.parent.parent})" if run.parent.name == "checkpoints" else ""
            raise LMStackError(f"--resume {run}: a checkpoint of a run, not the run; pass the run directory{where}, "
                               "which resumes from its last checkpoint")
        if not saved.exists():
            raise LMStackError(f"{run}: no config.json (not a training run directory)")
        if any(run.glob("*.safetensors")) and not is_training_run(run):
            raise LMStackError(f"--resume {run}: a model, not a training run directory; to train from it, use "
                               f"--init_from checkpoint --model {run}")
        out_dir = parse_overrides(overrides).get("out_dir")
        if out_dir is not None and Path(out_dir).resolve() != run.resolve():
            raise LMStackError(f"--out_dir {out_dir}: a resumed run continues in its own directory ({run}); to "
                               "start a new run from its weights, use --init_from checkpoint")
        config_path = args.config or saved
        if not args.config:
            _read_text_file(saved, "--resume", "a training run's config.json")
        overrides = [*overrides, "--out_dir", str(run)]
    else:
        if not args.config and not overrides:
            raise UsageError("give a recipe with --config, or --key value settings")
        config_path = args.config
    if args.config and Path(args.config).is_file():
        _read_text_file(args.config, "--config", "a YAML recipe")
    if getattr(args, "task", None):
        other = parse_overrides(overrides).get("task")
        if other not in (None, args.task):
            raise UsageError(f"--task {other}: the verb names the task (`lmstack finetune {other} ...`), and this "
                             f"command's is {args.task}")
        overrides = [*overrides, "--task", args.task]
    cfg = load_config(config_path, overrides)
    if not args.resume and (cfg.task != "pretrain" or cfg.init_from == "checkpoint"):
        _check_model(cfg.model, "model")  # the checkpoint to start from
    summary = train(cfg, resume=bool(args.resume))
    if summary.get("checkpoint"):
        print(summary_line(summary))


def summary_line(summary: dict) -> str:
    """The last line of a run: its headline validation metric (loss, or GRPO's reward) with its best, the
    other validation metrics, and where the model and the curves were written."""
    val = {k[4:]: v for k, v in summary.items() if k.startswith("val_")}
    name, best, step = summary.get("best") or ("loss", summary["val_loss"], summary["steps"])
    notes = [f"perplexity {val.pop('ppl'):.2f}"] if "ppl" in val else []
    notes.append(f"best {best:.4f} at step {step}")
    line = f"done: {summary['steps']} steps; validation {name} {val.pop(name):.4f} ({', '.join(notes)})"
    if val:
        line += "; " + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in sorted(val.items()))
    line += f"; model: {summary['checkpoint']}"
    return line + (f"; curves: {summary['plot']}" if "plot" in summary else "")


_PLOT_FORMATS = (".png", ".pdf", ".svg")


def _plot(args: argparse.Namespace) -> None:
    from lmstack.train.metrics import plot_losses

    out = None
    if args.output:
        out = Path(args.output)
        if out.is_dir() or (args.output.endswith(("/", os.sep)) and not out.exists()):  # a directory, maybe new
            out.mkdir(parents=True, exist_ok=True)
            out = out / "loss.png"
        elif out.suffix.lower() not in _PLOT_FORMATS:
            raise LMStackError(f"--output {args.output}: the image's name must end in {', '.join(_PLOT_FORMATS)} "
                               "(its format), or name a directory to write loss.png in")
    print(f"wrote {plot_losses(args.run_dir, out)}")


def _eval_classify(args: argparse.Namespace) -> None:
    import json

    from lmstack.checkpoints import load_model, load_tokenizer
    from lmstack.evaluate.classification import classification_metrics, format_classification_report
    from lmstack.evaluate.classify import predict_labels
    from lmstack.train.tasks import read_classification

    _at_least(args.batch_size, 1, "--batch-size")
    _check_model(args.model)
    _check_result_file(args.output, [args.data])
    model = load_model(args.model, dtype="float32", device=args.device)
    tokenizer = load_tokenizer(args.model)
    labels = args.labels.split(",") if args.labels else getattr(model, "labels", None)
    texts, gold = read_classification(args.data, labels)
    if labels is None:
        labels = sorted(set(gold))
    predicted = predict_labels(model, tokenizer, texts, labels, prompt=args.prompt, chat=args.chat,
                               batch_size=args.batch_size)
    metrics = classification_metrics(gold, predicted, labels=list(labels))
    print(format_classification_report(metrics))
    if args.output:
        from lmstack.atomic import atomic_write_text

        atomic_write_text(args.output, json.dumps(metrics, indent=2) + "\n")
        print(f"wrote {args.output}")


def _eval_perplexity(args: argparse.Namespace) -> None:
    from lmstack.checkpoints import load_tokenizer
    from lmstack.data.readers import SKIP_HINT, ReadStats, iter_texts
    from lmstack.evaluate import perplexity

    _at_least(args.max_chars, 1, "--max-chars")
    _check_model(args.model)
    model = _load_lm(args.model, "--model", "perplexity", recurrent_ok=True, dtype="float32", device=args.device)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    stats = ReadStats()
    # Records of empty text are left out, as `data prepare` leaves them out (not an extra blank line each)
    text = "\n\n".join(t for t in iter_texts(args.data, args.text_field, args.on_bad_record, stats=stats,
                                                hint=SKIP_HINT) if t)
    _note_reading(stats)
    if args.max_chars is not None:
        text = text[: args.max_chars]
    result = perplexity(model, tokenizer, text, max_length=args.max_length, stride=args.stride,
                        progress=sys.stderr.isatty())
    print(json.dumps(result.to_dict(), indent=2))


# The defaults of the sampling flags a model's generation_config.json does not set.
SAMPLING_DEFAULTS = {"temperature": 0.7, "top_k": None, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0,
                     "repetition_penalty": 1.0}


def _sampling_params(args: argparse.Namespace, defaults: dict[str, Any] | None = None):
    """The SamplingParams the flags say; a flag of SAMPLING_DEFAULTS not given takes `defaults` (the model's),
    else its lmstack default."""
    from lmstack.generate import SamplingParams

    bias = {}
    for item in args.logit_bias or []:
        token, _, value = item.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise LMStackError(f"--logit-bias {item!r}: expected TOKEN_ID=BIAS") from None
    grammar = _read_text_file(args.grammar, "--grammar", "a Lark grammar") if args.grammar else None
    sampling = {k: getattr(args, k) if getattr(args, k) is not None else (defaults or {}).get(k, default)
                for k, default in SAMPLING_DEFAULTS.items()}
    try:
        return SamplingParams(
            json_schema=_json_schema(args.json_schema), regex=args.regex, choice=args.choice, grammar=grammar,
            max_new_tokens=args.max_new_tokens, **sampling, frequency_penalty=args.frequency_penalty,
            presence_penalty=args.presence_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
            logit_bias=bias, stop=args.stop or [], stop_token_ids=args.stop_token_ids or [],
            ignore_eos=args.ignore_eos, n=args.n, seed=args.seed, truncate_prompt=args.truncate_prompt,
            logprobs=getattr(args, "logprobs", None))
    except LMStackError as e:  # SamplingParams names its fields (top_p=0.0: ...): say whose setting it is
        named = re.match(r"(\w+)=(.*?): (.*)", str(e), re.DOTALL)
        if named is None or not hasattr(args, named[1]):
            raise
        field, value, why = named.groups()
        flag = "--" + field.replace("_", "-")
        if getattr(args, field) is None and field in (defaults or {}):  # no flag: the model's own setting
            raise LMStackError(f"{args.model}: its generation_config.json sets {field} {value}, which {why}; "
                               f"pass {flag} to override it") from None
        raise LMStackError(f"{flag} {value}: {why}") from None


def _with_model_defaults(args: argparse.Namespace, model: Any, unsupported: Sequence[str] = ()):
    """`_sampling_params` with the model's generation_config.json settings for the flags not given (those in
    `unsupported` left out), as vLLM and transformers' generate start from them; a note says which."""
    from lmstack.generate.sampling import model_sampling_defaults

    given = model_sampling_defaults(model)
    defaults = {k: v for k, v in given.items() if getattr(args, k) is None and k not in unsupported}
    params = _sampling_params(args, defaults)
    if defaults:
        print("note: sampling with the model's generation_config.json settings "
              f"{', '.join(f'{k} {str(v).lower()}' for k, v in defaults.items())} (flags override them)",
              file=sys.stderr)
    left_out = [k for k in unsupported if k in given and getattr(args, k) is None]
    if left_out:
        print(f"note: the model's {', '.join(f'{k} {given[k]}' for k in left_out)} is not used here",
              file=sys.stderr)
    return params


def _json_schema(value: str | None) -> dict | None:
    """--json-schema: a file holding the schema, or the schema itself as JSON."""
    if value is None:
        return None
    try:
        is_file = Path(value).is_file()
    except OSError:  # inline JSON too long to be a file name
        is_file = False
    try:
        return json.loads(_read_text_file(value, "--json-schema", "a JSON Schema") if is_file else value)
    except ValueError as e:
        if is_file:
            raise LMStackError(f"--json-schema {value}: the file is not JSON ({e})") from None
        shown = value.replace("\n", "\\n")  # one line
        shown = shown if len(shown) <= 200 else shown[:197] + "..."
        raise LMStackError(f"--json-schema: not JSON and no such file: {shown}") from None


# Flags that beam search does not use (it is deterministic, and knows no constraint, penalty or stop string).
_NOT_FOR_BEAMS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty", "frequency_penalty",
                  "presence_penalty", "no_repeat_ngram_size", "logit_bias", "stop", "seed", "json_schema", "regex",
                  "choice", "grammar")


# Flags speculative decoding does not take: it checks drafts against the plain sampling distribution.
_NOT_FOR_SPECULATIVE = ("repetition_penalty", "frequency_penalty", "presence_penalty", "no_repeat_ngram_size",
                        "json_schema", "regex", "choice", "grammar")


def _flags_given(args: argparse.Namespace, dests: Sequence[str]) -> list[str]:
    """The sampling flags among `dests` set to something other than their default."""
    defaults = argparse.ArgumentParser()
    _add_sampling_flags(defaults)
    return ["--" + d.replace("_", "-") for d in dests if getattr(args, d) != defaults.get_default(d)]


def _load_engine(args: argparse.Namespace):
    from lmstack.checkpoints import load_tokenizer
    from lmstack.generate import Engine

    _check_model(args.model)
    model = _load_lm(args.model, "--model", "generation", dtype=args.dtype, device=args.device)
    return Engine(model, load_tokenizer(args.tokenizer or args.model), max_batch_size=max(1, args.n),
                  compile=args.compile)


def _no_chat_template(args: argparse.Namespace) -> LMStackError:
    return LMStackError(f"{args.tokenizer or args.model}: the tokenizer has no chat template (train one with "
                        "`lmstack tokenizer train --chat-template chatml`, or pass --tokenizer with one)")


def _stop_at_end_of_turn(params, tokenizer):
    """Chat: also stop at the template's end of turn (ChatML's <|im_end|>) when it is not the eos token."""
    from dataclasses import replace

    from lmstack.data.finetune import end_of_turn_id

    turn_end = end_of_turn_id(tokenizer)
    if turn_end is None or turn_end == tokenizer.eos_token_id or turn_end in params.stop_token_ids:
        return params
    return replace(params, stop_token_ids=[*params.stop_token_ids, turn_end])


def _generate(args: argparse.Namespace) -> None:
    params = _sampling_params(args)
    if args.num_beams < 1:
        raise LMStackError(f"--num-beams {args.num_beams}: must be >= 1 (1 means no beam search)")
    if params.logprobs is not None and (args.num_beams > 1 or args.speculative):
        raise LMStackError("--logprobs works with sampling and greedy decoding, not beam search or --speculative")
    if args.draft_k is not None and not args.speculative:
        raise LMStackError("--draft-k is the number of tokens drafted per target pass: it needs --speculative")
    if args.draft_k is not None and args.draft_k < 1:
        raise LMStackError(f"--draft-k {args.draft_k}: must be >= 1")
    if args.compile and (args.num_beams > 1 or args.speculative):
        raise LMStackError("--compile compiles the engine's decode step, which beam search and --speculative "
                           "do not use")
    if args.length_penalty is not None and args.num_beams == 1:
        raise LMStackError("--length-penalty scores finished beams: it needs --num-beams > 1")
    if args.num_beams > 1:
        if args.speculative:
            raise LMStackError("--speculative and --num-beams > 1 do not combine")
        if args.n > args.num_beams:
            raise LMStackError(f"--n {args.n} with --num-beams {args.num_beams}: beam search returns at most "
                               "num_beams sequences")
        # Greedy is what beam search is: --temperature 0 (or below GREEDY_BELOW) is no contradiction.
        from lmstack.generate.sampling import GREEDY_BELOW

        ignored = [f for f in _flags_given(args, _NOT_FOR_BEAMS)
                   if f != "--temperature" or args.temperature >= GREEDY_BELOW]
        if ignored:
            raise LMStackError(f"beam search (--num-beams {args.num_beams}) does not use {', '.join(ignored)}")
    if args.speculative:
        unused = _flags_given(args, _NOT_FOR_SPECULATIVE) + ([f"--n {args.n}"] if args.n != 1 else [])
        if unused:
            raise LMStackError(f"speculative decoding (--speculative) makes one completion without penalties or "
                               f"constraints: it does not take {', '.join(unused)}")
        if args.speculative.replace("-", "_").lower() == "prompt_lookup" and not Path(args.speculative).exists():
            args.speculative = "prompt_lookup"  # the draft-free option however it is spelled, not a checkpoint
    engine = _load_engine(args)
    if args.chat and engine.tokenizer.chat_template is None:
        raise _no_chat_template(args)
    if args.num_beams == 1:  # beam search samples nothing
        # speculative decoding has no repetition penalty (it would change the distribution drafts are checked
        # against)
        params = _with_model_defaults(args, engine.model, ("repetition_penalty",) if args.speculative else ())
    prompt = args.prompt
    if args.chat:
        params = _stop_at_end_of_turn(params, engine.tokenizer)
        # Token ids, not text: encoding the rendered text would add the tokenizer's bos to a template that
        # already writes {{ bos_token }}.
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                      add_generation_prompt=True, tokenize=True)
    if args.speculative:
        from lmstack.generate.speculative import speculative_generate

        if args.speculative != "prompt_lookup":
            _check_model(args.speculative, "--speculative")
        draft = args.speculative if args.speculative == "prompt_lookup" else _load_lm(
            args.speculative, "--speculative", "drafting", dtype=args.dtype, device=args.device)
        out, stats = speculative_generate(engine.model, engine.tokenizer, prompt, draft, k=args.draft_k or 4,
                                          params=params)
        print(out.text)
        print(f"(speculative: {stats.accepted}/{stats.proposed} drafted tokens accepted, "
              f"{stats.acceptance_rate:.0%}; {stats.target_passes} target passes for {len(out.token_ids)} tokens)",
              file=sys.stderr)
        return
    if args.num_beams > 1:
        beams = engine.beam_search(prompt, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                                   length_penalty=1.0 if args.length_penalty is None else args.length_penalty,
                                   num_return_sequences=args.n, ignore_eos=args.ignore_eos,
                                   stop_token_ids=params.stop_token_ids, truncate_prompt=args.truncate_prompt)
        for i, c in enumerate(beams):
            if args.n > 1:
                print(f"--- beam {i + 1} ({c.finish_reason}, {len(c.token_ids)} tokens)")
            print(c.text)
        return
    if params.n == 1 and not args.no_stream and params.logprobs is None:
        for delta in engine.stream(prompt, params):
            print(delta, end="", flush=True)
        print()
        return
    for i, c in enumerate(engine.generate(prompt, params)):
        if params.n > 1:
            print(f"--- sample {i + 1} ({c.finish_reason}, {len(c.token_ids)} tokens)")
        print(c.text)
        for lp in c.logprobs or []:  # one line per token: the token, its logprob, then the alternatives
            alternatives = "  ".join(f"{engine.tokenizer.decode([t])!r} {v:.3f}" for t, v in lp.top)
            print(f"  {engine.tokenizer.decode([lp.token_id])!r} {lp.logprob:.3f}" +
                  (f"  | {alternatives}" if alternatives else ""))


def _fit_conversation(tokenizer, system: str | None, messages: list[dict[str, str]],
                      budget: int) -> tuple[list[int], int] | None:
    """The prompt ids of the conversation (ending in a user message), without as many of its oldest turns
    (a user message and its reply) as it takes to fit in `budget` tokens: (ids, messages dropped). The system
    prompt always stays. None when even the last user message alone does not fit."""
    head = [{"role": "system", "content": system}] if system else []
    for start in range(0, len(messages), 2):
        ids = tokenizer.apply_chat_template(head + messages[start:], add_generation_prompt=True)
        if len(ids) <= budget:
            return ids, start
    return None


# A line that is one word starting with a single slash reads as a command: `/bogus` is a typo, not a message.
CHAT_COMMANDS_LIKE = re.compile(r"/[A-Za-z]\w*")


def _chat(args: argparse.Namespace) -> None:
    params = _sampling_params(args)
    if params.n != 1:  # before the model loads, not at the first message
        raise LMStackError(f"--n {params.n}: a chat streams one reply per turn (generate takes --n)")
    if params.truncate_prompt:
        raise LMStackError("--truncate-prompt: a chat fits the conversation to the context itself, dropping the "
                           "oldest turns")
    engine = _load_engine(args)
    params = _with_model_defaults(args, engine.model)
    if engine.tokenizer.chat_template is None:
        raise _no_chat_template(args)
    from lmstack.generate.sampling import reply_room

    params = _stop_at_end_of_turn(params, engine.tokenizer)
    context = engine.max_seq_len  # the conversation leaves the reply the room truncate_prompt would
    budget = context - reply_room(params.max_new_tokens, context)
    system = args.system
    messages: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: /reset clears the conversation, /system TEXT sets the system prompt, /quit or Ctrl-D ends")
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: the chat ends
            if interactive:
                print()
            break
        if not line.strip():
            continue
        command, _, rest = line.strip().partition(" ")
        if command in ("/quit", "/exit"):
            break
        if command == "/reset":
            messages = []
            print("(conversation cleared)")
            continue
        if command == "/system":
            system = rest.strip() or None
            messages = []
            print(f"(system prompt {'set' if system else 'cleared'}; conversation cleared)")
            continue
        if CHAT_COMMANDS_LIKE.fullmatch(command):  # a mistyped command is not a message to the model
            print(f"error: unknown command {command}: /reset, /system TEXT, /quit (start a message with two "
                  "slashes to send one that starts with /)", file=sys.stderr)
            continue
        if line.startswith("//"):
            line = line[1:]
        messages.append({"role": "user", "content": line})
        try:
            fitted = _fit_conversation(engine.tokenizer, system, messages, budget)
        except LMStackError as e:  # the template refused this conversation (a system turn, say): the chat goes on
            messages.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        if fitted is None:  # this turn fails; the conversation so far stays
            messages.pop()
            print(f"error: this message does not fit the context of {context} tokens with room for a reply "
                  f"(--max-new-tokens, at most half the context); send a shorter one", file=sys.stderr)
            continue
        ids, dropped = fitted
        if dropped:
            del messages[:dropped]
            print(f"note: dropped the {dropped // 2} oldest turn{'s' if dropped > 2 else ''} to fit the context "
                  f"of {context} tokens", file=sys.stderr)
        reply = []
        stream = engine.stream(ids, params)
        try:
            for delta in stream:
                reply.append(delta)
                print(delta, end="", flush=True)
        except KeyboardInterrupt:  # Ctrl-C ends this reply (what was said stays), not the chat
            pass
        finally:
            stream.close()
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def _add_sampling_flags(p: argparse.ArgumentParser, chat: bool = False) -> None:
    """The model and sampling flags of `generate`; `chat` hides the two it refuses (they stay, to say why)."""
    p.add_argument("--model", required=True, help="checkpoint directory or .gguf file")
    p.add_argument("--tokenizer", default=None, help="default: the model's own")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (with a CUDA graph on a GPU); the first reply waits for it")
    p.add_argument("--max-new-tokens", type=int, default=256)
    # These six default to the model's generation_config.json, else to SAMPLING_DEFAULTS.
    p.add_argument("--temperature", type=float, default=None,
                   help="0 means greedy (default: the model's generation_config.json, else 0.7)")
    p.add_argument("--top-k", type=int, default=None, help="default: the model's, else none")
    p.add_argument("--top-p", type=float, default=None, help="default: the model's, else 1.0")
    p.add_argument("--min-p", type=float, default=None, help="default: the model's, else 0.0")
    p.add_argument("--typical-p", type=float, default=None, help="default: the model's, else 1.0")
    p.add_argument("--repetition-penalty", type=float, default=None, help="default: the model's, else 1.0")
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--no-repeat-ngram-size", type=int, default=0)
    # Repeatable flags of one value each (--stop A --stop B): a list-valued flag would swallow the prompt.
    p.add_argument("--logit-bias", action="append", metavar="ID=BIAS", help="repeat for more tokens")
    p.add_argument("--stop", action="append", help="a stop string (repeat for more)")
    p.add_argument("--stop-token-ids", action="append", type=int, metavar="ID", help="a stop token (repeat)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS if chat else "samples per prompt")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--truncate-prompt", action="store_true",
                   help=argparse.SUPPRESS if chat else "keep the end of a prompt longer than the context")
    p.add_argument("--json-schema", default=None, help="constrain to a JSON Schema (a file or inline JSON)")
    p.add_argument("--regex", default=None, help="constrain to a regular expression")
    p.add_argument("--choice", action="append", default=None,
                   help="constrain to one of the strings given (repeat: --choice yes --choice no)")
    p.add_argument("--grammar", default=None, help="constrain to a Lark grammar (a file)")


def _quantize(args: argparse.Namespace) -> None:
    from lmstack.checkpoints import load_tokenizer, parse_dtype
    from lmstack.quantize import model_bytes, quantize_model, save_quantized

    _at_least(args.eval_chars, 1, "--eval-chars")
    if args.bits == "8" and args.group_size is not None:
        raise LMStackError("--group-size applies to --bits 4 and nf4; int8 has one scale per output channel")
    _check_model(args.model)
    _check_output(args.model, args.output, "--output")
    _refuse_quantized(Path(args.model), "quantize it again", "quantize the model it was quantized from")
    model = _load_lm(args.model, "--model", "lmstack quantize", dtype="float32")
    tokenizer = load_tokenizer(args.model)
    before = model_bytes(model)
    text = None
    if args.eval_data:
        from lmstack.data.readers import iter_texts
        from lmstack.evaluate import perplexity

        text = "\n\n".join(iter_texts(args.eval_data))[: args.eval_chars]
        ppl_before = perplexity(model, tokenizer, text, stride=args.stride).perplexity
    bits = args.bits if args.bits == "nf4" else int(args.bits)
    quantize_model(model, bits=bits, group_size=args.group_size, dtype=parse_dtype(args.compute_dtype))
    save_quantized(model, args.output, tokenizer=tokenizer)
    after = model_bytes(model)
    kind = "NF4" if bits == "nf4" else f"int{bits}"
    # The model was loaded in float32 (whatever the checkpoint stores): both sizes are of it in memory, and
    # the layers left unquantized (embeddings, norms, a tied head) stay float32.
    print(f"wrote {args.output}: {kind} weights, {before / 1e6:,.1f} MB in float32 -> {after / 1e6:,.1f} MB "
          f"({after / before:.0%}; embeddings and norms stay float32)")
    if text is not None:
        ppl_after = perplexity(model, tokenizer, text, stride=args.stride).perplexity
        print(f"perplexity on {len(text):,} characters: {ppl_before:.3f} -> {ppl_after:.3f} "
              f"({(ppl_after / ppl_before - 1):+.2%})")


def _eval_text(args: argparse.Namespace) -> None:
    from lmstack.evaluate import bleu, rouge
    from lmstack.evaluate.text_metrics import read_lines

    predictions = read_lines(args.predictions)
    references = [read_lines(r) for r in args.references]
    for path, lines in zip(args.references, references):
        if len(lines) != len(predictions):
            raise LMStackError(f"{args.predictions} has {len(predictions)} lines but {path} has {len(lines)}: "
                               "one reference per prediction, line by line")
    if args.eval_verb == "rouge":
        if len(references) != 1:
            raise LMStackError("ROUGE takes one reference file")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = rouge(predictions, references[0], use_stemmer=args.stemmer, tokenizer=args.tokenizer)
        for warning in caught:
            print(f"note: {warning.message}".replace("tokenizer='whitespace' or 'char'",
                                                     "--tokenizer whitespace or char"), file=sys.stderr)
    else:
        result = bleu(predictions, references)
    print(json.dumps(result, indent=2))


def _compare(args: argparse.Namespace) -> None:
    from lmstack.evaluate.compare import compare

    compare(args.data, args.output, vocab_size=args.vocab_size, steps=args.steps, progress=sys.stderr.isatty(),
            orders=tuple(args.orders))
    print((Path(args.output) / "compare.md").read_text(), end="")
    print(f"table: {Path(args.output) / 'compare.md'}; plot: {Path(args.output) / 'compare.png'}")


def _checkpoint_info(path: Path) -> dict[str, Any]:
    """Parameter counts and config of a checkpoint directory or GGUF file, from its config alone."""
    from lmstack.checkpoints.hf import config_from_hf, read_hf_config
    from lmstack.config import ModelConfig

    raw: dict[str, Any] = {}
    if is_gguf(path):
        from lmstack.checkpoints.gguf import read_gguf_config

        config = read_gguf_config(path)  # the metadata: a quantized file is not dequantized to count it
    elif (raw := read_hf_config(path)).get("lmstack_config"):  # lmstack-native or quantized checkpoints
        config = ModelConfig.from_dict(raw["lmstack_config"])
    else:
        config = config_from_hf(path)
    import torch

    from lmstack.models import build_model

    labels = None
    if path.is_dir() and any(a.endswith("ForSequenceClassification") for a in raw.get("architectures") or []):
        from lmstack.models.classifier import _labels_from_hf

        labels = _labels_from_hf(raw, path)
    with torch.device("meta"):
        model = build_model(config)
    head_change = 0
    if labels is not None:  # a score head over the labels in place of the vocabulary-sized LM head
        head_change = len(labels) * config.n_embd - (0 if config.tie_embeddings else config.vocab_size * config.n_embd)
    info: dict[str, Any] = {"parameters": model.num_params() + head_change,
                            "non_embedding_parameters": model.num_params(non_embedding=True) + head_change,
                            "config": config.to_dict()}
    if labels is not None:
        info["labels"] = labels
    if raw.get("quantization_config"):  # lmstack quantize's: bits, group size, compute dtype
        info["quantization"] = raw["quantization_config"]
    return info


def _adapter_info(path: Path) -> dict[str, Any]:
    """A PEFT adapter directory: its settings, its own parameter count (from the file's header, no tensor
    read) and, where the base model is on this machine, the base's info."""
    from safetensors import safe_open

    from lmstack.train.lora import adapter_config

    cfg = adapter_config(path)
    keys = ("peft_type", "task_type", "r", "lora_alpha", "target_modules", "use_rslora", "rank_pattern",
            "alpha_pattern", "layers_to_transform", "modules_to_save", "base_model_name_or_path")
    file = path / "adapter_model.safetensors"
    if not file.exists():
        raise LMStackError(f"{path}: no adapter_model.safetensors")
    with safe_open(str(file), framework="pt") as f:
        count = sum(math.prod(f.get_slice(key).get_shape()) for key in list(f.keys()))
    info: dict[str, Any] = {"adapter": {k: cfg.get(k) for k in keys if k in cfg}, "adapter_parameters": count}
    base = cfg.get("base_model_name_or_path")
    info["base"] = _checkpoint_info(Path(base)) if base and Path(base).exists() else None
    return info


def _info(args: argparse.Namespace) -> None:
    path = Path(args.model)
    _check_model(path, "info")
    if path.is_dir() and (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        info = _adapter_info(path)
    else:
        info = _checkpoint_info(path)
    print(json.dumps(info, indent=2))


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other error of the CLI (subcommands inherit it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lmstack", description="The language-model stack on PyTorch.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    verbs = parser.add_subparsers(dest="verb", required=True)

    tok = verbs.add_parser("tokenizer", help="train and use BPE tokenizers")
    tok_verbs = tok.add_subparsers(dest="tokenizer_verb", required=True)
    train = tok_verbs.add_parser("train", help="learn a byte-level BPE from text / JSONL files")
    train.add_argument("--input", nargs="+", action="extend", required=True, help="text files, or JSONL with a text field")
    train.add_argument("--output", required=True, help="directory for tokenizer.json + tokenizer_config.json")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    train.add_argument("--on-bad-record", default="fail", choices=["fail", "skip"])
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
    # No defaults here: either flag given with the other kind of destination is refused, even at its default.
    conv.add_argument("--max-shard-size", default=None, help="largest shard of a Hugging Face directory (default 5GB)")
    conv.add_argument("--gguf-type", default=None, choices=["f32", "f16", "q8_0"],
                      help="tensor type of the 2-D weights when writing a .gguf file (default f32)")
    conv.set_defaults(func=_convert)

    data = verbs.add_parser("data", help="prepare corpora")
    data_verbs = data.add_subparsers(dest="data_verb", required=True)
    prep = data_verbs.add_parser("prepare", help="tokenize text / JSONL / Parquet into token shards")
    prep.add_argument("--input", nargs="+", action="extend", required=True)
    prep.add_argument("--tokenizer", required=True, help="a tokenizer path, or 'char' for characters")
    prep.add_argument("--output", required=True, help="shard directory to write")
    prep.add_argument("--text-field", default="text")
    prep.add_argument("--val-fraction", type=float, default=0.1)
    prep.add_argument("--split", default="tail", choices=["tail", "hash"],
                      help="tail: last tokens are validation; hash: whole documents by hash")
    prep.add_argument("--workers", type=int, default=None)
    prep.add_argument("--on-bad-record", default="fail", choices=["fail", "skip"])
    prep.add_argument("--parse-special-tokens", action="store_true",
                      help="read special-token strings in the text (<|endoftext|>) as the tokens, not as text")
    prep.set_defaults(func=_data_prepare)

    pre = verbs.add_parser("pretrain", help="train a model on token shards (any setting as --key value)",
                           description="Train a model on token shards. Any TrainConfig field (lmstack/train/"
                                       "config.py) is also a flag: --key value, --model.FIELD value.")
    pre.add_argument("--config", help="a YAML recipe")
    pre.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    pre.set_defaults(func=_pretrain, takes_overrides=True)

    from lmstack.train.config import TASKS

    fine = verbs.add_parser("finetune", help="finetune or align a checkpoint: sft, classify, reward, dpo, ipo, "
                            "kto, orpo, simpo, grpo (any setting as --key value)")
    fine.add_argument("task", choices=[t for t in TASKS if t != "pretrain"])
    fine.add_argument("--config", help="a YAML recipe")
    fine.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    fine.set_defaults(func=_pretrain, takes_overrides=True)

    gen = verbs.add_parser("generate", help="continue a prompt (streams the text)")
    gen.add_argument("prompt")
    _add_sampling_flags(gen)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat template)")
    gen.add_argument("--num-beams", type=int, default=1, help="> 1: beam search")
    gen.add_argument("--length-penalty", type=float, default=None,
                     help="beam search: a finished beam scores its log-probability / length ** this (default 1)")
    gen.add_argument("--logprobs", type=int, default=None, metavar="K",
                     help="print each token's log-probability and its K most likely alternatives")
    gen.add_argument("--no-stream", action="store_true")
    gen.add_argument("--speculative", default=None, metavar="DRAFT",
                     help="speculative decoding with a draft model directory, or 'prompt_lookup'")
    gen.add_argument("--draft-k", type=int, default=None, help="tokens drafted per target pass (default 4)")
    gen.set_defaults(func=_generate)

    chat = verbs.add_parser("chat", help="interactive chat with streaming (/reset, /system TEXT, /quit)")
    _add_sampling_flags(chat, chat=True)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.set_defaults(func=_chat)

    ev = verbs.add_parser("eval", help="evaluate a model")
    ev_verbs = ev.add_subparsers(dest="eval_verb", required=True)
    ppl = ev_verbs.add_parser("perplexity", help="sliding-window perplexity and bits per byte of a text")
    ppl.add_argument("--model", required=True, help="checkpoint directory or .gguf file")
    ppl.add_argument("--data", nargs="+", action="extend", required=True, help="text or JSONL files")
    ppl.add_argument("--tokenizer", default=None, help="default: the model's own")
    ppl.add_argument("--text-field", default="text")
    ppl.add_argument("--on-bad-record", default="fail", choices=["fail", "skip"])
    ppl.add_argument("--max-length", type=int, default=None, help="window in tokens (default: the context)")
    ppl.add_argument("--stride", type=int, default=None, help="default: half the window")
    ppl.add_argument("--max-chars", type=int, default=None, help="score only the first N characters")
    ppl.add_argument("--device", default=None)
    ppl.set_defaults(func=_eval_perplexity)

    cls = ev_verbs.add_parser("classify", help="accuracy, precision/recall/F1 and confusion matrix of a "
                              "classifier, or of a language model answering with one of the labels")
    cls.add_argument("--model", required=True, help="a classifier checkpoint, or a language model")
    cls.add_argument("--data", required=True, help='JSONL records {"text": ..., "label": ...}')
    cls.add_argument("--labels", default=None, help="comma-separated label set (default: the classifier's, "
                     "or the data's)")
    cls.add_argument("--prompt", default="{text}\nLabel: ", help="language models: the prompt, with {text}")
    cls.add_argument("--chat", action="store_true", help="language models: send the prompt as a chat turn")
    cls.add_argument("--batch-size", type=int, default=16, help="texts per forward pass (>= 1)")
    cls.add_argument("--output", default=None, help="also write the metrics as JSON")
    cls.add_argument("--device", default=None)
    cls.set_defaults(func=_eval_classify)

    for name, what in (("rouge", "ROUGE-1/2/L/Lsum (rouge-score)"), ("bleu", "corpus BLEU (sacrebleu)")):
        metric = ev_verbs.add_parser(name, help=f"{what} of predictions against references, one per line")
        metric.add_argument("--predictions", required=True, help="text (one per line) or JSONL of strings")
        metric.add_argument("--references", required=True, nargs="+", action="extend", help="one file per reference set")
        if name == "rouge":
            metric.add_argument("--stemmer", action="store_true", help="Porter-stem words first")
            metric.add_argument("--tokenizer", default="default", choices=["default", "whitespace", "char"],
                                help="default: rouge-score's (ASCII letters and digits); whitespace: words of "
                                "any script; char: each character (Chinese, Japanese)")
        metric.set_defaults(func=_eval_text)

    plot = verbs.add_parser("plot", help="draw a run's loss curves to RUN_DIR/loss.png")
    plot.add_argument("run_dir")
    plot.add_argument("--output", default=None, help="an image file (.png, .pdf or .svg), or a directory "
                      "to write loss.png in (default: RUN_DIR/loss.png)")
    plot.set_defaults(func=_plot)

    quant = verbs.add_parser("quantize", help="weight-only int8 / int4 quantization of a checkpoint")
    quant.add_argument("--model", required=True)
    quant.add_argument("--output", required=True)
    quant.add_argument("--bits", default="8", choices=["8", "4", "nf4"], help="int8, int4, or 4-bit NormalFloat")
    quant.add_argument("--group-size", type=int, default=None,
                       help="weights per scale for int4 (default: the largest power of two up to 128 that "
                            "divides every layer's inputs) and nf4 (default 64)")
    quant.add_argument("--compute-dtype", default="bfloat16", help="dtype of scales and activations")
    quant.add_argument("--eval-data", nargs="*", action="extend", default=None, help="text to report the perplexity change on")
    quant.add_argument("--eval-chars", type=int, default=100_000)
    quant.add_argument("--stride", type=int, default=None)
    quant.set_defaults(func=_quantize)

    comp = verbs.add_parser("compare", help="n-grams vs RNN vs LSTM vs Transformer in bits per byte")
    comp.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "data" / "tinyshakespeare.txt"))
    comp.add_argument("--output", default="runs/compare")
    comp.add_argument("--vocab-size", type=int, default=2048)
    comp.add_argument("--steps", type=int, default=600, help="training steps of each neural model")
    comp.add_argument("--orders", type=int, nargs="+", default=[2, 3, 4, 5])
    comp.set_defaults(func=_compare)

    info = verbs.add_parser("info", help="print a checkpoint's config and parameter count")
    info.add_argument("model")
    info.set_defaults(func=_info)
    _name_verbs(parser)
    return parser


def _name_verbs(parser: argparse.ArgumentParser) -> None:
    """Let a missing verb's error list the verbs ({classify,perplexity,...}), not name its internal dest."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            action.metavar = "{" + ",".join(action.choices) + "}"
            for sub in action.choices.values():
                _name_verbs(sub)


def _parser_of(parser: argparse.ArgumentParser, func) -> argparse.ArgumentParser | None:
    """The (sub)parser whose verb runs `func`, so a usage error names that verb's own help."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found = _parser_of(sub, func)
                if found is not None:
                    return found
    return parser if parser.get_default("func") is func else None


def _output_gone() -> bool:
    """Whether standard output's reader has closed it (a pipe's write end then polls as an error); if so it
    is pointed at /dev/null, so that the flush at exit does not fail again."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # a captured stream: a broken pipe came from somewhere else
        return False
    try:
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        gone = any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, AttributeError):  # no poll() here: take the error for the output's
        gone = True
    if gone:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    return gone


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_overrides", False):  # exits 2, naming the verb's help
        (_parser_of(parser, args.func) or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if getattr(args, "takes_overrides", False):
            args.func(args, extra)
        else:
            args.func(args)
    except (LMStackError, OSError) as e:  # bad input, a missing or unreadable file: one line, no traceback
        if isinstance(e, BrokenPipeError) and not args.debug and _output_gone():
            return 141  # the reader went away (`| head`): quiet, with the status a shell gives a SIGPIPE'd tool
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except UnicodeDecodeError as e:  # a last resort: a file read as text that is not UTF-8
        if args.debug:
            raise
        print(f"error: a file read as text is not UTF-8 ({e.reason} at byte {e.start}): is it the file or "
              "directory the command expects? (--debug shows where)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
