"""Ingestion throughput: ctlake's Spark ingestion against a plain single-process pydicom loop.

    .venv/bin/python bench/bench_ingest.py --conf conf/local.yaml [--patients 16 --slices 64 --matrix 512]

1. Generates a benchmark cohort under ``<workdir>/cohort`` with ``ctlake.cohort.job.run``
   (reused when its settings stamp matches, so repeated runs do not regenerate it).
2. Warms the session with a tiny ingest of two files into a scratch warehouse (JVM start-up,
   Delta classes and first-query compilation are not counted), then times ``ctlake.ingest.run``
   over the whole cohort into a fresh scratch warehouse, with a per-stage breakdown.
3. Times a plain loop over the same files: read bytes + ``ctlake.dicom.parse_dicom`` (the same
   per-file work: read, decode, convert to HU, build records), and ``pydicom.dcmread(path).pixel_array``.
4. Prints ratio = ctlake throughput / (parse_dicom loop throughput x cores Spark used); target >= 0.8.

The last line of stdout is one JSON object with every figure; it is also written to
``<workdir>/ingest.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

from ctlake import config as cfg
from ctlake.cli import job_parser, setup_logging
from ctlake.config import load_config, with_value
from ctlake.errors import ConfigError, InputError

TARGET_RATIO = 0.8
#: Settings that decide the cohort's bytes; the stamp records them so a match can be reused.
STAMP_KEYS = ("patients", "slices", "matrix", "seed", "no_nodule_fraction", "rle_fraction", "consensus_level")
STAMP_NAME = "bench-settings.json"
WARMUP_FILES = 2


def parse_args(argv=None) -> argparse.Namespace:
    parser = job_parser("bench_ingest", __doc__)
    parser.add_argument("--patients", type=int, default=16, help="patients in the cohort (default: %(default)s)")
    parser.add_argument("--slices", type=int, default=64, help="slices per patient (default: %(default)s)")
    parser.add_argument("--matrix", type=int, default=512, help="rows and columns per slice (default: %(default)s)")
    parser.add_argument("--workdir", default="data/bench", metavar="PATH",
                        help="scratch folder for the cohort, warehouses and ingest.json (default: %(default)s)")
    return parser.parse_args(argv)


def bench_config(args: argparse.Namespace) -> dict:
    """The configuration file plus --set overrides, with the benchmark's cohort size and scratch paths."""
    config = load_config(args.conf, args.overrides)
    workdir = Path(args.workdir)
    for key, value in (("cohort.patients", args.patients), ("cohort.slices", args.slices),
                       ("cohort.matrix", args.matrix), ("ingest.progress_seconds", 0)):
        config = with_value(config, key, value)
    config = with_value(config, "warehouse", str(workdir / "warehouse"))
    return config


# --- machine and versions ------------------------------------------------------------------------

def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gb = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return {"cpu": cpu, "os_cpus": os.cpu_count(), "ram_gb": ram_gb, "platform": platform.platform()}


def versions(spark) -> dict:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "pyspark": version("pyspark"), "spark": spark.version,
            "delta": version("delta-spark"), "pydicom": version("pydicom"), "numpy": version("numpy"),
            "pylibjpeg": version("pylibjpeg"),
            "java": spark._jvm.java.lang.System.getProperty("java.version")}


def spark_cores(spark) -> int:
    """Task slots Spark runs at once: N of local[N], the JVM's processors for local[*], else defaultParallelism."""
    master = spark.sparkContext.master
    if master.startswith("local"):
        inside = master[master.find("[") + 1:master.find("]")] if "[" in master else "1"
        first = inside.split(",")[0].strip()
        if first == "*":
            return int(spark._jvm.java.lang.Runtime.getRuntime().availableProcessors())
        return int(first)
    return int(spark.sparkContext.defaultParallelism)


# --- cohort ---------------------------------------------------------------------------------------

def ensure_cohort(spark, config: dict, folder: Path) -> tuple[list[Path], bool, float]:
    """The cohort's DICOM files, whether they were generated now, and the generation seconds."""
    from ctlake.cohort.job import run as make_cohort
    from ctlake.cohort.job import settings_from_config

    settings = settings_from_config(config)
    wanted = {key: getattr(settings, key) for key in STAMP_KEYS}
    stamp = folder / STAMP_NAME
    if stamp.is_file():
        recorded = json.loads(stamp.read_text())
        files = sorted((folder / "dicom").rglob("*.dcm"))
        if recorded.get("settings") == wanted and recorded.get("files") == len(files):
            return files, False, 0.0
    stamp.unlink(missing_ok=True)
    started = time.perf_counter()
    summary = make_cohort(spark, config, folder)
    seconds = time.perf_counter() - started
    files = sorted((folder / "dicom").rglob("*.dcm"))
    stamp.write_text(json.dumps({"settings": wanted, "files": len(files), "rle_patients": summary["rle_patients"]},
                                indent=1) + "\n")
    return files, True, seconds


# --- memory sampling ------------------------------------------------------------------------------

