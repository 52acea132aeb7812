"""Ingestion on a real local Spark session into real Delta tables."""
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest
from delta.tables import DeltaTable
from dicom_files import build_hostile_folder, build_mixed_folder, pydicom_test_folder, real
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual

from ctlake.core.deid import DEV_KEY, IDENTIFYING_ATTRIBUTES, SYNTHETIC_MARKER, key_fingerprint, source_id
from ctlake.errors import ConfigError, InputError
from ctlake.spark import datafiles, ingest, ingest_stream, tables


def outcomes(spark, config):
    """{file name: slices:<frames> or quarantine reason}, through the restricted source map."""
    names = {r["source_id"]: r["source_path"].rsplit("/", 1)[-1] for r in
             tables.read(spark, config.privacy.restricted_warehouse, tables.SOURCE_MAP).collect()}
    sliced = tables.read(spark, config.warehouse, tables.SLICES).groupBy("source_id").count().collect()
    quarantined = tables.read(spark, config.warehouse, tables.QUARANTINE).select("source_id", "reason").collect()
    result = {names[r["source_id"]]: f"slices:{r['count']}" for r in sliced}
    for r in quarantined:
        name = names[r["source_id"]]
        assert name not in result, f"{name} is in both slices and quarantine"
        result[name] = r["reason"]
    return result


def headers(folder):
    """The header of every file in ``folder`` that pydicom can read at all."""
    for path in folder.iterdir():
        try:
            yield pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            continue


@pytest.fixture
def mixed(tmp_path):
    folder = tmp_path / "input"
    return folder, build_mixed_folder(folder)


def test_every_file_lands_in_exactly_one_table_with_the_expected_outcome(spark, config, mixed):
    folder, expected = mixed
    summary = ingest.run(spark, config, str(folder))
    assert outcomes(spark, config) == expected
    assert summary["files_seen"] == summary["new_files"] == len(expected)
    assert summary["slices_written"] == 6
    assert summary["files_ingested"] + sum(summary["quarantined"].values()) == len(expected)
    assert summary["quarantined"] == {"bad_geometry": 1, "duplicate": 2, "no_pixel_data": 1, "not_ct": 1,
                                      "not_dicom": 2, "truncated": 1}
    ids = {r["source_path"].rsplit("/", 1)[-1]: r["source_id"] for r in
           tables.read(spark, config.privacy.restricted_warehouse, tables.SOURCE_MAP).collect()}
    dup = tables.read(spark, config.warehouse, tables.QUARANTINE).filter(F.col("source_id") == ids["693_UNCR.dcm"]).first()
    assert dup["message"].endswith(f"already ingested from source {ids['693_J2KR.dcm']}")


def test_rerun_writes_nothing_and_new_files_add_exactly_their_rows(spark, config, mixed):
    folder, expected = mixed
    ingest.run(spark, config, str(folder))
    versions = {t: DeltaTable.forPath(spark, tables.table_path(config.warehouse, t)).history(1).first()["version"]
                for t in (tables.SLICES, tables.QUARANTINE, tables.SERIES)}

    again = ingest.run(spark, config, str(folder))
    assert (again["new_files"], again["slices_written"], again["quarantined"]) == (0, 0, {})
    assert {t: DeltaTable.forPath(spark, tables.table_path(config.warehouse, t)).history(1).first()["version"]
            for t in versions} == versions

    shutil.copy(real("693_UNCI.dcm"), folder / "later.dcm")
    later = ingest.run(spark, config, str(folder))
    assert (later["new_files"], later["files_ingested"], later["slices_written"]) == (1, 1, 1)
    assert outcomes(spark, config) == {**expected, "later.dcm": "slices:1"}


