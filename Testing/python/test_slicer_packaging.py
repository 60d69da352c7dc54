"""Packaging of the Slicer module: the .ui parses and matches the widget code, the
parameter node bindings line up, CMake ships every file, the extension metadata is
complete, and the module file itself imports and its self-test runs (with Slicer's
Qt-only pieces stubbed and the fake engine)."""

import ast
import importlib.util
import json
import glob
import os
import re
import shutil
import subprocess
import sys
import types
import unittest
import xml.etree.ElementTree as ET

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MODULE_DIR = os.path.join(REPO, "SSALesionSeg")
MODULE_FILE = os.path.join(MODULE_DIR, "SSALesionSeg.py")
UI_FILE = os.path.join(MODULE_DIR, "Resources", "UI", "SSALesionSeg.ui")
if MODULE_DIR not in sys.path:
    sys.path.insert(0, MODULE_DIR)


def module_tree():
    with open(MODULE_FILE, encoding="utf-8") as f:
        return ast.parse(f.read(), MODULE_FILE)


def ui_names_used_by_widget_code():
    """Every NAME in ``self.ui.NAME`` of SSALesionSeg.py."""
    names = set()
    for node in ast.walk(module_tree()):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ui" and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"):
            names.add(node.attr)
    return names


def parameter_node_fields():
    for node in ast.walk(module_tree()):
        if isinstance(node, ast.ClassDef) and node.name == "SSALesionSegParameterNode":
            return {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    raise AssertionError("SSALesionSegParameterNode not found")


def ui_widgets():
    """{objectName: (class, SlicerParameterName or None)} from the .ui XML."""
    widgets = {}
    for widget in ET.parse(UI_FILE).iter("widget"):
        parameter = None
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                parameter = prop.find("string").text
        widgets[widget.get("name")] = (widget.get("class"), parameter)
    return widgets


# ---------------------------------------------------------------------------
# .ui
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loaded_ui():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    QtCore = pytest.importorskip("PySide6.QtCore")
    QtWidgets = pytest.importorskip("PySide6.QtWidgets")
    QtUiTools = pytest.importorskip("PySide6.QtUiTools")
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    loader = QtUiTools.QUiLoader()
    uiFile = QtCore.QFile(UI_FILE)
    assert uiFile.open(QtCore.QIODevice.ReadOnly)
    try:
        widget = loader.load(uiFile)
    finally:
        uiFile.close()
    assert widget is not None, loader.errorString()
    yield widget, QtWidgets
    widget.deleteLater()
    app.processEvents()


def test_ui_loads_with_pyside6_and_has_every_widget_the_code_uses(loaded_ui):
    widget, QtWidgets = loaded_ui
    found = {child.objectName() for child in widget.findChildren(QtWidgets.QWidget)}
    used = ui_names_used_by_widget_code()
    assert {"applyButton", "progressBar", "deviceComboBox", "recomputeStatisticsButton"} <= used
    assert used - found == set(), "widgets used in SSALesionSeg.py but missing from the .ui"


def test_ui_bindings_match_the_parameter_node():
    fields = parameter_node_fields()
    bound = {parameter: name for name, (_, parameter) in ui_widgets().items() if parameter}
    assert set(bound) == fields, "every parameter is bound to exactly the widgets in the .ui"
    classes = {name: cls for name, (cls, _) in ui_widgets().items()}
    # The parameter node wrapper connects only these exact widget classes to these types.
    expected = {"inputVolume": "qMRMLNodeComboBox", "lungSegmentation": "qMRMLNodeComboBox",
                "outputSegmentation": "qMRMLNodeComboBox", "statisticsTable": "qMRMLNodeComboBox",
                "lungMethod": "QComboBox", "device": "QComboBox", "flipTTA": "QComboBox",
                "useBundledModel": "QCheckBox",
                "checkpointPath": "ctkPathLineEdit", "exportDirectory": "ctkDirectoryButton"}
    assert {parameter: classes[name] for parameter, name in bound.items()} == expected


def test_ui_node_selectors_follow_the_scene():
    root = ET.parse(UI_FILE).getroot()
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    selectors = {name for name, (cls, _) in ui_widgets().items() if cls == "qMRMLNodeComboBox"}
    assert receivers == selectors


# ---------------------------------------------------------------------------
# CMake
# ---------------------------------------------------------------------------

def module_files():
    """Files the module must ship, relative to the module folder."""
    files = set()
    for root, dirs, names in os.walk(MODULE_DIR):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in names:
            # The build file and the module's developer README are not installed; resource
            # notes (model card, sample attribution) are.
            if name.endswith(".pyc") or name == "CMakeLists.txt" or (
                    os.path.samefile(root, MODULE_DIR) and name == "README.md"):
                continue
            files.add(os.path.relpath(os.path.join(root, name), MODULE_DIR).replace(os.sep, "/"))
    return files


def test_cmake_lists_every_script_and_resource_statically():
    text = open(os.path.join(MODULE_DIR, "CMakeLists.txt"), encoding="utf-8").read().replace("${MODULE_NAME}",
                                                                                               "SSALesionSeg")
    listed = set(re.findall(r"^\s+([\w./-]+\.\w+)\s*$", text, re.MULTILINE))
    ours = {f for f in module_files() if not f.startswith("Logic/")}
    assert ours - listed == set(), "module files missing from SSALesionSeg/CMakeLists.txt"
    assert listed - module_files() == set(), "CMakeLists.txt lists files that do not exist"
    assert "GLOB_RECURSE _engine_files" in text and "Logic/*" in text
    assert "WITH_GENERIC_TESTS" in text and "slicer_add_python_unittest(SCRIPT SSALesionSeg.py)" in text


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_evaluates_to_every_script_and_resource(tmp_path):
    # Evaluate the real CMakeLists.txt with the two Slicer macros replaced by recorders.
    (tmp_path / "CMakeLists.txt").write_text(f"""
cmake_minimum_required(VERSION 3.16)
project(check NONE)
function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(M "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${{ARGN}})
  file(WRITE "{tmp_path.as_posix()}/scripts.txt" "${{M_SCRIPTS}}")
  file(WRITE "{tmp_path.as_posix()}/resources.txt" "${{M_RESOURCES}}")
endfunction()
function(slicer_add_python_unittest)
endfunction()
function(ctkMacroCompilePythonScript)
  cmake_parse_arguments(P "" "TARGET_NAME;SOURCE_DIR;DESTINATION_DIR;INSTALL_DIR" "SCRIPTS" ${{ARGN}})
  file(WRITE "{tmp_path.as_posix()}/ssanet.txt" "${{P_SCRIPTS}}")
endfunction()
set(BUILD_TESTING ON)
add_subdirectory("{MODULE_DIR.replace(os.sep, '/')}" module)
""")
    completed = subprocess.run(["cmake", "-S", str(tmp_path), "-B", str(tmp_path / "build")],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    scripts = set((tmp_path / "scripts.txt").read_text().split(";"))
    resources = set((tmp_path / "resources.txt").read_text().split(";")) - {""}
    assert scripts | resources == module_files()
    assert all(s.endswith(".py") for s in scripts) and not any(r.endswith(".py") for r in resources)
    # the network package ships beside the module so desktop Slicer can import it
    shipped = set((tmp_path / "ssanet.txt").read_text().split(";"))
    training = os.path.join(REPO, "Training")
    expected = {os.path.relpath(p, training).replace(os.sep, "/")
                for p in glob.glob(os.path.join(training, "ssanet", "*.py"))}
    assert shipped == expected and "ssanet/model.py" in shipped


def test_extension_metadata():
    text = open(os.path.join(REPO, "CMakeLists.txt"), encoding="utf-8").read()
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                     "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf'set\({variable} "[^"]+"\)', text), variable
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in text
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text
    assert "add_subdirectory(SSALesionSeg)" in text
    assert "find_package(Slicer REQUIRED)" in text and "Slicer_EXTENSION_CPACK" in text


def test_icon_is_a_128px_png():
    Image = pytest.importorskip("PIL.Image")
    with Image.open(os.path.join(MODULE_DIR, "Resources", "Icons", "SSALesionSeg.png")) as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)


def test_terminology_file_knows_every_code_the_engine_writes():
    from SSALesionSegLib import engine
    engine.import_engine_package(MODULE_DIR)
    import importlib
    terminology = importlib.import_module("ssalesionseg.terminology")
    with open(os.path.join(MODULE_DIR, "Resources", "Terminology", "SSALesionSeg.term.json"), encoding="utf-8") as f:
        termFile = json.load(f)
    assert termFile["SegmentationCategoryTypeContextName"] == terminology.CONTEXT

    def code(entry):
        return (entry["CodingSchemeDesignator"], entry["CodeValue"], entry["CodeMeaning"])

    known = set()
    for category in termFile["SegmentationCodes"]["Category"]:
        for typ in category["Type"]:
            known.add((code(category), code(typ), terminology.NONE))
            for modifier in typ.get("Modifier", []):
                known.add((code(category), code(typ), code(modifier)))
    for name, (category, typ, modifier, _, _, _) in terminology.SEGMENTS.items():
        assert (category, typ, modifier) in known, name


def test_scripts_compile():
    for path in module_files():
        if path.endswith(".py") and not path.startswith("Logic/"):
            with open(os.path.join(MODULE_DIR, path), encoding="utf-8") as f:
                compile(f.read(), path, "exec")


# ---------------------------------------------------------------------------
# Dependency installation plan
# ---------------------------------------------------------------------------

def test_dependencies_never_pip_install_torch_or_simpleitk():
    from SSALesionSegLib import dependencies
    installed = {"numpy", "scipy", "SimpleITK"}
    pipCalls, torchCalls, questions = [], [], []
    ok = dependencies.ensure_dependencies(
        confirm=lambda text: questions.append(text) or True, pipInstall=pipCalls.append,
        installTorch=lambda: torchCalls.append(1) or object(), isInstalled=lambda name: name in installed)
    assert ok and len(questions) == 1 and "torch" in questions[0]
    assert torchCalls == [1]
    assert pipCalls[0] == "lungmask --no-deps"
    assert not any(call.split()[0].lower() in ("torch", "simpleitk") for call in pipCalls)
    assert {"scikit-image", "fill_voids", "more-itertools", "tqdm", "pydicom"} <= set(pipCalls)
    assert "numpy" not in pipCalls


def test_dependencies_ask_first_and_do_nothing_when_declined_or_complete():
    from SSALesionSegLib import dependencies
    calls = []
    assert not dependencies.ensure_dependencies(confirm=lambda text: False, pipInstall=calls.append,
                                                installTorch=lambda: calls.append("torch"),
                                                isInstalled=lambda name: False)
    assert dependencies.ensure_dependencies(confirm=lambda text: calls.append("asked"), pipInstall=calls.append,
                                            installTorch=lambda: calls.append("torch"),
                                            isInstalled=lambda name: True)
    assert calls == []
    with pytest.raises(RuntimeError, match="PyTorch"):
        dependencies.ensure_dependencies(confirm=lambda text: True, pipInstall=calls.append,
                                         installTorch=lambda: None, isInstalled=lambda name: name != "torch")


# ---------------------------------------------------------------------------
# The module file itself, with Slicer's Qt-only parts stubbed
# ---------------------------------------------------------------------------

@pytest.fixture
def module_with_stubbed_qt(monkeypatch):
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    from SSALesionSegLib import mrml

    class ScriptedLoadableModuleLogic:
        # as Slicer's own (Base/Python/slicer/ScriptedLoadableModule.py since 5.0): a
        # cooperative __init__ that calls super().__init__() with no arguments
        def __init__(self, parent=None):
            super().__init__()
            self.moduleName = self.__class__.__name__.removesuffix("Logic")
            self.isSingletonParameterNode = True

        def getParameterNode(self):
            return None

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            pass

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    scripted.ScriptedLoadableModule = type("ScriptedLoadableModule", (), {})
    scripted.ScriptedLoadableModuleWidget = type("ScriptedLoadableModuleWidget", (), {})
    scripted.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    scripted.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    monkeypatch.setitem(sys.modules, "qt", types.ModuleType("qt"))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", scripted)
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", wrapper)
    headless = mrml.HeadlessScene()
    monkeypatch.setattr(slicer, "mrmlScene", headless.scene, raising=False)

    spec = importlib.util.spec_from_file_location("SSALesionSeg_under_test", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, headless


def test_module_file_defines_the_template_classes(module_with_stubbed_qt):
    module, _ = module_with_stubbed_qt
    for name in ("SSALesionSeg", "SSALesionSegWidget", "SSALesionSegLogic", "SSALesionSegTest",
                 "SSALesionSegParameterNode"):
        assert hasattr(module, name), name
    assert [m.label() for m in module.LungMethod][0].startswith("Automatic")
    assert module.Device.CUDA.label() == "GPU (CUDA)"
    import inspect
    parameters = list(inspect.signature(module.SSALesionSegLogic.process).parameters)
    assert parameters[:8] == ["self", "inputVolume", "outputSegmentation", "lungMethod", "checkpoint", "device",
                              "progressCallback", "waitForCompletion"]


def test_logic_builds_under_slicers_cooperative_base_class(module_with_stubbed_qt):
    """The panel's setup() and the self-test build SSALesionSegLogic(); with Slicer's base
    class calling super().__init__() that must not reach ProcessingLogic without a scene."""
    module, headless = module_with_stubbed_qt
    logic = module.SSALesionSegLogic()
    assert logic.scene is headless.scene and logic.moduleName == "SSALesionSeg"
    assert logic.isSingletonParameterNode and os.path.isdir(logic.moduleDir)


def test_self_test_passes_with_the_fake_engine(module_with_stubbed_qt, monkeypatch, tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    from test_slicer_mrml import load_fake_engine, write_fake_engine  # the same fake as the MRML tests
    from SSALesionSegLib import engine as engine_
    from SSALesionSegLib import phantom

    module, headless = module_with_stubbed_qt
    _, labels, lungs = phantom.make_phantom()  # what the self-test builds
    for name, image in (("labels", labels), ("lungs", lungs)):
        sitk.WriteImage(image, str(tmp_path / f"{name}.nrrd"))
        monkeypatch.setenv(f"FAKE_ENGINE_{name.upper()}", str(tmp_path / f"{name}.nrrd"))
    fake = load_fake_engine(write_fake_engine(str(tmp_path / "engine")), "fake_selftest_engine")
    monkeypatch.setattr(engine_, "load_engine", lambda moduleDir=None: fake)

    result = unittest.TextTestRunner(stream=open(os.devnull, "w")).run(module.SSALesionSegTest("runTest"))
    assert result.wasSuccessful(), result.failures + result.errors
    assert headless.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    node = headless.scene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    assert node.GetSegmentation().GetSegment("Consolidation").GetColor()[1] > 0.7


def test_panel_apply_button_says_what_is_missing(module_with_stubbed_qt, tmp_path):
    """The panel's own enable logic (_updateGui), run on plain stand-ins for the Qt widgets
    and the parameter node: Apply is enabled only when a run can start, and its tooltip
    names what is missing; the summary of one segmentation is not shown beside another."""
    import pathlib
    module, headless = module_with_stubbed_qt

    class Widget(types.SimpleNamespace):
        enabled, text, toolTip, collapsed = True, "", "", True

    names = ("inputsCollapsibleButton", "modelCollapsibleButton", "outputsCollapsibleButton", "applyButton",
             "lungSegmentationSelector", "checkpointPathLineEdit", "showSegmentEditorButton",
             "recomputeStatisticsButton", "exportTrainingCaseButton", "summaryLabel", "statusLabel")
    panel = module.SSALesionSegWidget.__new__(module.SSALesionSegWidget)
    panel.ui = types.SimpleNamespace(**{n: Widget() for n in names})
    panel._run, panel._installing, panel._shownOutput = None, False, None
    volume = headless.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    lungs = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "lungs")
    params = types.SimpleNamespace(inputVolume=None, lungMethod=module.LungMethod.AUTO, lungSegmentation=None,
                                   useBundledModel=True, checkpointPath=pathlib.Path(), outputSegmentation=None)
    panel._parameterNode = params
    apply = panel.ui.applyButton

    def state():
        panel._updateGui()
        return apply.enabled, apply.toolTip

    assert state() == (False, "Select an input CT volume.")
    params.inputVolume = volume
    assert state()[0] is True and apply.text == "Apply"
    params.lungMethod = module.LungMethod.EXISTING
    assert state()[0] is False and "holds the lungs" in apply.toolTip
    params.lungSegmentation = lungs
    assert state()[0] is True
    params.useBundledModel = False           # the path field still holds Path() -> "."
    assert state()[0] is False and "model file" in apply.toolTip
    model = tmp_path / "mine.safetensors"
    model.write_bytes(b"x")
    params.checkpointPath = model
    assert state()[0] is True
    panel._installing = True                 # pip is running: nothing can start twice
    assert state()[0] is False and not panel.ui.inputsCollapsibleButton.enabled
    panel._installing = False
    panel._run = object()                    # a run in the background: Apply is Cancel
    assert state()[0] is True and apply.text == "Cancel"
    panel._run = None

    first = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "case A")
    params.outputSegmentation = first
    panel._showSummary(first, "Infection 12 mL")
    panel._updateGui()
    assert panel.ui.summaryLabel.text == "Infection 12 mL" and panel.ui.exportTrainingCaseButton.enabled
    params.outputSegmentation = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "case B")
    panel._updateGui()
    assert panel.ui.summaryLabel.text == ""
