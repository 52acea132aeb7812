"""The CT slice pipeline: each step against OpenCV or a direct formula, the lung mask on a known phantom."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from ctlake.config import load_config
from ctlake.core.slice_ops import (
    WINDOW_PRESETS,
    PreprocessChain,
    adaptive_threshold,
    denoise,
    equalize,
    hu_window,
    lung_mask,
    montage,
    slice_quality,
)
from ctlake.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# Every int16 value once, as a 256x256 slice.
ALL_HU = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16).reshape(256, 256)


def direct_window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """hu_window's documented rule, computed per pixel."""
    lower = level - width / 2.0
    return np.clip(np.floor(255.0 * (hu.astype(np.float64) - lower) / width + 0.5), 0, 255).astype(np.uint8)


def phantom(size: int = 128, seed: int | None = None) -> dict:
    """A chest slice with known lungs: HU image, true lung mask and the parts of interest.

    A 40 HU body ellipse in -1000 HU air; two -850 HU lung ellipses; inside
    the left lung a 40 HU nodule, inside the right a 40 HU vessel; a small
    trachea of air in the body; a juxtapleural nodule bulging into the right
    lung from its lateral wall.  The truth is the two lung ellipses whole.
    """
    s = size / 128
    c = size // 2
    hu = np.full((size, size), -1000, dtype=np.int16)
    cv2.ellipse(hu, (c, c), (round(56 * s), round(40 * s)), 0, 0, 360, 40, -1)
    truth = np.zeros((size, size), dtype=np.uint8)
    left, right = c - round(24 * s), c + round(24 * s)
    for x in (left, right):
        cv2.ellipse(truth, (x, c), (round(16 * s), round(28 * s)), 0, 0, 360, 1, -1)
    hu[truth == 1] = -850
    parts = {name: np.zeros_like(truth) for name in ("nodule", "vessel", "trachea", "juxtapleural")}
    cv2.circle(parts["nodule"], (left, c - round(8 * s)), round(4 * s), 1, -1)
    cv2.line(parts["vessel"], (right - round(6 * s), c - round(10 * s)), (right + round(6 * s), c + round(12 * s)),
             1, max(1, round(2 * s)))
    cv2.circle(parts["trachea"], (c, c - round(30 * s)), round(3 * s), 1, -1)
    cv2.circle(parts["juxtapleural"], (right + round(16 * s), c), round(3 * s), 1, -1)
    for name in ("nodule", "vessel", "juxtapleural"):
        hu[parts[name] == 1] = 40
    hu[parts["trachea"] == 1] = -1000
    if seed is not None:
        noise = np.random.default_rng(seed).normal(0.0, 20.0, hu.shape)
        hu = np.clip(hu + noise, -1024, 3071).astype(np.int16)
    return {"hu": hu, "truth": truth, **parts}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.astype(bool) & b.astype(bool)).sum() / (a.astype(bool) | b.astype(bool)).sum())


@pytest.fixture(scope="module")
def gray() -> np.ndarray:
    """A windowed noisy phantom: real structure plus noise for the 8-bit steps."""
    return hu_window(phantom(seed=1)["hu"], *WINDOW_PRESETS["lung"])


# --- hu_window ------------------------------------------------------------------------------------

@pytest.mark.parametrize("level, width", [*WINDOW_PRESETS.values(), (0.5, 3.0), (-1024.0, 1.0), (0.0, 65535.0)])
def test_hu_window_equals_the_direct_formula_over_the_whole_int16_range(level, width):
    assert np.array_equal(hu_window(ALL_HU, level, width), direct_window(ALL_HU, level, width))


def test_hu_window_rounding_and_clipping_at_known_values():
    # lung window: lower -1350, upper 150; -600 maps to 127.5, rounded half up.
    hu = np.array([[-32768, -1351, -1350, -600, -599, 149, 150, 32767]], dtype=np.int16)
    assert hu_window(hu, -600.0, 1500.0).tolist() == [[0, 0, 0, 128, 128, 255, 255, 255]]
    # 255 * (hu + 1350) / 1500: -601 -> 127.33, -1301 -> 8.33, -1300 -> 8.5 exactly (half up to 9).
    assert hu_window(np.array([[-601, -1301, -1300]], dtype=np.int16), -600.0, 1500.0).tolist() == [[127, 8, 9]]


