"""Tests for ssanet.metrics: hand-made cases, conventions, and cross-checks."""

import math
import os
import sys

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

try:
    import ssanet.metrics as M
except ImportError:
    # Lets the tests run from a bare checkout, before `pip install -e .`.
    sys.path.insert(
        0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "Training"))
    )
    import ssanet.metrics as M


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def squares(shift=3, size=10, shape=(40, 40)):
    """gt: size x size square at (10, 10); pred: same, shifted `shift` along axis 1."""
    gt = np.zeros(shape, bool)
    gt[10:10 + size, 10:10 + size] = True
    pred = np.zeros(shape, bool)
    pred[10:10 + size, 10 + shift:10 + size + shift] = True
    return pred, gt


def brute_border_coords(mask, spacing):
    """Physical coordinates of border voxels, found without scipy morphology:
    a foreground voxel with a face neighbour outside the mask or the array."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    interior = mask.copy()
    for axis in range(mask.ndim):
        for step in (-1, 1):
            interior &= np.roll(padded, step, axis=axis)[inner]
    border = mask & ~interior
    return np.argwhere(border) * np.asarray(spacing, float)


def brute_distances(pred, gt, spacing):
    cp = brute_border_coords(pred, spacing)
    cg = brute_border_coords(gt, spacing)
    d = cdist(cp, cg)
    return d.min(axis=1), d.min(axis=0)


def brute_nsd(pred, gt, spacing, tol):
    d_pg, d_gp = brute_distances(pred, gt, spacing)
    return (np.sum(d_pg <= tol) + np.sum(d_gp <= tol)) / (d_pg.size + d_gp.size)


def brute_hd95(pred, gt, spacing):
    return float(np.percentile(np.concatenate(brute_distances(pred, gt, spacing)), 95))


def random_blob(rng, shape, sigma, frac):
    """Smoothed noise thresholded so that roughly `frac` of voxels are foreground."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    thr = np.quantile(field, 1.0 - frac)
    mask = field > thr
    assert mask.any()
    return mask


