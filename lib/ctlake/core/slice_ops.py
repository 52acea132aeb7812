"""The classical CT slice pipeline: window, equalize, denoise, threshold and lung mask.

Pure numpy/OpenCV functions on one axial slice, so a pandas UDF can call them
on executors and a test can call them on a 16x16 array.  A slice arrives as
Hounsfield units (HU), ``int16``, shape ``(rows, cols)`` (what
:func:`ctlake.dicom.hu_frame` returns); :func:`hu_window` turns it into the
8-bit image that :func:`equalize`, :func:`denoise` and
:func:`adaptive_threshold` work on, and :func:`lung_mask` works on the HU
values directly.  :class:`PreprocessChain` runs an ordered list of these steps
read from configuration (``preprocess.steps``) and validates all of it before
the first slice is touched.

Every function checks its parameters with the same rules the chain applies to
configuration and raises :class:`~ctlake.errors.ConfigError` when one is out
of range, because in ctlake those parameters always come from configuration.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import numbers

import cv2
import numpy as np

from ctlake.errors import ConfigError

WINDOW_PRESETS = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "soft_tissue": (50.0, 350.0),
}
"""Standard CT display windows as ``(level, width)`` in HU."""

EQUALIZE_METHODS = ("global", "clahe")
DENOISE_METHODS = ("median", "gaussian", "bilateral")
THRESHOLD_METHODS = {"gaussian": cv2.ADAPTIVE_THRESH_GAUSSIAN_C, "mean": cv2.ADAPTIVE_THRESH_MEAN_C}

# slice_quality: a lung mask is plausible when the lungs cover this fraction of
# the slice and their mean density is that of aerated lung (about -850 HU;
# above -500 HU the "lung" is mostly soft tissue, e.g. a mask of the abdomen).
LUNG_FRACTION_RANGE = (0.02, 0.6)
LUNG_MEAN_HU_RANGE = (-1000.0, -500.0)


# ---------------------------------------------------------------------------
# Parameter checks, shared by the functions and PreprocessChain.from_config.
# Each returns the value normalized (ints as int, reals as float) or raises
# ConfigError saying what was expected and what was found.

def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(name: str, value, minimum: int, odd: bool = False) -> int:
    if not _is_int(value) or value < minimum or (odd and value % 2 == 0):
        expected = f"an {'odd ' if odd else ''}integer >= {minimum}"
        raise ConfigError(f"{name} must be {expected}, found {value!r}")
    return int(value)


def _check_real(name: str, value, minimum: float | None = None, inclusive: bool = False,
                maximum: float | None = None) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value >= minimum if inclusive else value > minimum
    if ok and maximum is not None:
        ok = value < maximum
    if not ok:
        bounds = []
        if minimum is not None:
            bounds.append(f"{'>=' if inclusive else '>'} {minimum:g}")
        if maximum is not None:
            bounds.append(f"< {maximum:g}")
        expected = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
        raise ConfigError(f"{name} must be {expected}, found {value!r}")
    return float(value)


def _check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, found {value!r}")
    return value


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, found {value!r}")
    return value


def _window_params(preset, level, width) -> dict:
    """A window is a named preset or an explicit level and width.

    A preset may also carry its own level and width, as normalized steps do,
    so ``PreprocessChain(chain.steps)`` rebuilds the same chain.
    """
    if preset is not None:
        preset_level, preset_width = WINDOW_PRESETS[_check_choice("preset", preset, tuple(WINDOW_PRESETS))]
        if (level is not None and level != preset_level) or (width is not None and width != preset_width):
            given = ", ".join(f"{n} {v!r}" for n, v in (("level", level), ("width", width)) if v is not None)
            raise ConfigError(f"give either preset or level and width: preset {preset} is level "
                              f"{preset_level:g}, width {preset_width:g}, found {given}")
        level, width = preset_level, preset_width
    elif level is None or width is None:
        raise ConfigError("give either preset or both level and width, found "
                          + ("only level" if level is not None else "only width" if width is not None
                             else "neither"))
    return {"preset": preset, "level": _check_real("level", level),
            "width": _check_real("width", width, minimum=0.0)}


def _equalize_params(method, clip_limit, tile_grid) -> dict:
    method = _check_choice("method", method, EQUALIZE_METHODS)
    if method == "global":
        return {"method": method}
    return {"method": method, "clip_limit": _check_real("clip_limit", clip_limit, minimum=0.0),
            "tile_grid": _check_int("tile_grid", tile_grid, 1)}


def _denoise_params(method, ksize, sigma, d, sigma_color, sigma_space) -> dict:
    method = _check_choice("method", method, DENOISE_METHODS)
    if method == "median":
        return {"method": method, "ksize": _check_int("ksize", ksize, 3, odd=True)}
    if method == "gaussian":
        return {"method": method, "ksize": _check_int("ksize", ksize, 3, odd=True),
                "sigma": _check_real("sigma", sigma, minimum=0.0, inclusive=True)}
    return {"method": method, "d": _check_int("d", d, 1),
            "sigma_color": _check_real("sigma_color", sigma_color, minimum=0.0),
            "sigma_space": _check_real("sigma_space", sigma_space, minimum=0.0)}


def _threshold_params(method, block_size, c, invert) -> dict:
    return {"method": _check_choice("method", method, tuple(THRESHOLD_METHODS)),
            "block_size": _check_int("block_size", block_size, 3, odd=True),
            "c": _check_real("c", c), "invert": _check_bool("invert", invert)}


def _lung_mask_params(threshold_hu, min_area_fraction, closing_px) -> dict:
    return {"threshold_hu": _check_real("threshold_hu", threshold_hu),
            "min_area_fraction": _check_real("min_area_fraction", min_area_fraction,
                                             minimum=0.0, inclusive=True, maximum=1.0),
            "closing_px": _check_int("closing_px", closing_px, 0)}


def _check_hu(hu) -> np.ndarray:
    if not isinstance(hu, np.ndarray) or hu.dtype != np.int16 or hu.ndim != 2:
        found = f"{hu.dtype} array of shape {hu.shape}" if isinstance(hu, np.ndarray) else type(hu).__name__
        raise TypeError(f"expected a 2-D int16 array of Hounsfield units, found {found}")
    return hu


def _check_image(image) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 2:
        found = (f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray)
                 else type(image).__name__)
        raise TypeError(f"expected a 2-D uint8 image (e.g. from hu_window), found {found}")
    return image


# ---------------------------------------------------------------------------
# The steps.

@functools.lru_cache(maxsize=32)
def _window_lut(level: float, width: float) -> np.ndarray:
    """The 65536-entry uint8 table of :func:`hu_window`, indexed by the int16 bit pattern.

    Indexing by ``hu.view(np.uint16)`` avoids widening the slice to int32: bit
    patterns 0..32767 are HU 0..32767 and 32768..65535 are HU -32768..-1, so
    the table in HU order is rotated by half its length.
    """
    hu = np.arange(-32768, 32768, dtype=np.float64)
    lower = level - width / 2.0
    by_hu = np.clip(np.floor(255.0 * (hu - lower) / width + 0.5), 0, 255).astype(np.uint8)
    lut = np.concatenate([by_hu[32768:], by_hu[:32768]])
    lut.setflags(write=False)
    return lut


def hu_window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """Map a CT window onto the 8-bit display range, the first step of every image pipeline.

    Parameters
    ----------
    hu : ndarray of int16, shape (rows, cols)
        One slice in Hounsfield units.
    level, width : float
        Window centre and width in HU (``width > 0``); see :data:`WINDOW_PRESETS`.

    Returns
    -------
    ndarray of uint8, shape (rows, cols)
        ``clip(floor(255 * (hu - lower) / width + 0.5), 0, 255)`` with
        ``lower = level - width / 2`` computed in float64, i.e. the linear map
        of ``[lower, lower + width]`` onto ``[0, 255]`` rounded half up:
        ``lower`` and below give 0, ``lower + width`` and above give 255.

    Notes
    -----
    The map is a lookup table over all 65536 int16 values, built once per
    ``(level, width)`` and cached, so a 512x512 slice costs one ``np.take``
    gather (about 0.2 ms) rather than float arithmetic per pixel (about 2 ms).
    """
    params = _window_params(None, level, width)
    lut = _window_lut(params["level"], params["width"])
    return np.take(lut, _check_hu(hu).view(np.uint16))


def equalize(image: np.ndarray, method: str = "global", clip_limit: float = 2.0,
             tile_grid: int = 8) -> np.ndarray:
    """Spread the windowed grey levels so faint structures are easier to separate.

    Parameters
    ----------
    image : ndarray of uint8, shape (rows, cols)
        A windowed slice.
    method : {"global", "clahe"}
        ``global`` is histogram equalization over the whole slice
        (``cv2.equalizeHist``); ``clahe`` equalizes per tile with a contrast
        limit (``cv2.createCLAHE``), which does not blow up the noise of the
        large uniform regions (air, soft tissue) that dominate a CT histogram.
    clip_limit : float
        CLAHE contrast limit, > 0 (a multiple of the mean histogram bin count).
    tile_grid : int
        CLAHE tiles per side, >= 1 (8 gives 64x64-pixel tiles on a 512x512 slice).

    Returns
    -------
    ndarray of uint8, shape (rows, cols)
    """
    params = _equalize_params(method, clip_limit, tile_grid)
    image = _check_image(image)
    if params["method"] == "global":
        return cv2.equalizeHist(image)
    grid = params["tile_grid"]
    return cv2.createCLAHE(clipLimit=params["clip_limit"], tileGridSize=(grid, grid)).apply(image)


def denoise(image: np.ndarray, method: str = "median", ksize: int = 3, sigma: float = 0.0, d: int = 5,
            sigma_color: float = 50.0, sigma_space: float = 50.0) -> np.ndarray:
    """Smooth quantum noise before thresholding, so the threshold does not fragment.

    Parameters
    ----------
    image : ndarray of uint8, shape (rows, cols)
        A windowed slice.
    method : {"median", "gaussian", "bilateral"}
        ``median`` (``cv2.medianBlur``) removes speckle and keeps edges;
        ``gaussian`` (``cv2.GaussianBlur``) blurs everything; ``bilateral``
        (``cv2.bilateralFilter``) smooths within regions of similar grey level
        only, and is the slowest by far.
    ksize : int
        Kernel side in pixels for median and gaussian, odd and >= 3.
    sigma : float
        Gaussian standard deviation in pixels, >= 0; 0 lets OpenCV derive it
        from ``ksize`` (``0.3 * ((ksize - 1) / 2 - 1) + 0.8``).
    d : int
        Bilateral neighbourhood diameter in pixels, >= 1.
    sigma_color, sigma_space : float
        Bilateral spread in grey levels and in pixels, > 0.

    Returns
    -------
    ndarray of uint8, shape (rows, cols)
    """
    params = _denoise_params(method, ksize, sigma, d, sigma_color, sigma_space)
    image = _check_image(image)
    if params["method"] == "median":
        return cv2.medianBlur(image, params["ksize"])
    if params["method"] == "gaussian":
        k = params["ksize"]
        return cv2.GaussianBlur(image, (k, k), params["sigma"])
    return cv2.bilateralFilter(image, params["d"], params["sigma_color"], params["sigma_space"])


def adaptive_threshold(image: np.ndarray, method: str = "gaussian", block_size: int = 11, c: float = 2.0,
                       invert: bool = False) -> np.ndarray:
    """Binarize against the local mean, which follows the density changes across a slice.

    Parameters
    ----------
    image : ndarray of uint8, shape (rows, cols)
        A windowed (usually equalized and denoised) slice.
    method : {"gaussian", "mean"}
        How the local mean is weighted: ``cv2.ADAPTIVE_THRESH_GAUSSIAN_C`` or
        ``cv2.ADAPTIVE_THRESH_MEAN_C``.
    block_size : int
        Side of the neighbourhood in pixels, odd and >= 3.
    c : float
        Grey levels subtracted from the local mean to form the threshold.
    invert : bool
        False marks pixels brighter than the threshold (``THRESH_BINARY``),
        True marks the darker ones (``THRESH_BINARY_INV``).

    Returns
    -------
    ndarray of uint8, shape (rows, cols)
        0 or 255.
    """
    params = _threshold_params(method, block_size, c, invert)
    image = _check_image(image)
    return cv2.adaptiveThreshold(image, 255, THRESHOLD_METHODS[params["method"]],
                                 cv2.THRESH_BINARY_INV if params["invert"] else cv2.THRESH_BINARY,
                                 params["block_size"], params["c"])


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Set every 0 pixel not 4-connected to the image border to 1 (mask is uint8 0/1)."""
    # Pad so the flood from the corner reaches all background touching any border.
    outside = np.pad(mask, 1)
    cv2.floodFill(outside, None, (0, 0), 1)
    return mask | (1 - outside[1:-1, 1:-1])


