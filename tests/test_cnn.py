"""The 3D CNN: it learns a planted difference, deterministically, and Spark applies exactly the model it trained."""
import os
import subprocess
import sys

import numpy as np
import pytest
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.functions import vector_to_array
from sklearn.metrics import roc_auc_score

from ctlake.core import cnn3d
from ctlake.errors import InputError
from ctlake.spark.cnn import PatchCNN, PatchCNNModel, patches_array

SIDE = 17
SETTINGS = cnn3d.CNNSettings(epochs=4, batch_size=16, crop_px=16, negatives_per_positive=0, min_steps=0, seed=3)


def spheres(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """HU patches of lung-like noise; every second one holds a soft-tissue ball of radius 2.5-4.5 voxels."""
    rng = np.random.default_rng(seed)
    x = rng.normal(-800, 60, size=(n, SIDE, SIDE, SIDE))
    labels = np.arange(n) % 2
    z, y, w = np.mgrid[:SIDE, :SIDE, :SIDE]
    for i in np.flatnonzero(labels):
        c = SIDE / 2 + rng.uniform(-2, 2, 3)
        x[i][(z - c[0]) ** 2 + (y - c[1]) ** 2 + (w - c[2]) ** 2 <= rng.uniform(2.5, 4.5) ** 2] = 40
    return x.astype(np.int16), labels.astype(float)


@pytest.fixture(scope="module")
def trained():
    x, y = spheres(160, 1)
    blob, record = cnn3d.train(x, y, SETTINGS)
    return blob, record


def test_the_cnn_learns_a_planted_sphere_on_patients_it_never_saw(trained):
    blob, record = trained
    model, settings = cnn3d.model_from_bytes(blob)
    assert settings == SETTINGS and record["loss"][-1] < record["loss"][0]
    held_out, labels = spheres(100, 2)
    assert roc_auc_score(labels, cnn3d.predict([model], held_out, SETTINGS.crop_px)) > 0.95


def test_training_is_a_function_of_the_data_and_the_seed(trained):
    x, y = spheres(160, 1)
    assert cnn3d.train(x, y, SETTINGS)[0] == trained[0]
    other = cnn3d.CNNSettings(**{**SETTINGS.__dict__, "epochs": 1})
    assert cnn3d.train(x, y, other)[0] != cnn3d.train(x, y, cnn3d.CNNSettings(**{**other.__dict__, "seed": 4}))[0]


#: A fresh process (JAX starts in it) trains one epoch and prints the weights' hash and whether any of
#: its threads is still confined to fewer CPUs than the process was given.
TRAIN_IN_A_FRESH_PROCESS = """
import hashlib, os, sys
sys.path[:0] = [{tests!r}]
from test_cnn import SETTINGS, spheres
from ctlake.core import cnn3d
x, y = spheres(64, 1)
blob, _ = cnn3d.train(x, y, cnn3d.CNNSettings(**{{**SETTINGS.__dict__, "epochs": 1}}))
given = os.sched_getaffinity(0)
pinned = [t for t in os.listdir("/proc/self/task") if os.sched_getaffinity(int(t)) != given]
print(hashlib.sha256(blob).hexdigest(), len(given), len(pinned))
"""


def test_weights_do_not_depend_on_the_cpus_and_no_thread_stays_pinned():
    """Two tasks of an executor train on two cores (a thread left on the CPU JAX started on would make them
    share one), and the weights are the same on one CPU or all of them."""
    script = TRAIN_IN_A_FRESH_PROCESS.format(tests=os.path.dirname(__file__))
    runs = {}
    for cpus in (sorted(os.sched_getaffinity(0)), sorted(os.sched_getaffinity(0))[-1:]):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True,
                             preexec_fn=lambda cpus=cpus: os.sched_setaffinity(0, cpus))
        digest, given, pinned = out.stdout.split()
        assert (int(given), int(pinned)) == (len(cpus), 0)
        runs[len(cpus)] = digest
    assert len(set(runs.values())) == 1, runs


def test_a_patch_scores_the_same_whatever_it_is_scored_with(trained):
    model, _ = cnn3d.model_from_bytes(trained[0])
    x, _ = spheres(70, 5)
    together = cnn3d.predict([model], x, SETTINGS.crop_px)
    alone = np.concatenate([cnn3d.predict([model], x[i:i + 1], SETTINGS.crop_px) for i in (0, 33, 69)])
    assert np.array_equal(together[[0, 33, 69]], alone)


def test_bytes_that_are_not_a_saved_cnn_are_refused():
    with pytest.raises(cnn3d.CNNFormatError, match="not a saved ctlake CNN"):
        cnn3d.model_from_bytes(b"PK\x03\x04 damaged")


