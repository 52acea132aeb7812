"""Pictures people would rather look at than read: patch grids (pure numpy/OpenCV)."""
from __future__ import annotations

import cv2
import numpy as np

from ctlake.core.slice_ops import WINDOW_PRESETS, hu_window

_GREEN, _RED, _GREY = (60, 200, 60), (60, 60, 220), (160, 160, 160)


def patch_grid(patches: list[np.ndarray], captions: list[str], labels: list[int | None],
               columns: int = 8, scale: int = 3, window: str = "lung") -> np.ndarray:
    """A BGR grid of patches (centre channel, lung window) with a caption under each.

    Parameters
    ----------
    patches : list of ndarray
        HU patches, (channels, px, px) or (px, px).
    captions : list of str
        Text under each patch (e.g. ``"1 cand"``).
    labels : list of int or None
        Frame colour: green for 1, red for 0, grey when unknown.
    """
    if not patches:
        return np.zeros((32, 32, 3), np.uint8)
    level, width = WINDOW_PRESETS[window]
    tiles = []
    for patch, caption, label in zip(patches, captions, labels):
        centre = patch[patch.shape[0] // 2] if patch.ndim == 3 else patch
        tile = cv2.resize(hu_window(centre, level, width), None, fx=scale, fy=scale,
                          interpolation=cv2.INTER_NEAREST)
        tile = cv2.cvtColor(tile, cv2.COLOR_GRAY2BGR)
        colour = _GREY if label is None else (_GREEN if label == 1 else _RED)
        tile = cv2.copyMakeBorder(tile, 2, 18, 2, 2, cv2.BORDER_CONSTANT, value=colour)
        cv2.putText(tile, caption, (4, tile.shape[0] - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1,
                    cv2.LINE_AA)
        tiles.append(tile)
    height, width_px = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    canvas = np.full((rows * height, columns * width_px, 3), 255, np.uint8)
    for index, tile in enumerate(tiles):
        r, c = divmod(index, columns)
        canvas[r * height:(r + 1) * height, c * width_px:(c + 1) * width_px] = tile
    return canvas
