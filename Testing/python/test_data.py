"""Tests for ssanet.preprocess and ssanet.data: hand-made arrays, then the real data
(skipped when the data root is absent, see conftest.py)."""

import gzip
import os
import sys
import types

import numpy as np
import pytest

try:
    import ssanet.preprocess as P
except ImportError:
    # Lets the tests run from a bare checkout, before `pip install -e .`.
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "Training")))
    import ssanet.preprocess as P
import ssanet.data as D


# ============================================================ preprocess, hand-made

def test_window_hu_and_inverse():
    hu = np.array([-3000.0, -1250.0, -500.0, 250.0, 1000.0])
    w = P.window_hu(hu)
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, [0.0, 0.0, 127.5, 255.0, 255.0], atol=1e-4)
    inside = np.linspace(-1250.0, 250.0, 31)
    np.testing.assert_allclose(P.hu_from_window(P.window_hu(inside)), inside, atol=1e-3)
    # The inverse of an 8-bit rendering is within half a grey level (~2.9 HU).
    u8 = np.rint(P.window_hu(inside)).astype(np.uint8)
    assert np.abs(P.hu_from_window(u8) - inside).max() <= 0.5 * 1500 / 255 + 1e-3
    np.testing.assert_allclose(P.window_hu([0.0], window=(-100, 100)), [127.5])


def test_make_input_channels_and_blanking():
    img = np.full((4, 5), 255, np.uint8)
    img[0, 0] = 51
    lung = np.zeros((4, 5), bool)
    lung[:2, :3] = True
    x = P.make_input(img, lung)
    assert x.shape == (2, 4, 5) and x.dtype == np.float32
    assert x[0, 0, 0] == pytest.approx(0.2)
    assert np.all(x[0][~lung] == 0) and np.all(x[0][lung][1:] == 1.0)
    assert set(np.unique(x[1])) == {0.0, 1.0} and np.array_equal(x[1] > 0, lung)
    x2 = P.make_input(img, lung, blank_outside_lung=False)
    np.testing.assert_allclose(x2[0], img / 255.0, rtol=1e-6)
    stack = P.make_input(np.stack([img, img]), np.stack([lung, ~lung]))
    assert stack.shape == (2, 2, 4, 5)
    assert np.array_equal(stack[1, 1] > 0, ~lung) and np.all(stack[1, 0][lung] == 0)
    with pytest.raises(ValueError):
        P.make_input(img, lung[:3])


def test_lung_centroid_crop_box_and_round_trip():
    rng = np.random.default_rng(0)
    img = rng.integers(1, 255, (700, 650)).astype(np.uint8)
    lab = rng.integers(0, 3, (700, 650)).astype(np.uint8)
    lung = np.zeros((700, 650), bool)
    lung[20:120, 30:100] = True  # centroid near the top-left corner
    box, (ic, lc, mc) = P.lung_centroid_crop(img, lab, lung=lung, crop=630)
    y0, x0, y1, x1 = box
    assert (y1 - y0, x1 - x0) == (630, 630)
    assert (y0, x0) == (0, 0)  # clamped inside the image
    assert ic.shape == lc.shape == mc.shape == (630, 630) and ic.dtype == np.uint8
    assert np.array_equal(P.uncrop(ic, box, img.shape)[:630, :630], img[:630, :630])
    back = P.uncrop(lc, box, img.shape, fill=7)
    assert np.all(back[630:] == 7) and np.array_equal(back[:630, :630], lab[:630, :630])

    # A centred lung: the box is centred on it.
    lung2 = np.zeros((700, 650), bool)
    lung2[300:400, 275:375] = True
    box2, _ = P.lung_centroid_crop(img, lung=lung2, crop=64)
    assert box2 == (318, 293, 382, 357)

    # Smaller than the crop: the whole image sits inside, zero padded, and comes back.
    small = rng.integers(1, 255, (100, 80)).astype(np.uint8)
    sl = np.zeros_like(small, bool)
    sl[10:90, 5:75] = True
    box3, (sc, slc) = P.lung_centroid_crop(small, lung=sl, crop=128)
    y0, x0, y1, x1 = box3
    assert y0 <= 0 and x0 <= 0 and y1 >= 100 and x1 >= 80
    assert sc.shape == (128, 128) and (sc > 0).sum() == small.size
    assert np.array_equal(P.uncrop(sc, box3, small.shape), small)
    assert np.array_equal(P.uncrop(slc, box3, small.shape), sl)
    # Leading axes (class probabilities) travel through uncrop.
    probs = np.stack([sc, sc]).astype(np.float32)
    assert P.uncrop(probs, box3, small.shape).shape == (2, 100, 80)


