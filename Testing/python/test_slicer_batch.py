"""SSALesionSegBatch.py: argument handling, case discovery, loading through Slicer's
volumes logic (NIfTI and a DICOM series) and the whole batch under slicer-core, both
in-process and as the script a user runs. The fake engine returns the phantom's labels."""

import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
sitk = pytest.importorskip("SimpleITK")

from test_slicer_mrml import (  # noqa: E402  (shared fixtures and fake engine)
    MODULE_DIR,
    fake_engine,
    fake_engine_dir,
    mrml_scene,
    real_engine_or_skip,
    tiny_checkpoint,
)

import SSALesionSegBatch as batch  # noqa: E402
from SSALesionSegLib import logic as logic_  # noqa: E402
from SSALesionSegLib import mrml, phantom  # noqa: E402

__all__ = ["fake_engine", "fake_engine_dir", "mrml_scene", "tiny_checkpoint"]  # fixtures used by name below

BATCH_SCRIPT = os.path.join(MODULE_DIR, "SSALesionSegBatch.py")
DICOM_SPACING = (0.75, 0.75, 2.0)
DICOM_ORIGIN = (-18.0, -15.0, -100.0)


def write_dicom_series(image, folder, modality="CT", seriesUid="1.2.826.0.1.3680043.2.1125.1.2"):
    """A CT series SimpleITK writes slice by slice with the tags a CT reader needs."""
    os.makedirs(folder, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    studyUid = "1.2.826.0.1.3680043.2.1125.1.1"
    direction = image.GetDirection()
    common = {
        "0008|0060": modality, "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL", "0010|0010": "Phantom^Chest",
        "0010|0020": "PHANTOM1", "0020|000d": studyUid, "0020|000e": seriesUid, "0008|103e": "Phantom chest CT",
        "0020|0037": "\\".join(f"{v:.6f}" for v in (direction[0], direction[3], direction[6],
                                                    direction[1], direction[4], direction[7])),
        "0018|0050": f"{image.GetSpacing()[2]:.4f}", "0028|1052": "0", "0028|1053": "1", "0028|1054": "HU",
    }
    for k in range(image.GetDepth()):
        sliceImage = image[:, :, k]
        for tag, value in common.items():
            sliceImage.SetMetaData(tag, value)
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        sliceImage.SetMetaData("0020|0032", "\\".join(f"{v:.4f}" for v in position))
        sliceImage.SetMetaData("0020|0013", str(k + 1))
        sliceImage.SetMetaData("0008|0018", f"{seriesUid}.{k + 1}")
        writer.SetFileName(os.path.join(folder, f"IM{k + 1:04d}.dcm"))
        writer.Execute(sliceImage)


@pytest.fixture
def input_folder(tmp_path, monkeypatch):
    """One DICOM series folder and one NIfTI, same phantom; the fake engine returns its labels."""
    return make_input_folder(tmp_path, monkeypatch, (40, 36, 6))


def make_input_folder(tmp_path, monkeypatch, size):
    ct, labels, lungs = phantom.make_phantom(size=size, spacing=DICOM_SPACING, origin=DICOM_ORIGIN)
    folder = tmp_path / "input"
    write_dicom_series(ct, str(folder / "patient_dicom"))
    sitk.WriteImage(ct, str(folder / "patient_nifti.nii.gz"))
    (folder / "notes.txt").write_text("not an image")
    for name, image in (("labels", labels), ("lungs", lungs)):
        sitk.WriteImage(image, str(tmp_path / f"{name}.nrrd"))
    monkeypatch.setenv("FAKE_ENGINE_LABELS", str(tmp_path / "labels.nrrd"))
    monkeypatch.setenv("FAKE_ENGINE_LUNGS", str(tmp_path / "lungs.nrrd"))
    return types.SimpleNamespace(path=folder, ct=ct, labels=sitk.GetArrayFromImage(labels))


# ---------------------------------------------------------------------------
# Arguments and case discovery
# ---------------------------------------------------------------------------

def test_parse_args_defaults_and_slicer_separator(tmp_path):
    args = batch.parse_args(["--", "--input", str(tmp_path), "--output", str(tmp_path / "out")])
    assert (args.input, args.output) == (str(tmp_path), str(tmp_path / "out"))
    assert (args.lungs, args.device, args.checkpoint, args.overwrite) == ("auto", "auto", None, False)
    assert args.flip_tta == "model"
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"")
    args = batch.parse_args(["--input", str(tmp_path), "--output", "o", "--lungs", "classical", "--device", "cpu",
                             "--checkpoint", str(checkpoint), "--overwrite", "--flip-tta", "off"])
    assert (args.lungs, args.device, args.checkpoint, args.overwrite) == ("classical", "cpu", str(checkpoint), True)
    assert args.flip_tta == "off"


