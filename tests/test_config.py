"""Configuration loading and the one-line errors jobs give for bad arguments or settings."""
import subprocess
import sys

import pytest
from conftest import ROOT
from ctlake.config import get, load_config, positive_int, with_value
from ctlake.errors import ConfigError


def test_overrides_are_parsed_as_yaml_scalars(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cohort:\n  patients: 4\nwarehouse: w\n")
    config = load_config(path, ["cohort.patients=8", "ingest.input=null", "spark.conf.spark.sql.shuffle.partitions=3"])
    assert config["cohort"]["patients"] == 8
    assert config["ingest"]["input"] is None
    assert config["spark"]["conf"] == {"spark.sql.shuffle.partitions": 3}


def test_type_errors_name_the_key_and_the_value():
    config = {"cohort": {"patients": "many", "matrix": True}}
    with pytest.raises(ConfigError, match=r"cohort.patients must be int, found 'many'"):
        get(config, "cohort.patients", int)
    with pytest.raises(ConfigError, match="cohort.matrix must be int"):
        get(config, "cohort.matrix", int)
    with pytest.raises(ConfigError, match="missing configuration key cohort.seed"):
        get(config, "cohort.seed", int)
    with pytest.raises(ConfigError, match="positive integer"):
        positive_int(with_value(config, "cohort.patients", 0), "cohort.patients")


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(ROOT / "conf" / "local.yaml", ["no-equals-sign"])
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("args, expected", [
    (["--conf", "conf/absent.yaml"], "ingest: error: configuration file not found: conf/absent.yaml"),
    (["--set", "ingest.max_partition_bytes=lots"], "ingest: error: configuration key ingest.max_partition_bytes must be a size"),
    (["--bogus"], "ingest: error: unrecognized arguments: --bogus"),
])
def test_job_reports_bad_arguments_in_one_line_with_exit_code_2(args, expected):
    result = subprocess.run([sys.executable, "jobs/ingest.py", *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith(expected)
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
