"""Axial slice with the lesion segments overlaid, drawn by Slicer's own slice pipeline.

Uses slicer-core without the application: a vtkMRMLSliceLogic reslices and
window/levels the CT, and Slicer's vtkMRMLSegmentationsDisplayableManager2D draws
the segments (fill + outline, the segment colours and opacities the module sets),
into an offscreen VTK EGL render window. Only the legend is added by this script.

Input (one of):
  default     a MedSeg-100 slice (real COVID-19 CT, 8-bit lung-window rendering) with
              its expert GGO/consolidation annotation; lungs = the image's non-zero
              pixels split at the midline. Data root: $SSALESIONSEG_DATA or
              ../shared/data next to the repository.
  --phantom   the synthetic phantom of the tests, with its known labels.
  --ct FILE   a CT in HU; with --segmentation FILE (.seg.nrrd) it shows that,
              otherwise it runs the module logic with the real engine first.

    VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow python Testing/benchmarks/render_slice.py
"""

import argparse
import os
import sys

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import vtk  # noqa: E402

import slicer  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MODULE_DIR = os.path.join(REPO, "SSALesionSeg")
DEFAULT_OUT = os.path.join(REPO, "docs", "images", "slicer_axial_segments.png")
sys.path.insert(0, MODULE_DIR)

from SSALesionSegLib import mrml, phantom  # noqa: E402
from SSALesionSegLib.logic import ProcessingLogic  # noqa: E402

MEDSEG_SLICE = 20  # a training-split slice with both GGO and consolidation


def data_root():
    env = os.environ.get("SSALESIONSEG_DATA")
    return env or os.path.join(os.path.dirname(REPO), "shared", "data")


# ---------------------------------------------------------------------------
# Inputs -> (volume node, segmentation node, caption)
# ---------------------------------------------------------------------------

