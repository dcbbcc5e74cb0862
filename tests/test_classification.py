"""Classification metrics against scikit-learn, a hand-computed example, bad input and the text report."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from lmstack.errors import LMStackError
from lmstack.evaluate.classification import classification_metrics, format_classification_report

# scikit-learn warns when a case has one class only; those cases are deliberate.
pytestmark = pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")

CASES = {
    "strings": (["cat", "dog", "cat", "bird", "dog", "cat", "bird"],
                ["cat", "cat", "cat", "dog", "dog", "bird", "bird"]),
    # 3 is never predicted, 4 is never true
    "never-predicted-never-true": ([0, 1, 2, 3, 3, 1, 0, 2], [0, 1, 2, 4, 0, 1, 4, 1]),
    "all-correct": ([1, 2, 2, 1], [1, 2, 2, 1]),
    "all-wrong": (["a", "b", "a"], ["b", "a", "b"]),
    "one-example": (["x"], ["y"]),
    "single-class": ([7, 7, 7], [7, 7, 7]),
}


def assert_matches_sklearn(y_true, y_pred, labels=None):
    m = classification_metrics(y_true, y_pred, labels)
    order = labels if labels is not None else sorted(set(y_true) | set(y_pred))
    assert m["labels"] == list(order)
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=order, average=None, zero_division=0)
    for i, label in enumerate(order):
        row = m["per_class"][label]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((p[i], r[i], f[i]), abs=1e-12)
        assert row["support"] == s[i]
    for avg in ("macro", "weighted"):
        want = precision_recall_fscore_support(y_true, y_pred, labels=order, average=avg, zero_division=0)[:3]
        got = m[avg]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx(want, abs=1e-12)
    assert m["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=order).tolist()


@pytest.mark.parametrize("case", sorted(CASES))
def test_fixed_cases_match_sklearn(case):
    assert_matches_sklearn(*CASES[case])


def test_explicit_labels_match_sklearn():
    y_true, y_pred = ["b", "a", "c", "a", "d"], ["b", "c", "c", "a", "a"]
    assert_matches_sklearn(y_true, y_pred, labels=["c", "a", "b", "z"])  # own order, an unseen class
    assert_matches_sklearn(y_true, y_pred, labels=["a", "b"])  # a subset: 'c' and 'd' examples leave the matrix


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=1, max_size=40))
def test_random_int_labels_match_sklearn(pairs):
    y_true, y_pred = [t for t, _ in pairs], [p for _, p in pairs]
    assert_matches_sklearn(y_true, y_pred)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcd"), st.sampled_from("abcde")), min_size=1, max_size=30),
       st.permutations(list("abcdef")))
def test_random_string_labels_with_order_match_sklearn(pairs, order):
    y_true, y_pred = [t for t, _ in pairs], [p for _, p in pairs]
    assert_matches_sklearn(y_true, y_pred, labels=order)


def test_hand_computed_example():
    # true: a a a b b c ; pred: a a b b c c
    m = classification_metrics(list("aaabbc"), list("aabbcc"))
    assert m["accuracy"] == pytest.approx(4 / 6)
    a, b, c = (m["per_class"][x] for x in "abc")
    assert (a["precision"], a["recall"], a["support"]) == (1.0, pytest.approx(2 / 3), 3)
    assert a["f1"] == pytest.approx(0.8)  # 2 * 1 * 2/3 / (1 + 2/3)
    assert (b["precision"], b["recall"], b["f1"]) == (0.5, 0.5, 0.5)
    assert (c["precision"], c["recall"], c["f1"]) == (0.5, 1.0, pytest.approx(2 / 3))
    assert m["macro"]["precision"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert m["weighted"]["recall"] == pytest.approx((3 * 2 / 3 + 2 * 0.5 + 1 * 1.0) / 6)
    assert m["macro"]["support"] == m["weighted"]["support"] == 6
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_class_never_predicted_scores_zero_not_nan():
    m = classification_metrics([0, 1, 1], [0, 0, 0])
    assert m["per_class"][1] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}


@pytest.mark.parametrize(("y_true", "y_pred", "labels", "match"), [
    ([1, 2], [1], None, "y_true has 2 labels but y_pred has 1"),
    ([], [], None, "at least one example"),
    ([1, "a"], [1, "a"], None, "cannot be sorted"),
    ([1, 2], [1, 2], [1, 1, 2], "more than once"),
    ([1, 2], [1, 2], [], "labels is empty"),
])
def test_bad_input(y_true, y_pred, labels, match):
    with pytest.raises(LMStackError, match=match):
        classification_metrics(y_true, y_pred, labels)


def test_mixed_types_with_explicit_labels():
    m = classification_metrics([1, "a", "a"], [1, "a", 1], labels=["a", 1])
    assert m["confusion_matrix"] == [[1, 1], [0, 1]]


def test_report_lists_every_number():
    m = classification_metrics(["spam", "ham", "ham", "spam"], ["spam", "ham", "spam", "spam"])
    text = format_classification_report(m)
    lines = text.splitlines()
    row = next(line for line in lines if line.split()[:1] == ["spam"])
    assert row.split() == ["spam", "0.6667", "1.0000", "0.8000", "2"]
    assert next(line for line in lines if line.strip().startswith("accuracy")).split() == ["accuracy", "0.7500", "4"]
    assert next(line for line in lines if "macro avg" in line).split()[2:] == ["0.8333", "0.7500", "0.7333", "4"]
    assert "weighted avg" in text
    matrix = lines[lines.index("confusion matrix (rows = true, columns = predicted):") + 1:]
    assert [r.split() for r in matrix] == [["ham", "spam"], ["ham", "1", "1"], ["spam", "0", "2"]]


@pytest.mark.parametrize("batch_size", [0, -1])
def test_predict_labels_needs_a_batch_of_at_least_one(batch_size):
    import lmstack
    from lmstack.evaluate.classify import predict_labels

    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=300))
    tokenizer = lmstack.Tokenizer.train(["a few words to learn from"] * 4, vocab_size=300)
    with pytest.raises(LMStackError, match=f"batch_size {batch_size}: must be >= 1"):
        predict_labels(model, tokenizer, ["a", "b"], labels=["x", "y"], batch_size=batch_size)
