"""How much a model depends on the rendering and on the lung mask.

The MedSeg-100 PNGs and the COVID-SemiSeg crops show the same slices with the same labels
in two renderings. For a checkpoint and split this prints the mean DSC over slices of:

1. the MedSeg renderings with MedSeg's lung masks (what ``ssalesionseg evaluate`` reports);
2. the COVID-SemiSeg crops with MedSeg's lung masks cut to the crop (rendering changed);
3. the crops with the project's classical lung masks (rendering and lung mask changed:
   ``ssalesionseg evaluate --dataset covid-semiseg``, the situation of a real CT
   without lungmask weights).

Crops are placed on the model's grid as the pipeline places a CT (``ssanet.data.
on_model_grid``). Usage: ``python Testing/benchmarks/renderings.py [--checkpoint P]
[--split test|train]``; data root from ``--data`` or ``SSALESIONSEG_DATA``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="model file (default: the bundled default model)")
    ap.add_argument("--split", default="test", choices=["train", "test"])
    ap.add_argument("--data")
    args = ap.parse_args(argv)

    from ssanet import checkpoint, data
    from ssanet.evaluate import evaluate_samples
    from ssanet.inference import Predictor

    root = data.data_root(args.data)
    medseg = {s.meta["slice"]: s for s in data.load_medseg100(root, args.split)}
    crops = data.load_covid_semiseg(root, args.split)
    with_ref = []
    for c in crops:
        full = medseg[c.meta["medseg_slice"]]
        r0, c0 = c.meta["canonical_offset"]
        h, w = c.image.shape
        with_ref.append(dataclasses.replace(c, lung=np.asarray(full.lung, bool)[r0:r0 + h, c0:c0 + w]))
    model, meta = checkpoint.load_checkpoint(args.checkpoint)
    predictor = Predictor.for_checkpoint(model, meta, "cpu")
    print(f"{meta['name']} on the {args.split} split ({len(crops)} slices), mean DSC over slices")
    print(f"{'rendering':<22}{'lung mask':<18}{'infection':>10}{'GGO':>8}{'cons.':>8}")
    for rendering, lung, samples in (("MedSeg-100", "MedSeg", list(medseg.values())),
                                     ("COVID-SemiSeg crops", "MedSeg", data.on_model_grid(with_ref)),
                                     ("COVID-SemiSeg crops", "classical", data.on_model_grid(crops))):
        res = evaluate_samples(predictor, samples, meta)["classes"]
        print(f"{rendering:<22}{lung:<18}{res['infection']['dsc']:>10.3f}{res['ggo']['dsc']:>8.3f}"
              f"{res['consolidation']['dsc']:>8.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
