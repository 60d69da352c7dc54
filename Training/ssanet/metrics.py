"""Segmentation metrics for binary lesion masks: DSC, HD95, MAE and NSD.

All functions accept 2D or 3D (in fact any N-D, N >= 1) arrays. Masks are
converted with ``np.asarray(x).astype(bool)``, so label maps with a single
foreground value and 0/1 arrays are accepted as they are.

``spacing`` gives one physical voxel size (mm) per *array axis*, in array-axis
order. Arrays obtained with ``SimpleITK.GetArrayFromImage`` are indexed
(z, y, x) while ``image.GetSpacing()`` is (x, y, z), so pass
``image.GetSpacing()[::-1]``. ``None`` means 1.0 mm on every axis.

Surfaces
--------
The surface of a mask is its set of border voxels: foreground voxels removed
by one binary erosion with the face-connected structuring element
(``generate_binary_structure(ndim, 1)``), with everything outside the array
treated as background. This is exactly the definition used by
``medpy.metric.binary``, so :func:`hd95` reproduces ``medpy.metric.binary.hd95``.
Distances between voxel centres are computed with
``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``.

:func:`nsd` uses the same border voxels, i.e. it is a voxel-border
approximation of the normalized surface Dice of Nikolov et al. (2021): every
border voxel has weight one, whereas DeepMind's ``surface-distance`` package
weights surface elements (surfels) by their area. The two agree closely for
smooth shapes; expect small differences for thin or jagged structures and
strongly anisotropic spacing.

Empty masks
-----------
The metrics are undefined for empty masks in the textbook sense; these
conventions keep every per-case value finite so that averages stay meaningful:

===================  ======  ======  ==========================================
case                 dsc     nsd     hd95 (mm)
===================  ======  ======  ==========================================
both empty           1.0     1.0     0.0
exactly one empty    0.0     0.0     diagonal of the array extent, i.e.
                                     ``sqrt(sum((shape * spacing) ** 2))``
                                     (an upper bound of any distance in the
                                     volume)
===================  ======  ======  ==========================================

:func:`mae` is always defined (for non-empty arrays).
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

__all__ = [
    "dsc",
    "hd95",
    "mae",
    "nsd",
    "summarize",
    "evaluate_labelmap",
]


# --------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------

def _as_mask(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim == 0:
        raise ValueError(f"{name} must be an array with at least one axis, got a scalar")
    return arr.astype(bool)


def _check_shapes(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise ValueError(
            f"pred and gt must have the same shape, got {pred.shape} and {gt.shape}"
        )


def _as_spacing(spacing, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim, dtype=np.float64)
    sp = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
    if sp.ndim != 1 or sp.size != ndim:
        raise ValueError(
            f"spacing must have one value per array axis ({ndim}), got {tuple(np.ravel(sp))}"
        )
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing values must be finite and > 0, got {tuple(sp)}")
    return sp


def _prepare(pred, gt, spacing) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = _as_mask(pred, "pred")
    g = _as_mask(gt, "gt")
    _check_shapes(p, g)
    return p, g, _as_spacing(spacing, p.ndim)


def _extent_diagonal(shape: Sequence[int], spacing: np.ndarray) -> float:
    return float(math.sqrt(float(np.sum((np.asarray(shape, dtype=np.float64) * spacing) ** 2))))


# --------------------------------------------------------------------------
# Surface distances
# --------------------------------------------------------------------------

def _bbox(mask: np.ndarray) -> Tuple[slice, ...]:
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(np.any(mask, axis=other) if other else mask)
        slices.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(slices)


def _border(mask: np.ndarray) -> np.ndarray:
    # border_value=0 (the default) treats outside the array as background, so a
    # mask touching the array edge has a surface there, as in medpy. Because
    # it also holds for the crop edges, cropping never changes the border.
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=structure, iterations=1)


def _surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each border voxel of one mask to the other's border.

    Both masks must be non-empty. Returns ``(pred_to_gt, gt_to_pred)``.
    """
    # Every border voxel of both masks lies in the bounding box of the union,
    # and an EDT only needs the zeros it measures to (the target border), so
    # cropping to that box is exact - no margin needed - and makes the EDTs
    # proportional to the lesion size rather than to the slice/volume size.
    box = _bbox(pred | gt)
    p = pred[box]
    g = gt[box]
    p_border = _border(p)
    g_border = _border(g)
    dist_to_g = ndimage.distance_transform_edt(~g_border, sampling=spacing)
    dist_to_p = ndimage.distance_transform_edt(~p_border, sampling=spacing)
    return dist_to_g[p_border], dist_to_p[g_border]


