"""Scoring job: apply a saved training run to series, into the ``predictions`` table.

For each series: preprocess any new slices, detect nodule candidates, cut
their patches, compute features, score every candidate with the run's two
stages (P(nodule) x P(malignant), per family and for the ensemble), and
aggregate to the patient the way the run was evaluated (the run's validation
and test patients went through this same path).  Sliding windows over the
lung replace the detector only when asked (``mode="window"``).  Each
prediction keeps its evidence: the top candidates with their slice and position.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from ctlake.config import Settings
from ctlake.core.detect import detector_hash
from ctlake.core.metrics import aggregate_probabilities, bootstrap_metrics
from ctlake.core.patch_tasks import params_hash, patch_geometry
from ctlake.core.radiomics import feature_layout
from ctlake.errors import InputError
from ctlake.spark import detect, features, patches, preprocess, tables
from ctlake.spark.models import candidate_scores, load_models
from ctlake.spark.report import evidence_picture, evidence_slices

#: The ``--run-id`` that means the newest run of the configured warehouse.
LATEST = "latest"

log = logging.getLogger("ctlake.score")
#: Position of each field in a ``predictions`` row tuple.
FIELD = {name: i for i, name in enumerate(tables.PREDICTIONS_SCHEMA.fieldNames())}



def load_run(spark: SparkSession, settings: Settings, run_id: str) -> dict:
    """The run's metadata; a clear InputError when the run does not exist or does not match."""
    warehouse = settings.warehouse
    if run_id == LATEST:
        run_id = tables.latest_run_id(spark, warehouse)
    path = tables.models_path(warehouse, run_id)
    try:
        meta = json.loads(tables.read_text(spark, f"{path}/run.json"))
    except InputError:
        known = [r["run_id"] for r in tables.read(spark, warehouse, tables.RUNS).select("run_id").collect()]
        raise InputError(f"run {run_id!r} does not exist under {path}; known runs: "
                         f"{', '.join(sorted(known)[-5:]) or 'none'}") from None
    current = feature_layout(settings.features.pixel_size)
    if meta["layout_hash"] != current["hash"] or meta["feature_names"] != current["radiomics"]:
        raise InputError(f"run {run_id} was trained on feature layout {meta['layout_hash']} but this ctlake "
                         f"computes {current['hash']}: retrain, or score with the ctlake version of that run")
    if meta.get("detector_hash") != detector_hash(settings.detect.params()):
        raise InputError(f"run {run_id} was trained on candidates of detector {meta.get('detector_hash')} but the "
                         "configuration detects with other detect.* settings: set them back, or retrain")
    geometry = patch_geometry(settings.patches.params())
    if meta.get("patch_geometry") != geometry:
        raise InputError(f"run {run_id} was trained on patches {meta.get('patch_geometry')} but the configuration "
                         f"cuts {geometry}: set patches.* back, or retrain")
    if "ensemble_members" not in meta:
        raise InputError(f"run {run_id} was trained by an older ctlake (no CNN, no ensemble choice): retrain")
    meta["models_path"] = path
    return meta


def series_to_score(spark: SparkSession, warehouse: str, meta: dict, series: list[str] | None) -> list[str]:
    """The given series (all ingested, else InputError), or the new patients' series not yet scored by the run."""
    known = tables.read(spark, warehouse, tables.SERIES).select("series_uid", "patient_pseudonym")
    if series:
        missing = set(series) - {r["series_uid"] for r in known.filter(F.col("series_uid").isin(series)).collect()}
        if missing:
            raise InputError(f"series not ingested: {', '.join(sorted(missing))}")
        return series
    scored = {r["series_uid"] for r in tables.read(spark, warehouse, tables.PREDICTIONS)
              .filter(F.col("run_id") == meta["run_id"]).select("series_uid").collect()}
    seen = set(meta.get("patients", []))
    return sorted({r["series_uid"] for r in known.collect() if r["patient_pseudonym"] not in seen} - scored)


def run(spark: SparkSession, settings: Settings, run_id: str = LATEST, series: list[str] | None = None,
        mode: str = "detected", labels: str | None = None) -> dict:
    """Score the series (default: new patients') with a run (default: the newest) into ``predictions``.

    With ``labels`` (a ``labels.csv``), the summary also holds the run's
    predictions for those series measured against them.
    """
    meta = load_run(spark, settings, run_id)
    run_id = meta["run_id"]
    summary = score_series(spark, settings, meta, series_to_score(spark, settings.warehouse, meta, series), mode)
    if labels:
        summary["against_labels"] = against_labels(spark, settings, run_id, labels)
    return summary