def test_resize_image_and_probs():
    lab = np.zeros((8, 8), np.uint8)
    lab[2:6, 2:6] = 2
    r = P.resize_image(lab, 16, order=0)
    assert r.shape == (16, 16) and r.dtype == np.uint8 and set(np.unique(r)) == {0, 2}
    rb = P.resize_image(lab > 0, (4, 6), order=0)
    assert rb.dtype == bool and rb.shape == (4, 6)
    img = np.linspace(0, 255, 64, dtype=np.float32).reshape(8, 8)
    ri = P.resize_image(img.astype(np.uint8), 32, order=1)
    assert ri.dtype == np.float32 and ri.min() >= 0 and ri.max() <= 255 and ri.max() > 200
    assert P.resize_image(np.stack([img, img]), 4, order=1).shape == (2, 4, 4)

    import torch
    p = np.random.default_rng(1).random((3, 8, 8)).astype(np.float32)
    p /= p.sum(0, keepdims=True)
    rp = P.resize_probs(p, (20, 12))
    assert isinstance(rp, np.ndarray) and rp.shape == (3, 20, 12) and rp.dtype == np.float32
    np.testing.assert_allclose(rp.sum(0), 1.0, atol=1e-5)
    rt = P.resize_probs(torch.from_numpy(np.stack([p, p])), 16)
    assert isinstance(rt, torch.Tensor) and tuple(rt.shape) == (2, 3, 16, 16)


def test_canonical_functions_are_the_documented_permutations():
    a = np.arange(12).reshape(3, 4)
    assert np.array_equal(P.canonical_from_medseg(a), a.T)
    assert np.array_equal(P.canonical_from_radiopaedia(a), a.T)
    cc = P.canonical_from_coronacases(a)
    assert np.array_equal(cc, np.rot90(a, 1))
    # Counter-clockwise: the stored left column (the spine) becomes the bottom row.
    assert np.array_equal(cc[-1], a[:, 0])
    for src in ("medseg", "covid-semiseg", "coronacases", "radiopaedia"):
        c = P.canonical_from_source(a, src)
        assert c.flags["C_CONTIGUOUS"] and sorted(c.ravel()) == sorted(a.ravel())
        assert np.array_equal(P.raw_from_canonical(c, src), a)
    with pytest.raises(ValueError):
        P.canonical_from_source(a, "nope")


# =================================================================== data, hand-made

def test_data_root_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv(D.ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError, match="SSALESIONSEG_DATA"):
        D.data_root()
    with pytest.raises(FileNotFoundError, match="--data"):
        D.data_root(None)
    with pytest.raises(FileNotFoundError):
        D.data_root(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="neither medseg100/ nor covid-semiseg/Dataset/ is in it"):
        D.data_root(tmp_path)
    (tmp_path / "medseg100").mkdir()
    assert D.data_root(tmp_path) == tmp_path
    monkeypatch.setenv(D.ENV_VAR, str(tmp_path))
    assert D.data_root() == tmp_path
    with pytest.raises(FileNotFoundError, match=r"it is inside the data root: give "):
        D.data_root(tmp_path / "medseg100")   # one level too deep
    (tmp_path / "covid-semiseg" / "Dataset").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=f"inside the data root: give {tmp_path.resolve()}"):
        D.data_root(tmp_path / "covid-semiseg" / "Dataset")   # two levels


def test_split_train_val_deterministic():
    items = list(range(20))
    tr, va = D.split_train_val(items, 4, seed=3)
    assert (tr, va) == D.split_train_val(items, 4, seed=3)
    assert len(va) == 4 and sorted(tr + va) == items and tr == sorted(tr) and va == sorted(va)
    assert va != D.split_train_val(items, 4, seed=4)[1]


