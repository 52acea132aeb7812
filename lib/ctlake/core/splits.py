"""Patient-grouped, label-stratified splits and cross-validation folds (pure pandas/numpy).

Patches of one patient are strongly correlated (same scanner, same anatomy,
often the same nodule on neighbouring slices), so every split is made over
patients: no patient's patches are ever in two splits or two folds.
"""
from __future__ import annotations

import hashlib

import pandas as pd

from ctlake.errors import ConfigError

SPLITS = ("train", "validation", "test")


def _order_key(patient: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}|{patient}".encode()).hexdigest()


def split_patients(patients: pd.DataFrame, fractions: dict[str, float], folds: int, seed: int) -> pd.DataFrame:
    """Assign each patient a split and (for training patients) a cross-validation fold.

    Parameters
    ----------
    patients : DataFrame
        Columns ``patient`` (pseudonym) and ``label`` (0/1), one row per patient.
    fractions : dict
        Shares of ``train``, ``validation`` and ``test``; they must sum to 1.
    folds : int
        Cross-validation folds over the training patients.
    seed : int
        The order within each label is a keyed hash of the patient, so the
        assignment is deterministic for a seed and independent of row order.

    Returns
    -------
    DataFrame
        ``patient``, ``label``, ``split`` and ``fold`` (-1 outside ``train``).
        Within each label the patients are dealt out by the fractions, so each
        split keeps the cohort's label ratio (up to rounding).
    """
    if set(fractions) != set(SPLITS) or any(v < 0 for v in fractions.values()) \
            or abs(sum(fractions.values()) - 1) > 1e-6:
        raise ConfigError(f"split fractions must give train, validation and test summing to 1, found {fractions}")
    if folds < 2:
        raise ConfigError(f"cross-validation needs at least 2 folds, found {folds}")
    if patients["patient"].duplicated().any():
        raise ValueError("one row per patient expected")
    rows = []
    for label, group in patients.groupby("label", sort=True):
        ordered = sorted(group["patient"], key=lambda p: _order_key(p, seed))
        n = len(ordered)
        n_test = int(round(n * fractions["test"]))
        n_val = int(round(n * fractions["validation"]))
        for rank, patient in enumerate(ordered):
            split = "test" if rank < n_test else "validation" if rank < n_test + n_val else "train"
            rows.append({"patient": patient, "label": int(label), "split": split})
    result = pd.DataFrame(rows, columns=["patient", "label", "split"])
    result["fold"] = -1
    for label in result["label"].unique():
        train = result[(result["split"] == "train") & (result["label"] == label)]
        ordered = sorted(train["patient"], key=lambda p: _order_key(p, seed + 1))
        for rank, patient in enumerate(ordered):
            result.loc[result["patient"] == patient, "fold"] = rank % folds
    return result.sort_values("patient").reset_index(drop=True)


def split_sizes(assignment: pd.DataFrame) -> dict:
    """Patients per split and label, for run summaries and the report."""
    sizes = {}
    for split in SPLITS:
        part = assignment[assignment["split"] == split]
        sizes[split] = {"patients": int(len(part)), "positive": int(part["label"].sum()),
                        "negative": int((part["label"] == 0).sum())}
    return sizes
