"""One partition's SVM, the ensemble of several, and the grid they are tuned over: scikit-learn only.

The Spark estimator :class:`ctlake.spark.partitioned_svc.PartitionedSVC`
trains :func:`train_partition` once per stratified partition inside
``applyInPandas`` and scores rows with :func:`ensemble_scores`; everything
here runs on plain numpy arrays, so it is tested without Spark.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import sklearn
from scipy.special import expit
from sklearn.calibration import CalibratedClassifierCV
from sklearn.svm import SVC

KERNELS = ("rbf", "linear")
AGGREGATIONS = ("probability", "decision")
CALIBRATIONS = ("sigmoid", "isotonic", "platt-in-svc")
CLASS_WEIGHTS = ("balanced", "none")
#: calibration Param value -> CalibratedClassifierCV (method, cv folds, ensemble). Stratified
#: k-fold needs k rows of each class, so a partition needs ``cv`` rows of each to calibrate.
#: "platt-in-svc" is what ``SVC(probability=True)`` did (one SVC on all rows, a sigmoid fitted
#: on 5-fold cross-validated decision values); scikit-learn 1.9 deprecates that flag in
#: favour of exactly this CalibratedClassifierCV form (removed in 1.11).
CALIBRATION_CV = {
    "sigmoid": ("sigmoid", 3, True),
    "isotonic": ("isotonic", 3, True),
    "platt-in-svc": ("sigmoid", 5, False),
}

class PartitionSkippedWarning(UserWarning):
    """A partition could not be trained (one class only, too few rows to calibrate, a fit error)."""


def _sklearn_gamma(gamma: str) -> str | float:
    return gamma if gamma in ("scale", "auto") else float(gamma)


def build_estimator(kernel: str = "rbf", C: float = 1.0, gamma: str = "scale", calibration: str = "sigmoid",
                    class_weight: str = "balanced", aggregation: str = "probability",
                    random_state: int | None = None):
    """The unfitted scikit-learn model one partition trains.

    ``aggregation="decision"`` averages raw SVC decision values, so the model is
    a bare ``SVC`` (calibration does not apply). For ``"probability"``, an
    ``SVC`` inside ``CalibratedClassifierCV``: ``"sigmoid"``/``"isotonic"`` use
    cv=3 (three SVCs on two thirds each, each calibrated on the held-out third,
    probabilities averaged); ``"platt-in-svc"`` uses cv=5 with ``ensemble=False``,
    the replacement scikit-learn 1.9 gives for ``SVC(probability=True)``.
    """
    # SVC's ``probability`` flag is left unset: passing it at all warns in scikit-learn 1.9.
    svc = SVC(kernel=kernel, C=C, gamma=_sklearn_gamma(gamma),
              class_weight="balanced" if class_weight == "balanced" else None,
              random_state=random_state)
    if sklearn.get_config()["enable_metadata_routing"]:
        # With routing off (scikit-learn's default) CalibratedClassifierCV.fit hands its
        # sample_weight to every fold's SVC.fit (it inspects the signature) and to the
        # calibrator. With routing switched on globally it would instead raise
        # UnsetMetadataPassedError unless the SVC requests the weights; requesting them
        # keeps both modes identical (set_fit_request raises when routing is off).
        svc.set_fit_request(sample_weight=True)
    if aggregation == "decision":
        return svc
    method, folds, ensemble = CALIBRATION_CV[calibration]
    return CalibratedClassifierCV(svc, method=method, cv=folds, ensemble=ensemble)


def min_rows_per_class(calibration: str, aggregation: str) -> int:
    """Fewest rows of each class a partition needs for its model to be fittable."""
    return CALIBRATION_CV[calibration][1] if aggregation == "probability" else 1


def train_partition(features: np.ndarray, labels: np.ndarray, settings: dict,
                    sample_weight: np.ndarray | None = None) -> tuple[Any | None, str | None]:
    """Fit one partition's model; ``(model, None)`` or ``(None, reason it was skipped)``.

    ``settings`` holds :func:`build_estimator`'s arguments plus ``seed`` and
    ``partition``; the model's ``random_state`` is ``seed + partition`` (mod 2**32),
    so partitions differ from each other and a run is reproducible.

    ``sample_weight`` (one non-negative weight per row, or None for all 1.0) goes to
    the estimator's ``fit``: a bare SVC scales each row's ``C`` by its weight, and
    ``CalibratedClassifierCV`` passes the weights to every fold's SVC and to the
    calibrator. It multiplies ``class_weight="balanced"``, which counts rows, not weights.
    A partition whose weights leave a class with no positive weight fails to fit
    and is skipped like any other fit error.
    """
    need = min_rows_per_class(settings["calibration"], settings["aggregation"])
    counts = {label: int(np.sum(labels == label)) for label in (0.0, 1.0)}
    if min(counts.values()) == 0:
        present = [label for label, count in counts.items() if count]
        return None, f"only one class ({present[0] if present else 'none'}) in {len(labels)} rows"
    if min(counts.values()) < need:
        return None, (f"{counts[0.0]} negative and {counts[1.0]} positive rows; "
                      f"{settings['calibration']} calibration ({need}-fold CV) needs at least {need} of each")
    estimator = build_estimator(
        kernel=settings["kernel"], C=settings["C"], gamma=settings["gamma"],
        calibration=settings["calibration"], class_weight=settings["class_weight"],
        aggregation=settings["aggregation"],
        random_state=(settings["seed"] + settings["partition"]) % 2**32)
    try:
        if sample_weight is None:
            return estimator.fit(features, labels), None
        return estimator.fit(features, labels, sample_weight=sample_weight), None
    except ValueError as exc:  # scikit-learn's data errors: reported as a value, not a dead job
        return None, f"fit failed: {type(exc).__name__}: {exc}"


def ensemble_scores(models: list, features: np.ndarray, aggregation: str) -> tuple[np.ndarray, np.ndarray]:
    """Ensemble score ``s`` and positive-class probability ``p`` for each row of ``features``.

    ``aggregation="probability"``: ``p`` is the mean over models of
    ``predict_proba[:, 1]`` and ``s = p``. ``aggregation="decision"``: ``s`` is
    the mean of ``decision_function`` (signed distance to each SVM's margin,
    positive towards class 1) and ``p = 1 / (1 + exp(-s))``, a monotone squash
    to [0, 1] that keeps ``p >= 0.5`` exactly where ``s >= 0`` but is not a
    calibrated probability.
    """
    if aggregation == "probability":
        p = np.mean(np.stack([m.predict_proba(features)[:, 1] for m in models]), axis=0)
        return p, p
    s = np.mean(np.stack([m.decision_function(features) for m in models]), axis=0)
    return s, expit(s)


def stratified_caps(class_counts: dict[float, int], k: int, max_rows: int) -> dict[float, int] | None:
    """Rows of each label a partition may keep, or None when no partition exceeds ``max_rows``.

    The cap is split between the labels in the data's ratio (at least one row of
    each), so a downsampled partition is still stratified and never exceeds ``max_rows``.
    """
    largest = sum(math.ceil(count / k) for count in class_counts.values())
    if largest <= max_rows:
        return None
    total = sum(class_counts.values())
    minority = min(class_counts, key=lambda label: (class_counts[label], label))
    minority_cap = max(1, math.floor(max_rows * class_counts[minority] / total))
    return {label: minority_cap if label == minority else max_rows - minority_cap for label in class_counts}


def svm_grid(kernels: list[str], cs: list[float], gammas: list[str]) -> list[dict]:
    """The tuning candidates, in order: every kernel x C, and every gamma for the RBF kernel only.

    A linear kernel has no gamma, so it is tried once per C (with the unused
    ``"scale"``) rather than once per gamma.
    """
    return [{"kernel": kernel, "C": float(c), "gamma": str(gamma)}
            for kernel in kernels for c in cs for gamma in (gammas if kernel == "rbf" else ["scale"])]
