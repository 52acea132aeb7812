"""Training and evaluation job: patient-grouped splits, random forest, per-partition SVMs, ensemble.

Patch target: 1 for a patch centred on a *malignant* nodule, 0 for benign
nodules, non-nodule candidates and random negatives; patches of indeterminate
nodules are left out of training (their label is what the readers could not
agree on) but are scored. A patient's probability of cancer is an aggregate
(max by default) of its patch probabilities, which is what is evaluated
against the patient label (any malignant nodule).
"""
from __future__ import annotations

import json
import logging
import subprocess
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial

import numpy as np
import pandas as pd
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import RandomForestClassifier
from pyspark.ml.evaluation import BinaryClassificationEvaluator
from pyspark.ml.feature import StandardScaler, VectorAssembler
from pyspark.ml.functions import vector_to_array
from pyspark.ml.tuning import CrossValidator, ParamGridBuilder
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from ctlake.config import Settings, TrainSettings
from ctlake.core.evaluation import aggregate, evaluate, top_patches
from ctlake.core.patch_tasks import params_hash, patch_geometry
from ctlake.core.radiomics import feature_layout
from ctlake.core.splits import split_patients, split_sizes
from ctlake.core.svm_partition import svm_grid
from ctlake.errors import InputError
from ctlake.spark import tables
from ctlake.spark.partitioned_svc import PartitionedSVC, tune_partitioned_svc
from ctlake.spark.report import write_report

log = logging.getLogger("ctlake.train")


@dataclass
class TrainingData:
    """The rows a run trains and evaluates on, split by patient."""

    names: list[str]
    assignment: pd.DataFrame
    sizes: dict
    frame: DataFrame
    train: DataFrame
    validation: DataFrame
    evaluation: DataFrame


def with_weights(frame: DataFrame, how: str) -> DataFrame:
    """``frame`` plus a ``weight`` column for training and tuning.

    ``"groups"``: malignant nodules, benign nodules and everything else
    (other candidates, random negatives) each carry a third of the total
    weight.  Benign nodules are the negatives that look most like cancer but
    are a few per cent of the negative patches; unweighted, a model learns
    "nodule or not" and ranks benign nodules with the malignant ones
    (measured: nodule-level AUC 0.79 unweighted, 0.87 with groups, grouped
    cross-validation on the sample cohort).  ``"none"``: every row 1.
    """
    if how == "none":
        return frame.withColumn("weight", F.lit(1.0))
    group = (F.when(F.col("target") == 1.0, "malignant").when(F.col("nodule_label") == "benign", "benign")
             .otherwise("other"))
    counts = {r["g"]: r["count"] for r in frame.groupBy(group.alias("g")).count().collect()}
    total = sum(counts.values())
    weight = F.lit(1.0)
    for name, count in counts.items():
        weight = F.when(group == name, F.lit(total / (len(counts) * count))).otherwise(weight)
    return frame.withColumn("weight", weight)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              check=True).stdout.strip()
    except Exception:
        return None


def patient_labels(spark: SparkSession, settings: Settings) -> pd.DataFrame:
    """One row per patient: pseudonym and cancer label (any labelled series positive)."""
    labels = tables.read_labels(spark, settings.train.labels)
    series = tables.read(spark, settings.warehouse, tables.SERIES).select("series_uid", "patient_pseudonym")
    joined = labels.join(series, labels["seriesuid"] == series["series_uid"])
    frame = joined.groupBy("patient_pseudonym").agg(F.max("label").alias("label")).toPandas()
    return frame.rename(columns={"patient_pseudonym": "patient"})


def training_frame(spark: SparkSession, settings: Settings, names: list[str], assignment: pd.DataFrame) -> DataFrame:
    """Feature rows with split, fold, patch target and one named column per radiomics feature."""
    current = params_hash(settings.patches.params())
    features = (tables.read(spark, settings.warehouse, tables.FEATURES).filter(F.col("error").isNull())
                .filter(F.col("mode").isin("candidate", "negative") & (F.col("params_hash") == current)))
    nodules = tables.read_nodules(spark, settings.train.nodules)
    split = spark.createDataFrame(assignment.rename(columns={"patient": "patient_pseudonym",
                                                             "label": "patient_label"}))
    frame = (features.join(F.broadcast(nodules), "candidate_id", "left")
             .join(F.broadcast(split), "patient_pseudonym", "inner")
             .withColumn("target", F.when(F.col("nodule_label") == "malignant", 1.0).otherwise(0.0))
             .withColumn("trainable", F.col("nodule_label").isNull() | (F.col("nodule_label") != "indeterminate")))
    return frame.select("*", *[F.col("radiomics")[i].alias(name) for i, name in enumerate(names)])


