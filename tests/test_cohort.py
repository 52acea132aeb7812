"""Tests of the sample-cohort generator: LIDC parsing, clustering, rendering, DICOM geometry, leakage."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sklearn.metrics import roc_auc_score

from ctlake.cohort import dicom_writer, lidc, nodule, render
from ctlake.cohort.output import generate_patient
from ctlake.cohort.plan import CohortSettings, PatientSpec, choose_slab, plan_cohort
from ctlake.errors import ConfigError, InputError
from ctlake.spark.cohort import run

# ---------------------------------------------------------------- helpers

def shape_features(mask: np.ndarray, spacing_mm: tuple) -> list[float]:
    """Simple shape figures of a 3-D nodule mask: size, compactness, elongation, extent, solidity."""
    import cv2

    dz, dy, dx = spacing_mm
    voxels = np.argwhere(mask).astype(float) * np.array([dz, dy, dx])
    volume = len(voxels) * dz * dy * dx
    padded = np.pad(mask, 1)
    faces = sum(np.count_nonzero(np.diff(padded.astype(np.int8), axis=a)) * area
                for a, area in ((0, dy * dx), (1, dz * dx), (2, dz * dy)))
    eig = np.sort(np.linalg.eigvalsh(np.cov(voxels.T) + 1e-6 * np.eye(3)))[::-1] if len(voxels) > 3 else np.ones(3)
    largest = mask[int(np.argmax(mask.sum(axis=(1, 2))))].astype(np.uint8)
    contours, _ = cv2.findContours(largest, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    points = np.concatenate(contours)
    hull_area = cv2.contourArea(cv2.convexHull(points))
    solidity = largest.sum() / hull_area if hull_area > 0 else 1.0
    axial = max(cv2.minAreaRect(points)[1]) * dx
    return [volume, (6 * volume / math.pi) ** (1 / 3), math.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / max(faces, 1e-6),
            math.sqrt(eig[1] / eig[0]), math.sqrt(eig[2] / eig[0]), mask.any(axis=(1, 2)).sum() * dz,
            solidity, axial, faces]


def nodule_mean_hu(volume: np.ndarray, placed: render.PlacedNodule) -> float:
    """Mean HU of the rendered volume inside a placed nodule's mask."""
    k, r, c = placed.first_slice, placed.row0, placed.col0
    depth, rows, cols = placed.mask.shape
    return float(volume[k:k + depth, r:r + rows, c:c + cols][placed.mask].mean())


def symmetric_auc(labels, scores) -> float:
    """AUC of the better direction: how well a statistic separates the classes, whichever way."""
    auc = roc_auc_score(labels, scores)
    return max(auc, 1.0 - auc)


def read_hu(path: Path) -> tuple[pydicom.Dataset, np.ndarray]:
    ds = pydicom.dcmread(path)
    return ds, ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def square(x0, y0, side):
    return np.array([[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side]], dtype=float)


def annotation(annotation_id, outlines, z=(0.0,), malignancy=3, inclusion=True):
    ratings = dict.fromkeys(lidc.RATINGS, 3)
    ratings.update(malignancy=malignancy, calcification=6, internal_structure=1)
    contours = tuple(lidc.Contour(zz, inclusion, xy) for zz in z for xy in outlines)
    return lidc.Annotation(annotation_id, ratings, contours)


@pytest.fixture(scope="module")
def db_path() -> Path:
    return lidc.default_db_path()


@pytest.fixture(scope="module")
def small_specs(db_path) -> list[PatientSpec]:
    return plan_cohort(db_path, CohortSettings(patients=6, slices=12, matrix=96, seed=3, no_nodule_fraction=0.0,
                                               rle_fraction=0.5))


# ---------------------------------------------------------------- LIDC data

def test_parse_contour_gives_columns_and_rows():
    xy = lidc.parse_contour("364,172\n365,171\n366,171\n")
    np.testing.assert_array_equal(xy, [[364, 172], [365, 171], [366, 171]])


def test_database_has_the_documented_tables(db_path):
    conn = lidc.connect(db_path)
    try:
        scans = lidc.read_scans(conn)
        assert len(scans) == 1018
        assert all(np.all(np.diff(s.z_positions) > 0) for s in scans)
        annotations = lidc.read_annotations(conn, 1)
        assert annotations and all(a.contours for a in annotations)
    finally:
        conn.close()


