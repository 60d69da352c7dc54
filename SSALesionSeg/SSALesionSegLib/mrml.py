"""MRML side of SSALesionSeg: conversions between Slicer nodes and SimpleITK images.

No Qt and no ``slicer.app``: everything here runs on a plain ``vtkMRMLScene``, so
it works in desktop Slicer, in ``Slicer --no-main-window`` and with the
``slicer-core`` wheel.

Coordinate conventions: Slicer nodes are in RAS, SimpleITK images in LPS; Slicer
arrays are indexed (k, j, i), as are SimpleITK arrays from GetArrayFromImage.
"""

import importlib
import json
import os

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

import slicer

from . import engine as _engine

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

CLASS_NAMES_ATTRIBUTE = "SSALesionSeg.ClassNames"


class SegmentSpec:
    """How one engine label becomes one segment."""

    def __init__(self, name, source, labelValue, color, terminology, fillOpacity2D=None, visible3D=True):
        self.name = name
        self.segmentId = _engine_module("segfile").segment_id(name)   # the engine's .seg.nrrd IDs
        self.source = source  # "labels" or "lungs": which engine labelmap holds it
        self.labelValue = labelValue
        self.color = tuple(color)
        self.terminology = terminology
        self.fillOpacity2D = fillOpacity2D
        self.visible3D = visible3D


def _engine_module(name):
    """A light module of the engine (no torch): ``segfile``, ``terminology``, ``io``, ``trainingcase``."""
    _engine.import_engine_package()
    return importlib.import_module(_engine.ENGINE_PACKAGE + "." + name)


def _default_class_names():
    """The multi-class model's classes (``ssanet.classes``), for results that do not say."""
    _engine.import_engine_package()
    return list(importlib.import_module("ssanet.classes").MULTICLASS)


def _engine_catalog():
    """The engine's segment naming and terminology."""
    return _engine_module("segfile"), _engine_module("terminology")


def lesion_specs(classNames=None):
    segfile, terminology = _engine_catalog()
    return [SegmentSpec(name, "labels", value, terminology.color(name), terminology.terminology_entry(name))
            for name, value in segfile.lesion_segments(list(classNames or _default_class_names()))]


def lung_specs():
    segfile, terminology = _engine_catalog()
    # Lungs are context for the lesions: faint in slices, absent from 3D so they do
    # not hide the lesions.
    return [SegmentSpec(name, "lungs", value, terminology.color(name), terminology.terminology_entry(name),
                        fillOpacity2D=0.15, visible3D=False)
            for name, value, _ in segfile.LUNG_SEGMENTS]


def segment_specs(classNames=None):
    """Lesion then lung segments, as the engine names, colours and codes them."""
    return lesion_specs(classNames) + lung_specs()


STATISTICS_REFERENCE_ROLE = "SSALesionSegStatistics"
# The CT a result segmentation was made from (set on Apply); Recompute and Export check it.
SOURCE_VOLUME_REFERENCE_ROLE = "SSALesionSegSourceVolume"
REFERENCE_GEOMETRY_ROLE = "referenceImageGeometryRef"   # what SetReferenceImageGeometryParameterFromVolumeNode sets
STATS_ATTRIBUTE = "SSALesionSeg.Stats"


# ---------------------------------------------------------------------------
# Scene set-up outside desktop Slicer
# ---------------------------------------------------------------------------

class HeadlessScene:
    """A vtkMRMLScene with the module logics the segmentation code relies on.

    The order matters: the segmentations logic registers the binary-labelmap
    representation converters, which must exist before any segment is added.
    The logic objects are kept referenced here so they outlive the set-up.
    """

    def __init__(self):
        self.scene = slicer.vtkMRMLScene()
        self.applicationLogic = slicer.vtkSlicerApplicationLogic()
        self.applicationLogic.SetMRMLScene(self.scene)
        self.colorLogic = slicer.vtkSlicerColorLogic()
        self.colorLogic.SetMRMLApplicationLogic(self.applicationLogic)
        self.colorLogic.SetMRMLScene(self.scene)
        self.segmentationsLogic = slicer.vtkSlicerSegmentationsModuleLogic()
        self.segmentationsLogic.SetMRMLApplicationLogic(self.applicationLogic)
        self.segmentationsLogic.SetMRMLScene(self.scene)
        self.volumesLogic = slicer.vtkSlicerVolumesLogic()
        self.volumesLogic.SetMRMLApplicationLogic(self.applicationLogic)
        self.volumesLogic.SetMRMLScene(self.scene)
        # Logics find each other through the application logic (e.g. the volumes logic
        # asks for "Colors" when it sets up a display node).
        for name, logic in (("Colors", self.colorLogic), ("Segmentations", self.segmentationsLogic),
                            ("Volumes", self.volumesLogic)):
            self.applicationLogic.SetModuleLogic(name, logic)


# ---------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------

def ijk_to_ras_from_image(image):
    """4x4 IJK-to-RAS matrix (numpy) of a SimpleITK image."""
    direction = np.array(image.GetDirection(), float).reshape(3, 3)
    spacing = np.array(image.GetSpacing(), float)
    origin = np.array(image.GetOrigin(), float)
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ direction @ np.diag(spacing)
    matrix[:3, 3] = LPS_TO_RAS @ origin
    return matrix


def vtk_matrix(array):
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(array[row][column]))
    return matrix


