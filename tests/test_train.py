"""Training, evaluation, report and scoring end to end on a small generated cohort."""
import json
import shutil
from pathlib import Path

import job_runs
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from deltalake import DeltaTable
from pyspark.ml import PipelineModel
from pyspark.ml.functions import vector_to_array
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual

from ctlake.core.evaluation import aggregate
from ctlake.core.radiomics import feature_layout
from ctlake.errors import InputError
from ctlake.spark import cohort, detect, features, ingest, patches, preprocess, score, tables, train
from ctlake.spark.models import model_path
from ctlake.spark.report import write_report

SMALL = {
    "cohort.patients": 36, "cohort.slices": 8, "cohort.matrix": 96, "cohort.rle_fraction": 0.0,
    "train.folds": 2, "train.bootstrap": 50, "train.rf.num_trees": [10], "train.rf.max_depth": [3],
    "train.rf.feature_subset": ["sqrt"], "train.rf.max_bins": [16], "train.svm.partitions": 2,
    "train.svm.kernel": ["rbf"], "train.svm.c": [1.0], "train.svm.gamma": ["scale"], "train.control_repeats": 2,
    "train.cv_folds": 2, "train.cv_repeats": 1, "train.cnn.epochs": 1, "train.cnn.crop_px": 16,
    "train.cnn.min_steps": {"nodule": 0, "malignancy": 0},
}


