"""Rebuild the bundled demo CT from the COVID-SemiSeg unlabeled pool (a one-off, documented).

The sample is 24 axial slices (every 2nd of slices 10-57) of one Radiopaedia case in the
COVID-19-CT-Seg collection, as stored in COVID-SemiSeg's unlabeled pool: 8-bit renderings in
the paper's lung window, mapped back to approximate HU (g / 255 * 1500 - 1250; values
outside [-1250, 250] HU are clipped in the source). Slices are centred on a common canvas
(the source crops differ by a few pixels). Pixel size and slice distance are
nominal (the renderings carry none). Usage: python scripts/make_demo_sample.py DATA_ROOT
"""
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

from ssanet.preprocess import canonical_from_source, hu_from_window

CASE = "Data-1_radiopaedia_org_covid-19-pneumonia-14_85914_0-dcm"
SLICES = range(10, 58, 2)
SPACING = (0.75, 0.75, 7.5)   # x, y, z in mm (nominal)
OUT = Path(__file__).resolve().parents[1] / "SSALesionSeg" / "Resources" / "Sample" / "covid_ct_sample.nii.gz"


def main(root):
    imgs = Path(root) / "covid-semiseg/Dataset/TrainingSet/LungInfection-Train/Pseudo-label/Imgs"
    stack = []
    for k in SLICES:
        g = np.asarray(Image.open(imgs / f"{CASE}_{k}.jpg").convert("L"))
        stack.append(canonical_from_source(g, "radiopaedia"))
    # the source crops differ slightly in size per slice: centre them on a common canvas
    h, w = max(a.shape[0] for a in stack), max(a.shape[1] for a in stack)
    canvas = np.zeros((len(stack), h, w), np.uint8)
    for z, a in enumerate(stack):
        y0, x0 = (h - a.shape[0]) // 2, (w - a.shape[1]) // 2
        canvas[z, y0:y0 + a.shape[0], x0:x0 + a.shape[1]] = a
    hu = np.round(hu_from_window(canvas)).astype(np.int16)   # z: inferior -> superior
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing(SPACING)
    img.SetOrigin((-hu.shape[2] * SPACING[0] / 2, -hu.shape[1] * SPACING[1] / 2, 0.0))
    sitk.WriteImage(img, str(OUT), useCompression=True)
    print(OUT, hu.shape, f"{OUT.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
