"""Segment COVID-19 lesions in every CT of a folder, without the Slicer GUI.

Desktop Slicer:
  Slicer --no-main-window --python-script <module dir>/SSALesionSegBatch.py -- --input DIR --output DIR
Python with the slicer-core wheel:
  python <module dir>/SSALesionSegBatch.py --input DIR --output DIR

The cases are found as `ssalesionseg segment` finds them (the engine's
cli.find_cases): each NIfTI/NRRD/MHA file and each subfolder of --input (its DICOM
series — the CT series with the most slices, searched in its subfolders too — or the
one CT file it holds), or --input itself when it is one DICOM series. --output receives
<case>.seg.nrrd and <case>_stats.json. A failing case is reported and the rest
continue; the exit code is 1 if any case failed or there was nothing to process (no
cases, or inputs that would write the same outputs), 2 on bad arguments or an error
outside the cases.

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


def find_cases(inputDir, outputDir=None):
    """[(case name, path)] as `ssalesionseg segment` finds them; the tool's own outputs and
    the output folder are left out, so --output may lie inside --input. Raises the
    engine's InputError (with what to do) when there is nothing to process or two inputs
    would write the same outputs."""
    return _engine_module("cli").find_cases(inputDir, out=outputDir)


def case_files(path):
    """(files for Slicer's reader, note or None): a CT file, or the DICOM series the
    engine would read from a folder (the CT series with the most slices)."""
    if os.path.isfile(path):
        return [str(path)], None
    from pathlib import Path

    files, info = _engine_module("io").dicom_series_choice(Path(path))
    return files, info.get("dicom_series_note")


def load_volume(volumesLogic, name, files):
    """Scalar volume node through Slicer's own reader (NIfTI, NRRD, MHA or a DICOM series)."""
    import vtk

    fileList = vtk.vtkStringArray()
    for path in files:
        fileList.InsertNextValue(path)
    node = volumesLogic.AddArchetypeVolume(files[0], name, 0, fileList if len(files) > 1 else None)
    if node is None:
        raise RuntimeError(f"Slicer could not read {files[0]}")
    return node


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
    _use_module_dir()
    from SSALesionSegLib import mrml

    context = context or _Context()
    InputError = _engine_module("errors").InputError
    try:
        cases = find_cases(args.input, args.output)
    except InputError as e:
        out(f"Nothing processed: {e}")
        return 1
    os.makedirs(args.output, exist_ok=True)
    failed = []
    for index, (caseName, path) in enumerate(cases, start=1):
        segPath = os.path.join(args.output, caseName + ".seg.nrrd")
        statsPath = os.path.join(args.output, caseName + "_stats.json")
        prefix = f"[{index}/{len(cases)}] {caseName}"
        if not args.overwrite and os.path.exists(segPath) and os.path.exists(statsPath):
            out(f"{prefix}: outputs exist, skipped (use --overwrite to redo)")
            continue
        nodes = []
        started = time.time()
        try:
            files, note = case_files(path)
            if note:
                out(f"{prefix}: note: {note}")
            volume = load_volume(context.volumesLogic, caseName, files)
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
            for message in dict.fromkeys(str(w.message) for w in caught):   # one line each, in order
                out(f"{prefix}: note: {message}")
            nodes += [result.segmentationNode, result.tableNode]
            context.logic.saveResults(result, args.output, caseName)
            out(f"{prefix}: {result.summary} ({time.time() - started:.1f} s)")
        except Exception as e:
            failed.append(caseName)
            out(f"{prefix}: FAILED: {type(e).__name__}: {e}")
            logging.info(traceback.format_exc())
        finally:
            mrml.remove_nodes(context.scene, nodes)
    if failed:
        out(f"{len(failed)} of {len(cases)} cases failed: {', '.join(failed)}")
        return 1
    out(f"All {len(cases)} cases done; results in {args.output}")
    return 0


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run_batch(args)
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
