"""Checkpoints round-trip, carry their metadata, and refuse anything tampered or foreign."""
import json

import pytest
import torch

from ssanet import checkpoint as ckpt
from ssanet.model import SSANet


def _small():
    torch.manual_seed(0)
    return SSANet(2, 3, layers=(1, 1, 1, 1), sc_kernel_size=3).eval()


def test_round_trip_with_metadata(tmp_path):
    m = _small()
    p = tmp_path / "m.safetensors"
    digest = ckpt.save_checkpoint(p, m, {"preprocessing": {"size": 64}, "val_metrics": {"ggo": 0.5}})
    m2, meta = ckpt.load_checkpoint(p, expected_sha256=digest)
    assert meta["sha256"] == digest and meta["class_names"] == ["background", "ggo", "consolidation"]
    assert meta["preprocessing"]["size"] == 64 and meta["model"]["layers"] == [1, 1, 1, 1]
    x = torch.randn(1, 2, 64, 64)
    with torch.no_grad():
        assert torch.allclose(m(x), m2(x), atol=1e-6)
    assert not (tmp_path / "m.safetensors.part").exists()


def test_half_precision_storage_is_smaller_and_close(tmp_path):
    m = _small()
    ckpt.save_checkpoint(tmp_path / "f.safetensors", m)
    ckpt.save_checkpoint(tmp_path / "h.safetensors", m, half=True)
    assert (tmp_path / "h.safetensors").stat().st_size < 0.6 * (tmp_path / "f.safetensors").stat().st_size
    m2, meta = ckpt.load_checkpoint(tmp_path / "h.safetensors")
    assert meta["storage_dtype"] == "float16"
    x = torch.randn(1, 2, 64, 64)
    with torch.no_grad():
        assert torch.allclose(torch.softmax(m(x), 1), torch.softmax(m2(x), 1), atol=2e-2)


def test_sha_mismatch_is_refused(tmp_path):
    p = tmp_path / "m.safetensors"
    ckpt.save_checkpoint(p, _small())
    with pytest.raises(ckpt.CheckpointError, match="SHA-256 mismatch"):
        ckpt.load_checkpoint(p, expected_sha256="0" * 64)


CHANGED = "content digest mismatch — the file was changed after it was written"


def test_tampered_weights_are_refused(tmp_path):
    p = tmp_path / "m.safetensors"
    ckpt.save_checkpoint(p, _small())
    data = bytearray(p.read_bytes())
    data[-100:] = b"\x00" * 100   # bytes change, size stays: only a hash notices
    p.write_bytes(bytes(data))
    # the content digest in the header notices, with or without an expected hash
    with pytest.raises(ckpt.CheckpointError, match=CHANGED):
        ckpt.load_checkpoint(p)
    with pytest.raises(ckpt.CheckpointError, match="SHA-256 mismatch"):
        ckpt.load_checkpoint(p, expected_sha256=ckpt.sha256_of(p)[::-1])


def _rewritten(src, dst, header=None, state=None):
    """``src`` rewritten as a hand edit would: another header or other tensors, the recorded
    content digest left as it was."""
    from safetensors.torch import load_file, save_file
    header = ckpt.read_meta(src) if header is None else header
    state = load_file(str(src)) if state is None else state
    save_file(state, str(dst), metadata={"ssanet": json.dumps(header)})
    return dst


