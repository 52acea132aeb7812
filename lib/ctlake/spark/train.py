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
from datetime import datetime, timezone
from functools import partial

import numpy as np
import pandas as pd
from ctlake import config as cfg
from ctlake.core.metrics import AGGREGATES, aggregate_probabilities, bootstrap_metrics, threshold_youden
from ctlake.core.splits import SPLITS, split_patients, split_sizes
from ctlake.errors import ConfigError, InputError
from ctlake.spark import patches, tables
from ctlake.spark.features import FEATURES, feature_names, layout
from ctlake.spark.partitioned_svc import PartitionedSVC
from ctlake.spark.report import write_report
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import RandomForestClassifier
from pyspark.ml.evaluation import BinaryClassificationEvaluator
from pyspark.ml.feature import StandardScaler, VectorAssembler
from pyspark.ml.functions import vector_to_array
from pyspark.ml.tuning import CrossValidator, ParamGridBuilder
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

log = logging.getLogger("ctlake.train")

RUNS = "runs"
WEIGHTINGS = ("groups", "none")
RUNS_SCHEMA = T.StructType([
    T.StructField("run_id", T.StringType()),
    T.StructField("started_at", T.TimestampType()),
    T.StructField("git_commit", T.StringType()),
    T.StructField("config", T.StringType()),
    T.StructField("input_versions", T.MapType(T.StringType(), T.LongType())),
    T.StructField("split_sizes", T.StringType()),
    T.StructField("metrics", T.StringType()),
    T.StructField("models_path", T.StringType()),
    T.StructField("seconds", T.DoubleType()),
])
tables.SCHEMAS[RUNS] = RUNS_SCHEMA


def validate(config: dict) -> None:
    """Everything training needs from configuration, checked before Spark starts."""
    fractions = cfg.get(config, "train.split", dict)
    folds = cfg.positive_int(config, "train.folds")
    if set(fractions) != set(SPLITS):
        raise ConfigError(f"train.split must give {', '.join(SPLITS)}, found {sorted(fractions)}")
    if folds < 2:
        raise ConfigError("train.folds must be at least 2")
    if cfg.get(config, "train.aggregate", str, "max") not in AGGREGATES:
        raise ConfigError(f"train.aggregate must be one of {', '.join(AGGREGATES)}")
    for key in ("train.rf.num_trees", "train.rf.max_depth", "train.rf.max_bins"):
        values = cfg.get(config, key, list)
        if not values or not all(isinstance(v, int) and v > 0 for v in values):
            raise ConfigError(f"{key} must be a non-empty list of positive integers, found {values!r}")
    cfg.get(config, "train.rf.feature_subset", list)
    cfg.positive_int(config, "train.svm.partitions")
    if cfg.get(config, "train.weighting", str, "groups") not in WEIGHTINGS:
        raise ConfigError(f"train.weighting must be one of {', '.join(WEIGHTINGS)}")
    for key in ("train.svm.kernel", "train.svm.c", "train.svm.gamma"):
        if not cfg.get(config, key, list):
            raise ConfigError(f"{key} must be a non-empty list")


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


def read_nodules(spark: SparkSession, path: str) -> DataFrame:
    """nodules.csv -> candidate_id (same key as the patches job) and the malignancy label."""
    try:
        nodules = spark.read.csv(path, header=True, inferSchema=False)
        nodules.schema
    except Exception as exc:
        raise InputError(f"nodules file not found: {path}") from exc
    coords = [F.col(c).cast("double") for c in ("coordX", "coordY", "coordZ")]
    return nodules.select(
        F.substring(F.sha2(F.concat_ws("|", F.col("seriesuid"), *coords), 256), 1, 16).alias("candidate_id"),
        F.col("label").alias("nodule_label"))


def patient_labels(spark: SparkSession, config: dict) -> pd.DataFrame:
    """One row per patient: pseudonym and cancer label (any labelled series positive)."""
    labels = spark.read.csv(cfg.get(config, "train.labels", str), header=True, inferSchema=True)
    series = tables.read(spark, config, tables.SERIES).select("series_uid", "patient_pseudonym")
    joined = labels.join(series, labels["seriesuid"] == series["series_uid"])
    frame = joined.groupBy("patient_pseudonym").agg(F.max("label").alias("label")).toPandas()
    return frame.rename(columns={"patient_pseudonym": "patient"})


