"""Datasets for SSA-Net: the public 8-bit COVID-19 CT slice sets, CT volumes and the
torch dataset that feeds training.

Data location
-------------
Nothing is bundled with the code. Every loader takes the data root explicitly;
:func:`data_root` resolves it from a ``--data`` argument or the ``SSALESIONSEG_DATA``
environment variable. Expected layout under the root::

    medseg100/tr_mask.nii.gz, medseg100/images/i001.png ... i100.png, medseg100/split.csv
    covid-semiseg/Dataset/TrainingSet/..., covid-semiseg/Dataset/TestingSet/...

All slices are returned in the canonical orientation of :mod:`ssanet.preprocess`
(anterior at the top, patient right on the image left) as :class:`Sample` objects.

Standard experiment (:func:`default_splits`)
--------------------------------------------
MedSeg-100 full 512x512 slices with the approximate lung mask, split as COVID-SemiSeg:

* train: the 50 MedSeg slices COVID-SemiSeg trains on, minus 4 drawn with a fixed seed;
* val:   those 4 plus MedSeg slices 23 and 49 (in neither COVID-SemiSeg split);
* test:  the 48 MedSeg slices COVID-SemiSeg tests on. These are the COVID-SemiSeg test
  images at full size with pixel-identical GT, so results are comparable with papers
  that use that split. Never train, select or tune on them.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

try:
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # the loaders stay usable where PyTorch is not installed (e.g. Slicer)
    _TorchDataset = object

from .classes import MULTICLASS
from .preprocess import (LUNG_WINDOW_HU, canonical_from_source, hu_problem, make_input, resize_image,
                         same_grid, window_hu)

ENV_VAR = "SSALESIONSEG_DATA"

# The 8-bit sets carry no pixel spacing. 0.7 mm is a typical in-plane spacing of adult
# chest CT reconstructed at 512x512 (about 360 mm field of view); it only scales
# distance metrics (HD95, NSD) and must not be read as a measured value.
NOMINAL_SPACING_MM = 0.7

MEDSEG_DIR = "medseg100"
SEMISEG_DIR = Path("covid-semiseg") / "Dataset"

# torch.nn.CrossEntropyLoss's default ignore_index: the target of an unlabeled sample.
IGNORE_INDEX = -100
# label value of a pixel whose class is not known (a pseudo label the trust module did not
# keep, ``semisup --untrusted ignore``): SliceDataset turns it into IGNORE_INDEX
UNKNOWN_LABEL = 255

_GET_DATA = (
    "The public data: MedSeg COVID-19 segmentation (medicalsegmentation.com/covid19; "
    "tr_mask.nii.gz plus 512x512 PNG renderings from github.com/adnan-saood/covid-19) as "
    "<root>/medseg100/, and COVID-SemiSeg (the Dataset/ folder of "
    "github.com/DengPingFan/Inf-Net, commit c17e524) as <root>/covid-semiseg/Dataset/.")


def data_root(path=None) -> Path:
    """The data root: ``path`` if given, else ``$SSALESIONSEG_DATA``; it must exist."""
    src = "the given path"
    if path is None or str(path) == "":
        path = os.environ.get(ENV_VAR)
        src = f"${ENV_VAR}"
        if not path:
            raise FileNotFoundError(
                f"No data location: pass --data /path/to/data or set {ENV_VAR}. " + _GET_DATA)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Data root {root} ({src}) is not a directory. " + _GET_DATA)
    def is_root(d):
        return any((d / sub).is_dir() for sub in (MEDSEG_DIR, SEMISEG_DIR))

    if not is_root(root):
        above = next((d for d in list(root.resolve().parents)[:3] if is_root(d)), None)
        hint = (f"it is inside the data root: give {above}" if above
                else f"neither {MEDSEG_DIR}/ nor {SEMISEG_DIR.as_posix()}/ is in it")
        raise FileNotFoundError(f"Data root {root} ({src}) is not the data root: {hint}. " + _GET_DATA)
    return root


@dataclass
class Sample:
    """One axial slice in canonical orientation.

    ``image`` uint8 (H, W) lung-window rendering; ``lung`` bool (H, W); ``label`` uint8
    (H, W) with 0 background, 1 ground-glass opacity, 2 consolidation (pleural effusion
    and any other value -> 0), or None when unlabeled; ``spacing`` (sy, sx) in mm.
    ``meta`` holds source-specific details (file, slice number, offsets).
    """
    id: str
    image: np.ndarray
    lung: np.ndarray
    label: np.ndarray | None
    spacing: tuple
    source: str
    meta: dict = field(default_factory=dict)


# ------------------------------------------------------------------------- helpers

def _read_gray(path) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        return np.array(im.convert("L"), dtype=np.uint8)


def _read_index(path) -> np.ndarray:
    """Palette / grey PNG as stored values (a palette PNG gives its indices)."""
    from PIL import Image
    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            im = im.convert("L")
        return np.array(im, dtype=np.uint8)


def _clean_label(lab) -> np.ndarray:
    lab = np.asarray(lab).astype(np.uint8)
    return np.where(lab <= 2, lab, 0).astype(np.uint8)


def _fill_holes_per_component(mask) -> np.ndarray:
    # Filling each component on its own keeps the mediastinum out when the two lungs
    # touch above and below it, which a global fill would close over.
    from scipy import ndimage as ndi
    lab, _ = ndi.label(mask)
    out = np.zeros(mask.shape, bool)
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is not None:
            out[sl] |= ndi.binary_fill_holes(lab[sl] == i)
    return out


def medseg_lung_mask(image_u8) -> np.ndarray:
    """Approximate lung mask of a MedSeg-100 rendering (everything outside the lungs is 0).

    Dense consolidation inside the lung is non-zero in these renderings; the hole filling
    only closes the few zero pixels enclosed by lung. Over all 100 slices 130 of the
    1,785,671 GGO/consolidation pixels (0.007 %, on slices 33, 40, 48, 81, 95) fall
    outside this mask, all within 4 px of its edge where the rendering cut the pleural
    border tighter than the annotation.
    """
    return _fill_holes_per_component(np.asarray(image_u8) > 0)


def _default_lung_fn(kind: str) -> Callable:
    # Imported on use so this module stays importable without the lung step.
    import importlib
    return getattr(importlib.import_module(".lungs", __package__), f"lung_mask_from_{kind}")


def _read_split_csv(root: Path) -> list[dict]:
    p = Path(root) / MEDSEG_DIR / "split.csv"
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing; it maps COVID-SemiSeg files to MedSeg slices")
    with open(p, newline="") as f:
        return list(csv.DictReader(f))


_NIFTI_DTYPES = {2: np.uint8, 4: np.int16, 8: np.int32, 16: np.float32, 64: np.float64,
                 256: np.int8, 512: np.uint16, 768: np.uint32}


def read_nifti_raw(path) -> np.ndarray:
    """The voxel array of a NIfTI-1 file (.nii / .nii.gz) in raw array order (i, j, k, ...),
    scaled by scl_slope / scl_inter when set; no orientation is applied. A fallback for the
    one NIfTI file training reads (MedSeg's labels) where SimpleITK is not installed (e.g.
    a bare GPU image); everything else reads images through SimpleITK."""
    import gzip
    import struct

    path = str(path)
    with (gzip.open(path) if path.endswith(".gz") else open(path, "rb")) as f:
        raw = f.read()
    for end in "<>":
        if len(raw) >= 348 and struct.unpack(end + "i", raw[:4])[0] == 348:
            break
    else:
        raise ValueError(f"{path} is not a NIfTI-1 file (header size is not 348)")
    dim = struct.unpack(end + "8h", raw[40:56])
    code = struct.unpack(end + "h", raw[70:72])[0]
    if code not in _NIFTI_DTYPES:
        raise ValueError(f"{path}: NIfTI data type {code} is not supported here; install SimpleITK")
    offset = int(struct.unpack(end + "f", raw[108:112])[0])
    slope, inter = struct.unpack(end + "2f", raw[112:120])
    shape = tuple(int(n) for n in dim[1:1 + dim[0]])
    arr = np.frombuffer(raw, np.dtype(_NIFTI_DTYPES[code]).newbyteorder(end), int(np.prod(shape)), offset)
    arr = arr.reshape(shape, order="F")
    if slope not in (0.0, 1.0) or inter != 0.0:
        arr = arr * slope + inter
    return arr


@functools.lru_cache(maxsize=2)
def _medseg_label_volume(path: str) -> np.ndarray:
    """Raw-array-order label volume (i, j, k) as in the NIfTI file, read-only, uint8."""
    try:
        import SimpleITK as sitk
    except ImportError:
        arr = read_nifti_raw(path)
    else:
        arr = np.transpose(sitk.GetArrayFromImage(sitk.ReadImage(path)), (2, 1, 0))  # (k, j, i) -> (i, j, k)
    vol = np.ascontiguousarray(arr).astype(np.uint8)
    vol.flags.writeable = False  # shared by the cache
    return vol


# ------------------------------------------------------------------------ MedSeg-100

MEDSEG_SUBSETS = ("train", "test", "free", "all")


def medseg_subset_slices(root, subset: str) -> list[int]:
    """1-based MedSeg slice numbers of ``subset`` (see :func:`load_medseg100`)."""
    if subset not in MEDSEG_SUBSETS:
        raise ValueError(f"subset must be one of {MEDSEG_SUBSETS}, got {subset!r}")
    if subset == "all":
        return list(range(1, 101))
    rows = _read_split_csv(Path(root))
    used = {int(r["medseg_slice"]): r["infnet_set"] for r in rows}
    if subset == "free":
        return [k for k in range(1, 101) if k not in used]
    return sorted(k for k, s in used.items() if s == subset)


def load_medseg100(root, subset: str = "all") -> list[Sample]:
    """MedSeg-100 slices at full 512x512.

    ``subset``: "train" (50) / "test" (48) = the slices COVID-SemiSeg's train / test
    images were cut from (``split.csv``), "free" = slices 23 and 49 (in neither), "all".
    Labels: ``tr_mask.nii.gz`` slice k-1 for ``images/iNNN.png`` with k = NNN; pleural
    effusion (3) -> background. Lung: :func:`medseg_lung_mask`.
    """
    root = Path(root)
    d = root / MEDSEG_DIR
    vol = _medseg_label_volume(str(d / "tr_mask.nii.gz"))
    split_of = {int(r["medseg_slice"]): r for r in _read_split_csv(root)}
    out = []
    for k in medseg_subset_slices(root, subset):
        img = canonical_from_source(_read_gray(d / "images" / f"i{k:03d}.png"), "medseg")
        lab = _clean_label(canonical_from_source(vol[:, :, k - 1], "medseg"))
        r = split_of.get(k)
        meta = {"slice": k, "subset": r["infnet_set"] if r else "free"}
        if r:
            meta["infnet_file"] = r["infnet_file"]
        out.append(Sample(id=f"medseg100_{k:03d}", image=img, lung=medseg_lung_mask(img), label=lab,
                          spacing=(NOMINAL_SPACING_MM, NOMINAL_SPACING_MM), source="medseg100",
                          meta=meta))
    return out


# --------------------------------------------------------------------- COVID-SemiSeg

_SEMISEG_DIRS = {
    ("train", "multiclass"): ("TrainingSet/MultiClassInfection-Train/Imgs",
                              "TrainingSet/MultiClassInfection-Train/GT"),
    ("test", "multiclass"): ("TestingSet/MultiClassInfection-Test/Imgs",
                             "TestingSet/MultiClassInfection-Test/GT"),
    ("train", "binary"): ("TrainingSet/LungInfection-Train/Doctor-label/Imgs",
                          "TrainingSet/LungInfection-Train/Doctor-label/GT"),
    ("test", "binary"): ("TestingSet/LungInfection-Test/Imgs", "TestingSet/LungInfection-Test/GT"),
}


def _num_key(p: Path):
    m = re.search(r"(\d+)$", p.stem)
    return (int(m.group(1)) if m else -1, p.name)


def load_covid_semiseg(root, split: str, task: str = "multiclass",
                       lung_fn: Callable | None = None) -> list[Sample]:
    """COVID-SemiSeg labeled crops (train: 50, test: 48), canonical orientation.

    ``task`` "multiclass": labels 0/1/2 from the palette GT; "binary": the LungInfection GT
    (0/255) as 0/1. No lung masks ship with the set: ``lung_fn(image_u8) -> bool mask``
    derives them, by default ``ssanet.lungs.lung_mask_from_window``.

    ``meta["medseg_slice"]`` and ``meta["canonical_offset"] = (row, col)`` locate the crop
    in the canonical MedSeg-100 slice: ``crop == full[row:row + h, col:col + w]``.
    """
    if (split, task) not in _SEMISEG_DIRS:
        raise ValueError(f"split must be 'train' or 'test' and task 'multiclass' or 'binary', "
                         f"got {split!r}, {task!r}")
    root = Path(root)
    img_dir, gt_dir = (root / SEMISEG_DIR / p for p in _SEMISEG_DIRS[(split, task)])
    if not img_dir.is_dir():
        raise FileNotFoundError(f"{img_dir} not found. " + _GET_DATA)
    lung_fn = lung_fn or _default_lung_fn("window")
    try:
        where = {r["infnet_file"]: r for r in _read_split_csv(root) if r["infnet_set"] == split}
    except FileNotFoundError:
        where = {}
    out = []
    for ip in sorted(img_dir.glob("*.jpg"), key=_num_key):
        img = canonical_from_source(_read_gray(ip), "covid-semiseg")
        gt = canonical_from_source(_read_index(gt_dir / f"{ip.stem}.png"), "covid-semiseg")
        lab = (gt > 127).astype(np.uint8) if task == "binary" else _clean_label(gt)
        meta = {"file": ip.name, "task": task}
        r = where.get(ip.name)
        if r:
            # split.csv offsets are in raw (transposed) order: x is the canonical row.
            meta["medseg_slice"] = int(r["medseg_slice"])
            meta["canonical_offset"] = (int(r["offset_x"]), int(r["offset_y"]))
        out.append(Sample(id=f"semiseg_{split}_{ip.stem}", image=img,
                          lung=np.asarray(lung_fn(img), dtype=bool), label=lab,
                          spacing=(NOMINAL_SPACING_MM, NOMINAL_SPACING_MM),
                          source="covid-semiseg", meta=meta))
    return out


# ---------------------------------------------------------- unlabeled pool intensity

# Intensity anchors (lung-parenchyma peak, soft-tissue peak) measured with
# histogram_anchors on histograms aggregated over a whole group: LABELED over the 50
# COVID-SemiSeg training crops (the MedSeg rendering), CORONACASES over the 1119
# coronacases slices (per volume: lung 13-20, soft tissue 84-103). The radiopaedia
# slices (all: 73, 222; per series: lung 23-93, soft tissue 211-249) lie inside the
# spread of the labeled crops themselves (per crop: lung 31-100, soft tissue 198-225)
# and are left unchanged.
LABELED_ANCHORS = (45.0, 210.0)
CORONACASES_ANCHORS = (14.0, 99.0)


def histogram_anchors(hist) -> tuple[float, float]:
    """(lung peak, soft-tissue peak) grey levels of a 256-bin histogram.

    The lung peak is the mode below 128; the soft-tissue peak the mode between 40 levels
    above it and 250 (saturated pixels excluded). Meant for histograms aggregated over
    many slices; single slices with little lung give unreliable anchors.
    """
    h = np.convolve(np.asarray(hist, dtype=float), np.ones(9) / 9.0, mode="same")
    lo = 4 + int(np.argmax(h[4:128]))
    hi = lo + 40 + int(np.argmax(h[lo + 40:250]))
    return float(lo), float(hi)


def match_intensity(img_u8, src_anchors, dst_anchors=LABELED_ANCHORS) -> np.ndarray:
    """Linear grey-level map sending ``src_anchors`` to ``dst_anchors`` (clipped, uint8).

    A linear map of two tissue anchors undoes a different display window without the
    content dependence of full histogram matching (lesion load and the amount of body in
    a crop change a slice's histogram, not its window).
    """
    (s0, s1), (d0, d1) = src_anchors, dst_anchors
    v = (np.asarray(img_u8, dtype=np.float32) - s0) * np.float32((d1 - d0) / (s1 - s0)) + np.float32(d0)
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


@dataclass
class UnlabeledSlice:
    """A lazily loaded slice of the unlabeled pool; :meth:`load` reads it."""
    id: str
    path: Path
    source: str  # "coronacases" or "radiopaedia"
    volume: str
    index: int
    normalize: bool = True

    def load(self, lung_fn: Callable | None = None) -> Sample:
        """Read the slice: canonical orientation, intensity matched to the labeled set
        (coronacases only, when ``normalize``), lung mask from ``lung_fn`` (default
        ``ssanet.lungs.lung_mask_from_window``); ``label`` is None."""
        img = canonical_from_source(_read_gray(self.path), self.source)
        if self.normalize and self.source == "coronacases":
            img = match_intensity(img, CORONACASES_ANCHORS, LABELED_ANCHORS)
        lung_fn = lung_fn or _default_lung_fn("window")
        return Sample(id=self.id, image=img, lung=np.asarray(lung_fn(img), dtype=bool), label=None,
                      spacing=(NOMINAL_SPACING_MM, NOMINAL_SPACING_MM), source=self.source,
                      meta={"file": self.path.name, "volume": self.volume, "index": self.index,
                            "normalized": self.normalize and self.source == "coronacases"})


_UNLABELED_NAME = re.compile(r"^(?P<volume>.*)_(?P<index>\d+)$")


def load_unlabeled(root, normalize: bool = True) -> list[UnlabeledSlice]:
    """The 1600 unlabeled COVID-SemiSeg slices (10 coronacases + 10 radiopaedia series
    of COVID-19-CT-Seg) as lazy records, sorted by volume and slice index.

    The coronacases slices use a much wider display window than the labeled set (soft
    tissue at grey ~99 instead of ~210); with ``normalize`` they are mapped onto the
    labeled set's intensities by :func:`match_intensity` with fixed per-source anchors.
    """
    d = Path(root) / SEMISEG_DIR / "TrainingSet/LungInfection-Train/Pseudo-label/Imgs"
    if not d.is_dir():
        raise FileNotFoundError(f"{d} not found. " + _GET_DATA)
    recs = []
    for p in d.glob("*.jpg"):
        m = _UNLABELED_NAME.match(p.stem)
        if "coronacases" in p.name:
            source = "coronacases"
        elif "radiopaedia" in p.name:
            source = "radiopaedia"
        else:
            raise ValueError(f"cannot tell the source (coronacases/radiopaedia) of {p.name}")
        recs.append(UnlabeledSlice(id=p.stem, path=p, source=source,
                                   volume=m.group("volume") if m else p.stem,
                                   index=int(m.group("index")) if m else 0, normalize=normalize))
    recs.sort(key=lambda r: (r.volume, r.index))
    return recs


# -------------------------------------------------------------------------- volumes

_VOLUME_EXTS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def _volume_files(d: Path) -> dict[str, Path]:
    out = {}
    for p in sorted(Path(d).iterdir()):
        for ext in _VOLUME_EXTS:
            if p.name.lower().endswith(ext):
                out[p.name[: -len(ext)]] = p
                break
    return out


def _read_lps(path, pixel_type=None):
    import SimpleITK as sitk
    img = sitk.ReadImage(str(path), pixel_type) if pixel_type is not None else sitk.ReadImage(str(path))
    return sitk.DICOMOrient(img, "LPS")


def load_volume_pairs(image_dir, label_dir=None, lung_dir=None, *, window=LUNG_WINDOW_HU,
                      lung_fn: Callable | None = None, lungs_optional: bool = False) -> list[Sample]:
    """One :class:`Sample` per axial slice with lung, from CT volumes in HU.

    Files pair by name (COVID-19-CT-Seg layout: the same file name in ``image_dir``,
    ``label_dir`` and ``lung_dir``; any of .nii.gz, .nii, .nrrd, .mha, .mhd). Volumes
    are reoriented with ``sitk.DICOMOrient(img, "LPS")`` so that ``arr[z]`` is in canonical
    orientation, and windowed with :func:`~ssanet.preprocess.window_hu`.

    ``label_dir`` None gives unlabeled samples. Labels must hold 0, 1 (GGO) and 2
    (consolidation) only (a binary infection mask thus reads as class 1: use it with
    ``num_classes=1``); other values, a CT not in HU, or a companion volume on another grid
    than its image are refused (ValueError naming the file).
    Lung: ``lung_dir`` volumes (> 0), else ``lung_fn(hu (Z, Y, X) float32) -> bool``,
    by default ``ssanet.lungs.lung_mask_from_hu``; with ``lungs_optional`` an image without
    a lung volume in ``lung_dir`` gets ``lung_fn``'s lungs instead of an error (training
    cases exported with and without lung segments share one folder). Spacing (sy, sx)
    comes from the image.
    """
    import SimpleITK as sitk

    images = _volume_files(Path(image_dir))
    if not images:
        raise FileNotFoundError(f"no CT volumes ({', '.join(_VOLUME_EXTS)}) in {image_dir}")
    labels = _volume_files(Path(label_dir)) if label_dir is not None else {}
    lungs = _volume_files(Path(lung_dir)) if lung_dir is not None else {}
    out = []
    for stem, ip in images.items():
        if label_dir is not None and stem not in labels:
            raise FileNotFoundError(f"no label volume named like {ip.name} in {label_dir}")
        if lung_dir is not None and stem not in lungs and not lungs_optional:
            raise FileNotFoundError(f"no lung volume named like {ip.name} in {lung_dir}")
        img = _read_lps(ip, sitk.sitkFloat32)
        hu = sitk.GetArrayFromImage(img)
        problem = hu_problem(hu)
        if problem:
            raise ValueError(f"image {ip} {problem}; training cases hold the CT in HU "
                             "(the Slicer module's 'Export as training case' writes it so)")

        def companion(path, what):
            other = _read_lps(path)
            arr = sitk.GetArrayFromImage(other)
            if arr.shape != hu.shape:
                raise ValueError(f"{what} {path.name} has shape {arr.shape}, image {hu.shape}")
            if not same_grid(other, img):
                raise ValueError(f"{what} {path.name} is not on its image's grid (origin {other.GetOrigin()} vs "
                                 f"{img.GetOrigin()}, spacing {other.GetSpacing()} vs {img.GetSpacing()}): "
                                 "resample it onto the CT, or export both from the same volume")
            return arr

        lab = None
        if label_dir is not None:
            lab = companion(labels[stem], "label")
            extra = sorted(int(v) for v in np.unique(lab) if v not in (0, 1, 2))
            if extra:
                raise ValueError(f"label {labels[stem].name} holds values {extra[:5]}{' ...' if len(extra) > 5 else ''}; "
                                 "training cases use 0 background, 1 GGO, 2 consolidation (a 0/255 mask: divide "
                                 "it by 255 first; 1 is GGO, or infection with `--classes infection`)")
            lab = lab.astype(np.uint8)
        if stem in lungs:
            lung = companion(lungs[stem], "lung mask") > 0
        else:
            lung = np.asarray((lung_fn or _default_lung_fn("hu"))(hu), dtype=bool)
            if lung.shape != hu.shape:
                raise ValueError(f"lung_fn returned {lung.shape} for a volume of shape {hu.shape}")
        sx, sy = img.GetSpacing()[:2]
        for z in np.flatnonzero(lung.reshape(len(lung), -1).any(axis=1)):
            out.append(Sample(
                id=f"{stem}_z{z:03d}",
                image=np.rint(window_hu(hu[z], window)).astype(np.uint8),
                lung=lung[z].copy(), label=None if lab is None else lab[z].copy(),
                spacing=(float(sy), float(sx)), source="volume",
                meta={"volume": stem, "z": int(z), "path": str(ip)}))
        del hu, lab, lung
    return out


def on_model_grid(samples, pixel_mm: float = 0.7, fov: int = 512) -> list[Sample]:
    """Slices of CT volumes moved onto the grid the segmentation pipeline feeds the model:
    resampled in-plane to ``pixel_mm`` and cropped (or padded) to ``fov`` x ``fov`` around
    the volume's lung centroid (:func:`ssanet.preprocess.model_grid`), so that a model
    trained on them sees CT the way it will at inference. Samples of one volume share
    ``meta["volume"]``."""
    from .preprocess import model_grid, to_model_grid

    by_volume: dict = {}
    for s in samples:
        by_volume.setdefault((s.meta or {}).get("volume", s.id), []).append(s)
    out = []
    for group in by_volume.values():
        union = np.any([np.asarray(s.lung, bool) for s in group], axis=0)
        shape, box = model_grid(union, group[0].spacing, pixel_mm, fov)
        for s in group:
            img = to_model_grid(s.image.astype(np.float32), shape, box, 1)
            img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
            out.append(Sample(id=s.id, image=img, lung=to_model_grid(np.asarray(s.lung, bool), shape, box, 0),
                              label=None if s.label is None
                              else to_model_grid(np.asarray(s.label, np.uint8), shape, box, 0),
                              spacing=(float(pixel_mm), float(pixel_mm)), source=s.source,
                              meta={**(s.meta or {}), "model_grid": {"shape": list(shape), "box": list(box)}}))
    return out


def load_training_cases(folder, pixel_mm: float = 0.7, fov: int = 512) -> list[Sample]:
    """Labeled slices from CT cases exported for training (the Slicer module's *Export as
    training case*: ``images/``, ``labels/`` (1 GGO, 2 consolidation) and optionally
    ``lungs/``, files paired by name), on the model's grid (:func:`on_model_grid`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist (or is not a folder): give the folder the "
                                "Slicer module's 'Export as training case' wrote (images/, labels/, lungs/)")
    for sub in ("images", "labels"):
        if not (folder / sub).is_dir():
            raise FileNotFoundError(f"{folder} has no {sub}/ folder: expected the layout of the "
                                    "Slicer module's 'Export as training case' (images/, labels/, lungs/)")
    lungs = folder / "lungs"
    samples = load_volume_pairs(folder / "images", folder / "labels", lungs if lungs.is_dir() else None,
                                lungs_optional=True)
    classes = {}
    for s in samples:   # labels/<case>.json: what the values mean (older exports: 0/1/2)
        stem = s.meta["volume"]
        if stem not in classes:
            sidecar = folder / "labels" / f"{stem}.json"
            try:
                classes[stem] = json.loads(sidecar.read_text()).get("class_names") if sidecar.is_file() else None
            except (OSError, ValueError, AttributeError):
                raise ValueError(f"{sidecar}: not the class list an export writes; export the case again") from None
        s.meta["label_classes"] = classes[stem] or list(MULTICLASS)
    return on_model_grid(samples, pixel_mm, fov)


