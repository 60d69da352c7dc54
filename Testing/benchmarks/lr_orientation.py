"""Whether a left/right mirrored CT can be told from axial slices, on real slices: the
evidence for why segment has no ``lr_flip_note`` beside ``geometry.ap_flip_note``.

Two anatomical scores, each on the COVID-SemiSeg unlabeled slices (20 series; the
training pool, not the test split) in the kit's canonical orientation (columns patient
right -> left), mapped back to approximate HU, with the classical lung mask, and on the
same slices mirrored left/right (image and mask), grouped by series as
``ap_orientation.py`` does:

- mediastinum: the centroid column of the gap between the two lungs (row by row, between
  the low-column lung's last pixel and the high-column lung's first) minus the midpoint of
  the lungs' lateral extent, / that extent; > 0 when the heart, aorta and mediastinum lie
  on the patient's left.
- lung area: (low-column lung - high-column lung) / both; > 0 when the right lung is
  the larger.

The decision rule was fixed before the mirrored figures were looked at: a CT is called
mirrored when the median of its slices' score is below ``-MARGIN`` (0.01, about 3 mm of a
30 cm chest). A detector is only worth adding if that calls no series as stored and every
series mirrored. The last line per score is exploratory (chosen after seeing the stored
figures): the median over each series' inferior third of slices (heart level).

    python Testing/benchmarks/lr_orientation.py [--data DIR] [--slices N]

Data root: ``--data``, else $SSALESIONSEG_DATA, else ``<repo>/../shared/data``.
"""
from __future__ import annotations

import numpy as np

from unlabeled_pool import parse_args, windowed_slices

MARGIN = 0.01


def lr_scores(hu, lung, spacing=(1.0, 1.0)) -> dict | None:
    """{"mediastinum", "lung area"} of one canonical slice (see the module docstring);
    None with under 20 cm² of lung, "mediastinum" missing when the lungs never face each
    other across a gap."""
    from ssanet.lungs import split_lungs

    rows, cols = np.nonzero(lung)
    if len(rows) * spacing[0] * spacing[1] < 2000.0:
        return None
    lab = split_lungs(lung)
    a1, a2 = int((lab == 1).sum()), int((lab == 2).sum())
    out = {"lung area": (a1 - a2) / (a1 + a2)}
    mid, width = (cols.min() + cols.max()) / 2.0, cols.max() - cols.min() + 1
    gap = []
    for r in np.unique(rows):
        r1, r2 = np.flatnonzero(lab[r] == 1), np.flatnonzero(lab[r] == 2)
        if len(r1) and len(r2) and r2.min() > r1.max() + 1:
            gap.append(np.arange(r1.max() + 1, r2.min()))
    if gap:
        out["mediastinum"] = float((np.concatenate(gap).mean() - mid) / width)
    return out


def main(argv=None) -> int:
    a = parse_args(__doc__.splitlines()[0], argv)

    n, slices = windowed_slices(a)
    series = {}   # volume -> [(slice index, {what: scores})]
    for rec, hu, lung, sp in slices:
        got = {what: lr_scores(h, m, sp) for what, (h, m) in (("as stored", (hu, lung)),
                                                             ("mirrored", (hu[:, ::-1], lung[:, ::-1])))}
        if got["as stored"] is not None:
            series.setdefault(rec.volume, []).append((rec.index, got))
    print(f"{n} random unlabeled slices (seed {a.seed}) from {len(series)} series; "
          f"a series is called mirrored when its median score < {-MARGIN:+.2f}")
    for score in ("mediastinum", "lung area"):
        print(f"\n{score} score (> 0: patient's left / right as expected), per series: median of its slices "
              f"as stored | mirrored | inferior third as stored (slices)")
        med = {"as stored": [], "mirrored": [], "inferior third": []}
        for vol, items in sorted(series.items()):
            items.sort(key=lambda t: t[0])   # slice index runs inferior -> superior in this pool
            v = {w: [g[w][score] for _, g in items if g[w] and score in g[w]] for w in ("as stored", "mirrored")}
            if not v["as stored"]:
                continue
            low = v["as stored"][:max(1, len(v["as stored"]) // 3)]
            row = (float(np.median(v["as stored"])), float(np.median(v["mirrored"])), float(np.median(low)))
            for w, x in zip(med, row):
                med[w].append(x)
            print(f"  {vol:<58} {row[0]:+.3f} | {row[1]:+.3f} | {row[2]:+.3f} ({len(v['as stored'])})")
        for w, m in med.items():
            m = np.asarray(m)
            print(f"  {w:>14}: lowest {m.min():+.3f}, highest {m.max():+.3f}; called mirrored: "
                  f"{int((m < -MARGIN).sum())} of {len(m)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
