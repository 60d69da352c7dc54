"""Reading and checking the input CT, reading lung masks / labelmaps, atomic writing.

Inputs: a NIfTI / NRRD / MHA (any format SimpleITK reads) file, a single DICOM file, or a
folder of DICOM files (searched recursively; with several series the CT series with the
most slices is used and the others are listed in the info).

Everything the engine writes goes through :func:`atomic_path`: the file is written under
a temporary name in the destination folder and renamed into place, so an interrupted
run never leaves a half-written file under a final name.
"""
from __future__ import annotations

import contextlib
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ssanet.preprocess import hu_problem, same_grid

from .errors import InputError

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# images that are not read as a CT (pictures, Analyze, VTK, MINC) and archives that may hold
# one: a case folder of them fails with its reason instead of being passed over as imageless
OTHER_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".hdr", ".img", ".vtk", ".vti", ".mnc",
                        ".gipl", ".zip", ".tar", ".tar.gz", ".tgz", ".7z")
MIN_INPLANE_PX = 16


# ------------------------------------------------------------------------ file names

def case_name(path: str | os.PathLike) -> str:
    """Output base name of an input: the file name without its volume suffix(es); a folder
    given as ``.`` or ``..`` is named after the folder it is."""
    p = Path(path)
    if p.name in ("", ".", ".."):
        p = Path(os.path.abspath(p))
    name = p.name
    for suf in (".seg.nrrd",) + VOLUME_SUFFIXES + DICOM_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)] or p.name
    return p.stem if p.is_file() else name


def is_volume_file(p: Path) -> bool:
    return p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES)


# what `segment` writes per case: always, and on request (--save-probability, --labelmaps)
OUTPUT_SUFFIXES = {"segmentation": ".seg.nrrd", "stats_json": "_stats.json", "stats_csv": "_stats.csv",
                   "overlay": "_overlay.png"}
OPTIONAL_OUTPUT_SUFFIXES = {"confidence": "_confidence.nrrd", "lesion_labelmap": "_lesions.nii.gz",
                            "lung_labelmap": "_lungs.nii.gz"}


def is_engine_output(p: Path) -> bool:
    """A file the engine writes beside its results, never a CT to segment: a ``.seg.nrrd``,
    or an optional output (``<name>_confidence.nrrd``, ``_lesions.nii.gz``, ``_lungs.nii.gz``)
    of a case whose ``<name>_stats.json`` is beside it."""
    low = p.name.lower()
    if low.endswith(".seg.nrrd"):
        return True
    return any(low.endswith(suf) and p.with_name(p.name[: -len(suf)] + "_stats.json").is_file()
               for suf in OPTIONAL_OUTPUT_SUFFIXES.values())


def is_dicom_file(p: Path) -> bool:
    """A DICOM image file by name (``.dcm`` ...) or preamble; not a hidden file (macOS ``._``
    copies) and not a ``DICOMDIR`` index, which point at images but are none."""
    if not p.is_file() or p.name.startswith(".") or p.name.upper() == "DICOMDIR":
        return False
    if p.name.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


# ------------------------------------------------------------------------------ read

