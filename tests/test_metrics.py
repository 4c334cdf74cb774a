"""tailforge.eval.metrics against scikit-learn and hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from tailforge.eval.metrics import calibration_bins, compute, dense, ece


def _probs(rng, n, c, sharp=3.0):
    z = rng.normal(size=(n, c)) * sharp
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    c, n = 7, 400
    y = rng.integers(0, c, size=n)
    p = _probs(rng, n, c)
    p[np.arange(n), y] += rng.uniform(0, 1.5, size=n)  # better than chance, not perfect
    p /= p.sum(1, keepdims=True)
    pred = p.argmax(1)
    m = compute(y, p)
    assert m["top1"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["top5"] == pytest.approx(skm.top_k_accuracy_score(y, p, k=5, labels=range(c)))
    assert m["balanced_acc"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred))
    assert m["kappa"] == pytest.approx(skm.cohen_kappa_score(y, pred))
    assert m["nll"] == pytest.approx(skm.log_loss(y, p, labels=range(c)))
    np.testing.assert_array_equal(dense(m["confusion"], c), skm.confusion_matrix(y, pred, labels=range(c)))
    recall = skm.recall_score(y, pred, average=None, labels=range(c))
    np.testing.assert_allclose(m["per_class"], recall)
    np.testing.assert_allclose(m["per_class_f1"], skm.f1_score(y, pred, average=None, labels=range(c)))
    assert m["support"] == np.bincount(y, minlength=c).tolist() and m["predicted"] == np.bincount(pred, minlength=c).tolist()


def test_many_classes_cost_the_samples_not_the_classes_squared():
    """3,000 classes, 6,000 samples: the confusion matrix is kept as its non-empty cells (at most one per
    sample; dense: 9 million), the metrics equal scikit-learn's, and the JSON stays small."""
    import json

    rng = np.random.default_rng(1)
    c, n = 3000, 6000
    y = rng.integers(0, c, size=n)
    pred = np.where(rng.random(n) < 0.6, y, rng.integers(0, c, size=n))
    p = np.full((n, c), 0.1 / c, dtype=np.float32)
    p[np.arange(n), pred] += 0.9
    m = compute(y, p, groups=["many"] * 100 + ["few"] * (c - 100))
    cells = len(m["confusion"]["counts"])
    assert cells <= n and sum(m["confusion"]["counts"]) == n
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred))
    assert m["kappa"] == pytest.approx(skm.cohen_kappa_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert len(json.dumps(m, separators=(",", ":"))) < 60 * n


def test_absent_class_conventions_match_sklearn():
    """A class never in y_true: per-class None, left out of balanced accuracy; F1 as sklearn's default."""
    y = np.array([0, 0, 1, 1, 1, 3, 3])
    pred = np.array([0, 2, 1, 1, 0, 3, 2])  # class 2 predicted but absent from y_true
    p = np.eye(4)[pred] * 0.9 + 0.025
    m = compute(y, p)
    assert m["per_class"][2] is None
    with pytest.warns(UserWarning):
        ref = skm.balanced_accuracy_score(y, pred)
    assert m["balanced_acc"] == pytest.approx(ref)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred))


def test_groups_average_per_class_accuracy():
    # class accuracies: 0 -> 1.0 (2/2), 1 -> 0.5 (1/2), 2 -> 0.0 (0/1), 3 -> 2/3
    y = np.array([0, 0, 1, 1, 2, 3, 3, 3])
    pred = np.array([0, 0, 1, 0, 0, 3, 3, 1])
    p = np.eye(4)[pred]
    m = compute(y, p, groups=["many", "many", "few", "medium"])
    assert m["many"] == pytest.approx(0.75)
    assert m["medium"] == pytest.approx(2 / 3)
    assert m["few"] == pytest.approx(0.0)
    assert m["balanced_acc"] == pytest.approx((1 + 0.5 + 0 + 2 / 3) / 4)
    assert m["top1"] == pytest.approx(5 / 8)


def test_ece_hand_computed():
    # 4 samples, 2 classes; confidences 0.9, 0.9 (bin 13), 0.6, 0.6 (bin 8) with 10 bins -> bins 8 and 5
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    y = np.array([0, 1, 0, 0])  # bin(0.9): acc 0.5, conf 0.9; bin(0.6): acc 0.5, conf 0.6
    assert ece(y, p, n_bins=10) == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)
    bins = calibration_bins(y, p, n_bins=10)
    assert sum(bins["count"]) == 4 and bins["count"][8] == 2 and bins["count"][5] == 2
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert ece(np.array([0, 1]), perfect) == pytest.approx(0.0)


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        compute([0, 1], np.ones((3, 2)) / 2)
    with pytest.raises(ValueError):
        compute([0, 1], np.ones((2, 2)) / 2, groups=["many"])
