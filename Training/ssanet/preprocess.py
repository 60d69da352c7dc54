"""SSA-Net input preprocessing: the single definition shared by training, evaluation,
pseudo-labelling and the CT pipeline.

Model-input contract
--------------------
A slice enters the network as two channels (see :func:`make_input`):

* channel 0: the slice in the lung window (:data:`LUNG_WINDOW_HU`) scaled to 0..1, set
  to 0 outside the lung mask (the paper feeds "CT slice + lung mask" and lesions only
  occur inside the lungs);
* channel 1: the lung mask as 0/1.

Slices are 8-bit lung-window renderings (0..255) in the canonical orientation below;
HU volumes go through :func:`window_hu` first.

Canonical orientation
---------------------
The model works in the radiological display orientation of an LPS-oriented volume: for
a SimpleITK image with identity direction (what ``sitk.DICOMOrient(img, "LPS")``
produces for an axial scan), ``arr = sitk.GetArrayFromImage(img)`` gives slices
``arr[z]`` whose rows run anterior -> posterior and columns patient right -> patient left.
On screen: anterior at the top, spine at the bottom, patient right on the image left
(liver on the image left, heart and descending aorta on the image right).

The 8-bit public sets are stored rotated; :func:`canonical_from_source` maps each of
them to this orientation (see the per-source functions for how each was verified).
"""

from __future__ import annotations

import numpy as np

LUNG_WINDOW_HU = (-1250.0, 250.0)


# ----------------------------------------------------------------------------- window

# a CT in Hounsfield units has air (around -1000 HU) outside the body and in the lungs
AIR_HU = -500.0
MIN_AIR_FRACTION = 0.001


def hu_problem(hu) -> str | None:
    """Why ``hu`` does not look like a CT in Hounsfield units (a sentence), or None."""
    arr = np.asarray(hu)
    if arr.size and float(np.count_nonzero(arr < AIR_HU)) / arr.size >= MIN_AIR_FRACTION:
        return None
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    hint = (" (values look like stored pixel values without the DICOM rescale intercept)"
            if lo >= 0 and hi > 1000 else "")
    return (f"does not look like a CT in Hounsfield units: almost no voxels below {AIR_HU:.0f} HU "
            f"(air), value range {lo:.0f}..{hi:.0f}{hint}")


