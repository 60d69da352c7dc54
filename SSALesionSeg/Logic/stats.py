"""Lung and lesion statistics and the CT severity score.

Volumes are voxel counts times the voxel volume. Lesion percentages count lesion voxels
inside the lung (the engine's labels are always inside it; a hand-edited labelmap may
not be: ``outside_lung_volume_ml`` says how much is not). Mean/std HU are over the lesion voxels of the CT.

Severity (CT severity score, lobar extent; Pan et al., Radiology 2020): each region scores
0 (no lesion), 1 (< 5 %), 2 (5-25 %), 3 (> 25 and < 50 %), 4 (50-75 %), 5 (> 75 %) of its
volume involved by any lesion. Per lobe when lobes are available (total 0-25, the published
score), else per lung (total 0-10: the same bins on the two lungs, an adaptation, not the
published score); the output names the scheme and ``basis`` ("per lobe" / "per lung"), and
every display writes the basis beside the total. A region with no voxels (a lung or lobe
the mask lacks) is not scored (``score`` None) and ``regions_scored`` says how many were.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ssanet.classes import BINARY, MULTICLASS

from .io import atomic_path

MULTICLASS_NAMES = dict(enumerate(MULTICLASS[1:], start=1))  # {label value: stats key}
BINARY_NAMES = dict(enumerate(BINARY[1:], start=1))
LUNG_SIDES = {"right": (1,), "left": (2,), "total": (1, 2)}
# lungmask LTRCLobes label order
LOBE_NAMES = {1: "left_upper", 2: "left_lower", 3: "right_upper", 4: "right_middle", 5: "right_lower"}


def label_names_for(class_names) -> dict:
    """{label value: stats key} for a model's class names (background first)."""
    names = [c.lower() for c in class_names]
    if len(names) <= 2:
        return dict(BINARY_NAMES)
    return {i: ("ggo" if n in ("ggo", "ground-glass opacity") else n) for i, n in enumerate(names) if i > 0}


def severity_bin(percent: float) -> int:
    if percent <= 0:
        return 0
    if percent < 5:
        return 1
    if percent <= 25:
        return 2
    if percent < 50:
        return 3
    if percent <= 75:
        return 4
    return 5


def _arr(x):
    return sitk.GetArrayViewFromImage(x) if isinstance(x, sitk.Image) else np.asarray(x)


