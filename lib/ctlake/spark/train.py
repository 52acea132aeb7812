"""Training and evaluation job: two stages on the detector's candidates, judged on the scoring path.

Stage ``nodule`` tells nodules from the detector's other candidates (false
positive reduction); stage ``malignancy`` tells malignant from benign
nodules.  Both are trained on what scoring sees: the detected candidates of
the training patients (a candidate is a nodule when it lies within an
annotated nodule's radius, LUNA16's hit rule) plus patches at the annotated
nodules themselves.  Each stage has a random forest and a per-partition SVM
ensemble; the ensemble averages them per stage.  A candidate's probability
of cancer is P(nodule) x P(malignant), and a patient's is their aggregate
(max by default).

Indeterminate nodules (mean malignancy 2.5-3.5) are handled one way
everywhere: they are nodules (stage ``nodule`` positives), their malignancy
is unknown (left out of stage ``malignancy`` and of the malignant-vs-benign
figures), and a patient whose nodules are all indeterminate or benign is a
patient without cancer, as ``labels.csv`` says.

Validation and test patients are evaluated on their *detected* candidates
only, cut, featurized and scored by the same code a new scan goes through;
thresholds are chosen on the validation patients.  Patches at the annotated
nodules of test patients give one labelled diagnostic (the oracle).
"""
from __future__ import annotations

import json
import logging
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial

import numpy as np
import pandas as pd
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import RandomForestClassifier
from pyspark.ml.evaluation import BinaryClassificationEvaluator
from pyspark.ml.feature import StandardScaler, VectorAssembler
from pyspark.ml.tuning import CrossValidator, ParamGridBuilder
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from sklearn.metrics import roc_auc_score

from ctlake.config import Settings, TrainSettings
from ctlake.core.detect import detector_hash
from ctlake.core.evaluation import (
    ATTRIBUTES,
    FAMILIES,
    STAGES,
    aggregate,
    attribute_ceiling,
    by_group,
    combine_stages,
    ensemble_members,
    evaluate,
    grouped_cv_patient_auc,
    patient_group,
    permutation_null,
    top_patches,
)
from ctlake.core.froc import froc_report, match_candidates
from ctlake.core.metrics import bootstrap_metrics, brier, calibration_bins, threshold_youden
from ctlake.core.patch_tasks import ANNOTATED_MODES, TRAINING_MODES, params_hash, patch_geometry
from ctlake.core.radiomics import feature_layout
from ctlake.core.splits import split_patients, split_sizes
from ctlake.core.svm_partition import svm_grid
from ctlake.errors import InputError
from ctlake.spark import tables
from ctlake.spark.cnn import PatchCNN
from ctlake.spark.models import candidate_scores, model_path
from ctlake.spark.partitioned_svc import PartitionedSVC, tune_partitioned_svc
from ctlake.spark.report import write_report

log = logging.getLogger("ctlake.train")


@dataclass
class TrainingData:
    """The rows one stage trains and tunes on, split by patient."""

    stage: str
    names: list[str]
    train: DataFrame
    validation: DataFrame


def with_weights(frame: DataFrame, how: str) -> DataFrame:
    """``frame`` plus a ``weight`` column: ``"balanced"`` gives each ``target`` class half the weight.

    The nodule stage sees some 40 other candidates per nodule; unweighted, a
    forest's votes and the SVM's margin favour "not a nodule" everywhere.
    ``"none"``: every row 1.
    """
    if how == "none":
        return frame.withColumn("weight", F.lit(1.0))
    counts = {r["target"]: r["count"] for r in frame.groupBy("target").count().collect()}
    total = sum(counts.values())
    weight = F.lit(1.0)
    for value, count in counts.items():
        weight = F.when(F.col("target") == value, F.lit(total / (len(counts) * count))).otherwise(weight)
    return frame.withColumn("weight", weight)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              check=True).stdout.strip()
    except Exception:
        return None


