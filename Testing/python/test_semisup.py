"""Semi-supervised loop (ssanet.semisup) on synthetic slices with a tiny network.

Rounds that only need *a* model use a scripted trainer that writes constant-output
checkpoints, so pseudo labels and validation scores are known exactly; the resume test
runs the real trainer (tiny SSA-Net, 32 px, one epoch).
"""
import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import ssanet.train as train_mod
from ssanet import checkpoint as ckpt
from ssanet import semisup as S
from ssanet.data import UNKNOWN_LABEL, Sample
from ssanet.losses import class_weights, pixel_counts
from ssanet.model import SSANet
from ssanet.train import TrainConfig

SIZE = 32
TINY = dict(layers=(1, 1, 1, 1), width=(8, 16, 32, 64), sc_kernel_size=3)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    # the trainer and the predictor size their thread pools from OMP_NUM_THREADS
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def _disk(shape, cy, cx, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def make_sample(i, size=48, labeled=True, classes=(1, 2), prefix="lab"):
    rng = np.random.default_rng(i)
    lung = _disk((size, size), size / 2, size / 2, size * 0.42)
    img = np.where(lung, rng.integers(30, 60, (size, size)), 0).astype(np.uint8)
    lab = np.zeros((size, size), np.uint8)
    for c, value in ((1, 130), (2, 220)):
        if c in classes:
            cy, cx = rng.integers(int(size * 0.3), int(size * 0.7), 2)
            blob = _disk((size, size), cy, cx, size * 0.12) & lung
            lab[blob] = c
            img[blob] = value
    return Sample(id=f"{prefix}_{i:02d}", image=img, lung=lung, label=lab if labeled else None,
                  spacing=(0.7, 0.7), source="synthetic")


def make_data(n_lab=6, n_val=2, n_pool=5):
    labeled = [make_sample(i) for i in range(n_lab)]
    val = [make_sample(100 + i, prefix="val") for i in range(n_val)]
    pool = [make_sample(200 + i, labeled=False, prefix="pool") for i in range(n_pool)]
    return labeled, val, pool


def small_config(**kw):
    tcfg = TrainConfig(size=SIZE, epochs=1, batch_size=4, sad_start_epoch=0, val_every=1,
                       device="cpu", seed=3)
    return S.SemiSupConfig(**{"t": 2, "eta": 0.95, "max_rounds": 3, "patience": 2,
                              "train": tcfg, **kw})


def const_model(cls):
    """A tiny SSA-Net whose output is the same logits everywhere, favouring ``cls``."""
    torch.manual_seed(0)
    m = SSANet(2, 3, **TINY)
    last = m.head[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 0.0, 0.0]))
        last.bias[cls] = 6.0  # softmax 0.995 > 0.95
    return m.eval()


class ScriptedTrainer:
    """Stands in for ssanet.train.train: round r's model predicts ``favour[r]`` everywhere
    and reports validation DSC ``scores[r]``; records what each round was trained on."""

    def __init__(self, scores, favour=None):
        self.scores, self.favour, self.calls = scores, favour or {}, []

    def __call__(self, cfg, train_samples, val_samples, out_dir):
        r = cfg.data_description["semisup_round"]
        self.calls.append({"round": r, "cfg": cfg, "ids": [s.id for s in train_samples],
                           "labels": {s.id: s.label.copy() for s in train_samples}})
        s = float(self.scores[r])
        val = {n: {"dsc": s, "hd95_mm": 1.0, "mae": 0.1, "nsd_3mm": s, "dsc_pooled": s}
               for n in ("infection", "ggo", "consolidation")}
        ckpt.save_checkpoint(Path(out_dir) / "best.safetensors", const_model(self.favour.get(r, 1)),
                             {"preprocessing": {"size": cfg.size, "blank_outside_lung": True},
                              "val_metrics": val, "training": {"epoch": cfg.epochs}})
        return {"score": s}


# ------------------------------------------------------------------ paper pieces

