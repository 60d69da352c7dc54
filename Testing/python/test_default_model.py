"""The bundled default model: registered, verified at load, refused when tampered; the demo runs."""
import json
import shutil

import numpy as np
import pytest

from ssanet import checkpoint as ckpt


@pytest.fixture
def no_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("SSALESIONSEG_MODEL", raising=False)
    monkeypatch.setenv("SSALESIONSEG_CACHE", str(tmp_path / "empty-cache"))


def test_bundled_model_is_registered_small_and_verified(no_overrides):
    entry = next(e for e in json.loads(ckpt.REGISTRY.read_text())["models"] if e["default"])
    path = ckpt.MODELS_DIR / entry["file"]
    assert path.stat().st_size <= 64 * 2**20
    assert (ckpt.MODELS_DIR / entry["card"]).is_file()
    model, meta = ckpt.load_checkpoint(None)
    assert meta["sha256"] == entry["sha256"] == ckpt.sha256_of(path)
    assert meta["class_names"] == ["background", "ggo", "consolidation"]
    assert meta["model"]["spatial_conv"] and meta["model"]["layers"] == [3, 4, 6, 3]


def test_tampered_bundled_model_is_refused(no_overrides, tmp_path, monkeypatch):
    entry = next(e for e in json.loads(ckpt.REGISTRY.read_text())["models"] if e["default"])
    models = tmp_path / "Models"
    models.mkdir()
    shutil.copy(ckpt.REGISTRY, models / "models.json")
    data = bytearray((ckpt.MODELS_DIR / entry["file"]).read_bytes())
    data[-16:] = bytes(16)
    (models / entry["file"]).write_bytes(bytes(data))
    monkeypatch.setattr(ckpt, "MODELS_DIR", models)
    monkeypatch.setattr(ckpt, "REGISTRY", models / "models.json")
    with pytest.raises(ckpt.CheckpointError, match="SHA-256 mismatch"):
        ckpt.load_checkpoint(None)


def test_a_renamed_changed_copy_of_the_bundled_model_is_refused(no_overrides, tmp_path):
    """The bundled v6 carries no content digest (written before them), so a copy under another
    name with its weights changed used to load; models.json records v6's header SHA-256, which
    ties any file with that header to v6's SHA-256. An unchanged renamed copy still loads."""
    entry = next(e for e in json.loads(ckpt.REGISTRY.read_text())["models"] if e["default"])
    data = bytearray((ckpt.MODELS_DIR / entry["file"]).read_bytes())
    same = tmp_path / "my_model.safetensors"
    same.write_bytes(bytes(data))
    assert ckpt.describe(same)["registry"]["verified"] is True
    data[-16:] = bytes(16)   # weights, not the header
    changed = tmp_path / "other_name.safetensors"
    changed.write_bytes(bytes(data))
    assert ckpt.read_meta(changed) == ckpt.read_meta(same)
    with pytest.raises(ckpt.CheckpointError, match="SHA-256 mismatch.*weights were changed"):
        ckpt.load_checkpoint(changed)
    assert ckpt.describe(changed)["registry"]["verified"] is False
    _, meta = ckpt.load_checkpoint(same)
    assert meta["sha256"] == entry["sha256"]


def test_demo_runs_on_the_bundled_sample(no_overrides, tmp_path, capsys):
    import torch
    torch.set_num_threads(1)
    slicerio = pytest.importorskip("slicerio")
    from ssanet.cli import main
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "Severity score" in printed and "GGO" in printed
    seg = slicerio.read_segmentation(str(out / "covid_ct_sample.seg.nrrd"))
    names = {s["name"] for s in seg["segments"]}
    assert {"Ground-glass opacity", "Consolidation", "Right lung", "Left lung"} <= names
    stats = json.loads((out / "covid_ct_sample_stats.json").read_text())
    lungs = stats["lungs"]["total"]["volume_ml"]
    assert 1000 < lungs < 10000                               # a plausible adult lung volume
    ggo = stats["lesions"]["ggo"]["volume_ml"]
    assert 0 < ggo < lungs                                     # the sample has visible GGO, not everywhere
    assert (out / "covid_ct_sample_overlay.png").stat().st_size > 10000
    # which networks made the result (the bundled model is an ensemble; single models list none)
    _, meta = ckpt.load_checkpoint(None)
    assert stats["info"]["checkpoint"]["sha256"] == meta["sha256"]
    assert [m["sha256"] for m in stats["info"]["checkpoint"]["members"]] == \
        [m["sha256"] for m in meta["training"].get("ensemble_of", [])]
    assert np.isclose(stats["lesions"]["infection"]["volume_ml"],
                      ggo + stats["lesions"]["consolidation"]["volume_ml"], rtol=1e-6)
    # a rerun into the same folder keeps a corrected result unless told, and then keeps a copy
    seg = out / "covid_ct_sample.seg.nrrd"
    corrected = seg.read_bytes() + b"\n"
    seg.write_bytes(corrected)
    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--device", "cpu"]) == 2
    assert "covid_ct_sample.seg.nrrd, not as the demo wrote it" in capsys.readouterr().err
    assert seg.read_bytes() == corrected


def test_ctrl_c_is_one_line_not_a_traceback(monkeypatch, tmp_path, capsys):
    from ssalesionseg import pipeline
    from ssanet.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline, "process_case", interrupted)
    assert main(["demo", "--out", str(tmp_path / "d"), "--device", "cpu"]) == 130
    err = capsys.readouterr().err
    assert "interrupted: the same command again segments the sample" in err and "Traceback" not in err