def read_ct(path: str | os.PathLike) -> tuple[sitk.Image, dict]:
    """Read and validate a CT. Returns (float32 image in HU, info dict).

    Raises InputError with the file named for anything unreadable or not a CT volume.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"input not found: {p}")
    info: dict = {"input": str(p)}
    if not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)):
        raise InputError(f"cannot read {p}: permission denied (the {'folder' if p.is_dir() else 'file'} is not "
                         "readable for this user)")
    dicom = not p.is_dir() and is_dicom_file(p)
    header = None
    if p.is_dir():
        img, dinfo = _read_dicom_folder(p)
        info.update(dinfo)
    elif dicom and len(series := _series_of_file(p)) > 1:
        # one file of a series given: the series is meant, as Slicer's Add Data reads it
        summary = {**_dicom_summary([p]), "folder": str(p.parent), "n_files": len(series)}
        _refuse_other_modality([summary], p)
        img = _read_dicom_series(series, summary)
        info["dicom"] = summary
        info["dicom_series_note"] = (f"{p.name} is one of the {len(series)} files of its DICOM series: the whole "
                                     "series was read (to segment that one slice, put the file in a folder of its own)")
    else:
        if dicom:
            info["dicom"] = _dicom_summary([p])
            _refuse_other_modality([info["dicom"]], p)
        if _is_nifti(p):
            # what ITK would misread without a word is checked on the file's own header and data first
            header = check_nifti_complete(p, count_nonfinite=True)
            if header is not None:
                nifti_ct_problems(header, p)
        img = _read_file(p, checked=True)
        if dicom:
            img = _single_dicom_slice_spacing(img, p)
    img = validate_ct(img, str(p))
    if header is not None and (note := nifti_orientation_note(header, img)):
        info["nifti_note"] = note
    info["size"] = list(img.GetSize())
    info["spacing_mm"] = [float(s) for s in img.GetSpacing()]
    info["orientation"] = sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(img.GetDirection())
    return img, info


def read_notes(info: dict) -> list:
    """What reading the input decided that the user should hear (``read_ct``'s info): which
    DICOM series was read, a gantry tilt undone, a NIfTI whose qform and sform disagree."""
    return [n for n in (info.get("dicom_series_note"), (info.get("dicom") or {}).get("gantry_tilt_note"),
                        info.get("nifti_note")) if n]


def _is_nifti(p: Path) -> bool:
    return p.name.lower().endswith((".nii", ".nii.gz"))


def _read_file(p: Path, checked: bool = False) -> sitk.Image:
    """``p`` as ITK reads it; a NIfTI is first checked to be complete (``checked``: the
    caller did that already)."""
    if _is_nifti(p) and not checked:
        check_nifti_complete(p)   # ITK reads a cut-off NIfTI without a word, the rest as zeros
    if p.name.lower().endswith((".mha", ".mhd")):
        check_metaimage_complete(p)   # MetaIO prints its own lines on a cut-off file, then ITK fails vaguely
    try:
        with _quiet_itk():   # a damaged file is reported below; ITK's own lines would interleave with the cases'
            return sitk.ReadImage(str(p))
    except RuntimeError as e:
        msg = str(e).strip().splitlines()
        zero = next((re.search(r"Refusing to change spacing from \[[^]]*\] to \[([^]]*)\]", m) for m in msg
                     if "Refusing to change spacing" in m), None)
        if zero:   # NRRD / MHA with a zero (or unreadable) voxel size: ITK refuses, in its own words
            values = [v.strip() for v in zero.group(1).split(",")]
            axes = [str(i + 1) for i, v in enumerate(values) if _float_or_nan(v) == 0]
            raise InputError(f"{p}: the header gives a voxel size of 0 along voxel axis {', '.join(axes) or '?'} "
                             f"(spacing {', '.join(values)}): no volume can be measured — fix the header with "
                             "the true spacing (the scanner's PixelSpacing / slice spacing)") from None
        detail = next((m for m in msg if "ERROR" in m or "Unable" in m or "Could not" in m), msg[-1] if msg else "")
        raise InputError(f"cannot read {p}: not a readable image file or corrupt ({detail.strip()[:200]})") from None


_META_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
               "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
               "MET_DOUBLE": 8}


def check_metaimage_complete(p: Path) -> None:
    """Refuse a MetaImage (``.mha``, or ``.mhd`` with its data file) holding fewer data bytes
    than its header announces: a cut-off copy. Headers this does not follow (several data
    files, unknown types) are left to ITK."""
    try:
        with open(p, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return
    fields, start = {}, None
    pos = 0
    for line in head.split(b"\n"):
        pos += len(line) + 1
        key, _, value = line.decode("latin-1").partition("=")
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            start = pos
            break
    if start is None:
        return
    try:
        dims = [int(v) for v in fields["DimSize"].split()]
        item = _META_BYTES[fields["ElementType"]] * int(fields.get("ElementNumberOfChannels", "1"))
    except (KeyError, ValueError):
        return
    source = fields["ElementDataFile"]
    if fields.get("BinaryData", "True").lower() != "true":
        return   # numbers as text: no byte count to check
    if source == "LOCAL":
        have = p.stat().st_size - start
    elif len(source.split()) == 1 and (p.parent / source).is_file():
        start, have = 0, (p.parent / source).stat().st_size
    else:
        return
    compressed = fields.get("CompressedData", "False").lower() == "true"
    if compressed:
        if "CompressedDataSize" not in fields:
            return
        need = int(fields["CompressedDataSize"])
    else:
        need = int(np.prod(dims, dtype=np.int64)) * item
    if have < need:
        raise InputError(f"{p}: the file is cut off — its header announces {need} bytes of "
                         f"{'compressed ' if compressed else ''}image data, it holds {have}; copy or export it again")


def _float_or_nan(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


@dataclass
class NiftiHeader:
    """What the engine checks in a NIfTI-1/-2 header (values as stored, in the header's units):
    ``dims`` the size, ``pixdim`` the voxel size along the first three axes, ``srow`` the sform
    (3 x 4, RAS), ``quatern`` (b, c, d) and ``qfac`` the qform's rotation, ``nonfinite`` the
    NaN / inf voxels counted in float data (None when not counted)."""
    dims: tuple
    datatype: int
    pixdim: tuple
    qfac: float
    xyzt_units: int
    qform_code: int
    sform_code: int
    quatern: tuple
    srow: np.ndarray
    nonfinite: int | None = None

    @property
    def units(self) -> str:
        return {1: "m", 2: "mm", 3: "µm"}.get(self.xyzt_units & 7, "mm")   # unknown: mm, as ITK reads it


# NIfTI datatypes that can hold NaN / inf, as numpy reads them (complex and 128-bit types ITK
# refuses or reads as vectors, which are refused as such)
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def _parse_nifti_header(head: bytes, end: str, n: int) -> tuple[NiftiHeader, int]:
    """The header of a NIfTI-1 (``n`` 348) or NIfTI-2 (540) file in byte order ``end``, and its bitpix."""
    import struct

    def get(fmt, at):
        return struct.unpack_from(end + fmt, head, at)

    if n == 348:
        dims, (datatype, bitpix), pixdim = get("8h", 40), get("2h", 70), get("8f", 76)
        units, (qcode, scode) = head[123], get("2h", 252)
        quatern, srow = get("3f", 256), get("12f", 280)
    else:
        (datatype, bitpix), dims, pixdim = get("2h", 12), get("8q", 16), get("8d", 104)
        (qcode, scode), quatern, srow = get("2i", 344), get("3d", 352), get("12d", 400)
        units = get("i", 500)[0]
    nd = int(dims[0])
    return NiftiHeader(dims=tuple(int(d) for d in dims[1:nd + 1]) if 1 <= nd <= 7 else (), datatype=datatype,
                       pixdim=tuple(float(v) for v in pixdim[1:4]), qfac=-1.0 if pixdim[0] < 0 else 1.0,
                       xyzt_units=int(units), qform_code=int(qcode), sform_code=int(scode),
                       quatern=tuple(map(float, quatern)), srow=np.asarray(srow, float).reshape(3, 4)), bitpix


def check_nifti_complete(p: Path, count_nonfinite: bool = False) -> NiftiHeader | None:
    """Refuse a NIfTI-1/-2 file (``.nii`` or ``.nii.gz``) that holds fewer voxel bytes than its
    header announces: a cut-off download or copy. A ``.nii.gz`` is decompressed once to count
    (about a second for a 300-slice CT); a gzip stream that ends early is refused as well.
    Returns the header (None when it is not one this reads); with ``count_nonfinite`` the NaN /
    inf voxels of float data are counted in the same pass (ITK reads them as 0)."""
    import gzip
    import struct
    import zlib

    opener = gzip.open if p.name.lower().endswith(".gz") else open
    try:
        with opener(p, "rb") as f:
            head = f.read(540)
            if len(head) < 348:
                raise InputError(f"{p}: too short for a NIfTI header ({len(head)} bytes); the file is "
                                 "cut off or not NIfTI — copy or export it again")
            for end in "<>":
                n = struct.unpack(end + "i", head[:4])[0]
                if n in (348, 540):
                    break
            else:
                return None   # not a NIfTI header we know: let the reader decide
            if len(head) < n:
                raise InputError(f"{p}: too short for a NIfTI-2 header ({len(head)} bytes); the file is "
                                 "cut off — copy or export it again")
            header, bitpix = _parse_nifti_header(head, end, n)
            offset = int(struct.unpack_from(end + ("f" if n == 348 else "q"), head, 108 if n == 348 else 168)[0])
            if not header.dims or bitpix <= 0 or any(d < 1 for d in header.dims):
                return header
            start = max(offset, n)
            data_bytes = int(np.prod(header.dims, dtype=np.int64)) * bitpix // 8
            need = start + data_bytes
            dtype = _NIFTI_FLOATS.get(header.datatype) if count_nonfinite else None
            if dtype is not None and np.dtype(dtype).itemsize * 8 != bitpix:
                dtype = None   # an inconsistent header: ITK decides what it reads
            counter = _NonFiniteCounter(end + dtype, start, data_bytes) if dtype else None
            have = len(head)
            if counter:
                counter.feed(head, 0)
            while chunk := f.read(1 << 22):
                if counter:
                    counter.feed(chunk, have)
                have += len(chunk)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise InputError(f"{p}: the compressed data end early or are damaged ({e}); the file is cut off "
                         "or corrupt — copy or export it again") from None
    except OSError as e:
        raise InputError(f"cannot read {p}: {e.strerror or e}") from None
    if have < need:
        raise InputError(f"{p}: the file is cut off — its header announces {need} bytes of image data "
                         f"and header, it holds {have}; copy or export it again")
    if counter:
        header.nonfinite = counter.count
    return header


class _NonFiniteCounter:
    """Counts NaN / inf values of ``dtype`` in the bytes [start, start + size) of a stream fed
    in chunks (each with its position), without holding more than one chunk."""

    def __init__(self, dtype: str, start: int, size: int):
        self.dtype, self.start, self.stop = np.dtype(dtype), start, start + size
        self.rest = b""
        self.count = 0

    def feed(self, chunk: bytes, at: int) -> None:
        lo, hi = max(self.start - at, 0), min(self.stop - at, len(chunk))
        if hi <= lo:
            return
        data = self.rest + chunk[lo:hi] if self.rest else memoryview(chunk)[lo:hi]
        whole = len(data) - len(data) % self.dtype.itemsize
        values = np.frombuffer(data, self.dtype, count=whole // self.dtype.itemsize)
        self.count += int(values.size - np.count_nonzero(np.isfinite(values)))
        self.rest = bytes(data[whole:])


def nonfinite_message(source: str, n: int) -> str:
    return (f"{source}: {n} {'voxel is' if n == 1 else 'voxels are'} NaN or infinite; fix or mask them before "
            "segmenting (they have no Hounsfield value)")


_AXES = ("the first voxel axis (i, pixdim[1])", "the second voxel axis (j, pixdim[2])",
         "the third voxel axis (k, pixdim[3])")


def _sform_spacing(h: NiftiHeader) -> np.ndarray:
    return np.linalg.norm(h.srow[:, :3], axis=0)


def nifti_ct_problems(h: NiftiHeader, p: Path) -> None:
    """InputError for what ITK would read from a NIfTI CT without a word but wrongly: NaN / inf
    voxels (read as 0 HU), a voxel size of 0, below 0 or not a number (read as 1 mm, or
    as a flip) and an sform whose voxel size is not pixdim's (ITK and Slicer measure with
    pixdim, nibabel and FSL with the sform: the volumes depend on the reader)."""
    if h.nonfinite:
        raise InputError(nonfinite_message(str(p), h.nonfinite))
    n_axes = min(3, len(h.dims))
    unit = h.units
    for i in range(n_axes):
        v = h.pixdim[i]
        if not (np.isfinite(v) and v > 0):
            hint = ""
            if h.sform_code > 0:
                s = float(_sform_spacing(h)[i])
                hint = f" (the sform says {s:.4g} {unit})" if np.isfinite(s) and s > 0 else ""
            read = ("ITK reads it as 1 mm, and every volume would be wrong" if v == 0 or not np.isfinite(v)
                    else "readers disagree on what it means (ITK flips the axis, others take its size)")
            raise InputError(f"{p}: the header's voxel size along {_AXES[i]} is {v:g}{hint}; {read} — fix the "
                             "header with the true spacing (e.g. nibabel header.set_zooms, or export the CT again "
                             "from its DICOM)")
    if h.sform_code > 0 and n_axes == 3:
        pix = np.asarray(h.pixdim)
        srow = _sform_spacing(h)
        off = np.abs(srow - pix) > np.maximum(1e-3, 1e-3 * pix)   # ITK warns above 1e-3
        if not np.all(np.isfinite(srow)) or off.any():
            fmt = lambda v: " x ".join(f"{x:.4g}" for x in v)   # noqa: E731
            # the sform's voxel volume is |det|, not the product of its column lengths (a sheared sform)
            ratio = (float(abs(np.linalg.det(h.srow[:, :3])) / np.prod(pix))
                     if np.all(np.isfinite(h.srow)) and np.all(pix > 0) else float("nan"))
            if np.isfinite(ratio) and abs(ratio - 1) < 1e-3:
                what = ("the sform's axes are sheared (not at right angles: a gantry tilt left in the header?), "
                        "so voxel positions would depend on the reader (the voxel volume is the same)")
            else:
                what = ("so volumes would depend on the reader"
                        + (f" (the sform's are {ratio:.3g}x pixdim's)" if np.isfinite(ratio) else ""))
            raise InputError(f"{p}: the header holds two voxel sizes: pixdim {fmt(pix)} {unit}, the sform "
                             f"(sform_code {h.sform_code}) {fmt(srow)} {unit}; ITK and Slicer measure with "
                             f"pixdim, nibabel and FSL with the sform: {what} — fix the header so that both "
                             "give the true spacing (or set sform_code 0 when pixdim and the qform are right)")


def _qform_matrix(h: NiftiHeader) -> np.ndarray:
    """The qform's rotation (3 x 3, RAS, columns the voxel axes), from its quaternion."""
    b, c, d = h.quatern
    a = 1.0 - (b * b + c * c + d * d)
    a = np.sqrt(a) if a > 1e-7 else 0.0
    if a == 0.0:   # as nifti_quatern_to_mat44: a 180° rotation, renormalised
        norm = np.sqrt(b * b + c * c + d * d) or 1.0
        b, c, d = b / norm, c / norm, d / norm
    r = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                  [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                  [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])
    r[:, 2] *= h.qfac
    return r


def _orientation(ras_axes: np.ndarray) -> str:
    lps = ras_axes * np.array([[-1.0], [-1.0], [1.0]])
    lps = lps / np.linalg.norm(lps, axis=0)
    return sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(tuple(lps.ravel()))


def nifti_orientation_note(h: NiftiHeader, img: sitk.Image) -> str | None:
    """A note when the header's qform and sform (both set) give the voxel axes other
    orientations (e.g. one flips left and right): which one the 3D image ``img`` was read with."""
    if h.qform_code <= 0 or h.sform_code <= 0 or img.GetDimension() != 3:
        return None
    srow = h.srow[:, :3]
    if not np.all(np.isfinite(srow)) or np.any(np.linalg.norm(srow, axis=0) == 0):
        return None
    q, s = _orientation(_qform_matrix(h)), _orientation(srow)
    if q == s:
        return None
    read = sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(img.GetDirection())
    used = "the sform's" if read == s else "the qform's" if read == q else "neither's"

    def left_right(code):   # which voxel axis runs along left-right, and which way
        return next(((i, c) for i, c in enumerate(code) if c in "LR"), None)

    sides = "; they swap right and left" if left_right(q) != left_right(s) else ""
    return (f"the NIfTI header's qform and sform disagree on the orientation (qform {q}, sform {s}{sides}): read "
            f"with {used} ({read}), as ITK and Slicer read the file"
            + ("" if read == s else f", while nibabel and FSL take the sform's ({s})")
            + "; check the right and left lung in the overlay, and fix the header")


@contextlib.contextmanager
def _quiet_itk():
    """ITK prints warnings (e.g. GDCM's on a folder without DICOM) straight to the terminal;
    the engine reports problems itself."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _single_dicom_slice_spacing(img: sitk.Image, p: Path) -> sitk.Image:
    """A one-slice DICOM file read by ITK has 1 mm between slices; volumes need the slice's own
    thickness (SliceThickness, else SpacingBetweenSlices) instead."""
    if img.GetDimension() != 3 or img.GetSize()[2] != 1:
        return img
    try:
        import pydicom
        ds = pydicom.dcmread(str(p), stop_before_pixels=True, force=True)
        step = float(ds.get("SliceThickness", None) or ds.get("SpacingBetweenSlices", None) or 0)
    except Exception:   # no usable tag: ITK's value stays
        return img
    if step > 0:
        img.SetSpacing(tuple(img.GetSpacing()[:2]) + (step,))
    return img


def _series_of_file(p: Path) -> list:
    """The files of the DICOM series ``p`` belongs to, in its folder (``[p]`` when it has no
    series UID or is alone)."""
    try:
        import pydicom
        uid = str(pydicom.dcmread(str(p), stop_before_pixels=True, force=True).get("SeriesInstanceUID", "")).strip()
    except Exception:
        return [str(p)]
    if not uid:
        return [str(p)]
    with _quiet_itk():
        try:
            names = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(p.parent), uid))
        except RuntimeError:
            return [str(p)]
    same = [n for n in names if os.path.exists(n) and os.path.samefile(n, p)]
    return names if same else [str(p)]


def _read_dicom_folder(folder: Path) -> tuple[sitk.Image, dict]:
    names, info = dicom_series_choice(folder)
    return _read_dicom_series(names, info["dicom"]), info


def _read_dicom_series(names: list, best: dict) -> sitk.Image:
    """The files of one series as a volume (``best``: what names it in messages), refused
    when its slices are not evenly spaced."""
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")   # also files without a DICOM name or preamble, which GDCM found
    reader.SetFileNames(names)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        with _quiet_itk():   # ITK's "non uniform sampling" warning: checked and reported below
            img = reader.Execute()
    except RuntimeError as e:
        raise InputError(f"cannot read DICOM series {best['series_uid']} in {best['folder']}: "
                         f"{str(e).strip().splitlines()[-1][:200]}") from None
    if len(names) == 1:
        img = _single_dicom_slice_spacing(img, Path(names[0]))
    positions = _slice_positions(reader, img)
    problem = slice_spacing_problem(reader, img, positions)
    if problem:
        raise InputError(f"DICOM series {best.get('description') or best['series_uid']} in {best['folder']}: "
                         f"{problem}; volumes and positions would be wrong — export the complete series again")
    img, tilt = untilted(img, positions)
    if tilt:
        best["gantry_tilt_note"] = tilt
    return img


def _slice_positions(reader: sitk.ImageSeriesReader, img: sitk.Image):
    """ImagePositionPatient of each slice a series reader read, (n, 3), or None."""
    n = img.GetDepth() if img.GetDimension() == 3 else 0
    try:
        positions = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")]
                              for i in range(n)])
    except (RuntimeError, ValueError):   # no ImagePositionPatient: nothing to check against
        return None
    return positions if n and positions.shape == (n, 3) else None


def untilted(img: sitk.Image, positions) -> tuple[sitk.Image, str | None]:
    """A gantry-tilted series in its true geometry, and a note saying so; else ``(img, None)``.

    With a tilted gantry each slice is shifted in its own plane from the one before; ITK
    stacks the slices straight and spaces them by the distance between their positions, so
    the volume is sheared and every volume is 1/cos(tilt) too large. As dcm2niix does, each
    slice is shifted back into place (linear interpolation in the plane) and the slices are
    spaced by their step along the slice normal. Shifts under half a pixel over the whole
    series are left alone."""
    n = img.GetDepth() if img.GetDimension() == 3 else 0
    if positions is None or n < 2:
        return img, None
    direction = np.asarray(img.GetDirection(), float).reshape(3, 3)
    step = (positions[-1] - positions[0]) / (n - 1)
    along = float(step @ direction[:, 2])
    across = step - along * direction[:, 2]
    sx, sy, sz = img.GetSpacing()
    if along <= 0 or np.linalg.norm(across) * (n - 1) < 0.5 * min(sx, sy):
        return img, None
    tilt = float(np.degrees(np.arctan2(np.linalg.norm(across), along)))
    as_read = direction @ np.diag([sx, sy, sz])                       # index -> ITK's placement
    true = np.column_stack([direction[:, 0] * sx, direction[:, 1] * sy, step])   # index -> the scanner's
    shear = sitk.AffineTransform(3)
    shear.SetMatrix((as_read @ np.linalg.inv(true)).ravel().tolist())
    shear.SetCenter(img.GetOrigin())
    ref = sitk.Image(img.GetSize(), sitk.sitkFloat32)
    ref.SetDirection(img.GetDirection())
    ref.SetOrigin(img.GetOrigin())
    ref.SetSpacing((sx, sy, along))
    arr_min = float(sitk.GetArrayViewFromImage(img).min())
    fill = -1024.0 if arr_min <= -1000 else arr_min   # outside the scanned field: air
    out = sitk.Resample(sitk.Cast(img, sitk.sitkFloat32), ref, shear, sitk.sitkLinear, fill)
    out.CopyInformation(ref)
    for key in img.GetMetaDataKeys():
        out.SetMetaData(key, img.GetMetaData(key))
    shift = float(np.linalg.norm(across) * (n - 1))
    return out, (f"gantry tilt of {tilt:.1f}°: the slices were shifted back into the scanner's geometry (up to "
                 f"{shift:.0f} mm) and spaced {along:.2f} mm along the slice normal, as dcm2niix reads such a "
                 f"series; a viewer that stacks them straight ({sz:.2f} mm apart) shows the outputs offset and "
                 f"{100 * (sz / along - 1):.1f} % larger volumes")


def slice_spacing_problem(reader: sitk.ImageSeriesReader, img: sitk.Image, positions=None) -> str | None:
    """Why the slices a series reader read are not evenly spaced along the slice normal — a
    gap of 1.5 steps or more (a missing or unreadable file) or of half a step or less (two
    acquisitions mixed, a duplicate) — or None. ITK would place them at the mean spacing and
    only warn. Smaller variation (positions rounded to 0.1 mm) is not a defect. ``positions``:
    the slices' :func:`_slice_positions`, when the caller has them."""
    n = img.GetDepth() if img.GetDimension() == 3 else 0
    if n < 3:
        return None
    normal = np.asarray(img.GetDirection(), float).reshape(3, 3)[:, 2]
    positions = _slice_positions(reader, img) if positions is None else positions
    if positions is None:
        return None
    gaps = np.diff(positions @ normal)
    step = float(np.median(np.abs(gaps)))
    bad = np.flatnonzero((np.abs(gaps) >= 1.5 * step) | (np.abs(gaps) <= 0.5 * step))
    if step <= 0 or not len(bad):
        return None if step > 0 else f"{n} slices at the same position"
    same = [int(k) for k in bad if abs(gaps[k]) < 0.01 * step]
    if same:   # a file copied under a second name, or two acquisitions with one series UID
        files = [os.path.basename(f) for f in reader.GetFileNames()]
        i = same[0]
        return (f"files {files[i]} and {files[i + 1]} are slices at the same position "
                f"({len(same)} such pair{'s' if len(same) > 1 else ''}: a duplicate file, or two acquisitions "
                "mixed?) — remove the duplicates")
    i = int(bad[0])
    return (f"the slices are not evenly spaced: {abs(gaps[i]):.2f} mm between slices {i + 1} and {i + 2} of {n}, "
            f"{step:.2f} mm elsewhere ({len(bad)} such gap{'s' if len(bad) > 1 else ''}: a slice missing or unreadable?)")


def dicom_series_choice(folder: Path) -> tuple[list[str], dict]:
    """The files of the series a DICOM folder is read as — the CT series with the most
    slices, searched in the folder and its subfolders — and what was found (``info``:
    ``dicom``, and ``dicom_series_found`` / ``dicom_series_note`` when there were several).
    InputError saying what to give instead when the folder holds no DICOM series."""
    series = []  # (n files, series uid, dir, files)
    with _quiet_itk():
        for d, _, files in os.walk(folder):
            for uid in (_gdcm_series_ids(d) if files else ()):
                names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(d, uid)
                if names:
                    series.append((len(names), uid, d, list(names)))
    if not series:
        volumes = sorted(str(Path(d, f).relative_to(folder)) for d, _, files in os.walk(folder) for f in files
                         if f.lower().endswith(VOLUME_SUFFIXES) and not is_engine_output(Path(d, f)))
        if volumes:
            raise InputError(f"{folder}: a folder is read as one DICOM series, and this one holds none but "
                             f"{len(volumes)} CT file(s) ({', '.join(volumes[:3])}{', ...' if len(volumes) > 3 else ''}); "
                             "give those files, or the folder that holds them, as the input")
        has_files = any(files for _, _, files in os.walk(folder))
        other = sorted(str(Path(d, f).relative_to(folder)) for d, _, files in os.walk(folder) for f in files
                       if f.lower().endswith(OTHER_IMAGE_SUFFIXES) and not f.startswith("."))
        what = ("nothing (empty folder)" if not has_files else "no DICOM series" if not other else
                f"no DICOM series, only {len(other)} file(s) of a format not read as a CT ({', '.join(other[:3])}"
                f"{', ...' if len(other) > 3 else ''}; an archive: unpack it first)")
        raise InputError(f"{folder}: found {what}; give a CT file (NIfTI/NRRD/MHA/DICOM) or a folder of DICOM files")
    described = []
    for n, uid, d, names in series:
        s = _dicom_summary([Path(names[0])], patient=True)
        s.update(series_uid=uid, n_files=n, folder=str(d))
        described.append(s)
    ct = [s for s in described if (s.get("modality") or "CT") == "CT"]
    if not ct:
        # no CT: series of another imaging modality are never read as one; what is left
        # (e.g. OT, a secondary capture, or no modality) is tried as CT
        ct = [s for s in described if s.get("modality") not in OTHER_MODALITIES]
        if not ct:
            _refuse_other_modality(described, folder)
    patients = sorted({s["patient_id"] for s in ct if s.get("patient_id")})
    if len(patients) > 1:   # one case is one patient: one's figures must not go out under another's name
        def place(pid):     # where, not who: the message may be kept in a batch report
            subs = sorted({os.path.relpath(s["folder"], folder) for s in ct if s.get("patient_id") == pid})
            return ", ".join("this folder" if d == "." else d for d in subs[:2]) + (", ..." if len(subs) > 2 else "")
        places = sorted({place(p) for p in patients})
        where = ("all in this folder" if places == ["this folder"] else
                 f"in {'; '.join(places[:4])}{'; ...' if len(places) > 4 else ''}")
        raise InputError(f"{folder}: holds the CT series of {len(patients)} patients (by PatientID; {where}), "
                         "and a folder is read as one patient's CT: give each patient's folder as the input, "
                         "or a folder with one subfolder per patient")
    most = max(s["n_files"] for s in ct)
    tied = sorted((s for s in ct if s["n_files"] == most), key=lambda s: (str(s["series_uid"]), s["folder"]))
    # a tie (one acquisition reconstructed twice, e.g. lung and soft-tissue kernels): the
    # lung reconstruction is what lesions are read on; otherwise the first by UID, said so
    lung = [s for s in tied if re.search(r"lung|lunge|pulm", f"{s.get('description') or ''} {s.get('kernel') or ''}",
                                         re.IGNORECASE)]
    best = (lung or tied)[0]
    pick = ("the CT series with the most slices" if len(tied) == 1 else
            f"of the {len(tied)} CT series with {most} slices, the lung reconstruction" if len(lung) == 1 else
            f"of the {len(tied)} CT series with {most} slices, {len(lung)} lung reconstructions, the first by "
            "series UID" if lung else
            f"of the {len(tied)} CT series with {most} slices, the first by series UID (no lung kernel or "
            "description to choose by: move the others' files to folders of their own to segment them)")
    names = next(x[3] for x in series if x[1] == best["series_uid"] and x[2] == best["folder"])
    info = {"dicom": {k: v for k, v in best.items() if k != "patient_id"}}
    if len(described) > 1:
        info["dicom_series_found"] = [{k: s.get(k) for k in ("series_uid", "modality", "n_files", "description")}
                                      for s in described]
        def where(s):   # the series not read, so the user can find it: its name or UID, and subfolder
            name = repr(s["description"]) if s.get("description") else f"{s.get('modality') or ''} series {s['series_uid']}"
            sub = os.path.relpath(s["folder"], folder)
            return f"{s['n_files']} files ({name.strip()}){'' if sub == '.' else ' in ' + sub}"
        others = [where(s) for s in described if s is not best]
        info["dicom_series_note"] = (f"{len(described)} series found; read {pick} ({best['n_files']} files, "
                                     f"{best.get('description') or best['series_uid']}); "
                                     f"not read: {'; '.join(others[:3])}{'; ...' if len(others) > 3 else ''}")
    return list(names), info


def _gdcm_series_ids(d) -> tuple:
    """The UIDs of the DICOM series GDCM finds in the folder ``d`` itself (call under
    :func:`_quiet_itk`)."""
    try:
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(d)))
    except RuntimeError:
        return ()