def test_reweighting_hand_made():
    lab = np.array([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 2, 0], [0, 0, 0, 0]], np.uint8)  # 12/3/1
    pseudo = np.zeros((4, 4), np.uint8)
    pseudo[0, :2] = 1                                                                # 14/2/0
    w = S.reweighting([lab, pseudo])
    # 32 pixels: background 26, GGO 5, consolidation 1; w_c = 1 / (3 * P_c)
    np.testing.assert_allclose(w, [32 / (3 * 26), 32 / (3 * 5), 32 / 3])
    np.testing.assert_allclose(S.reweighting([lab]), [16 / 36, 16 / 9, 16 / 3])
    # the loss function of ssanet.train gets exactly these weights for the same labels
    np.testing.assert_allclose(w, class_weights(pixel_counts([lab, pseudo], 3)))


def test_pseudo_label_shortfall_names_the_starved_class():
    # labeled: 80 % background, 12 % GGO, 8 % consolidation
    labeled = [800, 120, 80]
    # pseudo: GGO at 5 % (above a quarter of 12 %), consolidation at 1 % (below 2 %)
    short = S.pseudo_label_shortfall(labeled, [940, 50, 10])
    assert [x["class"] for x in short] == ["consolidation"]
    assert short[0]["pseudo_share"] == pytest.approx(0.01)
    assert short[0]["labeled_share"] == pytest.approx(0.08)
    assert [x["class"] for x in S.pseudo_label_shortfall(labeled, [999, 1, 0])] == ["ggo", "consolidation"]
    assert S.pseudo_label_shortfall(labeled, [700, 200, 100]) == []
    assert S.pseudo_label_shortfall(labeled, [0, 0, 0]) == []  # no pseudo labels yet


def test_loop_warns_when_pseudo_labels_lose_a_class(tmp_path):
    labeled, val, pool = make_data(n_pool=4)
    # M1 calls GGO everywhere it is sure, never consolidation
    trainer = ScriptedTrainer(scores={1: 0.5, 2: 0.4, 3: 0.3}, favour={1: 1, 2: 1})
    lines = []
    state = S.run_semisup(small_config(max_rounds=2), labeled, val, pool, tmp_path / "run",
                          train_fn=trainer, log=lines.append)
    assert [r["pseudo_shortfall"] for r in state["rounds"]] == [[], ["consolidation"]]
    warnings = [x for x in lines if x.startswith("warning: round 2")]
    assert len(warnings) == 1 and "consolidation" in warnings[0] and "--eta" in warnings[0]


def test_trust_filter_eta_boundary_and_lung():
    eta = 0.95
    above = np.nextafter(np.float32(eta), np.float32(1))
    for dtype in (np.float32, np.float64):
        p = np.zeros((3, 2, 3), dtype)
        def put(y, x, cls, v):
            p[:, y, x] = (1 - v) / 2
            p[cls, y, x] = v
        put(0, 0, 1, dtype(eta))      # exactly eta: rejected
        put(0, 1, 1, above)           # just above: kept
        put(0, 2, 2, 0.99)            # confident consolidation: kept
        put(1, 0, 2, 0.6)             # argmax consolidation, not trusted
        put(1, 1, 2, 0.999)           # confident but outside the lung
        put(1, 2, 0, 0.99)            # background
        lung = np.array([[1, 1, 1], [1, 0, 1]], bool)
        lab = S.trust_filter(p, lung, eta)
        assert lab.dtype == np.uint8
        assert lab.tolist() == [[0, 1, 2], [0, 0, 0]]
        # without the trust module: plain argmax, still never outside the lung
        assert S.argmax_labels(p, lung).tolist() == [[1, 1, 2], [2, 0, 0]]
        # batched input
        lab2 = S.trust_filter(np.stack([p, p]), np.stack([lung, ~lung]), eta)
        assert lab2[0].tolist() == [[0, 1, 2], [0, 0, 0]] and lab2[1].tolist() == [[0, 0, 0], [0, 2, 0]]
        # --untrusted ignore: the lung pixels not trusted are unknown, the rest as above
        unk = S.trust_filter(p, lung, eta, untrusted=UNKNOWN_LABEL)
        assert unk.tolist() == [[UNKNOWN_LABEL, 1, 2], [UNKNOWN_LABEL, 0, 0]]
    with pytest.raises(ValueError):
        S.trust_filter(np.zeros((3, 2, 3)), np.ones((3, 2), bool))


