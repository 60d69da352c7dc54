import enum
import logging
import os
import pathlib
import shutil
import sys

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# Slicer puts module folders on sys.path; this keeps the import working when the
# file is run some other way (e.g. by path from the Python console).
_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if _MODULE_DIR not in sys.path:
    sys.path.insert(0, _MODULE_DIR)

from SSALesionSegLib import dependencies, engine, mrml, phantom  # noqa: E402
from SSALesionSegLib.logic import ProcessingLogic, default_input_volume, missing_choice, replace_question  # noqa: E402


#
# SSALesionSeg
#


class SSALesionSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "COVID-19 Lesions (SSA-Net)"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["SSALesionSeg contributors"]
        self.parent.helpText = """
Segments COVID-19 lesions - ground-glass opacity (GGO) and consolidation - in chest CT
with SSA-Net, inside lungs found by lungmask (or a classical fallback), and reports
lesion volumes, percentage of lung involved, attenuation and a CT severity score.
Correct the result in the Segment Editor, recompute the statistics, and export corrected
cases for fine-tuning the model.
"""
        self.parent.acknowledgementText = """
SSA-Net: Wang et al., "SSA-Net: Spatial self-attention network for COVID-19 pneumonia
infection segmentation with semi-supervised few-shot learning", Medical Image Analysis 2022.
Lung masks: lungmask (Hofmanninger et al., European Radiology Experimental 2020).
"""
        slicer.app.connect("startupCompleted()", loadTerminology)


def loadTerminology():
    """Make the lesion types known to Slicer's terminology selector."""
    path = os.path.join(_MODULE_DIR, "Resources", "Terminology", "SSALesionSeg.term.json")
    try:  # segments still show names and colours without it
        if not slicer.modules.terminologies.logic().LoadTerminologyFromFile(path):
            logging.warning(f"SSALesionSeg: could not load terminology {path}")
    except Exception as e:
        logging.warning(f"SSALesionSeg: could not load terminology {path}: {e}")


#
# Parameter node
#


class LungMethod(enum.Enum):
    AUTO = "auto"
    LUNGMASK = "lungmask"
    LOBES = "lobes"
    CLASSICAL = "classical"
    EXISTING = "existing"

    def label(self):
        return engine.LUNG_METHODS[self.value]