def test_match_intensity_maps_anchors():
    img = np.array([14, 99, 0, 255], np.uint8)
    out = D.match_intensity(img, D.CORONACASES_ANCHORS, D.LABELED_ANCHORS)
    assert out.dtype == np.uint8
    assert out[0] == D.LABELED_ANCHORS[0] and out[1] == D.LABELED_ANCHORS[1]
    assert out[3] == 255
    g = np.arange(256.0)
    h = 1000 * np.exp(-0.5 * ((g - 30) / 6) ** 2) + 800 * np.exp(-0.5 * ((g - 200) / 8) ** 2)
    assert D.histogram_anchors(h) == (30.0, 200.0)


def _toy_sample(i, label=True):
    img = np.full((64, 64), 40, np.uint8)
    lung = np.zeros((64, 64), bool)
    lung[10:54, 8:30] = lung[10:54, 34:56] = True
    img[lung] = 60
    lab = np.zeros((64, 64), np.uint8)
    lab[20:30, 12:20] = 1
    lab[35:45, 40:50] = 2
    img[lab > 0] = 150
    return D.Sample(id=f"toy{i}", image=img, lung=lung, label=lab if label else None,
                    spacing=(0.7, 0.7), source="toy")


def test_slice_dataset_hand_made():
    ds = D.SliceDataset([_toy_sample(0), _toy_sample(1, label=False)], size=32)
    x, y = ds[0]
    assert tuple(x.shape) == (2, 32, 32) and str(x.dtype) == "torch.float32"
    assert tuple(y.shape) == (32, 32) and str(y.dtype) == "torch.int64"
    assert set(np.unique(y.numpy())) == {0, 1, 2}
    assert np.all(x[0].numpy()[x[1].numpy() == 0] == 0)
    assert np.all(ds[1][1].numpy() == D.IGNORE_INDEX)
    yb = D.SliceDataset([_toy_sample(0)], size=32, num_classes=1)[0][1].numpy()
    assert set(np.unique(yb)) == {0, 1} and np.array_equal(yb, (y.numpy() > 0).astype(np.int64))


# ======================================================================= real data

def _fake_lungs_module():
    """Stand-in for ssanet.lungs in these tests only: dark pixels not touching the border."""
    from scipy import ndimage as ndi
    from skimage.segmentation import clear_border

    def lung_mask_from_window(img_u8):
        return ndi.binary_fill_holes(clear_border(np.asarray(img_u8) < 110))

    def lung_mask_from_hu(hu):
        return np.stack([lung_mask_from_window(P.window_hu(s)) for s in np.asarray(hu)])

    return types.SimpleNamespace(lung_mask_from_window=lung_mask_from_window,
                                 lung_mask_from_hu=lung_mask_from_hu)


@pytest.fixture
def fake_lungs(monkeypatch):
    mod = _fake_lungs_module()
    monkeypatch.setitem(sys.modules, "ssanet.lungs", mod)
    return mod


@pytest.fixture(scope="module")
def medseg_all(data_root):
    return {s.meta["slice"]: s for s in D.load_medseg100(data_root, "all")}


def _read_raw_nifti(path):
    """Raw NIfTI-1 array in file order (i, j, k), read without SimpleITK (independent check)."""
    with gzip.open(path, "rb") as f:
        buf = f.read()
    hdr = np.frombuffer(buf[:348], np.uint8)
    assert int(hdr[:4].view("<i4")[0]) == 348
    dims = hdr[40:56].view("<i2")
    datatype = int(hdr[70:72].view("<i2")[0])
    vox_offset = int(hdr[108:112].view("<f4")[0])
    dtype = {2: "u1", 4: "<i2", 8: "<i4", 16: "<f4", 64: "<f8", 512: "<u2"}[datatype]
    shape = tuple(int(d) for d in dims[1:1 + int(dims[0])])
    n = int(np.prod(shape))
    return np.frombuffer(buf, dtype, count=n, offset=vox_offset).reshape(shape, order="F")


