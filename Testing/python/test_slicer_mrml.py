"""MRML side of the Slicer module, on a real vtkMRMLScene from slicer-core (no Qt).

Most tests use a fake engine that returns the phantom's known labels, so that they
check the conversions (names, colours, terminology, voxel counts, geometry, table),
not the network. ``test_real_engine_*`` use the real engine and skip until it exists.
The fake is a package on disk so the background (separate process) path can use it too.
"""

import importlib.util
import json
import math
import os
import sys
import textwrap
import time
import types

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
sitk = pytest.importorskip("SimpleITK")

MODULE_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "SSALesionSeg"))
if MODULE_DIR not in sys.path:
    sys.path.insert(0, MODULE_DIR)

from SSALesionSegLib import engine as engine_  # noqa: E402
from SSALesionSegLib import logic as logic_  # noqa: E402
from SSALesionSegLib import mrml, phantom  # noqa: E402

REAL_ENGINE_REASON = ("ssalesionseg.pipeline / ssalesionseg.stats not importable yet (the engine is being "
                      "written in SSALesionSeg/Logic); run these once it exists")


def real_engine_or_skip():
    try:
        return engine_.load_engine(MODULE_DIR)
    except ImportError as e:
        pytest.skip(f"{REAL_ENGINE_REASON}: {e}")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A small SSA-Net with random weights: the real code path, meaningless labels."""
    sys.path.insert(0, os.path.join(os.path.dirname(MODULE_DIR), "Training"))
    try:
        torch = pytest.importorskip("torch")
        try:
            from ssanet.checkpoint import save_checkpoint
            from ssanet.model import SSANet
        except ImportError as e:
            pytest.skip(f"training kit (ssanet) not importable: {e}")
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny-random.safetensors"
    save_checkpoint(path, SSANet(layers=(1, 1, 1, 1), width=(8, 16, 32, 64)), {"name": "tiny-random"})
    return str(path)


# ---------------------------------------------------------------------------
# Fake engine: the real engine package (SSALesionSeg/Logic) with only
# pipeline.segment_image replaced by one that returns the phantom's known labels.
# Statistics, segment names, colours and terminology are therefore the engine's own.
# ---------------------------------------------------------------------------

FAKE_PIPELINE = '''
import os
import time

import numpy as np
import SimpleITK as sitk

from .errors import Cancelled
from .lungstep import compute_lungs
from .stats import compute_stats, label_names_for


class SegmentationResult:
    def __init__(self, labels, lungs, class_names, stats, info):
        self.labels, self.lungs, self.class_names, self.stats, self.info = labels, lungs, class_names, stats, info
        self.probability = None


CALLS = []


def segment_image(ct, *, checkpoint=None, lungs="auto", lung_weights=None, lobe_weights=None, lung_mask=None,
                  device="auto", batch_size=None, progress=None, cancel=None, save_probability=False,
                  flip_tta=None):
    CALLS.append(dict(checkpoint=checkpoint, lungs=lungs, lung_mask=lung_mask, device=device,
                      lobe_weights=lobe_weights, flip_tta=flip_tta))
    if os.environ.get("FAKE_ENGINE_FAIL"):
        raise ValueError(os.environ["FAKE_ENGINE_FAIL"])
    if os.environ.get("FAKE_ENGINE_INPUT_ERROR"):
        from .errors import InputError
        raise InputError(os.environ["FAKE_ENGINE_INPUT_ERROR"])
    delay = float(os.environ.get("FAKE_ENGINE_DELAY", "0"))
    for stage in ("lungs", "lesions"):
        for step in range(5):
            if cancel is not None and cancel():
                raise Cancelled("segmentation cancelled")
            if progress is not None:
                progress(stage, step / 4.0)
            time.sleep(delay)
    labels = sitk.ReadImage(os.environ["FAKE_ENGINE_LABELS"])
    lungmap = sitk.ReadImage(os.environ["FAKE_ENGINE_LUNGS"])
    class_names = ["background", "ggo", "consolidation"]
    if os.environ.get("FAKE_ENGINE_BINARY"):
        labels = sitk.Cast(labels > 0, sitk.sitkUInt8)
        class_names = ["background", "infection"]
    labels.CopyInformation(ct)
    lungmap.CopyInformation(ct)
    if lung_mask is not None:   # the engine's own reading of a given lung mask
        lungmap = sitk.GetImageFromArray(compute_lungs(ct, lung_mask=lung_mask).labels)
        lungmap.CopyInformation(ct)
    stats = compute_stats(ct, labels, lungmap, None, label_names_for(class_names))
    info = {"lung_method": lungs, "device": device, "class_names": class_names, "flip_tta": flip_tta}
    return SegmentationResult(labels, lungmap, class_names, stats, info)
'''

LOGIC_DIR = os.path.join(MODULE_DIR, "Logic")


def write_fake_engine(root):
    """``<root>/ssalesionseg``: the engine's files with the fake pipeline."""
    package = os.path.join(root, "ssalesionseg")
    os.makedirs(package)
    for name in os.listdir(LOGIC_DIR):
        if name.endswith(".py"):
            with open(os.path.join(LOGIC_DIR, name), encoding="utf-8") as f:
                source = f.read()
            with open(os.path.join(package, name), "w", encoding="utf-8") as f:
                f.write(source)
    with open(os.path.join(package, "pipeline.py"), "w", encoding="utf-8") as f:
        f.write(textwrap.dedent(FAKE_PIPELINE))
    return package


def load_fake_engine(package, alias):
    """The fake package imported under another name, as the namespace load_engine returns."""
    spec = importlib.util.spec_from_file_location(alias, os.path.join(package, "__init__.py"),
                                                  submodule_search_locations=[package])
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    pipeline = importlib.import_module(alias + ".pipeline")
    stats = importlib.import_module(alias + ".stats")
    lungstep = importlib.import_module(alias + ".lungstep")
    return types.SimpleNamespace(segment_image=pipeline.segment_image, compute_stats=stats.compute_stats,
                                 label_names_for=stats.label_names_for, figure_notes=stats.figure_notes,
                                 Cancelled=pipeline.Cancelled, SidedLungMask=lungstep.SidedLungMask,
                                 resolve_lobe_weights=lambda: os.environ.get("FAKE_LOBE_WEIGHTS"),
                                 calls=pipeline.CALLS)


@pytest.fixture(scope="session")
def fake_engine_dir(tmp_path_factory):
    """A folder holding the fake ``ssalesionseg`` package (for PYTHONPATH of subprocesses)."""
    root = tmp_path_factory.mktemp("fake_engine")
    write_fake_engine(str(root))
    return root


@pytest.fixture(scope="session")
def fake_engine(fake_engine_dir):
    return load_fake_engine(str(fake_engine_dir / "ssalesionseg"), "fake_ssalesionseg")


OBLIQUE = np.array([[math.cos(0.3), -math.sin(0.3), 0.0],
                    [math.sin(0.3) * math.cos(0.2), math.cos(0.3) * math.cos(0.2), -math.sin(0.2)],
                    [math.sin(0.3) * math.sin(0.2), math.cos(0.3) * math.sin(0.2), math.cos(0.2)]])


@pytest.fixture
def mrml_scene():
    """A real vtkMRMLScene with the logics set up in the order slicer-core needs."""
    return mrml.HeadlessScene()


@pytest.fixture
def case(tmp_path, monkeypatch, mrml_scene):
    """Oblique phantom CT in the scene; the fake engine will return its known labels."""
    return make_case(tmp_path, monkeypatch, mrml_scene)


def make_case(tmp_path, monkeypatch, headless, name="Phantom CT", **geometry):
    geometry = {"spacing": (0.7, 0.9, 2.5), "origin": (-31.5, 12.25, -80.0), "direction": OBLIQUE, **geometry}
    ct, labels, lungs = phantom.make_phantom(size=(48, 40, 8), **geometry)
    labelsPath, lungsPath = tmp_path / "expected_labels.nrrd", tmp_path / "expected_lungs.nrrd"
    sitk.WriteImage(labels, str(labelsPath))
    sitk.WriteImage(lungs, str(lungsPath))
    monkeypatch.setenv("FAKE_ENGINE_LABELS", str(labelsPath))
    monkeypatch.setenv("FAKE_ENGINE_LUNGS", str(lungsPath))
    volume = mrml.add_volume_node_from_image(headless.scene, ct, name)
    return types.SimpleNamespace(headless=headless, scene=headless.scene, volume=volume, ct=ct,
                                 labels=sitk.GetArrayFromImage(labels), lungs=sitk.GetArrayFromImage(lungs))


def expected_mask(case, spec):
    source = case.labels if spec.source == "labels" else case.lungs
    return source == spec.labelValue


def make_logic(case, engine):
    return logic_.ProcessingLogic(case.scene, engine=engine, moduleDir=MODULE_DIR)


# ---------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------

def test_volume_node_to_image_keeps_oblique_geometry(mrml_scene):
    array = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.6, 1.3, 3.0))
    image.SetOrigin((12.5, -40.0, 101.0))
    image.SetDirection(OBLIQUE.ravel().tolist())
    node = mrml.add_volume_node_from_image(mrml_scene.scene, image, "ct")

    # Slicer's IJK-to-RAS is LPS flipped in x and y.
    matrix = mrml.numpy_matrix(_ijk_to_ras(node))
    expected = np.diag([-1, -1, 1]) @ OBLIQUE @ np.diag([0.6, 1.3, 3.0])
    np.testing.assert_allclose(matrix[:3, :3], expected, atol=1e-9)
    np.testing.assert_allclose(matrix[:3, 3], [-12.5, 40.0, 101.0], atol=1e-9)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), array)

    back = mrml.image_from_volume_node(node)
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)


def _ijk_to_ras(node):
    import vtk
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix


def test_labels_on_another_grid_are_refused(case):
    wrong = sitk.Image(10, 10, 3, sitk.sitkUInt8)
    with pytest.raises(ValueError, match="size"):
        mrml.import_result_to_segmentation(case.scene, case.volume, wrong, None)
    shifted = sitk.GetImageFromArray(case.labels)
    shifted.CopyInformation(case.ct)
    shifted.SetOrigin([o + 5.0 for o in case.ct.GetOrigin()])
    with pytest.raises(ValueError, match="geometry"):
        mrml.import_result_to_segmentation(case.scene, case.volume, shifted, None)


# ---------------------------------------------------------------------------
# Engine result -> segmentation node and table
# ---------------------------------------------------------------------------

def test_phantom_gives_named_coloured_segments_with_known_voxel_counts(case, fake_engine):
    progress = []
    result = make_logic(case, fake_engine).process(
        case.volume, None, "auto", None, "cpu", progressCallback=lambda s, f: progress.append((s, f)))

    assert progress[0] == ("lungs", 0.0) and progress[-1] == ("lesions", 1.0)
    node = result.segmentationNode
    assert node.GetName() == "Phantom CT lesions"
    segmentation = node.GetSegmentation()
    assert [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())] == \
        ["Ground_glass_opacity", "Consolidation", "Right_lung", "Left_lung"]
    display = node.GetDisplayNode()
    terminology = importlib.import_module("ssalesionseg.terminology")
    for spec in mrml.segment_specs():
        assert spec.terminology == terminology.terminology_entry(spec.name)
        segment = segmentation.GetSegment(spec.segmentId)
        assert segment.GetName() == spec.name
        np.testing.assert_allclose(segment.GetColor(), spec.color)
        assert segment.GetTerminology() == spec.terminology
        mask = mrml.segment_mask_array(node, spec.segmentId, case.volume)
        expected = expected_mask(case, spec)
        assert expected.sum() > 0
        assert int(mask.sum()) == int(expected.sum()), spec.name
        np.testing.assert_array_equal(mask > 0, expected)
        assert display.GetSegmentVisibility3D(spec.segmentId) == spec.visible3D
    assert segmentation.GetSegment("Ground_glass_opacity").GetName() == "Ground-glass opacity"
    red, green = segmentation.GetSegment("Ground_glass_opacity").GetColor(), segmentation.GetSegment("Consolidation").GetColor()
    assert red[0] > 0.8 > max(red[1:]) and green[1] > 0.7 > max(green[0], green[2])
    assert "SCT^1217294009^Ground glass opacity" in segmentation.GetSegment("Ground_glass_opacity").GetTerminology()
    assert not display.GetSegmentVisibility3D("Right_lung")
    assert display.GetSegmentOpacity2DFill("Left_lung") == pytest.approx(0.15)
    assert node.GetNodeReference("referenceImageGeometryRef") is case.volume