def numpy_matrix(vtkMatrix):
    return np.array([[vtkMatrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def set_image_geometry_from_ijk_to_ras(image, ijkToRas):
    ijkToRas = np.asarray(ijkToRas, float)
    axes = ijkToRas[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise ValueError("Degenerate IJK-to-RAS matrix (zero spacing)")
    directionLps = LPS_TO_RAS @ (axes / spacing)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in directionLps.ravel()])
    image.SetOrigin([float(v) for v in LPS_TO_RAS @ ijkToRas[:3, 3]])
    return image


def image_from_volume_node(volumeNode):
    """SimpleITK image (a copy) of a scalar volume node, geometry converted to LPS.

    A parent transform is not applied: results are put back under the same
    transform, so they line up with the volume wherever it is.
    """
    if volumeNode is None or volumeNode.GetImageData() is None:
        raise ValueError("The input volume has no image data")
    if volumeNode.GetImageData().GetNumberOfScalarComponents() != 1:
        raise ValueError(f"'{volumeNode.GetName()}' is not a single-component (grayscale) volume")
    array = slicer.util.arrayFromVolume(volumeNode)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return set_image_geometry_from_ijk_to_ras(image, numpy_matrix(matrix))


def file_or_name(node):
    """Where a node's data come from, as a stats JSON records its input: the absolute path of
    the file it was loaded from or last saved to (its storage node), else its name."""
    storage = node.GetStorageNode() if node is not None and node.IsA("vtkMRMLStorableNode") else None
    path = storage.GetFileName() if storage is not None else None
    return os.path.abspath(path) if path else node.GetName()


def volume_info(volumeNode):
    """What ``io.read_ct`` records of a CT file (``input``, ``size``, ``spacing_mm``,
    ``orientation``), for a volume node: its file (:func:`file_or_name`), its voxel grid."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    axes = numpy_matrix(matrix)[:3, :3]
    directionLps = LPS_TO_RAS @ (axes / np.linalg.norm(axes, axis=0))
    return {"input": file_or_name(volumeNode),
            "size": [int(n) for n in volumeNode.GetImageData().GetDimensions()],
            # the node's own spacing: the IJK-to-RAS matrix carries ~1e-16 of noise
            "spacing_mm": [float(s) for s in volumeNode.GetSpacing()],
            "orientation": sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(
                [float(v) for v in directionLps.ravel()])}


def is_labelmap_volume(volumeNode):
    return volumeNode is not None and volumeNode.IsA("vtkMRMLLabelMapVolumeNode")


def not_a_ct(volumeNode):
    """Why ``volumeNode`` is plainly not a CT — a labelmap, or a vector/colour volume — from the
    node alone, without reading its voxels (the panel asks it at every selection), or None."""
    if is_labelmap_volume(volumeNode):
        return f"'{volumeNode.GetName()}' is a labelmap volume, not a CT: select the CT as input"
    imageData = volumeNode.GetImageData()
    if imageData is not None and imageData.GetNumberOfScalarComponents() != 1:
        return (f"'{volumeNode.GetName()}' is a vector/colour volume with {imageData.GetNumberOfScalarComponents()} "
                "components per voxel (e.g. an RGB image), not a CT: select a scalar CT in Hounsfield units as input")
    return None


def check_ct(volumeNode, image=None):
    """Raise (a ValueError naming the volume) when ``volumeNode`` is not a CT the engine takes:
    a labelmap volume, or what the engine's own check (``io.validate_ct``) refuses — checked
    here, before a run starts, so the message names the volume and comes at once. Returns the
    volume's image (``image``, or :func:`image_from_volume_node`'s)."""
    reason = not_a_ct(volumeNode)
    if reason:
        raise ValueError(reason)
    image = image if image is not None else image_from_volume_node(volumeNode)
    _engine_module("io").validate_ct(image, f"'{volumeNode.GetName()}'")
    return image


def update_volume_node_from_image(volumeNode, image):
    """Replace voxels and geometry of a volume node with those of a SimpleITK image."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("Expected a 3D single-component image")
    slicer.util.updateVolumeFromArray(volumeNode, sitk.GetArrayFromImage(image))
    volumeNode.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras_from_image(image)))
    return volumeNode


def add_volume_node_from_image(scene, image, name, labelmap=False):
    className = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    volumeNode = scene.AddNewNodeByClass(className, name)
    update_volume_node_from_image(volumeNode, image)
    volumeNode.CreateDefaultDisplayNodes()
    return volumeNode


def oriented_image_from_array(array, ijkToRas):
    """vtkOrientedImageData (unsigned char) from a (k, j, i) numpy array."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    imageData = slicer.vtkOrientedImageData()
    imageData.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    imageData.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars())[:] = array.ravel()
    imageData.SetImageToWorldMatrix(vtk_matrix(ijkToRas))
    return imageData


def array_from_oriented_image(imageData):
    dims = imageData.GetDimensions()
    scalars = numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars())
    return scalars.reshape(dims[2], dims[1], dims[0]).copy()


def reference_geometry_image(volumeNode):
    """Empty vtkOrientedImageData with the volume's grid (for resampling onto it)."""
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(volumeNode.GetImageData().GetExtent())
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    reference.SetImageToWorldMatrix(matrix)
    return reference


def check_same_grid(image, volumeNode, tolerance=1e-3):
    """Raise if a SimpleITK image is not on the volume's voxel grid."""
    dims = volumeNode.GetImageData().GetDimensions()
    if tuple(image.GetSize()) != tuple(dims):
        raise ValueError(f"Labelmap size {image.GetSize()} differs from the CT size {dims}")
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    if not np.allclose(ijk_to_ras_from_image(image), numpy_matrix(matrix), atol=tolerance):
        raise ValueError("Labelmap geometry (origin, spacing or direction) differs from the CT's")


# ---------------------------------------------------------------------------
# Segmentation node
# ---------------------------------------------------------------------------

def _result_tag():
    """The segment tag marking a result segment of this module (its value: the spec's ID), as
    Apply and the engine's .seg.nrrd writer set it; Slicer keeps it in scenes and .seg.nrrd files."""
    return _engine_module("segfile").RESULT_TAG


def _tag(segment, name):
    value = vtk.reference("")
    return str(value) if segment.GetTag(name, value) else None


def is_result_segment(segmentation, segmentId, spec):
    """Whether segment ``segmentId`` is ``spec``'s result, written by this module (an Apply, or the
    engine's .seg.nrrd loaded into Slicer): it carries the result tag naming the spec, or — made
    before segments were tagged — it has the spec's ID and name both. A segment of the user's
    with the same name (e.g. a hand-painted "Consolidation") is not."""
    segment = segmentation.GetSegment(segmentId)
    if segment is None:
        return False
    tag = _tag(segment, _result_tag())
    if tag is not None:
        return tag == spec.segmentId
    return segmentId == spec.segmentId and segment.GetName() == spec.name


def _segment_ids_named(segmentation, name):
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())
            if segmentation.GetNthSegment(i).GetName() == name]


def find_segment_id(segmentation, spec):
    """Segment of a spec in a segmentation when writing results, or None: by our ID, else by name
    (a segment copied in from another segmentation may get another ID), and only one this
    module wrote (:func:`is_result_segment`): a segment of the user's of the same name is not
    taken over. Never by terminology either (results are read back by the engine's rule,
    ``io.result_labels_from_segments``)."""
    candidates = ([spec.segmentId] if segmentation.GetSegment(spec.segmentId) else []) + \
        _segment_ids_named(segmentation, spec.name)
    return next((segmentId for segmentId in candidates if is_result_segment(segmentation, segmentId, spec)), None)


