"""Per-partition SVMs: k scikit-learn SVCs trained in parallel and averaged, as a Spark ML stage.

A kernel SVM costs between O(n^2) and O(n^3) to train, so one SVC on all the
nodule candidates is out of reach; k SVCs on k disjoint, stratified slices of
the data train in parallel (one ``applyInArrow`` group each) and their
averaged scores classify about as well as the single large model would.

Flow of :class:`PartitionedSVC`:

1. :func:`assign_partitions` numbers the rows of each label in a seeded hash
   order and deals them round-robin to ``numPartitions`` partitions, so every
   partition sees both classes in the data's ratio (counts differ by at most
   one row per class). An optional ``weightCol`` travels with each row as a
   per-row ``sample_weight`` but does not enter the hash, so weighting the
   data never moves a row to another partition.
2. Each partition is capped at ``maxRowsPerPartition`` rows *before* the
   groupBy (the rows dropped are the highest-numbered of each label, i.e. a
   seeded, stratified sample), because ``applyInArrow`` loads a whole group
   into one Python worker's memory.
3. ``groupBy(partition).applyInArrow`` fits one model per partition
   (:mod:`ctlake.core.svm_partition`) and returns it pickled in
   one small row; the k rows are gathered on the driver.
4. :class:`PartitionedSVCModel` broadcasts the pickled models once per
   ``transform`` and scores rows in an iterator pandas UDF that unpickles them
   once per task (:func:`ensemble_scores`).

Only labels 0.0 and 1.0 are supported (lung-cancer classifiers are binary).
"""
from __future__ import annotations

import logging
import math
import pickle
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import sklearn
from pyspark import keyword_only
from pyspark.ml import Estimator, Model
from pyspark.ml.evaluation import BinaryClassificationEvaluator
from pyspark.ml.functions import array_to_vector, vector_to_array
from pyspark.ml.linalg import VectorUDT
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import (
    HasFeaturesCol,
    HasLabelCol,
    HasPredictionCol,
    HasProbabilityCol,
    HasRawPredictionCol,
    HasSeed,
    HasWeightCol,
)
from pyspark.ml.util import (
    DefaultParamsReadable,
    DefaultParamsReader,
    DefaultParamsWritable,
    DefaultParamsWriter,
    MLReadable,
    MLReader,
    MLWritable,
    MLWriter,
)
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.pandas.types import to_arrow_schema

from ctlake.core.svm_partition import (
    AGGREGATIONS,
    CALIBRATIONS,
    CLASS_WEIGHTS,
    KERNELS,
    PartitionSkippedWarning,
    ensemble_scores,
    stratified_caps,
    train_partition,
)
from ctlake.errors import ConfigError, InputError

log = logging.getLogger("ctlake.svm_ensemble")

#: Column :func:`assign_partitions` adds: the partition (0..k-1) a row trains in.
PARTITION_COL = "partition"
#: Column :func:`assign_partitions` adds: the row's 0-based position among the rows of
#: its label in its partition, in seeded-hash order (downsampling keeps the lowest).
RANK_COL = "rank_in_partition"

#: One row per partition, as ``applyInArrow`` returns it and as the model saves it.
#: ``model`` is null (and ``skipped`` says why) when the partition could not be trained.
PARTITION_RESULT_SCHEMA = T.StructType([
    T.StructField("partition", T.IntegerType(), False),
    T.StructField("model", T.BinaryType(), True),
    T.StructField("n_rows", T.LongType(), False),
    T.StructField("n_pos", T.LongType(), False),
    T.StructField("train_seconds", T.DoubleType(), False),
    T.StructField("skipped", T.StringType(), True),
])

#: What the scoring UDF returns per row, before the arrays become ML vectors. The fields
#: are declared nullable because Spark 4.2 compares the Arrow batch's (always nullable)
#: struct fields with this schema and fails the task with ARROW_TYPE_MISMATCH otherwise.
SCORE_SCHEMA = T.StructType([
    T.StructField("raw", T.ArrayType(T.DoubleType(), False)),
    T.StructField("probability", T.ArrayType(T.DoubleType(), False)),
    T.StructField("prediction", T.DoubleType()),
])

#: Format of the saved model folder; bump when the layout changes.
SAVE_FORMAT = 1


# --------------------------------------------------------------------------- param converters

def _one_of(name: str, choices: tuple[str, ...]):
    def convert(value: Any) -> str:
        text = TypeConverters.toString(value)
        if text not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
        return text
    return convert


def _int_at_least(name: str, low: int):
    def convert(value: Any) -> int:
        number = TypeConverters.toInt(value)
        if number < low:
            raise ConfigError(f"{name} must be an integer >= {low}; got {value!r}")
        return number
    return convert


def _positive_float(name: str):
    def convert(value: Any) -> float:
        number = TypeConverters.toFloat(value)
        if not (number > 0 and math.isfinite(number)):
            raise ConfigError(f"{name} must be a positive finite number; got {value!r}")
        return number
    return convert