def lung_mask(hu: np.ndarray, threshold_hu: float = -320.0, min_area_fraction: float = 0.005,
              closing_px: int = 5) -> np.ndarray:
    """Segment the lungs of one axial slice, to restrict features and patches to lung tissue.

    The classical recipe: air is ``hu < threshold_hu``; air 8-connected to
    the image border is outside the body and dropped; of the air left, the two
    largest components are the lungs, each kept only if it covers at least
    ``min_area_fraction`` of the slice (so the trachea, bowel gas and slices
    above the apices give one lung or none); a morphological close with an
    elliptical kernel, applied to each lung separately, then pulls in
    juxtapleural nodules and vessels that notch the lung border, and holes are
    filled last, so nodules and vessels inside the lung (and notches the close
    sealed off) become lung.

    Parameters
    ----------
    hu : ndarray of int16, shape (rows, cols)
        One slice in Hounsfield units.
    threshold_hu : float
        Air/tissue boundary in HU; -320 separates aerated lung (about -850)
        from soft tissue (about 40).
    min_area_fraction : float
        Smallest lung, as a fraction of the slice's pixels, in [0, 1).
    closing_px : int
        Diameter in pixels of the elliptical closing kernel; 0 disables the
        close.  It bounds the juxtapleural nodules included: a nodule bulging
        into the lung as a half disc is only partly pulled in unless the
        kernel is larger than the nodule (on a synthetic slice, 6% of a
        7-pixel nodule's bulge at ``closing_px=5``, 44% at 9, 61% at 17 and
        above; the rest lies beyond the chord across the notch's mouth, which
        no closing reaches).

    Returns
    -------
    ndarray of uint8, shape (rows, cols)
        1 inside the lungs, 0 elsewhere.  Lungs cut by the image border are
        lost with the outside air, a limit of the recipe.
    """
    params = _lung_mask_params(threshold_hu, min_area_fraction, closing_px)
    hu = _check_hu(hu)
    air = (hu < params["threshold_hu"]).astype(np.uint8)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(air, connectivity=8)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    areas = stats[:, cv2.CC_STAT_AREA].copy()
    areas[0] = 0  # label 0 is the tissue, not air
    areas[border] = 0
    min_area = params["min_area_fraction"] * hu.size
    lungs = [label for label in np.argsort(areas)[::-1][:2] if areas[label] > 0 and areas[label] >= min_area]
    mask = np.zeros(hu.shape, dtype=np.uint8)
    closing = params["closing_px"]
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (closing, closing)) if closing else None
    for label in lungs:
        # Close each lung on its own, in its bounding box padded by the kernel
        # size: the two lungs never bridge across the mediastinum, and the cost
        # is that of the lung's box rather than the whole slice.
        x, y, w, h = stats[label, :4]
        rows = slice(max(0, y - closing), y + h + closing)
        cols = slice(max(0, x - closing), x + w + closing)
        lung = (labels[rows, cols] == label).astype(np.uint8)
        if kernel is not None:
            lung = cv2.morphologyEx(lung, cv2.MORPH_CLOSE, kernel)
        mask[rows, cols] |= lung
    return _fill_holes(mask)