def test_medseg_subset_counts(data_root):
    ids = {s: D.medseg_subset_slices(data_root, s) for s in D.MEDSEG_SUBSETS}
    assert [len(ids[s]) for s in ("train", "test", "free", "all")] == [50, 48, 2, 100]
    assert ids["free"] == [23, 49]
    assert sorted(ids["train"] + ids["test"] + ids["free"]) == ids["all"]
    test = D.load_medseg100(data_root, "test")
    assert len(test) == 48 and all(s.meta["subset"] == "test" for s in test)
    s = test[0]
    assert s.image.dtype == np.uint8 and s.image.shape == (512, 512)
    assert s.lung.dtype == bool and s.label.dtype == np.uint8
    assert s.spacing == (D.NOMINAL_SPACING_MM,) * 2 and s.source == "medseg100"


def test_medseg_labels_inside_lung(medseg_all):
    from scipy import ndimage as ndi
    total = outside = transposed_outside = 0
    for k, s in medseg_all.items():
        assert set(np.unique(s.label)) <= {0, 1, 2}
        les = s.label > 0
        out = les & ~s.lung
        total += int(les.sum())
        outside += int(out.sum())
        transposed_outside += int((les.T & ~s.lung).sum())
        if out.any():
            # The few misses hug the mask edge (the rendering cut the pleura tighter).
            assert ndi.distance_transform_edt(~s.lung)[out].max() <= 4.0, k
    print(f"MedSeg-100 lesion pixels inside the lung mask: {total - outside}/{total}")
    assert total > 1_700_000
    assert outside <= 200 and (total - outside) / total > 0.9999
    # PNG k pairs with tr_mask[:, :, k-1] as is: the transposed pairing misses the lungs.
    assert transposed_outside > 100_000


def test_medseg_canonical_matches_lps_volume(data_root, medseg_all):
    """Documented contract: canonical slice == ``sitk.GetArrayFromImage(DICOMOrient(img,
    "LPS"))[z]``. The MedSeg NIfTI has no orientation (qform/sform codes 0), so SimpleITK
    reads it with identity direction; the raw slice tr_mask[:, :, k-1] (read here without
    SimpleITK) through canonical_from_medseg must give that array slice, and the loader's
    label must be the same slice with effusion removed."""
    import SimpleITK as sitk
    path = data_root / "medseg100" / "tr_mask.nii.gz"
    raw = _read_raw_nifti(path)
    assert raw.shape == (512, 512, 100)
    img = sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")
    assert img.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    lps = sitk.GetArrayFromImage(img)
    for k in (1, 23, 49, 77, 100):
        canon = P.canonical_from_medseg(raw[:, :, k - 1])
        assert np.array_equal(canon, lps[k - 1])
        expect = np.where(canon == 3, 0, canon).astype(np.uint8)
        assert np.array_equal(medseg_all[k].label, expect)


@pytest.mark.parametrize("split", ["test", "train"])
def test_semiseg_crops_equal_medseg_full_slices(data_root, medseg_all, fake_lungs, split):
    crops = D.load_covid_semiseg(data_root, split)
    assert len(crops) == {"train": 50, "test": 48}[split]
    for c in crops:
        assert c.image.shape == c.label.shape == c.lung.shape and c.lung.dtype == bool
        assert set(np.unique(c.label)) <= {0, 1, 2}
        full = medseg_all[c.meta["medseg_slice"]]
        assert full.meta["subset"] == split
        r, q = c.meta["canonical_offset"]
        h, w = c.label.shape
        assert np.array_equal(full.label[r:r + h, q:q + w], c.label), c.id
    binary = D.load_covid_semiseg(data_root, split, task="binary")
    assert [b.meta["file"] for b in binary] == [c.meta["file"] for c in crops]
    for b, c in zip(binary, crops):
        assert np.array_equal(b.label, (c.label > 0).astype(np.uint8))


def test_default_splits(data_root):
    sp = D.default_splits(data_root)
    assert {k: len(v) for k, v in sp.items()} == {"train": 46, "val": 6, "test": 48}
    ids = {k: [s.id for s in v] for k, v in sp.items()}
    assert {"medseg100_023", "medseg100_049"} <= set(ids["val"])
    assert not set(ids["train"]) & set(ids["val"]) and not set(ids["test"]) & set(ids["train"] + ids["val"])
    assert all(s.meta["subset"] == "test" for s in sp["test"])
    assert ids == {k: [s.id for s in v] for k, v in D.default_splits(data_root).items()}


