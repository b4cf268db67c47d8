"""The train stage's held-out metrics, computed without scikit-learn, equal scikit-learn's."""

from __future__ import annotations

import numpy as np
import pytest

from stages.train import classification_report


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_class_metrics_and_confusion_matrix_equal_scikit_learn(seed):
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    rng = np.random.default_rng(seed)
    classes = 10
    y_true = rng.integers(0, classes, 500)
    y_pred = np.where(rng.random(500) < 0.7, y_true, rng.integers(0, classes, 500))
    y_pred[y_pred == 3] = 4  # a class never predicted: precision 0 by zero_division
    y_true[y_true == 7] = 8  # a class with no support: recall 0
    labels = list(range(classes))
    prec, rec, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    report = classification_report(y_true, y_pred, classes)
    assert report["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=labels).tolist()
    for c in labels:
        got = report["per_class"][str(c)]
        # the same float64 divisions: equal, not merely close
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == (
            float(prec[c]),
            float(rec[c]),
            float(f1[c]),
            int(support[c]),
        )
    assert report["per_class"]["3"]["precision"] == 0.0
    assert report["per_class"]["7"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_labels_outside_the_classes_are_left_out_not_a_crash():
    report = classification_report(np.array([0, 1, 5, -1]), np.array([0, 1, 1, 0]), 2)
    assert report["confusion_matrix"] == [[1, 0], [0, 1]]