def test_cluster_annotations_groups_readers_of_the_same_nodule():
    near = [annotation(i, [square(100 + i, 100, 6)]) for i in range(3)]
    far = [annotation(10 + i, [square(300, 300 + i, 6)]) for i in range(2)]
    clusters = lidc.cluster_annotations(near + far, pixel_spacing=0.7)
    assert [[a.annotation_id for a in c] for c in clusters] == [[0, 1, 2], [10, 11]]


def test_cluster_annotations_splits_clusters_of_more_than_four_readers():
    # 4.5 mm apart: linked at the 5 mm start tolerance, split once it shrinks.
    group_a = [annotation(i, [square(100, 100, 6)]) for i in range(3)]
    group_b = [annotation(10 + i, [square(104.5, 100, 6)]) for i in range(2)]
    clusters = lidc.cluster_annotations(group_a + group_b, pixel_spacing=1.0)
    assert sorted(len(c) for c in clusters) == [2, 3]


def test_consensus_is_the_half_majority_of_filled_contours():
    z = np.array([0.0, 1.0, 2.0])
    readers = [annotation(1, [square(10, 10, 10)]), annotation(2, [square(15, 10, 10)]),
               annotation(3, [square(40, 40, 4)])]
    consensus = lidc.consensus_mask(readers, z, level=0.5)
    # Two of three readers: only the overlap x 15..20, y 10..20 (boundary pixels included).
    assert consensus.mask.shape[0] == 1 and consensus.first_slice == 0
    rows, cols = np.nonzero(consensus.mask[0])
    assert (rows.min() + consensus.row0, rows.max() + consensus.row0) == (10, 20)
    assert (cols.min() + consensus.col0, cols.max() + consensus.col0) == (15, 20)


def test_consensus_cuts_out_exclusion_holes():
    z = np.array([0.0])
    outline = lidc.Annotation(1, annotation(1, []).ratings,
                              (lidc.Contour(0.0, True, square(10, 10, 20)), lidc.Contour(0.0, False, square(15, 15, 10))))
    consensus = lidc.consensus_mask([outline], z)
    assert not consensus.mask[0, 20 - consensus.row0, 20 - consensus.col0]
    assert consensus.mask[0, 11 - consensus.row0, 11 - consensus.col0]


@pytest.mark.parametrize("mean, label", [(1.0, "benign"), (2.5, "benign"), (2.75, "indeterminate"),
                                         (3.25, "indeterminate"), (3.5, "malignant"), (5.0, "malignant")])
def test_malignancy_rule(mean, label):
    assert lidc.malignancy_label(mean) == label


def test_median_ratings_use_the_lower_median_for_categories():
    readers = [annotation(1, [square(0, 0, 3)]), annotation(2, [square(0, 0, 3)])]
    readers[0].ratings.update(calcification=3, texture=4)
    readers[1].ratings.update(calcification=6, texture=5)
    medians = lidc.median_ratings(readers)
    assert medians["calcification"] == 3 and medians["texture"] == 4.5


def test_choose_slab_keeps_the_most_whole_nodules():
    start, inside = choose_slab(100, [(10, 12), (20, 24), (60, 62)], slices=16)
    assert inside == [0, 1] and start <= 10 and start + 15 >= 24
    assert choose_slab(100, [(10, 40)], slices=16) == (0, [])


# ---------------------------------------------------------------- rendering

def sphere_occupancy(radius_px=6.0, size=24):
    grid = np.indices((size, size, size)) - (size - 1) / 2
    return (np.sqrt((grid ** 2).sum(axis=0)) <= radius_px).astype(np.float32)


def ratings(**changes):
    base = {"texture": 5.0, "calcification": 6, "internal_structure": 1, "spiculation": 1.0}
    return {**base, **changes}


@pytest.mark.parametrize("texture, low, high", [(1.0, -650, -400), (5.0, 0, 60)])
def test_nodule_hu_follows_the_texture_rating(texture, low, high):
    occupancy = sphere_occupancy()
    hu, _ = nodule.render_nodule(occupancy, ratings(texture=texture), (1.0, 1.0, 1.0), np.random.default_rng(0))
    assert low <= float(np.median(hu[occupancy > 0])) <= high


def test_part_solid_nodule_has_a_solid_core_in_ground_glass():
    occupancy = sphere_occupancy()
    hu, _ = nodule.render_nodule(occupancy, ratings(texture=3.0), (1.0, 1.0, 1.0), np.random.default_rng(0))
    assert hu[12, 12, 12] > -50 and hu[12, 12, 6] < -300


