"""The segmentation engine (ssalesionseg): input checks, lungs, lesions, outputs, CLI.

Models here are tiny (random weights) or a fixed threshold network whose output is known
exactly, so the tests check plumbing and geometry, not accuracy.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ssalesionseg import cli
from ssalesionseg.bench import run_bench, synthetic_chest_ct
from ssalesionseg.errors import Cancelled, InputError, LungWeightsError
from ssalesionseg.io import read_ct, write_image
from ssalesionseg.lungstep import compute_lungs, resolve_weights
from ssalesionseg.outputs import foreign_files, outputs_complete
from ssalesionseg.pipeline import process_case, segment_image
from ssalesionseg.segfile import write_seg_nrrd
from ssalesionseg.geometry import image_like
from ssanet.checkpoint import CheckpointError, read_meta, save_checkpoint, sha256_of
from ssanet.model import SSANet

SP = (1.4, 1.4, 2.5)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    # the CPU is shared: Predictor keeps the thread count when OMP_NUM_THREADS is set
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


class ThresholdNet(torch.nn.Module):
    """GGO where the windowed input is 0.40-0.70 (about -650..-200 HU), consolidation above."""

    def __init__(self, binary=False):
        super().__init__()
        self.binary = binary
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        v, lung = x[:, 0], x[:, 1] > 0.5
        ggo = lung & (v > 0.40) & (v < 0.70)
        cons = lung & (v >= 0.70)
        if self.binary:
            return ((ggo | cons).float() * 20 - 10)[:, None] + self.w
        bg = ~(ggo | cons)
        return torch.stack([bg, ggo, cons], 1).float() * 20 + self.w


def exact_meta(size=128, px=1.4, binary=False):
    return {"class_names": ["background", "infection"] if binary else ["background", "ggo", "consolidation"],
            "preprocessing": {"size": size, "pixel_spacing_mm": px, "fov_px": size,
                              "window_hu": [-1250.0, 250.0], "blank_outside_lung": True},
            "name": "threshold", "sha256": None}


@pytest.fixture(scope="module")
def phantom():
    return synthetic_chest_ct(6, 128, spacing=SP)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    net = SSANet(in_channels=2, num_classes=3, layers=(1, 1, 1, 1), width=(8, 16, 32, 64))
    p = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(p, net, {"preprocessing": {"size": 64, "pixel_spacing_mm": 2.8, "fov_px": 64,
                                               "window_hu": [-1250.0, 250.0], "blank_outside_lung": True}})
    return p


@pytest.fixture(scope="module")
def truth_lungs_path(phantom, tmp_path_factory):
    img, truth = phantom
    lungs = sitk.GetImageFromArray(truth["right_lung"].astype(np.uint8) + 2 * truth["left_lung"].astype(np.uint8))
    lungs.CopyInformation(img)
    return write_image(lungs, tmp_path_factory.mktemp("lungs") / "truth_lungs.nrrd")


@pytest.fixture(scope="module")
def exact_result(phantom, truth_lungs_path):
    # with the true lungs the threshold network reproduces the lesions voxel for voxel
    img, _ = phantom
    return segment_image(img, model=(ThresholdNet(), exact_meta()), lung_mask=truth_lungs_path, device="cpu")


def lps_array(img):
    return sitk.GetArrayFromImage(sitk.DICOMOrient(img, "LPS"))


# ------------------------------------------------------------------ lesion geometry

def test_known_lesion_volumes(phantom, exact_result):
    img, truth = phantom
    lab = sitk.GetArrayFromImage(exact_result.labels)
    assert exact_result.labels.GetPixelID() == sitk.sitkUInt8
    assert (lab == 1).sum() == truth["ggo"].sum() and ((lab == 1) == truth["ggo"]).all()
    assert ((lab == 2) == truth["consolidation"]).all()
    vox_ml = np.prod(SP) / 1000
    st = exact_result.stats
    assert st["lesions"]["ggo"]["volume_ml"] == pytest.approx(truth["ggo"].sum() * vox_ml, rel=1e-6)
    assert st["lesions"]["consolidation"]["volume_ml"] == pytest.approx(truth["consolidation"].sum() * vox_ml, rel=1e-6)
    assert st["lesions"]["ggo"]["mean_hu"] == pytest.approx(-500, abs=5)
    assert st["lesions"]["consolidation"]["mean_hu"] == pytest.approx(0, abs=5)
    # the classical lungs hold the lesions too; on this small convex phantom they overshoot
    # at the lung tips and out to the ribs by about a third (see ssanet.lungs)
    lungs = compute_lungs(sitk.Cast(img, sitk.sitkFloat32), method="classical").labels
    for value, key in ((1, "right_lung"), (2, "left_lung")):
        m, t = lungs == value, truth[key]
        assert (m & t).sum() > 0.98 * t.sum() and m.sum() < 1.45 * t.sum()
    assert (lungs[truth["ggo"]] == 1).all() and (lungs[truth["consolidation"]] == 2).all()


def test_stats_match_independent_recomputation(phantom, exact_result):
    img, _ = phantom
    hu = sitk.GetArrayFromImage(img).astype(np.float64)
    lab = sitk.GetArrayFromImage(exact_result.labels)
    lung = sitk.GetArrayFromImage(exact_result.lungs)
    vox_ml = np.prod(img.GetSpacing()) / 1000.0
    st = exact_result.stats
    total = (lung > 0).sum()
    assert st["lungs"]["total"]["volume_ml"] == pytest.approx(total * vox_ml, rel=5e-3)
    assert st["lungs"]["right"]["volume_ml"] == pytest.approx((lung == 1).sum() * vox_ml, rel=5e-3)
    for name, values in (("ggo", (1,)), ("consolidation", (2,)), ("infection", (1, 2))):
        m = np.isin(lab, values)
        e = st["lesions"][name]
        assert e["volume_ml"] == pytest.approx(m.sum() * vox_ml, rel=5e-3)
        assert e["percent_of_lung"] == pytest.approx(100 * (m & (lung > 0)).sum() / total, rel=5e-3)
        assert e["percent_of_left_lung"] == pytest.approx(100 * (m & (lung == 2)).sum() / (lung == 2).sum(), rel=5e-3)
        assert e["mean_hu"] == pytest.approx(hu[m].mean(), rel=5e-3)
        assert e["std_hu"] == pytest.approx(hu[m].std(), rel=5e-3)
    sev = st["severity"]
    assert sev["max"] == 10 and sev["basis"] == "per lung" and "not the published 0-25" in sev["scheme"]
    assert sev["total"] == sum(r["score"] for r in sev["regions"].values())
    assert st["info"]["lung_method"] == "file" and st["info"]["timings_s"]["lesions"] >= 0


def test_lobes_are_filled_where_the_lobe_model_leaves_out_dense_lung():
    """LTRCLobes leaves dense consolidation out of every lobe; R231's lung includes it. The
    gap goes to the nearest lobe of the same side, so the per-lobe score sees the lesion."""
    from ssalesionseg.lungstep import fill_lobes
    from ssalesionseg.stats import compute_stats

    lungs = np.zeros((4, 20, 40), np.uint8)
    lungs[:, 2:18, 2:18] = 1        # right lung (R231 label 1)
    lungs[:, 2:18, 22:38] = 2       # left lung
    lobes = np.zeros_like(lungs)
    lobes[:, 2:10, 2:18] = 3        # right upper
    lobes[:, 10:18, 2:18] = 5       # right lower
    lobes[:, 2:18, 22:38] = 1       # left upper
    lobes[:, 12:18, 10:18] = 0      # dense posterior right lower lobe: no lobe label
    lobes[:, 2:4, 22:26] = 0        # a small left gap
    filled, n = fill_lobes(lobes, lungs, (2.0, 1.0, 1.0))
    assert n == 4 * 6 * 8 + 4 * 2 * 4
    assert np.all(filled[:, 12:18, 10:18] == 5) and np.all(filled[:, 2:4, 22:26] == 1)
    assert np.array_equal(filled[lobes > 0], lobes[lobes > 0]) and not filled[lungs == 0].any()

    ct = sitk.GetImageFromArray(np.full(lungs.shape, -800, np.int16))
    labels = np.zeros_like(lungs)
    labels[:, 12:18, 10:18] = 2     # the consolidation in the gap: 37.5 % of the right lower lobe
    before = compute_stats(ct, labels, lungs, lobes)["severity"]["regions"]["right_lower"]
    after = compute_stats(ct, labels, lungs, filled)["severity"]["regions"]["right_lower"]
    assert before["score"] == 0 and after["score"] == 3 and after["percent_involved"] == pytest.approx(37.5)


def test_voxel_volume_of_a_sheared_grid():
    """A gantry-tilted CT stored without resampling has non-orthogonal axes: the voxel is a
    parallelepiped of volume spacing product x |det(direction)|."""
    from ssalesionseg.stats import compute_stats
    arr = np.full((2, 4, 4), -800, np.int16)
    ct = sitk.GetImageFromArray(arr)
    ct.SetSpacing((0.5, 0.5, 2.0))
    tilt = np.deg2rad(20)
    ct.SetDirection((1, 0, 0, 0, 1, np.sin(tilt), 0, 0, np.cos(tilt)))   # z axis tilted in y
    lungs = np.ones(arr.shape, np.uint8)
    st = compute_stats(ct, np.zeros(arr.shape, np.uint8), lungs)
    assert st["voxel_volume_ml"] == pytest.approx(0.5 * 0.5 * 2.0 * np.cos(tilt) / 1000)
    ct.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert compute_stats(ct, np.zeros(arr.shape, np.uint8), lungs)["voxel_volume_ml"] == pytest.approx(0.0005)


def test_severity_per_lobe(phantom, exact_result):
    from ssalesionseg.stats import compute_stats, severity_bin, severity_text

    img, truth = phantom
    lungs = sitk.GetArrayFromImage(exact_result.lungs)
    lobes = np.zeros(lungs.shape, np.uint8)
    lobes[lungs == 2] = 1  # left upper ...
    lobes[(lungs == 2) & (np.arange(lungs.shape[1]) >= 64)[None, :, None]] = 2
    lobes[lungs == 1] = 3
    st = compute_stats(img, exact_result.labels, exact_result.lungs, lobes)
    sev = st["severity"]
    assert sev["max"] == 25 and "per lobe" in sev["scheme"] and len(sev["regions"]) == 5
    lab = sitk.GetArrayFromImage(exact_result.labels) > 0
    pct = 100 * (lab & (lobes == 3)).sum() / (lobes == 3).sum()
    assert sev["regions"]["right_upper"]["score"] == severity_bin(pct)
    # a lobe the mask lacks is not scored (not a 0 that would look like a healthy lobe)
    assert sev["regions"]["right_middle"]["score"] is None and sev["regions"]["right_middle"]["percent_involved"] is None
    # Pan et al. 2020: 1 <5 %, 2 5-25 %, 3 26-49 %, 4 50-75 %, 5 >75 % (exactly 50 % is a 4)
    assert [severity_bin(p) for p in (0, 1, 5, 25, 26, 49.9, 50, 51, 75, 76)] == [0, 1, 2, 2, 3, 3, 4, 4, 4, 5]
    assert sev["basis"] == "per lobe" and sev["regions_scored"] == 3     # two lobes of the mask are empty
    assert sev["total"] == sum(r["score"] for r in sev["regions"].values() if r["score"] is not None)
    assert severity_text(sev) == f"{sev['total']}/25 per lobe (3 of 5 regions scored)"


def test_resampling_to_model_pixel_size(phantom, truth_lungs_path):
    img, truth = phantom
    meta = exact_meta(size=64, px=2.0)
    meta["preprocessing"]["fov_px"] = 96
    res = segment_image(img, model=(ThresholdNet(), meta), lung_mask=truth_lungs_path, device="cpu")
    lab = sitk.GetArrayFromImage(res.labels)
    for value, key in ((1, "ggo"), (2, "consolidation")):
        m, t = lab == value, truth[key]
        assert 2 * (m & t).sum() / (m.sum() + t.sum()) > 0.8


def test_binary_model_and_probability(phantom, truth_lungs_path):
    img, truth = phantom
    res = segment_image(img, model=(ThresholdNet(binary=True), exact_meta(binary=True)), lung_mask=truth_lungs_path,
                        device="cpu", save_probability=True)
    lab = sitk.GetArrayFromImage(res.labels)
    assert set(np.unique(lab)) == {0, 1}
    assert ((lab == 1) == (truth["ggo"] | truth["consolidation"])).all()
    assert res.stats["lesions"]["ggo"] is None and res.stats["lesions"]["infection"]["volume_ml"] > 0
    p = sitk.GetArrayFromImage(res.probability)
    assert res.probability.GetPixelID() == sitk.sitkFloat32 and p.min() >= 0 and p.max() <= 1.0
    assert (p[sitk.GetArrayFromImage(res.lungs) == 0] == 1).all()


class OneSidedNet(torch.nn.Module):
    """GGO with high confidence in the image's left columns, weak background in the right
    ones: mirrored averaging calls GGO on both sides, a single pass on one."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        n, _, h, w = x.shape
        left = (torch.arange(w) < w // 2).float().expand(n, h, w)
        return torch.stack([1 - left, 4 * left, torch.zeros_like(left)], 1) + self.w


def segment_with(net, meta, phantom, lungs_path, **override):
    """(labels array, info) of the phantom segmented by ``net`` with ``meta`` as its header."""
    res = segment_image(phantom[0], model=(net, meta), lung_mask=lungs_path, device="cpu", **override)
    return sitk.GetArrayFromImage(res.labels), res.info


def test_flip_tta_follows_the_checkpoint_unless_overridden(phantom, truth_lungs_path):
    meta = exact_meta()

    def ggo_voxels(m, flip):
        labels, info = segment_with(OneSidedNet(), m, phantom, truth_lungs_path, flip_tta=flip)
        return int((labels == 1).sum()), info["flip_tta"]

    one, flag = ggo_voxels(meta, None)
    assert flag is False and one > 0
    both, flag = ggo_voxels({**meta, "inference": {"flip_tta": True}}, None)
    assert flag is True and both > 1.5 * one          # both lungs instead of one
    assert ggo_voxels({**meta, "inference": {"flip_tta": True}}, False) == (one, False)
    assert ggo_voxels(meta, True) == (both, True)


def test_pipeline_runs_bf16_on_native_cpus_unless_turned_off(phantom, truth_lungs_path, monkeypatch):
    import ssanet.inference as inf

    monkeypatch.setattr(inf, "autocast_dtype", lambda device, enabled: torch.bfloat16)
    labels, info = segment_with(OneSidedNet(), exact_meta(), phantom, truth_lungs_path)
    assert info["precision"] == "bfloat16"
    exact, info = segment_with(OneSidedNet(), exact_meta(), phantom, truth_lungs_path, cpu_bf16=False)
    assert info["precision"] == "float32"
    assert (exact == 1).sum() > 0
    # the labels of a clear-cut model do not depend on the precision
    np.testing.assert_array_equal(labels, exact)


def test_small_lesion_islands_follow_the_checkpoint_unless_overridden(phantom, truth_lungs_path):
    from scipy import ndimage

    meta = exact_meta()
    recorded = {**meta, "inference": {"min_lesion_mm2": None}}

    def run(m, override):
        labels, info = segment_with(ThresholdNet(), m, phantom, truth_lungs_path, min_lesion_mm2=override)
        return labels, info["min_lesion_mm2"]

    full, setting = run(meta, None)
    assert setting == 0.0
    # each slice's islands (8-connected) and their areas at the CT's in-plane spacing
    islands = [ndimage.label(sl > 0, structure=np.ones((3, 3), bool))[0] for sl in full]
    areas = [np.bincount(isl.ravel()) * SP[0] * SP[1] for isl in islands]
    sizes = sorted({a for per_slice in areas for a in per_slice[1:]})
    assert len(sizes) >= 2
    cut = float(np.median(sizes))
    expected = full.copy()
    for z, (isl, area) in enumerate(zip(islands, areas)):
        small = area < cut
        small[0] = False
        expected[z][small[isl]] = 0
    assert 0 < (expected > 0).sum() < (full > 0).sum()
    recorded["inference"]["min_lesion_mm2"] = cut
    cleaned, setting = run(recorded, None)
    assert setting == cut
    np.testing.assert_array_equal(cleaned, expected)
    kept, setting = run(recorded, 0)
    assert setting == 0.0
    np.testing.assert_array_equal(kept, full)
    with pytest.raises(ValueError, match="minimum lesion island"):
        run(meta, -5)


@pytest.mark.parametrize("orientation,rotate", [("RAI", False), ("LPS", True), ("PIR", True)])
def test_direction_preserved_flipped_and_oblique(phantom, exact_result, orientation, rotate):
    img, _ = phantom
    moved = sitk.DICOMOrient(img, orientation)
    if rotate:  # 12 degrees about the axial axis: oblique, same nearest orientation
        a = np.deg2rad(12)
        rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        moved.SetDirection(tuple((rot @ np.asarray(moved.GetDirection()).reshape(3, 3)).ravel()))
    res = segment_image(moved, model=(ThresholdNet(), exact_meta()), lungs="classical", device="cpu")
    ref = segment_image(img, model=(ThresholdNet(), exact_meta()), lungs="classical", device="cpu")
    for out in (res.labels, res.lungs):
        assert out.GetSize() == moved.GetSize()
        assert np.allclose(out.GetDirection(), moved.GetDirection())
        assert np.allclose(out.GetOrigin(), moved.GetOrigin()) and np.allclose(out.GetSpacing(), moved.GetSpacing())
    # the same voxels get the same labels whatever the storage order
    back = sitk.GetImageFromArray(sitk.GetArrayFromImage(res.labels))
    back.CopyInformation(moved)
    assert (lps_array(back) == sitk.GetArrayFromImage(ref.labels)).all()


# ------------------------------------------------------------------------ outputs

def test_seg_nrrd_round_trip_with_slicerio(tmp_path, phantom, exact_result):
    import slicerio

    img, _ = phantom
    moved = sitk.DICOMOrient(img, "RAS")
    a = np.deg2rad(10)
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    moved.SetDirection(tuple((rot @ np.asarray(moved.GetDirection()).reshape(3, 3)).ravel()))
    lab = sitk.GetImageFromArray(sitk.GetArrayFromImage(sitk.DICOMOrient(exact_result.labels, "RAS")))
    lab.CopyInformation(moved)
    lungs = sitk.GetImageFromArray(sitk.GetArrayFromImage(sitk.DICOMOrient(exact_result.lungs, "RAS")))
    lungs.CopyInformation(moved)
    path = tmp_path / "case.seg.nrrd"
    write_seg_nrrd(path, lab, lungs, ["background", "ggo", "consolidation"])
    seg = slicerio.read_segmentation(str(path))
    segs = {s["name"]: s for s in seg["segments"]}
    assert list(segs) == ["Ground-glass opacity", "Consolidation", "Right lung", "Left lung"]
    assert segs["Ground-glass opacity"]["color"] == pytest.approx([0.9, 0.1, 0.1])
    assert segs["Consolidation"]["color"] == pytest.approx([0.1, 0.8, 0.1])
    assert [(s["labelValue"], s["layer"]) for s in segs.values()] == [(1, 0), (2, 0), (3, 1), (4, 1)]
    assert segs["Ground-glass opacity"]["terminology"]["type"] == ["SCT", "1217294009", "Ground glass opacity"]
    assert segs["Consolidation"]["terminology"]["type"] == ["SCT", "9656002", "Consolidation"]
    assert segs["Right lung"]["terminology"]["typeModifier"] == ["SCT", "24028007", "Right"]
    assert segs["Left lung"]["terminology"]["typeModifier"] == ["SCT", "7771000", "Left"]
    ijk = np.asarray(seg["ijkToLPS"])
    d = np.asarray(moved.GetDirection()).reshape(3, 3) * np.asarray(moved.GetSpacing())
    assert np.allclose(ijk[:3, :3], d, atol=1e-6) and np.allclose(ijk[:3, 3], moved.GetOrigin(), atol=1e-6)
    vox = seg["voxels"]  # (layer, i, j, k)
    assert (vox[0].transpose(2, 1, 0) == sitk.GetArrayFromImage(lab)).all()
    lung_arr = sitk.GetArrayFromImage(lungs)
    assert ((vox[1].transpose(2, 1, 0) == 3) == (lung_arr == 1)).all()
    assert segs["Consolidation"]["extent"][0] == int(np.flatnonzero((vox[0] == 2).any(axis=(1, 2)))[0])


def test_seg_nrrd_reads_in_slicer_core(tmp_path, phantom, exact_result):
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    import vtk

    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLApplicationLogic(app)
    colors.SetMRMLScene(scene)
    segl = slicer.vtkSlicerSegmentationsModuleLogic()  # registers the labelmap converters
    segl.SetMRMLApplicationLogic(app)
    segl.SetMRMLScene(scene)
    path = tmp_path / "case.seg.nrrd"
    write_seg_nrrd(path, exact_result.labels, exact_result.lungs, exact_result.class_names)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    seg = node.GetSegmentation()
    names = [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]
    assert names == ["Ground-glass opacity", "Consolidation", "Right lung", "Left lung"]
    ggo = seg.GetSegment(seg.GetSegmentIdBySegmentName("Ground-glass opacity"))
    assert ggo.GetColor() == pytest.approx((0.9, 0.1, 0.1))
    lm = ggo.GetRepresentation("Binary labelmap")
    m = vtk.vtkMatrix4x4()
    lm.GetImageToWorldMatrix(m)  # RAS
    img = exact_result.labels
    ras = np.diag([-1, -1, 1]) @ (np.asarray(img.GetDirection()).reshape(3, 3) * np.asarray(img.GetSpacing()))
    assert np.allclose([[m.GetElement(r, c) for c in range(3)] for r in range(3)], ras, atol=1e-6)
    from vtk.util.numpy_support import vtk_to_numpy
    shared_layer = vtk_to_numpy(lm.GetPointData().GetScalars())
    assert int((shared_layer == ggo.GetLabelValue()).sum()) == int((sitk.GetArrayFromImage(img) == 1).sum())


def test_ct_small_dicom_through_the_cli(tmp_path, tiny_ckpt, capsys):
    import pydicom
    import slicerio

    src = pydicom.data.get_testdata_file("CT_small.dcm")
    out = tmp_path / "out"
    rc = cli.main(["segment", src, "--out", str(out), "--checkpoint", str(tiny_ckpt), "--lungs", "classical",
                   "--device", "cpu"])
    assert rc == 0
    for suffix in (".seg.nrrd", "_stats.json", "_stats.csv", "_overlay.png"):
        assert (out / f"CT_small{suffix}").is_file()
    ct = sitk.ReadImage(src)
    seg = slicerio.read_segmentation(str(out / "CT_small.seg.nrrd"))
    assert [s["name"] for s in seg["segments"]] == ["Ground-glass opacity", "Consolidation", "Right lung", "Left lung"]
    ijk = np.asarray(seg["ijkToLPS"])
    assert np.allclose(ijk[:3, 3], ct.GetOrigin()) and np.allclose(np.linalg.norm(ijk[:3, :3], axis=0), ct.GetSpacing())
    assert seg["voxels"].shape[1:] == ct.GetSize()
    st = json.loads((out / "CT_small_stats.json").read_text())
    for key in ("right", "left", "total"):
        assert st["lungs"][key]["volume_ml"] > 0
    for key in ("ggo", "consolidation", "infection"):
        assert {"volume_ml", "percent_of_lung", "mean_hu", "std_hu"} <= set(st["lesions"][key])
    assert st["severity"]["scheme"] and st["info"]["checkpoint"]["sha256"]
    assert st["info"]["input"]["dicom"]["modality"] == "CT"
    assert "lesions.infection.volume_ml" in (out / "CT_small_stats.csv").read_text()
    # the lead's command line carries the same subcommands
    from ssanet.cli import build_parser
    assert build_parser().parse_args(["segment", src, "--out", str(out)]).func is cli.cmd_segment


def test_stats_subcommand_recomputes_from_seg_nrrd(tmp_path, phantom, exact_result):
    img, _ = phantom
    ct_path = tmp_path / "ph.nii.gz"
    write_image(img, ct_path)
    write_seg_nrrd(tmp_path / "ph.seg.nrrd", exact_result.labels, exact_result.lungs, exact_result.class_names)
    assert cli.main(["stats", "--ct", str(ct_path), "--labels", str(tmp_path / "ph.seg.nrrd"),
                     "--out", str(tmp_path / "s")]) == 0
    st = json.loads((tmp_path / "s" / "ph_stats.json").read_text())
    for name in ("ggo", "consolidation", "infection"):
        assert st["lesions"][name]["volume_ml"] == pytest.approx(exact_result.stats["lesions"][name]["volume_ml"])
    assert st["lungs"]["total"]["volume_ml"] == pytest.approx(exact_result.stats["lungs"]["total"]["volume_ml"])
    # a plain labelmap + explicit lung mask gives the same
    write_image(exact_result.labels, tmp_path / "lab.nrrd")
    write_image(exact_result.lungs, tmp_path / "lungs.nrrd")
    assert cli.main(["stats", "--ct", str(ct_path), "--labels", str(tmp_path / "lab.nrrd"), "--lung-mask",
                     str(tmp_path / "lungs.nrrd"), "--out", str(tmp_path / "s2")]) == 0
    st2 = json.loads((tmp_path / "s2" / "ph_stats.json").read_text())
    assert st2["lesions"]["infection"]["percent_of_lung"] == pytest.approx(st["lesions"]["infection"]["percent_of_lung"])


def test_lung_mask_file_bypasses_the_lung_step(tmp_path, phantom):
    img, truth = phantom
    lungs = sitk.GetImageFromArray(truth["right_lung"].astype(np.uint8) + 2 * truth["left_lung"].astype(np.uint8))
    lungs.CopyInformation(img)
    write_image(lungs, tmp_path / "lungs.nii.gz")
    res = segment_image(img, model=(ThresholdNet(), exact_meta()), lung_mask=tmp_path / "lungs.nii.gz", device="cpu")
    assert res.info["lung_method"] == "file"
    assert (sitk.GetArrayFromImage(res.lungs) == sitk.GetArrayFromImage(lungs)).all()
    # a binary mask is split into right/left; a .seg.nrrd is read by segment name
    write_image(sitk.Cast(lungs > 0, sitk.sitkUInt8), tmp_path / "binary.nrrd")
    res2 = segment_image(img, model=(ThresholdNet(), exact_meta()), lung_mask=tmp_path / "binary.nrrd", device="cpu")
    assert (sitk.GetArrayFromImage(res2.lungs) == sitk.GetArrayFromImage(lungs)).all()
    # the Slicer module hands over a SimpleITK image
    res_img = segment_image(img, model=(ThresholdNet(), exact_meta()), lung_mask=lungs, device="cpu")
    assert (sitk.GetArrayFromImage(res_img.lungs) == sitk.GetArrayFromImage(lungs)).all()
    # ... under the same grid rule as a file: a crop of the CT's voxels is copied exactly,
    # one half a voxel off is refused instead of resampled (labels would move)
    lo = [int(min(np.nonzero(sitk.GetArrayFromImage(lungs))[2 - d])) for d in range(3)]
    crop = sitk.RegionOfInterest(lungs, [s - lo[d] for d, s in enumerate(lungs.GetSize())], lo)
    res_crop = segment_image(img, model=(ThresholdNet(), exact_meta()), lung_mask=crop, device="cpu")
    assert (sitk.GetArrayFromImage(res_crop.lungs) == sitk.GetArrayFromImage(lungs)).all()
    shifted = sitk.Image(lungs)
    shifted.SetOrigin([o + 0.5 * s for o, s in zip(lungs.GetOrigin(), lungs.GetSpacing())])
    with pytest.raises(InputError, match="given lung mask image.*another position or spacing"):
        segment_image(img, model=(ThresholdNet(), exact_meta()), lung_mask=shifted, device="cpu")
    with pytest.raises(InputError, match="3D scalar label image"):
        segment_image(img, model=(ThresholdNet(), exact_meta()), lung_mask=lungs[:, :, 0], device="cpu")
    write_seg_nrrd(tmp_path / "prev.seg.nrrd", res.labels, res.lungs, res.class_names)
    res3 = segment_image(img, model=(ThresholdNet(), exact_meta()), lung_mask=tmp_path / "prev.seg.nrrd", device="cpu")
    assert (sitk.GetArrayFromImage(res3.lungs) == sitk.GetArrayFromImage(lungs)).all()


# ---------------------------------------------------------------------- lungmask

def _random_lungmask_weights(path):
    from lungmask.resunet import UNet

    torch.manual_seed(0)
    torch.save(UNet(n_classes=3, padding=True, depth=5, up_mode="upsample", batch_norm=True,
                    residual=False).state_dict(), path)
    return path


def test_real_lungmask_code_path(tmp_path, monkeypatch):
    w = _random_lungmask_weights(tmp_path / "unet_r231-local.pth")
    img, _ = synthetic_chest_ct(2, 64, spacing=(5.6, 5.6, 5.0))
    ct = sitk.Cast(sitk.DICOMOrient(img, "RAI"), sitk.sitkFloat32)
    res = compute_lungs(ct, method="lungmask", weights=w, device="cpu")
    assert res.method == "lungmask" and res.details["weights_name"] == w.name
    assert res.labels.shape == ct.GetSize()[::-1] and res.labels.dtype == np.uint8
    assert set(np.unique(res.labels)) <= {0, 1, 2}
    # lobes (LTRCLobes) when their weights are given: per-lobe severity
    from lungmask.resunet import UNet
    lobe_w = tmp_path / "unet_ltrclobes-local.pth"
    torch.save(UNet(n_classes=6, padding=True, depth=5, up_mode="upsample", batch_norm=True,
                    residual=False).state_dict(), lobe_w)
    res = compute_lungs(ct, method="lungmask", weights=w, lobe_weights=lobe_w, device="cpu")
    assert res.lobes.shape == res.labels.shape and set(np.unique(res.lobes)) <= set(range(6))
    assert res.details["lobe_model"] == "LTRCLobes"
    # auto picks lungmask when the environment variable names weights
    monkeypatch.setenv("SSALESIONSEG_LUNGMASK_WEIGHTS", str(w))
    assert compute_lungs(ct, method="auto", device="cpu").method == "lungmask"


def test_lungmask_weights_resolution_order(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    cached = hub / "checkpoints" / "unet_r231-d5d2fc3d.pth"
    cached.write_bytes(b"x")
    env = tmp_path / "env.pth"
    env.write_bytes(b"x")
    explicit = tmp_path / "explicit.pth"
    explicit.write_bytes(b"x")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.delenv("SSALESIONSEG_LUNGMASK_WEIGHTS", raising=False)
    assert resolve_weights() == cached
    monkeypatch.setenv("SSALESIONSEG_LUNGMASK_WEIGHTS", str(env))
    assert resolve_weights() == env
    assert resolve_weights(explicit) == explicit
    monkeypatch.setenv("SSALESIONSEG_LUNGMASK_WEIGHTS", str(tmp_path / "gone.pth"))
    with pytest.raises(LungWeightsError, match="gone.pth"):
        resolve_weights()


def test_auto_falls_back_to_classical_with_a_notice(phantom, monkeypatch, tmp_path):
    monkeypatch.delenv("SSALESIONSEG_LUNGMASK_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    img, _ = phantom
    with pytest.warns(UserWarning, match="classical"):
        res = segment_image(img, model=(ThresholdNet(), exact_meta()), lungs="auto", device="cpu")
    assert res.info["lung_method"] == "classical" and res.notices and "classical" in res.info["notices"][0]
    with pytest.raises(LungWeightsError, match="--lung-weights"):
        compute_lungs(sitk.Cast(img, sitk.sitkFloat32), method="lungmask")


# --------------------------------------------------------------------- bad input

def _write(img, path):
    sitk.WriteImage(img, str(path))
    return path


def test_bad_inputs_are_named(tmp_path, phantom):
    img, _ = phantom
    mr = sitk.GetImageFromArray(np.random.default_rng(0).uniform(0, 800, (4, 32, 32)).astype(np.float32))
    with pytest.raises(InputError, match="does not look like a CT in Hounsfield units"):
        read_ct(_write(mr, tmp_path / "mr.nii.gz"))
    with pytest.raises(InputError, match="2D image"):
        read_ct(_write(img[:, :, 2], tmp_path / "slice.nrrd"))
    with pytest.raises(InputError, match="4D"):
        read_ct(_write(sitk.JoinSeries([img, img]), tmp_path / "t.nii.gz"))
    rgb = sitk.Compose([img[:, :, 0]] * 3)
    with pytest.raises(InputError, match="vector"):
        read_ct(_write(sitk.JoinSeries([rgb]), tmp_path / "rgb.nrrd"))
    nan = sitk.Cast(img, sitk.sitkFloat32)
    nan[5, 5, 1] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        read_ct(_write(nan, tmp_path / "nan.nrrd"))
    corrupt = tmp_path / "broken.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b" + os.urandom(300))
    with pytest.raises(InputError, match="broken.nii.gz"):
        read_ct(corrupt)
    with pytest.raises(InputError, match="too small"):
        read_ct(_write(img[:10, :10, :], tmp_path / "tiny.nrrd"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="empty"):
        read_ct(empty)
    with pytest.raises(InputError, match="empty"):
        cli.find_cases(empty)


def test_ct_without_lungs(phantom):
    img, truth = phantom
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    arr[truth["right_lung"] | truth["left_lung"]] = 40.0  # an abdomen-like body: air outside only
    no_lungs = sitk.GetImageFromArray(arr)
    no_lungs.CopyInformation(img)
    with pytest.raises(InputError, match="no lungs found") as e:
        segment_image(no_lungs, model=(ThresholdNet(), exact_meta()), lungs="classical", device="cpu")
    assert "image extent" in str(e.value) and "header right" not in str(e.value)   # a plausible size
    # a spacing ten times too small (a header error) is named as the likely cause
    small = sitk.Image(img)
    small.SetSpacing([s / 10 for s in img.GetSpacing()[:2]] + [img.GetSpacing()[2]])
    with pytest.raises(InputError, match="no chest is that size: is the voxel spacing in the file's header right"):
        segment_image(small, model=(ThresholdNet(), exact_meta()), lungs="classical", device="cpu")


def test_tiny_volume_smaller_than_a_tile(tiny_ckpt, phantom):
    img, truth = phantom
    small = img[40:88, 30:100, 1:3]  # 70 x 48 x 2, under one 64-px tile at the model's 2.8 mm
    lungs = sitk.GetImageFromArray((truth["right_lung"] | truth["left_lung"])[1:3, 30:100, 40:88].astype(np.uint8))
    lungs.CopyInformation(small)
    lungs_path = os.path.join(os.path.dirname(str(tiny_ckpt)), "small_lungs.nrrd")
    write_image(lungs, lungs_path)
    res = segment_image(small, checkpoint=tiny_ckpt, lung_mask=lungs_path, device="cpu")
    assert res.labels.GetSize() == small.GetSize()


def _write_dicom_series(vol, folder, uid, desc, prefix, skip=(), patient="anon", modality="CT", kernel=None):
    """``vol`` as one DICOM file per slice (slices in ``skip`` left out, as a lost file)."""
    folder.mkdir(parents=True, exist_ok=True)
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    for i in range(vol.GetDepth()):
        if i in skip:
            continue
        s = sitk.Cast(vol[:, :, i], sitk.sitkInt16)
        for k, v in (("0008|0060", modality), ("0020|000e", uid), ("0008|103e", desc), ("0010|0020", patient),
                     *((("0018|1210", kernel),) if kernel else ()),
                     ("0020|000d", "1.2.826.0.1.3680043.2.1125.1.1"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                     ("0020|0032", "\\".join(str(c) for c in vol.TransformIndexToPhysicalPoint((0, 0, i)))),
                     ("0018|0050", str(vol.GetSpacing()[2])),
                     ("0020|0013", str(i + 1)), ("0008|0018", f"{uid}.{i + 1}")):
            s.SetMetaData(k, v)
        w.SetFileName(str(folder / f"{prefix}{i:03d}.dcm"))
        w.Execute(s)


def test_dicom_folder_with_several_series(tmp_path, phantom):
    img, _ = phantom
    _write_dicom_series(img[:, :, :4], tmp_path, "1.2.826.0.1.3680043.2.1125.2.1", "four", "a")
    _write_dicom_series(img[:, :, :2], tmp_path, "1.2.826.0.1.3680043.2.1125.2.2", "two", "b")
    ct, info = read_ct(tmp_path)
    assert ct.GetSize()[2] == 4 and info["dicom"]["description"] == "four"
    assert len(info["dicom_series_found"]) == 2 and "most slices" in info["dicom_series_note"]
    assert info["dicom_series_note"].endswith("not read: 2 files ('two')")   # by name; no "in ."
    assert cli.find_cases(tmp_path) == [(tmp_path.name, tmp_path)]
    _write_dicom_series(img[:, :, :2], tmp_path / "sub", "1.2.826.0.1.3680043.2.1125.2.3", "", "c")
    note = read_ct(tmp_path)[1]["dicom_series_note"]   # without a description: the UID, and where
    assert "2 files (CT series 1.2.826.0.1.3680043.2.1125.2.3) in sub" in note


def test_dicom_folder_with_two_patients_is_refused_by_where_not_who(tmp_path, phantom):
    """A disc or folder with several patients' CTs was one case: the largest series was
    segmented and its figures written under the folder's name, whoever's it was."""
    img, _ = phantom
    disc = tmp_path / "disc"
    _write_dicom_series(img[:, :, :4], disc / "DICOM" / "P1", "1.2.826.0.1.3680043.2.1125.7.1", "a", "i", patient="PID-0001")
    _write_dicom_series(img[:, :, :3], disc / "DICOM" / "P2", "1.2.826.0.1.3680043.2.1125.7.2", "b", "i", patient="PID-0002")
    (disc / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    with pytest.raises(InputError, match=r"CT series of 2 patients \(by PatientID; in DICOM/P1; DICOM/P2\).*one "
                                         r"subfolder per patient") as e:
        read_ct(disc)
    assert "PID-000" not in str(e.value)
    assert [n for n, _ in cli.find_cases(disc / "DICOM")] == ["P1", "P2"]   # what the message suggests works
    assert read_ct(disc / "DICOM" / "P2")[0].GetSize()[2] == 3
    _write_dicom_series(img[:, :, :2], disc / "DICOM" / "P1" / "scout", "1.2.826.0.1.3680043.2.1125.7.3", "c", "s",
                        patient="PID-0001")
    ct, info = read_ct(disc / "DICOM" / "P1")   # one patient's two series: the larger, as before
    assert ct.GetSize()[2] == 4 and "2 series found" in info["dicom_series_note"]
    assert "PID" not in json.dumps(info)      # the PatientID is not kept in what goes into the outputs
    _write_dicom_series(img[:, :, :2], disc / "DICOM" / "P2", "1.2.826.0.1.3680043.2.1125.7.4", "d", "j", patient="X")
    with pytest.raises(InputError, match=r"2 patients \(by PatientID; all in this folder\)"):
        read_ct(disc / "DICOM" / "P2")


def test_dicom_ties_go_to_the_lung_reconstruction_and_other_modalities_are_refused(tmp_path, phantom):
    """Two reconstructions with as many slices: the choice was the first by GDCM's order and
    the note said "the most slices"; an MR series was segmented as CT."""
    img, _ = phantom
    _write_dicom_series(img[:, :, :4], tmp_path / "tie", "1.2.826.0.1.3680043.2.1125.8.1", "Thorax 1.0 B30f",
                        "a", kernel="B30f")
    _write_dicom_series(img[:, :, :4], tmp_path / "tie", "1.2.826.0.1.3680043.2.1125.8.2", "Thorax 1.0",
                        "b", kernel="LUNG")
    ct, info = read_ct(tmp_path / "tie")
    assert info["dicom"]["kernel"] == "LUNG" and "of the 2 CT series with 4 slices, the lung reconstruction" in \
        info["dicom_series_note"]
    _write_dicom_series(img[:, :, :4], tmp_path / "tie2", "1.2.826.0.1.3680043.2.1125.8.3", "one", "a")
    _write_dicom_series(img[:, :, :4], tmp_path / "tie2", "1.2.826.0.1.3680043.2.1125.8.4", "two", "b")
    assert "the first by series UID" in read_ct(tmp_path / "tie2")[1]["dicom_series_note"]
    _write_dicom_series(img[:, :, :4], tmp_path / "mr", "1.2.826.0.1.3680043.2.1125.8.5", "t1", "m", modality="MR")
    for given in (tmp_path / "mr", tmp_path / "mr" / "m001.dcm"):
        with pytest.raises(InputError, match=r"MR \(magnetic resonance\), not CT"):
            read_ct(given)
    # beside a screenshot series (OT) the MR series is still not read as CT: the OT one is tried
    _write_dicom_series(img[:, :, :2], tmp_path / "mr", "1.2.826.0.1.3680043.2.1125.8.6", "shot", "o", modality="OT")
    assert read_ct(tmp_path / "mr")[0].GetSize()[2] == 2
    # two lung reconstructions tied: said as such
    _write_dicom_series(img[:, :, :4], tmp_path / "tie", "1.2.826.0.1.3680043.2.1125.8.7", "Lung 1.0 iterative",
                        "c", kernel="B70f")
    assert "of the 3 CT series with 4 slices, 2 lung reconstructions, the first by series UID" in \
        read_ct(tmp_path / "tie")[1]["dicom_series_note"]


def test_gantry_tilted_dicom_series_is_read_in_the_scanner_geometry(tmp_path):
    """Each slice of a tilted acquisition is shifted in its plane from the one before. ITK
    stacks such slices straight, spaced by the distance between their positions (here
    sqrt(2² + 1²) = 2.24 mm for 2 mm steps): a sheared volume, every volume 12 % too large.
    The reader shifts them back (a block fixed in the patient stays fixed) and spaces them
    2 mm apart, with a note; an untilted series is read as before."""
    n, size, step, shift = 10, 40, 2.0, 1.0          # 1 mm (one pixel) further posterior per slice
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    for tilted, folder in ((True, tmp_path / "tilt"), (False, tmp_path / "straight")):
        folder.mkdir()
        for k in range(n):
            y0 = k * shift if tilted else 0.0
            arr = np.full((1, size, size), -1000, np.int16)
            rows = np.arange(size) + y0                  # patient y (mm) of each row of this slice
            arr[0, (rows >= 10) & (rows < 20), 5:15] = 40    # a 10 x 10 mm block fixed in the patient
            s = sitk.GetImageFromArray(arr)
            for key, v in (("0008|0060", "CT"), ("0020|000e", "1.2.826.0.1.3680043.2.1125.9.1"),
                           ("0020|000d", "1.2.826.0.1.3680043.2.1125.9"), ("0010|0020", "anon"),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0020|0032", f"0\\{y0}\\{k * step}"),
                           ("0028|0030", "1\\1"), ("0020|0013", str(k + 1)),
                           ("0008|0018", f"1.2.826.0.1.3680043.2.1125.9.1.{k + 1}")):
                s.SetMetaData(key, v)
            w.SetFileName(str(folder / f"{k:03d}.dcm"))
            w.Execute(s)
    straight, info = read_ct(tmp_path / "straight")
    assert straight.GetSpacing()[2] == pytest.approx(step) and "gantry_tilt_note" not in info["dicom"]
    ct, info = read_ct(tmp_path / "tilt")
    note = info["dicom"]["gantry_tilt_note"]
    assert "gantry tilt of 26.6°" in note and "2.00 mm" in note and "2.24 mm" in note and "11.8 % larger" in note
    assert ct.GetSpacing()[2] == pytest.approx(step) and ct.GetSize() == straight.GetSize()
    block = sitk.GetArrayFromImage(ct) > -500
    np.testing.assert_array_equal(block, sitk.GetArrayFromImage(straight) > -500)   # the block stands straight
    voxel_ml = np.prod(ct.GetSpacing()) / 1000
    assert block.sum() * voxel_ml == pytest.approx(n * 10 * 10 * step / 1000)       # its true 2.0 mL
    from ssalesionseg.io import read_notes
    assert read_notes(info) == [note]


def test_dicom_series_with_a_missing_slice_is_refused_and_a_single_slice_keeps_its_thickness(tmp_path, phantom):
    """ITK reads a series with a lost file at the mean spacing (volumes and positions wrong)
    and only warns; a one-file DICOM gets 1 mm between slices. Both were silent."""
    img, _ = phantom
    _write_dicom_series(img, tmp_path / "gap", "1.2.826.0.1.3680043.2.1125.3.1", "gap", "s", skip=(3,))
    with pytest.raises(InputError, match=r"not evenly spaced: 5\.00 mm between slices 3 and 4 of 5, 2\.50 mm"):
        read_ct(tmp_path / "gap")
    _write_dicom_series(img, tmp_path / "whole", "1.2.826.0.1.3680043.2.1125.3.2", "whole", "s")
    ct, _ = read_ct(tmp_path / "whole")
    assert ct.GetSize() == img.GetSize() and ct.GetSpacing()[2] == pytest.approx(2.5)
    # one file of a series given: the series is read (it segmented that one slice, without a word)
    whole, info = read_ct(tmp_path / "whole" / "s002.dcm")
    assert whole.GetSize() == img.GetSize() and "one of the 6 files of its DICOM series" in info["dicom_series_note"]
    (tmp_path / "alone").mkdir()
    os.replace(tmp_path / "whole" / "s002.dcm", tmp_path / "alone" / "s002.dcm")
    one, _ = read_ct(tmp_path / "alone" / "s002.dcm")
    assert one.GetSize()[2] == 1 and one.GetSpacing()[2] == pytest.approx(2.5)
    # a file copied under a second name is named as a duplicate, not as a missing slice
    import shutil
    shutil.copy(tmp_path / "whole" / "s001.dcm", tmp_path / "whole" / "s001 copy.dcm")
    with pytest.raises(InputError, match=r"files s001( copy)?\.dcm and s001( copy)?\.dcm are slices at the same "
                                         r"position \(1 such pair: a duplicate file"):
        read_ct(tmp_path / "whole")


def test_folders_of_cases_as_batch_users_have_them(tmp_path, phantom):
    """An exported disc (DICOMDIR) is one DICOM case whose series choice is said; macOS ._
    files and an earlier run's output folder are not cases; DICOM files among CT files make
    the folder one DICOM case, and the CT files left out are named."""
    img, _ = phantom
    cd = tmp_path / "cd"
    for k, series in enumerate(("SE000", "SE001")):
        _write_dicom_series(img[:, :, : 3 + k], cd / "DICOM" / series, f"1.2.826.0.1.3680043.2.1125.4.{k}", series, "i")
    (cd / "VIEWER").mkdir()
    (cd / "VIEWER" / "viewer.exe").write_bytes(b"MZ")
    (cd / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    (cd / "DICOM" / "SE000" / "._i000.dcm").write_bytes(b"\0\5\26\7")
    assert cli.find_cases(cd) == [("cd", cd)]
    ct, info = read_ct(cd)
    assert ct.GetSize()[2] == 4 and "2 series found" in info["dicom_series_note"]

    mixed = tmp_path / "mixed"
    (mixed / "p").mkdir(parents=True)
    write_image(img, mixed / "a.nii.gz")
    write_image(img, mixed / "p" / "ct.nii.gz")
    (mixed / "p" / "._ct.nii.gz").write_bytes(b"\0\5\26\7")
    (mixed / "earlier_run").mkdir()
    for suffix in (".seg.nrrd", "_stats.json", "_stats.csv", "_overlay.png"):
        (mixed / "earlier_run" / f"a{suffix}").write_bytes(b"x")
    assert [(n, c.name) for n, c in cli.find_cases(mixed)] == [("a", "a.nii.gz"), ("p", "ct.nii.gz")]
    _write_dicom_series(img[:, :, :1], mixed, "1.2.826.0.1.3680043.2.1125.4.9", "stray", "stray")
    with pytest.raises(InputError, match=r"one loose DICOM file \(stray000\.dcm\) beside other cases"):
        cli.find_cases(mixed)          # one slice would stand for the whole folder
    _write_dicom_series(img[:, :, :3], mixed, "1.2.826.0.1.3680043.2.1125.4.9", "stray", "stray")
    notes = []
    assert cli.find_cases(mixed, notes=notes) == [("mixed", mixed)]   # a series: the folder is that case
    assert "read as one DICOM case" in notes[0] and "a.nii.gz" in notes[0] and "p/" in notes[0]
    # a case folder with an earlier run's output folder inside is still its one CT file
    nest = tmp_path / "nest"
    (nest / "patient1" / "results").mkdir(parents=True)
    write_image(img, nest / "patient1" / "ct.nii.gz")
    (nest / "patient1" / "results" / "ct_stats.json").write_text("{}")
    assert cli.find_cases(nest) == [("patient1", nest / "patient1" / "ct.nii.gz")]
    # a DICOM case folder inside a folder of cases: the CT files beside its DICOM files are
    # named as left out, as they are when that folder is given itself
    batch = tmp_path / "batch"
    _write_dicom_series(img[:, :, :3], batch / "pat", "1.2.826.0.1.3680043.2.1125.4.8", "s", "s")
    write_image(img > 0, batch / "pat" / "mask.nii.gz")
    notes = []
    assert cli.find_cases(batch, notes=notes) == [("pat", batch / "pat")]
    assert len(notes) == 1 and "read as one DICOM case" in notes[0] and "mask.nii.gz" in notes[0]


def test_a_case_folder_in_a_folder_of_cases_fails_as_a_case_with_exit_status_1(tmp_path, tiny_ckpt, capsys):
    """Exit status 2 is for one CT given; a folder of cases whose only case fails reports it and
    returns 1, as with many cases, and --progress-json ends with a finished event either way."""
    root = tmp_path / "cases"
    root.mkdir()
    write_image(image_like(np.zeros((3, 64, 64), np.int16), synthetic_chest_ct(3, 64, spacing=SP)[0]),
                root / "flat.nii.gz")   # 0 HU everywhere: not a CT in HU
    assert cli.main(_segment_args(root, tmp_path / "o", tiny_ckpt, "--progress-json")) == 1
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events][-2:] == ["error", "finished"] and events[-1]["n_failed"] == 1
    assert cli.main(_segment_args(root / "flat.nii.gz", tmp_path / "o", tiny_ckpt, "--progress-json")) == 2
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[-1]["event"] == "finished" and events[-1]["failed"] == ["flat"]
    # the command itself cannot start (no such input, no such model): an error event too, not silence
    write_image(synthetic_chest_ct(3, 64, spacing=SP)[0], root / "good.nii.gz")
    for argv in (_segment_args(tmp_path / "nope", tmp_path / "o", tiny_ckpt, "--progress-json"),
                 _segment_args(root / "good.nii.gz", tmp_path / "o", tmp_path / "none.safetensors", "--progress-json")):
        assert cli.main(argv) == 2
        events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [e["event"] for e in events][-2:] == ["error", "finished"] and events[-1]["error"], events
    events = [e for e in events if e["event"] in ("skipped", "finished")]   # the model's absence: after the cases
    assert events[-1]["failed"] == ["good"] and events[-1]["n_failed"] == 1 == events[-1]["n_cases"]


def test_files_of_the_user_at_output_names_are_kept_and_overwrite_clears_stale_outputs(tmp_path, tiny_ckpt, capsys):
    folder = tmp_path / "same"
    folder.mkdir()
    img, truth = synthetic_chest_ct(3, 128, spacing=SP)
    write_image(img, folder / "p1.nii.gz")
    mine = image_like((truth["right_lung"] | truth["left_lung"]).astype(np.uint8), img)
    write_image(mine, tmp_path / "p1_lungs.nii.gz")   # the user's own lung mask, where --labelmaps writes
    before = (tmp_path / "p1_lungs.nii.gz").read_bytes()
    assert cli.main(_segment_args(folder / "p1.nii.gz", tmp_path, tiny_ckpt, "--labelmaps")) == 2
    assert "p1_lungs.nii.gz, not as segment wrote it" in capsys.readouterr().err
    assert (tmp_path / "p1_lungs.nii.gz").read_bytes() == before and not (tmp_path / "p1.seg.nrrd").exists()
    # --overwrite replaces it; a later run without --labelmaps keeps the labelmaps in step with the
    # new segmentation (rewritten), so that every output listed is one run's; one the user edited
    # meanwhile is kept as it is and no longer listed
    assert cli.main(_segment_args(folder / "p1.nii.gz", tmp_path, tiny_ckpt, "--labelmaps", "--overwrite")) == 0
    assert outputs_complete(tmp_path, "p1", ("lesion_labelmap", "lung_labelmap"))
    edited = (tmp_path / "p1_lesions.nii.gz").read_bytes() + b"\0"
    (tmp_path / "p1_lesions.nii.gz").write_bytes(edited)
    stamp = (tmp_path / "p1_lungs.nii.gz").stat().st_mtime_ns
    assert cli.main(_segment_args(folder / "p1.nii.gz", tmp_path, tiny_ckpt, "--overwrite")) == 0
    assert (tmp_path / "p1_lesions.nii.gz").read_bytes() == edited
    assert (tmp_path / "p1_lungs.nii.gz").stat().st_mtime_ns != stamp
    listed = json.loads((tmp_path / "p1_stats.json").read_text())["info"]["outputs"]
    assert "lung_labelmap" in listed and "lesion_labelmap" not in listed
    assert outputs_complete(tmp_path, "p1", ("lung_labelmap",))


def test_corrupt_and_mismatched_checkpoint(tmp_path, phantom):
    from safetensors.torch import save_file

    from ssanet.checkpoint import FORMAT

    img, _ = phantom
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(os.urandom(200))
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        segment_image(img, checkpoint=bad, lungs="classical", device="cpu")
    net = SSANet(in_channels=2, num_classes=3, layers=(1, 1, 1, 1), width=(8, 16, 32, 64))
    other = SSANet(in_channels=2, num_classes=3, layers=(1, 1, 1, 1), width=(16, 16, 32, 64))
    meta = {"format": FORMAT, "model": other.config.to_dict(), "class_names": ["background", "ggo", "consolidation"]}
    mism = tmp_path / "mismatch.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(mism), metadata={"ssanet": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="do not match"):
        segment_image(img, checkpoint=mism, lungs="classical", device="cpu")


def test_missing_lungmask_weights_and_absent_cuda(phantom, tmp_path):
    img, _ = phantom
    with pytest.raises(LungWeightsError, match="not found"):
        segment_image(img, model=(ThresholdNet(), exact_meta()), lungs="lungmask",
                      lung_weights=tmp_path / "nope.pth", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            segment_image(img, model=(ThresholdNet(), exact_meta()), lungs="classical", device="cuda")


def test_unwritable_output_folder(tmp_path, phantom):
    img, _ = phantom
    src = write_image(img, tmp_path / "ph.nii.gz")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(InputError, match="not writable"):
        process_case(src, blocker / "out", model=(ThresholdNet(), exact_meta()), lungs="classical", device="cpu")
    # the check stats / export-case make before reading their inputs creates nothing
    from ssalesionseg.io import check_writable
    with pytest.raises(InputError, match="is a file, not a folder"):
        check_writable(blocker / "a" / "b", create=False)
    assert check_writable(tmp_path / "new" / "deeper", create=False) == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()


def test_interrupted_runs_leave_no_outputs(tmp_path, phantom, monkeypatch):
    img, _ = phantom
    src = write_image(img, tmp_path / "ph.nii.gz")
    out = tmp_path / "out"
    started = {}
    with pytest.raises(Cancelled):
        process_case(src, out, model=(ThresholdNet(), exact_meta()), lungs="classical", device="cpu",
                     progress=lambda stage, f: started.setdefault(stage, f),
                     cancel=lambda: "lesions" in started)
    assert list(out.iterdir()) == []

    import ssalesionseg.report as report

    def crash(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(report, "write_overlay", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        process_case(src, out, model=(ThresholdNet(), exact_meta()), lungs="classical", device="cpu")
    assert list(out.iterdir()) == []  # neither final nor temporary files


def test_folder_batch_continues_after_a_bad_case(tmp_path, tiny_ckpt, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    img, _ = synthetic_chest_ct(4, 128, spacing=SP)
    write_image(img, cases / "good.nii.gz")
    (cases / "bad.nii.gz").write_bytes(b"not an image")
    out = tmp_path / "out"
    args = ["segment", str(cases), "--out", str(out), "--checkpoint", str(tiny_ckpt), "--lungs", "classical",
            "--device", "cpu", "--progress-json"]
    assert cli.main(args) == 1
    captured = capsys.readouterr()
    events = [json.loads(line) for line in captured.out.splitlines()]
    assert {"progress", "done", "error", "finished"} <= {e["event"] for e in events}
    assert [e["case"] for e in events if e["event"] == "error"] == ["bad"]
    assert events[-1]["failed"] == ["bad"]
    assert "bad" in captured.err and outputs_complete(out, "good") and not outputs_complete(out, "bad")
    stamp = (out / "good_stats.json").stat().st_mtime_ns
    assert cli.main(args) == 1  # good is skipped, bad still fails
    assert (out / "good_stats.json").stat().st_mtime_ns == stamp
    assert any(json.loads(line)["event"] == "skipped" for line in capsys.readouterr().out.splitlines())


def test_bench_runs_small(tmp_path):
    r = run_bench(n_slices=2, size=64, device="cpu", repeats=1)
    assert r["lesion_slices"] == 2 and r["peak_rss_mb"] > 0 and r["flip_tta"] is False
    assert set(r["seconds"]) == {"read", "lungs", "lesions", "stats", "write"}
    f = r["forward"]
    assert f["with_spatial_conv"]["seconds_per_batch"] > 0 and f["without_spatial_conv"]["seconds_per_batch"] > 0
    assert f["precision"] == r["precision"]  # the forward timing runs as the pipeline does
    r32 = run_bench(n_slices=1, size=64, device="cpu", repeats=1, cpu_bf16=False)
    assert r32["precision"] == r32["forward"]["precision"] == "float32"


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_cut_off_nifti_is_refused(tmp_path, phantom, suffix):
    """ITK reads a truncated NIfTI without a word and fills the rest with zeros (0 HU: lesion
    volumes off by half); the reader must refuse it instead."""
    img, _ = phantom
    whole = write_image(img, tmp_path / f"ct{suffix}", compress=False)
    assert read_ct(whole)[0].GetSize() == img.GetSize()   # the complete file is fine
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut off") as e:
        read_ct(cut)
    assert str(cut) in str(e.value)


# NIfTI-1 header fields (offset, struct format) the tests below set by hand
_NIFTI_FIELDS = {"pixdim": (76, "8f"), "xyzt_units": (123, "B"), "qform_code": (252, "h"), "sform_code": (254, "h"),
                 "srow_x": (280, "4f"), "srow_y": (296, "4f"), "srow_z": (312, "4f")}


def _nifti_field(path, name):
    import struct
    at, fmt = _NIFTI_FIELDS[name]
    with open(path, "rb") as f:
        f.seek(at)
        return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))


def _patched_nifti(src, dst, **fields):
    """A copy of the uncompressed NIfTI-1 ``src`` with header fields replaced (``.gz`` when
    ``dst`` says so)."""
    import gzip
    import struct
    data = bytearray(Path(src).read_bytes())
    for name, values in fields.items():
        at, fmt = _NIFTI_FIELDS[name]
        struct.pack_into("<" + fmt, data, at, *(values if isinstance(values, (list, tuple)) else (values,)))
    Path(dst).write_bytes(gzip.compress(bytes(data), 1) if str(dst).endswith(".gz") else bytes(data))
    return Path(dst)


@pytest.mark.parametrize("suffix,pixel", [(".nii", sitk.sitkFloat32), (".nii.gz", sitk.sitkFloat32),
                                          (".nii.gz", sitk.sitkFloat64)], ids=["nii-float32", "nii.gz-float32",
                                                                               "nii.gz-float64"])
def test_nan_and_inf_voxels_of_a_nifti_are_refused_as_in_nrrd(tmp_path, phantom, tiny_ckpt, capsys, suffix, pixel):
    """ITK reads NaN and inf in a float NIfTI as 0 HU (soft tissue: missing data became
    consolidation); they are counted in the file's own data and refused as NRRD's are."""
    img, _ = phantom
    ct = sitk.Cast(img, pixel)
    assert read_ct(write_image(ct, tmp_path / f"fine{suffix}", compress=False))[0].GetSize() == img.GetSize()
    bad = sitk.Image(ct)
    bad[5, 5, 1] = float("nan")
    bad[6, 5, 1] = float("inf")
    bad[127, 127, 5] = float("-inf")   # the last voxels of the file
    for path in (write_image(bad, tmp_path / f"bad{suffix}", compress=False), tmp_path / "bad.nrrd"):
        if path.suffix == ".nrrd":
            write_image(bad, path)
        with pytest.raises(InputError, match="3 voxels are NaN or infinite") as e:
            read_ct(path)
        assert str(path) in str(e.value)
    assert cli.main(_segment_args(tmp_path / f"bad{suffix}", tmp_path / "o", tiny_ckpt)) == 2
    assert "3 voxels are NaN or infinite" in capsys.readouterr().err


def test_a_voxel_size_of_zero_or_below_is_refused_not_read_as_1_mm(tmp_path, phantom):
    """ITK reads a NIfTI pixdim of 0 (or NaN) as 1 mm, every volume then wrong by the factor,
    and a negative one as a flip; NRRD / MHA with a zero spacing ITK refuses in its own words."""
    img, _ = phantom
    plain = write_image(img, tmp_path / "ct.nii", compress=False)
    pixdim = _nifti_field(plain, "pixdim")
    for axis, value, words in ((3, 0.0, "1 mm"), (1, 0.0, "1 mm"), (2, float("nan"), "1 mm"), (3, -2.5, "flips")):
        bad = list(pixdim)
        bad[axis] = value
        path = _patched_nifti(plain, tmp_path / f"pixdim{axis}.nii.gz", pixdim=bad)
        with pytest.raises(InputError, match=rf"voxel size along the {('first', 'second', 'third')[axis - 1]} voxel "
                                             rf"axis \(., pixdim\[{axis}\]\) is {value:g}") as e:
            read_ct(path)
        assert words in str(e.value) and "true spacing" in str(e.value) and str(path) in str(e.value)
    nrrd = write_image(img, tmp_path / "ct.nrrd", compress=False)
    text = nrrd.read_bytes()
    assert b"(0,0,2.5)" in text
    (tmp_path / "zero.nrrd").write_bytes(text.replace(b"(0,0,2.5)", b"(0,0,0)", 1))
    mha = write_image(img, tmp_path / "ct.mha", compress=False).read_bytes()
    import re
    (tmp_path / "zero.mha").write_bytes(re.sub(rb"ElementSpacing = [^\n]*", b"ElementSpacing = 0 1.4 2.5", mha))
    for name, axis in (("zero.nrrd", 3), ("zero.mha", 1)):
        with pytest.raises(InputError, match=f"voxel size of 0 along voxel axis {axis} .*true spacing"):
            read_ct(tmp_path / name)


def test_a_nifti_whose_sform_and_pixdim_disagree_is_refused_and_a_side_swap_is_noted(tmp_path, phantom):
    """SimpleITK measures with pixdim, nibabel and FSL with the sform: a file whose sform holds
    other voxel sizes is refused with both named; one whose qform and sform swap right and left
    is read as ITK (and Slicer) read it, with a note. Files where they agree to rounding read
    exactly as before."""
    img, _ = phantom
    plain = write_image(img, tmp_path / "ct.nii", compress=False)
    assert _nifti_field(plain, "sform_code") == (1,) and _nifti_field(plain, "qform_code") == (1,)
    x, y = _nifti_field(plain, "srow_x"), _nifti_field(plain, "srow_y")
    ref, ref_info = read_ct(plain)
    assert "nifti_note" not in ref_info
    for name, fields in (("sform_only", dict(qform_code=0, srow_x=(2 * x[0],) + x[1:], srow_y=(y[0], 2 * y[1]) + y[2:])),
                         ("both", dict(srow_x=(2 * x[0],) + x[1:]))):
        path = _patched_nifti(plain, tmp_path / f"{name}.nii.gz", **fields)
        with pytest.raises(InputError, match=r"two voxel sizes: pixdim 1\.4 x 1\.4 x 2\.5 mm, the sform \(sform_code "
                                             r"1\) 2\.8 x (1\.4|2\.8) x 2\.5 mm") as e:
            read_ct(path)
        assert "nibabel" in str(e.value) and f"the sform's are {4 if name == 'sform_only' else 2}x pixdim's" in str(e.value)
    # a sheared sform (slice axis tilted) has pixdim's voxel volume: positions, not volumes, differ
    sheared = _patched_nifti(plain, tmp_path / "sheared.nii", srow_y=y[:2] + (1.0,) + y[3:])
    with pytest.raises(InputError, match="sheared") as e:
        read_ct(sheared)
    assert "voxel volume is the same" in str(e.value) and "x pixdim's" not in str(e.value)
    # rounding in the sform (as float32 tools write it) is no disagreement
    rounded = _patched_nifti(plain, tmp_path / "rounded.nii", srow_x=(x[0] - 4e-4,) + x[1:])
    again, info = read_ct(rounded)
    assert again.GetSpacing() == ref.GetSpacing() and again.GetDirection() == ref.GetDirection()
    assert "nifti_note" not in info
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(again), sitk.GetArrayViewFromImage(ref))
    # the sform flips left-right against the qform (the same voxels, counted from the other side):
    # ITK takes the sform for sform_code 1, the qform for 2
    flip_x = (-x[0], x[1], x[2], x[3] + 127 * x[0])
    for code, read_as in ((1, "RPS"), (2, "LPS")):
        path = _patched_nifti(plain, tmp_path / f"flip{code}.nii", srow_x=flip_x, sform_code=code)
        flipped, info = read_ct(path)
        assert info["orientation"] == read_as and flipped.GetSpacing() == ref.GetSpacing()
        from ssalesionseg.io import read_notes
        note = info["nifti_note"]
        assert read_notes(info) == [note]
        assert "qform LPS, sform RPS; they swap right and left" in note and f"({read_as})" in note
        assert ("nibabel and FSL take the sform's (RPS)" in note) == (code == 2)


def test_voxel_sizes_no_chest_has_are_refused_before_the_lungs(tmp_path, phantom, tiny_ckpt, capsys):
    """A NIfTI in metres reads as 1400 mm voxels: the lungs were found, and the model's grid
    then asked for hundreds of GiB (a traceback, exit 1). Refused as input, exit status 2."""
    from ssalesionseg.io import validate_ct
    img, _ = phantom
    plain = write_image(img, tmp_path / "ct.nii", compress=False)
    metres = _patched_nifti(plain, tmp_path / "metres.nii.gz", xyzt_units=1 | 8)
    with pytest.raises(InputError, match=r"voxel size of 2500 mm .*no chest is that size — check the voxel spacing "
                                         r"/ units in the header"):
        read_ct(metres)
    assert cli.main(_segment_args(metres, tmp_path / "o", tiny_ckpt)) == 2
    err = capsys.readouterr().err
    assert "no chest is that size" in err and "Traceback" not in err
    wide = sitk.Image(img)
    wide.SetSpacing((8.0, 8.0, 2.5))   # 128 px: 1024 mm across
    with pytest.raises(InputError, match="axial extent of 1024 x 1024 mm"):
        validate_ct(wide)
    thick = sitk.Image(img)
    thick.SetSpacing((1.4, 1.4, 60.0))
    with pytest.raises(InputError, match="voxel size of 60 mm"):
        validate_ct(thick)
    big = sitk.Image(img)
    big.SetSpacing((7.5, 7.5, 7.5))   # 960 mm across, 7.5 mm voxels: a wide scan, not refused
    assert validate_ct(big).GetSize() == img.GetSize()


def _segment_args(src, out, ckpt, *more):
    return ["segment", str(src), "--out", str(out), "--checkpoint", str(ckpt), "--lungs", "classical",
            "--device", "cpu", *more]


def test_outputs_written_into_or_under_the_input_folder_can_be_rerun(tmp_path, tiny_ckpt, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    img, _ = synthetic_chest_ct(3, 128, spacing=SP)
    write_image(img, cases / "a.nii.gz")
    for out in (cases, cases / "results"):
        for _ in range(2):   # the second run finds the first run's outputs: skipped, not read as CTs
            assert cli.main(_segment_args(cases, out, tiny_ckpt, "--save-probability")) == 0
        assert outputs_complete(out, "a")
    assert [n for n, _ in cli.find_cases(cases, out=cases / "results")] == ["a"]
    assert "skipped" in capsys.readouterr().err


def test_outputs_of_another_input_are_neither_skipped_nor_replaced(tmp_path, tiny_ckpt, capsys):
    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "out"
    for folder, seed in ((first, 0), (second, 1)):
        folder.mkdir()
        img, _ = synthetic_chest_ct(3, 128, spacing=SP, seed=seed)
        write_image(img, folder / "a.nii.gz")
    assert cli.main(_segment_args(first, out, tiny_ckpt)) == 0
    stamp = (out / "a_stats.json").stat().st_mtime_ns
    write_image(synthetic_chest_ct(3, 128, spacing=SP, seed=2)[0], second / "b.nii.gz")
    assert cli.main(_segment_args(second, out, tiny_ckpt)) == 1   # a folder run: that case fails, b runs
    assert "made from another input" in capsys.readouterr().err and outputs_complete(out, "b")
    assert cli.main(_segment_args(second / "a.nii.gz", out, tiny_ckpt)) == 2   # one file: an error
    assert (out / "a_stats.json").stat().st_mtime_ns == stamp
    assert cli.main(_segment_args(first, out, tiny_ckpt)) == 0   # the same input again: skipped
    assert cli.main(_segment_args(second, out, tiny_ckpt, "--overwrite")) == 0
    info = json.loads((out / "a_stats.json").read_text())["info"]
    assert os.path.samefile(info["source"], second / "a.nii.gz")


def test_outputs_of_another_model_are_neither_skipped_nor_replaced(tmp_path, tiny_ckpt, capsys):
    """Segmenting again with a fine-tuned model into the old folder must not say 'skipped'
    and keep the old model's figures as if they were the new one's."""
    src, out = tmp_path / "ct", tmp_path / "out"
    src.mkdir()
    write_image(synthetic_chest_ct(3, 128, spacing=SP)[0], src / "a.nii.gz")
    assert cli.main(_segment_args(src, out, tiny_ckpt)) == 0
    stamp = (out / "a_stats.json").stat().st_mtime_ns
    torch.manual_seed(1)
    other = tmp_path / "finetuned.safetensors"
    save_checkpoint(other, SSANet(in_channels=2, num_classes=3, layers=(1, 1, 1, 1), width=(8, 16, 32, 64)),
                    {"preprocessing": read_meta(tiny_ckpt)["preprocessing"]})
    capsys.readouterr()
    assert cli.main(_segment_args(src / "a.nii.gz", out, other)) == 2
    err = capsys.readouterr().err
    assert "made with another model (tiny.safetensors" in err and "--overwrite" in err
    assert (out / "a_stats.json").stat().st_mtime_ns == stamp
    assert cli.main(_segment_args(src, out, tiny_ckpt)) == 0            # the same model: skipped
    assert "outputs exist, skipped" in capsys.readouterr().err
    assert cli.main(_segment_args(src, out, other, "--overwrite")) == 0
    info = json.loads((out / "a_stats.json").read_text())["info"]
    assert info["checkpoint"]["sha256"] == sha256_of(other)


def test_labelmaps_are_the_seg_nrrd_as_plain_nifti_and_a_rerun_asks_for_them(tmp_path, tiny_ckpt, capsys):
    """--labelmaps: <name>_lesions.nii.gz / _lungs.nii.gz hold what the .seg.nrrd holds (read
    back by slicerio), on the CT's grid; outputs written without them are not "done" for a run
    that asks for them, yet outputs of another input are still not replaced to add them; the
    labelmaps beside the input are not read back as cases."""
    import slicerio

    cases = tmp_path / "cases"
    cases.mkdir()
    img, _ = synthetic_chest_ct(3, 128, spacing=SP)
    write_image(img, cases / "a.nii.gz")
    assert cli.main(_segment_args(cases, cases, tiny_ckpt)) == 0
    assert not (cases / "a_lesions.nii.gz").exists()
    stamp = (cases / "a_stats.json").stat().st_mtime_ns
    assert cli.main(_segment_args(cases, cases, tiny_ckpt, "--labelmaps")) == 0   # redone, not skipped
    assert (cases / "a_stats.json").stat().st_mtime_ns != stamp
    assert outputs_complete(cases, "a", ("lesion_labelmap", "lung_labelmap"))
    lesions = sitk.ReadImage(str(cases / "a_lesions.nii.gz"))
    lungs = sitk.ReadImage(str(cases / "a_lungs.nii.gz"))
    for image in (lesions, lungs):
        assert image.GetSize() == img.GetSize()
        np.testing.assert_allclose(image.GetOrigin(), img.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(image.GetDirection(), img.GetDirection(), atol=1e-6)
    seg = slicerio.read_segmentation(str(cases / "a.seg.nrrd"))
    voxels = np.asarray(seg["voxels"])              # (layer, i, j, k)
    by_name = {s["name"]: voxels[int(s["layer"])] == int(s["labelValue"]) for s in seg["segments"]}
    les = sitk.GetArrayFromImage(lesions).transpose(2, 1, 0)
    lun = sitk.GetArrayFromImage(lungs).transpose(2, 1, 0)
    np.testing.assert_array_equal(les == 1, by_name["Ground-glass opacity"])
    np.testing.assert_array_equal(les == 2, by_name["Consolidation"])
    np.testing.assert_array_equal(lun == 1, by_name["Right lung"])
    np.testing.assert_array_equal(lun == 2, by_name["Left lung"])
    assert by_name["Right lung"].any() and by_name["Left lung"].any()
    capsys.readouterr()
    assert cli.main(_segment_args(cases, cases, tiny_ckpt, "--labelmaps")) == 0   # now complete: skipped
    assert "outputs exist, skipped" in capsys.readouterr().err
    assert [n for n, _ in cli.find_cases(cases, out=cases)] == ["a"]
    # another CT of the same name: its outputs lack the labelmaps, still they are not replaced
    other = tmp_path / "other"
    other.mkdir()
    write_image(synthetic_chest_ct(3, 128, spacing=SP, seed=3)[0], other / "b.nii.gz")
    out = tmp_path / "out"
    assert cli.main(_segment_args(other / "b.nii.gz", out, tiny_ckpt)) == 0
    stamp = (out / "b_stats.json").stat().st_mtime_ns
    write_image(img, tmp_path / "b.nii.gz")
    assert cli.main(_segment_args(tmp_path / "b.nii.gz", out, tiny_ckpt, "--labelmaps")) == 2
    assert "made from another input" in capsys.readouterr().err
    assert (out / "b_stats.json").stat().st_mtime_ns == stamp and not (out / "b_lesions.nii.gz").exists()


def test_stats_refuses_labels_that_are_not_the_classes(tmp_path, phantom, exact_result, capsys):
    img, _ = phantom
    ct_path = write_image(img, tmp_path / "ph.nii.gz")
    lab = sitk.GetArrayFromImage(exact_result.labels)
    for name, arr, classes, message in (
            ("mask255", (lab > 0).astype(np.uint8) * 255, "multiclass", "label values [255]"),
            ("the_ct", sitk.GetArrayFromImage(img).astype(np.int16), "multiclass", "the CT rather than the labels"),
            ("three", lab, "binary", "a 0/1/2 map is --classes multiclass"),
            # resampled with linear interpolation: 0.6 / 1.7 were truncated to 0 / 1 (GGO lost, consolidation
            # counted as GGO) without a word
            ("linear", np.where(lab == 1, 0.6, np.where(lab == 2, 1.7, 0.0)).astype(np.float32), "multiclass",
             "values that are not whole numbers (0.6, 1.7)"),
            ("minus", lab.astype(np.int16) - (lab == 0), "multiclass", "values [-1] in the labels"),   # was "[65535]"
            ("all_segments", np.where(lab == 0, 3, lab).astype(np.uint8), "multiclass", "give the .seg.nrrd")):
        path = write_image(image_like(arr, img), tmp_path / f"{name}.nii.gz")
        assert cli.main(["stats", "--ct", str(ct_path), "--labels", str(path), "--out", str(tmp_path / name),
                         "--classes", classes, "--lungs", "classical"]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / name / "ph_stats.json").exists()
    # lesion labels outside the lung mask: counted in the volume, said so
    outside = lab.copy()
    outside[:, :3, :3] = 1
    path = write_image(image_like(outside, img), tmp_path / "outside.nii.gz")
    assert cli.main(["stats", "--ct", str(ct_path), "--labels", str(path), "--out", str(tmp_path / "o"),
                     "--lungs", "classical"]) == 0
    st = json.loads((tmp_path / "o" / "ph_stats.json").read_text())
    assert st["lesions"]["infection"]["outside_lung_volume_ml"] > 0


def test_per_patient_subfolders_and_their_messages(tmp_path, phantom):
    img, _ = phantom
    root = tmp_path / "patients"
    for p in ("p1", "p2"):
        (root / p).mkdir(parents=True)
        write_image(img, root / p / "ct.nii.gz")
    assert [(n, c.name) for n, c in cli.find_cases(root)] == [("p1", "ct.nii.gz"), ("p2", "ct.nii.gz")]
    write_image(img, root / "p2" / "ct_followup.nii.gz")   # two CTs: not guessed, named instead
    cases = dict(cli.find_cases(root))
    assert cases["p2"].is_dir()
    with pytest.raises(InputError, match="holds none but 2 CT file"):
        read_ct(cases["p2"])


def test_folders_without_images_are_no_cases_and_images_deeper_are_found(tmp_path, phantom):
    """As nnU-Net and TotalSegmentator users have folders: an empty subfolder, or one of notes
    only, is no case (before: a failed case each) and one note names them; a case subfolder's
    one CT file or DICOM series is found however deep (before: patient1/series/ct.mha failed);
    a subfolder of images not read as a CT (a picture) or of several CTs still fails as a case."""
    import pydicom

    img, _ = phantom
    root = tmp_path / "in"
    root.mkdir()
    write_image(img, root / "a.nii.gz")
    (root / "empty").mkdir()
    (root / "docs" / "more").mkdir(parents=True)
    (root / "docs" / "notes.txt").write_text("scanned 2020-04-01")
    (root / "docs" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "docs" / "more" / "protocol.pdf").write_bytes(b"%PDF-1.4")
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "._a.nii.gz").write_bytes(b"\0\5\26\7")
    (root / "p1" / "series").mkdir(parents=True)
    write_image(img, root / "p1" / "series" / "ct.mha")
    _write_dicom_series(img, root / "p2" / "DICOM" / "ST000" / "SE000", "1.2.826.0.1.3680043.2.1125.6.1", "deep", "i")
    bare = root / "p3" / "export"   # a PACS export: files without a DICOM name or preamble
    _write_dicom_series(img, bare, "1.2.826.0.1.3680043.2.1125.6.2", "bare", "s")
    for f in sorted(bare.iterdir()):
        ds = pydicom.dcmread(str(f))
        ds.preamble = None
        ds.save_as(str(bare / f.stem), enforce_file_format=False)
        f.unlink()
    (root / "pics").mkdir()
    sitk.WriteImage(sitk.Cast(img[:, :, 0] > -500, sitk.sitkUInt8), str(root / "pics" / "slice.png"))
    (root / "runs" / "r1").mkdir(parents=True)   # an earlier run's outputs, --out in/runs/r1: passed over quietly
    for suffix in (".seg.nrrd", "_stats.json", "_stats.csv", "_overlay.png"):
        (root / "runs" / "r1" / f"a{suffix}").write_bytes(b"x")
    for sub in ("x", "y"):
        (root / "two" / sub).mkdir(parents=True)
        write_image(img, root / "two" / sub / "ct.nii.gz")
    notes = []
    cases = cli.find_cases(root, notes=notes)
    assert [n for n, _ in cases] == ["a", "p1", "p2", "p3", "pics", "two"]
    assert notes == [f"{root}: skipped 3 folders without images (no NIfTI/NRRD/MHA or DICOM file in them): "
                     "__MACOSX/, docs/, empty/"]
    cases = dict(cases)
    assert cases["p1"] == root / "p1" / "series" / "ct.mha"   # named after the case folder, as ever
    for name in ("p1", "p2", "p3"):
        ct, _ = read_ct(cases[name])
        assert ct.GetSize() == img.GetSize(), name
        np.testing.assert_allclose(ct.GetSpacing(), img.GetSpacing(), atol=1e-4)
    with pytest.raises(InputError, match=r"only 1 file\(s\) of a format not read as a CT \(slice\.png"):
        read_ct(cases["pics"])
    with pytest.raises(InputError, match=r"holds none but 2 CT file\(s\) \(x/ct\.nii\.gz, y/ct\.nii\.gz\)"):
        read_ct(cases["two"])
    # nothing but folders without images: nothing to process, and the message says what was passed over
    nothing = tmp_path / "nothing"
    (nothing / "empty").mkdir(parents=True)
    (nothing / "docs").mkdir()
    (nothing / "docs" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"no CT files .* or case folders found; skipped 2 folders without "
                                         r"images .*: docs/, empty/"):
        cli.find_cases(nothing)


def test_inputs_that_would_write_the_same_outputs_are_named(tmp_path, phantom):
    img, _ = phantom
    root = tmp_path / "in"
    root.mkdir()
    write_image(img, root / "a.nii.gz")
    (root / "a").mkdir()                                  # a case folder of the same name
    write_image(img, root / "a" / "ct.nii.gz")
    write_image(img, root / "B.nrrd")
    write_image(img, root / "b.mha")                      # one file with B on Windows and macOS
    with pytest.raises(InputError) as e:
        cli.find_cases(root)
    message = str(e.value)
    assert "a (a.nii.gz)" in message and f"a ({os.path.join('a', 'ct.nii.gz')})" in message
    assert "B (B.nrrd)" in message and "b (b.mha)" in message and "rename" in message


def test_find_cases_skips_hidden_files_and_knows_the_output_folder_however_spelt(tmp_path, phantom, monkeypatch):
    img, _ = phantom
    root = tmp_path / "cases"
    root.mkdir()
    write_image(img, root / "a.nii.gz")
    (root / "._a.nii.gz").write_bytes(b"\0\5\26\7")          # macOS AppleDouble file beside it
    (root / "out").mkdir()
    work = tmp_path / "w"
    work.mkdir()
    monkeypatch.chdir(work)
    assert [n for n, _ in cli.find_cases("../cases", out=root / "out")] == ["a"]
    assert [n for n, _ in cli.find_cases(root, out="../cases/out")] == ["a"]


def test_stats_keeps_existing_figures_unless_told(tmp_path, phantom, exact_result, capsys):
    img, _ = phantom
    ct_path = write_image(img, tmp_path / "ph.nii.gz")
    write_seg_nrrd(tmp_path / "ph.seg.nrrd", exact_result.labels, exact_result.lungs, exact_result.class_names)
    out = tmp_path / "out"
    out.mkdir()
    (out / "ph_stats.json").write_text('{"from": "segment"}')
    args = ["stats", "--ct", str(ct_path), "--labels", str(tmp_path / "ph.seg.nrrd"), "--out", str(out)]
    assert cli.main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert json.loads((out / "ph_stats.json").read_text()) == {"from": "segment"}
    assert cli.main(args + ["--overwrite"]) == 0
    info = json.loads((out / "ph_stats.json").read_text())["info"]
    assert os.path.samefile(info["source"], ct_path) and info["size"] == list(img.GetSize())


def test_segment_refuses_a_batch_size_below_one(tmp_path, tiny_ckpt, capsys):
    with pytest.raises(SystemExit):
        cli.main(_segment_args(tmp_path / "x.nii.gz", tmp_path / "o", tiny_ckpt, "--batch-size", "-3"))
    assert "must be 1 or more" in capsys.readouterr().err
    from ssanet.inference import Predictor
    with pytest.raises(ValueError, match="batch size"):
        Predictor(torch.nn.Identity(), "cpu", batch_size=0)


# ------------------------------------------------------------------- export-case

def test_export_case_turns_a_corrected_result_into_what_train_cases_reads(tmp_path, phantom, exact_result, capsys):
    """segment -> correct the .seg.nrrd -> export-case -> `train --cases` without Slicer: the
    files are read back by SimpleITK and by the training kit with the corrected labels."""
    from ssanet.data import load_training_cases

    img, truth = phantom
    ct_path = write_image(img, tmp_path / "ph.nii.gz")
    corrected = sitk.GetArrayFromImage(exact_result.labels).copy()
    corrected[corrected == 2] = 1                      # the reader calls the consolidation GGO
    write_seg_nrrd(tmp_path / "ph.seg.nrrd", image_like(corrected, img), exact_result.lungs,
                   exact_result.class_names)
    cases = tmp_path / "cases"
    args = ["export-case", "--ct", str(ct_path), "--labels", str(tmp_path / "ph.seg.nrrd"), "--out", str(cases)]
    assert cli.main(args) == 0
    assert "train --cases" in capsys.readouterr().out
    ct_back = sitk.ReadImage(str(cases / "images" / "ph.nii.gz"))
    labels_back = sitk.ReadImage(str(cases / "labels" / "ph.nii.gz"))
    lungs_back = sitk.ReadImage(str(cases / "lungs" / "ph.nii.gz"))
    assert ct_back.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ct_back), sitk.GetArrayFromImage(img))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels_back), corrected)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(lungs_back), sitk.GetArrayFromImage(exact_result.lungs))
    np.testing.assert_allclose(labels_back.GetOrigin(), img.GetOrigin(), atol=1e-4)
    samples = load_training_cases(cases, pixel_mm=0.7, fov=512)
    assert samples and all(s.image.shape == (512, 512) for s in samples)
    assert sum(int((s.label == 1).sum()) for s in samples) > 0 and not any((s.label == 2).any() for s in samples)
    # the case is not replaced without --overwrite, and nothing of it changes
    before = (cases / "labels" / "ph.nii.gz").read_bytes()
    from ssanet.cli import main as console_main   # the `ssalesionseg` command itself
    for entry in (cli.main, console_main):
        assert entry(args) == 2 and "already exists" in capsys.readouterr().err
    assert (cases / "labels" / "ph.nii.gz").read_bytes() == before
    # a labelmap without lungs, under another name, beside the case with lungs: training reads both
    write_image(exact_result.labels, tmp_path / "lab.nrrd")
    assert cli.main(["export-case", "--ct", str(ct_path), "--labels", str(tmp_path / "lab.nrrd"), "--out", str(cases),
                     "--name", "second read"]) == 0
    printed = capsys.readouterr().out
    assert "no lung mask" in printed
    # every file written is named (the class sidecar too)
    assert "3 files in" in printed and "images/second_read.nii.gz, labels/second_read.nii.gz, " \
        "labels/second_read.json" in printed
    assert not (cases / "lungs" / "second_read.nii.gz").exists()
    by_case = {}
    for s in load_training_cases(cases, pixel_mm=0.7, fov=512):
        by_case.setdefault(s.meta["volume"], []).append(s)
    assert sorted(by_case) == ["ph", "second_read"]
    assert sum(int((s.label == 2).sum()) for s in by_case["second_read"]) > 0


def test_export_case_refuses_what_training_would_refuse(tmp_path, phantom, exact_result, capsys):
    img, _ = phantom
    ct_path = write_image(img, tmp_path / "ph.nii.gz")
    lab = sitk.GetArrayFromImage(exact_result.labels)
    mask255 = write_image(image_like((lab > 0).astype(np.uint8) * 255, img), tmp_path / "m.nii.gz")
    rescaled = write_image(sitk.Cast(sitk.RescaleIntensity(img, 0, 255), sitk.sitkUInt8), tmp_path / "r.nii.gz")
    good = write_image(exact_result.labels, tmp_path / "lab.nrrd")
    for ct, labels, message in ((ct_path, mask255, "label values [255]"),
                                (rescaled, good, "Hounsfield")):
        out = tmp_path / f"out_{Path(labels).stem}_{Path(ct).stem}"
        assert cli.main(["export-case", "--ct", str(ct), "--labels", str(labels), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()   # refused before the folder is made


def test_corrections_made_in_place_are_never_replaced_unasked(tmp_path, tiny_ckpt, capsys):
    """A .seg.nrrd corrected where segment wrote it, or figures `stats` recomputed into the
    same folder, survive reruns that ask for more outputs; --overwrite still replaces them."""
    src = tmp_path / "ct.nii.gz"
    write_image(synthetic_chest_ct(3, 128, spacing=SP)[0], src)
    out = tmp_path / "out"
    assert cli.main(_segment_args(src, out, tiny_ckpt)) == 0
    seg = out / "ct.seg.nrrd"
    corrected = seg.read_bytes() + b"\n"      # any change to the file
    seg.write_bytes(corrected)
    assert cli.main(_segment_args(src, out, tiny_ckpt, "--labelmaps")) == 2
    assert "ct.seg.nrrd, not as segment wrote it" in capsys.readouterr().err
    assert seg.read_bytes() == corrected and not (out / "ct_lesions.nii.gz").exists()
    assert cli.main(_segment_args(src, out, tiny_ckpt)) == 0        # nothing asked for: skipped, kept
    assert seg.read_bytes() == corrected
    # ... and the skip says the figures are older than the correction, and how to renew them
    assert "ct.seg.nrrd was edited after its figures were computed: `ssalesionseg stats --ct" in capsys.readouterr().err
    # figures recomputed by stats: kept by a plain rerun, refused by one that would redo the case
    capsys.readouterr()
    assert cli.main(_segment_args(src, out, tiny_ckpt, "--overwrite")) == 0
    # --overwrite replaces the correction as asked, but keeps a copy and says so
    assert "ct.seg.nrrd was not as segment wrote it (corrected?); --overwrite replaced it, kept as ct.seg.nrrd.bak" \
        in capsys.readouterr().err
    assert (out / "ct.seg.nrrd.bak").read_bytes() == corrected and seg.read_bytes() != corrected
    assert sorted(p.name for p in out.glob("*.bak*")) == ["ct.seg.nrrd.bak"]   # unedited outputs: no copies
    assert cli.main(["stats", "--ct", str(src), "--labels", str(seg), "--out", str(out), "--overwrite"]) == 0
    stamp = (out / "ct_stats.json").stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(_segment_args(src, out, tiny_ckpt)) == 0
    assert "recomputed by `ssalesionseg stats` are kept, skipped" in capsys.readouterr().err
    assert cli.main(_segment_args(src, out, tiny_ckpt, "--save-probability")) == 2
    assert "recomputed by `ssalesionseg stats`" in capsys.readouterr().err
    assert (out / "ct_stats.json").stat().st_mtime_ns == stamp
    recomputed = (out / "ct_stats.json").read_bytes()
    assert cli.main(_segment_args(src, out, tiny_ckpt, "--save-probability", "--overwrite")) == 0
    assert json.loads((out / "ct_stats.json").read_text())["info"]["outputs_sha256"]["confidence"]
    assert (out / "ct_stats.json.bak").read_bytes() == recomputed    # the recomputed figures are kept too
    capsys.readouterr()
    assert cli.main(_segment_args(out, tmp_path / "o2", tiny_ckpt)) == 2   # copies are never cases
    assert "holds the outputs of an earlier run (ct_stats.json), not CTs" in capsys.readouterr().err


def test_labels_are_read_on_the_ct_grid_or_refused(tmp_path, phantom, exact_result, capsys):
    """A labelmap saved without the CT's geometry, or on another voxel grid, would be moved or
    lost by resampling: refused. A crop of the CT's grid (as Slicer saves segmentations) is
    copied exactly."""
    img, _ = phantom
    ct_path = write_image(img, tmp_path / "ph.nii.gz")
    lab = exact_result.labels
    bare = write_image(sitk.GetImageFromArray(sitk.GetArrayFromImage(lab)), tmp_path / "bare.nii.gz")
    finer = write_image(sitk.Resample(lab, [s * 2 for s in lab.GetSize()], sitk.Transform(), sitk.sitkNearestNeighbor,
                                      lab.GetOrigin(), [v / 2 for v in lab.GetSpacing()], lab.GetDirection()),
                        tmp_path / "finer.nii.gz")
    arr = sitk.GetArrayFromImage(lab)
    z, y, x = (np.flatnonzero(arr.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    crop = sitk.RegionOfInterest(lab, [int(x[-1] - x[0] + 1), int(y[-1] - y[0] + 1), int(z[-1] - z[0] + 1)],
                                 [int(x[0]), int(y[0]), int(z[0])])
    cropped = write_image(crop, tmp_path / "cropped.nii.gz")
    stretched = sitk.Image(lab)
    stretched.SetSpacing([v * 1.03 for v in lab.GetSpacing()])   # 3 % off: labels drift by pixels at the far edge
    stretched = write_image(stretched, tmp_path / "stretched.nii.gz")
    for labels, message in ((bare, "the labels have the CT's size but another position"),
                            (finer, "the labels are on another voxel grid"),
                            (stretched, "the labels have the CT's size but another position")):
        assert cli.main(["export-case", "--ct", str(ct_path), "--labels", str(labels), "--out",
                         str(tmp_path / "cases")]) == 2
        assert message in capsys.readouterr().err
    assert cli.main(["export-case", "--ct", str(ct_path), "--labels", str(cropped), "--out", str(tmp_path / "cases")]) == 0
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cases" / "labels" / "ph.nii.gz")))
    np.testing.assert_array_equal(back, arr)


def test_segments_are_known_by_terminology_and_id_and_the_rest_is_named(tmp_path, phantom, exact_result, capsys):
    """A GGO segment renamed in the Segment Editor keeps its terminology and ID: still GGO.
    A segment the reader does not know is named in a note instead of dropped silently."""
    import nrrd

    img, _ = phantom
    ct_path = write_image(img, tmp_path / "ph.nii.gz")
    seg = tmp_path / "ph.seg.nrrd"
    write_seg_nrrd(seg, exact_result.labels, exact_result.lungs, exact_result.class_names)
    data, header = nrrd.read(str(seg))
    header["Segment0_Name"] = "GGO (corrected)"
    header["Segment0_ID"] = "Segment_7"                    # and a new ID: the terminology alone tells
    header["Segment2_Name"] = "my notes"                   # a lung segment renamed to a free name
    header["Segment2_Tags"] = "Segmentation.Status:completed|"
    header["Segment2_ID"] = "Segment_8"
    nrrd.write(str(seg), data, header)
    assert cli.main(["stats", "--ct", str(ct_path), "--labels", str(seg), "--out", str(tmp_path / "s"),
                     "--lungs", "classical"]) == 0
    err = capsys.readouterr().err
    assert "segments not used" in err and "my notes" in err
    st = json.loads((tmp_path / "s" / "ph_stats.json").read_text())
    assert st["lesions"]["ggo"]["volume_ml"] == pytest.approx(exact_result.stats["lesions"]["ggo"]["volume_ml"])


def test_dicom_files_without_names_or_preamble_and_a_lung_mask_given_as_labels(tmp_path, phantom, exact_result, capsys):
    import pydicom

    img, _ = phantom
    series = tmp_path / "series"
    _write_dicom_series(img, series, "1.2.826.0.1.3680043.2.1125.5.1", "bare", "s")
    for f in sorted(series.iterdir()):      # as some PACS exports: no suffix, no preamble
        ds = pydicom.dcmread(str(f))
        ds.preamble = None
        ds.save_as(str(series / f.stem), enforce_file_format=False)
        f.unlink()
    assert cli.find_cases(series) == [("series", series)]
    assert read_ct(series)[0].GetSize() == img.GetSize()
    ct_path = write_image(img, tmp_path / "ph.nii.gz")
    lungs = write_image(exact_result.lungs, tmp_path / "ph_lungs.nii.gz")
    assert cli.main(["stats", "--ct", str(ct_path), "--labels", str(lungs), "--lung-mask", str(lungs),
                     "--out", str(tmp_path / "s")]) == 0
    assert "are the labels a lung mask" in capsys.readouterr().err


def test_reruns_keep_earlier_optional_outputs_and_a_failed_rename_leaves_no_mixed_case(tmp_path, tiny_ckpt,
                                                                                     monkeypatch, capsys):
    src = tmp_path / "ct.nii.gz"
    write_image(synthetic_chest_ct(3, 128, spacing=SP)[0], src)
    out = tmp_path / "out"
    assert cli.main(_segment_args(src, out, tiny_ckpt, "--labelmaps")) == 0
    edited = (out / "ct_lesions.nii.gz").read_bytes()
    # a rerun that adds the confidence map keeps the labelmaps, still known as that run's
    assert cli.main(_segment_args(src, out, tiny_ckpt, "--save-probability")) == 0
    assert (out / "ct_lesions.nii.gz").read_bytes() == edited
    assert outputs_complete(out, "ct", ("confidence", "lesion_labelmap", "lung_labelmap"))
    # the stats JSON written on Windows names its outputs with backslashes: still this case's
    stats = json.loads((out / "ct_stats.json").read_text())
    stats["info"]["outputs"] = {k: "C:\\\\Users\\\\me\\\\out\\\\" + os.path.basename(v)
                                for k, v in stats["info"]["outputs"].items()}
    (out / "ct_stats.json").write_text(json.dumps(stats))
    assert outputs_complete(out, "ct", ("lesion_labelmap",)) and not foreign_files(out, "ct", ("lesion_labelmap",))
    # a rename that fails part-way (the CSV open in a spreadsheet) removes the case's outputs
    real = os.replace

    def locked(a, b):
        if str(b).endswith("_stats.csv"):
            raise PermissionError(13, "Permission denied")
        return real(a, b)

    monkeypatch.setattr(os, "replace", locked)
    assert cli.main(_segment_args(src, out, tiny_ckpt, "--overwrite")) == 2
    assert "is it open in another program" in capsys.readouterr().err
    assert not [f for f in os.listdir(out) if f.startswith("ct.") or f.startswith("ct_")]
    monkeypatch.setattr(os, "replace", real)
    assert cli.main(_segment_args(src, out, tiny_ckpt)) == 0 and outputs_complete(out, "ct")


def test_labelmaps_in_another_orientation_of_the_ct_grid_and_rounded_slice_positions(tmp_path, phantom, exact_result):
    """A labelmap stored flipped or with the axes in another order holds the CT's own voxels:
    read exactly. DICOM positions rounded to 0.1 mm are not a missing slice."""
    from ssalesionseg.io import read_labelmap

    img, _ = phantom
    lab = exact_result.labels
    for moved in (sitk.Flip(lab, [True, True, False]), sitk.PermuteAxes(lab, [1, 0, 2]), sitk.DICOMOrient(lab, "RAS")):
        path = write_image(moved, tmp_path / "moved.nii.gz")
        np.testing.assert_array_equal(read_labelmap(path, img), sitk.GetArrayFromImage(lab))
    thin = sitk.Image(64, 64, 8, sitk.sitkInt16) - 1000
    thin.SetSpacing((0.7, 0.7, 0.625))
    folder = tmp_path / "thin"
    _write_dicom_series(thin, folder, "1.2.826.0.1.3680043.2.1125.6.1", "thin", "s")
    import pydicom
    for f in folder.iterdir():   # positions written to 0.1 mm, as some scanners do
        ds = pydicom.dcmread(str(f))
        ds.ImagePositionPatient = [round(float(v), 1) for v in ds.ImagePositionPatient]
        ds.save_as(str(f))
    reader = sitk.ImageSeriesReader()   # (an all-air image is no CT for read_ct: the check alone)
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    reader.MetaDataDictionaryArrayUpdateOn()
    from ssalesionseg.io import slice_spacing_problem
    assert slice_spacing_problem(reader, reader.Execute()) is None


def test_one_segment_for_both_lungs_is_the_lung_mask(tmp_path, phantom, exact_result, capsys):
    import nrrd

    img, _ = phantom
    ct_path = write_image(img, tmp_path / "ph.nii.gz")
    seg = tmp_path / "ph.seg.nrrd"
    both = image_like((sitk.GetArrayFromImage(exact_result.lungs) > 0).astype(np.uint8), img)
    write_seg_nrrd(seg, exact_result.labels, both, exact_result.class_names)   # one lung value: "Right lung"
    data, header = nrrd.read(str(seg))
    header["Segment2_Name"], header["Segment2_ID"] = "Lungs", "Segment_9"
    header["Segment2_Tags"] = "Segmentation.Status:completed|"
    nrrd.write(str(seg), data, header)
    assert cli.main(["stats", "--ct", str(ct_path), "--labels", str(seg), "--out", str(tmp_path / "s")]) == 0
    assert "segments not used" not in capsys.readouterr().err
    st = json.loads((tmp_path / "s" / "ph_stats.json").read_text())
    assert st["info"]["lung_method"] == "segmentation file"
    assert st["lungs"]["total"]["volume_ml"] == pytest.approx(exact_result.stats["lungs"]["total"]["volume_ml"])
    assert st["lungs"]["right"]["volume_ml"] > 0 and st["lungs"]["left"]["volume_ml"] > 0


def test_a_training_case_is_replaced_whole_or_not_at_all(tmp_path, phantom, exact_result, monkeypatch):
    from ssalesionseg import trainingcase

    img, _ = phantom
    folder = tmp_path / "cases"
    trainingcase.write_training_case(folder, "p1", img, exact_result.labels, exact_result.lungs)
    real = os.replace

    def full_disk(a, b):
        if "labels" in str(b) and str(b).endswith(".nii.gz"):
            raise OSError(28, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(trainingcase.os, "replace", full_disk)
    with pytest.raises(InputError, match="the case's files were removed"):
        infection = image_like((sitk.GetArrayFromImage(exact_result.labels) > 0).astype(np.uint8), img)
        trainingcase.write_training_case(folder, "p1", img, infection, None, overwrite=True,
                                         class_names=("background", "infection"))
    assert trainingcase.existing_case_files(folder, "p1") == []
    assert not [f for f in folder.rglob("*") if f.is_file()]       # no temporary file left either


def test_segment_roles_by_name_put_lesion_words_before_lung_words():
    from ssalesionseg.io import segment_role

    assert [segment_role({"name": n}) for n in (
        "Ground glass opacity right lung", "Consolidation, left lung", "GGO", "Right lung", "lungs", "Lung nodule",
        "left lung", "Segment_5")] == ["ggo", "consolidation", "ggo", "right_lung", "lung", None, "left_lung", None]


def test_stats_redraws_segments_overlay_and_records_its_notes(tmp_path, tiny_ckpt, capsys):
    """Figures recomputed into segment's folder come with an overlay of the labels they are
    recomputed from (not the old prediction), and the notes printed are in the JSON too."""
    img, truth = synthetic_chest_ct(3, 128, spacing=SP)
    src = write_image(img, tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    assert cli.main(_segment_args(src, out, tiny_ckpt, "--labelmaps")) == 0
    overlay = out / "ct_overlay.png"
    before = overlay.read_bytes()
    arr = truth["ggo"].astype(np.uint8) + 2 * truth["consolidation"].astype(np.uint8)
    arr[:, :20, :20] = 1          # a "lesion" in the air outside the body: noted
    corrected = sitk.GetImageFromArray(arr)
    corrected.CopyInformation(img)
    labels = write_image(corrected, tmp_path / "corrected.nii.gz")
    capsys.readouterr()
    assert cli.main(["stats", "--ct", str(src), "--labels", str(labels), "--lungs", "classical", "--out", str(out),
                     "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "ct_overlay.png, ct_lesions.nii.gz, ct_lungs.nii.gz, ct.seg.nrrd: rewritten from the corrected labels" in err
    assert overlay.read_bytes() != before
    st = json.loads((out / "ct_stats.json").read_text())
    assert "labels_made_by" not in st["info"]     # labels from elsewhere: not known to be this run's
    for key, path in (("overlay", overlay), ("lesion_labelmap", out / "ct_lesions.nii.gz"),
                      ("lung_labelmap", out / "ct_lungs.nii.gz"), ("segmentation", out / "ct.seg.nrrd")):
        assert st["info"]["outputs_sha256"][key] == sha256_of(path) and st["info"]["outputs"][key] == str(path)
    # the plain labelmap segment wrote is now the corrected one, not the old prediction
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "ct_lesions.nii.gz"))), arr)
    printed = [line[len("note: "):] for line in err.splitlines() if line.startswith("note: ")]
    assert printed and st["info"]["notices"] == printed
    # a rerun of segment keeps the recomputed figures and their overlay
    assert cli.main(_segment_args(src, out, tiny_ckpt, "--labelmaps")) == 0
    assert json.loads((out / "ct_stats.json").read_text()) == st
    # an overlay deleted since is drawn again (segment then found the case incomplete and refused it)
    overlay.unlink()
    assert cli.main(["stats", "--ct", str(src), "--labels", str(labels), "--lungs", "classical", "--out", str(out),
                     "--overwrite"]) == 0
    assert overlay.is_file() and cli.main(_segment_args(src, out, tiny_ckpt, "--labelmaps")) == 0
    assert "figures recomputed by `ssalesionseg stats` are kept" in capsys.readouterr().err
    # segment's own outputs stay listed as its: --overwrite keeps copies of the recomputed
    # figures only, not of the files nobody edited
    assert set(st["info"]["outputs"]) == {"segmentation", "overlay", "lesion_labelmap", "lung_labelmap"}
    from ssalesionseg.io import read_result_labels
    assert np.array_equal(read_result_labels(out / "ct.seg.nrrd", img).lesions, arr)   # the .seg.nrrd too
    seg_bytes = (out / "ct.seg.nrrd").read_bytes()
    (out / "ct.seg.nrrd").write_bytes(seg_bytes + b"\n")          # now corrected in place
    ct_bytes = src.read_bytes()
    write_image(sitk.Cast(sitk.RescaleIntensity(img, 0, 255), sitk.sitkUInt8), src)   # not HU: the case fails
    assert cli.main(_segment_args(src, out, tiny_ckpt, "--labelmaps", "--overwrite")) == 2
    assert not list(out.glob("*.bak*"))          # nothing was replaced, so no copies are left
    src.write_bytes(ct_bytes)
    capsys.readouterr()
    assert cli.main(_segment_args(src, out, tiny_ckpt, "--labelmaps", "--overwrite")) == 0
    assert sorted(p.name for p in out.glob("*.bak*")) == ["ct.seg.nrrd.bak", "ct_stats.csv.bak", "ct_stats.json.bak"]
    assert "kept as ct.seg.nrrd.bak" in capsys.readouterr().err
    # into a fresh folder there is no overlay to redraw, and none is made
    assert cli.main(["stats", "--ct", str(src), "--labels", str(labels), "--lungs", "classical",
                     "--out", str(tmp_path / "fresh")]) == 0
    assert not (tmp_path / "fresh" / "ct_overlay.png").exists()


def test_overlapping_lesion_segments_are_consolidation_in_any_order_and_every_segment_of_a_class_counts(phantom):
    """Where GGO and consolidation overlap (segments in separate layers, as the Segment Editor
    allows) the figures depended on the segments' order, and a second GGO segment was
    counted by the CLI but not by the Slicer module."""
    from ssalesionseg.io import result_labels_from_segments

    img, _ = phantom
    shape = img.GetSize()[::-1]
    ggo, cons, extra = (np.zeros(shape, bool) for _ in range(3))
    ggo[1, 20:40, 20:40] = True
    cons[1, 30:50, 30:50] = True       # 10 x 10 voxels under the GGO
    extra[2, 5:7, 5:9] = True          # a second segment named GGO
    lungs = np.zeros(shape, bool)
    lungs[:, 10:60, 10:60] = True
    segs = [("GGO", "ggo", ggo), ("Consolidation", "consolidation", cons), ("GGO", "ggo", extra),
            ("Right lung", "right_lung", lungs), ("Nodule", None, cons)]
    a = result_labels_from_segments(segs, img)
    b = result_labels_from_segments(segs[::-1], img)
    np.testing.assert_array_equal(a.lesions, b.lesions)
    assert np.count_nonzero(a.lesions == 2) == 400 and np.count_nonzero(a.lesions == 1) == 400 - 100 + 8
    ml = 100 * np.prod(img.GetSpacing()) / 1000
    assert f"overlap in 100 voxels ({ml:.1f} mL): counted as consolidation" in a.notes[0]
    assert a.ignored == ["Nodule"] and "segments not used" in a.notes[1] and a.lungs is not None
    c = result_labels_from_segments(segs + [("Infection", "infection", extra)], img)
    assert c.ignored == ["Nodule", "Infection"] and "infection segment(s) Infection not used" in c.notes[2]


def test_export_case_puts_lesions_painted_past_the_lung_edge_into_the_lung_mask(tmp_path, phantom, exact_result,
                                                                                capsys):
    """Training blanks the CT outside the lung mask: a consolidation painted past the lung
    mask's edge was exported as labels on black input, without a word."""
    from ssalesionseg.trainingcase import lungs_covering_lesions

    img, _ = phantom
    ct_path = write_image(img, tmp_path / "ph.nii.gz")
    lungs = sitk.GetArrayFromImage(exact_result.lungs)
    lab = sitk.GetArrayFromImage(exact_result.labels).copy()
    z, y, x = np.nonzero(lungs == 2)
    zz, yy, xx = z[0], y[0] - 1, x[0]          # just outside the left lung, in its slice
    assert lungs[zz, yy, xx] == 0
    lab[zz, yy - 2:yy + 1, xx] = 2
    labels = write_image(image_like(lab, img), tmp_path / "labels.nii.gz")
    lung_file = write_image(image_like(lungs.astype(np.uint8), img), tmp_path / "lungs.nii.gz")
    assert cli.main(["export-case", "--ct", str(ct_path), "--labels", str(labels), "--lung-mask", str(lung_file),
                     "--out", str(tmp_path / "cases")]) == 0
    err = capsys.readouterr().err
    assert "(3 of " in err and "lay outside the lung mask: the exported lung mask of case 'ph' includes them" in err
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cases" / "lungs" / "ph.nii.gz")))
    assert np.all(back[lab > 0] > 0) and back[zz, yy, xx] == 2          # the side of the nearest lung voxel
    np.testing.assert_array_equal(back[lungs > 0], lungs[lungs > 0])     # the rest as it was
    # in a slice without lung: the side of the lung whose mean column is nearer
    both = next(k for k in range(len(lungs)) if {1, 2} <= set(np.unique(lungs[k])))
    one_slice = np.zeros_like(lungs)
    one_slice[both] = lungs[both]
    other = (both + 1) % len(lungs)
    only = np.zeros_like(lab)
    for side in (1, 2):
        only[other, 5, int(np.nonzero(lungs[both] == side)[1].mean())] = 1
    out, added = lungs_covering_lesions(one_slice, only)
    assert added == 2 and sorted(out[other][only[other] > 0]) == [1, 2]
    assert [out[other, 5, int(np.nonzero(lungs[both] == v)[1].mean())] for v in (1, 2)] == [1, 2]


def test_stats_csv_spells_out_lists_of_records(tmp_path):
    """An ensemble's members were written into the CSV as a Python dict repr."""
    import csv
    from ssalesionseg.stats import write_stats

    stats = {"info": {"checkpoint": {"members": [{"name": "a", "sha256": "1f"}, {"name": "b", "sha256": "2e"}]},
                      "size": [3, 4, 5]},
             "voxel_volume_ml": 0.00421875, "lungs": {"right": {"volume_ml": 3554.2420312500003}},
             "severity": {"total": 4, "max": 10}}
    write_stats(stats, tmp_path / "s.json", tmp_path / "s.csv")
    rows = dict(list(csv.reader(open(tmp_path / "s.csv")))[1:])
    assert rows["info.checkpoint.members.1.name"] == "b" and rows["info.checkpoint.members.0.sha256"] == "1f"
    assert rows["info.size"] == "3 4 5" and not any("{" in v for v in rows.values())
    # floats to 7 significant digits (the JSON keeps them whole), integers as they are
    assert rows["lungs.right.volume_ml"] == "3554.242" and rows["voxel_volume_ml"] == "0.00421875"
    assert rows["severity.total"] == "4"
    assert json.loads((tmp_path / "s.json").read_text())["lungs"]["right"]["volume_ml"] == 3554.2420312500003


def test_a_rerun_with_other_settings_is_refused_not_skipped(tmp_path, tiny_ckpt, capsys):
    """Outputs made with other settings were skipped as done, keeping the old figures."""
    img, _ = synthetic_chest_ct(3, 96, spacing=SP)
    src = write_image(img, tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    assert cli.main(_segment_args(src, out, tiny_ckpt, "--no-flip-tta")) == 0
    before = (out / "ct_stats.json").read_bytes()
    capsys.readouterr()
    for extra, said in ((["--flip-tta"], "flip TTA: off -> on"), (["--min-lesion-mm2", "25"], "--min-lesion-mm2: 0 -> 25"),
                        (["--no-bf16"], None), (["--lungs", "lungmask"], "lungs: classical -> lungmask")):
        rc = cli.main(_segment_args(src, out, tiny_ckpt, *extra))
        err = capsys.readouterr().err
        if said is None:   # float32 recorded where no native bf16: nothing differs
            recorded = json.loads(before)["info"]["precision"]
            assert (rc == 2 and "precision: bfloat16 -> float32" in err) if recorded == "bfloat16" else rc == 0
            continue
        assert rc == 2 and f"made with other settings ({said})" in err, (extra, err)
    # the same settings spelt out, or left to the defaults: skipped as before
    assert cli.main(_segment_args(src, out, tiny_ckpt, "--no-flip-tta", "--min-lesion-mm2", "0")) == 0
    assert cli.main(_segment_args(src, out, tiny_ckpt)) == 0 and "skipped" in capsys.readouterr().err
    assert (out / "ct_stats.json").read_bytes() == before
    assert cli.main(_segment_args(src, out, tiny_ckpt, "--flip-tta", "--overwrite")) == 0
    assert json.loads((out / "ct_stats.json").read_text())["info"]["flip_tta"] is True


def test_case_names_keep_letters_of_any_script():
    from ssalesionseg.trainingcase import safe_case_name

    assert safe_case_name("Müller ç/1") == "Müller_ç_1" and safe_case_name("..") == "case"


def test_stats_notes_a_segmentation_made_from_another_ct(tmp_path, tiny_ckpt, capsys):
    """Another patient's CT on the same grid was accepted without a word."""
    img, _ = synthetic_chest_ct(3, 96, spacing=SP)
    a = write_image(img, tmp_path / "a.nii.gz")
    b = write_image(sitk.Flip(img, [True, False, False]), tmp_path / "b.nii.gz")   # same grid, other content
    out = tmp_path / "out"
    assert cli.main(_segment_args(a, out, tiny_ckpt)) == 0
    capsys.readouterr()
    for ct, noted in ((a, False), (b, True)):
        assert cli.main(["stats", "--ct", str(ct), "--labels", str(out / "a.seg.nrrd"), "--lungs", "classical",
                         "--out", str(tmp_path / f"s_{ct.name}")]) == 0
        err = capsys.readouterr().err
        assert (f"a.seg.nrrd goes with figures of {a} (its stats JSON), not of {b}: is it this CT's "
                "segmentation?" in err) == noted


def test_a_batch_says_a_note_once_and_each_case_keeps_it(tmp_path, tiny_ckpt, capsys):
    """The same note (e.g. 'no lungmask weights') was printed for every case of a batch."""
    cases = tmp_path / "cases"
    cases.mkdir()
    img, _ = synthetic_chest_ct(3, 96, spacing=SP)
    for n in ("p1", "p2"):
        write_image(img, cases / f"{n}.nii.gz")
    assert cli.main(_segment_args(cases, tmp_path / "out", tiny_ckpt)) == 0
    err = capsys.readouterr().err
    assert err.count("note: the lungs reach the top and bottom slices") == 1
    assert "p2: note: as for p1 (the lungs reach the top and bottom slices" in err   # each case still says so
    assert "2 cases: 2 segmented, 0 skipped, 0 failed" in err
    # one row per case for a spreadsheet, figures as in each case's JSON
    import csv
    rows = list(csv.DictReader(open(tmp_path / "out" / "ssalesionseg_summary.csv", encoding="utf-8")))
    assert [r["case"] for r in rows] == ["p1", "p2"] and "ssalesionseg_summary.csv" in err
    st = json.loads((tmp_path / "out" / "p1_stats.json").read_text())
    assert float(rows[0]["ggo_ml"]) == round(st["lesions"]["ggo"]["volume_ml"], 1)
    assert int(rows[0]["severity_total"]) == st["severity"]["total"] and "lungs reach the top" in rows[0]["notes"]
    for n in ("p1", "p2"):
        notices = json.loads((tmp_path / "out" / f"{n}_stats.json").read_text())["info"]["notices"]
        assert any(x.startswith("the lungs reach the top and bottom slices") for x in notices)


def test_lungs_cut_by_the_field_of_view_are_noted():
    """A CT cropped in-plane (Crop Volume, a tight reconstruction) cuts the lungs at the
    image's sides: the figures then describe the part in view, and the note says where."""
    from ssalesionseg.stats import lung_coverage_note

    arr = np.zeros((5, 40, 50), np.uint8)
    arr[1:4, 10:30, 5:20] = 1
    arr[1:4, 10:30, 30:45] = 2
    lungs = sitk.GetImageFromArray(arr)
    lungs.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))    # RAS-stored: the engine reads it in LPS
    assert lung_coverage_note(lungs) is None
    arr[2, 12:20, 0:20] = 1                            # the right lung runs into the array's first column (LPS: right)
    arr[1:3, 25:40, 35:40] = 2                         # the left lung into the last row (back)
    lungs = sitk.GetImageFromArray(arr)
    note = lung_coverage_note(lungs)
    assert "run into the image's back, right edges on 2 slices" in note and "top" not in note
    lungs.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))    # the same array stored RAS: named in the patient's terms
    assert "run into the image's front, left edges on 2 slices" in lung_coverage_note(lungs)
    assert note.endswith("describe the part scanned, not the whole lungs")
    # lungs running into padding around the scanned field, a frame whose width changes from
    # slice to slice (the bundled sample's): seen with the CT, not from the lung mask alone
    lungs2 = np.zeros((5, 40, 50), np.uint8)
    lungs2[1:4, 10:30, 8:20] = 1
    ct = np.full((5, 40, 50), -850.0, np.float32)
    for z in range(5):
        ct[z, :, :6 + z % 2] = -1250.0                 # padding at the patient's right, 6-7 columns wide
    ct_img, lungs_img = sitk.GetImageFromArray(ct), sitk.GetImageFromArray(lungs2)
    assert lung_coverage_note(lungs_img) is None
    lungs2[2, 12:20, 6:8] = 1                          # the right lung reaches the padding on one slice
    note = lung_coverage_note(sitk.GetImageFromArray(lungs2), ct_img)
    assert "the lungs run into the edge of the scanned field (padding around it) on 1 slice" in note
    arr[-1, 15, 15] = 1
    note = lung_coverage_note(sitk.GetImageFromArray(arr))
    assert note.startswith("the lungs reach the top (superior) slice of the scan (5 slices): they go on beyond it; "
                           "the lungs run into")


def test_lungs_far_smaller_than_a_chests_are_noted():
    """A lung step that lost most of the lungs (a cut field of view before it was handled,
    a wrong window) gave figures of a few fragments without a word."""
    from ssalesionseg.stats import lung_size_note

    arr = np.zeros((12, 100, 100), np.uint8)
    arr[1:11, 40:50, 20:30] = 1                      # 10 x 10 px of 1 mm: 1 cm² a slice, over 75 mm
    lungs = sitk.GetImageFromArray(arr)
    lungs.SetSpacing((1.0, 1.0, 7.5))
    note = lung_size_note(lungs)
    assert note.startswith("the lungs found average 1 cm² a slice over 75 mm of slices (8 mL)")
    arr[1:11, 20:80, 10:90] = 2                      # 48 cm² a slice more: a plausible pair of lungs
    big = sitk.GetImageFromArray(arr)
    big.SetSpacing((1.0, 1.0, 7.5))
    assert lung_size_note(big) is None
    lungs.SetSpacing((1.0, 1.0, 2.0))                # the same fragment over 20 mm: too short to judge
    assert lung_size_note(lungs) is None


def test_a_cut_off_metaimage_is_refused_as_cut_off(tmp_path, capfd):
    """MetaIO printed its own 'data not read completely' lines on a cut-off .mha, then ITK
    failed with 'File cannot be read'; the header's byte count now says what is wrong."""
    img = sitk.GetImageFromArray(np.full((6, 40, 40), -1000, np.int16))
    for name, compress in (("plain.mha", False), ("packed.mha", True), ("split.mhd", False)):
        whole = tmp_path / name
        sitk.WriteImage(img, str(whole), compress)
        data = whole.with_suffix(".raw") if name.endswith(".mhd") else whole
        assert read_ct(whole)[0].GetSize() == (40, 40, 6)
        blob = data.read_bytes()
        data.write_bytes(blob[:len(blob) - 100])
        capfd.readouterr()
        with pytest.raises(InputError, match="the file is cut off — its header announces"):
            read_ct(whole)
        assert "MetaImage" not in capfd.readouterr().err


def test_stats_on_a_corrected_labelmap_in_place_keeps_the_folder_one_case(tmp_path, tiny_ckpt, capsys):
    """A correction made in segment's plain labelmap (<name>_lesions.nii.gz) and recomputed
    into that folder left the .seg.nrrd with the old prediction — the file Slicer opens and
    the one exported for training — and dropped the record of the model that made the labels."""
    from ssalesionseg.io import read_result_labels

    img, truth = synthetic_chest_ct(3, 128, spacing=SP)
    src = write_image(img, tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    assert cli.main(_segment_args(src, out, tiny_ckpt, "--labelmaps")) == 0
    made = json.loads((out / "ct_stats.json").read_text())["info"]
    lesions = out / "ct_lesions.nii.gz"
    arr = truth["ggo"].astype(np.uint8) + 2 * truth["consolidation"].astype(np.uint8)
    corrected = sitk.GetImageFromArray(arr)
    corrected.CopyInformation(img)
    write_image(corrected, lesions)
    capsys.readouterr()
    assert cli.main(["stats", "--ct", str(src), "--labels", str(lesions), "--lungs", "classical", "--out", str(out),
                     "--overwrite"]) == 0
    assert "ct.seg.nrrd" in capsys.readouterr().err
    assert np.array_equal(read_result_labels(out / "ct.seg.nrrd", img).lesions, arr)
    info = json.loads((out / "ct_stats.json").read_text())["info"]
    assert info["labels_made_by"]["checkpoint"]["sha256"] == made["checkpoint"]["sha256"]
    assert info["labels_made_by"]["lung_method"] == made["lung_method"]
    # a second correction keeps that record (the figures' JSON is now stats', not segment's)
    assert cli.main(["stats", "--ct", str(src), "--labels", str(lesions), "--lungs", "classical", "--out", str(out),
                     "--overwrite"]) == 0
    again = json.loads((out / "ct_stats.json").read_text())["info"]
    assert again["labels_made_by"] == info["labels_made_by"]
    # a .seg.nrrd edited by hand meanwhile is left alone, and said to differ
    seg = out / "ct.seg.nrrd"
    seg.write_bytes(seg.read_bytes() + b"\n")
    edited = seg.read_bytes()
    capsys.readouterr()
    assert cli.main(["stats", "--ct", str(src), "--labels", str(lesions), "--lungs", "classical", "--out", str(out),
                     "--overwrite"]) == 0
    assert "ct.seg.nrrd was edited since segment wrote it and is not the labels given" in capsys.readouterr().err
    assert seg.read_bytes() == edited


def test_overlay_numbers_slices_as_the_files_own_viewer_does():
    """The overlay's "slice N" was the 0-based index after reorienting to LPS: on a CT stored
    head-first it named slice 2 what the file's viewer calls slice 22."""
    from ssalesionseg.geometry import to_lps
    from ssalesionseg.report import file_slice

    img = sitk.Image(20, 20, 24, sitk.sitkFloat32)
    img.SetSpacing((1.0, 1.0, 2.5))
    assert [file_slice(img, to_lps(img), z) for z in (0, 2, 23)] == [(0, 24), (2, 24), (23, 24)]
    head_first = sitk.Flip(img, [False, False, True])            # stored superior -> inferior
    assert [file_slice(head_first, to_lps(head_first), z) for z in (0, 2, 23)] == [(23, 24), (21, 24), (0, 24)]
    coronal = sitk.PermuteAxes(img, [0, 2, 1])                    # slice axis stored second
    assert file_slice(coronal, to_lps(coronal), 5) == (5, 24)


def test_stats_on_a_runs_lesion_labelmap_keeps_that_runs_lungs(tmp_path, phantom, truth_lungs_path, tiny_ckpt, capsys):
    """The plain-labelmap correction loop: segment --lung-mask ... --labelmaps, correct
    <name>_lesions.nii.gz, stats --labels it. The lungs are the run's (<name>_lungs.nii.gz, else
    the .seg.nrrd's lung segments), not new classical ones that replace them in the rewritten
    _lungs.nii.gz / .seg.nrrd and change the percentages."""
    import slicerio

    img, truth = phantom
    ct = tmp_path / "p.nii.gz"
    write_image(img, ct)
    out = tmp_path / "out"
    assert cli.main(["segment", str(ct), "--out", str(out), "--checkpoint", str(tiny_ckpt), "--lung-mask",
                     str(truth_lungs_path), "--device", "cpu", "--labelmaps"]) == 0
    true_lungs = truth["right_lung"].astype(np.uint8) + 2 * truth["left_lung"].astype(np.uint8)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "p_lungs.nii.gz"))), true_lungs)
    corrected = truth["ggo"].astype(np.uint8) + 2 * truth["consolidation"].astype(np.uint8)   # the researcher's fix
    write_image(image_like(corrected, img), out / "p_lesions.nii.gz")
    capsys.readouterr()
    assert cli.main(["stats", "--ct", str(ct), "--labels", str(out / "p_lesions.nii.gz"), "--out", str(out),
                     "--overwrite"]) == 0
    err = capsys.readouterr().err
    stats = json.loads((out / "p_stats.json").read_text())
    n_lung = int(np.count_nonzero(true_lungs))
    assert stats["lungs"]["total"]["volume_ml"] == pytest.approx(n_lung * np.prod(SP) / 1000, rel=1e-6)
    assert stats["lesions"]["infection"]["percent_of_lung"] == pytest.approx(
        100 * np.count_nonzero((corrected > 0) & (true_lungs > 0)) / n_lung, rel=1e-9)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "p_lungs.nii.gz"))), true_lungs)
    seg = slicerio.read_segmentation(str(out / "p.seg.nrrd"))   # rewritten from the corrected labels
    voxels = np.asarray(seg["voxels"])
    by_name = {s["name"]: (voxels[int(s["layer"])] == int(s["labelValue"])).transpose(2, 1, 0) for s in seg["segments"]}
    assert np.array_equal(by_name["Right lung"], truth["right_lung"])
    assert np.array_equal(by_name["Consolidation"], truth["consolidation"])
    assert "lungs from p_lungs.nii.gz" in err
    # without the lung labelmap, the .seg.nrrd's lung segments are the run's lungs
    (out / "p_lungs.nii.gz").unlink()
    assert cli.main(["stats", "--ct", str(ct), "--labels", str(out / "p_lesions.nii.gz"), "--out",
                     str(tmp_path / "o2")]) == 0
    assert "lungs from p.seg.nrrd" in capsys.readouterr().err
    again = json.loads((tmp_path / "o2" / "p_stats.json").read_text())
    assert again["lungs"]["total"]["volume_ml"] == stats["lungs"]["total"]["volume_ml"]


