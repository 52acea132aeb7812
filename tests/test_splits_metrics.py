"""Patient-grouped splits and metrics with patient bootstrap intervals (pure)."""
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from ctlake.core.metrics import bootstrap_metrics, confusion, point_metrics, threshold_youden
from ctlake.core.splits import split_patients, split_sizes
from ctlake.errors import ConfigError

FRACTIONS = {"train": 0.6, "validation": 0.2, "test": 0.2}


def patients(n_pos=20, n_neg=30):
    return pd.DataFrame({"patient": [f"p-{i:03d}" for i in range(n_pos + n_neg)],
                         "label": [1] * n_pos + [0] * n_neg})


def test_split_is_stratified_by_label_and_deterministic():
    a = split_patients(patients(), FRACTIONS, folds=3, seed=1)
    sizes = split_sizes(a)
    assert sizes["test"] == {"patients": 10, "positive": 4, "negative": 6}
    assert sizes["validation"] == {"patients": 10, "positive": 4, "negative": 6}
    assert sizes["train"] == {"patients": 30, "positive": 12, "negative": 18}
    shuffled = patients().sample(frac=1, random_state=3)
    assert split_patients(shuffled, FRACTIONS, folds=3, seed=1).equals(a)
    assert not split_patients(patients(), FRACTIONS, folds=3, seed=2)["split"].equals(a["split"])


def test_folds_cover_training_patients_only_and_keep_both_labels():
    a = split_patients(patients(), FRACTIONS, folds=3, seed=1)
    assert set(a.loc[a["split"] != "train", "fold"]) == {-1}
    train = a[a["split"] == "train"]
    assert sorted(train["fold"].unique()) == [0, 1, 2]
    for _, fold in train.groupby("fold"):
        assert fold["label"].nunique() == 2 and len(fold) == 10


def test_bad_split_configuration():
    with pytest.raises(ConfigError, match="summing to 1"):
        split_patients(patients(), {"train": 0.9, "validation": 0.2, "test": 0.2}, folds=3, seed=1)
    with pytest.raises(ConfigError, match="at least 2 folds"):
        split_patients(patients(), FRACTIONS, folds=1, seed=1)


def test_point_metrics_against_hand_counts():
    labels = np.array([1, 1, 1, 0, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.3, 0.6, 0.2, 0.1, 0.05])
    assert confusion(labels, scores, 0.5) == {"tp": 2, "fp": 1, "tn": 3, "fn": 1}
    m = point_metrics(labels, scores, 0.5)
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(3 / 4)
    assert m["precision"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(5 / 7)
    assert m["auc"] == pytest.approx(roc_auc_score(labels, scores))


def test_youden_threshold_separates_separable_scores():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
    t = threshold_youden(labels, scores)
    assert 0.3 < t <= 0.7
    assert point_metrics(labels, scores, t)["accuracy"] == 1.0


def test_bootstrap_intervals_contain_the_estimate_and_resample_patients():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 5)
    labels = np.repeat(rng.integers(0, 2, 40), 5)
    scores = np.clip(labels * 0.3 + rng.random(200) * 0.7, 0, 1)
    r = bootstrap_metrics(labels, scores, groups, 0.5, n_boot=300, seed=1)
    assert r["n"] == 200 and r["n_groups"] == 40
    assert r["auc"]["low"] <= r["auc"]["value"] <= r["auc"]["high"]
    assert r["auc"]["high"] - r["auc"]["low"] > 0.02
    assert bootstrap_metrics(labels, scores, groups, 0.5, n_boot=300, seed=1) == r


def test_patient_aggregates():
    from ctlake.core.metrics import aggregate_probabilities

    p = [0.1, 0.9, 0.5, 0.3]
    assert aggregate_probabilities(p, "max") == 0.9
    assert aggregate_probabilities(p, "mean") == pytest.approx(0.45)
    assert aggregate_probabilities(p, "top3") == pytest.approx((0.9 + 0.5 + 0.3) / 3)
