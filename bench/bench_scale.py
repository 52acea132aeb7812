"""Fixed cost, whole process and scale: ctlake's jobs as a user runs them, command to exit.

    .venv/bin/python bench/bench_scale.py --conf conf/local.yaml [--patients 12 --slices 200 --matrix 512]
        [--factor 4] [--workdir data/bench/scale]

Every figure here is a whole process started the way ``make ingest`` / ``make preprocess`` start it
(``python jobs/<job>.py --conf ...``): JVM start-up, Delta's log replay, planning and the summary are
all counted, as a user waits for them.

1. Generates (or reuses, by settings stamp) two cohorts of the same kind: ``1x`` (``--patients``) and
   ``Nx`` (``--factor`` times the patients).
2. ``ingest`` of the 1x files into a fresh warehouse, then ``preprocess``; the same for the Nx files
   in another; each with peak memory of the JVM and the Python workers (sampled every 0.2 s), and
   the JVM's heap after each garbage collection (its GC log): the memory the job holds, where the
   resident peak also follows how far G1 let the heap grow before collecting.
3. Fixed cost: ``ingest`` of one new file (a copy of an Nx file, so new to the 1x warehouse) into the
   1x warehouse's existing tables.
4. The ingest write loop of ``bench_ingest.py`` (read + ``parse_dicom`` + durable pyarrow write) over
   the Nx files, started as its own process: ``python bench/bench_scale.py --loop FOLDER``.
5. Prints: fixed cost (target <= 15 s); whole process = ctlake files/s / (cores x the loop process's
   files/s) on the Nx files (target >= 0.5); scale = time per file at Nx / at 1x, for ingest and
   preprocess (target <= 1.1), and peak JVM (resident and heap after GC) and Python-worker memory
   at Nx / at 1x (target <= 1.1).

The last line of stdout is one JSON object with every figure; it is also written to
``<workdir>/scale.json``.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import (
    MemorySampler,
    cohort_arguments,
    cohort_settings,
    ensure_cohort,
    fresh,
    load_average,
    machine,
    rate,
    spark_cores,
    write_result,
)

from ctlake.cli import job_parser, setup_logging
from ctlake.errors import ConfigError, InputError

TARGETS = {"fixed_cost_s": 15.0, "whole_process_ratio": 0.5, "time_per_file_ratio": 1.1, "memory_ratio": 1.1}
ROOT = Path(__file__).resolve().parent.parent
#: A G1 pause in ``-Xlog:gc``: ``GC(7) Pause Young (Normal) (G1 Evacuation Pause) 120M->35M(256M) 4.1ms``.
GC_PAUSE = re.compile(r"Pause .*? (\d+)M->(\d+)M\((\d+)M\)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = job_parser("bench_scale", __doc__)
    cohort_arguments(parser, "scale.json")
    parser.add_argument("--factor", type=int, default=4, help="size of the larger cohort, in 1x cohorts "
                                                              "(default: %(default)s)")
    parser.add_argument("--loop", metavar="FOLDER", help=argparse.SUPPRESS)
    parser.set_defaults(patients=12, slices=200, matrix=512, workdir="data/bench/scale")
    args = parser.parse_args(argv)
    if args.factor < 2:
        parser.error(f"--factor must be at least 2, found {args.factor}")
    return args


def job(name: str, args: argparse.Namespace, sets: dict, extra: tuple[str, ...] = ()) -> list[str]:
    """The command line ``make <name>`` runs, with the benchmark's overrides."""
    command = [sys.executable, str(ROOT / "jobs" / f"{name}.py"), "--conf", args.conf, "--sets", args.sets]
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    return command + list(extra)


def heap_after_gc_mb(gc_log: Path) -> float | None:
    """The largest heap in use right after a collection, over the JVM's life (MB); None if it never collected."""
    if not gc_log.is_file():
        return None
    after = [int(m.group(2)) for m in GC_PAUSE.finditer(gc_log.read_text(errors="replace"))]
    return float(max(after)) if after else None