def training_frame(spark: SparkSession, config: dict, names: list[str], assignment: pd.DataFrame) -> DataFrame:
    """Feature rows with split, fold, patch target and one named column per radiomics feature."""
    current = patches.params_hash(patches.params_from_config(config))
    features = (tables.read(spark, config, FEATURES).filter(F.col("error").isNull())
                .filter(F.col("mode").isin("candidate", "negative") & (F.col("params_hash") == current)))
    nodules = read_nodules(spark, cfg.get(config, "train.nodules", str))
    split = spark.createDataFrame(assignment.rename(columns={"patient": "patient_pseudonym",
                                                             "label": "patient_label"}))
    frame = (features.join(F.broadcast(nodules), "candidate_id", "left")
             .join(F.broadcast(split), "patient_pseudonym", "inner")
             .withColumn("target", F.when(F.col("nodule_label") == "malignant", 1.0).otherwise(0.0))
             .withColumn("trainable", F.col("nodule_label").isNull() | (F.col("nodule_label") != "indeterminate")))
    return frame.select("*", *[F.col("radiomics")[i].alias(name) for i, name in enumerate(names)])


def rf_pipeline(names: list[str], seed: int) -> tuple[Pipeline, RandomForestClassifier]:
    assembler = VectorAssembler(inputCols=names, outputCol="features", handleInvalid="keep")
    forest = RandomForestClassifier(featuresCol="features", labelCol="target", seed=seed, weightCol="weight",
                                    probabilityCol="probability", rawPredictionCol="rawPrediction")
    return Pipeline(stages=[assembler, forest]), forest


def svm_pipeline(names: list[str], seed: int, partitions: int, max_rows: int, **params) -> Pipeline:
    assembler = VectorAssembler(inputCols=names, outputCol="raw_features", handleInvalid="keep")
    scaler = StandardScaler(inputCol="raw_features", outputCol="features", withMean=True, withStd=True)
    # The weight column already balances the classes: no class_weight on top of it.
    svm = PartitionedSVC(featuresCol="features", labelCol="target", seed=seed, numPartitions=partitions,
                         maxRowsPerPartition=max_rows, weightCol="weight", classWeight="none", **params)
    return Pipeline(stages=[assembler, scaler, svm])


def scores(model: PipelineModel, frame: DataFrame) -> pd.DataFrame:
    """Patch probabilities with what evaluation needs, brought to the driver (no pixels)."""
    out = model.transform(frame).select(
        "patch_id", "patient_pseudonym", "series_uid", "sop_uid", "slice_index", "center_row", "center_col",
        "mode", "candidate_id", "nodule_label", "target", "patient_label", "split",
        vector_to_array("probability")[1].alias("p"))
    return out.toPandas()


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


def run_and_report(spark: SparkSession, config: dict) -> dict:
    """The train job: :func:`run`, then the HTML report of the run; the summary names the report."""
    summary = run(spark, config)
    meta, patch_scores = summary.pop("_meta"), summary.pop("_scores")
    summary["report"] = write_report(spark, config, summary, meta, patch_scores,
                                     partial(aggregate, how=meta["aggregate"]))
    return summary


