"""What the benchmarks share: arguments and settings, the machine line, versions, Spark's cores, the
cached cohort, stage timings, memory peaks and the result's JSON line.

Every benchmark reports the machine, the memory and its result the same way by importing these.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ctlake.cli import overrides
from ctlake.config import load_settings

if TYPE_CHECKING:
    from ctlake.config import Settings

#: Settings that decide the cohort's bytes; the stamp records them so a match can be reused.
STAMP_KEYS = ("patients", "slices", "matrix", "seed", "no_nodule_fraction", "rle_fraction", "consensus_level")
STAMP_NAME = "bench-settings.json"


# --- machine and versions -------------------------------------------------------------------------

def machine() -> dict:
    """CPU model, logical CPUs, RAM (GB) and platform, read from /proc where available."""
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


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine skews every figure."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def versions(spark, extra: tuple[str, ...] = ()) -> dict:
    """Versions of Python, Spark, Delta, Java and the numeric libraries (plus ``extra`` distributions)."""
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    found = {"python": platform.python_version(), "pyspark": version("pyspark"), "spark": spark.version,
             "delta": version("delta-spark"), "pydicom": version("pydicom"), "numpy": version("numpy"),
             "pylibjpeg": version("pylibjpeg"),
             "java": spark._jvm.java.lang.System.getProperty("java.version")}
    found.update({dist: version(dist) for dist in extra})
    return found


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


# --- arguments and settings -----------------------------------------------------------------------

def cohort_arguments(parser: argparse.ArgumentParser, result_file: str) -> None:
    """``--patients``, ``--slices``, ``--matrix`` (the benchmark cohort) and ``--workdir`` (its scratch folder)."""
    parser.add_argument("--patients", type=int, default=16, help="patients in the cohort (default: %(default)s)")
    parser.add_argument("--slices", type=int, default=64, help="slices per patient (default: %(default)s)")
    parser.add_argument("--matrix", type=int, default=512, help="rows and columns per slice (default: %(default)s)")
    parser.add_argument("--workdir", default="data/bench", metavar="PATH",
                        help=f"scratch folder for the cohort, warehouses and {result_file} (default: %(default)s)")


def cohort_settings(args: argparse.Namespace, changes: dict[str, Any]) -> Settings:
    """The configuration file plus --sets/--set overrides, with the cohort of ``cohort_arguments`` and ``changes``.

    Ingest progress logs are off; the LIDC database is checked too, so a ConfigError comes before Spark starts.
    """
    from ctlake.spark.cohort import lidc_db

    # Benchmarks ingest copies of their cohort (outside its marked folder) into scratch warehouses:
    # a throwaway key of their own, unless the environment gives one.
    os.environ.setdefault("CTLAKE_PSEUDONYM_KEY", secrets.token_hex(32))
    settings = load_settings(args.conf, overrides(args)).updated({
        "cohort.patients": args.patients, "cohort.slices": args.slices, "cohort.matrix": args.matrix,
        "ingest.progress_seconds": 0, "privacy.restricted_warehouse": str(Path(args.workdir) / "restricted"),
        **changes})
    lidc_db(settings.cohort)
    return settings


# --- cohort ---------------------------------------------------------------------------------------

def ensure_cohort(spark, settings: Settings, folder: Path) -> tuple[list[Path], bool, float]:
    """The cohort's DICOM files, whether they were generated now, and the generation seconds.

    Reused when ``<folder>/bench-settings.json`` records the same settings and file count.
    """
    from ctlake.spark.cohort import run as make_cohort

    plan = settings.cohort.plan()
    wanted = {key: getattr(plan, key) for key in STAMP_KEYS}
    stamp = folder / STAMP_NAME
    if stamp.is_file():
        recorded = json.loads(stamp.read_text())
        files = sorted((folder / "dicom").rglob("*.dcm"))
        if recorded.get("settings") == wanted and recorded.get("files") == len(files):
            return files, False, 0.0
    stamp.unlink(missing_ok=True)
    started = time.perf_counter()
    summary = make_cohort(spark, settings, folder)
    seconds = time.perf_counter() - started
    files = sorted((folder / "dicom").rglob("*.dcm"))
    stamp.write_text(json.dumps({"settings": wanted, "files": len(files), "rle_patients": summary["rle_patients"]},
                                indent=1) + "\n")
    return files, True, seconds


def fresh(path: Path) -> Path:
    """``path`` removed (a scratch folder or table about to be rewritten)."""
    shutil.rmtree(path, ignore_errors=True)
    return path


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 2) if seconds > 0 else 0.0


# --- stage timings --------------------------------------------------------------------------------

class StageClock:
    """Wall time spent in named module functions while the ``with`` block runs.

    The benchmark wraps the attributes and restores them on exit; the jobs' code is unchanged and
    unaware.  ``targets`` is a list of (module, attribute, label); a label is a string, or a function
    of the call's arguments that returns one.
    """

    def __init__(self, targets: list[tuple[object, str, str | Callable[..., str]]]):
        self.targets = targets
        self.seconds: dict[str, float] = {}
        self._restore: list[tuple[object, str, object]] = []

    def add(self, label: str, seconds: float) -> None:
        self.seconds[label] = self.seconds.get(label, 0.0) + seconds

    def replace(self, owner, attribute: str, value) -> None:
        """``owner.attribute`` set to ``value`` until the block ends."""
        self._restore.append((owner, attribute, getattr(owner, attribute)))
        setattr(owner, attribute, value)

    def _timed(self, original, label):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.add(label if isinstance(label, str) else label(*args, **kwargs), time.perf_counter() - started)

        return timed

    def __enter__(self):
        for owner, attribute, label in self.targets:
            self.replace(owner, attribute, self._timed(getattr(owner, attribute), label))
        return self

    def __exit__(self, *exc_info):
        for owner, attribute, original in reversed(self._restore):
            setattr(owner, attribute, original)
        self._restore.clear()


def time_progress(clock: StageClock, module, label: str | None = None) -> None:
    """Time every ``StageProgress`` block of ``module`` (a job's Spark jobs) into ``clock`` while it is entered.

    Labelled ``label``, or the block's own label.
    """
    original = module.StageProgress

    class TimedProgress(original):
        def __enter__(self):
            self._bench_started = time.perf_counter()
            return super().__enter__()

        def __exit__(self, *exc_info):
            clock.add(label or self.label, time.perf_counter() - self._bench_started)
            return super().__exit__(*exc_info)

    clock.replace(module, "StageProgress", TimedProgress)


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


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds the process has used so far (not its children)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, ValueError, IndexError):
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
    workers share pages with the daemon, so the sum overstates a little.  The
    driver's own VmHWM (kernel-tracked peak since it started, not sampled) is
    reported too.

    It also adds up the CPU seconds each kind of process used inside the block
    (the last sample minus the first): on a shared machine, CPU seconds per item
    say what the work costs when wall time is inflated by other processes.  A
    worker that exits between two samples loses up to one interval of CPU.
    """

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peaks_kb: dict[int, int] = {}
        self.kinds: dict[int, str] = {}
        self.workers_sum_peak_kb = 0
        self.cpu_first: dict[int, float] = {}
        self.cpu_last: dict[int, float] = {}
        self._first_sample = True
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
            self._sample()
            if self._stop.wait(self.interval):
                self._sample()  # the last figures, taken when the block ends
                return

    def _sample(self) -> None:
        workers_kb = 0
        for pid, kind in self._classify().items():
            rss = _status_kb(pid, "VmRSS")
            if rss is None:  # ended between listing and reading
                continue
            self.kinds[pid] = kind
            self.peaks_kb[pid] = max(self.peaks_kb.get(pid, 0), rss)
            if kind == "python_worker":
                workers_kb += rss
            cpu = _cpu_seconds(pid)
            if cpu is not None:
                # A process already running at the first sample counts from there; a later one from zero.
                self.cpu_first.setdefault(pid, cpu if self._first_sample else 0.0)
                self.cpu_last[pid] = cpu
        self._first_sample = False
        self.workers_sum_peak_kb = max(self.workers_sum_peak_kb, workers_kb)

    def cpu_seconds(self) -> dict:
        """CPU seconds used inside the block by the driver, the JVM and the Python workers."""
        totals = {"driver_python": 0.0, "jvm": 0.0, "python_worker": 0.0}
        for pid, last in self.cpu_last.items():
            kind = self.kinds.get(pid)
            if kind in totals:
                totals[kind] += last - self.cpu_first.get(pid, 0.0)
        return {f"{kind}_cpu_s": round(value, 2) for kind, value in totals.items()}

    def summary(self) -> dict:
        def peak(kind: str) -> float | None:
            values = [kb for pid, kb in self.peaks_kb.items() if self.kinds.get(pid) == kind]
            return round(max(values) / 1024, 1) if values else None

        workers = [pid for pid, kind in self.kinds.items() if kind == "python_worker"]
        hwm = _status_kb(os.getpid(), "VmHWM")
        return {
            "driver_python_peak_rss_mb": peak("driver_python"),
            "driver_python_hwm_mb": round(hwm / 1024, 1) if hwm else None,
            "jvm_peak_rss_mb": peak("jvm"),
            "python_worker_peak_rss_mb": peak("python_worker"),
            "python_workers_sum_peak_rss_mb": round(self.workers_sum_peak_kb / 1024, 1) if workers else None,
            "python_worker_processes_seen": len(workers),
            "sample_interval_s": self.interval,
            **self.cpu_seconds(),
        }


def memory_text(mem: dict) -> str:
    """The peak-RSS figures of a :class:`MemorySampler` summary, in one human line fragment (MB)."""
    return (f"driver python {mem['driver_python_peak_rss_mb']}, JVM {mem['jvm_peak_rss_mb']}, largest python worker"
            f" {mem['python_worker_peak_rss_mb']}, all python workers {mem['python_workers_sum_peak_rss_mb']}"
            f" ({mem['python_worker_processes_seen']} processes)")


# --- result ---------------------------------------------------------------------------------------

def write_result(result: dict, text: str, path: Path) -> None:
    """The human table, then ``result`` as one JSON object: the last line of stdout, also written to ``path``."""
    print(text)
    line = json.dumps(result, default=str)
    path.write_text(line + "\n")
    print(line)
    sys.stdout.flush()