def test_table_values_equal_engine_stats(case, fake_engine):
    result = make_logic(case, fake_engine).process(case.volume, None, "auto", None, "cpu")
    table = result.tableNode
    assert table.GetName() == "Phantom CT lesions statistics"
    assert [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())] == list(mrml.TABLE_COLUMNS)

    values = mrml.table_values(table)
    numeric = {k: v for k, v in mrml.flatten_stats(result.stats)
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert set(values) == set(numeric)
    assert not any(key.startswith(("info", "spacing", "voxel")) for key in values)
    for key, value in numeric.items():
        assert values[key] == pytest.approx(value, rel=1e-12), key
    assert values["lesions.ggo.volume_ml"] == pytest.approx(
        (case.labels == 1).sum() * np.prod(case.ct.GetSpacing()) / 1000.0)

    rows = {table.GetCellText(r, 5): [table.GetCellText(r, c) for c in range(4)] for r in range(table.GetNumberOfRows())}
    assert rows["lesions.ggo.volume_ml"][:2] == ["Ground-glass opacity", "Volume"]
    assert rows["lesions.ggo.volume_ml"][3] == "mL"
    assert rows["lesions.consolidation.percent_of_left_lung"][1] == "% of left lung"
    assert rows["lesions.ggo.right_volume_ml"][1:] == ["Volume in right lung", rows["lesions.ggo.right_volume_ml"][2], "mL"]
    assert rows["lesions.infection.mean_hu"][3] == "HU"
    assert rows["lungs.left.volume_ml"][:2] == ["Left lung", "Volume"]
    assert rows["severity.total"][:2] == ["Severity score", "Total"]
    assert rows["severity.regions.right_lung.score"][:2] == ["Severity score", "Right lung score"]
    assert table.GetAttribute("SSALesionSeg.severity.scheme") == result.stats["severity"]["scheme"]
    assert json.loads(table.GetAttribute(mrml.STATS_ATTRIBUTE)) == json.loads(json.dumps(result.stats))
    assert result.summary.startswith("Infection ")
    assert "GGO" in result.summary
    assert f"Severity {result.stats['severity']['total']}/10 per lung" in result.summary


def test_summary_line_tolerates_scalar_and_missing_fields():
    stats = {"lesions": {"infection": {"volume_ml": 12.44, "percent_of_lung": 3.06},
                         "ggo": {"volume_ml": 10.0}, "consolidation": {"volume_ml": 2.44}},
             "severity": 4}
    assert mrml.summary_line(stats) == ("Infection 12.4 mL (3.1 % of lungs): GGO 10.0 mL, consolidation 2.4 mL. "
                                        "Severity 4.")
    assert mrml.summary_line({}) == "No statistics."
    # the engine's wording (stats.severity_text), also for an edited, partial severity
    partial = {"severity": {"total": 7, "max": 25, "basis": "per lobe", "regions_scored": 4,
                            "regions": {k: {} for k in "abcde"}}}
    assert mrml.summary_line(partial) == "Severity 7/25 per lobe (4 of 5 regions scored)."
    assert mrml.summary_line({"severity": {"basis": "per lung"}}) == "No statistics."


def test_rerun_updates_the_same_segments_and_table(case, fake_engine):
    logic = make_logic(case, fake_engine)
    first = logic.process(case.volume, None, "auto", None, "cpu")
    node = first.segmentationNode
    node.GetSegmentation().AddEmptySegment("MyNote", "My note")  # the user's own segment stays
    second = logic.process(case.volume, node, "auto", None, "cpu")

    assert second.segmentationNode is node and second.tableNode is first.tableNode
    assert node.GetSegmentation().GetNumberOfSegments() == len(mrml.segment_specs()) + 1
    assert case.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert case.scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 1
    assert first.tableNode.GetNumberOfRows() == len(mrml.table_values(first.tableNode))


def test_a_second_case_never_overwrites_the_first_cases_table(case, fake_engine):
    """The panel keeps the last table selected; a run into a new segmentation (or a
    recompute of another one) with that table must leave the first case's figures alone."""
    logic = make_logic(case, fake_engine)
    first = logic.process(case.volume, None, "auto", None, "cpu")
    figures = mrml.table_values(first.tableNode)
    second = logic.process(case.volume, None, "auto", None, "cpu", statisticsTable=first.tableNode)
    assert second.segmentationNode is not first.segmentationNode
    assert second.tableNode is not first.tableNode
    assert first.segmentationNode.GetNodeReference(mrml.STATISTICS_REFERENCE_ROLE) is first.tableNode
    assert second.segmentationNode.GetNodeReference(mrml.STATISTICS_REFERENCE_ROLE) is second.tableNode
    # edit the second case, recompute it with the first case's table still selected
    spec = mrml.lesion_specs()[0]
    mrml.set_segment_from_array(second.segmentationNode, spec, np.zeros_like(case.labels, bool),
                                mrml.ijk_to_ras_from_image(case.ct))
    recomputed = logic.recomputeStatistics(case.volume, second.segmentationNode, first.tableNode)
    assert recomputed.tableNode is second.tableNode
    assert mrml.table_values(second.tableNode)["lesions.ggo.volume_ml"] == 0
    assert mrml.table_values(first.tableNode) == figures
    # a table of no segmentation (e.g. made by the user) is still used as given
    own = case.scene.AddNewNodeByClass("vtkMRMLTableNode", "my table")
    third = logic.process(case.volume, None, "auto", None, "cpu", statisticsTable=own)
    assert third.tableNode is own


def _other_patient(case, name="Patient B"):
    """Another scan on the same grid (other voxel values), as a second patient's CT."""
    other = sitk.Cast(case.ct, sitk.sitkInt16) + 7
    other.CopyInformation(case.ct)
    return mrml.add_volume_node_from_image(case.scene, other, name)


def test_apply_on_another_ct_never_overwrites_the_first_patients_segmentation(case, fake_engine):
    """The panel keeps patient A's segmentation and table selected; Apply on patient B put B's
    results into "Phantom CT lesions" and its table, A's figures gone and the names A's."""
    logic = make_logic(case, fake_engine)
    first = logic.process(case.volume, None, "auto", None, "cpu")
    a, aTable = first.segmentationNode, first.tableNode
    aFigures = mrml.table_values(aTable)
    ggo = mrml.lesion_specs()[0]
    edited = case.labels == 1
    edited[:2] = False     # A's corrections, which must survive
    mrml.set_segment_from_array(a, ggo, edited, mrml.ijk_to_ras_from_image(case.ct))
    patientB = _other_patient(case)
    second = logic.process(patientB, a, "auto", None, "cpu", statisticsTable=aTable)
    b = second.segmentationNode
    assert b is not a and b.GetName() == "Patient B lesions"
    assert second.tableNode is not aTable and second.tableNode.GetName() == "Patient B lesions statistics"
    assert b.GetNodeReference(mrml.SOURCE_VOLUME_REFERENCE_ROLE) is patientB
    assert a.GetNodeReference(mrml.SOURCE_VOLUME_REFERENCE_ROLE) is case.volume
    assert a.GetNodeReference(mrml.STATISTICS_REFERENCE_ROLE) is aTable
    assert a.GetName() == "Phantom CT lesions" and aTable.GetName() == "Phantom CT lesions statistics"
    np.testing.assert_array_equal(mrml.segment_mask_array(a, ggo.segmentId, case.volume) > 0, edited)
    assert mrml.table_values(aTable) == aFigures
    note = ("'Phantom CT lesions' was made from 'Phantom CT', not from 'Patient B': it was left as it was, with its "
            "table, and the results of 'Patient B' are in a new segmentation, 'Patient B lesions'")
    assert note in second.info["notices"] and f"Note: {note}" in second.summary
    # the panel asks before replacing segments only when they are replaced
    assert logic_.replace_question(patientB, a) is None
    assert "will be replaced" in logic_.replace_question(case.volume, a)
    # B's own segmentation is B's to re-run into (after confirming)
    assert "will be replaced" in logic_.replace_question(patientB, b)
    again = logic.process(patientB, b, "auto", None, "cpu", statisticsTable=second.tableNode)
    assert again.segmentationNode is b and again.tableNode is second.tableNode and not again.info.get("notices")
    # an empty segmentation made on A (nothing to lose) is used as chosen
    empty = case.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn on A")
    empty.SetReferenceImageGeometryParameterFromVolumeNode(case.volume)
    assert logic.process(patientB, empty, "auto", None, "cpu").segmentationNode is empty


def test_apply_counts_kept_segments_as_recompute_does(case, fake_engine):
    """A re-Apply keeps a GGO segment the user added; its table held the model's labels alone
    (541.11 mL) and Recompute right after counted the user's segment too (541.54 mL)."""
    logic = make_logic(case, fake_engine)
    first = logic.process(case.volume, None, "auto", None, "cpu")
    node = first.segmentationNode
    node.GetSegmentation().AddEmptySegment("MyNote", "My note")   # counts for nothing: figures are the engine's
    assert logic.process(case.volume, node, "auto", None, "cpu").stats == first.stats
    extra = np.zeros(case.labels.shape, bool)
    extra[0, :3, :3] = True
    extra &= case.labels == 0
    more = mrml.SegmentSpec("More GGO", "labels", 1, (1.0, 1.0, 0.0), mrml.lesion_specs()[0].terminology)
    more.segmentId = "more_ggo"
    mrml.set_segment_from_array(node, more, extra, mrml.ijk_to_ras_from_image(case.ct))

    applied = logic.process(case.volume, node, "auto", None, "cpu")
    appliedFigures = mrml.table_values(applied.tableNode)
    recomputed = logic.recomputeStatistics(case.volume, node)
    assert mrml.table_values(recomputed.tableNode) == pytest.approx(appliedFigures, rel=1e-12)
    ml = np.prod(case.ct.GetSpacing()) / 1000.0
    assert appliedFigures["lesions.ggo.volume_ml"] == pytest.approx(((case.labels == 1) | extra).sum() * ml)
    assert any("also count More GGO, kept from before this run" in n for n in applied.info["notices"])
    assert "More GGO" in applied.summary


def test_new_nodes_get_unique_names_and_recompute_marks_the_table(case, fake_engine):
    logic = make_logic(case, fake_engine)
    first = logic.process(case.volume, None, "classical", None, "cpu")
    second = logic.process(case.volume, None, "auto", None, "cpu")
    assert first.segmentationNode.GetName() == "Phantom CT lesions"
    assert second.segmentationNode.GetName() != first.segmentationNode.GetName()
    assert second.segmentationNode.GetName().startswith("Phantom CT lesions")
    assert second.tableNode.GetName() == second.segmentationNode.GetName() + " statistics"
    assert json.loads(first.tableNode.GetAttribute("SSALesionSeg.Info"))["lung_method"] == "classical"
    logic.recomputeStatistics(case.volume, first.segmentationNode)
    info = json.loads(first.tableNode.GetAttribute("SSALesionSeg.Info"))
    assert info["recomputed"] is True and info["run"]["lung_method"] == "classical"


def test_rerun_into_a_loaded_segmentation_matches_segments_by_name(case, fake_engine, tmp_path):
    logic = make_logic(case, fake_engine)
    result = logic.process(case.volume, None, "auto", None, "cpu")
    path = mrml.save_segmentation(result.segmentationNode, tmp_path / "saved.seg.nrrd")

    loaded = case.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "loaded")
    storage = case.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(path)
    assert storage.ReadData(loaded)
    before = loaded.GetSegmentation().GetNumberOfSegments()
    logic.process(case.volume, loaded, "auto", None, "cpu")
    assert loaded.GetSegmentation().GetNumberOfSegments() == before == len(mrml.segment_specs())