def test_addition_schedule_fewer_than_t_then_only_renew_and_seeded():
    ids = [f"u{i}" for i in range(5)]
    sch = S.AdditionSchedule(ids, t=2, seed=7)
    r1, r2 = sch.next(), sch.next()
    assert len(r1) == len(r2) == 2 and not set(r1) & set(r2)
    r3 = sch.next()                               # one left (< t): all of it
    assert r3 == sorted(set(ids) - set(r1) - set(r2))
    assert sch.exhausted and sorted(sch.added) == ids and sch.added == r1 + r2 + r3
    assert sch.next() == [] and sch.next() == []  # all used: only renewal from now on
    assert sch.added == r1 + r2 + r3

    big = [f"u{i:03d}" for i in range(100)]
    a, b, c = (S.AdditionSchedule(big, 10, seed=s) for s in (1, 1, 2))
    seq_a = [a.next() for _ in range(4)]
    assert seq_a == [b.next() for _ in range(4)]
    assert seq_a != [c.next() for _ in range(4)]
    # the saved state continues the same sequence (what a resumed run relies on)
    d = S.AdditionSchedule(big, 10, seed=1)
    d.next()
    saved = json.loads(json.dumps(d.state_dict()))
    e = S.AdditionSchedule(big, 10, seed=1)
    e.load_state_dict(saved)
    assert [e.next() for _ in range(3)] == [d.next() for _ in range(3)] == seq_a[1:]


def test_stop_criterion_patience():
    st = S.StopCriterion(patience=2)
    seq = [(1, 0.5, True), (2, 0.6, True), (3, 0.6, False), (4, 0.7, True), (5, 0.65, False)]
    for r, score, improved in seq:
        assert st.update(r, score) is improved and not st.should_stop
    assert not st.update(6, 0.69) and st.should_stop
    assert (st.best_round, st.best_score, st.counter) == (4, 0.7, 2)
    with pytest.raises(ValueError):
        S.StopCriterion(patience=0)


def test_refuses_labeled_set_without_a_class(tmp_path):
    labeled, val, pool = make_data()
    no_cons = [make_sample(i, classes=(1,)) for i in range(4)]
    with pytest.raises(ValueError, match="consolidation"):
        S.check_labeled_classes([s.label for s in no_cons])
    trainer = ScriptedTrainer({1: 0.5})
    with pytest.raises(ValueError, match=r"'consolidation' \(label 2\)"):
        S.run_semisup(small_config(), no_cons, val, pool, tmp_path / "run", train_fn=trainer,
                      log=lambda *_: None)
    assert trainer.calls == [] and not (tmp_path / "run" / "state.json").exists()


# --------------------------------------------------------------- renewal, weights

def test_renew_pseudo_labels_uses_the_new_model():
    _, _, pool = make_data(n_pool=3)
    slices = S.SlicePool(pool, SIZE)
    ids = [s.id for s in pool]
    by_ggo = S.renew_pseudo_labels(const_model(1), ids, slices, batch_size=2)
    by_cons = S.renew_pseudo_labels(const_model(2), ids, slices, batch_size=2)
    for i in ids:
        lung = slices[i].lung
        assert by_ggo[i].shape == (SIZE, SIZE) and by_ggo[i].dtype == np.uint8
        assert np.all(by_ggo[i][lung] == 1) and np.all(by_cons[i][lung] == 2)
        assert np.all(by_ggo[i][~lung] == 0) and np.all(by_cons[i][~lung] == 0)
    # probability 0.995 is not trusted at eta 0.999
    strict = S.renew_pseudo_labels(const_model(2), ids, slices, eta=0.999)
    assert all(not m.any() for m in strict.values())
    # --untrusted ignore: the same pixels are unknown inside the lung, background outside
    unknown = S.renew_pseudo_labels(const_model(2), ids, slices, eta=0.999, untrusted="ignore")
    for i in ids:
        lung = slices[i].lung
        assert np.all(unknown[i][lung] == UNKNOWN_LABEL) and np.all(unknown[i][~lung] == 0)