def _hd95_from_distances(d_pg: np.ndarray, d_gp: np.ndarray) -> float:
    # Percentile of the pooled distances (not the max of the two directed
    # percentiles) to match medpy.metric.binary.hd95.
    return float(np.percentile(np.concatenate((d_pg, d_gp)), 95))


def _nsd_from_distances(d_pg: np.ndarray, d_gp: np.ndarray, tolerance_mm: float) -> float:
    n = d_pg.size + d_gp.size
    within = np.count_nonzero(d_pg <= tolerance_mm) + np.count_nonzero(d_gp <= tolerance_mm)
    return float(within) / float(n)


def _check_tolerance(tolerance_mm: float) -> float:
    tol = float(tolerance_mm)
    if not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tolerance_mm must be finite and >= 0, got {tolerance_mm}")
    return tol


# --------------------------------------------------------------------------
# Public metrics
# --------------------------------------------------------------------------

def dsc(pred, gt) -> float:
    """Dice similarity coefficient ``2|P∩G| / (|P| + |G|)``.

    Both masks empty -> 1.0; exactly one empty -> 0.0 (follows from the formula).
    """
    p = _as_mask(pred, "pred")
    g = _as_mask(gt, "gt")
    _check_shapes(p, g)
    total = np.count_nonzero(p) + np.count_nonzero(g)
    if total == 0:
        return 1.0
    return 2.0 * float(np.count_nonzero(p & g)) / float(total)


def hd95(pred, gt, spacing: Optional[Sequence[float]] = None) -> float:
    """95th percentile of the symmetric surface (Hausdorff) distance, in mm.

    The percentile is taken over the pooled distances of both directions
    (border voxels of ``pred`` to the border of ``gt`` and vice versa), the
    definition of ``medpy.metric.binary.hd95``.

    Both masks empty -> 0.0. Exactly one empty -> the diagonal of the array
    extent, ``sqrt(sum((shape * spacing) ** 2))``, a finite worst case.
    """
    p, g, sp = _prepare(pred, gt, spacing)
    p_any, g_any = p.any(), g.any()
    if not p_any and not g_any:
        return 0.0
    if not (p_any and g_any):
        return _extent_diagonal(p.shape, sp)
    return _hd95_from_distances(*_surface_distances(p, g, sp))


def mae(pred, gt) -> float:
    """Mean absolute error between ``pred`` and ``gt`` taken as floats.

    For binary ``pred`` this is the fraction of voxels that differ. A floating
    point ``pred`` is used as is (e.g. a probability map in [0, 1]); any other
    dtype is binarised like a mask. ``gt`` is always binarised. Defined for
    empty masks (0.0 when both are empty).
    """
    p = np.asarray(pred)
    if p.ndim == 0:
        raise ValueError("pred must be an array with at least one axis, got a scalar")
    p = p.astype(np.float64) if np.issubdtype(p.dtype, np.floating) else p.astype(bool)
    g = _as_mask(gt, "gt")
    _check_shapes(p, g)
    if p.dtype == bool:
        return float(np.count_nonzero(p ^ g)) / float(p.size)
    return float(np.mean(np.abs(p - g)))


def nsd(
    pred,
    gt,
    spacing: Optional[Sequence[float]] = None,
    tolerance_mm: float = 3.0,
) -> float:
    """Normalized surface Dice at ``tolerance_mm`` (Nikolov et al. 2021).

    Fraction of the border voxels of both masks whose distance to the other
    mask's border is ``<= tolerance_mm``. Voxel-border based: every border voxel
    counts once, unlike the surfel-area weighting of DeepMind's
    ``surface-distance`` package (close agreement for smooth shapes).

    Both masks empty -> 1.0; exactly one empty -> 0.0.
    """
    p, g, sp = _prepare(pred, gt, spacing)
    tol = _check_tolerance(tolerance_mm)
    p_any, g_any = p.any(), g.any()
    if not p_any and not g_any:
        return 1.0
    if not (p_any and g_any):
        return 0.0
    return _nsd_from_distances(*_surface_distances(p, g, sp), tol)


