"""Evaluation: DSC, HD95 (mm), MAE, NSD (3 mm) per class, mean over slices.

Classes reported: ``infection`` (any lesion label) for every model, plus ``ggo`` and
``consolidation`` for multi-class models. A slice where a class is absent from both the
ground truth and the prediction counts as DSC 1 / NSD 1 / HD95 0 (see ssanet.metrics).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import metrics
from .inference import Predictor, predict_slices
from .postprocess import effective_min_lesion_mm2, labels_from_probabilities

MULTICLASS_MAP = {"infection": (1, 2), "ggo": (1,), "consolidation": (2,)}
BINARY_MAP = {"infection": (1,)}


def class_map_for(meta: dict) -> dict:
    return MULTICLASS_MAP if len(meta.get("class_names", [])) > 2 else BINARY_MAP


def gt_for(sample, binary: bool) -> np.ndarray:
    lab = np.asarray(sample.label)
    return (lab > 0).astype(np.uint8) if binary else lab


def evaluate_samples(predictor: Predictor, samples, meta: dict, batch_size: int | None = None,
                     overlay_dir: str | Path | None = None, min_lesion_mm2: float | None = None) -> dict:
    """Per-slice metrics and their means (plus the pooled Dice over all slices).

    ``min_lesion_mm2``: lesion islands below this area are removed before scoring, as the
    pipeline removes them (None: what the checkpoint records, see ssanet.postprocess).
    Returns {"n_slices", "classes": {name: {dsc, hd95_mm, mae, nsd_3mm, dsc_pooled}}, "per_slice",
    "min_lesion_mm2"}.
    """
    min_lesion_mm2 = effective_min_lesion_mm2(meta, min_lesion_mm2)
    cmap = class_map_for(meta)
    binary = cmap is BINARY_MAP
    per_slice = []
    pooled = {name: [0, 0] for name in cmap}   # intersection, |pred| + |gt| over all slices
    bs = batch_size or 8
    for i in range(0, len(samples), bs):
        chunk = samples[i:i + bs]
        # slices of different sizes (the COVID-SemiSeg crops) are predicted one by one
        groups = [chunk] if len({s.image.shape for s in chunk}) == 1 else [[s] for s in chunk]
        for group in groups:
            probs = predict_slices(predictor, np.stack([s.image for s in group]),
                                   np.stack([s.lung for s in group]), meta)
            for s, p in zip(group, probs):
                pred = labels_from_probabilities(p, s.spacing, min_lesion_mm2)
                gt = gt_for(s, binary)
                res = metrics.evaluate_labelmap(pred, gt, cmap, spacing=s.spacing)
                for name, values in cmap.items():
                    pm, gm = np.isin(pred, values), np.isin(gt, values)
                    pooled[name][0] += int((pm & gm).sum())
                    pooled[name][1] += int(pm.sum() + gm.sum())
                res["id"] = s.id
                per_slice.append(res)
                if overlay_dir is not None:
                    save_overlay(s, pred, gt, Path(overlay_dir) / f"{s.id}.png")
    classes = {}
    for name in cmap:
        classes[name] = {k: float(np.nanmean([r[name][k] for r in per_slice]))
                         for k in ("dsc", "hd95_mm", "mae", "nsd_3mm")}
        # Dice of all slices pooled: stable on small sets, where the per-slice mean is
        # dominated by the empty-slice convention (absent in GT and prediction = 1).
        inter, total = pooled[name]
        classes[name]["dsc_pooled"] = 2 * inter / total if total else 1.0
    return {"n_slices": len(per_slice), "classes": classes, "per_slice": per_slice,
            "min_lesion_mm2": min_lesion_mm2}


def format_table(result: dict) -> str:
    lines = [f"{'class':<15}{'DSC':>8}{'HD95 mm':>10}{'MAE':>9}{'NSD@3mm':>9}{'pooled DSC':>12}"
             f"   (means over {result['n_slices']} slices)"]
    for name, m in result["classes"].items():
        lines.append(f"{name:<15}{m['dsc']:>8.3f}{m['hd95_mm']:>10.2f}{m['mae']:>9.4f}{m['nsd_3mm']:>9.3f}"
                     f"{m['dsc_pooled']:>12.3f}")
    return "\n".join(lines)


def save_overlay(sample, pred, gt, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    cm = ListedColormap([(0, 0, 0, 0), (1, 0.2, 0.2, 0.5), (0.2, 0.9, 0.2, 0.5)])
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.2))
    for ax, lab, title in zip(axes, (gt, pred), ("ground truth", "prediction")):
        ax.imshow(sample.image, cmap="gray")
        ax.imshow(lab, cmap=cm, vmin=0, vmax=2, interpolation="nearest")
        ax.set_title(f"{sample.id}: {title}")
        ax.axis("off")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_json(result: dict, path, extra: dict | None = None) -> None:
    out = {"n_slices": result["n_slices"], "classes": result["classes"]}
    out.update(extra or {})
    out["per_slice"] = result["per_slice"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)