def test_unknown_pseudo_label_pixels_reach_the_loss_as_ignored():
    from ssanet.data import IGNORE_INDEX, SliceDataset
    _, _, pool = make_data(n_pool=1)
    s = S.SlicePool(pool, SIZE)[pool[0].id]
    lab = np.zeros((SIZE, SIZE), np.uint8)
    lab[:4] = UNKNOWN_LABEL
    lab[4:6] = 2
    sample = dataclasses.replace(s, label=lab)
    for classes, lesion in ((3, 2), (1, 1)):
        _, y = SliceDataset([sample], size=SIZE, num_classes=classes)[0]
        y = y.numpy()
        assert np.all(y[:4] == IGNORE_INDEX) and np.all(y[4:6] == lesion) and np.all(y[6:] == 0)
    # augmentation moves unknown pixels with the label (nearest neighbour), never into a class
    _, y = SliceDataset([sample], size=SIZE, augment=True, seed=3)[0]
    assert set(np.unique(y.numpy())) <= {IGNORE_INDEX, 0, 2} and (y == IGNORE_INDEX).any()
    with pytest.raises(ValueError, match="untrusted"):
        small_config(untrusted="unknown").validate()


def test_loop_renews_stores_reweights_and_stops(tmp_path):
    labeled, val, pool = make_data(n_pool=5)
    # M1 and M3 say GGO, M2 consolidation; validation peaks at round 2
    trainer = ScriptedTrainer(scores={1: 0.5, 2: 0.6, 3: 0.55, 4: 0.58, 5: 0.9},
                              favour={1: 1, 2: 2, 3: 1, 4: 2})
    out = tmp_path / "run"
    state = S.run_semisup(small_config(max_rounds=10, patience=2), labeled, val, pool, out,
                          train_fn=trainer, log=lambda *_: None)
    # stop criterion: no improvement in rounds 3 and 4 -> stop, round 5 never trained
    assert [c["round"] for c in trainer.calls] == [1, 2, 3, 4]
    assert state["finished"] and "did not improve" in state["stop_reason"]
    assert (state["best_round"], state["patience_counter"]) == (2, 2)
    assert ckpt.sha256_of(out / "best.safetensors") == ckpt.sha256_of(out / "round_02" / "best.safetensors")
    # schedule: 2, 2, then the last one (fewer than t)
    assert [r["n_new"] for r in state["rounds"]] == [0, 2, 2, 1]
    assert [r["n_pseudo"] for r in state["rounds"]] == [0, 2, 4, 5]
    assert len(set(state["added"])) == 5

    p2 = S.load_pseudo_labels(out / "round_02" / "pseudo_labels.npz")
    p3 = S.load_pseudo_labels(out / "round_03" / "pseudo_labels.npz")
    p4 = S.load_pseudo_labels(out / "round_04" / "pseudo_labels.npz")
    assert list(p2) == state["added"][:2] and list(p3) == state["added"][:4]
    slices = S.SlicePool(pool, SIZE)
    for i in state["added"][:2]:
        lung = slices[i].lung
        # labeled by M1 (GGO) when added, renewed by M2 (consolidation), then by M3 (GGO)
        assert np.all(p2[i][lung] == 1) and np.all(p3[i][lung] == 2) and np.all(p4[i][lung] == 1)
    r3 = trainer.calls[2]
    assert r3["ids"][:len(labeled)] == [s.id for s in labeled]
    for i in state["added"][:4]:
        np.testing.assert_array_equal(r3["labels"][i], p3[i])  # trained on the renewed labels

    # class weights recomputed every round from labeled + current pseudo labels, and
    # identical to what the trainer derives from the samples it is given
    lab_small = [S.at_size(s, SIZE).label for s in labeled]
    np.testing.assert_allclose(state["class_weights"][0], S.reweighting(lab_small))
    np.testing.assert_allclose(state["class_weights"][2], S.reweighting(lab_small + list(p3.values())))
    for call, w in zip(trainer.calls, state["class_weights"]):
        np.testing.assert_allclose(class_weights(pixel_counts(list(call["labels"].values()), 3)), w)
        assert call["cfg"].reweight is True
    assert len({tuple(w) for w in state["class_weights"]}) == 4

    for name in ("rounds.csv", "rounds.json", "val_dsc.png", "class_weights.png",
                 "pseudo_round_02.png", "pseudo_round_04.png"):
        assert (out / name).is_file(), name
    assert len((out / "rounds.csv").read_text().strip().splitlines()) == 5

    # a finished run reruns as a no-op
    S.run_semisup(small_config(max_rounds=10, patience=2), labeled, val, pool, out,
                  train_fn=trainer, log=lambda *_: None)
    assert len(trainer.calls) == 4


