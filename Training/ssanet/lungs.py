"""Classical lung segmentation from Hounsfield units (and from 8-bit lung-window renderings).

This is the fallback of the CT pipeline when no lungmask weights are available, and the
lung-mask source of the training loaders for data that ships without lung masks. It is
deliberately model-free, so it runs anywhere, offline.

Outline (per axial slice unless stated):

1. Body: the largest soft-tissue component with its holes filled. When it touches the
   image border (a crop through the thorax, as in COVID-SemiSeg) the ring around the
   lungs is open, so the convex hull of the large tissue components stands in for it.
   The edge of the scanned field counts as the image border: a frame of constant padding
   that the body runs into is cropped off first (:func:`scanned_box`), and values far
   below air outside a reconstruction circle are not scanned (:func:`unscanned_mask`).
2. Aerated lung: air (< ``AIR_HU``) inside the body. In 3D the trachea and main bronchi
   are traced from the end slices while they stay small and central, and removed; then
   3D components are kept if they are one of the two lungs or a lung fragment cut off by
   dense lesions (bowel gas below the lungs, airways and esophageal air are dropped).
3. Right / left: two large components are assigned by their column (arrays are LPS:
   the column index grows towards the patient's left); one component holding both lungs
   is cut at the valley of its column profile near the midline.
4. Dense-lesion recovery. Thresholding loses consolidation, which has soft-tissue
   density, but chest wall, mediastinum and diaphragm have that density too; the SSA-Net
   pipeline blanks the CT outside the mask and reads soft tissue inside it as
   consolidation, so the mask must hug the pleura rather than reach for every lesion
   pixel. Per slice and lung, a pleural line is set along rays from the body centre: the
   aerated lung's outer border where it reaches the wall; across a dent in that border
   (a lesion against the wall), the border's radius interpolated between the flanks
   either side; where the lung falls well short of the ribs, the ribs' inner edge less
   the pleural gap; never past a rib or near the skin. The lung then takes (a) its
   convex hull where it lies beyond the aerated lung along those rays (so the
   mediastinal concavity stays out) and inside the pleural line, and (b) lesion-density
   tissue connected to it up to the pleural line; tongues of that growth narrower than
   ``2 * OPEN_MM`` (chest wall between ribs) are dropped, and a ``CLOSE_MM`` closing
   smooths the border.
5. A field of view that cuts the thorax. The COVID-SemiSeg crops are cut at the lungs'
   bounding box (MedSeg's lung mask touches all four sides of every training crop), so
   behind a dependent consolidation there is often no chest wall or rib in view, only the
   image edge. Along rays from each lung's centroid, posterior and at most 30 degrees
   medial, that leave the image through the body at a side the lung does not already
   reach (within ``CUT_REACH_MM``; where it does, that side is where it ends and the
   corner beside its round end is chest wall), lesion-density tissue connected to the
   lung is kept up to the edge, or up to a rib's inner edge when one is in view first.
   A full field of view has no such rays and is unaffected.

8-bit renderings (:func:`lung_mask_from_window`) are first checked for a window that
ends below soft tissue (:func:`unclip_soft_tissue`): there consolidation is as white as
bone and would be cut out with it.

Last, each lung grows by ``PLEURA_RIM_MM`` (1 mm) into the body: the threshold edge lies
about a pixel inside the pleural surface, where lesion annotations (and MedSeg's lung
masks) end.

Limits: consolidation filling the end of a lung where neither aerated flanks nor ribs
bound it (a wide posterior consolidation next to the spine) is only partly recovered in a
full field of view, and the hull can still bridge a narrow strip of mediastinum where
the lung wraps around it; in a cut field of view, a crop corner beyond a lung's round end
can come with a lesion. On the COVID-SemiSeg crops (``Testing/benchmarks/lung_coverage.py``)
the mask keeps 96.2 % of the annotated lesion pixels on the training split (GGO 98.8 %,
consolidation 91.9 %) with 95.7 % of its pixels inside MedSeg's approximate lung masks
(the rest: crop corners, mediastinum, chest wall at the lung borders) and 96.1 % of
those masks covered; on the test split 95.7 % kept (GGO 99.3 %, consolidation 87.0 %),
93.8 % inside. lungmask's R231 network
is the better choice whenever its weights are available.

All arrays are (Z, Y, X) or (Y, X); ``spacing`` is one value per array axis, in array-axis
order (mm), like ``image.GetSpacing()[::-1]`` for a SimpleITK image.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage as ndi

from .preprocess import LUNG_WINDOW_HU, hu_from_window

AIR_HU = -320.0
# Below any tissue or air a scanner measures: what some write outside the reconstruction circle.
UNSCANNED_HU = -1100.0
# Share of a padding frame's inner edge that the body must run along for the frame to cut it.
CUT_CONTACT = 0.05
# A body runs along the unscanned field (or a frame) where it is cut: parts thinner than twice
# CUT_OPEN_MM (a CT table, skin at a tangent) do not count, and the cut is CUT_MIN_MM long at least.
CUT_OPEN_MM = 5.0
CUT_MIN_MM = 20.0
# Air the hull encloses beyond the filled tissue ring when the field of view cuts the ring
# open (a lung's cross-section, mm²); a field edge grazing the chest wall encloses less.
RING_OPEN_MM2 = 1000.0
BODY_HU = -500.0
BONE_HU = 200.0
# Fraction of white (250-255) non-lung pixels above which an 8-bit rendering's window is
# taken to end below soft tissue (unclip_soft_tissue): 0.38-0.58 on the three such
# COVID-SemiSeg training crops, at most 0.12 on the other 47; the cut lies in the gap.
CLIPPED_SOFT_TISSUE = 0.25
# Used when no spacing is given: a typical chest CT reconstruction.
DEFAULT_SPACING_3D = (2.5, 0.7, 0.7)

_RIGHT, _LEFT = 1, 2


# --------------------------------------------------------------------------- public

def lung_mask_from_hu(hu, spacing=None, *, air_threshold: float = AIR_HU) -> np.ndarray:
    """Lung labels (uint8: 0 background, 1 right lung, 2 left lung) of a HU volume or slice.

    ``hu``: (Z, Y, X) or (Y, X), LPS-oriented (columns run patient right -> left, so the
    right lung is on the low-column side). ``spacing``: mm per array axis; None assumes a
    typical chest CT. A volume without lungs gives an all-zero result.
    """
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim == 2:
        sp = None if spacing is None else (1.0,) + tuple(_check_spacing(spacing, 2))
        return lung_mask_from_hu(hu[None], sp, air_threshold=air_threshold)[0]
    if hu.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) volume or a (Y, X) slice, got shape {hu.shape}")
    sz, sy, sx = DEFAULT_SPACING_3D if spacing is None else _check_spacing(spacing, 3)
    if not np.all(np.isfinite(hu)):
        raise ValueError("HU array contains NaN or infinite values")
    out = np.zeros(hu.shape, np.uint8)
    if hu.size == 0:
        return out
    px = float(np.sqrt(sy * sx))
    rows, cols = scanned_box(hu, px)
    if (rows, cols) != (slice(0, hu.shape[1]), slice(0, hu.shape[2])):
        # a frame of padding around the scanned field: the field's edge is the image's
        out[:, rows, cols] = lung_mask_from_hu(np.ascontiguousarray(hu[:, rows, cols]), (sz, sy, sx),
                                               air_threshold=air_threshold)
        return out
    unscanned = unscanned_mask(hu)

    body = np.zeros(hu.shape, bool)
    cuts = np.zeros(hu.shape, bool)   # where the field of view cuts the body open, per slice
    for z in range(hu.shape[0]):
        body[z], cuts[z] = _body_and_cut(hu[z] > BODY_HU, None if unscanned is None else unscanned[z], px)
    air = (hu < air_threshold) & body
    if not air.any():
        return out
    if hu.shape[0] > 1:
        air &= ~_trace_airways(air, body, px)
        if not air.any():
            return out

    aerated, one_side = _select_lungs(air, hu, body, (sz, sy, sx))
    if not aerated.any():
        return out
    # a field of view of one side of the chest: its medial border cuts the mediastinum, not a lung
    medial = None if one_side is None else hu.shape[2] - 1 if one_side == _RIGHT else 0
    for z in np.flatnonzero(aerated.reshape(len(aerated), -1).any(axis=1)):
        out[z] = _recover_slice(aerated[z], hu[z], body[z], px, cuts[z], medial)
    return out


def scanned_box(hu, px: float = 1.0) -> tuple[slice, slice]:
    """Rows and columns of a (Z, Y, X) volume inside a frame of padding that cuts the body:
    whole rows / columns at the image border holding one value at or below air (-1000 HU) on
    every slice — a field of view exported inside a larger rectangle (a zero-filled square,
    the bundled sample's -1250 HU border) — on a side where the body then runs along the
    frame (at least ``CUT_CONTACT`` of it, on some slice; tissue thinner than twice
    ``CUT_OPEN_MM``, such as a CT table, does not count). Real room air is noisy, so it never
    makes such a frame; air clipped to one value may, but touches a body only at a tangent,
    and such a side is left alone. ``px``: pixel size in mm."""
    ny, nx = hu.shape[1:]

    def frame(axes, n):   # an axis of nothing but padding lines has no field to find
        lead, trail = _padding_runs(hu, axes)
        return (lead, trail) if lead < n else (0, 0)
    top, bottom = frame((0, 2), ny)
    left, right = frame((0, 1), nx)
    if not (top or bottom or left or right):
        return slice(0, ny), slice(0, nx)
    tissue = np.stack([_open(z > BODY_HU, CUT_OPEN_MM / px) for z in hu])

    def cuts(line):   # soft tissue along that line of the scanned field, on its fullest slice
        return line.mean(axis=1).max() >= CUT_CONTACT if line.size else False
    top = top if top and cuts(tissue[:, top, left:nx - right]) else 0
    bottom = bottom if bottom and cuts(tissue[:, ny - bottom - 1, left:nx - right]) else 0
    left = left if left and cuts(tissue[:, top:ny - bottom, left]) else 0
    right = right if right and cuts(tissue[:, top:ny - bottom, nx - right - 1]) else 0
    return slice(top, ny - bottom), slice(left, nx - right)


def _padding_runs(hu, axes) -> tuple[int, int]:
    """(leading, trailing): how many lines at each end of the array axis that ``axes`` leave
    (the axes reduced over) hold one value at or below air (-1000 HU) throughout: a padding
    frame. All lines such: (all, 0)."""
    lo, hi = hu.min(axis=axes), hu.max(axis=axes)
    flags = (lo == hi) & (hi <= -1000)
    if flags.all():
        return len(flags), 0
    return int(np.argmin(flags)), int(np.argmin(flags[::-1]))


def outside_field(hu) -> np.ndarray:
    """(Z, Y, X) pixels outside the scanned field, slice by slice: whole border rows / columns
    of one value at or below air (a padding frame, which may change width from slice to
    slice) and :func:`unscanned_mask`'s. For saying where lungs are cut, not for the mask."""
    hu = np.asarray(hu)
    out = np.zeros(hu.shape, bool)
    for z, sl in enumerate(hu):
        top, bottom = _padding_runs(sl, 1)
        left, right = _padding_runs(sl, 0)
        out[z, :top] = out[z, sl.shape[0] - bottom:] = True
        out[z, :, :left] = out[z, :, sl.shape[1] - right:] = True
    unscanned = unscanned_mask(hu)
    return out | unscanned if unscanned is not None else out


def unscanned_mask(hu) -> np.ndarray | None:
    """(Z, Y, X) pixels outside the reconstructed field of view, or None: the volume's
    minimum where it lies well below air (<= ``UNSCANNED_HU``: the -2048 / -3024 HU scanners
    write outside the reconstruction circle), connected to the image border in each slice.
    A body cut by that field has its edge there as at the image border."""
    lo = float(hu.min())
    if lo > UNSCANNED_HU:
        return None
    out = np.zeros(hu.shape, bool)
    for z in range(hu.shape[0]):
        lab, n = ndi.label(hu[z] == lo)
        if n:
            border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
            out[z] = np.isin(lab, border[border > 0])
    return out if out.any() else None


def lung_mask_from_window(img_u8, spacing=(0.7, 0.7), window=LUNG_WINDOW_HU) -> np.ndarray:
    """Bool lung mask (both lungs) of an 8-bit lung-window rendering (or a stack of them).

    The rendering is mapped back to approximate HU (``window`` is what made it; values
    clipped by the window come back as its limits, which is harmless for thresholds well
    inside it) and goes through :func:`lung_mask_from_hu`. Give slices in the canonical
    orientation (``ssanet.preprocess.canonical_from_source``): lungs that touch are
    split, and airways told apart, along the columns.
    """
    img = np.asarray(img_u8)
    if img.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) rendering or an (N, H, W) stack, got {img.shape}")
    if img.ndim == 3:
        img = np.stack([unclip_soft_tissue(s) for s in img])
    else:
        img = unclip_soft_tissue(img)
    hu = hu_from_window(img, window)
    sp = tuple(_check_spacing(spacing, 2))
    if img.ndim == 3:
        # A stack of unrelated renderings: no 3D connectivity between them.
        return np.stack([lung_mask_from_hu(s, sp) > 0 for s in hu])
    return lung_mask_from_hu(hu, sp) > 0