def medseg_case(headless, sliceNumber):
    from PIL import Image
    folder = os.path.join(data_root(), "medseg100")
    png = np.array(Image.open(os.path.join(folder, "images", f"i{sliceNumber:03d}.png")))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, "tr_mask.nii.gz")))[sliceNumber - 1]
    # Stored transposed: after swapping axes, rows run anterior -> posterior and
    # columns patient right -> left, i.e. an LPS grid with identity direction.
    png, mask = png.T, mask.T
    labels = np.where(np.isin(mask, (1, 2)), mask, 0).astype(np.uint8)
    lungs = np.zeros_like(labels)
    columns = np.arange(png.shape[1])[None, :]
    lungs[(png > 0) & (columns < png.shape[1] // 2)] = 1
    lungs[(png > 0) & (columns >= png.shape[1] // 2)] = 2
    # Three identical slices: a volume with some thickness reslices cleanly.
    images = [sitk.GetImageFromArray(np.repeat(a[None], 3, axis=0)) for a in (png.astype(np.int16), labels, lungs)]
    ct = images[0]
    volume = mrml.add_volume_node_from_image(headless.scene, ct, f"MedSeg slice {sliceNumber}")
    volume.GetDisplayNode().SetAutoWindowLevel(False)
    volume.GetDisplayNode().SetWindowLevel(255, 127.5)  # already a lung-window rendering
    segmentation = mrml.import_result_to_segmentation(headless.scene, volume, images[1], images[2])
    caption = f"MedSeg slice {sliceNumber}: expert annotation"
    return volume, segmentation, caption


def phantom_case(headless):
    ct, labels, lungs = phantom.make_phantom(size=(256, 200, 12), spacing=(0.7, 0.7, 2.5))
    volume = mrml.add_volume_node_from_image(headless.scene, ct, "Phantom CT")
    lung_window(volume)
    segmentation = mrml.import_result_to_segmentation(headless.scene, volume, labels, lungs)
    return volume, segmentation, "Synthetic phantom: known labels"


def ct_case(headless, ctPath, segmentationPath, device):
    volume = headless.volumesLogic.AddArchetypeVolume(ctPath, "CT", 0, None)
    if volume is None:
        raise SystemExit(f"cannot read {ctPath}")
    lung_window(volume)
    if segmentationPath:
        segmentation = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
        storage = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
        storage.SetFileName(segmentationPath)
        if not storage.ReadData(segmentation):
            raise SystemExit(f"cannot read {segmentationPath}")
        segmentation.CreateDefaultDisplayNodes()
        caption = os.path.basename(segmentationPath)
    else:
        result = ProcessingLogic(headless.scene, moduleDir=MODULE_DIR).process(
            volume, None, "auto", None, device, waitForCompletion=True)
        segmentation = result.segmentationNode
        caption = f"SSA-Net: {result.summary}"
    return volume, segmentation, caption


def lung_window(volume):
    display = volume.GetDisplayNode()
    display.SetAutoWindowLevel(False)
    display.SetWindowLevel(1500, -600)


def lesion_slice_offset(volume, segmentation):
    """RAS z of the axial slice with most lesion voxels."""
    ids = [mrml.find_segment_id(segmentation.GetSegmentation(), spec)
           for spec in mrml.lesion_specs(mrml.class_names_of(segmentation))]
    lesion = sum(mrml.segment_mask_array(segmentation, segmentId, volume).astype(int) for segmentId in ids if segmentId)
    k = int(np.argmax(np.asarray(lesion).reshape(lesion.shape[0], -1).sum(axis=1))) if np.any(lesion) else 0
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    center = matrix.MultiplyPoint((0, 0, k, 1))
    return center[2]


# ---------------------------------------------------------------------------
# Slicer slice view without the application
# ---------------------------------------------------------------------------

def render_axial(headless, volume, segmentation, caption, out, width, height):
    renderWindow = vtk.vtkRenderWindow()
    renderWindow.SetOffScreenRendering(True)
    renderWindow.SetSize(width, height)
    renderWindow.SetMultiSamples(0)
    renderer = vtk.vtkRenderer()
    renderer.GetActiveCamera().ParallelProjectionOn()
    renderWindow.AddRenderer(renderer)
    # Displayable managers expect an interactor; the generic one needs no display.
    interactor = vtk.vtkGenericRenderWindowInteractor()
    interactor.SetRenderWindow(renderWindow)
    interactor.Initialize()

    sliceLogic = slicer.vtkMRMLSliceLogic()
    sliceLogic.SetMRMLApplicationLogic(headless.applicationLogic)
    sliceLogics = vtk.vtkCollection()
    sliceLogics.AddItem(sliceLogic)
    headless.applicationLogic.SetSliceLogics(sliceLogics)
    sliceLogic.SetMRMLScene(headless.scene)
    sliceNode = sliceLogic.AddSliceNode("Red")
    sliceNode.SetOrientationToAxial()
    sliceNode.SetDimensions(width, height, 1)
    sliceLogic.GetSliceCompositeNode().SetBackgroundVolumeID(volume.GetID())
    sliceLogic.FitSliceToBackground(width, height)
    fieldOfView = sliceNode.GetFieldOfView()
    # Room at the top for the legend.
    sliceNode.SetFieldOfView(fieldOfView[0] * 1.3, fieldOfView[1] * 1.3, fieldOfView[2])
    sliceNode.SetXYZOrigin(0, 0.08 * height, 0)
    sliceLogic.SetSliceOffset(lesion_slice_offset(volume, segmentation))

    # The resliced, window/levelled CT (RGBA, 0-255) as the background image.
    imageMapper = vtk.vtkImageMapper()
    imageMapper.SetInputConnection(sliceLogic.GetImageDataConnection())
    imageMapper.SetColorWindow(255)
    imageMapper.SetColorLevel(127.5)
    imageActor = vtk.vtkActor2D()
    imageActor.SetMapper(imageMapper)
    imageActor.GetProperty().SetDisplayLocationToBackground()
    renderer.AddViewProp(imageActor)

    factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
    factory.SetMRMLApplicationLogic(headless.applicationLogic)
    if not factory.IsDisplayableManagerRegistered("vtkMRMLSegmentationsDisplayableManager2D"):
        factory.RegisterDisplayableManager("vtkMRMLSegmentationsDisplayableManager2D")
    managers = slicer.vtkMRMLDisplayableManagerGroup()
    managers.Initialize(factory, renderer)
    managers.SetMRMLDisplayableNode(sliceNode)

    add_legend(renderer, caption, height)
    renderWindow.Render()
    capture = vtk.vtkWindowToImageFilter()
    capture.SetInput(renderWindow)
    capture.ReadFrontBufferOff()
    capture.Update()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(out)
    writer.SetInputConnection(capture.GetOutputPort())
    writer.Write()
    return renderWindow.GetClassName()


def add_legend(renderer, caption, height):
    specs = mrml.segment_specs()
    entries = [(spec.name, spec.color) for spec in specs] + [(caption, (0.85, 0.85, 0.85))]
    for row, (text, color) in enumerate(entries):
        actor = vtk.vtkTextActor()
        actor.SetInput(("\u25a0 " if row < len(specs) else "") + text)
        properties = actor.GetTextProperty()
        properties.SetFontSize(15)
        properties.SetColor(*color)
        properties.SetShadow(True)
        actor.SetDisplayPosition(10, height - 24 - 20 * row)
        renderer.AddViewProp(actor)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--phantom", action="store_true")
    source.add_argument("--ct")
    parser.add_argument("--segmentation")
    parser.add_argument("--medseg-slice", type=int, default=MEDSEG_SLICE)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, nargs=2, default=(560, 560), metavar=("W", "H"))
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    headless = mrml.HeadlessScene()
    if args.ct:
        volume, segmentation, caption = ct_case(headless, args.ct, args.segmentation, args.device)
    elif args.phantom or not os.path.isdir(os.path.join(data_root(), "medseg100")):
        volume, segmentation, caption = phantom_case(headless)
    else:
        volume, segmentation, caption = medseg_case(headless, args.medseg_slice)
    windowClass = render_axial(headless, volume, segmentation, caption, args.out, *args.size)
    print(f"{args.out} ({caption}; {windowClass})")


if __name__ == "__main__":
    main()