def all_result_specs():
    """The specs of every result segment a model of this module may write (multi-class and binary)."""
    return lesion_specs() + lesion_specs(["background", "infection"]) + lung_specs()


def result_segment_names(segmentationNode, specs=None):
    """Names of the result segments of this module (of ``specs``, default :func:`all_result_specs`)
    that ``segmentationNode`` holds: what an Apply into it replaces."""
    segmentation = segmentationNode.GetSegmentation()
    found = [find_segment_id(segmentation, spec) for spec in specs or all_result_specs()]
    return [segmentation.GetSegment(segmentId).GetName() for segmentId in found if segmentId]


def namesake_segment_names(segmentationNode, specs=None):
    """Names of the user's segments in ``segmentationNode`` named as a result segment of ``specs``
    (default :func:`all_result_specs`) that it does not hold: an Apply keeps them and writes that
    result into a new segment beside them."""
    segmentation = segmentationNode.GetSegmentation()
    return [spec.name for spec in specs or all_result_specs()
            if find_segment_id(segmentation, spec) is None and _segment_ids_named(segmentation, spec.name)]


def quoted_names(names):
    """'A', 'B', 'C': names as the notes and questions list them."""
    return ", ".join(f"'{name}'" for name in names)


def _result_segment_name(segmentation, spec, segmentId=None):
    """The name of ``spec``'s result segment ``segmentId`` (None: one about to be added): the
    spec's name, unless another segment has it (the user's own) and this one does not already:
    then the first free "<name>_1", "<name>_2", ..., as Slicer makes IDs unique."""
    def free(name):
        return all(other == segmentId for other in _segment_ids_named(segmentation, name))

    if free(spec.name) or (segmentId is not None and segmentation.GetSegment(segmentId).GetName() == spec.name):
        return spec.name
    index = 1
    while not free(f"{spec.name}_{index}"):
        index += 1
    return f"{spec.name}_{index}"


def terminology_codes(entry):
    """{"type": [scheme, code, meaning], "typeModifier": [...]} of a Slicer terminology entry
    string (context~category~type~type modifier~anatomic context~region~region modifier)."""
    parts = (entry or "").split("~")

    def code(index):
        fields = parts[index].split("^") if len(parts) > index else []
        return fields if len(fields) >= 2 and fields[1] else None

    return {"type": code(2), "typeModifier": code(3)}


def ensure_segmentation_node(scene, segmentationNode, referenceVolumeNode, name=None):
    """A new segmentation for results of ``referenceVolumeNode`` (``segmentationNode`` None),
    under the CT's parent transform, or the given one set up for them. A given segmentation keeps
    its own parent transform: moving it would move the user's segments in it too (the results are
    written into its frame, :func:`import_result_to_segmentation`)."""
    if segmentationNode is None:   # a unique name, as Slicer gives one: two runs on a CT are told apart
        segmentationNode = scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", scene.GenerateUniqueName(name or f"{referenceVolumeNode.GetName()} lesions"))
        segmentationNode.SetAndObserveTransformNodeID(referenceVolumeNode.GetTransformNodeID())
    if segmentationNode.GetDisplayNode() is None:
        segmentationNode.CreateDefaultDisplayNodes()
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
    segmentationNode.SetNodeReferenceID(SOURCE_VOLUME_REFERENCE_ROLE, referenceVolumeNode.GetID())
    return segmentationNode


def source_volume_of(segmentationNode):
    """The CT a segmentation was made from: the input of its last Apply, else the volume its
    reference geometry was taken from (e.g. the Segment Editor's source volume), else None."""
    return (segmentationNode.GetNodeReference(SOURCE_VOLUME_REFERENCE_ROLE)
            or segmentationNode.GetNodeReference(REFERENCE_GEOMETRY_ROLE))


def _ijk_to_ras(volumeNode):
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return numpy_matrix(matrix)


def same_scan(volumeNode, otherNode, tolerance=1e-3):
    """True when two volume nodes hold the same scan where they overlap: their voxel lattices
    coincide where Slicer shows them (same spacing and axes, origins whole voxels apart — a
    copy, or a crop Crop Volume made without resampling) and the voxels they share are equal."""
    if volumeNode is otherNode:
        return True
    transform = transform_to_volume(otherNode, volumeNode)
    if transform is not None and not transform.IsA("vtkLinearTransform"):
        return False
    otherToVolume = np.eye(4) if transform is None else numpy_matrix(transform.GetMatrix())
    offset = lattice_offset(_ijk_to_ras(volumeNode), otherToVolume @ _ijk_to_ras(otherNode), tolerance)
    if offset is None:
        return False
    dims = np.array(volumeNode.GetImageData().GetDimensions())
    otherDims = np.array(otherNode.GetImageData().GetDimensions())
    low, high = np.maximum(0, -offset), np.minimum(dims, otherDims - offset)
    if np.any(low >= high):
        return False
    mine = slicer.util.arrayFromVolume(volumeNode)[low[2]:high[2], low[1]:high[1], low[0]:high[0]]
    theirs = slicer.util.arrayFromVolume(otherNode)[low[2] + offset[2]:high[2] + offset[2],
                                                    low[1] + offset[1]:high[1] + offset[1],
                                                    low[0] + offset[0]:high[0] + offset[0]]
    return mine.shape == theirs.shape and np.array_equal(mine, theirs)


def lattice_offset(ijkToRas, otherIjkToRas, tolerance=1e-3):
    """The (i, j, k) voxel offset from a grid's voxels to another's when both are one lattice
    (same spacing and axes, origins whole voxels apart), else None."""
    indexMap = np.linalg.inv(otherIjkToRas) @ ijkToRas   # voxel index of one -> voxel index of the other
    offset = indexMap[:3, 3]
    if not (np.allclose(indexMap[:3, :3], np.eye(3), atol=tolerance)
            and np.allclose(offset, np.round(offset), atol=tolerance)):
        return None
    return np.round(offset).astype(int)


def _same_grid(volumeNode, otherNode, tolerance=1e-3):
    return (volumeNode.GetImageData().GetDimensions() == otherNode.GetImageData().GetDimensions()
            and volumeNode.GetTransformNodeID() == otherNode.GetTransformNodeID()
            and np.allclose(_ijk_to_ras(volumeNode), _ijk_to_ras(otherNode), atol=tolerance))


