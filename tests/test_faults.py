"""A driver killed with SIGKILL at each step of ingestion, and the runs after it: real processes, real tables.

Each job runs as a user runs it (``jobs/ingest.py`` in its own process, local
mode) and dies at a named kill point (``ctlake.spark.faults``); the tables are read
back with delta-rs, independently of Spark and of ctlake.
"""
from __future__ import annotations

import signal
from pathlib import Path

from dicom_files import build_mixed_folder, copies_of_a_real_ct
from job_runs import job_command, job_env, run, start, summary_of, table_rows

from ctlake.spark import tables
from ctlake.spark.faults import KILL_AT


def state(tmp_path: Path) -> dict:
    """What a reader sees: slice keys (all and distinct), quarantined files, series rows, runs by status."""
    keys = table_rows(tmp_path, tables.SLICES, ["sop_uid", "frame"])
    runs = [status for (status,) in table_rows(tmp_path, tables.INGEST_RUNS, ["status"])]
    return {"slices": len(keys), "distinct": len(set(keys)),
            "quarantine": len(table_rows(tmp_path, tables.QUARANTINE, ["source_id"])),
            "series": len(table_rows(tmp_path, tables.SERIES, ["series_uid"])),
            "runs": {s: runs.count(s) for s in sorted(set(runs))}}


def unreferenced_files(tmp_path: Path, table: str) -> set[str]:
    """Data files in the table's folder that no version of its log names (a killed writer's)."""
    from deltalake import DeltaTable

    folder = tmp_path / "warehouse" / table
    delta = DeltaTable(str(folder))
    named = set()
    for version in range(delta.version() + 1):
        delta.load_as_version(version)
        named |= {Path(p).name for p in delta.file_uris()}
    return {p.name for p in folder.glob("*.parquet")} - named


def test_a_driver_killed_at_each_step_of_ingest_leaves_consistent_tables_and_a_rerun_finishes(tmp_path):
    expected = build_mixed_folder(tmp_path / "input" / "mixed")
    copies_of_a_real_ct(tmp_path / "input" / "ct", 60, "driver-kill")
    frames = 60 + sum(int(o.split(":")[1]) for o in expected.values() if o.startswith("slices:"))
    quarantined = sum(not o.startswith("slices:") for o in expected.values())
    command = job_command("ingest", tmp_path, f"ingest.input={tmp_path / 'input'}")

    def killed_at(point: str) -> dict:
        result = run(command, job_env(**{KILL_AT: point}))
        assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
        return state(tmp_path)

    # While parsing (the kill lands 2 s into the parse-and-write job), and just before the slices commit:
    # Delta's log hides every file the run wrote.
    assert killed_at("ingest.parse:2") == {"slices": 0, "distinct": 0, "quarantine": 0, "series": 0,
                                           "runs": {"running": 1}}
    assert killed_at("ingest.slices_commit") == {"slices": 0, "distinct": 0, "quarantine": 0, "series": 0,
                                                 "runs": {"running": 2}}
    orphans = unreferenced_files(tmp_path, tables.SLICES)
    assert orphans, "the killed writers left no data files: the kills landed before the workers wrote"
    # After the slices commit, before the quarantine write: the slices are whole, once each.
    assert killed_at("ingest.quarantine_write") == {"slices": frames, "distinct": frames, "quarantine": 0,
                                                    "series": 0, "runs": {"running": 3}}
    # The next run quarantines the rest and dies before the series update.
    assert killed_at("ingest.series_update") == {"slices": frames, "distinct": frames, "quarantine": quarantined,
                                                 "series": 0, "runs": {"running": 4}}
    # A run with no new files finishes the work: the series table, exactly.
    final = summary_of(run(command))
    assert (final["new_files"], final["already_ingested"], final["slices_written"]) == (0, len(expected) + 60, 0)
    after = state(tmp_path)
    assert after == {"slices": frames, "distinct": frames, "quarantine": quarantined, "series": final["series_updated"],
                     "runs": {"running": 4, "succeeded": 1}}
    per_series = {}
    for (series,) in table_rows(tmp_path, tables.SLICES, ["series_uid"]):
        per_series[series] = per_series.get(series, 0) + 1
    assert dict(table_rows(tmp_path, tables.SERIES, ["series_uid", "slice_count"])) == per_series
    # Every file is in exactly one table.
    sources = {s for (s,) in table_rows(tmp_path, tables.SOURCE_MAP, ["source_id"], warehouse="restricted")}
    sliced = {s for (s,) in table_rows(tmp_path, tables.SLICES, ["source_id"])}
    held = {s for (s,) in table_rows(tmp_path, tables.QUARANTINE, ["source_id"])}
    assert len(sources) == len(expected) + 60 and sliced | held == sources and not sliced & held

    # Maintenance reclaims what the killed writers left, and only that.
    vacuum = summary_of(run(job_command("maintain", tmp_path, "maintenance.retain_hours=0")))
    assert vacuum["files_deleted"][tables.SLICES] >= len(orphans)
    assert not unreferenced_files(tmp_path, tables.SLICES) & orphans
    assert state(tmp_path) == after
    assert len(table_rows(tmp_path, tables.INGEST_RUNS, ["run_id"])) == 5


