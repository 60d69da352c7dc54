"""Segment COVID-19 lesions in every CT of a folder, without the Slicer GUI.

Desktop Slicer:
  Slicer --no-main-window --python-script <module dir>/SSALesionSegBatch.py -- --input DIR --output DIR
Python with the slicer-core wheel:
  python <module dir>/SSALesionSegBatch.py --input DIR --output DIR

The cases are found as `ssalesionseg segment` finds them (the engine's
cli.find_cases): each NIfTI/NRRD/MHA file and each subfolder of --input (its DICOM
series — the CT series with the most slices, searched in its subfolders at any depth —
or the one CT file it holds, also deeper when none lies in the subfolder itself), or
--input itself when it is one DICOM series, and read by the engine's reader with its
checks; subfolders without images (empty, or only e.g. notes.txt) are no cases, which
one note says. --output receives <case>.seg.nrrd and <case>_stats.json
(and, for several cases, ssalesionseg_summary.csv as `segment` writes it: every case, its
status, the reason it failed, its figures);
a rerun skips a case whose outputs exist unless they were made from another input (or
from the same path before the CT there was replaced), with
another model or other settings, or the .seg.nrrd was edited since (that case fails;
--overwrite redoes it, keeping an edited .seg.nrrd as .bak). A failing case is reported and the rest
continue; the exit code is 1 if any case failed, 2 on bad arguments, when there is
nothing to process (no cases, or inputs that would write the same outputs) or on an
error outside the cases, as `segment`'s, and 130 on Ctrl-C (finished cases kept, the
summary written).

Slicer also loads every .py file of a module folder as a module; this file therefore
does its work only when run as a script (see the hidden module class at the end).
Outside the Slicer application it imports neither Qt nor, until it runs, slicer.
"""

import argparse
import importlib
import logging
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))


def _use_module_dir():
    if _MODULE_DIR not in sys.path:
        sys.path.insert(0, _MODULE_DIR)


def parse_args(argv):
    # Slicer forwards everything after the script path; "--" only separates
    # Slicer's own options from ours.
    argv = list(argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    _use_module_dir()
    from SSALesionSegLib import engine

    parser = argparse.ArgumentParser(
        prog="SSALesionSegBatch.py", description="Segment GGO and consolidation in every CT of a folder.")
    parser.add_argument("--input", required=True, help="folder of CT files and/or DICOM series folders")
    parser.add_argument("--output", required=True, help="folder for <case>.seg.nrrd and <case>_stats.json")
    parser.add_argument("--checkpoint", help="SSA-Net checkpoint (default: the bundled model)")
    parser.add_argument("--lungs", default="auto", choices=[m for m in engine.LUNG_METHODS if m != "existing"],
                        help="lung segmentation method (default: auto)")
    parser.add_argument("--device", default="auto", choices=list(engine.DEVICES), help="default: auto")
    parser.add_argument("--flip-tta", default="model", choices=list(engine.FLIP_TTA),
                        help="mirrored pass per slice: as the model records (default), on, or off (faster)")
    parser.add_argument("--overwrite", action="store_true", help="redo cases whose outputs exist")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.input):
        parser.error(f"--input is not a folder: {args.input}")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        parser.error(f"--output is a file, not a folder: {args.output}")
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        parser.error(f"--checkpoint not found: {args.checkpoint}")
    return args


def _engine_module(name):
    """A module of the engine (``ssalesionseg``: installed, else the bundled Logic/)."""
    _use_module_dir()
    from SSALesionSegLib import engine

    engine.import_engine_package(_MODULE_DIR)
    return importlib.import_module(f"{engine.ENGINE_PACKAGE}.{name}")


def find_cases(inputDir, outputDir=None, notes=None):
    """[(case name, path)] as `ssalesionseg segment` finds them; the tool's own outputs and
    the output folder are left out, so --output may lie inside --input. ``notes`` (a list,
    when given) receives what the user should hear: folders skipped for holding no images,
    CT files beside a DICOM series that are not cases. Raises the engine's InputError
    (with what to do) when there is nothing to process or two inputs would write the same
    outputs."""
    return _engine_module("cli").find_cases(inputDir, out=outputDir, notes=notes)


