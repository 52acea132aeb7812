"""The static HTML report of a training run: one folder that opens from disk.

Everything a reader wants to look at rather than read: cohort and split
sizes, a metrics table per model with bootstrap intervals, ROC curves,
confusion matrices, feature importances, the preprocessing montage, the patch
grid, and for a few test patients the evidence patches drawn on their slices.
"""
from __future__ import annotations

import html
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from pyspark.sql import SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from ctlake.config import Settings  # noqa: E402
from ctlake.core.dicom_parse import hu_frame  # noqa: E402
from ctlake.core.metrics import METRICS, roc_points  # noqa: E402
from ctlake.core.slice_ops import WINDOW_PRESETS, hu_window  # noqa: E402
from ctlake.spark import tables  # noqa: E402

MODELS = ("random_forest", "svm_ensemble", "ensemble", "shuffled_label_control")
LEVELS = ("patient", "nodule", "patch")


def _fmt(cell: dict | None) -> str:
    if not cell or cell.get("value") is None:
        return "–"
    if cell.get("low") is None:
        return f"{cell['value']:.3f}"
    return f"{cell['value']:.3f} <span class=ci>[{cell['low']:.2f}, {cell['high']:.2f}]</span>"


def roc_figure(scores: dict[str, pd.DataFrame], level: str, path: Path, aggregate_fn) -> None:
    """ROC curves of every model on the test split at one level (patient or patch)."""
    fig, ax = plt.subplots(figsize=(4.6, 4.2), dpi=110)
    for name, frame in scores.items():
        if level == "patient":
            data = aggregate_fn(frame)
            data = data[data["split"] == "test"]
            labels, values = data["label"].to_numpy(), data["p"].to_numpy()
        else:
            data = frame[frame["split"] == "test"]
            labels, values = data["target"].to_numpy(), data["p"].to_numpy()
        if len(np.unique(labels)) < 2:
            continue
        fpr, tpr = roc_points(labels, values)
        ax.plot(fpr, tpr, label=name.replace("_", " "), linestyle=":" if "control" in name else "-",
                color="#999" if "control" in name else None)
    ax.plot([0, 1], [0, 1], color="#bbb", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC, {level} level (test)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def importance_figure(importances: list, path: Path, top: int = 20) -> None:
    names = [n for n, _ in importances[:top]][::-1]
    values = [v for _, v in importances[:top]][::-1]
    fig, ax = plt.subplots(figsize=(5.5, 0.25 * len(names) + 1), dpi=110)
    ax.barh(names, values, color="#4a7fb0")
    ax.set_xlabel("random forest importance")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def evidence_picture(spark: SparkSession, warehouse: str, evidence: list[dict], size_mm: float, path: Path) -> bool:
    """The top patches of one patient drawn as boxes on their slices (lung window), side by side."""
    if not evidence:
        return False
    wanted = {(e["sop_uid"]) for e in evidence}
    rows = (tables.read(spark, warehouse, tables.SLICES).filter(F.col("sop_uid").isin(list(wanted)))
            .select("sop_uid", "pixels", "pixel_shape", "pixel_spacing_row", "pixel_spacing_col").collect())
    by_sop = {r["sop_uid"]: r for r in rows}
    panels = []
    for rank, e in enumerate(evidence, 1):
        row = by_sop.get(e["sop_uid"])
        if row is None:
            continue
        level, width = WINDOW_PRESETS["lung"]
        image = cv2.cvtColor(hu_window(hu_frame(row["pixels"], row["pixel_shape"]), level, width),
                             cv2.COLOR_GRAY2BGR)
        half_r, half_c = size_mm / 2 / row["pixel_spacing_row"], size_mm / 2 / row["pixel_spacing_col"]
        top_left = (int(e["center_col"] - half_c), int(e["center_row"] - half_r))
        bottom_right = (int(e["center_col"] + half_c), int(e["center_row"] + half_r))
        cv2.rectangle(image, top_left, bottom_right, (0, 0, 255), 1)
        cv2.putText(image, f"#{rank} p={e['p']:.2f} slice {e['slice_index']}", (4, 14),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 255, 255), 1, cv2.LINE_AA)
        panels.append(image)
    if not panels:
        return False
    height = max(p.shape[0] for p in panels)
    panels = [cv2.copyMakeBorder(p, 0, height - p.shape[0], 0, 4, cv2.BORDER_CONSTANT, value=(255, 255, 255))
              for p in panels]
    cv2.imwrite(str(path), np.hstack(panels))
    return True


def write_report(spark: SparkSession, settings: Settings, summary: dict, meta: dict, scores: dict,
                 aggregate_fn) -> str:
    """Write ``<report.folder>/index.html`` and its pictures; return the HTML path."""
    folder = tables.report_file(settings.report.folder, tables.REPORT_HTML).parent
    for level in ("patient", "patch"):
        roc_figure(scores, level, folder / f"roc_{level}.png", aggregate_fn)
    importance_figure(meta["importances"], folder / "importances.png")
    evidence_rows = []
    patient_scores = aggregate_fn(scores["ensemble"])
    for index, (patient, items) in enumerate(sorted(meta["evidence"].get("ensemble", {}).items())[:4]):
        name = f"evidence_{index}.png"
        if evidence_picture(spark, settings.warehouse, items, settings.patches.size_mm, folder / name):
            info = patient_scores[patient_scores["patient_pseudonym"] == patient].iloc[0]
            evidence_rows.append((patient, int(info["label"]), float(info["p"]), name))
    path = folder / tables.REPORT_HTML
    path.write_text(page(settings, summary, meta, evidence_rows, folder))
    return str(path)


