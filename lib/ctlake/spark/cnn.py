"""The 3D CNN as a Spark ML stage: one model per stratified partition, trained on the executors, averaged.

:class:`PatchCNN` trains like :class:`ctlake.spark.partitioned_svc.PartitionedSVC`
(the same seeded, stratified partitions, one ``applyInArrow`` task each), but
each task trains :mod:`ctlake.core.cnn3d`'s network on the partition's volume
patches, read straight from the ``patches`` table's ``pixels`` bytes.
:class:`PatchCNNModel` applies the models with
``pyspark.ml.functions.predict_batch_udf``: every Python worker rebuilds them
once and caches them, and scores batches of :data:`PREDICT_BATCH` patches.
Its output columns are those of Spark's classifiers (``probability`` as a
vector ``[1 - p, p]``), so the CNN sits in a pipeline and in the ensemble
beside the forest and the SVMs.
"""
from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import pyarrow as pa
from pyspark import keyword_only
from pyspark.ml import Estimator, Model
from pyspark.ml.functions import array_to_vector, predict_batch_udf
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import (
    HasInputCol,
    HasLabelCol,
    HasPredictionCol,
    HasProbabilityCol,
    HasRawPredictionCol,
    HasSeed,
)
from pyspark.ml.util import (
    DefaultParamsReadable,
    DefaultParamsReader,
    DefaultParamsWritable,
    MLReadable,
    MLReader,
    MLWritable,
    MLWriter,
)
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.pandas.types import to_arrow_schema

from ctlake.core.cnn3d import (
    PREDICT_BATCH,
    CNNFormatError,
    CNNSettings,
    keras_backend,
    model_from_bytes,
    predict,
    train,
)
from ctlake.errors import InputError
from ctlake.spark.partitioned_svc import (
    PARTITION_COL,
    PARTITION_RESULT_SCHEMA,
    RANK_COL,
    _int_at_least,
    _positive_float,
    load_partition_models,
    save_partition_models,
    stratified_partitions,
    train_partitions,
)


def patches_array(pixels, shapes) -> np.ndarray:
    """``pixels`` (little-endian int16 bytes, one per patch) of ``shapes`` -> one ``(n, d, h, w)`` int16 array.

    Raises
    ------
    InputError
        Patches of different shapes, or bytes that do not fill their shape.
    """
    shapes = [tuple(int(v) for v in shape) for shape in shapes]
    if len(set(shapes)) > 1:
        raise InputError(f"the CNN needs patches of one shape; found {sorted(set(shapes))}")
    out = np.empty((len(shapes), *shapes[0]) if shapes else (0, 0, 0, 0), np.int16)
    for i, (blob, shape) in enumerate(zip(pixels, shapes)):
        if len(blob) != 2 * int(np.prod(shape)):
            raise InputError(f"patch of {len(blob)} bytes does not hold int16 voxels of shape {shape}")
        out[i] = np.frombuffer(blob, dtype="<i2").reshape(shape)
    return out


def _train_udf(settings: CNNSettings):
    """The applyInArrow function: one partition's patches in, one PARTITION_RESULT_SCHEMA row out."""
    schema = to_arrow_schema(PARTITION_RESULT_SCHEMA)

    def train_partition(group: pa.Table) -> pa.Table:
        # Shuffles deliver rows in any order; the epochs' sampling and batches depend on it.
        group = group.sort_by([("label", "ascending"), (RANK_COL, "ascending")])
        partition = group.column(PARTITION_COL)[0].as_py()
        labels = group.column("label").to_numpy()
        started = time.perf_counter()
        model, skipped = None, None
        try:
            x = patches_array(group.column("pixels").to_pylist(), group.column("patch_shape").to_pylist())
            model, _ = train(x, labels, CNNSettings(**{**asdict(settings), "seed": settings.seed + partition}))
        except (ValueError, InputError) as exc:
            skipped = f"{type(exc).__name__}: {exc}"
        return pa.Table.from_pylist([{"partition": partition, "model": model, "n_rows": len(labels),
                                      "n_pos": int(np.sum(labels == 1.0)),
                                      "train_seconds": time.perf_counter() - started, "skipped": skipped}],
                                    schema=schema)
    return train_partition


