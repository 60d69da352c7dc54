"""The one processing entry point shared by the panel, the self-test and the batch script.

No Qt: the panel drives a background run by calling ``BackgroundRun.poll`` from a
timer; headless callers pass ``waitForCompletion=True``.
"""

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

import numpy as np
import SimpleITK as sitk

from . import engine as engine_
from . import mrml

WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")


class Cancelled(Exception):
    """Raised by a waiting ``process`` call when its run was cancelled."""


class ProcessResult:
    def __init__(self, segmentationNode, tableNode, stats, info, summary, classNames=None):
        self.segmentationNode = segmentationNode
        self.tableNode = tableNode
        self.stats = stats
        self.info = info
        self.summary = summary
        self.classNames = classNames


def missing_choice(inputVolume, lungMethod, lungSegmentation=None, checkpoint=None, checkpointRequired=False):
    """What the user still has to choose before a run can start (a sentence), or None.

    The panel shows it on the disabled Apply button; ``process`` raises it as ValueError.
    ``checkpointRequired``: the user chose their own model file instead of the bundled one.
    """
    if inputVolume is None:
        return "Select an input CT volume."
    notCT = mrml.not_a_ct(inputVolume)
    if notCT:
        return notCT + "."
    if lungMethod == "existing" and lungSegmentation is None:
        return "Select the segmentation that holds the lungs, or choose another lung method."
    if checkpointRequired and not (checkpoint and os.path.isfile(os.fspath(checkpoint))):
        return "Choose a model file (.safetensors), or tick 'Use the bundled model'."
    return None


def default_input_volume(scene):
    """The panel's default input CT: the first plain scalar volume, the class the input selector
    lists (``GetFirstNodeByClass`` would also return a labelmap, a subclass), or None."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
        if node.GetClassName() == "vtkMRMLScalarVolumeNode":
            return node
    return None


def output_for(inputVolume, outputSegmentation):
    """(segmentation, why): the segmentation Apply writes ``inputVolume``'s results into — None
    for a new one — and, when that is not ``outputSegmentation``, a function of the new node's
    name giving the note that says why. Patient A's segmentation (made from another scan,
    ``mrml.other_ct_of``) is never overwritten with patient B's results, a segmentation under
    a transform that is non-linear relative to the CT (a warp) is not written into (the results
    would have to be warped), and a segmentation deleted while the run went on is replaced by a
    new one."""
    if outputSegmentation is None:
        return None, None
    name = outputSegmentation.GetName()
    if outputSegmentation.GetScene() is None:
        return None, lambda new: (f"the output segmentation '{name}' was deleted during the run: the results are in "
                                  f"a new segmentation, '{new}'")
    other = mrml.other_ct_of(outputSegmentation, inputVolume)
    if other is not None and outputSegmentation.GetSegmentation().GetNumberOfSegments() > 0:
        return None, lambda new: (f"'{name}' was made from '{other.GetName()}', not from '{inputVolume.GetName()}': "
                                  f"it was left as it was, with its table, and the results of "
                                  f"'{inputVolume.GetName()}' are in a new segmentation, '{new}'")
    warp = mrml.nonlinear_transform_between(outputSegmentation, inputVolume)
    if warp is not None:
        return None, lambda new: (f"'{name}' and '{inputVolume.GetName()}' are under different parent transforms, "
                                  f"and '{warp}' is non-linear: '{name}' was left as it was, as the results would "
                                  f"have been warped into it, and they are in a new segmentation, '{new}', under "
                                  f"the transform of '{inputVolume.GetName()}'")
    return outputSegmentation, None


def replace_question(inputVolume, outputSegmentation):
    """What the panel asks before Apply overwrites segments (a sentence naming them), or None
    when nothing is overwritten (no result segments of this module in it, or a new segmentation
    is made: :func:`output_for`). Segments of the user's named as results are said to be kept."""
    if outputSegmentation is None or outputSegmentation.GetSegmentation().GetNumberOfSegments() == 0:
        return None
    if output_for(inputVolume, outputSegmentation)[0] is None:
        return None
    replaced = mrml.result_segment_names(outputSegmentation)
    if not replaced:
        return None

    question = (f"The result segments {mrml.quoted_names(replaced)} in '{outputSegmentation.GetName()}', including "
                "any edits, will be replaced.")
    kept = mrml.namesake_segment_names(outputSegmentation)
    if kept:
        question += (f" Your own segment {mrml.quoted_names(kept)} (not made by this module) will be kept, the "
                     "result written into a new segment beside it." if len(kept) == 1 else
                     f" Your own segments {mrml.quoted_names(kept)} (not made by this module) will be kept, the "
                     "results written into new segments beside them.")
    return question + "\n\nTo keep them, choose 'Create new segmentation' as output instead."