def other_ct_of(segmentationNode, volumeNode):
    """The CT ``segmentationNode`` was made from when that is another scan than ``volumeNode``
    (patient A's segmentation with patient B's CT selected), else None — also when it is not
    known, or is the same scan (a copy, or a crop of it)."""
    source = source_volume_of(segmentationNode)
    if source is None or source is volumeNode or source.GetImageData() is None:
        return None
    return None if same_scan(volumeNode, source) else source


def _own_layer_unless_on(segmentation, segmentId, ijkToRas):
    """Give a segment a labelmap layer of its own when it shares one, holding voxels, on another
    lattice than ``ijkToRas``: writing it there would resample the layer, and with it the other
    segments of that layer (e.g. one the user painted on another volume)."""
    sharing = []
    segmentation.GetSegmentIDsSharingBinaryLabelmapRepresentation(segmentId, sharing, False)
    if not sharing:
        return
    layer = segmentation.GetSegment(segmentId).GetRepresentation(
        slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    if layer is None or layer.IsEmpty():
        return
    matrix = vtk.vtkMatrix4x4()
    layer.GetImageToWorldMatrix(matrix)
    if lattice_offset(ijkToRas, numpy_matrix(matrix)) is None:
        segmentation.SeparateSegmentLabelmap(segmentId)


def set_segment_from_array(segmentationNode, spec, mask, ijkToRas):
    """Create or update one segment from a binary (k, j, i) mask on the grid ``ijkToRas`` (in the
    segmentation's own coordinates), marked as ``spec``'s result; returns its ID."""
    segmentation = segmentationNode.GetSegmentation()
    segmentId = find_segment_id(segmentation, spec)
    if segmentId is None:   # Slicer makes the ID unique when the user's segment has it
        segmentId = segmentation.AddEmptySegment(spec.segmentId, _result_segment_name(segmentation, spec), spec.color)
    segment = segmentation.GetSegment(segmentId)
    segment.SetName(_result_segment_name(segmentation, spec, segmentId))
    segment.SetTag(_result_tag(), spec.segmentId)
    segment.SetColor(*spec.color)
    segment.SetTerminology(spec.terminology)
    _own_layer_unless_on(segmentation, segmentId, ijkToRas)
    labelmap = oriented_image_from_array(mask, ijkToRas)
    if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            labelmap, segmentationNode, segmentId,
            slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE):
        raise RuntimeError(f"Could not write segment '{spec.name}'")
    displayNode = segmentationNode.GetDisplayNode()
    if displayNode is not None:
        if spec.fillOpacity2D is not None:
            displayNode.SetSegmentOpacity2DFill(segmentId, spec.fillOpacity2D)
        displayNode.SetSegmentVisibility3D(segmentId, spec.visible3D)
    return segmentId


def nonlinear_transform_between(node, volumeNode):
    """The parent transform (its name) that makes the way from ``node``'s coordinates to
    ``volumeNode``'s non-linear (e.g. a grid or B-spline warp), or None when it is linear."""
    transform = transform_to_volume(node, volumeNode)
    if transform is None or transform.IsA("vtkLinearTransform"):
        return None
    for parent in (node.GetParentTransformNode(), volumeNode.GetParentTransformNode()):
        if parent is not None and not parent.IsTransformToWorldLinear():
            return parent.GetName()
    return "a non-linear transform"


def import_result_to_segmentation(scene, volumeNode, labels, lungs, segmentationNode=None, classNames=None,
                                  specs=None, notes=None):
    """Write the engine's labelmaps into segments of a (new or existing) segmentation.

    Re-running updates the same segments in place; segments the user added themselves
    are left alone, also one named as a result segment (e.g. a hand-painted
    "Consolidation"): that result then goes into a new segment, said in ``notes``.
    ``classNames`` are the model's (binary models give one "Infection" segment instead of
    GGO and consolidation). An existing segmentation keeps its parent transform: the
    labelmaps are written in its coordinates, where the CT's voxels are in world space
    (the way from it to the CT must be linear; :func:`nonlinear_transform_between`).
    """
    sources = {"labels": labels, "lungs": lungs}
    for source in sources.values():
        if source is not None:
            check_same_grid(source, volumeNode)
    specs = specs if specs is not None else segment_specs(classNames)
    if segmentationNode is not None:
        warp = nonlinear_transform_between(segmentationNode, volumeNode)
        if warp is not None:
            raise ValueError(f"'{segmentationNode.GetName()}' and '{volumeNode.GetName()}' are under different "
                             f"parent transforms, and '{warp}' is non-linear: the results cannot be written into "
                             "it without warping them. Write them into a new segmentation")
    segmentationNode = ensure_segmentation_node(scene, segmentationNode, volumeNode)
    segmentToVolume = transform_to_volume(segmentationNode, volumeNode)
    # the CT's voxels in the segmentation's coordinates: (segmentation-to-world)^-1 . CT-to-world
    volumeToSegment = np.eye(4) if segmentToVolume is None else np.linalg.inv(numpy_matrix(segmentToVolume.GetMatrix()))
    segmentation = segmentationNode.GetSegmentation()
    namesakes = []
    wasModifying = segmentationNode.StartModify()
    try:
        arrays = {key: sitk.GetArrayViewFromImage(img) for key, img in sources.items() if img is not None}
        for spec in specs:
            if spec.source not in arrays:
                continue
            ijkToRas = volumeToSegment @ ijk_to_ras_from_image(sources[spec.source])
            kept = namesake_segment_names(segmentationNode, [spec])
            segmentId = set_segment_from_array(segmentationNode, spec, arrays[spec.source] == spec.labelValue,
                                               ijkToRas)
            if kept:
                namesakes.append((spec.name, segmentation.GetSegment(segmentId).GetName()))
        if labels is not None:
            segmentationNode.SetAttribute(CLASS_NAMES_ATTRIBUTE, json.dumps(list(classNames or _default_class_names())))
    finally:
        segmentationNode.EndModify(wasModifying)
    if namesakes and notes is not None:
        notes.append(f"'{segmentationNode.GetName()}' has segments of its own named as results of this module "
                     f"({quoted_names(name for name, _ in namesakes)}; not made by it, e.g. painted by hand): "
                     f"they were left as they were, and this run's are in new segments, "
                     f"{quoted_names(new for _, new in namesakes)}")
    return segmentationNode


