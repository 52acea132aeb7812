"""Configuration: layered files, typed settings, and the one-line errors jobs give for bad arguments."""
import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

from ctlake.config import load_config, load_settings, merged, parse_settings
from ctlake.core.deid import DEV_KEY, SYNTHETIC_MARKER
from ctlake.errors import ConfigError

JOBS = ("make_cohort", "ingest", "preprocess", "detect", "patches", "features", "train", "score", "pipeline", "maintain")
SHIPPED = ("local.yaml", "cluster.yaml", "eval.yaml")


def run_job(job, *args, env=None):
    return subprocess.run([sys.executable, f"jobs/{job}.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_overrides_are_parsed_as_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cohort:\n  patients: 4\nwarehouse: w\n")
    config = load_config(path, ["cohort.patients=8", "ingest.input=null", "spark.conf.spark.sql.shuffle.partitions=3",
                                "train.svm.c=[0.3, 1.0]"])
    assert config == {"cohort": {"patients": 8}, "warehouse": "w", "ingest": {"input": None},
                      "spark": {"conf": {"spark.sql.shuffle.partitions": 3}}, "train": {"svm": {"c": [0.3, 1.0]}}}


def test_an_environment_file_overlays_the_shared_file_it_extends(tmp_path):
    (tmp_path / "base.yaml").write_text("a: 1\ns: {x: 1, y: [1, 2], z: {k: 1}}\n")
    (tmp_path / "env.yaml").write_text("extends: base.yaml\nb: 2\ns: {y: [3], z: {j: 2}}\n")
    assert load_config(tmp_path / "env.yaml") == {"a": 1, "b": 2, "s": {"x": 1, "y": [3], "z": {"k": 1, "j": 2}}}
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "loop.yaml")
    assert merged({"a": {"b": 1}}, {"a": 2}) == {"a": 2}


def test_shipped_environment_files_hold_only_what_differs_from_base():
    base = load_config(ROOT / "conf" / "base.yaml")
    for name in SHIPPED:
        overlay = load_config(ROOT / "conf" / name)
        own = yaml.safe_load((ROOT / "conf" / name).read_text())
        own.pop("extends")

        def same(a, b, path=""):
            for key, value in a.items():
                if isinstance(value, dict) and isinstance(b.get(key), dict):
                    yield from same(value, b[key], f"{path}{key}.")
                elif key in b and b[key] == value:
                    yield f"{path}{key}"
        assert list(same(own, base)) == [], f"{name} repeats base.yaml"
        assert parse_settings(overlay).env == name.removesuffix(".yaml")