def test_augmentation_reproducible(medseg_all):
    samples = [medseg_all[k] for k in (2, 40)]
    ds = D.SliceDataset(samples, size=256, augment=True, seed=5)
    ds.set_epoch(3)
    a = [ds.arrays(i) for i in range(2)]
    ds.set_epoch(3)
    b = [ds.arrays(i) for i in range(2)]
    for (ia, la, ya), (ib, lb, yb) in zip(a, b):
        assert np.array_equal(ia, ib) and np.array_equal(la, lb) and np.array_equal(ya, yb)
    ds.set_epoch(4)
    c = ds.arrays(0)
    assert not np.array_equal(a[0][0], c[0])
    other = D.SliceDataset(samples, size=256, augment=True, seed=6)
    other.set_epoch(3)
    assert not np.array_equal(other.arrays(0)[0], a[0][0])
    # Geometry is applied jointly: the label stays on the (transformed) lung.
    for img, lung, lab in a + [c]:
        assert img.dtype == np.float32 and 0 <= img.min() and img.max() <= 255
        assert set(np.unique(lab)) <= {0, 1, 2}
        les = lab > 0
        assert (lung[les]).mean() > 0.99
    x, y = ds[0]
    assert np.array_equal(x.numpy(), P.make_input(*ds.arrays(0)[:2]))
    # (augmentation speed is a benchmark figure, not a test: it failed on a loaded CPU)


def _phantom_slice(n=96):
    yy, xx = np.mgrid[:n, :n]
    lung = ((yy - n / 2) ** 2 / (0.35 * n) ** 2 + (xx - n / 2) ** 2 / (0.4 * n) ** 2) < 1
    image = np.where(lung, 40.0 + 100.0 * (xx / n), 0.0).astype(np.float32)
    label = np.zeros((n, n), np.uint8)
    label[(yy - n / 2) ** 2 + (xx - 0.6 * n) ** 2 < (0.1 * n) ** 2] = 1
    label[(yy - 0.4 * n) ** 2 + (xx - 0.35 * n) ** 2 < (0.08 * n) ** 2] = 2
    image[label == 1] = 160.0
    image[label == 2] = 230.0
    return image, lung, label


def test_standard_augmentation_draws_only_its_six_numbers():
    """The optional terms (elastic, noise, blur) draw nothing when off, so the standard
    preset gives the same augmentations as before they existed."""
    image, lung, label = _phantom_slice()
    rng = np.random.default_rng(11)
    D.augment_slice(image, lung, label, rng, D.AUGMENT_PRESETS["standard"])
    ref = np.random.default_rng(11)
    ref.random(6)
    assert rng.random() == ref.random()


def test_elastic_path_matches_affine_path_without_displacement():
    import dataclasses
    image, lung, label = _phantom_slice()
    base = dataclasses.replace(D.AUGMENT_PRESETS["standard"], max_rotation_deg=25.0, scale=(0.8, 1.2))
    zero_field = dataclasses.replace(base, elastic_p=1.0, elastic_std=0.0)
    a = D.augment_slice(image, lung, label, np.random.default_rng(3), base)
    b = D.augment_slice(image, lung, label, np.random.default_rng(3), zero_field)
    np.testing.assert_allclose(a[0], b[0], atol=1e-3)
    assert (a[1] != b[1]).mean() < 1e-3 and (a[2] != b[2]).mean() < 1e-3


