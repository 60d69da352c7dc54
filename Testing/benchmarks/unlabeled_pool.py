"""The COVID-SemiSeg unlabeled pool as the orientation benchmarks read it (ap_orientation.py,
lr_orientation.py): their shared command line and the random slices in the kit's canonical
orientation, mapped back to approximate HU, with the classical lung mask. Not the test split.

Data root: ``--data``, else $SSALESIONSEG_DATA, else ``<repo>/../shared/data``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np


def parse_args(description, argv=None):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", help="data root (holds covid-semiseg/)")
    p.add_argument("--slices", type=int, default=240, help="random unlabeled slices to score (default 240)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def windowed_slices(args):
    """(count, iterator of (record, hu, lung mask, spacing)) for ``args.slices`` random slices."""
    from ssanet.data import NOMINAL_SPACING_MM, load_unlabeled
    from ssanet.lungs import lung_mask_from_window, unclip_soft_tissue
    from ssanet.preprocess import hu_from_window

    root = Path(args.data or os.environ.get("SSALESIONSEG_DATA")
                or Path(__file__).resolve().parents[3] / "shared" / "data")
    recs = load_unlabeled(root)   # coronacases mapped onto the labeled set's window, as training reads them
    pick = np.random.default_rng(args.seed).choice(len(recs), min(args.slices, len(recs)), replace=False)
    sp = (NOMINAL_SPACING_MM, NOMINAL_SPACING_MM)

    def slices():
        for i in pick:
            s = recs[i].load()
            yield recs[i], hu_from_window(unclip_soft_tissue(s.image)), lung_mask_from_window(s.image, sp), sp

    return len(pick), slices()
