"""Per-partition SVMs on real Spark: stratified partitions, exact ensemble maths, Pipeline save/load."""
import logging
import math

import numpy as np
import pandas as pd
import pytest
import sklearn
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.evaluation import BinaryClassificationEvaluator
from pyspark.ml.feature import StandardScaler, VectorAssembler
from pyspark.ml.functions import array_to_vector, vector_to_array
from pyspark.ml.linalg import DenseVector
from pyspark.sql import functions as F
from scipy.special import expit
from sklearn.metrics import roc_auc_score

from ctlake.core.svm_partition import (
    PartitionSkippedWarning,
    build_estimator,
    ensemble_scores,
    min_rows_per_class,
    stratified_caps,
    svm_grid,
    train_partition,
)
from ctlake.errors import ConfigError, InputError
from ctlake.spark.partitioned_svc import (
    PARTITION_COL,
    RANK_COL,
    PartitionedSVC,
    PartitionedSVCModel,
    assign_partitions,
    shuffle_keys,
    tune_partitioned_svc,
)

FEATURES = [f"f{i}" for i in range(5)]


def gaussian_frame(spark, n_neg, n_pos, seed, shift=1.5, assemble=True):
    """Two 5-D unit Gaussians whose means differ by ``shift`` in every feature; ``id`` orders rows."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n_neg), np.ones(n_pos)]
    points = rng.normal(size=(len(labels), len(FEATURES))) + labels[:, None] * shift
    pdf = pd.DataFrame(points, columns=FEATURES)
    pdf.insert(0, "id", np.arange(len(labels)))
    pdf["label"] = labels
    df = spark.createDataFrame(pdf)
    if assemble:
        df = VectorAssembler(inputCols=FEATURES, outputCol="features").transform(df).select("id", "features", "label")
    return df


def scored(model, df):
    """(features matrix, P(class 1), output rows), all in ``id`` order."""
    rows = model.transform(df).orderBy("id").collect()
    return (np.array([r["features"].toArray() for r in rows]),
            np.array([r["probability"][1] for r in rows]),
            rows)


@pytest.fixture(scope="module")
def train(spark):
    return gaussian_frame(spark, 200, 200, seed=1).cache()


@pytest.fixture(scope="module")
def test(spark):
    return gaussian_frame(spark, 100, 100, seed=2).cache()


@pytest.fixture(scope="module")
def fitted(train):
    return PartitionedSVC(numPartitions=4, seed=7).fit(train)


# ------------------------------------------------------------------ params and pure helpers

def test_params_have_defaults_and_getters():
    svc = PartitionedSVC()
    assert (svc.getNumPartitions(), svc.getKernel(), svc.getC(), svc.getGamma(), svc.getMaxRowsPerPartition(),
            svc.getAggregation(), svc.getCalibration(), svc.getClassWeight(), svc.getSeed()) == \
        (4, "rbf", 1.0, "scale", 20000, "probability", "sigmoid", "balanced", 0)
    assert (svc.getFeaturesCol(), svc.getLabelCol(), svc.getPredictionCol(), svc.getProbabilityCol(),
            svc.getRawPredictionCol()) == ("features", "label", "prediction", "probability", "rawPrediction")
    assert not svc.isSet(svc.kernel) and svc.hasDefault(svc.kernel)
    assert not svc.isDefined(svc.weightCol)  # as in MLlib: unset means every weight is 1.0
    assert PartitionedSVC(weightCol="w").getWeightCol() == PartitionedSVC().setWeightCol("w").getWeightCol() == "w"
    custom = PartitionedSVC(kernel="linear", C=10, gamma=0.01, numPartitions=8).setClassWeight("none")
    assert (custom.getKernel(), custom.getC(), custom.getGamma(), custom.getNumPartitions(),
            custom.getClassWeight()) == ("linear", 10.0, "0.01", 8, "none")


@pytest.mark.parametrize("kwargs, message", [
    ({"kernel": "poly"}, "kernel must be one of 'rbf', 'linear'; got 'poly'"),
    ({"gamma": "wide"}, "gamma must be 'scale', 'auto' or a positive number; got 'wide'"),
    ({"gamma": "-1"}, "gamma must be"),
    ({"C": 0.0}, "C must be a positive finite number; got 0.0"),
    ({"numPartitions": 0}, "numPartitions must be an integer >= 1; got 0"),
    ({"maxRowsPerPartition": 1}, "maxRowsPerPartition must be an integer >= 2"),
    ({"aggregation": "vote"}, "aggregation must be one of 'probability', 'decision'"),
    ({"calibration": "beta"}, "calibration must be one of"),
])
def test_bad_param_values_are_configuration_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PartitionedSVC(**kwargs)


def test_stratified_caps_keep_the_ratio_and_the_limit():
    assert stratified_caps({0.0: 800, 1.0: 200}, k=4, max_rows=250) is None
    assert stratified_caps({0.0: 800, 1.0: 200}, k=4, max_rows=100) == {0.0: 80, 1.0: 20}
    # A rare class keeps at least one row per partition.
    assert stratified_caps({0.0: 10_000, 1.0: 3}, k=2, max_rows=100) == {0.0: 99, 1.0: 1}


def test_estimator_per_calibration_setting():
    calibrated = build_estimator(calibration="isotonic", random_state=3)
    assert (calibrated.method, calibrated.cv, calibrated.ensemble) == ("isotonic", 3, True)
    assert calibrated.estimator.random_state == 3
    platt = build_estimator(calibration="platt-in-svc", kernel="linear")
    assert (platt.method, platt.cv, platt.ensemble, platt.estimator.kernel) == ("sigmoid", 5, False, "linear")
    bare = build_estimator(aggregation="decision", calibration="isotonic", gamma="0.5", class_weight="none")
    assert (type(bare).__name__, bare.gamma, bare.class_weight) == ("SVC", 0.5, None)


def test_train_partition_passes_sample_weight_also_under_metadata_routing():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(30), np.ones(30)]
    features = rng.normal(size=(60, 2)) + labels[:, None] * 0.5
    settings = {"kernel": "rbf", "C": 1.0, "gamma": "scale", "calibration": "sigmoid",
                "class_weight": "balanced", "aggregation": "probability", "seed": 0, "partition": 0}
    weights = np.where(labels == 1.0, 10.0, 1.0)

    def p_positive(**kwargs):
        model, skipped = train_partition(features, labels, settings, **kwargs)
        assert skipped is None
        return model.predict_proba(features)[:, 1]
    plain = p_positive()
    assert np.array_equal(p_positive(sample_weight=np.ones(60)), plain)
    weighted = p_positive(sample_weight=weights)
    assert weighted[labels == 1.0].mean() > plain[labels == 1.0].mean()
    # Routing switched on globally needs the SVC to request the weights; the result is the same.
    with sklearn.config_context(enable_metadata_routing=True):
        assert np.array_equal(p_positive(sample_weight=weights), weighted)


# ------------------------------------------------------------------ partition assignment

def assignment(df, seed, k=4):
    """{id: (label, partition, rank)} from one collect of :func:`assign_partitions`."""
    return {r["id"]: (r["label"], r[PARTITION_COL], r[RANK_COL])
            for r in assign_partitions(df, k, "label", seed).collect()}


def test_assign_partitions_is_stratified_and_independent_of_row_order(spark):
    df = gaussian_frame(spark, 200, 100, seed=3)
    assigned = assignment(df, seed=11)
    # Each (partition, label) holds exactly its share, ranked 0..n-1.
    ranks = {}
    for label, partition, rank in assigned.values():
        ranks.setdefault((partition, label), []).append(rank)
    assert {key: sorted(r) for key, r in ranks.items()} == \
        {(p, label): list(range(n)) for p in range(4) for label, n in ((0.0, 50), (1.0, 25))}

    assert assignment(df.orderBy(F.desc("id")).repartition(3), seed=11) == assigned
    assert assignment(df, seed=12) != assigned


def test_last_bit_differences_do_not_deal_the_rows_anew(spark):
    df = gaussian_frame(spark, 60, 30, seed=5)
    nudged = df.withColumn("features", array_to_vector(F.transform(
        vector_to_array("features"), lambda x: x * F.lit(1.0 + 2.0 ** -50))))
    assert nudged.select(vector_to_array("features")).collect() != df.select(vector_to_array("features")).collect()
    assert assignment(nudged, seed=11) == assignment(df, seed=11)


@pytest.mark.parametrize("k", [2, 3, 4, 8, 16, 32])
def test_shuffle_keys_give_each_partition_its_own_task(spark, k):
    keys = shuffle_keys(k)
    frame = spark.createDataFrame([(key,) for key in keys], "key int")
    assert [r[0] for r in frame.select(F.pmod(F.hash("key"), F.lit(k))).collect()] == list(range(k))
    tasks = frame.repartition(k, "key").select("key", F.spark_partition_id().alias("task")).collect()
    assert sorted(r["task"] for r in tasks) == list(range(k))


def test_uneven_classes_differ_by_at_most_one_row_per_partition(spark):
    assigned = assignment(gaussian_frame(spark, 23, 6, seed=4), seed=0).values()
    for label, shares in ((0.0, [5, 6, 6, 6]), (1.0, [1, 1, 2, 2])):
        assert sorted(sum(1 for lab, p, _ in assigned if lab == label and p == part) for part in range(4)) == shares


# ------------------------------------------------------------------ fit and transform

def test_fits_one_model_per_partition_and_classifies_held_out_data(fitted, test):
    assert fitted.n_partitions_trained_ == len(fitted.models_) == 4
    assert [s["partition"] for s in fitted.partition_stats_] == [0, 1, 2, 3]
    assert [(s["n_rows"], s["n_pos"], s["skipped"]) for s in fitted.partition_stats_] == [(100, 50, None)] * 4
    assert fitted.skipped_partitions_ == []
    auc = BinaryClassificationEvaluator(metricName="areaUnderROC").evaluate(fitted.transform(test))
    assert auc > 0.9


def test_prediction_is_probability_at_least_one_half(fitted, test):
    _, p, rows = scored(fitted, test)
    assert all(isinstance(r["probability"], DenseVector) and isinstance(r["rawPrediction"], DenseVector) for r in rows)
    assert [r["prediction"] for r in rows] == [1.0 if x >= 0.5 else 0.0 for x in p]
    assert [list(r["probability"]) for r in rows] == [[1 - x, x] for x in p]
    assert [list(r["rawPrediction"]) for r in rows] == [[1 - x, x] for x in p]
    assert 0 < sum(r["prediction"] for r in rows) < len(rows)


def test_ensemble_probability_is_the_mean_of_the_gathered_models(fitted, test):
    features, p, _ = scored(fitted, test)
    local = np.mean(np.stack([m.predict_proba(features)[:, 1] for m in fitted.models_]), axis=0)
    assert np.array_equal(p, local)
    assert len({tuple(m.predict_proba(features[:5])[:, 1]) for m in fitted.models_}) == 4  # distinct models


def test_decision_aggregation_averages_decision_values_through_a_logistic(train, test):
    model = PartitionedSVC(numPartitions=2, kernel="linear", aggregation="decision", seed=7).fit(train)
    assert [type(m).__name__ for m in model.models_] == ["SVC", "SVC"]
    features, p, rows = scored(model, test)
    s = np.mean(np.stack([m.decision_function(features) for m in model.models_]), axis=0)
    assert np.array_equal(p, expit(s))
    assert [list(r["rawPrediction"]) for r in rows] == [[-x, x] for x in s]
    assert [r["prediction"] for r in rows] == [1.0 if x >= 0 else 0.0 for x in s]


def test_same_seed_same_model_and_other_seed_other_partitions(fitted, train, test):
    again = PartitionedSVC(numPartitions=4, seed=7).fit(train)
    assert np.array_equal(scored(again, test)[1], scored(fitted, test)[1])
    other = PartitionedSVC(numPartitions=4, seed=8).fit(train)
    assert not np.array_equal(scored(other, test)[1], scored(fitted, test)[1])


def test_max_rows_per_partition_caps_what_each_model_sees(train, caplog):
    with caplog.at_level(logging.WARNING, logger="ctlake.svm_ensemble"):
        model = PartitionedSVC(numPartitions=2, maxRowsPerPartition=50, seed=7).fit(train)
    assert [(s["n_rows"], s["n_pos"]) for s in model.partition_stats_] == [(50, 25), (50, 25)]
    assert [m.n_features_in_ for m in model.models_] == [5, 5]
    assert "partitions of up to 200 rows are downsampled to 50" in caplog.text


def test_partition_with_one_class_is_skipped_with_a_warning(spark):
    # Two positives dealt round-robin over four partitions: partitions 2 and 3 get none.
    df = gaussian_frame(spark, 60, 2, seed=5)
    with pytest.warns(PartitionSkippedWarning) as caught:
        model = PartitionedSVC(numPartitions=4, aggregation="decision", seed=7).fit(df)
    assert sorted(str(w.message) for w in caught) == [
        "PartitionedSVC: partition 2 skipped: only one class (0.0) in 15 rows",
        "PartitionedSVC: partition 3 skipped: only one class (0.0) in 15 rows",
    ]
    assert model.n_partitions_trained_ == 2
    assert model.skipped_partitions_ == [2, 3]
    assert model.transform(df).count() == 62


def test_no_trainable_partition_is_an_input_error(spark):
    # One positive per partition is too few for 3-fold calibration.
    df = gaussian_frame(spark, 60, 2, seed=5)
    with pytest.warns(PartitionSkippedWarning), \
            pytest.raises(InputError, match=r"trained no model out of 2 partitions \(partition 0: 30 negative"):
        PartitionedSVC(numPartitions=2, seed=7).fit(df)


def test_inputs_are_checked_before_training(spark, train):
    with pytest.raises(InputError, match="needs both classes"):
        PartitionedSVC().fit(train.filter("label = 1"))
    with pytest.raises(InputError, match="binary labels 0.0/1.0 in 'label'; found 2.0"):
        PartitionedSVC().fit(train.withColumn("label", F.col("label") * 2))
    with pytest.raises(InputError, match="'f0' must be an ML Vector .* found double"):
        PartitionedSVC(featuresCol="f0").fit(gaussian_frame(spark, 10, 10, seed=6, assemble=False))


# ------------------------------------------------------------------ sample weights

@pytest.fixture(scope="module")
def overlapping(spark):
    """80 rows of two heavily overlapping classes, with unit and positive-heavy weight columns."""
    return (gaussian_frame(spark, 40, 40, seed=9, shift=0.3)
            .withColumn("ones", F.lit(1))  # an integer column: weights are cast to double
            .withColumn("w_pos", F.when(F.col("label") == 1.0, 20.0).otherwise(1.0))
            .cache())


def test_weighting_the_positives_raises_their_predicted_probability(overlapping):
    unit = PartitionedSVC(numPartitions=2, seed=3, weightCol="ones").fit(overlapping)
    heavy = PartitionedSVC(numPartitions=2, seed=3, weightCol="w_pos").fit(overlapping)
    assert [(s["n_rows"], s["n_pos"]) for s in heavy.partition_stats_] == [(40, 20), (40, 20)]
    labels = np.array([r["label"] for r in overlapping.orderBy("id").collect()])
    _, p_unit, rows_unit = scored(unit, overlapping)
    _, p_heavy, rows_heavy = scored(heavy, overlapping)
    assert p_heavy[labels == 1.0].mean() > p_unit[labels == 1.0].mean() + 0.1
    assert sum(r["prediction"] for r in rows_heavy) > sum(r["prediction"] for r in rows_unit)


@pytest.mark.parametrize("weight_col", ["ones", ""])
def test_unit_or_empty_weight_column_gives_exactly_the_unweighted_model(overlapping, weight_col):
    plain = PartitionedSVC(numPartitions=2, seed=3).fit(overlapping)
    weighted = PartitionedSVC(numPartitions=2, seed=3, weightCol=weight_col).fit(overlapping)
    assert weighted.getWeightCol() == weight_col
    assert weighted.partition_stats_[0]["n_rows"] == plain.partition_stats_[0]["n_rows"]
    assert np.array_equal(scored(weighted, overlapping)[1], scored(plain, overlapping)[1])


@pytest.mark.parametrize("weight, message", [
    ("IF(id = 3, -1.0, 1.0)",
     "weight column 'w' must hold finite weights >= 0; 1 of 80 rows are null, NaN, infinite or negative"),
    ("CASE WHEN id < 2 THEN NULL WHEN id = 5 THEN double('NaN') ELSE 1.0 END",
     "weight column 'w' must hold finite weights >= 0; 3 of 80 rows"),
    ("IF(id = 0, double('Infinity'), 1.0)", "1 of 80 rows are null, NaN, infinite or negative"),
    ("'heavy'", "weight column 'w' must be numeric; found string"),
])
def test_bad_weights_are_input_errors(overlapping, weight, message):
    with pytest.raises(InputError, match=message):
        PartitionedSVC(numPartitions=2, weightCol="w").fit(overlapping.withColumn("w", F.expr(weight)))


def test_missing_weight_column_is_an_input_error(overlapping):
    with pytest.raises(InputError, match=r"weight column 'weight' \(weightCol\) not found; columns are \['id'"):
        PartitionedSVC(numPartitions=2).setWeightCol("weight").fit(overlapping)


# ------------------------------------------------------------------ save / load

def test_pipeline_save_load_gives_identical_probabilities(spark, tmp_path):
    train_raw = (gaussian_frame(spark, 150, 150, seed=1, assemble=False)
                 .withColumn("w", F.when(F.col("label") == 0.0, 3.0).otherwise(1.0)))
    test_raw = gaussian_frame(spark, 50, 50, seed=2, assemble=False)  # scoring needs no weights
    pipeline = Pipeline(stages=[VectorAssembler(inputCols=FEATURES, outputCol="raw_features"),
                                StandardScaler(inputCol="raw_features", outputCol="features"),
                                PartitionedSVC(numPartitions=3, kernel="rbf", C=2.0, seed=5, weightCol="w")])
    pipeline.write().save(str(tmp_path / "pipeline"))
    saved_svc = Pipeline.load(str(tmp_path / "pipeline")).getStages()[2]
    assert (saved_svc.getC(), saved_svc.getWeightCol()) == (2.0, "w")

    model = pipeline.fit(train_raw)
    model.write().save(str(tmp_path / "model"))
    loaded = PipelineModel.load(str(tmp_path / "model"))

    svm = loaded.stages[2]
    assert isinstance(svm, PartitionedSVCModel)
    assert (svm.uid, svm.getC(), svm.getNumPartitions(), svm.getWeightCol(), svm.n_partitions_trained_) == \
        (model.stages[2].uid, 2.0, 3, "w", 3)
    assert svm.partition_stats_ == model.stages[2].partition_stats_

    def probabilities(m):
        return [(r["id"], list(r["probability"]), list(r["rawPrediction"]), r["prediction"])
                for r in m.transform(test_raw).orderBy("id").collect()]
    assert probabilities(loaded) == probabilities(model)


def test_model_saves_skipped_partitions_and_overwrites(spark, tmp_path):
    df = gaussian_frame(spark, 60, 2, seed=5)
    with pytest.warns(PartitionSkippedWarning):
        model = PartitionedSVC(numPartitions=4, aggregation="decision", seed=7).fit(df)
    path = str(tmp_path / "svm")
    model.save(path)
    model.write().overwrite().save(path)
    loaded = PartitionedSVCModel.load(path)
    assert (loaded.skipped_partitions_, loaded.n_partitions_trained_, loaded.getAggregation()) == ([2, 3], 2, "decision")
    with pytest.raises(InputError, match="nowhere cannot be read as a saved model"):
        PartitionedSVCModel.load(str(tmp_path / "nowhere"))


# ------------------------------------------------------------------ tuning

#: Separates the shifted Gaussians: the Bayes AUC of two unit 5-D normals 1.5 apart per feature
#: is Phi(1.5 * sqrt(5) / sqrt(2)) = 0.991.
SEPARATES = {"kernel": "linear", "C": 0.1}
#: Cannot rank anything: no validation row is within |x - x'|^2 = 0.03 of a training row, so
#: exp(-1e6 |x - x'|^2) underflows to exactly 0, each SVC returns its intercept, every row gets
#: the same score and the AUC of a constant is exactly 0.5. (A tiny C would not do: with every
#: training row a bound support vector, w is the difference of the class means, which ranks
#: these classes as well as any model.)
BLIND = {"kernel": "rbf", "C": 1.0, "gamma": "1e6"}
FIXED = {"numPartitions": 2, "seed": 3}


def spark_pr_area(labels, scores, weights):
    """Spark's areaUnderPR, written out: trapezoids over (recall, precision) at each distinct
    score, highest first, starting from (0, precision at the highest score)."""
    labels, scores, weights = map(np.asarray, (labels, scores, weights))
    order = np.argsort(-scores, kind="stable")
    distinct = np.r_[np.flatnonzero(np.diff(scores[order])), len(scores) - 1]
    tp = np.cumsum(weights[order] * labels[order])[distinct]
    fp = np.cumsum(weights[order] * (1 - labels[order]))[distinct]
    recall, precision = np.r_[0.0, tp / tp[-1]], tp / (tp + fp)
    precision = np.r_[precision[0], precision]
    return float(np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2))


def test_tuning_picks_the_candidate_that_separates_wherever_it_is_in_the_grid(train, test):
    for grid in ([BLIND, SEPARATES], [SEPARATES, BLIND]):
        best, results = tune_partitioned_svc(train, test, grid, **FIXED)
        assert best == {**FIXED, **SEPARATES}
        assert [{k: r[k] for k in c} for c, r in zip(grid, results)] == grid  # grid order, entries echoed
        auc = {r["kernel"]: r["areaUnderROC"] for r in results}
        assert auc["rbf"] == 0.5
        assert auc["linear"] == pytest.approx(0.991, abs=0.02)
        assert [r["n_partitions_trained"] for r in results] == [2, 2]


def test_tuning_reports_the_auc_sklearn_computes_on_the_collected_predictions(train, test):
    grid = [SEPARATES, {"kernel": "rbf", "C": 1.0, "gamma": "0.01"}, BLIND]
    _, results = tune_partitioned_svc(train, test, grid, **FIXED)
    for candidate, result in zip(grid, results):
        rows = PartitionedSVC(**FIXED, **candidate).fit(train).transform(test).select("label", "probability").collect()
        independent = roc_auc_score([r["label"] for r in rows], [r["probability"][1] for r in rows])
        assert result["areaUnderROC"] == pytest.approx(independent, abs=1e-12)
    with pytest.raises(ConfigError, match="non-empty grid"):
        tune_partitioned_svc(train, test, [])
    with pytest.raises(ConfigError, match="evaluator_metric must be 'areaUnderROC' or 'areaUnderPR'; got 'accuracy'"):
        tune_partitioned_svc(train, test, grid, evaluator_metric="accuracy")


def test_tuning_keeps_the_first_of_equal_candidates(train, test):
    # Both blind candidates score exactly 0.5: the first one listed wins, whatever its C.
    best, results = tune_partitioned_svc(train, test, [{**BLIND, "C": 2.0}, BLIND], **FIXED)
    assert [r["areaUnderROC"] for r in results] == [0.5, 0.5]
    assert best == {**FIXED, **BLIND, "C": 2.0}


@pytest.fixture(scope="module")
def weighted_validation(overlapping):
    """Overlapping classes (AUC far from 1) with weights that vary within each class, so that
    weighting changes the AUC (a weight per class only would cancel out of it)."""
    return overlapping.withColumn("w", (F.col("id") % 4 + 1).cast("double") ** 2)


def test_tuning_with_a_weighted_evaluator_scores_with_it(train, weighted_validation):
    evaluator = BinaryClassificationEvaluator(labelCol="label", rawPredictionCol="probability", weightCol="w")
    grid = [SEPARATES]
    _, results = tune_partitioned_svc(train, weighted_validation, grid, evaluator=evaluator, **FIXED)
    rows = (PartitionedSVC(**FIXED, **grid[0]).fit(train).transform(weighted_validation)
            .select("label", "probability", "w").collect())
    labels, scores, weights = ([r["label"] for r in rows], [r["probability"][1] for r in rows],
                               [r["w"] for r in rows])
    expected = roc_auc_score(labels, scores, sample_weight=weights)
    assert abs(expected - roc_auc_score(labels, scores)) > 0.01  # the weights matter here
    assert results[0]["areaUnderROC"] == pytest.approx(expected, abs=1e-9)


def test_tuning_keys_the_results_by_the_evaluator_metric_and_picks_by_it(train, weighted_validation):
    evaluator = BinaryClassificationEvaluator(metricName="areaUnderPR", rawPredictionCol="probability",
                                              weightCol="w")
    grid = [BLIND, SEPARATES]
    best, results = tune_partitioned_svc(train, weighted_validation, grid, evaluator=evaluator, **FIXED)
    assert best == {**FIXED, **SEPARATES}
    assert all("areaUnderPR" in r and "areaUnderROC" not in r for r in results)
    for candidate, result in zip(grid, results):
        rows = (PartitionedSVC(**FIXED, **candidate).fit(train).transform(weighted_validation)
                .select("label", "probability", "w").collect())
        expected = spark_pr_area([r["label"] for r in rows], [r["probability"][1] for r in rows],
                                 [r["w"] for r in rows])
        assert result["areaUnderPR"] == pytest.approx(expected, abs=1e-9)
    # A constant score: precision is the weighted share of positives at every recall.
    positive_share = weighted_validation.agg(F.sum(F.col("w") * F.col("label")) / F.sum("w")).first()[0]
    assert results[0]["areaUnderPR"] == pytest.approx(positive_share, abs=1e-12)


# ------------------------------------------------------------------ grid and ensemble maths (pure)

def test_svm_grid_tries_gamma_only_for_the_rbf_kernel():
    grid = svm_grid(["rbf", "linear"], [0.3, 1], ["scale", "0.01"])
    assert grid == [
        {"kernel": "rbf", "C": 0.3, "gamma": "scale"}, {"kernel": "rbf", "C": 0.3, "gamma": "0.01"},
        {"kernel": "rbf", "C": 1.0, "gamma": "scale"}, {"kernel": "rbf", "C": 1.0, "gamma": "0.01"},
        {"kernel": "linear", "C": 0.3, "gamma": "scale"}, {"kernel": "linear", "C": 1.0, "gamma": "scale"}]
    assert [(type(g["C"]), type(g["gamma"])) for g in grid] == [(float, str)] * 6  # 1 == 1.0 alone would not say
    assert svm_grid(["linear"], [2], [0.5]) == [{"kernel": "linear", "C": 2.0, "gamma": "scale"}]
    assert svm_grid(["rbf"], [2], [0.5]) == [{"kernel": "rbf", "C": 2.0, "gamma": "0.5"}]


class _FixedModel:
    """Stands in for a fitted partition model with known outputs."""

    def __init__(self, p_positive, decision):
        self.p, self.s = np.asarray(p_positive, float), np.asarray(decision, float)

    def predict_proba(self, features):
        assert len(features) == len(self.p)
        return np.c_[1 - self.p, self.p]

    def decision_function(self, features):
        assert len(features) == len(self.s)
        return self.s


def test_ensemble_scores_average_probabilities_or_squash_the_mean_decision():
    models = [_FixedModel([0.2, 0.9], [-1.0, 3.0]), _FixedModel([0.4, 0.5], [3.0, -4.0])]
    features = np.zeros((2, 5))
    s, p = ensemble_scores(models, features, "probability")
    np.testing.assert_allclose(s, [0.3, 0.7], rtol=0, atol=1e-15)
    np.testing.assert_allclose(p, [0.3, 0.7], rtol=0, atol=1e-15)
    s, p = ensemble_scores(models, features, "decision")
    np.testing.assert_allclose(s, [1.0, -0.5], rtol=0, atol=1e-15)
    np.testing.assert_allclose(p, [1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(0.5))], rtol=1e-15)


@pytest.mark.parametrize("calibration, aggregation, rows", [
    ("sigmoid", "probability", 3), ("isotonic", "probability", 3), ("platt-in-svc", "probability", 5),
    ("platt-in-svc", "decision", 1),
])
def test_min_rows_per_class_is_the_calibration_folds(calibration, aggregation, rows):
    assert min_rows_per_class(calibration, aggregation) == rows
    # One row fewer of a class and the partition is skipped; exactly that many and it trains.
    rng = np.random.default_rng(0)
    settings = {"kernel": "linear", "C": 1.0, "gamma": "scale", "calibration": calibration,
                "class_weight": "balanced", "aggregation": aggregation, "seed": 0, "partition": 0}
    for positives, trains in ((rows, True), (rows - 1, False)):
        labels = np.r_[np.zeros(10), np.ones(positives)]
        features = rng.normal(size=(len(labels), 2)) + labels[:, None]
        model, skipped = train_partition(features, labels, settings)
        assert (model is not None, skipped is None) == (trains, trains), skipped