def test_hu_window_accepts_non_contiguous_views():
    view = ALL_HU[::3, 1::2]
    assert np.array_equal(hu_window(view, 40.0, 400.0), direct_window(view, 40.0, 400.0))


def test_hu_window_rejects_other_dtypes_and_bad_width():
    with pytest.raises(TypeError, match="expected a 2-D int16 array of Hounsfield units, found float64"):
        hu_window(ALL_HU.astype(np.float64), -600.0, 1500.0)
    with pytest.raises(ConfigError, match="width must be a finite number > 0, found 0"):
        hu_window(ALL_HU, 40.0, 0)


# --- 8-bit steps against OpenCV ------------------------------------------------------------------

def test_equalize_equals_opencv(gray):
    assert np.array_equal(equalize(gray), cv2.equalizeHist(gray))
    expected = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(4, 4)).apply(gray)
    assert np.array_equal(equalize(gray, "clahe", clip_limit=3.0, tile_grid=4), expected)
    assert not np.array_equal(expected, cv2.equalizeHist(gray))


def test_denoise_equals_opencv(gray):
    assert np.array_equal(denoise(gray, "median", ksize=5), cv2.medianBlur(gray, 5))
    assert np.array_equal(denoise(gray, "gaussian", ksize=5, sigma=1.5), cv2.GaussianBlur(gray, (5, 5), 1.5))
    assert np.array_equal(denoise(gray, "bilateral", d=7, sigma_color=30.0, sigma_space=20.0),
                          cv2.bilateralFilter(gray, 7, 30.0, 20.0))
    assert not np.array_equal(denoise(gray), gray)


@pytest.mark.parametrize("method, flag", [("gaussian", cv2.ADAPTIVE_THRESH_GAUSSIAN_C),
                                          ("mean", cv2.ADAPTIVE_THRESH_MEAN_C)])
@pytest.mark.parametrize("invert", [False, True])
def test_adaptive_threshold_equals_opencv(gray, method, flag, invert):
    kind = cv2.THRESH_BINARY_INV if invert else cv2.THRESH_BINARY
    result = adaptive_threshold(gray, method, block_size=15, c=3.0, invert=invert)
    assert np.array_equal(result, cv2.adaptiveThreshold(gray, 255, flag, kind, 15, 3.0))
    assert set(np.unique(result)) == {0, 255}


def test_eight_bit_steps_reject_hu_input():
    with pytest.raises(TypeError, match="expected a 2-D uint8 image"):
        denoise(phantom()["hu"])


# --- lung mask and quality -----------------------------------------------------------------------

@pytest.mark.parametrize("size, seed", [(128, None), (128, 3), (512, 4)])
def test_lung_mask_finds_both_lungs_with_their_nodule_and_vessel(size, seed):
    p = phantom(size, seed)
    mask = lung_mask(p["hu"])
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert iou(mask, p["truth"]) > 0.98
    assert mask[p["nodule"] == 1].all() and mask[p["vessel"] == 1].all()
    assert not mask[p["truth"] == 0].any()  # no outside air, body or trachea
    assert not mask[p["trachea"] == 1].any()
    count, _ = cv2.connectedComponents(mask)
    assert count - 1 == 2


def test_lung_mask_pulls_in_the_juxtapleural_nodule_with_the_close():
    p = phantom()
    bulge = (p["juxtapleural"] & p["truth"]) == 1
    assert lung_mask(p["hu"], closing_px=0)[bulge].mean() == 0.0
    assert lung_mask(p["hu"], closing_px=9)[bulge].mean() > 0.4


def test_lung_mask_closes_each_lung_alone_so_a_large_kernel_does_not_bridge_them():
    p = phantom()
    mask = lung_mask(p["hu"], closing_px=31)
    assert not mask[p["truth"] == 0].any()


def test_lung_mask_keeps_only_lungs_big_enough():
    p = phantom()
    lung_area = p["truth"].sum() / 2 / p["hu"].size
    right_half = np.arange(128) >= 64
    one_lung = np.where(right_half & (p["hu"] == -850), 40, p["hu"]).astype(np.int16)  # right lung consolidated
    assert iou(lung_mask(one_lung), p["truth"] * ~right_half) > 0.98
    assert not lung_mask(p["hu"], min_area_fraction=lung_area * 1.1).any()


