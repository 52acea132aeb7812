"""Hand-crafted radiomics features of one candidate patch, for the classical lung-cancer classifiers.

Pure numpy/OpenCV, no Spark: the feature pandas UDF unpacks a row of the
``patches`` table (HU ``int16``, shape ``(channels, px, px)``), calls
:func:`patch_features` (or :func:`pixel_vector` for the raw-pixel baseline)
and packs the vector.  Everything here is deterministic and never returns NaN,
so a feature table can go straight into scikit-learn.

Patch conventions
-----------------
* ``channels`` is odd (1 for 2D, 3 for 2.5D: below, centre, above; or a
  whole volume of planes ``slice_spacing_mm`` apart, ``patches.depth_mm``),
  ordered by z; the **centre channel** is ``channels // 2``.
* The candidate sits at pixel ``(px // 2, px // 2)`` of every channel.
* ``spacing_mm`` is the in-plane pixel size of the patch (``size_mm / px``,
  1 mm with the defaults), ``slice_spacing_mm`` the distance between channels.

The feature vector
------------------
:data:`FEATURE_NAMES` lists the features in vector order:

``seg_found``
    1 when :func:`segment_nodule` found a region in the centre channel, 0 when
    it did not and the first-order features fell back to a central disc of
    radius :data:`FALLBACK_RADIUS_MM`.
``fo_*``
    First-order statistics of the HU values of the segmented region of the
    centre channel: mean and standard deviation (HU), skewness and excess
    kurtosis (both 0 when the values are constant), percentiles 10/25/50/75/90
    (HU, linear interpolation) and the Shannon entropy (bits) of the histogram
    with :data:`ENTROPY_BIN_HU` HU bins over :data:`ENTROPY_RANGE_HU` (values
    outside the range count in the end bins).
``shape_*``
    Shape of the centre-channel mask of :func:`segment_nodule` (default
    parameters): area (pixel count, mm2), perimeter (mm, ``cv2.arcLength`` of
    the outer contour through boundary pixel centres), eccentricity (0 for a
    circle, towards 1 for a line, from the second central moments; 0 for a
    single pixel), compactness ``4 pi area / perimeter**2`` clipped to 1
    (pixel-centre contours of masks of a few pixels are short enough to push
    it above 1; 1 for a single pixel, whose contour has length 0), solidity
    (mask pixels / pixels whose centre lies in the convex hull of the mask's
    pixel centres, 1 for a straight line), equivalent diameter (mm, of the
    disc of the same area); all six are 0 when the centre mask is empty.
``glcm_*_d{1,2,4}``
    Grey-level co-occurrence matrix of the whole centre-channel window,
    quantized to :data:`GLCM_LEVELS` levels over :data:`GLCM_RANGE_HU`,
    symmetric and normalized, at distances :data:`GLCM_DISTANCES` pixels;
    each property is computed at 0, 45, 90 and 135 degrees and averaged:
    contrast ``sum P (i-j)**2``, homogeneity (inverse difference moment)
    ``sum P / (1 + (i-j)**2)``, energy ``sqrt(sum P**2)`` (the square root
    of the angular second moment, so 1 for a constant window), correlation
    (1 by convention when the grey levels have zero variance, i.e. a
    constant window).
``lbp_hist_00`` .. ``lbp_hist_09``
    Normalized histogram of the uniform rotation-invariant local binary
    pattern, 8 neighbours on a circle of radius 1 pixel (diagonal neighbours
    bilinearly interpolated, a neighbour equal to the centre counts as 1) over
    every centre-channel pixel whose circle fits in the window: bin ``k < 9``
    holds uniform patterns with ``k`` ones, bin 9 the non-uniform ones.
``n3d_*``
    The nodule as a 3D object over all channels: :mod:`ctlake.shape3d`.
"""
from __future__ import annotations

import functools
import hashlib
import math
import numbers

import cv2
import numpy as np

from ctlake.core.nodule3d import NAMES_3D, THRESHOLD_HU, features_3d
from ctlake.errors import ConfigError, InputError

FALLBACK_RADIUS_MM = 4.0
"""Radius of the central disc the first-order features use when no region is found, mm."""

ENTROPY_BIN_HU = 25.0
"""Bin width of the ``fo_entropy`` histogram, HU; fixed so entropies of different patches compare."""

