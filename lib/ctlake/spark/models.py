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


def model_path(models_path: str, stage: str, family: str) -> str:
    """Where a run keeps one stage's model of one family."""
    return f"{models_path}/{stage}/{family}"


def load_models(models_path: str) -> dict[tuple[str, str], PipelineModel]:
    """Every (stage, family) PipelineModel of a run."""
    return {(stage, family): PipelineModel.load(model_path(models_path, stage, family))
            for stage in STAGES for family in FAMILIES}


def candidate_scores(models: dict, frame: DataFrame, keep: list[str]) -> pd.DataFrame:
    """``keep`` columns of ``frame`` (with ``patch_id``) and every stage's and combination's probability.

    ``frame`` holds one named column per feature; cache it, it is read once per model.
    """
    out = frame.select(*keep)
    for (stage, family), model in models.items():
        out = out.join(model.transform(frame).select(
            "patch_id", vector_to_array("probability")[1].alias(f"p_{stage}_{family}")), "patch_id")
    return combine_stages(out.toPandas())