def slice_quality(hu: np.ndarray, mask: np.ndarray) -> dict:
    """Say whether a lung mask is plausible, so implausible slices can be flagged, not trained on.

    Parameters
    ----------
    hu : ndarray of int16, shape (rows, cols)
        The slice in Hounsfield units.
    mask : ndarray of uint8, shape (rows, cols)
        Its lung mask, 0/1 (from :func:`lung_mask`).

    Returns
    -------
    dict
        ``lung_fraction`` (mask pixels / slice pixels), ``lung_mean_hu``
        (mean HU under the mask, None for an empty mask) and ``mask_valid``:
        True when ``lung_fraction`` is within :data:`LUNG_FRACTION_RANGE`
        (0.02..0.6, bounds included) and ``lung_mean_hu`` within
        :data:`LUNG_MEAN_HU_RANGE` (-1000..-500 HU, bounds included).  A slice
        above the apices or below the bases fails the first rule; a mask
        that caught bowel gas and soft tissue fails the second.
    """
    hu = _check_hu(hu)
    if not isinstance(mask, np.ndarray) or mask.shape != hu.shape:
        found = f"shape {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ValueError(f"mask must be an array of the slice's shape {hu.shape}, found {found}")
    inside = mask.astype(bool)
    count = int(inside.sum())
    fraction = count / hu.size
    mean_hu = float(hu[inside].mean(dtype=np.float64)) if count else None
    valid = (mean_hu is not None
             and LUNG_FRACTION_RANGE[0] <= fraction <= LUNG_FRACTION_RANGE[1]
             and LUNG_MEAN_HU_RANGE[0] <= mean_hu <= LUNG_MEAN_HU_RANGE[1])
    return {"lung_fraction": fraction, "lung_mean_hu": mean_hu, "mask_valid": bool(valid)}