def test_lung_mask_ignores_air_outside_the_body():
    hu = np.full((64, 64), -1000, dtype=np.int16)
    assert not lung_mask(hu).any()


def test_slice_quality_on_the_phantom_and_implausible_masks():
    p = phantom(seed=2)
    mask = lung_mask(p["hu"])
    quality = slice_quality(p["hu"], mask)
    assert quality["lung_fraction"] == mask.sum() / mask.size
    assert quality["lung_mean_hu"] == pytest.approx(p["hu"][mask == 1].astype(float).mean())
    assert quality["mask_valid"] is True

    empty = slice_quality(p["hu"], np.zeros_like(mask))
    assert empty == {"lung_fraction": 0.0, "lung_mean_hu": None, "mask_valid": False}
    body = (p["hu"] > -320).astype(np.uint8)  # plausible size, soft-tissue density
    assert 0.02 < slice_quality(p["hu"], body)["lung_fraction"] < 0.6
    assert slice_quality(p["hu"], body)["mask_valid"] is False
    tiny = np.zeros_like(mask)
    tiny[64, 40] = 1  # lung density, far too small
    assert slice_quality(p["hu"], tiny)["mask_valid"] is False
    with pytest.raises(ValueError, match=r"mask must be an array of the slice's shape \(128, 128\)"):
        slice_quality(p["hu"], mask[:10])


# --- PreprocessChain configuration --------------------------------------------------------------

DEFAULT_STEPS = [
    {"step": "window", "preset": "lung"},
    {"step": "equalize", "method": "clahe", "clip_limit": 2.0, "tile_grid": 8},
    {"step": "denoise", "method": "median", "ksize": 5},
    {"step": "threshold", "method": "gaussian", "block_size": 15, "c": 2},
    {"step": "lung_mask", "threshold_hu": -320},
]
W = {"step": "window", "preset": "lung"}