def holds_dicom_series(folder: Path) -> bool:
    """Some DICOM series GDCM reads in ``folder`` or below, also of files without a DICOM
    name or preamble, which :func:`is_dicom_file` does not know; hidden folders do not count."""
    with _quiet_itk():
        for d, dirs, files in os.walk(folder):
            dirs[:] = [x for x in dirs if not x.startswith(".")]
            if any(not f.startswith(".") for f in files) and _gdcm_series_ids(d):
                return True
    return False


# modalities that are images but not CT: segmenting them as CT would give figures of nothing
OTHER_MODALITIES = {"MR": "magnetic resonance", "PT": "PET", "NM": "nuclear medicine", "US": "ultrasound", "CR": "radiograph",
                    "DX": "radiograph", "MG": "mammogram", "XA": "angiogram", "RF": "fluoroscopy", "SEG": "segmentation",
                    "RTSTRUCT": "RT structure set", "SR": "structured report"}


def _refuse_other_modality(described: list, where) -> None:
    """InputError when the DICOM read is of another modality than CT (say which), else nothing."""
    other = sorted({s.get("modality") for s in described if s.get("modality") in OTHER_MODALITIES})
    if other and len(other) == len({s.get("modality") for s in described}):
        kinds = ", ".join(f"{m} ({OTHER_MODALITIES[m]})" for m in other)
        raise InputError(f"{where}: the DICOM {'series is' if len(described) == 1 else 'series are'} {kinds}, not "
                         "CT: SSA-Net segments chest CT; give the CT series")


