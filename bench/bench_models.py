"""Model training cost: MLlib's forest against scikit-learn's, and per-partition SVMs against one global SVC.

    .venv/bin/python bench/bench_models.py --conf conf/local.yaml [--set k=v] [--replicate 20] [--k 2,4,8,16]

1. Reads the ``features`` table of the configured warehouse (filled by ``make run``) and builds the
   training frame exactly as ``jobs/train.py`` does (``ctlake.spark.train.patient_labels``,
   ``ctlake.core.splits.split_patients`` with ``train.split``/``train.folds``/``train.seed``,
   ``ctlake.spark.train.training_frame``) for train.py's larger stage, *nodule*: the models train on
   every row of the training patients (detected candidates and annotated nodules; target = at a
   nodule) and are evaluated on the test patients' detected candidates, the rows scoring meets.
2. Runs everything twice: on the real training rows (N=1) and on ``--replicate N`` stacked copies of
   them (the real rows plus N-1 copies with Gaussian noise of ``--jitter`` x each feature's training
   standard deviation, seeded), so that fixed Spark overheads do not decide the timings. The test
   rows are never replicated.
3. Forest: a Spark ``Pipeline`` (VectorAssembler + ``RandomForestClassifier``, 100 trees, depth 8,
   sqrt feature subsets, 32 bins) and scikit-learn's ``RandomForestClassifier`` (same settings,
   ``n_jobs`` = Spark's cores) on the same rows. Ratio = Spark fit seconds / scikit-learn fit seconds;
   target <= 1.0, and test AUCs within 0.01.
4. SVM: on features standardized once with the training mean and std (the same matrix for both),
   one global ``build_estimator()`` model (rbf ``SVC``, C=1, gamma "scale", balanced class weights,
   inside ``CalibratedClassifierCV`` sigmoid cv=3 -- exactly the model each partition of
   ``PartitionedSVC`` fits by default) against ``PartitionedSVC`` with the same settings at each k
   (a k whose partitions would get fewer than 3 rows of a class is skipped: sigmoid calibration's
   3-fold CV needs them). ``maxRowsPerPartition`` is set to the training rows, so no partition is
   downsampled. AUCs are of calibrated probabilities on both sides. Speed-up = global fit seconds /
   partitioned fit seconds; target >= 10x, and test AUCs within 0.01.

Timing: wall clock of ``fit`` on a cached DataFrame (Spark) or in-memory arrays (scikit-learn), the
median of ``--repeats``, after warm-up fits on a small subset (JVM, Python workers, first-query
compilation, thread pools). All Spark fits run first; Spark is then stopped and the scikit-learn fits
run with the machine to themselves. CPU seconds (Spark: driver + JVM + Python workers, sampled; scikit-
learn: the process's CPU time) say what each fit costs whatever else runs on the machine. The AUC
difference comes with a 95% interval from a paired bootstrap over test patients.

The last line of stdout is one JSON object with every figure; it is also written to
``<workdir>/models.json``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import MemorySampler, load_average, machine, spark_cores, versions, write_result

from ctlake.cli import job_parser, overrides, setup_logging
from ctlake.config import Settings, load_settings
from ctlake.errors import ConfigError, InputError

TARGET_RF_RATIO = 1.0
TARGET_SVM_SPEEDUP = 10.0
TARGET_AUC_DIFFERENCE = 0.01
RF_SETTINGS = {"trees": 100, "max_depth": 8, "feature_subset": "sqrt", "max_bins": 32}
SVM_SETTINGS = {"kernel": "rbf", "C": 1.0, "gamma": "scale", "calibration": "sigmoid",
                "class_weight": "balanced", "aggregation": "probability"}
#: Negatives in the warm-up subset (all training positives are added, so every k=2 partition can calibrate).
WARMUP_NEGATIVES = 150


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, found {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, found {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    parser = job_parser("bench_models", __doc__)
    parser.add_argument("--replicate", type=int, default=20, metavar="N",
                        help="also run on N stacked copies of the training rows (1 = real size only; "
                             "default: %(default)s)")
    parser.add_argument("--jitter", type=float, default=0.05, metavar="SD",
                        help="noise of the replicated copies, in training standard deviations of each "
                             "feature (default: %(default)s)")
    parser.add_argument("--k", type=_int_list, default=[2, 4, 8, 16], metavar="K,K,...",
                        help="PartitionedSVC partition counts (default: 2,4,8,16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed fits per model, median reported "
                                                                 "(default: %(default)s)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples of the test "
                                                                    "patients for the AUC differences "
                                                                    "(default: %(default)s)")
    parser.add_argument("--workdir", default="data/bench", metavar="PATH",
                        help="folder of models.json (default: %(default)s)")
    args = parser.parse_args(argv)
    for name in ("replicate", "repeats", "bootstrap"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, found {getattr(args, name)}")
    if not args.jitter >= 0:
        parser.error(f"--jitter must be >= 0, found {args.jitter}")
    return args


# --- data -----------------------------------------------------------------------------------------

def load_rows(spark, config: Settings) -> tuple[list[str], pd.DataFrame, pd.DataFrame]:
    """Feature names, the nodule stage's training rows and the test patients' detected rows, as train.py builds them."""
    from pyspark.sql import functions as F

    from ctlake.core.radiomics import feature_layout
    from ctlake.core.splits import split_patients
    from ctlake.spark import tables
    from ctlake.spark.train import patient_labels, training_frame

    if not tables.exists(spark, config.warehouse, tables.FEATURES):
        raise InputError(f"no features table in {tables.table_path(config.warehouse, tables.FEATURES)}: "
                         "run `make run` first")
    names = tables.feature_names(tables.read(spark, config.warehouse, tables.FEATURES), "radiomics")
    if names != feature_layout(config.features.pixel_size)["radiomics"]:
        raise InputError("features table layout differs from this ctlake version: re-run jobs/features.py")
    assignment = split_patients(patient_labels(spark, config), config.train.split, config.train.folds,
                                config.train.seed)
    frame = training_frame(spark, config, names, assignment).withColumn("target", F.col("is_nodule"))
    columns = ["patch_id", "patient_pseudonym", "target", *names]
    train = (frame.filter(F.col("split") == "train").select(*columns).toPandas()
             .sort_values("patch_id", ignore_index=True))
    test = (frame.filter((F.col("split") == "test") & (F.col("mode") == "detected")).select(*columns).toPandas()
            .sort_values("patch_id", ignore_index=True))
    if train["target"].nunique() < 2 or test["target"].nunique() < 2:
        raise InputError("training and test rows must both hold nodule and other candidates")
    return names, train, test


def replicate(features: np.ndarray, labels: np.ndarray, n: int, jitter: float,
              seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows as they are, then n-1 copies with N(0, (jitter x the feature's std)^2) noise added."""
    if n == 1:
        return features, labels
    rng = np.random.default_rng(seed)
    scale = jitter * features.std(axis=0)
    copies = [features] + [features + rng.normal(size=features.shape) * scale for _ in range(n - 1)]
    return np.vstack(copies), np.tile(labels, n)


def standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both matrices scaled by the training rows' mean and (unit where zero) standard deviation."""
    mean, std = train.mean(axis=0), train.std(axis=0)
    std[std == 0] = 1.0
    return (train - mean) / std, (test - mean) / std


def spark_frame(spark, names: list[str], features: np.ndarray, labels: np.ndarray,
                standardized: np.ndarray | None = None):
    """A cached DataFrame: one column per feature, ``target``, ``row`` and (optionally) ``svm_features``."""
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    pdf = pd.DataFrame(features, columns=names)
    pdf["target"], pdf["row"] = labels.astype(float), np.arange(len(labels))
    if standardized is not None:
        pdf["svm_features"] = list(standardized)
    df = spark.createDataFrame(pdf)
    if standardized is not None:
        df = df.withColumn("svm_features", array_to_vector(F.col("svm_features")))
    df = df.cache()
    df.count()
    return df


# --- fits -----------------------------------------------------------------------------------------

def spark_forest(names: list[str], seed: int):
    from pyspark.ml import Pipeline
    from pyspark.ml.classification import RandomForestClassifier
    from pyspark.ml.feature import VectorAssembler

    return Pipeline(stages=[
        VectorAssembler(inputCols=names, outputCol="features", handleInvalid="keep"),
        RandomForestClassifier(featuresCol="features", labelCol="target", seed=seed,
                               numTrees=RF_SETTINGS["trees"], maxDepth=RF_SETTINGS["max_depth"],
                               featureSubsetStrategy=RF_SETTINGS["feature_subset"],
                               maxBins=RF_SETTINGS["max_bins"])])