def load_training_data(spark: SparkSession, settings: Settings) -> TrainingData:
    """Split the patients, and lay their feature rows out the same way on every run (cached)."""
    if not tables.exists(spark, settings.warehouse, tables.FEATURES):
        raise InputError("no features table: run jobs/features.py first")
    names = tables.feature_names(tables.read(spark, settings.warehouse, tables.FEATURES), "radiomics")
    if names != feature_layout(settings.features.pixel_size)["radiomics"]:
        raise InputError("features table layout differs from this ctlake version: re-run jobs/features.py")
    train = settings.train
    assignment = split_patients(patient_labels(spark, settings), train.split, train.folds, train.seed)
    sizes = split_sizes(assignment)
    log.info("split (patients): %s", sizes)
    # A fixed layout of rows over partitions: the forest's bootstrap is drawn per partition, and the
    # scaler's sums (whose last bits decide the SVM's partition hash) follow partition order. Without it
    # two runs on the same tables differed by 0.09 in SVM nodule AUC.
    frame = (training_frame(spark, settings, names, assignment)
             .repartition(train.partitions, "patch_id").sortWithinPartitions("patch_id").cache())
    return TrainingData(
        names=names, assignment=assignment, sizes=sizes, frame=frame,
        train=with_weights(frame.filter((F.col("split") == "train") & F.col("trainable")), train.weighting),
        validation=with_weights(frame.filter((F.col("split") == "validation") & F.col("trainable")),
                                train.weighting),
        evaluation=frame.filter(F.col("split").isin("validation", "test")))


def rf_pipeline(names: list[str], seed: int) -> tuple[Pipeline, RandomForestClassifier]:
    assembler = VectorAssembler(inputCols=names, outputCol="features", handleInvalid="keep")
    forest = RandomForestClassifier(featuresCol="features", labelCol="target", seed=seed, weightCol="weight",
                                    probabilityCol="probability", rawPredictionCol="rawPrediction")
    return Pipeline(stages=[assembler, forest]), forest


def svm_features(names: list[str]) -> Pipeline:
    """Assembled and standardized features: SVMs are not scale-invariant."""
    assembler = VectorAssembler(inputCols=names, outputCol="raw_features", handleInvalid="keep")
    scaler = StandardScaler(inputCol="raw_features", outputCol="features", withMean=True, withStd=True)
    return Pipeline(stages=[assembler, scaler])


def svm_params(train: TrainSettings) -> dict:
    """The PartitionedSVC Params every candidate shares."""
    # The weight column already balances the classes: no class_weight on top of it.
    return {"featuresCol": "features", "labelCol": "target", "seed": train.seed, "numPartitions": train.svm.partitions,
            "maxRowsPerPartition": train.svm.max_rows_per_partition, "weightCol": "weight", "classWeight": "none"}


def evaluator() -> BinaryClassificationEvaluator:
    """Weighted ROC AUC of the positive-class probability: what both models are tuned on."""
    return BinaryClassificationEvaluator(labelCol="target", rawPredictionCol="probability",
                                         weightCol="weight", metricName="areaUnderROC")


def scores(model: PipelineModel, frame: DataFrame) -> pd.DataFrame:
    """Patch probabilities with what evaluation needs, brought to the driver (no pixels)."""
    out = model.transform(frame).select(
        "patch_id", "patient_pseudonym", "series_uid", "sop_uid", "slice_index", "center_row", "center_col",
        "mode", "candidate_id", "nodule_label", "target", "patient_label", "split",
        vector_to_array("probability")[1].alias("p"))
    return out.toPandas()


def fit_forest(data: TrainingData, train: TrainSettings) -> tuple[PipelineModel, dict]:
    """The forest tuned by cross-validation over the training patients' folds; its tuning record."""
    rf, forest = rf_pipeline(data.names, train.seed)
    grid = (ParamGridBuilder()
            .addGrid(forest.numTrees, train.rf.num_trees)
            .addGrid(forest.maxDepth, train.rf.max_depth)
            .addGrid(forest.featureSubsetStrategy, [str(v) for v in train.rf.feature_subset])
            .addGrid(forest.maxBins, train.rf.max_bins).build())
    cv = CrossValidator(estimator=rf, estimatorParamMaps=grid, evaluator=evaluator(), foldCol="fold",
                        numFolds=train.folds, parallelism=train.parallelism, seed=train.seed)
    cv_model = cv.fit(data.train)
    best_index = int(np.argmax(cv_model.avgMetrics))
    return cv_model.bestModel, {"rf_best": {p.name: v for p, v in grid[best_index].items()},
                                "rf_cv_auc": [float(a) for a in cv_model.avgMetrics]}