ENTROPY_RANGE_HU = (-1000.0, 1000.0)
"""HU range of the ``fo_entropy`` histogram; values outside count in the end bins."""

GLCM_LEVELS = 32
"""Grey levels of the co-occurrence matrices."""

GLCM_RANGE_HU = (-1000.0, 400.0)
"""HU range quantized onto the grey levels, in equal steps; values outside are clipped."""

GLCM_DISTANCES = (1, 2, 4)
"""Co-occurrence distances, pixels of the patch."""

SEED_RADIUS_PX = 3
"""How far from the centre pixel (px) :func:`segment_nodule` looks for a region when the centre is air."""

MAX_EROSION_PX = 3
"""Largest erosion radius (px) :func:`segment_nodule` tries to detach a nodule from a wall or vessel."""

_FIRST_ORDER = ("fo_mean_hu", "fo_std_hu", "fo_skewness", "fo_kurtosis", "fo_p10_hu", "fo_p25_hu",
                "fo_p50_hu", "fo_p75_hu", "fo_p90_hu", "fo_entropy")
_PERCENTILES = (10.0, 25.0, 50.0, 75.0, 90.0)
_SHAPE = ("shape_area_mm2", "shape_perimeter_mm", "shape_eccentricity", "shape_compactness",
          "shape_solidity", "shape_equiv_diameter_mm")
_GLCM_PROPERTIES = ("contrast", "homogeneity", "energy", "correlation")
_LBP_BINS = 10

FEATURE_NAMES: tuple[str, ...] = (
    ("seg_found",) + _FIRST_ORDER + _SHAPE
    + tuple(f"glcm_{prop}_d{d}" for d in GLCM_DISTANCES for prop in _GLCM_PROPERTIES)
    + tuple(f"lbp_hist_{k:02d}" for k in range(_LBP_BINS))
    + NAMES_3D
)
"""Names of the :func:`patch_features` vector, in order (see the module docstring)."""

_ENTROPY_EDGES = np.arange(ENTROPY_RANGE_HU[0], ENTROPY_RANGE_HU[1] + ENTROPY_BIN_HU / 2, ENTROPY_BIN_HU)

# LBP sampling: neighbour p at angle 2 pi p / 8, as (row, col) offsets from the
# centre pixel; rounding turns cos(pi/2) = 6e-17 into an exact 0, so the four
# axis-aligned neighbours are read without interpolation.
_LBP_OFFSETS = tuple((round(-math.sin(2 * math.pi * p / 8), 12), round(math.cos(2 * math.pi * p / 8), 12))
                     for p in range(8))


# ---------------------------------------------------------------------------
# Input checks.

def _check_patch(patch_hu) -> np.ndarray:
    if not isinstance(patch_hu, np.ndarray) or patch_hu.ndim != 3:
        found = (f"array of shape {patch_hu.shape}" if isinstance(patch_hu, np.ndarray)
                 else type(patch_hu).__name__)
        raise InputError(f"expected a patch of HU with shape (channels, px, px), found {found}")
    channels, rows, cols = patch_hu.shape
    if channels % 2 == 0 or rows != cols or rows == 0:
        raise InputError(f"expected an odd number of channels and square channels, found shape {patch_hu.shape}")
    if not (np.issubdtype(patch_hu.dtype, np.integer) or np.issubdtype(patch_hu.dtype, np.floating)):
        raise InputError(f"expected HU as integers or floats, found dtype {patch_hu.dtype}")
    if np.issubdtype(patch_hu.dtype, np.floating) and not np.all(np.isfinite(patch_hu)):
        raise InputError("patch holds NaN or infinite HU values")
    return patch_hu


def _check_spacing(name: str, value) -> float:
    if (not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value)
            or value <= 0):
        raise InputError(f"{name} must be a positive finite number of mm, found {value!r}")
    return float(value)


def _check_real(name: str, value, low: float | None = None, high: float | None = None) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and ((low is not None and value <= low) or (high is not None and value > high)):
        ok = False
    if not ok:
        bounds = "" if low is None else f" in ({low:g}, {high:g}]" if high is not None else f" > {low:g}"
        raise ConfigError(f"{name} must be a finite number{bounds}, found {value!r}")
    return float(value)


