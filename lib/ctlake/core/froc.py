"""Detection measured the LUNA16 way: candidates matched to annotated nodules, FROC and CPM.

Hit rule (LUNA16): a candidate hits a nodule when its centre lies within the
nodule's radius (``diameter_mm / 2``) of the annotated centre.  A nodule
counts as found at the highest score of the candidates hitting it; the other
candidates hitting it are neither true nor false positives.  A candidate
hitting an *excluded* nodule (smaller than the size the metric is stated
for) is ignored too, as LUNA16 ignores hits on its "irrelevant findings".
Every other candidate is a false positive.

Pure numpy/pandas.  Candidates are rows ``series_uid, coord_x, coord_y,
coord_z, score``; nodules are rows ``series_uid, coordX, coordY, coordZ,
diameter_mm`` in the same patient mm.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

#: False positives per scan at which LUNA16 reads sensitivity; CPM is their mean.
FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def match_candidates(candidates: pd.DataFrame, nodules: pd.DataFrame) -> np.ndarray:
    """For each candidate, the positional index in ``nodules`` of the nearest nodule it hits, else -1."""
    matched = np.full(len(candidates), -1, dtype=int)
    if candidates.empty or nodules.empty:
        return matched
    cand_xyz = candidates[["coord_x", "coord_y", "coord_z"]].to_numpy(float)
    cand_series = candidates["series_uid"].to_numpy()
    node_xyz = nodules[["coordX", "coordY", "coordZ"]].to_numpy(float)
    radius = nodules["diameter_mm"].to_numpy(float) / 2
    node_series = nodules["series_uid"].to_numpy()
    for uid in np.intersect1d(cand_series, node_series):
        ci, ni = np.flatnonzero(cand_series == uid), np.flatnonzero(node_series == uid)
        distance = np.linalg.norm(cand_xyz[ci, None, :] - node_xyz[None, ni, :], axis=2)
        inside = distance <= radius[ni][None, :]
        nearest = np.where(inside, distance, np.inf).argmin(axis=1)
        hit = inside[np.arange(len(ci)), nearest]
        matched[ci[hit]] = ni[nearest[hit]]
    return matched


def froc(candidates: pd.DataFrame, nodules: pd.DataFrame, n_scans: int, min_diameter_mm: float = 3.0,
         fp_rates=FP_RATES, include: np.ndarray | None = None) -> dict:
    """Sensitivity at each false-positive rate per scan, CPM, and the curve.

    Parameters
    ----------
    candidates, nodules : DataFrame
        As in the module docstring; ``score`` ranks the candidates.
    n_scans : int
        Scans the candidates came from (those without any candidate count).
    min_diameter_mm : float
        Nodules below it are excluded (hits on them are ignored).
    include : ndarray of bool, optional
        Which nodules (of those large enough) count for sensitivity, e.g. one
        size or texture group; hits on the others are ignored, as above.

    Returns
    -------
    dict
        ``sensitivity`` {rate: value}, ``cpm``, ``nodules`` counted, ``scans``,
        ``max_sensitivity`` (at any number of candidates), ``curve`` (FP per
        scan, sensitivity) points.
    """
    if n_scans < 1:
        raise ValueError(f"n_scans must be >= 1, found {n_scans}")
    counted = nodules["diameter_mm"].to_numpy(float) >= min_diameter_mm
    if include is not None:
        counted &= np.asarray(include, dtype=bool)
    matched = match_candidates(candidates, nodules)
    scores = candidates["score"].to_numpy(float)
    false = matched < 0
    n_nodules = int(counted.sum())
    best = np.full(len(nodules), -np.inf)
    for index in np.flatnonzero(~false):
        best[matched[index]] = max(best[matched[index]], scores[index])
    found_scores = best[counted]
    fp_scores = np.sort(scores[false])[::-1]
    thresholds = np.unique(np.concatenate([found_scores[np.isfinite(found_scores)], fp_scores]))[::-1]
    fp_per_scan = np.searchsorted(-fp_scores, -thresholds, side="right") / n_scans
    sensitivity = (np.array([(found_scores >= t).sum() for t in thresholds]) / n_nodules
                   if n_nodules else np.zeros(len(thresholds)))
    at = {}
    for rate in fp_rates:
        within = fp_per_scan <= rate
        at[rate] = float(sensitivity[within].max()) if within.any() else 0.0
    return {"sensitivity": at, "cpm": float(np.mean(list(at.values()))), "nodules": n_nodules, "scans": n_scans,
            "max_sensitivity": float(np.isfinite(found_scores).mean()) if n_nodules else 0.0,
            "curve": list(zip(fp_per_scan.round(4).tolist(), sensitivity.round(4).tolist()))}


#: Nodule groups FROC is reported for: LIDC texture ratings (1 ground glass .. 5 solid) and size.
GROUPS = {
    "ground glass (texture 1-2)": lambda n: n["texture"] <= 2,
    "part solid (texture 3-4)": lambda n: (n["texture"] > 2) & (n["texture"] < 5),
    "solid (texture 5)": lambda n: n["texture"] >= 5,
    "3-6 mm": lambda n: n["diameter_mm"] < 6,
    "6-10 mm": lambda n: (n["diameter_mm"] >= 6) & (n["diameter_mm"] < 10),
    "10 mm and more": lambda n: n["diameter_mm"] >= 10,
}


def froc_report(candidates: pd.DataFrame, nodules: pd.DataFrame, n_scans: int, min_diameter_mm: float = 3.0
                ) -> dict:
    """:func:`froc` over all nodules and per :data:`GROUPS` (``nodules`` needs ``texture``), curves left out."""
    def brief(result: dict) -> dict:
        return {k: v for k, v in result.items() if k != "curve"}

    out = {"all": froc(candidates, nodules, n_scans, min_diameter_mm)}
    for name, rule in GROUPS.items():
        out[name] = brief(froc(candidates, nodules, n_scans, min_diameter_mm, include=rule(nodules).to_numpy()))
    return out
