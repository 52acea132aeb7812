"""Preprocessing, patch and feature throughput: ctlake's Spark jobs against the same pure functions in a plain loop.

    .venv/bin/python bench/bench_preprocess.py --conf conf/local.yaml [--set k=v] [--patients 16 --slices 64 --matrix 512]
        [--stages preprocess,candidates,window,features]

1. Reuses the benchmark cohort under ``<workdir>/cohort`` when its settings stamp matches (the one
   ``bench_ingest.py`` generates; else generates it with ``ctlake.spark.cohort.run``) and ingests it
   into the scratch warehouse ``<workdir>/pp-warehouse`` (reused when it already holds that cohort).
2. Warms the session: preprocess, candidate patches, features and window patches over a few slices in
   another scratch warehouse (JVM start-up, Delta classes, Python workers and first-query compilation
   are not counted).
3. Times the chosen ``--stages``, each into a freshly deleted table, with a per-stage breakdown and
   peak memory: ``ctlake.spark.preprocess.run`` (slices/s), ``ctlake.spark.patches.run`` in detected
   mode (patches/s; the detector runs first, untimed), ``ctlake.spark.features.run`` over those
   patches, and ``patches.run`` in window mode over ``--window-series`` series.
4. Stops Spark and times single-process loops of the same work *including its read and durable
   write* (the issue 11 baseline): for preprocess, each ``slices`` row group read with pyarrow,
   ``preprocess.processed_rows`` and a Parquet write; for patches, each series' work item (planned
   with Spark, not timed) read from its row groups and cut by ``patches.series_patches``, then written;
   for features, each ``patches`` row group read, ``features.feature_rows`` and written; all in the
   job's codec, fsynced.
5. Prints ratio = Spark throughput / (loop throughput x cores Spark used); target >= 0.8.

The last line of stdout is one JSON object with every figure; it is also written to
``<workdir>/preprocess.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from common import (
    STAMP_NAME,
    MemorySampler,
    StageClock,
    cohort_arguments,
    cohort_settings,
    ensure_cohort,
    fresh,
    load_average,
    machine,
    memory_text,
    rate,
    spark_cores,
    time_progress,
    versions,
    write_result,
)

from ctlake.cli import job_parser, setup_logging
from ctlake.config import Settings
from ctlake.errors import ConfigError, InputError

TARGET_RATIO = 0.8
WARMUP_SLICES = 8
#: The stages this bench can time, in the order it runs them (features needs the candidate patches).
STAGES = ("preprocess", "candidates", "features", "window")
#: (result key, label, unit) of each stage in the table.
LABELS = {"preprocess": ("preprocess", "slices"), "candidates": ("patches: detected candidates", "patches"),
          "features": ("features of the candidate patches", "patches"), "window": ("patches: window", "patches")}
WAREHOUSE_STAMP = "bench-cohort.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = job_parser("bench_preprocess", __doc__)
    cohort_arguments(parser, "preprocess.json")
    parser.add_argument("--window-series", type=int, default=2, metavar="N",
                        help="series covered by the window-mode run (default: %(default)s)")
    parser.add_argument("--stages", default=",".join(STAGES), metavar="S,S,...",
                        help="stages to time, of " + ", ".join(STAGES) + " (default: all)")
    args = parser.parse_args(argv)
    if args.window_series < 1:
        parser.error(f"--window-series must be at least 1, found {args.window_series}")
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown or not args.stages:
        parser.error(f"--stages must name some of {', '.join(STAGES)}, found {', '.join(unknown) or 'none'}")
    if "features" in args.stages and "candidates" not in args.stages:
        parser.error("--stages features needs candidates: it featurizes the candidate patches")
    return args


def bench_config(args: argparse.Namespace) -> Settings:
    """The configuration file plus --sets/--set overrides, with the benchmark's cohort, scratch paths and no progress logs."""
    workdir = Path(args.workdir)
    cohort = workdir / "cohort"
    return cohort_settings(args, {
        "preprocess.progress_seconds": 0, "patches.progress_seconds": 0, "features.progress_seconds": 0,
        "warehouse": str(workdir / "pp-warehouse"),
        "patches.annotations": str(cohort / "annotations.csv"), "report.folder": str(workdir / "report")})