# --------------------------------------------------------------------------- splits

def hold_out_cases(samples, fraction: float = 0.2, seed: int = 0):
    """(train, val) of exported-case slices with whole cases held out for validation: a
    ``fraction`` of the cases (at least one, chosen with ``seed``), so that no case is in
    both. Cases are told apart by their image file (``meta["path"]``)."""
    key = [str((s.meta or {}).get("path", s.id)) for s in samples]
    volumes = sorted(set(key))
    if len(volumes) < 2:
        raise ValueError(f"{len(volumes)} exported case: holding out a case for validation needs at least two "
                         "(export more, or give a validation folder with --val-cases)")
    n_val = max(1, int(round(fraction * len(volumes))))
    held = {volumes[i] for i in np.random.default_rng(seed).permutation(len(volumes))[:n_val]}
    return ([s for s, k in zip(samples, key) if k not in held], [s for s, k in zip(samples, key) if k in held])


def split_train_val(samples, n_val: int, seed: int):
    """Deterministic split into (train, val) lists; both keep the input order."""
    n = len(samples)
    if not 0 <= n_val <= n:
        raise ValueError(f"n_val={n_val} out of range for {n} samples")
    val_idx = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    train = [s for i, s in enumerate(samples) if i not in val_idx]
    val = [s for i, s in enumerate(samples) if i in val_idx]
    return train, val