@pytest.mark.parametrize("pattern", [1, 2, 3, 4, 5])
def test_calcification_is_dense(pattern):
    occupancy = sphere_occupancy()
    hu, _ = nodule.render_nodule(occupancy, ratings(calcification=pattern), (1.0, 1.0, 1.0),
                                 np.random.default_rng(0))
    assert hu[occupancy > 0].max() >= 300


def test_spicules_grow_out_of_the_contour():
    occupancy = sphere_occupancy(radius_px=4.0, size=40)
    _, plain = nodule.render_nodule(occupancy, ratings(spiculation=1.0), (1.0, 1.0, 1.0), np.random.default_rng(0))
    _, spiculated = nodule.render_nodule(occupancy, ratings(spiculation=5.0), (1.0, 1.0, 1.0),
                                         np.random.default_rng(0))
    np.testing.assert_array_equal(plain, occupancy)
    assert (spiculated > 0).sum() > (occupancy > 0).sum()


def test_occupancy_keeps_the_physical_size():
    mask = np.zeros((1, 64, 64), dtype=bool)
    mask[0, 16:48, 16:48] = True
    occupancy = nodule.occupancy_on_grid(mask, 100, 200, 128)
    assert occupancy.sum() == pytest.approx(32 * 32 / 16)


def test_rendered_patient_has_realistic_tissue(small_specs):
    spec = small_specs[0]
    rendered = render.render_patient(spec)
    volume = rendered.volume
    assert volume.shape == (12, 96, 96) and volume.dtype == np.float32
    assert np.median(volume[:, 0, :]) == pytest.approx(-1000, abs=30)  # air above the body
    assert np.percentile(volume, 99.9) > 300  # bone
    assert any(c[3] == 0 for c in rendered.candidates)
    assert sum(c[3] == 1 for c in rendered.candidates) == len(spec.nodules)


# ---------------------------------------------------------------- DICOM

def test_hu_to_stored_is_offset_and_clipped():
    np.testing.assert_array_equal(dicom_writer.hu_to_stored(np.array([-2000.0, -1024.0, 0.4, 40.0, 5000.0])),
                                  [0, 0, 1024, 1064, 4095])


@pytest.mark.parametrize("rle", [False, True])
def test_written_headers_locate_a_known_pixel(tmp_path, rle):
    grid = dicom_writer.image_grid(32, 1.40625)
    z = np.array([-100.5, -98.0, -95.5])
    volume = np.full((3, 32, 32), -1000.0, dtype=np.float32)
    volume[1, 5, 20] = 700.0
    person = {"StudyDate": "20200101", "StudyTime": "101010", "AccessionNumber": "A1", "Manufacturer": "X",
              "ManufacturerModelName": "Y", "InstitutionName": "I", "InstitutionAddress": "A",
              "ReferringPhysicianName": "R", "OperatorsName": "O", "PatientName": "P^Q", "PatientID": "MRN1",
              "IssuerOfPatientID": "I", "PatientBirthDate": "19500101", "PatientSex": "F",
              "OtherPatientIDs": "1", "PatientAge": "070Y", "PatientAddress": "S", "StudyID": "1"}
    paths = dicom_writer.write_series(volume, grid, z, 2.5, person, dicom_writer.series_uids("t"), tmp_path, rle=rle)
    ds, hu = read_hu(paths[1])
    assert ds.file_meta.TransferSyntaxUID == (pydicom.uid.RLELossless if rle else pydicom.uid.ExplicitVRLittleEndian)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
    assert hu[5, 20] == 700.0 and hu[0, 0] == -1000.0
    x = float(ds.ImagePositionPatient[0]) + 20 * float(ds.PixelSpacing[1])
    y = float(ds.ImagePositionPatient[1]) + 5 * float(ds.PixelSpacing[0])
    assert (x, y, float(ds.ImagePositionPatient[2])) == dicom_writer.pixel_to_world(grid, z[1], 5, 20)
    assert float(ds.SliceLocation) == -98.0 and ds.InstanceNumber == 2