# --------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------

def _is_number(v) -> bool:
    return isinstance(v, (numbers.Real, np.floating, np.integer)) and not isinstance(v, (bool, np.bool_))


def summarize(per_case: Iterable[Mapping]) -> Dict:
    """Mean of each numeric metric over cases, ignoring NaN.

    ``per_case`` is a list of dicts such as ``{"case": "c01", "dsc": 0.8, ...}``;
    non-numeric entries (case ids, paths) are skipped. Values that are dicts
    themselves (e.g. the per-class output of :func:`evaluate_labelmap`) are
    summarised recursively. The result maps each metric to its NaN-ignoring mean
    (NaN when no case has a finite value) and ``"n"`` to the number of cases
    (for nested dicts: the number of cases that contain that entry).
    """
    cases: List[Mapping] = list(per_case)
    values: Dict[str, List[float]] = {}
    nested: Dict[str, List[Mapping]] = {}
    for case in cases:
        for key, value in case.items():
            if isinstance(value, Mapping):
                nested.setdefault(key, []).append(value)
            elif _is_number(value):
                values.setdefault(key, []).append(float(value))
    out: Dict = {}
    for key, vals in values.items():
        arr = np.asarray(vals, dtype=np.float64)
        arr = arr[~np.isnan(arr)]
        # np.nanmean on an all-NaN column warns; return NaN quietly instead.
        out[key] = float(arr.mean()) if arr.size else float("nan")
    for key, sub in nested.items():
        out[key] = summarize(sub)
    out["n"] = len(cases)
    return out


def _nsd_key(tolerance_mm: float) -> str:
    return f"nsd_{tolerance_mm:g}mm"


def evaluate_labelmap(
    pred_label,
    gt_label,
    class_map: Mapping[str, Iterable[int]],
    spacing: Optional[Sequence[float]] = None,
    nsd_tolerance_mm: float = 3.0,
) -> Dict[str, Dict[str, float]]:
    """Per-class metrics for integer label maps.

    ``class_map`` maps a class name to the label values that form it, e.g.
    ``{"ggo": (1,), "consolidation": (2,), "infection": (1, 2)}`` (a single int
    is accepted too). Returns ``{name: {"dsc", "hd95_mm", "mae", "nsd_3mm"}}``;
    the NSD key follows ``nsd_tolerance_mm`` (``nsd_{tol:g}mm``). Empty-mask
    conventions are those of the individual metrics.
    """
    pred_label = np.asarray(pred_label)
    gt_label = np.asarray(gt_label)
    if pred_label.ndim == 0 or gt_label.ndim == 0:
        raise ValueError("label maps must be arrays with at least one axis")
    _check_shapes(pred_label, gt_label)
    sp = _as_spacing(spacing, pred_label.ndim)
    tol = _check_tolerance(nsd_tolerance_mm)
    nsd_key = _nsd_key(tol)

    results: Dict[str, Dict[str, float]] = {}
    for name, labels in class_map.items():
        labels = np.atleast_1d(np.asarray(labels))
        p = np.isin(pred_label, labels)
        g = np.isin(gt_label, labels)
        p_any, g_any = p.any(), g.any()
        if p_any and g_any:
            # One pair of EDTs serves both surface metrics.
            d_pg, d_gp = _surface_distances(p, g, sp)
            h = _hd95_from_distances(d_pg, d_gp)
            s = _nsd_from_distances(d_pg, d_gp, tol)
        else:
            h = hd95(p, g, sp)
            s = nsd(p, g, sp, tol)
        results[name] = {
            "dsc": dsc(p, g),
            "hd95_mm": h,
            "mae": mae(p, g),
            nsd_key: s,
        }
    return results
