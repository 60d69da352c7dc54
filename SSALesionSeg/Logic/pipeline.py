"""CT in -> lungs -> slice-wise SSA-Net -> lesion labelmap, statistics, files.

:func:`segment_image` is the one entry point used by the CLI, the Slicer module and the
tests; :func:`process_case` adds reading the input and writing the four outputs.

Lesion step, per slice with lung (see ``ssanet.preprocess`` for the model-input
contract): the CT is reoriented to LPS from its direction cosines so ``arr[z]`` is in the
model's canonical orientation; each slice is windowed exactly as in training, resampled
in-plane to the model's pixel spacing, cropped (or padded) to the model's field of view
around the lungs' centroid and resized to the network size; the lung mask is the second
channel. Probabilities come back the same way onto the original slice grid; labels are
the arg-max restricted to the lung mask, and are written back in the CT's own voxel order.
Slices are streamed in batches, so memory does not grow with the number of slices.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from ssanet.classes import MULTICLASS

from .errors import Cancelled, InputError
from .geometry import ap_flip_note, array_from_lps, image_like, to_lps
from .io import (OPTIONAL_OUTPUT_SUFFIXES, NotPutInPlace, check_writable, read_ct, read_notes, validate_ct,
                 write_image, written_together)
from .lungstep import compute_lungs
from .outputs import RecordedRun, input_stamp, optional_outputs, output_paths
from .stats import compute_stats, label_names_for, lung_coverage_note, lung_size_note, write_stats

ProgressFn = Callable[[str, float], None]


@dataclass
class SegmentationResult:
    labels: sitk.Image                 # uint8 on the CT grid: 0 bg, 1 GGO, 2 consolidation (binary: 1 infection)
    lungs: sitk.Image                  # uint8: 1 right lung, 2 left lung
    class_names: list
    stats: dict
    info: dict
    lobes: sitk.Image | None = None    # uint8 1..5 (LTRCLobes order) when lobe weights were given
    probability: sitk.Image | None = None  # float32 max class probability (1 outside the lungs)
    notices: list = field(default_factory=list)


def load_model(checkpoint=None):
    """(model, meta) from ``ssanet.checkpoint.load_checkpoint``; raises CheckpointError."""
    from ssanet.checkpoint import load_checkpoint
    return load_checkpoint(checkpoint)


def segment_image(ct: sitk.Image, *, checkpoint=None, lungs: str = "auto", lung_weights=None,
                  lobe_weights=None, lung_mask=None, device: str = "auto", batch_size: int | None = None,
                  progress: ProgressFn | None = None, cancel: Callable[[], bool] | None = None,
                  save_probability: bool = False, model=None, source: str = "input",
                  flip_tta: bool | None = None, min_lesion_mm2: float | None = None,
                  cpu_bf16: bool = True) -> SegmentationResult:
    """Segment GGO / consolidation in ``ct`` (a SimpleITK image in HU).

    ``flip_tta``: average with the mirrored slice (None: what the checkpoint records).
    ``cpu_bf16``: bfloat16 autocast on a CPU with native bf16 (1.6-1.8x faster; DSC within
    0.001 of float32 on the test split, ``results/cpu_bf16/``); False: float32.
    ``min_lesion_mm2``: lesion islands smaller than this in a slice are removed (None: what
    the checkpoint records; 0 keeps all).

    ``model``: an already loaded ``(model, meta)`` pair (batch runs load it once);
    otherwise ``checkpoint`` (None: the default model) is loaded. ``cancel()`` is polled
    between stages and batches and raises :class:`Cancelled` when it returns True.
    """
    from ssanet.inference import Predictor, select_device
    from ssanet.postprocess import effective_min_lesion_mm2

    report = progress or (lambda stage, fraction: None)

    def check_cancel():
        if cancel is not None and cancel():
            raise Cancelled("segmentation cancelled")

    timings = {}
    ct = validate_ct(ct, source)
    dev = select_device(device)
    check_cancel()

    t = time.perf_counter()
    report("model", 0.0)
    net, meta = model if model is not None else load_model(checkpoint)
    report("model", 1.0)
    min_lesion_mm2 = effective_min_lesion_mm2(meta, min_lesion_mm2)
    timings["model"] = time.perf_counter() - t
    check_cancel()

    t = time.perf_counter()
    report("lungs", 0.0)
    lung_res = compute_lungs(ct, method=lungs, weights=lung_weights, lobe_weights=lobe_weights,
                             lung_mask=lung_mask, device=dev.type)
    if not lung_res.labels.any():
        sp = ct.GetSpacing()
        extent = [n * d for n, d in zip(ct.GetSize(), sp)]   # whatever the slicing (axial, coronal, ...)
        where = (f"image extent {' x '.join(f'{e:.0f}' if e >= 10 else f'{e:.2g}' for e in extent)} mm, voxels "
                 f"{' x '.join(f'{d:.3g}' for d in sp)} mm")
        if max(extent) < 150 or min(extent) > 1000:   # a chest spans about 250-500 mm across
            where += "; no chest is that size: is the voxel spacing in the file's header right?"
        raise InputError(f"{source}: no lungs found (no aerated lung in the image: is the chest in the field "
                         f"of view?) ({where})")
    lungs_img = image_like(lung_res.labels.astype(np.uint8), ct)
    report("lungs", 1.0)
    timings["lungs"] = time.perf_counter() - t
    check_cancel()

    t = time.perf_counter()
    class_names = list(meta.get("class_names") or MULTICLASS)
    predictor = Predictor.for_checkpoint(net, meta, dev, batch_size, flip_tta, cpu_bf16=cpu_bf16)
    labels_arr, conf_arr, n_slices = _lesions(ct, lungs_img, predictor, meta, min_lesion_mm2, save_probability,
                                              lambda f: report("lesions", f), check_cancel)
    labels_img = image_like(labels_arr, ct)
    prob_img = image_like(conf_arr, ct) if conf_arr is not None else None
    timings["lesions"] = time.perf_counter() - t

    t = time.perf_counter()
    report("stats", 0.0)
    lobes_img = image_like(lung_res.lobes, ct) if lung_res.lobes is not None else None
    stats = compute_stats(ct, labels_img, lungs_img, lobes_img, label_names_for(class_names))
    timings["stats"] = time.perf_counter() - t
    report("stats", 1.0)

    info = {
        "source": source,
        "size": list(ct.GetSize()),
        "spacing_mm": [float(s) for s in ct.GetSpacing()],
        "lung_method": lung_res.method,
        "lung_details": lung_res.details,
        "device": str(dev),
        "checkpoint": {"name": meta.get("name"), "sha256": meta.get("sha256"), "path": meta.get("path"),
                       # an ensemble: the networks whose probabilities were averaged
                       "members": [{"name": m.get("name"), "sha256": m.get("sha256")}
                                   for m in (meta.get("training") or {}).get("ensemble_of", [])]},
        "class_names": class_names,
        "flip_tta": predictor.flip_tta,
        "precision": predictor.precision,
        "min_lesion_mm2": min_lesion_mm2,
        "lesion_slices": n_slices,
        "lesion_slices_per_s": n_slices / timings["lesions"] if timings["lesions"] > 0 else None,
        "timings_s": timings,
    }
    notices = [n for n in (ap_flip_note(ct, lungs_img), lung_res.notice, lung_coverage_note(lungs_img, ct),
                           lung_size_note(lungs_img)) if n]
    if notices:
        info["notices"] = notices
    stats["info"] = info
    return SegmentationResult(labels=labels_img, lungs=lungs_img, class_names=class_names, stats=stats,
                              info=info, lobes=lobes_img, probability=prob_img, notices=notices)


def _target_spacing(pre, native):
    px = pre.get("pixel_spacing_mm")
    if px is None:
        return native
    if np.isscalar(px):
        return float(px), float(px)
    return float(px[0]), float(px[1])


def _lesions(ct, lungs_img, predictor, meta, min_lesion_mm2, save_probability, report, check_cancel):
    from ssanet.postprocess import labels_from_probabilities
    from ssanet.preprocess import (LUNG_WINDOW_HU, make_input, model_grid, resize_image, resize_probs,
                                   to_model_grid, uncrop, window_hu)

    pre = meta.get("preprocessing") or {}
    size = int(pre.get("size", 512))
    fov = int(pre.get("fov_px", size))
    window = tuple(pre.get("window_hu", LUNG_WINDOW_HU))
    blank = bool(pre.get("blank_outside_lung", True))

    ct_l = to_lps(ct)
    lung_l = to_lps(lungs_img)
    hu = sitk.GetArrayViewFromImage(ct_l)
    lung = sitk.GetArrayViewFromImage(lung_l) > 0
    nz, h, w = hu.shape
    sx, sy = ct_l.GetSpacing()[:2]
    (hr, wr), box = model_grid(lung.any(axis=0), (sy, sx), _target_spacing(pre, (sy, sx)), fov)
    resample = (hr, wr) != (h, w)

    labels = np.zeros(hu.shape, np.uint8)
    conf = np.ones(hu.shape, np.float32) if save_probability else None
    zs = np.flatnonzero(lung.reshape(nz, -1).any(axis=1))
    bs = predictor.batch_size
    report(0.0)
    for start in range(0, len(zs), bs):
        check_cancel()
        batch = zs[start:start + bs]
        imgs, masks = [], []
        for z in batch:
            img = to_model_grid(window_hu(hu[z], window), (hr, wr), box, 1)
            m = to_model_grid(lung[z], (hr, wr), box, 0)
            if fov != size:
                img = resize_image(img, (size, size), order=1)
                m = resize_image(m, (size, size), order=0)
            imgs.append(img)
            masks.append(m)
        probs = predictor.predict(make_input(np.stack(imgs), np.stack(masks), blank_outside_lung=blank))
        if fov != size:
            probs = resize_probs(probs, (fov, fov))
        probs = uncrop(probs, box, (hr, wr), fill=0.0)
        if resample:
            probs = resize_probs(probs, (h, w))
        for j, z in enumerate(batch):
            p = probs[j]
            labels[z] = labels_from_probabilities(p, (sy, sx), min_lesion_mm2, lung[z])
            if conf is not None:
                conf[z] = np.where(lung[z], p.max(axis=0), np.float32(1.0))
        report(min(1.0, (start + len(batch)) / len(zs)))
    labels = array_from_lps(labels, ct_l, ct).astype(np.uint8)
    if conf is not None:
        conf = array_from_lps(conf, ct_l, ct).astype(np.float32)
    return labels, conf, len(zs)


# -------------------------------------------------------------------------- one case

def write_outputs(result: SegmentationResult, ct: sitk.Image, out_dir, name: str, labelmaps: bool = False) -> dict:
    """Write the four outputs, plus the confidence map when present and, with ``labelmaps``,
    the lesion (0 background, 1 GGO, 2 consolidation) and lung (1 right, 2 left) labelmaps
    as NIfTI on the CT's grid.

    Optional outputs of the run being replaced that this one was not asked for: rewritten
    from this run when they are as that run wrote them (so all outputs listed belong to one
    run; a confidence map this run has no probabilities for is removed), kept but no longer
    listed when they were changed since (the user's now: a later run refuses to replace them
    without ``--overwrite``).

    Every file is written under a temporary name first; only when all are written are they
    renamed into place, the stats JSON last. If a rename fails part-way (a file held open,
    e.g. the CSV in a spreadsheet), this case's outputs no longer belong together and are
    all removed, so that a rerun does it again instead of taking them for done or for the
    user's."""
    from ssanet.checkpoint import sha256_of

    from .report import write_overlay
    from .segfile import write_seg_nrrd

    check_writable(out_dir)
    wanted = set(optional_outputs(result.probability is not None, labelmaps))
    recorded = RecordedRun(out_dir, name)
    earlier = {k: p for k, p in output_paths(out_dir, name, tuple(OPTIONAL_OUTPUT_SUFFIXES)).items()
               if k in OPTIONAL_OUTPUT_SUFFIXES and k not in wanted and p.exists() and p.name in recorded.names}
    unchanged = {k: p for k, p in earlier.items() if not recorded.changed(k, p)}
    wanted |= {k for k in unchanged if k != "confidence" or result.probability is not None}
    stale = [p for k, p in unchanged.items() if k not in wanted]
    paths = output_paths(out_dir, name, tuple(k for k in OPTIONAL_OUTPUT_SUFFIXES if k in wanted))
    order = [k for k in ("segmentation", "overlay") + tuple(OPTIONAL_OUTPUT_SUFFIXES) if k in paths] + \
        ["stats_csv", "stats_json"]
    try:
        with written_together({k: paths[k] for k in order}, also_remove=stale) as tmp:
            write_seg_nrrd(tmp["segmentation"], result.labels, result.lungs, result.class_names)
            write_overlay(tmp["overlay"], ct, result.labels, result.lungs, result.class_names, title=name)
            for key, image in (("confidence", result.probability), ("lesion_labelmap", result.labels),
                               ("lung_labelmap", result.lungs)):
                if key in tmp:
                    write_image(image, tmp[key])
            info = result.stats.setdefault("info", result.info)
            info["outputs"] = {k: str(Path(p).absolute()) for k, p in paths.items()}   # as "source" is
            # so that a rerun can tell its own outputs from ones corrected in place
            info["outputs_sha256"] = {k: sha256_of(tmp[k]) for k in order if k not in ("stats_json", "stats_csv")}
            write_stats(result.stats, tmp["stats_json"], tmp["stats_csv"])
    except NotPutInPlace as e:
        raise InputError(f"could not put {Path(e.filename).name} in place ({e.strerror or e}; is it open in "
                         f"another program?): the outputs of {name!r} were removed, run the case again") from None
    for p in stale:
        with contextlib.suppress(OSError):
            p.unlink()
    return paths