def sklearn_forest(cores: int, seed: int):
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=RF_SETTINGS["trees"], max_depth=RF_SETTINGS["max_depth"],
                                  max_features=RF_SETTINGS["feature_subset"], n_jobs=cores, random_state=seed)


def partitioned_svc(k: int, rows: int, seed: int):
    from ctlake.spark.partitioned_svc import PartitionedSVC

    # maxRowsPerPartition = every training row: the partitions together see what the global SVC sees.
    return PartitionedSVC(featuresCol="svm_features", labelCol="target", numPartitions=k, seed=seed,
                          maxRowsPerPartition=rows, kernel=SVM_SETTINGS["kernel"], C=SVM_SETTINGS["C"],
                          gamma=SVM_SETTINGS["gamma"], calibration=SVM_SETTINGS["calibration"],
                          classWeight=SVM_SETTINGS["class_weight"], aggregation=SVM_SETTINGS["aggregation"])


def global_svc(seed: int):
    from ctlake.core.svm_partition import build_estimator

    return build_estimator(random_state=seed, **SVM_SETTINGS)


def time_spark(fit, repeats: int) -> tuple[object, dict]:
    """``fit()`` ``repeats`` times under the CPU sampler: the last model and the timings."""
    seconds, cpu = [], []
    for _ in range(repeats):
        with MemorySampler() as sampler:
            started = time.perf_counter()
            model = fit()
            seconds.append(time.perf_counter() - started)
        used = sampler.cpu_seconds()
        cpu.append(used["driver_python_cpu_s"] + used["jvm_cpu_s"] + used["python_worker_cpu_s"])
    return model, _timings(seconds, cpu)


def time_local(fit, repeats: int) -> tuple[object, dict]:
    """``fit()`` ``repeats`` times in this process: the last model and the timings (CPU of all its threads)."""
    seconds, cpu = [], []
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        model = fit()
        seconds.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    return model, _timings(seconds, cpu)


def _timings(seconds: list[float], cpu: list[float]) -> dict:
    return {"seconds": round(statistics.median(seconds), 3), "cpu_s": round(statistics.median(cpu), 2),
            "all_seconds": [round(s, 3) for s in seconds]}


# --- AUC ------------------------------------------------------------------------------------------

def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return round(float(roc_auc_score(labels, scores)), 4)


def paired_difference(labels: np.ndarray, first: np.ndarray, second: np.ndarray, patients: np.ndarray,
                      n_boot: int, seed: int) -> dict:
    """AUC(first) - AUC(second) and its 95% interval from resampling test patients (both models alike)."""
    from sklearn.metrics import roc_auc_score

    groups = [np.flatnonzero(patients == p) for p in np.unique(patients)]
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(n_boot):
        rows = np.concatenate([groups[i] for i in rng.integers(0, len(groups), len(groups))])
        if np.unique(labels[rows]).size < 2:
            continue
        differences.append(roc_auc_score(labels[rows], first[rows]) - roc_auc_score(labels[rows], second[rows]))
    low, high = np.percentile(differences, [2.5, 97.5]) if differences else (float("nan"), float("nan"))
    return {"difference": round(auc(labels, first) - auc(labels, second), 4),
            "ci95": [round(float(low), 4), round(float(high), 4)], "resamples": len(differences)}