def _dicom_summary(files, patient: bool = False) -> dict:
    """Modality, series description and UID of the first file (and, with ``patient``, its
    PatientID, for the one-patient check only: it is not written into any output)."""
    try:
        import pydicom
        ds = pydicom.dcmread(str(files[0]), stop_before_pixels=True, force=True)
    except Exception:  # the summary is informative only; SimpleITK does the reading
        return {}
    kernel = ds.get("ConvolutionKernel", "")
    kernel = "\\".join(map(str, kernel)) if isinstance(kernel, (list, tuple)) or type(kernel).__name__ == "MultiValue" \
        else str(kernel)
    return {"modality": str(ds.get("Modality", "")) or None,
            "description": str(ds.get("SeriesDescription", "")) or None,
            **({"kernel": kernel} if kernel else {}),
            "series_uid": str(ds.get("SeriesInstanceUID", "")) or None,
            **({"patient_id": str(ds.get("PatientID", "")).strip() or None} if patient else {})}


# -------------------------------------------------------------------------- validate

# no human chest CT comes near these (a wide-bore scanner's field of view is about 700 mm, a
# whole-body scan about 2 m long, thick slices 10 mm): beyond them the header's spacing or
# units are wrong (a NIfTI in metres reads as 750 mm voxels), and the model's grid would
# need hundreds of GiB
MAX_INPLANE_EXTENT_MM = 1000.0
MAX_EXTENT_MM = 3000.0
MAX_VOXEL_MM = 50.0