def default_splits(root, n_val: int = 4, seed: int = 0) -> dict[str, list[Sample]]:
    """The project's standard experiment (module docstring): ``{"train": 46, "val": 6,
    "test": 48}`` MedSeg-100 slices with the defaults."""
    train, val = split_train_val(load_medseg100(root, "train"), n_val, seed)
    return {"train": train, "val": val + load_medseg100(root, "free"),
            "test": load_medseg100(root, "test")}


def fold_splits(root, folds: int, fold: int, seed: int = 0) -> dict[str, list[Sample]]:
    """Cross-validation over the labeled slices: the 50 MedSeg-100 training slices in a
    seeded order, cut into ``folds`` parts; part ``fold`` (0-based) plus the two free slices
    (23, 49) is validation, the rest training; test as in :func:`default_splits`. Over the
    folds every training slice is validated exactly once, so recipes are compared on ~50
    held-out slices instead of the default split's 6. With :func:`with_semiseg_renderings` a
    slice's crop follows it into the same fold."""
    if folds < 2 or not 0 <= fold < folds:
        raise ValueError(f"fold {fold} of {folds}: need folds >= 2 and 0 <= fold < folds")
    labeled = load_medseg100(root, "train")
    order = np.random.default_rng(seed).permutation(len(labeled))
    held_out = set(np.array_split(order, folds)[fold].tolist())
    return {"train": [s for i, s in enumerate(labeled) if i not in held_out],
            "val": [s for i, s in enumerate(labeled) if i in held_out] + load_medseg100(root, "free"),
            "test": load_medseg100(root, "test")}


