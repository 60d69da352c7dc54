"""A tiny real training run: loss goes down, checkpoints load, an interrupted run resumes."""
import csv
import json
from pathlib import Path

import pytest
import torch

from ssanet import checkpoint as ckpt
from ssanet import data
from ssanet.cli import build_parser, main as cli_main
from ssanet.train import TrainConfig, make_loader, train


@pytest.fixture(scope="module")
def few_slices(data_root):
    torch.set_num_threads(1)
    splits = data.default_splits(data_root)
    return splits["train"][:4], splits["val"][:2]


def _rows(run):
    with open(run / "log.csv") as f:
        return list(csv.DictReader(f))


def test_loss_goes_down_and_run_resumes(few_slices, tmp_path):
    train_s, val_s = few_slices
    cfg = TrainConfig(size=64, epochs=6, batch_size=4, lr=2e-3, sad_start_epoch=3, val_every=3,
                      device="cpu", time_limit_min=1e-6)
    run = tmp_path / "run"
    train(cfg, train_s, val_s, run, log=lambda *_: None)
    assert [r["epoch"] for r in _rows(run)] == ["1"], "time limit must stop after the first epoch"
    cfg.time_limit_min = 0.0
    said = []
    train(cfg, train_s, val_s, run, log=said.append)        # resumes at epoch 2
    assert f"resuming {run} after epoch 1 of 6" in said and not any("never switches on" in x for x in said)
    rows = _rows(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    losses = [float(r["dice"]) + float(r["ce"]) for r in rows]
    assert min(losses[-2:]) < losses[0]
    assert float(rows[3]["sad"]) > 0 and float(rows[1]["sad"]) == 0   # SAD on from epoch index 3
    model, meta = ckpt.load_checkpoint(run / "best.safetensors")
    assert meta["preprocessing"]["size"] == 64 and meta["class_names"][1] == "ggo"
    assert set(meta["val_metrics"]) == {"infection", "ggo", "consolidation"}
    assert (run / "curves.png").stat().st_size > 1000
    # another configuration in the same folder is refused instead of silently mixed
    with pytest.raises(SystemExit, match="another configuration"):
        train(TrainConfig(size=64, epochs=7, device="cpu"), train_s, val_s, run, log=said.append)
    assert any("SAD starts at epoch 40 (--sad-start) and this run has 7: it never switches on" in x for x in said)


def test_evaluate_cli_writes_the_documented_json(data_root, tmp_path, few_slices, capsys):
    from ssanet.model import SSANet
    torch.manual_seed(0)
    p = tmp_path / "m.safetensors"
    ckpt.save_checkpoint(p, SSANet(2, 3, layers=(1, 1, 1, 1)), {"preprocessing": {"size": 64}})
    out = tmp_path / "eval.json"
    rc = cli_main(["evaluate", "--data", str(data_root), "--checkpoint", str(p), "--split", "val",
                   "--json", str(out), "--device", "cpu"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["n_slices"] == 6 and len(res["per_slice"]) == 6
    for c in ("infection", "ggo", "consolidation"):
        assert set(res["classes"][c]) == {"dsc", "hd95_mm", "mae", "nsd_3mm", "dsc_pooled"}
        assert 0.0 <= res["classes"][c]["dsc"] <= 1.0
    printed = capsys.readouterr().out
    assert "infection" in printed
    # the scores printed for a validation split are in the JSON too, with the file scored
    line = next(x for x in printed.splitlines() if x.startswith("validation score"))
    assert f"{res['val_score']:.4f}" == line.split()[-1] and res["checkpoint_path"] == str(p)


def test_cuda_request_without_cuda_is_a_clear_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    rc = cli_main(["evaluate", "--checkpoint", str(tmp_path / "x.safetensors"), "--device", "cuda"])
    assert rc == 2


def test_fixed_steps_per_epoch_whatever_the_set_size():
    ds = torch.utils.data.TensorDataset(torch.arange(7))
    one_pass = make_loader(ds, TrainConfig(batch_size=2), torch.Generator().manual_seed(0))
    assert len(one_pass) == 3                                  # 7 slices, last short batch dropped
    fixed = make_loader(ds, TrainConfig(batch_size=2, steps_per_epoch=10), torch.Generator().manual_seed(0))
    batches = [b[0].tolist() for b in fixed]
    assert len(fixed) == len(batches) == 10 and all(len(b) == 2 for b in batches)
    drawn = sum(batches, [])
    assert sorted(drawn[:7]) == list(range(7))                 # whole permutations, not i.i.d. draws
    small = make_loader(ds, TrainConfig(batch_size=2, steps_per_epoch=2), torch.Generator().manual_seed(0))
    assert len([b for b in small]) == 2


def _synthetic_slices(n, size=64):
    import numpy as np
    from ssanet.data import Sample
    yy, xx = np.mgrid[:size, :size]
    lung = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.4 * size) ** 2
    out = []
    for i in range(n):
        lab = np.zeros((size, size), np.uint8)
        lab[20 + i:30 + i, 20:30] = 1
        lab[36:44, 36 + i:44 + i] = 2
        img = np.where(lung, 40, 0).astype(np.uint8)
        img[lab == 1], img[lab == 2] = 120, 220
        out.append(Sample(id=f"s{i}", image=img, lung=lung, label=lab, spacing=(0.7, 0.7),
                          source="synthetic"))
    return out


def test_worker_processes_give_the_same_augmented_batches():
    from ssanet.data import SliceDataset
    from ssanet.train import loader_workers
    ds = SliceDataset(_synthetic_slices(6), size=64, augment=True, seed=3, num_classes=3)
    cfg = TrainConfig(batch_size=2)

    def batches(loader, epoch):
        ds.set_epoch(epoch)
        return list(loader)

    inline = make_loader(ds, cfg, torch.Generator().manual_seed(0), 0)
    pool = make_loader(ds, cfg, torch.Generator().manual_seed(0), 2)
    assert pool.persistent_workers
    for epoch in (0, 1, 2):     # the same two worker processes serve every epoch
        a, b = batches(inline, epoch), batches(pool, epoch)
        assert len(a) == len(b) == 3
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    fresh = make_loader(ds, cfg, torch.Generator().manual_seed(0), 0)
    x0 = batches(fresh, 0)[0][0]
    fresh = make_loader(ds, cfg, torch.Generator().manual_seed(0), 0)
    x1 = batches(fresh, 1)[0][0]
    assert not torch.equal(x0, x1)                             # augmentation follows the epoch
    assert loader_workers(TrainConfig(), torch.device("cpu")) == 0
    assert loader_workers(TrainConfig(workers=3), torch.device("cpu")) == 3
    assert 0 <= loader_workers(TrainConfig(), torch.device("cuda")) <= 4


def test_init_fine_tunes_from_the_checkpoint_weights(tmp_path):
    from ssanet.model import SSANet
    torch.set_num_threads(1)
    torch.manual_seed(123)
    init = tmp_path / "init.safetensors"
    init_sha = ckpt.save_checkpoint(init, SSANet(2, 3), {"preprocessing": {"size": 64}})
    slices = _synthetic_slices(3)
    # learning rate 0: the run's weights are exactly the checkpoint's (BatchNorm statistics aside)
    cfg = TrainConfig(size=64, epochs=1, batch_size=2, lr=0.0, weight_decay=0.0, sad_start_epoch=0,
                      val_every=1, device="cpu", amp=False, init=str(init))
    train(cfg, slices[:2], slices[2:], tmp_path / "ft", log=lambda *_: None)
    ref, _ = ckpt.load_checkpoint(init)
    got, meta = ckpt.load_checkpoint(tmp_path / "ft" / "last.safetensors")
    ref_sd, got_sd = ref.state_dict(), got.state_dict()
    weights = [k for k in ref_sd if k.endswith("weight")]
    assert weights and all(torch.equal(ref_sd[k], got_sd[k]) for k in weights)
    assert meta["training"]["init_sha256"] == init_sha
    # a run from scratch does not start from those weights
    scratch = TrainConfig(**{**cfg.__dict__, "init": ""})
    train(scratch, slices[:2], slices[2:], tmp_path / "scratch", log=lambda *_: None)
    other, meta2 = ckpt.load_checkpoint(tmp_path / "scratch" / "last.safetensors")
    assert not torch.equal(other.state_dict()[weights[0]], ref_sd[weights[0]])
    assert "init_sha256" not in meta2["training"]


def test_init_with_other_classes_is_refused(tmp_path, capsys):
    from ssanet.model import SSANet
    binary = tmp_path / "binary.safetensors"
    ckpt.save_checkpoint(binary, SSANet(2, 1, layers=(1, 1, 1, 1)), {"preprocessing": {"size": 64}})
    slices = _synthetic_slices(2)
    cfg = TrainConfig(size=64, epochs=1, batch_size=2, device="cpu", init=str(binary))
    with pytest.raises(ckpt.CheckpointError, match="classes"):
        train(cfg, slices[:1], slices[1:], tmp_path / "ft", log=lambda *_: None)
    # the CLI refuses it before reading any data, and leaves no run folder behind
    assert cli_main(["train", "--data", str(tmp_path / "no_data_needed"), "--out", str(tmp_path / "cli_ft"),
                     "--init", str(binary), "--classes", "ggo,consolidation"]) == 2
    assert "classes" in capsys.readouterr().err and not (tmp_path / "cli_ft").exists()


def test_train_cli_adds_exported_cases(data_root, tmp_path, capsys):
    from test_data import _write_case  # pytest's prepend import mode puts Testing/python on sys.path
    _write_case(tmp_path / "export", "corrected_case")
    run = tmp_path / "run"
    rc = cli_main(["train", "--data", str(data_root), "--out", str(run), "--size", "64", "--epochs", "1",
                   "--batch-size", "4", "--steps-per-epoch", "1", "--device", "cpu",
                   "--cases", str(tmp_path / "export")])
    assert rc in (0, None)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data_description"]["cases"] == {str((tmp_path / "export").absolute()): 4}   # by path: two may share a name
    rc = cli_main(["train", "--data", str(data_root), "--out", str(tmp_path / "run2"), "--epochs", "1",
                   "--cases", str(tmp_path / "nothing")])
    assert rc != 0 and "Export as training case" in capsys.readouterr().err
    assert not (tmp_path / "run2").exists()
    # a case without lesion pixels trains, and says so (an export that lost its segments?)
    import SimpleITK as sitk
    empty = tmp_path / "empty_export"
    _write_case(empty, "negative")
    lab = sitk.ReadImage(str(empty / "labels" / "negative.nii.gz"))
    sitk.WriteImage(lab * 0, str(empty / "labels" / "negative.nii.gz"))
    capsys.readouterr()
    assert cli_main(["train", "--data", str(data_root), "--out", str(tmp_path / "run3"), "--size", "64",
                     "--epochs", "1", "--batch-size", "4", "--steps-per-epoch", "1", "--device", "cpu",
                     "--cases", str(empty)]) in (0, None)
    assert "case negative has no lesion pixels" in capsys.readouterr().out
    # held-out cases are scored on the same grid: evaluate --cases
    out = tmp_path / "cases_eval.json"
    assert cli_main(["evaluate", "--checkpoint", str(run / "best.safetensors"), "--cases", str(tmp_path / "export"),
                     "--device", "cpu", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_slices"] == 4 and res["dataset"] == "cases" and "score of the cases" in capsys.readouterr().out
    # a second run never replaces an earlier result file unless asked to, and refuses before scoring
    out.write_text("{\"kept\": 1}")
    rc = cli_main(["evaluate", "--checkpoint", str(run / "best.safetensors"), "--cases", str(tmp_path / "export"),
                   "--device", "cpu", "--json", str(out)])
    err = capsys.readouterr()
    assert rc == 2 and "exists" in err.err and "--overwrite" in err.err and "score of the cases" not in err.out
    assert json.loads(out.read_text()) == {"kept": 1}
    assert cli_main(["evaluate", "--checkpoint", str(run / "best.safetensors"), "--cases", str(tmp_path / "export"),
                     "--device", "cpu", "--json", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["n_slices"] == 4


def test_cases_only_trains_without_the_shared_data(tmp_path, monkeypatch, capsys):
    """A researcher with only their own corrected cases: `train --cases-only` needs no data
    root; whole cases are held out for validation (or --val-cases), never one case in both."""
    from test_data import _write_case  # pytest's prepend import mode puts Testing/python on sys.path
    monkeypatch.delenv("SSALESIONSEG_DATA", raising=False)
    cases, val = tmp_path / "cases", tmp_path / "val"
    for k, name in enumerate(("a", "b", "c")):   # three CTs (slice spacing tells them apart)
        _write_case(cases, name, spacing=(0.9, 0.9, 3.0 + 0.1 * k))
    _write_case(val, "v", spacing=(0.9, 0.9, 2.5))   # another CT than the training cases
    common = ["--size", "64", "--epochs", "1", "--batch-size", "2", "--steps-per-epoch", "1", "--device", "cpu"]
    run = tmp_path / "run"
    assert cli_main(["train", "--out", str(run), "--cases", str(cases), "--cases-only", *common]) in (0, None)
    desc = json.loads((run / "config.json").read_text())["data_description"]
    assert len(desc["val_cases"]) == 1 and desc["n_train"] == 8 and len(desc["val"]) == 4   # 3 cases x 4 slices
    held = Path(desc["val_cases"][0]).name.split(".")[0]
    assert held in ("a", "b", "c") and all(i.startswith(held + "_z") for i in desc["val"])
    assert desc["train"] == "8 slices of exported cases"
    model, meta = ckpt.load_checkpoint(run / "best.safetensors")
    assert meta["val_metrics"]
    assert "held out of --cases" in capsys.readouterr().out
    run2 = tmp_path / "run2"
    assert cli_main(["train", "--out", str(run2), "--cases", str(cases), "--val-cases", str(val), "--cases-only",
                     *common]) in (0, None)
    desc = json.loads((run2 / "config.json").read_text())["data_description"]
    assert desc["n_train"] == 12 and [Path(p).name for p in desc["val_cases"]] == ["v.nii.gz"]
    # refused: no cases, the shared data's options, a case in both, one case to hold out, a
    # held-out case whose CT also trains under another name
    dup = tmp_path / "dup"
    for name in ("x", "y"):
        _write_case(dup, name)
    for args, message in (
            (["--cases-only"], "give them with --cases"),
            (["--cases", str(cases), "--cases-only", "--semiseg-renderings"], "reads no COVID-SemiSeg"),
            (["--cases", str(cases), "--val-cases", str(cases), "--cases-only"], "(validation) is the CT of"),
            (["--cases", str(val), "--cases-only"], "needs at least two"),
            (["--cases", str(dup), "--cases-only"], "(validation) is the CT of")):
        with pytest.raises(SystemExit) as e:
            rc = cli_main(["train", "--out", str(tmp_path / "no"), *args, *common])
            raise SystemExit(rc)
        assert e.value.code != 0
        assert message in f"{e.value.code} {capsys.readouterr().err}"
    assert not (tmp_path / "no").exists()


def test_exported_cases_are_checked_before_training(tmp_path, monkeypatch, capsys):
    """A binary (infection) export is not trained as GGO; the same CT exported twice is one
    case (no validation on a training case); without the shared data the error names
    --cases-only; a changed rerun names what changed; evaluate takes several folders."""
    import shutil
    from test_data import _write_case
    monkeypatch.delenv("SSALESIONSEG_DATA", raising=False)
    cases, copy, binary = tmp_path / "cases", tmp_path / "copy", tmp_path / "binary"
    for k, name in enumerate(("a", "b")):
        _write_case(cases, name, spacing=(0.9, 0.9, 3.0 + 0.1 * k))
    for sub in ("images", "labels"):
        (copy / sub).mkdir(parents=True)
        shutil.copy(cases / sub / "a.nii.gz", copy / sub / "again.nii.gz")
    _write_case(binary, "bin")
    (binary / "labels" / "bin.json").write_text(json.dumps({"class_names": ["background", "infection"]}))
    common = ["--size", "64", "--epochs", "1", "--batch-size", "2", "--steps-per-epoch", "1", "--device", "cpu"]

    def refused(args, message):
        with pytest.raises(SystemExit) as e:
            raise SystemExit(cli_main(["train", "--out", str(tmp_path / "no"), *args, *common]))
        assert e.value.code != 0 and message in f"{e.value.code} {capsys.readouterr().err}"

    refused(["--cases", str(binary), "--cases", str(cases), "--cases-only"], "hold infection labels")
    refused(["--cases", str(cases), "--val-cases", str(copy), "--cases-only"], "is the CT of")
    refused(["--cases", str(cases)], "add --cases-only")
    assert not (tmp_path / "no").exists()
    run = tmp_path / "run"
    assert cli_main(["train", "--out", str(run), "--cases", str(cases), "--cases", str(binary), "--cases-only",
                     "--classes", "infection", *common]) in (0, None)
    refused_run = ["train", "--out", str(run), "--cases", str(cases), "--cases", str(binary), "--cases-only",
                   "--classes", "infection", *[("3" if a == "1" and common[i - 1] == "--epochs" else a)
                                               for i, a in enumerate(common)]]
    assert cli_main(refused_run) == 2 and "epochs: 1 -> 3" in capsys.readouterr().err
    out = tmp_path / "eval.json"
    assert cli_main(["evaluate", "--checkpoint", str(run / "best.safetensors"), "--cases", str(cases),
                     "--cases", str(copy), "--device", "cpu", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["n_slices"] == 12
    printed = capsys.readouterr()
    # a copy of a training case in another folder is known by its content, not its folder; the
    # case held out for validation (b) is not one the model was trained on
    assert f"1 of the case(s) of {cases} (a) are CTs this model was trained on (same content)" in printed.err
    assert f"the case(s) of {copy} (again) are CTs this model was trained on (same content)" in printed.err
    # each folder's own figures beside the pooled ones, its slices counted
    lines = [line for line in printed.out.splitlines() if "slices, per-slice mean DSC" in line]
    assert [line.split(":")[0].strip() for line in lines] == [str(cases), str(copy)]
    assert sum(int(line.split(": ")[1].split()[0]) for line in lines) == 12 and "infection" in lines[1]
    n_copy = int(lines[1].split(": ")[1].split()[0])
    rows = json.loads(out.read_text())["per_slice"][-n_copy:]   # the copy's slices come last
    assert lines[1].endswith(f"infection {sum(r['infection']['dsc'] for r in rows) / n_copy:.3f}")
    # the same run resumes when its folders are spelt another way (relative vs absolute)
    monkeypatch.chdir(tmp_path)
    again = ["train", "--out", str(run), "--cases", "cases", "--cases", str(binary), "--cases-only",
             "--classes", "infection", *common]
    assert cli_main(again) in (0, None) and "nothing to do" in capsys.readouterr().out
    # a GGO / consolidation model is not scored on infection labels either
    three = tmp_path / "three"
    assert cli_main(["train", "--out", str(three), "--cases", str(cases), "--cases-only", *common]) in (0, None)
    for split in ("test", "val"):   # not silently the cases instead of the split asked for, default or not
        assert cli_main(["evaluate", "--checkpoint", str(three / "best.safetensors"), "--cases", str(cases),
                         "--split", split, "--device", "cpu"]) == 2
        assert "give one or the other" in capsys.readouterr().err
    assert cli_main(["evaluate", "--checkpoint", str(three / "best.safetensors"), "--cases", str(binary),
                     "--device", "cpu"]) == 2
    assert "cannot be scored on them" in capsys.readouterr().err


def test_strong_augment_run_and_average_cli(data_root, tmp_path, capsys):
    """`train --augment strong` records its preset; `average` soups two runs, scores the
    soup on validation like train does, and never overwrites a file."""
    runs = []
    for seed in (0, 1):
        run = tmp_path / f"run{seed}"
        rc = cli_main(["train", "--data", str(data_root), "--out", str(run), "--size", "64", "--epochs", "1",
                       "--batch-size", "4", "--steps-per-epoch", "1", "--device", "cpu", "--val-every", "1",
                       "--augment", "strong", "--seed", str(seed)])
        assert rc in (0, None)
        assert json.loads((run / "config.json").read_text())["augment"] == "strong"
        runs.append(run / "best.safetensors")
    capsys.readouterr()
    soup = tmp_path / "soup.safetensors"
    rc = cli_main(["average", "--data", str(data_root), *map(str, runs), "--out", str(soup), "--device", "cpu",
                   "--semiseg-renderings"])
    assert rc in (0, None)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model, meta = ckpt.load_checkpoint(soup)
    assert printed["sha256"] == meta["sha256"]
    assert len(meta["training"]["averaged_from"]) == 2
    pooled = [m["dsc_pooled"] for m in meta["val_metrics"].values()]
    assert printed["val_score"] == pytest.approx(sum(pooled) / len(pooled), abs=1e-4)
    before = soup.read_bytes()
    capsys.readouterr()
    assert cli_main(["average", "--data", str(data_root), *map(str, runs), "--out", str(soup)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {soup} exists")
    assert soup.read_bytes() == before
    # `evaluate --split val --semiseg-renderings` scores the same images the same way
    capsys.readouterr()
    out = tmp_path / "val.json"
    cli_main(["evaluate", "--data", str(data_root), "--checkpoint", str(soup), "--split", "val",
              "--semiseg-renderings", "--device", "cpu", "--json", str(out)])
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("validation score")]
    assert float(line[0].split()[-1]) == pytest.approx(printed["val_score"], abs=1e-4)
    res = json.loads(out.read_text())
    assert res["semiseg_renderings"] is True and res["n_slices"] == 10   # 6 MedSeg + 4 crops
    assert cli_main(["evaluate", "--data", str(data_root), "--checkpoint", str(soup), "--split", "test",
                     "--semiseg-renderings"]) == 2
    assert "--split val" in capsys.readouterr().err


def test_weight_ema_update_rule():
    from ssanet.model import SSANet
    from ssanet.train import WeightEMA
    net = SSANet(2, 3, layers=(1, 1, 1, 1))
    ema = WeightEMA(net, 0.5)
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net)
    d = 2 / 11    # first update: min(0.5, (1 + 1) / (10 + 1))
    name = next(k for k, _ in net.named_parameters())
    torch.testing.assert_close(ema.model.state_dict()[name], before[name] + (1 - d))
    assert not any(p.requires_grad for p in ema.model.parameters())
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(net, 1.0)


def test_ema_run_saves_the_average_and_resumes_exactly(tmp_path):
    torch.set_num_threads(1)
    slices = _synthetic_slices(5)
    # with the spatial convolution: its power-iteration vectors are part of the resume state
    cfg = TrainConfig(size=64, epochs=2, batch_size=2, lr=1e-2, sad_start_epoch=0, val_every=1,
                      device="cpu", amp=False, ema=0.9)
    train(cfg, slices[:4], slices[4:], tmp_path / "whole", log=lambda *_: None)
    stopped = TrainConfig(**{**cfg.__dict__, "time_limit_min": 1e-6})
    train(stopped, slices[:4], slices[4:], tmp_path / "resumed", log=lambda *_: None)
    assert len(_rows(tmp_path / "resumed")) == 1
    train(cfg, slices[:4], slices[4:], tmp_path / "resumed", log=lambda *_: None)
    whole, meta = ckpt.load_checkpoint(tmp_path / "whole" / "last.safetensors")
    resumed, _ = ckpt.load_checkpoint(tmp_path / "resumed" / "last.safetensors")
    raw, _ = ckpt.load_checkpoint(tmp_path / "whole" / "raw.safetensors")
    assert meta["training"]["config"]["ema"] == 0.9
    for k, v in whole.state_dict().items():   # resume continues the same average
        torch.testing.assert_close(resumed.state_dict()[k], v)
    assert _rows(tmp_path / "resumed")[1]["loss"] == _rows(tmp_path / "whole")[1]["loss"]
    gap = max(float((a - b).abs().max()) for a, b in zip(whole.state_dict().values(), raw.state_dict().values())
              if a.is_floating_point())
    assert gap > 1e-3                          # and the average is not the raw weights
    st = ckpt.load_state_for_resume(tmp_path / "whole" / "train_state.pt")
    assert st["ema_updates"] == 4    # 2 epochs x 2 batches


def test_ablation_trains_on_the_splits_train_would_use(data_root, tmp_path, monkeypatch):
    """`ablation --semiseg-renderings` trains every variant on the renderings too (it used
    to accept the option and ignore it)."""
    from ssanet import cli
    from ssanet.model import SSANet
    seen = []

    def fake_train_run(cfg, splits, out):   # record what each variant would train on
        seen.append((cfg.spatial_conv, cfg.sad, len(splits["train"]), len(splits["val"]),
                     cfg.data_description["train"]))
        Path(out).mkdir(parents=True)
        ckpt.save_checkpoint(Path(out) / "best.safetensors", SSANet(2, 3, layers=(1, 1, 1, 1)),
                             {"preprocessing": {"size": 64}})
    monkeypatch.setattr(cli, "train_run", fake_train_run)
    cli_main(["ablation", "--data", str(data_root), "--out", str(tmp_path / "ab"), "--semiseg-renderings",
              "--eval-split", "val", "--device", "cpu"])
    base = data.default_splits(data_root)
    assert len(seen) == 4 and {(sc, sad) for sc, sad, *_ in seen} == {(False, False), (False, True),
                                                                     (True, False), (True, True)}
    assert all(n_train == 2 * len(base["train"]) and n_val == len(base["val"]) + 4
               and "COVID-SemiSeg renderings" in desc for *_, n_train, n_val, desc in seen)
    assert (tmp_path / "ab" / "ablation.md").read_text().startswith("Evaluated on medseg100/val; trained at")
    assert json.loads((tmp_path / "ab" / "ablation.json").read_text())["settings"]["eval_split"] == "val"


def test_folds_validate_every_labeled_slice_once_and_keep_renderings_together(data_root):
    base = data.default_splits(data_root)
    free = {s.id for s in data.load_medseg100(data_root, "free")}
    labeled = {s.id for s in data.load_medseg100(data_root, "train")}
    seen = []
    for k in range(5):
        sp = data.fold_splits(data_root, 5, k)
        train, val = {s.id for s in sp["train"]}, {s.id for s in sp["val"]}
        assert not train & val and free <= val and (train | val) - free == labeled
        assert [s.id for s in sp["test"]] == [s.id for s in base["test"]]
        seen += sorted(val - free)
        if k == 0:   # a slice's COVID-SemiSeg crop follows it into the same fold
            both = data.with_semiseg_renderings(sp, data_root)
            val_slices = {s.meta["slice"] for s in sp["val"]}
            crops = [s for s in both["val"] if s.source == "covid-semiseg"]
            assert crops and all(c.meta["medseg_slice"] in val_slices for c in crops)
            assert all(c.meta["medseg_slice"] not in val_slices for c in both["train"] if c.source == "covid-semiseg")
    assert sorted(seen) == sorted(labeled)           # each labeled slice validated exactly once
    with pytest.raises(ValueError, match="fold 5 of 5"):
        data.fold_splits(data_root, 5, 5)


def test_train_and_evaluate_take_the_fold(data_root, tmp_path, monkeypatch, capsys):
    from ssanet import cli
    seen = {}

    def fake_train_run(cfg, splits, out):
        seen["val"] = cfg.data_description["val"]
        return {"epoch": 0, "score": 0.0}
    monkeypatch.setattr(cli, "train_run", fake_train_run)
    cli_main(["train", "--data", str(data_root), "--out", str(tmp_path / "f2"), "--folds", "5", "--fold", "2"])
    assert seen["val"] == [s.id for s in data.fold_splits(data_root, 5, 2)["val"]]
    capsys.readouterr()
    assert cli_main(["evaluate", "--data", str(data_root), "--split", "test", "--folds", "5", "--fold", "2"]) == 2
    assert "--folds go with --split val" in capsys.readouterr().err
    seen.clear()
    for cmd in (["train", "--out", str(tmp_path / "f3")], ["evaluate", "--split", "val"]):
        assert cli_main([*cmd, "--data", str(data_root), "--fold", "2"]) == 2
    assert "--fold 2 needs --folds K" in capsys.readouterr().err and not seen


def test_bench_training_script_measures_both_paths(tmp_path, script):
    out = tmp_path / "bench.json"
    script("bench_training").main(["--device", "cpu", "--size", "32", "--batch-sizes", "2", "--steps", "1",
                                    "--infer-slices", "4", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["size"] == 32 and res["train_images_per_s"]["batch2"] > 0
    assert res["infer_slices_per_s"]["plain"] > 0 and res["infer_slices_per_s"]["flip_tta"] > 0


def test_bundle_script_out_writes_a_candidate_and_leaves_the_bundle_alone(tmp_path, script):
    from ssanet.model import SSANet
    src = tmp_path / "best.safetensors"
    ckpt.save_checkpoint(src, SSANet(2, 3), {"preprocessing": {"size": 64}})
    registry_before = ckpt.REGISTRY.read_text()
    bundled_before = sorted((p.name, p.stat().st_mtime_ns) for p in ckpt.MODELS_DIR.iterdir())
    cand = tmp_path / "candidate.safetensors"
    script("bundle_model").main([str(src), "--out", str(cand), "--flip-tta"])
    model, meta = ckpt.load_checkpoint(cand)
    assert meta["storage_dtype"] == "float16" and meta["inference"] == {"flip_tta": True}
    assert meta["source_checkpoint_sha256"] == ckpt.sha256_of(src)
    assert ckpt.REGISTRY.read_text() == registry_before
    assert sorted((p.name, p.stat().st_mtime_ns) for p in ckpt.MODELS_DIR.iterdir()) == bundled_before


def test_ensemble_command_then_bundle_script_int8_and_no_training_from_it(tmp_path, capsys, script):
    from ssanet.cli import main as cli_main
    from ssanet.model import SSANet, probabilities

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(tmp_path / f"m{seed}.safetensors")
        ckpt.save_checkpoint(paths[-1], SSANet(2, 3, layers=(1, 1, 1, 1), sc_kernel_size=3),
                             {"preprocessing": {"size": 64}, "inference": {"flip_tta": True}})
    ens = tmp_path / "ens.safetensors"
    assert cli_main(["ensemble", *map(str, paths), "--out", str(ens), "--no-flip-tta"]) in (0, None)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["members"] == 2 and printed["flip_tta"] is False and printed["storage"] == "float16"
    assert cli_main(["ensemble", *map(str, paths), "--out", str(ens)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {ens} exists")
    # bundled as int8 (as a candidate, so the real bundle is untouched): about half the size
    cand = tmp_path / "cand.safetensors"
    script("bundle_model").main([str(ens), "--out", str(cand), "--storage", "int8"])
    model, meta = ckpt.load_checkpoint(cand)
    assert meta["storage_dtype"] == "int8" and meta["ensemble"] == {"members": 2}
    assert meta["inference"] == {"flip_tta": False}
    assert cand.stat().st_size < 0.6 * ens.stat().st_size
    members = [ckpt.load_checkpoint(p)[0] for p in paths]
    x = torch.rand(1, 2, 64, 64)
    with torch.no_grad():
        want = sum(probabilities(m(x)) for m in members) / 2
        assert (probabilities(model(x)) - want).abs().max() < 2e-2
    # fine-tuning starts from one network: the ensemble alone is refused with the reason ...
    assert cli_main(["train", "--out", str(tmp_path / "ft"), "--init", str(ens), "--epochs", "1",
                     "--size", "64", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "ensemble of 2 networks (m0.safetensors, m1.safetensors)" in err and "--init-member K (0 to 1)" in err
    for bad, why in (("2", "has members 0 to 1"), ):
        assert cli_main(["train", "--out", str(tmp_path / "ft"), "--init", str(ens), "--init-member", bad,
                         "--data", str(tmp_path)]) == 2
        assert why in capsys.readouterr().err
    assert cli_main(["train", "--out", str(tmp_path / "ft"), "--init", str(paths[0]), "--init-member", "0",
                     "--data", str(tmp_path)]) == 2
    assert "is a single network" in capsys.readouterr().err
    # ... and --init-member K starts from exactly that member's weights
    from ssanet.train import TrainConfig, load_init_weights
    for k in (0, 1):
        net = SSANet(2, 3, layers=(1, 1, 1, 1), sc_kernel_size=3)
        sha = load_init_weights(net, TrainConfig(init=str(ens), init_member=k))
        assert sha == ckpt.sha256_of(ens)
        ref = ckpt.load_checkpoint(ens)[0].members[k].state_dict()
        assert all(torch.equal(v, ref[n]) for n, v in net.state_dict().items())


def test_fine_tuning_keeps_the_init_checkpoints_size(tmp_path, capsys):
    """Fine-tuning the bundle without --size must not silently drop it to 256² (its figures
    fall there); an explicit different --size is kept with a note; odd sizes are refused."""
    from ssanet.model import SSANet
    from ssanet.train import TrainConfig, training_size
    p = tmp_path / "m512.safetensors"
    ckpt.save_checkpoint(p, SSANet(2, 3, layers=(1, 1, 1, 1)), {"preprocessing": {"size": 512}})
    assert training_size(None, str(p))[0] == 512 and "512" in training_size(None, str(p))[1]
    assert training_size(None, "") == (TrainConfig.size, None)
    size, why = training_size(320, str(p))
    assert size == 320 and "trained at 512" in why
    assert training_size(512, str(p)) == (512, None)
    with pytest.raises(ValueError, match="multiple of 32"):
        training_size(300, "")
    # the CLI path: the run's config records the resolved size before any data are read
    args = build_parser().parse_args(["train", "--out", str(tmp_path / "r"), "--init", str(p)])
    assert args.size is None
    from ssanet.cli import resolve_training_size
    resolve_training_size(args)
    assert args.size == 512 and "--size not given" in capsys.readouterr().out
    assert build_parser().parse_args(["semisup", "--out", "x"]).size is None


def test_evaluate_defaults_to_validation_and_rejects_bad_numbers(tmp_path, capsys):
    from ssanet.cli import cmd_evaluate

    args = build_parser().parse_args(["evaluate", "--checkpoint", str(tmp_path / "none.safetensors")])
    with pytest.raises(ckpt.CheckpointError):
        cmd_evaluate(args)
    assert (args.dataset, args.split) == ("medseg100", "val")   # test only when asked
    for argv in (["evaluate", "--split", "foo"], ["evaluate", "--batch-size", "0"],
                 ["train", "--out", "x", "--batch-size", "-3"], ["train", "--out", "x", "--val-every", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
    assert "must be 1 or more" in capsys.readouterr().err


def test_runs_with_cases_compare_by_slice_counts_not_folder_spelling():
    """config.json keyed --cases by folder name before 2026-12 and by full path since: a run
    written either way resumes with the same cases (moved or not); other counts do not."""
    from ssanet.train import comparable_training
    base = {"data_description": {"train": "MedSeg-100 train subset, 46 slices + 24 slices of exported cases",
                                 "n_train": 70, "val": ["a"]}}
    old = {**base, "data_description": {**base["data_description"], "cases": {"export": 24}}}
    new = {**base, "data_description": {**base["data_description"], "cases": {"/data/x/export": 24}}}
    other = {**base, "data_description": {**base["data_description"], "cases": {"/data/x/export": 25}}}
    assert comparable_training(old) == comparable_training(new)
    assert comparable_training(new) != comparable_training(other)


def test_ctrl_c_while_an_epoch_is_saved_waits_for_the_save(tmp_path, monkeypatch):
    """Ctrl-C between the weights and the training state would pair epoch 2's weights with
    epoch 1's optimizer (the resume then trained epoch 2 twice): it waits until both are saved."""
    import os
    import signal
    torch.set_num_threads(1)
    slices = _synthetic_slices(5)
    cfg = TrainConfig(size=64, epochs=2, batch_size=2, lr=1e-2, sad_start_epoch=0, val_every=1,
                      device="cpu", amp=False)
    train(cfg, slices[:4], slices[4:], tmp_path / "whole", log=lambda *_: None)
    save = ckpt.save_checkpoint

    def interrupted_save(path, *args, **kwargs):
        if Path(path).name == "last.safetensors":
            os.kill(os.getpid(), signal.SIGINT)   # the user presses Ctrl-C mid-save
        return save(path, *args, **kwargs)
    monkeypatch.setattr(ckpt, "save_checkpoint", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, slices[:4], slices[4:], tmp_path / "run", log=lambda *_: None)
    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    assert [r["epoch"] for r in _rows(tmp_path / "run")] == ["1"]
    assert ckpt.load_state_for_resume(tmp_path / "run" / "train_state.pt")["epoch"] == 0   # saved with epoch 1
    train(cfg, slices[:4], slices[4:], tmp_path / "run", log=lambda *_: None)
    assert [r["epoch"] for r in _rows(tmp_path / "run")] == ["1", "2"]
    whole, _ = ckpt.load_checkpoint(tmp_path / "whole" / "last.safetensors")
    resumed, _ = ckpt.load_checkpoint(tmp_path / "run" / "last.safetensors")
    # the same weights (epoch 2 trained twice differs by order 1)
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, atol=1e-6, rtol=1e-6)


def test_the_same_ct_twice_among_training_cases_is_found(tmp_path):
    from ssanet.cli import _duplicate_files

    for name, data in (("a.nii.gz", b"same"), ("b.nii.gz", b"other"), ("c.nii.gz", b"same"), ("d.nii.gz", b"diff")):
        (tmp_path / name).write_bytes(data)
    paths = {str(p) for p in tmp_path.iterdir()}
    assert _duplicate_files(paths) == [(str(tmp_path / "a.nii.gz"), str(tmp_path / "c.nii.gz"))]


def test_evaluate_keeps_earlier_overlays_unless_told(tmp_path, capsys):
    """An --overlays folder holding PNGs (another model's, say) is refused before anything is
    loaded or scored; --overwrite replaces them."""
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    (overlays / "slice_01.png").write_bytes(b"earlier")
    rc = cli_main(["evaluate", "--checkpoint", str(tmp_path / "not_read.safetensors"), "--split", "val",
                   "--overlays", str(overlays), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "already holds overlay PNGs" in err and "--overwrite" in err
    assert (overlays / "slice_01.png").read_bytes() == b"earlier"
    # with --overwrite the refusal is gone: what fails now is the missing checkpoint, not the folder
    rc = cli_main(["evaluate", "--checkpoint", str(tmp_path / "not_read.safetensors"), "--split", "val",
                   "--overlays", str(overlays), "--device", "cpu", "--overwrite"])
    assert rc == 2 and "already holds" not in capsys.readouterr().err