def test_saved_seg_nrrd_reads_back_with_slicerio(case, fake_engine, tmp_path):
    slicerio = pytest.importorskip("slicerio")
    result = make_logic(case, fake_engine).process(case.volume, None, "auto", None, "cpu")
    path = mrml.save_segmentation(result.segmentationNode, tmp_path / "case.seg.nrrd")

    segmentation = slicerio.read_segmentation(path)
    # slicerio: voxels in (i, j, k) order, geometry as IJK-to-LPS.
    expectedIjkToLps = np.eye(4)
    expectedIjkToLps[:3, :3] = OBLIQUE @ np.diag(case.ct.GetSpacing())
    expectedIjkToLps[:3, 3] = case.ct.GetOrigin()
    offset = np.array(segmentation.get("referenceImageExtentOffset", [0, 0, 0]), float)
    ijkToLps = np.array(segmentation["ijkToLPS"], float)
    origin = ijkToLps[:3, 3] - ijkToLps[:3, :3] @ offset  # reference-grid origin
    np.testing.assert_allclose(ijkToLps[:3, :3], expectedIjkToLps[:3, :3], atol=1e-6)
    np.testing.assert_allclose(origin, expectedIjkToLps[:3, 3], atol=1e-6)

    byName = {s["name"]: s for s in segmentation["segments"]}
    assert set(byName) == {spec.name for spec in mrml.segment_specs()}
    for spec in mrml.segment_specs():
        segment = byName[spec.name]
        np.testing.assert_allclose(segment["color"], spec.color, atol=1e-6)
        assert slicerio.segmentation.terminology_entry_to_string(segment["terminology"]) == spec.terminology
        mask = slicerio.segment_mask(segmentation, segment)
        full = np.zeros(case.labels.shape[::-1], bool)
        o = offset.astype(int)
        full[o[0]:o[0] + mask.shape[0], o[1]:o[1] + mask.shape[1], o[2]:o[2] + mask.shape[2]] = mask
        np.testing.assert_array_equal(full.transpose(2, 1, 0), expected_mask(case, spec), err_msg=spec.name)


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([-1.0, 1.0, -1.0]), OBLIQUE], ids=["axial", "flipped", "oblique"])
def test_segments_back_to_labelmap_keep_geometry(tmp_path, monkeypatch, mrml_scene, fake_engine, direction):
    case = make_case(tmp_path, monkeypatch, mrml_scene, spacing=(0.55, 0.8, 3.0), origin=(100.0, -7.5, 1234.0),
                     direction=direction)
    result = make_logic(case, fake_engine).process(case.volume, None, "auto", None, "cpu")
    labels, lungs = mrml.labelmaps_from_result_segments(result.segmentationNode, case.volume)
    for image, expected in ((labels, case.labels), (lungs, case.lungs)):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected)
        np.testing.assert_allclose(image.GetOrigin(), case.ct.GetOrigin(), atol=1e-9)
        np.testing.assert_allclose(image.GetSpacing(), case.ct.GetSpacing(), atol=1e-9)
        np.testing.assert_allclose(image.GetDirection(), case.ct.GetDirection(), atol=1e-9)


def test_output_segmentation_follows_the_volume_transform(case, fake_engine):
    transform = case.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    case.volume.SetAndObserveTransformNodeID(transform.GetID())
    result = make_logic(case, fake_engine).process(case.volume, None, "auto", None, "cpu")
    assert result.segmentationNode.GetTransformNodeID() == transform.GetID()


def _paint(node, name, mask, ijkToRas):
    """A segment as the user paints it (no tag of this module); returns its ID (Slicer's own)."""
    segmentId = node.GetSegmentation().AddEmptySegment("", name)
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        mrml.oriented_image_from_array(mask, ijkToRas), node, segmentId,
        slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    return segmentId


def _rigid_transform(case, angle=0.4, shift=(6.5, -3.25, 4.0)):
    """A linear transform node: a rotation about an oblique axis, then a shift (e.g. a registration)."""
    axis = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    matrix = np.eye(4)
    matrix[:3, :3] = np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross
    matrix[:3, 3] = shift
    transform = case.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    transform.SetMatrixTransformToParent(mrml.vtk_matrix(matrix))
    return transform, matrix


@pytest.mark.parametrize("moved", ["segmentation", "ct"])
def test_apply_into_a_segmentation_under_another_transform_keeps_it_where_it_is(case, fake_engine, moved):
    """Apply put an existing segmentation under the CT's transform: a segmentation the user had
    under a registration (or a CT moved by one) jumped, the user's own segments with it."""
    logic = make_logic(case, fake_engine)
    fresh = mrml.table_values(logic.process(case.volume, None, "auto", None, "cpu").tableNode)
    transform, matrix = _rigid_transform(case)
    node = case.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Reader's segmentation")
    node.CreateDefaultDisplayNodes()
    if moved == "segmentation":
        node.SetAndObserveTransformNodeID(transform.GetID())
        drawnAt = np.linalg.inv(matrix) @ mrml.ijk_to_ras_from_image(case.ct)   # shown on the CT where it is
    else:
        case.volume.SetAndObserveTransformNodeID(transform.GetID())
        drawnAt = matrix @ mrml.ijk_to_ras_from_image(case.ct)
    nodule = np.zeros(case.labels.shape, bool)
    nodule[3:5, 10:16, 20:27] = True
    noduleId = _paint(node, "Nodule", nodule, drawnAt)
    transformId = node.GetTransformNodeID()
    assert (mrml.segment_mask_array(node, noduleId, case.volume) > 0).sum() == nodule.sum()

    applied = logic.process(case.volume, node, "auto", None, "cpu")
    assert applied.segmentationNode is node and node.GetTransformNodeID() == transformId
    np.testing.assert_array_equal(mrml.segment_mask_array(node, noduleId, case.volume) > 0, nodule)
    for spec in mrml.segment_specs():   # where the CT shows them, voxel for voxel
        np.testing.assert_array_equal(
            mrml.segment_mask_array(node, mrml.find_segment_id(node.GetSegmentation(), spec), case.volume) > 0,
            expected_mask(case, spec), err_msg=spec.name)
    assert mrml.table_values(applied.tableNode) == pytest.approx(fresh, rel=1e-12)
    recomputed = logic.recomputeStatistics(case.volume, node)
    assert mrml.table_values(recomputed.tableNode) == pytest.approx(fresh, rel=1e-12)
    assert node.GetTransformNodeID() == transformId
    # the labels exported from it are the model's, on the CT's grid
    labels, lungs = mrml.labelmaps_from_result_segments(node, case.volume)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), case.labels)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(lungs), case.lungs)


def _displacement_grid():
    """A smooth displacement field (up to 3 mm along x) over the phantom: a warp, as a deformable
    registration gives."""
    import vtk
    from vtk.util import numpy_support
    field = vtk.vtkImageData()
    field.SetDimensions(4, 4, 4)
    field.SetOrigin(-200.0, -200.0, -200.0)
    field.SetSpacing(150.0, 150.0, 150.0)
    field.AllocateScalars(vtk.VTK_DOUBLE, 3)
    displacements = numpy_support.vtk_to_numpy(field.GetPointData().GetScalars())
    displacements[:] = 0.0
    displacements[:, 0] = np.linspace(0.0, 3.0, len(displacements))
    return field

def test_apply_never_warps_results_into_a_segmentation_under_a_non_linear_transform(case, fake_engine):
    """A segmentation under a warp (e.g. a deformable registration's grid transform) is left as it is:
    the results go into a new segmentation where the CT is, said in a note."""
    logic = make_logic(case, fake_engine)
    grid = slicer.vtkOrientedGridTransform()
    grid.SetDisplacementGridData(_displacement_grid())
    warp = case.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "deformable registration")
    warp.SetAndObserveTransformFromParent(grid)
    node = case.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Warped reading")
    node.SetAndObserveTransformNodeID(warp.GetID())
    mine = _paint(node, "Consolidation", case.labels == 2, mrml.ijk_to_ras_from_image(case.ct))
    assert logic_.replace_question(case.volume, node) is None

    result = logic.process(case.volume, node, "auto", None, "cpu")
    assert result.segmentationNode is not node and result.segmentationNode.GetName() == "Phantom CT lesions"
    assert result.segmentationNode.GetTransformNodeID() is None
    assert node.GetTransformNodeID() == warp.GetID() and node.GetSegmentation().GetNumberOfSegments() == 1
    assert node.GetSegmentation().GetSegment(mine).GetName() == "Consolidation"
    note = ("'Warped reading' and 'Phantom CT' are under different parent transforms, and 'deformable registration' "
            "is non-linear: 'Warped reading' was left as it was, as the results would have been warped into it, and "
            "they are in a new segmentation, 'Phantom CT lesions', under the transform of 'Phantom CT'")
    assert note in result.info["notices"] and f"Note: {note}" in result.summary
    with pytest.raises(ValueError, match="'deformable registration' is non-linear"):
        mrml.import_result_to_segmentation(case.scene, case.volume, _image(case.labels, case.ct), None, node)


def test_apply_keeps_a_users_segment_named_as_a_result_and_writes_beside_it(case, fake_engine, tmp_path):
    """A segmentation of the user's with a hand-painted "Consolidation" and "Right lung": Apply
    overwrote them with the model's (matched by name), without a word."""
    logic = make_logic(case, fake_engine)
    node = case.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "My reading")
    node.CreateDefaultDisplayNodes()
    ijkToRas = mrml.ijk_to_ras_from_image(case.ct)
    painted = {"Consolidation": np.zeros(case.labels.shape, bool), "Right lung": case.lungs > 0}
    painted["Consolidation"][2:4, 5:9, 5:9] = True
    mine = {name: _paint(node, name, mask, ijkToRas) for name, mask in painted.items()}
    assert logic_.replace_question(case.volume, node) is None   # nothing of this module's to replace

    applied = logic.process(case.volume, node, "auto", None, "cpu")
    segmentation = node.GetSegmentation()
    assert applied.segmentationNode is node
    for name, segmentId in mine.items():
        assert segmentation.GetSegment(segmentId).GetName() == name
        np.testing.assert_array_equal(mrml.segment_mask_array(node, segmentId, case.volume) > 0, painted[name])
    names = {spec.name: segmentation.GetSegment(mrml.find_segment_id(segmentation, spec)).GetName()
             for spec in mrml.segment_specs()}
    assert names == {"Ground-glass opacity": "Ground-glass opacity", "Consolidation": "Consolidation_1",
                     "Right lung": "Right lung_1", "Left lung": "Left lung"}
    for spec in mrml.segment_specs():
        np.testing.assert_array_equal(
            mrml.segment_mask_array(node, mrml.find_segment_id(segmentation, spec), case.volume) > 0,
            expected_mask(case, spec), err_msg=spec.name)
    note = ("'My reading' has segments of its own named as results of this module ('Consolidation', 'Right lung'; "
            "not made by it, e.g. painted by hand): they were left as they were, and this run's are in new segments, "
            "'Consolidation_1', 'Right lung_1'")
    assert note in applied.info["notices"] and f"Note: {note}" in applied.summary
    assert logic_.replace_question(case.volume, node).startswith(
        "The result segments 'Ground-glass opacity', 'Consolidation_1', 'Right lung_1', 'Left lung' in 'My reading', "
        "including any edits, will be replaced.")

    # a re-Apply updates this module's segments in place, the user's still kept; also after a save and load
    again = logic.process(case.volume, node, "auto", None, "cpu")
    assert segmentation.GetNumberOfSegments() == 6 and not any("named as results" in n for n in again.info["notices"])
    loaded = case.headless.segmentationsLogic.LoadSegmentationFromFile(
        mrml.save_segmentation(node, tmp_path / "reading.seg.nrrd"), False)
    logic.process(case.volume, loaded, "auto", None, "cpu")
    assert loaded.GetSegmentation().GetNumberOfSegments() == 6
    assert sorted(loaded.GetSegmentation().GetSegment(i).GetName() for i in mine.values()) == sorted(painted)

    # the question names what is replaced and what is kept
    result = logic.process(case.volume, None, "auto", None, "cpu").segmentationNode
    result.GetSegmentation().RemoveSegment("Consolidation")
    _paint(result, "Consolidation", painted["Consolidation"], ijkToRas)
    assert logic_.replace_question(case.volume, result) == (
        "The result segments 'Ground-glass opacity', 'Right lung', 'Left lung' in 'Phantom CT lesions', including "
        "any edits, will be replaced. Your own segment 'Consolidation' (not made by this module) will be kept, the "
        "result written into a new segment beside it.\n\n"
        "To keep them, choose 'Create new segmentation' as output instead.")


