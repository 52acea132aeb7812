"""Preprocessing and patch throughput: ctlake's Spark jobs against the same pure functions in a plain loop.

    .venv/bin/python bench/bench_preprocess.py --conf conf/local.yaml [--set k=v] [--patients 16 --slices 64 --matrix 512]

1. Reuses the benchmark cohort under ``<workdir>/cohort`` when its settings stamp matches (the one
   ``bench_ingest.py`` generates; else generates it with ``ctlake.spark.cohort.run``) and ingests it
   into the scratch warehouse ``<workdir>/pp-warehouse`` (reused when it already holds that cohort).
2. Warms the session: preprocess, candidate patches and window patches over a few slices in another
   scratch warehouse (JVM start-up, Delta classes, Python workers and first-query compilation are not
   counted).
3. Times, each into a freshly deleted table, with a per-stage breakdown and peak memory:
   ``ctlake.spark.preprocess.run`` (slices/s), ``ctlake.spark.patches.run`` in detected mode (patches/s) and in
   window mode over ``--window-series`` series (patches/s).
4. Stops Spark and times single-process loops of the same pure work: for preprocess, reading the
   ``slices`` files' row groups with pyarrow, ``ctlake.spark.preprocess.processed_rows`` (``hu_frame``,
   the chain, ``slice_quality``) and a Parquet write in the job's codec (the issue 11 baseline, write
   included); for patches (inputs read into the driver first, not timed), ``hu_frame`` +
   ``cut_slice_task`` per slice task.
5. Prints ratio = Spark throughput / (loop throughput x cores Spark used); target >= 0.8.

The last line of stdout is one JSON object with every figure; it is also written to
``<workdir>/preprocess.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
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
    versions,
    write_result,
)

from ctlake.cli import job_parser, setup_logging
from ctlake.config import Settings
from ctlake.errors import ConfigError, InputError

TARGET_RATIO = 0.8
WARMUP_SLICES = 8
WAREHOUSE_STAMP = "bench-cohort.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = job_parser("bench_preprocess", __doc__)
    cohort_arguments(parser, "preprocess.json")
    parser.add_argument("--window-series", type=int, default=2, metavar="N",
                        help="series covered by the window-mode run (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.window_series < 1:
        parser.error(f"--window-series must be at least 1, found {args.window_series}")
    return args


def bench_config(args: argparse.Namespace) -> Settings:
    """The configuration file plus --sets/--set overrides, with the benchmark's cohort, scratch paths and no progress logs."""
    workdir = Path(args.workdir)
    cohort = workdir / "cohort"
    return cohort_settings(args, {
        "preprocess.progress_seconds": 0, "patches.progress_seconds": 0,
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

    from ctlake.spark import detect, patches, preprocess, tables

    started = time.perf_counter()
    warm = config.updated({"warehouse": str(fresh(warehouse))})
    first = tables.read(spark, config.warehouse, tables.SLICES).agg(F.min("series_uid")).first()[0]
    (tables.read(spark, config.warehouse, tables.SLICES).filter(F.col("series_uid") == first)
     .orderBy("z_position").limit(WARMUP_SLICES).write.format("delta").save(str(warehouse / tables.SLICES)))
    preprocess.run(spark, warm)
    detect.run(spark, warm)
    patches.run(spark, warm, "detected")
    fresh(warehouse / tables.PATCHES)
    patches.run(spark, warm, "window", [first])
    return time.perf_counter() - started


# --- stage timings --------------------------------------------------------------------------------

def timed(run, targets: list[tuple[object, str, str]]) -> tuple[dict, float, dict, dict]:
    """``run()`` under the memory sampler and stage clock: summary, seconds, stages, memory."""
    with MemorySampler() as memory, StageClock(targets) as clock:
        started = time.perf_counter()
        summary = run()
        seconds = time.perf_counter() - started
    stages = {k: round(v, 2) for k, v in clock.seconds.items()}
    stages["other (reads, anti-joins, counts, summary)"] = round(max(0.0, seconds - sum(clock.seconds.values())), 2)
    return summary, seconds, stages, memory.summary()


# --- loop inputs and loops ------------------------------------------------------------------------

def slice_task_frame(spark, config: Settings, mode: str, series: list[str] | None):
    """The rows ``patches.run`` cuts (without its skip of done slices), as a list of dicts.

    Streamed one partition at a time: series volumes collected in one Arrow batch overflow the heap.
    """
    from ctlake.spark import patches

    params = config.patches.params()
    meta = patches.slice_metadata(spark, config.warehouse).cache()
    if mode == "detected":
        tasks, _ = patches.detected_tasks(spark, config, meta, None)
    else:
        tasks = patches.window_tasks(spark, config.warehouse, meta, series)
    frame = [row.asDict(recursive=True) for row in patches.job_frame(spark, config.warehouse, meta, tasks, params)
             .toLocalIterator()]
    meta.unpersist()
    return frame


def preprocess_loop(config: Settings, data_files: list[str], out: Path) -> tuple[float, float, int]:
    """Single process: read each ``slices`` row group with pyarrow, run the chain on every slice and write
    the ``preprocessed`` rows to Parquet in the job's codec; seconds, CPU seconds, slices.

    The baseline the issue fixed: the same pure per-slice work (``processed_rows``: ``hu_frame``, the
    chain, ``slice_quality``, packing) including the durable write the job cannot skip.
    """
    import cv2
    import pyarrow.parquet as pq

    from ctlake.spark import datafiles, tables
    from ctlake.spark.preprocess import INPUT_COLUMNS, processed_rows, run_stamp

    cv2.setNumThreads(1)  # one core, as each Spark task gets
    chain = config.preprocess.chain()
    stamp = run_stamp(chain)
    count = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    with pq.ParquetWriter(out, tables.arrow_schema(tables.PREPROCESSED), compression=datafiles.PIXEL_CODEC) as writer:
        for path in data_files:
            source = pq.ParquetFile(path)
            for group in range(source.num_row_groups):
                rows = processed_rows(chain, source.read_row_group(group, columns=INPUT_COLUMNS), stamp)
                writer.write_table(rows)
                count += rows.num_rows
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    out.unlink()
    return seconds, cpu, count


def cut_loop(config: Settings, rows: list[dict]) -> tuple[float, float, int]:
    """Single process: unpack each slice task (``hu_frame``) and ``cut_slice_task``; seconds, CPU seconds, patches.

    The unpacking is ``ctlake.spark.patches.cut_udf``'s own; the output rows (patch ids, bytes) are not built.
    """
    from ctlake.core.patch_tasks import row_tasks, task_patches

    params = config.patches.params()
    count = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    for row in rows:
        count += sum(len(task_patches(task, params)) for task in row_tasks(row, params))
    return time.perf_counter() - started, time.process_time() - cpu_started, count


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
        f"{'run':<46}{'seconds':>9}{'items':>8}{'items/s':>10}{'ratio':>8}{'CPU s':>9}{'items/CPU s':>13}{'CPU eff.':>10}",
    ]
    for key, label, unit in (("preprocess", "preprocess", "slices"), ("candidates", "patches: detected candidates", "patches"),
                             ("window", f"patches: window ({result['window']['series']} series)", "patches")):
        row = result[key]
        lines.append(f"{label + f' - Spark ({cores} cores)':<46}{row['spark']['seconds']:>9.2f}"
                     f"{row['spark'][unit]:>8}{row['spark'][unit + '_per_s']:>10.1f}{row['ratio']:>8.3f}"
                     f"{row['spark']['cpu_s']:>9.2f}{row['spark'][unit + '_per_cpu_s']:>13.1f}{row['cpu_efficiency']:>10.3f}")
        lines.append(f"{label + ' - loop (1 core)':<46}{row['loop']['seconds']:>9.2f}"
                     f"{row['loop'][unit]:>8}{row['loop'][unit + '_per_s']:>10.1f}{'':>8}"
                     f"{row['loop']['cpu_s']:>9.2f}{row['loop'][unit + '_per_cpu_s']:>13.1f}")
    lines += ["", f"ratio = Spark / (loop x {cores} cores); target >= {TARGET_RATIO}: " + ", ".join(
        f"{k} {'meets' if result[k]['ratio'] >= TARGET_RATIO else 'below'}" for k in ("preprocess", "candidates", "window")),
        ("CPU s = CPU seconds used (Spark: driver + JVM + Python workers); CPU eff. = (items per CPU s, Spark) /"
         " (items per CPU s, loop): what the work costs, whatever else runs on the machine")]
    for key in ("preprocess", "candidates", "window"):
        lines.append(f"\n{key} stages (seconds):")
        for name, seconds in result[key]["spark"]["stages"].items():
            lines.append(f"  {name:<52}{seconds:>8.2f}")
        mem = result[key]["spark"]["memory"]
        lines.append(f"  peak RSS MB (sampled every {mem['sample_interval_s']} s): {memory_text(mem)};"
                     f" CPU s: driver {mem['driver_python_cpu_s']}, JVM {mem['jvm_cpu_s']},"
                     f" Python workers {mem['python_worker_cpu_s']}")
    return "\n".join(lines)


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

    from ctlake.spark import datafiles, detect, patches, preprocess, tables
    from ctlake.spark.session import build_session

    load_start = load_average()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    warehouse = Path(config.warehouse)
    spark = build_session(config.spark)
    try:
        cores = spark_cores(spark)
        files, generated, generate_seconds = ensure_cohort(spark, config, workdir / "cohort")
        if not files:
            raise InputError(f"no DICOM files in {workdir / 'cohort' / 'dicom'}")
        slice_rows, ingested, ingest_seconds = ensure_slices(spark, config, workdir / "cohort", files)
        warmup_seconds = warm_up(spark, config, workdir / "pp-warmup-warehouse")

        fresh(warehouse / tables.PREPROCESSED)
        pre_summary, pre_seconds, pre_stages, pre_memory = timed(
            lambda: preprocess.run(spark, config),
            [(preprocess, "_pending", "pending keys (key columns read with delta-rs)"),
             (preprocess, "_write_files", "Spark job: workers read row groups, run the chain, write files"),
             (datafiles, "commit", "delta commit (delta-rs)"),
             (tables, "merge_upsert", "read slices + UDF + Delta write (merge_upsert, table_writer spark)"),
             (preprocess, "write_montage", "montage picture")])

        detect.run(spark, config)  # the detector's candidates are the patches' input, not timed here
        patch_targets = [(patches, "detected_tasks", "detected tasks (locate, counts)"),
                         (tables, "merge_insert", "stacks join + UDF + Delta write (merge_insert)"),
                         (patches, "write_patch_grid", "patch grid picture")]
        fresh(warehouse / tables.PATCHES)
        cand_summary, cand_seconds, cand_stages, cand_memory = timed(
            lambda: patches.run(spark, config, "detected"), patch_targets)

        series = [r["series_uid"] for r in tables.read(spark, config.warehouse, tables.PREPROCESSED)
                  .join(tables.read(spark, config.warehouse, tables.SLICES).select("sop_uid", "frame", "series_uid"),
                        ["sop_uid", "frame", "series_uid"])
                  .filter(F.col("mask_valid")).select("series_uid").distinct()
                  .orderBy("series_uid").limit(args.window_series).collect()]
        # Window and detected runs share the parameters hash, so slices cut as detected would be skipped.
        fresh(warehouse / tables.PATCHES)
        win_summary, win_seconds, win_stages, win_memory = timed(
            lambda: patches.run(spark, config, "window", series), patch_targets)

        meta = {"machine": machine(),
                "versions": versions(spark, ("opencv-python-headless", "opencv-python", "pandas", "pyarrow")),
                "spark": {"master": spark.sparkContext.master, "cores": cores,
                          "default_parallelism": spark.sparkContext.defaultParallelism,
                          "slices_table_files": len(list((warehouse / tables.SLICES).glob("*.parquet")))}}
        # Loop inputs, read into the driver once and not timed.
        slice_files = DeltaTable(str(warehouse / tables.SLICES)).file_uris()
        cand_frame = slice_task_frame(spark, config, "detected", None)
        win_frame = slice_task_frame(spark, config, "window", series)
    finally:
        spark.stop()

    # Spark is stopped, so the loops have the machine to themselves.
    loop_pre = preprocess_loop(config, slice_files, workdir / "preprocess-loop.parquet")
    loop_cand = cut_loop(config, cand_frame)
    loop_win = cut_loop(config, win_frame)

    def section(unit: str, spark_count: int, spark_seconds: float, stages: dict, memory: dict, summary: dict,
                loop: tuple[float, float, int], tasks: int | None = None) -> dict:
        loop_seconds, loop_cpu, loop_count = loop
        spark_cpu = round(memory["driver_python_cpu_s"] + memory["jvm_cpu_s"] + memory["python_worker_cpu_s"], 2)
        return {"spark": {"seconds": round(spark_seconds, 2), unit: spark_count,
                          f"{unit}_per_s": rate(spark_count, spark_seconds), "cpu_s": spark_cpu,
                          f"{unit}_per_cpu_s": rate(spark_count, spark_cpu),
                          "stages": stages, "memory": memory, "summary": summary},
                "loop": {"seconds": round(loop_seconds, 2), unit: loop_count, f"{unit}_per_s": rate(loop_count, loop_seconds),
                         "cpu_s": round(loop_cpu, 2), f"{unit}_per_cpu_s": rate(loop_count, loop_cpu),
                         **({"slice_tasks": tasks} if tasks is not None else {})},
                "ratio": round(spark_count / spark_seconds / (loop_count / loop_seconds * cores), 3)
                if spark_seconds > 0 and loop_count and loop_seconds > 0 else 0.0,
                # Independent of other load on the machine: CPU spent per item by the loop / by Spark.
                "cpu_efficiency": round((spark_count / spark_cpu) / (loop_count / loop_cpu), 3)
                if spark_cpu > 0 and loop_count and loop_cpu > 0 else 0.0}

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
        "preprocess": section("slices", pre_summary["slices_processed"], pre_seconds, pre_stages, pre_memory,
                              pre_summary, loop_pre),
        "candidates": section("patches", cand_summary["patches_total"], cand_seconds, cand_stages, cand_memory,
                              cand_summary, loop_cand, len(cand_frame)),
        "window": {**section("patches", win_summary["patches_total"], win_seconds, win_stages, win_memory,
                             win_summary, loop_win, len(win_frame)),
                   "series": len(series)},
        "target_ratio": TARGET_RATIO,
    }
    write_result(result, human_table(result), workdir / "preprocess.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
