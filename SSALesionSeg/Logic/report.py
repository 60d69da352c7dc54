"""The overview picture: a few axial slices with the lung outline and lesion overlays.

Slices are shown in radiological convention (patient right on the image left, anterior
at the top), in a lung window, with physical aspect ratio. The slices chosen are those
with the most lesion, kept apart from each other; without lesions, evenly spaced slices
through the lungs.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .geometry import to_lps
from .io import atomic_path
from .segfile import lesion_segments
from .terminology import color

WINDOW = (-1350.0, 150.0)


def pick_slices(lesion_per_slice: np.ndarray, lung_per_slice: np.ndarray, n: int = 3) -> list:
    lungs = np.flatnonzero(lung_per_slice)
    if lungs.size == 0:
        return [len(lung_per_slice) // 2]
    gap = max(1, int(0.1 * (lungs[-1] - lungs[0] + 1)))
    chosen = []
    for z in np.argsort(lesion_per_slice, kind="stable")[::-1]:
        if lesion_per_slice[z] <= 0 or len(chosen) == n:
            break
        if all(abs(int(z) - c) >= gap for c in chosen):
            chosen.append(int(z))
    if not chosen:
        chosen = [int(lungs[int(round(q * (lungs.size - 1)))]) for q in np.linspace(0.25, 0.75, n)]
    return sorted(set(chosen))


def file_slice(ct: sitk.Image, ct_lps: sitk.Image, z: int) -> tuple[int, int]:
    """(index, count) of axial slice ``z`` of ``ct_lps`` along the CT file's own slice axis
    (the voxel axis closest to head-foot), as a viewer of that file numbers it."""
    axis = int(np.argmax(np.abs(np.asarray(ct.GetDirection(), float).reshape(3, 3)[2])))
    centre = ct_lps.TransformIndexToPhysicalPoint((ct_lps.GetSize()[0] // 2, ct_lps.GetSize()[1] // 2, z))
    return int(ct.TransformPhysicalPointToIndex(centre)[axis]), int(ct.GetSize()[axis])


def write_overlay(path, ct: sitk.Image, labels: sitk.Image, lungs: sitk.Image, class_names,
                  title: str | None = None, n_slices: int = 3) -> list:
    """Write the PNG; returns the LPS slice indices shown."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    ct_l, lab_l, lung_l = (to_lps(x) for x in (ct, labels, lungs))
    hu = sitk.GetArrayViewFromImage(ct_l)
    lab = sitk.GetArrayViewFromImage(lab_l)
    lung = sitk.GetArrayViewFromImage(lung_l)
    zs = pick_slices(np.count_nonzero(lab.reshape(len(lab), -1), axis=1),
                     np.count_nonzero(lung.reshape(len(lung), -1), axis=1), n_slices)
    sx, sy = ct_l.GetSpacing()[:2]
    segs = lesion_segments(class_names)
    cmap = ListedColormap([(0, 0, 0, 0)] + [(*color(name), 0.45) for name, _ in segs])

    fig, axes = plt.subplots(1, len(zs), figsize=(max(4.2 * len(zs), 7.5), 4.8), squeeze=False)
    for ax, z in zip(axes[0], zs):
        ax.imshow(hu[z], cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], aspect=sy / sx, interpolation="bilinear")
        shown = np.zeros(lab[z].shape, np.uint8)
        for k, (_, value) in enumerate(segs, start=1):
            shown[lab[z] == value] = k
        ax.imshow(shown, cmap=cmap, vmin=0, vmax=len(segs), aspect=sy / sx, interpolation="nearest")
        if lung[z].any():
            ax.contour(lung[z] > 0, levels=[0.5], colors=["#4fc3f7"], linewidths=0.8)
        z_mm = float(ct_l.TransformIndexToPhysicalPoint((0, 0, int(z)))[2])
        k, n = file_slice(ct, ct_l, int(z))
        ax.set_title(f"slice {k + 1} of {n}  (z = {z_mm:.1f} mm)", fontsize=9)
        ax.text(0.02, 0.5, "R", transform=ax.transAxes, color="w", fontsize=9, va="center",
                fontweight="bold", bbox=dict(boxstyle="round,pad=0.15", fc="black", ec="none", alpha=0.6))
        ax.text(0.96, 0.5, "L", transform=ax.transAxes, color="w", fontsize=9, va="center",
                fontweight="bold", bbox=dict(boxstyle="round,pad=0.15", fc="black", ec="none", alpha=0.6))
        ax.axis("off")
    handles = [Patch(facecolor=color(name), label=name) for name, _ in segs]
    handles.append(Patch(facecolor="none", edgecolor="#4fc3f7", label="Lung outline"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95 if title else 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return zs