def class_names_of(segmentationNode):
    """The model classes a result segmentation was made with (stored at import; else
    guessed from the segment names, e.g. for a .seg.nrrd written by the engine's CLI)."""
    stored = segmentationNode.GetAttribute(CLASS_NAMES_ATTRIBUTE)
    if stored:
        return json.loads(stored)
    segmentation = segmentationNode.GetSegmentation()
    binary = lesion_specs(["background", "infection"])[0]
    if find_segment_id(segmentation, binary) and not any(find_segment_id(segmentation, s) for s in lesion_specs()):
        return ["background", "infection"]
    return _default_class_names()


def transform_to_volume(node, volumeNode):
    """The transform from ``node``'s coordinates to ``volumeNode``'s (through world, as Slicer
    shows them), or None when both sit under the same parent transform."""
    if node.GetTransformNodeID() == volumeNode.GetTransformNodeID():
        return None
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(
        node.GetParentTransformNode(), volumeNode.GetParentTransformNode(), transform)
    linear = vtk.vtkTransform()
    if slicer.vtkMRMLTransformNode.IsGeneralTransformLinear(transform, linear):
        return linear
    return transform


def segment_on_grid(segmentationNode, segmentId, referenceVolumeNode):
    """(mask, outside): one segment as a binary (k, j, i) uint8 array on the reference volume's
    grid, and how many voxels of it (counted on that grid) lie beyond the volume's extent and
    are left out. Parent transforms of both nodes are applied: the segment is read where
    Slicer shows it, in the volume's own coordinates (those the engine works in)."""
    dims = referenceVolumeNode.GetImageData().GetDimensions()
    empty = np.zeros(dims[::-1], np.uint8)
    segmentImage = slicer.vtkOrientedImageData()
    if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            segmentationNode, segmentId, segmentImage, False):
        raise RuntimeError(f"Segment '{segmentId}' has no binary labelmap")
    if segmentImage.GetPointData().GetScalars() is None or segmentImage.IsEmpty():
        return empty, 0
    reference = reference_geometry_image(referenceVolumeNode)
    resampled = slicer.vtkOrientedImageData()
    # Padded: the output is on the reference's lattice and holds the whole segment, so what
    # lies beyond the CT can be counted before it is cut off.
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            segmentImage, reference, resampled, False, True,
            transform_to_volume(segmentationNode, referenceVolumeNode)):
        raise RuntimeError(f"Could not resample segment '{segmentId}' onto the CT grid")
    if resampled.GetPointData().GetScalars() is None:
        return empty, 0
    labelmap = array_from_oriented_image(resampled)
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    if segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()):
        # Segments may share one labelmap layer, each under its own label value.
        full = labelmap == segment.GetLabelValue()
    else:
        # Converted just now from another source (e.g. a closed surface): this segment alone,
        # whatever label value the segment kept from an earlier labelmap.
        full = labelmap > 0
    have, want = resampled.GetExtent(), reference.GetExtent()
    low = [max(have[2 * a], want[2 * a]) for a in range(3)]       # i, j, k
    high = [min(have[2 * a + 1], want[2 * a + 1]) for a in range(3)]
    if any(lo > hi for lo, hi in zip(low, high)):
        return empty, int(full.sum())
    part = full[low[2] - have[4]:high[2] - have[4] + 1, low[1] - have[2]:high[1] - have[2] + 1,
                low[0] - have[0]:high[0] - have[0] + 1]
    mask = empty
    mask[low[2] - want[4]:high[2] - want[4] + 1, low[1] - want[2]:high[1] - want[2] + 1,
         low[0] - want[0]:high[0] - want[0] + 1] = part
    return mask, int(full.sum()) - int(part.sum())


def segment_mask_array(segmentationNode, segmentId, referenceVolumeNode):
    """Binary (k, j, i) uint8 array of one segment on the reference volume's grid (what lies
    beyond the volume's extent is left out; :func:`segment_on_grid` says how much)."""
    return segment_on_grid(segmentationNode, segmentId, referenceVolumeNode)[0]


def voxel_ml(volumeNode):
    return float(np.prod(volumeNode.GetSpacing())) / 1000.0


def _ml_text(ml):
    return f"{ml:.1f} mL" if ml >= 0.05 else f"{ml:.2g} mL"


def outside_note(segmentationNode, referenceVolumeNode, outside):
    """A note on the segments of ``outside`` ({name: voxels beyond the volume}), or None."""
    parts = [f"{name} {_ml_text(voxels * voxel_ml(referenceVolumeNode))}" for name, voxels in outside.items()
             if voxels]
    if not parts:
        return None
    return (f"'{segmentationNode.GetName()}' reaches beyond the extent of '{referenceVolumeNode.GetName()}': "
            f"{', '.join(parts)} lie outside it and are left out")


def _image_on_volume(array, referenceVolumeNode):
    """A (k, j, i) array as a SimpleITK uint8 image with the volume's geometry."""
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    matrix = vtk.vtkMatrix4x4()
    referenceVolumeNode.GetIJKToRASMatrix(matrix)
    return set_image_geometry_from_ijk_to_ras(image, numpy_matrix(matrix))


def _reference_image(referenceVolumeNode):
    """An empty SimpleITK image on the volume's grid (what the engine's readers take as the CT)."""
    return _image_on_volume(np.zeros(referenceVolumeNode.GetImageData().GetDimensions()[::-1], np.uint8),
                            referenceVolumeNode)


def segment_roles(segmentationNode):
    """[(segment ID, name, role)] of every segment, the role by the engine's rule
    (``io.segment_role``: terminology, then ID, then name; None when not known)."""
    segmentRole = _engine_module("io").segment_role
    segmentation = segmentationNode.GetSegmentation()
    out = []
    for index in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segmentId)
        out.append((segmentId, segment.GetName(),
                    segmentRole({"id": segmentId, "name": segment.GetName(),
                                 "terminology": terminology_codes(segment.GetTerminology())})))
    return out


def other_counted_segments(segmentationNode, classNames=None, haveLungs=True):
    """Names of the segments that the engine's rule counts (a lesion or lung role) but that are
    not the result's own segments (those of ``segment_specs(classNames)``, the lung ones only
    with ``haveLungs``): e.g. a GGO segment the user added, kept by a re-Apply."""
    specs = [spec for spec in segment_specs(classNames) if haveLungs or spec.source != "lungs"]
    segmentation = segmentationNode.GetSegmentation()
    own = {find_segment_id(segmentation, spec) for spec in specs} - {None}
    return [name for segmentId, name, role in segment_roles(segmentationNode)
            if segmentId not in own and role is not None]


