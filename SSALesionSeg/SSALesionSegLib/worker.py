"""Runs the engine outside Slicer's GUI process (started by logic.BackgroundRun).

Protocol: one JSON object per stdout line, each with an "event":
  {"event": "progress", "stage": str, "fraction": float}
  {"event": "done", "labels": file, "lungs": file or null, "stats": file, "info": {...}}
  {"event": "error", "message": str}
Other stdout lines are log text. The output files appear (by rename) only after
they are completely written, and "done" is the last line of a successful run.

It calls the same ``segment_image`` as an in-process run, so both paths give the
same result; it imports neither Qt nor slicer.
"""

import argparse
import json
import os
import sys
import threading
import traceback

# exit code when the parent went away (its end of our stdin closed)
ORPHANED = 3


def emit(**message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def exit_when_parent_goes():
    """Slicer holds our stdin open and never writes to it; when Slicer exits or crashes the
    pipe closes, and a worker nobody waits for must not keep the GPU and a copy of the CT."""
    fd = sys.stdin.fileno()

    def watch():   # os.read on the descriptor: no lock that interpreter shutdown would wait for
        try:
            while os.read(fd, 1024):
                pass
        except OSError:
            pass
        os._exit(ORPHANED)
    threading.Thread(target=watch, daemon=True).start()


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--lungs", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--flip-tta", default="model")
    parser.add_argument("--checkpoint")
    parser.add_argument("--lung-mask")
    parser.add_argument("--module-dir")
    parser.add_argument("--exit-with-parent", action="store_true",
                        help="exit when stdin closes (the parent that started this worker is gone)")
    return parser.parse_args(argv)


def _json_safe(value):
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def main(argv=None):
    # The panel reads this pipe as UTF-8; a Windows child would write the locale's code page
    # (strictly: a non-ASCII path in a traceback then raised inside the error report).
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8", errors="backslashreplace")
    args = parse_args(argv if argv is not None else sys.argv[1:])
    if args.exit_with_parent:
        exit_when_parent_goes()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        import SimpleITK as sitk
        from SSALesionSegLib import engine as engine_

        engine = engine_.load_engine(args.module_dir)
        ct = sitk.ReadImage(args.input)
        lungMask = sitk.ReadImage(args.lung_mask) if args.lung_mask else None
        result = engine_.run_segmentation(
            engine, ct, args.lungs, args.checkpoint, args.device, lungMask,
            progress=lambda stage, fraction: emit(event="progress", stage=str(stage), fraction=float(fraction)),
            flipTTA=args.flip_tta)

        os.makedirs(args.output_dir, exist_ok=True)
        names = {"labels": "labels.nrrd", "lungs": "lungs.nrrd" if result.lungs is not None else None,
                 "stats": "stats.json"}
        for key, image in (("labels", result.labels), ("lungs", result.lungs)):
            if image is not None:
                partial = os.path.join(args.output_dir, "partial-" + names[key])
                sitk.WriteImage(image, partial, True)
                os.replace(partial, os.path.join(args.output_dir, names[key]))
        partial = os.path.join(args.output_dir, "partial-stats.json")
        with open(partial, "w", encoding="utf-8") as f:
            json.dump(_json_safe(result.stats), f, indent=2)
        os.replace(partial, os.path.join(args.output_dir, names["stats"]))
        emit(event="done", info=_json_safe(getattr(result, "info", {}) or {}),
             class_names=list(getattr(result, "class_names", None) or []) or None, **names)
        return 0
    except Exception as e:  # reported to the panel, which shows the message
        if _is_input_error(e):   # the engine's word on the input: the message is all there is to say
            emit(event="error", message=str(e))
        else:
            emit(event="error", message=f"{type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stdout)
        return 1


def _is_input_error(error):
    """An error the engine raises on purpose about what it was given (``errors.SSALesionSegError``),
    not a failure whose traceback helps."""
    engineErrors = sys.modules.get("ssalesionseg.errors")
    return engineErrors is not None and isinstance(error, getattr(engineErrors, "SSALesionSegError", ()))


if __name__ == "__main__":
    sys.exit(main())