@pytest.mark.parametrize("argv, message", [
    (["--output", "o"], "--input"),
    (["--input", "{tmp}/missing", "--output", "o"], "not a folder"),
    (["--input", "{tmp}", "--output", "o", "--lungs", "existing"], "invalid choice"),
    (["--input", "{tmp}", "--output", "o", "--device", "tpu"], "invalid choice"),
    (["--input", "{tmp}", "--output", "o", "--flip-tta", "maybe"], "invalid choice"),
    (["--input", "{tmp}", "--output", "o", "--checkpoint", "{tmp}/none.pt"], "not found"),
])
def test_parse_args_rejects_bad_arguments(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        batch.parse_args([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_find_cases_takes_image_files_and_dicom_folders(input_folder):
    cases = batch.find_cases(str(input_folder.path))
    assert [name for name, _ in cases] == ["patient_nifti", "patient_dicom"]   # as `ssalesionseg segment`
    ct, info = batch.read_case(cases[1][1])
    assert ct.GetSize()[2] == 6 and info["dicom"]["n_files"] == 6 and "dicom_series_note" not in info
    ct, info = batch.read_case(cases[0][1])
    assert ct.GetSize() == input_folder.ct.GetSize() and "dicom" not in info


def test_dicom_in_subfolders_and_the_ct_series_among_others(input_folder, tmp_path):
    """A case folder holding its series one level down, beside a longer non-CT series:
    the CT series is read, and the batch says which one and that there were others."""
    mr = sitk.Image(40, 36, 9, sitk.sitkInt16)
    mr.SetSpacing(DICOM_SPACING)
    case = input_folder.path / "patient_nested"
    write_dicom_series(input_folder.ct, str(case / "series_ct"))
    write_dicom_series(mr, str(case / "series_mr"), modality="MR", seriesUid="1.2.826.0.1.3680043.2.1125.1.9")
    cases = dict(batch.find_cases(str(input_folder.path)))
    ct, info = batch.read_case(cases["patient_nested"])
    assert ct.GetSize()[2] == 6 and info["dicom"]["folder"].endswith("series_ct")
    assert "2 series found" in info["dicom_series_note"] and "CT series" in info["dicom_series_note"]


def test_inputs_that_would_share_outputs_are_refused_before_anything_runs(tmp_path, mrml_scene, fake_engine):
    folder = tmp_path / "in"
    folder.mkdir()
    ct, _, _ = phantom.make_phantom(size=(40, 36, 6))
    sitk.WriteImage(ct, str(folder / "patient_1.nii.gz"))
    sitk.WriteImage(ct, str(folder / "Patient_1.nrrd"))   # one file with it on Windows and macOS
    lines = []
    args = batch.parse_args(["--input", str(folder), "--output", str(tmp_path / "out")])
    assert batch.run_batch(args, _context(mrml_scene, fake_engine), out=lines.append) == 2   # as `segment`
    assert "several inputs would write the same outputs" in lines[-1] and "rename" in lines[-1]
    assert not (tmp_path / "out").exists()


def test_folders_without_images_are_passed_over_and_a_ct_nested_deeper_is_a_case(input_folder, tmp_path,
                                                                                 mrml_scene, fake_engine):
    """As `segment` finds cases: an empty subfolder and one of notes only are no cases, said in
    one note (before: two failed cases, exit code 1); patient_nested/series/ct.nii.gz is the
    case patient_nested (before: a failed case). Nothing to process is exit code 2, as
    `segment`'s (before: 1)."""
    import csv

    (input_folder.path / "empty").mkdir()
    (input_folder.path / "docs").mkdir()
    (input_folder.path / "docs" / "readme.txt").write_text("not an image")
    nested = input_folder.path / "patient_nested" / "series" / "ct.nii.gz"
    nested.parent.mkdir(parents=True)
    shutil.copy(input_folder.path / "patient_nifti.nii.gz", nested)
    out = tmp_path / "out"
    args = batch.parse_args(["--input", str(input_folder.path), "--output", str(out), "--device", "cpu"])
    lines = []
    assert batch.run_batch(args, _context(mrml_scene, fake_engine), out=lines.append) == 0
    notes = [line for line in lines if "without images" in line]
    assert notes == [f"note: {input_folder.path}: skipped 2 folders without images (no NIfTI/NRRD/MHA or DICOM "
                     "file in them): docs/, empty/"]
    assert lines[-1].startswith("All 3 cases done (3 segmented")
    with open(out / "ssalesionseg_summary.csv", encoding="utf-8", newline="") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    assert {n: r["status"] for n, r in rows.items()} == {"patient_nifti": "segmented", "patient_nested": "segmented",
                                                         "patient_dicom": "segmented"}
    assert rows["patient_nested"]["input"] == str(nested)
    seg = sitk.ReadImage(str(out / "patient_nested.seg.nrrd"))
    np.testing.assert_allclose(seg.GetSpacing()[:3], DICOM_SPACING, atol=1e-4)
    stats = json.loads((out / "patient_nested_stats.json").read_text())
    assert stats["info"]["source"] == str(nested.absolute())

    nothing = tmp_path / "nothing"
    (nothing / "empty").mkdir(parents=True)
    lines.clear()
    args = batch.parse_args(["--input", str(nothing), "--output", str(tmp_path / "o2")])
    assert batch.run_batch(args, _context(mrml_scene, fake_engine), out=lines.append) == 2
    assert lines[-1].startswith("Nothing processed:") and "skipped 1 folder without images" in lines[-1]
    assert not (tmp_path / "o2").exists()


def test_an_error_outside_the_cases_ends_the_script_with_code_2(tmp_path, monkeypatch, capsys):
    """Slicer --python-script does not exit on an uncaught error; main() must."""
    def broken(args):
        raise PermissionError("cannot create the output folder")
    monkeypatch.setattr(batch, "run_batch", broken)
    assert batch.main(["--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "error: PermissionError: cannot create the output folder" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as exit_:
        batch.parse_args(["--input", str(tmp_path), "--output", str(tmp_path / "afile")])
    assert exit_.value.code == 2 and "is a file" in capsys.readouterr().err


def test_a_dicom_folder_given_as_dot_is_named_after_the_folder(input_folder, monkeypatch):
    monkeypatch.chdir(input_folder.path / "patient_dicom")
    assert [n for n, _ in batch.find_cases(".")] == ["patient_dicom"]


def test_the_dicom_series_goes_into_the_scene_with_its_geometry(input_folder, mrml_scene):
    name, path = batch.find_cases(str(input_folder.path))[1]
    volume = mrml.add_volume_node_from_image(mrml_scene.scene, batch.read_case(path)[0], name)
    image = mrml.image_from_volume_node(volume)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(input_folder.ct))
    np.testing.assert_allclose(image.GetSpacing(), DICOM_SPACING, atol=1e-4)
    np.testing.assert_allclose(image.GetOrigin(), DICOM_ORIGIN, atol=1e-3)
    np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel(), atol=1e-6)


# ---------------------------------------------------------------------------
# Whole batch
# ---------------------------------------------------------------------------

def _context(headless, engine):
    return types.SimpleNamespace(scene=headless.scene, volumesLogic=headless.volumesLogic,
                                 logic=logic_.ProcessingLogic(headless.scene, engine=engine, moduleDir=MODULE_DIR))


def test_batch_processes_a_dicom_folder_and_a_nifti(input_folder, tmp_path, mrml_scene, fake_engine):
    slicerio = pytest.importorskip("slicerio")
    out = tmp_path / "out"
    args = batch.parse_args(["--input", str(input_folder.path), "--output", str(out), "--device", "cpu"])
    lines = []
    assert batch.run_batch(args, _context(mrml_scene, fake_engine), out=lines.append) == 0

    assert sorted(os.listdir(out)) == ["patient_dicom.seg.nrrd", "patient_dicom_stats.json",
                                       "patient_nifti.seg.nrrd", "patient_nifti_stats.json",
                                       "ssalesionseg_summary.csv"]
    for case in ("patient_dicom", "patient_nifti"):
        segmentation = slicerio.read_segmentation(str(out / f"{case}.seg.nrrd"))
        assert {s["name"] for s in segmentation["segments"]} == {s.name for s in mrml.segment_specs()}
        ggo = slicerio.segment_mask(segmentation, slicerio.segment_from_name(segmentation, "Ground-glass opacity"))
        assert int(ggo.sum()) == int((input_folder.labels == 1).sum())
        np.testing.assert_allclose(np.array(segmentation["ijkToLPS"])[:3, :3], np.diag(DICOM_SPACING), atol=1e-4)
        stats = json.loads((out / f"{case}_stats.json").read_text())
        assert stats["lesions"]["ggo"]["volume_ml"] == pytest.approx(
            (input_folder.labels == 1).sum() * np.prod(DICOM_SPACING) / 1000.0)
    assert any("patient_dicom: lungs" in line for line in lines)
    assert lines[-1].startswith("All 2 cases done")
    # Nodes of finished cases are removed, so long batches do not pile up in memory.
    assert mrml_scene.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert mrml_scene.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0

    lines.clear()
    assert batch.run_batch(args, _context(mrml_scene, fake_engine), out=lines.append) == 0
    assert sum("outputs exist, skipped" in line for line in lines) == 2
    assert lines[-1].startswith("All 2 cases done (0 segmented, 2 skipped)")


def test_batch_output_inside_the_input_folder_is_not_read_back_as_cases(input_folder, mrml_scene, fake_engine):
    for out in (input_folder.path, input_folder.path / "results"):
        args = batch.parse_args(["--input", str(input_folder.path), "--output", str(out), "--device", "cpu"])
        for expected in ("All 2 cases done", "skipped"):   # the rerun skips; the outputs are not cases
            lines = []
            assert batch.run_batch(args, _context(mrml_scene, fake_engine), out=lines.append) == 0
            assert any(expected in line for line in lines), lines
        assert [n for n, _ in batch.find_cases(str(input_folder.path), str(out))] == ["patient_nifti",
                                                                                     "patient_dicom"]


def test_batch_goes_on_after_a_bad_case_and_fails_at_the_end(input_folder, tmp_path, mrml_scene, fake_engine):
    (input_folder.path / "broken.nrrd").write_bytes(b"NRRD0004\nthis is not a valid header\n")
    out = tmp_path / "out"
    lines = []
    args = batch.parse_args(["--input", str(input_folder.path), "--output", str(out)])
    assert batch.run_batch(args, _context(mrml_scene, fake_engine), out=lines.append) == 1
    assert any(line.startswith("[1/3] broken: FAILED") for line in lines)
    assert (out / "patient_nifti.seg.nrrd").exists() and (out / "patient_dicom.seg.nrrd").exists()
    assert not (out / "broken.seg.nrrd").exists()
    assert lines[-1] == "1 of 3 cases failed: broken (2 segmented, 0 skipped)"
    # the summary `segment` writes: every case, the failure with its reason, the others' figures
    import csv
    with open(out / "ssalesionseg_summary.csv", encoding="utf-8", newline="") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    assert {n: r["status"] for n, r in rows.items()} == {"broken": "failed", "patient_nifti": "segmented",
                                                         "patient_dicom": "segmented"}
    assert "broken.nrrd" in rows["broken"]["reason"] and rows["broken"]["ggo_ml"] == ""
    stats = json.loads((out / "patient_dicom_stats.json").read_text())
    assert float(rows["patient_dicom"]["ggo_ml"]) == round(stats["lesions"]["ggo"]["volume_ml"], 1)
    assert rows["patient_dicom"]["input"] == str(input_folder.path / "patient_dicom")
    assert any(line.startswith("Every case, one row each:") for line in lines)


def test_batch_reads_with_the_engines_checks_and_reruns_by_segments_rules(input_folder, tmp_path, mrml_scene,
                                                                          fake_engine):
    """The batch read inputs with Slicer's reader (a cut-off NIfTI was segmented as if whole),
    skipped outputs made from another input or with other settings, and replaced an edited
    .seg.nrrd without a word."""
    nifti = input_folder.path / "patient_nifti.nii.gz"
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "cut.nii.gz").write_bytes(nifti.read_bytes()[: nifti.stat().st_size // 2])
    lines = []
    args = batch.parse_args(["--input", str(cut), "--output", str(tmp_path / "o1")])
    assert batch.run_batch(args, _context(mrml_scene, fake_engine), out=lines.append) == 1
    assert "FAILED" in lines[-2] and "end early" in lines[-2] and not (tmp_path / "o1" / "cut.seg.nrrd").exists()

    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(nifti, one / "patient_nifti.nii.gz")   # the same name as the input folder's: another file
    out = tmp_path / "o2"
    args = batch.parse_args(["--input", str(one), "--output", str(out), "--flip-tta", "off"])
    assert batch.run_batch(args, _context(mrml_scene, fake_engine), out=lines.append) == 0
    seg = out / "patient_nifti.seg.nrrd"
    for argv, said in ((["--flip-tta", "on"], "made with other settings (flip TTA: off -> on)"),
                       (["--flip-tta", "off", "--input", str(input_folder.path)], "made from another input")):
        lines.clear()
        args = batch.parse_args(["--input", str(one), "--output", str(out), *argv])
        assert batch.run_batch(args, _context(mrml_scene, fake_engine), out=lines.append) == 1
        assert any(said in line for line in lines), lines
    # a .seg.nrrd corrected in place is not replaced unasked, and kept as .bak when it is
    seg.write_bytes(seg.read_bytes() + b"\n")
    edited = seg.read_bytes()
    args = batch.parse_args(["--input", str(one), "--output", str(out), "--flip-tta", "off"])
    lines.clear()
    assert batch.run_batch(args, _context(mrml_scene, fake_engine), out=lines.append) == 1
    assert any("not as this script wrote it" in line for line in lines) and seg.read_bytes() == edited
    args = batch.parse_args(["--input", str(one), "--output", str(out), "--flip-tta", "off", "--overwrite"])
    lines.clear()
    assert batch.run_batch(args, _context(mrml_scene, fake_engine), out=lines.append) == 0
    assert (out / "patient_nifti.seg.nrrd.bak").read_bytes() == edited and any("kept as" in x for x in lines)


def test_batch_does_not_skip_a_ct_replaced_at_the_same_path(input_folder, tmp_path, mrml_scene, fake_engine):
    """As `segment`: outputs of a CT that was replaced since at the same path are not passed off
    as the new CT's; the same contents copied anew are still skipped."""
    out = tmp_path / "out"
    args = batch.parse_args(["--input", str(input_folder.path), "--output", str(out)])
    assert batch.run_batch(args, _context(mrml_scene, fake_engine), out=print) == 0
    nifti = input_folder.path / "patient_nifti.nii.gz"
    nifti.write_bytes(nifti.read_bytes())   # a fresh copy: new time, same contents
    lines = []
    assert batch.run_batch(args, _context(mrml_scene, fake_engine), out=lines.append) == 0
    assert sum("outputs exist, skipped" in line for line in lines) == 2
    before = (out / "patient_nifti_stats.json").read_bytes()
    sitk.WriteImage(sitk.Flip(sitk.ReadImage(str(nifti)), [True, False, False]), str(nifti))   # another scan
    lines.clear()
    assert batch.run_batch(args, _context(mrml_scene, fake_engine), out=lines.append) == 1
    assert any("patient_nifti: FAILED" in line and "before it changed" in line for line in lines), lines
    assert (out / "patient_nifti_stats.json").read_bytes() == before


def test_batch_script_runs_under_slicer_core_without_qt(input_folder, tmp_path, fake_engine_dir):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake_engine_dir), os.environ.get("PYTHONPATH", "")]))
    # Poison qt/PySide imports: the script must not need them.
    guard = tmp_path / "guard"
    guard.mkdir()
    for name in ("qt", "ctk", "PythonQt"):
        (guard / f"{name}.py").write_text(f"raise ImportError('{name} must not be imported by the batch script')\n")
    env["PYTHONPATH"] = os.pathsep.join([str(guard), env["PYTHONPATH"]])
    completed = subprocess.run([sys.executable, BATCH_SCRIPT, "--", "--input", str(input_folder.path),
                                "--output", str(out), "--device", "cpu"],
                               capture_output=True, text=True, timeout=300, env=env)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "All 2 cases done" in completed.stdout
    assert sorted(p for p in os.listdir(out) if p.endswith(".seg.nrrd")) == ["patient_dicom.seg.nrrd",
                                                                             "patient_nifti.seg.nrrd"]