def _unique(notes):
    return list(dict.fromkeys(notes))


def check_choices(lungMethod, checkpoint, device, flipTTA="model"):
    """Validate the panel's choices before anything runs; returns the checkpoint path or None."""
    if lungMethod not in engine_.LUNG_METHODS:
        raise ValueError(f"Unknown lung method '{lungMethod}'; expected one of {sorted(engine_.LUNG_METHODS)}")
    if device not in engine_.DEVICES:
        raise ValueError(f"Unknown device '{device}'; expected one of {sorted(engine_.DEVICES)}")
    if flipTTA not in engine_.FLIP_TTA:
        raise ValueError(f"Unknown mirrored-pass choice '{flipTTA}'; expected one of {sorted(engine_.FLIP_TTA)}")
    checkpoint = os.fspath(checkpoint) if checkpoint else None
    if checkpoint and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"Model checkpoint not found: {checkpoint}")
    return checkpoint


class ProcessingLogic:
    """Runs the engine on a volume node and puts the results into the scene."""

    def __init__(self, scene, engine=None, pythonExecutable=None, moduleDir=None):
        self.scene = scene
        self._engine = engine
        self.moduleDir = moduleDir or engine_.module_dir()
        # Desktop Slicer sets this to PythonSlicer; elsewhere the current interpreter.
        self.pythonExecutable = pythonExecutable or sys.executable
        self.workerEnvironment = None

    @property
    def engine(self):
        if self._engine is None:
            self._engine = engine_.load_engine(self.moduleDir)
        return self._engine

    @engine.setter
    def engine(self, value):
        self._engine = value

    # -- entry point --------------------------------------------------------

    def process(self, inputVolume, outputSegmentation, lungMethod="auto", checkpoint=None, device="auto",
                progressCallback=None, waitForCompletion=True, lungSegmentation=None,
                statisticsTable=None, cancelRequested=None, flipTTA="model"):
        """Segment GGO and consolidation in ``inputVolume``.

        ``outputSegmentation`` None creates a new segmentation node; an existing one has
        its result segments replaced in place. ``progressCallback(stage, fraction)``
        reports progress.

        With ``waitForCompletion`` the engine runs in this process and a ProcessResult is
        returned (``cancelRequested()`` returning True stops it; Cancelled is raised).
        Otherwise a started BackgroundRun is returned: the engine runs in a separate
        Python process, and nothing in the scene changes until ``poll()`` sees it finish,
        so cancelling leaves the scene as it was. ``flipTTA``: "model" (the checkpoint's
        setting), "on" or "off" (engine.FLIP_TTA).
        """
        reason = missing_choice(inputVolume, lungMethod, lungSegmentation)
        if reason:
            raise ValueError(reason)
        checkpoint = check_choices(lungMethod, checkpoint, device, flipTTA)
        ct = mrml.check_ct(inputVolume)   # before a worker starts, naming the volume
        lungMask = None
        notes = []   # the panel's own, before the engine's
        if lungMethod == "existing":
            lungMask = mrml.lung_mask_from_segmentation(lungSegmentation, inputVolume, notes)

        if not waitForCompletion:
            run = BackgroundRun(self, inputVolume, outputSegmentation, statisticsTable, progressCallback)
            run.notes = notes
            run.start(ct, lungMask, lungMethod, checkpoint, device, flipTTA)
            return run

        engine = self.engine   # loaded before the try: a missing engine is its own error
        try:
            result = engine_.run_segmentation(engine, ct, lungMethod, checkpoint, device, lungMask,
                                              progressCallback, cancelRequested, flipTTA)
        except engine.Cancelled as e:
            raise Cancelled(str(e) or "Cancelled") from e
        return self.applyResult(inputVolume, outputSegmentation, result.labels, result.lungs, result.stats,
                                getattr(result, "info", None), statisticsTable, getattr(result, "class_names", None),
                                notes)

    def applyResult(self, inputVolume, outputSegmentation, labels, lungs, stats, info=None, statisticsTable=None,
                    classNames=None, notes=None):
        """The engine's result into the scene; ``notes`` (the panel's own, e.g. on the lung
        segmentation) are listed before the engine's notices.

        The results go into ``outputSegmentation`` unless it was made from another scan or was
        deleted meanwhile (:func:`output_for`: then a new one, said in the notes). When the
        segmentation keeps segments of its own that count (e.g. a GGO segment the user added),
        the figures are those of the segmentation as it now stands, as Recompute gives them."""
        notes = list(notes or [])
        outputSegmentation, why = output_for(inputVolume, outputSegmentation)
        if statisticsTable is not None and statisticsTable.GetScene() is None:
            statisticsTable = None   # deleted during the run
        written = []
        segmentationNode = mrml.import_result_to_segmentation(
            self.scene, inputVolume, labels, lungs, outputSegmentation, classNames, notes=written)
        if why:
            notes.append(why(segmentationNode.GetName()))
        notes += written
        tableNode = mrml.ensure_statistics_table(self.scene, segmentationNode, statisticsTable, notes=notes)
        info = dict(info or {})
        notices = notes + list(info.get("notices") or [])
        stats, recountNotes = self._countKeptSegments(inputVolume, segmentationNode, labels, lungs, stats, classNames)
        notices = _unique(notices + recountNotes)
        mrml.stats_to_table(stats, tableNode)
        if notices:
            info["notices"] = notices
        if info:
            tableNode.SetAttribute("SSALesionSeg.Info", json.dumps(info, default=mrml._json_default))
        return ProcessResult(segmentationNode, tableNode, stats, info, mrml.summary_text(stats, notices), classNames)

    def _countKeptSegments(self, inputVolume, segmentationNode, labels, lungs, stats, classNames):
        """(stats, notes): the engine's ``stats`` while the segmentation holds only this run's
        result; when segments it kept (the user's) change what the engine's rule reads from it,
        the figures of the segmentation as it now stands — what Recompute would give."""
        kept = mrml.other_counted_segments(segmentationNode, classNames, lungs is not None)
        if not kept or labels is None:
            return stats, []
        notes = []
        result, figures, _ = self._segmentFigures(inputVolume, segmentationNode, notes)
        sameLungs = (result.lungs is None if lungs is None else
                     result.lungs is not None and np.array_equal(result.lungs, sitk.GetArrayViewFromImage(lungs)))
        if sameLungs and np.array_equal(result.lesions, sitk.GetArrayViewFromImage(labels)):
            return stats, []
        if isinstance(stats, dict) and "info" in stats:
            figures["info"] = stats["info"]   # the run's model and settings, for a saved stats JSON
        note = (f"the figures are those of '{segmentationNode.GetName()}' as it now stands, as Recompute gives "
                f"them: they also count {', '.join(kept)}, kept from before this run")
        if isinstance(stats, dict) and stats.get("lobes"):
            note += "; the per-lobe figures of this run (the model's labels alone) are left out"
        return figures, [note] + notes

    def _segmentFigures(self, inputVolume, segmentationNode, notes, ct=None):
        """(result, stats, classNames) of the segments as they stand (``mrml.result_from_segments``,
        the engine's ``compute_stats``); what either has to say goes into ``notes``."""
        result = mrml.result_from_segments(segmentationNode, inputVolume, notes=notes)
        classNames = ["background", "infection"] if result.binary else mrml._default_class_names()
        ct = ct if ct is not None else mrml.image_from_volume_node(inputVolume)
        lungs = mrml._image_on_volume(result.lungs, inputVolume)
        stats = self.engine.compute_stats(ct, mrml._image_on_volume(result.lesions, inputVolume), lungs,
                                          label_names=self.engine.label_names_for(classNames))
        notes += self.engine.figure_notes(stats, lungs, ct)   # with the CT: lungs cut by its padding
        return result, stats, classNames

    # -- correction loop -------------------------------------------------------

    @staticmethod
    def _checkCorrectionInputs(inputVolume, segmentationNode):
        """Recompute and Export measure the segments on the CT's HU: the CT is checked as Apply
        checks it (as ``ssalesionseg stats`` and ``export-case`` read ``--ct``), so a labelmap, an
        RGB image or stored values without the rescale give an error naming the volume, not
        figures of non-HU values."""
        if inputVolume is None:
            raise ValueError("Select the input CT volume the segmentation was made on.")
        if segmentationNode is None:
            raise ValueError("Select the segmentation to measure (the output segmentation of Apply).")
        return mrml.check_ct(inputVolume)

    def recomputeStatistics(self, inputVolume, segmentationNode, statisticsTable=None):
        """Statistics from the (edited) segments, written to the segmentation's table, read
        and checked as ``ssalesionseg stats`` reads a ``.seg.nrrd``; its notes are in
        ``info["notices"]`` and the summary — among them when the segmentation was made from
        another CT than ``inputVolume`` (as ``stats`` notes labels of another run)."""
        ct = self._checkCorrectionInputs(inputVolume, segmentationNode)
        notes = []
        other = mrml.other_ct_of(segmentationNode, inputVolume)
        if other is not None:
            notes.append(f"'{segmentationNode.GetName()}' was made from '{other.GetName()}', not from "
                         f"'{inputVolume.GetName()}': these are its segments measured on '{inputVolume.GetName()}'. "
                         f"Is it this CT's segmentation? (Select '{other.GetName()}' as input CT for its figures.)")
        _, stats, classNames = self._segmentFigures(inputVolume, segmentationNode, notes, ct)
        tableNode = mrml.ensure_statistics_table(self.scene, segmentationNode, statisticsTable, notes=notes)
        # the table's run info: marked as recomputed, the last Apply's settings kept, its notes not
        # (they were about the figures now replaced)
        try:
            previous = json.loads(tableNode.GetAttribute("SSALesionSeg.Info") or "{}")
        except ValueError:
            previous = {}
        run = previous.get("run", {}) if previous.get("recomputed") else {
            key: value for key, value in previous.items() if key != "notices"}
        info = {"recomputed": True, "segmentation": segmentationNode.GetName(), "inputVolume": inputVolume.GetName()}
        if run:
            info["run"] = run
        if notes:
            info["notices"] = notes
        stats["info"] = self._recomputedStatsInfo(inputVolume, segmentationNode, run, notes)
        mrml.stats_to_table(stats, tableNode)
        tableNode.SetAttribute("SSALesionSeg.Info", json.dumps(info, default=mrml._json_default))
        return ProcessResult(segmentationNode, tableNode, stats, info, mrml.summary_text(stats, notes), classNames)

    def _recomputedStatsInfo(self, inputVolume, segmentationNode, run, notes):
        """The ``info`` of recomputed figures, with the keys ``ssalesionseg stats`` writes (its
        ``cmd_stats``) where Slicer has the facts: the CT (its file, else its name), its grid, the
        labels (the segmentation's file, else its name), the lungs as the segmentation's own,
        ``recomputed_by`` (so ``segment`` keeps a saved JSON as the user's work), what made the
        labels (the last Apply's settings) and the notes."""
        outputs = mrml._engine_module("outputs")
        read = mrml.volume_info(inputVolume)
        info = {"source": read["input"], "size": read["size"], "spacing_mm": read["spacing_mm"], "input": read,
                "labels": mrml.file_or_name(segmentationNode), "lung_method": outputs.LUNGS_FROM_LABELS,
                "recomputed_by": "SSALesionSeg Recompute statistics (3D Slicer)"}
        madeBy = run.get("labels_made_by") or {key: run[key] for key in outputs.MADE_BY if key in run}
        if madeBy:
            info["labels_made_by"] = madeBy
        if notes:
            info["notices"] = list(notes)
        return info

    def exportTrainingCase(self, inputVolume, segmentationNode, outputDir, caseName=None, overwrite=False,
                           notes=None):
        """The (edited) result as a training case (``mrml.export_training_case``); what the
        export has to say (segments not used, lesions outside the lung mask) goes into ``notes``."""
        self._checkCorrectionInputs(inputVolume, segmentationNode)
        return mrml.export_training_case(inputVolume, segmentationNode, outputDir, caseName, overwrite, notes)

    def saveResults(self, result, outputDir, caseName):
        """``<case>.seg.nrrd`` and ``<case>_stats.json`` (as the engine's CLI names them)."""
        os.makedirs(outputDir, exist_ok=True)
        segPath = os.path.join(outputDir, caseName + ".seg.nrrd")
        statsPath = os.path.join(outputDir, caseName + "_stats.json")
        partialSeg, partialStats = segPath + ".partial.seg.nrrd", statsPath + ".partial"
        try:   # both written before either replaces an earlier result, so a pair always matches
            mrml.save_segmentation(result.segmentationNode, partialSeg)
            # the stats JSON lists the .seg.nrrd with its hash, as `segment` does: a rerun can then
            # tell this file from one corrected in place
            info = result.stats.setdefault("info", {})
            # the notes the panel showed (its own, the engine's, on kept segments), not the engine's alone
            notices = _unique(list((result.info or {}).get("notices") or []) + list(info.get("notices") or []))
            if notices:
                info["notices"] = notices
            info["outputs"] = {"segmentation": os.path.abspath(segPath), "stats_json": os.path.abspath(statsPath)}
            engine_.import_engine_package(self.moduleDir)
            from ssanet.checkpoint import sha256_of   # the hash `segment` records, by the same function
            info["outputs_sha256"] = {"segmentation": sha256_of(partialSeg)}
            with open(partialStats, "w", encoding="utf-8") as f:
                f.write(mrml.stats_to_json(result.stats))
            os.replace(partialSeg, segPath)
            os.replace(partialStats, statsPath)
        finally:
            for partial in (partialSeg, partialStats):
                if os.path.exists(partial):
                    os.remove(partial)
        return segPath, statsPath


