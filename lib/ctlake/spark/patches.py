"""Patch extraction job: candidates (training) or sliding windows (scoring) -> ``patches``.

Work is organized per slice: every patch wanted from a slice (candidates,
random negatives, window positions) becomes one *slice task* that carries the
slice's HU pixels once (plus neighbours for 2.5D, or the slices within
``patches.depth_mm / 2`` for volume patches) into a pandas UDF, which cuts
them all with :func:`ctlake.patching.cut_slice_task`. Images are never
collected to the driver, and a Python worker holds one slice stack at a time.

Candidate coordinates (LUNA16: patient mm) become voxels per series in a
cogrouped pandas UDF on slice metadata only (no pixels), with
:func:`ctlake.patchgeom.world_to_voxel`.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import pandas as pd
from ctlake import config as cfg
from ctlake.core.dicom_parse import hu_frame
from ctlake.core.patch_geometry import SliceGeometry, world_to_voxel
from ctlake.core.patch_tasks import PatchParams, cut_slice_task, patch_id
from ctlake.core.pictures import patch_grid
from ctlake.errors import ConfigError, InputError
from ctlake.spark import tables
from ctlake.spark.progress import StageProgress
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

log = logging.getLogger("ctlake.patches")

MODES = ("candidates", "window")

CANDIDATES_SCHEMA = "seriesuid string, coordX double, coordY double, coordZ double, `class` int"
ANNOTATIONS_SCHEMA = "seriesuid string, coordX double, coordY double, coordZ double, diameter_mm double"

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
EXCLUSION = T.StructType([
    T.StructField("row", T.DoubleType()),
    T.StructField("col", T.DoubleType()),
    T.StructField("radius_px", T.DoubleType()),
])

#: A candidate located on a slice (output of the cogrouped locate step).
LOCATED_SCHEMA = T.StructType([
    T.StructField("series_uid", T.StringType()),
    T.StructField("slice_index", T.IntegerType()),
    T.StructField("distance_mm", T.DoubleType()),
    T.StructField("radius_mm", T.DoubleType()),
    T.StructField("z_mm", T.DoubleType()),
] + REQUEST.fields)

#: ``patches``: one row per patch with full lineage; pixels are HU int16, shape (channels, px, px).
PATCHES_SCHEMA = T.StructType([T.StructField("patch_id", T.StringType())] + tables.LINEAGE_FIELDS + [
    T.StructField("slice_index", T.IntegerType()),
    T.StructField("mode", T.StringType()),
    T.StructField("candidate_id", T.StringType()),
    T.StructField("label", T.IntegerType()),
    T.StructField("center_row", T.DoubleType()),
    T.StructField("center_col", T.DoubleType()),
    T.StructField("coord_x", T.DoubleType()),
    T.StructField("coord_y", T.DoubleType()),
    T.StructField("coord_z", T.DoubleType()),
    T.StructField("size_mm", T.DoubleType()),
    # mm between channels for volume patches; null for 2D/2.5D (the series' slice spacing).
    T.StructField("channel_spacing_mm", T.DoubleType()),
    T.StructField("pixels", T.BinaryType()),
    T.StructField("patch_shape", T.ArrayType(T.IntegerType())),
    T.StructField("pixel_dtype", T.StringType()),
    T.StructField("params_hash", T.StringType()),
    T.StructField("created_at", T.TimestampType()),
])
tables.SCHEMAS[tables.PATCHES] = PATCHES_SCHEMA


def params_from_config(config: dict) -> PatchParams:
    """Patch parameters from ``patches.*``, checked before any Spark work."""
    params = PatchParams(
        size_mm=float(cfg.get(config, "patches.size_mm", (int, float), 32.0)),
        out_px=cfg.positive_int(config, "patches.out_px", 32),
        neighbours=cfg.get(config, "patches.neighbours", int, 0),
        depth_mm=float(cfg.get(config, "patches.depth_mm", (int, float), 0.0)),
        negative_margin_mm=float(cfg.get(config, "patches.negatives.margin_mm", (int, float), 10.0)),
        window_stride_mm=float(cfg.get(config, "patches.window.stride_mm", (int, float), 16.0)),
        window_min_mask_fraction=float(cfg.get(config, "patches.window.min_mask_fraction", (int, float), 0.5)),
    )
    if params.size_mm <= 0 or params.window_stride_mm <= 0:
        raise ConfigError("patches.size_mm and patches.window.stride_mm must be positive")
    if not 0 <= params.neighbours <= 3:
        raise ConfigError(f"patches.neighbours must be 0 (2D) to 3, found {params.neighbours}")
    if not 0 <= params.depth_mm <= 4 * params.size_mm:
        raise ConfigError(f"patches.depth_mm must be 0 (use neighbours) up to 4 x size_mm, found {params.depth_mm}")
    if not 0 < params.window_min_mask_fraction <= 1:
        raise ConfigError("patches.window.min_mask_fraction must be in (0, 1]")
    ratio = cfg.get(config, "patches.negatives.ratio", (int, float), 1.0)
    if ratio < 0:
        raise ConfigError(f"patches.negatives.ratio must be >= 0, found {ratio}")
    return params


def geometry(params: PatchParams) -> dict:
    """What a patch looks like (not how many are cut): a model is only valid on patches of its geometry."""
    return {"size_mm": params.size_mm, "out_px": params.out_px, "neighbours": params.neighbours,
            "depth_mm": params.depth_mm}


def params_hash(params: PatchParams) -> str:
    return hashlib.sha256(json.dumps(asdict(params), sort_keys=True).encode()).hexdigest()[:12]


def slice_metadata(spark: SparkSession, config: dict) -> DataFrame:
    """Every slice without pixels, with its index along the series (ascending z)."""
    order = Window.partitionBy("series_uid").orderBy("z_position", "sop_uid", "frame")
    return (tables.read(spark, config, tables.SLICES)
            .select(*[f.name for f in tables.LINEAGE_FIELDS], "z_position", "image_position", "image_orientation",
                    "pixel_spacing_row", "pixel_spacing_col", "rows", "columns")
            .withColumn("slice_index", (F.row_number().over(order) - 1).cast("int")))


def read_candidates(spark: SparkSession, path: str, schema: str) -> DataFrame:
    try:
        frame = spark.read.csv(path, header=True, schema=schema, enforceSchema=False, mode="DROPMALFORMED")
        frame.schema
    except Exception as exc:
        if "PATH_NOT_FOUND" in str(exc) or "does not exist" in str(exc):
            raise InputError(f"candidates file not found: {path}") from exc
        raise
    return frame.withColumnRenamed("seriesuid", "series_uid")


def _locate(cands: pd.DataFrame, meta: pd.DataFrame) -> pd.DataFrame:
    """One series: candidates (mm) -> nearest slice index and (row, col) on it."""
    columns = LOCATED_SCHEMA.fieldNames()
    if cands.empty or meta.empty:
        return pd.DataFrame(columns=columns)
    meta = meta.sort_values("slice_index")
    geometries = [SliceGeometry(tuple(p), tuple(o), float(sr), float(sc)) for p, o, sr, sc in
                  zip(meta["image_position"], meta["image_orientation"], meta["pixel_spacing_row"],
                      meta["pixel_spacing_col"])]
    indices = meta["slice_index"].to_numpy()
    z_positions = meta["z_position"].to_numpy()
    rows = []
    for cand in cands.itertuples(index=False):
        xyz = (cand.coordX, cand.coordY, cand.coordZ)
        position, row, col = world_to_voxel(xyz, geometries)
        normal = geometries[position].normal
        z_mm = float(np.dot(np.asarray(xyz), normal))
        rows.append({"series_uid": cand.series_uid, "slice_index": int(indices[position]),
                     "distance_mm": abs(z_mm - float(z_positions[position])), "radius_mm": cand.radius_mm,
                     "z_mm": z_mm, "row": row, "col": col, "mode": cand.mode, "label": cand.label,
                     "candidate_id": cand.candidate_id, "coord_x": cand.coordX, "coord_y": cand.coordY,
                     "coord_z": cand.coordZ})
    return pd.DataFrame(rows, columns=columns)


def locate(candidates: DataFrame, meta: DataFrame) -> DataFrame:
    """Candidates with columns series_uid, coordX/Y/Z, mode, label, candidate_id, radius_mm -> located rows."""
    geometry = meta.select("series_uid", "slice_index", "z_position", "image_position", "image_orientation",
                           "pixel_spacing_row", "pixel_spacing_col")
    return (candidates.groupBy("series_uid").cogroup(geometry.groupBy("series_uid"))
            .applyInPandas(_locate, LOCATED_SCHEMA))


def slice_stacks(spark: SparkSession, config: dict, meta: DataFrame, wanted: DataFrame,
                 params: PatchParams) -> DataFrame:
    """For each wanted (series_uid, slice_index): lineage, spacing, and the pixels of slices k-n..k+n (2.5D)."""
    pixels = (tables.read(spark, config, tables.SLICES).select("sop_uid", "frame", "pixels", "pixel_shape")
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


def series_volumes(spark: SparkSession, config: dict, meta: DataFrame, tasks: DataFrame) -> DataFrame:
    """One row per series with slice tasks: every slice's pixels once (``slices``) and the tasks (``tasks``).

    Volume patches need every slice within ``depth_mm / 2`` of a task's slice: a
    dozen at 3 mm spacing, fifty at 0.6 mm.  Sending each task its own stack
    would copy every slice that many times through the shuffle (measured: out of
    heap on 64 slices of 512 x 512 in window mode), so a series travels once
    and its tasks are cut in one Python call, which holds one series.
    """
    pixels = (tables.read(spark, config, tables.SLICES).select("sop_uid", "frame", "pixels", "pixel_shape")
              .join(meta.select("sop_uid", "frame", "series_uid", "slice_index", "z_position"), ["sop_uid", "frame"])
              .join(tasks.select("series_uid").distinct(), "series_uid", "left_semi"))
    volumes = (pixels.groupBy("series_uid")
               .agg(F.sort_array(F.collect_list(F.struct("slice_index", "z_position", "pixels", "pixel_shape")))
                    .alias("slices")))
    task_rows = meta.join(tasks, ["series_uid", "slice_index"], "inner")
    grouped = (task_rows.groupBy("series_uid")
               .agg(F.collect_list(F.struct(*[c for c in task_rows.columns if c != "series_uid"])).alias("tasks")))
    return volumes.join(grouped, "series_uid")


def task_patches(task: dict, params: PatchParams) -> list[dict]:
    """One slice task (a row of :func:`slice_stacks` joined with its task) -> its patches.

    For volume patches ``task["stack"]`` holds the slices around the task's slice
    (``offset`` from it), as :func:`volume_tasks` builds them.
    """
    by_offset = {s["offset"]: s for s in task["stack"]}
    shape = tuple(by_offset[0]["pixel_shape"])
    if params.depth_mm > 0:
        present = []
        for offset in sorted(by_offset):
            # Planes must rise strictly in z: a second frame at a slice's position adds nothing.
            if by_offset[offset]["pixels"] is not None and (
                    not present or by_offset[offset]["z_position"] > present[-1]["z_position"]):
                present.append(by_offset[offset])
        stack = [hu_frame(s["pixels"], s["pixel_shape"]) for s in present]
        z_positions, centre_z = [s["z_position"] for s in present], by_offset[0]["z_position"]
    else:
        stack = [hu_frame(by_offset[o]["pixels"], by_offset[o]["pixel_shape"])
                 if o in by_offset and by_offset[o]["pixels"] is not None else None
                 for o in range(-params.neighbours, params.neighbours + 1)]
        z_positions = centre_z = None
    mask = np.frombuffer(task["mask"], np.uint8).reshape(shape) if task["mask"] is not None else None
    requests = [dict(r) for r in (task["requests"] if task["requests"] is not None else [])]
    exclusions = [dict(e) for e in (task["exclusions"] if task["exclusions"] is not None else [])]
    return cut_slice_task(stack, (task["pixel_spacing_row"], task["pixel_spacing_col"]), params, requests, mask,
                          int(task["n_negatives"] or 0), exclusions, bool(task["window"]), int(task["seed"]),
                          z_positions, centre_z)


def volume_tasks(series_row: dict, params: PatchParams) -> Iterator[dict]:
    """The slice tasks of one :func:`series_volumes` row, each with the stack :func:`task_patches` expects."""
    slices = sorted(series_row["slices"], key=lambda s: s["slice_index"])
    positions = np.array([s["z_position"] for s in slices], dtype=float)
    index_of = {s["slice_index"]: i for i, s in enumerate(slices)}
    half = params.depth_mm / 2
    for task in series_row["tasks"]:
        task = {**task, "series_uid": series_row["series_uid"]}
        centre = index_of[task["slice_index"]]
        # The planes reach depth_mm / 2 each side: take every slice up to one beyond that.
        low = max(0, int(np.searchsorted(positions, positions[centre] - half, side="left")) - 1)
        high = min(len(slices), int(np.searchsorted(positions, positions[centre] + half, side="right")) + 1)
        task["stack"] = [{**slices[i], "offset": slices[i]["slice_index"] - task["slice_index"]}
                         for i in range(low, high)]
        yield task


def job_frame(spark: SparkSession, config: dict, meta: DataFrame, tasks: DataFrame, params: PatchParams) -> DataFrame:
    """What the cutting UDF reads: one row per slice task (2D/2.5D) or per series (volume patches)."""
    if params.depth_mm > 0:
        return series_volumes(spark, config, meta, tasks)
    return slice_stacks(spark, config, meta, tasks.select("series_uid", "slice_index"), params).join(
        tasks, ["series_uid", "slice_index"])


def row_tasks(row: dict, params: PatchParams) -> Iterator[dict]:
    """The slice tasks of one :func:`job_frame` row, ready for :func:`task_patches`."""
    return volume_tasks(row, params) if params.depth_mm > 0 else iter([row])


def cut_udf(params: PatchParams, p_hash: str):
    """mapInPandas body: slice tasks (or, for volume patches, series) -> patch rows (PATCHES_SCHEMA minus created_at)."""
    out_columns = [f for f in PATCHES_SCHEMA.fieldNames() if f != "created_at"]
    channel_mm = params.size_mm / params.out_px if params.depth_mm > 0 else None

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
                    for p in task_patches(task, params):
                        out.append({
                            "patch_id": patch_id(task["series_uid"], task["slice_index"], p["row"], p["col"],
                                                 p["mode"], p_hash),
                            **{k: task[k] for k in ("patient_pseudonym", "study_uid", "series_uid", "sop_uid",
                                                    "frame", "slice_index")},
                            "mode": p["mode"], "candidate_id": p.get("candidate_id"), "label": p.get("label"),
                            "center_row": p["row"], "center_col": p["col"],
                            "coord_x": p.get("coord_x"), "coord_y": p.get("coord_y"), "coord_z": p.get("coord_z"),
                            "size_mm": params.size_mm, "channel_spacing_mm": channel_mm,
                            "pixels": p["patch"].astype("<i2").tobytes(),
                            "patch_shape": list(p["patch"].shape), "pixel_dtype": "int16", "params_hash": p_hash,
                        })
            yield rows(out)

    return run


def candidate_tasks(spark: SparkSession, config: dict, meta: DataFrame, params: PatchParams) -> tuple[DataFrame, dict]:
    """Slice tasks for training: candidates, plus seeded random negatives inside lung masks."""
    cands = read_candidates(spark, cfg.get(config, "patches.candidates", str), CANDIDATES_SCHEMA)
    annotations = read_candidates(spark, cfg.get(config, "patches.annotations", str), ANNOTATIONS_SCHEMA)
    cands = (cands.withColumn("candidate_id", F.substring(F.sha2(F.concat_ws(
        "|", "series_uid", "coordX", "coordY", "coordZ"), 256), 1, 16))
        .withColumn("mode", F.lit("candidate")).withColumn("label", F.col("class"))
        .withColumn("radius_mm", F.lit(None).cast("double")))
    nodules = (annotations.withColumn("candidate_id", F.lit(None).cast("string"))
               .withColumn("mode", F.lit("nodule")).withColumn("label", F.lit(1))
               .withColumn("radius_mm", F.col("diameter_mm") / 2))
    columns = ["series_uid", "coordX", "coordY", "coordZ", "candidate_id", "mode", "label", "radius_mm"]
    located = locate(cands.select(*columns).unionByName(nodules.select(*columns)), meta).cache()

    half_gap = cfg.get(config, "patches.max_slice_distance_mm", (int, float), 3.0)
    usable = located.filter((F.col("mode") == "candidate") & (F.col("distance_mm") <= half_gap))
    requests = (usable.groupBy("series_uid", "slice_index")
                .agg(F.collect_list(F.struct(*REQUEST.fieldNames())).alias("requests")))

    # Negatives: per series, ratio x positive candidates, spread over slices with a valid lung mask.
    ratio = float(cfg.get(config, "patches.negatives.ratio", (int, float), 1.0))
    seed = cfg.get(config, "patches.negatives.seed", int, 7)
    positives = usable.filter(F.col("label") == 1).groupBy("series_uid").count()
    masks = (tables.read(spark, config, tables.PREPROCESSED).filter(F.col("mask_valid"))
             .select("sop_uid", "frame", "mask").join(meta.select("sop_uid", "frame", "series_uid", "slice_index"),
                                                       ["sop_uid", "frame"]))
    # Negatives only for series of the candidates file: a scan ingested for scoring is not training data.
    mask_slices = masks.select("series_uid", "slice_index").join(
        cands.select("series_uid").distinct(), "series_uid", "left_semi")
    per_series = (mask_slices.groupBy("series_uid").agg(F.count("*").alias("mask_slices"))
                  .join(positives, "series_uid", "left").fillna(0, ["count"])
                  .withColumn("wanted", F.ceil(F.greatest(F.col("count"), F.lit(1)) * F.lit(ratio)).cast("int")))
    ranked = (mask_slices.join(per_series, "series_uid")
              # A hash, not rand(): the same slices must be drawn on every run, or re-runs add patches.
              .withColumn("rnd", F.xxhash64("series_uid", "slice_index", F.lit(seed)))
              .withColumn("pick", F.row_number().over(Window.partitionBy("series_uid").orderBy("rnd", "slice_index")) - 1))
    # One negative on each of `wanted` randomly drawn slices of the series.
    negatives = (ranked.filter(F.col("pick") < F.col("wanted"))
                 .withColumn("n_negatives", F.lit(1)).select("series_uid", "slice_index", "n_negatives"))
    nodule_rows = located.filter(F.col("label") == 1)
    exclusions = (meta.select("series_uid", "slice_index", "z_position", "pixel_spacing_row")
                  .join(nodule_rows.select("series_uid", F.col("row").alias("n_row"), F.col("col").alias("n_col"),
                                           "z_mm", F.coalesce("radius_mm", F.lit(5.0)).alias("radius_mm")),
                        "series_uid")
                  .filter(F.abs(F.col("z_position") - F.col("z_mm")) <= F.col("radius_mm") + params.negative_margin_mm)
                  .groupBy("series_uid", "slice_index")
                  .agg(F.collect_list(F.struct(F.col("n_row").alias("row"), F.col("n_col").alias("col"),
                                               (F.col("radius_mm") / F.col("pixel_spacing_row")).alias("radius_px")))
                       .alias("exclusions")))
    wanted = requests.select("series_uid", "slice_index").union(negatives.select("series_uid", "slice_index")).distinct()
    tasks = (wanted.join(requests, ["series_uid", "slice_index"], "left")
             .join(negatives, ["series_uid", "slice_index"], "left")
             .join(exclusions, ["series_uid", "slice_index"], "left")
             .join(masks.select("series_uid", "slice_index", "mask"), ["series_uid", "slice_index"], "left")
             .fillna(0, ["n_negatives"])
             .withColumn("window", F.lit(False))
             .withColumn("seed", F.abs(F.xxhash64("series_uid", "slice_index", F.lit(seed)))))
    counts = located.groupBy("mode").agg(F.count("*").alias("n"),
                                         F.sum((F.col("distance_mm") > half_gap).cast("int")).alias("off_slab")).collect()
    total_cands = cands.count()
    stats = {"candidates_in_file": total_cands,
             "candidates_located": sum(r["n"] for r in counts if r["mode"] == "candidate"),
             "candidates_off_slab": sum(r["off_slab"] for r in counts if r["mode"] == "candidate")}
    return tasks, stats


def window_tasks(spark: SparkSession, config: dict, meta: DataFrame, series: list[str] | None) -> DataFrame:
    """Slice tasks for scoring: every slice with a valid lung mask of the chosen series."""
    masks = (tables.read(spark, config, tables.PREPROCESSED).filter(F.col("mask_valid"))
             .select("sop_uid", "frame", "mask").join(meta.select("sop_uid", "frame", "series_uid", "slice_index"),
                                                       ["sop_uid", "frame"]))
    if series:
        masks = masks.filter(F.col("series_uid").isin(series))
    return (masks.select("series_uid", "slice_index", "mask")
            .withColumn("requests", F.lit(None).cast(T.ArrayType(REQUEST)))
            .withColumn("n_negatives", F.lit(0))
            .withColumn("exclusions", F.lit(None).cast(T.ArrayType(EXCLUSION)))
            .withColumn("window", F.lit(True)).withColumn("seed", F.lit(0).cast("long")))


def run(spark: SparkSession, config: dict, mode: str = "candidates", series: list[str] | None = None) -> dict:
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, found {mode!r}")
    params = params_from_config(config)
    p_hash = params_hash(params)
    meta = slice_metadata(spark, config).cache()
    if mode == "candidates":
        tasks, stats = candidate_tasks(spark, config, meta, params)
    else:
        tasks, stats = window_tasks(spark, config, meta, series), {"series": len(series) if series else "all"}
    # A slice task is all-or-nothing, so a slice with this mode's patches under these parameters is done.
    produced = ["window"] if mode == "window" else ["candidate", "negative"]
    existing = (tables.read(spark, config, tables.PATCHES)
                .filter((F.col("params_hash") == p_hash) & F.col("mode").isin(produced))
                .select("series_uid", "slice_index").distinct())
    tasks = tasks.join(existing, ["series_uid", "slice_index"], "left_anti")
    # The task table is small but costly to derive (CSV reads, locating, windows, joins) and is
    # used twice below: derive it once (measured: 30% less JVM time in candidates mode).
    tasks = tasks.localCheckpoint()
    job = job_frame(spark, config, meta, tasks, params)
    spark.conf.set("spark.sql.execution.arrow.maxBytesPerBatch",
                   str(cfg.size_bytes(config, "patches.arrow_max_bytes_per_batch", "16m")))
    schema = T.StructType([f for f in PATCHES_SCHEMA.fields if f.name != "created_at"])
    patches = job.mapInPandas(cut_udf(params, p_hash), schema).withColumn("created_at", F.current_timestamp())
    with StageProgress(spark.sparkContext, f"patches ({mode})", cfg.get(config, "patches.progress_seconds",
                                                                       (int, float), 10)):
        tables.merge_insert(spark, config, tables.PATCHES, patches, ["patch_id"])
    meta.unpersist()
    table = tables.read(spark, config, tables.PATCHES).filter(F.col("params_hash") == p_hash)
    by_mode = {f"{r['mode']}/{r['label']}": r["count"] for r in table.groupBy("mode", "label").count().collect()}
    summary = {"mode": mode, "params_hash": p_hash, **stats,
               "patches_by_mode_label": dict(sorted(by_mode.items())), "patches_total": table.count()}
    picture = write_patch_grid(config, table, mode)
    if picture:
        summary["patch_grid"] = picture
    return summary


def write_patch_grid(config: dict, table: DataFrame, mode: str, per_class: int = 16) -> str | None:
    """PNG grid of positive and negative patches (or window patches) with their labels."""
    if mode == "candidates":
        chosen = (table.filter(F.col("label") == 1).orderBy("patch_id").limit(per_class)
                  .unionByName(table.filter(F.col("label") == 0).orderBy("patch_id").limit(per_class)))
    else:
        chosen = table.orderBy("patch_id").limit(2 * per_class)
    rows = chosen.select("pixels", "patch_shape", "label", "mode").collect()
    if not rows:
        return None
    patches_hu = [np.frombuffer(r["pixels"], "<i2").reshape(r["patch_shape"]) for r in rows]
    captions = [f"{'?' if r['label'] is None else r['label']} {r['mode'][:4]}" for r in rows]
    folder = Path(cfg.get(config, "report.folder", str, "data/report"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"patch_grid_{mode}.png"
    cv2.imwrite(str(path), patch_grid(patches_hu, captions, [r["label"] for r in rows]))
    return str(path)
