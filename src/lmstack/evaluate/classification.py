"""Classification metrics: accuracy, per-class precision / recall / F1, their averages and the confusion matrix.

The numbers are scikit-learn's (`accuracy_score`, `precision_recall_fscore_support` with `zero_division=0`,
`confusion_matrix`), computed in plain Python so that evaluating a classifier needs no extra dependency.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any

from lmstack.errors import LMStackError


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0  # zero division gives 0, as scikit-learn's zero_division=0


def classification_metrics(
    y_true: Sequence[Hashable], y_pred: Sequence[Hashable], labels: Sequence[Hashable] | None = None
) -> dict[str, Any]:
    """Accuracy, per-class and averaged precision / recall / F1, and the confusion matrix of a prediction.

    `labels` fixes the classes and their order (default: the sorted union of `y_true` and `y_pred`). As in
    scikit-learn, accuracy counts every example, per-class counts use every example of that class, and the
    confusion matrix has a row and column only for `labels` (rows = true class, columns = predicted class).
    Any ratio with a zero denominator is 0.

    Returns a dict with `labels`, `accuracy`, `n` (examples), `per_class` ({label: {precision, recall, f1,
    support}}), `macro` and `weighted` ({precision, recall, f1, support}) and `confusion_matrix` (a list of
    rows of ints).
    """
    y_true, y_pred = list(y_true), list(y_pred)
    if len(y_true) != len(y_pred):
        raise LMStackError(f"y_true has {len(y_true)} labels but y_pred has {len(y_pred)}; they must match")
    if not y_true:
        raise LMStackError("classification metrics need at least one example (y_true and y_pred are empty)")
    if labels is None:
        try:
            labels = sorted(set(y_true) | set(y_pred))
        except TypeError:
            raise LMStackError("labels of different types cannot be sorted; pass labels= to fix their "
                               "order") from None
    labels = list(labels)
    if not labels:
        raise LMStackError("labels is empty; pass at least one class")
    if len(set(labels)) != len(labels):
        dup = next(x for x, n in Counter(labels).items() if n > 1)
        raise LMStackError(f"labels lists {dup!r} more than once")

    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for t, p in zip(y_true, y_pred):
        if t in index and p in index:  # pairs outside `labels` have no cell (as scikit-learn)
            matrix[index[t]][index[p]] += 1
    # Counted from the data rather than the matrix, so examples with a class outside `labels` still count
    # against the classes inside it.
    true_count, pred_count = Counter(y_true), Counter(y_pred)
    hits = Counter(t for t, p in zip(y_true, y_pred) if t == p)

    per_class = {}
    for label in labels:
        tp, support, predicted = hits[label], true_count[label], pred_count[label]
        per_class[label] = {
            "precision": _ratio(tp, predicted),
            "recall": _ratio(tp, support),
            # 2 tp / (2 tp + fp + fn): the harmonic mean of precision and recall, defined (as 0) when either is not.
            "f1": _ratio(2 * tp, predicted + support),
            "support": support,
        }
    total = sum(row["support"] for row in per_class.values())
    macro = {k: sum(row[k] for row in per_class.values()) / len(labels) for k in ("precision", "recall", "f1")}
    weighted = {k: _ratio(sum(row[k] * row["support"] for row in per_class.values()), total)
                for k in ("precision", "recall", "f1")}
    return {
        "labels": labels,
        "accuracy": sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true),
        "n": len(y_true),
        "per_class": per_class,
        "macro": {**macro, "support": total},
        "weighted": {**weighted, "support": total},
        "confusion_matrix": matrix,
    }


def format_classification_report(metrics: dict[str, Any], digits: int = 4) -> str:
    """`classification_metrics`' result as a text table: one row per class, the macro and weighted averages,
    accuracy, then the confusion matrix (rows = true class, columns = predicted class)."""
    labels = [str(label) for label in metrics["labels"]]
    rows = [*metrics["per_class"].values(), metrics["macro"], metrics["weighted"]]
    names = [*labels, "macro avg", "weighted avg"]
    w = max(len(n) for n in [*names, "accuracy"])
    col = max(digits + 3, 9)

    def num(x: float) -> str:
        return f"{x:>{col}.{digits}f}"

    lines = [f"{'':>{w}} {'precision':>{col}} {'recall':>{col}} {'f1-score':>{col}} {'support':>{col}}", ""]
    for i, (name, row) in enumerate(zip(names, rows)):
        if i == len(labels):  # a blank line, then accuracy, before the averages
            lines += ["", f"{'accuracy':>{w}} {'':>{col}} {'':>{col}} {num(metrics['accuracy'])} "
                          f"{metrics['n']:>{col}}"]
        lines.append(f"{name:>{w}} {num(row['precision'])} {num(row['recall'])} {num(row['f1'])} "
                     f"{row['support']:>{col}}")

    matrix = metrics["confusion_matrix"]
    cell = max(len(x) for x in [*labels, *(str(v) for r in matrix for v in r)])
    lines += ["", "confusion matrix (rows = true, columns = predicted):",
              f"{'':>{w}} " + " ".join(f"{x:>{cell}}" for x in labels)]
    for name, r in zip(labels, matrix):
        lines.append(f"{name:>{w}} " + " ".join(f"{v:>{cell}}" for v in r))
    return "\n".join(lines) + "\n"
