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

from ctlake import config as cfg
from ctlake.core.metrics import aggregate_probabilities
from ctlake.errors import InputError
from ctlake.spark import features as featurize
from ctlake.spark import patches, preprocess, tables
from pyspark.ml import PipelineModel
from pyspark.ml.functions import vector_to_array
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

log = logging.getLogger("ctlake.score")

PREDICTIONS = "predictions"
EVIDENCE = T.StructType([
    T.StructField("patch_id", T.StringType()),
    T.StructField("sop_uid", T.StringType()),
    T.StructField("slice_index", T.IntegerType()),
    T.StructField("center_row", T.DoubleType()),
    T.StructField("center_col", T.DoubleType()),
    T.StructField("p", T.DoubleType()),
])
PREDICTIONS_SCHEMA = T.StructType([
    T.StructField("run_id", T.StringType()),
    T.StructField("patient_pseudonym", T.StringType()),
    T.StructField("series_uid", T.StringType()),
    T.StructField("patches_scored", T.IntegerType()),
    T.StructField("p_random_forest", T.DoubleType()),
    T.StructField("p_svm_ensemble", T.DoubleType()),
    T.StructField("p_ensemble", T.DoubleType()),
    T.StructField("threshold", T.DoubleType()),
    T.StructField("cancer_predicted", T.BooleanType()),
    T.StructField("evidence", T.ArrayType(EVIDENCE)),
    T.StructField("scored_at", T.TimestampType()),
])
tables.SCHEMAS[PREDICTIONS] = PREDICTIONS_SCHEMA


def load_run(spark: SparkSession, config: dict, run_id: str) -> dict:
    """The run's metadata; a clear InputError when the run does not exist or does not match."""
    path = f"{cfg.get(config, 'warehouse', str).rstrip('/')}/models/{run_id}"
    try:
        meta = json.loads(tables.read_text(spark, f"{path}/run.json"))
    except InputError:
        known = []
        if tables.exists(spark, config, "runs"):
            known = [r["run_id"] for r in tables.read(spark, config, "runs").select("run_id").collect()]
        raise InputError(f"run {run_id!r} does not exist under {path}; known runs: "
                         f"{', '.join(sorted(known)[-5:]) or 'none'}") from None
    current = featurize.layout(cfg.positive_int(config, "features.pixel_size", 16))
    if meta["layout_hash"] != current["hash"] or meta["feature_names"] != current["radiomics"]:
        raise InputError(f"run {run_id} was trained on feature layout {meta['layout_hash']} but this ctlake "
                         f"computes {current['hash']}: retrain, or score with the ctlake version of that run")
    geometry = patches.geometry(patches.params_from_config(config))
    if meta.get("patch_geometry") != geometry:
        raise InputError(f"run {run_id} was trained on patches {meta.get('patch_geometry')} but the configuration "
                         f"cuts {geometry}: set patches.* back, or retrain")
    meta["models_path"] = path
    return meta


def run(spark: SparkSession, config: dict, run_id: str, series: list[str] | None = None) -> dict:
    meta = load_run(spark, config, run_id)
    if not series:
        # New scans: series of patients the run never saw, not yet scored by it.
        scored = set()
        if tables.exists(spark, config, PREDICTIONS):
            scored = {r["series_uid"] for r in tables.read(spark, config, PREDICTIONS)
                      .filter(F.col("run_id") == run_id).select("series_uid").collect()}
        seen = set(meta.get("patients", []))
        series = sorted({r["series_uid"] for r in tables.read(spark, config, tables.SERIES)
                         .select("series_uid", "patient_pseudonym").collect()
                         if r["patient_pseudonym"] not in seen} - scored)
    if not series:
        return {"run_id": run_id, "series_scored": 0}
    missing = set(series) - {r["series_uid"] for r in tables.read(spark, config, tables.SERIES)
                             .filter(F.col("series_uid").isin(series)).select("series_uid").collect()}
    if missing:
        raise InputError(f"series not ingested: {', '.join(sorted(missing))}")

    preprocess.run(spark, config)
    patches.run(spark, config, mode="window", series=series)
    featurize.run(spark, config)
    names = meta["feature_names"]
    feats = (tables.read(spark, config, featurize.FEATURES).filter(F.col("error").isNull())
             .filter((F.col("mode") == "window") & F.col("series_uid").isin(series))
             .filter(F.col("layout_hash") == meta["layout_hash"])
             .filter(F.col("params_hash") == patches.params_hash(patches.params_from_config(config))))
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
    how, threshold = meta["aggregate"], float(meta["thresholds"]["ensemble"])
    k = cfg.positive_int(config, "train.evidence_k", 3)
    rows = []
    for (patient, uid), group in scored.groupby(["patient_pseudonym", "series_uid"]):
        p = aggregate_probabilities(group["p"], how)
        top = group.sort_values("p", ascending=False).head(k)
        rows.append((run_id, patient, uid, int(len(group)), aggregate_probabilities(group["p_random_forest"], how),
                     aggregate_probabilities(group["p_svm_ensemble"], how), p, threshold, bool(p >= threshold),
                     [(r.patch_id, r.sop_uid, int(r.slice_index), float(r.center_row), float(r.center_col),
                       float(r.p)) for r in top.itertuples()], None))
    predictions = (spark.createDataFrame(rows, PREDICTIONS_SCHEMA)
                   .withColumn("scored_at", F.current_timestamp()))
    tables.merge_upsert(spark, config, PREDICTIONS, predictions, ["run_id", "series_uid"])
    return {"run_id": run_id, "series_scored": len(rows), "patches_scored": int(len(scored)),
            "predictions": {uid[-12:]: {"p_ensemble": round(r[6], 3), "cancer_predicted": r[8]}
                            for r in rows for uid in [r[2]]}}