@pytest.mark.parametrize("steps, message", [
    ({"step": "window"}, "preprocess.steps: expected a list of steps, found dict"),
    ([], "preprocess.steps: expected at least a window step, found an empty list"),
    ([W, "denoise"], "preprocess.steps[1]: expected a mapping like {step: window, preset: lung}, found str"),
    ([W, {"method": "median"}], "preprocess.steps[1]: missing the 'step' key; expected one of window, equalize"),
    ([W, {"step": "blur"}], ("preprocess.steps[1]: unknown step 'blur'; expected one of window, equalize, "
                             "denoise, threshold, lung_mask")),
    ([W, {"step": "denoise", "kernel": 3}], ("preprocess.steps[1] (denoise): unknown parameter 'kernel'; "
                                             "expected some of method, ksize, sigma, d, sigma_color, sigma_space")),
    ([W, {"step": "denoise", "method": "median", "sigma": 1.0}],
     "preprocess.steps[1] (denoise): parameter 'sigma' is not used by method 'median'; it uses ksize"),
    ([W, {"step": "equalize", "method": "global", "clip_limit": 3.0}],
     "preprocess.steps[1] (equalize): parameter 'clip_limit' is not used by method 'global'; it uses none"),
    ([W, {"step": "denoise", "method": "median", "ksize": 4}],
     "preprocess.steps[1] (denoise): ksize must be an odd integer >= 3, found 4"),
    ([W, {"step": "denoise", "method": "median", "ksize": 1}],
     "preprocess.steps[1] (denoise): ksize must be an odd integer >= 3, found 1"),
    ([W, {"step": "denoise", "method": "gaussian", "ksize": 5.0}],
     "preprocess.steps[1] (denoise): ksize must be an odd integer >= 3, found 5.0"),
    ([W, {"step": "denoise", "method": "wavelet"}],
     "preprocess.steps[1] (denoise): method must be one of median, gaussian, bilateral, found 'wavelet'"),
    ([W, {"step": "denoise", "method": "bilateral", "sigma_color": 0}],
     "preprocess.steps[1] (denoise): sigma_color must be a finite number > 0, found 0"),
    ([W, {"step": "threshold", "block_size": 10}],
     "preprocess.steps[1] (threshold): block_size must be an odd integer >= 3, found 10"),
    ([W, {"step": "threshold", "invert": "yes"}],
     "preprocess.steps[1] (threshold): invert must be true or false, found 'yes'"),
    ([W, {"step": "threshold", "c": "2"}], "preprocess.steps[1] (threshold): c must be a finite number, found '2'"),
    ([W, {"step": "equalize", "method": "clahe", "clip_limit": 0.0}],
     "preprocess.steps[1] (equalize): clip_limit must be a finite number > 0, found 0.0"),
    ([W, {"step": "equalize", "method": "clahe", "tile_grid": True}],
     "preprocess.steps[1] (equalize): tile_grid must be an integer >= 1, found True"),
    ([{"step": "window", "preset": "brain"}],
     "preprocess.steps[0] (window): preset must be one of lung, mediastinum, bone, soft_tissue, found 'brain'"),
    ([{"step": "window", "level": 40, "width": 0}],
     "preprocess.steps[0] (window): width must be a finite number > 0, found 0"),
    ([{"step": "window", "level": 40, "width": float("inf")}],
     "preprocess.steps[0] (window): width must be a finite number > 0, found inf"),
    ([{"step": "window", "level": 40}],
     "preprocess.steps[0] (window): give either preset or both level and width, found only level"),
    ([{"step": "window"}], "preprocess.steps[0] (window): give either preset or both level and width, found neither"),
    ([{"step": "window", "preset": "lung", "width": 100}],
     ("preprocess.steps[0] (window): give either preset or level and width: preset lung is level -600, "
      "width 1500, found width 100")),
    ([{"step": "lung_mask", "min_area_fraction": 1.0}, W],
     "preprocess.steps[0] (lung_mask): min_area_fraction must be a finite number >= 0 and < 1, found 1.0"),
    ([{"step": "lung_mask", "closing_px": -1}, W],
     "preprocess.steps[0] (lung_mask): closing_px must be an integer >= 0, found -1"),
    ([{"step": "denoise"}, W], ("preprocess.steps[0] (denoise): denoise works on the 8-bit windowed image, so "
                                "it must come after a window step; found it before any window step")),
    ([{"step": "lung_mask"}, {"step": "threshold"}, W], "preprocess.steps[1] (threshold): threshold works on"),
    ([W, {"step": "denoise"}, {"step": "window", "preset": "bone"}],
     "preprocess.steps[2] (window): expected one window step, found a duplicate of preprocess.steps[0]"),
    ([W, {"step": "lung_mask"}, {"step": "lung_mask"}],
     "preprocess.steps[2] (lung_mask): expected one lung_mask step, found a duplicate of preprocess.steps[1]"),
    ([{"step": "lung_mask"}], ("preprocess.steps: expected one window step (every other image step works on "
                               "its 8-bit output), found only lung_mask")),
])
def test_config_errors_name_the_step_and_say_what_was_expected(steps, message):
    with pytest.raises(ConfigError) as caught:
        PreprocessChain.from_config(steps)
    assert message in str(caught.value)


def test_steps_are_normalized_with_defaults_and_resolved_presets():
    chain = PreprocessChain.from_config(DEFAULT_STEPS)
    assert chain.steps == [
        {"step": "window", "preset": "lung", "level": -600.0, "width": 1500.0},
        {"step": "equalize", "method": "clahe", "clip_limit": 2.0, "tile_grid": 8},
        {"step": "denoise", "method": "median", "ksize": 5},
        {"step": "threshold", "method": "gaussian", "block_size": 15, "c": 2.0, "invert": False},
        {"step": "lung_mask", "threshold_hu": -320.0, "min_area_fraction": 0.005, "closing_px": 5},
    ]