def test_export_case_of_a_runs_lesion_labelmap_exports_that_runs_lungs(tmp_path, phantom, truth_lungs_path, tiny_ckpt,
                                                                        capsys):
    """export-case --labels <name>_lesions.nii.gz (the plain-labelmap correction loop) exported no
    lung mask, so training found classical lungs instead of the run's (here --lung-mask's). It now
    takes the run's lungs as stats does: <name>_lungs.nii.gz, else the .seg.nrrd's lung segments."""
    from ssalesionseg.trainingcase import lungs_covering_lesions

    img, truth = phantom
    ct = write_image(img, tmp_path / "p.nii.gz")
    out = tmp_path / "out"
    assert cli.main(["segment", str(ct), "--out", str(out), "--checkpoint", str(tiny_ckpt), "--lung-mask",
                     str(truth_lungs_path), "--device", "cpu", "--labelmaps"]) == 0
    true_lungs = truth["right_lung"].astype(np.uint8) + 2 * truth["left_lung"].astype(np.uint8)
    corrected = truth["ggo"].astype(np.uint8) + 2 * truth["consolidation"].astype(np.uint8)
    write_image(image_like(corrected, img), out / "p_lesions.nii.gz")
    expected, _ = lungs_covering_lesions(true_lungs, corrected)
    for cases, lung_name in ((tmp_path / "c1", "p_lungs.nii.gz"), (tmp_path / "c2", "p.seg.nrrd")):
        if lung_name == "p.seg.nrrd":
            (out / "p_lungs.nii.gz").unlink()
        capsys.readouterr()
        assert cli.main(["export-case", "--ct", str(ct), "--labels", str(out / "p_lesions.nii.gz"),
                         "--out", str(cases)]) == 0
        assert f"lungs from {lung_name}" in capsys.readouterr().err
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(cases / "lungs" / "p.nii.gz"))), expected)
    # --lung-mask still wins over the run's lungs
    other = np.zeros_like(true_lungs)
    other[:, :, : other.shape[2] // 2] = 1
    lung_file = write_image(image_like(other, img), tmp_path / "other_lungs.nii.gz")
    assert cli.main(["export-case", "--ct", str(ct), "--labels", str(out / "p_lesions.nii.gz"), "--lung-mask",
                     str(lung_file), "--out", str(tmp_path / "c3")]) == 0
    assert "lungs from" not in capsys.readouterr().err
    saved = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "c3" / "lungs" / "p.nii.gz")))
    assert np.array_equal(saved > 0, lungs_covering_lesions(other, corrected)[0] > 0)   # (split into sides)


