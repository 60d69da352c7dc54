"""``ssalesionseg segment | stats | bench``: the engine's subcommands.

``ssanet.cli`` adds them to the ``ssalesionseg`` command through :func:`add_subcommands`;
``python -m ssalesionseg.cli`` runs them on their own.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

from .errors import Cancelled, FallbackWarning, InputError
from .stats import severity_text


def add_subcommands(subparsers) -> None:
    from ssanet.cli import add_min_lesion_arg, positive_int

    s = subparsers.add_parser(
        "segment", help="segment GGO / consolidation in a CT (file, DICOM folder, or a folder of cases)",
        description="Writes DIR/<name>.seg.nrrd, <name>_stats.json, <name>_stats.csv and <name>_overlay.png. "
                    "A folder of cases (CT files and/or one subfolder per case: its DICOM series at any depth, "
                    "or its one CT file) is processed case by case; subfolders without images are skipped, "
                    "with a note; finished cases are skipped unless --overwrite, a failing case does not "
                    "stop the others, and the exit status is 1 if any case failed, 2 if there is nothing "
                    "to process.")
    s.add_argument("input", help="CT file (NIfTI/NRRD/MHA/DICOM), DICOM folder, or folder of cases")
    s.add_argument("--out", required=True, help="output folder (created if missing)")
    s.add_argument("--checkpoint", help="SSA-Net model file (default: the default model)")
    s.add_argument("--lungs", default="auto", choices=["auto", "lungmask", "classical"],
                   help="lung segmentation: lungmask R231 (needs local weights), the classical "
                        "fallback, or auto = lungmask when weights are found (default)")
    s.add_argument("--lung-weights", help="lungmask R231 weights (unet_r231-*.pth)")
    s.add_argument("--lobe-weights", help="lungmask LTRCLobes weights: adds lobes and the per-lobe severity score")
    s.add_argument("--lung-mask", help="existing lung segmentation on the CT grid (labelmap or .seg.nrrd)")
    s.add_argument("--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda or mps")
    s.add_argument("--batch-size", type=positive_int, default=None,
                   help="slices per forward pass (default 4 on a CPU, 16 on a GPU)")
    s.add_argument("--flip-tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average each slice's prediction with its mirror image (default: what the model "
                        "records; the bundled ensemble does not: --flip-tta doubles the lesion time)")
    s.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bfloat16 on a CPU with native bf16 support (default; 1.6-1.8x faster, DSC within "
                        "0.001 of float32); --no-bf16: float32")
    add_min_lesion_arg(s)
    s.add_argument("--save-probability", action="store_true",
                   help="also write <name>_confidence.nrrd (max class probability)")
    s.add_argument("--labelmaps", action="store_true",
                   help="also write <name>_lesions.nii.gz (0 background, 1 GGO, 2 consolidation) and "
                        "<name>_lungs.nii.gz (1 right, 2 left): plain labelmaps on the CT's grid for tools "
                        "that do not read .seg.nrrd")
    s.add_argument("--overwrite", action="store_true", help="redo cases whose outputs already exist (outputs edited since segment wrote them are kept as <file>.bak)")
    s.add_argument("--progress-json", action="store_true",
                   help="print one JSON object per line for every progress event (for the Slicer module)")
    s.set_defaults(func=cmd_segment)

    st = subparsers.add_parser(
        "stats", help="recompute the statistics from a (corrected) labelmap or .seg.nrrd",
        description="Lungs come from the .seg.nrrd's lung segments, else --lung-mask, else (for segment's "
                    "<name>_lesions.nii.gz) that run's <name>_lungs.nii.gz or <name>.seg.nrrd lungs unless --lungs / "
                    "--lung-weights ask for new ones, else the lung step.")
    st.add_argument("--ct", required=True, help="the CT the labels belong to")
    st.add_argument("--labels", required=True, help="labelmap (1 GGO, 2 consolidation) or .seg.nrrd")
    st.add_argument("--out", required=True, help="output folder")
    st.add_argument("--classes", default="multiclass", choices=["multiclass", "binary"],
                    help="meaning of labelmap values: 1 GGO / 2 consolidation, or 1 infection")
    st.add_argument("--lung-mask", help="lung segmentation on the CT grid (labelmap or .seg.nrrd)")
    st.add_argument("--lungs", default="auto", choices=["auto", "lungmask", "classical"])
    st.add_argument("--lung-weights")
    st.add_argument("--lobe-weights")
    st.add_argument("--overwrite", action="store_true",
                    help="replace <name>_stats.json / .csv already in --out (default: refuse, so that the "
                         "figures `segment` wrote are not lost)")
    st.set_defaults(func=cmd_stats)

    e = subparsers.add_parser(
        "export-case", help="write a (corrected) result as a training case for `train --cases`",
        description="Writes OUT/images/<name>.nii.gz (the CT in HU), OUT/labels/<name>.nii.gz (0 background, "
                    "1 GGO, 2 consolidation) and, when the segmentation has lung segments or --lung-mask is "
                    "given, OUT/lungs/<name>.nii.gz (1 right, 2 left): the layout `ssalesionseg train --cases OUT` "
                    "reads, as the Slicer module's 'Export as training case' writes it. Correct the labels "
                    "first (e.g. the .seg.nrrd in Slicer's Segment Editor, or a labelmap in any editor).")
    e.add_argument("--ct", required=True, help="the CT the labels belong to (file or DICOM folder)")
    e.add_argument("--labels", required=True, help="labelmap (1 GGO, 2 consolidation) or .seg.nrrd")
    e.add_argument("--out", required=True, help="the training-cases folder (created if missing)")
    e.add_argument("--name", help="case name (default: the name `segment` gave the labels' case when they are "
                                  "its output, e.g. OUT/patient1.seg.nrrd -> patient1; else the CT's name)")
    e.add_argument("--classes", default="multiclass", choices=["multiclass", "binary"],
                   help="meaning of labelmap values: 1 GGO / 2 consolidation, or 1 infection")
    e.add_argument("--lung-mask", help="lung segmentation on the CT grid (labelmap or .seg.nrrd) when --labels "
                                       "has no lung segments (default: the lungs segment wrote beside its --labels, "
                                       "<name>_lungs.nii.gz or <name>.seg.nrrd; else none, and training finds them)")
    e.add_argument("--overwrite", action="store_true", help="replace a case of the same name already in --out")
    e.set_defaults(func=cmd_export_case)

    d = subparsers.add_parser(
        "demo", help="segment the bundled sample CT with the default model and print a summary")
    d.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    d.add_argument("--overwrite", action="store_true",
                   help="replace outputs there that were edited (corrected) since the demo wrote them; "
                        "they are kept as <file>.bak")
    d.add_argument("--checkpoint", help="model file (default: the default model)")
    d.add_argument("--device", default="auto")
    d.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bfloat16 on a CPU with native bf16 (default, as segment); --no-bf16: float32")
    d.set_defaults(func=cmd_demo)

    b = subparsers.add_parser(
        "bench", help="time the pipeline stages on a synthetic 512x512xN CT",
        description="Seconds per stage, lesion slices/s, peak RSS, and SSA-Net forward time with and "
                    "without the spatial convolution.")
    b.add_argument("--slices", type=positive_int, default=8, help="N (default 8)")
    b.add_argument("--size", type=int, default=512, help="in-plane size (default 512)")
    b.add_argument("--checkpoint", help="model to time (default: a randomly initialised full-size SSA-Net)")
    b.add_argument("--lungs", default="classical", choices=["auto", "lungmask", "classical"])
    b.add_argument("--lung-weights")
    b.add_argument("--device", default="auto")
    b.add_argument("--batch-size", type=positive_int, default=None,
                   help="slices per forward pass (default 4 on a CPU, 16 on a GPU)")
    b.add_argument("--flip-tta", action=argparse.BooleanOptionalAction, default=None,
                   help="time with / without the mirrored pass (default: what the model records)")
    b.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bfloat16 on a CPU with native bf16 (default, as segment); --no-bf16: float32")
    b.add_argument("--repeats", type=positive_int, default=3, help="forward passes per variant (after one warm-up)")
    b.add_argument("--json", help="also write the figures here")
    b.set_defaults(func=cmd_bench)


# ------------------------------------------------------------------------- segment

def find_cases(path, out=None, notes=None) -> list:
    """[(name, path)] of the CTs in ``path``: the file itself, a DICOM folder as one case,
    or a folder whose CT files and subfolders are one case each (a subfolder: its DICOM
    series, at any depth below it, or the one CT file it holds, named after the subfolder;
    that file may lie deeper, ``patient1/series/ct.mha``, when the subfolder holds no CT file
    of its own). The engine's own outputs (``.seg.nrrd``, optional outputs), hidden files
    (macOS ``._`` copies), a ``DICOMDIR`` index, the output folder ``out`` and subfolders
    holding only an earlier run's results are not cases, so results may be written into or
    under the input folder and the run repeated. Nor is a subfolder without images (empty,
    or only e.g. ``notes.txt``): it is skipped, and ``notes`` (a list, when given) names the
    folders skipped. A folder with DICOM files of its own, or a ``DICOMDIR`` (an exported
    disc), is one DICOM case, as a case subfolder is; CT files beside its DICOM files (e.g. a
    lung mask) are then not cases, which is said in ``notes``. An unreadable subfolder, or
    one with files that are images but not read as a CT (``.png``, ``.zip`` ...), is a case
    that fails with a message."""
    from .io import case_name, is_dicom_file, is_engine_output, is_volume_file

    p = Path(path)
    if not p.exists():
        raise InputError(f"input not found: {p}")
    if p.is_file():
        return [(case_name(p), p)]
    out = os.path.abspath(out) if out is not None else None

    def listing(folder):
        return [e for e in sorted(folder.iterdir()) if not e.name.startswith(".")
                and not (out is not None and os.path.abspath(e) == out)]

    try:
        entries = listing(p)
    except OSError as e:
        raise InputError(f"cannot list {p}: {e.strerror or e}") from None
    volumes = [e for e in entries if is_volume_file(e) and not is_engine_output(e)]
    loose_dicom = [e for e in entries if is_dicom_file(e)]
    disc = any(e.name.upper() == "DICOMDIR" and e.is_file() for e in entries)
    subfolders = [e for e in entries if e.is_dir()]
    if len(loose_dicom) == 1 and not disc and (volumes or subfolders):
        raise InputError(f"{p} holds one loose DICOM file ({loose_dicom[0].name}) beside other cases "
                         f"({', '.join(e.name for e in (volumes + subfolders)[:3])}): a folder with DICOM files is "
                         "read as one DICOM series, which one slice would be; move it into a folder of its own, "
                         "or remove it")
    if loose_dicom or disc:
        left_out = [e.name for e in volumes] + [e.name + "/" for e in subfolders if not disc]
        if left_out and notes is not None:
            notes.append(f"{p} is read as one DICOM case (it holds DICOM files); not cases of their own: "
                         f"{', '.join(left_out[:4])}{', ...' if len(left_out) > 4 else ''}")
        return [(p.resolve().name or "case", p)]   # "--input ." names the case after the folder
    cases = [(case_name(e), e) for e in volumes]
    imageless = []   # subfolders that are no case: nothing in them is an image
    for e in subfolders:
        try:
            inside = listing(e)
        except OSError:   # unreadable: reading it fails as this case, with the reason
            cases.append((e.name, e))
            continue
        inner = [f for f in inside if is_volume_file(f) and not is_engine_output(f)]
        dicom = _holds_dicom(e)   # in it or its subfolders (an output folder inside holds none)
        if not inner and not dicom:
            if any(f.name.endswith("_stats.json") for f in inside):
                continue   # an earlier run's output folder
            files = _files_below(e, out)
            deeper = [f for f in files if is_volume_file(f) and not is_engine_output(f)]
            if len(deeper) == 1:   # patient1/series/ct.mha: still patient1's one CT
                cases.append((e.name, deeper[0]))
                continue
            if not deeper and any(f.name.endswith("_stats.json") for f in files):
                continue   # earlier runs' output folders deeper (--out runs/r1)
            if not deeper and not _image_like(files, e):
                imageless.append(e.name + "/")
                continue
        if dicom and inner and notes is not None:   # as for the folder given itself
            notes.append(f"{e} is read as one DICOM case (it holds DICOM files); not cases of their own: "
                         f"{', '.join(f.name for f in inner[:4])}{', ...' if len(inner) > 4 else ''}")
        # several CT files (here or deeper) and no DICOM: reading the folder names them, not guessed
        cases.append((e.name, inner[0] if len(inner) == 1 and not dicom else e))
    skipped = (f"skipped {len(imageless)} folder{'s' if len(imageless) > 1 else ''} without images (no "
               f"NIfTI/NRRD/MHA or DICOM file in {'them' if len(imageless) > 1 else 'it'}): "
               f"{', '.join(imageless[:6])}{', ...' if len(imageless) > 6 else ''}") if imageless else ""
    if not cases and any(not e.is_dir() for e in entries):
        from .io import dicom_series_choice
        try:   # DICOM files without a .dcm name or the 128-byte preamble: GDCM still reads them
            dicom_series_choice(p)
            return [(p.resolve().name or "case", p)]
        except InputError:
            pass
    if not cases:
        results = [e.name for e in entries if e.name.endswith("_stats.json")]
        if results:
            raise InputError(f"{p} holds the outputs of an earlier run ({', '.join(results[:3])}"
                             f"{', ...' if len(results) > 3 else ''}), not CTs: give the folder or file of the CTs")
        raise InputError(f"{p}: the folder is empty" if not entries else
                         f"{p}: no CT files (.nii.gz, .nii, .nrrd, .mha, .mhd, DICOM) or case folders found"
                         + (f"; {skipped}" if skipped else ""))
    # names equal but for letter case are one file on Windows and macOS file systems
    keys = [n.casefold() for n, _ in cases]
    dup = sorted({f"{n} ({path.relative_to(p)})" for n, path in cases if keys.count(n.casefold()) > 1})
    if dup:
        raise InputError(f"{p}: several inputs would write the same outputs: {', '.join(dup)}; "
                         "rename one of each, or segment them into different --out folders")
    if skipped and notes is not None:
        notes.append(f"{p}: {skipped}")
    return cases


def _holds_dicom(folder: Path) -> bool:
    """Some DICOM file (by name or preamble) in ``folder`` or below; hidden files do not count."""
    from .io import is_dicom_file

    for d, dirs, files in os.walk(folder):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        if any(is_dicom_file(Path(d, f)) for f in files):
            return True
    return False


def _files_below(folder: Path, out=None) -> list:
    """The files in ``folder`` and its subfolders at any depth, in order; hidden files and
    folders and the output folder ``out`` (an absolute path) are left out."""
    found = []
    for d, dirs, files in os.walk(folder):
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and os.path.abspath(os.path.join(d, x)) != out)
        found += [Path(d, f) for f in sorted(files) if not f.startswith(".")]
    return found


def _image_like(files, folder: Path) -> bool:
    """Whether some of ``files`` (those below ``folder``, which holds no CT file and no DICOM
    file by name or preamble) are images all the same: of a format not read as a CT, or
    DICOM files GDCM reads without a DICOM name or preamble."""
    from .io import OTHER_IMAGE_SUFFIXES, holds_dicom_series

    return bool(files) and (any(f.name.lower().endswith(OTHER_IMAGE_SUFFIXES) for f in files)
                            or holds_dicom_series(folder))


class _Progress:
    def __init__(self, as_json: bool, n_cases: int):
        self.as_json = as_json
        self.n = n_cases
        self.i = 0
        self.case = ""
        self.last = None

    def event(self, **kw):
        self.finished = self.finished or kw.get("event") == "finished"
        if self.as_json:
            print(json.dumps(kw), flush=True)

    finished = False   # whether the "finished" event went out
    names, skipped, done = (), (), ()   # the batch's cases, as far as it got

    def __call__(self, stage: str, fraction: float):
        self.event(event="progress", case=self.case, case_index=self.i, n_cases=self.n, stage=stage,
                   fraction=round(float(fraction), 4), overall=round((self.i + _stage_weight(stage, fraction)) / self.n, 4))
        if not self.as_json and (stage, fraction >= 1.0) != self.last:
            self.last = (stage, fraction >= 1.0)
            if fraction == 0.0:
                print(f"[{self.i + 1}/{self.n}] {self.case}: {stage} ...", file=sys.stderr, flush=True)


_STAGES = {"read": (0.0, 0.05), "model": (0.05, 0.1), "lungs": (0.1, 0.4), "lesions": (0.4, 0.9),
           "stats": (0.9, 0.95), "write": (0.95, 1.0)}


def _stage_weight(stage, fraction):
    lo, hi = _STAGES.get(stage, (0.0, 1.0))
    return lo + (hi - lo) * max(0.0, min(1.0, fraction))


def cmd_segment(args) -> int:
    prog = _Progress(args.progress_json, 0)
    try:
        return _segment(args, prog)
    except Exception as e:   # the command itself cannot go on: a JSON reader hears it too
        if not prog.finished:
            message = f"{type(e).__name__}: {e}"
            prog.event(event="error", case=None, message=message)
            # the cases neither skipped nor done are not done: failed, with the command
            failed = [n for n in prog.names if n not in prog.skipped and n not in prog.done]
            prog.event(event="finished", n_cases=len(prog.names), n_failed=len(failed),
                       n_skipped=len(prog.skipped), failed=failed, error=message)
        raise


def _segment(args, prog) -> int:
    from .io import check_writable
    from .outputs import (checkpoint_sha256, foreign_files, input_changed_since, optional_outputs, output_paths,
                          outputs_complete, outputs_from_other_input, outputs_from_other_model,
                          outputs_with_other_settings, recomputed_by_stats, RecordedRun)

    notes = []
    cases = find_cases(args.input, out=args.out, notes=notes)
    for note in notes:
        prog.event(event="notice", case=None, message=note)
        if not args.progress_json:
            print(f"note: {note}", file=sys.stderr)
    if args.lung_mask and len(cases) > 1:
        raise InputError("--lung-mask belongs to one CT; it cannot be used with a folder of several cases")
    out = check_writable(args.out)
    prog.n = len(cases)
    wanted = optional_outputs(args.save_probability, args.labelmaps)

    @functools.lru_cache(maxsize=None)
    def model_sha():   # hashed once, and only when some outputs exist
        return checkpoint_sha256(args.checkpoint)

    def decide(n, path):
        """"todo", "skip", "kept" (figures `stats` recomputed) or the InputError the case fails
        with: outputs already there are not replaced unasked when another input or another model
        made them, when `stats` recomputed them from corrected labels, or when files at their
        names are not this case's unchanged outputs (the user's) -- also when this run asks for
        more outputs than are there."""
        if args.overwrite:
            return "todo"
        if output_paths(out, n)["stats_json"].is_file():
            other = outputs_from_other_input(out, n, path)
            if other:
                return InputError(f"{out} already holds outputs named {n!r} made from another input ({other}); "
                                  "they are left as they are: give another --out, or --overwrite to replace them")
            other = input_changed_since(out, n, path)
            if other:
                return InputError(f"{out} already holds outputs of {n!r} made from {path} before it changed "
                                  f"({other}); they are left as they are: --overwrite segments it anew, or give "
                                  "another --out to keep both")
            other = outputs_from_other_model(out, n, model_sha())
            if other:
                return InputError(f"{out} already holds outputs named {n!r} made with another model ({other}); "
                                  "they are left as they are: give another --out to keep both, or --overwrite to "
                                  "replace them with this model's")
            if recomputed_by_stats(out, n):
                return "kept" if outputs_complete(out, n, wanted) else InputError(
                    f"{out} holds figures of case {n!r} recomputed by `ssalesionseg stats` (corrected labels?); "
                    "they are left as they are: give another --out, or --overwrite to segment the case again")
            other = outputs_with_other_settings(out, n, flip_tta=args.flip_tta, min_lesion_mm2=args.min_lesion_mm2,
                                                cpu_bf16=args.bf16, lungs=args.lungs, lung_mask=args.lung_mask)
            if other:
                return InputError(f"{out} already holds outputs named {n!r} made with other settings ({other}); "
                                  "they are left as they are: give another --out to keep both, or --overwrite to "
                                  "redo them with these")
        if outputs_complete(out, n, wanted):
            return "skip"
        files = foreign_files(out, n, wanted)
        if files:
            return InputError(f"{out} already holds {', '.join(f.name for f in files)}, not as segment wrote it "
                              f"for case {n!r} (your own file, or corrected in place?); it is left as it is: give "
                              "another --out, or --overwrite to replace it")
        return "todo"

    decisions = {n: decide(n, path) for n, path in cases}
    todo = {n for n, d in decisions.items() if d == "todo"}
    skipped = [n for n, _ in cases if decisions[n] in ("skip", "kept")]
    failures = []
    # one CT given (a file or a DICOM series): its error is the command's (exit status 2);
    # in a folder of cases a case's error is reported and the others go on (exit status 1)
    single = len(cases) == 1 and Path(cases[0][1]) == Path(args.input)

    def fail(name, e):
        """A case that failed: a single case raises (the caller reports it); in a folder the
        failure is reported and the others go on."""
        prog.event(event="error", case=name, message=f"{type(e).__name__}: {e}")
        if single:
            prog.event(event="finished", n_cases=1, n_failed=1, n_skipped=0, failed=[name])
            raise e
        failures.append((name, e))
        if not args.progress_json:
            print(f"{name}: FAILED: {e}", file=sys.stderr)
            if not isinstance(e, (InputError, ValueError, RuntimeError, OSError)):
                traceback.print_exception(type(e), e, e.__traceback__)

    for n, _ in cases:
        if isinstance(decisions[n], InputError):
            fail(n, decisions[n])
    for n in skipped:
        reason = ("figures recomputed by `ssalesionseg stats` are kept" if decisions[n] == "kept"
                  else "outputs exist")
        seg = output_paths(out, n)["segmentation"]
        if decisions[n] == "skip" and seg.is_file() and RecordedRun(out, n).changed("segmentation", seg):
            # corrected since its figures were computed, and not recomputed yet
            reason += (f"; {seg.name} was edited after its figures were computed: `ssalesionseg stats --ct "
                       f"{dict(cases)[n]} --labels {seg} --out {out} --overwrite` recomputes them")
        prog.event(event="skipped", case=n, reason=f"{reason} (use --overwrite to redo)")
        if not args.progress_json:
            print(f"{n}: {reason}, skipped (use --overwrite to redo)", file=sys.stderr)
    done, said = [], {}   # note -> the case it was printed in full for
    prog.names, prog.skipped, prog.done = [n for n, _ in cases], skipped, done

    def summary(interrupted=False):
        """The batch summary: every case found, each with its status (and why it failed)."""
        if len(cases) < 2:
            return None
        failed = {n: str(e) for n, e in failures}
        status = {n: ("failed", failed[n]) if n in failed else
                  ("segmented", "") if n in done else
                  ("kept", "figures recomputed by `ssalesionseg stats`") if decisions[n] == "kept" else
                  ("skipped", "outputs exist") if n in skipped else
                  ("not run", "the batch was interrupted before it" if interrupted else "") for n, _ in cases}
        return write_batch_summary(out, cases, status)

    def finish():
        prog.event(event="finished", n_cases=len(cases), n_failed=len(failures), n_skipped=len(skipped),
                   failed=[n for n, _ in failures])
        path = summary()
        if path and not args.progress_json:
            print(f"every case, one row each: {path}", file=sys.stderr)
        return _report(failures, len(cases), done, skipped, out, args.progress_json)

    if not todo:
        return finish()
    try:
        _segment_cases(args, prog, cases, todo, out, wanted, fail, done, said)
    except (KeyboardInterrupt, Cancelled):
        summary(interrupted=True)   # what was done so far; the rerun's summary replaces it
        raise
    return finish()


def _segment_cases(args, prog, cases, todo, out, wanted, fail, done, said) -> None:
    """Segment the cases of ``todo`` in order: a case's failure is ``fail``ed, a finished case
    joins ``done``."""
    from .outputs import copies_kept, edited_outputs
    from .pipeline import load_model, process_case

    model = load_model(args.checkpoint)
    for i, (name, path) in enumerate(cases):
        if name not in todo:
            continue
        prog.i, prog.case = i, name
        t = time.perf_counter()
        try:
            # the user's corrections are replaced as asked, but not lost
            edited = edited_outputs(out, name, wanted) if args.overwrite else []
            with copies_kept(edited) as copies, warnings.catch_warnings():
                warnings.simplefilter("ignore", FallbackWarning)  # reported below as a notice
                result, paths = process_case(path, out, name=name, progress=prog, model=model,
                                             lungs=args.lungs, lung_weights=args.lung_weights,
                                             lobe_weights=args.lobe_weights, lung_mask=args.lung_mask,
                                             device=args.device, batch_size=args.batch_size,
                                             save_probability=args.save_probability, flip_tta=args.flip_tta,
                                             min_lesion_mm2=args.min_lesion_mm2, cpu_bf16=args.bf16,
                                             labelmaps=args.labelmaps)
        except (KeyboardInterrupt, Cancelled):
            raise
        except Exception as e:
            fail(name, e)
            continue
        result.notices[:0] = _replaced_notes(edited, copies, "segment")
        for notice in result.notices:
            prog.event(event="notice", case=name, message=notice)
            if args.progress_json:
                continue
            if notice not in said:   # the same words in full once a batch (each JSON keeps its own)
                print(f"{name}: note: {notice}", file=sys.stderr)
                said[notice] = name
            else:   # ... and each case it applies to still says so
                print(f"{name}: note: as for {said[notice]} ({notice[:60].rstrip()}…)", file=sys.stderr)
        done.append(name)
        prog.event(event="done", case=name, outputs={k: str(p) for k, p in paths.items()},
                   seconds=round(time.perf_counter() - t, 2), severity_total=result.stats["severity"]["total"])
        if not args.progress_json:
            sev = result.stats["severity"]
            inf = result.stats["lesions"]["infection"]
            print(f"{name}: lesions {inf['volume_ml']:.1f} mL ({inf['percent_of_lung'] or 0:.1f} % of lung), "
                  f"severity {severity_text(sev)}, lungs: {result.info['lung_method']} -> {paths['segmentation']}")


BATCH_SUMMARY = "ssalesionseg_summary.csv"
_SUMMARY_COLUMNS = ("case", "status", "input", "right_lung_ml", "left_lung_ml", "lungs_ml", "ggo_ml",
                    "ggo_percent_of_lung", "consolidation_ml", "consolidation_percent_of_lung", "infection_ml",
                    "infection_percent_of_lung", "severity_right_lung", "severity_left_lung", "severity_total",
                    "severity_max", "lung_method", "figures_from", "notes", "reason")


def write_batch_summary(out: Path, cases, status=None) -> Path | None:
    """``ssalesionseg_summary.csv`` in ``out``: one row per case of a batch (``cases``: [(name, input)]),
    with its ``status`` ({name: (status, reason)}: segmented, skipped, kept, failed, not run) and
    the figures of its stats JSON -- mL and % rounded to 0.1, infection = GGO + consolidation,
    notes joined by " | ". The row of a case that failed or was not run has no figures
    (outputs left from an earlier run are not this batch's) and says why in ``reason``. None
    when there are no cases."""
    import csv

    from .io import atomic_path

    def r(v):
        return "" if v is None else round(float(v), 1)

    status = status or {}
    rows = []
    for name, source in cases:
        state, reason = status.get(name, ("", ""))
        row = {"case": name, "status": state, "input": str(Path(source).absolute()), "reason": reason}
        rows.append(row)
        if state in ("failed", "not run"):   # files left from an earlier run are not this batch's figures
            continue
        try:
            st = json.loads((out / f"{name}_stats.json").read_text())
        except (OSError, ValueError):
            continue
        les, lungs, sev = st.get("lesions") or {}, st.get("lungs") or {}, st.get("severity") or {}
        regions = sev.get("regions") or {}
        info = st.get("info") or {}
        row.update({"right_lung_ml": r((lungs.get("right") or {}).get("volume_ml")),
                    "left_lung_ml": r((lungs.get("left") or {}).get("volume_ml")),
                    "lungs_ml": r((lungs.get("total") or {}).get("volume_ml")),
                    **{f"{c}_{k}": r((les.get(c) or {}).get(f)) for c in ("ggo", "consolidation", "infection")
                       for k, f in (("ml", "volume_ml"), ("percent_of_lung", "percent_of_lung"))},
                    "severity_right_lung": (regions.get("right_lung") or {}).get("score", ""),
                    "severity_left_lung": (regions.get("left_lung") or {}).get("score", ""),
                    "severity_total": sev.get("total", ""), "severity_max": sev.get("max", ""),
                    "lung_method": info.get("lung_method", ""),
                    "figures_from": info.get("recomputed_by") or "ssalesionseg segment",
                    "notes": " | ".join(info.get("notices") or ())})
    if not rows:
        return None
    path = out / BATCH_SUMMARY
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=_SUMMARY_COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    return path


def _report(failures, n_cases: int, done, skipped, out, as_json: bool) -> int:
    """The batch's last lines (several cases: how many were segmented / skipped; the failures
    again, so a long run's are not lost in its scrollback) and the exit status."""
    if n_cases > 1 and not as_json:
        print(f"{n_cases} cases: {len(done)} segmented, {len(skipped)} skipped, {len(failures)} failed -> {out}",
              file=sys.stderr)
    if failures:
        print(f"{len(failures)} of {n_cases} cases failed:", file=sys.stderr)
        for n, e in failures:
            print(f"  {n}: {e}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------- demo

SAMPLE_CT = Path(__file__).resolve().parent.parent / "Resources" / "Sample" / "covid_ct_sample.nii.gz"


def cmd_demo(args) -> int:
    from .io import case_name
    from .outputs import copies_kept, edited_outputs
    from .pipeline import process_case

    if not SAMPLE_CT.is_file():
        raise InputError(f"the bundled sample CT is missing ({SAMPLE_CT}); run from a full checkout")
    name = case_name(SAMPLE_CT)
    edited = edited_outputs(args.out, name)   # the demo's own outputs are rewritten; the user's work is not
    if edited and not args.overwrite:
        raise InputError(f"{args.out} holds {', '.join(f.name for f in edited)}, not as the demo wrote it (corrected?); "
                         "it is left as it is: give another --out, or --overwrite (a copy is kept as .bak)")
    print(f"Segmenting the bundled sample CT {SAMPLE_CT.name} (see {SAMPLE_CT.parent / 'README.md'}) ...")
    prog = _Progress(False, 1)
    prog.case = name
    with copies_kept(edited) as copies, warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        result, paths = process_case(SAMPLE_CT, args.out, checkpoint=args.checkpoint, device=args.device,
                                     progress=prog, cpu_bf16=args.bf16)
    result.notices[:0] = _replaced_notes(edited, copies, "the demo")
    print(format_summary(result, paths))
    return 0


def _replaced_notes(edited, copies, writer: str) -> list:
    """The notes on edited outputs an --overwrite run replaced, and where their copies are."""
    return [f"{f.name} was not as {writer} wrote it (corrected?); --overwrite replaced it, kept as {c.name}"
            for f, c in zip(edited, copies)]


def format_summary(result, paths) -> str:
    st = result.stats
    lungs, les = st["lungs"], st["lesions"]
    lines = ["", "Outputs:"] + [f"  {k:<13} {v}" for k, v in paths.items()]
    lines.append(f"Model: {result.info['checkpoint']['name']}   lungs: {result.info['lung_method']}   "
                 f"device: {result.info.get('device')}"
                 + (f" ({result.info['precision']})" if result.info.get("precision", "float32") != "float32" else ""))
    lines.append("Lungs:  " + ", ".join(f"{side} {lungs[side]['volume_ml']:.0f} mL" for side in ("right", "left", "total")))
    for key, label in (("ggo", "GGO"), ("consolidation", "Consolidation"), ("infection", "All lesions")):
        if key in les:
            pct = les[key].get("percent_of_lung")
            lines.append(f"{label + ':':<15} {les[key]['volume_ml']:8.1f} mL  {pct or 0:5.1f} % of lung")
    sev = st["severity"]
    lines.append(f"Severity score: {severity_text(sev)} ({sev.get('scheme', '')})")
    lines.extend(f"Note: {n}" for n in result.notices)
    return "\n".join(lines)


# --------------------------------------------------------------------------- stats

def cmd_stats(args) -> int:
    import numpy as np
    import SimpleITK as sitk
    from ssanet.checkpoint import sha256_of
    from ssanet.classes import BINARY, MULTICLASS

    from .geometry import image_like
    from .io import (OPTIONAL_OUTPUT_SUFFIXES, OUTPUT_SUFFIXES, check_writable, labels_run_name, read_ct,
                     read_result_labels, result_case_name, written_together)
    from .lungstep import compute_lungs
    from .outputs import LUNGS_FROM_LABELS, MADE_BY, RecordedRun, outputs_from_other_input
    from .report import write_overlay
    from .segfile import write_seg_nrrd
    from .stats import BINARY_NAMES, MULTICLASS_NAMES, compute_stats, figure_notes, write_stats

    out = Path(args.out)
    name = result_case_name(args.labels, args.ct)
    existing = [p for p in (out / f"{name}_stats.json", out / f"{name}_stats.csv") if p.exists()]
    if existing and not args.overwrite:
        raise InputError(f"{existing[0]} exists (from `segment` or an earlier `stats`); give another --out "
                         "for the recomputed figures, or --overwrite to replace it")
    # the overlay segment wrote beside the figures shows the labels they are recomputed from
    overlay = out / f"{name}{OUTPUT_SUFFIXES['overlay']}"
    recorded = RecordedRun(out, name)
    # (drawn again when deleted: segment would otherwise find the case incomplete and refuse it)
    redraw = overlay.name in recorded.names and not (overlay.is_file() and recorded.changed("overlay", overlay))
    # ... and so do the plain labelmaps segment wrote (--labelmaps), when untouched since
    relabel = {k: out / f"{name}{OPTIONAL_OUTPUT_SUFFIXES[k]}" for k in ("lesion_labelmap", "lung_labelmap")}
    relabel = {k: p for k, p in relabel.items() if k in recorded.outputs and not (p.is_file() and recorded.changed(k, p))}
    # ... and the .seg.nrrd, when the corrected labels are another file (e.g. the plain labelmap)
    seg = out / f"{name}{OUTPUT_SUFFIXES['segmentation']}"
    seg_edited = False
    if "segmentation" in recorded.outputs and not (seg.exists() and Path(args.labels).resolve() == seg.resolve()):
        seg_edited = seg.is_file() and recorded.changed("segmentation", seg)
        if not seg_edited:
            relabel["segmentation"] = seg
    run = labels_run_name(args.labels)   # the labels are a run's output: its stats JSON says of which CT
    # the labels are this folder's run's own outputs: what made them is kept with the new figures
    made_by = (recorded.info.get("labels_made_by") or {k: recorded.info[k] for k in MADE_BY if k in recorded.info}
               if run == name and Path(args.labels).resolve().parent == out.resolve() else None)
    check_writable(out, create=False)   # created once the labels and lungs have been read
    ct, info = read_ct(args.ct)
    result = read_result_labels(args.labels, ct, args.classes)
    notes = _label_notes(result, args)
    made_from = outputs_from_other_input(Path(args.labels).parent, run, args.ct) if run else None
    if made_from and Path(made_from).is_dir() and Path(args.ct).resolve().is_relative_to(Path(made_from).resolve()):
        made_from = None   # a file of the DICOM folder segmented: the same scan
    if made_from:   # same grid, another scan (or the same one exported again): worth a look
        notes.append(f"{Path(args.labels).name} goes with figures of {made_from} (its stats JSON), not of "
                     f"{args.ct}: is it this CT's segmentation?")
    lab, lung_labels = result.lesions, result.lungs
    names = dict(BINARY_NAMES) if result.binary else dict(MULTICLASS_NAMES)
    lobes = None
    method = LUNGS_FROM_LABELS
    run_lungs = None
    if lung_labels is None and run and not (args.lung_mask or args.lung_weights or args.lobe_weights) \
            and args.lungs == "auto":
        run_lungs = _run_lung_file(Path(args.labels), run)
    if run_lungs is not None:   # a labelmap of segment's: its lungs (maybe corrected), not new ones
        res = compute_lungs(ct, lung_mask=run_lungs)
        lung_labels, method = res.labels, res.method
        notes.append(f"lungs from {run_lungs.name}, beside the labels (segment's run): give --lung-mask, --lungs "
                     "or --lung-weights to find them anew")
    elif lung_labels is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FallbackWarning)  # printed as a note below
            res = compute_lungs(ct, method=args.lungs, weights=args.lung_weights, lobe_weights=args.lobe_weights,
                                lung_mask=args.lung_mask)
        lung_labels, lobes, method = res.labels, res.lobes, res.method
        if res.notice:
            notes.append(res.notice)
    lesions_img, lungs_img = image_like(lab, ct), image_like(lung_labels.astype(np.uint8), ct)
    stats = compute_stats(ct, lesions_img, lungs_img, image_like(lobes, ct) if lobes is not None else None, names)
    inf = stats["lesions"]["infection"]
    notes += figure_notes(stats, lungs_img, ct)
    if seg_edited:
        notes.append(f"{seg.name} was edited since segment wrote it and is not the labels given: it is left as it "
                     "is, and its segments differ from these figures")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    # the keys segment's stats JSON has for the same things, plus where the labels came from
    stats["info"] = {"source": str(Path(args.ct).absolute()), "size": info["size"], "spacing_mm": info["spacing_mm"],
                     "input": info, "labels": str(Path(args.labels).absolute()), "lung_method": method,
                     "recomputed_by": "ssalesionseg stats"}
    if made_by:
        stats["info"]["labels_made_by"] = made_by
    if notes:
        stats["info"]["notices"] = notes
    # segment's outputs beside the figures stay listed with their hashes (a corrected .seg.nrrd
    # then still reads as edited, an untouched one as segment's), the overlay as redrawn
    kept = {k: v for k, v in recorded.outputs.items() if k not in ("stats_json", "stats_csv", "overlay", *relabel)}
    stats["info"]["outputs"] = dict(kept)
    stats["info"]["outputs_sha256"] = {k: recorded.hashes[k] for k in kept if recorded.hashes.get(k)}
    out = check_writable(out)
    targets = {"stats_json": out / f"{name}_stats.json", "stats_csv": out / f"{name}_stats.csv"}
    if redraw:
        targets = {"overlay": overlay, **targets}
    targets = {**relabel, **targets}
    with written_together(targets) as tmp:   # the figures and what shows them replace the old ones together
        if redraw:
            write_overlay(tmp["overlay"], ct, lesions_img, lungs_img, list(BINARY if result.binary else MULTICLASS),
                          title=name)
        for key, image in (("lesion_labelmap", lesions_img), ("lung_labelmap", lungs_img)):
            if key in tmp:
                sitk.WriteImage(image, str(tmp[key]), True)
        if "segmentation" in tmp:
            write_seg_nrrd(tmp["segmentation"], lesions_img, lungs_img,
                           list(BINARY if result.binary else MULTICLASS))
        for key in tmp:
            if key not in ("stats_json", "stats_csv"):
                stats["info"]["outputs"][key] = str(Path(targets[key]).absolute())
                stats["info"]["outputs_sha256"][key] = sha256_of(tmp[key])
        if not stats["info"]["outputs"]:
            del stats["info"]["outputs"], stats["info"]["outputs_sha256"]
        write_stats(stats, tmp["stats_json"], tmp["stats_csv"])
    redone = [targets[k].name for k in ("overlay", *relabel) if k in targets]
    if redone:
        print(f"{', '.join(redone)}: {'redrawn' if redone == [overlay.name] else 'rewritten'} from the corrected "
              "labels", file=sys.stderr)
    print(f"{name}: lesions {inf['volume_ml']:.1f} mL ({inf['percent_of_lung'] or 0:.1f} % of lung), severity "
          f"{severity_text(stats['severity'])} -> {out / (name + '_stats.json')}")
    return 0


def _run_lung_file(labels: Path, run: str) -> Path | None:
    """The lungs of segment's run ``run`` beside its lesion labelmap ``labels``:
    ``<run>_lungs.nii.gz``, else ``<run>.seg.nrrd`` when it holds lung segments; None when
    neither does (the lung step then runs, as for a labelmap from elsewhere)."""
    from .io import OPTIONAL_OUTPUT_SUFFIXES, OUTPUT_SUFFIXES
    from .lungstep import LUNG_ROLES

    lungs = labels.with_name(run + OPTIONAL_OUTPUT_SUFFIXES["lung_labelmap"])
    if lungs.is_file() and lungs.resolve() != labels.resolve():
        return lungs
    seg = labels.with_name(run + OUTPUT_SUFFIXES["segmentation"])
    if seg.is_file() and seg.resolve() != labels.resolve():
        try:   # its segments' roles, from the header alone
            import slicerio

            from .io import _empty_terminology_tolerated, segment_role
            with _empty_terminology_tolerated():
                segments = slicerio.read_segmentation(str(seg), skip_voxels=True).get("segments", [])
        except Exception:
            return None
        if any(segment_role(s) in LUNG_ROLES for s in segments):
            return seg
    return None


# --------------------------------------------------------------------- export-case

def _label_notes(result, args) -> list:
    """What of a (corrected) result is not used, to be said instead of dropped silently."""
    notes = list(result.notes)
    if result.lungs is not None and getattr(args, "lung_mask", None):
        notes.append("--lung-mask is not used: the segmentation has its own lung segments")
    return notes


def cmd_export_case(args) -> int:
    import numpy as np

    from .geometry import image_like
    from .io import check_writable, labels_run_name, read_ct, read_result_labels, result_case_name
    from .lungstep import compute_lungs
    from .stats import labels_like_lungs_note
    from .trainingcase import safe_case_name, write_training_case

    wanted = args.name or result_case_name(args.labels, args.ct)
    case = safe_case_name(wanted)
    if args.name and case != args.name:
        print(f"note: case name {args.name!r} is written as {case!r} (letters, digits, _ . - only: no spaces, slashes or punctuation)", file=sys.stderr)
    out = check_writable(args.out, create=False)   # made by write_training_case, once all is checked
    ct, _ = read_ct(args.ct)
    result = read_result_labels(args.labels, ct, args.classes)
    for note in _label_notes(result, args):
        print(f"note: {note}", file=sys.stderr)
    lab, lungs, binary = result.lesions, result.lungs, result.binary
    lung_file = args.lung_mask
    run = labels_run_name(args.labels) if lungs is None and not lung_file else None
    if run:   # a labelmap of segment's: the lungs of that run (maybe corrected), as stats takes them
        lung_file = _run_lung_file(Path(args.labels), run)
        if lung_file is not None:
            print(f"note: lungs from {lung_file.name}, beside the labels (segment's run): give --lung-mask for "
                  "others", file=sys.stderr)
    if lungs is None and lung_file:
        lungs = compute_lungs(ct, lung_mask=lung_file).labels
    if lungs is not None and (lungs > 0).any():   # as stats notes it: a lung mask given as the labels?
        lung_like = labels_like_lungs_note(
            100.0 * np.count_nonzero((lab > 0) & (lungs > 0)) / np.count_nonzero(lungs > 0))
        if lung_like:
            print(f"note: {lung_like} Training would learn the lungs as lesions", file=sys.stderr)
    notes = []
    try:
        written = write_training_case(out, case, ct, image_like(lab, ct),
                                      None if lungs is None else image_like(lungs.astype("uint8"), ct),
                                      overwrite=args.overwrite,
                                      class_names=("background", "infection") if binary else None, notes=notes)
    except FileExistsError as e:
        raise InputError(f"{e}; give another --name, or --overwrite to replace that case") from None
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    kinds = "1 infection" if binary else "1 GGO, 2 consolidation"
    print(f"{case}: {len(written)} files in {out} ({', '.join(Path(p).relative_to(out).as_posix() for p in written)}; "
          f"labels {kinds}"
          f"{'' if lungs is not None else '; no lung mask: training finds the lungs'})")
    print(f"train on it: ssalesionseg train --cases {out} --init <model> ..."
          + (" --classes infection" if binary else ""))
    return 0


# --------------------------------------------------------------------------- bench

def cmd_bench(args) -> int:
    from .bench import format_report, run_bench

    res = run_bench(n_slices=args.slices, size=args.size, checkpoint=args.checkpoint, lungs=args.lungs,
                    lung_weights=args.lung_weights, device=args.device, batch_size=args.batch_size,
                    repeats=args.repeats, flip_tta=args.flip_tta, cpu_bf16=args.bf16)
    print(format_report(res))
    if args.json:
        from .io import atomic_path
        with atomic_path(args.json) as tmp:
            Path(tmp).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ssalesionseg", description=__doc__)
    add_subcommands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (InputError, ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