def _segment_as_stored(node, segmentId):
    """(mask, IJK-to-RAS) of a segment's own labelmap, on the lattice it is stored on."""
    import vtk
    image = slicer.vtkOrientedImageData()
    assert slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(node, segmentId, image, False)
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    labelValue = node.GetSegmentation().GetSegment(segmentId).GetLabelValue()
    return mrml.array_from_oriented_image(image) == labelValue, mrml.numpy_matrix(matrix)


def test_apply_never_resamples_a_users_segment_drawn_on_another_lattice(case, fake_engine):
    """A segment the user drew on another volume's grid (here half a voxel off the CT's) shared its
    labelmap layer with the results written after it: Apply resampled the layer onto the CT's
    grid, and the user's segment grew from 84 to 112 voxels."""
    node = case.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "My reading")
    node.CreateDefaultDisplayNodes()
    offLattice = mrml.ijk_to_ras_from_image(case.ct)
    offLattice[:3, 3] += offLattice[:3, :3] @ [0.5, 0.5, 0.0]
    nodule = np.zeros(case.labels.shape, bool)
    nodule[3:5, 10:16, 20:27] = True
    noduleId = _paint(node, "Nodule", nodule, offLattice)
    before, beforeMatrix = _segment_as_stored(node, noduleId)
    assert before.sum() == nodule.sum()

    result = make_logic(case, fake_engine).process(case.volume, node, "auto", None, "cpu")
    after, afterMatrix = _segment_as_stored(node, noduleId)
    np.testing.assert_array_equal(after, before)
    np.testing.assert_allclose(afterMatrix, beforeMatrix, atol=1e-9)
    for spec in mrml.segment_specs():
        np.testing.assert_array_equal(
            mrml.segment_mask_array(node, mrml.find_segment_id(node.GetSegmentation(), spec), case.volume) > 0,
            expected_mask(case, spec), err_msg=spec.name)
    assert result.segmentationNode is node
    # segments on one lattice still share layers: a fresh result is not split into a layer per segment
    fresh = make_logic(case, fake_engine).process(case.volume, None, "auto", None, "cpu").segmentationNode
    assert fresh.GetSegmentation().GetNumberOfLayers() < len(mrml.segment_specs())

@pytest.mark.parametrize("tagged", [True, False], ids=["cli", "cli-before-tags"])
def test_apply_into_a_cli_seg_nrrd_updates_its_segments_in_place(case, fake_engine, tmp_path, tagged):
    """The engine's .seg.nrrd loaded into Slicer is this module's result (its segments carry the
    result tag; files written before the tag have the result's IDs and names)."""
    nrrd = pytest.importorskip("nrrd")
    from ssalesionseg.segfile import RESULT_TAG, write_seg_nrrd

    path = tmp_path / "cli.seg.nrrd"
    write_seg_nrrd(path, _image(case.labels, case.ct), _image(case.lungs, case.ct), ["background", "ggo", "consolidation"])
    if not tagged:
        data, header = nrrd.read(str(path))
        for key in [k for k in header if k.endswith("_Tags")]:
            header[key] = "|".join(t for t in header[key].split("|") if not t.startswith(RESULT_TAG))
        nrrd.write(str(path), data, header)
    loaded = case.headless.segmentationsLogic.LoadSegmentationFromFile(str(path), False)
    assert logic_.replace_question(case.volume, loaded).startswith(
        "The result segments 'Ground-glass opacity', 'Consolidation', 'Right lung', 'Left lung' in")
    make_logic(case, fake_engine).process(case.volume, loaded, "auto", None, "cpu")
    segmentation = loaded.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 4
    assert [segmentation.GetNthSegment(i).GetName() for i in range(4)] == [s.name for s in mrml.segment_specs()]


# ---------------------------------------------------------------------------
# Correction loop
# ---------------------------------------------------------------------------

def test_recompute_statistics_uses_the_edited_segments(case, fake_engine):
    logic = make_logic(case, fake_engine)
    result = logic.process(case.volume, None, "auto", None, "cpu")
    node = result.segmentationNode
    before = mrml.table_values(result.tableNode)["lesions.ggo.volume_ml"]

    # "Edit": erase the upper half of the GGO segment.
    edited = case.labels == 1
    edited[: edited.shape[0] // 2] = False
    spec = mrml.lesion_specs()[0]
    mrml.set_segment_from_array(node, spec, edited, mrml.ijk_to_ras_from_image(case.ct))

    recomputed = logic.recomputeStatistics(case.volume, node)
    after = mrml.table_values(recomputed.tableNode)
    assert recomputed.tableNode is result.tableNode
    ml = np.prod(case.ct.GetSpacing()) / 1000.0
    assert after["lesions.ggo.volume_ml"] == pytest.approx(edited.sum() * ml)
    assert after["lesions.ggo.volume_ml"] < before
    expected = fake_engine.compute_stats(case.ct, _image(edited.astype(np.uint8) + 2 * (case.labels == 2), case.ct),
                                         _image(case.lungs, case.ct))
    for key, value in mrml.flatten_stats(expected):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert after[key] == pytest.approx(value), key


def test_recompute_notes_lungs_cut_by_the_cts_padding_as_the_cli_does(case, fake_engine):
    # the phantom CT with scanner padding (-3024 HU, outside the reconstruction circle) running
    # in from the image's side up to the lungs on one slice: only the CT shows that cut
    ct = sitk.GetArrayFromImage(case.ct).astype(np.int16)
    z = int(np.argmax(case.lungs.reshape(len(case.lungs), -1).any(axis=1)))
    ys, xs = np.nonzero(case.lungs[z])
    y, x = ys[np.argmin(xs)], xs.min()
    ct[z, y, :x] = -3024
    padded = sitk.GetImageFromArray(ct)
    padded.CopyInformation(case.ct)
    volume = mrml.add_volume_node_from_image(case.scene, padded, "Padded CT")
    logic = make_logic(case, fake_engine)
    node = logic.process(volume, None, "auto", None, "cpu").segmentationNode
    recomputed = logic.recomputeStatistics(volume, node)
    expected = fake_engine.figure_notes(recomputed.stats, _image(case.lungs, padded), padded)
    assert any("the edge of the scanned field (padding around it) on 1 slice" in n for n in expected)
    assert set(expected) <= set(recomputed.info["notices"])
    assert "scanned field (padding around it)" in recomputed.summary


def _image(array, reference):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(reference)
    return image


def test_recompute_statistics_needs_a_lung_segment_and_scores_one_lung_as_the_cli_does(case, fake_engine):
    logic = make_logic(case, fake_engine)
    node = logic.process(case.volume, None, "auto", None, "cpu").segmentationNode
    node.GetSegmentation().RemoveSegment("Left_lung")
    recomputed = logic.recomputeStatistics(case.volume, node)
    assert "(1 of 2 regions scored)" in recomputed.summary
    node.GetSegmentation().RemoveSegment("Right_lung")
    with pytest.raises(ValueError, match="no Right lung or Left lung segment with voxels"):
        logic.recomputeStatistics(case.volume, node)


def test_recompute_and_export_read_segments_as_the_cli_reads_the_seg_nrrd(case, fake_engine, tmp_path):
    """The module took one segment per class by ID / name and let the later one win where
    GGO and consolidation overlapped; the CLI took every segment of a class by terminology.
    Both now use the engine's rule, and say what it decided."""
    logic = make_logic(case, fake_engine)
    result = logic.process(case.volume, None, "auto", None, "cpu")
    node = result.segmentationNode
    segmentation = node.GetSegmentation()
    ijkToRas = mrml.ijk_to_ras_from_image(case.ct)
    # a second GGO segment the user painted; consolidation painted over part of the GGO
    extra = np.zeros(case.labels.shape, bool)
    extra[0, :3, :3] = True
    extra &= case.labels == 0
    assert extra.any()
    ggo_spec, cons_spec = mrml.lesion_specs()
    more = mrml.SegmentSpec("More GGO", "labels", 1, (1.0, 1.0, 0.0), ggo_spec.terminology)
    more.segmentId = "more_ggo"
    mrml.set_segment_from_array(node, more, extra, ijkToRas)
    overlap = (case.labels == 1) & (np.arange(case.labels.shape[2])[None, None, :] < case.labels.shape[2] // 2)
    consolidation = (case.labels == 2) | overlap
    mrml.set_segment_from_array(node, cons_spec, consolidation, ijkToRas)
    note = mrml.SegmentSpec("my ruler", "labels", 9, (0.0, 1.0, 1.0), "")
    note.segmentId = "ruler"
    mrml.set_segment_from_array(node, note, case.labels == 2, ijkToRas)
    recomputed = logic.recomputeStatistics(case.volume, node)
    ml = np.prod(case.ct.GetSpacing()) / 1000.0
    values = mrml.table_values(recomputed.tableNode)
    expected_ggo = ((case.labels == 1) & ~overlap) | extra
    assert values["lesions.ggo.volume_ml"] == pytest.approx(expected_ggo.sum() * ml)
    assert values["lesions.consolidation.volume_ml"] == pytest.approx(consolidation.sum() * ml)
    assert f"overlap in {overlap.sum()} voxels" in recomputed.summary and "Note: segments not used" in recomputed.summary
    assert "my ruler" in recomputed.info["notices"][1]
    # the same segmentation saved and read by the CLI: the same figures
    seg = tmp_path / "edited.seg.nrrd"
    mrml.save_segmentation(node, str(seg))
    from ssalesionseg.io import read_result_labels
    back = read_result_labels(seg, case.ct)
    assert np.count_nonzero(back.lesions == 1) == expected_ggo.sum() and back.notes == recomputed.info["notices"][:2]
    # a segment whose terminology the user changed to GGO is GGO, whatever its ID says
    segmentation.GetSegment(cons_spec.segmentId).SetTerminology(ggo_spec.terminology)
    again = mrml.table_values(logic.recomputeStatistics(case.volume, node).tableNode)
    assert again["lesions.consolidation.volume_ml"] == 0
    # the export writes what the figures were made from
    notes = []
    logic.exportTrainingCase(case.volume, node, str(tmp_path / "cases"), "c", notes=notes)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cases" / "labels" / "c.nii.gz")))
    assert np.count_nonzero(labels == 1) == (expected_ggo | consolidation).sum() and any("segments not used" in n for n in notes)


def test_export_training_case_writes_the_pair_the_training_kit_reads(case, fake_engine, tmp_path):
    logic = make_logic(case, fake_engine)
    node = logic.process(case.volume, None, "auto", None, "cpu").segmentationNode
    out = tmp_path / "cases"
    written = logic.exportTrainingCase(case.volume, node, str(out))
    assert sorted(os.path.relpath(p, out) for p in written) == sorted(
        [os.path.join(folder, "Phantom_CT.nii.gz") for folder in ("images", "labels", "lungs")]
        + [os.path.join("labels", "Phantom_CT.json")])

    image = sitk.ReadImage(str(out / "images" / "Phantom_CT.nii.gz"))
    labels = sitk.ReadImage(str(out / "labels" / "Phantom_CT.nii.gz"))
    assert image.GetPixelID() == sitk.sitkInt16 and labels.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(case.ct))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), case.labels)
    for loaded in (image, labels):
        np.testing.assert_allclose(loaded.GetDirection(), case.ct.GetDirection(), atol=1e-5)
        np.testing.assert_allclose(loaded.GetOrigin(), case.ct.GetOrigin(), atol=1e-4)
    with pytest.raises(FileExistsError):
        logic.exportTrainingCase(case.volume, node, str(out))
    assert not [f for f in os.listdir(out / "labels") if f.startswith(".partial")]

    try:
        sys.path.insert(0, os.path.join(MODULE_DIR, "..", "Training"))
        from ssanet.data import load_volume_pairs
    except ImportError as e:
        pytest.skip(f"training kit not importable here: {e}")
    finally:
        sys.path.pop(0)
    samples = load_volume_pairs(out / "images", out / "labels", out / "lungs")
    assert samples, "the training kit found no slices"
    assert {int(v) for s in samples for v in np.unique(s.label)} <= {0, 1, 2}
    assert sum(int((s.label == 1).sum()) for s in samples) > 0
    # what `ssalesionseg train --cases` reads: the same slices on the model's grid
    from ssanet.data import load_training_cases
    grid = load_training_cases(out)
    assert [s.id for s in grid] == [s.id for s in samples]
    assert all(s.image.shape == (512, 512) and s.spacing == (0.7, 0.7) for s in grid)
    ggo_mm2 = sum(float((s.label == 1).sum()) * s.spacing[0] * s.spacing[1] for s in samples)
    assert sum(float((s.label == 1).sum()) for s in grid) * 0.49 == pytest.approx(ggo_mm2, rel=0.1)