def unclip_soft_tissue(img_u8, min_fraction: float = CLIPPED_SOFT_TISSUE) -> np.ndarray:
    """Undo a display window that ends below soft-tissue density (8-bit renderings).

    Some renderings (3 of the 50 COVID-SemiSeg training crops) were made with a window
    whose upper limit lies below soft tissue: muscle, vessels, consolidation and bone all
    read as white (250-255), so "bone" at the lung window's top would swallow the
    dense lesions. When at least ``min_fraction`` of the non-lung pixels are white, the
    grey levels are mapped linearly (``ssanet.data.match_intensity``) so the lung peak and
    white land on the usual lung and soft-tissue levels: white then reads as soft tissue,
    and no bone is seen (it cannot be told apart in such a rendering). Other renderings
    are returned unchanged.
    """
    img = np.asarray(img_u8)
    if img.dtype != np.uint8:
        return img
    from .data import LABELED_ANCHORS, histogram_anchors, match_intensity
    h = np.bincount(img.ravel(), minlength=256).astype(float)
    lung_peak = histogram_anchors(h)[0]
    white = h[250:].sum() / max(h[int(lung_peak) + 40:].sum(), 1.0)
    if white < min_fraction:
        return img
    return match_intensity(img, (lung_peak, 255.0), LABELED_ANCHORS)


