"""A synthetic chest CT with known lungs and lesions, for the self-test, tests and pictures."""

import numpy as np
import SimpleITK as sitk

AIR_HU, TISSUE_HU, LUNG_HU, GGO_HU, CONSOLIDATION_HU = -1000, 40, -850, -450, 30


def _ellipse(shape, center, radii):
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def make_phantom(size=(96, 80, 12), spacing=(0.8, 0.8, 2.5), origin=(0.0, 0.0, 0.0), direction=None, seed=0):
    """(ct, labels, lungs) SimpleITK images on one grid.

    size is (i, j, k). Image i runs towards the patient's left (LPS), so the right
    lung is the one at low i. labels: 1 GGO (right lung), 2 consolidation (left
    lung); lungs: 1 right, 2 left.
    """
    nk, nj, ni = size[2], size[1], size[0]
    shape = (nk, nj, ni)
    k0, j0, i0 = nk / 2.0, nj / 2.0, ni / 2.0
    body = _ellipse(shape, (k0, j0, i0), (nk * 10.0, nj * 0.45, ni * 0.47))
    right = _ellipse(shape, (k0, j0, ni * 0.3), (nk * 0.75, nj * 0.32, ni * 0.14))
    left = _ellipse(shape, (k0, j0, ni * 0.7), (nk * 0.75, nj * 0.32, ni * 0.14))
    ggo = _ellipse(shape, (k0, j0 - nj * 0.05, ni * 0.3), (nk * 0.3, nj * 0.12, ni * 0.07)) & right
    consolidation = _ellipse(shape, (k0, j0 + nj * 0.1, ni * 0.7), (nk * 0.25, nj * 0.08, ni * 0.05)) & left

    ct = np.full(shape, AIR_HU, np.float32)
    ct[body] = TISSUE_HU
    ct[right | left] = LUNG_HU
    ct[ggo] = GGO_HU
    ct[consolidation] = CONSOLIDATION_HU
    ct += np.random.default_rng(seed).normal(0.0, 15.0, shape).astype(np.float32)

    labels = np.zeros(shape, np.uint8)
    labels[ggo] = 1
    labels[consolidation] = 2
    lungs = np.zeros(shape, np.uint8)
    lungs[right] = 1
    lungs[left] = 2

    images = []
    for array in (np.round(ct).astype(np.int16), labels, lungs):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing([float(s) for s in spacing])
        image.SetOrigin([float(o) for o in origin])
        if direction is not None:
            image.SetDirection([float(d) for d in np.asarray(direction, float).ravel()])
        images.append(image)
    return tuple(images)