def patient_labels(spark: SparkSession, settings: Settings) -> pd.DataFrame:
    """One row per patient: pseudonym, cancer label (any labelled series positive) and nodule count."""
    labels = tables.read_labels(spark, settings.train.labels)
    series = tables.read(spark, settings.warehouse, tables.SERIES).select("series_uid", "patient_pseudonym")
    joined = labels.join(series, labels["seriesuid"] == series["series_uid"])
    frame = joined.groupBy("patient_pseudonym").agg(F.max("label").alias("label"),
                                                    F.sum("n_nodules").alias("n_nodules")).toPandas()
    return frame.rename(columns={"patient_pseudonym": "patient"})


def candidate_matches(spark: SparkSession, settings: Settings) -> DataFrame:
    """``candidate_id`` of every detected candidate -> ``nodule_key`` of the annotated nodule it hits (or null)."""
    found = (tables.read_candidates(spark, settings.warehouse, detector_hash(settings.detect.params()))
             .select("candidate_id", "series_uid", "coord_x", "coord_y", "coord_z").toPandas())
    nodules = tables.read_annotations(spark, settings.patches.annotations).toPandas()
    hit = match_candidates(found, nodules)
    found["nodule_key"] = [nodules["nodule_key"].iat[i] if i >= 0 else None for i in hit]
    schema = "candidate_id string, nodule_key string"
    return spark.createDataFrame(found[["candidate_id", "nodule_key"]].astype(object), schema)


def training_frame(spark: SparkSession, settings: Settings, names: list[str], assignment: pd.DataFrame) -> DataFrame:
    """Detected and nodule patches' features with split, fold, nodule match, targets, one column per feature.

    ``is_nodule``: the patch is at an annotated nodule (its own patch, or a
    detected candidate within the nodule's radius); ``target``: that nodule
    is malignant (the patch-level truth of the product's question).
    """
    current = params_hash(settings.patches.params())
    features = (tables.read(spark, settings.warehouse, tables.FEATURES).filter(F.col("error").isNull())
                .filter(F.col("mode").isin(*TRAINING_MODES) & (F.col("params_hash") == current)))
    nodules = tables.read_nodules(spark, settings.train.nodules).withColumnRenamed("candidate_id", "nodule_key")
    split = spark.createDataFrame(assignment.rename(columns={"patient": "patient_pseudonym",
                                                             "label": "patient_label"}))
    frame = (features.join(F.broadcast(candidate_matches(spark, settings)), "candidate_id", "left")
             .withColumn("nodule_key", F.when(F.col("mode").isin(*ANNOTATED_MODES), F.col("candidate_id"))
                         .otherwise(F.col("nodule_key")))
             .join(F.broadcast(nodules), "nodule_key", "left")
             .join(F.broadcast(split), "patient_pseudonym", "inner")
             .withColumn("is_nodule", F.col("nodule_key").isNotNull().cast("double"))
             .withColumn("target", F.when(F.col("nodule_label") == "malignant", 1.0).otherwise(0.0)))
    return frame.select("*", *[F.col("radiomics")[i].alias(name) for i, name in enumerate(names)])


def load_training_data(spark: SparkSession, settings: Settings) -> tuple[list[str], pd.DataFrame, DataFrame]:
    """Split the patients, and lay their feature rows out the same way on every run (cached)."""
    if not tables.exists(spark, settings.warehouse, tables.FEATURES):
        raise InputError("no features table: run jobs/features.py first")
    names = tables.feature_names(tables.read(spark, settings.warehouse, tables.FEATURES), "radiomics")
    if names != feature_layout(settings.features.pixel_size)["radiomics"]:
        raise InputError("features table layout differs from this ctlake version: re-run jobs/features.py")
    train = settings.train
    labels = patient_labels(spark, settings)
    assignment = split_patients(labels, train.split, train.folds, train.seed).merge(
        labels[["patient", "n_nodules"]], on="patient")
    log.info("split (patients): %s", split_sizes(assignment))
    # A fixed layout of rows over partitions: the forest's bootstrap is drawn per partition, and the
    # scaler's sums (whose last bits decide the SVM's partition hash) follow partition order. Without it
    # two runs on the same tables differed by 0.09 in SVM nodule AUC.
    frame = (training_frame(spark, settings, names, assignment)
             .repartition(train.partitions, "patch_id").sortWithinPartitions("patch_id").cache())
    return names, assignment, frame