# --- inputs ---------------------------------------------------------------------------------------

def ensure_slices(spark, config: Settings, cohort: Path, files: list[Path]) -> tuple[int, bool, float]:
    """The ``slices`` table of the scratch warehouse: rows, whether it was ingested now, ingest seconds.

    Reused when the warehouse's stamp records the cohort's stamp and the table holds one row per file.
    """
    from ctlake.spark import ingest, tables

    warehouse = Path(config.warehouse)
    cohort_stamp = json.loads((cohort / STAMP_NAME).read_text())
    stamp = warehouse / WAREHOUSE_STAMP
    if (stamp.is_file() and json.loads(stamp.read_text()) == cohort_stamp
            and tables.exists(spark, config.warehouse, tables.SLICES)):
        rows = tables.read(spark, config.warehouse, tables.SLICES).count()
        if rows == len(files):
            return rows, False, 0.0
    fresh(warehouse)
    started = time.perf_counter()
    ingest.run(spark, config, str((cohort / "dicom").resolve()))
    seconds = time.perf_counter() - started
    rows = tables.read(spark, config.warehouse, tables.SLICES).count()
    stamp.write_text(json.dumps(cohort_stamp, indent=1) + "\n")
    return rows, True, seconds


def warm_up(spark, config: Settings, warehouse: Path) -> float:
    """Preprocess and both patch modes over the first few slices of one series, in another warehouse."""
    from pyspark.sql import functions as F

    from ctlake.spark import detect, features, patches, preprocess, tables

    started = time.perf_counter()
    warm = config.updated({"warehouse": str(fresh(warehouse))})
    first = tables.read(spark, config.warehouse, tables.SLICES).agg(F.min("series_uid")).first()[0]
    (tables.read(spark, config.warehouse, tables.SLICES).filter(F.col("series_uid") == first)
     .orderBy("z_position").limit(WARMUP_SLICES).write.format("delta").save(str(warehouse / tables.SLICES)))
    preprocess.run(spark, warm)
    detect.run(spark, warm)
    patches.run(spark, warm, "detected")
    features.run(spark, warm)
    fresh(warehouse / tables.PATCHES)
    patches.run(spark, warm, "window", [first])
    return time.perf_counter() - started


# --- stage timings --------------------------------------------------------------------------------

def timed(run, targets: list[tuple[object, str, str]], jobs: list[object]) -> tuple[dict, float, dict, dict]:
    """``run()`` under the memory sampler and stage clock: summary, seconds, stages, memory.

    ``jobs``: modules whose ``StageProgress`` blocks (their pixel Spark jobs) are timed as one stage.
    """
    with MemorySampler() as memory, StageClock(targets) as clock:
        for module in jobs:
            time_progress(clock, module, "Spark job: workers read, compute and write files")
        started = time.perf_counter()
        summary = run()
        seconds = time.perf_counter() - started
    stages = {k: round(v, 2) for k, v in clock.seconds.items()}
    stages["other (reads, anti-joins, counts, summary)"] = round(max(0.0, seconds - sum(clock.seconds.values())), 2)
    return summary, seconds, stages, memory.summary()


# --- loop inputs and loops ------------------------------------------------------------------------