def test_each_run_records_itself_in_ingest_runs(spark, config, mixed, tmp_path):
    folder, expected = mixed
    first = ingest.run(spark, config, str(folder))
    latest = {t: tables.version(spark, config.warehouse, t) for t in (tables.SLICES, tables.QUARANTINE, tables.SERIES)}
    second = ingest.run(spark, config, str(folder))
    other_key = tmp_path / "other.key"
    other_key.write_text("b" * 64)
    with pytest.raises(InputError):
        ingest.run(spark, config.updated({"privacy.key_file": str(other_key)}), str(folder))
    runs = {r["run_id"]: r.asDict() for r in tables.read(spark, config.warehouse, tables.INGEST_RUNS).collect()}
    assert len(runs) == 3 and {first["run_id"], second["run_id"]} < set(runs)
    done = runs[first["run_id"]]
    assert (done["mode"], done["status"], done["files_seen"], done["new_files"], done["files_ingested"],
            done["slices_written"], done["unaccounted"], done["error"]) == (
        "batch", "succeeded", len(expected), len(expected), first["files_ingested"], 6, 0, None)
    assert done["quarantined"] == first["quarantined"] and done["ended_at"] > done["started_at"]
    # A new warehouse: the run created each table (version 0) and committed its rows.
    assert done["versions_written"] == {t: list(range(v + 1)) for t, v in latest.items()}
    again = runs[second["run_id"]]
    assert (again["status"], again["new_files"], again["already_ingested"], again["versions_written"]) == (
        "succeeded", 0, len(expected), {})
    (failed,) = [r for r in runs.values() if r["status"] == "failed"]
    assert failed["error"].startswith("InputError: the slices table was pseudonymized under key")
    assert failed["ended_at"] is not None and failed["files_seen"] is None


def test_a_run_without_new_files_repairs_a_stale_series_table(spark, config, mixed):
    """As after a run killed between its slices commit and its series update."""
    folder, _ = mixed
    ingest.run(spark, config, str(folder))
    summarized = tables.read(spark, config.warehouse, tables.SERIES).drop("updated_at")
    complete = spark.createDataFrame(summarized.collect(), summarized.schema)
    tables.replace(spark, config.warehouse, tables.SERIES, complete.filter("slice_count > 1").withColumn(
        "updated_at", F.lit(None).cast("timestamp")))  # one series missing, the rest never summarized
    repair = ingest.run(spark, config, str(folder))
    assert (repair["new_files"], repair["series_updated"]) == (0, complete.count())
    assertDataFrameEqual(tables.read(spark, config.warehouse, tables.SERIES).drop("updated_at"), complete)
    assert ingest.run(spark, config, str(folder))["series_updated"] == 0


def test_series_table_describes_layout(spark, config, mixed):
    folder, _ = mixed
    ingest.run(spark, config, str(folder))
    series = {r["series_uid"]: r for r in tables.read(spark, config.warehouse, tables.SERIES).collect()}
    ect = pydicom.dcmread(real("eCT_Supplemental.dcm"), stop_before_pixels=True)
    row = series[str(ect.SeriesInstanceUID)]
    assert row["slice_count"] == 2 and row["consistent_geometry"]
    assert len(series) == tables.read(spark, config.warehouse, tables.SLICES).select("series_uid").distinct().count()


def test_no_identifying_value_reaches_any_table(spark, config, mixed):
    folder, _ = mixed
    ingest.run(spark, config, str(folder))
    secrets = set()
    for ds in headers(folder):
        for keyword in IDENTIFYING_ATTRIBUTES:
            value = ds.get(keyword) if keyword in ds else None
            if value not in (None, "") and len(str(value)) >= 4 and not str(value).isdigit():
                secrets.add(str(value))
    assert {"CompressedSamples^CT1", "JFK IMAGING CENTER", "Perfusion^MCA Stroke"} <= secrets
    for table in (tables.SLICES, tables.SERIES, tables.QUARANTINE):
        df = tables.read(spark, config.warehouse, table)
        text_columns = [f.name for f in df.schema.fields if f.dataType.simpleString() == "string"]
        for row in df.select(*text_columns).collect():
            blob = "|".join(str(v) for v in row)
            assert not [s for s in secrets if s in blob], f"identifying value in {table}"


def test_whole_pydicom_test_folder_is_accounted_for(spark, config):
    folder = pydicom_test_folder()
    summary = ingest.run(spark, config, str(folder))
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert summary["files_seen"] == len(files)
    assert summary["accounted_for"]
    assert summary["files_ingested"] + sum(summary["quarantined"].values()) == len(files)