def with_gc_log(command: list[str], java_options: str, gc_log: Path) -> list[str]:
    """``command`` with the driver JVM logging its collections to ``gc_log`` (its other options kept)."""
    gc_log.unlink(missing_ok=True)
    options = f"{java_options} -Xlog:gc:file={gc_log.resolve()}".strip()
    return command + ["--set", f"spark.conf.spark.driver.extraJavaOptions={options}"]


def timed_process(command: list[str], log: Path, gc_log: Path | None = None) -> dict:
    """Run ``command`` to its exit (stderr to ``log``): seconds, peak memory, its last stdout line."""
    with MemorySampler() as memory, open(log, "w") as errors:
        started = time.perf_counter()
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=errors, text=True, cwd=ROOT)
        seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise InputError(f"{' '.join(command[1:3])} failed with exit code {done.returncode}; see {log}")
    mem = memory.summary()
    return {"seconds": round(seconds, 2), "jvm_peak_rss_mb": mem["jvm_peak_rss_mb"],
            "python_workers_sum_peak_rss_mb": mem["python_workers_sum_peak_rss_mb"],
            "python_worker_peak_rss_mb": mem["python_worker_peak_rss_mb"],
            "jvm_heap_after_gc_mb": heap_after_gc_mb(gc_log) if gc_log else None,
            "summary": done.stdout.strip().splitlines()[-1] if done.stdout.strip() else None}


def loop_main(folder: str) -> int:
    """``--loop FOLDER``: the ingest write loop over the folder's files, as its own process."""
    from bench_ingest import write_loop

    files = sorted(Path(folder).rglob("*.dcm"))
    written = write_loop(files, Path(folder).parent / "write-loop" / "slices.parquet", 32 * 2**20)
    shutil.rmtree(Path(folder).parent / "write-loop", ignore_errors=True)
    print(f"{written['files']} files, {written['slices']} slices in {written['seconds']:.2f} s")
    return 0


