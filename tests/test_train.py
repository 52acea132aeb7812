"""Training, evaluation, report and scoring end to end on a small generated cohort."""
import json
from functools import partial
from pathlib import Path

import pytest
from ctlake.config import with_value
from ctlake.errors import InputError
from ctlake.spark import features as featurize
from ctlake.spark import ingest, patches, preprocess, score, tables, train
from ctlake.spark.cohort import run as make_cohort
from ctlake.spark.report import write_report
from pyspark.ml import PipelineModel
from pyspark.sql import functions as F

SMALL = {
    "cohort.patients": 36, "cohort.slices": 8, "cohort.matrix": 96, "cohort.rle_fraction": 0.0,
    "train.folds": 2, "train.bootstrap": 50, "train.rf.num_trees": [10], "train.rf.max_depth": [3],
    "train.rf.feature_subset": ["sqrt"], "train.rf.max_bins": [16], "train.svm.partitions": 2,
    "train.svm.kernel": ["rbf"], "train.svm.c": [1.0], "train.svm.gamma": ["scale"], "train.control_repeats": 2,
}


@pytest.fixture(scope="module")
def trained(spark, base_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    config = base_config
    for key, value in {**SMALL, "cohort.output": str(root / "cohort"), "warehouse": str(root / "warehouse"),
                       "report.folder": str(root / "report"),
                       "patches.candidates": str(root / "cohort/candidates.csv"),
                       "patches.annotations": str(root / "cohort/annotations.csv"),
                       "train.labels": str(root / "cohort/labels.csv"),
                       "train.nodules": str(root / "cohort/nodules.csv")}.items():
        config = with_value(config, key, value)
    make_cohort(spark, config, str(root / "cohort"))
    ingest.run(spark, config, str(root / "cohort/dicom"))
    preprocess.run(spark, config)
    patches.run(spark, config)
    featurize.run(spark, config)
    summary = train.run(spark, config)
    meta, scores = summary.pop("_meta"), summary.pop("_scores")
    summary["report"] = write_report(spark, config, summary, meta, scores, partial(train.aggregate, how="max"))
    return config, summary, meta, scores


def test_no_patient_is_in_two_splits(trained):
    _, summary, meta, scores = trained
    frame = scores["random_forest"]
    assert (frame.groupby("patient_pseudonym")["split"].nunique() == 1).all()
    sizes = meta["split_sizes"]
    assert sum(sizes[s]["patients"] for s in ("train", "validation", "test")) == 36
    assert set(frame["split"]) == {"validation", "test"}


def test_models_run_table_and_report_are_written(spark, trained):
    config, summary, meta, _ = trained
    run_row = tables.read(spark, config, "runs").filter(F.col("run_id") == summary["run_id"]).first()
    assert run_row is not None and run_row["input_versions"]["features"] >= 0
    metrics = json.loads(run_row["metrics"])
    assert set(metrics) == {"random_forest", "svm_ensemble", "ensemble", "shuffled_label_control"}
    for model in ("random_forest", "svm_ensemble"):
        assert PipelineModel.load(f"{summary['models_path']}/{model}") is not None
    assert {name for name, _ in meta["importances"]} == set(meta["feature_names"])
    report = Path(summary["report"])
    html = report.read_text()
    for image in ("roc_patient.png", "roc_patch.png", "importances.png"):
        assert image in html and (report.parent / image).is_file()
    assert "shuffled label control" in html and "Over 2 permutations" in html
    control = summary["shuffled_label_control_auc"]["patch"]
    assert control["permutations"] == 2 and 0.0 <= control["min"] <= control["mean"] <= control["max"] <= 1.0
    assert meta["control_aucs"]["patch"][0] == round(meta["results"]["shuffled_label_control"]["patch"]["auc"]["value"], 4)


def test_score_a_new_patient_and_refuse_bad_runs(spark, trained, tmp_path):
    config, summary, meta, _ = trained
    new = with_value(with_value(config, "cohort.seed", 4242), "cohort.patients", 1)
    new = with_value(new, "cohort.no_nodule_fraction", 0.0)
    make_cohort(spark, new, str(tmp_path / "new"))
    ingest.run(spark, config, str(tmp_path / "new" / "dicom"))
    uid = next((tmp_path / "new" / "dicom").rglob("*.dcm")).parent.name
    result = score.run(spark, config, summary["run_id"], [uid])
    assert result["series_scored"] == 1 and result["patches_scored"] > 0
    row = tables.read(spark, config, score.PREDICTIONS).filter(F.col("series_uid") == uid).first()
    assert 0.0 <= row["p_ensemble"] <= 1.0 and len(row["evidence"]) == config["train"]["evidence_k"]
    sops = {r["sop_uid"] for r in tables.read(spark, config, tables.SLICES).filter(F.col("series_uid") == uid)
            .select("sop_uid").collect()}
    assert {e["sop_uid"] for e in row["evidence"]} <= sops
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
        score.run(spark, with_value(config, "patches.depth_mm", 0), summary["run_id"], [uid])


def test_a_new_feature_layout_rewrites_the_table_with_its_names(spark, trained):
    config = trained[0]
    smaller = with_value(config, "features.pixel_size", 8)
    try:
        first = featurize.run(spark, smaller)
        table = tables.read(spark, smaller, featurize.FEATURES)
        assert first["table_rewritten_for_new_layout"] and first["errors"] == 0
        assert featurize.feature_names(table, "pixel_vector") == list(featurize.layout(8)["pixels"])
        assert table.filter(F.col("layout_hash") != featurize.layout(8)["hash"]).count() == 0
        assert table.count() == first["table_rows"] == first["patches_featurized"]
        again = featurize.run(spark, smaller)
        assert not again["table_rewritten_for_new_layout"] and again["patches_featurized"] == 0
    finally:
        featurize.run(spark, config)
