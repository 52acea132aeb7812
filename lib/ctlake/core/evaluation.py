"""Evaluation of patch probabilities at patch, nodule and patient level (pandas and numpy only).

A patient's probability is an aggregate of its patch probabilities
(:func:`ctlake.core.metrics.aggregate_probabilities`); thresholds are chosen
on the validation patients and applied to the test patients, and every
figure carries a bootstrap interval over test patients. Training and scoring
share these functions, so a reported figure is what a scored scan gets.
"""
from __future__ import annotations

import pandas as pd

from ctlake.core.metrics import aggregate_probabilities, bootstrap_metrics, threshold_youden


def aggregate(patch_scores: pd.DataFrame, how: str) -> pd.DataFrame:
    """Patient probability from patch probabilities: max, mean or mean of the top three."""
    grouped = patch_scores.groupby("patient_pseudonym")
    return pd.DataFrame({"p": grouped["p"].apply(lambda p: aggregate_probabilities(p, how)),
                         "label": grouped["patient_label"].first(),
                         "split": grouped["split"].first()}).reset_index()


def evaluate(patch_scores: pd.DataFrame, how: str, n_boot: int, seed: int) -> dict:
    """Patch-, nodule- and patient-level metrics on test, thresholds chosen on validation."""
    patients = aggregate(patch_scores, how)
    val_p, test_p = patients[patients["split"] == "validation"], patients[patients["split"] == "test"]
    val_x = patch_scores[(patch_scores["split"] == "validation")]
    test_x = patch_scores[(patch_scores["split"] == "test")]
    nodules = test_x[test_x["nodule_label"].isin(["malignant", "benign"])]
    val_nodules = val_x[val_x["nodule_label"].isin(["malignant", "benign"])]
    result = {
        "patient": bootstrap_metrics(test_p["label"].to_numpy(), test_p["p"].to_numpy(),
                                     test_p["patient_pseudonym"].to_numpy(),
                                     threshold_youden(val_p["label"], val_p["p"]), n_boot, seed),
        "patch": bootstrap_metrics(test_x["target"].to_numpy(), test_x["p"].to_numpy(),
                                   test_x["patient_pseudonym"].to_numpy(),
                                   threshold_youden(val_x["target"], val_x["p"]), n_boot, seed),
    }
    if len(nodules) and nodules["target"].nunique() == 2:
        result["nodule"] = bootstrap_metrics(nodules["target"].to_numpy(), nodules["p"].to_numpy(),
                                             nodules["patient_pseudonym"].to_numpy(),
                                             threshold_youden(val_nodules["target"], val_nodules["p"]), n_boot, seed)
    return result


def top_patches(patch_scores: pd.DataFrame, k: int) -> dict:
    """For each test patient: the k patches that drove the score, with their location."""
    test = patch_scores[patch_scores["split"] == "test"].sort_values("p", ascending=False)
    evidence = {}
    for patient, group in test.groupby("patient_pseudonym", sort=True):
        evidence[patient] = group.head(k)[["patch_id", "series_uid", "sop_uid", "slice_index", "center_row",
                                           "center_col", "mode", "p"]].to_dict("records")
    return evidence