def blob_pairs(n2d=10, n3d=10, seed=1234):
    """Pairs of correlated (pred, gt) blobs with anisotropic spacing."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n2d + n3d):
        if i < n2d:
            shape, sigma = (48, 56), 3.0
            spacing = tuple(rng.uniform(0.4, 2.0, size=2))
        else:
            shape, sigma = (16, 24, 20), (1.0, 2.0, 2.0)
            spacing = (float(rng.uniform(1.5, 5.0)),) + tuple(rng.uniform(0.5, 1.0, size=2))
        frac = rng.uniform(0.05, 0.4)
        gt = random_blob(rng, shape, sigma, frac)
        # A perturbed copy gives realistic partial overlaps, plus some fully
        # independent pairs for far-apart surfaces.
        if i % 3 == 2:
            pred = random_blob(rng, shape, sigma, frac)
        else:
            noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
            pred = ndimage.binary_dilation(gt, iterations=1) if i % 2 else gt.copy()
            pred ^= noise > np.quantile(noise, 0.93)
            if not pred.any():
                pred = gt.copy()
        cases.append((pred, gt, spacing))
    return cases


# --------------------------------------------------------------------------
# Hand-made cases
# --------------------------------------------------------------------------

def test_identical_masks():
    pred, gt = squares(shift=0)
    assert M.dsc(pred, gt) == 1.0
    assert M.hd95(pred, gt) == 0.0
    assert M.nsd(pred, gt, tolerance_mm=0.0) == 1.0
    assert M.mae(pred, gt) == 0.0


def test_shifted_squares_dsc_hd95():
    pred, gt = squares(shift=3)
    # Overlap 10 x 7 of two 100-voxel squares.
    assert M.dsc(pred, gt) == pytest.approx(0.7, abs=1e-12)
    assert M.hd95(pred, gt) == pytest.approx(3.0, abs=1e-12)
    assert M.hd95(gt, pred) == pytest.approx(3.0, abs=1e-12)
    # 2 x 30 differing voxels out of 1600.
    assert M.mae(pred, gt) == pytest.approx(60 / 1600, abs=1e-12)


def test_anisotropic_spacing_scales_hd95_along_shift_axis_only():
    pred, gt = squares(shift=3)
    assert M.hd95(pred, gt, spacing=(1.0, 2.0)) == pytest.approx(6.0, abs=1e-12)
    assert M.hd95(pred, gt, spacing=(2.0, 1.0)) == pytest.approx(3.0, abs=1e-12)
    assert M.hd95(pred, gt, spacing=(0.5, 0.5)) == pytest.approx(1.5, abs=1e-12)
    # DSC and MAE do not depend on spacing.
    assert M.dsc(pred, gt) == pytest.approx(0.7)


def test_nsd_tolerance_above_and_below_offset():
    pred, gt = squares(shift=3)
    assert M.nsd(pred, gt, tolerance_mm=3.0) == 1.0  # tolerance is inclusive
    assert M.nsd(pred, gt, tolerance_mm=3.5) == 1.0
    # Per mask 36 border voxels, 14 of them exactly 3 voxels from the other surface.
    assert M.nsd(pred, gt, tolerance_mm=2.5) == pytest.approx(44 / 72, abs=1e-12)
    assert M.nsd(pred, gt, tolerance_mm=2.5) < 1.0
    # Doubling the spacing along the shift axis pushes 6 mm > 3 mm.
    assert M.nsd(pred, gt, spacing=(1.0, 2.0), tolerance_mm=3.0) < 1.0
    assert M.nsd(pred, gt, spacing=(1.0, 2.0), tolerance_mm=6.0) == 1.0


def test_3d_shifted_cubes():
    gt = np.zeros((20, 24, 24), bool)
    gt[5:15, 6:16, 6:16] = True
    pred = np.zeros_like(gt)
    pred[7:17, 6:16, 6:16] = True  # shifted by 2 slices along axis 0
    assert M.dsc(pred, gt) == pytest.approx(0.8, abs=1e-12)
    assert M.hd95(pred, gt) == pytest.approx(2.0, abs=1e-12)
    assert M.hd95(pred, gt, spacing=(2.5, 0.7, 0.7)) == pytest.approx(5.0, abs=1e-12)
    assert M.nsd(pred, gt, spacing=(2.5, 0.7, 0.7), tolerance_mm=5.0) == 1.0
    assert M.nsd(pred, gt, spacing=(2.5, 0.7, 0.7), tolerance_mm=3.0) < 1.0
    assert M.mae(pred, gt) == pytest.approx(2 * 2 * 100 / gt.size, abs=1e-12)


def test_mask_touching_array_edge_has_surface_there():
    gt = np.zeros((12, 12), bool)
    gt[:, :6] = True
    pred = np.zeros_like(gt)
    pred[:, :4] = True
    # The array edge counts as surface, so the left edges coincide.
    assert M.hd95(pred, gt) == pytest.approx(brute_hd95(pred, gt, (1, 1)))
    assert M.nsd(pred, gt, tolerance_mm=1.0) == pytest.approx(brute_nsd(pred, gt, (1, 1), 1.0))


def test_mae_probability_map():
    gt = np.array([[1, 0], [1, 0]], bool)
    prob = np.array([[0.75, 0.25], [1.0, 0.0]], np.float32)
    assert M.mae(prob, gt) == pytest.approx((0.25 + 0.25) / 4)
    # Integer input is binarised like a mask.
    assert M.mae(np.array([[2, 0], [0, 0]]), gt) == pytest.approx(0.25)


# --------------------------------------------------------------------------
# Empty-mask conventions
# --------------------------------------------------------------------------

def test_both_empty():
    z = np.zeros((8, 9), bool)
    assert M.dsc(z, z) == 1.0
    assert M.nsd(z, z) == 1.0
    assert M.hd95(z, z) == 0.0
    assert M.mae(z, z) == 0.0


@pytest.mark.parametrize("pred_empty", [True, False])
def test_exactly_one_empty(pred_empty):
    shape, spacing = (8, 9, 10), (2.0, 0.5, 0.5)
    full = np.zeros(shape, bool)
    full[2:5, 3:6, 4:7] = True
    empty = np.zeros(shape, bool)
    pred, gt = (empty, full) if pred_empty else (full, empty)
    diag = math.sqrt(16.0 ** 2 + 4.5 ** 2 + 5.0 ** 2)
    assert M.dsc(pred, gt) == 0.0
    assert M.nsd(pred, gt, spacing) == 0.0
    assert M.hd95(pred, gt, spacing) == pytest.approx(diag)
    assert math.isfinite(M.hd95(pred, gt))
    assert M.mae(pred, gt) == pytest.approx(27 / full.size)


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------

def test_shape_mismatch_raises():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 5), bool)
    for fn in (M.dsc, M.hd95, M.mae, M.nsd):
        with pytest.raises(ValueError, match="same shape"):
            fn(a, b)
    with pytest.raises(ValueError, match="same shape"):
        M.evaluate_labelmap(a.astype(int), b.astype(int), {"x": (1,)})


@pytest.mark.parametrize("spacing", [(1.0,), (1.0, 1.0, 1.0), [[1.0, 1.0]]])
def test_spacing_length_raises(spacing):
    a = np.ones((4, 4), bool)
    with pytest.raises(ValueError, match="spacing"):
        M.hd95(a, a, spacing)
    with pytest.raises(ValueError, match="spacing"):
        M.nsd(a, a, spacing)
    with pytest.raises(ValueError, match="spacing"):
        M.evaluate_labelmap(a.astype(int), a.astype(int), {"x": (1,)}, spacing)


def test_nonpositive_spacing_raises():
    a = np.ones((4, 4), bool)
    with pytest.raises(ValueError, match="spacing"):
        M.hd95(a, a, (1.0, 0.0))


# --------------------------------------------------------------------------
# Label maps and aggregation
# --------------------------------------------------------------------------

def test_evaluate_labelmap():
    gt = np.zeros((30, 30), np.int16)
    gt[5:15, 5:15] = 1
    gt[18:25, 18:25] = 2
    pred = np.zeros_like(gt)
    pred[5:15, 8:18] = 1  # GGO shifted by 3
    class_map = {"ggo": (1,), "consolidation": (2,), "infection": (1, 2), "other": 7}
    res = M.evaluate_labelmap(pred, gt, class_map, spacing=(1.0, 1.0))
    assert set(res) == set(class_map)
    for v in res.values():
        assert set(v) == {"dsc", "hd95_mm", "mae", "nsd_3mm"}
    assert res["ggo"]["dsc"] == pytest.approx(0.7)
    assert res["ggo"]["hd95_mm"] == pytest.approx(3.0)
    assert res["ggo"]["nsd_3mm"] == 1.0
    assert res["consolidation"]["dsc"] == 0.0
    assert res["consolidation"]["nsd_3mm"] == 0.0
    assert res["consolidation"]["hd95_mm"] == pytest.approx(math.hypot(30, 30))
    inf_gt, inf_pred = gt > 0, pred > 0
    assert res["infection"]["dsc"] == pytest.approx(M.dsc(inf_pred, inf_gt))
    assert res["infection"]["hd95_mm"] == pytest.approx(M.hd95(inf_pred, inf_gt))
    assert res["infection"]["nsd_3mm"] == pytest.approx(M.nsd(inf_pred, inf_gt))
    assert res["infection"]["mae"] == pytest.approx(M.mae(inf_pred, inf_gt))
    assert res["other"] == {"dsc": 1.0, "hd95_mm": 0.0, "mae": 0.0, "nsd_3mm": 1.0}


def test_summarize():
    cases = [
        {"case": "a", "dsc": 0.5, "hd95_mm": 2.0, "nsd_3mm": float("nan")},
        {"case": "b", "dsc": 1.0, "hd95_mm": float("nan"), "nsd_3mm": float("nan")},
        {"case": "c", "dsc": 0.0, "hd95_mm": 4.0, "nsd_3mm": float("nan")},
    ]
    s = M.summarize(cases)
    assert s["n"] == 3
    assert s["dsc"] == pytest.approx(0.5)
    assert s["hd95_mm"] == pytest.approx(3.0)
    assert math.isnan(s["nsd_3mm"])
    assert "case" not in s
    assert M.summarize([]) == {"n": 0}


def test_summarize_nested_labelmap_results():
    gt = np.zeros((20, 20), np.uint8)
    gt[4:12, 4:12] = 1
    r1 = M.evaluate_labelmap(gt, gt, {"ggo": (1,)})
    r2 = M.evaluate_labelmap(np.zeros_like(gt), gt, {"ggo": (1,)})
    s = M.summarize([r1, r2])
    assert s["n"] == 2
    assert s["ggo"]["n"] == 2
    assert s["ggo"]["dsc"] == pytest.approx(0.5)
    assert s["ggo"]["nsd_3mm"] == pytest.approx(0.5)


# --------------------------------------------------------------------------
# Cross-checks
# --------------------------------------------------------------------------

BLOBS = blob_pairs()


@pytest.mark.parametrize("idx", range(len(BLOBS)))
def test_matches_medpy(idx):
    binary = pytest.importorskip("medpy.metric.binary")
    pred, gt, spacing = BLOBS[idx]
    assert M.dsc(pred, gt) == pytest.approx(binary.dc(pred, gt), abs=1e-6)
    expected = binary.hd95(pred, gt, voxelspacing=spacing)
    assert M.hd95(pred, gt, spacing) == pytest.approx(expected, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("idx", range(len(BLOBS)))
def test_surface_metrics_match_brute_force(idx):
    pred, gt, spacing = BLOBS[idx]
    for tol in (0.5, 1.0, 2.0, 3.0):
        assert M.nsd(pred, gt, spacing, tol) == pytest.approx(
            brute_nsd(pred, gt, spacing, tol), abs=1e-12
        )
    assert M.hd95(pred, gt, spacing) == pytest.approx(brute_hd95(pred, gt, spacing), abs=1e-9)


def test_blob_cases_are_nontrivial():
    dscs = [M.dsc(p, g) for p, g, _ in BLOBS]
    assert min(dscs) < 0.5 < max(dscs) < 1.0