def test_strong_augmentation_deforms_jointly_and_keeps_values_valid():
    import dataclasses
    image, lung, label = _phantom_slice()
    cfg = dataclasses.replace(D.AUGMENT_PRESETS["strong"], elastic_p=1.0, elastic_std=0.03,
                              noise_p=1.0, blur_p=0.0)
    plain = dataclasses.replace(cfg, elastic_p=0.0, noise_p=0.0)
    im, lu, la = D.augment_slice(image, lung, label, np.random.default_rng(5), cfg)
    im0, lu0, la0 = D.augment_slice(image, lung, label, np.random.default_rng(5), plain)
    # The deformation moved the anatomy (same affine draw, different geometry) ...
    assert (lu != lu0).mean() > 0.005
    # ... of image, lung and label together: lesions stay on the lung, classes stay classes.
    assert set(np.unique(la)) <= {0, 1, 2} and (la == 2).any()
    assert lu[la > 0].mean() > 0.99
    assert im.dtype == np.float32 and im.min() >= 0 and im.max() <= 255
    # Noise only inside the lung (its draw comes last, so without it all else is equal).
    quiet = D.augment_slice(image, lung, label, np.random.default_rng(5),
                            dataclasses.replace(cfg, noise_p=0.0))
    assert np.array_equal(quiet[1], lu) and np.array_equal(quiet[2], la)
    assert np.array_equal(quiet[0][~lu], im[~lu])
    assert np.abs(quiet[0][lu] - im[lu]).mean() > 0.5


def test_slice_dataset_real(medseg_all):
    samples = [medseg_all[k] for k in (1, 2, 3)]
    for nc in (3, 1):
        ds = D.SliceDataset(samples, size=256, num_classes=nc)
        x, y = ds[1]
        assert tuple(x.shape) == (2, 256, 256) and str(x.dtype) == "torch.float32"
        assert tuple(y.shape) == (256, 256) and str(y.dtype) == "torch.int64"
        xn = x.numpy()
        assert set(np.unique(xn[1])) <= {0.0, 1.0} and xn[0].max() <= 1.0
        assert np.all(xn[0][xn[1] == 0] == 0)
        assert set(np.unique(y.numpy())) <= ({0, 1, 2} if nc == 3 else {0, 1})


def test_unlabeled_pool(data_root, fake_lungs):
    recs = D.load_unlabeled(data_root)
    assert len(recs) == 1600
    assert sum(r.source == "coronacases" for r in recs) == 1119
    assert len({r.volume for r in recs}) == 20
    cc = next(r for r in recs if r.source == "coronacases" and r.index == 60)
    rp = next(r for r in recs if r.source == "radiopaedia")
    raw_cc, raw_rp = D._read_gray(cc.path), D._read_gray(rp.path)
    s = cc.load()
    assert s.label is None and s.image.shape == raw_cc.shape[::-1] and s.lung.dtype == bool
    assert s.meta["normalized"]
    plain = D.UnlabeledSlice(cc.id, cc.path, cc.source, cc.volume, cc.index, normalize=False).load()
    assert np.array_equal(plain.image, np.rot90(raw_cc, 1))
    assert np.array_equal(s.image, D.match_intensity(plain.image, D.CORONACASES_ANCHORS))
    r = rp.load()
    assert np.array_equal(r.image, raw_rp.T) and not r.meta["normalized"]


def _write(arr, path, direction, origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0)):
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(arr)
    img.SetDirection(direction)
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