def result_segments(segmentationNode, referenceVolumeNode, outside=None):
    """Every segment as (name, role, bool (k, j, i) mask on the CT grid) — what
    ``io.read_segments`` returns for a ``.seg.nrrd``, the role by the same rule
    (``io.segment_role``: terminology, then ID, then name). A segment is cut to the CT's
    extent; ``outside`` (a dict) gets {name: voxels left out} of the segments that reach beyond it."""
    out = []
    for segmentId, name, role in segment_roles(segmentationNode):
        mask, beyond = segment_on_grid(segmentationNode, segmentId, referenceVolumeNode)
        if beyond and outside is not None:
            outside[name] = outside.get(name, 0) + beyond
        out.append((name, role, mask > 0))
    return out


def _lung_roles():
    return _engine_module("lungstep").LUNG_ROLES   # the roles the engine reads as lung


def _lungs_outside_message(segmentationNode, referenceVolumeNode, segs, outside, roles=None):
    """When the segments of ``roles`` (default: the lung roles) give no voxel on the CT because
    they lie outside it (another CT's segmentation, or a crop that missed them), a sentence
    saying so; else None."""
    roles = _lung_roles() if roles is None else roles
    beyond = {name: outside[name] for name, role, _ in segs if role in roles and outside.get(name)}
    if not beyond:
        return None
    where = ", ".join(f"{name} {_ml_text(v * voxel_ml(referenceVolumeNode))}" for name, v in beyond.items())
    return (f"the lung segments of '{segmentationNode.GetName()}' lie outside '{referenceVolumeNode.GetName()}' "
            f"({where}, none of it inside): select the CT this segmentation was made on")


def result_from_segments(segmentationNode, referenceVolumeNode, requireLungs=True, notes=None):
    """The (edited) segments read back by the rule ``ssalesionseg stats`` applies to a
    ``.seg.nrrd`` (``io.result_labels_from_segments``: every segment of a class counts,
    consolidation over GGO where they overlap), as the engine's ``ResultLabels``; what that
    rule has to say (segments not used, overlap, segments reaching beyond the CT) is appended
    to ``notes``. No lung segment with voxels is an error unless ``requireLungs`` is False
    (then ``lungs`` may be None); one lung alone is scored as one of two regions, as the CLI does."""
    outside = {}
    segs = result_segments(segmentationNode, referenceVolumeNode, outside)
    result = _engine_module("io").result_labels_from_segments(segs, _reference_image(referenceVolumeNode))
    if result.lungs is None and requireLungs:
        why = _lungs_outside_message(segmentationNode, referenceVolumeNode, segs, outside)
        if why:
            raise ValueError(f"No lungs to measure: {why}")
        raise ValueError(f"'{segmentationNode.GetName()}' has no Right lung or Left lung segment with voxels: the "
                         "figures are per lung. Restore them (Undo in the Segment Editor) or press Apply again")
    if notes is not None:
        notes.extend(result.notes)
        note = outside_note(segmentationNode, referenceVolumeNode, outside)
        if note:
            notes.append(note)
    return result


def labelmaps_from_result_segments(segmentationNode, referenceVolumeNode, requireLungs=True, notes=None):
    """(labels, lungs) images on the CT grid, as the engine returns them, of
    :func:`result_from_segments`."""
    result = result_from_segments(segmentationNode, referenceVolumeNode, requireLungs, notes)
    lungs = None if result.lungs is None else _image_on_volume(result.lungs, referenceVolumeNode)
    return _image_on_volume(result.lesions, referenceVolumeNode), lungs


def lung_mask_from_segmentation(segmentationNode, referenceVolumeNode, notes=None):
    """Lung labelmap (1 right, 2 left) from a user's segmentation for the engine's
    ``lung_mask``, by the rule the CLI's ``--lung-mask FILE.seg.nrrd`` applies
    (``lungstep.lungs_from_segments``: right / left lung segments by terminology, ID or name,
    else an unsided lung segment split into sides). A segmentation without any lung segment
    — e.g. one segment painted by thresholding — counts as lung as a whole, except segments
    that are known to be something else (GGO, consolidation, infection). The labels are sided:
    a segmentation with only a right (or only a left) lung gives that lung alone (pass it as
    the engine's ``SidedLungMask``). Segments are read where Slicer shows them (parent
    transforms applied) and cut to the CT's extent, said in ``notes``."""
    outside = {}
    segs = result_segments(segmentationNode, referenceVolumeNode, outside)
    if not segs:
        raise ValueError(f"'{segmentationNode.GetName()}' has no segments to use as lung mask")
    reference = _reference_image(referenceVolumeNode)
    lungstep = _engine_module("lungstep")
    labels = lungstep.lungs_from_segments(segs, reference)
    used = _lung_roles()
    if labels is None:
        why = _lungs_outside_message(segmentationNode, referenceVolumeNode, segs, outside)
        if why:
            raise ValueError(f"No lung mask: {why}")
        unnamed = [(name, "lung", mask) for name, role, mask in segs if role is None]
        used = ("lung",)
        if not unnamed or not any(mask.any() for _, _, mask in unnamed):
            why = _lungs_outside_message(segmentationNode, referenceVolumeNode, unnamed, outside, used)
            if why:
                raise ValueError(f"No lung mask: {why}")
            lungNames = [name for name, role, _ in segs if role in _lung_roles()]
            detail = (f"its lung segments {', '.join(lungNames)} are empty" if lungNames else
                      f"its segments are {', '.join(name for name, _, _ in segs)}")
            raise ValueError(f"'{segmentationNode.GetName()}' has no lung segment with voxels ({detail}): choose "
                             "the segmentation that holds the lungs")
        labels = lungstep.lungs_from_segments(unnamed, reference)
        segs = unnamed
    if notes is not None:
        note = outside_note(segmentationNode, referenceVolumeNode,
                            {name: outside.get(name, 0) for name, role, _ in segs if role in used})
        if note:
            notes.append(note)
    return _image_on_volume(labels, referenceVolumeNode)


def save_segmentation(segmentationNode, path):
    """Write a .seg.nrrd with Slicer's own storage node (names, colours, terminology)."""
    scene = segmentationNode.GetScene()
    storageNode = slicer.vtkMRMLSegmentationStorageNode()
    if scene is not None:
        scene.AddNode(storageNode)
    try:
        storageNode.SetFileName(os.fspath(path))
        if not storageNode.WriteData(segmentationNode):
            raise RuntimeError(f"Could not write {path}")
    finally:
        if scene is not None:
            scene.RemoveNode(storageNode)
    return os.fspath(path)


