"""A small 3D CNN on volume patches: build, augment, train, apply and serialize it (numpy in, numpy out).

Keras 3 on the JAX backend: it installs from PyPI with no GPU packages
(docs/cnn.md has the probe that chose it). Everything here works on plain
arrays of HU patches; :mod:`ctlake.spark.cnn` runs it on the executors.

Two things make a trained model a function of its data and seed alone:

- **One XLA thread.** XLA splits its sums over a thread pool sized from
  the process's CPU affinity when JAX starts, and a different split gives
  different last bits (1e-3 in a weight after two epochs between 1 and 2
  CPUs). :func:`keras_backend` starts JAX with the process pinned to one
  CPU, then gives every thread of the process its CPUs back: the pool stays
  one thread, so weights do not depend on the machine's core count, and two
  tasks train on two cores. Spark already runs one
  task per core, so one thread per model costs nothing there.
- **Randomness from the seed only**: augmentation and negative sampling draw
  from a ``numpy`` generator seeded per epoch, the batches are shuffled by
  it (``fit(shuffle=False)``), and Keras's own initializers and dropout by
  ``keras.utils.set_random_seed``.
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import asdict, dataclass

import numpy as np

#: HU mapped linearly onto [0, 1] (clipped): lung parenchyma to dense soft tissue and calcium.
HU_RANGE = (-1000.0, 400.0)
#: Predictions run in batches of this many patches, the last one padded with zeros: a batch of
#: another size compiles anew and differs from it in the last bits (3e-8 measured).
PREDICT_BATCH = 64
#: Weights as saved by :func:`model_bytes`; bump when the layout changes.
FORMAT = 1


class CNNFormatError(ValueError):
    """Bytes that :func:`model_from_bytes` cannot turn into a model (another format, or damaged)."""


@dataclass(frozen=True)
class CNNSettings:
    """How one model is trained.

    ``crop_px``: side of the cube cut from the patch's centre (voxels, at the
    patches' 1 mm): the input is ``crop_px``^3. ``negatives_per_positive``:
    each epoch trains on every positive and this many negatives per
    positive, drawn anew each epoch (0: all negatives); positives are
    weighted by the ratio so both classes weigh the same, as the forest's and
    the SVMs' balanced weights do. ``shift_px``: augmentation shifts of up to
    this many voxels per axis, besides flips and 90-degree axial rotations.
    ``min_steps``: a network trains for more epochs than ``epochs`` where that
    many would give it fewer gradient steps (a stage with few rows, such as
    malignancy, which has a few hundred nodules, would otherwise stop after some
    tens of steps).
    """

    epochs: int = 6
    batch_size: int = 32
    learning_rate: float = 0.003
    crop_px: int = 32
    negatives_per_positive: float = 3.0
    shift_px: int = 2
    min_steps: int = 0
    seed: int = 0


def keras_backend():
    """Keras on JAX with one XLA thread (see the module's docstring); the ``keras`` module.

    JAX sizes its thread pool the first time a backend starts, so the pin
    must come before anything in the process starts it; later calls return
    at once.
    """
    os.environ.setdefault("KERAS_BACKEND", "jax")
    # CPU only, unless the environment says otherwise: JAX would otherwise probe for TPU and GPU
    # runtimes and log each one it does not find into the job's log.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    from jax._src import xla_bridge  # the one way to ask whether a backend started

    if not xla_bridge._backends:
        cpus = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(cpus)})
        try:
            jax.devices()
        finally:
            _give_back(cpus)
    import keras

    if keras.backend.backend() != "jax":
        raise RuntimeError(f"KERAS_BACKEND is {keras.backend.backend()!r}; ctlake's CNN runs on 'jax'")
    return keras


def _give_back(cpus: set[int]) -> None:
    """Every thread of the process may run on ``cpus`` again.

    ``sched_setaffinity(0, ...)`` sets the calling thread only: the threads
    JAX started while the process was pinned would keep that one CPU, and two
    training tasks of one executor would share it at half speed each
    (measured: both at 50% of CPU 0 while CPU 1 idled).
    """
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # the thread ended meanwhile
            pass


def to_unit(patches_hu: np.ndarray, crop_px: int) -> np.ndarray:
    """HU patches ``(n, d, h, w)`` -> float32 ``(n, crop, crop, crop)`` in [0, 1], cut at the centre.

    A side shorter than ``crop_px`` is padded with the window's low end (air),
    so the model's input has one shape whatever the patch geometry.
    """
    low, high = HU_RANGE
    x = np.clip((np.asarray(patches_hu, dtype=np.float32) - low) / (high - low), 0.0, 1.0)
    for axis in (1, 2, 3):
        size = x.shape[axis]
        if size > crop_px:
            start = (size - crop_px) // 2
            x = np.take(x, np.arange(start, start + crop_px), axis=axis)
        elif size < crop_px:
            before = (crop_px - size) // 2
            pad = [(0, 0)] * 4
            pad[axis] = (before, crop_px - size - before)
            x = np.pad(x, pad)
    return np.ascontiguousarray(x)


def augment(x: np.ndarray, rng: np.random.Generator, shift_px: int) -> np.ndarray:
    """Each patch flipped on each axis at random, turned by a random multiple of 90 degrees in the axial
    plane, and shifted by up to ``shift_px`` voxels per axis (edges repeated): what a nodule may look like
    elsewhere and at another orientation, without interpolation."""
    out = np.empty_like(x)
    n, d, h, w = x.shape
    for i in range(n):
        patch = x[i]
        for axis in (0, 1, 2):
            if rng.random() < 0.5:
                patch = np.flip(patch, axis)
        patch = np.rot90(patch, int(rng.integers(4)), axes=(1, 2))
        if shift_px:
            padded = np.pad(patch, shift_px, mode="edge")
            dz, dy, dx = rng.integers(0, 2 * shift_px + 1, size=3)
            patch = padded[dz:dz + d, dy:dy + h, dx:dx + w]
        out[i] = patch
    return out


def build_model(crop_px: int, learning_rate: float, keras=None):
    """The network: a stride-2 stem, two convolutions, global average pooling, dropout, one sigmoid.

    17.6k weights. The stride-2 stem halves the cost of a full-resolution
    first layer on CPU (docs/cnn.md); BatchNorm's momentum is 0.9, not
    Keras's 0.99, because with some tens of steps per epoch the slow moving
    variance left every output saturated at inference (held-out AUC 0.50).
    """
    keras = keras or keras_backend()
    layers = keras.layers
    # Names fixed: Keras numbers unnamed layers per process, and the saved architecture must not depend on it.
    inputs = keras.Input((crop_px, crop_px, crop_px, 1), name="patch")
    x = layers.Conv3D(8, 3, strides=2, padding="same", use_bias=False, name="stem")(inputs)
    x = layers.BatchNormalization(momentum=0.9, name="stem_norm")(x)
    x = layers.Activation("relu", name="stem_relu")(x)
    x = layers.Conv3D(16, 3, padding="same", activation="relu", name="conv16")(x)
    x = layers.MaxPooling3D(2, name="pool")(x)
    x = layers.Conv3D(32, 3, padding="same", activation="relu", name="conv32")(x)
    x = layers.GlobalAveragePooling3D(name="average")(x)
    x = layers.Dropout(0.3, name="dropout")(x)
    outputs = layers.Dense(1, activation="sigmoid", name="p")(x)
    model = keras.Model(inputs, outputs, name="ctlake_cnn3d")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate, name="adam"), loss="binary_crossentropy")
    return model


def epoch_rows(labels: np.ndarray, ratio: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rows of one epoch (every positive, ``ratio`` negatives per positive, shuffled) and their weights.

    Positives weigh ``negatives / positives`` of the epoch, so the two classes
    weigh the same; with ``ratio`` 0 or more negatives asked than exist, all
    negatives are used.
    """
    positives = np.flatnonzero(labels == 1)
    negatives = np.flatnonzero(labels != 1)
    wanted = int(round(ratio * len(positives))) if ratio > 0 else len(negatives)
    if wanted < len(negatives):
        negatives = np.sort(rng.choice(negatives, size=max(wanted, 1), replace=False))
    rows = rng.permutation(np.concatenate([positives, negatives]))
    weight = len(negatives) / len(positives) if len(positives) else 1.0
    return rows, np.where(labels[rows] == 1, weight, 1.0).astype(np.float32)


def epochs_for(labels: np.ndarray, settings: CNNSettings) -> int:
    """``settings.epochs``, or more where that many epochs of these rows give fewer than ``min_steps`` steps."""
    positives = int((labels == 1).sum())
    negatives = len(labels) - positives
    ratio = settings.negatives_per_positive
    rows = positives + (min(max(int(round(ratio * positives)), 1), negatives) if ratio > 0 else negatives)
    steps = -(-rows // settings.batch_size)
    return max(settings.epochs, -(-settings.min_steps // steps))


def train(patches_hu: np.ndarray, labels: np.ndarray, settings: CNNSettings) -> tuple[bytes, dict]:
    """Train one model on HU patches ``(n, d, h, w)`` and 0/1 labels; its bytes and a record of the training.

    Raises
    ------
    ValueError
        No rows of one of the classes: nothing to tell apart.
    """
    labels = np.asarray(labels).astype(np.float32)
    if not (labels == 1).any() or not (labels != 1).any():
        raise ValueError(f"the CNN needs both classes; got {int((labels == 1).sum())} positive "
                         f"of {len(labels)} rows")
    keras = keras_backend()
    keras.utils.set_random_seed(settings.seed)
    x = to_unit(patches_hu, settings.crop_px)
    model = build_model(settings.crop_px, settings.learning_rate, keras)
    losses = []
    for epoch in range(epochs_for(labels, settings)):
        rng = np.random.default_rng([settings.seed, epoch])
        rows, weights = epoch_rows(labels, settings.negatives_per_positive, rng)
        batch = augment(x[rows], rng, settings.shift_px)[..., None]
        history = model.fit(batch, labels[rows], sample_weight=weights, batch_size=settings.batch_size,
                            epochs=1, shuffle=False, verbose=0)
        losses.append(float(history.history["loss"][-1]))
    return model_bytes(model, settings), {"rows": int(len(labels)), "positives": int((labels == 1).sum()),
                                          "epoch_rows": int(len(rows)), "loss": losses}


def model_bytes(model, settings: CNNSettings) -> bytes:
    """The model's architecture (``to_json``), its weights and the settings it was trained with, as one npz."""
    buffer = io.BytesIO()
    arrays = {f"w{i:03d}": w for i, w in enumerate(model.get_weights())}
    header = json.dumps({"format": FORMAT, "architecture": model.to_json(), "settings": asdict(settings)})
    np.savez(buffer, header=np.frombuffer(header.encode(), dtype=np.uint8), **arrays)
    return buffer.getvalue()


def model_from_bytes(blob: bytes):
    """The model :func:`model_bytes` saved and the settings it was trained with (no training state).

    Raises
    ------
    CNNFormatError
        Not bytes of this format, or damaged.
    """
    keras = keras_backend()
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as saved:
            header = json.loads(saved["header"].tobytes().decode())
            weights = [saved[name] for name in sorted(n for n in saved.files if n.startswith("w"))]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise CNNFormatError(f"not a saved ctlake CNN: {type(exc).__name__}: {exc}") from None
    if header.get("format") != FORMAT:
        raise CNNFormatError(f"saved CNN has format {header.get('format')!r}; this ctlake reads {FORMAT}")
    model = keras.models.model_from_json(header["architecture"])
    try:
        model.set_weights(weights)
    except ValueError as exc:
        raise CNNFormatError(f"saved CNN weights do not fit its architecture: {exc}") from None
    return model, CNNSettings(**header["settings"])


def predict(models: list, patches_hu: np.ndarray, crop_px: int) -> np.ndarray:
    """Mean probability of the positive class over ``models`` for each HU patch ``(n, d, h, w)``.

    Batches of :data:`PREDICT_BATCH` rows, the last padded with zeros and cut
    off after, so a patch gets the same probability whatever else is scored
    with it (and each model compiles once).
    """
    x = to_unit(patches_hu, crop_px)[..., None]
    n = len(x)
    if n == 0:
        return np.zeros(0)
    padded = np.zeros(((n + PREDICT_BATCH - 1) // PREDICT_BATCH * PREDICT_BATCH, *x.shape[1:]), np.float32)
    padded[:n] = x
    total = np.zeros(n)
    for model in models:
        total += np.concatenate([np.asarray(model.predict_on_batch(padded[i:i + PREDICT_BATCH])).reshape(-1)
                                 for i in range(0, len(padded), PREDICT_BATCH)])[:n]
    return total / len(models)