def fit_svm(data: TrainingData, train: TrainSettings) -> tuple[PipelineModel, dict]:
    """The SVM ensemble tuned on the validation patients (weighted AUC), refitted on the training patients."""
    prepare = svm_features(data.names).fit(data.train)
    grid = svm_grid(train.svm.kernel, train.svm.c, train.svm.gamma)
    best, results = tune_partitioned_svc(prepare.transform(data.train), prepare.transform(data.validation), grid,
                                         evaluator=evaluator(), **svm_params(train))
    tuning = [{**candidate, "validation_auc": result["areaUnderROC"]} for candidate, result in zip(grid, results)]
    chosen = {k: best[k] for k in ("kernel", "C", "gamma")}
    model = Pipeline(stages=[*svm_features(data.names).getStages(),
                             PartitionedSVC(**svm_params(train), **chosen)]).fit(data.train)
    return model, {"svm_best": chosen, "svm_tuning": tuning}


def shuffled_control(spark: SparkSession, data: TrainingData, train: TrainSettings, rf_best: dict
                     ) -> tuple[pd.DataFrame, dict, dict[str, list[float]]]:
    """The forest trained on permuted (target, weight) pairs: first scores and metrics, and every AUC.

    One permutation is one draw of a noisy AUC (+-0.1 with 40 test patients),
    so it is repeated and its spread reported.
    """
    control_aucs: dict[str, list[float]] = {}
    for repeat in range(train.control_repeats):
        control, control_forest = rf_pipeline(data.names, train.seed)
        control_forest.setNumTrees(rf_best["numTrees"]).setMaxDepth(rf_best["maxDepth"])
        scored = scores(control.fit(_shuffled(spark, data.train, train.seed + repeat)), data.evaluation)
        result = evaluate(scored, train.aggregate, min(train.bootstrap, 200) if repeat == 0 else 20, train.seed)
        if repeat == 0:
            first_scores, first_result = scored, result
        for level, metrics in result.items():
            control_aucs.setdefault(level, []).append(round(metrics["auc"]["value"], 4))
    return first_scores, first_result, control_aucs


def run_and_report(spark: SparkSession, settings: Settings, if_no_run: bool = False) -> dict:
    """The train job: :func:`run`, then the HTML report of the run; the summary names the report.

    With ``if_no_run``, a warehouse that already has a run keeps it (``make run`` trains once).
    """
    if if_no_run and tables.read(spark, settings.warehouse, tables.RUNS).limit(1).count():
        return {"skipped": "the warehouse has a training run already", "run_id": tables.latest_run_id(
            spark, settings.warehouse)}
    summary = run(spark, settings)
    meta, patch_scores = summary.pop("_meta"), summary.pop("_scores")
    summary["report"] = write_report(spark, settings, summary, meta, patch_scores,
                                     partial(aggregate, how=meta["aggregate"]))
    return summary