def test_load_volume_pairs_reorients_to_canonical(tmp_path, medseg_all, fake_lungs):
    """Label volumes stored LPS, RAS-flipped and with rows/columns swapped all load back as
    the canonical MedSeg slices (a SimpleITK volume built from the canonical label stack)."""
    ks = (2, 40, 77)
    lab = np.stack([medseg_all[k].label for k in ks])  # canonical (Z, Y, X)
    lung = np.stack([medseg_all[k].lung for k in ks]).astype(np.uint8)
    hu = np.where(lung > 0, lab.astype(np.float32) * 300.0 - 900.0, 40.0).astype(np.float32)
    nz, ny, nx = lab.shape
    sx, sy = 0.6, 0.8
    layouts = {
        "lps": (lambda a: a, (1, 0, 0, 0, 1, 0, 0, 0, 1), (0.0, 0.0, 0.0), (sx, sy, 1.0)),
        # RAS storage: i runs right->left reversed, j anterior->posterior reversed.
        "ras": (lambda a: a[:, ::-1, ::-1], (-1, 0, 0, 0, -1, 0, 0, 0, 1),
                ((nx - 1) * sx, (ny - 1) * sy, 0.0), (sx, sy, 1.0)),
        # Swapped in-plane axes: index i is the anterior-posterior direction.
        "swap": (lambda a: np.swapaxes(a, 1, 2), (0, 1, 0, 1, 0, 0, 0, 0, 1), (0.0, 0.0, 0.0),
                 (sy, sx, 1.0)),
    }
    for name, (f, direction, origin, spacing) in layouts.items():
        for sub in ("img", "lab", "lung"):
            (tmp_path / name / sub).mkdir(parents=True)
        for arr, rel in ((hu, "img/case_a.nii.gz"), (lab, "lab/case_a.nii.gz"), (lung, "lung/case_a.nrrd")):
            _write(np.ascontiguousarray(f(arr)), tmp_path / name / rel, direction, origin, spacing)
        got = D.load_volume_pairs(tmp_path / name / "img", tmp_path / name / "lab", tmp_path / name / "lung")
        assert [s.meta["z"] for s in got] == [0, 1, 2], name
        for s, z in zip(got, range(nz)):
            assert np.array_equal(s.label, lab[z]), name
            assert np.array_equal(s.lung, lung[z] > 0), name
            assert np.array_equal(s.image, np.rint(P.window_hu(hu[z])).astype(np.uint8)), name
            assert s.spacing == pytest.approx((sy, sx)), name
            assert s.image.dtype == np.uint8 and s.id == f"case_a_z{z:03d}"

    # Lung from the (stand-in) lung step, and unlabeled volumes.
    got = D.load_volume_pairs(tmp_path / "ras" / "img")
    assert got and all(s.label is None for s in got)
    assert np.array_equal(got[0].lung, fake_lungs.lung_mask_from_hu(hu)[got[0].meta["z"]])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        D.load_volume_pairs(tmp_path / "ras" / "img", tmp_path / "empty")


def _write_case(folder, name, spacing=(0.9, 0.9, 3.0), shape=(4, 300, 320)):
    """A CT in HU (lung disks, soft tissue elsewhere) with a 20 mm GGO disk, its labels and
    lungs, in the layout of the Slicer module's 'Export as training case'."""
    import SimpleITK as sitk
    z, h, w = shape
    yy, xx = np.mgrid[:h, :w] * spacing[0]
    lung = np.zeros(shape, bool)
    lung[:] = ((yy - 150) ** 2 + (xx - 90) ** 2 < 60 ** 2) | ((yy - 150) ** 2 + (xx - 200) ** 2 < 60 ** 2)
    lesion = np.zeros(shape, np.uint8)
    lesion[:] = np.where((yy - 140) ** 2 + (xx - 80) ** 2 < 20 ** 2, 1, 0)
    hu = np.where(lung, -850, 40).astype(np.int16)
    hu[lesion == 1] = -500
    for sub, arr in (("images", hu), ("labels", lesion), ("lungs", lung.astype(np.uint8))):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(spacing)
        (folder / sub).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(folder / sub / f"{name}.nii.gz"))
    return float((lesion[0] == 1).sum()) * spacing[0] * spacing[1]


def test_training_cases_land_on_the_model_grid(tmp_path):
    area_mm2 = _write_case(tmp_path / "export", "case1")
    samples = D.load_training_cases(tmp_path / "export", pixel_mm=0.7, fov=512)
    assert len(samples) == 4 and all(s.image.shape == (512, 512) for s in samples)
    s = samples[0]
    assert s.spacing == (0.7, 0.7) and s.label.shape == s.lung.shape == (512, 512)
    # physical size kept: the 20 mm GGO disk covers the same mm² at 0.7 mm pixels
    assert (s.label == 1).sum() * 0.49 == pytest.approx(area_mm2, rel=0.03)
    # the lungs are centred in the field of view, as the pipeline crops them
    ys, xs = np.nonzero(s.lung)
    assert abs(ys.mean() - 255.5) < 3 and abs(xs.mean() - 255.5) < 3
    assert s.image[s.lung].mean() < s.image[~s.lung & (s.image > 0)].mean()