class BackgroundRun:
    """One engine run in a separate Python process (see worker.py for the protocol).

    ``poll()`` is called from the GUI thread (a QTimer in the panel). It forwards
    progress, and when the worker has finished it reads the outputs and writes them
    into the scene, in that same thread.
    """

    RUNNING, FINISHED, FAILED, CANCELLED = "running", "finished", "failed", "cancelled"

    def __init__(self, logic, inputVolume, outputSegmentation, statisticsTable, progressCallback):
        self.logic = logic
        self.inputVolume = inputVolume
        self.outputSegmentation = outputSegmentation
        self.statisticsTable = statisticsTable
        self.progressCallback = progressCallback
        self.notes = []   # the panel's own notes, listed before the engine's
        self.state = None
        self.result = None
        self.error = None
        self.log = []
        self.process = None
        self.workDir = None
        self.inputPath = None
        self._lines = queue.Queue()
        self._reader = None
        self._done = None

    def command(self, inputPath, outputDir, lungMaskPath, lungMethod, checkpoint, device, flipTTA="model"):
        command = [self.logic.pythonExecutable, WORKER_SCRIPT, "--input", inputPath, "--output-dir", outputDir,
                   "--lungs", lungMethod, "--device", device, "--flip-tta", flipTTA,
                   "--module-dir", self.logic.moduleDir, "--exit-with-parent"]
        if checkpoint:
            command += ["--checkpoint", checkpoint]
        if lungMaskPath:
            command += ["--lung-mask", lungMaskPath]
        return command

    def start(self, ct, lungMask, lungMethod, checkpoint, device, flipTTA="model"):
        self.workDir = tempfile.mkdtemp(prefix="SSALesionSeg-")
        try:
            inputPath = self.inputPath = os.path.join(self.workDir, "input.nrrd")
            sitk.WriteImage(ct, inputPath)
            lungMaskPath = None
            if lungMask is not None:
                lungMaskPath = os.path.join(self.workDir, "lung_mask.nrrd")
                sitk.WriteImage(lungMask, lungMaskPath, True)
            outputDir = os.path.join(self.workDir, "output")
            self.process = launch(self.command(inputPath, outputDir, lungMaskPath, lungMethod, checkpoint, device,
                                               flipTTA),
                                  self.logic.workerEnvironment)
        except BaseException:
            self._cleanup()
            raise
        self.outputDir = outputDir
        self.state = self.RUNNING
        self._reader = threading.Thread(target=self._readOutput, daemon=True)
        self._reader.start()

    def _readOutput(self):
        # A thread, because reading a pipe blocks and the GUI thread must not.
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def poll(self):
        """Handle new output. Returns the ProcessResult once the run has finished and its
        results are in the scene, None while it runs (or after a cancel). Raises
        RuntimeError if the worker failed."""
        if self.state != self.RUNNING:
            return self.result if self.state == self.FINISHED else None
        finished = False
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                finished = True
                break
            self._handleLine(line)
        if not finished:
            return None
        returnCode = self.process.wait()
        try:
            if returnCode != 0 or self._done is None:
                message = self.error or exit_message(returnCode)
                tail = "\n".join(self.log[-20:])
                raise RuntimeError(message + (f"\n\nProcess output:\n{tail}" if tail else ""))
            self.result = self._applyOutputs()
            self.state = self.FINISHED
            return self.result
        except BaseException:
            self.state = self.FAILED
            raise
        finally:
            self._cleanup()

    def wait(self, pollInterval=0.1):
        """Block until finished (for scripts and tests)."""
        import time
        while True:
            result = self.poll()
            if result is not None or self.state != self.RUNNING:
                return result
            time.sleep(pollInterval)

    def _handleLine(self, line):
        message = None
        if line.startswith("{"):
            try:
                message = json.loads(line)
            except ValueError:
                message = None
        if not isinstance(message, dict) or "event" not in message:
            self.log.append(line)
            logging.debug("SSALesionSeg worker: %s", line)
            return
        event = message["event"]
        if event == "progress" and self.progressCallback:
            self.progressCallback(message.get("stage", ""), float(message.get("fraction", 0.0)))
        elif event == "done":
            self._done = message
        elif event == "error":
            self.error = message.get("message", "The segmentation failed")

    def _applyOutputs(self):
        labels = sitk.ReadImage(os.path.join(self.outputDir, self._done["labels"]))
        lungsFile = self._done.get("lungs")
        lungs = sitk.ReadImage(os.path.join(self.outputDir, lungsFile)) if lungsFile else None
        with open(os.path.join(self.outputDir, self._done["stats"]), encoding="utf-8") as f:
            stats = json.load(f)
        info = self._done.get("info", {})
        if self.inputVolume.GetScene() is None:
            raise RuntimeError(f"The input CT '{self.inputVolume.GetName()}' was deleted during the run: its results "
                               "were not put into the scene")
        reference = mrml.image_from_volume_node(self.inputVolume)
        changed = self._inputChange(labels, reference)
        if changed:
            raise RuntimeError(f"The input CT '{self.inputVolume.GetName()}' was changed during the run ({changed}): "
                               "its results were not put into the scene. Press Apply again to segment it as it is now")
        # Files drop the geometry's last few bits; the CT's grid is the reference.
        labels.CopyInformation(reference)
        if lungs is not None:
            lungs.CopyInformation(reference)
        return self.logic.applyResult(self.inputVolume, self.outputSegmentation, labels, lungs, stats, info,
                                      self.statisticsTable, self._done.get("class_names"), self.notes)

    def _inputChange(self, labels, reference):
        """What of the input CT changed since the run started (e.g. resampled or filtered in place
        meanwhile), or None: the results would be put on, and measured against, another image."""
        try:
            mrml.check_same_grid(labels, self.inputVolume)
        except ValueError:
            return "its voxel grid is not the one segmented"
        segmented = sitk.ReadImage(self.inputPath)
        if not np.array_equal(sitk.GetArrayViewFromImage(segmented), sitk.GetArrayViewFromImage(reference)):
            return "its voxel values are not those segmented"
        return None

    def cancel(self):
        """Stop the worker (and anything it started); the scene is not touched."""
        if self.state != self.RUNNING:
            return
        self.state = self.CANCELLED
        kill_process_tree(self.process)
        self._cleanup()

    def _cleanup(self):
        if self.process is not None and self.process.poll() is None:
            kill_process_tree(self.process)
        if self.process is not None and self.process.stdin is not None:
            self.process.stdin.close()
        if self._reader is not None and self._reader.is_alive():
            self._reader.join(timeout=2)   # the killed worker's pipe ends: the reader sees EOF
        if self.process is not None and self.process.stdout is not None and (
                self._reader is None or not self._reader.is_alive()):
            self.process.stdout.close()
        if self.workDir:
            shutil.rmtree(self.workDir, ignore_errors=True)
            self.workDir = None


