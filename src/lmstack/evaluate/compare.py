"""`lmstack compare`: n-grams, an Elman RNN, an LSTM and a small Transformer on one corpus and one tokenizer.

Every model is scored on the same held-out text in bits per byte (negative log-likelihood over the UTF-8 bytes
it covers), so the rungs of the ladder, from counts to recurrence to attention, compare directly. The neural
models train with the one training loop; the table and a plot are written to the output directory.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

from lmstack.data.readers import iter_texts
from lmstack.data.shards import TokenShards, prepare_shards
from lmstack.errors import LMStackError
from lmstack.evaluate.perplexity import perplexity, scored_span
from lmstack.models.ngram import NGramLM
from lmstack.tokenizer import Tokenizer

NEURAL = {  # model_overrides of each neural model (similar sizes, the same training budget)
    "rnn": {"arch": "rnn", "n_embd": 256, "n_layer": 1, "dropout": 0.1},
    "lstm": {"arch": "lstm", "n_embd": 256, "n_layer": 1, "dropout": 0.1},
    "transformer": {"n_layer": 4, "n_embd": 128, "n_head": 4, "n_kv_head": 2, "intermediate_size": 352,
                    "dropout": 0.1},
}
NAMES = {"rnn": "Elman RNN", "lstm": "LSTM", "transformer": "Transformer (Llama-style)"}


def compare(corpus: str | Path, out_dir: str | Path, vocab_size: int = 2048, orders: tuple[int, ...] = (2, 3, 4, 5),
            steps: int = 600, block_size: int = 128, batch_size: int = 16, progress: bool = False,
            max_val_chars: int | None = None) -> list[dict[str, Any]]:
    """Train and score every model; returns the rows of the table (also written to compare.md)."""
    # Everything is checked before anything is written: not after the data is prepared and models trained.
    if not orders or min(orders) < 1:
        raise LMStackError(f"orders {list(orders)}: n-gram orders must be >= 1")
    for name, value in (("steps", steps), ("block_size", block_size), ("batch_size", batch_size)):
        if value < 1:
            raise LMStackError(f"{name} must be >= 1, got {value}")
    from lmstack.checkpoints import load_model
    from lmstack.train.config import TrainConfig
    from lmstack.train.loop import pretrain

    out = Path(out_dir)
    marker = out / ".lmstack-compare"  # what compare writes it may replace; nothing else in `out`
    if out.exists() and not out.is_dir():
        raise LMStackError(f"--output {out}: a file; compare writes a directory (compare.md, compare.png, ...)")
    if out.is_dir() and any(out.iterdir()) and not marker.exists():
        raise LMStackError(f"--output {out}: not empty and not an earlier `lmstack compare` output, whose files "
                           "(train.txt, shards/, rnn/, ...) compare would replace; pass a new or empty directory")
    if Path(corpus).resolve().is_relative_to(out.resolve()):
        raise LMStackError(f"--data {corpus}: lies inside --output {out}, which compare rewrites; move it out")
    # Held out by characters, before anything is tokenized: the tokenizer, the counts and the training runs
    # see the first 90% only (a split of the token stream would not fall where the text is cut), and every
    # model is scored on the same last 10%. JSONL and Parquet records are read by their text field.
    text = "\n\n".join(iter_texts([corpus]))
    if not text.strip():
        raise LMStackError(f"--data {corpus}: no text")
    cut = int(len(text) * 0.9)
    tok = Tokenizer.train([text[:cut]], vocab_size=vocab_size)
    n_train, n_val = (len(tok.encode(t, add_special_tokens=False)) + (tok.eos_token_id is not None)
                      for t in (text[:cut], text[cut:]))
    for split, n in (("first 90%", n_train), ("last 10%", n_val)):  # before any file is written
        if n <= block_size:
            raise LMStackError(f"--data {corpus}: its {split} is {n:,} tokens, fewer than the neural models' "
                               f"context + 1 ({block_size + 1}); give a larger corpus")
    out.mkdir(parents=True, exist_ok=True)
    marker.touch()
    for name in ("shards", *NEURAL):  # compare's own outputs of an earlier call: it starts from nothing
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "train.txt").write_text(text[:cut], encoding="utf-8")
    (out / "val.txt").write_text(text[cut:], encoding="utf-8")
    # The shards' validation split is exactly the held-out text (each file a document, eos after it), so the
    # neural runs monitor the loss that is reported, and everything trains on the whole first 90%.
    prepare_shards([out / "train.txt", out / "val.txt"], tok, out / "shards", progress=False, workers=1,
                   val_fraction=(n_val - 0.5) / (n_train + n_val))  # int(total * (1 - f)) = n_train
    shards = TokenShards(out / "shards")
    val_text = text[cut:][:max_val_chars]
    val_ids, _, n_bytes = scored_span(tok, val_text)
    rows = []
    for order in orders:
        t0 = time.perf_counter()
        model = NGramLM(order, tok.vocab_size).fit([shards["train"]])
        seconds = time.perf_counter() - t0
        nll = -sum(model.logprob(val_ids[i], val_ids[max(0, i - order + 1):i]) for i in range(1, len(val_ids)))
        rows.append({"model": f"{order}-gram (modified Kneser-Ney)", "parameters": sum(map(len, model.logp)),
                     "train_seconds": seconds, "bits_per_byte": nll / math.log(2) / n_bytes,
                     "perplexity": math.exp(nll / (len(val_ids) - 1))})
    for name, overrides in NEURAL.items():
        cfg = TrainConfig(data=str(out / "shards"), out_dir=str(out / name), model="tiny-llama",
                          model_overrides=overrides, batch_size=batch_size, block_size=block_size,
                          max_steps=steps, learning_rate=3e-3, min_lr=3e-4, warmup_steps=max(1, steps // 20),
                          eval_interval=max(1, steps // 4), eval_batches=10, checkpoint_interval=steps,
                          keep_checkpoints=1, progress=progress, log_interval=max(1, steps // 20))
        t0 = time.perf_counter()
        summary = pretrain(cfg)
        seconds = time.perf_counter() - t0
        model = load_model(summary["checkpoint"])
        r = perplexity(model, tok, val_text, stride=block_size // 2)
        rows.append({"model": NAMES[name], "parameters": model.num_params(), "train_seconds": seconds,
                     "bits_per_byte": r.bits_per_byte, "perplexity": r.perplexity})
    _write(rows, out, vocab_size, steps)
    return rows


def _write(rows: list[dict[str, Any]], out: Path, vocab_size: int, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [f"Validation: the last 10% of the corpus's characters, which no model (nor the tokenizer) saw; "
             f"byte-level BPE of {vocab_size} tokens; neural models "
             f"{steps} steps.", "",
             "| model | parameters / n-grams | train time (s) | bits per byte | perplexity (per token) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['parameters']:,} | {r['train_seconds']:.1f} | {r['bits_per_byte']:.3f} | "
              f"{r['perplexity']:.1f} |" for r in rows]
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    names = [r["model"].replace(" (modified Kneser-Ney)", "").replace(" (Llama-style)", "") for r in rows]
    bars = ax.bar(names, [r["bits_per_byte"] for r in rows], color="#4c72b0")
    for bar, r in zip(bars, rows):
        ax.annotate(f"{r['bits_per_byte']:.2f}\n{r['train_seconds']:.0f}s",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, max(r["bits_per_byte"] for r in rows) * 1.18)  # room for the labels
    ax.set_ylabel("validation bits per byte (lower is better)")
    ax.set_title("From counts to attention: one corpus, one tokenizer")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(out / "compare.png")
    plt.close(fig)