def split_lungs(mask) -> np.ndarray:
    """Right (1) / left (2) labels of a binary lung mask, (Z, Y, X) or (Y, X), LPS columns.

    Two large components are told apart by column; one component holding both lungs is
    cut at the valley of its column profile near the middle, slice by slice.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim == 2:
        return split_lungs(m[None])[0]
    out = np.zeros(m.shape, np.uint8)
    if not m.any():
        return out
    lab, n = ndi.label(m)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    order = np.argsort(sizes)[::-1]
    if n >= 2 and sizes[order[1]] >= 0.1 * sizes[order[0]]:
        coms = ndi.center_of_mass(m, lab, range(1, n + 1))
        mid = (coms[order[0] - 1][2] + coms[order[1] - 1][2]) / 2.0
        side = np.array([0] + [_RIGHT if c[2] < mid else _LEFT for c in coms], np.uint8)
        return side[lab]
    _split_single(m, out, m)
    return out


def _body_and_cut(tissue, unscanned, px):
    """(body, cut): the body of one slice from its soft-tissue mask (see the module outline,
    step 1), and its pixels where the unscanned field (:func:`unscanned_mask`) cuts the tissue
    ring open as the image border does (none when it does not); ``px``: pixel size in mm."""
    none = np.zeros(tissue.shape, bool)
    lab, n = ndi.label(tissue)
    if n == 0:
        return none, none
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    largest = lab == int(np.argmax(sizes))
    border = _touches_border(largest)
    cut = none if border else _field_cut(largest, unscanned, px)
    filled = ndi.binary_fill_holes(largest)
    if not border and not cut.any():
        return filled, none
    # The tissue ring is cut by the image border or the field of view: the hull of the big
    # tissue pieces spans the thorax, while the corners of outside air stay outside it.
    big = np.isin(lab, np.flatnonzero(sizes >= max(0.005 * tissue.size, 1)))
    body = _convex_hull(big) | filled
    if border:
        return body, none
    body &= ~unscanned
    # a field edge that grazes the chest wall leaves the ring closed: no lung-sized air is
    # enclosed by the hull alone, and the body stays the filled ring
    if (body & ~filled & ~tissue).sum() * px * px < RING_OPEN_MM2:
        return filled, none
    return body, cut


# ------------------------------------------------------------------------- helpers

def _check_spacing(spacing, n):
    sp = tuple(float(s) for s in np.ravel(spacing))
    if len(sp) != n or not all(np.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be {n} positive numbers (mm per array axis), got {spacing!r}")
    return sp


def _touches_border(m):
    return bool(m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())


def _field_cut(m, unscanned, px):
    """Pixels of ``m`` where the unscanned field cuts it: ``m`` without its parts thinner than
    ``2 * CUT_OPEN_MM`` (a CT table, skin touching at a tangent) beside that field, when they
    run along it for ``CUT_MIN_MM`` or more; else none."""
    none = np.zeros(m.shape, bool)
    if unscanned is None or not unscanned.any():
        return none
    near = ndi.binary_dilation(unscanned)
    if not (m & near).any():
        return none
    cut = _open(m, CUT_OPEN_MM / px) & near
    return cut if cut.sum() * px >= CUT_MIN_MM else none


def _convex_hull(m):
    from skimage.morphology import convex_hull_image
    if m.sum() < 3:
        return m.copy()
    sl = ndi.find_objects(m.astype(np.uint8))[0]
    out = np.zeros(m.shape, bool)
    with warnings.catch_warnings():
        # collinear points (a one-pixel-wide piece) make qhull warn; the hull is then the piece
        warnings.simplefilter("ignore")
        try:
            out[sl] = convex_hull_image(m[sl])
        except Exception:
            out[sl] = m[sl]
    return out


def _bbox(m, pad=0):
    ys, xs = np.nonzero(m)
    return (slice(max(ys.min() - pad, 0), ys.max() + pad + 1),
            slice(max(xs.min() - pad, 0), xs.max() + pad + 1))


# ------------------------------------------------------------------------- airways

def _trace_airways(air, body, px):
    """Trachea / main bronchi (and esophageal air) followed inwards from both end slices.

    A seed is a small air component near the body's midline column in one of the first
    slices from either end; it is followed slice by slice while the overlapping air stays
    small. Where an airway joins the lung in a slice the component becomes large and the
    trace stops, so the lungs themselves are never removed.
    """
    nz = air.shape[0]
    out = np.zeros(air.shape, bool)
    seed_max = 700.0 / px ** 2        # mm^2 -> px: the widest tracheas
    seed_min = 15.0 / px ** 2
    grow_max = 900.0 / px ** 2
    n_seed = max(1, int(round(0.15 * nz)))
    for order in (range(nz - 1, -1, -1), range(nz)):
        order = list(order)
        current = None
        for step, z in enumerate(order):
            lab, n = ndi.label(air[z])
            if n == 0:
                if current is not None:
                    break
                continue
            sizes = np.bincount(lab.ravel())
            if current is None:
                if step >= n_seed:
                    break
                if not body[z].any():
                    continue
                xs = np.nonzero(body[z])[1]
                mid, half = (xs.min() + xs.max()) / 2.0, (xs.max() - xs.min()) / 2.0
                coms = ndi.center_of_mass(air[z], lab, range(1, n + 1))
                seeds = [i for i, c in enumerate(coms, 1)
                         if seed_min <= sizes[i] <= seed_max and abs(c[1] - mid) <= 0.2 * half]
                big = [i for i in range(1, n + 1) if sizes[i] > seed_max]
                if not seeds or big and not _is_separate(lab, seeds, big):
                    continue
                current = np.isin(lab, seeds)
                out[z] |= current
                continue
            touched = np.unique(lab[ndi.binary_dilation(current, iterations=2) & (lab > 0)])
            keep = [i for i in touched if sizes[i] <= grow_max]
            if not keep:
                break
            current = np.isin(lab, keep)
            out[z] |= current
    return out


def _is_separate(lab, seeds, big):
    # A seed touching a lung-sized component in the same slice is lung, not airway.
    s = ndi.binary_dilation(np.isin(lab, seeds), iterations=2)
    return not np.isin(lab[s], big).any()


# --------------------------------------------------------------- component selection

def _select_lungs(air, hu, body, spacing):
    """(aerated lung labels (1 right, 2 left) from the air-in-body mask, the side when they
    are one lung in a view of that side of the chest (:func:`_split_single`) else None)."""
    sz, sy, sx = spacing
    vox_ml = sz * sy * sx / 1000.0
    nz = air.shape[0]
    zs, ys, xs = np.nonzero(air)
    crop = (slice(zs.min(), zs.max() + 1), slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    a = air[crop]
    structure = ndi.generate_binary_structure(3, 1)
    lab, n = ndi.label(a, structure=structure)
    if n == 0:
        return np.zeros(air.shape, np.uint8), None
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    order = [int(i) for i in np.argsort(sizes)[::-1] if sizes[i] > 0]
    largest = sizes[order[0]]
    # A lung slice is at least a few cm^2; anything smaller overall is noise or gas.
    min_lung = 3.0 / vox_ml if nz > 1 else 150.0 / (sy * sx)
    if largest < min_lung:
        return np.zeros(air.shape, np.uint8), None
    objs = ndi.find_objects(lab)
    coms = ndi.center_of_mass(a, lab, order)
    com = dict(zip(order, coms))
    means = dict(zip(order, ndi.mean(hu[crop], lab, order)))

    mains = [order[0]]
    if len(order) > 1 and sizes[order[1]] >= 0.1 * largest and _overlaps_z(objs, order[0], order[1]):
        mains.append(order[1])
    main_hu = float(np.mean([means[i] for i in mains]))
    main_z = (min(objs[i - 1][0].start for i in mains), max(objs[i - 1][0].stop for i in mains))

    frags = []
    for i in order[len(mains):]:
        if sizes[i] < 0.01 * largest:
            break
        zc = com[i][0]
        if nz > 1 and not (main_z[0] <= zc < main_z[1]):
            continue  # gas below (or above) the lungs
        if means[i] < main_hu - 80 and (_is_central(a, lab, i, mains, com)
                                        or _touches_side(objs[i - 1], a.shape, air.shape, crop)):
            continue  # pure air between the lungs (airway, esophagus) or outside the body
        if nz > 1 and not _lung_at(lab, i, mains, zc, objs):
            continue  # bowel gas under the diaphragm dome, where the lungs are thin
        frags.append(i)

    sides = np.zeros(a.shape, np.uint8)
    one_side = None
    if len(mains) == 2:
        r, l = sorted(mains, key=lambda i: com[i][2])
        sides[lab == r] = _RIGHT
        sides[lab == l] = _LEFT
        mid = (com[r][2] + com[l][2]) / 2.0
        for f in frags:
            sides[lab == f] = _RIGHT if com[f][2] < mid else _LEFT
    else:
        whole = lab == mains[0]
        for f in frags:
            whole |= lab == f
        lung_z = crop[0].start + np.flatnonzero(whole.any(axis=(1, 2)))
        one_side = _split_single(whole, sides, body[crop], _side_in_view(body[lung_z]))
    out = np.zeros(air.shape, np.uint8)
    out[crop] = sides
    return out, one_side


def _overlaps_z(objs, i, j):
    zi, zj = objs[i - 1][0], objs[j - 1][0]
    inter = min(zi.stop, zj.stop) - max(zi.start, zj.start)
    return inter > 0.3 * min(zi.stop - zi.start, zj.stop - zj.start)


def _touches_side(obj, shape, full_shape, crop):
    # in-plane image border of the full array (crop offsets added back)
    for ax in (1, 2):
        lo = obj[ax].start + crop[ax].start
        hi = obj[ax].stop + crop[ax].start
        if lo == 0 or hi == full_shape[ax]:
            return True
    return False


def _is_central(a, lab, i, mains, com):
    xs = [com[m][2] for m in mains]
    x = com[i][2]
    if len(xs) == 2:
        lo, hi = sorted(xs)
        return lo < x < hi and abs(x - (lo + hi) / 2) < 0.3 * (hi - lo)
    m = lab == mains[0]
    cols = np.nonzero(m.any(axis=(0, 1)))[0]
    mid, half = (cols.min() + cols.max()) / 2.0, (cols.max() - cols.min()) / 2.0
    return abs(x - mid) < 0.2 * half


def _lung_at(lab, i, mains, zc, objs):
    # A lung fragment sits at a level where the lungs are substantial.
    z = int(round(zc))
    areas = [(lab[z] == m).sum() for m in mains]
    peak = max(np.max((lab[objs[m - 1][0]] == m).sum(axis=(1, 2))) for m in mains)
    return sum(areas) >= 0.1 * peak


def _side_in_view(body):
    """The side (``_RIGHT`` / ``_LEFT``) of a field of view that shows one side of the chest,
    from the body on the slices with lung: it runs into the image's medial border on one side
    only, on most of them (LPS columns: a body cut at the high columns is the patient's right
    side), else None."""
    low, high = (float(body[:, :, c].any(axis=1).mean()) > 0.5 for c in (0, -1))
    return _RIGHT if high and not low else _LEFT if low and not high else None


# a lung component's column profile dips below this share of its peaks either side where
# two lungs meet (the anterior junction line); one lung has no such valley
VALLEY_DEPTH = 0.5


def _split_single(whole, sides, body, side_in_view=None):
    """Right/left of one component holding both lungs (or one lung only). ``side_in_view``
    (:func:`_side_in_view`): when the field of view shows one side of the chest and no slice
    of the component has the valley of two lungs meeting, it is that side's lung, whole.
    Returns that side when so, else None."""
    cuts = {}
    valley = False
    for z in range(whole.shape[0]):
        m = whole[z]
        if not m.any():
            continue
        bx = np.nonzero(body[z].any(axis=0))[0]
        if bx.size == 0:
            bx = np.nonzero(m.any(axis=0))[0]
        mid, half = (bx.min() + bx.max()) / 2.0, (bx.max() - bx.min()) / 2.0
        prof = m.sum(axis=0).astype(float)
        lo, hi = int(max(mid - 0.3 * half, 0)), int(min(mid + 0.3 * half, m.shape[1] - 1))
        cols = np.nonzero(m.any(axis=0))[0]
        if cols.min() < lo and cols.max() > hi:
            cut = lo + int(np.argmin(prof[lo:hi + 1]))
            valley |= bool(prof[cut] <= VALLEY_DEPTH * min(prof[:cut + 1].max(), prof[cut:].max()))
        else:
            cut = int(round(mid))  # one lung only: the body's midline decides the side
        cuts[z] = cut
    if side_in_view is not None and not valley:
        sides[whole] = side_in_view
        return side_in_view
    for z, cut in cuts.items():
        m = whole[z]
        row = np.zeros(m.shape, np.uint8)
        row[:, :cut] = _RIGHT
        row[:, cut:] = _LEFT
        sides[z][m] = row[m]
    return None


# ------------------------------------------------------------------- dense recovery

# mm, tuned on the COVID-SemiSeg training crops against MedSeg's lung masks
PLEURA_GAP_MM = 3.0      # rib inner cortex -> parietal pleura (innermost intercostal)
WALL_MARGIN_MM = 6.0     # skin and subcutaneous tissue never belong to the lung
CLOSE_MM = 3.0
OPEN_MM = 6.0
RIB_DENT_MM = 8.0        # lung falling this far short of a rib: a lesion fills the gap
RIB_REACH_MM = 90.0
CUT_MEDIAL = 0.5         # cut rays: at most 30 deg medial of straight posterior
CUT_REACH_MM = 3.0       # an image side the lungs come this close to is where they end
DENT_DEG = 40.0          # widest lesion dent in the lung border bridged from both flanks (half)
PLEURA_RIM_MM = 1.0      # lesions are drawn to the pleural surface, about a pixel beyond the
                         # threshold edge of the lung (COVID-SemiSeg train: lesion kept 95.6 -> 96.2 %)


def _recover_slice(aerated, hu, body, px, cut=None, medial=None):
    """Labels of one slice: each lung's aerated part plus its recovered dense lesions.
    ``medial``: the image column where a view of one side of the chest cuts the mediastinum
    (the chest's centre lies there, and the lung does not end there), or None."""
    if not body.any():
        return np.zeros(aerated.shape, np.uint8)
    sl = _bbox(body | (aerated > 0), pad=2)
    b, h, a = body[sl], hu[sl], aerated[sl]
    yy, xx = np.nonzero(b)
    cy, cx = yy.mean(), xx.mean()
    if medial is not None:
        cx = float(medial - sl[1].start)
    Y, X = np.indices(b.shape, dtype=np.float32)
    ang = np.arctan2(Y - cy, X - cx)
    rad = np.hypot(Y - cy, X - cx)
    ribs = _ribs(h, b, a > 0, px)
    # body pixels on the image border, or where the field of view cuts the body open: the thorax is cut there
    edge = np.zeros(aerated.shape, bool)
    edge[[0, -1], :] = edge[:, [0, -1]] = True
    if medial is not None:
        edge[:, medial] = False
    edge = (edge[sl] & b) | (cut[sl] if cut is not None else False)
    masks = {}
    for side in (_RIGHT, _LEFT):
        m = a == side
        if not m.any():
            continue
        m = ndi.binary_fill_holes(m)
        wall, rout = _pleural_radius(m, b, ribs, ang, rad, px)
        m = ndi.binary_fill_holes(m | (_hull_beyond(m, b, ang, rad) & (rad <= wall)))
        grown = ndi.binary_fill_holes(_extend_to_wall(m, h, rad, rout, wall))
        # tongues narrower than the opening are chest wall between ribs, not lesion
        masks[side] = m | (_open(grown, OPEN_MM / px) & grown)
    smooth = ndi.median_filter(h, size=5) if edge.any() else None
    for side, m in masks.items():
        if smooth is not None:
            m = _extend_to_cut(m, smooth, _open_cuts(edge, m, px), ribs, side, px)
        # smooths the angle-bin steps of the wall line without reaching across organs
        m = _close(m, CLOSE_MM / px) & b & ~ribs
        masks[side] = m & b
    out = np.zeros(b.shape, np.uint8)
    if len(masks) == 2:
        both = masks[_RIGHT] & masks[_LEFT]
        if both.any():
            # contested pixels go to the nearer aerated lung
            dr = ndi.distance_transform_edt(a != _RIGHT)
            dl = ndi.distance_transform_edt(a != _LEFT)
            masks[_RIGHT] &= ~(both & (dl < dr))
            masks[_LEFT] &= ~(both & (dl >= dr))
    for side, m in masks.items():
        out[m] = side
    _add_rim(out, b, PLEURA_RIM_MM / px)
    full = np.zeros(aerated.shape, np.uint8)
    full[sl] = out
    return full


def _add_rim(labels, body, r):
    """Grow each lung label by ``r`` pixels (rounded; 4-connected steps) into unlabeled body,
    in place: the partial-volume rim between the threshold edge and the pleura."""
    n = int(round(r))
    if n < 1:
        return
    free = (labels == 0) & body
    for side in (_RIGHT, _LEFT):
        m = labels == side
        if m.any():
            add = ndi.binary_dilation(m, iterations=n) & free
            labels[add] = side
            free &= ~add


def _disk(r):
    return np.hypot(*np.mgrid[-r:r + 1, -r:r + 1]) <= r


def _open(m, r):
    r = int(round(r))
    if r < 1:
        return m
    return ndi.binary_opening(m, _disk(r))


def _close(m, r):
    r = int(round(r))
    if r < 1:
        return m
    pad = np.pad(m, r + 1)
    return ndi.binary_closing(pad, _disk(r))[r + 1:-r - 1, r + 1:-r - 1]


def _angle_bins(ang, nb):
    return ((ang + np.pi) * (nb / (2 * np.pi))).astype(np.int64) % nb


def _ribs(hu, body, lung, px):
    bone = (hu >= BONE_HU) & body & ~lung
    if not bone.any():
        return bone
    bone = ndi.binary_opening(bone)
    blab, nbone = ndi.label(bone)
    if not nbone:
        return bone
    bsz = np.bincount(blab.ravel())
    bsz[0] = 0
    # ribs only: the spine and sternum border the mediastinum, not the lung
    return np.isin(blab, np.flatnonzero((bsz >= max(3, 5.0 / px ** 2)) & (bsz <= 250.0 / px ** 2)))


def _hull_beyond(lung, body, ang, rad, nb=360):
    """Convex hull of the lung, kept only where it lies farther out than the lung along
    rays from the body centre: fills lesion 'bites' on the chest-wall side and between
    aerated fragments, not the mediastinal concavity."""
    b = _angle_bins(ang, nb)
    rin = np.full(nb, np.inf)
    np.minimum.at(rin, b[lung], rad[lung])
    hull = _convex_hull(lung) & body
    return lung | (hull & (rad >= rin[b]))


def _pleural_radius(lung, body, ribs, ang, rad, px, nb=180, win_deg=None):
    """Radius of the parietal pleura per pixel (rays from the body centre).

    Where aerated lung reaches the wall its outer border *is* the pleura. A dent in that
    border (a dense lesion against the wall) is bridged by interpolating the border's
    radius linearly in angle between the flanks either side, when both lie within
    +-``win_deg``; at the lung's tips, where one flank is missing, nothing is bridged,
    because the lung really ends there. Never beyond the inner edge of a rib (less the
    pleural gap) or close to the skin.
    """
    win_deg = DENT_DEG if win_deg is None else win_deg
    b = _angle_bins(ang, nb)
    rout = np.full(nb, -1.0)
    np.maximum.at(rout, b[lung], rad[lung])
    rb = np.full(nb, -1.0)
    np.maximum.at(rb, b[body], rad[body])
    has = rout >= 0
    wall = rout.copy()
    if has.sum() >= 3:
        w = max(1, int(round(win_deg / 360.0 * nb)))
        closed = ndi.grey_closing(np.where(has, rout, 0.0), size=2 * w + 1, mode="wrap")
        support = has & (rout >= closed - 1.0 / px)
        idx = np.flatnonzero(support)
        if idx.size >= 2:
            # the nearest supporting bin on each side, circularly
            ext = np.concatenate([idx - nb, idx, idx + nb])
            pos = np.searchsorted(ext, np.arange(nb))
            right, left = ext[pos], ext[pos - 1]
            gap = right - left
            t = np.where(gap > 0, (np.arange(nb) - left) / np.maximum(gap, 1), 0.0)
            interp = rout[left % nb] * (1 - t) + rout[right % nb] * t
            ok = has & ~support & (gap <= 2 * w)
            wall = np.where(ok, np.maximum(rout, interp), rout)
    if ribs.any():
        rrib = _rib_radius(ribs, b, rad, rout, nb)
        wall = np.minimum(wall, np.maximum(rrib - PLEURA_GAP_MM / px, rout))
        # Dense lesion filling the end of a lung (dependent consolidation down to the
        # spine): no aerated flank bounds it, but the ribs do.
        short = rrib - rout
        deep = has & np.isfinite(rrib) & (short > RIB_DENT_MM / px) & (short < RIB_REACH_MM / px)
        wall = np.where(deep, np.maximum(wall, rrib - PLEURA_GAP_MM / px), wall)
    wall = np.minimum(wall, np.maximum(rb - WALL_MARGIN_MM / px, rout))
    return np.where(has, wall, -1.0)[b], np.where(has, rout, np.inf)[b]


def _rib_radius(ribs, b, rad, rout, nb):
    """Per angle bin, the radius of the nearest rib beyond the lung's outer border
    (``rout`` per bin; inf: none), the minimum over +-8 degrees so that the intercostal
    space between two ribs is bounded too."""
    rrib = np.full(nb, np.inf)
    beyond = ribs & (rad > rout[b])
    np.minimum.at(rrib, b[beyond], rad[beyond])
    return ndi.minimum_filter1d(rrib, 2 * max(1, int(round(8.0 / 360.0 * nb))) + 1, mode="wrap")


def _open_cuts(edge, lung, px):
    """The cut edges (image sides) a lesion of ``lung`` may still run into: a side the
    lung already reaches within ``CUT_REACH_MM`` is where it ends (a crop at the lungs'
    bounding box), and beside its round end lies chest wall, not lesion."""
    tol = max(1, int(round(CUT_REACH_MM / px)))
    edge = edge.copy()
    for band, line in (((slice(None, tol), slice(None)), (0, slice(None))),
                       ((slice(-tol, None), slice(None)), (-1, slice(None))),
                       ((slice(None), slice(None, tol)), (slice(None), 0)),
                       ((slice(None), slice(-tol, None)), (slice(None), -1))):
        if lung[band].any():
            edge[line] = False
    return edge


def _extend_to_cut(lung, smooth, edge, ribs, side, px, nb=180):
    """Dense lesion running into an image side where the field of view cuts the thorax.

    Rays from the lung's own centroid, posterior only and at most 30 degrees medial (the
    mediastinum is medial, dependent lesions posterior): where one leaves the image
    through an open cut (:func:`_open_cuts`) before any rib, the chest wall is out of
    view (a crop at the lungs' bounding box, as in COVID-SemiSeg) and lesion-density
    tissue connected to the lung is kept up to the cut; where a rib comes first, up to
    its inner edge, as in :func:`_pleural_radius`. ``smooth``: the slice's HU after a
    5x5 median (the 8-bit renderings are JPEG: speckle splits soft tissue at any single
    threshold).
    """
    cy, cx = ndi.center_of_mass(lung)
    Y, X = np.indices(lung.shape, dtype=np.float32)
    dy, dx = Y - cy, X - cx
    rad = np.hypot(dy, dx)
    b = _angle_bins(np.arctan2(dy, dx), nb)
    centres = (np.arange(nb) + 0.5) * (2 * np.pi / nb) - np.pi
    uy, ux = np.sin(centres), np.cos(centres)
    lateral = -ux if side == _RIGHT else ux     # the right lung lies on the low-column side
    # posterior (rows grow towards P: dependent lesions), not far medial (mediastinum)
    outward = (uy >= 0) & (lateral >= -CUT_MEDIAL)
    rout = np.full(nb, -1.0)
    np.maximum.at(rout, b[lung], rad[lung])
    redge = np.full(nb, np.inf)
    np.minimum.at(redge, b[edge], rad[edge])
    rrib = _rib_radius(ribs, b, rad, rout, nb)
    by_rib = rrib - PLEURA_GAP_MM / px < redge
    wall = np.where(by_rib, rrib - PLEURA_GAP_MM / px, redge)
    short = wall - rout
    # a rib in view bounds the lesion as in _pleural_radius (only a real gap is filled)
    cut = outward & (rout >= 0) & np.isfinite(wall) & (short < RIB_REACH_MM / px) \
        & (~by_rib | (short > RIB_DENT_MM / px))
    if not cut.any():
        return lung
    c = cut[b]
    cand = c & (rad > rout[b]) & (rad <= wall[b]) & (smooth > -900.0) & (smooth < BONE_HU) & ~lung
    grown = _connected_to(lung, cand) & ~lung
    return lung | (_open(grown | lung, OPEN_MM / px) & grown)


def _extend_to_wall(lung, hu, rad, rout, wall):
    """Lesion-density tissue between the lung and the pleural line, connected to the lung."""
    cand = (rad > rout) & (rad <= wall) & (hu > -900.0) & (hu < 150.0) & ~lung
    if not cand.any():
        return lung
    return _connected_to(lung, cand)


def _connected_to(lung, cand):
    """``lung`` and the pixels of ``cand`` connected to it."""
    lab, _ = ndi.label(cand | lung)
    keep = np.unique(lab[lung])
    return np.isin(lab, keep[keep > 0])