def human_table(result: dict) -> str:
    m, r, t = result["machine"], result, TARGETS
    one, many = r["runs"]["1x"], r["runs"][f"{r['factor']}x"]
    lines = [
        f"machine: {m['cpu']}, {r['cores']} Spark cores ({m['os_cpus']} CPUs), {m['ram_gb']} GB RAM; load average"
        f" at start {r['load_average']['start']}, at end {r['load_average']['end']}",
        f"cohorts: 1x {r['files']['1x']} files, {r['factor']}x {r['files'][str(r['factor']) + 'x']} files"
        f" ({r['cohort']['slices']} slices per patient at {r['cohort']['matrix']}x{r['cohort']['matrix']});"
        " every run is a whole process, command to exit", "",
        f"{'run':<40}{'seconds':>9}{'files/s':>10}{'JVM MB':>9}{'heap MB':>9}{'workers MB':>12}",
    ]
    for size, runs in (("1x", one), (f"{r['factor']}x", many)):
        for name in ("ingest", "preprocess"):
            run = runs[name]
            lines.append(f"{name + ' ' + size:<40}{run['seconds']:>9.2f}{run['files_per_s']:>10.1f}"
                         f"{run['jvm_peak_rss_mb'] or 0:>9.0f}{run['jvm_heap_after_gc_mb'] or 0:>9.0f}"
                         f"{run['python_workers_sum_peak_rss_mb'] or 0:>12.0f}")
    loop = r["loop_process"]
    lines += [f"{'write loop process ' + str(r['factor']) + 'x (1 core)':<40}{loop['seconds']:>9.2f}"
              f"{loop['files_per_s']:>10.1f}",
              f"{'ingest of one new file (existing tables)':<40}{r['fixed_cost']['seconds']:>9.2f}", "",
              f"fixed cost {r['fixed_cost']['seconds']:.1f} s (target <= {t['fixed_cost_s']:.0f} s)",
              f"whole process {r['whole_process_ratio']:.3f} = ctlake / ({r['cores']} x loop process)"
              f" (target >= {t['whole_process_ratio']})"]
    for name in ("ingest", "preprocess"):
        s = r["scale"][name]
        lines.append(f"scale {name}: time per file {s['time_per_file_ratio']:.3f}, JVM resident {s['jvm_ratio']:.3f},"
                     f" JVM heap after GC {s['jvm_heap_ratio']:.3f}, Python workers {s['workers_ratio']:.3f}"
                     f" ({r['factor']}x / 1x; target <= {t['memory_ratio']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.loop:
        return loop_main(args.loop)
    setup_logging()
    workdir = Path(args.workdir)
    try:
        configs = {"1x": cohort_settings(args, {}),
                   f"{args.factor}x": cohort_settings(args, {"cohort.patients": args.patients * args.factor})}
    except (ConfigError, InputError) as exc:
        print(f"bench_scale: error: {exc}", file=sys.stderr)
        return 2
    from ctlake.spark.session import build_session

    load_start = load_average()
    workdir.mkdir(parents=True, exist_ok=True)
    spark = build_session(configs["1x"].spark)
    try:
        cores = spark_cores(spark)
        files = {size: ensure_cohort(spark, config, workdir / size / "cohort")[0] for size, config in configs.items()}
    finally:
        spark.stop()

    runs = {}
    java_options = configs["1x"].spark.conf.get("spark.driver.extraJavaOptions", "")
    common_sets = {"ingest.progress_seconds": 0, "preprocess.progress_seconds": 0,
                   "privacy.restricted_warehouse": str(workdir / "restricted"),
                   "report.folder": str(workdir / "report")}
    for size in configs:
        warehouse = fresh(workdir / size / "warehouse")
        sets = {**common_sets, "warehouse": warehouse}
        dicom = str((workdir / size / "cohort" / "dicom").resolve())
        runs[size] = {name: timed_process(with_gc_log(job(name, args, sets, extra), java_options,
                                                      workdir / size / f"{name}.gc.log"),
                                          workdir / size / f"{name}.log", workdir / size / f"{name}.gc.log")
                      for name, extra in (("ingest", ("--input", dicom)), ("preprocess", ()))}
        for run in runs[size].values():
            run["files_per_s"] = rate(len(files[size]), run["seconds"])

    one_new = fresh(workdir / "one-new-file")
    one_new.mkdir(parents=True)
    big = f"{args.factor}x"
    shutil.copy(files[big][-1], one_new / files[big][-1].name)
    fixed = timed_process(job("ingest", args, {**common_sets, "warehouse": workdir / "1x" / "warehouse"},
                              ("--input", str(one_new.resolve()))), workdir / "one-new-file.log")
    loop = timed_process([sys.executable, str(Path(__file__).resolve()), "--loop",
                          str((workdir / big / "cohort" / "dicom").resolve())], workdir / "loop.log")
    loop["files_per_s"] = rate(len(files[big]), loop["seconds"])

    def ratio(name: str, key: str) -> float:
        low, high = runs["1x"][name][key], runs[big][name][key]
        return round(high / low, 3) if low and high else 0.0

    scale = {name: {"time_per_file_ratio": round((runs[big][name]["seconds"] / len(files[big]))
                                                 / (runs["1x"][name]["seconds"] / len(files["1x"])), 3),
                    "jvm_ratio": ratio(name, "jvm_peak_rss_mb"),
                    "jvm_heap_ratio": ratio(name, "jvm_heap_after_gc_mb"),
                    "workers_ratio": ratio(name, "python_workers_sum_peak_rss_mb")} for name in ("ingest", "preprocess")}
    result = {
        "benchmark": "scale", "machine": machine(), "cores": cores, "factor": args.factor,
        "cohort": {"patients": args.patients, "slices": args.slices, "matrix": args.matrix},
        "files": {size: len(found) for size, found in files.items()},
        "load_average": {"start": load_start, "end": load_average()},
        "runs": runs, "fixed_cost": fixed, "loop_process": loop,
        "whole_process_ratio": round(runs[big]["ingest"]["files_per_s"] / (cores * loop["files_per_s"]), 3),
        "scale": scale, "targets": TARGETS,
    }
    write_result(result, human_table(result), workdir / "scale.json")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except InputError as exc:
        print(f"bench_scale: error: {exc}", file=sys.stderr)
        sys.exit(1)