def test_config_hash_is_stable_for_equivalent_configs_and_changes_with_any_parameter_or_order():
    base = PreprocessChain.from_config(DEFAULT_STEPS).config_hash()
    assert len(base) == 16 and set(base) <= set("0123456789abcdef")
    spelled_out = [
        {"preset": "lung", "step": "window"},
        {"tile_grid": 8, "clip_limit": 2, "method": "clahe", "step": "equalize"},
        {"ksize": 5, "step": "denoise"},
        {"c": 2.0, "invert": False, "block_size": 15, "method": "gaussian", "step": "threshold"},
        {"closing_px": 5, "min_area_fraction": 0.005, "threshold_hu": -320.0, "step": "lung_mask"},
    ]
    assert PreprocessChain.from_config(spelled_out).config_hash() == base

    def changed(index, **params):
        steps = [dict(step) for step in DEFAULT_STEPS]
        steps[index].update(params)
        return PreprocessChain.from_config(steps).config_hash()

    variants = {changed(1, clip_limit=2.5), changed(2, ksize=3), changed(3, c=3), changed(3, invert=True),
                changed(4, closing_px=9), changed(0, preset="mediastinum"),
                PreprocessChain.from_config([DEFAULT_STEPS[i] for i in (0, 2, 1, 3, 4)]).config_hash(),
                PreprocessChain.from_config(DEFAULT_STEPS[:4]).config_hash()}
    assert base not in variants and len(variants) == 8


def test_normalized_steps_rebuild_the_same_chain():
    # The Spark side ships chain.steps to the executors and rebuilds the chain there.
    chain = PreprocessChain.from_config(DEFAULT_STEPS)
    rebuilt = PreprocessChain.from_config(chain.steps)
    assert rebuilt.steps == chain.steps and rebuilt.config_hash() == chain.config_hash()


def test_the_configured_default_chain_is_valid():
    steps = load_config(ROOT / "conf" / "local.yaml")["preprocess"]["steps"]
    assert [step["step"] for step in PreprocessChain.from_config(steps).steps] == list(PreprocessChain.STEPS)


# --- PreprocessChain.apply and montage -----------------------------------------------------------

def test_apply_equals_calling_the_functions_in_order():
    hu = phantom(seed=5)["hu"]
    result = PreprocessChain.from_config(DEFAULT_STEPS).apply(hu)
    windowed = hu_window(hu, -600.0, 1500.0)
    equalized = equalize(windowed, "clahe", clip_limit=2.0, tile_grid=8)
    denoised = denoise(equalized, "median", ksize=5)
    thresholded = adaptive_threshold(denoised, "gaussian", block_size=15, c=2.0)
    assert list(result["stages"]) == ["window", "equalize", "denoise", "threshold"]
    for got, expected in zip(result["stages"].values(), [windowed, equalized, denoised, thresholded]):
        assert np.array_equal(got, expected)
    assert result["image"] is result["stages"]["denoise"]  # threshold is a branch, not the image
    assert np.array_equal(result["threshold"], thresholded)
    assert np.array_equal(result["mask"], lung_mask(hu, threshold_hu=-320.0))


def test_apply_without_optional_steps_and_with_a_repeated_step():
    hu = phantom()["hu"]
    steps = [{"step": "window", "level": 40, "width": 400}, {"step": "denoise", "method": "median"},
             {"step": "denoise", "method": "gaussian", "ksize": 5}]
    result = PreprocessChain(steps).apply(hu)
    assert result["mask"] is None and result["threshold"] is None
    assert list(result["stages"]) == ["window", "denoise", "denoise_2"]
    expected = denoise(denoise(hu_window(hu, 40.0, 400.0), "median"), "gaussian", ksize=5)
    assert np.array_equal(result["image"], expected)


def test_montage_puts_stages_side_by_side_and_the_mask_in_green_last():
    hu = phantom()["hu"]
    result = PreprocessChain.from_config(DEFAULT_STEPS).apply(hu)
    picture = montage(result["stages"], result["mask"], titles=False)
    assert picture.dtype == np.uint8 and picture.shape == (128, 128 * 5, 3)
    assert np.array_equal(picture[:, :128], cv2.cvtColor(result["stages"]["window"], cv2.COLOR_GRAY2BGR))
    overlay = picture[:, 4 * 128:].astype(int)
    inside, outside = result["mask"] == 1, result["mask"] == 0
    assert (overlay[inside][:, 1] > overlay[inside][:, 0]).all()  # green over the lungs
    assert (overlay[outside][:, 0] == overlay[outside][:, 1]).all()  # grey elsewhere

    titled = montage(result["stages"], None)
    assert titled.shape == (128, 128 * 4, 3) and not np.array_equal(titled, picture[:, :4 * 128])
    ok, png = cv2.imencode(".png", titled)
    assert ok and png.size > 0