class Device(enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def label(self):
        return engine.DEVICES[self.value]


class FlipTTA(enum.Enum):
    MODEL = "model"
    ON = "on"
    OFF = "off"

    def label(self):
        return engine.FLIP_TTA[self.value]


@parameterNodeWrapper
class SSALesionSegParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    lungMethod: LungMethod = LungMethod.AUTO
    lungSegmentation: vtkMRMLSegmentationNode
    useBundledModel: bool = True
    checkpointPath: pathlib.Path
    device: Device = Device.AUTO
    flipTTA: FlipTTA = FlipTTA.MODEL
    outputSegmentation: vtkMRMLSegmentationNode
    statisticsTable: vtkMRMLTableNode
    exportDirectory: pathlib.Path = pathlib.Path.home() / "SSALesionSeg-training-cases"


#
# SSALesionSegWidget
#


class SSALesionSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the panel to the parameter node and calls the logic; nothing more."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._installing = False   # dependencies being installed (pip runs processEvents)
        self._shownOutput = None   # the segmentation the summary label describes
        self._pollTimer = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SSALesionSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SSALesionSegLogic()
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(200)
        self._pollTimer.timeout.connect(self.onPollRun)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.showSegmentEditorButton.connect("clicked(bool)", self.onShowSegmentEditor)
        self.ui.recomputeStatisticsButton.connect("clicked(bool)", self.onRecomputeStatistics)
        self.ui.exportTrainingCaseButton.connect("clicked(bool)", self.onExportTrainingCase)
        self.ui.progressBar.setVisible(False)

        self.initializeParameterNode()

    def cleanup(self):
        self.cancelRun()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        # A run keeps going while another module is shown; only the bindings go.
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)

    def onSceneStartClose(self, caller, event):
        self.cancelRun()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        self._showSummary(None, "")
        self.ui.statusLabel.text = ""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = default_input_volume(slicer.mrmlScene)
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self._markUnavailableDevices()
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._updateGui()

    def _markUnavailableDevices(self):
        # connectGui refills the combo box, so this runs after every connection (and again
        # once PyTorch has been installed).
        available = cudaAvailable()
        index = [d for d in Device].index(Device.CUDA)
        item = self.ui.deviceComboBox.model().item(index)
        if item is not None:
            item.setEnabled(available)
        self.ui.deviceComboBox.setItemData(
            index, "" if available else "No CUDA GPU is available to this Slicer's PyTorch.", qt.Qt.ToolTipRole)

    def _showSummary(self, segmentationNode, text):
        self._shownOutput = segmentationNode
        self.ui.summaryLabel.text = text

    def _updateGui(self, caller=None, event=None):
        parameters = self._parameterNode
        running = self._run is not None
        busy = running or self._installing
        haveInput = bool(parameters and parameters.inputVolume)
        shown = self._shownOutput
        if parameters and shown is not None:
            current = parameters.outputSegmentation
            if current is None or current.GetID() != shown.GetID():
                self._showSummary(None, "")   # the figures shown belong to another segmentation
        self.ui.lungSegmentationSelector.enabled = bool(parameters) and parameters.lungMethod == LungMethod.EXISTING
        self.ui.checkpointPathLineEdit.enabled = bool(parameters) and not parameters.useBundledModel
        for widget in (self.ui.inputsCollapsibleButton, self.ui.modelCollapsibleButton, self.ui.outputsCollapsibleButton):
            widget.enabled = not busy
        if self._installing:
            self.ui.applyButton.text = "Apply"
            self.ui.applyButton.toolTip = "Installing the Python packages the segmentation needs..."
            self.ui.applyButton.enabled = False
        elif running:
            self.ui.applyButton.text = "Cancel"
            self.ui.applyButton.toolTip = "Stop the segmentation; the scene is left as it was."
            self.ui.applyButton.enabled = True
        else:
            reason = missing_choice(
                parameters.inputVolume, parameters.lungMethod.value, parameters.lungSegmentation,
                str(parameters.checkpointPath), checkpointRequired=not parameters.useBundledModel
            ) if parameters else "Select an input CT volume."
            self.ui.applyButton.text = "Apply"
            self.ui.applyButton.toolTip = reason or "Segment ground-glass opacity and consolidation."
            self.ui.applyButton.enabled = reason is None
        haveResult = haveInput and bool(parameters.outputSegmentation) and not busy
        for button in (self.ui.showSegmentEditorButton, self.ui.recomputeStatisticsButton,
                       self.ui.exportTrainingCaseButton):
            button.enabled = haveResult

    # -- run ----------------------------------------------------------------------

    def onApplyButton(self):
        if self._run is not None:
            self.cancelRun()
            return
        if self._installing:
            return
        parameters = self._parameterNode
        output = parameters.outputSegmentation
        question = replace_question(parameters.inputVolume, output)
        if question and not slicer.util.confirmOkCancelDisplay(question, windowTitle="Replace segmentation?"):
            return
        # Installing asks first (no wait cursor over the question) and runs pip, which
        # processes events: the panel stays disabled meanwhile.
        self._installing = True
        self._updateGui()
        try:
            with slicer.util.tryWithErrorDisplay("Failed to install the Python packages."):
                ready = self.logic.ensureDependencies()
        finally:
            self._installing = False
            self._markUnavailableDevices()
            self._updateGui()
        if not ready:
            return
        with slicer.util.tryWithErrorDisplay("Failed to start the segmentation.", waitCursor=True):
            checkpoint = None if parameters.useBundledModel else str(parameters.checkpointPath)
            self._run = self.logic.process(
                parameters.inputVolume, output, parameters.lungMethod.value, checkpoint, parameters.device.value,
                progressCallback=self.onProgress, waitForCompletion=False,
                lungSegmentation=parameters.lungSegmentation, statisticsTable=parameters.statisticsTable,
                flipTTA=parameters.flipTTA.value)
            self.ui.progressBar.value = 0
            self.ui.progressBar.format = "Starting: %p%"
            self.ui.progressBar.setVisible(True)
            self.ui.statusLabel.text = "Running in the background..."
            self._pollTimer.start()
        self._updateGui()

    def onProgress(self, stage, fraction):
        self.ui.progressBar.value = int(round(100 * max(0.0, min(1.0, fraction))))
        self.ui.progressBar.format = f"{stage}: %p%"

    def onPollRun(self):
        run = self._run
        if run is None:
            return
        try:
            with slicer.util.tryWithErrorDisplay("Segmentation failed."):
                result = run.poll()
        except Exception:
            self._endRun("Failed. See the error message.")
            raise
        if result is not None:
            self._endRun("Done.")
            self._showResult(result)

    def cancelRun(self):
        if self._run is None:
            return
        self._run.cancel()
        self._endRun("Cancelled. The scene was left unchanged.")

    def _endRun(self, status):
        self._pollTimer.stop()
        self._run = None
        self.ui.progressBar.setVisible(False)
        self.ui.statusLabel.text = status
        self._updateGui()

    def _showResult(self, result):
        parameters = self._parameterNode
        self._showSummary(result.segmentationNode, result.summary)
        parameters.outputSegmentation = result.segmentationNode
        parameters.statisticsTable = result.tableNode
        self.ui.resultsCollapsibleButton.collapsed = False
        showResultInViews(parameters.inputVolume, result.tableNode)

    # -- correction loop ----------------------------------------------------------

    def onShowSegmentEditor(self):
        with slicer.util.tryWithErrorDisplay("Failed to open the Segment Editor."):
            parameters = self._parameterNode
            slicer.util.selectModule("SegmentEditor")
            editor = slicer.modules.SegmentEditorWidget.editor
            editor.setSegmentationNode(parameters.outputSegmentation)
            if hasattr(editor, "setSourceVolumeNode"):
                editor.setSourceVolumeNode(parameters.inputVolume)
            else:  # Slicer < 5.2
                editor.setMasterVolumeNode(parameters.inputVolume)

    def onRecomputeStatistics(self):
        with slicer.util.tryWithErrorDisplay("Failed to recompute the statistics.", waitCursor=True):
            parameters = self._parameterNode
            result = self.logic.recomputeStatistics(
                parameters.inputVolume, parameters.outputSegmentation, parameters.statisticsTable)
            parameters.statisticsTable = result.tableNode
            self._showSummary(parameters.outputSegmentation, result.summary)
            showResultInViews(parameters.inputVolume, result.tableNode)

    def onExportTrainingCase(self):
        parameters = self._parameterNode
        outputDir = str(parameters.exportDirectory)
        overwrite = False
        caseName = mrml.safe_case_name(parameters.inputVolume.GetName())
        if mrml.existing_training_case_files(outputDir, caseName):
            if not slicer.util.confirmOkCancelDisplay(
                    f"Case '{caseName}' already exists in {outputDir}. Overwrite it?"):
                return
            overwrite = True
        with slicer.util.tryWithErrorDisplay("Failed to export the training case.", waitCursor=True):
            notes = []
            written = self.logic.exportTrainingCase(
                parameters.inputVolume, parameters.outputSegmentation, outputDir, caseName, overwrite, notes)
            self.ui.statusLabel.text = "\n".join(
                [f"Exported training case '{caseName}' ({len(written)} files) to {outputDir}"]
                + [f"Note: {note}" for note in notes])