class _PatchCNNParams(HasInputCol, HasLabelCol, HasPredictionCol, HasProbabilityCol, HasRawPredictionCol, HasSeed):
    """Params shared by :class:`PatchCNN` and :class:`PatchCNNModel`."""

    shapeCol: Param[str] = Param(Params._dummy(), "shapeCol", "column of each patch's shape (d, h, w)",
                                 typeConverter=TypeConverters.toString)
    idCol: Param[str] = Param(Params._dummy(), "idCol", "column naming each patch uniquely: it orders the "
                              "partitions, so a run is reproducible", typeConverter=TypeConverters.toString)
    numPartitions: Param[int] = Param(Params._dummy(), "numPartitions",
                                      "number of stratified partitions, one CNN each (>= 1)",
                                      typeConverter=_int_at_least("numPartitions", 1))
    maxRowsPerPartition: Param[int] = Param(
        Params._dummy(), "maxRowsPerPartition",
        "most patches one partition trains on (a Python worker holds them all); larger partitions are "
        "downsampled, stratified and seeded (>= 2)", typeConverter=_int_at_least("maxRowsPerPartition", 2))
    epochs: Param[int] = Param(Params._dummy(), "epochs", "passes over each partition's positives (>= 1)",
                               typeConverter=_int_at_least("epochs", 1))
    batchSize: Param[int] = Param(Params._dummy(), "batchSize", "patches per gradient step (>= 1)",
                                  typeConverter=_int_at_least("batchSize", 1))
    learningRate: Param[float] = Param(Params._dummy(), "learningRate", "Adam's step size (> 0)",
                                       typeConverter=_positive_float("learningRate"))
    cropPx: Param[int] = Param(Params._dummy(), "cropPx", "side of the cube cut from each patch's centre (voxels)",
                               typeConverter=_int_at_least("cropPx", 8))
    negativesPerPositive: Param[float] = Param(
        Params._dummy(), "negativesPerPositive",
        "negatives drawn anew per positive each epoch (0: all of them)", typeConverter=TypeConverters.toFloat)
    shiftPx: Param[int] = Param(Params._dummy(), "shiftPx", "largest augmentation shift per axis (voxels)",
                                typeConverter=_int_at_least("shiftPx", 0))
    minSteps: Param[int] = Param(Params._dummy(), "minSteps", "fewest gradient steps a network takes; more epochs "
                                 "than epochs where needed (>= 0)", typeConverter=_int_at_least("minSteps", 0))

    def __init__(self) -> None:
        super().__init__()
        defaults = CNNSettings()
        # A fixed seed default: pyspark's is hash(class name), which changes with every process.
        self._setDefault(inputCol="pixels", shapeCol="patch_shape", idCol="patch_id", labelCol="label", numPartitions=2,
                         maxRowsPerPartition=8000, epochs=defaults.epochs, batchSize=defaults.batch_size,
                         learningRate=defaults.learning_rate, cropPx=defaults.crop_px,
                         negativesPerPositive=defaults.negatives_per_positive, shiftPx=defaults.shift_px,
                         minSteps=defaults.min_steps, seed=0)

    def _settings(self) -> CNNSettings:
        """The plain values the Python workers need (Params objects stay on the driver)."""
        get = self.getOrDefault
        return CNNSettings(epochs=get(self.epochs), batch_size=get(self.batchSize),
                           learning_rate=get(self.learningRate), crop_px=get(self.cropPx),
                           negatives_per_positive=get(self.negativesPerPositive), shift_px=get(self.shiftPx),
                           min_steps=get(self.minSteps), seed=get(self.seed))

    def _require_columns(self, dataset: DataFrame, *names: str) -> None:
        missing = [name for name in names if name not in dataset.columns]
        if missing:
            raise InputError(f"PatchCNN needs columns {missing}; columns are {dataset.columns}")