def _gamma(value: Any) -> str:
    """'scale', 'auto' or a positive float, kept as a string so the Param has one JSON type."""
    text = str(value).strip()
    if text in ("scale", "auto"):
        return text
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not (number > 0 and math.isfinite(number)):
        raise ConfigError(f"gamma must be 'scale', 'auto' or a positive number; got {value!r}")
    return repr(number)


# --------------------------------------------------------------------------- Spark helpers

HASH_DECIMALS = 6
"""Decimals doubles are rounded to before :func:`assign_partitions` hashes them."""


def _stable(column, data_type):
    """``column`` as :func:`assign_partitions` hashes it: vectors as arrays, doubles rounded."""
    if isinstance(data_type, VectorUDT):
        return F.transform(vector_to_array(column), lambda x: F.round(x, HASH_DECIMALS))
    if isinstance(data_type, T.ArrayType) and isinstance(data_type.elementType, (T.DoubleType, T.FloatType)):
        return F.transform(column, lambda x: F.round(x, HASH_DECIMALS))
    if isinstance(data_type, (T.DoubleType, T.FloatType)):
        return F.round(column, HASH_DECIMALS)
    return column


def assign_partitions(df: DataFrame, k: int, label_col: str = "label", seed: int = 0,
                      hash_cols: list[str] | None = None) -> DataFrame:
    """``df`` with :data:`PARTITION_COL` (0..k-1) and :data:`RANK_COL`, stratified by label.

    Within each label the rows are ordered by a seeded 64-bit hash of
    ``hash_cols`` (default: all of ``df``'s columns; vector columns as arrays) and
    dealt round-robin: row ``i``
    goes to partition ``i mod k`` with rank ``i div k``. So each partition holds
    ``floor`` or ``ceil`` of ``n_label / k`` rows of every label, and the
    assignment depends on the rows' contents and the seed, not on the input's
    order or partitioning. Rows identical in every column tie in the hash, but
    are interchangeable, so the partitions' contents are still deterministic.
    Doubles (and vector or array elements) are hashed rounded to
    :data:`HASH_DECIMALS` decimals: upstream aggregates such as a scaler's
    mean are summed in task completion order, and a last-bit difference must
    not deal the rows anew.

    The numbering is a window per label: each label's rows are sorted in one
    task, which is fine for tabular features (millions of rows) but is why
    ``df`` should carry only the columns the model needs.
    """
    if k < 1:
        raise ConfigError(f"k (the number of partitions) must be >= 1; got {k}")
    if label_col not in df.columns:
        raise InputError(f"label column {label_col!r} not found; columns are {df.columns}")
    missing = [name for name in hash_cols or [] if name not in df.columns]
    if missing:
        raise InputError(f"hash columns {missing} not found; columns are {df.columns}")
    hashed = [_stable(F.col(f.name), f.dataType) for f in df.schema.fields if hash_cols is None or f.name in hash_cols]
    order = F.xxhash64(F.lit(seed).cast("long"), *hashed)
    rank = F.row_number().over(Window.partitionBy(label_col).orderBy(order)) - 1
    return (df.withColumn("_svm_rank", rank)
              .withColumn(PARTITION_COL, (F.col("_svm_rank") % k).cast("int"))
              .withColumn(RANK_COL, F.expr(f"_svm_rank div {k}"))
              .drop("_svm_rank"))


def _require_vector_column(dataset: DataFrame, column: str) -> None:
    if column not in dataset.columns:
        raise InputError(f"features column {column!r} not found; columns are {dataset.columns}")
    found = dataset.schema[column].dataType
    if not isinstance(found, VectorUDT):
        raise InputError(f"features column {column!r} must be an ML Vector (e.g. from VectorAssembler); "
                         f"found {found.simpleString()}")


def _train_udf(settings: dict):
    """The applyInArrow function: one partition's rows in, one PARTITION_RESULT_SCHEMA row out.

    The group has columns ``features`` (array of doubles), ``label``, :data:`PARTITION_COL`,
    :data:`RANK_COL` and, when the estimator has a weight column, ``weight`` (passed as
    ``sample_weight``).  Arrow, not pandas: the feature arrays become one matrix without a
    Python object per row (in pandas they were a column of arrays stacked row by row).
    """
    schema = to_arrow_schema(PARTITION_RESULT_SCHEMA)

    def train(group: pa.Table) -> pa.Table:
        # Shuffles deliver rows in any order; SVC's solver and the calibration folds depend on it.
        group = group.sort_by([("label", "ascending"), (RANK_COL, "ascending")])
        partition = group.column(PARTITION_COL)[0].as_py()
        features = group.column("features").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        features = features.astype(np.float64, copy=False).reshape(group.num_rows, -1)
        labels = group.column("label").to_numpy().astype(np.float64, copy=False)
        weights = (group.column("weight").to_numpy().astype(np.float64, copy=False)
                   if "weight" in group.column_names else None)
        started = time.perf_counter()
        model, skipped = train_partition(features, labels, dict(settings, partition=partition),
                                         sample_weight=weights)
        return pa.Table.from_pylist([{
            "partition": partition,
            "model": pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL) if model is not None else None,
            "n_rows": len(labels),
            "n_pos": int(np.sum(labels == 1.0)),
            "train_seconds": time.perf_counter() - started,
            "skipped": skipped,
        }], schema=schema)
    return train