def same_grid(a, b, tol: float = 1e-3) -> bool:
    """Two SimpleITK images on the same voxel grid: size, spacing, origin and direction
    equal within ``tol`` (the origin within ``tol`` of the largest voxel spacing)."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=tol, atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=max(tol, tol * max(b.GetSpacing())))
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def window_hu(hu, window=LUNG_WINDOW_HU) -> np.ndarray:
    """HU -> float32 in [0, 255], linear inside ``window`` and clipped outside."""
    lo, hi = float(window[0]), float(window[1])
    out = (np.asarray(hu, dtype=np.float32) - lo) * np.float32(255.0 / (hi - lo))
    return np.clip(out, 0.0, 255.0, out=out)


def hu_from_window(img_u8, window=LUNG_WINDOW_HU) -> np.ndarray:
    """Approximate HU (float32) of an 8-bit rendering made with ``window``.

    Exact inverse of :func:`window_hu` inside the window; clipped values come back as
    the window limits.
    """
    lo, hi = float(window[0]), float(window[1])
    return np.asarray(img_u8, dtype=np.float32) * np.float32((hi - lo) / 255.0) + np.float32(lo)


# ------------------------------------------------------------------------ model input

def make_input(image, lung, blank_outside_lung: bool = True) -> np.ndarray:
    """The network input: float32 ``(2, H, W)`` for one slice, ``(N, 2, H, W)`` for a stack.

    ``image`` is a lung-window slice (or stack) on the 0..255 scale, any dtype; ``lung``
    the matching lung mask (anything non-zero is lung).
    """
    img = np.asarray(image, dtype=np.float32)
    lung = np.asarray(lung)
    if img.shape != lung.shape:
        raise ValueError(f"image {img.shape} and lung mask {lung.shape} differ in shape")
    if img.ndim not in (2, 3):
        raise ValueError(f"expected (H, W) or (N, H, W), got {img.shape}")
    m = lung.astype(bool)
    ch0 = img * np.float32(1.0 / 255.0)
    if blank_outside_lung:
        ch0 = np.where(m, ch0, np.float32(0.0))
    return np.stack([ch0, m.astype(np.float32)], axis=-3)


# ----------------------------------------------------------------------- lung crop

def lung_centroid_crop(image, *others, lung, crop: int = 630):
    """Square crop of side ``crop`` centred on the lung centroid.

    SSA-Net's preprocessing takes a fixed-size square around the lungs (630 px in the
    paper) before resizing to the network size; this implements it for any size.

    Returns ``(box, crops)``: ``box = (y0, x0, y1, x1)`` in the slice's pixel
    coordinates with ``y1 - y0 == x1 - x0 == crop``, and ``crops`` a tuple holding
    :func:`crop_or_pad` of ``image``, each of ``others`` and finally ``lung``, in that
    order. Every array must share the last two dimensions of ``image``.

    Where the image is at least ``crop`` long on an axis the box stays inside it (shifted
    off the centroid when needed); where it is shorter the box covers the whole axis and
    reaches outside it, and :func:`crop_or_pad` fills the outside with zeros. An empty
    lung mask centres the box on the image.
    """
    h, w = np.shape(image)[-2:]
    m = np.asarray(lung).astype(bool)
    if m.shape[-2:] != (h, w):
        raise ValueError(f"lung mask {m.shape} does not match image {np.shape(image)}")
    if m.ndim > 2:
        m = m.reshape(-1, h, w).any(axis=0)
    if m.any():
        ys, xs = np.nonzero(m)
        cy, cx = ys.mean(), xs.mean()
    else:
        cy, cx = (h - 1) / 2.0, (w - 1) / 2.0

    def start(c, n):
        s = int(round(c - (crop - 1) / 2.0))
        lo, hi = min(0, n - crop), max(0, n - crop)
        return min(max(s, lo), hi)

    y0, x0 = start(cy, h), start(cx, w)
    box = (y0, x0, y0 + crop, x0 + crop)
    crops = tuple(crop_or_pad(a, box) for a in (image, *others, lung))
    return box, crops


def _overlap(box, h, w):
    y0, x0, y1, x1 = box
    sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
    return (slice(sy0, sy1), slice(sx0, sx1)), (slice(sy0 - y0, sy1 - y0), slice(sx0 - x0, sx1 - x0))


def crop_or_pad(arr, box) -> np.ndarray:
    """The ``box = (y0, x0, y1, x1)`` region of the last two axes of ``arr``, zero where
    the box lies outside the array. Leading axes are kept; dtype is preserved."""
    arr = np.asarray(arr)
    y0, x0, y1, x1 = box
    h, w = arr.shape[-2:]
    out = np.zeros(arr.shape[:-2] + (y1 - y0, x1 - x0), dtype=arr.dtype)
    src, dst = _overlap(box, h, w)
    out[(..., *dst)] = arr[(..., *src)]
    return out


def uncrop(arr_crop, box, full_shape, fill=0) -> np.ndarray:
    """Inverse of :func:`crop_or_pad`: place ``arr_crop`` back into an array whose last two
    axes are ``full_shape[-2:]``, everything outside the box set to ``fill``. Leading axes
    of ``arr_crop`` are kept, so ``(C, h, w)`` probabilities map back to ``(C, H, W)``."""
    arr_crop = np.asarray(arr_crop)
    h, w = tuple(full_shape)[-2:]
    y0, x0, y1, x1 = box
    if arr_crop.shape[-2:] != (y1 - y0, x1 - x0):
        raise ValueError(f"crop {arr_crop.shape} does not match box {box}")
    out = np.full(arr_crop.shape[:-2] + (h, w), fill, dtype=arr_crop.dtype)
    src, dst = _overlap(box, h, w)
    out[(..., *src)] = arr_crop[(..., *dst)]
    return out


def model_grid(union_lung, spacing, pixel_mm, fov: int):
    """Where a CT volume's slices sit on the model's input grid.

    ``union_lung`` (H, W): the lung pixels of all slices; ``spacing`` (sy, sx) in mm;
    ``pixel_mm``: the model's pixel size (None keeps the native one); ``fov``: the side of
    the square the model sees. Returns ``((hr, wr), box)``: the in-plane shape after
    resampling to ``pixel_mm`` and the :func:`lung_centroid_crop` box on that grid. The
    segmentation pipeline and training on exported CT cases both use it.
    """
    h, w = np.shape(union_lung)[-2:]
    sy, sx = spacing
    ty, tx = (sy, sx) if pixel_mm is None else ((pixel_mm, pixel_mm) if np.isscalar(pixel_mm) else pixel_mm)
    shape = max(1, int(round(h * sy / ty))), max(1, int(round(w * sx / tx)))
    union = np.asarray(union_lung, bool)
    union_r = resize_image(union, shape, order=0) if shape != (h, w) else union
    box, _ = lung_centroid_crop(union_r, lung=union_r, crop=int(fov))
    return shape, box


def to_model_grid(arr, shape, box, order: int) -> np.ndarray:
    """``arr`` (..., H, W) on the grid :func:`model_grid` described: resized to ``shape``
    when it differs (``order`` 1 for images, 0 for masks), then cropped/padded to ``box``."""
    arr = np.asarray(arr)
    if arr.shape[-2:] != tuple(shape):
        arr = resize_image(arr, shape, order=order)
    return crop_or_pad(arr, box)


# -------------------------------------------------------------------------- resizing

def _size2(size):
    if np.isscalar(size):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def resize_image(arr, size, order: int) -> np.ndarray:
    """Resize the last two axes of ``arr`` to ``size`` (int or (h, w)).

    ``order=1`` (bilinear) for images, returning float32; ``order=0`` (nearest) for labels
    and masks, returning the input dtype so label values stay exact. Values keep their
    range (no rescaling to 0..1) and there is no anti-aliasing, so masks stay crisp.
    """
    from skimage.transform import resize

    arr = np.asarray(arr)
    h, w = _size2(size)
    out_shape = arr.shape[:-2] + (h, w)
    if order == 0:
        if arr.shape == out_shape:
            return arr.copy()
        src = arr.astype(np.uint8) if arr.dtype == bool else arr
        out = resize(src, out_shape, order=0, preserve_range=True, anti_aliasing=False, mode="edge")
        return out.astype(arr.dtype)
    out = resize(arr.astype(np.float32), out_shape, order=order, preserve_range=True,
                 anti_aliasing=False, mode="edge")
    return out.astype(np.float32)


def resize_probs(probs, size):
    """Bilinear resize of class probabilities ``(C, H, W)`` or ``(N, C, H, W)``.

    Accepts a numpy array or a torch tensor and returns the same kind (numpy as float32).
    """
    import torch
    import torch.nn.functional as F

    h, w = _size2(size)
    is_np = not isinstance(probs, torch.Tensor)
    t = torch.as_tensor(np.asarray(probs, dtype=np.float32)) if is_np else probs
    if t.dim() not in (3, 4):
        raise ValueError(f"expected (C, H, W) or (N, C, H, W), got {tuple(t.shape)}")
    squeeze = t.dim() == 3
    if squeeze:
        t = t[None]
    out = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
    if squeeze:
        out = out[0]
    return out.numpy().astype(np.float32, copy=False) if is_np else out


# ------------------------------------------------------------- canonical orientation

def canonical_from_medseg(arr2d) -> np.ndarray:
    """MedSeg-100 PNG / raw ``tr_mask.nii.gz`` slice -> canonical orientation (transpose).

    The PNGs' rows are the raw NIfTI i axis (``png[r, c] == tr_mask[r, c, k-1]`` in raw
    array order). ``tr_mask.nii.gz`` has no qform/sform, so SimpleITK reads it with an
    identity direction and ``sitk.GetArrayFromImage(...)[k-1]`` is exactly this
    transposed slice. The COVID-SemiSeg crops share the raw orientation (they are
    unflipped crops of these slices) and use this function too.

    Verified visually on montages: after transposing, pleural effusion and dependent
    consolidation lie at the bottom of the MedSeg slices, and in the (unblanked)
    COVID-SemiSeg crops the spine is at the bottom, the heart and descending aorta on the
    image right and the gastric air bubble under the left hemidiaphragm on the image
    right.
    """
    return np.ascontiguousarray(np.swapaxes(np.asarray(arr2d), -1, -2))


def canonical_from_coronacases(arr2d) -> np.ndarray:
    """COVID-19-CT-Seg "coronacases" unlabeled slice -> canonical (rotate 90 deg CCW).

    Stored with the spine on the image left. Verified visually on one slice of each of the
    10 coronacases volumes: after ``np.rot90(arr, 1)`` the spine is at the bottom and the
    heart and descending aorta are on the image right.
    """
    return np.ascontiguousarray(np.rot90(np.asarray(arr2d), 1, axes=(-2, -1)))


def canonical_from_radiopaedia(arr2d) -> np.ndarray:
    """COVID-19-CT-Seg "radiopaedia" unlabeled slice -> canonical (transpose, like MedSeg).

    Stored with the spine on the image right. Verified visually on one slice of each of
    the 10 radiopaedia series: after transposing the spine is at the bottom and the heart
    and descending aorta are on the image right.
    """
    return canonical_from_medseg(arr2d)


_TO_CANONICAL = {
    "medseg": canonical_from_medseg,
    "covid-semiseg": canonical_from_medseg,
    "coronacases": canonical_from_coronacases,
    "radiopaedia": canonical_from_radiopaedia,
}


def canonical_from_source(arr2d, source: str) -> np.ndarray:
    """Canonical orientation for ``source`` in {"medseg", "covid-semiseg", "coronacases",
    "radiopaedia"}."""
    try:
        return _TO_CANONICAL[source](arr2d)
    except KeyError:
        raise ValueError(f"unknown source {source!r}; expected one of {sorted(_TO_CANONICAL)}") from None


def raw_from_canonical(arr2d, source: str) -> np.ndarray:
    """Inverse of :func:`canonical_from_source` (to write predictions in a set's own layout)."""
    if source not in _TO_CANONICAL:
        raise ValueError(f"unknown source {source!r}; expected one of {sorted(_TO_CANONICAL)}")
    arr = np.asarray(arr2d)
    if source == "coronacases":
        return np.ascontiguousarray(np.rot90(arr, -1, axes=(-2, -1)))
    return np.ascontiguousarray(np.swapaxes(arr, -1, -2))