class PatchCNN(_PatchCNNParams, Estimator["PatchCNNModel"], DefaultParamsReadable, DefaultParamsWritable):
    """k 3D CNNs, one per stratified partition of the labelled patches, averaged in probability.

    Parameters
    ----------
    inputCol : str, default "pixels"
        Little-endian int16 HU voxels of each patch, as the ``patches`` table holds them.
    shapeCol : str, default "patch_shape"
        The patch's (depth, rows, columns); every patch must have the same.
    idCol : str, default "patch_id"
        Unique per patch: the partitions are dealt by a seeded hash of it.
    labelCol : str, default "label"
        0.0 or 1.0.
    numPartitions : int, default 2
        k, the number of partitions and models: the models train in parallel, one task (and one
        XLA thread) each.
    maxRowsPerPartition : int, default 8000
        Larger partitions are downsampled (stratified, seeded): one task holds its patches in memory.
    epochs, batchSize, learningRate, cropPx, negativesPerPositive, shiftPx, minSteps
        :class:`ctlake.core.cnn3d.CNNSettings`.
    seed : int, default 0
        Orders the partition assignment and seeds each model (``seed + partition``).
    """

    @keyword_only
    def __init__(self, *, inputCol: str = "pixels", shapeCol: str = "patch_shape", idCol: str = "patch_id",
                 labelCol: str = "label",
                 predictionCol: str = "prediction", probabilityCol: str = "probability",
                 rawPredictionCol: str = "rawPrediction", numPartitions: int = 2, maxRowsPerPartition: int = 8000,
                 epochs: int = CNNSettings.epochs, batchSize: int = CNNSettings.batch_size,
                 learningRate: float = CNNSettings.learning_rate, cropPx: int = CNNSettings.crop_px,
                 negativesPerPositive: float = CNNSettings.negatives_per_positive,
                 shiftPx: int = CNNSettings.shift_px, minSteps: int = CNNSettings.min_steps, seed: int = 0) -> None:
        super().__init__()
        self._set(**self._input_kwargs)

    def _fit(self, dataset: DataFrame) -> PatchCNNModel:
        label_col, pixels, shape = self.getLabelCol(), self.getInputCol(), self.getOrDefault(self.shapeCol)
        key = self.getOrDefault(self.idCol)
        self._require_columns(dataset, key, label_col, pixels, shape)
        rows = dataset.select(F.col(key).alias("_cnn_key"), F.col(pixels).alias("pixels"),
                              F.col(shape).alias("patch_shape"), F.col(label_col).cast("double").alias("label"))
        counts = {r["label"]: r["count"] for r in rows.groupBy("label").count().collect()}
        if sorted(counts) != [0.0, 1.0]:
            raise InputError(f"PatchCNN needs labels 0.0 and 1.0 in {label_col!r}; found {sorted(counts)}")
        k = self.getOrDefault(self.numPartitions)
        # Partitions are dealt over the keys alone; the voxels (67 KB a patch) join them after, so the
        # per-label sort of the assignment moves ids, not images.
        parts = stratified_partitions(rows.select("_cnn_key", "label"), "PatchCNN", k, self.getSeed(), ["_cnn_key"],
                                      counts, self.getOrDefault(self.maxRowsPerPartition))
        with_pixels = parts.join(rows.select("_cnn_key", "pixels", "patch_shape"), "_cnn_key")
        results = train_partitions(with_pixels, "PatchCNN", k, _train_udf(self._settings()))
        return self._copyValues(PatchCNNModel(results))


