"""Axis reorientation between a CT's own voxel order and the canonical LPS order.

The model and the classical lung code read ``arr[z]`` slices with rows anterior ->
posterior and columns patient right -> left, which is what ``sitk.DICOMOrient(img,
"LPS")`` produces from the direction cosines. DICOMOrient only permutes and flips axes,
so mapping results back is exact and the original geometry (including oblique
directions) is kept.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def orientation_of(img: sitk.Image) -> str:
    return sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(img.GetDirection())


def to_lps(img: sitk.Image) -> sitk.Image:
    return img if orientation_of(img) == "LPS" else sitk.DICOMOrient(img, "LPS")


def array_from_lps(arr_lps: np.ndarray, lps: sitk.Image, reference: sitk.Image) -> np.ndarray:
    """An array laid out like ``to_lps(reference)`` -> the same data in ``reference``'s
    own (z, y, x) voxel order."""
    if orientation_of(reference) == "LPS":
        return arr_lps
    tmp = sitk.GetImageFromArray(arr_lps)
    tmp.CopyInformation(lps)
    back = sitk.DICOMOrient(tmp, orientation_of(reference))
    if back.GetSize() != reference.GetSize() or not np.allclose(back.GetDirection(), reference.GetDirection(), atol=1e-4):
        # never expected (DICOMOrient is a permutation); resample rather than misplace voxels
        back = sitk.Resample(tmp, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, tmp.GetPixelID())
    return sitk.GetArrayFromImage(back)


def image_like(arr: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """``arr`` (z, y, x in reference's voxel order) as an image with reference's geometry."""
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(reference)
    return img


# Bone: at or above the lung window's top (what an 8-bit rendering saturates, so renderings
# mapped back to HU keep it). Testing/benchmarks/ap_orientation.py: on 1121 COVID-SemiSeg
# unlabeled slices of 17 series (canonical orientation) it lies behind the lungs' centre on
# all but 2 (slice median +0.29 of their height; per-series medians +0.21..+0.37).
BONE_HU = 250.0
SPINE_BAND_MM = 15.0     # half-width of the midline column band between the lungs
FLIPPED_SCORE = -0.05    # median (bone row - lung row) / lung height below this: spine in front


def spine_score(hu: np.ndarray, lung: np.ndarray, spacing=(1.0, 1.0)) -> float | None:
    """Where the bone of the midline band between the lungs lies on one axial LPS slice
    (``hu``, ``lung`` (rows, cols); ``spacing`` (col, row) mm): (its mean row - the lungs' mean
    row) / the lungs' height, > 0 behind them. None for a slice with under 20 cm² of lung or
    under 1 cm² of bone in the band."""
    from scipy import ndimage as ndi

    sx, sy = spacing
    rows, cols = np.nonzero(lung)
    if len(rows) * sx * sy < 2000.0:
        return None
    half = max(1, int(round(SPINE_BAND_MM / sx)))
    c = int(round(cols.mean()))
    lo, hi = max(0, c - half), min(hu.shape[1], c + half + 1)
    br = np.nonzero(ndi.binary_opening(hu[:, lo:hi] >= BONE_HU))[0]
    if len(br) < 100.0 / (sx * sy):
        return None
    return float((br.mean() - rows.mean()) / (rows.max() - rows.min() + 1))


def ap_flip_note(ct: sitk.Image, lungs: sitk.Image) -> str | None:
    """A note when the CT's anterior/posterior axis looks flipped: in LPS order the rows run
    anterior -> posterior, so the spine (bone in the midline band between the lungs,
    :func:`spine_score`) lies behind the lungs' centre. Where it lies in front on most slices,
    the header's direction (or an array written without it) has turned the chest upside down,
    the model saw slices it was never trained on, and the lung sides may be swapped too. None
    when it is behind or there is too little bone to tell (no spine in view, a phantom)."""
    lps = to_lps(ct)
    hu = sitk.GetArrayViewFromImage(lps)
    lung = sitk.GetArrayViewFromImage(to_lps(lungs)) > 0
    spacing = lps.GetSpacing()[:2]
    zs = np.flatnonzero(lung.any(axis=(1, 2)))
    if len(zs) == 0:
        return None
    picked = zs[np.linspace(0, len(zs) - 1, min(len(zs), 40)).astype(int)]
    scores = [s for s in (spine_score(hu[z], lung[z], spacing) for z in picked) if s is not None]
    if len(scores) < max(1, min(5, len(picked) // 2)) or np.median(scores) >= FLIPPED_SCORE:
        return None
    return ("the spine lies in front of the lungs in this CT as its header orients it: anterior and posterior "
            "look flipped (a wrong direction in the header, or an array saved without it). The model saw the "
            "slices upside down and right / left may be swapped too: check the orientation in a viewer, fix "
            "the header (e.g. convert again from the DICOM) and run again")