def stage_data(names: list[str], frame: DataFrame, stage: str, weighting: str) -> TrainingData:
    """One stage's rows: training patients' detected and nodule patches; validation patients' detected ones.

    ``nodule``: target is_nodule over every candidate.  ``malignancy``: target
    malignant over the nodules rated malignant or benign.
    """
    if stage == "nodule":
        rows = frame.withColumn("target", F.col("is_nodule"))
    else:
        rows = frame.filter(F.col("nodule_label").isin("malignant", "benign"))
    return TrainingData(
        stage=stage, names=names, train=with_weights(rows.filter(F.col("split") == "train"), weighting),
        validation=with_weights(rows.filter((F.col("split") == "validation") & (F.col("mode") == "detected")),
                                weighting))


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


def fit_cnn(data: TrainingData, train: TrainSettings, pixels: DataFrame) -> tuple[PipelineModel, dict]:
    """The CNN on the training patients' patches (no tuning: ``train.cnn`` says how); what it trained on.

    It balances the classes itself (every positive, a fresh draw of negatives
    each epoch), so the ``weight`` column is not used.
    """
    cnn = train.cnn
    estimator = PatchCNN(labelCol="target", numPartitions=cnn.partitions[data.stage],
                         maxRowsPerPartition=cnn.max_rows_per_partition, epochs=cnn.epochs, batchSize=cnn.batch_size,
                         learningRate=cnn.learning_rate, cropPx=cnn.crop_px,
                         negativesPerPositive=cnn.negatives_per_positive, shiftPx=cnn.shift_px,
                         minSteps=cnn.min_steps[data.stage], seed=train.seed)
    model = Pipeline(stages=[estimator]).fit(data.train.select("patch_id", "target").join(pixels, "patch_id"))
    fitted = model.stages[-1].partitions_
    return model, {"cnn": {"epochs": cnn.epochs, "min_steps": cnn.min_steps[data.stage], "partitions": [
        {k: p[k] for k in ("partition", "n_rows", "n_pos", "skipped")} | {"train_seconds": round(p["train_seconds"], 1)}
        for p in fitted]}}


def patch_pixels(spark: SparkSession, settings: Settings) -> DataFrame:
    """The voxels of the current patch geometry's patches, by ``patch_id``: what the CNN reads."""
    return (tables.read(spark, settings.warehouse, tables.PATCHES)
            .filter(F.col("params_hash") == params_hash(settings.patches.params()))
            .select("patch_id", "pixels", "patch_shape"))


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


#: What evaluation keeps of a scored row (the features are left behind).
KEEP = ["patch_id", "patient_pseudonym", "series_uid", "sop_uid", "slice_index", "center_row", "center_col", "mode",
        "candidate_id", "nodule_key", "nodule_label", "nodule_mm", "nodule_texture", "is_nodule", "target",
        "patient_label", "split", "coord_x", "coord_y", "coord_z"]