def test_export_case_and_stats_refuse_segments_lung_labelmap_as_the_lesions(tmp_path, phantom, exact_result, capsys):
    """<name>_lungs.nii.gz given as --labels (the two plain labelmaps side by side) would be read as
    1 GGO / 2 consolidation: export-case wrote a training case teaching the right lung as GGO and the
    left as consolidation. Refused, naming the right file; a renamed copy of a lung mask is noted."""
    img, _ = phantom
    out = tmp_path / "out"
    out.mkdir()
    ct = write_image(img, tmp_path / "ph.nii.gz")
    write_image(exact_result.lungs, out / "ph_lungs.nii.gz")
    write_image(exact_result.labels, out / "ph_lesions.nii.gz")
    (out / "ph_stats.json").write_text(json.dumps({"info": {}}))
    for argv in (["export-case", "--ct", str(ct), "--labels", str(out / "ph_lungs.nii.gz"), "--out", str(tmp_path / "cases")],
                 ["stats", "--ct", str(ct), "--labels", str(out / "ph_lungs.nii.gz"), "--out", str(tmp_path / "s")]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "lung labelmap" in err and "ph_lesions.nii.gz" in err
    assert not (tmp_path / "cases").exists() and not (tmp_path / "s").exists()   # no empty folder left either
    copy = write_image(exact_result.lungs, tmp_path / "edited.nii.gz")   # not recognisable by name
    assert cli.main(["export-case", "--ct", str(ct), "--labels", str(copy), "--lung-mask", str(out / "ph_lungs.nii.gz"),
                     "--out", str(tmp_path / "cases")]) == 0
    assert "are the labels a lung mask" in capsys.readouterr().err
    # the right file exports as before
    assert cli.main(["export-case", "--ct", str(ct), "--labels", str(out / "ph_lesions.nii.gz"), "--out",
                     str(tmp_path / "cases"), "--name", "good"]) == 0
    assert "lung mask" not in capsys.readouterr().err
    saved = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cases" / "labels" / "good.nii.gz")))
    assert np.array_equal(saved, sitk.GetArrayFromImage(exact_result.labels))


def test_a_ct_turned_upside_down_by_its_header_is_noted(tmp_path):
    """The real sample's rows flipped with the header kept (an array saved without its
    direction): the spine now lies in front of the lungs, and segment (and stats) say the
    orientation looks flipped. The sample itself, and the same flip stated by the header (read correctly
    through LPS), give no such note."""
    from ssalesionseg.cli import SAMPLE_CT
    from ssalesionseg.geometry import ap_flip_note
    from ssalesionseg.stats import figure_notes

    ct = sitk.ReadImage(str(SAMPLE_CT))[:, :, 8:14]
    flipped = image_like(sitk.GetArrayFromImage(ct)[:, ::-1, :].copy(), ct)
    said = "anterior and posterior look flipped"
    notes = {}
    for what, img in (("sample", ct), ("flipped", flipped), ("header", sitk.Flip(ct, [False, True, False]))):
        res = segment_image(img, model=(ThresholdNet(), exact_meta()), lungs="classical", device="cpu")
        notes[what] = [n for n in res.notices if said in n]
        assert (ap_flip_note(img, res.lungs) is not None) == bool(notes[what])
        # stats and Slicer's Recompute say it too (figure_notes with the CT)
        assert any(said in n for n in figure_notes(res.stats, res.lungs, img)) == bool(notes[what])
    assert notes["sample"] == [] and notes["header"] == [] and len(notes["flipped"]) == 1


def _summary_rows(out):
    import csv
    with open(out / cli.BATCH_SUMMARY, encoding="utf-8", newline="") as f:
        return {r["case"]: r for r in csv.DictReader(f)}


def test_the_batch_summary_has_every_case_with_its_status_also_after_ctrl_c(tmp_path, tiny_ckpt, capsys):
    """ssalesionseg_summary.csv held only the cases with figures: a failed case was simply not
    in it (nor written at all when every case failed or was skipped), and Ctrl-C left no summary."""
    import signal
    import subprocess
    import sys

    cases = tmp_path / "my cases"
    cases.mkdir()
    img, _ = synthetic_chest_ct(3, 96, spacing=SP)
    for n in ("a", "b"):
        write_image(img, cases / f"{n}.nii.gz")
    (cases / "c.nii.gz").write_bytes(b"not an image")
    out = tmp_path / "out"
    # Ctrl-C while the second case is being segmented
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "ssanet.cli", *_segment_args(cases, out, tiny_ckpt)],
                         stderr=subprocess.PIPE, text=True, env=env)
    err = []
    for line in p.stderr:
        err.append(line)
        if line.startswith("[2/3] b: lungs"):
            p.send_signal(signal.SIGINT)
    assert p.wait(timeout=300) == 130, "".join(err)
    rows = _summary_rows(out)
    assert [(n, r["status"]) for n, r in rows.items()] == [("a", "segmented"), ("b", "not run"), ("c", "not run")]
    assert rows["a"]["ggo_ml"] != "" and rows["b"]["ggo_ml"] == "" and "interrupted" in rows["b"]["reason"]
    assert rows["a"]["input"] == str(cases / "a.nii.gz")

    # the rerun: a is skipped, b segmented, c fails with its reason -- every case has a row
    assert cli.main(_segment_args(cases, out, tiny_ckpt)) == 1
    rows = _summary_rows(out)
    assert [(n, r["status"]) for n, r in rows.items()] == [("a", "skipped"), ("b", "segmented"), ("c", "failed")]
    assert rows["c"]["ggo_ml"] == "" and "c.nii.gz" in rows["c"]["reason"] and rows["b"]["ggo_ml"] != ""
    st = json.loads((out / "b_stats.json").read_text())
    assert float(rows["b"]["ggo_ml"]) == round(st["lesions"]["ggo"]["volume_ml"], 1)
    # nothing left to segment (a and b skipped, c fails): still a summary of this run
    (out / cli.BATCH_SUMMARY).unlink()
    assert cli.main(_segment_args(cases, out, tiny_ckpt)) == 1
    assert [r["status"] for r in _summary_rows(out).values()] == ["skipped", "skipped", "failed"]
    assert "every case, one row each" in capsys.readouterr().err
    # a batch where every case fails has its summary too
    bad = tmp_path / "bad"
    bad.mkdir()
    for n in ("x", "y"):
        (bad / f"{n}.nii.gz").write_bytes(b"not an image")
    assert cli.main(_segment_args(bad, tmp_path / "out_bad", tiny_ckpt)) == 1
    assert [r["status"] for r in _summary_rows(tmp_path / "out_bad").values()] == ["failed", "failed"]