def showResultInViews(volumeNode, tableNode):
    slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)
    layoutManager = slicer.app.layoutManager()
    if layoutManager is not None:
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
    selectionNode = slicer.app.applicationLogic().GetSelectionNode()
    selectionNode.SetActiveTableID(tableNode.GetID())
    slicer.app.applicationLogic().PropagateTableSelection()


_cudaAvailable = None


def cudaAvailable():
    """Whether this Slicer's PyTorch sees a CUDA GPU; not known (False, asked again next
    time) while PyTorch is not installed."""
    global _cudaAvailable
    if _cudaAvailable is None:
        if not dependencies.is_installed("torch"):
            return False
        try:
            import torch
            _cudaAvailable = bool(torch.cuda.is_available())
        except Exception:
            _cudaAvailable = False
    return _cudaAvailable


#
# SSALesionSegLogic
#


class SSALesionSegLogic(ProcessingLogic, ScriptedLoadableModuleLogic):
    """Slicer's face of SSALesionSegLib.logic.ProcessingLogic.

    ``process(inputVolume, outputSegmentation, lungMethod, checkpoint, device,
    progressCallback=None, waitForCompletion=True)`` is the single entry point used by
    the panel and the self-test (SSALesionSegBatch.py calls ProcessingLogic's directly).

    ProcessingLogic comes first: Slicer's ScriptedLoadableModuleLogic.__init__ calls
    super().__init__() without arguments, which must reach object, not ProcessingLogic.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        ProcessingLogic.__init__(self, slicer.mrmlScene, moduleDir=_MODULE_DIR,
                                 pythonExecutable=shutil.which("PythonSlicer") or sys.executable)

    def getParameterNode(self):
        return SSALesionSegParameterNode(super().getParameterNode())

    def ensureDependencies(self):
        """Ask, then install missing Python packages. False if the user declined."""
        if slicer.app.testingEnabled():
            return True
        return dependencies.ensure_dependencies(
            confirm=lambda text: slicer.util.confirmOkCancelDisplay(text, windowTitle="Install Python packages"),
            pipInstall=slicer.util.pip_install,
            installTorch=installTorch)


def installTorch():
    try:
        import PyTorchUtils
    except ImportError:
        return None
    return PyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=False, torchVersionRequirement=dependencies.TORCH_REQUIREMENT)


#
# SSALesionSegTest
#


class SSALesionSegTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_PhantomWithBundledModel()

    def test_PhantomWithBundledModel(self):
        self.delayDisplay("Building a phantom CT")
        ct, _, _ = phantom.make_phantom()
        volumeNode = mrml.add_volume_node_from_image(slicer.mrmlScene, ct, "Phantom CT")

        logic = SSALesionSegLogic()
        stages = []
        self.delayDisplay("Segmenting with the bundled model")
        result = logic.process(volumeNode, None, "auto", None, "auto",
                               progressCallback=lambda stage, fraction: stages.append(stage),
                               waitForCompletion=True)
        self.assertTrue(stages)

        segmentation = result.segmentationNode.GetSegmentation()
        specs = mrml.segment_specs(result.classNames)
        for spec in specs:
            segment = segmentation.GetSegment(spec.segmentId)
            self.assertIsNotNone(segment, spec.name)
            self.assertEqual(segment.GetName(), spec.name)
            self.assertEqual(segment.GetTerminology(), spec.terminology)
            for actual, expected in zip(segment.GetColor(), spec.color):
                self.assertAlmostEqual(actual, expected, places=5)

        values = mrml.table_values(result.tableNode)
        for key, value in mrml.flatten_stats(result.stats):
            if key in values:
                self.assertAlmostEqual(values[key], float(value), places=4)
        self.assertIn("lesions.infection.volume_ml", values)

        self.delayDisplay("Re-running into the same segmentation")
        again = logic.process(volumeNode, result.segmentationNode, "auto", None, "auto", waitForCompletion=True)
        self.assertIs(again.segmentationNode, result.segmentationNode)
        self.assertIs(again.tableNode, result.tableNode)
        self.assertEqual(segmentation.GetNumberOfSegments(), len(specs))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), 1)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLTableNode"), 1)
        self.delayDisplay("Test passed")