# ---------------------------------------------------------------------------
# Statistics table
# ---------------------------------------------------------------------------

TABLE_COLUMNS = ("Structure", "Measurement", "Value", "Unit", "Note", "Key")
# The clinical part of the engine's statistics; the rest (input, timings, model) stays
# in the JSON attribute of the table.
TABLE_SECTIONS = ("lesions", "lungs", "lobes", "severity")

_STRUCTURES = {
    "lesions.ggo": "Ground-glass opacity",
    "lesions.consolidation": "Consolidation",
    "lesions.infection": "Infection (all lesions)",
    "lungs.right": "Right lung",
    "lungs.left": "Left lung",
    "lungs.total": "Both lungs",
    "severity": "Severity score",
}
_FIELDS = {
    "volume_ml": ("Volume", "mL"),
    "percent_of_lung": ("% of both lungs", "%"),
    "percent_of_right_lung": ("% of right lung", "%"),
    "percent_of_left_lung": ("% of left lung", "%"),
    "right_volume_ml": ("Volume in right lung", "mL"),
    "left_volume_ml": ("Volume in left lung", "mL"),
    "mean_hu": ("Mean attenuation", "HU"),
    "std_hu": ("Attenuation std. dev.", "HU"),
    "percent_involved": ("% involved", "%"),
    "score": ("score", "points"),
    "total": ("total", "points"),
    "max": ("maximum", "points"),
    "outside_lung_volume_ml": ("Volume outside the lung mask", "mL"),
    "regions_scored": ("regions scored", "regions"),
}


def flatten_stats(stats, sections=TABLE_SECTIONS):
    """[(dotted key, value)] of a nested stats dict, in section order."""
    items = []

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, child in value.items():
                walk(f"{prefix}.{key}", child)
        else:
            items.append((prefix, value))

    for section in sections:
        if isinstance(stats.get(section), dict):
            walk(section, stats[section])
    return items