def test_all_used_then_only_renew(tmp_path):
    labeled, val, pool = make_data(n_pool=3)
    trainer = ScriptedTrainer(scores={r: 0.1 * r for r in range(1, 6)}, favour={1: 1, 2: 2, 3: 1, 4: 2})
    state = S.run_semisup(small_config(t=2, max_rounds=5), labeled, val, pool, tmp_path / "r",
                          train_fn=trainer, log=lambda *_: None)
    assert [r["n_new"] for r in state["rounds"]] == [0, 2, 1, 0, 0]
    assert [r["n_pseudo"] for r in state["rounds"]] == [0, 2, 3, 3, 3]
    assert state["stop_reason"].startswith("max_rounds")
    p4 = S.load_pseudo_labels(tmp_path / "r" / "round_04" / "pseudo_labels.npz")
    p5 = S.load_pseudo_labels(tmp_path / "r" / "round_05" / "pseudo_labels.npz")
    assert set(p4) == set(p5) == set(state["added"])
    assert all(not np.array_equal(p4[i], p5[i]) for i in p4)   # renewed by M3 vs M4


def test_wrong_settings_do_not_resume(tmp_path):
    labeled, val, pool = make_data(n_pool=3)
    trainer = ScriptedTrainer(scores={1: 0.5, 2: 0.6})
    S.run_semisup(small_config(max_rounds=1), labeled, val, pool, tmp_path / "r",
                  train_fn=trainer, log=lambda *_: None)
    with pytest.raises(ValueError, match=r"other settings or data \(eta: 0\.\d+ -> 0\.9\)"):   # named
        S.run_semisup(small_config(max_rounds=2, eta=0.9), labeled, val, pool, tmp_path / "r",
                      train_fn=trainer, log=lambda *_: None)
    # a larger round budget is a continuation
    st = S.run_semisup(small_config(max_rounds=2), labeled, val, pool, tmp_path / "r",
                       train_fn=trainer, log=lambda *_: None)
    assert st["round"] == 2 and [c["round"] for c in trainer.calls] == [1, 2]


def _init_checkpoint(path, cls=2):
    ckpt.save_checkpoint(path, const_model(cls), {"preprocessing": {"size": SIZE, "blank_outside_lung": True},
                                                  "training": {"epoch": 7}})
    return path