def test_importing_the_batch_script_does_nothing(tmp_path):
    code = (f"import sys; sys.path.insert(0, {MODULE_DIR!r}); sys.argv = ['x', '--input', 'nowhere']\n"
            "import SSALesionSegBatch\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('qt', 'PySide6', 'PythonQt', 'slicer')))\n")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


def test_real_engine_batch(tmp_path, monkeypatch, mrml_scene, tiny_checkpoint):
    real = real_engine_or_skip()
    # Large enough for the engine's classical lung step to find the phantom's lungs.
    input_folder = make_input_folder(tmp_path, monkeypatch, (72, 64, 6))
    out = tmp_path / "out"
    args = batch.parse_args(["--input", str(input_folder.path), "--output", str(out), "--lungs", "classical",
                             "--device", "cpu", "--checkpoint", tiny_checkpoint])
    assert batch.run_batch(args, _context(mrml_scene, real), out=print) == 0
    assert (out / "patient_dicom.seg.nrrd").exists() and (out / "patient_nifti_stats.json").exists()


def test_ctrl_c_in_the_batch_keeps_finished_cases_and_writes_the_summary(input_folder, tmp_path, mrml_scene,
                                                                        fake_engine, monkeypatch, capsys):
    """Ctrl-C during the second case: as `segment` does, the first case's outputs stay, the
    summary lists the rest as not run, and main() ends with one line and exit status 130
    (before: a traceback and no summary)."""
    import csv

    out = tmp_path / "out"
    context = _context(mrml_scene, fake_engine)
    real_process, calls = context.logic.process, []

    def process(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_process(*a, **kw)

    monkeypatch.setattr(context.logic, "process", process)
    monkeypatch.setattr(batch, "_Context", lambda: context)
    assert batch.main(["--input", str(input_folder.path), "--output", str(out), "--device", "cpu"]) == 130
    err = capsys.readouterr().err
    assert "interrupted: finished cases are kept" in err and "Traceback" not in err
    with open(out / "ssalesionseg_summary.csv", encoding="utf-8", newline="") as f:
        rows = {r["case"]: r["status"] for r in csv.DictReader(f)}
    assert rows == {"patient_nifti": "segmented", "patient_dicom": "not run"}
    assert (out / "patient_nifti.seg.nrrd").is_file() and not (out / "patient_dicom.seg.nrrd").exists()