def test_a_ct_replaced_at_the_same_path_is_not_skipped_as_done(tmp_path, tiny_ckpt, capsys):
    """A rerun skipped a case whose CT had been replaced at the same path (a re-export, the full
    scan instead of a part) and kept the old figures as if they were the new CT's."""
    cases = tmp_path / "cases"
    cases.mkdir()
    img, _ = synthetic_chest_ct(3, 96, spacing=SP)
    write_image(img, cases / "p1.nii.gz")
    _write_dicom_series(img, cases / "p2", "1.2.826.0.1.3680043.2.1125.11.1", "ct", "i")
    out = tmp_path / "out"
    assert cli.main(_segment_args(cases, out, tiny_ckpt)) == 0
    stamp = json.loads((out / "p2_stats.json").read_text())["info"]["input_stamp"]
    assert stamp["files"] == 3 and len(stamp["sha256"]) == 64
    # the same files copied anew (new times, same contents) are the same input: skipped
    for f in [cases / "p1.nii.gz", *sorted((cases / "p2").iterdir())]:
        f.write_bytes(f.read_bytes())
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 5 * 10**9))
    capsys.readouterr()
    assert cli.main(_segment_args(cases, out, tiny_ckpt)) == 0
    assert capsys.readouterr().err.count("outputs exist, skipped") == 2
    # another scan at p1's path, and a slice removed from p2's series: both fail, outputs kept
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    write_image(synthetic_chest_ct(4, 96, spacing=SP)[0], cases / "p1.nii.gz")
    (cases / "p2" / "i002.dcm").unlink()
    assert cli.main(_segment_args(cases, out, tiny_ckpt)) == 1
    err = capsys.readouterr().err
    assert f"outputs of 'p1' made from {cases / 'p1.nii.gz'} before it changed (1 file" in err
    assert "3 files, " in err and "2 files, " in err and "--overwrite segments it anew" in err
    assert all((out / n).read_bytes() == b for n, b in before.items() if n != cli.BATCH_SUMMARY)
    assert cli.main(_segment_args(cases, out, tiny_ckpt, "--overwrite")) == 0
    assert json.loads((out / "p1_stats.json").read_text())["info"]["size"][2] == 4
    assert json.loads((out / "p2_stats.json").read_text())["info"]["input_stamp"]["files"] == 2


