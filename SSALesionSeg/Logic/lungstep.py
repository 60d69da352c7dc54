"""The lung step: right/left lung labels (and optionally lobes) on the CT's own grid.

Methods
-------
``lungmask``  the ``lungmask`` package's R231 U-Net (and LTRCLobes for lobes when its
              weights are given). Nothing is downloaded: weights come from, in order, the
              explicit path, ``$SSALESIONSEG_LUNGMASK_WEIGHTS``, the lungmask / torch hub
              cache (``torch.hub.get_dir()/checkpoints/unet_r231-*.pth``).
``classical`` :func:`ssanet.lungs.lung_mask_from_hu` (threshold-based with dense-lesion
              recovery); needs nothing, less exact.
``auto``      lungmask when weights are found, else classical with a notice.
A lung mask file (labelmap or ``.seg.nrrd`` on the CT grid) bypasses both; so does a
:class:`SidedLungMask` (labels that already give the side, e.g. from Slicer's segments).
"""
from __future__ import annotations

import glob
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import FallbackWarning, InputError, LungWeightsError
from .geometry import array_from_lps, to_lps
from .io import on_ct_grid, read_labelmap, read_segments

WEIGHTS_ENV = "SSALESIONSEG_LUNGMASK_WEIGHTS"
LOBE_WEIGHTS_ENV = "SSALESIONSEG_LUNGMASK_LOBE_WEIGHTS"
METHODS = ("auto", "lungmask", "classical")
FALLBACK_NOTICE = ("no lungmask weights found (looked at --lung-weights, ${env} and the torch hub "
                   "cache): using the classical lung segmentation, which is less exact around dense "
                   "lesions and the hilum. Put unet_r231-*.pth there to use lungmask.")


@dataclass
class LungResult:
    labels: np.ndarray                 # uint8 (z, y, x) on the CT grid: 1 right, 2 left
    method: str                        # "lungmask", "classical" or "file"
    lobes: np.ndarray | None = None    # uint8 1..5 (LTRCLobes order) or None
    details: dict = field(default_factory=dict)
    notice: str | None = None


@dataclass
class SidedLungMask:
    """A lung mask whose labels already give the side (1 right, 2 left): kept as it is even
    with one side only (one lung drawn, or after a pneumonectomy), where a plain mask holding
    only 1s is taken as unsided and split into two lungs. ``mask`` is what ``lung_mask``
    takes otherwise: a file, a SimpleITK image or an array on the CT grid."""
    mask: object


def hub_cache_weights(pattern: str = "unet_r231-*.pth") -> Path | None:
    try:
        import torch
        hub = torch.hub.get_dir()
    except Exception:
        return None
    hits = sorted(glob.glob(os.path.join(hub, "checkpoints", pattern)))
    return Path(hits[-1]) if hits else None


def resolve_weights(explicit=None, env: str = WEIGHTS_ENV, pattern: str = "unet_r231-*.pth") -> Path | None:
    """Weights file following the documented order; a path that was given but does not
    exist is an error, not a silent fallback."""
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise LungWeightsError(f"lungmask weights not found: {p}")
        return p
    value = os.environ.get(env)
    if value:
        p = Path(value).expanduser()
        if not p.is_file():
            raise LungWeightsError(f"${env} points to {p}, which does not exist")
        return p
    return hub_cache_weights(pattern)


def compute_lungs(ct: sitk.Image, method: str = "auto", weights=None, lobe_weights=None,
                  lung_mask=None, device: str = "auto") -> LungResult:
    """Lung labels for ``ct`` (a validated float32 HU image)."""
    if lung_mask is not None:
        return _from_file(lung_mask, ct)
    if method not in METHODS:
        raise InputError(f"unknown lung method {method!r}; use one of {', '.join(METHODS)}")
    if method == "classical":
        return _classical(ct)
    path = resolve_weights(weights)
    if path is None:
        if method == "lungmask":
            raise LungWeightsError(
                "--lungs lungmask needs R231 weights: pass --lung-weights PATH (unet_r231-*.pth), set "
                f"${WEIGHTS_ENV}, or place the file in the torch hub cache; or use --lungs classical")
        res = _classical(ct)
        res.notice = FALLBACK_NOTICE.replace("{env}", WEIGHTS_ENV)
        warnings.warn(res.notice, FallbackWarning, stacklevel=2)
        return res
    lobe_path = resolve_weights(lobe_weights, LOBE_WEIGHTS_ENV, "unet_ltrclobes-*.pth") if lobe_weights or os.environ.get(LOBE_WEIGHTS_ENV) else None
    return _lungmask(ct, path, lobe_path, device)


