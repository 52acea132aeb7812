"""Evaluation of patch probabilities at patch, nodule and patient level (pandas and numpy only).

A patient's probability is an aggregate of its patch probabilities
(:func:`ctlake.core.metrics.aggregate_probabilities`); thresholds are chosen
on the validation patients and applied to the test patients, and every
figure carries a bootstrap interval over test patients. Training and scoring
share these functions, so a reported figure is what a scored scan gets.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

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


#: The two stages: is a candidate a nodule, and is a nodule malignant.
STAGES = ("nodule", "malignancy")
#: The model families; each serves both stages, and the ensemble averages them per stage.
FAMILIES = ("random_forest", "svm_ensemble", "cnn")
#: The families on hand-made features: the ensemble without the CNN is always reported beside the product's.
FEATURE_FAMILIES = ("random_forest", "svm_ensemble")


def combine_stages(stage_scores: pd.DataFrame, members: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """Per family and for two ensembles: P(cancer at a candidate) = P(nodule) x P(malignant | nodule).

    ``stage_scores`` has ``p_<stage>_<family>`` columns; the result adds
    ``p_<family>``; ``p_ensemble``, the product over stages of the mean of
    ``members[stage]`` (default: every family); ``p_ensemble_no_cnn``, the
    same over :data:`FEATURE_FAMILIES`; and ``p_nodule`` / ``p_malignancy``,
    the ensemble's stages.
    """
    members = members or {stage: list(FAMILIES) for stage in STAGES}
    out = stage_scores.copy()
    for family in FAMILIES:
        out[f"p_{family}"] = out[f"p_nodule_{family}"] * out[f"p_malignancy_{family}"]
    for stage in STAGES:
        out[f"p_{stage}"] = out[[f"p_{stage}_{family}" for family in members[stage]]].mean(axis=1)
    out["p_ensemble"] = out["p_nodule"] * out["p_malignancy"]
    out["p_ensemble_no_cnn"] = np.prod([out[[f"p_{stage}_{family}" for family in FEATURE_FAMILIES]].mean(axis=1)
                                        for stage in STAGES], axis=0)
    return out


def ensemble_members(validation: pd.DataFrame) -> tuple[dict[str, list[str]], dict]:
    """Per stage, the families the ensemble averages: every family where that ranks the validation
    patients' candidates better than the hand-made features' families alone, else those alone.

    The nodule stage is judged on every detected candidate (is it a nodule),
    the malignancy stage on the candidates at nodules rated malignant or
    benign. Chosen on validation, so the test figures stay honest; the
    AUCs behind each choice are returned beside it.
    """
    members, evidence = {}, {}
    for stage in STAGES:
        rows = validation if stage == "nodule" else validation[validation["nodule_label"].isin(["malignant", "benign"])]
        target = rows["is_nodule"] if stage == "nodule" else rows["target"]
        aucs = {}
        for name, families in (("all", FAMILIES), ("features", FEATURE_FAMILIES)):
            p = rows[[f"p_{stage}_{family}" for family in families]].mean(axis=1)
            aucs[name] = float(roc_auc_score(target, p)) if target.nunique() == 2 else None
        better = aucs["all"] is not None and aucs["features"] is not None and aucs["all"] > aucs["features"]
        members[stage] = list(FAMILIES if better else FEATURE_FAMILIES)
        evidence[stage] = {"validation_auc_all_families": aucs["all"], "validation_auc_without_cnn": aucs["features"],
                           "families": members[stage]}
    return members, evidence


def permutation_null(labels, scores, repeats: int, seed: int) -> list[float]:
    """AUCs of the fixed ``scores`` against ``repeats`` permutations of ``labels``.

    The valid null control: the predictions stay what the models said and
    only the labels are shuffled, so the AUCs centre at 0.5 by construction
    and their spread is what chance gives with this many patients.
    """
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=float)
    if len(np.unique(labels)) < 2:
        return []
    rng = np.random.default_rng(seed)
    return [float(roc_auc_score(rng.permutation(labels), scores)) for _ in range(repeats)]


#: Patient groups the report breaks results down by.
PATIENT_GROUPS = ("no nodule", "benign or indeterminate only", "cancer")


def patient_group(label: int, n_nodules: int) -> str:
    """Which of :data:`PATIENT_GROUPS` a patient is in, from its cancer label and nodule count."""
    if label:
        return "cancer"
    return "benign or indeterminate only" if n_nodules else "no nodule"


def by_group(patients: pd.DataFrame, threshold: float) -> dict:
    """Test patients per group: how many, mean probability, share called cancer at ``threshold``."""
    test = patients[patients["split"] == "test"]
    return {group: {"patients": int(len(part)), "mean_p": float(part["p"].mean()) if len(part) else None,
                    "called_cancer": float((part["p"] >= threshold).mean()) if len(part) else None}
            for group in PATIENT_GROUPS for part in [test[test["group"] == group]]}


#: The rendered attributes of a nodule (``nodules.csv``): what the images can at best carry.
ATTRIBUTES = ("diameter_mm", "subtlety", "internal_structure", "calcification", "sphericity", "margin",
              "lobulation", "spiculation", "texture")


def attribute_ceiling(nodules: pd.DataFrame, seed: int) -> float | None:
    """Nodule-level AUC of a forest on the true diameter and ratings: trained on ``train``, tested on ``test``.

    ``nodules`` holds :data:`ATTRIBUTES`, ``label`` (malignant, benign,
    indeterminate) and ``split``.  An upper reference, not a model: a new
    scan comes without its readers' ratings.
    """
    from sklearn.ensemble import RandomForestClassifier

    rated = nodules[nodules["label"].isin(["malignant", "benign"])]
    train, test = rated[rated["split"] == "train"], rated[rated["split"] == "test"]
    if train["label"].nunique() < 2 or test["label"].nunique() < 2:
        return None
    forest = RandomForestClassifier(n_estimators=300, random_state=seed, n_jobs=1)
    forest.fit(train[list(ATTRIBUTES)].to_numpy(float), train["label"] == "malignant")
    return float(roc_auc_score(test["label"] == "malignant",
                               forest.predict_proba(test[list(ATTRIBUTES)].to_numpy(float))[:, 1]))


def grouped_cv_patient_auc(rows: pd.DataFrame, names: list[str], folds: int, repeats: int, seed: int,
                           how: str = "max") -> list[float]:
    """Patient AUC of the two stages by repeated patient-grouped cross-validation over every patient.

    With a test split of a few dozen patients one AUC swings by +-0.1; this
    spreads the same question over all of them.  Per fold, scikit-learn
    forests (class-balanced) are trained the way the run trains its stages
    (nodule: every training row; malignancy: rows at malignant or benign
    nodules) and the held-out patients' *detected* candidates are scored;
    a patient with none scores 0.  ``rows`` has ``patient_pseudonym``,
    ``patient_label``, ``mode``, ``is_nodule``, ``nodule_label`` and the
    feature columns ``names``.
    """
    from sklearn.ensemble import RandomForestClassifier

    patients = rows.groupby("patient_pseudonym")["patient_label"].first()
    aucs = []
    for repeat in range(repeats):
        order = np.random.default_rng([seed, repeat]).permutation(patients.index.to_numpy())
        fold_of = {p: i % folds for i, p in enumerate(order)}
        fold = rows["patient_pseudonym"].map(fold_of).to_numpy()
        predicted = pd.Series(0.0, index=patients.index)
        for k in range(folds):
            train, test = rows[fold != k], rows[(fold == k) & (rows["mode"] == "detected").to_numpy()]
            rated = train[train["nodule_label"].isin(["malignant", "benign"])]
            if test.empty or train["is_nodule"].nunique() < 2 or rated["nodule_label"].nunique() < 2:
                continue
            stage = {}
            for name, data, target in (("nodule", train, train["is_nodule"] == 1),
                                       ("malignancy", rated, rated["nodule_label"] == "malignant")):
                forest = RandomForestClassifier(n_estimators=100, max_depth=8, class_weight="balanced",
                                                random_state=seed + repeat, n_jobs=2)
                stage[name] = forest.fit(data[names].to_numpy(float), target).predict_proba(
                    test[names].to_numpy(float))[:, 1]
            p = pd.Series(stage["nodule"] * stage["malignancy"], index=test.index)
            per_patient = p.groupby(test["patient_pseudonym"]).apply(lambda v: aggregate_probabilities(v, how))
            predicted.loc[per_patient.index] = per_patient
        aucs.append(float(roc_auc_score(patients.to_numpy(), predicted.loc[patients.index].to_numpy())))
    return aucs