def run(spark: SparkSession, config: dict) -> dict:
    validate(config)
    started, clock = datetime.now(timezone.utc), time.monotonic()
    run_id = started.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    seed = cfg.get(config, "train.seed", int, 7)
    pixel_size = cfg.positive_int(config, "features.pixel_size", 16)
    if not tables.exists(spark, config, FEATURES):
        raise InputError("no features table: run jobs/features.py first")
    features_df = tables.read(spark, config, FEATURES)
    names = feature_names(features_df, "radiomics")
    if names != layout(pixel_size)["radiomics"]:
        raise InputError("features table layout differs from this ctlake version: re-run jobs/features.py")

    assignment = split_patients(patient_labels(spark, config), cfg.get(config, "train.split", dict),
                                cfg.positive_int(config, "train.folds"), seed)
    sizes = split_sizes(assignment)
    log.info("split (patients): %s", sizes)
    # A fixed layout of rows over partitions: the forest's bootstrap is drawn per partition, and the
    # scaler's sums (whose last bits decide the SVM's partition hash) follow partition order. Without it
    # two runs on the same tables differed by 0.09 in SVM nodule AUC.
    frame = (training_frame(spark, config, names, assignment)
             .repartition(cfg.positive_int(config, "train.partitions", 4), "patch_id")
             .sortWithinPartitions("patch_id").cache())
    weighting = cfg.get(config, "train.weighting", str, "groups")
    train = with_weights(frame.filter((F.col("split") == "train") & F.col("trainable")), weighting)
    validation_train = with_weights(frame.filter((F.col("split") == "validation") & F.col("trainable")), weighting)
    evaluation = frame.filter(F.col("split").isin("validation", "test"))
    counts = {r["split"]: r["count"] for r in frame.groupBy("split").count().collect()}
    sizes["patches"] = counts
    how = cfg.get(config, "train.aggregate", str, "max")
    n_boot = cfg.positive_int(config, "train.bootstrap", 1000)
    models_path = f"{cfg.get(config, 'warehouse', str).rstrip('/')}/models/{run_id}"
    results, all_scores, timings = {}, {}, {}

    # Random forest, tuned by cross-validation over patient folds.
    t = time.monotonic()
    rf, forest = rf_pipeline(names, seed)
    grid = (ParamGridBuilder()
            .addGrid(forest.numTrees, cfg.get(config, "train.rf.num_trees", list))
            .addGrid(forest.maxDepth, cfg.get(config, "train.rf.max_depth", list))
            .addGrid(forest.featureSubsetStrategy, [str(v) for v in cfg.get(config, "train.rf.feature_subset", list)])
            .addGrid(forest.maxBins, cfg.get(config, "train.rf.max_bins", list)).build())
    evaluator = BinaryClassificationEvaluator(labelCol="target", rawPredictionCol="probability",
                                              weightCol="weight", metricName="areaUnderROC")
    cv = CrossValidator(estimator=rf, estimatorParamMaps=grid, evaluator=evaluator, foldCol="fold",
                        numFolds=cfg.positive_int(config, "train.folds"),
                        parallelism=cfg.positive_int(config, "train.parallelism", 2), seed=seed)
    cv_model = cv.fit(train)
    rf_model = cv_model.bestModel
    best_index = int(np.argmax(cv_model.avgMetrics))
    rf_best = {p.name: v for p, v in grid[best_index].items()}
    rf_model.write().overwrite().save(f"{models_path}/random_forest")
    timings["random_forest"] = round(time.monotonic() - t, 1)
    all_scores["random_forest"] = scores(rf_model, evaluation)
    importances = sorted(zip(names, rf_model.stages[-1].featureImportances.toArray().tolist()),
                         key=lambda kv: -kv[1])

    # Per-partition SVM ensemble, C/gamma/kernel tuned on the validation patients.
    t = time.monotonic()
    partitions = cfg.positive_int(config, "train.svm.partitions")
    max_rows = cfg.positive_int(config, "train.svm.max_rows_per_partition", 20000)
    tuning = []
    for kernel in cfg.get(config, "train.svm.kernel", list):
        for c in cfg.get(config, "train.svm.c", list):
            for gamma in (cfg.get(config, "train.svm.gamma", list) if kernel == "rbf" else ["scale"]):
                params = {"kernel": kernel, "C": float(c), "gamma": str(gamma)}
                model = svm_pipeline(names, seed, partitions, max_rows, **params).fit(train)
                auc = evaluator.evaluate(model.transform(validation_train))
                tuning.append({**params, "validation_auc": auc})
    svm_best = max(tuning, key=lambda r: r["validation_auc"])
    svm_params = {k: svm_best[k] for k in ("kernel", "C", "gamma")}
    svm_model = svm_pipeline(names, seed, partitions, max_rows, **svm_params).fit(train)
    svm_model.write().overwrite().save(f"{models_path}/svm_ensemble")
    timings["svm_ensemble"] = round(time.monotonic() - t, 1)
    all_scores["svm_ensemble"] = scores(svm_model, evaluation)

    # Ensemble of the two: average of their probabilities, aggregated the same way.
    merged = all_scores["random_forest"].merge(all_scores["svm_ensemble"][["patch_id", "p"]], on="patch_id",
                                               suffixes=("_rf", "_svm"))
    merged["p"] = (merged["p_rf"] + merged["p_svm"]) / 2
    all_scores["ensemble"] = merged.drop(columns=["p_rf", "p_svm"])
    for name, frame_scores in all_scores.items():
        results[name] = evaluate(frame_scores, how, n_boot, seed)

    # Shuffled-label control: same forest, training targets permuted; must score near 0.5. One permutation
    # is one draw of a noisy AUC (+-0.1 with 40 test patients), so it is repeated and its spread reported.
    control_aucs: dict[str, list[float]] = {}
    for repeat in range(cfg.positive_int(config, "train.control_repeats", 5)):
        control, control_forest = rf_pipeline(names, seed)
        control_forest.setNumTrees(rf_best["numTrees"]).setMaxDepth(rf_best["maxDepth"])
        scored = scores(control.fit(_shuffled(spark, train, seed + repeat)), evaluation)
        result = evaluate(scored, how, min(n_boot, 200) if repeat == 0 else 20, seed)
        if repeat == 0:
            control_scores, results["shuffled_label_control"] = scored, result
        for level, metrics in result.items():
            control_aucs.setdefault(level, []).append(round(metrics["auc"]["value"], 4))

    summary_metrics = {name: {level: {m: r[level][m]["value"] for m in ("auc", "sensitivity", "specificity")}
                              for level in r} for name, r in results.items()}
    meta = {"run_id": run_id, "feature_names": names, "layout_hash": layout(pixel_size)["hash"],
            "patch_geometry": patches.geometry(patches.params_from_config(config)),
            "aggregate": how, "weighting": weighting,
            "thresholds": {name: r["patient"]["threshold"] for name, r in results.items()},
            "rf_best": rf_best, "svm_best": svm_params, "svm_tuning": tuning, "control_aucs": control_aucs,
            "rf_cv_auc": [float(a) for a in cv_model.avgMetrics], "importances": importances,
            "evidence": {name: top_patches(s, cfg.positive_int(config, "train.evidence_k", 3))
                         for name, s in all_scores.items() if name != "shuffled_label_control"},
            "results": results, "split_sizes": sizes, "timings_s": timings,
            "patients": sorted(assignment["patient"])}
    tables.write_text(spark, f"{models_path}/run.json", json.dumps(meta, default=_json_default, indent=1))
    versions = {t: tables.version(spark, config, t) for t in (tables.SLICES, tables.PATCHES, FEATURES)}
    row = [(run_id, started.replace(tzinfo=None), git_commit(), json.dumps(config, default=str), versions,
            json.dumps(sizes), json.dumps(results, default=_json_default), models_path,
            round(time.monotonic() - clock, 1))]
    tables.merge_insert(spark, config, RUNS, spark.createDataFrame(row, RUNS_SCHEMA), ["run_id"])
    frame.unpersist()
    all_scores["shuffled_label_control"] = control_scores
    return {"run_id": run_id, "models_path": models_path, "split_patients": {k: v["patients"] for k, v in
                                                                           sizes.items() if k != "patches"},
            "split_patches": counts, "metrics": summary_metrics,
            "shuffled_label_control_auc": {level: {"mean": round(float(np.mean(v)), 3), "min": min(v), "max": max(v),
                                                   "permutations": len(v)} for level, v in control_aucs.items()},
            "rf_best": rf_best, "svm_best": svm_params,
            "train_seconds": timings, "_meta": meta, "_scores": all_scores}


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