def compute_stats(ct, labels, lungs, lobes=None, label_names=None) -> dict:
    """Statistics dict (see module docstring). ``ct`` must be a SimpleITK image (its spacing
    gives the voxel volume); ``labels``/``lungs``/``lobes`` images or arrays on its grid."""
    if not isinstance(ct, sitk.Image):
        raise TypeError("ct must be a SimpleITK image (its spacing defines the volumes)")
    label_names = dict(label_names or MULTICLASS_NAMES)
    hu = _arr(ct)
    lab = _arr(labels)
    lung = _arr(lungs)
    for what, a in (("labels", lab), ("lungs", lung)) + ((("lobes", _arr(lobes)),) if lobes is not None else ()):
        if a.shape != hu.shape:
            raise ValueError(f"{what} shape {a.shape} differs from the CT {hu.shape}")
    # spacing product times |det(direction)|: 1 for the usual (orthonormal) axes, less for a
    # sheared grid (gantry-tilted CT stored without resampling)
    direction = np.asarray(ct.GetDirection(), float).reshape(ct.GetDimension(), ct.GetDimension())
    voxel_ml = float(np.prod(ct.GetSpacing()) * abs(np.linalg.det(direction))) / 1000.0

    lung_masks = {side: np.isin(lung, vals) for side, vals in LUNG_SIDES.items()}
    lung_counts = {side: int(np.count_nonzero(m)) for side, m in lung_masks.items()}
    out: dict = {
        "voxel_volume_ml": voxel_ml,
        "spacing_mm": [float(s) for s in ct.GetSpacing()],
        "lungs": {side: {"volume_ml": n * voxel_ml} for side, n in lung_counts.items()},
        "lesions": {},
    }

    classes = {name: (value,) for value, name in label_names.items()}
    classes["infection"] = tuple(label_names)
    for name in ("ggo", "consolidation", "infection"):
        if name not in classes:
            out["lesions"][name] = None  # the model does not produce this class
            continue
        m = np.isin(lab, classes[name])
        n = int(np.count_nonzero(m))
        inside = int(np.count_nonzero(m & lung_masks["total"]))
        entry = {"volume_ml": n * voxel_ml,
                 "percent_of_lung": _pct(inside, lung_counts["total"]),
                 "outside_lung_volume_ml": (n - inside) * voxel_ml}
        for side in ("right", "left"):
            k = int(np.count_nonzero(m & lung_masks[side]))
            entry[f"percent_of_{side}_lung"] = _pct(k, lung_counts[side])
            entry[f"{side}_volume_ml"] = k * voxel_ml
        if n:
            v = hu[m].astype(np.float64)
            entry["mean_hu"] = float(v.mean())
            entry["std_hu"] = float(v.std())
        else:
            entry["mean_hu"] = entry["std_hu"] = None
        out["lesions"][name] = entry

    infection = np.isin(lab, tuple(label_names))
    if lobes is not None:
        lob = _arr(lobes)
        regions = {}
        for value, name in LOBE_NAMES.items():
            r = lob == value
            cnt = int(np.count_nonzero(r))
            pct = _pct(np.count_nonzero(infection & r), cnt)
            regions[name] = {"volume_ml": cnt * voxel_ml, "percent_involved": pct,
                             "score": None if pct is None else severity_bin(pct)}
        out["lobes"] = {k: {"volume_ml": v["volume_ml"]} for k, v in regions.items()}
        scheme, basis, max_total = "CT severity score per lobe (0-5 each, total 0-25; Pan et al. 2020)", "per lobe", 25
    else:
        regions = {}
        for side in ("right", "left"):
            pct = _pct(np.count_nonzero(infection & lung_masks[side]), lung_counts[side])
            regions[f"{side}_lung"] = {"percent_involved": pct, "score": None if pct is None else severity_bin(pct)}
        scheme, basis, max_total = ("the lobar CT score's 0-5 bins on each lung, total 0-10; no lobes available, "
                                    "so not the published 0-25 score", "per lung", 10)
    scored = [r["score"] for r in regions.values() if r["score"] is not None]
    out["severity"] = {
        "scheme": scheme,
        "basis": basis,
        "bins_percent": ["0: none", "1: <5", "2: 5-25", "3: >25-<50", "4: 50-75", "5: >75"],
        "regions": regions,
        "total": int(sum(scored)),
        "max": max_total,
        "regions_scored": len(scored),
    }
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def severity_text(severity) -> str | None:
    """'4/10 per lung', '7/25 per lobe' (+ how many regions were scored when not all), for
    the ``severity`` of :func:`compute_stats` or what is left of it in an edited stats file
    (a bare number: '4'); None without a total."""
    sev = severity if isinstance(severity, dict) else {"total": severity}
    total, maximum = sev.get("total"), sev.get("max")
    if not _is_number(total):
        return None
    text = f"{total:g}" + (f"/{maximum:g}" if _is_number(maximum) else "")
    text = f"{text} {sev.get('basis') or ''}".rstrip()
    scored, n = sev.get("regions_scored"), len(sev.get("regions") or {})
    if _is_number(scored) and n and scored < n:
        text += f" ({scored:g} of {n} regions scored)"
    return text


def lung_coverage_note(lungs: sitk.Image, ct: sitk.Image | None = None) -> str | None:
    """A note when the lung mask reaches the first or last axial slice of the scan, or the
    image's sides or (with ``ct``) the edge of its scanned field (a field of view or a crop
    that cuts the lungs): the lungs go on beyond it, so the percentages and the severity
    score describe the part scanned."""
    from scipy import ndimage as ndi

    from .geometry import to_lps

    lps = to_lps(lungs)   # kept: a view of a temporary image reads freed memory
    arr = sitk.GetArrayViewFromImage(lps)   # (z, y, x), z from inferior to superior
    if arr.shape[0] == 0 or not arr.any():
        return None
    tail = "so the % of lung involved and the severity score describe the part scanned, not the whole lungs"
    if arr.shape[0] == 1:
        notes = ["the scan is one slice: the lungs go on above and below it"]
    else:
        ends = [name for name, z in (("top (superior)", -1), ("bottom (inferior)", 0)) if arr[z].any()]
        where = "top and bottom slices" if len(ends) == 2 else f"{ends[0]} slice" if ends else None
        notes = [f"the lungs reach the {where} of the scan ({arr.shape[0]} slices): they go on beyond it"] if where else []
    # LPS arrays: rows run anterior -> posterior, columns patient right -> left
    sides = [name for name, edge in (("front", arr[:, 0, :]), ("back", arr[:, -1, :]),
                                     ("right", arr[:, :, 0]), ("left", arr[:, :, -1])) if edge.any()]
    if sides:
        cut = int(sum(bool(arr[z, [0, -1], :].any() or arr[z, :, [0, -1]].any()) for z in range(arr.shape[0])))
        notes.append(f"the lungs run into the image's {', '.join(sides)} edge{'s' if len(sides) > 1 else ''} on "
                     f"{cut} slice{'s' if cut > 1 else ''}: the field of view (or a crop) cuts them there")
    if ct is not None:   # ... or into padding around the scanned field, inside the image
        from ssanet.lungs import outside_field

        ct_lps = to_lps(ct)
        outside = outside_field(sitk.GetArrayViewFromImage(ct_lps))
        near = np.array([o.any() and a.any() and bool((ndi.binary_dilation(o) & (a > 0)).any())
                         for o, a in zip(outside, arr)])
        if near.any():
            n = int(near.sum())
            notes.append(f"the lungs run into the edge of the scanned field (padding around it) on {n} "
                         f"slice{'s' if n > 1 else ''}: the field of view (or a crop) cuts them there")
    return f"{'; '.join(notes)}, {tail}" if notes else None