@pytest.mark.parametrize("key, value, message", [
    ("warehouse", None, "configuration key warehouse must be str, found None"),
    ("cohort.patients", "many", "configuration key cohort.patients must be int, found 'many'"),
    ("cohort.matrix", True, "configuration key cohort.matrix must be int, found True"),
    ("cohort.patients", 0, "configuration key cohort.patients must be at least 1, found 0"),
    ("cohort.no_nodule_fraction", 1.5, "configuration key cohort.no_nodule_fraction must be from 0.0 to 1.0"),
    ("ingest.max_partition_bytes", "lots", "configuration key ingest.max_partition_bytes must be a size"),
    ("train.aggregate", "median", "configuration key train.aggregate must be one of max, mean, top3"),
    ("train.rf.num_trees", [], "configuration key train.rf.num_trees must be a non-empty list"),
    ("train.split", {"train": 0.8, "test": 0.2}, "train.split must give train, validation, test"),
    ("train.cnn.partitions", {"nodule": 2}, "train.cnn.partitions must give nodule, malignancy"),
    ("train.cnn.partitions", {"nodule": 2, "malignancy": 0},
     "configuration key train.cnn.partitions.malignancy must be at least 1, found 0"),
    ("patches", None, "configuration key patches must be a section, found None"),
])
def test_bad_values_name_the_key_what_was_expected_and_what_was_found(base_config, key, value, message):
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[").replace("(", r"\(")):
        base_config.updated({key: value})


def test_unknown_and_missing_keys_are_errors_that_name_the_nearest_key(base_config):
    with pytest.raises(ConfigError, match=r"^unknown configuration key ingest.inptu; did you mean ingest.input\?$"):
        base_config.updated({"ingest.inptu": "/scans"})
    with pytest.raises(ConfigError, match=r"^unknown configuration key wherehouse; did you mean warehouse\?$"):
        base_config.updated({"wherehouse": "/tmp/w"})
    raw = dict(base_config.source)
    raw.pop("report")
    with pytest.raises(ConfigError, match="^missing configuration key report$"):
        parse_settings(raw)


def test_settings_carry_units_and_derived_parameters(base_config):
    assert base_config.ingest.max_partition_bytes == 64 * 1024**2
    assert base_config.patches.params().size_mm == 32.0 and isinstance(base_config.patches.params().size_mm, float)
    assert [s["step"] for s in base_config.preprocess.chain().steps] == ["window", "equalize", "denoise",
                                                                           "threshold", "lung_mask"]
    assert base_config.updated({"cohort.patients": 3}).cohort.plan().patients == 3
    assert base_config.cohort.patients == 200  # updated() returns new settings; these are frozen


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(ROOT / "conf" / "local.yaml", ["no-equals-sign"])
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("args, expected", [
    (["--conf", "conf/absent.yaml"], "ingest: error: configuration file not found: conf/absent.yaml"),
    (["--set", "ingest.max_partition_bytes=lots"], "ingest: error: configuration key ingest.max_partition_bytes must be a size"),
    (["--set", "warehouse=null"], "ingest: error: configuration key warehouse must be str, found None"),
    (["--set", "ingest.inptu=/scans"], "ingest: error: unknown configuration key ingest.inptu; did you mean ingest.input?"),
    (["--sets", "'ingest.input=/a b"], "ingest: error: --sets is not a shell-quoted list"),
    (["--bogus"], "ingest: error: unrecognized arguments: --bogus"),
    (["--input", "/a", "--manifest", "/b"], "ingest: error: give --input or --manifest, not both"),
    (["--set", "ingest.input=[]"], "ingest: error: configuration key ingest.input must be a path or a non-empty list"),
    (["pipeline", "--stages", "train,ingest"], "pipeline: error: --stages must name each stage once, in the order"),
    (["pipeline", "--stages", "ingest,predict"], "pipeline: error: --stages takes names from cohort, ingest,"),
])
def test_job_reports_bad_arguments_in_one_line_with_exit_code_2(args, expected):
    job, args = (args[0], args[1:]) if args[0] == "pipeline" else ("ingest", args)
    result = run_job(job, *args)
    assert result.returncode == 2
    assert result.stderr.startswith(expected)
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize("conf", SHIPPED)
@pytest.mark.parametrize("job", JOBS)
def test_every_job_validates_with_every_shipped_configuration(job, conf):
    result = run_job(job, "--conf", f"conf/{conf}", "--check", env={"CTLAKE_PSEUDONYM_KEY": "k" * 32})
    assert result.returncode == 0, result.stderr
    checked = json.loads(result.stdout.strip().splitlines()[-1])
    assert (checked["job"], checked["status"]) == (job, "valid")
    assert checked["settings"] == load_config(ROOT / "conf" / conf)


def test_a_value_with_spaces_reaches_the_job_whole_through_sets():
    steps = "preprocess.steps=[{step: window, preset: lung}, {step: denoise, method: median, ksize: 3}]"
    result = run_job("preprocess", "--check", "--sets", f"'{steps}' cohort.patients=3")
    assert result.returncode == 0, result.stderr
    settings = json.loads(result.stdout.strip().splitlines()[-1])["settings"]
    assert settings["preprocess"]["steps"] == [{"step": "window", "preset": "lung"},
                                               {"step": "denoise", "method": "median", "ksize": 3}]
    assert settings["cohort"]["patients"] == 3


def test_the_cluster_configuration_refuses_to_run_without_a_key():
    result = run_job("ingest", "--conf", "conf/cluster.yaml", "--check", env={"CTLAKE_PSEUDONYM_KEY": ""})
    assert result.returncode == 2 and "no pseudonymization key" in result.stderr
    assert load_settings(ROOT / "conf" / "cluster.yaml").privacy.allow_dev_key is False
    assert load_settings(ROOT / "conf" / "cluster.yaml").privacy.uids == "replace"
    assert load_settings(ROOT / "conf" / "local.yaml").privacy.uids == "retain"



def test_the_development_key_serves_a_marked_synthetic_cohort_only(tmp_path):
    privacy = load_settings(ROOT / "conf" / "local.yaml").privacy
    (tmp_path / "cohort" / "dicom").mkdir(parents=True)
    (tmp_path / "cohort" / SYNTHETIC_MARKER).write_text("synthetic")
    (tmp_path / "hospital").mkdir()
    os.environ.pop(privacy.key_env, None)
    cohort = str(tmp_path / "cohort" / "dicom")
    assert privacy.key((cohort,)) == DEV_KEY
    assert privacy.key((cohort + "/*.dcm", cohort)) == DEV_KEY
    # Every input must lie in a marked cohort: one hospital folder among them needs the real key.
    with pytest.raises(ConfigError, match=f"development key is only for a synthetic cohort, and {tmp_path}/hospital"):
        privacy.key((cohort, str(tmp_path / "hospital")))
    result = run_job("ingest", "--check", "--input", str(tmp_path / "hospital"), env={privacy.key_env: ""})
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no pseudonymization key" in result.stderr


def test_keys_shorter_than_32_bytes_and_a_dev_key_by_set_are_refused_in_one_line(tmp_path):
    short = run_job("ingest", "--check", "--input", str(tmp_path), env={"CTLAKE_PSEUDONYM_KEY": "x"})
    assert short.returncode == 2 and "holds a key of 1 bytes; use at least 32" in short.stderr
    (tmp_path / "key").write_text("k" * 31)
    filed = run_job("ingest", "--check", "--input", str(tmp_path), "--set", f"privacy.key_file={tmp_path / 'key'}",
                    env={"CTLAKE_PSEUDONYM_KEY": ""})
    assert filed.returncode == 2 and "holds a key of 31 bytes" in filed.stderr
    forced = run_job("ingest", "--conf", "conf/cluster.yaml", "--check", "--set", "privacy.allow_dev_key=true",
                     env={"CTLAKE_PSEUDONYM_KEY": ""})
    assert forced.returncode == 2 and "privacy.allow_dev_key is set in a configuration file" in forced.stderr
    good = run_job("ingest", "--check", "--input", str(tmp_path), env={"CTLAKE_PSEUDONYM_KEY": "k" * 32})
    assert good.returncode == 0, good.stderr


def test_secrets_are_redacted_from_what_runs_and_reports_keep(base_config):
    config = base_config.updated({"spark.conf.spark.executorEnv.CTLAKE_PSEUDONYM_KEY": "s" * 40,
                                  "spark.conf.spark.hadoop.fs.s3a.secret.key": "aws-secret"})
    shown = config.redacted()
    assert shown["spark"]["conf"]["spark.executorEnv.CTLAKE_PSEUDONYM_KEY"] == "[redacted]"
    assert shown["spark"]["conf"]["spark.hadoop.fs.s3a.secret.key"] == "[redacted]"
    assert shown["privacy"] == config.source["privacy"] and shown["cohort"] == config.source["cohort"]
    assert "s" * 40 not in json.dumps(shown) and config.source["spark"]["conf"]["spark.hadoop.fs.s3a.secret.key"]