def extent_problem(img: sitk.Image) -> str | None:
    """Why the physical size of the 3D ``img`` is impossible for a human chest, or None."""
    size, sp = img.GetSize(), img.GetSpacing()
    d = np.abs(np.asarray(img.GetDirection(), float).reshape(3, 3))
    extent = [n * s for n, s in zip(size, sp)]
    inplane = [extent[int(np.argmax(d[row]))] for row in (0, 1)]
    why = (f"a voxel size of {max(sp):.4g} mm" if max(sp) > MAX_VOXEL_MM else
           f"an axial extent of {inplane[0]:.0f} x {inplane[1]:.0f} mm" if max(inplane) > MAX_INPLANE_EXTENT_MM else
           f"an extent of {max(extent):.0f} mm" if max(extent) > MAX_EXTENT_MM else None)
    if why is None:
        return None
    return (f"{why} ({' x '.join(str(n) for n in size)} voxels of {' x '.join(f'{s:.4g}' for s in sp)} mm): no "
            "chest is that size — check the voxel spacing / units in the header (a NIfTI's xyzt_units in "
            "metres instead of mm?)")


def validate_ct(img: sitk.Image, source: str = "input") -> sitk.Image:
    """Check that ``img`` is a scalar 3D CT in HU; return it as float32.

    A single axial slice stored as a 3D image (one DICOM file, a one-slice NIfTI) is
    accepted; a 2D image is not, because it carries no slice geometry.
    """
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{source}: vector/colour image with {img.GetNumberOfComponentsPerPixel()} "
                         "components per voxel; a scalar CT in Hounsfield units is needed")
    dim = img.GetDimension()
    if dim == 2:
        raise InputError(f"{source}: 2D image {img.GetSize()}; a CT volume is needed (a single slice "
                         "works when stored as DICOM or as a 3D file with one slice)")
    if dim == 4:
        size = img.GetSize()
        if size[3] != 1:
            raise InputError(f"{source}: 4D image {size} (a time series or several volumes); "
                             "give one 3D CT volume")
        img = sitk.Extract(img, size[:3] + (0,), (0, 0, 0, 0))
    elif dim != 3:
        raise InputError(f"{source}: {dim}D image; a 3D CT volume is needed")
    size = img.GetSize()
    # in-plane = the voxel axes closest to patient left-right and anterior-posterior
    d = np.abs(np.asarray(img.GetDirection(), float).reshape(3, 3))
    axial = [size[int(np.argmax(d[row]))] for row in (0, 1)]
    if min(axial) < MIN_INPLANE_PX:
        raise InputError(f"{source}: image too small ({axial[0]}x{axial[1]} pixels in the axial plane); at "
                         f"least {MIN_INPLANE_PX}x{MIN_INPLANE_PX} are needed")
    problem = extent_problem(img)
    if problem:
        raise InputError(f"{source}: {problem}")
    if img.GetPixelID() != sitk.sitkFloat32:
        img = sitk.Cast(img, sitk.sitkFloat32)
    arr = sitk.GetArrayViewFromImage(img)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise InputError(nonfinite_message(source, int(bad.sum())))
    problem = hu_problem(arr)
    if problem:
        raise InputError(f"{source} {problem}")
    return img