def _murmur3(value: int, seed: int = 42) -> int:
    """Spark's ``hash()`` of an int (Murmur3 x86 32-bit, seed 42): what its hash partitioning deals rows by."""
    def rotate(x: int, bits: int) -> int:
        return ((x << bits) | (x >> (32 - bits))) & 0xFFFFFFFF

    k1 = rotate((value & 0xFFFFFFFF) * 0xCC9E2D51 & 0xFFFFFFFF, 15) * 0x1B873593 & 0xFFFFFFFF
    h1 = (rotate(seed ^ k1, 13) * 5 + 0xE6546B64) & 0xFFFFFFFF
    h1 ^= 4
    h1 = (h1 ^ (h1 >> 16)) * 0x85EBCA6B & 0xFFFFFFFF
    h1 = (h1 ^ (h1 >> 13)) * 0xC2B2AE35 & 0xFFFFFFFF
    h1 ^= h1 >> 16
    return h1 - 2**32 if h1 >= 2**31 else h1


def shuffle_keys(k: int) -> list[int]:
    """One int per partition 0..k-1 that Spark's hash partitioning into k sends exactly there.

    Why: hash partitioning of the partition numbers themselves often sends two
    to one task (and leaves another idle), and range partitioning, which does
    not, first runs a sampling job over the whole input (its window and sort
    included: about a fifth of a fit at 289k rows).
    """
    keys: dict[int, int] = {}
    value = 0
    while len(keys) < k:
        keys.setdefault(_murmur3(value) % k, value)
        value += 1
    return [keys[p] for p in range(k)]


#: The column the rows are shuffled and grouped by: :func:`shuffle_keys` of their partition.
_SHUFFLE_COL = "_svm_shuffle_key"


def stratified_partitions(rows: DataFrame, name: str, k: int, seed: int, hash_cols: list[str],
                          counts: dict[float, int], max_rows: int) -> DataFrame:
    """``rows`` (with a ``label`` column) dealt to ``k`` stratified partitions by :func:`assign_partitions`,
    each capped at ``max_rows`` (:func:`stratified_caps`; a warning says so). ``name`` is the estimator
    the warning speaks for."""
    parts = assign_partitions(rows, k, "label", seed, hash_cols=hash_cols)
    caps = stratified_caps(counts, k, max_rows)
    if caps is None:
        return parts
    largest = sum(math.ceil(count / k) for count in counts.values())
    log.warning("%s: partitions of up to %d rows are downsampled to %d "
                "(maxRowsPerPartition; %d negative and %d positive rows each)",
                name, largest, max_rows, caps[0.0], caps[1.0])
    return parts.filter(F.col(RANK_COL) < F.when(F.col("label") == 0.0, F.lit(caps[0.0])).otherwise(F.lit(caps[1.0])))


def train_partitions(parts: DataFrame, name: str, k: int, train) -> list[dict]:
    """One model per partition of :func:`stratified_partitions`' ``parts``: the result rows, by partition.

    ``train`` is an ``applyInArrow`` function returning one
    :data:`PARTITION_RESULT_SCHEMA` row; each partition runs in its own task. A
    skipped partition warns with its reason; none trained is an
    :class:`InputError` naming each reason.
    """
    # Each partition its own task: keys Spark's hash partitioning deals one to a task, and an
    # explicit count AQE does not coalesce; the groupBy reuses that partitioning (no second shuffle).
    keys = F.element_at(F.array(*[F.lit(key) for key in shuffle_keys(k)]), F.col(PARTITION_COL) + 1)
    results = (parts.withColumn(_SHUFFLE_COL, keys).repartition(k, _SHUFFLE_COL)
                    .groupBy(_SHUFFLE_COL)
                    .applyInArrow(train, PARTITION_RESULT_SCHEMA)
                    .collect())
    results = sorted((row.asDict() for row in results), key=lambda row: row["partition"])
    for row in results:
        if row["model"] is None:
            warnings.warn(f"{name}: partition {row['partition']} skipped: {row['skipped']}",
                          PartitionSkippedWarning, stacklevel=4)
    if not any(row["model"] is not None for row in results):
        reasons = "; ".join(f"partition {row['partition']}: {row['skipped']}" for row in results)
        raise InputError(f"{name} trained no model out of {k} partitions ({reasons}); "
                         "use fewer partitions or more rows of the minority class")
    return results


