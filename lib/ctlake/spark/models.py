"""A run's saved two-stage models and the one function that applies them.

Training's evaluation and the scoring job both call :func:`candidate_scores`,
so a figure in a run's report is what a newly scored scan gets.
"""
from __future__ import annotations

import pandas as pd
from pyspark.ml import PipelineModel
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame

from ctlake.core.evaluation import FAMILIES, STAGES, combine_stages
from ctlake.errors import InputError, error_cause
from ctlake.spark.session import session_conf

#: Families whose models read the patches' voxels (``pixels``, ``patch_shape``), not the features.
PIXEL_FAMILIES = ("cnn",)
#: Rows per Arrow batch while the CNN scores: a patch's voxels are 67 KB, and Spark's default of
#: 10,000 rows would hand each Python worker batches of 670 MB.
PIXEL_BATCH_ROWS = 256


def model_path(models_path: str, stage: str, family: str) -> str:
    """Where a run keeps one stage's model of one family."""
    return f"{models_path}/{stage}/{family}"


def load_models(models_path: str) -> dict[tuple[str, str], PipelineModel]:
    """Every (stage, family) PipelineModel of a run; an InputError naming the first one that cannot be loaded.

    A run saved by an older ctlake (no CNN) or with a Keras or JAX that cannot
    read its networks stops here, before any series is touched.
    """
    models = {}
    for stage in STAGES:
        for family in FAMILIES:
            path = model_path(models_path, stage, family)
            try:
                models[(stage, family)] = PipelineModel.load(path)
            except Exception as exc:  # a missing folder is Spark's AnalysisException; a bad network, InputError
                raise InputError(f"the run's {stage} {family.replace('_', ' ')} model cannot be loaded from "
                                 f"{path}: {error_cause(exc)}; retrain (make train)") from None
    return models


def candidate_scores(models: dict, frame: DataFrame, keep: list[str], pixels: DataFrame,
                     members: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """``keep`` columns of ``frame`` (with ``patch_id``) and every stage's and combination's probability.

    ``frame`` holds one named column per feature; cache it, it is read once per
    model. ``pixels`` (``patch_id``, ``pixels``, ``patch_shape``: the
    ``patches`` table) feeds the families that read voxels. ``members``: the
    families the ensemble averages per stage (the run's choice; default all).
    """
    out = frame.select(*keep)
    for (stage, family), model in models.items():
        rows = pixels.join(frame.select("patch_id"), "patch_id") if family in PIXEL_FAMILIES else frame
        out = out.join(model.transform(rows).select(
            "patch_id", vector_to_array("probability")[1].alias(f"p_{stage}_{family}")), "patch_id")
    with session_conf(frame.sparkSession, {"spark.sql.execution.arrow.maxRecordsPerBatch": PIXEL_BATCH_ROWS}):
        return combine_stages(out.toPandas(), members)
