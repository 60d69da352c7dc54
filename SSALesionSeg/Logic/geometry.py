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