def _classical(ct: sitk.Image) -> LungResult:
    from ssanet.lungs import lung_mask_from_hu

    lps = to_lps(ct)
    hu = sitk.GetArrayViewFromImage(lps)
    labels = lung_mask_from_hu(hu, lps.GetSpacing()[::-1])
    labels = array_from_lps(labels, lps, ct).astype(np.uint8)
    return LungResult(labels=labels, method="classical",
                      details={"algorithm": "ssanet.lungs.lung_mask_from_hu"})


def _lungmask(ct: sitk.Image, weights: Path, lobe_weights: Path | None, device: str) -> LungResult:
    try:
        from lungmask import LMInferer
    except ImportError:
        raise LungWeightsError("the lungmask package is not installed: install it without replacing "
                               "your torch (pip install lungmask torch==<your version>) or use "
                               "--lungs classical") from None
    force_cpu = device == "cpu"
    try:
        inferer = LMInferer(modelname="R231", modelpath=str(weights), force_cpu=force_cpu, tqdm_disable=True)
    except Exception as e:
        raise LungWeightsError(f"cannot load lungmask weights {weights}: {e}") from None
    # lungmask reorients SimpleITK input to LPS internally and returns the CT's own order
    labels = np.asarray(inferer.apply(ct), dtype=np.uint8)
    labels[labels > 2] = 0
    details = {"model": "R231", "weights": str(weights), "weights_name": weights.name}
    lobes = None
    if lobe_weights is not None:
        try:
            lobe_inf = LMInferer(modelname="LTRCLobes", modelpath=str(lobe_weights), force_cpu=force_cpu,
                                 tqdm_disable=True)
        except Exception as e:
            raise LungWeightsError(f"cannot load lungmask lobe weights {lobe_weights}: {e}") from None
        lobes = np.asarray(lobe_inf.apply(ct), dtype=np.uint8)
        lobes[lobes > 5] = 0
        lobes, filled = fill_lobes(lobes, labels, ct.GetSpacing()[::-1])
        details["lobe_model"] = "LTRCLobes"
        details["lobe_voxels_filled_from_r231"] = filled
        details["lobe_weights"] = str(lobe_weights)
    return LungResult(labels=labels, method="lungmask", lobes=lobes, details=details)


# lungmask LTRCLobes labels per side of the R231 lung labels (1 right, 2 left)
LOBES_OF_SIDE = {1: (3, 4, 5), 2: (1, 2)}


def fill_lobes(lobes: np.ndarray, lungs: np.ndarray, spacing_zyx=(1.0, 1.0, 1.0)) -> tuple[np.ndarray, int]:
    """Give every lung voxel the lobes model left out the nearest lobe of its own side.

    LTRCLobes leaves out dense lung (consolidation, effusion) that R231 includes — what
    lungmask's ``LTRCLobes_R231`` fill model is for; without it the per-lobe severity score
    would miss the densest lesions. Returns (filled lobes, number of voxels filled)."""
    from scipy import ndimage as ndi

    out = np.array(lobes, dtype=np.uint8, copy=True)
    filled = 0
    for side, side_lobes in LOBES_OF_SIDE.items():
        has_lobe = np.isin(out, side_lobes)
        missing = (lungs == side) & (out == 0)
        if not missing.any() or not has_lobe.any():
            continue
        # within the box of this side's lung and lobes only, and without the distances: a
        # 512 x 512 x 300 CT would otherwise need several GB
        box = ndi.find_objects((missing | has_lobe).astype(np.uint8))[0]
        sub, miss = out[box], missing[box]
        nearest = ndi.distance_transform_edt(~has_lobe[box], sampling=spacing_zyx,
                                             return_distances=False, return_indices=True)
        sub[miss] = sub[tuple(ix[miss] for ix in nearest)]
        filled += int(miss.sum())
    return out, filled