def process_case(input_path, out_dir, name: str | None = None, progress: ProgressFn | None = None,
                 labelmaps: bool = False, **kwargs) -> tuple[SegmentationResult, dict]:
    """Read ``input_path``, segment it and write the outputs into ``out_dir`` (``labelmaps``:
    :func:`write_outputs`)."""
    from .io import case_name

    check_writable(out_dir)
    name = name or case_name(input_path)
    report = progress or (lambda stage, fraction: None)
    t = time.perf_counter()
    report("read", 0.0)
    ct, read_info = read_ct(input_path)
    report("read", 1.0)
    t_read = time.perf_counter() - t
    result = segment_image(ct, progress=progress, source=str(Path(input_path).absolute()), **kwargs)
    result.info["input"] = read_info
    result.info["input_stamp"] = input_stamp(input_path)   # a rerun tells a CT replaced at this path
    result.notices[:0] = read_notes(read_info)   # what reading decided comes first, and into the JSON
    if result.notices:
        result.info["notices"] = result.notices
    result.info["timings_s"]["read"] = t_read
    t = time.perf_counter()
    report("write", 0.0)
    paths = write_outputs(result, ct, out_dir, name, labelmaps=labelmaps)
    result.info["timings_s"]["write"] = time.perf_counter() - t
    report("write", 1.0)
    return result, paths