def _score_udf(models_broadcast, aggregation: str):
    """Iterator pandas UDF: feature arrays -> SCORE_SCHEMA; models unpickled once per task."""
    @F.pandas_udf(SCORE_SCHEMA)
    def score(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        models = pickle.loads(models_broadcast.value)
        for features in batches:
            if len(features) == 0:
                yield pd.DataFrame({name: [] for name in SCORE_SCHEMA.fieldNames()})
                continue
            s, p = ensemble_scores(models, np.vstack(features.to_numpy()).astype(np.float64, copy=False),
                                   aggregation)
            yield pd.DataFrame({
                "raw": list(np.column_stack([-s, s]) if aggregation == "decision" else np.column_stack([1 - p, p])),
                "probability": list(np.column_stack([1 - p, p])),
                "prediction": (p >= 0.5).astype(np.float64),
            })
    return score


# --------------------------------------------------------------------------- Params

class _PartitionedSVCParams(HasFeaturesCol, HasLabelCol, HasPredictionCol, HasProbabilityCol,
                            HasRawPredictionCol, HasSeed, HasWeightCol):
    """Params shared by :class:`PartitionedSVC` and :class:`PartitionedSVCModel`."""

    numPartitions: Param[int] = Param(
        Params._dummy(), "numPartitions", "number of stratified partitions, one SVC each (>= 1)",
        typeConverter=_int_at_least("numPartitions", 1))
    kernel: Param[str] = Param(
        Params._dummy(), "kernel", "SVC kernel: 'rbf' or 'linear'", typeConverter=_one_of("kernel", KERNELS))
    C: Param[float] = Param(
        Params._dummy(), "C", "SVC regularisation strength (> 0; smaller is stronger)",
        typeConverter=_positive_float("C"))
    gamma: Param[str] = Param(
        Params._dummy(), "gamma", "RBF kernel coefficient: 'scale', 'auto' or a positive number as a string",
        typeConverter=_gamma)
    maxRowsPerPartition: Param[int] = Param(
        Params._dummy(), "maxRowsPerPartition",
        "most rows one partition trains on; larger partitions are downsampled, stratified and seeded (>= 2)",
        typeConverter=_int_at_least("maxRowsPerPartition", 2))
    aggregation: Param[str] = Param(
        Params._dummy(), "aggregation",
        "how the models' outputs are averaged: 'probability' (calibrated predict_proba) or "
        "'decision' (decision_function, squashed by a logistic)",
        typeConverter=_one_of("aggregation", AGGREGATIONS))
    calibration: Param[str] = Param(
        Params._dummy(), "calibration",
        "probability calibration: 'sigmoid' or 'isotonic' (CalibratedClassifierCV, cv=3) or "
        "'platt-in-svc' (one SVC, sigmoid on 5-fold CV decision values); unused when aggregation='decision'",
        typeConverter=_one_of("calibration", CALIBRATIONS))
    classWeight: Param[str] = Param(
        Params._dummy(), "classWeight", "SVC class_weight: 'balanced' or 'none'",
        typeConverter=_one_of("classWeight", CLASS_WEIGHTS))

    def __init__(self) -> None:
        super().__init__()
        # pyspark's HasSeed default is hash(class name), which changes with every
        # Python process (PYTHONHASHSEED); a fixed default keeps runs reproducible.
        self._setDefault(numPartitions=4, kernel="rbf", C=1.0, gamma="scale", maxRowsPerPartition=20000,
                         aggregation="probability", calibration="sigmoid", classWeight="balanced", seed=0)

    def getNumPartitions(self) -> int:
        """Number of stratified partitions (one SVC each)."""
        return self.getOrDefault(self.numPartitions)

    def getKernel(self) -> str:
        """SVC kernel, 'rbf' or 'linear'."""
        return self.getOrDefault(self.kernel)

    def getC(self) -> float:
        """SVC regularisation strength."""
        return self.getOrDefault(self.C)

    def getGamma(self) -> str:
        """RBF kernel coefficient ('scale', 'auto' or a number as a string)."""
        return self.getOrDefault(self.gamma)

    def getMaxRowsPerPartition(self) -> int:
        """Most rows one partition trains on."""
        return self.getOrDefault(self.maxRowsPerPartition)

    def getAggregation(self) -> str:
        """'probability' or 'decision'."""
        return self.getOrDefault(self.aggregation)

    def getCalibration(self) -> str:
        """'sigmoid', 'isotonic' or 'platt-in-svc'."""
        return self.getOrDefault(self.calibration)

    def getClassWeight(self) -> str:
        """'balanced' or 'none'."""
        return self.getOrDefault(self.classWeight)

    def _weight_column(self) -> str | None:
        """The weight column's name, or None when weightCol is unset or empty (all weights 1.0, as in MLlib)."""
        return (self.getWeightCol() or None) if self.isDefined(self.weightCol) else None

    def _settings(self) -> dict:
        """The plain values the Python workers need (Params objects stay on the driver)."""
        return {"kernel": self.getKernel(), "C": self.getC(), "gamma": self.getGamma(),
                "calibration": self.getCalibration(), "class_weight": self.getClassWeight(),
                "aggregation": self.getAggregation(), "seed": self.getSeed()}


# --------------------------------------------------------------------------- Estimator

class PartitionedSVC(_PartitionedSVCParams, Estimator["PartitionedSVCModel"],
                     DefaultParamsReadable, DefaultParamsWritable):
    """Ensemble of scikit-learn SVCs, one per stratified partition of the training data.

    Parameters
    ----------
    featuresCol : str, default "features"
        ML Vector column of features (scale them first: SVMs are not scale-invariant).
    labelCol : str, default "label"
        Binary label, 0.0 or 1.0.
    predictionCol, probabilityCol, rawPredictionCol : str
        Output columns of the fitted model (see :class:`PartitionedSVCModel`).
    numPartitions : int, default 4
        k, the number of partitions and models.
    kernel : {"rbf", "linear"}, default "rbf"
    C : float, default 1.0
    gamma : str, default "scale"
        "scale", "auto" or a positive number as a string ("0.01").
    maxRowsPerPartition : int, default 20000
        Partitions above this are downsampled (stratified, seeded) before the
        groupBy, and a warning is logged: it bounds one Python worker's memory and
        one SVC's O(n^2) kernel cost.
    aggregation : {"probability", "decision"}, default "probability"
        Average calibrated probabilities, or decision values (see :func:`ensemble_scores`).
    calibration : {"sigmoid", "isotonic", "platt-in-svc"}, default "sigmoid"
        See :func:`ctlake.core.svm_partition.build_estimator`. Ignored when ``aggregation="decision"``.
    classWeight : {"balanced", "none"}, default "balanced"
    seed : int, default 0
        Orders the partition assignment and seeds each SVC (``seed + partition``).
    weightCol : str, optional
        Numeric column of per-row sample weights (finite, >= 0), passed to each
        partition's ``fit`` as ``sample_weight``; unset or ``""`` means every
        weight is 1.0 and gives exactly the unweighted model. Use it to make some
        rows count more than others, e.g. to up-weight hard negatives such as
        benign nodules that look malignant, or to down-weight uncertain labels.
        A row's weight scales its SVC penalty ``C`` and its share of the
        calibration fit, on top of ``classWeight`` (which balances row counts,
        not weights). Weights do not affect which partition a row trains in.

    Notes
    -----
    ``fit`` reads its input twice (class counts and weight checks, then
    training): cache an expensive input first. A null, NaN, infinite or negative
    weight is an :class:`ctlake.errors.InputError`. A partition without both
    classes, or with fewer rows of a class than the calibration's folds, is
    skipped with a :class:`PartitionSkippedWarning`; if every partition is
    skipped, ``fit`` raises :class:`ctlake.errors.InputError` listing why.

    Examples
    --------
    >>> pipeline = Pipeline(stages=[VectorAssembler(inputCols=cols, outputCol="raw_features"),
    ...                             StandardScaler(inputCol="raw_features", outputCol="features"),
    ...                             PartitionedSVC(numPartitions=8, kernel="rbf", C=10.0)])
    >>> model = pipeline.fit(train)  # doctest: +SKIP
    """

    @keyword_only
    def __init__(self, *, featuresCol: str = "features", labelCol: str = "label",
                 predictionCol: str = "prediction", probabilityCol: str = "probability",
                 rawPredictionCol: str = "rawPrediction", numPartitions: int = 4, kernel: str = "rbf",
                 C: float = 1.0, gamma: str = "scale", maxRowsPerPartition: int = 20000,
                 aggregation: str = "probability", calibration: str = "sigmoid",
                 classWeight: str = "balanced", seed: int = 0,
                 weightCol: str | None = None) -> None:
        super().__init__()
        self.setParams(**self._input_kwargs)

    @keyword_only
    def setParams(self, *, featuresCol: str = "features", labelCol: str = "label",
                  predictionCol: str = "prediction", probabilityCol: str = "probability",
                  rawPredictionCol: str = "rawPrediction", numPartitions: int = 4, kernel: str = "rbf",
                  C: float = 1.0, gamma: str = "scale", maxRowsPerPartition: int = 20000,
                  aggregation: str = "probability", calibration: str = "sigmoid",
                  classWeight: str = "balanced", seed: int = 0,
                  weightCol: str | None = None) -> PartitionedSVC:
        """Set the given params (only those passed); returns self."""
        return self._set(**self._input_kwargs)

    def setFeaturesCol(self, value: str) -> PartitionedSVC:
        return self._set(featuresCol=value)

    def setLabelCol(self, value: str) -> PartitionedSVC:
        return self._set(labelCol=value)

    def setPredictionCol(self, value: str) -> PartitionedSVC:
        return self._set(predictionCol=value)

    def setProbabilityCol(self, value: str) -> PartitionedSVC:
        return self._set(probabilityCol=value)

    def setRawPredictionCol(self, value: str) -> PartitionedSVC:
        return self._set(rawPredictionCol=value)

    def setNumPartitions(self, value: int) -> PartitionedSVC:
        return self._set(numPartitions=value)

    def setKernel(self, value: str) -> PartitionedSVC:
        return self._set(kernel=value)

    def setC(self, value: float) -> PartitionedSVC:
        return self._set(C=value)

    def setGamma(self, value: str) -> PartitionedSVC:
        return self._set(gamma=value)

    def setMaxRowsPerPartition(self, value: int) -> PartitionedSVC:
        return self._set(maxRowsPerPartition=value)

    def setAggregation(self, value: str) -> PartitionedSVC:
        return self._set(aggregation=value)

    def setCalibration(self, value: str) -> PartitionedSVC:
        return self._set(calibration=value)

    def setClassWeight(self, value: str) -> PartitionedSVC:
        return self._set(classWeight=value)

    def setSeed(self, value: int) -> PartitionedSVC:
        return self._set(seed=value)

    def setWeightCol(self, value: str) -> PartitionedSVC:
        """Column of per-row sample weights (finite, >= 0); ``""`` for none (all 1.0)."""
        return self._set(weightCol=value)

    def _class_counts(self, dataset: DataFrame) -> dict[float, int]:
        """Rows per label, after checking the labels and (in the same pass) the weights."""
        label_col, weight_col = self.getLabelCol(), self._weight_column()
        if label_col not in dataset.columns:
            raise InputError(f"label column {label_col!r} not found; columns are {dataset.columns}")
        aggregates = [F.count(F.lit(1)).alias("n")]
        if weight_col is not None:
            if weight_col not in dataset.columns:
                raise InputError(f"weight column {weight_col!r} (weightCol) not found; columns are {dataset.columns}")
            found = dataset.schema[weight_col].dataType
            if not isinstance(found, T.NumericType):
                raise InputError(f"weight column {weight_col!r} must be numeric; found {found.simpleString()}")
            weight = F.col(weight_col).cast("double")
            invalid = weight.isNull() | F.isnan(weight) | (F.abs(weight) == float("inf")) | (weight < 0)
            aggregates.append(F.count(F.when(invalid, 1)).alias("bad_weights"))
        stats = dataset.groupBy(F.col(label_col).cast("double")).agg(*aggregates).collect()
        if weight_col is not None:
            bad = sum(row["bad_weights"] for row in stats)
            if bad:
                raise InputError(f"weight column {weight_col!r} must hold finite weights >= 0; {bad} of "
                                 f"{sum(row['n'] for row in stats)} rows are null, NaN, infinite or negative")
        counts = {row[0]: row["n"] for row in stats}
        unexpected = sorted(str(label) for label in counts if label not in (0.0, 1.0))
        if unexpected:
            raise InputError(f"PartitionedSVC needs binary labels 0.0/1.0 in {label_col!r}; "
                             f"found {', '.join(unexpected)}")
        if len(counts) < 2:
            raise InputError(f"PartitionedSVC needs both classes in {label_col!r}; found only {sorted(counts)} "
                             f"in {sum(counts.values())} rows")
        return counts

    def _fit(self, dataset: DataFrame) -> PartitionedSVCModel:
        _require_vector_column(dataset, self.getFeaturesCol())
        k, max_rows, seed = self.getNumPartitions(), self.getMaxRowsPerPartition(), self.getSeed()
        counts = self._class_counts(dataset)

        columns = [vector_to_array(F.col(self.getFeaturesCol())).alias("features"),
                   F.col(self.getLabelCol()).cast("double").alias("label")]
        weight_col = self._weight_column()
        if weight_col is not None:
            columns.append(F.col(weight_col).cast("double").alias("weight"))
        # Only features and label order the rows, so a weight column never changes the partitions.
        parts = stratified_partitions(dataset.select(*columns), "PartitionedSVC", k, seed, ["features", "label"],
                                      counts, max_rows)
        results = train_partitions(parts, "PartitionedSVC", k, _train_udf(self._settings()))
        trained = [row for row in results if row["model"] is not None]
        model = PartitionedSVCModel(
            models=[pickle.loads(row["model"]) for row in trained],
            partition_stats=[{key: row[key] for key in ("partition", "n_rows", "n_pos", "train_seconds",
                                                        "skipped")} for row in results])
        return self._copyValues(model)


# --------------------------------------------------------------------------- Model

class PartitionedSVCModel(_PartitionedSVCParams, Model, MLReadable["PartitionedSVCModel"], MLWritable):
    """The fitted ensemble: adds rawPrediction, probability and prediction columns.

    Output columns, with ``p`` the ensemble's positive-class probability
    (:func:`ensemble_scores`):

    - ``rawPredictionCol``: ML DenseVector ``[1 - p, p]`` (aggregation
      "probability") or ``[-s, s]`` with ``s`` the mean decision value
      (aggregation "decision");
    - ``probabilityCol``: DenseVector ``[1 - p, p]``;
    - ``predictionCol``: 1.0 where ``p >= 0.5``, else 0.0.

    Attributes
    ----------
    models_ : list
        The fitted scikit-learn estimators, in partition order (skipped partitions absent).
    partition_stats_ : list of dict
        One per partition: ``partition``, ``n_rows``, ``n_pos``, ``train_seconds`` and
        ``skipped`` (None, or why the partition has no model).
    n_partitions_trained_ : int
    skipped_partitions_ : list of int

    Notes
    -----
    Saving writes the models as pickles and loading unpickles them: load only
    models this project wrote, with the same scikit-learn version (a mismatch warns).
    """

    def __init__(self, models: list | None = None, partition_stats: list[dict] | None = None) -> None:
        super().__init__()
        self.models_ = list(models or [])
        self.partition_stats_ = [dict(stats) for stats in partition_stats or []]

    @property
    def n_partitions_trained_(self) -> int:
        return len(self.models_)

    @property
    def skipped_partitions_(self) -> list[int]:
        return [stats["partition"] for stats in self.partition_stats_ if stats["skipped"] is not None]

    def setFeaturesCol(self, value: str) -> PartitionedSVCModel:
        return self._set(featuresCol=value)

    def setPredictionCol(self, value: str) -> PartitionedSVCModel:
        return self._set(predictionCol=value)

    def setProbabilityCol(self, value: str) -> PartitionedSVCModel:
        return self._set(probabilityCol=value)

    def setRawPredictionCol(self, value: str) -> PartitionedSVCModel:
        return self._set(rawPredictionCol=value)

    def _transform(self, dataset: DataFrame) -> DataFrame:
        if not self.models_:
            raise InputError("PartitionedSVCModel has no fitted models (construct it by PartitionedSVC.fit "
                             "or PartitionedSVCModel.load)")
        _require_vector_column(dataset, self.getFeaturesCol())
        spark = dataset.sparkSession
        models_broadcast = spark.sparkContext.broadcast(
            pickle.dumps(self.models_, protocol=pickle.HIGHEST_PROTOCOL))
        score = _score_udf(models_broadcast, self.getAggregation())
        scored = dataset.withColumn("_svm_score", score(vector_to_array(F.col(self.getFeaturesCol()))))
        return (scored.withColumn(self.getRawPredictionCol(), array_to_vector(F.col("_svm_score.raw")))
                      .withColumn(self.getProbabilityCol(), array_to_vector(F.col("_svm_score.probability")))
                      .withColumn(self.getPredictionCol(), F.col("_svm_score.prediction"))
                      .drop("_svm_score"))

    def write(self) -> MLWriter:
        """An MLWriter: Spark ML metadata under ``path/metadata``, models under ``path/models``."""
        return _PartitionedSVCModelWriter(self)

    @classmethod
    def read(cls) -> MLReader[PartitionedSVCModel]:
        return _PartitionedSVCModelReader(cls)


def save_partition_models(instance, path: str, spark, rows: list[tuple], **extra_metadata) -> None:
    """Save a per-partition model: Params as DefaultParamsWriter metadata, ``rows`` as a one-file Parquet table.

    ``path/models`` has one row per partition (PARTITION_RESULT_SCHEMA, the
    model's bytes, null for a skipped partition). Writing through Spark works
    for any Hadoop path (local, HDFS, S3), which a Python ``open()`` would not.
    ``extra_metadata`` records the versions the bytes need (scikit-learn, Keras).
    """
    DefaultParamsWriter.saveMetadata(instance, path, spark,
                                     extraMetadata={"ctlakeFormat": SAVE_FORMAT, **extra_metadata})
    spark.createDataFrame(rows, PARTITION_RESULT_SCHEMA).coalesce(1).write.parquet(f"{path}/models")


def load_partition_models(path: str, spark, class_name: str) -> tuple[dict, list[dict]]:
    """What :func:`save_partition_models` saved: the metadata and the partitions' rows in partition order.

    Raises
    ------
    InputError
        The folder or its models cannot be read, or it holds another format;
        the message names the path, since a run's models are many folders.
    """
    try:
        metadata = DefaultParamsReader.loadMetadata(path, spark)
    except Exception as exc:  # Spark's AnalysisException (or Py4J's error) for a missing or unreadable folder
        raise InputError(f"{path} cannot be read as a saved model: {type(exc).__name__}") from None
    if metadata.get("ctlakeFormat") != SAVE_FORMAT:
        raise InputError(f"{path} is not a {class_name} of format {SAVE_FORMAT} (metadata says class "
                         f"{metadata.get('class')!r}, format {metadata.get('ctlakeFormat')!r})")
    try:
        rows = sorted((row.asDict() for row in spark.read.parquet(f"{path}/models").collect()),
                      key=lambda row: row["partition"])
    except Exception as exc:  # Spark's AnalysisException for a missing or unreadable folder
        raise InputError(f"{path}/models cannot be read: {type(exc).__name__}") from None
    return metadata, rows


class _PartitionedSVCModelWriter(MLWriter):
    """The fitted SVMs pickled, one row per partition (:func:`save_partition_models`)."""

    def __init__(self, instance: PartitionedSVCModel) -> None:
        super().__init__()
        self.instance = instance

    def saveImpl(self, path: str) -> None:
        models = iter(self.instance.models_)
        rows = [(stats["partition"],
                 pickle.dumps(next(models), protocol=pickle.HIGHEST_PROTOCOL) if stats["skipped"] is None else None,
                 stats["n_rows"], stats["n_pos"], float(stats["train_seconds"]), stats["skipped"])
                for stats in self.instance.partition_stats_]
        save_partition_models(self.instance, path, self.sparkSession, rows, sklearnVersion=sklearn.__version__)


class _PartitionedSVCModelReader(MLReader["PartitionedSVCModel"]):
    def __init__(self, cls: type[PartitionedSVCModel]) -> None:
        super().__init__()
        self.cls = cls

    def load(self, path: str) -> PartitionedSVCModel:
        metadata, rows = load_partition_models(path, self.sparkSession, "PartitionedSVCModel")
        if metadata.get("sklearnVersion") != sklearn.__version__:
            warnings.warn(f"{path} was saved with scikit-learn {metadata.get('sklearnVersion')}; "
                          f"unpickling its models under {sklearn.__version__} may fail or differ",
                          UserWarning, stacklevel=2)
        instance = self.cls(
            models=[pickle.loads(row["model"]) for row in rows if row["model"] is not None],
            partition_stats=[{key: row[key] for key in PARTITION_RESULT_SCHEMA.fieldNames() if key != "model"}
                             for row in rows])
        instance._resetUid(metadata["uid"])
        DefaultParamsReader.getAndSetParams(instance, metadata)
        return instance


# --------------------------------------------------------------------------- tuning

def tune_partitioned_svc(train: DataFrame, validation: DataFrame, grid: list[dict],
                         evaluator_metric: str = "areaUnderROC",
                         evaluator: BinaryClassificationEvaluator | None = None, **fixed) -> tuple[dict, list[dict]]:
    """Fit a :class:`PartitionedSVC` per grid entry on ``train``; score each on ``validation``.

    Parameters
    ----------
    train, validation : DataFrame
        With the features vector and label columns the params name (cached here
        for the duration of the search if they are not already).
    grid : list of dict
        Param values per candidate, e.g. ``[dict(zip(("kernel", "C"), v)) for v in
        itertools.product(["rbf", "linear"], [0.1, 1.0, 10.0])]``.
    evaluator_metric : {"areaUnderROC", "areaUnderPR"}
        BinaryClassificationEvaluator metric on the rawPrediction column (larger is better).
    evaluator : BinaryClassificationEvaluator, optional
        Scores each candidate instead (e.g. weighted, or on the probability
        column); its metric name keys the results.
    **fixed
        Params shared by every candidate (``numPartitions=8, seed=1``, ...).

    Returns
    -------
    best : dict
        ``{**fixed, **grid_entry}`` of the best candidate (the first of equals):
        ``PartitionedSVC(**best)`` rebuilds it.
    results : list of dict
        Per candidate, in grid order: its grid entry, the metric under
        ``evaluator_metric``, ``fit_seconds`` and ``n_partitions_trained``.
    """
    if not grid:
        raise ConfigError("tune_partitioned_svc needs a non-empty grid of param dicts")
    if evaluator is not None:
        evaluator_metric = evaluator.getMetricName()
    if evaluator_metric not in ("areaUnderROC", "areaUnderPR"):
        raise ConfigError(f"evaluator_metric must be 'areaUnderROC' or 'areaUnderPR'; got {evaluator_metric!r}")
    cached = [frame for frame in (train, validation) if not frame.is_cached]
    for frame in cached:
        frame.cache()
    try:
        results = []
        for candidate in grid:
            estimator = PartitionedSVC(**{**fixed, **candidate})
            started = time.perf_counter()
            model = estimator.fit(train)
            fit_seconds = time.perf_counter() - started
            scorer = evaluator or BinaryClassificationEvaluator(
                rawPredictionCol=model.getRawPredictionCol(), labelCol=model.getLabelCol(),
                metricName=evaluator_metric)
            results.append({**candidate, evaluator_metric: scorer.evaluate(model.transform(validation)),
                            "fit_seconds": fit_seconds, "n_partitions_trained": model.n_partitions_trained_})
    finally:
        for frame in cached:
            frame.unpersist()
    best = max(range(len(grid)), key=lambda i: (results[i][evaluator_metric], -i))
    return {**fixed, **grid[best]}, results