def test_export_refuses_any_existing_file_of_the_case_and_overwrite_replaces_the_whole_case(case, fake_engine, tmp_path):
    logic = make_logic(case, fake_engine)
    node = logic.process(case.volume, None, "auto", None, "cpu").segmentationNode
    out = tmp_path / "cases"
    assert mrml.existing_training_case_files(out, "Phantom_CT") == []
    logic.exportTrainingCase(case.volume, node, str(out))
    assert json.loads((out / "labels" / "Phantom_CT.json").read_text()) == {
        "class_names": ["background", "ggo", "consolidation"]}   # what the label values mean
    os.remove(out / "labels" / "Phantom_CT.nii.gz")   # images/, lungs/ and the class list left
    assert mrml.existing_training_case_files(out, "Phantom_CT") == [
        str(out / "images" / "Phantom_CT.nii.gz"), str(out / "lungs" / "Phantom_CT.nii.gz"),
        str(out / "labels" / "Phantom_CT.json")]
    with pytest.raises(FileExistsError, match="images"):
        logic.exportTrainingCase(case.volume, node, str(out))
    # the corrected case has no lung segments: overwriting drops the old case's lung mask
    for name in ("Right_lung", "Left_lung"):
        node.GetSegmentation().RemoveSegment(name)
    written = logic.exportTrainingCase(case.volume, node, str(out), overwrite=True)
    assert sorted(os.path.relpath(p, out) for p in written) == [
        os.path.join("images", "Phantom_CT.nii.gz"), os.path.join("labels", "Phantom_CT.json"),
        os.path.join("labels", "Phantom_CT.nii.gz")]
    assert not (out / "lungs" / "Phantom_CT.nii.gz").exists()


def test_export_finds_a_lesion_segment_by_its_terminology_when_name_and_id_changed(case, fake_engine, tmp_path):
    """As the engine reads a .seg.nrrd: a GGO segment that another tool saved under another
    ID and name, with its terminology, is still the GGO of the exported case."""
    logic = make_logic(case, fake_engine)
    node = logic.process(case.volume, None, "auto", None, "cpu").segmentationNode
    segmentation = node.GetSegmentation()
    ggo = segmentation.GetSegmentIdBySegmentName("Ground-glass opacity")
    moved = slicer.vtkSegment()
    moved.DeepCopy(segmentation.GetSegment(ggo))
    moved.SetName("opacities (reader 2)")
    segmentation.RemoveSegment(ggo)
    segmentation.AddSegment(moved, "Segment_7")
    assert mrml.terminology_codes(moved.GetTerminology())["type"][1] == "1217294009"
    logic.exportTrainingCase(case.volume, node, str(tmp_path / "cases"))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cases" / "labels" / "Phantom_CT.nii.gz")))
    np.testing.assert_array_equal(labels, case.labels)
    # writing results into that segmentation does not take the user's segment over
    spec = mrml.lesion_specs()[0]
    assert mrml.find_segment_id(segmentation, spec) is None


def test_export_without_lesions_says_the_case_is_lesion_free(case, fake_engine, tmp_path):
    """All lesion segments deleted: an all-background label file was written without a word."""
    logic = make_logic(case, fake_engine)
    node = logic.process(case.volume, None, "auto", None, "cpu").segmentationNode
    notes = []
    logic.exportTrainingCase(case.volume, node, str(tmp_path / "cases"), "with", notes=notes)
    assert not any("lesion-free" in n for n in notes)
    ggo, consolidation = mrml.lesion_specs()
    mrml.set_segment_from_array(node, ggo, np.zeros(case.labels.shape, bool), mrml.ijk_to_ras_from_image(case.ct))
    node.GetSegmentation().RemoveSegment(consolidation.segmentId)
    notes = []
    logic.exportTrainingCase(case.volume, node, str(tmp_path / "cases"), "erased", notes=notes)
    assert notes[0].startswith("no consolidation segment: counted as 0 mL") and notes[1:] == [
                     "the lesion segments of 'Phantom CT lesions' are empty: the case was exported as lesion-free "
                     "(its labels are all background). If the CT has lesions, paint them (or press Apply) and "
                     "export again, overwriting the case"]
    node.GetSegmentation().RemoveSegment(ggo.segmentId)
    notes = []
    logic.exportTrainingCase(case.volume, node, str(tmp_path / "cases"), "none", notes=notes)
    assert len(notes) == 1 and notes[0].startswith(
        "'Phantom CT lesions' has no GGO, consolidation or infection segment: the case was exported as lesion-free")


def test_a_labelmap_or_non_ct_input_is_refused_by_name_before_anything_runs(case, fake_engine, fake_engine_dir):
    labels = sitk.GetImageFromArray(case.labels)
    labels.CopyInformation(case.ct)
    labelmapNode = mrml.add_volume_node_from_image(case.scene, labels, "Phantom labels", labelmap=True)
    asScalar = mrml.add_volume_node_from_image(case.scene, labels, "labels as volume")
    # the panel's default input is never a labelmap, even when one comes first
    scene = mrml.HeadlessScene().scene
    mrml.add_volume_node_from_image(scene, labels, "first: a labelmap", labelmap=True)
    assert logic_.default_input_volume(scene) is None
    ct = mrml.add_volume_node_from_image(scene, case.ct, "the CT")
    assert logic_.default_input_volume(scene) is ct
    assert logic_.default_input_volume(case.scene) is case.volume
    assert "'Phantom labels' is a labelmap" in logic_.missing_choice(labelmapNode, "auto")
    logic = background_logic(case, fake_engine_dir)
    with pytest.raises(ValueError, match="'Phantom labels' is a labelmap"):
        logic.process(labelmapNode, None, "auto", None, "cpu", waitForCompletion=False)
    started = []
    logic.pythonExecutable = None   # no worker may start: this would fail if one did
    original = logic_.BackgroundRun.start
    logic_.BackgroundRun.start = lambda self, *a, **k: started.append(a)
    try:
        with pytest.raises(ValueError, match=r"^'labels as volume' does not look like a CT in Hounsfield units"):
            logic.process(asScalar, None, "auto", None, "cpu", waitForCompletion=False)
    finally:
        logic_.BackgroundRun.start = original
    assert not started
    with pytest.raises(ValueError, match="'labels as volume' does not look like a CT"):
        make_logic(case, fake_engine).process(asScalar, None, "auto", None, "cpu")
    assert case.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_existing_lung_segmentation_is_passed_as_lung_mask(case, fake_engine):
    lungsNode = mrml.import_result_to_segmentation(
        case.scene, case.volume, None, _image(case.lungs, case.ct), None, specs=mrml.lung_specs())
    fake_engine.calls.clear()
    make_logic(case, fake_engine).process(case.volume, None, "existing", None, "cpu", lungSegmentation=lungsNode)
    call = fake_engine.calls[-1]
    assert call["lungs"] == "auto"
    np.testing.assert_array_equal(sitk.GetArrayFromImage(call["lung_mask"].mask), case.lungs)
    with pytest.raises(ValueError, match="lungs"):
        make_logic(case, fake_engine).process(case.volume, None, "existing", None, "cpu")
    # lungs known only by terminology (renamed) still count, and a lesion segment beside them is not lung
    segmentation = lungsNode.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segmentation.GetNthSegment(index).SetName(f"mine {index}")
    ggo = mrml.lesion_specs()[0]
    mrml.set_segment_from_array(lungsNode, ggo, np.ones(case.lungs.shape, bool), mrml.ijk_to_ras_from_image(case.ct))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mrml.lung_mask_from_segmentation(lungsNode, case.volume)),
                                  case.lungs)
    # one segment of the user's own (no terminology, any name) is the lung mask, split into sides
    own = case.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "thresholded")
    spec = mrml.SegmentSpec("Segment_1", "lungs", 1, (1.0, 0.5, 0.0), "")
    mrml.set_segment_from_array(own, spec, case.lungs > 0, mrml.ijk_to_ras_from_image(case.ct))
    assert set(np.unique(sitk.GetArrayFromImage(mrml.lung_mask_from_segmentation(own, case.volume)))) == {0, 1, 2}
    only_ggo = case.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "lesions only")
    mrml.set_segment_from_array(only_ggo, ggo, case.labels == 1, mrml.ijk_to_ras_from_image(case.ct))
    with pytest.raises(ValueError, match="no lung segment with voxels"):
        mrml.lung_mask_from_segmentation(only_ggo, case.volume)


def _crop_node(case, name, i=slice(None), j=slice(None), k=slice(None)):
    """A crop of the case's CT as Crop Volume makes it (a new volume, the same voxels on the same lattice)."""
    return mrml.add_volume_node_from_image(case.scene, case.ct[i, j, k], name)


def test_segments_reaching_beyond_a_cropped_ct_are_cut_to_it_and_said(case, fake_engine, tmp_path):
    """Segments were resampled padded and then, being larger than the CT, read as empty:
    Recompute after a crop gave 0 mL and Export an all-background case, without a word."""
    logic = make_logic(case, fake_engine)
    node = logic.process(case.volume, None, "auto", None, "cpu").segmentationNode
    ml = np.prod(case.ct.GetSpacing()) / 1000.0
    # in-plane: the right lung whole, the left lung and the consolidation cut
    crop = _crop_node(case, "Phantom CT crop", i=slice(0, 35))
    labels, lungs = case.labels[:, :, :35], case.lungs[:, :, :35]
    assert (labels == 2).any() and (case.labels[:, :, 35:] == 2).any()
    recomputed = logic.recomputeStatistics(crop, node)
    values = mrml.table_values(recomputed.tableNode)
    assert values["lesions.ggo.volume_ml"] == pytest.approx((labels == 1).sum() * ml)
    assert values["lesions.consolidation.volume_ml"] == pytest.approx((labels == 2).sum() * ml)
    assert values["lungs.left.volume_ml"] == pytest.approx((lungs == 2).sum() * ml)
    outsideLeft = (case.lungs[:, :, 35:] == 2).sum() * ml
    note = [n for n in recomputed.info["notices"] if "reaches beyond the extent of 'Phantom CT crop'" in n]
    assert note and f"Left lung {outsideLeft:.1f} mL" in note[0] and "Right lung" not in note[0]
    assert "Note: 'Phantom CT lesions' reaches beyond" in recomputed.summary
    notes = []
    logic.exportTrainingCase(crop, node, str(tmp_path / "cases"), "crop", notes=notes)
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cases" / "labels" / "crop.nii.gz")))
    np.testing.assert_array_equal(written, labels)
    assert any("lie outside it and are left out" in n for n in notes)
    # through the slices: every segment reaches beyond, none reads as empty
    slab = _crop_node(case, "Phantom CT slab", k=slice(2, 6))
    values = mrml.table_values(logic.recomputeStatistics(slab, node).tableNode)
    assert values["lungs.total.volume_ml"] == pytest.approx((case.lungs[2:6] > 0).sum() * ml)
    assert values["lesions.ggo.volume_ml"] == pytest.approx((case.labels[2:6] == 1).sum() * ml)
    notes = []   # the result's lungs as "Existing lungs" on the slab: said for the lungs alone
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mrml.lung_mask_from_segmentation(node, slab, notes)),
                                  case.lungs[2:6])
    assert len(notes) == 1 and "Right lung" in notes[0] and "Left lung" in notes[0] and "Ground" not in notes[0]
    # the lungs of a segmentation on a larger grid, as "Existing lungs"
    big = np.pad(case.lungs, 3)
    ijkToRas = mrml.ijk_to_ras_from_image(case.ct)
    ijkToRas[:3, 3] -= ijkToRas[:3, :3] @ [3, 3, 3]
    larger = case.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "lungs on a larger grid")
    for spec in mrml.lung_specs():
        mrml.set_segment_from_array(larger, spec, big == spec.labelValue, ijkToRas)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mrml.lung_mask_from_segmentation(larger, case.volume)),
                                  case.lungs)
    # lungs wholly outside the CT: said so, not "no lung segment with voxels (its segments are Right lung ...)"
    away = case.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "lungs elsewhere")
    far = mrml.ijk_to_ras_from_image(case.ct)
    far[:3, 3] += far[:3, :3] @ [100, 0, 0]
    for spec in mrml.lung_specs():
        mrml.set_segment_from_array(away, spec, case.lungs == spec.labelValue, far)
    with pytest.raises(ValueError, match="lie outside 'Phantom CT'.*select the CT this segmentation was made on"):
        mrml.lung_mask_from_segmentation(away, case.volume)
    # and Recompute on a slab that misses the lungs does not advise restoring them
    empty = mrml.add_volume_node_from_image(case.scene, case.ct[:, :, 2:6], "Beyond")
    empty.SetIJKToRASMatrix(mrml.vtk_matrix(far))
    with pytest.raises(ValueError, match="No lungs to measure: the lung segments of 'Phantom CT lesions' lie outside"):
        logic.recomputeStatistics(empty, node)


