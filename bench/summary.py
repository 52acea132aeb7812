"""The speed table of issue 11: every benchmark's headline figure next to its target, from their JSON results.

    .venv/bin/python bench/summary.py [data/bench]

``make bench`` runs the benchmarks first (each writes ``<workdir>/<name>.json``); this reads them and
prints one table, then for each pixel stage the three stages of its run that took the most time, so
the next person sees where the rest of the time is.  A benchmark that did not run is shown as such.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def rows(folder: Path) -> list[tuple[str, str, float | None, str, bool | None, dict | None]]:
    """(stage, workload, figure, target text, met, the run's breakdown) for every line of the table."""
    x1, rle = _load(folder / "x1" / "ingest.json"), _load(folder / "x1-rle" / "ingest.json")
    pre, sample = _load(folder / "x1" / "preprocess.json"), _load(folder / "sample" / "preprocess.json")
    scale, models = _load(folder / "scale" / "scale.json"), _load(folder / "models.json")
    out = []

    def at_least(value, target):
        return None if value is None else value >= target

    def at_most(value, target):
        return None if value is None else value <= target

    def workload(result: dict | None) -> str:
        if not result:
            return "not run"
        c = result["cohort"]
        return f"{c['patients']} x {c['slices']} slices {c['matrix']}^2"

    for result, kind in ((x1, "uncompressed"), (rle, "RLE")):
        value = result["ratio_vs_write_loop"] if result else None
        out.append((f"ingest ({kind})", workload(result), value, ">= 0.8", at_least(value, 0.8),
                    result["ctlake"]["stages"] if result else None))
    for stage, result, label in (("preprocess", pre, "preprocess"), ("candidates", sample, "candidate patches"),
                                 ("window", pre, "window patches"), ("features", sample, "features")):
        section = (result or {}).get(stage)
        value = section["ratio"] if section else None
        text = workload(result) + (f", {section['series']} series" if section and "series" in section else "")
        out.append((label, text if section else "not run", value, ">= 0.8", at_least(value, 0.8),
                    section["spark"]["stages"] if section else None))
    fixed = scale["fixed_cost"]["seconds"] if scale else None
    out.append(("fixed cost", "make ingest of one new file", fixed, "<= 15 s", at_most(fixed, 15.0), None))
    whole = scale["whole_process_ratio"] if scale else None
    size = f"{scale['files'][str(scale['factor']) + 'x']} files" if scale else "not run"
    out.append(("whole process", f"make ingest of {size}", whole, ">= 0.5", at_least(whole, 0.5), None))
    for name in ("ingest", "preprocess"):
        s = scale["scale"][name] if scale else None
        value = s["time_per_file_ratio"] if s else None
        out.append((f"scale {name}: time/file", f"{scale['factor']}x / 1x" if scale else "not run", value, "<= 1.1",
                    at_most(value, 1.1), None))
        memory = max(s["jvm_ratio"], s["workers_ratio"]) if s else None
        out.append((f"scale {name}: memory", "JVM resident, workers", memory, "<= 1.1", at_most(memory, 1.1), None))
        held = max(s["jvm_heap_ratio"], s["workers_ratio"]) if s and s.get("jvm_heap_ratio") else None
        out.append((f"scale {name}: JVM heap", "JVM heap after GC, workers", held, "<= 1.1",
                    at_most(held, 1.1), None))
    largest = max(models["runs"], key=lambda r: r["train_rows"]) if models else None
    if largest:
        fitted = [p for p in largest["svm"]["partitioned"] if not p.get("skipped")]
        best = max(fitted, key=lambda p: p["speedup"]) if fitted else None
        speedup = best["speedup"] if best else None
        ok = speedup is not None and speedup >= 10 and abs(best["auc_difference"]["difference"]) <= 0.01
        out.append(("PartitionedSVC speed-up", f"{largest['train_rows']} rows, k={best['k'] if best else '-'}",
                    speedup, ">= 10x", ok, None))
        rf = largest["rf"]
        ok = rf["ratio"] <= 1.0 and abs(rf["auc_difference"]["difference"]) <= 0.01
        out.append(("MLlib forest / sklearn", f"{largest['train_rows']} rows", rf["ratio"], "<= 1.0", ok, None))
    else:
        out += [("PartitionedSVC speed-up", "not run", None, ">= 10x", None, None),
                ("MLlib forest / sklearn", "not run", None, "<= 1.0", None, None)]
    return out


def text(folder: Path) -> str:
    table = rows(folder)
    lines = [f"{'stage':<28}{'workload':<36}{'figure':>9}  {'target':<9}verdict"]
    for stage, workload, value, target, met, _ in table:
        figure = "-" if value is None else f"{value:.3f}" if value < 100 else f"{value:.0f}"
        verdict = "not run" if met is None else "meets" if met else "MISSED"
        lines.append(f"{stage:<28}{workload:<36}{figure:>9}  {target:<9}{verdict}")
    lines.append("\nwhere each pixel stage's time went (its three largest parts, seconds):")
    for stage, _, _, _, _, breakdown in table:
        if breakdown:
            top = sorted(breakdown.items(), key=lambda item: -item[1])[:3]
            lines.append(f"  {stage:<26}" + "; ".join(f"{name} {seconds:.2f}" for name, seconds in top))
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    folder = Path(argv[0] if argv else "data/bench")
    if not folder.is_dir():
        print(f"summary: error: {folder} is not a folder of benchmark results; run make bench", file=sys.stderr)
        return 2
    print(text(folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