def with_semiseg_renderings(splits: dict, root) -> dict:
    """``splits`` (:func:`default_splits`) plus COVID-SemiSeg's own renderings of the same
    training slices: the crops (standard lung-window look, body in view, lung masks from
    :mod:`ssanet.lungs`) on the model's grid. A crop goes where its MedSeg slice is
    (train or validation), so the validation slices stay unseen; the test crops are never
    read. The MedSeg-100 renderings alone make a rendering-specific model (README)."""
    crops = on_model_grid(load_covid_semiseg(root, "train"))
    val_slices = {s.meta["slice"] for s in splits["val"] if "slice" in (s.meta or {})}
    out = dict(splits)
    out["train"] = list(splits["train"]) + [c for c in crops if c.meta.get("medseg_slice") not in val_slices]
    out["val"] = list(splits["val"]) + [c for c in crops if c.meta.get("medseg_slice") in val_slices]
    return out


# ---------------------------------------------------------------- torch dataset

@dataclass(frozen=True)
class AugmentConfig:
    """Few-shot CT augmentation: geometry jointly on image/lung/label, intensity on lung.

    The ``elastic_*``, ``noise_*`` and ``blur_*`` terms are off by default; when a
    probability is 0 its random numbers are not drawn, so the default draws exactly what
    it always drew (runs stay reproducible across versions).
    """
    flip_p: float = 0.5
    max_rotation_deg: float = 10.0
    scale: tuple = (0.9, 1.1)
    contrast: tuple = (0.9, 1.1)
    brightness: float = 10.0
    gamma: tuple = (0.8, 1.25)
    elastic_p: float = 0.0          # smooth random deformation: a coarse grid of displacements
    elastic_grid: int = 6           # control points per side, cubic-interpolated to the slice
    elastic_std: float = 0.0        # displacement s.d. at the control points, fraction of the side
    noise_p: float = 0.0            # additive Gaussian noise inside the lung
    noise_std: float = 0.0          # its s.d. is drawn from U(0, noise_std), grey levels
    blur_p: float = 0.0             # Gaussian blur of the slice
    blur_sigma: tuple = (0.5, 1.0)  # pixels


