"""From class probabilities to a label map: the argmax, then small lesion islands removed.

One home for the step every consumer shares (evaluation, the CT pipeline, Slicer, batch):
``labels_from_probabilities``. The island size is a physical area (mm²) measured with the
slice's own pixel spacing, so one setting means the same on the 0.7 mm model grid, a
COVID-SemiSeg crop and a CT. A checkpoint records its setting in
``meta["inference"]["min_lesion_mm2"]`` (0 or absent: nothing is removed).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

# 8-connected in the slice: pixels touching at a corner belong to one island
_CONNECTIVITY = ndimage.generate_binary_structure(2, 2)


def checkpoint_min_lesion_mm2(meta: dict | None) -> float:
    """The island size a checkpoint asks for (``meta["inference"]["min_lesion_mm2"]``), 0 if none."""
    return float(((meta or {}).get("inference") or {}).get("min_lesion_mm2", 0.0) or 0.0)


def effective_min_lesion_mm2(meta: dict | None, override=None) -> float:
    """``override`` when given (checked), else what the checkpoint records."""
    return checkpoint_min_lesion_mm2(meta) if override is None else check_min_lesion_mm2(override)


def check_min_lesion_mm2(value) -> float:
    value = float(value)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"minimum lesion island {value!r} mm²: give a finite area >= 0 (0 keeps every island)")
    return value


def remove_small_lesions(labels: np.ndarray, spacing_yx, min_lesion_mm2: float) -> np.ndarray:
    """A copy of the (H, W) label map where lesion islands (8-connected components of any
    label > 0, classes together) smaller than ``min_lesion_mm2`` are background."""
    labels = np.array(labels, copy=True)
    min_lesion_mm2 = check_min_lesion_mm2(min_lesion_mm2)
    if labels.ndim != 2:
        raise ValueError(f"expected one (H, W) slice, got shape {labels.shape}")
    if min_lesion_mm2 == 0 or not labels.any():
        return labels
    pixel_mm2 = float(spacing_yx[0]) * float(spacing_yx[1])
    islands, n = ndimage.label(labels > 0, structure=_CONNECTIVITY)
    areas = np.bincount(islands.ravel(), minlength=n + 1) * pixel_mm2
    small = areas < min_lesion_mm2
    small[0] = False
    labels[small[islands]] = 0
    return labels


def labels_from_probabilities(probs: np.ndarray, spacing_yx, min_lesion_mm2: float = 0.0,
                              lung: np.ndarray | None = None) -> np.ndarray:
    """(C, H, W) probabilities (background first) -> uint8 (H, W) labels: the argmax,
    background outside ``lung`` when given, then islands below ``min_lesion_mm2`` removed."""
    labels = np.asarray(probs).argmax(axis=0).astype(np.uint8)
    if lung is not None:
        labels[~np.asarray(lung, dtype=bool)] = 0
    return remove_small_lesions(labels, spacing_yx, min_lesion_mm2)