def score_series(spark: SparkSession, settings: Settings, meta: dict, series: list[str], mode: str) -> dict:
    """Preprocess, detect, cut, featurize and score ``series``; their ``predictions`` rows; the summary."""
    run_id = meta["run_id"]
    if not series:
        return {"run_id": run_id, "series_scored": 0}
    preprocess.run(spark, settings)
    if mode == "detected":
        detect.run(spark, settings)
    patches.run(spark, settings, mode=mode, series=series)
    features.run(spark, settings)
    scored = candidate_rows(spark, settings, meta, series, mode)
    patients = {r["series_uid"]: r["patient_pseudonym"] for r in tables.read(spark, settings.warehouse, tables.SERIES)
                .filter(F.col("series_uid").isin(series)).select("series_uid", "patient_pseudonym").collect()}
    rows = prediction_rows(scored, patients, meta, settings.train.evidence_k)
    predictions = (spark.createDataFrame(rows, tables.PREDICTIONS_SCHEMA)
                   .withColumn("scored_at", F.current_timestamp()))
    tables.merge_upsert(spark, settings.warehouse, tables.PREDICTIONS, predictions, ["run_id", "series_uid"])
    by_sop = evidence_slices(spark, settings.warehouse, [{"sop_uid": e[1]} for r in rows for e in r[FIELD["evidence"]]])
    return {"run_id": run_id, "mode": mode, "series_scored": len(rows), "patches_scored": int(len(scored)),
            "predictions": {r[FIELD["series_uid"]][-12:]: {"p_ensemble": round(r[FIELD["p_ensemble"]], 3),
                                                           "p_cnn": round(r[FIELD["p_cnn"]], 3),
                                                           "cancer_predicted": r[FIELD["cancer_predicted"]],
                                                           "evidence_picture": evidence_file(by_sop, settings, run_id, r)}
                            for r in rows}}


def against_labels(spark: SparkSession, settings: Settings, run_id: str, labels_path: str) -> dict:
    """The run's predictions for the series of a ``labels.csv`` against those labels (an external check).

    Patient level at the run's own threshold, with 95% bootstrap intervals:
    what a cohort the run never saw says about it.
    """
    labels = tables.read_labels(spark, labels_path).select(F.col("seriesuid").alias("series_uid"), "label")
    scored = (tables.read(spark, settings.warehouse, tables.PREDICTIONS).filter(F.col("run_id") == run_id)
              .join(labels, "series_uid").select("patient_pseudonym", "label", "p_ensemble", "threshold").toPandas())
    if scored.empty or scored["label"].nunique() < 2:
        return {"series": int(len(scored)), "note": "needs scored series of both labels"}
    result = bootstrap_metrics(scored["label"].to_numpy(), scored["p_ensemble"].to_numpy(),
                               scored["patient_pseudonym"].to_numpy(), float(scored["threshold"].iat[0]),
                               settings.train.bootstrap, settings.train.seed)
    return {"series": int(len(scored)), "with_cancer": int(scored["label"].sum()),
            **{m: {k: round(v, 3) for k, v in result[m].items() if v is not None}
               for m in ("auc", "sensitivity", "specificity")}}


def evidence_file(by_sop: dict, settings: Settings, run_id: str, row: tuple) -> str | None:
    """The prediction's evidence candidates boxed on their slices: ``<report.folder>/scored/<run>/<series>.png``."""
    evidence = [dict(zip(("patch_id", "sop_uid", "slice_index", "center_row", "center_col", "p"), e))
                for e in row[FIELD["evidence"]]]
    path = Path(settings.report.folder) / "scored" / run_id / f"series_{row[FIELD['series_uid']][-12:]}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path) if evidence_picture(by_sop, evidence, settings.patches.size_mm, path) else None


def candidate_rows(spark: SparkSession, settings: Settings, meta: dict, series: list[str], mode: str) -> pd.DataFrame:
    """Every detected (or window) patch of the series with each stage's and combination's probability."""
    names = meta["feature_names"]
    feats = (tables.read(spark, settings.warehouse, tables.FEATURES).filter(F.col("error").isNull())
             .filter((F.col("mode") == mode) & F.col("series_uid").isin(series))
             .filter(F.col("layout_hash") == meta["layout_hash"])
             .filter(F.col("params_hash") == params_hash(settings.patches.params())))
    keep = ["patch_id", "patient_pseudonym", "series_uid", "sop_uid", "slice_index", "center_row", "center_col"]
    frame = feats.select(*keep, *[F.col("radiomics")[i].alias(n) for i, n in enumerate(names)]).cache()
    pixels = (tables.read(spark, settings.warehouse, tables.PATCHES).filter(F.col("series_uid").isin(series))
              .select("patch_id", "pixels", "patch_shape"))
    scored = candidate_scores(load_models(meta["models_path"]), frame, keep, pixels, meta["ensemble_members"])
    frame.unpersist()
    return scored


def prediction_rows(scored: pd.DataFrame, patients: dict[str, str], meta: dict, evidence_k: int) -> list[tuple]:
    """One ``predictions`` row per series (``PREDICTIONS_SCHEMA`` order, ``scored_at`` null), aggregated as the run was.

    A series without any candidate scores 0, as such patients did in the run's evaluation.
    """
    how, threshold = meta["aggregate"], float(meta["thresholds"]["ensemble"])
    rows = []
    for uid, patient in sorted(patients.items()):
        group = scored[scored["series_uid"] == uid]
        p = {name: aggregate_probabilities(group[f"p_{name}"], how) if len(group) else 0.0
             for name in ("random_forest", "svm_ensemble", "cnn", "ensemble")}
        top = group.sort_values("p_ensemble", ascending=False).head(evidence_k)
        rows.append((meta["run_id"], patient, uid, int(len(group)), p["random_forest"], p["svm_ensemble"],
                     p["cnn"], p["ensemble"], threshold, bool(p["ensemble"] >= threshold),
                     [(r.patch_id, r.sop_uid, int(r.slice_index), float(r.center_row), float(r.center_col),
                       float(r.p_ensemble)) for r in top.itertuples()], None))
    return rows