def test_training_cases_refuse_what_segment_and_stats_would_refuse(tmp_path):
    """A CT not in HU, labels that are not 0/1/2, and a label on another grid than its CT
    are refused with the file named (train used to take all three without a word)."""
    import SimpleITK as sitk

    def case(name):
        folder = tmp_path / name
        _write_case(folder, "c")
        return folder

    def rewrite(path, fn):
        img = sitk.ReadImage(str(path))
        new = fn(img)
        sitk.WriteImage(new, str(path))

    folder = case("rescaled")   # the CT rescaled to 0..255, as an 8-bit export would be
    rewrite(folder / "images" / "c.nii.gz", lambda im: sitk.Cast(sitk.RescaleIntensity(im, 0, 255), sitk.sitkUInt8))
    with pytest.raises(ValueError, match=r"c\.nii\.gz does not look like a CT in Hounsfield units"):
        D.load_training_cases(folder)
    folder = case("mask255")   # a 0/255 mask
    rewrite(folder / "labels" / "c.nii.gz", lambda im: sitk.Cast(im * 255, sitk.sitkUInt8))
    with pytest.raises(ValueError, match=r"holds values \[255\]; training cases use 0 background, 1 GGO"):
        D.load_training_cases(folder)
    folder = case("shifted")   # the label moved 50 mm: same shape, another place
    def shift(im):
        im.SetOrigin((50.0, 0.0, 0.0))
        return im
    rewrite(folder / "labels" / "c.nii.gz", shift)
    with pytest.raises(ValueError, match="not on its image's grid"):
        D.load_training_cases(folder)
    assert len(D.load_training_cases(case("good"))) == 4


def test_training_cases_folder_must_have_the_export_layout(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="labels/"):
        D.load_training_cases(tmp_path)


def test_semiseg_renderings_keep_validation_slices_out_of_training(data_root):
    splits = D.default_splits(data_root)
    both = D.with_semiseg_renderings(splits, data_root)
    train_crops = [s for s in both["train"] if s.source == "covid-semiseg"]
    val_crops = [s for s in both["val"] if s.source == "covid-semiseg"]
    val_slices = {s.meta["slice"] for s in splits["val"]}
    assert len(train_crops) == 46 and len(val_crops) == 4
    assert not {c.meta["medseg_slice"] for c in train_crops} & val_slices
    assert {c.meta["medseg_slice"] for c in val_crops} <= val_slices
    assert both["test"] is splits["test"]
    # each crop renders a MedSeg training slice: the same lesion pixels, on the model's grid
    by_slice = {s.meta["slice"]: s for s in splits["train"]}
    for c in train_crops:
        assert c.image.shape == c.label.shape == (512, 512) and c.spacing == (0.7, 0.7)
        ref = by_slice[c.meta["medseg_slice"]].label
        for k in (1, 2):   # a few MedSeg lesion pixels lie outside the crop
            assert (c.label == k).sum() == pytest.approx((ref == k).sum(), rel=0.005, abs=5)


@pytest.mark.parametrize("dtype, gz", [(np.uint8, True), (np.int16, False), (np.float32, True)])
def test_nifti_fallback_reader_matches_simpleitk(tmp_path, dtype, gz):
    sitk = pytest.importorskip("SimpleITK")
    arr = (np.arange(5 * 4 * 3).reshape(5, 4, 3) * 7 % 251).astype(dtype)   # (k, j, i) for SimpleITK
    path = tmp_path / ("v.nii.gz" if gz else "v.nii")
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    got = D.read_nifti_raw(path)
    assert got.shape == (3, 4, 5) and got.dtype == dtype
    assert np.array_equal(got, np.transpose(arr, (2, 1, 0)))
    (tmp_path / "bad.nii").write_bytes(b"\0" * 400)
    with pytest.raises(ValueError, match="not a NIfTI-1 file"):
        D.read_nifti_raw(tmp_path / "bad.nii")


def test_medseg_labels_load_without_simpleitk(data_root, monkeypatch):
    path = str(data_root / "medseg100" / "tr_mask.nii.gz")
    with_sitk = D._medseg_label_volume.__wrapped__(path)
    monkeypatch.setitem(sys.modules, "SimpleITK", None)            # import SimpleITK -> ImportError
    without = D._medseg_label_volume.__wrapped__(path)
    assert without.shape == (512, 512, 100) and np.array_equal(with_sitk, without)
    assert set(np.unique(without)) <= {0, 1, 2, 3}
