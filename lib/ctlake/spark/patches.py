"""Patch extraction job: detected candidates and annotated nodules, or sliding windows -> ``patches``.

Work is organized per slice: every patch wanted from a slice (detected
candidates, annotated nodules, window positions) becomes one *slice task* that carries the
slice's HU pixels once (plus neighbours for 2.5D, or the slices within
``patches.depth_mm / 2`` for volume patches) into a pandas UDF, which cuts
them all with :func:`ctlake.core.patch_tasks.cut_slice_task`. Images are never
collected to the driver, and a Python worker holds one slice stack at a time.

Candidate coordinates (LUNA16: patient mm) become voxels per series in a
cogrouped pandas UDF on slice metadata only (no pixels), with
:func:`ctlake.core.patch_tasks.locate_candidates`.
"""
from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from typing import Iterator

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ctlake.config import Settings
from ctlake.core.detect import detector_hash
from ctlake.core.patch_tasks import (
    TRAINING_MODES,
    PatchParams,
    jittered_nodules,
    locate_candidates,
    params_hash,
    patch_id,
    row_tasks,
    task_patches,
    volume_tasks,
)
from ctlake.core.pictures import patch_grid
from ctlake.errors import ConcurrentWriteError, ConfigError
from ctlake.spark import datafiles, tables
from ctlake.spark.progress import StageProgress
from ctlake.spark.session import session_conf

log = logging.getLogger("ctlake.patches")

MODES = ("detected", "window")

REQUEST = T.StructType([
    T.StructField("row", T.DoubleType()),
    T.StructField("col", T.DoubleType()),
    T.StructField("mode", T.StringType()),
    T.StructField("label", T.IntegerType()),
    T.StructField("candidate_id", T.StringType()),
    T.StructField("coord_x", T.DoubleType()),
    T.StructField("coord_y", T.DoubleType()),
    T.StructField("coord_z", T.DoubleType()),
])

#: A candidate located on a slice (output of the cogrouped locate step).
LOCATED_SCHEMA = T.StructType([
    T.StructField("series_uid", T.StringType()),
    T.StructField("slice_index", T.IntegerType()),
    T.StructField("distance_mm", T.DoubleType()),
    T.StructField("radius_mm", T.DoubleType()),
    T.StructField("z_mm", T.DoubleType()),
] + REQUEST.fields)



def slice_metadata(spark: SparkSession, warehouse: str) -> DataFrame:
    """Every slice without pixels, with its index along the series (ascending z)."""
    order = Window.partitionBy("series_uid").orderBy("z_position", "sop_uid", "frame")
    return (tables.read(spark, warehouse, tables.SLICES)
            .select(*[f.name for f in tables.LINEAGE_FIELDS], "z_position", "image_position", "image_orientation",
                    "pixel_spacing_row", "pixel_spacing_col", "rows", "columns")
            .withColumn("slice_index", (F.row_number().over(order) - 1).cast("int")))


