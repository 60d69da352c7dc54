"""A (corrected) result as a training case: the layout ``ssalesionseg train --cases`` reads.

    <folder>/images/<case>.nii.gz   the CT in HU (int16 when the values are whole HU)
    <folder>/labels/<case>.nii.gz   0 background, 1 GGO, 2 consolidation (binary models: 1 infection)
    <folder>/lungs/<case>.nii.gz    1 right, 2 left lung (optional, per case; without it
                                    training finds the lungs with ``ssanet.lungs``)
    <folder>/labels/<case>.json     {"class_names": [...]}: what the label values mean, so a
                                    binary (infection) case is not trained as GGO

Written by ``ssalesionseg export-case`` and by the Slicer module's *Export as training
case*; read back by :func:`ssanet.data.load_training_cases`. A case is written whole or
refused whole: any file of it already there is an error unless ``overwrite``; all files
are written under temporary names and renamed into place together (a rename that fails
part-way removes the case rather than pair new labels with an old CT); overwriting a
case without lungs removes the old case's lung mask so it cannot pair up with the new
labels.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ssanet.classes import MULTICLASS
from ssanet.preprocess import hu_problem, same_grid

from .errors import InputError
from .io import NotPutInPlace, written_together

FOLDERS = ("images", "labels", "lungs")


def safe_case_name(name: str) -> str:
    """``name`` with everything but letters, digits, ``_ . -`` replaced (a file-name stem);
    letters of any script stay (``Müller`` is not ``M_ller``)."""
    cleaned = re.sub(r"[^\w.-]+", "_", str(name)).strip("._")
    return cleaned or "case"


def case_paths(folder, case: str) -> dict:
    """{"images" | "labels" | "lungs": path} of case ``case`` in ``folder``."""
    return {sub: os.path.join(os.fspath(folder), sub, case + ".nii.gz") for sub in FOLDERS}


def sidecar_path(folder, case: str) -> str:
    """``labels/<case>.json``: the class names of the case's label values."""
    return os.path.join(os.fspath(folder), "labels", case + ".json")


def existing_case_files(folder, case: str) -> list:
    """The files of case ``case`` already in ``folder`` (any of the three sub-folders)."""
    return [p for p in list(case_paths(folder, case).values()) + [sidecar_path(folder, case)] if os.path.exists(p)]


def ct_for_export(ct: sitk.Image) -> sitk.Image:
    """The CT as int16 when its values are whole HU in range (they nearly always are), else float32."""
    array = sitk.GetArrayViewFromImage(ct)
    if array.size and np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            return sitk.Cast(ct, sitk.sitkFloat32)
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if -32768 <= low and high <= 32767:
        return sitk.Cast(ct, sitk.sitkInt16)
    return sitk.Cast(ct, sitk.sitkFloat32)


