"""Count-based n-gram language models over integer tokens (word ids or BPE ids).

Smoothing: add-k (Laplace at k = 1), stupid backoff (scores, not probabilities), interpolated Kneser-Ney with
one fixed discount (the formulation NLTK's `KneserNeyInterpolated` uses: continuation counts below the top
order, ending at the continuation unigram; a word never seen gets a 1/V floor where NLTK gives 0), and interpolated modified Kneser-Ney (Chen and Goodman: three
discounts per order from the count-of-counts, interpolated down to a uniform distribution), which is the default.
Counting is vectorised with numpy; an interpolated model exports to and imports from ARPA, where it becomes
the equivalent backoff model (probabilities of seen n-grams plus backoff weights), as KenLM writes it.

Unknown tokens: ids >= `vocab_size` are mapped to `unk_id`; the uniform floor gives every id in the
vocabulary, `<unk>` included, probability mass, so no token ever has probability zero. Sentence starts:
`bos_id` (`<s>`) is context only, as in KenLM and SRILM: a model fitted with it never predicts `<s>` (log10
probability -99, KenLM's value, and no share of the floor), so sampling never draws it and `perplexity` skips it.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from lmstack.errors import LMStackError

SMOOTHINGS = ("modified_kneser_ney", "kneser_ney", "add_k", "stupid_backoff")
NO_MASS = -100.0  # the log10 probability ARPA writers (KenLM) give a token the model never predicts
BOS_LOG10 = -99.0  # KenLM's log10 probability of `<s>`, which is context only
Gram = tuple[int, ...]


def word_sequences(texts: Iterable[str], vocab: dict[str, int] | None = None, order: int = 1,
                   lowercase: bool = True) -> tuple[list[list[int]], dict[str, int]]:
    """Word-level sequences: each line of each text becomes `<s>`*(order-1) + words + `</s>`; words outside a
    given `vocab` map to `<unk>`. Returns (id sequences, vocab); a new vocab is built when none is given."""
    lines = [line.lower().split() if lowercase else line.split()
             for text in texts for line in text.splitlines() if line.strip()]
    if vocab is None:
        vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *sorted({w for ws in lines for w in ws})])}
    unk = vocab["<unk>"]
    pad = [vocab["<s>"]] * max(order - 1, 1)
    return [pad + [vocab.get(w, unk) for w in ws] + [vocab["</s>"]] for ws in lines], vocab


def count_ngrams(sequences: Iterable[np.ndarray], order: int) -> list[dict[Gram, int]]:
    """counts[k-1][gram] for every gram of length k = 1..order inside each sequence (vectorised per sequence)."""
    per_order: list[list[np.ndarray]] = [[] for _ in range(order)]
    for seq in sequences:
        for k in range(1, order + 1):
            if len(seq) >= k:
                per_order[k - 1].append(np.lib.stride_tricks.sliding_window_view(seq, k))
    counts = []
    for k in range(1, order + 1):
        if not per_order[k - 1]:
            counts.append({})
            continue
        windows = np.concatenate(per_order[k - 1])
        grams, n = np.unique(windows, axis=0, return_counts=True)
        counts.append(dict(zip(map(tuple, grams.tolist()), n.tolist())))
    return counts


class NGramLM:
    """An n-gram model of `order` over ids 0..vocab_size-1."""

    def __init__(self, order: int, vocab_size: int, smoothing: str = "modified_kneser_ney", k: float = 1.0,
                 discount: float = 0.1, backoff_factor: float = 0.4, unk_id: int | None = None,
                 bos_id: int | None = None) -> None:
        if order < 1:
            raise LMStackError(f"order={order}: must be >= 1")
        if smoothing not in SMOOTHINGS:
            raise LMStackError(f"smoothing {smoothing!r}: choose from {list(SMOOTHINGS)}")
        if vocab_size < 1:
            raise LMStackError(f"vocab_size={vocab_size}: must be >= 1")
        self.order, self.vocab_size, self.smoothing = order, vocab_size, smoothing
        self.k, self.discount, self.backoff_factor, self.unk_id = k, discount, backoff_factor, unk_id
        self.bos_id = bos_id
        self.context_only_id: int | None = None  # `bos_id` as it was at `fit`: the id the tables never predict
        self.followed: dict[Gram, int] = {}  # add-k: c(h, .) per history
        self.counts: list[dict[Gram, int]] = []
        # Interpolated models are stored as ARPA tables: log10 probability and log10 backoff per seen gram.
        self.logp: list[dict[Gram, float]] = []
        self.backoff: list[dict[Gram, float]] = []

    # ------------------------------------------------------------------------------------------ training

    def fit(self, sequences: Iterable[Sequence[int]]) -> NGramLM:
        """Count every sequence (pad them yourself, e.g. with bos/eos, if sentence edges should count)."""
        arrays = [self._ids(s) for s in sequences]
        if not arrays or sum(len(a) for a in arrays) == 0:
            raise LMStackError("empty training text: nothing to count")
        self.counts = count_ngrams(arrays, self.order)
        bos = self.bos_id if self.bos_id is not None and 0 <= self.bos_id < self.vocab_size else None
        self.context_only_id = bos
        # `<s>` is context only: the grams that predict it are left out of every estimate, not of the histories
        predicted = [{g: c for g, c in table.items() if g[-1] != bos} for table in self.counts]
        if not predicted[0]:
            raise LMStackError("nothing to count: the training text holds only the sentence-start token")
        self.total = sum(predicted[0].values())
        if self.smoothing == "add_k":
            # add-k divides by c(h, .), how often a history is followed by a token; c(h) would count a
            # history that ends a sequence too, and the distribution after it would sum to less than 1
            self.followed = defaultdict(int)
            for table in predicted[1:]:
                for gram, c in table.items():
                    self.followed[gram[:-1]] += c
        if self.smoothing in ("modified_kneser_ney", "kneser_ney"):
            self._build_interpolated(predicted)
        return self

    def _ids(self, seq: Sequence[int]) -> np.ndarray:
        a = np.asarray(seq, dtype=np.int64)
        if len(a) and (a.min() < 0 or a.max() >= self.vocab_size):
            if self.unk_id is None:
                raise LMStackError(f"token id {int(a.max())} is outside the vocabulary of {self.vocab_size} "
                                   "(give unk_id to map unknown ids)")
            a = np.where((a < 0) | (a >= self.vocab_size), self.unk_id, a)
        return a

    def _build_interpolated(self, counts: list[dict[Gram, int]]) -> None:
        n = self.order
        # Effective counts: raw at the top order, continuation counts (distinct left neighbours) below.
        eff: list[dict[Gram, int]] = [dict() for _ in range(n)]
        eff[n - 1] = counts[n - 1]
        for k in range(n - 1, 0, -1):
            cont: dict[Gram, int] = defaultdict(int)
            for gram in counts[k]:
                cont[gram[1:]] += 1
            eff[k - 1] = dict(cont)
        modified = self.smoothing == "modified_kneser_ney"
        self.logp = [dict() for _ in range(n)]
        self.backoff = [dict() for _ in range(n)]
        lower: dict[Gram, float] | None = None  # probabilities of the order below, for seen grams
        for k in range(1, n + 1):
            counts = eff[k - 1]
            d = self._discounts(counts) if modified else (self.discount, self.discount, self.discount)
            totals: dict[Gram, int] = defaultdict(int)
            followers: dict[Gram, list[int]] = defaultdict(lambda: [0, 0, 0])
            for gram, c in counts.items():
                h = gram[:-1]
                totals[h] += c
                followers[h][min(c, 3) - 1] += 1
            gamma = {h: (d[0] * f[0] + d[1] * f[1] + d[2] * f[2]) / totals[h] for h, f in followers.items()}
            probs: dict[Gram, float] = {}
            for gram, c in counts.items():
                h = gram[:-1]
                alpha = max(c - d[min(c, 3) - 1], 0.0) / totals[h]
                if k == 1:
                    # modified KN mixes in the uniform distribution; fixed-discount KN (as NLTK) ends at the
                    # undiscounted continuation unigram
                    below = self._uniform()
                    if not modified:
                        alpha, gamma[h] = c / totals[h], 0.0
                else:
                    below = self._lower_prob(gram[1:], lower, k - 1)
                probs[gram] = alpha + gamma[h] * below
            self.logp[k - 1] = {g: math.log10(p) for g, p in probs.items()}
            if k > 1:
                self.backoff[k - 2] = {h: math.log10(g) for h, g in gamma.items() if g > 0}
            else:
                self.uniform_backoff = gamma.get((), 1.0)
            lower = probs
        # ARPA lists the history of every n-gram (with its backoff weight) among the (n-1)-grams. Below the
        # top order the counts are continuation counts, so a history never seen after anything (`<s> <s>`)
        # has no entry of its own: give it its interpolated probability, as KenLM does. Top down, so that
        # an added history's own history is added too.
        for k in range(n, 1, -1):
            for h in {g[:-1] for g in self.logp[k - 1]} | self.backoff[k - 2].keys():
                if h not in self.logp[k - 2]:
                    self.logp[k - 2][h] = self._log10(h[-1], h[:-1], k - 1)

    def _predictable(self) -> int:
        """How many ids the model predicts: the vocabulary, less `<s>` when it is context only."""
        return max(self.vocab_size - (self.context_only_id is not None), 1)

    def _uniform(self) -> float:
        return 1.0 / self._predictable()

    def _lower_prob(self, gram: Gram, lower: dict[Gram, float], k: int) -> float:
        if gram in lower:
            return lower[gram]
        return 10 ** self._log10(gram[-1], gram[:-1], k)

    @staticmethod
    def _discounts(counts: dict[Gram, int]) -> tuple[float, float, float]:
        n = np.bincount(np.fromiter(counts.values(), dtype=np.int64), minlength=5)[1:5].astype(float)
        n = np.maximum(n, 1.0)
        y = n[0] / (n[0] + 2 * n[1])
        return (max(1 - 2 * y * n[1] / n[0], 0.0), max(2 - 3 * y * n[2] / n[1], 0.0),
                max(3 - 4 * y * n[3] / n[2], 0.0))

    # ------------------------------------------------------------------------------------------ scoring

    def _log10(self, word: int, context: Gram, k: int | None = None) -> float:
        """log10 P(word | context) from the ARPA tables, using the last k-1 context tokens."""
        k = min(k or self.order, len(context) + 1)
        context = context[len(context) - (k - 1):] if k > 1 else ()
        gram = (*context, word)
        if gram in self.logp[k - 1]:
            return self.logp[k - 1][gram]
        if word == self.context_only_id:
            return BOS_LOG10
        if k == 1:  # a word never seen: the uniform floor's share (fixed-discount KN: a 1/V floor, unnormalised)
            return math.log10(self.uniform_backoff * self._uniform()) if self.smoothing == "modified_kneser_ney" \
                else math.log10(self._uniform())
        return self.backoff[k - 2].get(context, 0.0) + self._log10(word, context[1:], k - 1)

    def logprob(self, word: int, context: Sequence[int] = ()) -> float:
        """Natural-log probability (stupid backoff: log score) of `word` after `context`."""
        word = int(self._ids([word])[0])
        context = tuple(int(t) for t in self._ids(context)) if len(context) else ()
        if not self.counts:
            raise LMStackError("the model has not been trained (call fit) or loaded")
        if self.smoothing in ("modified_kneser_ney", "kneser_ney"):
            return self._log10(word, context) * math.log(10)
        if word == self.context_only_id:
            return BOS_LOG10 * math.log(10)
        context = context[len(context) - min(len(context), self.order - 1):]
        if self.smoothing == "add_k":
            k = len(context) + 1
            c = self.counts[k - 1].get((*context, word), 0)
            h = self.followed.get(context, 0) if k > 1 else self.total
            return math.log((c + self.k) / (h + self.k * self._predictable()))
        penalty = 0.0  # stupid backoff (Brants et al. 2007)
        while context:
            c = self.counts[len(context)].get((*context, word), 0)
            if c:
                return penalty + math.log(c / self.counts[len(context) - 1][context])
            context, penalty = context[1:], penalty + math.log(self.backoff_factor)
        return penalty + math.log(max(self.counts[0].get((word,), 0), 1e-9) / self.total)

    def perplexity(self, sequences: Iterable[Sequence[int]]) -> float:
        """exp(mean negative log-probability) of every token of each sequence but the first, with up to
        order-1 tokens of context; `bos_id` tokens are context only (the `<s>` padding of `word_sequences`:
        the words and `</s>` are scored, as KenLM and SRILM score a sentence)."""
        nll, n = 0.0, 0
        for seq in sequences:
            seq = [int(t) for t in seq]
            for i in range(1, len(seq)):
                if seq[i] == self.bos_id:
                    continue
                nll -= self.logprob(seq[i], seq[max(0, i - self.order + 1):i])
                n += 1
        if n == 0:
            raise LMStackError("nothing to score: sequences need at least two tokens")
        return math.exp(nll / n)

    def distribution(self, context: Sequence[int]) -> np.ndarray:
        """P(. | context) over the whole vocabulary (normalised; stupid-backoff scores renormalised)."""
        logp = np.array([self.logprob(w, context) for w in range(self.vocab_size)])
        p = np.exp(logp - logp.max())
        return p / p.sum()

    def sample(self, context: Sequence[int], n: int, rng: np.random.Generator | None = None,
               stop: int | None = None) -> list[int]:
        """Up to `n` ids drawn one by one after `context`, ending early after `stop` (such as `</s>`'s id),
        which is included."""
        rng = rng or np.random.default_rng()
        out = list(context)
        for _ in range(n):
            out.append(int(rng.choice(self.vocab_size, p=self.distribution(out[-(self.order - 1):] if
                                                                          self.order > 1 else []))))
            if out[-1] == stop:
                break
        return out[len(context):]

    # ------------------------------------------------------------------------------------------ ARPA

    def to_arpa(self, path: str | os.PathLike, words: Sequence[str] | None = None) -> None:
        """Write the model in ARPA format (interpolated Kneser-Ney models only); `words[id]` names each id.

        Every id of the vocabulary is a unigram, those never seen at the floor's share `logprob` gives them, so
        that the unigrams sum to 1 for any ARPA reader; ARPA's `<unk>`, which KenLM and SRILM expect, is added
        at -100 (no mass) when no id is named so."""
        if not self.logp:
            raise LMStackError("ARPA export needs a Kneser-Ney model")
        name = (lambda i: words[i]) if words is not None else str
        unigrams = dict(self.logp[0])
        unigrams.update({(i,): self._log10(i, ()) for i in range(self.vocab_size) if (i,) not in unigrams})
        tables = [unigrams, *self.logp[1:]]
        unk = [] if words is not None and "<unk>" in words else [f"{NO_MASS:.7f}\t<unk>"]
        lines = ["", "\\data\\"]
        lines += [f"ngram {k}={len(tables[k - 1]) + (len(unk) if k == 1 else 0)}" for k in range(1, self.order + 1)]
        for k in range(1, self.order + 1):
            lines += ["", f"\\{k}-grams:"]
            if k == 1:
                lines += unk
            for gram, lp in tables[k - 1].items():
                row = f"{lp:.7f}\t{' '.join(name(t) for t in gram)}"
                if k < self.order and gram in self.backoff[k - 1]:
                    row += f"\t{self.backoff[k - 1][gram]:.7f}"
                lines.append(row)
        lines += ["", "\\end\\", ""]
        Path(path).write_text("\n".join(lines), encoding="utf-8")

    @classmethod
    def from_arpa(cls, path: str | os.PathLike, vocab: dict[str, int] | None = None) -> NGramLM:
        """Read an ARPA file; `vocab` maps its words to ids (default: the words are integers). ARPA's own
        `<s>` and `<unk>`, where `vocab` has them, become `bos_id` and `unk_id`, as they were when written from
        `word_sequences` output."""
        path = Path(path)
        if not path.is_file():
            raise LMStackError(f"{path}: no such ARPA file")
        text = path.read_text(encoding="utf-8").splitlines()
        sizes: dict[int, int] = {}
        tables: dict[int, list[tuple[Gram, float, float | None]]] = defaultdict(list)
        section = None
        for lineno, raw in enumerate(text, 1):
            line = raw.strip()
            if not line:
                continue
            try:
                if line == "\\data\\":
                    section = "data"
                elif line == "\\end\\":
                    break
                elif line.startswith("\\") and line.endswith("-grams:"):
                    section = int(line[1:].split("-")[0])
                elif section == "data" and line.startswith("ngram "):
                    k, count = line[6:].split("=")
                    sizes[int(k)] = int(count)
                elif isinstance(section, int):
                    parts = line.split("\t") if "\t" in line else line.split()
                    if "\t" not in line:  # space-separated: prob, k words, optional backoff
                        parts = [parts[0], " ".join(parts[1:1 + section]), *parts[1 + section:]]
                    words = parts[1].split()
                    if len(words) != section:
                        raise ValueError(f"expected {section} words")
                    if words == ["<unk>"] and (vocab is None or "<unk>" not in vocab):
                        continue  # the listing ARPA wants of a vocabulary that has no unknown token
                    ids = tuple(vocab[w] if vocab is not None else int(w) for w in words)
                    tables[section].append((ids, float(parts[0]), float(parts[2]) if len(parts) > 2 else None))
                else:
                    raise ValueError("unexpected line")
            except KeyError as e:
                raise LMStackError(f"{path}:{lineno}: the word {e} is not in `vocab`: {raw[:80]!r}") from None
            except (ValueError, IndexError) as e:
                hint = "; a file of words needs `vocab` (word -> id)" if vocab is None and "int()" in str(e) else ""
                raise LMStackError(f"{path}:{lineno}: not valid ARPA ({e}){hint}: {raw[:80]!r}") from None
        if not sizes:
            raise LMStackError(f"{path}: no \\data\\ section (not an ARPA file)")
        order = max(sizes)
        vocab_size = len(vocab) if vocab is not None else max(g[0] for g, _, _ in tables[1]) + 1
        model = cls(order, vocab_size, "modified_kneser_ney", unk_id=(vocab or {}).get("<unk>"),
                    bos_id=(vocab or {}).get("<s>"))
        model.logp = [{g: p for g, p, _ in tables[k]} for k in range(1, order + 1)]
        model.backoff = [{g: b for g, _, b in tables[k] if b is not None} for k in range(1, order + 1)]
        model.counts = [{g: 1 for g in table} for table in model.logp]  # marks the model as usable
        # `<s>` is context only where the file gives it no mass (KenLM's -99), not where a model was fitted without
        if model.bos_id is not None and model.logp[0].get((model.bos_id,), BOS_LOG10) <= BOS_LOG10:
            model.context_only_id = model.bos_id
        # The mass the unigrams leave is the floor, shared by the ids the file does not list (`<s>` aside)
        unseen = 1.0 - sum(10 ** p for p in model.logp[0].values())
        unlisted = sum((i,) not in model.logp[0] and i != model.bos_id for i in range(vocab_size))
        model.uniform_backoff = max(unseen, 1e-12) / max(unlisted, 1) / model._uniform()
        return model