def fit_stages(names: list[str], frame: DataFrame, settings: Settings, models_path: str,
               pixels: DataFrame) -> tuple[dict, dict, dict]:
    """Both stages x every family, fitted, tuned and saved: models, tuning records, seconds."""
    train = settings.train
    models, tuning, timings = {}, {}, {}
    fits = {"random_forest": fit_forest, "svm_ensemble": fit_svm, "cnn": partial(fit_cnn, pixels=pixels)}
    for stage in STAGES:
        data = stage_data(names, frame, stage, train.weighting)
        for family in FAMILIES:
            fit, name = fits[family], family.replace("_", " ")
            # A line per model: training is minutes of Spark jobs that the task-level progress lines do not name.
            log.info("%s stage: fitting the %s (%d of %d)", stage, name, len(models) + 1, len(STAGES) * len(FAMILIES))
            started = time.monotonic()
            model, record = fit(data, train)
            model.write().overwrite().save(model_path(models_path, stage, family))
            models[(stage, family)], tuning[f"{stage}/{family}"] = model, record
            timings[f"{stage}/{family}"] = round(time.monotonic() - started, 1)
            log.info("%s stage: %s fitted and saved in %.0f s", stage, name, timings[f"{stage}/{family}"])
    return models, tuning, timings


def with_empty_patients(scored: pd.DataFrame, assignment: pd.DataFrame) -> pd.DataFrame:
    """Scoring-path rows plus one row at probability 0 for each evaluated patient without any candidate.

    A scan in which the detector finds nothing is a scan without cancer to
    the product, and must count as one in every figure.
    """
    evaluated = assignment[assignment["split"].isin(["validation", "test"])]
    missing = evaluated[~evaluated["patient"].isin(scored["patient_pseudonym"])]
    empty = pd.DataFrame({"patient_pseudonym": missing["patient"], "patient_label": missing["label"],
                          "split": missing["split"], "mode": "none", "target": 0.0, "is_nodule": 0.0})
    for column in [c for c in scored.columns if c.startswith("p_")]:
        empty[column] = 0.0
    return pd.concat([scored, empty], ignore_index=True)


