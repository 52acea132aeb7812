"""Scoring job: apply a saved training run to series, into the ``predictions`` table.

For each series: preprocess any new slices, cut sliding-window patches over
the lung, compute features, score the patches with the run's random forest
and SVM ensemble, average them, and aggregate to the patient the way the run
was evaluated. Each prediction keeps its evidence: the top patches with
their slice and position.
"""
from __future__ import annotations

import json
import logging

import pandas as pd
from pyspark.ml import PipelineModel
from pyspark.ml.functions import vector_to_array
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from ctlake.config import Settings
from ctlake.core.metrics import aggregate_probabilities
from ctlake.core.patch_tasks import params_hash, patch_geometry
from ctlake.core.radiomics import feature_layout
from ctlake.errors import InputError
from ctlake.spark import features, patches, preprocess, tables

#: The ``--run-id`` that means the newest run of the configured warehouse.
LATEST = "latest"

log = logging.getLogger("ctlake.score")



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
    geometry = patch_geometry(settings.patches.params())
    if meta.get("patch_geometry") != geometry:
        raise InputError(f"run {run_id} was trained on patches {meta.get('patch_geometry')} but the configuration "
                         f"cuts {geometry}: set patches.* back, or retrain")
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


def run(spark: SparkSession, settings: Settings, run_id: str = LATEST, series: list[str] | None = None) -> dict:
    """Score the series (default: new patients') with a run (default: the newest) into ``predictions``."""
    meta = load_run(spark, settings, run_id)
    run_id = meta["run_id"]
    series = series_to_score(spark, settings.warehouse, meta, series)
    if not series:
        return {"run_id": run_id, "series_scored": 0}
    preprocess.run(spark, settings)
    patches.run(spark, settings, mode="window", series=series)
    features.run(spark, settings)
    scored = window_scores(spark, settings, meta, series)
    rows = prediction_rows(scored, meta, settings.train.evidence_k)
    predictions = (spark.createDataFrame(rows, tables.PREDICTIONS_SCHEMA)
                   .withColumn("scored_at", F.current_timestamp()))
    tables.merge_upsert(spark, settings.warehouse, tables.PREDICTIONS, predictions, ["run_id", "series_uid"])
    return {"run_id": run_id, "series_scored": len(rows), "patches_scored": int(len(scored)),
            "predictions": {uid[-12:]: {"p_ensemble": round(r[6], 3), "cancer_predicted": r[8]}
                            for r in rows for uid in [r[2]]}}


def window_scores(spark: SparkSession, settings: Settings, meta: dict, series: list[str]) -> pd.DataFrame:
    """Every window patch of the series with both models' probabilities and their mean ``p``."""
    names = meta["feature_names"]
    feats = (tables.read(spark, settings.warehouse, tables.FEATURES).filter(F.col("error").isNull())
             .filter((F.col("mode") == "window") & F.col("series_uid").isin(series))
             .filter(F.col("layout_hash") == meta["layout_hash"])
             .filter(F.col("params_hash") == params_hash(settings.patches.params())))
    frame = feats.select("patch_id", "patient_pseudonym", "series_uid", "sop_uid", "slice_index", "center_row",
                         "center_col", *[F.col("radiomics")[i].alias(n) for i, n in enumerate(names)])
    probabilities = {}
    for model in ("random_forest", "svm_ensemble"):
        fitted = PipelineModel.load(f"{meta['models_path']}/{model}")
        probabilities[model] = (fitted.transform(frame)
                                .select("patch_id", vector_to_array("probability")[1].alias(f"p_{model}")))
    scored = (frame.select("patch_id", "patient_pseudonym", "series_uid", "sop_uid", "slice_index", "center_row",
                           "center_col")
              .join(probabilities["random_forest"], "patch_id").join(probabilities["svm_ensemble"], "patch_id")
              .toPandas())
    scored["p"] = (scored["p_random_forest"] + scored["p_svm_ensemble"]) / 2
    return scored


def prediction_rows(scored: pd.DataFrame, meta: dict, evidence_k: int) -> list[tuple]:
    """One ``predictions`` row per series (``PREDICTIONS_SCHEMA`` order, ``scored_at`` null), aggregated as the run was."""
    how, threshold = meta["aggregate"], float(meta["thresholds"]["ensemble"])
    rows = []
    for (patient, uid), group in scored.groupby(["patient_pseudonym", "series_uid"]):
        p = aggregate_probabilities(group["p"], how)
        top = group.sort_values("p", ascending=False).head(evidence_k)
        rows.append((meta["run_id"], patient, uid, int(len(group)), aggregate_probabilities(group["p_random_forest"], how),
                     aggregate_probabilities(group["p_svm_ensemble"], how), p, threshold, bool(p >= threshold),
                     [(r.patch_id, r.sop_uid, int(r.slice_index), float(r.center_row), float(r.center_col),
                       float(r.p)) for r in top.itertuples()], None))
    return rows