# ---------------------------------------------------------------------------
# The configurable chain.

# step name -> (public function, its parameter check); defaults come from the
# public function's signature so they are written once.
_STEP_FUNCTIONS = {
    "equalize": (equalize, _equalize_params),
    "denoise": (denoise, _denoise_params),
    "threshold": (adaptive_threshold, _threshold_params),
    "lung_mask": (lung_mask, _lung_mask_params),
}
_WINDOW_DEFAULTS = {"preset": None, "level": None, "width": None}
_IMAGE_STEPS = ("equalize", "denoise", "threshold")
# Steps with a single output slot in PreprocessChain.apply's result.
_SINGLE_STEPS = ("window", "threshold", "lung_mask")


def _step_defaults(name: str) -> dict:
    if name == "window":
        return dict(_WINDOW_DEFAULTS)
    parameters = list(inspect.signature(_STEP_FUNCTIONS[name][0]).parameters.values())[1:]
    return {p.name: p.default for p in parameters}


def _normalize_step(index: int, raw) -> dict:
    where = f"preprocess.steps[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping like {{step: window, preset: lung}}, "
                          f"found {type(raw).__name__} {raw!r}")
    if "step" not in raw:
        raise ConfigError(f"{where}: missing the 'step' key; expected one of {', '.join(PreprocessChain.STEPS)}")
    name = raw["step"]
    if name not in PreprocessChain.STEPS:
        raise ConfigError(f"{where}: unknown step {name!r}; expected one of {', '.join(PreprocessChain.STEPS)}")
    where = f"{where} ({name})"
    given = {key: value for key, value in raw.items() if key != "step"}
    defaults = _step_defaults(name)
    unknown = sorted(set(given) - set(defaults), key=str)
    if unknown:
        raise ConfigError(f"{where}: unknown parameter {', '.join(map(repr, unknown))}; "
                          f"expected some of {', '.join(defaults)}")
    check = _window_params if name == "window" else _STEP_FUNCTIONS[name][1]
    try:
        params = check(**{**defaults, **given})
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    unused = [key for key in given if key not in params]
    if unused:
        raise ConfigError(f"{where}: parameter {', '.join(map(repr, unused))} is not used by method "
                          f"{params['method']!r}; it uses {', '.join(k for k in params if k != 'method') or 'none'}")
    return {"step": name, **params}