@pytest.mark.parametrize("warm", [True, False])
def test_init_is_m1_and_warm_start_fine_tunes_the_previous_round(tmp_path, warm):
    from ssanet.evaluate import evaluate_samples
    from ssanet.inference import Predictor

    labeled, val, pool = make_data(n_pool=4)
    init = _init_checkpoint(tmp_path / "supervised.safetensors", cls=2)   # M1 says consolidation
    trainer = ScriptedTrainer(scores={2: 0.9, 3: 0.8}, favour={2: 1, 3: 1})
    out = tmp_path / "run"
    state = S.run_semisup(small_config(init=str(init), warm_start=warm, max_rounds=3), labeled, val,
                          pool, out, train_fn=trainer, log=lambda *_: None)
    # round 1 is the given model, not trained; its score is measured on the validation slices
    assert [c["round"] for c in trainer.calls] == [2, 3]
    model, meta = ckpt.load_checkpoint(init)
    expected = evaluate_samples(Predictor.for_checkpoint(model, meta, "cpu"), val, meta)["classes"]
    got = state["rounds"][0]["val"]
    assert set(got) == set(expected)
    for name in expected:
        assert got[name] == pytest.approx(expected[name])
    m1 = ckpt.read_meta(out / "round_01" / "best.safetensors")
    assert m1["training"]["adopted_as_m1"]["sha256"] == ckpt.sha256_of(init)
    assert m1["training"]["epoch"] == 7
    # M1 made round 2's pseudo labels (consolidation everywhere in the lung)
    p2 = S.load_pseudo_labels(out / "round_02" / "pseudo_labels.npz")
    slices = S.SlicePool(pool, SIZE)
    assert all(np.all(p2[i][slices[i].lung] == 2) for i in p2)
    # warm start: round r starts from round r-1's model; otherwise from scratch
    inits = [c["cfg"].init for c in trainer.calls]
    if warm:
        assert inits == [str(out / "round_01" / "best.safetensors"), str(out / "round_02" / "best.safetensors")]
    else:
        assert inits == ["", ""]
    assert state["best_round"] == 2


def test_init_from_an_ensemble_takes_the_chosen_member_as_m1(tmp_path):
    labeled, val, pool = make_data(n_pool=2)
    a = _init_checkpoint(tmp_path / "a.safetensors", cls=1)       # says GGO everywhere
    b = _init_checkpoint(tmp_path / "b.safetensors", cls=2)       # says consolidation everywhere
    model, meta = ckpt.ensemble_checkpoints([a, b])
    ens = tmp_path / "ens.safetensors"
    ckpt.save_checkpoint(ens, model, meta)
    with pytest.raises(ckpt.CheckpointError, match="--init-member K"):
        S.run_semisup(small_config(init=str(ens), max_rounds=2), labeled, val, pool, tmp_path / "no",
                      train_fn=ScriptedTrainer(scores={}), log=lambda *_: None)
    out = tmp_path / "run"
    S.run_semisup(small_config(init=str(ens), init_member=1, max_rounds=2), labeled, val, pool, out,
                  train_fn=ScriptedTrainer(scores={2: 0.1}), log=lambda *_: None)
    m1, m1_meta = ckpt.load_checkpoint(out / "round_01" / "best.safetensors")
    assert not ckpt.is_ensemble(m1_meta)
    assert m1_meta["training"]["adopted_as_m1"] == {"name": "ens.safetensors", "sha256": ckpt.sha256_of(ens),
                                                    "member": 1}
    assert m1_meta["training"]["epoch"] == 7                        # the member's own record
    ref = ckpt.load_checkpoint(b)[0].state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in m1.state_dict().items())
    # member 1 made round 2's pseudo labels: consolidation everywhere in the lung
    p2 = S.load_pseudo_labels(out / "round_02" / "pseudo_labels.npz")
    slices = S.SlicePool(pool, SIZE)
    assert all(np.all(p2[i][slices[i].lung] == 2) for i in p2)


def test_init_must_be_a_ggo_consolidation_model(tmp_path):
    labeled, val, pool = make_data(n_pool=2)
    binary = tmp_path / "binary.safetensors"
    ckpt.save_checkpoint(binary, SSANet(2, 1, **TINY), {"preprocessing": {"size": SIZE}})
    with pytest.raises(ckpt.CheckpointError, match="GGO/consolidation"):
        S.run_semisup(small_config(init=str(binary)), labeled, val, pool, tmp_path / "run",
                      train_fn=ScriptedTrainer(scores={}), log=lambda *_: None)


# ------------------------------------------------------------- resume, real trainer

class Interrupt(Exception):
    pass


