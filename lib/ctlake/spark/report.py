"""The static HTML report of a training run: one folder per run that opens from disk, and an index of runs.

Everything a reader wants to look at rather than read: cohort and split
sizes, metrics per model with bootstrap intervals on the scoring path, FROC,
ROC, precision-recall and calibration curves, baselines, results by patient
group, feature importances, the preprocessing montage, the patch grid, and
for the test patients that matter (missed cancers, false alarms, the highest
scored) the evidence candidates boxed on their slices beside the true nodules.
"""
from __future__ import annotations

import html
import json
import shutil
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
from ctlake.core.metrics import METRICS, brier, calibration_bins, pr_points, roc_points  # noqa: E402
from ctlake.core.patch_geometry import SliceGeometry  # noqa: E402
from ctlake.core.slice_ops import WINDOW_PRESETS, hu_window  # noqa: E402
from ctlake.spark import tables  # noqa: E402

MODELS = ("random_forest", "svm_ensemble", "cnn", "ensemble_no_cnn", "ensemble", "oracle_nodule")
LEVELS = ("patient", "nodule", "patch")


STYLE = ("<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}"
         "table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}</style>")


def _num(value) -> str:
    return "–" if value is None else f"{value:.3f}"


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


def evidence_slices(spark: SparkSession, warehouse: str, evidence: list[dict]) -> dict:
    """The slices every evidence item lies on, read in one pass (pictures of many scans share it)."""
    wanted = sorted({e["sop_uid"] for e in evidence})
    if not wanted:
        return {}
    rows = (tables.read(spark, warehouse, tables.SLICES).filter(F.col("sop_uid").isin(wanted))
            .select("sop_uid", "pixels", "pixel_shape", "pixel_spacing_row", "pixel_spacing_col", "image_position",
                    "image_orientation").collect())
    return {r["sop_uid"]: r for r in rows}


def evidence_picture(by_sop: dict, evidence: list[dict], size_mm: float, path: Path,
                     nodules: list[dict] | None = None) -> bool:
    """The top candidates of one scan as red boxes on their slices (lung window), side by side.

    ``by_sop``: :func:`evidence_slices`.  ``nodules`` (patient mm ``coordX/Y/Z``,
    ``diameter_mm``): the true nodules, drawn as green circles (their section)
    on every panel whose slice cuts them.
    """
    if not evidence:
        return False
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
        geometry = SliceGeometry.from_slice_row(row)
        for nodule in nodules or []:
            xyz = np.array([nodule["coordX"], nodule["coordY"], nodule["coordZ"]], dtype=float)
            off = abs(float(np.dot(xyz, geometry.normal)) - geometry.z)
            radius = nodule["diameter_mm"] / 2
            if off < radius:
                r, c = geometry.world_to_pixel(xyz)
                cv2.circle(image, (int(round(c)), int(round(r))),
                           max(2, int(round(np.sqrt(radius ** 2 - off ** 2) / row["pixel_spacing_row"]))) + 2,
                           (0, 200, 0), 1)
        cv2.putText(image, f"#{rank} p={e['p']:.2f} slice {int(e['slice_index'])}", (4, 14),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 255, 255), 1, cv2.LINE_AA)
        panels.append(image)
    if not panels:
        return False
    height = max(p.shape[0] for p in panels)
    panels = [cv2.copyMakeBorder(p, 0, height - p.shape[0], 0, 4, cv2.BORDER_CONSTANT, value=(255, 255, 255))
              for p in panels]
    cv2.imwrite(str(path), np.hstack(panels))
    return True