# Both lungs of an adult cover 100-300 cm² of a slice between apex and base; a mask that
# averages under this over several centimetres has most likely lost a lung or most of one.
SMALL_LUNG_CM2 = 20.0
SMALL_LUNG_SPAN_MM = 50.0


def lung_size_note(lungs: sitk.Image) -> str | None:
    """A note when the lung mask is far smaller than a chest's lungs: on average under
    ``SMALL_LUNG_CM2`` per axial slice over at least ``SMALL_LUNG_SPAN_MM`` of slices."""
    from .geometry import to_lps

    lps = to_lps(lungs)
    arr = sitk.GetArrayViewFromImage(lps)
    sx, sy, sz = lps.GetSpacing()
    areas = (arr > 0).sum(axis=(1, 2)) * sx * sy / 100.0     # cm² per slice
    with_lung = areas[areas > 0]
    span = len(with_lung) * sz
    if span < SMALL_LUNG_SPAN_MM or with_lung.mean() >= SMALL_LUNG_CM2:
        return None
    return (f"the lungs found average {with_lung.mean():.0f} cm² a slice over {span:.0f} mm of slices "
            f"({float(areas.sum() * sz / 10):.0f} mL), far less than a chest's lungs: has a lung, or most of one, been "
            "missed? Check the lung outline (overlay, lung segments) before reading the % and the severity score")


def labels_like_lungs_note(percent_of_lung) -> str | None:
    """A note when lesions cover over 90 % of the lungs (``percent_of_lung``; None: no lungs):
    the labels are more likely a lung mask than lesion labels."""
    if (percent_of_lung or 0) <= 90:
        return None
    return (f"the lesions cover {percent_of_lung:.0f} % of the lungs: are the labels a lung mask "
            "(e.g. <name>_lungs.nii.gz) rather than the lesion labels?")


def figure_notes(stats: dict, lungs: sitk.Image | None = None, ct: sitk.Image | None = None) -> list:
    """What a reader of figures recomputed from corrected labels should be told: lesions
    that look like a lung mask, or that lie partly outside the lung mask (and, with
    ``lungs``, :func:`lung_coverage_note` and :func:`lung_size_note`; with ``ct`` too, the
    orientation check segment makes, :func:`geometry.ap_flip_note`: right / left may be swapped)."""
    from .geometry import ap_flip_note

    inf = (stats.get("lesions") or {}).get("infection") or {}
    notes = [n for n in ((ap_flip_note(ct, lungs) if ct is not None else None, lung_coverage_note(lungs, ct),
                          lung_size_note(lungs)) if lungs is not None else ()) if n]
    lung_like = labels_like_lungs_note(inf.get("percent_of_lung"))
    if lung_like:
        notes.append(lung_like)
    if (inf.get("outside_lung_volume_ml") or 0) > 0.05 * max(inf.get("volume_ml") or 0, 1e-9):
        notes.append(f"{inf['outside_lung_volume_ml']:.1f} of the {inf['volume_ml']:.1f} mL of lesion lie outside "
                     "the lung mask: they count in the volumes, not in the percentages or the severity score")
    return notes


def _pct(part, whole):
    return 100.0 * float(part) / whole if whole else None


def _flatten(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + ".")
        elif isinstance(v, (list, tuple)) and any(isinstance(x, (dict, list, tuple)) for x in v):
            yield from _flatten({str(i): x for i, x in enumerate(v)}, key + ".")   # e.g. the ensemble's members
        elif isinstance(v, (list, tuple)):
            yield key, " ".join(str(x) for x in v)
        else:
            yield key, v


def _clean(o):
    # JSON has no NaN; None says "not available"
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return _clean(float(o))
    return o


def write_stats(stats: dict, json_path, csv_path) -> None:
    """JSON (nested, as returned) and CSV (one ``measure,value`` row per flattened key; floats
    to 7 significant digits, as 3554.242 rather than 3554.2420312500003 — the JSON keeps them whole)."""
    clean = _clean(stats)
    with atomic_path(json_path) as tmp:
        Path(tmp).write_text(json.dumps(clean, indent=2) + "\n")
    with atomic_path(csv_path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["measure", "value"])
            for k, v in _flatten(clean):
                w.writerow([k, "" if v is None else format(v, ".7g") if isinstance(v, float) else v])
