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


def detected_tasks(spark: SparkSession, settings: Settings, meta: DataFrame, series: list[str] | None,
                   pixels: bool = True) -> tuple[DataFrame, dict]:
    """Slice tasks at the detector's candidates (of ``series``, or all), plus every annotated nodule.

    The annotated nodules (``patches.annotations``, patient mm) are cut only
    when no series is given: they are training data, and a scan being scored
    has no annotations.  Each is cut at its centre (mode ``nodule``) and at
    ``patches.jitter.copies`` displaced centres (mode ``jittered``,
    :func:`ctlake.core.patch_tasks.jittered_nodules`).  Their ``candidate_id``
    is the nodule's key in ``nodules.csv``; a detected patch's is the
    detection's.
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
    located = locate(rows, meta).cache()
    usable = located.filter(F.col("distance_mm") <= patches.max_slice_distance_mm)
    requests = (usable.groupBy("series_uid", "slice_index")
                .agg(F.collect_list(F.struct(*REQUEST.fieldNames())).alias("requests")))
    masks = valid_masks(spark, settings.warehouse, meta, pixels)
    tasks = (requests.join(masks.select("series_uid", "slice_index", "mask" if pixels else HAS_MASK),
                           ["series_uid", "slice_index"], "left")
             .withColumn("window", F.lit(False)))
    counts = {r["mode"]: (r["n"], r["off_slab"]) for r in located.groupBy("mode").agg(
        F.count("*").alias("n"), F.sum((F.col("distance_mm") > patches.max_slice_distance_mm).cast("int"))
        .alias("off_slab")).collect()}
    located.unpersist()
    return tasks, {f"{mode}_located": n for mode, (n, _) in sorted(counts.items())} | {
        f"{mode}_off_slab": off for mode, (_, off) in sorted(counts.items())}


def valid_masks(spark: SparkSession, warehouse: str, meta: DataFrame, pixels: bool = True) -> DataFrame:
    """The lung mask of every slice whose mask passed the quality check, with its series and index.

    ``pixels`` False: a ``has_mask`` flag instead of the mask, for workers that read the masks themselves.
    """
    mask = "mask" if pixels else F.lit(True).alias(HAS_MASK)
    return (tables.read(spark, warehouse, tables.PREPROCESSED).filter(F.col("mask_valid"))
            .select("sop_uid", "frame", mask).join(meta.select("sop_uid", "frame", "series_uid", "slice_index"),
                                                    ["sop_uid", "frame"]))


#: The task column that says a valid mask exists, where the workers read masks themselves.
HAS_MASK = "has_mask"


def window_tasks(spark: SparkSession, warehouse: str, meta: DataFrame, series: list[str] | None,
                 pixels: bool = True) -> DataFrame:
    """Slice tasks for scoring: every slice with a valid lung mask of the chosen series."""
    masks = valid_masks(spark, warehouse, meta, pixels)
    if series:
        masks = masks.filter(F.col("series_uid").isin(series))
    return (masks.select("series_uid", "slice_index", "mask" if pixels else HAS_MASK)
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
    # The version the new patches' check is made at (see _cut_direct).
    version = datafiles.ensure_table(spark, warehouse, tables.PATCHES) if direct else None
    meta = slice_metadata(spark, warehouse).cache()
    if mode == "detected":
        tasks, stats = detected_tasks(spark, settings, meta, series, pixels=not direct)
    else:
        tasks = window_tasks(spark, warehouse, meta, series, pixels=not direct)
        stats = {"series": len(series) if series else "all"}
    # A slice task is all-or-nothing, so a slice with this mode's patches under these parameters is done.
    produced = ["window"] if mode == "window" else list(TRAINING_MODES)
    existing = (tables.read(spark, warehouse, tables.PATCHES)
                .filter((F.col("params_hash") == p_hash) & F.col("mode").isin(produced))
                .select("series_uid", "slice_index").distinct())
    tasks = tasks.join(existing, ["series_uid", "slice_index"], "left_anti")
    # The task table is small but costly to derive (CSV reads, locating, windows, joins) and is
    # used twice below: derive it once (measured: 30% less JVM time in candidates mode).
    tasks = tasks.localCheckpoint()
    if direct:
        _cut_direct(spark, settings, meta, tasks, version, mode)
    else:
        job = job_frame(spark, warehouse, meta, tasks, params)
        schema = T.StructType([f for f in tables.PATCHES_SCHEMA.fields if f.name != "created_at"])
        patches = job.mapInPandas(cut_udf(params, p_hash), schema).withColumn("created_at", F.current_timestamp())
        with session_conf(spark, {"spark.sql.execution.arrow.maxBytesPerBatch":
                                  settings.patches.arrow_max_bytes_per_batch}), \
                StageProgress(spark.sparkContext, f"patches ({mode})", settings.patches.progress_seconds):
            tables.merge_insert(spark, warehouse, tables.PATCHES, patches, ["patch_id"])
    meta.unpersist()
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


#: A task of the direct writer: one series, as JSON (its slices' indices and data files, its tasks).
_WORK_SCHEMA = T.StructType([T.StructField("work", T.StringType())])

_KEY = ["sop_uid", "frame"]


def _cut_direct(spark: SparkSession, settings: Settings, meta: DataFrame, tasks: DataFrame, version: int,
                mode: str) -> int:
    """Volume patches, one pass: a task per series reads its slices' row groups (and its masks from
    ``preprocessed``), cuts and writes ``patches`` files; the driver commits them once; patches added.

    The slice tasks (no pixels) are collected to the driver and grouped by series; where each slice
    and mask lives comes from the key columns (:func:`ctlake.spark.tables.locate`).  The commit is
    made at ``version``, read before the check of done slices; when another writer committed first,
    the patch ids it added are dropped from this run's files and the commit retried.
    """
    warehouse, params = settings.warehouse, settings.patches.params()
    works = series_works(spark, warehouse, meta, tasks)
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


def series_works(spark: SparkSession, warehouse: str, meta: DataFrame, tasks: DataFrame) -> list[str]:
    """The slice tasks without pixels (``tasks``) as one JSON work item per series (:func:`series_patches`)."""
    rows = meta.join(tasks, ["series_uid", "slice_index"], "inner").toArrow()
    if rows.num_rows == 0:
        return []
    task_series = set(rows.column("series_uid").to_pylist())
    indices = (meta.filter(F.col("series_uid").isin(sorted(task_series)))
               .select("series_uid", "sop_uid", "frame", "slice_index").toArrow())
    return _series_work(spark, warehouse, rows, indices)


def _series_work(spark: SparkSession, warehouse: str, rows: pa.Table, indices: pa.Table) -> list[str]:
    """The JSON task of each series: slice index by key, the row groups of its slices and masks, its tasks."""
    slice_files = tables.locate(spark, warehouse, tables.SLICES, _KEY + ["series_uid"])
    mask_files = tables.locate(spark, warehouse, tables.PREPROCESSED, _KEY + ["mask_valid"])
    mask_files = mask_files.filter(pc.fill_null(mask_files.column("mask_valid"), False))
    slice_folder = tables.local_folder(spark, warehouse, tables.SLICES)
    mask_folder = tables.local_folder(spark, warehouse, tables.PREPROCESSED)

    def groups(located: pa.Table, folder: str) -> dict[str, list]:
        found: dict[str, set] = {}
        for key, data_file, group in zip(datafiles.key_strings(located, _KEY).to_pylist(),
                                         located.column("data_file").to_pylist(), located.column("row_group").to_pylist()):
            found.setdefault(key, set()).add((os.path.join(folder, data_file), group))
        return found

    slice_at, mask_at = groups(slice_files, slice_folder), groups(mask_files, mask_folder)
    works: dict[str, dict] = {}
    for series_uid, key, index in zip(indices.column("series_uid").to_pylist(),
                                      datafiles.key_strings(indices, _KEY).to_pylist(),
                                      indices.column("slice_index").to_pylist()):
        work = works.setdefault(series_uid, {"series_uid": series_uid, "slices": {}, "slice_groups": set(),
                                             "mask_groups": set(), "tasks": []})
        work["slices"][key] = index
        work["slice_groups"] |= slice_at.get(key, set())
    for task, key in zip(rows.to_pylist(), datafiles.key_strings(rows, _KEY).to_pylist()):
        work = works[task["series_uid"]]
        work["tasks"].append(task)
        if task.pop(HAS_MASK):
            work["mask_groups"] |= mask_at.get(key, set())
    return [json.dumps({**w, "slice_groups": sorted(w["slice_groups"]), "mask_groups": sorted(w["mask_groups"])})
            for _, w in sorted(works.items())]


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