def _status_kb(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command name) for every visible process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
            # comm is in parentheses and may contain spaces; the parent pid is the 2nd field after it.
            comm = stat[stat.find("(") + 1:stat.rfind(")")]
            table[int(entry)] = (int(stat[stat.rfind(")") + 2:].split()[1]), comm)
        except (OSError, ValueError, IndexError):  # the process ended while being read
            continue
    return table


class MemorySampler:
    """Peak resident memory of the driver, the JVM and the Python workers while the ``with`` block runs.

    Polls /proc (no psutil): every ``interval`` seconds it finds this process's
    descendants, classifies them (``java`` = the Spark JVM, python processes
    under it = pyspark.daemon and its forked workers) and keeps the largest
    VmRSS seen per process and the largest sum over the workers.  Forked
    workers share pages with the daemon, so the sum overstates a little.
    """

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peaks_kb: dict[int, int] = {}
        self.kinds: dict[int, str] = {}
        self.workers_sum_peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join(timeout=5)

    def _classify(self) -> dict[int, str]:
        table = _process_table()
        me = os.getpid()
        kinds = {me: "driver_python"}
        changed = True
        while changed:
            changed = False
            for pid, (ppid, comm) in table.items():
                if pid in kinds or ppid not in kinds:
                    continue
                parent_kind = kinds[ppid]
                if comm == "java":
                    kinds[pid] = "jvm"
                elif parent_kind in ("jvm", "python_worker") and comm.startswith("python"):
                    kinds[pid] = "python_worker"
                else:
                    kinds[pid] = "other"
                changed = True
        return kinds

    def _loop(self) -> None:
        while True:
            workers_kb = 0
            for pid, kind in self._classify().items():
                rss = _status_kb(pid, "VmRSS")
                if rss is None:  # ended between listing and reading
                    continue
                self.kinds[pid] = kind
                self.peaks_kb[pid] = max(self.peaks_kb.get(pid, 0), rss)
                if kind == "python_worker":
                    workers_kb += rss
            self.workers_sum_peak_kb = max(self.workers_sum_peak_kb, workers_kb)
            if self._stop.wait(self.interval):
                return

    def summary(self) -> dict:
        def peak(kind: str) -> float | None:
            values = [kb for pid, kb in self.peaks_kb.items() if self.kinds.get(pid) == kind]
            return round(max(values) / 1024, 1) if values else None

        workers = [pid for pid, kind in self.kinds.items() if kind == "python_worker"]
        return {
            "driver_python_peak_rss_mb": peak("driver_python"),
            "jvm_peak_rss_mb": peak("jvm"),
            "python_worker_peak_rss_mb": peak("python_worker"),
            "python_workers_sum_peak_rss_mb": round(self.workers_sum_peak_kb / 1024, 1) if workers else None,
            "python_worker_processes_seen": len(workers),
            "sample_interval_s": self.interval,
        }


# --- stage timings --------------------------------------------------------------------------------

class StageClock:
    """Wall time of each step of ``ctlake.ingest.run``, by wrapping the functions it calls.

    Only the benchmark patches these module attributes, and it restores them;
    the ingestion code itself is unchanged and unaware.
    """

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._restore: list[tuple[object, str, object]] = []

    def _add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def _wrap(self, owner, attribute: str, name_of) -> None:
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._add(name_of(*args, **kwargs), time.perf_counter() - started)

        self._restore.append((owner, attribute, original))
        setattr(owner, attribute, timed)

    def __enter__(self):
        from ctlake import ingest, tables

        clock = self

        class TimedProgress(ingest.StageProgress):
            def __enter__(self):
                self._bench_started = time.perf_counter()
                return super().__enter__()

            def __exit__(self, *exc_info):
                clock._add(self.label.replace("ingest: ", ""), time.perf_counter() - self._bench_started)
                return super().__exit__(*exc_info)

        self._restore.append((ingest, "StageProgress", ingest.StageProgress))
        ingest.StageProgress = TimedProgress
        self._wrap(ingest, "list_files", lambda *a, **k: "listing files")
        self._wrap(ingest, "_ingested_paths", lambda *a, **k: "already-ingested paths")
        self._wrap(ingest, "_find_duplicates", lambda *a, **k: "duplicate check")
        self._wrap(ingest, "update_series", lambda *a, **k: "series recompute + merge")
        self._wrap(ingest, "_totals", lambda *a, **k: "table totals (counts)")
        # merge_insert(spark, config, table, ...): the slices call is also inside "writing slices".
        self._wrap(tables, "merge_insert", lambda *a, **k: f"merge_insert {a[2]}")
        return self

    def __exit__(self, *exc_info):
        for owner, attribute, original in reversed(self._restore):
            setattr(owner, attribute, original)


# --- the measured runs ----------------------------------------------------------------------------

def timed_ingest(spark, config: dict, input_path: str) -> tuple[dict, float, dict, dict]:
    from ctlake import ingest

    with MemorySampler() as memory, StageClock() as clock:
        started = time.perf_counter()
        summary = ingest.run(spark, config, input_path)
        seconds = time.perf_counter() - started
    return summary, seconds, clock.seconds, memory.summary()