class PreprocessChain:
    """An ordered list of named steps from configuration, applied to one HU slice at a time.

    Steps (parameters as in the function of the same purpose):

    - ``window`` (:func:`hu_window`): ``preset`` or ``level`` and ``width``.
      Exactly one, before any image step.
    - ``equalize`` (:func:`equalize`), ``denoise`` (:func:`denoise`): work on
      the current 8-bit image and replace it; may repeat.
    - ``threshold`` (:func:`adaptive_threshold`): binarizes the current 8-bit
      image into the ``threshold`` output; the image itself goes on unchanged,
      so steps after it still see grey levels.  At most one.
    - ``lung_mask`` (:func:`lung_mask`): works on the HU slice, so its place
      in the list does not matter.  At most one.

    Parameters
    ----------
    steps : list of dict
        Each ``{"step": name, **parameters}``; omitted parameters take the
        function's defaults.  Validated completely here, so a bad
        configuration fails before the first slice, with a
        :class:`~ctlake.errors.ConfigError` naming the step's index and name.

    Attributes
    ----------
    steps : list of dict
        The normalized steps: defaults filled in, numbers as int or float,
        window presets resolved to ``level``/``width`` (the ``preset`` name is
        kept), and only the parameters the chosen method uses.
    """

    STEPS = ("window", "equalize", "denoise", "threshold", "lung_mask")

    def __init__(self, steps: list[dict]):
        if not isinstance(steps, list):
            raise ConfigError(f"preprocess.steps: expected a list of steps, found {type(steps).__name__}")
        if not steps:
            raise ConfigError("preprocess.steps: expected at least a window step, found an empty list")
        normalized = [_normalize_step(index, raw) for index, raw in enumerate(steps)]
        seen: dict[str, int] = {}
        for index, step in enumerate(normalized):
            name = step["step"]
            if name in _IMAGE_STEPS and "window" not in seen:
                raise ConfigError(f"preprocess.steps[{index}] ({name}): {name} works on the 8-bit windowed "
                                  f"image, so it must come after a window step; found it before any window step")
            if name in _SINGLE_STEPS and name in seen:
                raise ConfigError(f"preprocess.steps[{index}] ({name}): expected one {name} step, found a "
                                  f"duplicate of preprocess.steps[{seen[name]}]")
            seen.setdefault(name, index)
        if "window" not in seen:
            raise ConfigError("preprocess.steps: expected one window step (every other image step works on "
                              f"its 8-bit output), found only {', '.join(s['step'] for s in normalized)}")
        self.steps = normalized

    @classmethod
    def from_config(cls, steps: list[dict]) -> PreprocessChain:
        """The chain of a ``preprocess.steps`` configuration list (validated as in the constructor)."""
        return cls(steps)

    def __repr__(self) -> str:
        return f"PreprocessChain({' -> '.join(step['step'] for step in self.steps)}, hash={self.config_hash()})"

    def config_hash(self) -> str:
        """Identify the preprocessing, for lineage columns and output paths.

        The first 16 hex digits of the SHA-256 of the normalized steps as JSON
        with sorted keys: equivalent configurations (keys in another order,
        defaults spelled out, ``2`` for ``2.0``) hash the same; a changed
        parameter, an added or removed step or a new order does not.
        """
        text = json.dumps(self.steps, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def apply(self, hu: np.ndarray) -> dict:
        """Run the steps on one slice.

        Parameters
        ----------
        hu : ndarray of int16, shape (rows, cols)
            The slice in Hounsfield units.

        Returns
        -------
        dict
            ``image``: the final 8-bit image (uint8, rows x cols);
            ``mask``: the lung mask (uint8 0/1) or None without a
            ``lung_mask`` step; ``threshold``: the binarized image (uint8
            0/255) or None without a ``threshold`` step; ``stages``: every
            8-bit image in step order, keyed by step name (``denoise_2`` for
            a second ``denoise``), for :func:`montage`.  The stages are the
            arrays the steps returned, not copies, so keeping them costs no
            time; ``image`` is the last image stage itself.
        """
        hu = _check_hu(hu)
        image = mask = threshold = None
        stages: dict[str, np.ndarray] = {}
        for step in self.steps:
            name = step["step"]
            params = {key: value for key, value in step.items() if key != "step"}
            if name == "window":
                image = hu_window(hu, params["level"], params["width"])
                output = image
            elif name == "lung_mask":
                mask = lung_mask(hu, **params)
                continue
            elif name == "threshold":
                threshold = output = adaptive_threshold(image, **params)
            else:
                image = output = _STEP_FUNCTIONS[name][0](image, **params)
            key, repeat = name, 2
            while key in stages:
                key, repeat = f"{name}_{repeat}", repeat + 1
            stages[key] = output
        return {"image": image, "mask": mask, "threshold": threshold, "stages": stages}


def montage(stages: dict[str, np.ndarray], mask: np.ndarray | None, titles: bool = True) -> np.ndarray:
    """One picture of a slice through the chain, to eyeball a configuration before a full run.

    Parameters
    ----------
    stages : dict of str to ndarray of uint8, shape (rows, cols)
        The ``stages`` of :meth:`PreprocessChain.apply`, shown left to right.
    mask : ndarray of uint8, shape (rows, cols), or None
        A 0/1 lung mask; when given, a last panel shows it in green over the
        ``window`` stage (the first stage if there is none).
    titles : bool
        Write each panel's name in its top-left corner.

    Returns
    -------
    ndarray of uint8, shape (rows, cols * panels, 3)
        BGR, ready for ``cv2.imwrite``.
    """
    if not stages:
        raise ValueError("montage needs at least one stage, found none")
    panels = [(name, cv2.cvtColor(_check_image(image), cv2.COLOR_GRAY2BGR)) for name, image in stages.items()]
    shape = panels[0][1].shape
    if mask is not None and mask.shape != shape[:2]:
        raise ValueError(f"mask must have the stages' shape {shape[:2]}, found {mask.shape}")
    if mask is not None:
        base = stages.get("window", next(iter(stages.values())))
        overlay = cv2.cvtColor(base, cv2.COLOR_GRAY2BGR)
        inside = mask.astype(bool)
        green = np.array([0, 255, 0], dtype=np.float32)
        overlay[inside] = (0.6 * overlay[inside] + 0.4 * green).astype(np.uint8)
        panels.append(("lung mask", overlay))
    if any(panel.shape != shape for _, panel in panels):
        raise ValueError(f"every stage must have one shape, found {sorted({p.shape[:2] for _, p in panels})}")
    if titles:
        # Scale the text with the slice so it reads the same on 64 and 512 pixels.
        scale = max(0.3, shape[0] / 512.0)
        thickness = max(1, round(scale * 1.5))
        origin = (max(2, round(6 * scale)), max(10, round(22 * scale)))
        for name, panel in panels:
            cv2.putText(panel, name, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2,
                        cv2.LINE_AA)
            cv2.putText(panel, name, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 255, 255), thickness,
                        cv2.LINE_AA)
    return np.hstack([panel for _, panel in panels])