def test_missing_input_is_a_clear_error(spark, config, tmp_path):
    with pytest.raises(InputError, match="input path not found"):
        ingest.run(spark, config, str(tmp_path / "nowhere"))


def test_partitioned_prefixes_and_a_manifest_ingest_what_one_folder_does(spark, config, mixed, tmp_path):
    folder, expected = mixed
    days = tmp_path / "days"
    for i, name in enumerate(sorted(expected)):  # a file's duplicate stays after it in path order
        (days / f"day{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / name, days / f"day{i % 2}" / name)
    # The same prefix twice and a glob inside another input add nothing.
    summary = ingest.run(spark, config, [str(days / "day1"), str(days / "day0"), str(days / "day0"),
                                         str(days / "day0" / "*.dcm")])
    assert outcomes(spark, config) == expected
    assert (summary["files_seen"], summary["accounted_for"], summary["walk_skipped"]) == (
        len(expected), True, {"overlapping_input": 1})

    other = config.updated({"warehouse": str(tmp_path / "w2"), "privacy.restricted_warehouse": str(tmp_path / "r2")})
    lines = ["# from the scanner's export", ""]
    for i, name in enumerate(sorted(expected)):
        path = folder / name
        lines.append(f"{path},{path.stat().st_size}" if i % 2 else f"file://{path}" if i % 3 else str(path))
    lines.append(str(folder / "never-written.dcm"))
    (tmp_path / "manifest.txt").write_text("\n".join(lines) + "\n")
    summary = ingest.run(spark, other, manifest=str(tmp_path / "manifest.txt"))
    assert outcomes(spark, other) == expected
    assert (summary["files_seen"], summary["accounted_for"], summary["walk_skipped"]) == (
        len(expected), True, {"missing_file": 1})
    # A manifest names files as the walk does: the folder holds nothing new.
    assert ingest.run(spark, other, str(folder))["new_files"] == 0
    with pytest.raises(ConfigError, match="--input or --manifest, not both"):
        ingest.run(spark, other, str(folder), manifest=str(tmp_path / "manifest.txt"))
    with pytest.raises(InputError, match="cannot read the manifest"):
        ingest.run(spark, other, manifest=str(tmp_path / "no-manifest.txt"))


MIXED_QUARANTINE = {"bad_geometry": 1, "duplicate": 2, "no_pixel_data": 1, "not_ct": 1, "not_dicom": 2, "truncated": 1}


def test_scheduled_streaming_runs_ingest_what_arrived_since_the_last_one_exactly_once(spark, config, mixed):
    folder, expected = mixed
    stream = config.updated({"ingest.stream_max_files": 4})
    first = ingest.run(spark, stream, str(folder), mode="stream")
    assert outcomes(spark, config) == expected  # what a batch run gives, duplicates across micro-batches included
    assert (first["mode"], first["files_seen"], first["files_queued"], first["new_files"], first["batches"],
            first["slices_written"], first["quarantined"], first["accounted_for"]) == (
        "stream", len(expected), len(expected), len(expected), -(-len(expected) // 4), 6, MIXED_QUARANTINE, True)
    versions = {t: tables.version(spark, config.warehouse, t) for t in (tables.SLICES, tables.QUARANTINE)}

    nothing = ingest.run(spark, stream, str(folder), mode="stream")
    assert (nothing["files_queued"], nothing["batches"], nothing["new_files"], nothing["already_ingested"]) == (
        0, 0, 0, len(expected))
    assert {t: tables.version(spark, config.warehouse, t) for t in versions} == versions

    # One file arrives; another was queued by a run killed before its micro-batch (queued, never streamed).
    shutil.copy(real("693_UNCI.dcm"), folder / "later.dcm")
    queued = folder.parent / "queued.dcm"
    shutil.copy(real("CT_small.dcm"), queued)
    restricted = config.privacy.restricted_warehouse
    path = f"file:{queued}"
    ingest_stream.enqueue(spark, restricted, [(source_id(config.privacy.key(), path), path, queued.stat().st_size)],
                          "killed", 4)
    later = ingest.run(spark, stream, str(folder), mode="stream")
    assert (later["files_queued"], later["new_files"], later["files_ingested"], later["batches"]) == (1, 2, 1, 2)
    assert outcomes(spark, config) == {**expected, "later.dcm": "slices:1", "queued.dcm": "duplicate"}
    entries = tables.read(spark, restricted, tables.INGEST_QUEUE).orderBy("entry").select("entry").collect()
    assert [r["entry"] for r in entries] == list(range(1, len(expected) + 3))
    runs = tables.read(spark, config.warehouse, tables.INGEST_RUNS).select("mode", "status", "new_files").collect()
    assert sorted(tuple(r) for r in runs) == sorted(
        [("stream", "succeeded", len(expected)), ("stream", "succeeded", 0), ("stream", "succeeded", 2)])


def test_a_second_streaming_run_on_the_same_checkpoint_is_refused(spark, config, mixed):
    folder, _ = mixed
    checkpoint = ingest_stream.checkpoint_location(None, config.privacy.restricted_warehouse)
    with ingest_stream.checkpoint_lock(spark, checkpoint):
        with pytest.raises(InputError, match="another streaming ingest holds the checkpoint"):
            ingest.run(spark, config, str(folder), mode="stream")
    with pytest.raises(ConfigError, match="streaming ingest needs privacy.restricted_warehouse"):
        ingest.validate(config.updated({"privacy.restricted_warehouse": None}), [str(folder)], mode="stream")


def test_local_listing_sees_every_file_in_binaryfile_path_form(spark, tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.dcm", ".hidden.dcm", "_underscore.dcm", "sub/b.dcm"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "empty.dcm").write_bytes(b"")
    expected = sorted(f"file:{tmp_path}/{n}" for n in ("a.dcm", ".hidden.dcm", "_underscore.dcm", "sub/b.dcm",
                                                       "empty.dcm"))
    assert [f.path for f in ingest.list_files(spark, str(tmp_path)).files] == expected
    assert [f.path for f in ingest.list_files(spark, f"file://{tmp_path}").files] == expected
    assert [f.path for f in ingest.list_files(spark, f"{tmp_path}/{{a,sub}}*").files] == [expected[2], expected[4]]
    seen = spark.read.format("binaryFile").load(str(tmp_path / "a.dcm")).select("path").first()["path"]
    assert seen == expected[2]
    assert {f.length for f in ingest.list_files(spark, str(tmp_path)).files} == {0, 1}


def test_a_walk_through_link_loops_and_dead_links_ends_and_counts_them(spark, config, tmp_path):
    folder = tmp_path / "input"
    (folder / "a").mkdir(parents=True)
    shutil.copy(real("CT_small.dcm"), folder / "a" / "ct.dcm")
    (folder / "a" / "up").symlink_to(folder)                 # a loop through an ancestor
    (folder / "self").symlink_to(folder / "self")            # a link to itself: ELOOP on stat
    (folder / "gone").symlink_to(tmp_path / "missing.dcm")   # a dead link
    (folder / "again.dcm").symlink_to(folder / "a" / "ct.dcm")  # the same file by another name
    summary = ingest.run(spark, config, str(folder))
    assert summary["walk_skipped"] == {"broken_link": 2, "same_file": 1, "symlink_loop": 1}
    assert (summary["files_seen"], summary["files_ingested"], summary["accounted_for"]) == (1, 1, True)


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not bind root")
def test_unreadable_folders_and_files_are_counted_and_read_once_they_can_be(spark, config, tmp_path):
    folder = tmp_path / "input"
    (folder / "locked").mkdir(parents=True)
    shutil.copy(real("CT_small.dcm"), folder / "locked" / "ct.dcm")
    shutil.copy(real("693_J2KR.dcm"), folder / "private.dcm")
    (folder / "locked").chmod(0)
    (folder / "private.dcm").chmod(0)
    try:
        summary = ingest.run(spark, config, str(folder))
        assert summary["walk_skipped"] == {"unreadable_file": 1, "unreadable_folder": 1}
        assert summary["files_seen"] == 0
    finally:
        (folder / "locked").chmod(0o755)
        (folder / "private.dcm").chmod(0o644)
    assert ingest.run(spark, config, str(folder))["files_ingested"] == 2


def test_hostile_files_end_in_quarantine_with_their_reasons(spark, config, tmp_path):
    folder = tmp_path / "hostile"
    expected = build_hostile_folder(folder)
    summary = ingest.run(spark, config, str(folder))
    assert outcomes(spark, config) == expected
    assert summary["accounted_for"] and summary["files_ingested"] == 0


def test_rows_name_the_key_of_their_pseudonyms_and_another_key_is_refused(spark, config, mixed, tmp_path):
    folder, _ = mixed
    summary = ingest.run(spark, config, str(folder))
    fingerprint = key_fingerprint(config.privacy.key())
    assert (summary["key_fingerprint"], summary["development_key"]) == (fingerprint, False)
    for table in (tables.SLICES, tables.QUARANTINE):
        assert {r[0] for r in tables.read(spark, config.warehouse, table).select("key_fingerprint").collect()} == {
            fingerprint}
    other = tmp_path / "other.key"
    other.write_text("o" * 64)
    with pytest.raises(InputError, match=f"pseudonymized under key {fingerprint} and this run's key is k-"):
        ingest.run(spark, config.updated({"privacy.key_file": str(other)}), str(folder))


def test_the_sample_cohort_alone_is_pseudonymized_with_the_development_key_and_says_so(
        spark, ingested_cohort, tmp_path, caplog):
    dev = ingested_cohort.updated({"privacy.key_file": None, "warehouse": str(tmp_path / "warehouse")})
    cohort_folder = Path(ingested_cohort.cohort.output)
    assert (cohort_folder / SYNTHETIC_MARKER).is_file()
    with caplog.at_level(logging.WARNING, logger="ctlake.ingest"):
        summary = ingest.run(spark, dev, str(cohort_folder / "dicom"))
    assert summary["development_key"] and summary["key_fingerprint"] == key_fingerprint(DEV_KEY)
    assert [r.message for r in caplog.records if "development key" in r.message] == [
        f"pseudonymizing with the public development key ({key_fingerprint(DEV_KEY)}): acceptable for the "
        "synthetic sample cohort only"]
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(cohort_folder / "dicom", elsewhere)
    with pytest.raises(ConfigError, match="development key is only for a synthetic cohort"):
        ingest.run(spark, dev, str(elsewhere))


def test_replaced_uids_keep_series_whole_and_duplicates_found_without_any_archive_uid(spark, config, mixed):
    folder, expected = mixed
    replaced = config.updated({"privacy.uids": "replace"})
    summary = ingest.run(spark, replaced, str(folder))
    assert outcomes(spark, replaced) == expected and summary["quarantined"]["duplicate"] == 2
    archive = set()
    for ds in headers(folder):
        archive |= {str(ds.get(k)) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                             "FrameOfReferenceUID") if ds.get(k)}
    assert len(archive) > 10
    for table in (tables.SLICES, tables.SERIES, tables.QUARANTINE):
        for row in tables.read(spark, replaced.warehouse, table).drop("pixels").collect():
            assert not archive & {str(v) for v in row}, table
    slices = tables.read(spark, replaced.warehouse, tables.SLICES)
    assert slices.filter(~F.col("series_uid").startswith("2.25.")).count() == 0
    assert tables.read(spark, replaced.warehouse, tables.SERIES).count() == slices.select("series_uid").distinct().count()


def test_a_parsing_worker_cannot_allocate_beyond_its_address_space():
    code = ("import numpy as np\nfrom ctlake.spark.ingest import cap_address_space\ncap_address_space(3 * 2**30)\n"
            "try:\n    np.ones(4 * 2**30, dtype=np.uint8)\n    print('allocated')\n"
            "except MemoryError:\n    print('MemoryError')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "MemoryError", done.stderr


def test_spark_alone_gives_the_same_tables_as_the_direct_writer_and_driver_reads(spark, config, mixed, tmp_path,
                                                                                  monkeypatch):
    """What a warehouse on ``s3a:`` gets (Spark's writer, every read a Spark job) against a mounted one."""
    folder, expected = mixed
    spark_config = config.updated({"table_writer": "spark", "warehouse": str(tmp_path / "spark-warehouse"),
                                   "privacy.restricted_warehouse": str(tmp_path / "spark-restricted")})
    direct = ingest.run(spark, config, str(folder))
    with monkeypatch.context() as unmounted:
        unmounted.setattr(tables, "local_folder", lambda *_: None)
        by_spark = ingest.run(spark, spark_config, str(folder))
    assert outcomes(spark, config) == outcomes(spark, spark_config) == expected
    for key in ("files_ingested", "slices_written", "quarantined", "series_updated", "table_totals"):
        assert direct[key] == by_spark[key]
    stamps = ["ingested_at", "ingest_run", "quarantined_at", "updated_at"]

    def rows(settings, table):
        frame = tables.read(spark, settings.warehouse, table)
        return frame.drop(*[c for c in stamps if c in frame.columns])

    for table in (tables.SLICES, tables.QUARANTINE, tables.SERIES):
        assertDataFrameEqual(rows(config, table), rows(spark_config, table))


def test_a_run_that_loses_the_commit_race_checks_again_and_adds_nothing_twice(spark, config, mixed, monkeypatch):
    """Another ingest of the same files commits between this run's checks and its commit."""
    folder, expected = mixed
    commit = datafiles.commit
    raced = []

    def commit_after_a_rival(spark_, warehouse, table, files, version, operation):
        if table == tables.SLICES and not raced:
            raced.append(None)
            raced[0] = ingest.run(spark, config, str(folder))  # the rival: a whole run, committed first
        return commit(spark_, warehouse, table, files, version, operation)

    monkeypatch.setattr(datafiles, "commit", commit_after_a_rival)
    late = ingest.run(spark, config, str(folder))
    assert outcomes(spark, config) == expected
    assert late["ingested_elsewhere"] == raced[0]["files_ingested"] == late["files_ingested"] + late[
        "ingested_elsewhere"]
    assert tables.read(spark, config.warehouse, tables.SLICES).count() == raced[0]["slices_written"]
    slices_folder = Path(config.warehouse) / tables.SLICES
    referenced = {Path(p).name for p in tables.read(spark, config.warehouse, tables.SLICES).inputFiles()}
    unreferenced = [p for p in slices_folder.glob("*.parquet") if p.name not in referenced]
    assert all(pq.read_metadata(p).num_rows == 0 for p in unreferenced)  # the loser left no rows behind


def test_a_file_deleted_or_rewritten_after_listing_is_read_next_run(spark, config, mixed, monkeypatch):
    """The race of a scheduled run over a landing folder: one file removed, one still being copied."""
    folder, expected = mixed
    listed = ingest.list_files

    def list_then_change(spark_, path):
        listing = listed(spark_, path)
        (folder / "random.bin").unlink()
        (folder / "explicit_VR-UN.dcm").write_bytes(b"")  # truncated to nothing, as a copy starts
        return listing

    monkeypatch.setattr(ingest, "list_files", list_then_change)
    first = ingest.run(spark, config, str(folder))
    assert (first["new_files"], first["unaccounted"], first["accounted_for"]) == (len(expected), 2, False)
    assert "random.bin" not in outcomes(spark, config) and "explicit_VR-UN.dcm" not in outcomes(spark, config)
    monkeypatch.setattr(ingest, "list_files", listed)
    shutil.copy(real("explicit_VR-UN.dcm"), folder / "explicit_VR-UN.dcm")  # the copy completes
    second = ingest.run(spark, config, str(folder))
    assert (second["new_files"], second["files_ingested"], second["unaccounted"]) == (1, 1, 0)
    assert outcomes(spark, config) == {n: o for n, o in expected.items() if n != "random.bin"}