def metrics_table(results: dict, level: str) -> str:
    """One HTML table: every model's metrics at ``level``, with intervals, threshold and confusion matrix."""
    head = "".join(f"<th>{m}</th>" for m in METRICS)
    body = []
    for name in MODELS:
        r = results.get(name, {}).get(level)
        if r is None:
            continue
        c = r["confusion"]
        cells = "".join(f"<td>{_fmt(r[m])}</td>" for m in METRICS)
        body.append(f"<tr><th>{name.replace('_', ' ')}</th>{cells}<td>{r['threshold']:.3f}</td>"
                    f"<td><table class=cm><tr><td>TP {c['tp']}</td><td>FN {c['fn']}</td></tr>"
                    f"<tr><td>FP {c['fp']}</td><td>TN {c['tn']}</td></tr></table></td>"
                    f"<td>{r['n']} / {r['n_groups']}</td></tr>")
    return (f"<table class=metrics><tr><th>model</th>{head}<th>threshold</th><th>confusion</th>"
            f"<th>rows / patients</th></tr>{''.join(body)}</table>")


def page(settings: Settings, summary: dict, meta: dict, evidence_rows: list[tuple], folder: Path) -> str:
    """The report's HTML, pictures referenced by name from the same folder."""
    results = meta["results"]
    sizes = meta["split_sizes"]
    split_rows = "".join(f"<tr><th>{s}</th><td>{v['patients']}</td><td>{v['positive']}</td><td>{v['negative']}</td>"
                         f"<td>{sizes['patches'].get(s, 0)}</td></tr>" for s, v in sizes.items() if s != "patches")
    pictures = []
    for name, caption in (("preprocess_montage.png", "One slice through every preprocessing stage"),
                          ("patch_grid_candidates.png", "Candidate (green: malignant-or-nodule class 1) and negative patches")):
        if (folder / name).exists():
            pictures.append(f"<figure><img src='{name}'><figcaption>{caption}</figcaption></figure>")
    evidence_html = "".join(
        f"<figure><img src='{n}'><figcaption>patient {html.escape(p)} · label {lab} · ensemble p={pr:.2f}"
        f"</figcaption></figure>" for p, lab, pr, n in evidence_rows)
    control_text = "; ".join(f"{level} mean {np.mean(v):.2f} (range {min(v):.2f}-{max(v):.2f})"
                             for level, v in meta["control_aucs"].items())
    page_html = f"""<!doctype html><html><head><meta charset=utf-8><title>ctlake run {summary['run_id']}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}}
table{{border-collapse:collapse;margin:0.5em 0}}td,th{{border:1px solid #ddd;padding:4px 8px;text-align:left;font-size:13px}}
.ci{{color:#888;font-size:11px}}table.cm td{{border:none;padding:0 4px;font-size:11px}}
figure{{display:inline-block;margin:0.5em}}img{{max-width:100%}}figcaption{{font-size:12px;color:#555}}</style></head><body>
<h1>ctlake training run <code>{summary['run_id']}</code></h1>
<p>Patch classifiers aggregated to a patient-level probability of cancer ({html.escape(meta['aggregate'])} of the
patch probabilities). Thresholds are chosen on the validation patients (Youden's J) and applied to the held-out
test patients; intervals are 95% bootstrap intervals over test patients. The shuffled-label control is the
forest trained on permuted labels: it should score near 0.5, showing that nothing but the label carries signal.
Over {len(meta['control_aucs'].get('patient', []))} permutations its test AUC was {control_text}.</p>
<h2>Cohort and split</h2><table><tr><th>split</th><th>patients</th><th>with cancer</th><th>without</th><th>patches</th></tr>
{split_rows}</table>
<p>Random forest: best of {len(meta['rf_cv_auc'])} settings by {settings.train.folds}-fold
patient-grouped cross-validation: {html.escape(str(meta['rf_best']))}. SVM ensemble
({settings.train.svm.partitions} per-partition SVCs): {html.escape(str(meta['svm_best']))},
chosen on validation patients. Training seconds: {html.escape(str(meta['timings_s']))}.</p>
<h2>Patient level (test)</h2>{metrics_table(results, 'patient')}
<h2>Nodule level (test nodules rated malignant or benign)</h2>{metrics_table(results, 'nodule')}
<h2>Patch level (test)</h2>{metrics_table(results, 'patch')}
<h2>ROC curves</h2><figure><img src='roc_patient.png'></figure><figure><img src='roc_patch.png'></figure>
<h2>What the forest looks at</h2><figure><img src='importances.png'></figure>
<h2>Evidence for test patients</h2><p>The patches that drove each patient's ensemble score, boxed on their slices.</p>
{evidence_html}
<h2>Preprocessing and patches</h2>{''.join(pictures)}
</body></html>"""
    return page_html