def _flip_two_tensor_bytes(src, dst):
    data = bytearray(src.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")       # safetensors: u64 header length, header, data
    for i in (start + 5, len(data) - 7):
        data[i] ^= 0xFF
    dst.write_bytes(bytes(data))
    return dst


def _tiny_checkpoint(path, storage="float32"):
    ckpt.save_checkpoint(path, _small(), {"preprocessing": {"size": 64, "window_hu": [-1250, 250]},
                                          "training": {"epoch": 3}}, storage=storage)
    return path


@pytest.mark.parametrize("storage", ckpt.STORAGE_DTYPES)
def test_content_digest_is_recorded_from_what_is_stored_and_an_untouched_file_loads(tmp_path, storage):
    from safetensors.torch import load_file
    p = _tiny_checkpoint(tmp_path / "m.safetensors", storage)
    header = ckpt.read_meta(p)
    assert len(header[ckpt.CONTENT_DIGEST]) == 64
    assert header[ckpt.CONTENT_DIGEST] == ckpt.content_sha256(header, load_file(str(p)))
    _, meta = ckpt.load_checkpoint(p)
    assert meta["storage_dtype"] == storage and meta["sha256"] == ckpt.sha256_of(p)
    info = ckpt.describe(p)
    assert info["content_digest"]["recorded"] and info["content_digest"]["verified"] is True
    assert info["content_sha256"] == header["content_sha256"] and info["registry"] is None
    # saved again from a loaded meta (as average / ensemble / member do), the digest is the new file's
    m, meta = ckpt.load_checkpoint(p)
    ckpt.save_checkpoint(tmp_path / "again.safetensors", m, {**meta, "note": "again"})
    assert ckpt.load_checkpoint(tmp_path / "again.safetensors")[1]["note"] == "again"


def test_changed_header_or_weights_are_refused_at_load(tmp_path):
    """The reviewer's reproduction: two tensor bytes flipped; class_names reordered (GGO and
    consolidation would be swapped in every result); the preprocessing window changed —
    each loaded silently before; now each is refused, naming the file and what to do."""
    p = _tiny_checkpoint(tmp_path / "m.safetensors")
    header = ckpt.read_meta(p)
    flipped = _flip_two_tensor_bytes(p, tmp_path / "flipped.safetensors")
    classes = _rewritten(p, tmp_path / "classes.safetensors",
                         {**header, "class_names": ["background", "consolidation", "ggo"]})
    window = _rewritten(p, tmp_path / "window.safetensors",
                        {**header, "preprocessing": {**header["preprocessing"], "window_hu": [-1000, 400]}})
    for bad in (flipped, classes, window):
        with pytest.raises(ckpt.CheckpointError) as e:
            ckpt.load_checkpoint(bad)
        msg = str(e.value)
        assert msg.startswith(f"{bad}: ") and CHANGED in msg and "header or its weights" in msg
        assert "Restore the original file, or re-export it with the command that made it" in msg
        info = ckpt.describe(bad)                   # described, not refused: info says why a load fails
        assert info["content_digest"]["verified"] is False and CHANGED in info["content_digest"]["note"]
    # ... and by everything that loads a checkpoint to combine or split it
    with pytest.raises(ckpt.CheckpointError, match=CHANGED):
        ckpt.average_checkpoints([p, classes])
    with pytest.raises(ckpt.CheckpointError, match=CHANGED):
        ckpt.ensemble_checkpoints([flipped, p])
    # a digest that is not a digest is no way around it
    junk = _rewritten(p, tmp_path / "junk.safetensors", {**header, "content_sha256": 0})
    with pytest.raises(ckpt.CheckpointError, match=CHANGED):
        ckpt.load_checkpoint(junk)


def test_a_file_written_before_content_digests_still_loads_and_info_says_so(tmp_path):
    p = _tiny_checkpoint(tmp_path / "m.safetensors")
    header = ckpt.read_meta(p)
    del header["content_sha256"]
    old = _rewritten(p, tmp_path / "old.safetensors", header)
    model, meta = ckpt.load_checkpoint(old)
    assert "content_sha256" not in meta and meta["training"]["epoch"] == 3
    info = ckpt.describe(old)
    assert info["content_sha256"] is None
    assert info["content_digest"] == {"recorded": False, "verified": None,
                                      "note": info["content_digest"]["note"]}
    assert "no content digest recorded" in info["content_digest"]["note"]
    assert "loads without this check" in info["content_digest"]["note"]


def _registered(tmp_path, monkeypatch, file_name, sha256):
    """A models.json (in a scratch Models folder) registering ``file_name`` with ``sha256``."""
    models = tmp_path / "Models"
    models.mkdir()
    (models / "models.json").write_text(json.dumps({"models": [
        {"name": "reg", "file": file_name, "sha256": sha256, "default": True}]}))
    monkeypatch.setattr(ckpt, "MODELS_DIR", models)
    monkeypatch.setattr(ckpt, "REGISTRY", models / "models.json")


def test_a_registered_file_name_must_have_the_registered_sha256_wherever_it_lies(tmp_path, monkeypatch):
    """Not only the bundled model picked by default: a file bearing a registered model's file
    name is checked against models.json given by path or by $SSALESIONSEG_MODEL too."""
    monkeypatch.delenv("SSALESIONSEG_MODEL", raising=False)
    monkeypatch.setenv("SSALESIONSEG_CACHE", str(tmp_path / "cache"))
    good = tmp_path / "src" / "reg.safetensors"
    good.parent.mkdir()
    header = ckpt.read_meta(_tiny_checkpoint(good))
    _registered(tmp_path, monkeypatch, "reg.safetensors", ckpt.sha256_of(good))
    ckpt.load_checkpoint(good)                                         # the registered file loads
    assert ckpt.describe(good)["registry"]["verified"] is True
    # an old-style copy (no content digest: only the registry can notice) with its classes swapped
    del header["content_sha256"]
    bad = _rewritten(good, tmp_path / "reg.safetensors", {**header, "class_names": ["background", "consolidation", "ggo"]})
    with pytest.raises(ckpt.CheckpointError, match=f"{bad}: SHA-256 mismatch.*another file name"):
        ckpt.load_checkpoint(bad)
    monkeypatch.setenv("SSALESIONSEG_MODEL", str(bad))
    with pytest.raises(ckpt.CheckpointError, match="SHA-256 mismatch"):
        ckpt.load_checkpoint(None)
    monkeypatch.delenv("SSALESIONSEG_MODEL")
    info = ckpt.describe(bad)
    assert info["registry"]["verified"] is False and "refused at load" in info["registry"]["note"]
    # under another file name it is another model, loaded on its own terms (no digest: unchecked) ...
    ckpt.load_checkpoint(_rewritten(good, tmp_path / "mine.safetensors", header))
    # ... and the user cache's default.safetensors, written by this version, has its digest checked
    cached = tmp_path / "cache" / "models" / "default.safetensors"
    cached.parent.mkdir(parents=True)
    _flip_two_tensor_bytes(good, cached)
    with pytest.raises(ckpt.CheckpointError, match=f"{cached}: {CHANGED}"):
        ckpt.load_checkpoint(None)


def test_a_tampered_copy_of_the_bundled_file_is_refused_by_explicit_path(tmp_path, monkeypatch):
    monkeypatch.delenv("SSALESIONSEG_MODEL", raising=False)
    entry = ckpt._registry_entry()
    bundled = ckpt.MODELS_DIR / entry["file"]
    copy = _flip_two_tensor_bytes(bundled, tmp_path / entry["file"])   # same name, elsewhere
    with pytest.raises(ckpt.CheckpointError, match=r"SHA-256 mismatch.*models.json records for "
                                                    + entry["file"].replace(".", r"\.")):
        ckpt.load_checkpoint(copy)
    monkeypatch.setenv("SSALESIONSEG_MODEL", str(copy))
    with pytest.raises(ckpt.CheckpointError, match="SHA-256 mismatch"):
        ckpt.load_checkpoint(None)
    info = ckpt.describe(bundled)       # v6 predates content digests; the registry vouches for it
    assert info["content_digest"]["recorded"] is False and info["registry"]["verified"] is True


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x80\x04\x95pickle"])
def test_foreign_or_corrupt_files_are_refused(tmp_path, content):
    p = tmp_path / "x.safetensors"
    p.write_bytes(content)
    with pytest.raises(ckpt.CheckpointError, match="not an SSA-Net checkpoint"):
        ckpt.load_checkpoint(p)


def test_missing_file(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.load_checkpoint(tmp_path / "nope.safetensors")


def test_architecture_mismatch_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    p = tmp_path / "m.safetensors"
    ckpt.save_checkpoint(p, _small())
    meta = ckpt.read_meta(p)
    meta["model"]["num_classes"] = 1          # header says binary, weights are 3-class
    meta.pop("content_sha256", None)          # as a file written before content digests
    save_file(load_file(str(p)), str(p), metadata={"ssanet": json.dumps(meta)})
    with pytest.raises(ckpt.CheckpointError, match="do not match the architecture"):
        ckpt.load_checkpoint(p)


def test_resolution_order(tmp_path, monkeypatch):
    p = tmp_path / "env.safetensors"
    ckpt.save_checkpoint(p, _small())
    monkeypatch.setenv("SSALESIONSEG_MODEL", str(p))
    assert ckpt.resolve_checkpoint(None) == (p, None)
    assert ckpt.resolve_checkpoint("explicit.safetensors")[0].name == "explicit.safetensors"
    monkeypatch.delenv("SSALESIONSEG_MODEL")
    monkeypatch.setenv("SSALESIONSEG_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "models" / "default.safetensors"
    cached.parent.mkdir(parents=True)
    ckpt.save_checkpoint(cached, _small())
    assert ckpt.resolve_checkpoint(None) == (cached, None)


def test_half_storage_keeps_batchnorm_statistics_exact(tmp_path):
    m = _small()
    bn = m.decoder.blocks[0].reduce[1]
    bn.running_mean.fill_(3e20)          # values the spatial convolution can produce
    bn.running_var.fill_(float("inf"))
    ckpt.save_checkpoint(tmp_path / "h.safetensors", m, half=True)
    m2, _ = ckpt.load_checkpoint(tmp_path / "h.safetensors")
    bn2 = m2.decoder.blocks[0].reduce[1]
    assert torch.equal(bn2.running_mean, bn.running_mean) and torch.isinf(bn2.running_var).all()


def test_average_checkpoints_is_the_mean_of_the_weights(tmp_path):
    torch.manual_seed(0)
    a, b = _small(), _small()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn_like(p))
        for mod in b.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_var.fill_(3.0)
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ckpt.save_checkpoint(pa, a, {"training": {"epoch": 3}})
    ckpt.save_checkpoint(pb, b, {"training": {"epoch": 5}})
    soup, meta = ckpt.average_checkpoints([pa, pb])
    sa, sb, ss = a.state_dict(), b.state_dict(), soup.state_dict()
    for k, v in ss.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, (sa[k] + sb[k]) / 2)
        else:
            assert torch.equal(v, sa[k])
    assert [e["epoch"] for e in meta["training"]["averaged_from"]] == [3, 5]
    assert not soup.training
    # The soup is a checkpoint like any other: saved, it loads and predicts.
    out = tmp_path / "soup.safetensors"
    ckpt.save_checkpoint(out, soup, meta)
    again, _ = ckpt.load_checkpoint(out)
    x = torch.rand(1, 2, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(x), soup(x))


def test_average_refuses_different_networks_or_one_file(tmp_path):
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ckpt.save_checkpoint(pa, _small())
    ckpt.save_checkpoint(pb, SSANet(2, 1, layers=(1, 1, 1, 1), sc_kernel_size=3).eval())
    with pytest.raises(ckpt.CheckpointError, match="differs"):
        ckpt.average_checkpoints([pa, pb])
    with pytest.raises(ckpt.CheckpointError, match="at least two"):
        ckpt.average_checkpoints([pa])


def _perturbed(seed):
    m = _small()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    return m


def test_int8_storage_is_half_of_float16_and_within_one_step_per_channel(tmp_path):
    m = _perturbed(1)
    bn = m.decoder.blocks[0].reduce[1]
    bn.running_var.fill_(3e20)           # BatchNorm statistics stay float32, as in float16 files
    ckpt.save_checkpoint(tmp_path / "h.safetensors", m, half=True)
    ckpt.save_checkpoint(tmp_path / "q.safetensors", m, storage="int8")
    assert (tmp_path / "q.safetensors").stat().st_size < 0.6 * (tmp_path / "h.safetensors").stat().st_size
    m2, meta = ckpt.load_checkpoint(tmp_path / "q.safetensors")
    assert meta["storage_dtype"] == "int8"
    ref, got = m.state_dict(), m2.state_dict()
    assert set(ref) == set(got) and all(v.dtype == ref[k].dtype for k, v in got.items())
    kernel = "encoder.stem.0.weight" if "encoder.stem.0.weight" in ref else next(
        k for k, v in ref.items() if v.dim() == 4)
    w, wq = ref[kernel], got[kernel]
    half_step = w.abs().reshape(w.shape[0], -1).amax(1) / 127 / 2
    assert ((w - wq).abs().reshape(w.shape[0], -1).amax(1) <= half_step * 1.001).all()
    assert not torch.equal(w, wq)        # it really was quantized
    assert torch.equal(got["decoder.blocks.0.reduce.1.running_var"], bn.running_var)
    plain = _small()                     # a network with sane activations predicts as before
    ckpt.save_checkpoint(tmp_path / "p.safetensors", plain, storage="int8")
    plain2, _ = ckpt.load_checkpoint(tmp_path / "p.safetensors")
    x = torch.rand(2, 2, 64, 64)
    with torch.no_grad():
        assert torch.allclose(torch.softmax(plain(x), 1), torch.softmax(plain2(x), 1), atol=2e-2)
    with pytest.raises(ValueError, match="storage"):
        ckpt.save_checkpoint(tmp_path / "x.safetensors", m, storage="int4")


@pytest.mark.parametrize("num_classes", [3, 1])
def test_ensemble_predicts_the_mean_of_its_members_probabilities(tmp_path, num_classes):
    from ssanet.model import probabilities

    members = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        members.append(SSANet(2, num_classes, layers=(1, 1, 1, 1), sc_kernel_size=3).eval())
    paths = []
    for i, m in enumerate(members):
        paths.append(tmp_path / f"m{i}.safetensors")
        ckpt.save_checkpoint(paths[-1], m, {"preprocessing": {"size": 64}, "val_metrics": {"x": i},
                                            "inference": {"flip_tta": True}})
    ens, meta = ckpt.ensemble_checkpoints(paths)
    assert [e["name"] for e in meta["training"]["ensemble_of"]] == ["m0.safetensors", "m1.safetensors"]
    assert "val_metrics" not in meta and meta["inference"] == {"flip_tta": True}
    x = torch.rand(3, 2, 64, 64)
    with torch.no_grad():
        want = (probabilities(members[0](x)) + probabilities(members[1](x))) / 2
        torch.testing.assert_close(probabilities(ens(x)), want, atol=1e-5, rtol=1e-4)
        out = tmp_path / "ens.safetensors"
        ckpt.save_checkpoint(out, ens, meta)
        again, meta2 = ckpt.load_checkpoint(out)
        assert meta2["ensemble"] == {"members": 2} and ckpt.is_ensemble(meta2)
        torch.testing.assert_close(probabilities(again(x)), want, atol=1e-5, rtol=1e-4)


def test_ensemble_refusals(tmp_path):
    pa, pb, pc = (tmp_path / f"{n}.safetensors" for n in "abc")
    ckpt.save_checkpoint(pa, _small())
    ckpt.save_checkpoint(pb, _perturbed(3))
    ckpt.save_checkpoint(pc, SSANet(2, 1, layers=(1, 1, 1, 1), sc_kernel_size=3).eval())
    with pytest.raises(ckpt.CheckpointError, match="differs"):
        ckpt.ensemble_checkpoints([pa, pc])
    with pytest.raises(ckpt.CheckpointError, match="at least two"):
        ckpt.ensemble_checkpoints([pa])
    ens, meta = ckpt.ensemble_checkpoints([pa, pb])
    pe = tmp_path / "ens.safetensors"
    ckpt.save_checkpoint(pe, ens, meta)
    # an ensemble is not nested, averaged or trained from
    with pytest.raises(ckpt.CheckpointError, match="already an ensemble"):
        ckpt.ensemble_checkpoints([pe, pa])
    with pytest.raises(ckpt.CheckpointError, match="already an ensemble"):
        ckpt.average_checkpoints([pa, pe])
    _, emeta = ckpt.load_checkpoint(pe)
    with pytest.raises(ckpt.CheckpointError, match=r"ensemble of 2 networks \(a.safetensors, b.safetensors\)"):
        ckpt.require_single_network(emeta, "--init")


def test_a_member_comes_out_of_an_ensemble_as_it_went_in(tmp_path, capsys):
    """`ssalesionseg member`: one network of an ensemble (e.g. the bundled one) as its own
    file — the same weights, the member's training record, where it came from — and an
    ensemble rebuilt from the members predicts what the original did."""
    from ssanet.cli import main
    from ssanet.model import probabilities

    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ckpt.save_checkpoint(pa, _small(), {"preprocessing": {"size": 64}, "training": {"epoch": 7}})
    ckpt.save_checkpoint(pb, _perturbed(3), {"preprocessing": {"size": 64}, "training": {"epoch": 9}})
    ens, meta = ckpt.ensemble_checkpoints([pa, pb])
    pe = tmp_path / "ens.safetensors"
    ckpt.save_checkpoint(pe, ens, meta)
    out = tmp_path / "m1.safetensors"
    main(["member", str(pe), "1", "--out", str(out), "--storage", "float32"])
    single, smeta = ckpt.load_checkpoint(out)
    original, _ = ckpt.load_checkpoint(pb)
    for k, v in original.state_dict().items():
        torch.testing.assert_close(single.state_dict()[k], v)
    assert smeta["training"]["epoch"] == 9 and not ckpt.is_ensemble(smeta)
    assert smeta["training"]["member_of"]["member_name"] == "b.safetensors"
    assert smeta["training"]["member_of"]["sha256"] == ckpt.sha256_of(pe)
    info = ckpt.describe(pe)
    assert info["networks"] == 2 and [m["epoch"] for m in info["members"]] == [7, 9]
    assert ckpt.describe(out)["member_of"]["member"] == 1
    # recombined: the same predictions
    m0 = tmp_path / "m0.safetensors"
    main(["member", str(pe), "0", "--out", str(m0), "--storage", "float32"])
    again, _ = ckpt.ensemble_checkpoints([m0, out])
    x = torch.rand(2, 2, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(probabilities(again(x)), probabilities(ens.eval()(x)), atol=1e-5, rtol=1e-4)
    with pytest.raises(ckpt.CheckpointError, match="networks 0 to 1, not 2"):
        ckpt.ensemble_member(pe, 2)
    with pytest.raises(ckpt.CheckpointError, match="single network"):
        ckpt.ensemble_member(pa, 0)
    assert main(["member", str(pe), "1", "--out", str(out)]) == 2   # said as every refusal is
    assert capsys.readouterr().err.startswith(f"error: {out} exists; choose another --out")


def test_an_unreadable_registry_does_not_stop_a_users_own_checkpoint(tmp_path, monkeypatch):
    """A broken models.json made every checkpoint load fail with a JSON error."""
    monkeypatch.delenv("SSALESIONSEG_MODEL", raising=False)
    monkeypatch.setenv("SSALESIONSEG_CACHE", str(tmp_path / "cache"))
    good = _tiny_checkpoint(tmp_path / "mine.safetensors")
    models = tmp_path / "Models"
    models.mkdir()
    (models / "models.json").write_text("{ not json")
    monkeypatch.setattr(ckpt, "MODELS_DIR", models)
    monkeypatch.setattr(ckpt, "REGISTRY", models / "models.json")
    ckpt.load_checkpoint(good)                     # the user's own file loads
    assert ckpt.describe(good)["content_digest"]["verified"] is True
    with pytest.raises(ckpt.CheckpointError, match="no default model is available"):
        ckpt.load_checkpoint(None)               # the bundled default cannot be found then: said so