@pytest.fixture(scope="module")
def trained(spark, base_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    config = base_config.updated({
        **SMALL, "cohort.output": str(root / "cohort"), "warehouse": str(root / "warehouse"),
        "report.folder": str(root / "report"),
        "patches.annotations": str(root / "cohort/annotations.csv"),
        "train.labels": str(root / "cohort/labels.csv"), "train.nodules": str(root / "cohort/nodules.csv")})
    cohort.run(spark, config)
    ingest.run(spark, config, str(root / "cohort/dicom"))
    preprocess.run(spark, config)
    detect.run(spark, config)
    patches.run(spark, config)
    features.run(spark, config)
    summary = train.run(spark, config)
    meta, scores = summary["_meta"], summary["_scores"]
    report = write_report(spark, config, summary, meta, scores, lambda s: aggregate(s, meta["aggregate"]))
    return config, summary, meta, scores, report


def test_no_patient_is_in_two_splits(trained):
    _, summary, meta, scores, _ = trained
    frame = scores["random_forest"]
    assert (frame.groupby("patient_pseudonym")["split"].nunique() == 1).all()
    sizes = meta["split_sizes"]
    assert sum(sizes[s]["patients"] for s in ("train", "validation", "test")) == 36
    assert set(frame["split"]) == {"validation", "test"}
    # The headline rows are the scoring path's: detected candidates (or a patient's empty scan), never the oracle.
    assert set(frame["mode"]) <= {"detected", "none"}
    assert frame["patient_pseudonym"].nunique() == sizes["validation"]["patients"] + sizes["test"]["patients"]


def test_saved_models_reproduce_the_run_scores(spark, trained):
    """What score loads is what was evaluated: the saved pipelines give the evaluation's probabilities."""
    config, summary, meta, scores, _ = trained
    rows = (tables.read(spark, config.warehouse, tables.FEATURES)
            .filter(F.col("patch_id").isin(list(scores["random_forest"]["patch_id"])))
            .select("patch_id", *[F.col("radiomics")[i].alias(n) for i, n in enumerate(meta["feature_names"])]))
    pixels = (tables.read(spark, config.warehouse, tables.PATCHES).select("patch_id", "pixels", "patch_shape")
              .join(rows.select("patch_id"), "patch_id"))
    detected = scores["random_forest"].dropna(subset=["patch_id"]).set_index("patch_id")
    for stage in ("nodule", "malignancy"):
        for model in ("random_forest", "svm_ensemble", "cnn"):
            loaded = PipelineModel.load(model_path(summary["models_path"], stage, model))
            got = (loaded.transform(pixels if model == "cnn" else rows)
                   .select("patch_id", vector_to_array("probability")[1].alias("p"))
                   .toPandas().set_index("patch_id")["p"])
            expected = detected[f"p_{stage}_{model}"]
            assert len(got) == len(expected) > 0
            np.testing.assert_allclose(got.loc[expected.index].to_numpy(), expected.to_numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(detected["p"], detected["p_nodule_random_forest"] * detected["p_malignancy_random_forest"])


def test_runs_table_and_report(spark, trained):
    config, summary, meta, _, report = trained
    run_row = tables.read(spark, config.warehouse, tables.RUNS).filter(F.col("run_id") == summary["run_id"]).first()
    assert run_row["input_versions"] == {t: tables.version(spark, config.warehouse, t)
                                         for t in (tables.SLICES, tables.CANDIDATES, tables.PATCHES, tables.FEATURES)}
    assert json.loads(run_row["metrics"]) == json.loads(json.dumps(meta["results"]))
    assert set(json.loads(run_row["metrics"])) == {"random_forest", "svm_ensemble", "cnn", "ensemble_no_cnn",
                                                   "ensemble", "oracle_nodule"}
    cnn = meta["tuning"]["nodule/cnn"]["cnn"]
    assert cnn["epochs"] == 1 and sum(p["n_rows"] for p in cnn["partitions"]) == summary["split_patches"]["train"]
    assert json.loads(run_row["config"])["warehouse"] == config.warehouse
    assert {name for name, _ in meta["importances"]} == set(meta["feature_names"])
    html = Path(report).read_text()
    assert Path(report).parent == Path(config.report.folder) / "runs" / summary["run_id"]
    for image in ("roc_patient.png", "roc_patch.png", "importances.png", "pr.png", "calibration.png"):
        assert image in html and (Path(report).parent / image).is_file()
    assert "synthetic" in html and (meta["git_commit"] or "None") in html
    index = (Path(config.report.folder) / "index.html").read_text()
    assert f"runs/{summary['run_id']}/index.html" in index
    assert set(meta["groups"]) == {"no nodule", "benign or indeterminate only", "cancer"}
    assert sum(g["patients"] for g in meta["groups"].values()) == meta["split_sizes"]["test"]["patients"]
    assert "permuted 2 times" in html and "Detection (test scans, LUNA16 FROC)" in html
    assert len(meta["null_aucs"]) == 2
    froc = meta["detection"]["system"]["all"]
    assert set(froc["sensitivity"]) == {0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0} and 0 <= froc["cpm"] <= 1


def test_balanced_weights_give_each_class_half(spark):
    frame = spark.createDataFrame([("a", 1.0), ("b", 0.0), ("c", 0.0), ("d", 0.0)], "patch_id string, target double")
    expected = spark.createDataFrame([("a", 1.0, 2.0), ("b", 0.0, 2 / 3), ("c", 0.0, 2 / 3), ("d", 0.0, 2 / 3)],
                                     "patch_id string, target double, weight double")
    assertDataFrameEqual(train.with_weights(frame, "balanced"), expected, rtol=1e-9)
    assertDataFrameEqual(train.with_weights(frame, "none").select("weight"),
                         spark.createDataFrame([(1.0,)] * 4, "weight double"))


def test_the_cnn_joins_the_ensemble_only_in_the_stages_where_it_ranks_validation_better():
    from ctlake.core.evaluation import combine_stages, ensemble_members

    rng = np.random.default_rng(0)
    target = np.array([0.0, 1.0] * 20)
    validation = pd.DataFrame({
        "is_nodule": target, "target": target[::-1], "nodule_label": ["malignant", "benign"] * 20,
        # The CNN sees the nodules (the features' families are noise) but not their malignancy.
        "p_nodule_random_forest": rng.random(40), "p_nodule_svm_ensemble": rng.random(40), "p_nodule_cnn": target,
        "p_malignancy_random_forest": target[::-1] * 0.8 + 0.1, "p_malignancy_svm_ensemble": target[::-1],
        "p_malignancy_cnn": rng.random(40)})
    members, evidence = ensemble_members(validation)
    assert members == {"nodule": ["random_forest", "svm_ensemble", "cnn"], "malignancy": ["random_forest", "svm_ensemble"]}
    assert evidence["malignancy"]["validation_auc_without_cnn"] == 1.0
    combined = combine_stages(validation, members)
    np.testing.assert_allclose(combined["p_ensemble"], validation[["p_nodule_random_forest", "p_nodule_svm_ensemble",
                                                                   "p_nodule_cnn"]].mean(axis=1)
                               * validation[["p_malignancy_random_forest", "p_malignancy_svm_ensemble"]].mean(axis=1))


def test_the_permutation_null_is_centred_at_one_half():
    from ctlake.core.evaluation import permutation_null

    labels = np.array([0, 1] * 20)
    aucs = permutation_null(labels, labels + 0.1 * np.arange(40), 400, seed=3)
    assert len(aucs) == 400 and abs(np.mean(aucs) - 0.5) < 0.02
    assert permutation_null(np.zeros(5), np.arange(5), 10, 0) == []


@pytest.fixture(scope="module")
def scored(spark, trained):
    """A patient the run never saw (another seed), ingested into the fixture's warehouse and scored."""
    config = trained[0]
    folder = Path(config.cohort.output).parent / "new"
    new = config.updated({"cohort.seed": 4242, "cohort.patients": 1, "cohort.no_nodule_fraction": 0.0})
    cohort.run(spark, new, str(folder))
    ingest.run(spark, config, str(folder / "dicom"))
    uid = next((folder / "dicom").rglob("*.dcm")).parent.name
    return folder, uid, score.run(spark, config, score.LATEST, [uid], labels=str(folder / "labels.csv"))


def test_score_a_new_patient_and_refuse_bad_runs(spark, trained, scored):
    config, summary, meta, _, _ = trained
    _, uid, result = scored
    assert result["against_labels"] == {"series": 1, "note": "needs scored series of both labels"}
    assert result["run_id"] == summary["run_id"]
    assert result["series_scored"] == 1 and result["patches_scored"] > 0
    row = tables.read(spark, config.warehouse, tables.PREDICTIONS).filter(F.col("series_uid") == uid).first()
    assert 0.0 <= row["p_ensemble"] <= 1.0 and len(row["evidence"]) == min(config.train.evidence_k,
                                                                             result["patches_scored"])
    assert row["patches_scored"] == tables.read(spark, config.warehouse, tables.CANDIDATES).filter(
        F.col("series_uid") == uid).count()
    assert row["cancer_predicted"] == (row["p_ensemble"] >= meta["thresholds"]["ensemble"])
    sops = {r["sop_uid"] for r in tables.read(spark, config.warehouse, tables.SLICES)
            .filter(F.col("series_uid") == uid).select("sop_uid").collect()}
    assert {e["sop_uid"] for e in row["evidence"]} <= sops
    picture = result["predictions"][uid[-12:]]["evidence_picture"]
    assert picture is None if not row["evidence"] else Path(picture).is_file()
    with pytest.raises(InputError, match="run 'no-such-run' does not exist"):
        score.run(spark, config, "no-such-run", [uid])
    run_json = Path(summary["models_path"]) / "run.json"
    meta_on_disk = json.loads(run_json.read_text())
    run_json.write_text(json.dumps({**meta_on_disk, "layout_hash": "0000"}))
    try:
        with pytest.raises(InputError, match="feature layout"):
            score.run(spark, config, summary["run_id"], [uid])
    finally:
        run_json.write_text(json.dumps(meta_on_disk))
    with pytest.raises(InputError, match="trained on patches"):
        score.run(spark, config.updated({"patches.depth_mm": 0}), summary["run_id"], [uid])
    with pytest.raises(InputError, match="detector"):
        score.run(spark, config.updated({"detect.min_roundness": 0.1}), summary["run_id"], [uid])
    networks = Path(model_path(summary["models_path"], "malignancy", "cnn"))
    shutil.move(networks, networks.with_name("moved"))
    try:
        with pytest.raises(InputError, match=r"malignancy cnn model cannot be loaded from .*/malignancy/cnn: .*retrain"):
            score.run(spark, config, summary["run_id"], [uid])
    finally:
        shutil.move(networks.with_name("moved"), networks)


def test_latest_run_of_an_empty_warehouse_is_a_clear_error(spark, config):
    with pytest.raises(InputError, match="no training run in .*runs: run jobs/train.py first"):
        tables.latest_run_id(spark, config.warehouse)


def test_a_new_feature_layout_rewrites_the_table_with_its_names(spark, trained):
    config = trained[0]
    smaller = config.updated({"features.pixel_size": 8})
    try:
        first = features.run(spark, smaller)
        table = tables.read(spark, smaller.warehouse, tables.FEATURES)
        assert first["table_rewritten_for_new_layout"] and first["errors"] == 0
        assert tables.feature_names(table, "pixel_vector") == list(feature_layout(8)["pixels"])
        assert table.filter(F.col("layout_hash") != feature_layout(8)["hash"]).count() == 0
        assert table.count() == first["table_rows"] == first["patches_featurized"]
        again = features.run(spark, smaller)
        assert not again["table_rewritten_for_new_layout"] and again["patches_featurized"] == 0
    finally:
        features.run(spark, config)


def test_the_direct_writer_and_spark_make_the_same_features(spark, trained, tmp_path):
    """Features of the same patches written by the workers (the fixture's run) and by Spark's MERGE."""
    config = trained[0]
    with_spark = config.updated({"table_writer": "spark", "warehouse": str(tmp_path / "warehouse")})
    for table in (tables.PATCHES, tables.SERIES):
        shutil.copytree(Path(config.warehouse) / table, Path(with_spark.warehouse) / table)
    merged = features.run(spark, with_spark)
    assert merged["patches_featurized"] == merged["table_rows"] > 0
    direct, again = (tables.read(spark, c.warehouse, tables.FEATURES).drop("computed_at") for c in (config, with_spark))
    assert direct.schema == again.schema  # the feature names travel in the metadata of both
    assertDataFrameEqual(direct, again)
    assert features.run(spark, with_spark)["patches_featurized"] == 0


def comparable(warehouse: str | Path, table: str) -> list[tuple]:
    """A table's rows without what differs between two runs of the same inputs (times, run ids), sorted."""
    rows = DeltaTable(str(Path(warehouse) / table)).to_pyarrow_table()
    kept = [f.name for f in rows.schema if not pa.types.is_timestamp(f.type) and f.name not in RUN_COLUMNS]
    return sorted((to_12_digits(row) for row in zip(*(rows.column(c).to_pylist() for c in kept))), key=repr)


def to_12_digits(value):
    """Floats to 12 significant digits, inside rows, lists and dicts.

    Spark merges partial sums (treeAggregate, a fitted model's statistics) in
    the order tasks finish, so two runs of one training differ in the last bits
    of a probability (1e-14 measured between local mode and the cluster); the
    12th digit is far above that and far below any difference that matters.
    """
    if isinstance(value, float):
        return float(f"{value:.12g}")
    if isinstance(value, (list, tuple)):
        return type(value)(to_12_digits(v) for v in value)
    if isinstance(value, dict):
        return {k: to_12_digits(v) for k, v in value.items()}
    return value


#: Columns that name the run or time that wrote a row, not what it holds.
RUN_COLUMNS = {"run_id", "ingest_run", "seconds", "models_path"}


def test_the_chain_on_a_standalone_cluster_gives_the_tables_and_metrics_of_local_mode(
        spark, trained, scored, standalone, installed_env, tmp_path):
    """jobs/pipeline.py on two one-core workers with the packaged Python, against the fixtures' local stages.

    The same cohort files and key, the same settings; the new patient is ingested with the cohort and
    scored by the chain's own run.  Every table holds the same rows, and training gives the same metrics.
    """
    config, summary = trained[0], trained[1]
    new_folder, uid, _ = scored
    root = Path(config.cohort.output)
    sets = [f"{key}={json.dumps(value)}" for key, value in SMALL.items()] + [
        f"cohort.output={root}", f"patches.annotations={root / 'annotations.csv'}",
        f"train.labels={root / 'labels.csv'}", f"train.nodules={root / 'nodules.csv'}",
        f"privacy.key_file={config.privacy.key_file}",
        "spark.conf.spark.sql.shuffle.partitions=2", "spark.conf.spark.default.parallelism=2"]
    command = job_runs.cluster_command("pipeline", standalone.master_url, tmp_path, *sets, python=installed_env) + [
        "--stages", "ingest,preprocess,detect,patches,features,train,score",
        "--input", str(root / "dicom"), "--input", str(new_folder / "dicom")]
    env = job_runs.job_env()
    env.pop("CTLAKE_PSEUDONYM_KEY")
    chain = job_runs.summary_of(job_runs.run(command, env=env))["stages"]
    print({stage: chain[stage]["seconds"] for stage in chain})
    assert chain["score"]["series_scored"] == 1 and list(chain["score"]["predictions"]) == [uid[-12:]]
    for table in (tables.SLICES, tables.SERIES, tables.QUARANTINE, tables.PREPROCESSED, tables.CANDIDATES,
                  tables.DETECTIONS, tables.PATCHES, tables.FEATURES, tables.PREDICTIONS):
        local, on_cluster = (comparable(w, table) for w in (config.warehouse, tmp_path / "warehouse"))
        assert len(on_cluster) == len(local) >= (table != tables.QUARANTINE), table  # only quarantine may be empty
        assert on_cluster == local, table
    runs = {w: to_12_digits(json.loads(DeltaTable(str(Path(w) / tables.RUNS)).to_pyarrow_table()
                                       .column("metrics")[0].as_py()))
            for w in (config.warehouse, str(tmp_path / "warehouse"))}
    assert runs[str(tmp_path / "warehouse")] == runs[config.warehouse]
    assert chain["train"]["run_id"] != summary["run_id"]