def test_lungs_held_as_closed_surfaces_are_read_as_both_lungs(case):
    """Lungs imported as models (closed-surface source): each segment is converted to a labelmap
    on the fly, holding 1 whatever label value the segment kept, so the left lung (2) read as empty."""
    lungsNode = case.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "lungs from a model")
    lungsNode.CreateDefaultDisplayNodes()
    lungsNode.SetReferenceImageGeometryParameterFromVolumeNode(case.volume)
    for spec in mrml.lung_specs():
        mrml.set_segment_from_array(lungsNode, spec, case.lungs == spec.labelValue, mrml.ijk_to_ras_from_image(case.ct))
    assert lungsNode.CreateClosedSurfaceRepresentation()
    segmentation = lungsNode.GetSegmentation()
    segmentation.SetSourceRepresentationName("Closed surface")
    for index in range(segmentation.GetNumberOfSegments()):
        segmentation.GetNthSegment(index).RemoveRepresentation("Binary labelmap")
    assert segmentation.GetSegment("Left_lung").GetLabelValue() == 2
    lungs = sitk.GetArrayFromImage(mrml.lung_mask_from_segmentation(lungsNode, case.volume))
    for value in (1, 2):   # the surface's labelmap is not voxel for voxel the one it was made from
        expected = case.lungs == value
        assert (lungs == value).sum() == pytest.approx(expected.sum(), rel=0.25)
        assert ((lungs == value) & expected).sum() > 0.7 * expected.sum()


@pytest.mark.parametrize("side", ["Right lung", "Left lung"])
def test_existing_lungs_with_one_lung_keep_that_lung_alone(case, fake_engine, side):
    """One lung drawn (or after a pneumonectomy): the engine split it into a made-up right and left lung."""
    spec = next(s for s in mrml.lung_specs() if s.name == side)
    other = next(s for s in mrml.lung_specs() if s.name != side)
    lungsNode = case.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "one lung")
    mrml.set_segment_from_array(lungsNode, spec, case.lungs == spec.labelValue, mrml.ijk_to_ras_from_image(case.ct))
    result = make_logic(case, fake_engine).process(case.volume, None, "existing", None, "cpu",
                                                   lungSegmentation=lungsNode)
    node = result.segmentationNode
    np.testing.assert_array_equal(mrml.segment_mask_array(node, spec.segmentId, case.volume) > 0,
                                  case.lungs == spec.labelValue)
    assert not mrml.segment_mask_array(node, other.segmentId, case.volume).any()
    ml = np.prod(case.ct.GetSpacing()) / 1000.0
    values = mrml.table_values(result.tableNode)
    key = "right" if side == "Right lung" else "left"
    assert values[f"lungs.{key}.volume_ml"] == pytest.approx((case.lungs == spec.labelValue).sum() * ml)
    assert result.stats["severity"]["regions_scored"] == 1
    assert "(1 of 2 regions scored)" in result.summary


def test_existing_one_lung_keeps_its_side_in_the_background_run_too(case, fake_engine_dir):
    spec = mrml.lung_specs()[0]
    lungsNode = case.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "right lung only")
    mrml.set_segment_from_array(lungsNode, spec, case.lungs == 1, mrml.ijk_to_ras_from_image(case.ct))
    result = background_logic(case, fake_engine_dir).process(
        case.volume, None, "existing", None, "cpu", waitForCompletion=False, lungSegmentation=lungsNode).wait()
    assert result.stats["severity"]["regions_scored"] == 1
    assert not mrml.segment_mask_array(result.segmentationNode, "Left_lung", case.volume).any()


def test_recompute_notes_and_export_refuses_a_segmentation_made_from_another_ct(case, fake_engine, tmp_path):
    """Patient A's segmentation with patient B's CT selected: A's masks measured on B's HU,
    and B's CT exported with A's labels, without a word."""
    logic = make_logic(case, fake_engine)
    node = logic.process(case.volume, None, "auto", None, "cpu").segmentationNode
    assert mrml.source_volume_of(node) is case.volume
    other = sitk.GetImageFromArray(sitk.GetArrayFromImage(case.ct)[::-1].copy())   # same grid, other voxels
    other.CopyInformation(case.ct)
    patientB = mrml.add_volume_node_from_image(case.scene, other, "Patient B")
    recomputed = logic.recomputeStatistics(patientB, node)
    assert "'Phantom CT lesions' was made from 'Phantom CT', not from 'Patient B'" in recomputed.summary
    assert "Is it this CT's segmentation?" in recomputed.info["notices"][0]
    with pytest.raises(ValueError, match="made from 'Phantom CT', not from 'Patient B'.*same grid"):
        logic.exportTrainingCase(patientB, node, str(tmp_path / "cases"))
    assert not (tmp_path / "cases").exists()
    # the same scan loaded again (another node, the same voxels): nothing to say
    again = mrml.add_volume_node_from_image(case.scene, case.ct, "Phantom CT again")
    assert not [n for n in logic.recomputeStatistics(again, node).info["notices"] if "made from" in n]
    logic.exportTrainingCase(again, node, str(tmp_path / "cases"))
    # the CT of the segmentation itself, under another transform than the segmentation: the lattice
    # where Slicer shows them differs, so it is not the scan the segments were drawn on
    moved = mrml.add_volume_node_from_image(case.scene, case.ct, "Phantom CT moved")
    transform = case.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[1, 3] = 7.3
    transform.SetMatrixTransformToParent(mrml.vtk_matrix(shift))
    moved.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(ValueError, match="another grid"):
        logic.exportTrainingCase(moved, node, str(tmp_path / "other"))


@pytest.mark.parametrize("moved", ["ct", "lungs"])
def test_existing_lungs_follow_parent_transforms(case, fake_engine, moved):
    """The CT (or the lung segmentation) under a transform: the lungs were read in the node's own
    coordinates, i.e. shifted against the CT where Slicer shows them."""
    shift = np.eye(4)
    shift[:3, 3] = [1.1, 3.0, -2.2]      # e.g. after a registration
    transform = case.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(mrml.vtk_matrix(shift))
    ijkToRas = mrml.ijk_to_ras_from_image(case.ct)
    lungsNode = case.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "lungs as drawn")
    if moved == "ct":   # the lungs drawn where the moved CT shows them, in world coordinates
        case.volume.SetAndObserveTransformNodeID(transform.GetID())
        drawnAt = shift @ ijkToRas
    else:               # the lungs under a transform, shown on the CT where it is
        lungsNode.SetAndObserveTransformNodeID(transform.GetID())
        drawnAt = np.linalg.inv(shift) @ ijkToRas
    for spec in mrml.lung_specs():
        mrml.set_segment_from_array(lungsNode, spec, case.lungs == spec.labelValue, drawnAt)
    notes = []
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(mrml.lung_mask_from_segmentation(lungsNode, case.volume, notes)), case.lungs)
    assert notes == []
    fake_engine.calls.clear()
    make_logic(case, fake_engine).process(case.volume, None, "existing", None, "cpu", lungSegmentation=lungsNode)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fake_engine.calls[-1]["lung_mask"].mask), case.lungs)


def test_a_users_own_table_is_never_overwritten(case, fake_engine):
    """A table of the user's chosen as "Statistics table" lost its columns to the figures."""
    own = case.scene.AddNewNodeByClass("vtkMRMLTableNode", "My measurements")
    column = own.AddColumn()
    column.SetName("Reader notes")
    own.AddEmptyRow()
    own.SetCellText(0, 0, "GGO looks larger on the left")
    logic = make_logic(case, fake_engine)
    result = logic.process(case.volume, None, "auto", None, "cpu", statisticsTable=own)
    assert result.tableNode is not own and result.tableNode.GetName() == "Phantom CT lesions statistics"
    assert own.GetNumberOfColumns() == 1 and own.GetColumnName(0) == "Reader notes"
    assert own.GetCellText(0, 0) == "GGO looks larger on the left"
    assert own.GetAttribute(mrml.STATS_ATTRIBUTE) is None
    note = ("'My measurements' is not a statistics table of this module and was left as it was: the figures are in "
            "'Phantom CT lesions statistics'")
    assert note in result.info["notices"] and f"Note: {note}" in result.summary
    assert result.segmentationNode.GetNodeReference(mrml.STATISTICS_REFERENCE_ROLE) is result.tableNode
    recomputed = logic.recomputeStatistics(case.volume, result.segmentationNode, own)
    assert recomputed.tableNode is result.tableNode and note in recomputed.summary
    assert own.GetNumberOfColumns() == 1
    # the module's own table, and an empty one, are filled
    again = logic.process(case.volume, result.segmentationNode, "auto", None, "cpu", statisticsTable=result.tableNode)
    assert again.tableNode is result.tableNode and not again.info.get("notices")


def test_bad_choices_are_refused_before_running(case, fake_engine):
    logic = make_logic(case, fake_engine)
    with pytest.raises(ValueError, match="lung method"):
        logic.process(case.volume, None, "lungs-by-magic", None, "cpu")
    with pytest.raises(ValueError, match="device"):
        logic.process(case.volume, None, "auto", None, "tpu")
    with pytest.raises(FileNotFoundError):
        logic.process(case.volume, None, "auto", "/nonexistent/model.pt", "cpu")
    with pytest.raises(ValueError, match="input"):
        logic.process(None, None, "auto", None, "cpu")
    with pytest.raises(ValueError, match="mirrored-pass"):
        logic.process(case.volume, None, "auto", None, "cpu", flipTTA="sideways")


def test_mirrored_pass_choice_reaches_the_engine(case, fake_engine):
    """The panel's "Mirrored pass" choice: the model's setting (no override), on, off."""
    logic = make_logic(case, fake_engine)
    for choice, expected in (("model", None), ("on", True), ("off", False)):
        fake_engine.calls.clear()
        logic.process(case.volume, None, "auto", None, "cpu", flipTTA=choice)
        assert fake_engine.calls[-1]["flip_tta"] is expected, choice


def test_cancel_in_process_raises_and_adds_nothing(case, fake_engine):
    before = case.scene.GetNumberOfNodes()
    with pytest.raises(logic_.Cancelled):
        make_logic(case, fake_engine).process(case.volume, None, "auto", None, "cpu", cancelRequested=lambda: True)
    assert case.scene.GetNumberOfNodes() == before


# ---------------------------------------------------------------------------
# Background run (separate Python process), as the panel uses it
# ---------------------------------------------------------------------------

def background_logic(case, fake_engine_dir):
    logic = make_logic(case, None)
    logic.workerEnvironment = {"PYTHONPATH": os.pathsep.join([str(fake_engine_dir), os.environ.get("PYTHONPATH", "")])}
    return logic


def test_background_run_gives_the_same_result_and_cleans_up(case, fake_engine_dir):
    progress = []
    run = background_logic(case, fake_engine_dir).process(
        case.volume, None, "auto", None, "cpu", waitForCompletion=False,
        progressCallback=lambda s, f: progress.append((s, f)), flipTTA="off")
    workDir = run.workDir
    assert os.path.isdir(workDir)
    assert case.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0  # nothing until finished
    result = run.wait()

    assert run.state == run.FINISHED and not os.path.exists(workDir)
    assert progress[0] == ("lungs", 0.0) and progress[-1] == ("lesions", 1.0)
    for spec in mrml.segment_specs():
        mask = mrml.segment_mask_array(result.segmentationNode, spec.segmentId, case.volume)
        np.testing.assert_array_equal(mask > 0, expected_mask(case, spec), err_msg=spec.name)
    assert mrml.table_values(result.tableNode)["lesions.ggo.volume_ml"] == pytest.approx(
        result.stats["lesions"]["ggo"]["volume_ml"])
    info = json.loads(result.tableNode.GetAttribute("SSALesionSeg.Info"))
    assert info["device"] == "cpu" and info["flip_tta"] is False    # the worker got the choice