def read_case(path):
    """(CT image in HU, what was read) through the engine's reader — the checks ``ssalesionseg
    segment`` makes (a cut-off NIfTI, a DICOM series with a missing or duplicate slice,
    non-CT modalities, several patients in one folder, no HU ...), its DICOM series
    choice (the CT series with the most slices) and its gantry-tilt correction;
    ``read_notes`` says what it decided."""
    return _engine_module("io").read_ct(path)


def read_notes(readInfo):
    return _engine_module("io").read_notes(readInfo)


def rerun_problem(args, outputDir, caseName, path, modelSha):
    """Why the outputs of ``caseName`` already in ``outputDir`` must not be skipped or
    replaced unasked, by the rules of ``segment`` — ("input" | "model" | "settings", reason):
    made from another input, with another model or other settings named on the command line;
    ("edited", reason): the ``.seg.nrrd`` is not as this script wrote it — or None."""
    outputs = _engine_module("outputs")
    segPath = Path(outputDir, caseName + ".seg.nrrd")
    if not Path(outputDir, caseName + "_stats.json").exists():
        return "edited", f"{segPath} is not an output of this script (no stats JSON beside it): your own file?"
    other = outputs.outputs_from_other_input(outputDir, caseName, path)
    if other:
        return "input", f"its outputs were made from another input ({other})"
    other = outputs.input_changed_since(outputDir, caseName, path)
    if other:
        return "input", f"its outputs were made from {path} before it changed ({other})"
    other = outputs.outputs_from_other_model(outputDir, caseName, modelSha())
    if other:
        return "model", f"its outputs were made with another model ({other})"
    lungs = {"lobes": "lungmask"}.get(args.lungs, args.lungs)   # lobes are lungmask's, with LTRCLobes
    other = outputs.outputs_with_other_settings(outputDir, caseName, lungs=lungs,
                                                 flip_tta={"on": True, "off": False}.get(args.flip_tta))
    if other:
        return "settings", f"its outputs were made with other settings ({other})"
    if outputs.RecordedRun(outputDir, caseName).changed("segmentation", segPath):
        return "edited", f"{segPath} is not as this script wrote it (corrected in the Segment Editor?)"
    return None


class _Context:
    """Scene, volumes logic and processing logic, in or outside desktop Slicer."""

    def __init__(self):
        import slicer
        from SSALesionSegLib import mrml
        from SSALesionSegLib.logic import ProcessingLogic

        if getattr(slicer, "mrmlScene", None) is not None and hasattr(slicer, "modules"):
            self.scene = slicer.mrmlScene
            self.volumesLogic = slicer.modules.volumes.logic()
            import shutil
            python = shutil.which("PythonSlicer")
        else:
            self.headless = mrml.HeadlessScene()
            self.scene = self.headless.scene
            self.volumesLogic = self.headless.volumesLogic
            python = None
        self.logic = ProcessingLogic(self.scene, moduleDir=_MODULE_DIR, pythonExecutable=python)