# Named presets (``train --augment``). "strong" follows nnU-Net's 2-D recipe in spirit
# (wider scale / rotation / intensity ranges, elastic deformation, noise, blur): with 46
# labeled slices, appearance variety is what the runs measured to help most.
AUGMENT_PRESETS = {
    "standard": AugmentConfig(),
    "strong": AugmentConfig(max_rotation_deg=20.0, scale=(0.8, 1.25), contrast=(0.75, 1.3),
                            brightness=20.0, gamma=(0.7, 1.5), elastic_p=0.3, elastic_std=0.012,
                            noise_p=0.15, noise_std=8.0, blur_p=0.15),
}


def _elastic_field(shape, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """(2, H, W) smooth displacement in pixels: random control points, cubic zoom."""
    from scipy import ndimage as ndi

    g = int(cfg.elastic_grid)
    coarse = rng.normal(0.0, cfg.elastic_std, size=(2, g, g)) * np.array(shape, float)[:, None, None]
    return np.stack([ndi.zoom(c, (shape[0] / g, shape[1] / g), order=3, mode="nearest",
                              grid_mode=True) for c in coarse]).astype(np.float32)


def augment_slice(image, lung, label, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()):
    """Randomly flip left-right, rotate, scale (about the centre), optionally deform
    elastically, and jitter intensity (optionally add noise and blur).

    ``image`` float (0..255), ``lung`` bool, ``label`` integer or None, all (H, W).
    Returns new arrays (float32, bool, uint8 / None). All random numbers are drawn in a
    fixed order so the result depends only on the generator state.
    """
    from scipy import ndimage as ndi

    flip = rng.random() < cfg.flip_p
    angle = np.deg2rad(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg))
    scale = rng.uniform(*cfg.scale)
    contrast = rng.uniform(*cfg.contrast)
    brightness = rng.uniform(-cfg.brightness, cfg.brightness)
    gamma = float(np.exp(rng.uniform(np.log(cfg.gamma[0]), np.log(cfg.gamma[1]))))
    field = None
    if cfg.elastic_p > 0 and rng.random() < cfg.elastic_p:
        field = _elastic_field(np.shape(image), rng, cfg)
    noise_std = rng.uniform(0.0, cfg.noise_std) if cfg.noise_p > 0 and rng.random() < cfg.noise_p else 0.0
    blur = rng.uniform(*cfg.blur_sigma) if cfg.blur_p > 0 and rng.random() < cfg.blur_p else 0.0

    image = np.asarray(image, dtype=np.float32)
    lung = np.asarray(lung).astype(np.uint8)
    label = None if label is None else np.asarray(label).astype(np.uint8)
    if flip:
        image, lung = image[:, ::-1], lung[:, ::-1]
        label = None if label is None else label[:, ::-1]

    # affine_transform maps output to input coordinates: the inverse rotation, and 1/scale
    # so that scale > 1 enlarges the anatomy.
    c, s = np.cos(angle), np.sin(angle)
    mat = np.array([[c, s], [-s, c]]) / scale
    centre = (np.array(image.shape, dtype=float) - 1.0) / 2.0
    offset = centre - mat @ centre
    if field is None:
        image = ndi.affine_transform(image, mat, offset, order=1, mode="constant", cval=0.0,
                                     output=np.float32)
        lung = ndi.affine_transform(lung, mat, offset, order=0, mode="constant", cval=0) > 0
        if label is not None:
            label = ndi.affine_transform(label, mat, offset, order=0, mode="constant", cval=0)
    else:  # the same affine map, then the displacement, in one resampling
        grid = np.indices(image.shape, dtype=np.float32) + field
        coords = np.tensordot(mat, grid, axes=1) + offset[:, None, None]
        image = ndi.map_coordinates(image, coords, order=1, mode="constant", cval=0.0,
                                    output=np.float32)
        lung = ndi.map_coordinates(lung, coords, order=0, mode="constant", cval=0) > 0
        if label is not None:
            label = ndi.map_coordinates(label, coords, order=0, mode="constant", cval=0)

    if blur > 0:
        image = ndi.gaussian_filter(image, blur)
    if lung.any():
        v = image[lung] * np.float32(1.0 / 255.0)
        v = np.power(np.clip(v, 0.0, 1.0), np.float32(gamma)) * np.float32(255.0)
        # Contrast about the lung mean so it does not double as a brightness change.
        m = v.mean()
        v = (v - m) * np.float32(contrast) + m + np.float32(brightness)
        if noise_std > 0:
            v = v + rng.normal(0.0, noise_std, size=v.shape).astype(np.float32)
        image[lung] = np.clip(v, 0.0, 255.0)
    return image, lung, label


