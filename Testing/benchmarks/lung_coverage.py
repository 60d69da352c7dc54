"""How much annotated lesion the classical lung mask keeps, on the COVID-SemiSeg crops.

Runs ``ssanet.lungs.lung_mask_from_window`` on the COVID-SemiSeg multi-class images (the
whole-thorax crops, in the kit's canonical orientation) and prints, pooled over all
pixels of the split:

* the % of annotated GGO, consolidation and all lesion pixels inside the lung mask;
* the % of lung-mask pixels outside the thorax, the thorax being the convex envelope of
  the patient's soft tissue (HU > -500), computed here independently of the lung code;
* when MedSeg-100 sits beside it (``split.csv`` locates every crop in its full slice), the
  % of mask pixels inside MedSeg's approximate lung mask and the % of that lung mask
  covered: the first figure shows what the lesion coverage costs in mediastinum and
  chest wall.

Data root: ``--data``, else the SSALESIONSEG_DATA environment variable, else
``<repo>/../shared/data``. The test split is the default because that is the reported
figure; develop on ``--split train``, never on test.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np

SEMISEG = Path("covid-semiseg") / "Dataset"
SPLIT_DIRS = {
    "train": SEMISEG / "TrainingSet" / "MultiClassInfection-Train",
    "test": SEMISEG / "TestingSet" / "MultiClassInfection-Test",
}


def data_root(arg: str | None) -> Path:
    if arg:
        return Path(arg).expanduser()
    if os.environ.get("SSALESIONSEG_DATA"):
        return Path(os.environ["SSALESIONSEG_DATA"]).expanduser()
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def thorax_envelope(hu: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi
    from skimage.morphology import convex_hull_image

    tissue = hu > -500
    lab, n = ndi.label(tissue)
    if n == 0:
        return np.zeros(hu.shape, bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    big = np.isin(lab, np.flatnonzero(sizes >= 0.005 * hu.size))
    return convex_hull_image(big)


def reference_lungs(root: Path, split: str) -> dict:
    """file name -> (MedSeg slice PNG path, row offset, column offset) in raw orientation."""
    p = root / "medseg100" / "split.csv"
    if not p.is_file():
        return {}
    with open(p, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["infnet_set"] == split]
    return {r["infnet_file"]: (root / "medseg100" / "images" / f"i{int(r['medseg_slice']):03d}.png",
                               int(r["offset_y"]), int(r["offset_x"])) for r in rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="folder holding covid-semiseg/ (and medseg100/)")
    ap.add_argument("--split", default="test", choices=sorted(SPLIT_DIRS))
    ap.add_argument("--per-image", action="store_true", help="also print one line per image")
    args = ap.parse_args(argv)

    from PIL import Image

    from ssanet.lungs import lung_mask_from_window
    from ssanet.preprocess import canonical_from_source, hu_from_window

    root = data_root(args.data)
    folder = root / SPLIT_DIRS[args.split]
    images = sorted((folder / "Imgs").glob("*.jpg"), key=lambda p: int(p.stem) if p.stem.isdigit() else p.stem)
    if not images:
        print(f"no images in {folder / 'Imgs'}; pass --data or set SSALESIONSEG_DATA", file=sys.stderr)
        return 2
    refs = reference_lungs(root, args.split)

    lesion_total = np.zeros(3)
    lesion_in = np.zeros(3)
    mask_px = outside_px = 0
    ref_px = ref_hit = mask_in_ref = mask_with_ref = 0
    t0 = time.perf_counter()
    for ip in images:
        with Image.open(ip) as im:
            raw = np.array(im.convert("L"))
        with Image.open(folder / "GT" / f"{ip.stem}.png") as im:
            gt_raw = np.array(im)  # palette indices: 0 bg, 1 GGO, 2 consolidation
        img = canonical_from_source(raw, "covid-semiseg")
        gt = canonical_from_source(gt_raw, "covid-semiseg")
        mask = lung_mask_from_window(img)
        thorax = thorax_envelope(hu_from_window(img))

        sel = (gt == 1, gt == 2, (gt == 1) | (gt == 2))
        for k, s in enumerate(sel):
            lesion_total[k] += s.sum()
            lesion_in[k] += (s & mask).sum()
        mask_px += mask.sum()
        outside_px += (mask & ~thorax).sum()
        line = f"{ip.name:>8}  lesion {100 * (sel[2] & mask).sum() / max(sel[2].sum(), 1):6.1f} %"
        if ip.name in refs:
            png, oy, ox = refs[ip.name]
            with Image.open(png) as im:
                full = np.array(im)
            ref = canonical_from_source(full[oy:oy + raw.shape[0], ox:ox + raw.shape[1]] > 0, "covid-semiseg")
            ref_px += ref.sum()
            ref_hit += (ref & mask).sum()
            mask_in_ref += (mask & ref).sum()
            mask_with_ref += mask.sum()
            line += f"  mask in ref lung {100 * (mask & ref).sum() / max(mask.sum(), 1):6.1f} %"
        if args.per_image:
            print(line)

    pct = 100 * lesion_in / np.maximum(lesion_total, 1)
    print(f"COVID-SemiSeg {args.split}: {len(images)} images, classical lung mask "
          f"(ssanet.lungs.lung_mask_from_window), {time.perf_counter() - t0:.1f} s")
    print(f"  lesion pixels inside the lung mask: GGO {pct[0]:.2f} %  consolidation {pct[1]:.2f} %  "
          f"all lesions {pct[2]:.2f} %  ({int(lesion_total[2])} annotated pixels)")
    print(f"  lung-mask pixels outside the thorax: {100 * outside_px / max(mask_px, 1):.3f} %")
    if mask_with_ref:
        print(f"  vs MedSeg approximate lung mask: {100 * mask_in_ref / mask_with_ref:.2f} % of mask pixels "
              f"inside it (precision), {100 * ref_hit / max(ref_px, 1):.2f} % of it covered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