def run(spark: SparkSession, settings: Settings) -> dict:
    """Train, evaluate and record one run; the summary carries ``_meta`` and ``_scores`` for the report."""
    started, clock = datetime.now(timezone.utc), time.monotonic()
    run_id = started.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    train, models_path = settings.train, tables.models_path(settings.warehouse, run_id)
    data = load_training_data(spark, settings)
    counts = {r["split"]: r["count"] for r in data.frame.groupBy("split").count().collect()}
    data.sizes["patches"] = counts
    all_scores, timings, tuning = {}, {}, {}
    for name, fit in (("random_forest", fit_forest), ("svm_ensemble", fit_svm)):
        t = time.monotonic()
        model, record = fit(data, train)
        model.write().overwrite().save(f"{models_path}/{name}")
        timings[name] = round(time.monotonic() - t, 1)
        all_scores[name], tuning[name] = scores(model, data.evaluation), record
        if name == "random_forest":
            importances = sorted(zip(data.names, model.stages[-1].featureImportances.toArray().tolist()),
                                 key=lambda kv: -kv[1])
    # Ensemble of the two: average of their probabilities, aggregated the same way.
    merged = all_scores["random_forest"].merge(all_scores["svm_ensemble"][["patch_id", "p"]], on="patch_id",
                                               suffixes=("_rf", "_svm"))
    merged["p"] = (merged["p_rf"] + merged["p_svm"]) / 2
    all_scores["ensemble"] = merged.drop(columns=["p_rf", "p_svm"])
    results = {name: evaluate(s, train.aggregate, train.bootstrap, train.seed) for name, s in all_scores.items()}
    rf_best = tuning["random_forest"]["rf_best"]
    control_scores, results["shuffled_label_control"], control_aucs = shuffled_control(spark, data, train, rf_best)
    meta = {"run_id": run_id, "feature_names": data.names,
            "layout_hash": feature_layout(settings.features.pixel_size)["hash"],
            "patch_geometry": patch_geometry(settings.patches.params()),
            "aggregate": train.aggregate, "weighting": train.weighting,
            "thresholds": {name: r["patient"]["threshold"] for name, r in results.items()},
            "rf_best": rf_best, "svm_best": tuning["svm_ensemble"]["svm_best"],
            "svm_tuning": tuning["svm_ensemble"]["svm_tuning"], "control_aucs": control_aucs,
            "rf_cv_auc": tuning["random_forest"]["rf_cv_auc"], "importances": importances,
            "evidence": {name: top_patches(s, train.evidence_k) for name, s in all_scores.items()},
            "results": results, "split_sizes": data.sizes, "timings_s": timings,
            "patients": sorted(data.assignment["patient"])}
    record_run(spark, settings, meta, started, round(time.monotonic() - clock, 1))
    data.frame.unpersist()
    all_scores["shuffled_label_control"] = control_scores
    return {"run_id": run_id, "models_path": models_path,
            "split_patients": {k: v["patients"] for k, v in data.sizes.items() if k != "patches"},
            "split_patches": counts, "metrics": _headline(results),
            "shuffled_label_control_auc": {level: {"mean": round(float(np.mean(v)), 3), "min": min(v), "max": max(v),
                                                   "permutations": len(v)} for level, v in control_aucs.items()},
            "rf_best": rf_best, "svm_best": meta["svm_best"],
            "train_seconds": timings, "_meta": meta, "_scores": all_scores}


def _headline(results: dict) -> dict:
    """AUC, sensitivity and specificity per model and level: what the summary shows."""
    return {name: {level: {m: r[level][m]["value"] for m in ("auc", "sensitivity", "specificity")} for level in r}
            for name, r in results.items()}


def record_run(spark: SparkSession, settings: Settings, meta: dict, started: datetime, seconds: float) -> None:
    """``run.json`` beside the models, and the run's row in ``runs`` with its inputs' Delta versions."""
    warehouse, run_id = settings.warehouse, meta["run_id"]
    models_path = tables.models_path(warehouse, run_id)
    tables.write_text(spark, f"{models_path}/run.json", json.dumps(meta, default=_json_default, indent=1))
    versions = {t: tables.version(spark, warehouse, t) for t in (tables.SLICES, tables.PATCHES, tables.FEATURES)}
    row = [(run_id, started.replace(tzinfo=None), git_commit(), json.dumps(settings.source, default=str), versions,
            json.dumps(meta["split_sizes"]), json.dumps(meta["results"], default=_json_default), models_path,
            seconds)]
    tables.merge_insert(spark, warehouse, tables.RUNS, spark.createDataFrame(row, tables.RUNS_SCHEMA), ["run_id"])


def _shuffled(spark: SparkSession, train: DataFrame, seed: int) -> DataFrame:
    """The training rows with their (target, weight) pairs permuted together (seeded)."""
    rows = train.select("patch_id", "target", "weight").orderBy("patch_id").toPandas()
    order = np.random.default_rng(seed).permutation(len(rows))
    mapping = spark.createDataFrame(pd.DataFrame({"patch_id": rows["patch_id"],
                                                  "shuffled": rows["target"].to_numpy()[order].astype(float),
                                                  "shuffled_weight": rows["weight"].to_numpy()[order]}))
    return (train.join(F.broadcast(mapping), "patch_id").drop("target", "weight")
            .withColumnRenamed("shuffled", "target").withColumnRenamed("shuffled_weight", "weight"))


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return str(value)