def run(spark: SparkSession, settings: Settings) -> dict:
    """Train, evaluate on the scoring path and record one run; the summary carries ``_meta`` and ``_scores``."""
    started, clock = datetime.now(timezone.utc), time.monotonic()
    run_id = tables.new_run_id(started)
    train, models_path = settings.train, tables.models_path(settings.warehouse, run_id)
    names, assignment, frame = load_training_data(spark, settings)
    sizes = split_sizes(assignment)
    sizes["patches"] = {r["split"]: r["count"] for r in frame.groupBy("split").count().collect()}
    pixels = patch_pixels(spark, settings)
    models, tuning, timings = fit_stages(names, frame, settings, models_path, pixels)
    scored = candidate_scores(models, frame.filter(F.col("split").isin("validation", "test")), KEEP, pixels)
    members, member_evidence = ensemble_members(scored[(scored["split"] == "validation") & (scored["mode"] == "detected")])
    scored = combine_stages(scored, members)
    path = with_empty_patients(scored[scored["mode"] == "detected"], assignment)
    all_scores = {name: path.assign(p=path[f"p_{name}"]) for name in (*FAMILIES, "ensemble_no_cnn", "ensemble")}
    results = {name: evaluate(s, train.aggregate, train.bootstrap, train.seed) for name, s in all_scores.items()}
    results["oracle_nodule"] = oracle_nodules(scored[scored["mode"] == "nodule"], train)
    patients = aggregate(all_scores["ensemble"], train.aggregate).merge(
        assignment[["patient", "n_nodules"]].rename(columns={"patient": "patient_pseudonym"}), on="patient_pseudonym")
    patients["group"] = [patient_group(label, n) for label, n in zip(patients["label"], patients["n_nodules"])]
    test = patients[patients["split"] == "test"]
    null_aucs = permutation_null(test["label"], test["p"], train.control_repeats, train.seed)
    everyone = frame.select("patient_pseudonym", "patient_label", "mode", "is_nodule", "nodule_label", *names).toPandas()
    cv_aucs = grouped_cv_patient_auc(everyone, names, train.cv_folds, train.cv_repeats, train.seed, train.aggregate)
    forest = models[("malignancy", "random_forest")].stages[-1]
    meta = {"run_id": run_id, "feature_names": names,
            "layout_hash": feature_layout(settings.features.pixel_size)["hash"],
            "patch_geometry": patch_geometry(settings.patches.params()),
            "detector_hash": detector_hash(settings.detect.params()),
            "aggregate": train.aggregate, "weighting": train.weighting,
            "ensemble_members": members, "ensemble_choice": member_evidence,
            "thresholds": {name: results[name]["patient"]["threshold"] for name in all_scores},
            "tuning": tuning, "null_aucs": null_aucs, "cv_patient_auc": cv_aucs,
            "importances": sorted(zip(names, forest.featureImportances.toArray().tolist()), key=lambda kv: -kv[1]),
            "evidence": {name: top_patches(s[s["mode"] == "detected"], train.evidence_k)
                         for name, s in all_scores.items()},
            "detection": detection_figures(spark, settings, scored, assignment),
            "groups": by_group(patients, results["ensemble"]["patient"]["threshold"]),
            "calibration": {"bins": calibration_bins(test["label"], test["p"]), "brier": brier(test["label"], test["p"])},
            "baselines": baselines(spark, settings, assignment),
            "patient_scores": patients[["patient_pseudonym", "split", "label", "group", "p"]].to_dict("records"),
            "results": results, "split_sizes": sizes, "timings_s": timings,
            "patients": sorted(assignment["patient"]), "git_commit": git_commit(),
            "input_versions": {t: tables.version(spark, settings.warehouse, t)
                               for t in (tables.SLICES, tables.CANDIDATES, tables.PATCHES, tables.FEATURES)},
            "key_fingerprints": sorted(r[0] for r in tables.read(spark, settings.warehouse, tables.SLICES)
                                       .select("key_fingerprint").distinct().collect() if r[0])}
    record_run(spark, settings, meta, started, round(time.monotonic() - clock, 1))
    frame.unpersist()
    return {"run_id": run_id, "models_path": models_path,
            "split_patients": {k: v["patients"] for k, v in sizes.items() if k != "patches"},
            "split_patches": sizes["patches"], "metrics": _headline(results),
            "detection_cpm_test": {k: round(meta["detection"][k]["all"]["cpm"], 3) for k in ("detector", "system")},
            "null_control_auc": _spread(null_aucs), "cv_patient_auc": _spread(cv_aucs), "train_seconds": timings,
            "_meta": meta, "_scores": all_scores}


def _spread(values: list[float]) -> dict:
    if not values:
        return {}
    return {"mean": round(float(np.mean(values)), 3), "p2.5": round(float(np.percentile(values, 2.5)), 3),
            "p97.5": round(float(np.percentile(values, 97.5)), 3), "n": len(values)}


def oracle_nodules(nodule_rows: pd.DataFrame, train: TrainSettings) -> dict:
    """The labelled diagnostic: P(malignant) at the annotated centres of rated nodules (test; threshold on validation)."""
    rated = nodule_rows[nodule_rows["nodule_label"].isin(["malignant", "benign"])]
    val, test = rated[rated["split"] == "validation"], rated[rated["split"] == "test"]
    if test["target"].nunique() < 2:
        return {}
    return {"nodule": bootstrap_metrics(test["target"].to_numpy(), test["p_malignancy"].to_numpy(),
                                        test["patient_pseudonym"].to_numpy(),
                                        threshold_youden(val["target"], val["p_malignancy"]), train.bootstrap,
                                        train.seed)}