# ----------------------------------------------------------- labelmaps / lung masks

def read_labelmap(path: str | os.PathLike, reference: sitk.Image, what: str = "labelmap") -> np.ndarray:
    """A label image file (any SimpleITK format) as an integer array (z, y, x) on
    ``reference``'s grid (:func:`on_ct_grid`: the same grid, or a crop of it)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} not found: {p}")
    img = _read_file(p)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{p}: {what} must be a scalar label image")
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = sitk.Extract(img, img.GetSize()[:3] + (0,), (0, 0, 0, 0))
    if img.GetDimension() != 3:
        raise InputError(f"{p}: {what} must be 3D like the CT, got {img.GetDimension()}D")
    values = np.unique(sitk.GetArrayViewFromImage(img))
    fractional = values[values != np.round(values)]
    if fractional.size:   # truncating 0.6 to 0 and 1.7 to 1 would lose or swap classes silently
        raise InputError(f"{p}: values that are not whole numbers ({', '.join(f'{v:g}' for v in fractional[:3])}"
                         f"{', ...' if fractional.size > 3 else ''}) in the {what}: labels are integers — was it "
                         "resampled with linear interpolation? Resample labels with nearest neighbour")
    if values.size and (values[0] < 0 or values[-1] > 65535):
        odd = [int(v) for v in values if v < 0 or v > 65535]
        raise InputError(f"{p}: values {odd[:3]}{' ...' if len(odd) > 3 else ''} in the {what} are no labels (0 "
                         "background, small positive integers the classes)"
                         + (f"; is this the CT rather than the {what}?" if values[0] < -100 else ""))
    return sitk.GetArrayFromImage(on_ct_grid(sitk.Cast(img, sitk.sitkUInt16), reference, p, what))


# segment roles by terminology type code (the codes of .terminology) and by the IDs the
# engine writes (Slicer keeps a segment's ID when the user renames it)
_ROLE_BY_CODE = {"1217294009": "ggo", "9656002": "consolidation", "52988006": "infection"}
_ROLE_BY_ID = {"ground_glass_opacity": "ggo", "consolidation": "consolidation", "infection": "infection",
               "right_lung": "right_lung", "left_lung": "left_lung"}


def segment_role(segment: dict) -> str | None:
    """What a ``.seg.nrrd`` segment (a ``slicerio`` record) is: "ggo", "consolidation",
    "infection", "right_lung", "left_lung", "lung" (no side) or None — by its terminology
    (SNOMED CT type and laterality), else its ID, else its name."""
    term = segment.get("terminology") or {}

    def code_of(field):   # [scheme, code, meaning]; Slicer writes an empty entry as "" (no fields)
        value = term.get(field) or []
        return value[1] if len(value) > 1 and value[1] else None

    code = code_of("type")
    if code == "39607008":   # Lung, with or without laterality
        side = code_of("typeModifier")
        return {"24028007": "right_lung", "7771000": "left_lung"}.get(side, "lung")
    if code in _ROLE_BY_CODE:
        return _ROLE_BY_CODE[code]
    role = _ROLE_BY_ID.get(str(segment.get("id", "")).lower())
    if role:
        return role
    name = str(segment.get("name", "")).lower()
    if "ground" in name or re.search(r"\bggo\b", name):
        return "ggo"
    if "consolidation" in name:
        return "consolidation"
    if name in ("infection", "lesion", "lesions"):
        return "infection"
    words = set(re.findall(r"[a-z]+", name))
    if words and words <= {"lung", "lungs", "right", "left", "both"} and words & {"lung", "lungs"}:
        return "right_lung" if words & {"right"} and not words & {"left"} else \
            "left_lung" if words & {"left"} and not words & {"right"} else "lung"
    return None   # e.g. "Lung nodule": named in a note by the readers, not guessed


@contextlib.contextmanager
def _empty_terminology_tolerated():
    """slicerio (1.4) fails on ``TerminologyEntry:|``, which Slicer writes for a segment
    without terminology (one added by a script or an older extension): such an entry reads
    as no terminology, and the segment is known by its ID or name instead."""
    import slicerio.segmentation as reader

    original = reader.terminology_entry_from_string

    def tolerant(text):
        items = text.split("~")
        return original("~".join(items + [""] * (7 - len(items)))) if len(items) >= 3 else {}

    reader.terminology_entry_from_string = tolerant
    try:
        yield
    finally:
        reader.terminology_entry_from_string = original


def read_segments(path: str | os.PathLike, reference: sitk.Image, what: str = "segmentation") -> list:
    """A Slicer ``.seg.nrrd`` as [(segment name, role (:func:`segment_role`), bool mask (z, y, x)
    on ``reference``'s grid)]. Segments may overlap (they live in different layers), hence one
    mask each."""
    import slicerio

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} not found: {p}")
    try:
        with _empty_terminology_tolerated():
            seg = slicerio.read_segmentation(str(p))
    except Exception as e:
        raise InputError(f"cannot read segmentation {p}: {e}") from None
    voxels = np.asarray(seg["voxels"])  # (i, j, k), or (layer, i, j, k) with several layers
    if voxels.ndim == 3:
        voxels = voxels[None]
    ijk_to_lps = np.asarray(seg["ijkToLPS"], float)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    out = []
    for k, s in enumerate(seg.get("segments", []), start=1):
        mask = voxels[int(s.get("layer", 0))] == int(s["labelValue"])
        img = sitk.GetImageFromArray(np.ascontiguousarray(mask.transpose(2, 1, 0)).astype(np.uint8))
        img.SetSpacing(tuple(float(v) for v in spacing))
        img.SetDirection(tuple((ijk_to_lps[:3, :3] / spacing).ravel()))
        img.SetOrigin(tuple(float(v) for v in ijk_to_lps[:3, 3]))
        out.append((s.get("name") or f"Segment_{k}", segment_role(s),
                    sitk.GetArrayFromImage(on_ct_grid(img, reference, p, what)) > 0))
    if not out:
        raise InputError(f"{p}: the segmentation has no segments")
    return out


@dataclass
class ResultLabels:
    """A (corrected) result read back: ``lesions`` uint8 (z, y, x) 0 / 1 GGO / 2 consolidation
    (``binary``: 1 infection); ``lungs`` uint8 1 right / 2 left, or None when the file has no
    lung segments (and for a labelmap); ``ignored``: names of segments that are none of these;
    ``notes``: what the reader decided that the user should hear (segments not used,
    overlapping lesion classes)."""
    lesions: np.ndarray
    lungs: np.ndarray | None
    binary: bool
    ignored: list
    notes: list = field(default_factory=list)


def result_labels_from_segments(segs, reference: sitk.Image) -> ResultLabels:
    """One rule for turning segments — [(name, role, bool mask (z, y, x))], as
    :func:`read_segments` reads a ``.seg.nrrd`` and the Slicer module reads a segmentation
    node — into a result: every segment of a class counts (their union); where GGO and
    consolidation overlap the voxel is consolidation, whatever the segments' order (the denser
    finding; a GGO painted under it is its halo), and the overlap is said."""
    from .lungstep import LUNG_ROLES, lungs_from_segments   # lungstep reads files through this module

    roles = {role for _, role, _ in segs}
    binary = "infection" in roles and not ({"ggo", "consolidation"} & roles)
    shape = reference.GetSize()[::-1]

    def union(role):
        return np.logical_or.reduce([m for _, r, m in segs if r == role] or [np.zeros(shape, bool)])

    lab = np.zeros(shape, np.uint8)
    notes = []
    if binary:
        lab[union("infection")] = 1
        value = {"infection"}
    else:
        ggo, consolidation = union("ggo"), union("consolidation")
        lab[ggo] = 1
        lab[consolidation] = 2
        both = int(np.count_nonzero(ggo & consolidation))
        if both:
            ml = both * float(np.prod(reference.GetSpacing())) / 1000.0
            notes.append(f"GGO and consolidation segments overlap in {both} voxels ({ml:.1f} mL): counted as "
                         "consolidation")
        value = {"ggo", "consolidation"}
        missing = [name for role, name in (("ggo", "GGO"), ("consolidation", "consolidation")) if role not in roles]
        if len(missing) == 1:   # segment and Slicer write both, empty or not: deleted (or renamed past recognition)
            notes.append(f"no {missing[0]} segment: counted as 0 mL (deleted? A segment renamed is still "
                         "recognised by its terminology or ID; add one back to count it)")
    ignored = [n for n, role, _ in segs if role not in value and role not in LUNG_ROLES]
    unknown = [n for n, role, _ in segs if role is None]
    if unknown:
        notes.append(f"segments not used (not GGO, consolidation, infection or a lung by terminology, ID or name): "
                     f"{', '.join(unknown)}")
    infection = [n for n, role, _ in segs if role == "infection" and not binary]
    if infection:
        notes.append(f"infection segment(s) {', '.join(infection)} not used: the segmentation has GGO / consolidation "
                     "segments, whose figures are these (paint them as GGO or consolidation to count them)")
    return ResultLabels(lab, lungs_from_segments(segs, reference), binary, ignored, notes)


def read_result_labels(path: str | os.PathLike, reference: sitk.Image, classes: str = "multiclass") -> ResultLabels:
    """A result on ``reference``'s grid from a ``.seg.nrrd`` (segments recognised by
    terminology, ID or name: :func:`segment_role`; combined by :func:`result_labels_from_segments`)
    or a labelmap file (``classes``: "multiclass" = 1 GGO, 2 consolidation; "binary" = 1 infection)."""
    if str(path).lower().endswith(".seg.nrrd"):
        return result_labels_from_segments(read_segments(path, reference, what="labels"), reference)
    lungs_of = lung_labelmap_run_name(path)
    if lungs_of:   # 1 right / 2 left lung would be read as 1 GGO / 2 consolidation
        raise InputError(f"{path}: this is segment's lung labelmap of '{lungs_of}' (1 right, 2 left lung), not its "
                         f"lesions: give {lungs_of}{OPTIONAL_OUTPUT_SUFFIXES['lesion_labelmap']} or {lungs_of}.seg.nrrd "
                         "as --labels (this file can be the --lung-mask)")
    lab = read_labelmap(path, reference, what="labels")
    binary = classes == "binary"
    allowed = (0, 1) if binary else (0, 1, 2)
    extra = sorted(int(v) for v in np.unique(lab) if v not in allowed)
    if extra:
        expected = "0 background, 1 infection" if binary else "0 background, 1 GGO, 2 consolidation"
        raise InputError(f"{path}: label values {extra[:5]}{' ...' if len(extra) > 5 else ''} are not "
                         f"classes of --classes {classes} ({expected})"
                         + ("; a 0/1/2 map is --classes multiclass" if binary and extra == [2]
                            else "; it holds more classes than the lesions (a labelmap exported from all segments, "
                                 "the lungs included?): give the .seg.nrrd instead, or a labelmap of the lesion "
                                 "segments alone" if extra[-1] <= 20
                            else "; is this the labelmap (not the CT), with 0/1/2 values?"))
    return ResultLabels(lab.astype(np.uint8), None, binary, [])


def result_case_name(labels_path, ct_path) -> str:
    """The case name for figures or a training case made from ``labels_path``: the name
    ``segment`` gave it when the labels are one of its outputs (``<name>.seg.nrrd`` or
    ``<name>_lesions.nii.gz`` with ``<name>_stats.json`` beside it; a folder of patients
    names each after its folder), else the CT's name."""
    return labels_run_name(labels_path) or case_name(ct_path)