def lungs_covering_lesions(lungs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Lung labels (1 right, 2 left) extended over the lesion voxels they leave out — each to
    the side of the nearest lung voxel of its slice (else of the nearer lung's mean column) —
    and how many voxels were added. A lesion painted past a lung mask's edge (the classical
    method misses dense consolidation there) is lung: training blanks the CT outside the
    lung mask, so labels outside it would be lesions the model is shown as black."""
    from scipy import ndimage as ndi

    out = lungs.astype(np.uint8, copy=True)
    outside = (labels > 0) & (out == 0)
    added = int(np.count_nonzero(outside))
    if not added:
        return out, 0
    columns = {v: np.nonzero(out == v)[2] for v in (1, 2)}
    mean_col = {v: float(c.mean()) for v, c in columns.items() if c.size}
    for z in np.flatnonzero(outside.reshape(len(outside), -1).any(axis=1)):
        sl, miss = out[z], outside[z]
        if sl.any():
            idx = ndi.distance_transform_edt(sl == 0, return_distances=False, return_indices=True)
            sl[miss] = sl[idx[0][miss], idx[1][miss]]
        elif mean_col:
            cols = np.nonzero(miss)[1]
            sides = np.array(sorted(mean_col))
            nearest = np.argmin(np.abs(cols[:, None] - np.array([mean_col[v] for v in sides])[None]), axis=1)
            sl[miss] = sides[nearest]
        else:
            sl[miss] = 1
    return out, added


def write_training_case(folder, case: str, ct: sitk.Image, labels: sitk.Image,
                        lungs: sitk.Image | None = None, overwrite: bool = False, class_names=None,
                        notes: list | None = None) -> list:
    """Write one training case (module docstring); returns the written paths.
    ``class_names``: what the label values mean (default: background, GGO, consolidation;
    ``("background", "infection")`` for a binary model's result). Lesion voxels outside
    ``lungs`` are added to the exported lung mask (:func:`lungs_covering_lesions`), which is
    said in ``notes`` (a list, when given).

    Refused before anything is written: a CT that is not in HU, labels or lungs on another
    grid than the CT, label values that are not classes, an existing file of the case
    (without ``overwrite``)."""
    case = safe_case_name(case)
    class_names = [str(c).lower() for c in (class_names or MULTICLASS)]
    problem = hu_problem(sitk.GetArrayViewFromImage(ct))
    if problem:
        raise InputError(f"the CT of case '{case}' {problem}; training cases hold the CT in HU")
    for what, image in (("labels", labels), ("lungs", lungs)):
        if image is not None and not same_grid(image, ct):
            raise InputError(f"the {what} of case '{case}' are not on the CT's grid (size {image.GetSize()} vs "
                             f"{ct.GetSize()}, origin {image.GetOrigin()} vs {ct.GetOrigin()})")
    extra = sorted(int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels)) if v >= len(class_names))
    if extra:
        raise InputError(f"the labels of case '{case}' hold values {extra[:5]}; its classes are "
                         + ", ".join(f"{i} {n}" for i, n in enumerate(class_names)))
    paths = case_paths(folder, case)
    if not overwrite:
        existing = existing_case_files(folder, case)
        if existing:
            raise FileExistsError(f"training case '{case}' already exists: {existing[0]}")
    if lungs is not None:
        extended, added = lungs_covering_lesions(sitk.GetArrayViewFromImage(lungs), sitk.GetArrayViewFromImage(labels))
        if added:
            ml = added * float(np.prod(ct.GetSpacing())) / 1000.0
            total = int(np.count_nonzero(sitk.GetArrayViewFromImage(labels)))
            if notes is not None:
                notes.append(f"{ml:.1f} mL of lesion ({added} of {total} voxels) lay outside the lung mask: the "
                             f"exported lung mask of case '{case}' includes them (training blanks the CT outside it)")
            image = sitk.GetImageFromArray(extended)
            image.CopyInformation(lungs)
            lungs = image
    images = {"images": ct_for_export(ct), "labels": sitk.Cast(labels, sitk.sitkUInt8),
              "lungs": None if lungs is None else sitk.Cast(lungs, sitk.sitkUInt8)}
    targets = {sub: Path(paths[sub]) for sub, image in images.items() if image is not None}
    targets["sidecar"] = Path(sidecar_path(folder, case))
    for t in targets.values():
        t.parent.mkdir(parents=True, exist_ok=True)
    try:
        with written_together(targets, also_remove=[paths["lungs"]]) as tmp:
            for sub in targets:
                if sub == "sidecar":
                    tmp[sub].write_text(json.dumps({"class_names": class_names}) + "\n")
                else:
                    sitk.WriteImage(images[sub], str(tmp[sub]), True)
    except NotPutInPlace as e:
        raise InputError(f"could not put {Path(e.filename).name} of training case '{case}' in place "
                         f"({e.strerror or e}); the case's files were removed: export it again") from None
    # the case being replaced had lungs this one lacks: its old mask must not pair up
    if images["lungs"] is None and os.path.exists(paths["lungs"]):
        os.remove(paths["lungs"])
    return [os.fspath(targets[sub]) for sub in (*FOLDERS, "sidecar") if sub in targets]