def _is_number(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _words(key):
    return key.replace("_", " ")


def describe_stat(key):
    """(structure, measurement, unit) shown in the table for a dotted stats key."""
    parts = key.split(".")
    field, unit = _FIELDS.get(parts[-1], (_words(parts[-1]), ""))
    if len(parts) >= 2 and ".".join(parts[:2]) in _STRUCTURES:
        structure, middle = _STRUCTURES[".".join(parts[:2])], parts[2:-1]
    elif parts[0] in _STRUCTURES:
        structure, middle = _STRUCTURES[parts[0]], parts[1:-1]
    elif parts[0] == "lobes" and len(parts) >= 3:
        structure, middle = f"Lobe: {_words(parts[1])}", parts[2:-1]
    else:
        structure, middle = parts[0].capitalize(), parts[1:-1]
    if parts[0] == "severity" and middle[:1] == ["regions"]:
        middle = middle[1:]  # severity.regions.right_lung.score -> "right lung score"
    measurement = " ".join([_words(m) for m in middle] + [field]).strip()
    return structure, measurement[:1].upper() + measurement[1:], unit


def missing_value_note(key):
    """Why a figure of the engine's statistics has no value (None), for the table's Note column."""
    parts = key.split(".")
    field = parts[-1]
    if key in _STRUCTURES:
        return "n/a: not a class of this model"
    if field in ("mean_hu", "std_hu"):
        return "n/a: no voxels of this lesion"
    if field == "percent_of_lung":
        return "n/a: the lung mask is empty"
    if field in ("percent_of_right_lung", "percent_of_left_lung"):
        return f"n/a: the lung mask has no {field[len('percent_of_'):].replace('_', ' ')}"
    if parts[:2] == ["severity", "regions"] and len(parts) == 4:
        region = parts[2]
        if region in ("right_lung", "left_lung"):
            return f"n/a: the lung mask has no {_words(region)}, so it is not scored"
        return f"n/a: the lobe mask has no {_words(region)} lobe, so it is not scored"
    return "n/a: not computed"


def stats_to_table(stats, tableNode):
    """Fill a table node with the clinical part of the engine's statistics.

    One row per numeric value, and one per figure without a value (None: a lung the mask
    lacks, the attenuation of an empty lesion class, a class the model does not make), its
    Value empty (NaN) and its Note saying why, so "0" and "not computed" are told apart — the
    rows the CLI's CSV (``stats.write_stats``) writes with an empty value. The Key column
    holds the dotted JSON path so scripts can find a value. Text values (e.g. the severity
    scheme) and the full JSON go into node attributes.
    """
    tableNode.RemoveAllColumns()
    table = tableNode.GetTable()
    columns = {}
    for name in TABLE_COLUMNS:
        column = vtk.vtkDoubleArray() if name == "Value" else vtk.vtkStringArray()
        column.SetName(name)
        table.AddColumn(column)
        columns[name] = column
    for key, value in flatten_stats(stats):
        if _is_number(value) or value is None:
            structure, measurement, unit = describe_stat(key)
            if key in _STRUCTURES:   # a whole class without figures (lesions.ggo of a binary model)
                measurement, unit = "All measurements", ""
            columns["Structure"].InsertNextValue(structure)
            columns["Measurement"].InsertNextValue(measurement)
            columns["Value"].InsertNextValue(float("nan") if value is None else float(value))
            columns["Unit"].InsertNextValue(unit)
            columns["Note"].InsertNextValue("" if value is not None else missing_value_note(key))
            columns["Key"].InsertNextValue(key)
        elif isinstance(value, str):
            tableNode.SetAttribute(f"SSALesionSeg.{key}", value)
    tableNode.SetAttribute(STATS_ATTRIBUTE, json.dumps(stats, default=_json_default))
    table.Modified()
    tableNode.Modified()
    return tableNode


def table_values(tableNode):
    """{dotted key: value} read back from a statistics table."""
    table = tableNode.GetTable()
    keys = table.GetColumnByName("Key")
    values = table.GetColumnByName("Value")
    return {keys.GetValue(row): values.GetValue(row) for row in range(table.GetNumberOfRows())}


def statistics_table_owner(scene, tableNode):
    """The segmentation node whose statistics table ``tableNode`` is, or None."""
    if tableNode is None:
        return None
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
        if node.GetNodeReferenceID(STATISTICS_REFERENCE_ROLE) == tableNode.GetID():
            return node
    return None


def is_module_table(tableNode):
    """A table this module may fill: one it wrote before (it carries ``STATS_ATTRIBUTE``), or an
    empty one (e.g. just made for it). Any other table is the user's and is not overwritten."""
    return tableNode.GetAttribute(STATS_ATTRIBUTE) is not None or (
        tableNode.GetNumberOfColumns() == 0 and tableNode.GetNumberOfRows() == 0)


def ensure_statistics_table(scene, segmentationNode, tableNode=None, name=None, notes=None):
    """The statistics table of a segmentation: the given one, the one referenced by
    the segmentation from an earlier run, or a new one. A given table that holds another
    segmentation's figures is left to that segmentation (a second case run into a new
    segmentation must not overwrite the first case's table), and a given table of the user's
    own (not one of this module's, :func:`is_module_table`) is left as it is: the figures go
    to the segmentation's table instead, said in ``notes``."""
    owner = statistics_table_owner(scene, tableNode)
    if owner is not None and owner is not segmentationNode:
        tableNode = None
    refused = None
    if tableNode is not None and not is_module_table(tableNode):
        refused, tableNode = tableNode, None
    if tableNode is None:
        tableNode = segmentationNode.GetNodeReference(STATISTICS_REFERENCE_ROLE)
    if tableNode is None:
        tableNode = scene.AddNewNodeByClass(
            "vtkMRMLTableNode", scene.GenerateUniqueName(name or f"{segmentationNode.GetName()} statistics"))
    segmentationNode.SetNodeReferenceID(STATISTICS_REFERENCE_ROLE, tableNode.GetID())
    if refused is not None and notes is not None:
        notes.append(f"'{refused.GetName()}' is not a statistics table of this module and was left as it was: the "
                     f"figures are in '{tableNode.GetName()}'")
    return tableNode


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def stats_to_json(stats):
    return json.dumps(stats, indent=2, default=_json_default)


def _number(value):
    return float(value) if _is_number(value) else None


def summary_line(stats):
    """One line for the panel, e.g.
    'Infection 12.4 mL (3.1 % of lungs): GGO 10.0 mL, consolidation 2.4 mL. Severity 4/10 per lung.'"""
    lesions = stats.get("lesions") or {}

    def lesion(name, field):
        return _number((lesions.get(name) or {}).get(field))

    head = ""
    infection = lesion("infection", "volume_ml")
    if infection is not None:
        head = f"Infection {infection:.1f} mL"
        percent = lesion("infection", "percent_of_lung")
        if percent is not None:
            head += f" ({percent:.1f} % of lungs)"
    details = ", ".join(f"{label} {value:.1f} mL" for label, value in
                        (("GGO", lesion("ggo", "volume_ml")), ("consolidation", lesion("consolidation", "volume_ml")))
                        if value is not None)
    line = ": ".join(part for part in (head, details) if part)
    severity = _engine_module("stats").severity_text(stats.get("severity"))
    if severity:
        line = f"{line}. Severity {severity}" if line else f"Severity {severity}"
    return f"{line}." if line else "No statistics."


def summary_text(stats, notices=()):
    """:func:`summary_line`, then each of the engine's notes on a line of its own ("Note: ...")."""
    return "\n".join([summary_line(stats)] + [f"Note: {note}" for note in notices or ()])


# ---------------------------------------------------------------------------
# Training-case export
# ---------------------------------------------------------------------------

def safe_case_name(name):
    return _engine_module("trainingcase").safe_case_name(name)


def existing_training_case_files(outputDir, caseName):
    """The files of case ``caseName`` already in ``outputDir`` (any of images/, labels/, lungs/)."""
    return _engine_module("trainingcase").existing_case_files(outputDir, caseName)


def export_training_case(volumeNode, segmentationNode, outputDir, caseName=None, overwrite=False, notes=None):
    """Write the (edited) result as a training case — ``images/<case>.nii.gz`` (CT in HU),
    ``labels/<case>.nii.gz`` (0 background, 1 GGO, 2 consolidation) and ``lungs/<case>.nii.gz``
    (1 right, 2 left) when the lung segments exist — with the engine's writer, the layout
    ``ssalesionseg train --cases`` reads, as ``ssalesionseg export-case`` does (what either
    has to say goes into ``notes``). Returns the written paths. A segmentation made from another
    scan than ``volumeNode`` (:func:`other_ct_of`) is refused: its labels with this CT would
    be a wrong training pair."""
    other = other_ct_of(segmentationNode, volumeNode)
    if other is not None:
        raise ValueError(
            f"'{segmentationNode.GetName()}' was made from '{other.GetName()}', not from '{volumeNode.GetName()}' "
            f"(another scan: {'other voxel values on the same grid' if _same_grid(volumeNode, other) else 'another grid'}"
            f"): exporting would pair the CT of '{volumeNode.GetName()}' with labels drawn on "
            f"'{other.GetName()}'. Select '{other.GetName()}' as input CT to export this segmentation, or press "
            f"Apply on '{volumeNode.GetName()}' to segment it.")
    result = result_from_segments(segmentationNode, volumeNode, requireLungs=False, notes=notes)
    lungs = None if result.lungs is None else _image_on_volume(result.lungs, volumeNode)
    written = _engine_module("trainingcase").write_training_case(
        outputDir, caseName or volumeNode.GetName(), image_from_volume_node(volumeNode),
        _image_on_volume(result.lesions, volumeNode), lungs, overwrite,
        class_names=("background", "infection") if result.binary else None, notes=notes)
    if notes is not None and not result.lesions.any():   # a lesion-free case is fine, if it is meant to be one
        hasLesionSegment = any(role in ("ggo", "consolidation", "infection")
                               for _, _, role in segment_roles(segmentationNode))
        notes.append(
            (f"the lesion segments of '{segmentationNode.GetName()}' are empty" if hasLesionSegment else
             f"'{segmentationNode.GetName()}' has no GGO, consolidation or infection segment")
            + ": the case was exported as lesion-free (its labels are all background). If the CT has lesions, "
              "paint them (or press Apply) and export again, overwriting the case")
    return written


def remove_nodes(scene, nodes):
    """Remove nodes with their display and storage nodes."""
    for node in nodes:
        if node is None or node.GetScene() is None:
            continue
        related = []
        if node.IsA("vtkMRMLDisplayableNode"):
            related += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
        if node.IsA("vtkMRMLStorableNode"):
            related += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
        scene.RemoveNode(node)
        for other in related:
            if other is not None and other.GetScene() is not None:
                scene.RemoveNode(other)


