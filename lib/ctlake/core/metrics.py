"""Classification metrics with patient-level bootstrap confidence intervals (pure numpy)."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

METRICS = ("auc", "accuracy", "sensitivity", "specificity", "precision", "f1")
AGGREGATES = ("max", "mean", "top3")


def aggregate_probabilities(p, how: str) -> float:
    """A patient's probability from its patch probabilities: max, mean, or mean of the top three.

    ``max`` says "the most suspicious patch decides", the usual reading of a
    patch detector; ``top3`` is less sensitive to one noisy patch.
    """
    p = np.asarray(p, dtype=float)
    if how == "max":
        return float(p.max())
    if how == "mean":
        return float(p.mean())
    return float(np.sort(p)[-3:].mean())


def threshold_youden(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold maximizing sensitivity + specificity - 1 (chosen on validation data)."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    if len(np.unique(labels)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(labels, scores)
    best = int(np.argmax(tpr - fpr))
    return float(min(max(thresholds[best], 0.0), 1.0))


def confusion(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    predicted = np.asarray(scores) >= threshold
    labels = np.asarray(labels).astype(bool)
    return {"tp": int(np.sum(predicted & labels)), "fp": int(np.sum(predicted & ~labels)),
            "tn": int(np.sum(~predicted & ~labels)), "fn": int(np.sum(~predicted & labels))}


def point_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """AUC and the threshold metrics; undefined ratios (no positives, say) are None."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    c = confusion(labels, scores, threshold)

    def ratio(a, b):
        return a / b if b else None

    precision = ratio(c["tp"], c["tp"] + c["fp"])
    sensitivity = ratio(c["tp"], c["tp"] + c["fn"])
    f1 = (2 * precision * sensitivity / (precision + sensitivity)
          if precision is not None and sensitivity is not None and precision + sensitivity > 0 else None)
    return {
        "auc": float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else None,
        "accuracy": ratio(c["tp"] + c["tn"], len(labels)),
        "sensitivity": sensitivity,
        "specificity": ratio(c["tn"], c["tn"] + c["fp"]),
        "precision": precision,
        "f1": f1,
    }


def bootstrap_metrics(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray, threshold: float,
                      n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Point estimates with percentile bootstrap intervals, resampling *patients* (groups).

    Patches of one patient are not independent; resampling patients keeps
    that correlation inside each replicate, so intervals are honest.

    Returns
    -------
    dict
        ``{metric: {"value": v, "low": l, "high": h}}``, plus ``confusion``,
        ``threshold`` and ``n`` (rows) and ``n_groups``.
    """
    labels, scores, groups = np.asarray(labels), np.asarray(scores), np.asarray(groups)
    point = point_metrics(labels, scores, threshold)
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    rng = np.random.default_rng(seed)
    samples = {m: [] for m in METRICS}
    for _ in range(n_boot):
        chosen = rng.integers(0, len(unique), len(unique))
        index = np.concatenate([members[g] for g in chosen])
        values = point_metrics(labels[index], scores[index], threshold)
        for m in METRICS:
            if values[m] is not None:
                samples[m].append(values[m])
    alpha = (1 - level) / 2
    result = {}
    for m in METRICS:
        draws = np.array(samples[m])
        low, high = (np.quantile(draws, [alpha, 1 - alpha]) if draws.size else (None, None))
        result[m] = {"value": point[m], "low": None if low is None else float(low),
                     "high": None if high is None else float(high)}
    result.update({"confusion": confusion(labels, scores, threshold), "threshold": threshold,
                   "n": int(len(labels)), "n_groups": int(len(unique))})
    return result


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates for plotting."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr


def calibration_bins(labels, scores, bins: int = 10) -> list[dict]:
    """Reliability diagram: per equal-width probability bin, mean predicted probability, observed rate, count."""
    labels, scores = np.asarray(labels, dtype=float), np.asarray(scores, dtype=float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(scores, edges[1:-1]), 0, bins - 1)
    return [{"predicted": float(scores[which == b].mean()), "observed": float(labels[which == b].mean()),
             "n": int((which == b).sum())} for b in range(bins) if (which == b).any()]


def brier(labels, scores) -> float:
    """Mean squared distance between probability and outcome: 0 is perfect, 0.25 is a coin at 0.5."""
    return float(np.mean((np.asarray(scores, dtype=float) - np.asarray(labels, dtype=float)) ** 2))


def pr_points(labels, scores) -> tuple[np.ndarray, np.ndarray, float]:
    """Precision-recall curve (recall, precision) and average precision."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    precision, recall, _ = precision_recall_curve(labels, scores)
    return recall, precision, float(average_precision_score(labels, scores))