class PatchCNNModel(_PatchCNNParams, Model, MLReadable["PatchCNNModel"], MLWritable):
    """The fitted CNNs: add rawPrediction and probability (``[1 - p, p]``) and prediction (``p >= 0.5``).

    Attributes
    ----------
    partitions_ : list of dict
        One per partition: ``partition``, ``model`` (the saved network, :func:`ctlake.core.cnn3d.model_bytes`,
        or None), ``n_rows``, ``n_pos``, ``train_seconds`` and ``skipped`` (None, or why it has no model).
    """

    def __init__(self, partitions: list[dict] | None = None) -> None:
        super().__init__()
        self.partitions_ = [dict(p) for p in partitions or []]

    def _blobs(self) -> list[bytes]:
        return [p["model"] for p in self.partitions_ if p["model"] is not None]

    def _transform(self, dataset: DataFrame) -> DataFrame:
        blobs = self._blobs()
        if not blobs:
            raise InputError("PatchCNNModel has no trained network (fit it, or load a saved one)")
        pixels, shape = self.getInputCol(), self.getOrDefault(self.shapeCol)
        self._require_columns(dataset, pixels, shape)
        crop = self.getOrDefault(self.cropPx)
        shipped = dataset.sparkSession.sparkContext.broadcast(blobs)

        def make_predict_fn():
            models = [model_from_bytes(blob)[0] for blob in shipped.value]

            def predict_fn(pixel_bytes: np.ndarray, shapes: np.ndarray) -> np.ndarray:
                return predict(models, patches_array(pixel_bytes, shapes), crop)
            return predict_fn

        cnn = predict_batch_udf(make_predict_fn, return_type=T.DoubleType(), batch_size=PREDICT_BATCH,
                                input_tensor_shapes=[None, None])
        p = F.col("_cnn_p")
        pair = array_to_vector(F.array(F.lit(1.0) - p, p))
        return (dataset.withColumn("_cnn_p", cnn(F.col(pixels), F.col(shape)))
                .withColumn(self.getRawPredictionCol(), pair).withColumn(self.getProbabilityCol(), pair)
                .withColumn(self.getPredictionCol(), (p >= 0.5).cast("double")).drop("_cnn_p"))

    def write(self) -> MLWriter:
        return _PatchCNNModelWriter(self)

    @classmethod
    def read(cls) -> MLReader[PatchCNNModel]:
        return _PatchCNNModelReader(cls)


class _PatchCNNModelWriter(MLWriter):
    """The networks' npz bytes, one row per partition (``partitioned_svc.save_partition_models``)."""

    def __init__(self, instance: PatchCNNModel) -> None:
        super().__init__()
        self.instance = instance

    def saveImpl(self, path: str) -> None:
        keras = keras_backend()  # first: it sets JAX's platform before JAX is imported
        import jax

        rows = [tuple(p[name] for name in PARTITION_RESULT_SCHEMA.fieldNames()) for p in self.instance.partitions_]
        save_partition_models(self.instance, path, self.sparkSession, rows, kerasVersion=keras.__version__,
                              jaxVersion=jax.__version__)


class _PatchCNNModelReader(MLReader["PatchCNNModel"]):
    def __init__(self, cls: type[PatchCNNModel]) -> None:
        super().__init__()
        self.cls = cls

    def load(self, path: str) -> PatchCNNModel:
        """The saved model, every network rebuilt once here: a model that cannot be applied fails now, clearly."""
        metadata, rows = load_partition_models(path, self.sparkSession, "PatchCNNModel")
        instance = self.cls(rows)
        for blob in instance._blobs():
            try:
                model_from_bytes(blob)
            except CNNFormatError as exc:
                raise InputError(f"{path}: {exc} (saved with Keras {metadata.get('kerasVersion')}, "
                                 f"JAX {metadata.get('jaxVersion')})") from None
        if not instance._blobs():
            raise InputError(f"{path} holds no trained network")
        instance._resetUid(metadata["uid"])
        DefaultParamsReader.getAndSetParams(instance, metadata)
        return instance