def test_patches_are_cut_or_padded_to_the_crop_and_scaled_to_the_hu_window():
    patches = np.full((1, 33, 30, 32), -1000, np.int16)
    patches[0, 16, 15, 16] = 400
    x = cnn3d.to_unit(patches, 32)
    assert x.shape == (1, 32, 32, 32) and x.dtype == np.float32
    assert x.max() == 1.0 and x.min() == 0.0 and np.argwhere(x == 1.0).tolist() == [[0, 16, 16, 16]]


def test_augmentation_only_moves_voxels_when_it_does_not_shift():
    x = np.random.default_rng(0).random((5, 8, 8, 8)).astype(np.float32)
    moved = cnn3d.augment(x, np.random.default_rng(1), shift_px=0)
    assert not np.array_equal(moved, x)
    assert all(np.array_equal(np.sort(moved[i], axis=None), np.sort(x[i], axis=None)) for i in range(5))


def test_a_stage_with_few_rows_trains_more_epochs_to_take_its_least_steps():
    labels = np.array([1] * 10 + [0] * 100, dtype=float)
    settings = cnn3d.CNNSettings(epochs=2, batch_size=8, negatives_per_positive=3.0, min_steps=30)
    assert cnn3d.epochs_for(labels, settings) == 6  # 40 rows an epoch: 5 steps
    assert cnn3d.epochs_for(labels, cnn3d.CNNSettings(epochs=2, batch_size=8, negatives_per_positive=0)) == 2


def test_each_epoch_weighs_both_classes_the_same():
    labels = np.array([1] * 10 + [0] * 100, dtype=float)
    rows, weights = cnn3d.epoch_rows(labels, 3.0, np.random.default_rng(0))
    assert (labels[rows] == 1).sum() == 10 and (labels[rows] == 0).sum() == 30
    assert weights[labels[rows] == 1].sum() == weights[labels[rows] == 0].sum() == 30


def frame(spark, x: np.ndarray, y: np.ndarray):
    rows = [(f"p{i}", x[i].astype("<i2").tobytes(), list(x[i].shape), float(y[i])) for i in range(len(x))]
    return spark.createDataFrame(rows, "patch_id string, pixels binary, patch_shape array<int>, label double")


def test_spark_trains_per_partition_and_applies_exactly_those_models(spark, tmp_path):
    x, y = spheres(96, 7)
    estimator = PatchCNN(numPartitions=2, epochs=2, batchSize=16, cropPx=16, negativesPerPositive=0, seed=5)
    model = Pipeline(stages=[estimator]).fit(frame(spark, x, y))
    cnn = model.stages[-1]
    assert [(p["partition"], p["n_rows"], p["n_pos"], p["skipped"]) for p in cnn.partitions_] == \
        [(0, 48, 24, None), (1, 48, 24, None)]
    held_out, labels = spheres(40, 8)
    scored = (model.transform(frame(spark, held_out, labels))
              .select("patch_id", vector_to_array("probability")[1].alias("p"), "prediction").toPandas())
    networks = [cnn3d.model_from_bytes(p["model"])[0] for p in cnn.partitions_]
    outside = cnn3d.predict(networks, held_out, 16)
    order = scored["patch_id"].str[1:].astype(int).to_numpy()
    assert np.array_equal(scored["p"].to_numpy(), outside[order])
    assert np.array_equal(scored["prediction"].to_numpy(), (outside[order] >= 0.5).astype(float))

    model.write().overwrite().save(str(tmp_path / "pipeline"))
    again = PipelineModel.load(str(tmp_path / "pipeline"))
    assert again.stages[-1].getOrDefault("epochs") == 2
    reloaded = again.transform(frame(spark, held_out, labels)).select(vector_to_array("probability")[1].alias("p"))
    assert np.array_equal(np.sort(reloaded.toPandas()["p"].to_numpy()), np.sort(outside))


def test_a_saved_cnn_that_cannot_be_rebuilt_is_refused_with_its_path(spark, tmp_path):
    model = PatchCNNModel([{"partition": 0, "model": b"not a network", "n_rows": 4, "n_pos": 2,
                            "train_seconds": 0.1, "skipped": None}])
    model.write().save(str(tmp_path / "cnn"))
    with pytest.raises(InputError, match=r"cnn: not a saved ctlake CNN"):
        PatchCNNModel.load(str(tmp_path / "cnn"))
    with pytest.raises(InputError, match="nowhere cannot be read"):
        PatchCNNModel.load(str(tmp_path / "nowhere"))


def test_patches_of_different_shapes_are_refused():
    with pytest.raises(InputError, match="one shape"):
        patches_array([bytes(16), bytes(18)], [[2, 2, 2], [1, 3, 3]])
    with pytest.raises(InputError, match="does not hold"):
        patches_array([bytes(10)], [[2, 2, 2]])


def test_fit_needs_both_classes(spark):
    x, _ = spheres(4, 9)
    with pytest.raises(InputError, match=r"labels 0.0 and 1.0"):
        PatchCNN().fit(frame(spark, x, np.zeros(4)))