def test_patient_is_deterministic_and_csv_points_at_the_nodule(tmp_path, small_specs):
    spec = next(s for s in small_specs if s.rle and s.nodules)
    first = generate_patient(spec, tmp_path / "a")
    second = generate_patient(spec, tmp_path / "b")
    files_a = sorted((tmp_path / "a").rglob("*.dcm"))
    files_b = sorted((tmp_path / "b").rglob("*.dcm"))
    assert len(files_a) == 12 and [p.relative_to(tmp_path / "a") for p in files_a] == \
        [p.relative_to(tmp_path / "b") for p in files_b]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(files_a, files_b))
    assert first == second

    # The CSV centre, mapped back through the written headers, lands inside the rendered nodule.
    rendered = render.render_patient(spec)
    target = max(rendered.nodules, key=lambda n: n.mask.sum())
    row = next(n for n in first["nodules"] if n["nodule_id"] == target.spec.nodule_id)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files_a]
    k = int(np.argmin([abs(float(h.ImagePositionPatient[2]) - row["coordZ"]) for h in headers]))
    spacing = float(headers[k].PixelSpacing[0])
    col = round((row["coordX"] - float(headers[k].ImagePositionPatient[0])) / spacing)
    r = round((row["coordY"] - float(headers[k].ImagePositionPatient[1])) / spacing)
    local = (k - target.first_slice, r - target.row0, col - target.col0)
    assert all(0 <= i < n for i, n in zip(local, target.mask.shape))
    assert target.mask[local]


# ---------------------------------------------------------------- leakage

def test_no_two_patients_come_from_one_lidc_patient(db_path):
    """LIDC-IDRI-0151 and -0355 have two scans each: a cohort must still use each real patient once."""
    specs = plan_cohort(db_path, CohortSettings(patients=500, slices=32, matrix=64, seed=11, no_nodule_fraction=0.25))
    patients = [s.lidc_patient_id for s in specs]
    assert len(patients) == 500
    assert len(set(patients)) == 500


def test_a_cohort_larger_than_the_distinct_patients_is_refused(db_path):
    # 135 LIDC patients have no annotation: 200 nodule-free patients cannot be distinct.
    with pytest.raises(InputError, match="distinct LIDC patients without nodules"):
        plan_cohort(db_path, CohortSettings(patients=200, slices=12, matrix=64, seed=3, no_nodule_fraction=1.0))


def test_trivial_pixel_statistics_do_not_give_the_label_away(db_path):
    """Mean HU of a patient's volume, or inside a nodule, must not separate malignant from benign.

    The label may reach the pixels only through rated attributes and the real
    shape; a statistic with AUC near 1 would mean a shortcut real CT lacks.
    """
    specs = plan_cohort(db_path, CohortSettings(patients=36, slices=10, matrix=64, seed=5, no_nodule_fraction=0.0))
    patient_means, patient_labels, nodule_means, nodule_labels = [], [], [], []
    for spec in specs:
        rendered = render.render_patient(spec)
        labels = [n.spec.label for n in rendered.nodules]
        if {"malignant", "benign"} & set(labels):
            patient_means.append(float(rendered.volume.mean()))
            patient_labels.append(int("malignant" in labels))
        for placed in rendered.nodules:
            if placed.spec.label != "indeterminate" and placed.mask.any():
                nodule_means.append(nodule_mean_hu(rendered.volume, placed))
                nodule_labels.append(int(placed.spec.label == "malignant"))
    assert 3 <= sum(nodule_labels) <= len(nodule_labels) - 3
    assert symmetric_auc(patient_labels, patient_means) < 0.9
    assert symmetric_auc(nodule_labels, nodule_means) < 0.9


# ---------------------------------------------------------------- configuration and Spark

def test_settings_reject_bad_values(base_config):
    assert base_config.cohort.plan().matrix == 256
    for key, value in (("cohort.matrix", 8), ("cohort.patients", 0), ("cohort.no_nodule_fraction", 1.5),
                       ("cohort.slices", "many")):
        with pytest.raises(ConfigError, match=key):
            base_config.updated({key: value})


def test_run_writes_series_and_consistent_tables(spark, base_config, tmp_path):
    config = base_config.updated({"cohort.patients": 4, "cohort.slices": 8, "cohort.matrix": 64,
                                  "cohort.no_nodule_fraction": 0.25, "cohort.rle_fraction": 0.5})
    summary = run(spark, config, tmp_path)
    assert summary["patients"] == 4 and summary["files"] == 32
    assert summary["patients_without_nodules"] == 1

    def table(name):
        with (tmp_path / name).open() as handle:
            return list(csv.DictReader(handle))

    labels, annotations, nodules = table("labels.csv"), table("annotations.csv"), table("nodules.csv")
    series = {p.parent.name for p in tmp_path.rglob("*.dcm")}
    assert {row["seriesuid"] for row in labels} == series
    assert len(annotations) == len(nodules) == sum(int(row["n_nodules"]) for row in labels)
    assert sum(int(row["class"]) for row in table("candidates.csv")) == len(nodules)
    for row in labels:
        assert int(row["label"]) == int(int(row["n_malignant"]) > 0)
    assert list(table("annotations.csv")[0]) == ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