def _without_timings(state):
    state = json.loads(json.dumps(state))
    for r in state["rounds"]:
        r.pop("timing")
    return state


def test_resume_after_interruption_gives_the_same_state(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "SSANet", functools.partial(SSANet, **TINY))
    labeled, val, pool = make_data(n_lab=5, n_val=2, n_pool=5)
    cfg = small_config(max_rounds=3, patience=3)
    quiet = lambda *_: None

    full = S.run_semisup(cfg, labeled, val, pool, tmp_path / "full", log=quiet)
    assert full["round"] == 3

    def stop_after_2(r, state):
        if r == 2:
            raise Interrupt
    with pytest.raises(Interrupt):
        S.run_semisup(cfg, labeled, val, pool, tmp_path / "cut", log=quiet, on_round_end=stop_after_2)
    cut = json.loads((tmp_path / "cut" / "state.json").read_text())
    assert cut["round"] == 2 and not (tmp_path / "cut" / "round_03").exists()

    trained = []
    real_train = train_mod.train
    def counting_train(cfg_, *a, **k):
        trained.append(cfg_.data_description["semisup_round"])
        return real_train(cfg_, *a, **k)
    messages = []
    resumed = S.run_semisup(cfg, labeled, val, pool, tmp_path / "cut", log=messages.append,
                            train_fn=counting_train)
    assert trained == [3] and any("resuming" in m for m in messages)

    a = json.loads((tmp_path / "full" / "state.json").read_text())
    b = json.loads((tmp_path / "cut" / "state.json").read_text())
    assert _without_timings(a) == _without_timings(b) == _without_timings(resumed)
    pa = S.load_pseudo_labels(tmp_path / "full" / "round_03" / "pseudo_labels.npz")
    pb = S.load_pseudo_labels(tmp_path / "cut" / "round_03" / "pseudo_labels.npz")
    assert list(pa) == list(pb) and all(np.array_equal(pa[k], pb[k]) for k in pa)

    # the loop's model is an ordinary 3-class ssanet checkpoint
    model, meta = ckpt.load_checkpoint(tmp_path / "full" / "best.safetensors")
    assert model.config.num_classes == 3 and meta["class_names"] == ["background", "ggo", "consolidation"]
    assert meta["preprocessing"]["size"] == SIZE
    assert not (tmp_path / "full" / "round_01" / "train_state.pt").exists()


# ------------------------------------------------------------------ ablation, CLI

def test_run_ablation_table(tmp_path):
    labeled, val, pool = make_data(n_pool=3)
    test = [make_sample(300 + i, prefix="test") for i in range(2)]
    trainer = ScriptedTrainer(scores={1: 0.5, 2: 0.6}, favour={1: 1, 2: 2})
    table = S.run_ablation(small_config(max_rounds=2), labeled, val, pool, test, tmp_path / "ab",
                           train_fn=trainer, log=lambda *_: None)
    assert list(table) == ["supervised", "S1", "S2", "S3", "S4"]
    for entry in table.values():
        assert list(entry["classes"]) == ["ggo", "consolidation", "average"]
        m = entry["classes"]
        assert m["average"]["dsc"] == pytest.approx((m["ggo"]["dsc"] + m["consolidation"]["dsc"]) / 2)
        assert {"dsc", "hd95_mm", "mae", "nsd_3mm"} <= set(m["average"])
    # round 1 depends only on re-weighting: S3 and S4 reuse it from S1 and S2
    rounds = [(c["round"], c["cfg"].reweight) for c in trainer.calls]
    assert rounds == [(1, False), (2, False), (1, True), (2, True), (2, False), (2, True)]
    for v, flags in S.ABLATION_VARIANTS.items():
        st = json.loads((tmp_path / "ab" / v / "state.json").read_text())
        assert {k: st["config"][k] for k in flags} == flags
    md = (tmp_path / "ab" / "ablation.md").read_text()
    assert "| S4 | average |" in md and "| supervised | ggo |" in md
    assert (tmp_path / "ab" / "ablation.csv").is_file()