def run_batch(args, context=None, out=print):
    """Process every case; returns the exit code (0 if all cases succeeded)."""
    import functools

    _use_module_dir()
    from SSALesionSegLib import mrml

    context = context or _Context()
    InputError = _engine_module("errors").InputError
    outputs = _engine_module("outputs")
    notes = []
    try:
        cases = find_cases(args.input, args.output, notes)
    except InputError as e:   # an input error, as `segment` ends on it
        out(f"Nothing processed: {e}")
        return 2
    for note in notes:
        out(f"note: {note}")
    os.makedirs(args.output, exist_ok=True)
    modelSha = functools.lru_cache(maxsize=None)(lambda: outputs.checkpoint_sha256(args.checkpoint))
    failed, skipped, said = [], [], set()
    status = {}   # case -> (status, reason), for the batch summary `segment` writes too
    for index, (caseName, path) in enumerate(cases, start=1):
        segPath = os.path.join(args.output, caseName + ".seg.nrrd")
        prefix = f"[{index}/{len(cases)}] {caseName}"
        nodes = []
        started = time.time()
        try:
            edited = []
            if os.path.exists(segPath):
                problem = rerun_problem(args, args.output, caseName, path, modelSha)
                if not args.overwrite:
                    if problem:   # old figures are not passed off as new, nor the user's work replaced
                        raise InputError(f"{problem[1]}; left as it is: give another --output, or --overwrite")
                    out(f"{prefix}: outputs exist, skipped (use --overwrite to redo)")
                    skipped.append(caseName)
                    status[caseName] = ("skipped", "outputs exist")
                    continue
                if problem and problem[0] == "edited":
                    edited = [segPath]   # replaced as asked, but kept
            ct, readInfo = read_case(path)
            for note in read_notes(readInfo):
                out(f"{prefix}: note: {note}")
            volume = mrml.add_volume_node_from_image(context.scene, ct, caseName)
            nodes.append(volume)
            lastStage = [None]

            def progress(stage, fraction, lastStage=lastStage):
                if stage != lastStage[0]:
                    out(f"{prefix}: {stage}")
                    lastStage[0] = stage

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = context.logic.process(volume, None, args.lungs, args.checkpoint, args.device,
                                               progressCallback=progress, waitForCompletion=True,
                                               flipTTA=args.flip_tta)
            nodes += [result.segmentationNode, result.tableNode]
            info = result.stats.setdefault("info", {})
            for key, value in (result.info or {}).items():   # the run's settings (an engine that kept them apart)
                info.setdefault(key, value)
            info.update(source=str(Path(path).absolute()), input=readInfo,   # what a rerun compares
                        input_stamp=outputs.input_stamp(path))
            # the file's own spacing (the scene's IJK-to-RAS round trip leaves ~1e-16 of noise on it)
            info.update({k: readInfo[k] for k in ("size", "spacing_mm") if k in readInfo})
            notices = list(info.get("notices") or []) + [str(w.message) for w in caught]
            with outputs.copies_kept(edited) as copies:
                context.logic.saveResults(result, args.output, caseName)
            for copy in copies:
                notices.insert(0, f"{os.path.basename(segPath)} was not as this script wrote it; --overwrite "
                                  f"replaced it, kept as {copy.name}")
            for message in dict.fromkeys(notices):   # one line each, in order; the same words once a batch
                if message not in said:
                    out(f"{prefix}: note: {message}")
                    said.add(message)
            out(f"{prefix}: {mrml.summary_line(result.stats)} ({time.time() - started:.1f} s)")
            status[caseName] = ("segmented", "")
        except KeyboardInterrupt:   # Ctrl-C: the summary of what was done, then one line (main)
            for name, _ in cases:
                status.setdefault(name, ("not run", "the batch was interrupted before it"))
            if len(cases) > 1:
                _engine_module("cli").write_batch_summary(Path(args.output), cases, status)
            raise
        except Exception as e:
            failed.append(caseName)
            status[caseName] = ("failed", f"{type(e).__name__}: {e}")
            out(f"{prefix}: FAILED: {type(e).__name__}: {e}")
            logging.info(traceback.format_exc())
        finally:
            mrml.remove_nodes(context.scene, nodes)
    done = len(cases) - len(failed) - len(skipped)
    if len(cases) > 1:
        summary = _engine_module("cli").write_batch_summary(Path(args.output), cases, status)
        out(f"Every case, one row each: {summary}")
    if failed:
        out(f"{len(failed)} of {len(cases)} cases failed: {', '.join(failed)}"
            + (f" ({done} segmented, {len(skipped)} skipped)" if done or skipped else ""))
        return 1
    out(f"All {len(cases)} cases done ({done} segmented, {len(skipped)} skipped); results in {args.output}")
    return 0


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run_batch(args)
    except KeyboardInterrupt:   # as `ssalesionseg segment` says it, with its exit status
        print("\nSSALesionSegBatch.py: interrupted: finished cases are kept (the same command without "
              "--overwrite skips them and segments the rest)", file=sys.stderr)
        return 130
    except Exception as e:
        # Slicer --no-main-window --python-script keeps running after an uncaught error:
        # report it and exit, so that a batch job never hangs.
        logging.info(traceback.format_exc())
        print(f"SSALesionSegBatch.py: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


# Slicer's module scan loads this file and expects a module class named after it;
# a hidden one keeps the scan quiet. Only inside the Slicer application, which has
# Qt anyway: elsewhere nothing here imports slicer or Qt.
if getattr(sys.modules.get("slicer"), "app", None) is not None:
    from slicer.ScriptedLoadableModule import ScriptedLoadableModule

    class SSALesionSegBatch(ScriptedLoadableModule):
        def __init__(self, parent):
            ScriptedLoadableModule.__init__(self, parent)
            self.parent.title = "SSALesionSeg batch script"
            self.parent.categories = ["Segmentation"]
            self.parent.hidden = True


if __name__ == "__main__":
    sys.exit(main())