def test_segment_passes_over_folders_without_images_and_finds_a_ct_nested_deeper(tmp_path, tiny_ckpt, capsys):
    """A batch whose folder holds an empty subfolder and one of notes only: 0, not 1, with one
    note naming them, and the summary lists the cases only (before: each was a failed case);
    patient1/series/ct.mha is segmented as patient1, on its own grid (before: a failed case).
    Nothing but such folders is nothing to process: exit status 2, as for any input error."""
    cases = tmp_path / "cases"
    (cases / "empty").mkdir(parents=True)
    (cases / "docs").mkdir()
    (cases / "docs" / "notes.txt").write_text("not an image")
    (cases / "patient1" / "series").mkdir(parents=True)
    img, _ = synthetic_chest_ct(3, 96, spacing=SP)
    write_image(img, cases / "a.nii.gz")
    write_image(img[::-1, :, :], cases / "patient1" / "series" / "ct.mha")   # another grid than a's
    out = tmp_path / "out"
    assert cli.main(_segment_args(cases, out, tiny_ckpt)) == 0
    err = capsys.readouterr().err
    assert err.count("without images") == 1
    assert "skipped 2 folders without images (no NIfTI/NRRD/MHA or DICOM file in them): docs/, empty/" in err
    rows = _summary_rows(out)
    assert [(n, r["status"]) for n, r in rows.items()] == [("a", "segmented"), ("patient1", "segmented")]
    assert rows["patient1"]["input"] == str(cases / "patient1" / "series" / "ct.mha")
    seg = sitk.ReadImage(str(out / "patient1.seg.nrrd"))
    ct = sitk.ReadImage(str(cases / "patient1" / "series" / "ct.mha"))
    assert seg.GetSize()[:3] == ct.GetSize()
    np.testing.assert_allclose(seg.GetOrigin(), ct.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(seg.GetDirection(), ct.GetDirection(), atol=1e-6)
    assert json.loads((out / "patient1_stats.json").read_text())["info"]["source"] == \
        str((cases / "patient1" / "series" / "ct.mha").absolute())
    # --progress-json hears the note as a notice, before the cases
    assert cli.main(_segment_args(cases, out, tiny_ckpt, "--progress-json")) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[0]["event"] == "notice" and events[0]["case"] is None and "docs/, empty/" in events[0]["message"]
    nothing = tmp_path / "nothing"
    (nothing / "empty").mkdir(parents=True)
    assert cli.main(_segment_args(nothing, tmp_path / "o2", tiny_ckpt)) == 2
    assert "skipped 1 folder without images (no NIfTI/NRRD/MHA or DICOM file in it): empty/" in \
        capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
