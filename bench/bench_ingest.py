"""Ingestion throughput: ctlake's Spark ingestion against plain single-process loops.

    .venv/bin/python bench/bench_ingest.py --conf conf/local.yaml [--patients 16 --slices 64 --matrix 512]

1. Generates a benchmark cohort under ``<workdir>/cohort`` with ``ctlake.spark.cohort.run``
   (reused when its settings stamp matches, so repeated runs do not regenerate it).
2. Warms the session with a tiny ingest of two files into a scratch warehouse (JVM start-up,
   Delta classes and first-query compilation are not counted), then times ``ctlake.spark.ingest.run``
   over the whole cohort into a fresh scratch warehouse, with a per-stage breakdown.
3. Times plain loops over the same files: read bytes + ``ctlake.core.dicom_parse.parse_dicom`` (the same
   per-file work: read, decode, convert to HU, build records); ``pydicom.dcmread(path).pixel_array``;
   and read + ``parse_dicom`` + a durable write of the same ``slices`` rows (``SLICES_SCHEMA``
   columns, pixels as binary) to one Parquet file with pyarrow in ingestion's codec (``datafiles.PIXEL_CODEC``),
   fsynced: the work ingestion must do, minus Spark and Delta.
4. Prints ratio = ctlake throughput / (parse_dicom loop throughput x cores Spark used), the headline
   figure with its target >= 0.8, and ratio_vs_write_loop = ctlake throughput / (write loop
   throughput x cores).

Why both ratios: the parse loop is the baseline the target was set against, but it keeps nothing,
and ingestion cannot skip writing.  A slice is 0.5 MB of int16 HU that lz4 barely shrinks, and
building and writing it durably costs about as much as decoding it (on 1024 512x512 slices:
2.2 s read + decode, 3.3 s to build and write the Parquet file), so the parse loop alone would
set a bar that no ingestion keeping the data could reach.  The write loop says how much of the gap
is Spark and Delta rather than the write itself.

The last line of stdout is one JSON object with every figure; it is also written to
``<workdir>/ingest.json``.
"""
from __future__ import annotations

import argparse
import json
import os
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
from ctlake.spark.datafiles import PIXEL_CODEC

TARGET_RATIO = 0.8
WARMUP_FILES = 2
#: Codec of the write loop's Parquet file: the one ingestion writes ``slices`` with.
WRITE_LOOP_CODEC = PIXEL_CODEC


def parse_args(argv=None) -> argparse.Namespace:
    parser = job_parser("bench_ingest", __doc__)
    cohort_arguments(parser, "ingest.json")
    return parser.parse_args(argv)


def bench_config(args: argparse.Namespace) -> Settings:
    """The configuration file plus --sets/--set overrides, with the benchmark's cohort size and scratch paths."""
    return cohort_settings(args, {"warehouse": str(Path(args.workdir) / "warehouse")})


# --- stage timings --------------------------------------------------------------------------------

class IngestClock(StageClock):
    """Wall time of each step of ``ctlake.spark.ingest.run``, by wrapping the functions it calls.

    Only the benchmark patches these module attributes, and it restores them;
    the ingestion code itself is unchanged and unaware.
    """

    def __init__(self):
        from ctlake.spark import datafiles, ingest, tables

        super().__init__([
            (ingest, "check_key", "key fingerprint check"),
            (ingest, "list_files", "listing files"),
            (ingest, "_ingested_ids", "already-ingested source ids"),
            (ingest, "record_sources", "source map (restricted warehouse)"),
            (ingest, "_find_duplicates", "duplicate check"),
            (datafiles, "commit", lambda *a, **k: f"delta commit {a[2]}"),
            (ingest, "update_series", "series recompute + upsert"),
            (tables, "row_count", "table totals (Delta log)"),
            # merge_insert(spark, warehouse, table, ...): Spark's writer (table_writer: spark).
            (tables, "merge_insert", lambda *a, **k: f"merge_insert {a[2]}"),
        ])

    def __enter__(self):
        from ctlake.spark import ingest

        entered = super().__enter__()
        time_progress(self, ingest)
        return entered


# --- the measured runs ----------------------------------------------------------------------------

def timed_ingest(spark, config: Settings, input_path: str) -> tuple[dict, float, dict, dict]:
    from ctlake.spark import ingest

    with MemorySampler() as memory, IngestClock() as clock:
        started = time.perf_counter()
        summary = ingest.run(spark, config, input_path)
        seconds = time.perf_counter() - started
    return summary, seconds, clock.seconds, memory.summary()