def parse_loop(files: list[Path]) -> tuple[float, int, int]:
    """Single-process read + parse_dicom: seconds, files ok, frames."""
    from ctlake.deid import DEV_KEY, Pseudonymizer
    from ctlake.dicom import Rejection, parse_dicom

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


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 2) if seconds > 0 else 0.0


def human_table(result: dict) -> str:
    m, v, c = result["machine"], result["versions"], result["cohort"]
    lines = [
        f"machine: {m['cpu']}, {result['spark']['cores']} Spark cores ({m['os_cpus']} CPUs), {m['ram_gb']} GB RAM",
        "versions: " + ", ".join(f"{k} {v[k]}" for k in ("python", "pyspark", "delta", "pydicom", "java")),
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
                       ("pydicom_loop", "loop: dcmread().pixel_array (1 core)")):
        row = result[key]
        lines.append(f"{label:<34}{row['seconds']:>9.2f}{row['files_per_s']:>10.1f}{row['slices_per_s']:>10.1f}")
    verdict = "meets" if result["ratio"] >= TARGET_RATIO else "below"
    lines += ["", (f"ratio ctlake / (parse loop x {result['spark']['cores']} cores): {result['ratio']:.3f}"
                   f" ({verdict} the {TARGET_RATIO} target)"), "", "ctlake stages (seconds):"]
    for name, seconds in result["ctlake"]["stages"].items():
        lines.append(f"  {name:<40}{seconds:>8.2f}")
    mem = result["ctlake"]["memory"]
    lines += ["", ("peak RSS during ingest (MB, sampled every "
                   f"{mem['sample_interval_s']} s): driver python {mem['driver_python_peak_rss_mb']},"
                   f" JVM {mem['jvm_peak_rss_mb']}, largest python worker {mem['python_worker_peak_rss_mb']},"
                   f" all python workers {mem['python_workers_sum_peak_rss_mb']}"
                   f" ({mem['python_worker_processes_seen']} processes)")]
    summary = result["ctlake"]["summary"]
    lines.append(f"ingest summary: {summary.get('files_ingested')} files ingested, {summary.get('slices_written')}"
                 f" slices, quarantined {summary.get('quarantined')}, accounted_for {summary.get('accounted_for')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        config = bench_config(args)
        from ctlake.cohort.job import db_path_from_config, settings_from_config

        settings_from_config(config)
        db_path_from_config(config)
    except (ConfigError, InputError) as exc:
        print(f"bench_ingest: error: {exc}", file=sys.stderr)
        return 2

    from ctlake import ingest
    from ctlake.session import build_session

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spark = build_session(config)
    try:
        cores = spark_cores(spark)
        files, generated, generate_seconds = ensure_cohort(spark, config, workdir / "cohort")
        if not files:
            raise InputError(f"no DICOM files in {workdir / 'cohort' / 'dicom'}")

        warm_input = fresh(workdir / "warmup-input")
        warm_input.mkdir(parents=True)
        for path in files[:WARMUP_FILES]:
            shutil.copy(path, warm_input / path.name)
        warm_config = with_value(config, "warehouse", str(fresh(workdir / "warmup-warehouse")))
        started = time.perf_counter()
        ingest.run(spark, warm_config, str(warm_input.resolve()))
        warmup_seconds = time.perf_counter() - started

        bench_config_ = with_value(config, "warehouse", str(fresh(workdir / "warehouse")))
        summary, ingest_seconds, stages, memory = timed_ingest(spark, bench_config_,
                                                               str((workdir / "cohort" / "dicom").resolve()))
        files_ingested = summary.get("files_ingested", 0) + sum(summary.get("quarantined", {}).values())
        slices_written = summary.get("slices_written", 0)
        stages["other (known-path read, quarantine rows, summary)"] = max(0.0, ingest_seconds - sum(
            s for name, s in stages.items() if name != "merge_insert slices"))
        meta = {"machine": machine(), "versions": versions(spark),
                "spark": {"master": spark.sparkContext.master, "cores": cores,
                          "default_parallelism": spark.sparkContext.defaultParallelism,
                          "max_partition_bytes": cfg.get(config, "ingest.max_partition_bytes", (str, int), "64m"),
                          "arrow_max_bytes_per_batch": cfg.get(config, "ingest.arrow_max_bytes_per_batch",
                                                               (str, int), "32m")}}
    finally:
        spark.stop()

    parse_seconds, parse_ok, parse_frames = parse_loop(files)
    dcmread_seconds, dcmread_frames = pydicom_loop(files)

    stamp = json.loads((workdir / "cohort" / STAMP_NAME).read_text())
    ctlake_fps = files_ingested / ingest_seconds
    loop_fps = len(files) / parse_seconds
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
        "ratio": round(ctlake_fps / (loop_fps * cores), 3),
        "target_ratio": TARGET_RATIO,
    }
    print(human_table(result))
    line = json.dumps(result, default=str)
    (workdir / "ingest.json").write_text(line + "\n")
    print(line)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