def _run_name(path, suffixes) -> str | None:
    """The case name when ``path`` is ``<name><suffix>`` for one of ``suffixes`` with
    ``segment``'s ``<name>_stats.json`` beside it, else None."""
    p = Path(path)
    low = p.name.lower()
    for suffix in suffixes:
        if low.endswith(suffix):
            name = p.name[: -len(suffix)]
            if name and p.with_name(name + "_stats.json").is_file():
                return name
    return None


def labels_run_name(labels_path) -> str | None:
    """The case name when ``labels_path`` is one of ``segment``'s outputs (``<name>.seg.nrrd``
    or ``<name>_lesions.nii.gz`` with ``<name>_stats.json`` beside it), else None."""
    return _run_name(labels_path, (".seg.nrrd", OPTIONAL_OUTPUT_SUFFIXES["lesion_labelmap"]))


def lung_labelmap_run_name(path) -> str | None:
    """The case name when ``path`` is ``segment``'s lung labelmap (``<name>_lungs.nii.gz`` with
    ``<name>_stats.json`` beside it), else None."""
    return _run_name(path, (OPTIONAL_OUTPUT_SUFFIXES["lung_labelmap"],))


def _grid_text(img: sitk.Image) -> str:
    return (f"size {img.GetSize()}, spacing {tuple(round(v, 4) for v in img.GetSpacing())}, "
            f"origin {tuple(round(v, 2) for v in img.GetOrigin())}")