class SliceDataset(_TorchDataset):
    """Torch dataset of :class:`Sample` slices: ``(x float32 (2, size, size),
    y int64 (size, size))``.

    ``x`` is :func:`~ssanet.preprocess.make_input` of the resized slice and lung mask.
    ``y`` holds the classes 0/1/2 for ``num_classes=3``, the binary infection mask
    (label > 0) for ``num_classes`` 1 or 2, and :data:`IGNORE_INDEX` everywhere for
    unlabeled samples and where the label is :data:`UNKNOWN_LABEL`. Resizing happens once here (bilinear image, nearest masks).

    With ``augment`` every item is augmented with a generator seeded by
    ``(seed, epoch, index)``: call :meth:`set_epoch` before each epoch. An item can also be
    asked for as ``ds[(epoch, index)]``; ``ssanet.train.make_loader`` does so, so that
    persistent DataLoader workers (which keep their copy of the dataset) follow the epoch.
    """

    def __init__(self, samples, size: int = 256, augment: bool = False, seed: int = 0,
                 num_classes: int = 3, blank_outside_lung: bool = True,
                 augment_config: AugmentConfig = AugmentConfig()):
        if num_classes not in (1, 2, 3):
            raise ValueError(f"num_classes must be 1, 2 or 3, got {num_classes}")
        self.ids = [s.id for s in samples]
        self.size = int(size)
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        self.num_classes = num_classes
        self.blank_outside_lung = blank_outside_lung
        self.augment_config = augment_config
        sz = (self.size, self.size)
        self.images = [resize_image(s.image, sz, order=1) for s in samples]
        self.lungs = [resize_image(np.asarray(s.lung, bool), sz, order=0) for s in samples]
        self.labels = [None if s.label is None else resize_image(np.asarray(s.label, np.uint8), sz, order=0)
                       for s in samples]

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def arrays(self, index):
        """(image float32, lung bool, label uint8 / None) of item ``index`` (or
        ``(epoch, index)``) as fed to the model."""
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        image, lung, label = self.images[index], self.lungs[index], self.labels[index]
        if self.augment:
            rng = np.random.default_rng([self.seed, int(epoch), int(index)])
            image, lung, label = augment_slice(image, lung, label, rng, self.augment_config)
        return image, lung, label

    def __getitem__(self, index):
        import torch

        image, lung, label = self.arrays(index)
        x = make_input(image, lung, blank_outside_lung=self.blank_outside_lung)
        if label is None:
            y = np.full(image.shape, IGNORE_INDEX, np.int64)
        else:
            y = (label > 0).astype(np.int64) if self.num_classes < 3 else label.astype(np.int64)
            y[label == UNKNOWN_LABEL] = IGNORE_INDEX
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