# ---------------------------------------------------------------------------
# Segmentation.

def _disc(shape: tuple[int, int], radius_px: float) -> np.ndarray:
    """Pixels whose centre is within ``radius_px`` of the patch centre pixel."""
    rows, cols = np.ogrid[:shape[0], :shape[1]]
    return (rows - shape[0] // 2) ** 2 + (cols - shape[1] // 2) ** 2 <= radius_px ** 2


def _seed_component(binary: np.ndarray, dist2: np.ndarray):
    """The 8-connected component of ``binary`` holding the centre pixel, else the nearest one.

    Returns ``(component, seed_index)`` with ``seed_index`` the flat index of
    the component's pixel nearest the centre, or ``(None, None)`` when no
    foreground pixel lies within the seed radius.
    """
    _, labels = cv2.connectedComponents(binary, connectivity=8)
    near = np.flatnonzero((labels.ravel() > 0) & (dist2.ravel() <= SEED_RADIUS_PX ** 2))
    if near.size == 0:
        return None, None
    # argmin returns the first of equally near pixels: row-major order, so deterministic.
    seed_index = near[np.argmin(dist2.ravel()[near])]
    return labels == labels.ravel()[seed_index], seed_index


def _piece_holding(region: np.ndarray, seed_index) -> np.ndarray:
    """The 8-connected piece of ``region`` that holds the flat pixel ``seed_index`` (empty if none)."""
    _, labels = cv2.connectedComponents(region.astype(np.uint8), connectivity=8)
    label = labels.ravel()[seed_index]
    return (labels == label).astype(np.uint8) if label else np.zeros(region.shape, dtype=np.uint8)


def _detach(foreground: np.ndarray, region: np.ndarray, seed_index, beyond: np.ndarray, dist2: np.ndarray):
    """Steps 4 and 5 of :func:`segment_nodule`: the part of ``region`` that belongs to the candidate."""
    for erosion_px in range(1, MAX_EROSION_PX + 1):
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * erosion_px + 1,) * 2)
        core, core_seed = _seed_component(cv2.erode(foreground, kernel), dist2)
        if core is None:
            break
        if not (core & beyond).any():
            # Grow the detached core back within the foreground, by one pixel
            # more than it was eroded: the plain opening would shave the rim
            # pixels of a digital disc, the extra pixel costs a short stub.
            grow = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * erosion_px + 3,) * 2)
            return cv2.dilate(core.astype(np.uint8), grow) & foreground, core_seed
    # The patch border does not count as background here, so a wall running
    # out of the patch is deep, not thin.
    # Rounded: OpenCV's precise transform differs in the last bit from call to call on the same
    # input (seen: 6.708204 and 6.7082043), which let the argmax below pick another of two equally
    # deep pixels and changed a patch's features between runs.  Ties now go to the first pixel.
    depth = np.round(cv2.distanceTransform(foreground, cv2.DIST_L2, cv2.DIST_MASK_PRECISE), 4).ravel()
    near = np.flatnonzero(region.ravel() & (dist2.ravel() <= SEED_RADIUS_PX ** 2))
    ridge = near[np.argmax(depth[near])]
    cols = region.shape[1]
    row_offset, col_offset = np.ogrid[:region.shape[0], :cols]
    inscribed = ((row_offset - ridge // cols) ** 2 + (col_offset - ridge % cols) ** 2
                 <= (float(depth[ridge]) + 1.0) ** 2)
    return region & inscribed, ridge


def _segment_channel(image: np.ndarray, threshold_hu: float, limit: np.ndarray, dist2: np.ndarray) -> np.ndarray:
    foreground = (image > threshold_hu).astype(np.uint8)
    region, seed_index = _seed_component(foreground, dist2)
    if region is None:
        return np.zeros(image.shape, dtype=np.uint8)
    if (region & ~limit).any():
        region, seed_index = _detach(foreground, region, seed_index, ~limit, dist2)
    return _piece_holding(region & limit, seed_index)


def segment_nodule(patch_hu: np.ndarray, threshold_hu: float = -600.0,
                   max_radius_frac: float = 0.45) -> np.ndarray:
    """Mask of the candidate's dense region in every channel, the input of the shape features.

    Rule, per channel:

    1. Foreground is ``HU > threshold_hu``: the default -600 HU keeps solid,
       ground-glass and calcified nodules and drops aerated lung (about
       -850 HU).
    2. The **seed component** is the 8-connected foreground component holding
       the centre pixel or, when the centre is air, the one nearest to it
       within :data:`SEED_RADIUS_PX` pixels.  None: the channel's mask is empty.
    3. If the seed component lies inside the **limit disc** (radius
       ``max_radius_frac * px`` around the centre pixel) it is the mask: an
       isolated nodule, spicules and all.
    4. Otherwise it is attached to something larger (chest wall, vessel,
       another nodule).  The foreground is eroded with discs of radius 1, 2,
       ... :data:`MAX_EROSION_PX` pixels; at the first radius where the seed
       component of the eroded foreground lies inside the limit disc, that
       core is dilated back within the foreground by that radius plus one
       pixel (an opening restricted to the candidate; the extra pixel keeps
       the nodule's rim).  Necks thinner than the erosion diameter are cut
       this way: a vessel a few pixels wide keeps a stub of about
       ``erosion + 1`` pixels, a nodule touching the pleura keeps a few
       pixels of it around the contact.
    5. If no erosion detaches it, the seed component is kept within the
       largest disc inscribed in the foreground whose centre lies within
       :data:`SEED_RADIUS_PX` of the candidate, grown by one pixel (radius
       ``depth + 1``, ``depth`` the largest distance, px, from such a pixel
       to the background; the patch border is not background): a nodule
       broadly merged into the wall keeps itself and a sliver of wall, a
       candidate inside a mass larger than the limit disc keeps all of it,
       a vessel keeps a stub about twice its width long.
    6. The result is clipped to the limit disc, and the 8-connected piece
       holding the seed pixel is the mask (empty if the limit disc is smaller
       than the seed's distance from the centre).

    Channels are segmented independently, each seeded at its own centre pixel.

    Parameters
    ----------
    patch_hu : ndarray, shape (channels, px, px)
        HU values (integers or floats), odd number of channels.
    threshold_hu : float
        Foreground threshold, HU.
    max_radius_frac : float
        Radius of the limit disc as a fraction of ``px``, in (0, 1].

    Returns
    -------
    ndarray of uint8, shape (channels, px, px)
        1 inside the region, 0 elsewhere; all zeros for a channel where
        nothing was found.

    Raises
    ------
    InputError
        The patch is not a finite (channels, px, px) array with odd channels.
    ConfigError
        ``threshold_hu`` or ``max_radius_frac`` is out of range.
    """
    patch_hu = _check_patch(patch_hu)
    threshold_hu = _check_real("threshold_hu", threshold_hu)
    max_radius_frac = _check_real("max_radius_frac", max_radius_frac, low=0.0, high=1.0)
    shape = patch_hu.shape[1:]
    limit = _disc(shape, max_radius_frac * shape[0])
    rows, cols = np.ogrid[:shape[0], :shape[1]]
    dist2 = ((rows - shape[0] // 2) ** 2 + (cols - shape[1] // 2) ** 2).astype(np.float64)
    return np.stack([_segment_channel(channel, threshold_hu, limit, dist2) for channel in patch_hu])


# ---------------------------------------------------------------------------
# Feature groups.

def _first_order(values: np.ndarray) -> np.ndarray:
    mean = values.mean()
    centred = values - mean
    variance = np.mean(centred ** 2)
    if variance > 0:
        skewness = np.mean(centred ** 3) / variance ** 1.5
        kurtosis = np.mean(centred ** 4) / variance ** 2 - 3.0
    else:
        skewness = kurtosis = 0.0
    percentiles = np.percentile(values, _PERCENTILES)
    clipped = np.clip(values, _ENTROPY_EDGES[0], _ENTROPY_EDGES[-1])
    counts, _ = np.histogram(clipped, bins=_ENTROPY_EDGES)
    probabilities = counts[counts > 0] / values.size
    entropy = np.sum(probabilities * np.log2(1.0 / probabilities))
    return np.concatenate([[mean, math.sqrt(variance), skewness, kurtosis], percentiles, [entropy]])


def _hull_pixel_count(points: np.ndarray, shape: tuple[int, int], area_px: int) -> int:
    """Pixels whose centre lies in the convex hull of ``points`` (boundary included).

    Counted with half-plane tests rather than ``cv2.fillConvexPoly``, whose
    rasterization also fills pixels the hull edges only graze, which would put
    the solidity of a disc near 0.93 instead of 1.
    """
    hull = cv2.convexHull(points).reshape(-1, 2).astype(np.float64)
    if len(hull) < 3 or abs(cv2.contourArea(hull.astype(np.float32))) == 0:
        # Collinear pixels: one connected component of them is a full digital segment.
        return area_px
    rows, cols = np.mgrid[:shape[0], :shape[1]]
    start, edge = hull, np.roll(hull, -1, axis=0) - hull
    # Hull points are (x, y) = (col, row); the cross product's sign says which side of an edge a pixel is on.
    cross = (edge[:, 0, None] * (rows.ravel()[None] - start[:, 1, None])
             - edge[:, 1, None] * (cols.ravel()[None] - start[:, 0, None]))
    inside = np.all(cross >= -1e-9, axis=0) | np.all(cross <= 1e-9, axis=0)
    return max(int(np.count_nonzero(inside)), area_px)


def _shape(mask: np.ndarray, spacing_mm: float) -> np.ndarray:
    area_px = int(mask.sum())
    if area_px == 0:
        return np.zeros(len(_SHAPE))
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    perimeter_px = sum(cv2.arcLength(contour, True) for contour in contours)
    compactness = min(1.0, 4 * math.pi * area_px / perimeter_px ** 2) if perimeter_px > 0 else 1.0

    moments = cv2.moments(mask, binaryImage=True)
    mu20, mu02, mu11 = (moments[k] / moments["m00"] for k in ("mu20", "mu02", "mu11"))
    spread = math.sqrt(((mu20 - mu02) / 2) ** 2 + mu11 ** 2)
    major, minor = (mu20 + mu02) / 2 + spread, (mu20 + mu02) / 2 - spread
    eccentricity = math.sqrt(max(0.0, 1.0 - minor / major)) if major > 0 else 0.0

    solidity = area_px / _hull_pixel_count(np.concatenate(contours), mask.shape, area_px)

    area_mm2 = area_px * spacing_mm ** 2
    return np.array([area_mm2, perimeter_px * spacing_mm, eccentricity, compactness, solidity,
                     math.sqrt(4 * area_mm2 / math.pi)])


@functools.lru_cache(maxsize=8)
def _glcm_pairs(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flat indices of every co-occurring pixel pair of a ``size`` x ``size`` window.

    Returns ``(source, target, starts, matrix_offset)``: pair ``k`` joins
    pixel ``source[k]`` to pixel ``target[k]``; the pairs of one offset are
    contiguous and start at ``starts``, offsets numbered distance-major over
    :data:`GLCM_DISTANCES` and 0, 45, 90, 135 degrees (the neighbour d pixels
    right, up-right, up, up-left); ``matrix_offset[k]`` is where the GLCM of
    pair ``k``'s offset starts in a flat stack of ``GLCM_LEVELS**2`` matrices.
    """
    index = np.arange(size * size).reshape(size, size)
    sources, targets = [], []
    for d in GLCM_DISTANCES:
        for dr, dc in ((0, d), (-d, d), (-d, 0), (-d, -d)):
            source = index[max(0, -dr):size - max(0, dr), max(0, -dc):size - max(0, dc)].ravel()
            sources.append(source)
            targets.append(source + dr * size + dc)
    lengths = np.array([source.size for source in sources])
    arrays = (np.concatenate(sources), np.concatenate(targets), np.concatenate([[0], np.cumsum(lengths)[:-1]]),
              np.repeat(np.arange(len(sources)) * GLCM_LEVELS ** 2, lengths))
    for array in arrays:
        array.setflags(write=False)
    return arrays


def _glcm(image: np.ndarray) -> np.ndarray:
    """GLCM properties, averaged over the 4 angles, for each distance in turn.

    Computed from the pixel pairs rather than from the matrices: with ``P``
    the symmetric normalized GLCM of an offset, ``sum P f(i, j)`` is the mean
    of ``(f(a, b) + f(b, a)) / 2`` over its pairs ``(a, b)``, which for the
    symmetric ``f`` of contrast and homogeneity is just the mean of ``f(a, b)``.
    Only the energy needs the matrices themselves.
    """
    low, high = GLCM_RANGE_HU
    levels = np.clip(np.floor((image - low) * (GLCM_LEVELS / (high - low))), 0, GLCM_LEVELS - 1)
    levels = levels.astype(np.intp).ravel()
    source, target, starts, matrix_offset = _glcm_pairs(image.shape[0])
    a, b = levels[source], levels[target]
    pairs = np.diff(np.append(starts, a.size)).astype(np.float64)
    # One reduction per statistic: stacking them first allocates a block large
    # enough to be mmap-ed, whose page faults cost more than all the arithmetic.
    difference2 = ((a - b) ** 2).astype(np.float64)
    contrast = np.add.reduceat(difference2, starts) / pairs
    homogeneity = np.add.reduceat(1.0 / (1.0 + difference2), starts) / pairs
    # Marginals of a symmetric GLCM are equal: the mean and variance of a and b pooled.
    mean = np.add.reduceat(a + b, starts) / (2.0 * pairs)
    variance = np.add.reduceat(a * a + b * b, starts) / (2.0 * pairs) - mean ** 2
    covariance = np.add.reduceat(a * b, starts) / pairs - mean ** 2
    # Levels are small integers, so a constant window gives a variance of exactly 0.
    correlation = np.where(variance > 1e-9, covariance / np.where(variance > 1e-9, variance, 1.0), 1.0)
    counts = np.bincount(matrix_offset + a * GLCM_LEVELS + b, minlength=len(starts) * GLCM_LEVELS ** 2)
    counts = counts.reshape(len(starts), GLCM_LEVELS, GLCM_LEVELS)
    symmetric = (counts + counts.transpose(0, 2, 1)).astype(np.float64)
    energy = np.sqrt(np.sum(symmetric ** 2, axis=(1, 2))) / (2.0 * pairs)
    per_offset = np.stack([contrast, homogeneity, energy, correlation], axis=1)
    return per_offset.reshape(len(GLCM_DISTANCES), 4, len(_GLCM_PROPERTIES)).mean(axis=1).ravel()


def _lbp_histogram(image: np.ndarray) -> np.ndarray:
    size = image.shape[0]

    def shifted(dr: int, dc: int) -> np.ndarray:
        return image[1 + dr:size - 1 + dr, 1 + dc:size - 1 + dc]

    centre = shifted(0, 0)
    bits = np.empty((8,) + centre.shape, dtype=bool)
    for p, (dr, dc) in enumerate(_LBP_OFFSETS):
        r0, c0 = math.floor(dr), math.floor(dc)
        fr, fc = dr - r0, dc - c0
        # Bilinear in the lerp form a + f (b - a), exact when the neighbours are equal.
        top = shifted(r0, c0)
        if fc:
            top = top + fc * (shifted(r0, c0 + 1) - top)
        if fr:
            bottom = shifted(r0 + 1, c0)
            if fc:
                bottom = bottom + fc * (shifted(r0 + 1, c0 + 1) - bottom)
            top = top + fr * (bottom - top)
        bits[p] = top >= centre
    transitions = np.count_nonzero(bits != np.roll(bits, 1, axis=0), axis=0)
    codes = np.where(transitions <= 2, bits.sum(axis=0), _LBP_BINS - 1)
    return np.bincount(codes.ravel(), minlength=_LBP_BINS) / codes.size


def patch_features(patch_hu: np.ndarray, spacing_mm: float, slice_spacing_mm: float | None = None) -> np.ndarray:
    """The radiomics vector of one patch, aligned with :data:`FEATURE_NAMES`.

    Parameters
    ----------
    patch_hu : ndarray, shape (channels, px, px)
        HU values (integers or floats), odd number of channels, ``px >= 5``.
    spacing_mm : float
        In-plane pixel size of the patch, mm (``size_mm / px``).
    slice_spacing_mm : float, optional
        Distance between channels, mm, for the 3D figures; ``spacing_mm`` when
        omitted (isotropic resampling).

    Returns
    -------
    ndarray of float64, shape (len(FEATURE_NAMES),)
        Finite values, see the module docstring for units and the conventions
        of degenerate cases (empty mask, constant window).  The 2D mask is
        :func:`segment_nodule` of the centre channel with its default
        parameters, the 3D one :func:`ctlake.shape3d.segment_nodule_3d`.

    Raises
    ------
    InputError
        Malformed patch, ``px < 5``, or a spacing that is not a positive number.
    """
    patch_hu = _check_patch(patch_hu)
    spacing_mm = _check_spacing("spacing_mm", spacing_mm)
    slice_spacing_mm = (spacing_mm if slice_spacing_mm is None
                        else _check_spacing("slice_spacing_mm", slice_spacing_mm))
    if patch_hu.shape[1] <= max(GLCM_DISTANCES):
        raise InputError(f"patch of {patch_hu.shape[1]} px is too small for GLCM distance "
                         f"{max(GLCM_DISTANCES)}: expected at least {max(GLCM_DISTANCES) + 1} px")
    middle = patch_hu.shape[0] // 2
    mask = segment_nodule(patch_hu[middle:middle + 1])[0]
    centre = patch_hu[middle].astype(np.float64)
    region = mask.astype(bool)
    seg_found = bool(region.any())
    if not seg_found:
        # At least the centre pixel, whatever the spacing.
        region = _disc(centre.shape, FALLBACK_RADIUS_MM / spacing_mm)
    return np.concatenate([[float(seg_found)], _first_order(centre[region]), _shape(mask, spacing_mm),
                           _glcm(centre), _lbp_histogram(centre),
                           features_3d(patch_hu, (slice_spacing_mm, spacing_mm, spacing_mm))])


# ---------------------------------------------------------------------------
# Raw-pixel baseline.

def _check_size(size) -> int:
    if not isinstance(size, numbers.Integral) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"size must be a positive integer number of pixels, found {size!r}")
    return int(size)


def pixel_names(size: int) -> tuple[str, ...]:
    """Column names of :func:`pixel_vector`: ``px_000`` .. in row-major order, zero-padded to a common width."""
    size = _check_size(size)
    width = max(3, len(str(size * size - 1)))
    return tuple(f"px_{k:0{width}d}" for k in range(size * size))


def pixel_vector(patch_hu: np.ndarray, size: int = 16, hu_min: float = -1000.0, hu_max: float = 400.0) -> np.ndarray:
    """The classic pixel baseline: the centre channel, windowed to [0, 1] and shrunk to ``size`` x ``size``.

    Parameters
    ----------
    patch_hu : ndarray, shape (channels, px, px)
        HU values (integers or floats), odd number of channels.
    size : int
        Output side, pixels; ``cv2.INTER_AREA`` averages when shrinking.
    hu_min, hu_max : float
        HU window mapped linearly onto [0, 1]; values outside are clipped.

    Returns
    -------
    ndarray of float32, shape (size * size,)
        Row-major, named by :func:`pixel_names`.

    Raises
    ------
    InputError
        Malformed patch.
    ConfigError
        ``size`` not a positive integer or ``hu_max <= hu_min``.
    """
    patch_hu = _check_patch(patch_hu)
    size = _check_size(size)
    hu_min = _check_real("hu_min", hu_min)
    hu_max = _check_real("hu_max", hu_max, low=hu_min)
    centre = patch_hu[patch_hu.shape[0] // 2].astype(np.float32)
    scaled = (np.clip(centre, hu_min, hu_max) - hu_min) / (hu_max - hu_min)
    resized = cv2.resize(scaled, (size, size), interpolation=cv2.INTER_AREA)
    # Area averaging in float32 can overshoot 1 by a rounding step.
    return np.clip(resized, 0.0, 1.0).ravel()


def feature_layout(pixel_size: int) -> dict:
    """Names of both feature vectors and a short hash of them and of the 3D threshold (what a model depends on).

    The threshold is in the hash because it changes every ``n3d_*`` value
    under the same names: a table computed at another threshold is recomputed.
    """
    names = {"radiomics": list(FEATURE_NAMES), "pixels": pixel_names(pixel_size)}
    digest = hashlib.sha256(repr({**names, "n3d_threshold_hu": THRESHOLD_HU}).encode()).hexdigest()[:12]
    return {**names, "hash": digest}