def parse_loop(files: list[Path]) -> tuple[float, int, int]:
    """Single-process read + parse_dicom: seconds, files ok, frames."""
    from ctlake.core.deid import DEV_KEY, Pseudonymizer
    from ctlake.core.dicom_parse import Rejection, parse_dicom

    pseudonymize = Pseudonymizer(DEV_KEY)
    ok = frames = 0
    started = time.perf_counter()
    for path in files:
        result = parse_dicom(path.read_bytes(), pseudonymize)
        if not isinstance(result, Rejection):
            ok += 1
            frames += len(result)
    return time.perf_counter() - started, ok, frames


def pydicom_loop(files: list[Path]) -> tuple[float, int]:
    """Single-process ``pydicom.dcmread(path).pixel_array``: seconds and frames decoded."""
    import pydicom

    frames = 0
    started = time.perf_counter()
    for path in files:
        pixels = pydicom.dcmread(path).pixel_array
        frames += 1 if pixels.ndim == 2 else pixels.shape[0]
    return time.perf_counter() - started, frames


def write_loop(files: list[Path], target: Path, max_batch_bytes: int) -> dict:
    """Single-process read + parse_dicom + durable write of the ``slices`` rows to one Parquet file.

    The rows are the ones ingestion MERGEs into ``slices`` (frame fields, source id and size,
    ingested_at, ingest_run, key_fingerprint), cut into row groups by bytes of pixel data like its parsing
    batches, written with pyarrow in the ``slices`` codec, then fsynced with their folder.
    Returns the seconds in all, those spent building and writing Arrow tables (closing and fsync
    included), those in closing and fsync alone, files and frames written, and the file's size in MB.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyspark.sql.pandas.types import to_arrow_schema

    from ctlake.core.deid import DEV_KEY, Pseudonymizer, key_fingerprint, source_id
    from ctlake.core.dicom_parse import Rejection, parse_dicom
    from ctlake.spark import tables

    schema = to_arrow_schema(tables.SLICES_SCHEMA, timezone="UTC")
    pseudonymize = Pseudonymizer(DEV_KEY)
    fresh(target.parent).mkdir(parents=True)
    stamp = {"ingested_at": datetime.now(UTC), "ingest_run": "bench-write-loop",
             "key_fingerprint": key_fingerprint(DEV_KEY)}
    ok = frames = 0
    write_seconds = 0.0
    started = time.perf_counter()
    with open(target, "wb") as sink:
        writer = pq.ParquetWriter(sink, schema, compression=WRITE_LOOP_CODEC)
        rows, size = [], 0
        for index, path in enumerate(files):
            source = {"source_id": source_id(DEV_KEY, "file:" + str(path.resolve())), "source_size": path.stat().st_size}
            result = parse_dicom(path.read_bytes(), pseudonymize)
            if not isinstance(result, Rejection):
                ok += 1
                for record in result:
                    rows.append({**record, **source, **stamp})
                    size += len(record["pixels"])
            if rows and (size >= max_batch_bytes or index == len(files) - 1):
                write_started = time.perf_counter()
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                write_seconds += time.perf_counter() - write_started
                frames += len(rows)
                rows, size = [], 0
        fsync_started = time.perf_counter()
        writer.close()
        sink.flush()
        os.fsync(sink.fileno())
    folder = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the file's directory entry, so the file itself survives a crash
    finally:
        os.close(folder)
    fsync_seconds = time.perf_counter() - fsync_started
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "write_seconds": write_seconds + fsync_seconds, "fsync_seconds": fsync_seconds,
            "files": ok, "slices": frames, "mb": round(target.stat().st_size / 1024**2, 1)}


def parallel_write_loops(files: list[Path], folder: Path, max_batch_bytes: int, processes: int) -> dict:
    """The write loop in ``processes`` processes at once, each over its share of the files: what the cores
    give when nothing but the work runs on them (memory bandwidth, the disk and the page cache are shared).

    Seconds from the first start to the last end; no process is spawned inside the timed span.
    """
    import multiprocessing

    shares = [files[i::processes] for i in range(processes)]
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes) as pool:
        pool.map(_imported, range(processes))  # interpreters started and ctlake imported: not timed
        started = time.perf_counter()
        results = pool.starmap(write_loop, [(share, folder / f"loop-{i}" / "slices.parquet", max_batch_bytes)
                                            for i, share in enumerate(shares)])
        seconds = time.perf_counter() - started
    fresh(folder)
    return {"seconds": seconds, "processes": processes, "files": sum(r["files"] for r in results),
            "slices": sum(r["slices"] for r in results)}


def _imported(_: int) -> None:
    import ctlake.core.dicom_parse  # noqa: F401  (the loop's imports, paid before the clock starts)


def human_table(result: dict) -> str:
    m, v, c = result["machine"], result["versions"], result["cohort"]
    lines = [
        f"machine: {m['cpu']}, {result['spark']['cores']} Spark cores ({m['os_cpus']} CPUs), {m['ram_gb']} GB RAM",
        "versions: " + ", ".join(f"{k} {v[k]}" for k in ("python", "pyspark", "delta", "pydicom", "pyarrow", "java")),
        (f"load average (1/5/15 min) at start {result['load_average']['start']},"
         f" at end {result['load_average']['end']}"),
        (f"cohort: {c['files']} files, {c['patients']} patients x {c['slices']} slices at {c['matrix']}x{c['matrix']}"
         f" ({c['mb']} MB, {c['rle_patients']} RLE patients), "
         + (f"generated in {c['generate_seconds']} s" if c["generated"] else "reused")),
        (f"timing: wall clock after a warm-up ingest of {result['warmup']['files']} files into another scratch"
         f" warehouse ({result['warmup']['seconds']} s); JVM start-up and first-query compilation not counted"),
        "",
        f"{'run':<34}{'seconds':>9}{'files/s':>10}{'slices/s':>10}",
    ]
    for key, label in (("ctlake", f"ctlake ingest.run ({result['spark']['cores']} cores)"),
                       ("parse_loop", "loop: read + parse_dicom (1 core)"),
                       ("pydicom_loop", "loop: dcmread().pixel_array (1 core)"),
                       ("write_loop", "loop: parse + write Parquet (1 core)")):
        row = result[key]
        lines.append(f"{label:<34}{row['seconds']:>9.2f}{row['files_per_s']:>10.1f}{row['slices_per_s']:>10.1f}")
    para = result["parallel_write_loops"]
    label = f"{para['processes']} write loops at once"
    lines.append(f"{label:<34}{para['seconds']:>9.2f}{para['files_per_s']:>10.1f}{para['slices_per_s']:>10.1f}")
    write = result["write_loop"]
    verdict = "meets" if result["ratio"] >= TARGET_RATIO else "below"
    lines += [(f"  write loop: {write['write_seconds']:.2f} s building and writing Arrow tables"
               f" ({write['fsync_seconds']:.2f} s closing + fsync), {write['mb']} MB {WRITE_LOOP_CODEC}"),
              "", (f"ratio ctlake / (parse loop x {result['spark']['cores']} cores): {result['ratio']:.3f}"
                   f" ({verdict} the {TARGET_RATIO} target)"),
              (f"ratio_vs_write_loop ctlake / (write loop x {result['spark']['cores']} cores):"
               f" {result['ratio_vs_write_loop']:.3f}"),
              (f"the cores' own scaling: {para['processes']} loops at once / (write loop x {para['processes']}):"
               f" {result['parallel_loop_scaling']:.3f}; ctlake / loops at once: {result['ratio_vs_parallel_loops']:.3f}"),
              "", "ctlake stages (seconds):"]
    for name, seconds in result["ctlake"]["stages"].items():
        lines.append(f"  {name:<40}{seconds:>8.2f}")
    mem = result["ctlake"]["memory"]
    lines += ["", f"peak RSS during ingest (MB, sampled every {mem['sample_interval_s']} s): {memory_text(mem)}"]
    summary = result["ctlake"]["summary"]
    lines.append(f"ingest summary: {summary.get('files_ingested')} files ingested, {summary.get('slices_written')}"
                 f" slices, quarantined {summary.get('quarantined')}, accounted_for {summary.get('accounted_for')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        config = bench_config(args)
    except (ConfigError, InputError) as exc:
        print(f"bench_ingest: error: {exc}", file=sys.stderr)
        return 2

    from ctlake.spark import ingest
    from ctlake.spark.session import build_session

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    load_start = load_average()
    spark = build_session(config.spark)
    try:
        cores = spark_cores(spark)
        files, generated, generate_seconds = ensure_cohort(spark, config, workdir / "cohort")
        if not files:
            raise InputError(f"no DICOM files in {workdir / 'cohort' / 'dicom'}")

        warm_input = fresh(workdir / "warmup-input")
        warm_input.mkdir(parents=True)
        for path in files[:WARMUP_FILES]:
            shutil.copy(path, warm_input / path.name)
        warm_config = config.updated({"warehouse": str(fresh(workdir / "warmup-warehouse"))})
        started = time.perf_counter()
        ingest.run(spark, warm_config, str(warm_input.resolve()))
        warmup_seconds = time.perf_counter() - started

        bench_config_ = config.updated({"warehouse": str(fresh(workdir / "warehouse"))})
        summary, ingest_seconds, stages, memory = timed_ingest(spark, bench_config_,
                                                               str((workdir / "cohort" / "dicom").resolve()))
        files_ingested = summary.get("files_ingested", 0) + sum(summary.get("quarantined", {}).values())
        slices_written = summary.get("slices_written", 0)
        stages["other (quarantine append, table setup, summary)"] = max(0.0, ingest_seconds - sum(stages.values()))
        meta = {"machine": machine(), "versions": versions(spark, ("pyarrow",)),
                "spark": {"master": spark.sparkContext.master, "cores": cores,
                          "default_parallelism": spark.sparkContext.defaultParallelism,
                          "max_partition_bytes": config.ingest.max_partition_bytes,
                          "arrow_max_bytes_per_batch": config.ingest.arrow_max_bytes_per_batch}}
    finally:
        spark.stop()

    parse_seconds, parse_ok, parse_frames = parse_loop(files)
    dcmread_seconds, dcmread_frames = pydicom_loop(files)
    written = write_loop(files, workdir / "write-loop" / "slices.parquet",
                         config.ingest.arrow_max_bytes_per_batch)
    parallel = parallel_write_loops(files, workdir / "write-loops", config.ingest.arrow_max_bytes_per_batch, cores)

    stamp = json.loads((workdir / "cohort" / STAMP_NAME).read_text())
    ctlake_fps = files_ingested / ingest_seconds
    loop_fps = len(files) / parse_seconds
    write_loop_fps = len(files) / written["seconds"]
    result = {
        "benchmark": "ingest",
        **meta,
        "cohort": {"files": len(files), "patients": args.patients, "slices": args.slices, "matrix": args.matrix,
                   "rle_patients": stamp.get("rle_patients"),
                   "mb": round(sum(p.stat().st_size for p in files) / 1024**2, 1),
                   "generated": generated, "generate_seconds": round(generate_seconds, 1)},
        "warmup": {"files": WARMUP_FILES, "seconds": round(warmup_seconds, 2),
                   "note": "session warmed by a tiny ingest into another warehouse; not counted"},
        "ctlake": {"seconds": round(ingest_seconds, 2), "files": files_ingested, "slices": slices_written,
                   "files_per_s": rate(files_ingested, ingest_seconds),
                   "slices_per_s": rate(slices_written, ingest_seconds),
                   "stages": {k: round(v, 2) for k, v in stages.items()}, "memory": memory,
                   "summary": {k: summary.get(k) for k in ("files_ingested", "slices_written", "series_updated",
                                                           "quarantined", "accounted_for", "table_totals")}},
        "parse_loop": {"seconds": round(parse_seconds, 2), "files": parse_ok, "slices": parse_frames,
                       "files_per_s": rate(len(files), parse_seconds),
                       "slices_per_s": rate(parse_frames, parse_seconds)},
        "pydicom_loop": {"seconds": round(dcmread_seconds, 2), "files": len(files), "slices": dcmread_frames,
                         "files_per_s": rate(len(files), dcmread_seconds),
                         "slices_per_s": rate(dcmread_frames, dcmread_seconds)},
        "write_loop": {"seconds": round(written["seconds"], 2), "files": written["files"],
                       "slices": written["slices"], "files_per_s": rate(len(files), written["seconds"]),
                       "slices_per_s": rate(written["slices"], written["seconds"]),
                       "write_seconds": round(written["write_seconds"], 2),
                       "fsync_seconds": round(written["fsync_seconds"], 2), "mb": written["mb"],
                       "codec": WRITE_LOOP_CODEC},
        "ratio": round(ctlake_fps / (loop_fps * cores), 3),
        "parallel_write_loops": {"seconds": round(parallel["seconds"], 2), "processes": parallel["processes"],
                                 "files": parallel["files"], "files_per_s": rate(len(files), parallel["seconds"]),
                                 "slices_per_s": rate(parallel["slices"], parallel["seconds"])},
        "ratio_vs_write_loop": round(ctlake_fps / (write_loop_fps * cores), 3),
        # What the cores give the loop itself: 1.0 would be perfect scaling of one loop to all cores.
        "parallel_loop_scaling": round(len(files) / parallel["seconds"] / (write_loop_fps * cores), 3),
        "ratio_vs_parallel_loops": round(ctlake_fps / (len(files) / parallel["seconds"]), 3),
        "target_ratio": TARGET_RATIO,
        "load_average": {"start": load_start, "end": load_average()},
    }
    write_result(result, human_table(result), workdir / "ingest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