def baselines(spark: SparkSession, settings: Settings, assignment: pd.DataFrame) -> dict:
    """Test figures of two references: the detector's largest candidate alone, and the rendered attributes.

    ``largest_candidate_diameter``: patient AUC of the largest diameter among
    a scan's detected candidates (does "something big" already say cancer?).
    ``attribute_ceiling``: nodule AUC of a forest on the true diameter and
    the readers' ratings (``nodules.csv``), trained on the training patients'
    nodules: about what the images can carry at best.
    """
    split = assignment.rename(columns={"patient": "patient_pseudonym"})[["patient_pseudonym", "split", "label"]]
    series = tables.read(spark, settings.warehouse, tables.SERIES).select("series_uid", "patient_pseudonym")
    largest = (tables.read_candidates(spark, settings.warehouse, detector_hash(settings.detect.params()))
               .groupBy("series_uid").agg(F.max("diameter_mm").alias("largest_mm"))
               .join(series, "series_uid").toPandas().merge(split, on="patient_pseudonym", how="right")
               .fillna({"largest_mm": 0.0}))
    test = largest[largest["split"] == "test"]
    nodules = (tables.read_nodule_attributes(spark, settings.train.nodules, ATTRIBUTES).join(series, "series_uid")
               .toPandas().merge(split.drop(columns="label"), on="patient_pseudonym"))
    return {"largest_candidate_diameter": float(roc_auc_score(test["label"], test["largest_mm"]))
            if test["label"].nunique() == 2 else None,
            "attribute_ceiling": attribute_ceiling(nodules, settings.train.seed)}


def detection_figures(spark: SparkSession, settings: Settings, scored: pd.DataFrame, assignment: pd.DataFrame
                      ) -> dict:
    """FROC on the test patients' scans: the detector's own score, and the nodule stage's P(nodule)."""
    test_patients = set(assignment.loc[assignment["split"] == "test", "patient"])
    series = (tables.read(spark, settings.warehouse, tables.SERIES).select("series_uid", "patient_pseudonym")
              .toPandas())
    test_series = set(series.loc[series["patient_pseudonym"].isin(test_patients), "series_uid"])
    found = (tables.read_candidates(spark, settings.warehouse, detector_hash(settings.detect.params()))
             .filter(F.col("series_uid").isin(sorted(test_series)))
             .select("candidate_id", "series_uid", "coord_x", "coord_y", "coord_z", "score").toPandas())
    keyed = tables.read_annotations(spark, settings.patches.annotations)
    ratings = tables.read_nodules(spark, settings.train.nodules).withColumnRenamed("candidate_id", "nodule_key")
    nodules = (keyed.join(ratings.select("nodule_key", F.col("nodule_texture").alias("texture")), "nodule_key", "left")
               .toPandas())
    nodules = nodules[nodules["series_uid"].isin(test_series)].reset_index(drop=True)
    system = found.merge(scored[["candidate_id", "p_nodule"]], on="candidate_id", how="left").fillna({"p_nodule": 0.0})
    n_scans = max(len(test_series), 1)
    return {"detector": froc_report(found, nodules, n_scans),
            "system": froc_report(system.assign(score=system["p_nodule"]), nodules, n_scans),
            "candidates_per_scan": round(len(found) / n_scans, 1)}


def _headline(results: dict) -> dict:
    """AUC, sensitivity and specificity per model and level: what the summary shows."""
    return {name: {level: {m: r[level][m]["value"] for m in ("auc", "sensitivity", "specificity")} for level in r}
            for name, r in results.items()}


def record_run(spark: SparkSession, settings: Settings, meta: dict, started: datetime, seconds: float) -> None:
    """``run.json`` beside the models, and the run's row in ``runs`` with its inputs' Delta versions."""
    warehouse, run_id = settings.warehouse, meta["run_id"]
    models_path = tables.models_path(warehouse, run_id)
    tables.write_text(spark, f"{models_path}/run.json", json.dumps(meta, default=_json_default, indent=1))
    row = [(run_id, started.replace(tzinfo=None), meta["git_commit"], json.dumps(settings.redacted(), default=str),
            meta["input_versions"],
            json.dumps(meta["split_sizes"]), json.dumps(meta["results"], default=_json_default), models_path,
            seconds, meta["key_fingerprints"])]
    tables.merge_insert(spark, warehouse, tables.RUNS, spark.createDataFrame(row, tables.RUNS_SCHEMA), ["run_id"])


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return str(value)