def curve_figures(patients: pd.DataFrame, scores: dict[str, pd.DataFrame], aggregate_fn, folder: Path) -> None:
    """Precision-recall (patient and candidate level) and the patient-level calibration of the ensemble (test)."""
    fig, axes = plt.subplots(1, 2, figsize=(9.2, 4.2), dpi=110)
    for name, frame in scores.items():
        for ax, data, labels in ((axes[0], aggregate_fn(frame), "label"), (axes[1], frame, "target")):
            data = data[data["split"] == "test"]
            if data[labels].nunique() == 2:
                recall, precision, ap = pr_points(data[labels], data["p"])
                ax.step(recall, precision, where="post", label=f"{name.replace('_', ' ')} (AP {ap:.2f})")
    for ax, level in zip(axes, ("patient", "candidate")):
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(f"precision-recall, {level} level (test)")
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(folder / "pr.png")
    plt.close(fig)
    test = patients[patients["split"] == "test"]
    fig, ax = plt.subplots(figsize=(4.6, 4.2), dpi=110)
    bins = calibration_bins(test["label"], test["p"])
    ax.plot([0, 1], [0, 1], color="#bbb", linewidth=0.8)
    ax.plot([b["predicted"] for b in bins], [b["observed"] for b in bins], marker="o")
    for b in bins:
        ax.annotate(str(b["n"]), (b["predicted"], b["observed"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("predicted probability (ensemble)")
    ax.set_ylabel("observed share with cancer")
    ax.set_title(f"calibration, patients (test); Brier {brier(test['label'], test['p']):.3f}")
    fig.tight_layout()
    fig.savefig(folder / "calibration.png")
    plt.close(fig)


def patients_that_matter(patients: pd.DataFrame, threshold: float, k: int = 2) -> list[tuple[str, str]]:
    """(reason, patient) for the test patients a reader should look at: missed cancers, false alarms, top scored."""
    test = patients[patients["split"] == "test"].sort_values("p", ascending=False)
    missed = test[(test["label"] == 1) & (test["p"] < threshold)].head(k)
    alarms = test[(test["label"] == 0) & (test["p"] >= threshold)].head(k)
    chosen = [("missed cancer", p) for p in missed["patient_pseudonym"]]
    chosen += [("false alarm", p) for p in alarms["patient_pseudonym"]]
    seen = {p for _, p in chosen}
    chosen += [("highest scored", p) for p in test["patient_pseudonym"] if p not in seen][:k]
    return chosen


def run_folder(report_folder: str, run_id: str) -> Path:
    """Where one run's report lives: ``<report.folder>/runs/<run_id>/``."""
    path = Path(report_folder) / "runs" / run_id
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_report(spark: SparkSession, settings: Settings, summary: dict, meta: dict, scores: dict,
                 aggregate_fn) -> str:
    """Write the run's page and pictures under :func:`run_folder`, then the index of runs; return the run's page."""
    folder = run_folder(settings.report.folder, summary["run_id"])
    for name in (tables.MONTAGE_PNG, tables.patch_grid_png("detected")):
        source = Path(settings.report.folder) / name
        if source.exists():  # the pictures of the tables this run read
            shutil.copyfile(source, folder / name)
    for level in ("patient", "patch"):
        roc_figure(scores, level, folder / f"roc_{level}.png", aggregate_fn)
    patients = pd.DataFrame(meta["patient_scores"])
    curve_figures(patients, scores, aggregate_fn, folder)
    importance_figure(meta["importances"], folder / "importances.png")
    nodules = tables.read_annotations(spark, settings.patches.annotations).toPandas()
    chosen = patients_that_matter(patients, meta["thresholds"]["ensemble"])
    by_sop = evidence_slices(spark, settings.warehouse, [e for _, patient in chosen
                                                         for e in meta["evidence"]["ensemble"].get(patient, [])])
    evidence_rows = []
    for index, (reason, patient) in enumerate(chosen):
        items = meta["evidence"]["ensemble"].get(patient, [])
        name = f"evidence_{index}.png"
        truth = nodules[nodules["series_uid"].isin({e["series_uid"] for e in items})].to_dict("records")
        if evidence_picture(by_sop, items, settings.patches.size_mm, folder / name, truth):
            info = patients[patients["patient_pseudonym"] == patient].iloc[0]
            evidence_rows.append((reason, patient, info["group"], float(info["p"]), name))
    path = folder / tables.REPORT_HTML
    path.write_text(page(settings, summary, meta, evidence_rows, folder))
    write_index(spark, settings)
    return str(path)


def write_index(spark: SparkSession, settings: Settings) -> str:
    """``<report.folder>/index.html``: every run of the warehouse, newest first, linked to its page."""
    runs = (tables.read(spark, settings.warehouse, tables.RUNS)
            .select("run_id", "started_at", "git_commit", "metrics").orderBy(F.desc("run_id")).collect())
    rows = []
    for r in runs:
        patient = json.loads(r["metrics"]).get("ensemble", {}).get("patient", {})
        auc = patient.get("auc", {}).get("value")
        here = (Path(settings.report.folder) / "runs" / r["run_id"] / tables.REPORT_HTML).exists()
        link = f"<a href='runs/{r['run_id']}/index.html'>{r['run_id']}</a>" if here else r["run_id"]
        rows.append(f"<tr><td>{link}</td><td>{r['started_at']}</td><td><code>{(r['git_commit'] or '')[:10]}</code></td>"
                    f"<td>{'' if auc is None else f'{auc:.3f}'}</td></tr>")
    path = tables.report_file(settings.report.folder, tables.REPORT_HTML)
    path.write_text(f"""<!doctype html><html><head><meta charset=utf-8><title>ctlake runs</title>{STYLE}</head><body>
<h1>ctlake training runs</h1><p>Warehouse <code>{html.escape(settings.warehouse)}</code>. Patient AUC: the ensemble
on the test patients, through the scoring path.</p>
<table><tr><th>run</th><th>started (UTC)</th><th>commit</th><th>patient AUC</th></tr>{''.join(rows)}</table></body></html>""")
    return str(path)


def per_stage(values: dict) -> str:
    """``{"nodule": 2, "malignancy": 1}`` as ``2 (nodule) / 1 (malignancy)``."""
    return " / ".join(f"{v} ({stage})" for stage, v in values.items())


def ensemble_choice(meta: dict) -> str:
    """Per stage: the families the ensemble averages, and the validation AUCs that chose them."""
    parts = []
    for stage, c in meta["ensemble_choice"].items():
        parts.append(f"{stage}: {' + '.join(f.replace('_', ' ') for f in c['families'])} (validation AUC with the CNN "
                     f"{_num(c['validation_auc_all_families'])}, without {_num(c['validation_auc_without_cnn'])})")
    return "; ".join(parts)


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


def froc_table(detection: dict) -> str:
    """Sensitivity at LUNA16's false-positive rates and CPM: the detector alone, then with the nodule stage."""
    rates = list(next(iter(detection["system"].values()))["sensitivity"])
    head = "".join(f"<th>{float(r):g}</th>" for r in rates)
    body = []
    for source in ("system", "detector"):
        for group, r in detection[source].items():
            cells = "".join(f"<td>{v:.2f}</td>" for v in r["sensitivity"].values())
            body.append(f"<tr><th>{'detector + nodule stage' if source == 'system' else 'detector score'}</th>"
                        f"<td>{html.escape(group)}</td><td>{r['nodules']}</td>{cells}<td>{r['cpm']:.3f}</td>"
                        f"<td>{r['max_sensitivity']:.2f}</td></tr>")
    return (f"<table class=metrics><tr><th>ranked by</th><th>nodules</th><th>n</th>{head}<th>CPM</th>"
            f"<th>any candidate</th></tr>{''.join(body)}</table>")


PAGE_STYLE = """<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;font-size:13px}
.ci{color:#888;font-size:11px}table.cm td{border:none;padding:0 4px;font-size:11px}
figure{display:inline-block;margin:0.5em}img{max-width:100%}figcaption{font-size:12px;color:#555}
.notice{background:#fff4d6;border:1px solid #e0c060;padding:6px 10px}</style>"""


def intro(settings: Settings, summary: dict, meta: dict) -> str:
    """Title, provenance, the synthetic-cohort notice, how the figures were measured, and the null control."""
    synthetic = settings.cohort.output and settings.train.labels.startswith(str(settings.cohort.output))
    notice = ("<p class=notice>This run's cohort is <b>synthetic</b>: generated by <code>make_cohort</code> from real "
              "LIDC-IDRI annotations on a synthetic chest. Its figures say how ctlake behaves, not how it performs on "
              "patients.</p>" if synthetic else "")
    null, cv = meta["null_aucs"], meta.get("cv_patient_auc", [])
    control = (f"mean {np.mean(null):.3f}, 95% of permutations within {np.percentile(null, 2.5):.2f}-"
               f"{np.percentile(null, 97.5):.2f}" if null else "not defined (one class)")
    everyone = sum(v["patients"] for k, v in meta["split_sizes"].items() if k != "patches")
    cv_text = (f" Repeated patient-grouped cross-validation over all {everyone} patients ({len(cv)} repeats, "
               f"scikit-learn forests in both stages): patient AUC {np.mean(cv):.3f} "
               f"(range {min(cv):.3f}-{max(cv):.3f})." if cv else "")
    return f"""<h1>ctlake training run <code>{summary['run_id']}</code></h1>{notice}
<p><a href='../../index.html'>all runs</a> · commit <code>{html.escape(str(meta.get('git_commit')))}</code> ·
input Delta versions {html.escape(json.dumps(meta.get('input_versions', {})))} ·
pseudonyms under key {html.escape(', '.join(meta.get('key_fingerprints', [])) or 'unknown')}</p>
<p><b>Every headline figure is measured on the scoring path</b>: the validation and test patients' scans went
through the same preprocessing, candidate detection, patch cutting, features and models as a new scan, and
a patient's probability of cancer is the {html.escape(meta['aggregate'])} over the detected candidates of
P(nodule) x P(malignant). Thresholds are chosen on the validation patients (Youden's J) and applied to the
held-out test patients; intervals are 95% bootstrap intervals over test patients. Null control: the test
patients' labels permuted {len(null)} times against the fixed ensemble predictions give patient AUC
{control}; a model must stand clear of that band.{cv_text}</p>"""


def quality(meta: dict) -> str:
    """Precision-recall, calibration, results by patient group and the two baselines."""
    base = meta["baselines"]
    group_rows = "".join(f"<tr><th>{g}</th><td>{v['patients']}</td><td>{_num(v['mean_p'])}</td>"
                         f"<td>{_num(v['called_cancer'])}</td></tr>" for g, v in meta["groups"].items())
    return f"""<h2>Precision-recall and calibration</h2><figure><img src='pr.png'></figure>
<figure><img src='calibration.png'></figure>
<h2>By patient group (test, ensemble)</h2><table><tr><th>group</th><th>patients</th><th>mean p</th>
<th>called cancer</th></tr>{group_rows}</table>
<h2>Baselines (test)</h2><table><tr><th>reference</th><th>AUC</th></tr>
<tr><th>patient: the detector's largest candidate diameter alone</th><td>{_num(base['largest_candidate_diameter'])}</td></tr>
<tr><th>nodule: forest on the true diameter and the readers' ratings (the ceiling)</th>
<td>{_num(base['attribute_ceiling'])}</td></tr></table>"""


def page(settings: Settings, summary: dict, meta: dict, evidence_rows: list[tuple], folder: Path) -> str:
    """The run's HTML, pictures referenced by name from the same folder."""
    results, sizes, detection = meta["results"], meta["split_sizes"], meta["detection"]
    split_rows = "".join(f"<tr><th>{s}</th><td>{v['patients']}</td><td>{v['positive']}</td><td>{v['negative']}</td>"
                         f"<td>{sizes['patches'].get(s, 0)}</td></tr>" for s, v in sizes.items() if s != "patches")
    pictures = "".join(f"<figure><img src='{name}'><figcaption>{caption}</figcaption></figure>" for name, caption in (
        (tables.MONTAGE_PNG, "One slice through every preprocessing stage"),
        (tables.patch_grid_png("detected"), "Annotated-nodule (green) and detected-candidate patches"))
        if (folder / name).exists())
    evidence_html = "".join(
        f"<figure><img src='{n}'><figcaption><b>{reason}</b> · patient {html.escape(p[:14])}… · {group} · "
        f"ensemble p={pr:.2f}</figcaption></figure>" for reason, p, group, pr, n in evidence_rows)
    chosen = html.escape(str({k: v.get("rf_best", v.get("svm_best", v.get("cnn"))) for k, v in meta["tuning"].items()}))
    cnn = settings.train.cnn
    return f"""<!doctype html><html><head><meta charset=utf-8><title>ctlake run {summary['run_id']}</title>
{PAGE_STYLE}</head><body>{intro(settings, summary, meta)}
<h2>Cohort and split</h2><table><tr><th>split</th><th>patients</th><th>with cancer</th><th>without</th><th>patches</th></tr>
{split_rows}</table>
<p>Two stages, each a random forest (tuned by {settings.train.folds}-fold patient-grouped cross-validation),
an ensemble of {settings.train.svm.partitions} per-partition SVCs (tuned on the validation patients'
detected candidates) and 3D CNNs on the central {cnn.crop_px}^3 voxels of the patches (per stage
{html.escape(per_stage(cnn.partitions))} networks of at least {cnn.epochs} epochs and
{html.escape(per_stage(cnn.min_steps))} steps, not tuned): <i>nodule</i> tells nodules from the detector's other
candidates, <i>malignancy</i> malignant from benign nodules. Chosen settings: {chosen}.
Training seconds: {html.escape(str(meta['timings_s']))}.
The ensemble averages, per stage, every family where that ranks the validation patients' candidates better
than the forest and the SVMs alone: {html.escape(ensemble_choice(meta))}.</p>
<h2>Patient level (test, scoring path)</h2>{metrics_table(results, 'patient')}
<h2>Detection (test scans, LUNA16 FROC)</h2><p>Sensitivity at 1/8 .. 8 false positives per scan
({detection['candidates_per_scan']} candidates per scan). Hit rule: a candidate within an annotated nodule's
radius of its centre; the best hit counts once, hits on nodules under 3 mm are ignored. Nodules of 3 mm or more.</p>
{froc_table(detection)}{quality(meta)}
<h2>Nodule level (test nodules rated malignant or benign, as detected)</h2>{metrics_table(results, 'nodule')}
<p>The oracle row is a diagnostic only: the malignancy stage at the annotated nodule centres, which a new scan
does not have.</p>
<h2>Candidate level (test, detected candidates; target: at a malignant nodule)</h2>{metrics_table(results, 'patch')}
<h2>ROC curves</h2><figure><img src='roc_patient.png'></figure><figure><img src='roc_patch.png'></figure>
<h2>What the forest looks at</h2><p>The malignancy stage's forest.</p><figure><img src='importances.png'></figure>
<h2>Evidence for the test patients that matter</h2><p>Missed cancers, false alarms and the highest scored:
the candidates that drove each ensemble score as red boxes on their slices, the true nodules as green circles.</p>
{evidence_html}
<h2>Preprocessing and patches</h2>{pictures}
<h2>Configuration of this run</h2><details><summary>the merged settings</summary><pre>{html.escape(json.dumps(
settings.redacted(), indent=1, default=str))}</pre></details>
</body></html>"""