class LoopClock:
    """Seconds of a loop spent reading, computing and writing (what a Spark stage's time would split into)."""

    def __init__(self):
        self.seconds = {"read": 0.0, "compute": 0.0, "write": 0.0}
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def lap(self, part: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[part] += now - since
        return now

    def result(self, count: int) -> tuple[float, float, int, dict]:
        return (time.perf_counter() - self.started, time.process_time() - self.cpu_started, count,
                {k: round(v, 2) for k, v in self.seconds.items()})


def preprocess_loop(config: Settings, data_files: list[str], out: Path) -> tuple[float, float, int, dict]:
    """Single process: read each ``slices`` row group with pyarrow, run the chain on every slice and write
    the ``preprocessed`` rows to Parquet in the job's codec; seconds, CPU seconds, slices, split.

    The baseline the issue fixed: the same pure per-slice work (``processed_rows``: ``hu_frame``, the
    chain, ``slice_quality``, packing) including the durable write the job cannot skip.
    """
    import cv2
    import pyarrow.parquet as pq

    from ctlake.spark import tables
    from ctlake.spark.preprocess import INPUT_COLUMNS, processed_rows, run_stamp

    cv2.setNumThreads(1)  # one core, as each Spark task gets
    chain = config.preprocess.chain()
    stamp = run_stamp(chain)

    def batches():
        for path in data_files:
            source = pq.ParquetFile(path)
            for group in range(source.num_row_groups):
                yield source.read_row_group(group, columns=INPUT_COLUMNS)

    return write_loop(batches(), lambda rows: processed_rows(chain, rows, stamp),
                      tables.arrow_schema(tables.PREPROCESSED), out)


def write_loop(batches, compute, schema, out: Path) -> tuple[float, float, int, dict]:
    """Time ``compute`` over ``batches`` (a generator that reads), each result written to ``out`` and fsynced."""
    import os

    import pyarrow.parquet as pq

    from ctlake.spark import datafiles

    clock, count = LoopClock(), 0
    with pq.ParquetWriter(out, schema, compression=datafiles.PIXEL_CODEC) as writer:
        since = time.perf_counter()
        for rows in batches:
            since = clock.lap("read", since)
            result = compute(rows)
            since = clock.lap("compute", since)
            writer.write_table(result)
            count += result.num_rows
            since = clock.lap("write", since)
    with open(out, "rb") as handle:
        os.fsync(handle.fileno())
    clock.lap("write", since)
    out.unlink()
    return clock.result(count)


def patches_loop(config: Settings, works: list[str], out: Path) -> tuple[float, float, int, dict]:
    """Single process: each series' work item read (its slices' and masks' row groups), cut by
    ``patches.series_patches`` and written as ``patches`` rows; seconds, CPU seconds, patches, split.

    Reading and cutting are one call (``series_patches`` reads as it goes): its time is under compute.
    """
    import json as json_

    import cv2
    import pyarrow as pa

    from ctlake.core.patch_tasks import params_hash
    from ctlake.spark import patches, tables

    cv2.setNumThreads(1)
    params = config.patches.params()
    p_hash, schema, created_at = params_hash(params), tables.arrow_schema(tables.PATCHES), datetime.now(UTC)

    def cut(work: str) -> pa.Table:
        rows = [r for task in patches.series_patches(json_.loads(work), params, p_hash) for r in task]
        return pa.Table.from_pylist([{**r, "created_at": created_at} for r in rows], schema)

    return write_loop(iter(works), cut, schema, out)


def features_loop(config: Settings, data_files: list[str], series_mm: dict, out: Path) -> tuple[float, float, int, dict]:
    """Single process: each ``patches`` row group read, ``features.feature_rows`` and written; as above."""
    import cv2
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ctlake.spark import features, tables

    cv2.setNumThreads(1)
    stamp = features.run_stamp(config.features.pixel_size)

    def batches():
        for path in data_files:
            source = pq.ParquetFile(path)
            for group in range(source.num_row_groups):
                rows = source.read_row_group(group, columns=features.INPUT_COLUMNS)
                yield rows.append_column(features.SERIES_MM, pa.array(
                    [series_mm.get(s) for s in rows.column("series_uid").to_pylist()], pa.float64()))

    return write_loop(batches(), lambda rows: features.feature_rows(rows, config.features.pixel_size, stamp),
                      tables.arrow_schema(tables.FEATURES), out)


# --- report ---------------------------------------------------------------------------------------

def human_table(result: dict) -> str:
    m, v, c, cores = result["machine"], result["versions"], result["cohort"], result["spark"]["cores"]
    generated = f"generated in {c['generate_seconds']} s" if c["generated"] else "reused"
    ingested = f"ingested in {c['ingest_seconds']} s" if c["ingested"] else "reused"
    lines = [
        (f"machine: {m['cpu']}, {cores} Spark cores ({m['os_cpus']} CPUs), {m['ram_gb']} GB RAM; load average"
         f" (1/5/15 min) at start {result['load_average']['start']}, at end {result['load_average']['end']}"),
        "versions: " + ", ".join(f"{k} {v[k]}" for k in ("python", "pyspark", "delta", "java", "numpy",
                                                          "opencv-python-headless") if v.get(k)),
        (f"cohort: {c['slices_in_table']} slices ({c['patients']} patients x {c['slices']} at"
         f" {c['matrix']}x{c['matrix']}); cohort {generated}, slices table {ingested}"),
        (f"timing: wall clock after a warm-up over {WARMUP_SLICES} slices in another warehouse"
         f" ({result['warmup_seconds']} s); each Spark run writes a freshly deleted table"),
        "",
        f"{'run':<50}{'seconds':>9}{'items':>8}{'items/s':>10}{'ratio':>8}{'CPU s':>9}{'items/CPU s':>13}{'CPU eff.':>10}",
    ]
    stages = [k for k in STAGES if k in result]
    for key in stages:
        label, unit = LABELS[key]
        label += f" ({result['window']['series']} series)" if key == "window" else ""
        row = result[key]
        lines.append(f"{label + f' - Spark ({cores} cores)':<50}{row['spark']['seconds']:>9.2f}"
                     f"{row['spark'][unit]:>8}{row['spark'][unit + '_per_s']:>10.1f}{row['ratio']:>8.3f}"
                     f"{row['spark']['cpu_s']:>9.2f}{row['spark'][unit + '_per_cpu_s']:>13.1f}{row['cpu_efficiency']:>10.3f}")
        lines.append(f"{label + ' - loop (1 core)':<50}{row['loop']['seconds']:>9.2f}"
                     f"{row['loop'][unit]:>8}{row['loop'][unit + '_per_s']:>10.1f}{'':>8}"
                     f"{row['loop']['cpu_s']:>9.2f}{row['loop'][unit + '_per_cpu_s']:>13.1f}")
    lines += ["", f"ratio = Spark / (loop x {cores} cores); target >= {TARGET_RATIO}: " + ", ".join(
        f"{k} {'meets' if result[k]['ratio'] >= TARGET_RATIO else 'below'}" for k in stages),
        ("CPU s = CPU seconds used (Spark: driver + JVM + Python workers); CPU eff. = (items per CPU s, Spark) /"
         " (items per CPU s, loop): what the work costs, whatever else runs on the machine")]
    for key in stages:
        lines.append(f"\n{key} stages (seconds):")
        for name, seconds in result[key]["spark"]["stages"].items():
            lines.append(f"  {name:<52}{seconds:>8.2f}")
        loop = result[key]["loop"]["split"]
        lines.append("  loop: " + ", ".join(f"{k} {v:.2f} s" for k, v in loop.items()))
        mem = result[key]["spark"]["memory"]
        lines.append(f"  peak RSS MB (sampled every {mem['sample_interval_s']} s): {memory_text(mem)};"
                     f" CPU s: driver {mem['driver_python_cpu_s']}, JVM {mem['jvm_cpu_s']},"
                     f" Python workers {mem['python_worker_cpu_s']}")
    return "\n".join(lines)


def section(cores: int, unit: str, run: tuple[dict, float, dict, dict], count_key: str,
            loop: tuple[float, float, int, dict]) -> dict:
    """One stage's figures: the Spark run, the loop, the ratio and the CPU efficiency."""
    summary, spark_seconds, stages, memory = run
    spark_count = summary[count_key]
    loop_seconds, loop_cpu, loop_count, split = loop
    spark_cpu = round(memory["driver_python_cpu_s"] + memory["jvm_cpu_s"] + memory["python_worker_cpu_s"], 2)
    return {"spark": {"seconds": round(spark_seconds, 2), unit: spark_count,
                      f"{unit}_per_s": rate(spark_count, spark_seconds), "cpu_s": spark_cpu,
                      f"{unit}_per_cpu_s": rate(spark_count, spark_cpu),
                      "stages": stages, "memory": memory, "summary": summary},
            "loop": {"seconds": round(loop_seconds, 2), unit: loop_count, f"{unit}_per_s": rate(loop_count, loop_seconds),
                     "cpu_s": round(loop_cpu, 2), f"{unit}_per_cpu_s": rate(loop_count, loop_cpu), "split": split},
            "ratio": round(spark_count / spark_seconds / (loop_count / loop_seconds * cores), 3)
            if spark_seconds > 0 and loop_count and loop_seconds > 0 else 0.0,
            # Independent of other load on the machine: CPU spent per item by the loop / by Spark.
            "cpu_efficiency": round((spark_count / spark_cpu) / (loop_count / loop_cpu), 3)
            if spark_cpu > 0 and loop_count and loop_cpu > 0 else 0.0}


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        config = bench_config(args)
    except (ConfigError, InputError) as exc:
        print(f"bench_preprocess: error: {exc}", file=sys.stderr)
        return 2

    from deltalake import DeltaTable
    from pyspark.sql import functions as F

    from ctlake.spark import datafiles, detect, features, patches, preprocess, tables
    from ctlake.spark.session import build_session

    load_start = load_average()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    warehouse = Path(config.warehouse)
    runs: dict[str, tuple] = {}
    spark = build_session(config.spark)
    try:
        cores = spark_cores(spark)
        files, generated, generate_seconds = ensure_cohort(spark, config, workdir / "cohort")
        if not files:
            raise InputError(f"no DICOM files in {workdir / 'cohort' / 'dicom'}")
        slice_rows, ingested, ingest_seconds = ensure_slices(spark, config, workdir / "cohort", files)
        warmup_seconds = warm_up(spark, config, workdir / "pp-warmup-warehouse")
        commit = (datafiles, "commit", lambda *a, **k: f"delta commit {a[2]} (delta-rs)")

        # Preprocess always runs (the patches need its masks); it is timed when asked for.
        fresh(warehouse / tables.PREPROCESSED)
        runs["preprocess"] = timed(lambda: preprocess.run(spark, config), [
            (preprocess, "_pending", "pending keys (key columns read with delta-rs)"), commit,
            (tables, "merge_upsert", "read slices + UDF + Delta write (merge_upsert, table_writer spark)"),
            (preprocess, "write_montage", "montage picture")], [preprocess])
        patch_targets = [(patches, "plan", "plan: slice tasks per series on the driver (key columns, locate)"),
                         (patches, "detected_tasks", "slice tasks in Spark (table_writer spark)"), commit,
                         (tables, "merge_insert", "stacks join + UDF + Delta write (merge_insert)"),
                         (patches, "write_patch_grid", "patch grid picture")]
        meta = {"machine": machine(),
                "versions": versions(spark, ("opencv-python-headless", "opencv-python", "pandas", "pyarrow")),
                "spark": {"master": spark.sparkContext.master, "cores": cores,
                          "default_parallelism": spark.sparkContext.defaultParallelism,
                          "slices_table_files": len(list((warehouse / tables.SLICES).glob("*.parquet")))}}
        slice_files = DeltaTable(str(warehouse / tables.SLICES)).file_uris()
        works = {}
        if "candidates" in args.stages:
            detect.run(spark, config)  # the detector's candidates are the patches' input, not timed here
            fresh(warehouse / tables.PATCHES)
            # The loop's input: the work items the run is about to plan (nothing is cut yet), not timed.
            works["candidates"] = patches.plan(spark, config, "detected", None)[0]
            runs["candidates"] = timed(lambda: patches.run(spark, config, "detected"), patch_targets, [patches])
        if "features" in args.stages:
            fresh(warehouse / tables.FEATURES)
            runs["features"] = timed(lambda: features.run(spark, config), [
                (features, "_names_changed", "layout check (Spark reads the table schema)"), commit,
                (tables, "merge_upsert", "read patches + UDF + Delta write (merge_upsert, table_writer spark)")],
                [features])
            # The loop's input, kept apart: the window run below rewrites the patches table.
            kept = fresh(workdir / "loop-patches")
            shutil.copytree(warehouse / tables.PATCHES, kept)
            patch_files = DeltaTable(str(kept)).file_uris()
            spacing = tables.scan(spark, config.warehouse, tables.SERIES, ["series_uid", "spacing_mm"])
            series_mm = dict(zip(spacing.column("series_uid").to_pylist(), spacing.column("spacing_mm").to_pylist()))
        series = []
        if "window" in args.stages:
            series = [r["series_uid"] for r in tables.read(spark, config.warehouse, tables.PREPROCESSED)
                      .join(tables.read(spark, config.warehouse, tables.SLICES).select("sop_uid", "frame", "series_uid"),
                            ["sop_uid", "frame", "series_uid"])
                      .filter(F.col("mask_valid")).select("series_uid").distinct()
                      .orderBy("series_uid").limit(args.window_series).collect()]
            # Window and detected runs share the parameters hash, so slices cut as detected would be skipped.
            fresh(warehouse / tables.PATCHES)
            works["window"] = patches.plan(spark, config, "window", series)[0]
            runs["window"] = timed(lambda: patches.run(spark, config, "window", series), patch_targets, [patches])
    finally:
        spark.stop()

    # Spark is stopped, so the loops have the machine to themselves.
    sections = {}
    if "preprocess" in args.stages:
        sections["preprocess"] = section(cores, "slices", runs["preprocess"], "slices_processed",
                                         preprocess_loop(config, slice_files, workdir / "preprocess-loop.parquet"))
    if "candidates" in args.stages:
        sections["candidates"] = section(cores, "patches", runs["candidates"], "patches_total",
                                         patches_loop(config, works["candidates"], workdir / "patches-loop.parquet"))
    if "features" in args.stages:
        sections["features"] = section(cores, "patches", runs["features"], "patches_featurized",
                                       features_loop(config, patch_files, series_mm, workdir / "features-loop.parquet"))
    if "window" in args.stages:
        sections["window"] = {**section(cores, "patches", runs["window"], "patches_total",
                                        patches_loop(config, works["window"], workdir / "patches-loop.parquet")),
                              "series": len(series)}

    stamp = json.loads((workdir / "cohort" / STAMP_NAME).read_text())
    result = {
        "benchmark": "preprocess",
        **meta,
        "load_average": {"start": load_start, "end": load_average()},
        "cohort": {"files": len(files), "patients": args.patients, "slices": args.slices, "matrix": args.matrix,
                   "rle_patients": stamp.get("rle_patients"), "slices_in_table": slice_rows,
                   "generated": generated, "generate_seconds": round(generate_seconds, 1),
                   "ingested": ingested, "ingest_seconds": round(ingest_seconds, 1)},
        "warmup_seconds": round(warmup_seconds, 2),
        **sections,
        "target_ratio": TARGET_RATIO,
    }
    write_result(result, human_table(result), workdir / "preprocess.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