def exit_message(returnCode):
    """What a worker's exit code without an error report means, and what to do."""
    if returnCode in (-9, 137):   # SIGKILL: on Linux nearly always the kernel's out-of-memory killer
        # Not "crop the CT": an in-plane crop that cuts into the lungs gives wrong lung masks and figures.
        return ("The segmentation process was killed (code %d), most likely for lack of memory. "
                "Close other programs or large scenes and try again, or use the GPU. To make the CT "
                "smaller, crop it in Crop Volume only above and below the lungs, keeping the whole "
                "chest in-plane: a crop that cuts into the lungs gives wrong lung masks and figures." % returnCode)
    return (f"The segmentation process exited with code {returnCode} without reporting an error; "
            "its output is below.")


def launch(command, environment=None):
    """Start the worker in its own process group, so that cancelling can stop the
    whole tree (slicer.util.launchConsoleProcess offers no process group)."""
    kwargs = {}
    if os.name == "nt":
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
    else:
        kwargs["start_new_session"] = True
    env = os.environ.copy()
    env["PYTHONIOENCODING"] = "utf-8"   # the pipe is read as UTF-8 (Windows children use the code page)
    env.update(environment or {})
    # stdin is a pipe this process never writes to: when it exits or crashes the pipe
    # closes and the worker (started with --exit-with-parent) stops too
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.PIPE,
                            text=True, encoding="utf-8", errors="replace", bufsize=1, env=env, **kwargs)


def kill_process_tree(process):
    if process.poll() is not None:
        return
    try:
        if os.name == "nt":
            done = subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True,
                                  creationflags=subprocess.CREATE_NO_WINDOW)
            if done.returncode != 0:
                process.kill()
        else:
            os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        process.kill()
    process.wait()