# --- report ---------------------------------------------------------------------------------------

def _ci(d: dict) -> str:
    return f"{d['difference']:+.4f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"


def human_table(result: dict) -> str:
    m, v, cores, data = result["machine"], result["versions"], result["spark"]["cores"], result["data"]
    lines = [
        (f"machine: {m['cpu']}, {cores} Spark cores ({m['os_cpus']} CPUs), {m['ram_gb']} GB RAM; load average"
         f" (1/5/15 min) at start {result['load_average']['start']}, before scikit-learn"
         f" {result['load_average']['sklearn_start']}, at end {result['load_average']['end']}"),
        "versions: " + ", ".join(f"{k} {v[k]}" for k in ("python", "pyspark", "java", "numpy", "scikit-learn")
                                 if v.get(k)),
        (f"data: {data['features']} features; train {data['train_rows']} rows ({data['train_positives']} malignant)"
         f" of {data['train_patients']} patients; test {data['test_rows']} rows ({data['test_positives']} malignant)"
         f" of {data['test_patients']} patients; replicated copies jittered by {result['settings']['jitter']} sd"),
        (f"timing: median of {result['settings']['repeats']} fits after warm-up ({result['warmup_seconds']} s);"
         f" AUC on test patches; difference = first - second, [95% paired patient bootstrap]"),
        "",
        "Random forest (100 trees, depth 8, sqrt, 32 bins): Spark MLlib vs scikit-learn "
        f"(n_jobs={cores})",
        f"{'rows':>7}{'Spark s':>9}{'sklearn s':>11}{'ratio':>7}{'Spark CPU s':>13}{'skl CPU s':>11}"
        f"{'AUC Spark':>11}{'AUC skl':>9}  {'AUC diff [95% CI]':<28}target",
    ]
    for run in result["runs"]:
        rf = run["rf"]
        ok = rf["ratio"] <= TARGET_RF_RATIO and abs(rf["auc_difference"]["difference"]) <= TARGET_AUC_DIFFERENCE
        lines.append(f"{run['train_rows']:>7}{rf['spark']['seconds']:>9.2f}{rf['sklearn']['seconds']:>11.2f}"
                     f"{rf['ratio']:>7.2f}{rf['spark']['cpu_s']:>13.2f}{rf['sklearn']['cpu_s']:>11.2f}"
                     f"{rf['spark']['auc']:>11.4f}{rf['sklearn']['auc']:>9.4f}  {_ci(rf['auc_difference']):<28}"
                     f"{'meets' if ok else 'misses'}")
    lines += ["", "SVM (rbf, C=1, gamma scale, balanced, sigmoid-calibrated cv=3): PartitionedSVC vs one global SVC",
              f"{'rows':>7}{'k':>4}{'part. s':>9}{'global s':>10}{'speed-up':>10}{'CPU s p/g':>14}"
              f"{'max part. s':>13}{'AUC part.':>11}{'AUC glob.':>11}  {'AUC diff [95% CI]':<28}target"]
    for run in result["runs"]:
        svm = run["svm"]
        g = svm["global"]
        for p in svm["partitioned"]:
            if p.get("skipped"):
                lines.append(f"{run['train_rows']:>7}{p['k']:>4}  skipped: {p['skipped']}")
                continue
            ok = p["speedup"] >= TARGET_SVM_SPEEDUP and abs(p["auc_difference"]["difference"]) <= TARGET_AUC_DIFFERENCE
            lines.append(f"{run['train_rows']:>7}{p['k']:>4}{p['seconds']:>9.2f}{g['seconds']:>10.2f}"
                         f"{p['speedup']:>9.1f}x{p['cpu_s']:>7.1f}/{g['cpu_s']:<6.1f}"
                         f"{p['max_partition_seconds']:>13.2f}{p['auc']:>11.4f}{g['auc']:>11.4f}  "
                         f"{_ci(p['auc_difference']):<28}{'meets' if ok else 'misses'}")
    lines += ["", (f"targets: forest ratio (Spark s / scikit-learn s) <= {TARGET_RF_RATIO} and |AUC diff| <="
                   f" {TARGET_AUC_DIFFERENCE}; SVM speed-up (global s / partitioned s) >= {TARGET_SVM_SPEEDUP:g}x and"
                   f" |AUC diff| <= {TARGET_AUC_DIFFERENCE}"),
              ("max part. s = the slowest partition's own scikit-learn fit; the rest of 'part. s' is Spark"
               " (class counts, partition assignment, shuffle, worker start, pickling)")]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        config = load_settings(args.conf, overrides(args))
        seed = config.train.seed
    except (ConfigError, InputError) as exc:
        print(f"bench_models: error: {exc}", file=sys.stderr)
        return 2

    import warnings

    from pyspark.ml.functions import vector_to_array

    from ctlake.core.svm_partition import PartitionSkippedWarning, ensemble_scores, min_rows_per_class
    from ctlake.spark.session import build_session

    load_start = load_average()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = [1] + ([args.replicate] if args.replicate > 1 else [])
    need = min_rows_per_class(SVM_SETTINGS["calibration"], SVM_SETTINGS["aggregation"])
    spark = build_session(config.spark)
    try:
        cores = spark_cores(spark)
        try:
            names, train, test = load_rows(spark, config)
        except InputError as exc:
            print(f"bench_models: error: {exc}", file=sys.stderr)
            return 2
        x_train, y_train = train[names].to_numpy(np.float64), train["target"].to_numpy(np.float64)
        x_test, y_test = test[names].to_numpy(np.float64), test["target"].to_numpy(np.float64)
        meta = {"machine": machine(), "versions": versions(spark, ("scikit-learn", "scipy", "pandas", "pyarrow")),
                "spark": {"master": spark.sparkContext.master, "cores": cores,
                          "default_parallelism": spark.sparkContext.defaultParallelism}}
        test_df = spark_frame(spark, names, x_test, y_test)

        # Warm-up: a forest and a k=2 PartitionedSVC on every positive and a few negatives (not timed).
        started = time.perf_counter()
        subset = np.concatenate([np.flatnonzero(y_train == 1), np.flatnonzero(y_train == 0)[:WARMUP_NEGATIVES]])
        warm_std, _ = standardize(x_train[subset], x_test)
        warm_df = spark_frame(spark, names, x_train[subset], y_train[subset], warm_std)
        spark_forest(names, seed).fit(warm_df).transform(test_df).count()
        partitioned_svc(2, len(subset), seed).fit(warm_df)
        warm_df.unpersist()
        warmup_seconds = time.perf_counter() - started

        runs, local_inputs = [], []
        for n in sizes:
            x_n, y_n = replicate(x_train, y_train, n, args.jitter, seed)
            std_n, std_test = standardize(x_n, x_test)
            train_df = spark_frame(spark, names, x_n, y_n, std_n)
            run = {"replicate": n, "train_rows": len(y_n), "train_positives": int(y_n.sum())}

            forest, spark_rf = time_spark(lambda df=train_df: spark_forest(names, seed).fit(df), args.repeats)
            scored = (forest.transform(test_df).select("row", vector_to_array("probability")[1].alias("p"))
                      .orderBy("row").toPandas())
            spark_rf["p"] = scored["p"].to_numpy()

            partitioned, n_rows = [], len(y_n)
            for k in args.k:
                per_partition = int(min(y_n.sum(), len(y_n) - y_n.sum()) // k)
                if per_partition < need:
                    partitioned.append({"k": k, "skipped": (f"partitions would get {per_partition} rows of the"
                                                            f" minority class; sigmoid calibration needs {need}")})
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("error", PartitionSkippedWarning)  # a skipped partition is a bench error
                    model, timing = time_spark(
                        lambda df=train_df, k=k, rows=n_rows: partitioned_svc(k, rows, seed).fit(df), args.repeats)
                p, _ = ensemble_scores(model.models_, std_test, SVM_SETTINGS["aggregation"])
                stats = model.partition_stats_
                partitioned.append({"k": k, **timing, "p": p,
                                    "partition_rows": [s["n_rows"] for s in stats],
                                    "partition_positives": [s["n_pos"] for s in stats],
                                    "max_partition_seconds": round(max(s["train_seconds"] for s in stats), 3),
                                    "sum_partition_seconds": round(sum(s["train_seconds"] for s in stats), 3)})
            train_df.unpersist()
            run["rf"], run["svm"] = {"spark": spark_rf}, {"partitioned": partitioned}
            runs.append(run)
            local_inputs.append((x_n, y_n, std_n, std_test))
    finally:
        spark.stop()

    # Spark is stopped: the scikit-learn fits have the machine to themselves.
    load_sklearn = load_average()
    sklearn_forest(cores, seed).fit(x_train[subset], y_train[subset])
    global_svc(seed).fit(warm_std, y_train[subset])
    patients = test["patient_pseudonym"].to_numpy()
    for run, (x_n, y_n, std_n, std_test) in zip(runs, local_inputs):
        forest, sk_rf = time_local(lambda x=x_n, y=y_n: sklearn_forest(cores, seed).fit(x, y), args.repeats)
        sk_rf["p"] = forest.predict_proba(x_test)[:, 1]
        svc, g = time_local(lambda x=std_n, y=y_n: global_svc(seed).fit(x, y), args.repeats)
        g["p"] = svc.predict_proba(std_test)[:, 1]

        rf = run["rf"]
        rf["sklearn"] = sk_rf
        for side in (rf["spark"], rf["sklearn"]):
            side["auc"] = auc(y_test, side["p"])
        rf["ratio"] = round(rf["spark"]["seconds"] / rf["sklearn"]["seconds"], 3)
        rf["cpu_ratio"] = round(rf["spark"]["cpu_s"] / rf["sklearn"]["cpu_s"], 3) if rf["sklearn"]["cpu_s"] else None
        rf["auc_difference"] = paired_difference(y_test, rf["spark"]["p"], rf["sklearn"]["p"], patients,
                                                 args.bootstrap, seed)
        g["auc"] = auc(y_test, g["p"])
        run["svm"]["global"] = g
        for p in run["svm"]["partitioned"]:
            if p.get("skipped"):
                continue
            p["auc"] = auc(y_test, p["p"])
            p["speedup"] = round(g["seconds"] / p["seconds"], 2)
            p["cpu_speedup"] = round(g["cpu_s"] / p["cpu_s"], 2) if p["cpu_s"] else None
            p["auc_difference"] = paired_difference(y_test, p["p"], g["p"], patients, args.bootstrap, seed)
        for side in (rf["spark"], rf["sklearn"], g, *run["svm"]["partitioned"]):
            side.pop("p", None)  # scores were for the AUCs; they do not go into the JSON

    result = {
        "benchmark": "models",
        **meta,
        "load_average": {"start": load_start, "sklearn_start": load_sklearn, "end": load_average()},
        "data": {"warehouse": config.warehouse, "features": len(names),
                 "train_rows": len(train), "train_positives": int(y_train.sum()),
                 "train_patients": int(train["patient_pseudonym"].nunique()),
                 "test_rows": len(test), "test_positives": int(y_test.sum()),
                 "test_patients": int(test["patient_pseudonym"].nunique())},
        "settings": {"seed": seed, "replicate": sizes, "jitter": args.jitter, "k": args.k, "repeats": args.repeats,
                     "bootstrap": args.bootstrap, "rf": RF_SETTINGS, "svm": SVM_SETTINGS,
                     "svm_auc_scores": "calibrated probabilities (predict_proba), both sides"},
        "warmup_seconds": round(warmup_seconds, 2),
        "runs": runs,
        "targets": {"rf_ratio_max": TARGET_RF_RATIO, "svm_speedup_min": TARGET_SVM_SPEEDUP,
                    "auc_difference_max": TARGET_AUC_DIFFERENCE},
    }
    write_result(result, human_table(result), workdir / "models.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