def test_background_cancel_kills_the_worker_and_leaves_the_scene_as_it_was(case, fake_engine_dir, monkeypatch):
    monkeypatch.setenv("FAKE_ENGINE_DELAY", "2")
    existing = case.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "user's segmentation")
    nodesBefore = case.scene.GetNumberOfNodes()
    progress = []
    run = background_logic(case, fake_engine_dir).process(
        case.volume, existing, "auto", None, "cpu", waitForCompletion=False,
        progressCallback=lambda s, f: progress.append((s, f)))
    deadline = time.time() + 60
    while not progress and time.time() < deadline:
        assert run.poll() is None
        time.sleep(0.05)
    assert progress, "the worker reported no progress"
    workDir = run.workDir
    run.cancel()

    assert run.state == run.CANCELLED
    assert run.process.poll() is not None
    assert run.process.stdout.closed and run.process.stdin.closed   # no descriptors left per run
    assert not os.path.exists(workDir)
    assert run.poll() is None
    assert case.scene.GetNumberOfNodes() == nodesBefore
    assert existing.GetSegmentation().GetNumberOfSegments() == 0


def test_background_failure_reports_the_engine_error(case, fake_engine_dir, monkeypatch):
    monkeypatch.setenv("FAKE_ENGINE_FAIL", "CT has no lungs in view")
    run = background_logic(case, fake_engine_dir).process(case.volume, None, "auto", None, "cpu",
                                                          waitForCompletion=False)
    workDir = run.workDir
    with pytest.raises(RuntimeError, match="ValueError: CT has no lungs in view"):
        run.wait()
    assert run.state == run.FAILED and not os.path.exists(workDir)
    assert case.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_background_engine_input_error_is_its_message_without_a_traceback(case, fake_engine_dir, monkeypatch):
    monkeypatch.setenv("FAKE_ENGINE_INPUT_ERROR", "'Phantom CT': no lungs in view")
    run = background_logic(case, fake_engine_dir).process(case.volume, None, "auto", None, "cpu",
                                                          waitForCompletion=False)
    with pytest.raises(RuntimeError) as error:
        run.wait()
    assert str(error.value).startswith("'Phantom CT': no lungs in view") and "Traceback" not in str(error.value)


def test_output_deleted_during_a_background_run_gets_a_new_segmentation(case, fake_engine_dir):
    """The results went into the removed node (outside the scene) and the run reported success."""
    logic = background_logic(case, fake_engine_dir)
    first = logic.process(case.volume, None, "auto", None, "cpu", waitForCompletion=False).wait()
    output, table = first.segmentationNode, first.tableNode
    run = logic.process(case.volume, output, "auto", None, "cpu", waitForCompletion=False,
                        statisticsTable=table)
    mrml.remove_nodes(case.scene, [output, table])   # the scene is written only once the run is polled done
    result = run.wait()
    assert run.state == run.FINISHED
    node = result.segmentationNode
    assert node is not output and node.GetScene() is case.scene and result.tableNode.GetScene() is case.scene
    assert node.GetSegmentation().GetNumberOfSegments() == len(mrml.segment_specs())
    assert node.GetNodeReference(mrml.STATISTICS_REFERENCE_ROLE) is result.tableNode
    note = f"the output segmentation 'Phantom CT lesions' was deleted during the run: the results are in a new " \
           f"segmentation, '{node.GetName()}'"
    assert note in result.info["notices"] and f"Note: {note}" in result.summary
    assert case.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    # the input CT deleted: nothing is written, and the run says so
    run = logic.process(case.volume, node, "auto", None, "cpu", waitForCompletion=False)
    mrml.remove_nodes(case.scene, [case.volume])
    with pytest.raises(RuntimeError, match="The input CT 'Phantom CT' was deleted during the run"):
        run.wait()
    assert run.state == run.FAILED and case.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1


def test_background_worker_stops_when_slicer_is_gone(case, fake_engine_dir, monkeypatch):
    """Slicer's end of the worker's stdin closes when Slicer exits or crashes; the worker
    (which would otherwise keep the GPU and a copy of the CT) must stop by itself."""
    monkeypatch.setenv("FAKE_ENGINE_DELAY", "20")
    run = background_logic(case, fake_engine_dir).process(case.volume, None, "auto", None, "cpu",
                                                          waitForCompletion=False)
    started = time.time()
    run.process.stdin.close()           # what the operating system does when Slicer dies
    assert run.process.wait(timeout=15) == 3
    assert time.time() - started < 15
    with pytest.raises(RuntimeError, match="exited with code 3"):
        run.wait()
    assert case.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_exit_messages_say_what_happened():
    message = logic_.exit_message(-9)
    assert "lack of memory" in message and "Crop Volume" in message
    # an in-plane crop that cuts the lungs gives wrong figures: never the advice
    assert "only above and below the lungs, keeping the whole chest in-plane" in message
    assert "code 1 without reporting an error" in logic_.exit_message(1)


# ---------------------------------------------------------------------------
# Engine loader
# ---------------------------------------------------------------------------

def test_loader_uses_the_bundled_logic_folder_when_nothing_is_installed(tmp_path):
    import subprocess
    moduleDir = tmp_path / "SSALesionSeg"
    logicDir = moduleDir / "Logic"
    logicDir.mkdir(parents=True)
    (logicDir / "__init__.py").write_text("from . import pipeline\n")
    (logicDir / "pipeline.py").write_text(
        "from ssalesionseg import stats\nclass Cancelled(Exception): pass\ndef segment_image(ct, **kw): return ct\n")
    (logicDir / "stats.py").write_text("def compute_stats(*a, **kw): return {}\ndef label_names_for(c): return {}\n"
                                       "def figure_notes(s, lungs=None): return []\n")
    (logicDir / "lungstep.py").write_text("LOBE_WEIGHTS_ENV = 'X'\ndef resolve_weights(*a): return None\n"
                                          "class SidedLungMask: pass\n")
    # -S: no site-packages, so an installed ssalesionseg cannot be picked up instead.
    code = (f"import sys; sys.path.insert(0, {str(os.path.join(MODULE_DIR))!r})\n"
            "from SSALesionSegLib import engine\n"
            f"e = engine.load_engine({str(moduleDir)!r})\n"
            "import ssalesionseg\n"
            "print(ssalesionseg.__file__, e.segment_image(7), e.compute_stats())\n")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(logicDir / "__init__.py"), "7", "{}"]


