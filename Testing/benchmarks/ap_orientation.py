"""Where the spine lies relative to the lungs, on real slices: the evidence behind
``ssalesionseg.geometry.ap_flip_note``.

Runs ``geometry.spine_score`` ((bone row - lung row) / lung height in the midline band,
> 0 behind the lungs) on the COVID-SemiSeg unlabeled slices (20 patients; the training
pool, not the test split), in the kit's canonical orientation, mapped back to approximate
HU, with the classical lung mask, and on the same slices flipped anterior/posterior. Prints
how many slices could be scored, and the score's range and percentiles for each: a flip
note fires when the median over a CT's slices is below ``geometry.FLIPPED_SCORE``.

    python Testing/benchmarks/ap_orientation.py [--data DIR] [--slices N]

Data root: ``--data``, else $SSALESIONSEG_DATA, else ``<repo>/../shared/data``.
"""
from __future__ import annotations

import numpy as np

from unlabeled_pool import parse_args, windowed_slices


def main(argv=None) -> int:
    a = parse_args(__doc__.splitlines()[0], argv)

    from ssalesionseg.geometry import FLIPPED_SCORE, spine_score

    n, slices = windowed_slices(a)
    scores = {"as stored": [], "flipped": []}
    patients = {}   # volume -> {what: its slices' scores} (the note takes a CT's median)
    for rec, hu, lung, sp in slices:
        for what, (h, m) in (("as stored", (hu, lung)), ("flipped", (hu[::-1], lung[::-1]))):
            v = spine_score(h, m, sp)
            if v is not None:
                scores[what].append(v)
                patients.setdefault(rec.volume, {}).setdefault(what, []).append(v)
    print(f"{n} random unlabeled slices (seed {a.seed}); scored: {len(scores['as stored'])} "
          f"from {len(patients)} patients; per-slice flip threshold {FLIPPED_SCORE}")
    for what, v in scores.items():
        v = np.asarray(v)
        if len(v):
            print(f"{what:>10}: min {v.min():+.3f}  5% {np.percentile(v, 5):+.3f}  median {np.median(v):+.3f}  "
                  f"95% {np.percentile(v, 95):+.3f}  max {v.max():+.3f}  below threshold: {int((v < FLIPPED_SCORE).sum())}")
    for what in scores:
        medians = sorted((float(np.median(v[what])), k) for k, v in patients.items() if what in v)
        if medians:
            print(f"per patient, {what} (median of its scored slices): lowest {medians[0][0]:+.3f} ({medians[0][1]}), "
                  f"highest {medians[-1][0]:+.3f}; called flipped: {sum(m < FLIPPED_SCORE for m, _ in medians)} "
                  f"of {len(medians)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
