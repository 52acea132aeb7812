"""Realistic but fake identifying data, so the de-identification step has something to remove.

Drawn from small built-in lists with a seeded generator: the same seed and
patient give the same person, and nothing depends on the patient's label.
"""
from __future__ import annotations

import datetime as dt

import numpy as np

_FEMALE = ("MARY", "PATRICIA", "LINDA", "BARBARA", "ELIZABETH", "JENNIFER", "MARIA", "SUSAN", "MARGARET",
           "DOROTHY", "LISA", "NANCY", "KAREN", "BETTY", "HELEN", "SANDRA", "DONNA", "CAROL", "RUTH", "SHARON")
_MALE = ("JAMES", "JOHN", "ROBERT", "MICHAEL", "WILLIAM", "DAVID", "RICHARD", "CHARLES", "JOSEPH", "THOMAS",
         "CHRISTOPHER", "DANIEL", "PAUL", "MARK", "DONALD", "GEORGE", "KENNETH", "STEVEN", "EDWARD", "BRIAN")
_LAST = ("SMITH", "JOHNSON", "WILLIAMS", "BROWN", "JONES", "GARCIA", "MILLER", "DAVIS", "RODRIGUEZ", "MARTINEZ",
         "HERNANDEZ", "LOPEZ", "GONZALEZ", "WILSON", "ANDERSON", "THOMAS", "TAYLOR", "MOORE", "JACKSON", "MARTIN",
         "LEE", "PEREZ", "THOMPSON", "WHITE", "HARRIS", "SANCHEZ", "CLARK", "RAMIREZ", "LEWIS", "ROBINSON")
_STREETS = ("OAK ST", "MAPLE AVE", "CEDAR LN", "PINE ST", "ELM DR", "WASHINGTON BLVD", "LAKE RD", "HILL ST",
            "PARK AVE", "RIVER RD", "SUNSET DR", "MAIN ST")
_CITIES = (("SPRINGFIELD", "IL", "627"), ("RIVERSIDE", "CA", "925"), ("FRANKLIN", "TN", "370"),
           ("GREENVILLE", "SC", "296"), ("MADISON", "WI", "537"), ("SALEM", "OR", "973"),
           ("FAIRVIEW", "NJ", "070"), ("CLINTON", "MS", "390"))
_INSTITUTIONS = (("ST. JUDE REGIONAL MEDICAL CENTER", "1200 HOSPITAL DR"),
                 ("MERCY GENERAL HOSPITAL", "400 MERCY WAY"),
                 ("UNIVERSITY HEALTH CLINIC", "55 CAMPUS RD"),
                 ("LAKESIDE IMAGING CENTER", "910 SHORE AVE"))
_DOCTORS = ("PATEL^ANIL^^DR", "NGUYEN^LINH^^DR", "OKAFOR^CHIDI^^DR", "MUELLER^ANNA^^DR", "ROSSI^MARCO^^DR",
            "COHEN^SARAH^^DR", "TANAKA^HIRO^^DR")
_OPERATORS = ("RT^JSMITH", "RT^MLOPEZ", "RT^KBROWN", "RT^TWHITE")
_SCANNERS = (("GE MEDICAL SYSTEMS", "LightSpeed VCT"), ("SIEMENS", "SOMATOM Definition AS"),
             ("TOSHIBA", "Aquilion ONE"), ("Philips", "Brilliance 64"))


def _pick(rng: np.random.Generator, items: tuple):
    return items[int(rng.integers(len(items)))]


def fake_identity(rng: np.random.Generator) -> dict:
    """One fake patient and study: DICOM keyword -> value (names, MRN, dates, addresses, staff).

    PatientAge agrees with PatientBirthDate and StudyDate; PatientSex with the first name.
    """
    sex = "F" if rng.random() < 0.5 else "M"
    first = _pick(rng, _FEMALE if sex == "F" else _MALE)
    last = _pick(rng, _LAST)
    middle = chr(ord("A") + int(rng.integers(26)))
    study = dt.date(2015, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 8)))
    age = int(rng.integers(45, 81))
    birth = dt.date(study.year - age, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365)))
    if (birth.month, birth.day) > (study.month, study.day):
        age -= 1
    city, state, zip3 = _pick(rng, _CITIES)
    institution, institution_street = _pick(rng, _INSTITUTIONS)
    manufacturer, model = _pick(rng, _SCANNERS)
    seconds = int(rng.integers(7 * 3600, 19 * 3600))
    return {
        "PatientName": f"{last}^{first}^{middle}",
        "PatientID": f"MRN{int(rng.integers(10_000_000, 99_999_999))}",
        "IssuerOfPatientID": institution.split()[0],
        "OtherPatientIDs": f"{int(rng.integers(100, 999))}-{int(rng.integers(10, 99))}-"
                           f"{int(rng.integers(1000, 9999))}",
        "PatientBirthDate": birth.strftime("%Y%m%d"),
        "PatientSex": sex,
        "PatientAge": f"{age:03d}Y",
        "PatientAddress": f"{int(rng.integers(1, 9999))} {_pick(rng, _STREETS)}, {city}, {state} "
                          f"{zip3}{int(rng.integers(10, 99))}",
        "InstitutionName": institution,
        "InstitutionAddress": f"{institution_street}, {city}, {state}",
        "ReferringPhysicianName": _pick(rng, _DOCTORS),
        "OperatorsName": _pick(rng, _OPERATORS),
        "AccessionNumber": f"A{int(rng.integers(10_000_000, 99_999_999))}",
        "StudyID": str(int(rng.integers(1000, 99999))),
        "StudyDate": study.strftime("%Y%m%d"),
        "StudyTime": f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
        "Manufacturer": manufacturer,
        "ManufacturerModelName": model,
    }