def _mask_array(mask, ct: sitk.Image) -> np.ndarray:
    """A lung mask given as a file, a SimpleITK image or an array, on the CT grid."""
    if isinstance(mask, np.ndarray):
        if mask.shape != ct.GetSize()[::-1]:
            raise InputError(f"lung mask array has shape {mask.shape}, the CT {ct.GetSize()[::-1]} (z, y, x)")
        return mask
    if isinstance(mask, sitk.Image):  # the same rule as for a file: the CT's voxels, or refused
        if mask.GetDimension() != 3 or mask.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"the given lung mask image must be a 3D scalar label image like the CT, got "
                             f"{mask.GetDimension()}D with {mask.GetNumberOfComponentsPerPixel()} component(s)")
        return sitk.GetArrayFromImage(on_ct_grid(mask, ct, "the given lung mask image", "lung mask"))
    return read_labelmap(mask, ct, what="lung mask")


def _from_file(path, ct: sitk.Image) -> LungResult:
    if isinstance(path, (str, os.PathLike)) and str(path).lower().endswith(".seg.nrrd"):  # lungs by segment name
        segs = read_segments(path, ct, what="lung mask")
        labels = lungs_from_segments(segs, ct)
        if labels is None:
            if not any(role in LUNG_ROLES for _, role, _ in segs):
                raise InputError(f"{path}: no lung segment (by name or terminology) among "
                                 f"{', '.join(n for n, _, _ in segs)}")
            labels = np.zeros(ct.GetSize()[::-1], np.uint8)   # lung segments, all empty: said below
    elif isinstance(path, SidedLungMask):
        arr = _mask_array(path.mask, ct)
        other = sorted(set(np.unique(arr).tolist()) - {0, 1, 2})
        if other:
            raise InputError(f"the sided lung mask holds label(s) {other}: only 1 (right lung) and 2 (left lung)")
        labels = arr.astype(np.uint8)
        path = path.mask   # named as what it holds, below
    else:
        arr = _mask_array(path, ct)
        values = set(np.unique(arr).tolist()) - {0}
        if values == {1, 2}:
            labels = arr.astype(np.uint8)  # already right (1) / left (2)
        else:
            labels = _sides_of(arr > 0, ct)
    if not labels.any():
        raise InputError(f"{path if isinstance(path, (str, os.PathLike)) else 'lung mask'}: the lung mask is empty")
    # absolute, so that a rerun from another folder is known to use the same mask
    source = str(Path(path).absolute()) if isinstance(path, (str, os.PathLike)) else f"given {type(path).__name__}"
    return LungResult(labels=labels, method="file", details={"file": source})


LUNG_ROLES = ("right_lung", "left_lung", "lung")


def lungs_from_segments(segs, ct: sitk.Image) -> np.ndarray | None:
    """Lung labels (1 right, 2 left) from the segments of a ``.seg.nrrd`` as
    :func:`~.io.read_segments` returns them: the right / left lung segments when one holds
    voxels, else one unsided lung segment split into sides as a lung mask is; None when no
    lung segment holds voxels."""
    present = {role for _, role, m in segs if m.any()}   # an empty lung segment tells nothing
    if present & {"right_lung", "left_lung"}:
        labels = np.zeros(ct.GetSize()[::-1], np.uint8)
        for _, role, m in segs:
            if role in ("right_lung", "left_lung"):
                labels[m] = 1 if role == "right_lung" else 2
        return labels
    if "lung" in present:
        return _sides_of(np.logical_or.reduce([m for _, role, m in segs if role == "lung"]), ct)
    return None


def _sides_of(mask: np.ndarray, ct: sitk.Image) -> np.ndarray:
    """Right/left labels of a binary lung mask, split like the classical method does."""
    from ssanet.lungs import split_lungs

    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.CopyInformation(ct)
    lps = to_lps(img)
    sides = split_lungs(sitk.GetArrayViewFromImage(lps) > 0)
    return array_from_lps(sides, lps, ct).astype(np.uint8)