def on_lattice(img: sitk.Image, reference: sitk.Image, tol: float = 0.05) -> bool:
    """Every voxel centre of ``img`` is a voxel centre of ``reference``: the same voxels, maybe
    cropped, padded, flipped or with the axes in another order (another orientation of the
    same scan), so nearest-neighbour resampling copies the labels exactly."""
    if img.GetDimension() != 3 or reference.GetDimension() != 3:
        return False
    to_ref = np.linalg.inv(np.asarray(reference.GetDirection(), float).reshape(3, 3) * np.asarray(reference.GetSpacing()))
    step = to_ref @ (np.asarray(img.GetDirection(), float).reshape(3, 3) * np.asarray(img.GetSpacing()))
    offset = to_ref @ (np.asarray(img.GetOrigin(), float) - np.asarray(reference.GetOrigin(), float))
    # one voxel step of img is one voxel step of reference along one axis (a signed permutation) ...
    whole = np.round(step)
    if not (np.all(np.isin(whole, (-1, 0, 1))) and np.all(np.abs(whole).sum(axis=0) == 1)
            and np.all(np.abs(whole).sum(axis=1) == 1)):
        return False
    # ... and every voxel centre, out to the far corner, lies within tol of a reference one
    far = np.abs(step - whole) @ (np.asarray(img.GetSize(), float) - 1)
    return bool(np.all(np.abs(offset - np.round(offset)) + far < tol))


def on_ct_grid(img: sitk.Image, reference: sitk.Image, p: Path | str, what: str) -> sitk.Image:
    """``img`` on ``reference``'s grid: as it is when the grids are the same; copied voxel for
    voxel when its voxels are the CT's (:func:`on_lattice`: a crop, as Slicer saves
    segmentations, or another orientation of the same grid); anything else is refused, since
    resampling would silently move or lose labels."""
    if same_grid(img, reference):
        return img
    if not on_lattice(img, reference):
        has, is_ = ("have", "are") if what.endswith("s") else ("has", "is")   # "the labels have", "the labelmap has"
        if img.GetSize() == reference.GetSize():
            raise InputError(f"{p}: the {what} {has} the CT's size but another position or spacing ({_grid_text(img)}; "
                             f"CT {_grid_text(reference)}) — saved without the CT's geometry (e.g. from an array)? "
                             "Save it with the CT's header (SimpleITK: CopyInformation from the CT)")
        raise InputError(f"{p}: the {what} {is_} on another voxel grid than the CT ({_grid_text(img)}; CT "
                         f"{_grid_text(reference)}); resample it onto the CT first (nearest neighbour, the CT as "
                         "reference: Slicer's Resample Scalar/Vector/DWI Volume, or sitk.Resample)")
    had = int(np.count_nonzero(sitk.GetArrayViewFromImage(img)))
    img = sitk.Resample(img, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, img.GetPixelID())
    kept = int(np.count_nonzero(sitk.GetArrayViewFromImage(img)))
    if had and not kept:
        raise InputError(f"{p}: {what} and CT do not overlap (different grids, no common voxels)")
    if kept < had:
        raise InputError(f"{p}: {had - kept} of the {had} labelled voxels of the {what} lie outside the CT "
                         "(a labelmap of another, larger scan?)")
    return img


# ----------------------------------------------------------------------------- write

def check_writable(folder: str | os.PathLike, create: bool = True) -> Path:
    """Create ``folder`` if needed and prove it is writable (clear error otherwise).
    ``create=False`` checks the same before the inputs are validated, creating nothing: a
    missing folder then has to be creatable in the nearest folder above it that exists."""
    d = Path(folder)
    if d.exists() and not d.is_dir():
        raise InputError(f"output folder {d} is a file, not a folder; give a folder for the outputs")
    if not create:
        above = d.absolute()
        while not above.exists():
            above = above.parent
        if not above.is_dir():
            raise InputError(f"output folder {d} cannot be made: {above} is a file, not a folder")
        if not os.access(above, os.W_OK | os.X_OK):
            raise InputError(f"output folder {d} is not writable ({above} is not writable)")
        return d
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".ssalesionseg-write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"output folder {d} is not writable ({e.strerror or e})") from None
    return d


def temp_path_for(path: str | os.PathLike) -> Path:
    """A hidden temporary name beside ``path`` with the same suffixes (writers pick the
    format from the suffix)."""
    p = Path(path)
    name = p.name
    suffix = next((s for s in (".seg.nrrd",) + VOLUME_SUFFIXES if name.lower().endswith(s)), "".join(p.suffixes))
    return p.with_name(f".{name}.{uuid.uuid4().hex[:8]}.part{suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """``with atomic_path(p) as tmp: write(tmp)`` -> ``tmp`` is renamed to ``p`` on success
    and removed on any error."""
    p = Path(path)
    tmp = temp_path_for(p)
    try:
        yield tmp
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            with contextlib.suppress(OSError):
                tmp.unlink()


class NotPutInPlace(OSError):
    """A file written in full could not be renamed onto its target (open in another
    program, permissions changed): raised by :func:`replace_together` with the target as
    ``filename``, after the files that belong with it were removed."""


def replace_together(moves: dict, also_remove=()) -> None:
    """Rename each temporary file onto its target, in order (``moves``: {target: temporary}),
    for files that belong together (a case's outputs, a training case). If one rename fails,
    they no longer do: every target (and ``also_remove``) is removed, and
    :class:`NotPutInPlace` is raised with the target that failed as its ``filename``."""
    for target, temporary in moves.items():
        try:
            os.replace(temporary, target)
        except OSError as e:
            for p in list(moves) + list(also_remove):
                with contextlib.suppress(OSError):
                    Path(p).unlink()
            raise NotPutInPlace(e.errno, e.strerror, str(target)) from None


@contextlib.contextmanager
def written_together(targets: dict, also_remove=()):
    """``with written_together({key: path}) as tmp: write each tmp[key]`` -> on success the
    temporaries replace their targets in the dict's order (:func:`replace_together`); on any
    error, or after a failed rename, no temporary is left behind."""
    tmp = {k: temp_path_for(t) for k, t in targets.items()}
    try:
        yield tmp
        replace_together({Path(targets[k]): tmp[k] for k in targets}, also_remove)
    finally:
        for t in tmp.values():
            with contextlib.suppress(OSError):
                t.unlink()


def write_image(img: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), compress)
    return Path(path)