def test_loader_reports_a_missing_engine(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ssalesionseg", None)  # import of it fails
    with pytest.raises(ImportError):
        engine_.load_engine(str(tmp_path))


# ---------------------------------------------------------------------------
# Real engine (skipped until SSALesionSeg/Logic provides it)
# ---------------------------------------------------------------------------

def test_real_engine_process_fills_segments_and_table(mrml_scene, tiny_checkpoint):
    real = real_engine_or_skip()
    ct, _, _ = phantom.make_phantom(size=(64, 64, 6), spacing=(0.8, 0.8, 2.5))
    volume = mrml.add_volume_node_from_image(mrml_scene.scene, ct, "Phantom CT")
    logic = logic_.ProcessingLogic(mrml_scene.scene, engine=real, moduleDir=MODULE_DIR)
    stages = []
    result = logic.process(volume, None, "classical", tiny_checkpoint, "cpu",
                           progressCallback=lambda stage, fraction: stages.append(stage))
    assert {"lungs", "lesions"} <= set(stages)
    assert result.info["checkpoint"]["name"] == "tiny-random.safetensors"

    segmentation = result.segmentationNode.GetSegmentation()
    for spec in mrml.segment_specs(result.classNames):
        segment = segmentation.GetSegment(spec.segmentId)
        assert segment is not None and segment.GetName() == spec.name
        assert segment.GetTerminology() == spec.terminology
    values = mrml.table_values(result.tableNode)
    for key, value in mrml.flatten_stats(result.stats):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert values[key] == pytest.approx(value), key
    for key in ("lungs.total.volume_ml", "lesions.infection.volume_ml"):
        assert key in values

    recomputed = logic.recomputeStatistics(volume, result.segmentationNode)
    for key, value in mrml.table_values(recomputed.tableNode).items():
        if key.endswith("volume_ml"):
            assert value == pytest.approx(values[key], rel=1e-6, abs=1e-6), key


def test_self_test_logic_with_the_bundled_model(mrml_scene, monkeypatch, tmp_path):
    """What SSALesionSegTest.test_PhantomWithBundledModel does inside Slicer, on slicer-core."""
    real = real_engine_or_skip()
    monkeypatch.delenv("SSALESIONSEG_MODEL", raising=False)
    monkeypatch.setenv("SSALESIONSEG_CACHE", str(tmp_path / "no-cache"))
    ct, _, _ = phantom.make_phantom()
    volume = mrml.add_volume_node_from_image(mrml_scene.scene, ct, "Phantom CT")
    logic = logic_.ProcessingLogic(mrml_scene.scene, engine=real, moduleDir=MODULE_DIR)
    result = logic.process(volume, None, "auto", None, "cpu")
    assert result.info["checkpoint"]["name"] == json.loads(open(os.path.join(
        MODULE_DIR, "Resources", "Models", "models.json")).read())["models"][0]["file"]
    segmentation = result.segmentationNode.GetSegmentation()
    specs = mrml.segment_specs(result.classNames)
    assert [segmentation.GetSegment(s.segmentId).GetName() for s in specs] == [s.name for s in specs]
    values = mrml.table_values(result.tableNode)
    assert values["lungs.total.volume_ml"] == pytest.approx(result.stats["lungs"]["total"]["volume_ml"])
    again = logic.process(volume, result.segmentationNode, "auto", None, "cpu")
    assert again.segmentationNode is result.segmentationNode and again.tableNode is result.tableNode
    assert segmentation.GetNumberOfSegments() == len(specs)
    assert mrml_scene.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1


def _sample_cli_segmentation(tmp_path):
    """(the sample CT's path, a .seg.nrrd of it as the CLI writes one: classical lungs, GGO /
    consolidation by HU inside them)."""
    from ssalesionseg.geometry import image_like
    from ssalesionseg.io import read_ct
    from ssalesionseg.lungstep import compute_lungs
    from ssalesionseg.segfile import write_seg_nrrd

    ctPath = os.path.join(MODULE_DIR, "Resources", "Sample", "covid_ct_sample.nii.gz")
    ct, _ = read_ct(ctPath)
    lungs = compute_lungs(ct, method="classical").labels
    hu = sitk.GetArrayFromImage(ct)
    lesions = np.where(lungs > 0, np.where(hu > -300, 2, np.where(hu > -700, 1, 0)), 0).astype(np.uint8)
    segPath = tmp_path / "demo.seg.nrrd"
    write_seg_nrrd(segPath, image_like(lesions, ct), image_like(lungs, ct), ["background", "ggo", "consolidation"])
    return ctPath, segPath


def test_recompute_of_a_cli_seg_nrrd_gives_the_figures_and_notes_of_ssalesionseg_stats(mrml_scene, tmp_path):
    """The researcher's loop across the two faces: `segment`'s .seg.nrrd opened in Slicer next to
    its CT (NIfTI, read by Slicer's own volumes logic), Recompute gives what `ssalesionseg stats`
    gives for the same file — figures and notes, the CT-based one on lungs running into the
    padding around the scanned field included (the demo CT has it)."""
    real_engine_or_skip()
    from ssalesionseg import cli

    ctPath, segPath = _sample_cli_segmentation(tmp_path)
    assert cli.main(["stats", "--ct", ctPath, "--labels", str(segPath), "--out", str(tmp_path / "o")]) == 0
    expected = json.loads((tmp_path / "o" / "covid_ct_sample_stats.json").read_text())
    assert any("scanned field" in n for n in expected["info"]["notices"])

    volume = mrml_scene.volumesLogic.AddArchetypeVolume(ctPath, "covid_ct_sample", 0, None)
    node = mrml_scene.segmentationsLogic.LoadSegmentationFromFile(str(segPath), False)
    logic = logic_.ProcessingLogic(mrml_scene.scene, moduleDir=MODULE_DIR)
    recomputed = logic.recomputeStatistics(volume, node)
    for key, value in mrml.flatten_stats(expected):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert recomputed.stats is not None and mrml.table_values(recomputed.tableNode)[key] == \
                pytest.approx(value, rel=1e-9), key
    assert recomputed.info.get("notices", []) == expected["info"]["notices"]


def test_stats_json_saved_after_recompute_records_what_ssalesionseg_stats_records(mrml_scene, tmp_path):
    """saveResults after Recompute wrote the figures with only the outputs' names under ``info``:
    no CT, grid, labels, lung method, ``recomputed_by`` nor notes — a reader (or ``segment``
    rerun into that folder) could not tell corrected figures from the model's, nor of which CT."""
    real_engine_or_skip()
    from ssalesionseg import cli
    from ssalesionseg.outputs import edited_outputs
    from ssanet.checkpoint import sha256_of

    ctPath, segPath = _sample_cli_segmentation(tmp_path)
    assert cli.main(["stats", "--ct", ctPath, "--labels", str(segPath), "--out", str(tmp_path / "cli")]) == 0
    expected = json.loads((tmp_path / "cli" / "covid_ct_sample_stats.json").read_text())

    volume = mrml_scene.volumesLogic.AddArchetypeVolume(ctPath, "covid_ct_sample", 0, None)
    node = mrml_scene.segmentationsLogic.LoadSegmentationFromFile(str(segPath), False)
    logic = logic_.ProcessingLogic(mrml_scene.scene, moduleDir=MODULE_DIR)
    recomputed = logic.recomputeStatistics(volume, node)
    out = tmp_path / "slicer"
    seg, statsJson = logic.saveResults(recomputed, str(out), "covid_ct_sample")
    saved = json.loads(open(statsJson, encoding="utf-8").read())

    info, want = saved["info"], expected["info"]
    assert set(want) <= set(info), set(want) - set(info)
    for key in ("source", "size", "labels", "lung_method", "notices"):
        assert info[key] == want[key], key
    # Slicer's NIfTI reader gives 0.7500000000000001 where ITK's gives 0.75
    assert info["spacing_mm"] == pytest.approx(want["spacing_mm"], abs=1e-12)
    assert {**info["input"], "spacing_mm": want["input"]["spacing_mm"]} == want["input"]
    assert info["input"]["spacing_mm"] == pytest.approx(want["input"]["spacing_mm"], abs=1e-12)
    assert info["recomputed_by"] and info["outputs_sha256"]["segmentation"] == sha256_of(seg)
    for key, value in mrml.flatten_stats(expected):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert mrml.flatten_stats(saved) and dict(mrml.flatten_stats(saved))[key] == pytest.approx(value), key
    # a `segment` rerun into that folder keeps the corrected figures as the user's work (.bak)
    assert statsJson in [str(p) for p in edited_outputs(out, "covid_ct_sample")]


def test_stats_json_saved_after_apply_and_recompute_names_the_run_that_made_the_labels(case, fake_engine, tmp_path):
    """After Apply → edit → Recompute the saved JSON says what made the labels (the Apply's
    settings, as ``stats`` keeps them under ``labels_made_by``), of which CT (the node's name
    when it has no file), and the notes the panel showed."""
    logic = make_logic(case, fake_engine)
    applied = logic.process(case.volume, None, "classical", None, "cpu")
    node = applied.segmentationNode
    ggo = mrml.lesion_specs()[0]
    outside = np.zeros(case.labels.shape, bool)
    outside[0, :4, :4] = True   # a GGO voxel painted outside the lungs
    assert not (outside & (case.lungs > 0)).any()
    mrml.set_segment_from_array(node, ggo, (case.labels == 1) | outside, mrml.ijk_to_ras_from_image(case.ct))
    recomputed = logic.recomputeStatistics(case.volume, node)
    _, statsJson = logic.saveResults(recomputed, str(tmp_path), "case")
    info = json.loads(open(statsJson, encoding="utf-8").read())["info"]
    assert info["source"] == "Phantom CT" and info["labels"] == "Phantom CT lesions"
    assert info["size"] == list(case.ct.GetSize())
    assert info["spacing_mm"] == pytest.approx(list(case.ct.GetSpacing()), abs=1e-12)
    assert info["input"]["orientation"] == sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(
        case.ct.GetDirection())
    assert info["labels_made_by"]["lung_method"] == "classical" and info["labels_made_by"]["device"] == "cpu"
    assert info["lung_method"] == "segmentation file" and info["recomputed_by"]
    assert info["notices"] == recomputed.info["notices"] and any("outside the lung mask" in n
                                                                  for n in info["notices"])


def _csv_rows(path):
    import csv
    with open(path, newline="", encoding="utf-8") as f:
        return {row["measure"]: row["value"] for row in csv.DictReader(f)}


def test_table_shows_figures_without_a_value_as_the_cli_csv_does_and_says_why(case, fake_engine, tmp_path,
                                                                              monkeypatch):
    """A lung side without lung, the attenuation of a deleted lesion class, the severity of a lung
    not scored: the table left those rows out, so a reader could not tell 0 from "not computed";
    the CLI's CSV writes them with an empty value."""
    from ssalesionseg import cli
    logic = make_logic(case, fake_engine)
    rightOnly = case.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "right lung only")
    mrml.set_segment_from_array(rightOnly, mrml.lung_specs()[0], case.lungs == 1, mrml.ijk_to_ras_from_image(case.ct))
    node = logic.process(case.volume, None, "existing", None, "cpu", lungSegmentation=rightOnly).segmentationNode
    node.GetSegmentation().RemoveSegment("Consolidation")
    recomputed = logic.recomputeStatistics(case.volume, node)
    assert any(n.startswith("no consolidation segment: counted as 0 mL") for n in recomputed.info["notices"])
    table = recomputed.tableNode
    rows = {table.GetCellText(r, list(mrml.TABLE_COLUMNS).index("Key")):
            {c: table.GetCellText(r, i) for i, c in enumerate(mrml.TABLE_COLUMNS)} for r in range(table.GetNumberOfRows())}
    values = mrml.table_values(table)
    # the same segmentation and CT through `ssalesionseg stats`: the CSV's rows of these sections
    ctPath, segPath = tmp_path / "case.nrrd", tmp_path / "case.seg.nrrd"
    sitk.WriteImage(case.ct, str(ctPath))
    mrml.save_segmentation(node, segPath)
    assert cli.main(["stats", "--ct", str(ctPath), "--labels", str(segPath), "--out", str(tmp_path / "o")]) == 0
    csvRows = _csv_rows(tmp_path / "o" / "case_stats.csv")
    text = {k for k, v in mrml.flatten_stats(recomputed.stats) if not (v is None or mrml._is_number(v))}
    expected = {k: v for k, v in csvRows.items() if k.split(".")[0] in mrml.TABLE_SECTIONS and k not in text}
    assert set(rows) == set(expected)
    empty = {k for k, v in expected.items() if v == ""}
    assert empty >= {"lesions.ggo.percent_of_left_lung", "lesions.consolidation.mean_hu",
                     "severity.regions.left_lung.score", "severity.regions.left_lung.percent_involved"}
    assert {k for k, v in values.items() if math.isnan(v)} == empty
    for key in set(expected) - empty:
        assert values[key] == pytest.approx(float(expected[key]), rel=1e-6), key
    assert values["lesions.consolidation.volume_ml"] == 0 and rows["lesions.consolidation.volume_ml"]["Note"] == ""
    assert rows["lesions.ggo.percent_of_left_lung"]["Note"] == "n/a: the lung mask has no left lung"
    assert rows["lesions.consolidation.mean_hu"]["Note"] == "n/a: no voxels of this lesion"
    assert rows["severity.regions.left_lung.score"]["Note"] == "n/a: the lung mask has no left lung, so it is not scored"
    # a binary model: no GGO or consolidation class, said as such
    monkeypatch.setenv("FAKE_ENGINE_BINARY", "1")
    binary = logic.process(case.volume, None, "auto", None, "cpu").tableNode
    rows = {binary.GetCellText(r, 5): [binary.GetCellText(r, c) for c in range(5)] for r in range(binary.GetNumberOfRows())}
    assert rows["lesions.ggo"] == ["Ground-glass opacity", "All measurements", "nan", "",
                                   "n/a: not a class of this model"]


def test_recompute_and_export_refuse_a_volume_that_is_not_a_ct_as_apply_does(case, fake_engine, tmp_path):
    """Recompute measured the segments on whatever volume was selected: on a labelmap, or on a CT
    loaded without its rescale (0..4095, no voxel below -1000 HU), it gave a table of mean "HU"
    that are not HU, where Apply and ``ssalesionseg stats --ct`` refuse that volume."""
    logic = make_logic(case, fake_engine)
    result = logic.process(case.volume, None, "auto", None, "cpu")
    node, table = result.segmentationNode, result.tableNode
    before = table.GetAttribute(mrml.STATS_ATTRIBUTE)
    stored = sitk.GetImageFromArray((sitk.GetArrayFromImage(case.ct).astype(np.int32) + 1024).astype(np.uint16))
    stored.CopyInformation(case.ct)
    raw = mrml.add_volume_node_from_image(case.scene, stored, "CT without rescale")
    labelmap = mrml.add_volume_node_from_image(case.scene, _image(case.labels, case.ct), "labels", labelmap=True)
    rgb = case.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "screenshot")
    import vtk
    pixels = vtk.vtkImageData()
    pixels.SetDimensions(48, 40, 8)
    pixels.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    rgb.SetAndObserveImageData(pixels)
    # the panel's disabled Apply says it at selection, in the words the run would refuse it with
    for volume in (labelmap, rgb):
        with pytest.raises(ValueError) as refused:
            mrml.check_ct(volume)
        assert logic_.missing_choice(volume, "auto") == str(refused.value) + "."
    assert logic_.missing_choice(raw, "auto") is None   # only the voxels tell: the run refuses it
    for volume, message in ((raw, r"^'CT without rescale' does not look like a CT in Hounsfield units"),
                            (labelmap, r"^'labels' is a labelmap( volume)?, not a CT"),
                            (rgb, r"^'screenshot' is a vector/colour volume with 3 components.*select a scalar CT")):
        with pytest.raises(ValueError, match=message):
            logic.recomputeStatistics(volume, node)
        with pytest.raises(ValueError, match=message):
            logic.exportTrainingCase(volume, node, str(tmp_path / "cases"))
        with pytest.raises(ValueError, match=message):
            logic.process(volume, None, "auto", None, "cpu")
    assert table.GetAttribute(mrml.STATS_ATTRIBUTE) == before and not (tmp_path / "cases").exists()
    with pytest.raises(ValueError, match="Select the input CT volume"):
        logic.recomputeStatistics(None, node)
    with pytest.raises(ValueError, match="Select the segmentation"):
        logic.exportTrainingCase(case.volume, None, str(tmp_path / "cases"))


def test_input_ct_changed_during_a_background_run_gets_no_results(case, fake_engine_dir, monkeypatch):
    """The CT filtered in place (or resampled into itself) while the worker ran: its results —
    labels and figures of the voxels as they were — were put onto the changed CT without a word."""
    monkeypatch.setenv("FAKE_ENGINE_DELAY", "0.3")
    logic = background_logic(case, fake_engine_dir)
    mine = case.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my segmentation")
    mine.GetSegmentation().AddEmptySegment("note", "My note")
    run = logic.process(case.volume, mine, "auto", None, "cpu", waitForCompletion=False)
    array = slicer.util.arrayFromVolume(case.volume)
    slicer.util.updateVolumeFromArray(case.volume, (array - 100).astype(array.dtype))   # e.g. a filter in place
    with pytest.raises(RuntimeError, match=r"The input CT 'Phantom CT' was changed during the run \(its voxel "
                                           r"values are not those segmented\).*Press Apply again"):
        run.wait()
    assert run.state == run.FAILED and not os.path.exists(run.outputDir)
    assert mine.GetSegmentation().GetNumberOfSegments() == 1
    assert case.scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 0
    # resampled into itself: another grid
    run = logic.process(case.volume, None, "auto", None, "cpu", waitForCompletion=False)
    slicer.util.updateVolumeFromArray(case.volume, np.ascontiguousarray(slicer.util.arrayFromVolume(case.volume)[::2]))
    with pytest.raises(RuntimeError, match=r"was changed during the run \(its voxel grid is not the one segmented\)"):
        run.wait()
    assert case.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