def _locate(cands: pd.DataFrame, meta: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(locate_candidates(cands, meta), columns=LOCATED_SCHEMA.fieldNames())


def locate(candidates: DataFrame, meta: DataFrame) -> DataFrame:
    """Candidates with columns series_uid, coordX/Y/Z, mode, label, candidate_id, radius_mm -> located rows."""
    geometry = meta.select("series_uid", "slice_index", "z_position", "image_position", "image_orientation",
                           "pixel_spacing_row", "pixel_spacing_col")
    return (candidates.groupBy("series_uid").cogroup(geometry.groupBy("series_uid"))
            .applyInPandas(_locate, LOCATED_SCHEMA))


def slice_stacks(spark: SparkSession, warehouse: str, meta: DataFrame, wanted: DataFrame,
                 params: PatchParams) -> DataFrame:
    """For each wanted (series_uid, slice_index): lineage, spacing, and the pixels of slices k-n..k+n (2.5D)."""
    pixels = (tables.read(spark, warehouse, tables.SLICES).select("sop_uid", "frame", "pixels", "pixel_shape")
              .join(meta.select("sop_uid", "frame", "series_uid", "slice_index"), ["sop_uid", "frame"]))
    base = meta.join(wanted, ["series_uid", "slice_index"], "inner")
    offsets = F.array(*[F.lit(o) for o in range(-params.neighbours, params.neighbours + 1)])
    needed = (base.select("series_uid", "slice_index").withColumn("offset", F.explode(offsets))
              .withColumn("source_index", F.col("slice_index") + F.col("offset")))
    joined = needed.join(pixels.select("series_uid", F.col("slice_index").alias("source_index"), "pixels",
                                       "pixel_shape"), ["series_uid", "source_index"], "left")
    stack = (joined.groupBy("series_uid", "slice_index")
             .agg(F.sort_array(F.collect_list(F.struct("offset", "pixels", "pixel_shape")))
                  .alias("stack")))
    return base.join(stack, ["series_uid", "slice_index"])


def series_volumes(spark: SparkSession, warehouse: str, meta: DataFrame, tasks: DataFrame) -> DataFrame:
    """One row per series with slice tasks: every slice's pixels once (``slices``) and the tasks (``tasks``).

    Volume patches need every slice within ``depth_mm / 2`` of a task's slice: a
    dozen at 3 mm spacing, fifty at 0.6 mm.  Sending each task its own stack
    would copy every slice that many times through the shuffle (measured: out of
    heap on 64 slices of 512 x 512 in window mode), so a series travels once
    and its tasks are cut in one Python call, which holds one series.
    """
    pixels = (tables.read(spark, warehouse, tables.SLICES).select("sop_uid", "frame", "pixels", "pixel_shape")
              .join(meta.select("sop_uid", "frame", "series_uid", "slice_index", "z_position"), ["sop_uid", "frame"])
              .join(tasks.select("series_uid").distinct(), "series_uid", "left_semi"))
    volumes = (pixels.groupBy("series_uid")
               .agg(F.sort_array(F.collect_list(F.struct("slice_index", "z_position", "pixels", "pixel_shape")))
                    .alias("slices")))
    task_rows = meta.join(tasks, ["series_uid", "slice_index"], "inner")
    grouped = (task_rows.groupBy("series_uid")
               .agg(F.collect_list(F.struct(*[c for c in task_rows.columns if c != "series_uid"])).alias("tasks")))
    return volumes.join(grouped, "series_uid")


def job_frame(spark: SparkSession, warehouse: str, meta: DataFrame, tasks: DataFrame,
              params: PatchParams) -> DataFrame:
    """What the cutting UDF reads: one row per slice task (2D/2.5D) or per series (volume patches)."""
    if params.depth_mm > 0:
        return series_volumes(spark, warehouse, meta, tasks)
    return slice_stacks(spark, warehouse, meta, tasks.select("series_uid", "slice_index"), params).join(
        tasks, ["series_uid", "slice_index"])


def cut_udf(params: PatchParams, p_hash: str):
    """mapInPandas body: slice tasks (or, for volume patches, series) -> patch rows (PATCHES_SCHEMA minus created_at)."""
    out_columns = [f for f in tables.PATCHES_SCHEMA.fieldNames() if f != "created_at"]

    def rows(out: list[dict]) -> pd.DataFrame:
        frame = pd.DataFrame(out, columns=out_columns).astype(object)
        return frame.where(pd.notna(frame), None)

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            out = []
            for row in batch.to_dict("records"):
                for task in row_tasks(row, params):
                    # One output batch per slice task: a series' window volumes together would be
                    # hundreds of MB in one Arrow batch (measured: out of heap).
                    if out:
                        yield rows(out)
                        out = []
                    out += [patch_row(task, p, params, p_hash) for p in task_patches(task, params)]
            yield rows(out)

    return run


def patch_row(task: dict, patch: dict, params: PatchParams, p_hash: str) -> dict:
    """One ``patches`` row (without ``created_at``) for a patch :func:`task_patches` cut from ``task``."""
    return {
        "patch_id": patch_id(task["series_uid"], task["slice_index"], patch["row"], patch["col"], patch["mode"], p_hash),
        **{k: task[k] for k in ("patient_pseudonym", "study_uid", "series_uid", "sop_uid", "frame", "slice_index")},
        "mode": patch["mode"], "candidate_id": patch.get("candidate_id"), "label": patch.get("label"),
        "center_row": patch["row"], "center_col": patch["col"],
        "coord_x": patch.get("coord_x"), "coord_y": patch.get("coord_y"), "coord_z": patch.get("coord_z"),
        "size_mm": params.size_mm, "channel_spacing_mm": params.size_mm / params.out_px if params.depth_mm > 0 else None,
        "pixels": patch["patch"].astype("<i2").tobytes(),
        "patch_shape": list(patch["patch"].shape), "pixel_dtype": "int16", "params_hash": p_hash,
    }


def candidate_requests(spark: SparkSession, settings: Settings, series: list[str] | None) -> DataFrame:
    """What to cut, in patient mm: the detector's candidates (of ``series``, or all), plus every annotated nodule.

    The annotated nodules (``patches.annotations``, patient mm) are cut only
    when no series is given: they are training data, and a scan being scored
    has no annotations.  Each is cut at its centre (mode ``nodule``) and at
    ``patches.jitter.copies`` displaced centres (mode ``jittered``,
    :func:`ctlake.core.patch_tasks.jittered_nodules`).  Their ``candidate_id``
    is the nodule's key in ``nodules.csv``; a detected patch's is the
    detection's.  Columns: series_uid, coordX/Y/Z, candidate_id, mode, label, radius_mm.
    """
    patches = settings.patches
    found = tables.read_candidates(spark, settings.warehouse, detector_hash(settings.detect.params()))
    if series:
        found = found.filter(F.col("series_uid").isin(series))
    columns = ["series_uid", "coordX", "coordY", "coordZ", "candidate_id", "mode", "label", "radius_mm"]
    rows = found.select("series_uid", F.col("coord_x").alias("coordX"), F.col("coord_y").alias("coordY"),
                        F.col("coord_z").alias("coordZ"), "candidate_id", F.lit("detected").alias("mode"),
                        F.lit(None).cast("int").alias("label"), (F.col("diameter_mm") / 2).alias("radius_mm"))
    if not series:
        nodules = (tables.read_annotations(spark, patches.annotations).withColumnRenamed("nodule_key", "candidate_id")
                   .withColumn("mode", F.lit("nodule")).withColumn("label", F.lit(1))
                   .withColumn("radius_mm", F.col("diameter_mm") / 2)).select(*columns, "diameter_mm")
        rows = rows.unionByName(nodules.drop("diameter_mm"))
        if patches.jitter.copies:
            displaced = jittered_nodules(nodules.toPandas(), patches.jitter.copies, patches.jitter.fraction)
            rows = rows.unionByName(spark.createDataFrame(displaced.assign(mode="jittered")[columns],
                                                          rows.schema))
    return rows


def _located_counts(counts: dict) -> dict:
    """The summary's ``<mode>_located`` and ``<mode>_off_slab`` from {mode: (located, off the slab)}."""
    return {f"{mode}_located": n for mode, (n, _) in sorted(counts.items())} | {
        f"{mode}_off_slab": off for mode, (_, off) in sorted(counts.items())}


def detected_tasks(spark: SparkSession, settings: Settings, meta: DataFrame,
                   series: list[str] | None) -> tuple[DataFrame, dict]:
    """Slice tasks (with their masks) at :func:`candidate_requests`, and the located counts by mode."""
    patches = settings.patches
    located = locate(candidate_requests(spark, settings, series), meta).cache()
    usable = located.filter(F.col("distance_mm") <= patches.max_slice_distance_mm)
    requests = (usable.groupBy("series_uid", "slice_index")
                .agg(F.collect_list(F.struct(*REQUEST.fieldNames())).alias("requests")))
    masks = valid_masks(spark, settings.warehouse, meta)
    tasks = (requests.join(masks.select("series_uid", "slice_index", "mask"), ["series_uid", "slice_index"], "left")
             .withColumn("window", F.lit(False)))
    counts = {r["mode"]: (r["n"], r["off_slab"]) for r in located.groupBy("mode").agg(
        F.count("*").alias("n"), F.sum((F.col("distance_mm") > patches.max_slice_distance_mm).cast("int"))
        .alias("off_slab")).collect()}
    located.unpersist()
    return tasks, _located_counts(counts)


def valid_masks(spark: SparkSession, warehouse: str, meta: DataFrame) -> DataFrame:
    """The lung mask of every slice whose mask passed the quality check, with its series and index."""
    return (tables.read(spark, warehouse, tables.PREPROCESSED).filter(F.col("mask_valid"))
            .select("sop_uid", "frame", "mask").join(meta.select("sop_uid", "frame", "series_uid", "slice_index"),
                                                      ["sop_uid", "frame"]))


#: The task column that says a valid mask exists, where the workers read masks themselves.
HAS_MASK = "has_mask"


def window_tasks(spark: SparkSession, warehouse: str, meta: DataFrame, series: list[str] | None) -> DataFrame:
    """Slice tasks for scoring: every slice with a valid lung mask of the chosen series."""
    masks = valid_masks(spark, warehouse, meta)
    if series:
        masks = masks.filter(F.col("series_uid").isin(series))
    return (masks.select("series_uid", "slice_index", "mask")
            .withColumn("requests", F.lit(None).cast(T.ArrayType(REQUEST)))
            .withColumn("window", F.lit(True)))


def run(spark: SparkSession, settings: Settings, mode: str = "detected", series: list[str] | None = None) -> dict:
    """Cut the patches of ``mode`` that are not in ``patches`` yet; summary with the table's counts."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, found {mode!r}")
    warehouse, params = settings.warehouse, settings.patches.params()
    p_hash = params_hash(params)
    direct = (params.depth_mm > 0 and datafiles.direct(spark, settings.table_writer, warehouse)
              and all(tables.whole_files(spark, warehouse, t) for t in (tables.SLICES, tables.PREPROCESSED,
                                                                       tables.PATCHES)))
    if direct:
        # The version the new patches' check is made at (see _cut_direct).
        version = datafiles.ensure_table(spark, warehouse, tables.PATCHES)
        works, stats = plan(spark, settings, mode, series)
        _cut_direct(spark, settings, works, version, mode)
    else:
        stats = _cut_with_spark(spark, settings, mode, series)
    # The summary and the picture from key columns on the driver (tables.scan), not from Spark jobs.
    table = tables.scan(spark, warehouse, tables.PATCHES, ["patch_id", "mode", "label"], {"params_hash": [p_hash]})
    by_mode = {f"{r['mode']}/{r['label']}": r["count"] for r in
               table.group_by(["mode", "label"], use_threads=False).aggregate([([], "count_all")])
               .rename_columns(["mode", "label", "count"]).to_pylist()}
    summary = {"mode": mode, "params_hash": p_hash, **stats,
               "patches_by_mode_label": dict(sorted(by_mode.items())), "patches_total": table.num_rows}
    picture = write_patch_grid(spark, settings, table, mode)
    if picture:
        summary["patch_grid"] = picture
    return summary


def _cut_with_spark(spark: SparkSession, settings: Settings, mode: str, series: list[str] | None) -> dict:
    """Spark's joins of pixel rows and a MERGE (any warehouse, 2D/2.5D patches); the located counts."""
    warehouse, params = settings.warehouse, settings.patches.params()
    p_hash = params_hash(params)
    meta = slice_metadata(spark, warehouse).cache()
    if mode == "detected":
        tasks, stats = detected_tasks(spark, settings, meta, series)
    else:
        tasks = window_tasks(spark, warehouse, meta, series)
        stats = {"series": len(series) if series else "all"}
    # A slice task is all-or-nothing, so a slice with this mode's patches under these parameters is done.
    existing = (tables.read(spark, warehouse, tables.PATCHES)
                .filter((F.col("params_hash") == p_hash) & F.col("mode").isin(_produced(mode)))
                .select("series_uid", "slice_index").distinct())
    tasks = tasks.join(existing, ["series_uid", "slice_index"], "left_anti")
    # The task table is small but costly to derive (CSV reads, locating, windows, joins) and is
    # used twice below: derive it once (measured: 30% less JVM time in candidates mode).
    tasks = tasks.localCheckpoint()
    job = job_frame(spark, warehouse, meta, tasks, params)
    schema = T.StructType([f for f in tables.PATCHES_SCHEMA.fields if f.name != "created_at"])
    patches = job.mapInPandas(cut_udf(params, p_hash), schema).withColumn("created_at", F.current_timestamp())
    with session_conf(spark, {"spark.sql.execution.arrow.maxBytesPerBatch":
                              settings.patches.arrow_max_bytes_per_batch}), \
            StageProgress(spark.sparkContext, f"patches ({mode})", settings.patches.progress_seconds):
        tables.merge_insert(spark, warehouse, tables.PATCHES, patches, ["patch_id"])
    meta.unpersist()
    return stats


def _produced(mode: str) -> list[str]:
    """The patch modes a run of ``mode`` makes (a slice with any of them under these parameters is done)."""
    return ["window"] if mode == "window" else list(TRAINING_MODES)


#: The ``slices`` columns a slice task carries (besides its index), for the driver's plan.
_META_COLUMNS = [f.name for f in tables.LINEAGE_FIELDS] + [
    "z_position", "image_position", "image_orientation", "pixel_spacing_row", "pixel_spacing_col", "rows", "columns"]


def plan(spark: SparkSession, settings: Settings, mode: str, series: list[str] | None) -> tuple[list[str], dict]:
    """The direct writer's work, planned on the driver: one JSON item per series (:func:`series_patches`),
    and the located counts.

    The same tasks as Spark's path (:func:`slice_metadata`, :func:`detected_tasks` or
    :func:`window_tasks`, less the slices already cut), from key and metadata columns read
    with delta-rs and the same pure :func:`~ctlake.core.patch_tasks.locate_candidates`: the
    slice metadata of a 200-patient cohort is a few thousand small rows, and deriving it in
    Spark jobs (window, cogroup, joins, a checkpoint) cost 15 s of a 37 s run.
    """
    warehouse, patches = settings.warehouse, settings.patches
    p_hash = params_hash(patches.params())
    # Read once, with where each row lives: the work items name the row groups to read.
    slices = tables.locate(spark, warehouse, tables.SLICES, _META_COLUMNS)
    masks = tables.locate(spark, warehouse, tables.PREPROCESSED, _KEY + ["mask_valid"])
    valid = masks.filter(pc.fill_null(masks.column("mask_valid"), False))
    meta = slices.drop_columns(["data_file", "row_group"]).to_pandas()
    # Keys as Arrow strings: numpy's fixed-width strings drop the key's NUL separator.
    meta[HAS_MASK] = pc.is_in(datafiles.key_strings(slices, _KEY),
                              value_set=datafiles.key_strings(valid, _KEY)).to_numpy(zero_copy_only=False)
    # slice_metadata's order: ascending z (nulls first, as Spark sorts), then sop_uid and frame.
    meta = meta.sort_values(["series_uid", "z_position", "sop_uid", "frame"], na_position="first", kind="stable")
    meta["slice_index"] = meta.groupby("series_uid").cumcount()
    done = tables.scan(spark, warehouse, tables.PATCHES, ["series_uid", "slice_index"],
                       {"params_hash": [p_hash], "mode": _produced(mode)}, distinct=True)
    done = set(zip(done.column("series_uid").to_pylist(), done.column("slice_index").to_pylist()))
    by_slice = {(r["series_uid"], r["slice_index"]): r for r in meta.to_dict("records")}
    if mode == "detected":
        located, counts = _located(candidate_requests(spark, settings, series).toPandas(), meta,
                                   patches.max_slice_distance_mm)
        tasks = [{**by_slice[key], "requests": requests, "window": False} for key, requests in located.items()]
        stats = _located_counts(counts)
    else:
        chosen = meta[meta[HAS_MASK] & (meta["series_uid"].isin(series) if series else True)]
        tasks = [{**by_slice[key], "requests": None, "window": True}
                 for key in zip(chosen["series_uid"], chosen["slice_index"])]
        stats = {"series": len(series) if series else "all"}
    tasks = [t for t in tasks if (t["series_uid"], t["slice_index"]) not in done]
    task_series = {t["series_uid"] for t in tasks}
    indices = meta[meta["series_uid"].isin(task_series)]
    indices = list(zip(indices["series_uid"], indices["sop_uid"], indices["frame"], indices["slice_index"]))
    return _series_work(spark, warehouse, tasks, indices, slices, valid), stats


def _located(requests: pd.DataFrame, meta: pd.DataFrame, max_distance_mm: float) -> tuple[dict, dict]:
    """{(series, slice index): [REQUEST dicts]} of the requests near a slice, and {mode: (located, off the slab)}."""
    slices = dict(tuple(meta.groupby("series_uid")))
    located, counts = {}, {}
    for series_uid, group in requests.groupby("series_uid", sort=True):
        for row in locate_candidates(group, slices.get(series_uid, meta.iloc[:0])):
            off = row["distance_mm"] > max_distance_mm
            n, off_slab = counts.get(row["mode"], (0, 0))
            counts[row["mode"]] = (n + 1, off_slab + int(off))
            if not off:
                label = row["label"]
                request = {name: _plain(row[name]) for name in REQUEST.fieldNames()}
                request["label"] = None if label is None or label != label else int(label)  # NaN: no label
                located.setdefault((series_uid, row["slice_index"]), []).append(request)
    return located, counts


#: A task of the direct writer: one series, as JSON (its slices' indices and data files, its tasks).
_WORK_SCHEMA = T.StructType([T.StructField("work", T.StringType())])

_KEY = ["sop_uid", "frame"]


def _cut_direct(spark: SparkSession, settings: Settings, works: list[str], version: int, mode: str) -> int:
    """Volume patches, one pass: a task per series (:func:`plan`) reads its slices' row groups (and its masks
    from ``preprocessed``), cuts and writes ``patches`` files; the driver commits them once; patches added.

    The commit is made at ``version``, read before the check of done slices; when another writer
    committed first, the patch ids it added are dropped from this run's files and the commit retried.
    """
    warehouse, params = settings.warehouse, settings.patches.params()
    if not works:
        return 0
    body = cut_partition(params, params_hash(params), tables.local_folder(spark, warehouse, tables.PATCHES),
                         settings.patches.arrow_max_bytes_per_batch)
    source = spark.createDataFrame(spark.sparkContext.parallelize(
        [(w,) for w in works], min(len(works), 2 * spark.sparkContext.defaultParallelism)), _WORK_SCHEMA)
    with StageProgress(spark.sparkContext, f"patches ({mode})", settings.patches.progress_seconds):
        written = datafiles.collected(source.mapInArrow(body, datafiles.WRITTEN_SCHEMA).collect())
    try:
        for _ in range(datafiles.COMMIT_ATTEMPTS):
            try:
                datafiles.commit(spark, warehouse, tables.PATCHES, written, version,
                                 {"stage": "patches", "mode": mode})
                return sum(f.rows for f in written)
            except datafiles.ConcurrentCommit:
                version = tables.version(spark, warehouse, tables.PATCHES)
                folder = tables.local_folder(spark, warehouse, tables.PATCHES)
                mine = {i for f in written for i in pq.read_table(os.path.join(folder, f.name),
                                                                  columns=["patch_id"]).column(0).to_pylist()}
                taken = tables.scan(spark, warehouse, tables.PATCHES, ["patch_id"], {"patch_id": sorted(mine)},
                                    version).column(0).to_pylist()
                written = datafiles.without_keys(spark, warehouse, tables.PATCHES, written, ["patch_id"], set(taken))
        raise ConcurrentWriteError(f"patches: {datafiles.COMMIT_ATTEMPTS} commits lost to concurrent writers; run again")
    except BaseException:
        datafiles.discard(spark, warehouse, tables.PATCHES, written)
        raise


def _series_work(spark: SparkSession, warehouse: str, tasks: list[dict], indices: list[tuple],
                 slice_files: pa.Table, mask_files: pa.Table) -> list[str]:
    """The JSON work item of each series: slice index by key, the row groups of its slices and masks, its tasks.

    ``indices``: (series_uid, sop_uid, frame, slice_index) of every slice of the tasks' series;
    ``slice_files`` and ``mask_files``: :func:`ctlake.spark.tables.locate` rows of the slices and
    of the valid masks.
    """
    slice_folder = tables.local_folder(spark, warehouse, tables.SLICES)
    mask_folder = tables.local_folder(spark, warehouse, tables.PREPROCESSED)

    def groups(located: pa.Table, folder: str) -> dict[str, set]:
        found: dict[str, set] = {}
        for key, data_file, group in zip(datafiles.key_strings(located, _KEY).to_pylist(),
                                         located.column("data_file").to_pylist(), located.column("row_group").to_pylist()):
            found.setdefault(key, set()).add((os.path.join(folder, data_file), group))
        return found

    slice_at, mask_at = groups(slice_files, slice_folder), groups(mask_files, mask_folder)
    works: dict[str, dict] = {}
    for series_uid, sop_uid, frame, index in indices:
        key = f"{sop_uid}\x00{frame}"
        work = works.setdefault(series_uid, {"series_uid": series_uid, "slices": {}, "slice_groups": set(),
                                             "mask_groups": set(), "tasks": []})
        work["slices"][key] = int(index)
        work["slice_groups"] |= slice_at.get(key, set())
    for task in tasks:
        task = {k: _plain(v) for k, v in task.items()}
        work = works[task["series_uid"]]
        work["tasks"].append(task)
        if task.pop(HAS_MASK):
            work["mask_groups"] |= mask_at.get(f"{task['sop_uid']}\x00{task['frame']}", set())
    return [json.dumps({**w, "slice_groups": sorted(w["slice_groups"]), "mask_groups": sorted(w["mask_groups"])})
            for _, w in sorted(works.items())]


def _plain(value):
    """A pandas/numpy cell as JSON holds it (numpy scalars and arrays to Python, NaN to None)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    return None if isinstance(value, float) and value != value else value


def cut_partition(params: PatchParams, p_hash: str, folder: str, max_batch_bytes: int):
    """The mapInArrow body of the direct writer: each series' patches cut and written into ``patches`` files.

    Row groups are cut by bytes of patch pixels (``max_batch_bytes``); only
    the files' names and statistics go back through Spark.
    """
    schema = tables.arrow_schema(tables.PATCHES)
    created_at = datetime.now(UTC)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        writer = datafiles.FileWriter(folder, schema, datafiles.PIXEL_CODEC)
        rows, size = [], 0
        for batch in batches:
            for work in batch.column("work").to_pylist():
                for task_rows in series_patches(json.loads(work), params, p_hash):
                    rows += task_rows
                    size += sum(len(r["pixels"]) for r in task_rows)
                    if size >= max_batch_bytes:
                        writer.write(pa.Table.from_pylist([{**r, "created_at": created_at} for r in rows], schema))
                        rows, size = [], 0
        if rows:
            writer.write(pa.Table.from_pylist([{**r, "created_at": created_at} for r in rows], schema))
        yield datafiles.written_batch(writer.close())

    return run


def series_patches(work: dict, params: PatchParams, p_hash: str) -> Iterator[list[dict]]:
    """The patch rows of one series' task (:func:`_series_work`), one list per slice task.

    The series' slices and masks are read from their row groups; the cut is
    :func:`ctlake.core.patch_tasks.volume_tasks` and ``task_patches``, as on Spark's path.
    """
    slices = []
    for path, group in work["slice_groups"]:
        rows = pq.ParquetFile(path).read_row_group(group, columns=_KEY + ["series_uid", "z_position", "pixels",
                                                                          "pixel_shape"])
        rows = rows.filter(pc.equal(rows.column("series_uid"), work["series_uid"]))
        for key, z, pixels, shape in zip(datafiles.key_strings(rows, _KEY).to_pylist(),
                                         rows.column("z_position").to_pylist(), rows.column("pixels").to_pylist(),
                                         rows.column("pixel_shape").to_pylist()):
            if key in work["slices"]:
                slices.append({"slice_index": work["slices"][key], "z_position": z, "pixels": pixels,
                               "pixel_shape": shape})
    masks = {}
    for path, group in work["mask_groups"]:
        rows = pq.ParquetFile(path).read_row_group(group, columns=_KEY + ["mask_valid", "mask"])
        for key, valid, mask in zip(datafiles.key_strings(rows, _KEY).to_pylist(),
                                    rows.column("mask_valid").to_pylist(), rows.column("mask").to_pylist()):
            if valid:
                masks[key] = mask
    tasks = [{**t, "mask": masks.get(f"{t['sop_uid']}\x00{t['frame']}")} for t in work["tasks"]]
    for task in volume_tasks({"series_uid": work["series_uid"], "slices": slices, "tasks": tasks}, params):
        yield [patch_row(task, p, params, p_hash) for p in task_patches(task, params)]


def write_patch_grid(spark: SparkSession, settings: Settings, table: pa.Table, mode: str,
                     per_class: int = 16) -> str | None:
    """PNG grid of annotated-nodule and detected-candidate patches (or window patches), first by patch id.

    ``table``: patch_id, mode and label of the cut's patches; only the chosen
    patches' pixels are read (:func:`ctlake.spark.tables.lookup`).
    """
    table = table.sort_by("patch_id")
    if mode == "detected":
        chosen = [table.filter(pc.equal(table.column("mode"), m)).slice(0, per_class) for m in ("nodule", "detected")]
    else:
        chosen = [table.slice(0, 2 * per_class)]
    ids = [i for part in chosen for i in part.column("patch_id").to_pylist()]
    if not ids:
        return None
    found = tables.lookup(spark, settings.warehouse, tables.PATCHES, {"patch_id": ids},
                          ["patch_id", "pixels", "patch_shape", "label", "mode"])
    rows = {r["patch_id"]: r for r in found.to_pylist()}
    rows = [rows[i] for i in ids if i in rows]
    patches_hu = [np.frombuffer(r["pixels"], "<i2").reshape(r["patch_shape"]) for r in rows]
    captions = [f"{'?' if r['label'] is None else r['label']} {r['mode'][:4]}" for r in rows]
    path = tables.report_file(settings.report.folder, tables.patch_grid_png(mode))
    cv2.imwrite(str(path), patch_grid(patches_hu, captions, [r["label"] for r in rows]))
    return str(path)
