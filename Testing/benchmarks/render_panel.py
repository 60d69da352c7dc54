"""Picture of the module panel: SSALesionSeg.ui loaded with PySide6 (offscreen).

This is the real .ui file, but not Slicer: the CTK/MRML widgets are drawn by simple
PySide6 stand-ins registered under the same class names, and the node selectors show
example node names. Writes docs/images/slicer_panel.png.

    QT_QPA_PLATFORM=offscreen python Testing/benchmarks/render_panel.py [--out PATH]
"""

import argparse
import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6 import QtCore, QtUiTools, QtWidgets  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MODULE_DIR = os.path.join(REPO, "SSALesionSeg")
UI_FILE = os.path.join(MODULE_DIR, "Resources", "UI", "SSALesionSeg.ui")
DEFAULT_OUT = os.path.join(REPO, "docs", "images", "slicer_panel.png")
sys.path.insert(0, MODULE_DIR)

from SSALesionSegLib import engine  # noqa: E402

EXAMPLE_NODES = {
    "inputVolumeSelector": "coronacases_001",
    "lungSegmentationSelector": "None",
    "outputSegmentationSelector": "Create new segmentation",
    "statisticsTableSelector": "Create new table",
}


class qMRMLWidget(QtWidgets.QWidget):
    pass


class qMRMLNodeComboBox(QtWidgets.QComboBox):
    pass


class ctkCollapsibleButton(QtWidgets.QGroupBox):
    def _text(self):
        return self.title()

    def _setText(self, text):
        self.setTitle("\u25bc  " + text)

    def _collapsed(self):
        return False

    def _setCollapsed(self, collapsed):
        if collapsed:
            self.setTitle(self.title().replace("\u25bc", "\u25b6"))
            self.setMaximumHeight(24)

    text = QtCore.Property(str, _text, _setText)
    collapsed = QtCore.Property(bool, _collapsed, _setCollapsed)


class ctkPathLineEdit(QtWidgets.QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.edit = QtWidgets.QLineEdit()
        self.edit.setPlaceholderText("checkpoint file (.pt)")
        layout.addWidget(self.edit)
        layout.addWidget(QtWidgets.QToolButton(text="..."))


class ctkDirectoryButton(QtWidgets.QPushButton):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.setText("~/SSALesionSeg-training-cases")
        self.setIcon(self.style().standardIcon(QtWidgets.QStyle.SP_DirIcon))


def load_panel():
    loader = QtUiTools.QUiLoader()
    for cls in (qMRMLWidget, qMRMLNodeComboBox, ctkCollapsibleButton, ctkPathLineEdit, ctkDirectoryButton):
        loader.registerCustomWidget(cls)
    ui = QtCore.QFile(UI_FILE)
    ui.open(QtCore.QIODevice.ReadOnly)
    panel = loader.load(ui)
    ui.close()
    if panel is None:
        raise RuntimeError(loader.errorString())
    return panel


def fill_like_the_widget_code(panel):
    """What connectGui and SSALesionSegWidget._updateGui do to the panel in Slicer."""
    find = lambda cls, name: panel.findChild(cls, name)  # noqa: E731
    for name, text in EXAMPLE_NODES.items():
        find(QtWidgets.QComboBox, name).addItem(text)
    # Expanded here (collapsed by default in Slicer) so the picture shows every option.
    model = find(QtWidgets.QGroupBox, "modelCollapsibleButton")
    model.setTitle(model.title().replace("\u25b6", "\u25bc"))
    model.setMaximumHeight(16777215)
    for name, choices in (("lungMethodComboBox", engine.LUNG_METHODS), ("deviceComboBox", engine.DEVICES),
                          ("flipTTAComboBox", engine.FLIP_TTA)):
        combo = find(QtWidgets.QComboBox, name)
        combo.clear()
        combo.addItems(list(choices.values()))
    devices = find(QtWidgets.QComboBox, "deviceComboBox")
    devices.model().item(list(engine.DEVICES).index("cuda")).setEnabled(False)
    find(QtWidgets.QCheckBox, "useBundledModelCheckBox").setChecked(True)
    find(QtWidgets.QWidget, "checkpointPathLineEdit").setEnabled(False)
    find(QtWidgets.QWidget, "lungSegmentationSelector").setEnabled(False)
    find(QtWidgets.QPushButton, "applyButton").setEnabled(True)
    find(QtWidgets.QProgressBar, "progressBar").setVisible(False)
    for name in ("showSegmentEditorButton", "recomputeStatisticsButton", "exportTrainingCaseButton"):
        find(QtWidgets.QPushButton, name).setEnabled(False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--width", type=int, default=420)
    args = parser.parse_args(argv)
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    app.setStyle("Fusion")
    panel = load_panel()
    fill_like_the_widget_code(panel)
    panel.resize(args.width, panel.sizeHint().height())
    panel.show()
    app.processEvents()
    panel.resize(args.width, panel.minimumSizeHint().height() + 20)
    app.processEvents()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    pixmap = panel.grab()
    if not pixmap.save(args.out):
        raise RuntimeError(f"could not write {args.out}")
    print(f"{args.out} ({pixmap.width()}x{pixmap.height()})")


if __name__ == "__main__":
    main()