def outcomes(tmp_path: Path, root: Path) -> dict[str, str]:
    """{path under ``root``: slices:<frames> or quarantine reason}, through the restricted source map."""
    names = {s: str(Path(p.removeprefix("file:")).relative_to(root))
             for s, p in table_rows(tmp_path, tables.SOURCE_MAP, ["source_id", "source_path"], "restricted")}
    result = {}
    for (source,) in table_rows(tmp_path, tables.SLICES, ["source_id"]):
        frames = int(result.get(names[source], "slices:0").split(":")[1])
        result[names[source]] = f"slices:{frames + 1}"
    for source, reason in table_rows(tmp_path, tables.QUARANTINE, ["source_id", "reason"]):
        assert names[source] not in result, f"{names[source]} is in both slices and quarantine"
        result[names[source]] = reason
    return result


def test_two_ingests_then_two_preprocess_runs_started_together_all_succeed_and_write_everything_once(tmp_path):
    """Overlapping inputs into a new warehouse (both runs create its tables), as overlapping cron runs do."""
    root = tmp_path / "input"
    shared = {f"shared/{n}": o for n, o in build_mixed_folder(root / "shared").items()}
    copies_of_a_real_ct(root / "own", 30, "concurrent")
    expected = {**shared, **{f"own/slice_{i:04d}.dcm": "slices:1" for i in range(30)}}
    ingests = [start(job_command("ingest", tmp_path, f"ingest.input={root}")),
               start(job_command("ingest", tmp_path, f"ingest.input={root / 'shared'}"))]
    whole, part = (summary_of(job) for job in ingests)
    assert outcomes(tmp_path, root) == expected
    keys = table_rows(tmp_path, tables.SLICES, ["sop_uid", "frame"])
    assert len(keys) == len(set(keys)) == sum(int(o.split(":")[1]) for o in expected.values() if ":" in o)
    # Each run accounts for each of its files: ingested by it, by the other run, or quarantined.
    for summary, files in ((whole, len(expected)), (part, len(shared))):
        assert summary["status"] == "succeeded" and summary["accounted_for"] and summary["files_seen"] == files
    assert whole["files_ingested"] + part["files_ingested"] == sum(":" in o for o in expected.values())
    again = summary_of(run(job_command("ingest", tmp_path, f"ingest.input={root}")))
    assert (again["new_files"], again["series_updated"]) == (0, 0)

    preprocess = [start(job_command("preprocess", tmp_path)) for _ in range(2)]
    first, second = (summary_of(job) for job in preprocess)
    processed = table_rows(tmp_path, tables.PREPROCESSED, ["sop_uid", "frame"])
    assert sorted(processed) == sorted(keys)
    assert first["status"] == second["status"] == "succeeded"


def test_a_streaming_run_killed_in_a_micro_batch_is_replayed_by_the_next_exactly_once(tmp_path):
    """The kill lands before the first micro-batch's slices commit; Spark's checkpoint replays that batch."""
    expected = build_mixed_folder(tmp_path / "input" / "mixed")
    copies_of_a_real_ct(tmp_path / "input" / "ct", 30, "stream-kill")
    frames = 30 + sum(int(o.split(":")[1]) for o in expected.values() if o.startswith("slices:"))
    files = len(expected) + 30
    command = job_command("ingest", tmp_path, f"ingest.input={tmp_path / 'input'}", "ingest.stream_max_files=16")
    command.append("--stream")
    killed = run(command, job_env(**{KILL_AT: "ingest.slices_commit"}))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert state(tmp_path)["slices"] == 0
    final = summary_of(run(command))
    # Nothing new was queued: the killed run had queued every file; the replay and the rest ingest them once.
    assert (final["files_queued"], final["batches"], final["new_files"], final["accounted_for"]) == (
        0, -(-files // 16), files, True)
    series = {s for (s,) in table_rows(tmp_path, tables.SLICES, ["series_uid"])}
    assert state(tmp_path) == {"slices": frames, "distinct": frames, "quarantine": files - final["files_ingested"],
                               "series": len(series), "runs": {"running": 1, "succeeded": 1}}