def test_cli_subcommands_parse():
    from ssanet.cli import build_parser
    p = build_parser()
    a = p.parse_args(["semisup", "--data", "D", "--out", "R", "--t", "20", "--no-trust",
                      "--size", "128", "--epochs-per-round", "15", "--unlabeled-limit", "60"])
    cfg = S.config_from_args(a)
    assert (cfg.t, cfg.trust, cfg.reweight, cfg.unlabeled_limit) == (20, False, True, 60)
    assert (cfg.train.size, cfg.train.epochs, cfg.train.sad_start_epoch) == (128, 15, 4)
    assert (cfg.train.augment, cfg.semiseg_renderings) == ("standard", False)
    c = S.config_from_args(p.parse_args(["semisup", "--out", "R", "--semiseg-renderings", "--augment", "strong",
                                         "--workers", "2"]))
    assert (c.semiseg_renderings, c.train.augment, c.train.workers) == (True, "strong", 2)
    assert cfg.untrusted == "background"     # the paper's trust module
    assert S.config_from_args(p.parse_args(["semisup", "--out", "R", "--untrusted", "ignore"])).untrusted == "ignore"
    # a run that predates --untrusted resumes as the paper's (background), not as ignore
    pre = c.to_dict()
    pre.pop("untrusted")
    assert S._comparable(pre) == S._comparable(c.to_dict())
    assert S._comparable(pre) != S._comparable({**c.to_dict(), "untrusted": "ignore"})
    # workers change how a round trains, not what: a run may resume with another count
    assert S._comparable(c.to_dict()) == S._comparable({**c.to_dict(), "train": {**c.to_dict()["train"], "workers": 0}})
    # a state written before a setting existed compares at that setting's default
    old = cfg.to_dict()
    old.pop("semiseg_renderings")
    old["train"].pop("init_member")
    assert S._comparable(old) == S._comparable(cfg.to_dict())
    b = p.parse_args(["semisup-ablation", "--out", "R", "--no-reweight", "--patience", "3"])
    assert b.reweight is False and b.trust is True and b.patience == 3 and b.func is S.cmd_semisup_ablation


def test_prepare_pool_reads_each_slice_once_and_reuses_the_cache(tmp_path):
    from ssanet.semisup import prepare_pool

    class Lazy:
        loads = 0

        def __init__(self, i):
            self._s = make_sample(i, size=64, labeled=False, prefix="u")
            self.id, self.source, self.volume, self.index = self._s.id, "radiopaedia", "v", i

        def load(self):
            Lazy.loads += 1
            return self._s

    recs = [Lazy(i) for i in range(3)]
    cache = tmp_path / "pool.npz"
    first = prepare_pool(recs, 32, cache, log=lambda *_: None)
    assert Lazy.loads == 3 and cache.is_file()
    again = prepare_pool(recs, 32, cache, log=lambda *_: None)
    assert Lazy.loads == 3                                   # read back, not recomputed
    for a, b in zip(first, again):
        assert a.id == b.id and a.image.shape == (32, 32) and a.label is None
        assert np.array_equal(a.image, b.image) and np.array_equal(a.lung, b.lung)
        assert a.spacing == pytest.approx(b.spacing)
    other = prepare_pool(recs[:2], 32, cache, log=lambda *_: None)   # other ids: recomputed
    assert Lazy.loads == 5 and [s.id for s in other] == ["u_00", "u_01"]


def test_semiseg_renderings_join_the_labeled_set_and_validation(data_root):
    from ssanet.cli import build_parser
    a = build_parser().parse_args(["semisup", "--data", str(data_root), "--out", "R"])
    _, plain, _ = S._load_data(a)
    a.semiseg_renderings = True
    _, both, pool = S._load_data(a)
    crops = [s for s in both["train"] if s.source == "covid-semiseg"]
    assert len(both["train"]) == 2 * len(plain["train"]) and len(crops) == len(plain["train"])
    assert len(both["val"]) > len(plain["val"]) and len(pool) == 1600
