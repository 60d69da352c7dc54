"""Semi-supervised few-shot learning of SSA-Net (Wang et al., MedIA 2022, Sec. 3.3).

The loop
--------
Round 1 trains M1 on the labeled training slices with the SSA-Net loss (Dice, SAD after
its warm-up, and the re-weighted cross-entropy). Every later round r:

1. :class:`AdditionSchedule` picks ``t`` not yet used unlabeled slices at random (seeded);
   when fewer than ``t`` remain it takes them all, once all are used it adds nothing;
2. :func:`renew_pseudo_labels`: M_{r-1} labels *every* added slice, the new ones and all
   earlier ones, so older pseudo labels are replaced by the newer model's;
   :func:`trust_filter` keeps a pixel's class only where its probability exceeds ``eta``
   (``--no-trust``: plain argmax); never outside the lung;
3. :func:`reweighting`: class weights ``1 / (C * P_c)`` from the pixel shares of labeled
   plus current pseudo labels, recomputed for this round;
4. M_r is trained (from scratch, by :func:`ssanet.train.train`) on labeled + pseudo-labeled
   slices and scored on the labeled validation slices (the trainer's model-selection
   score, a validation Dice);
5. :class:`StopCriterion`: stop once that score has not improved for ``patience`` rounds,
   or after ``max_rounds``; the best round's model is ``RUN_DIR/best.safetensors``.

The slices are selected at random, independently of the predictions, so only the slices
in use are predicted each round: the pseudo labels are the same as predicting the whole
pool and keeping the chosen ones, at a fraction of the cost until the pool is used up.

Resolution: labeled and unlabeled slices are resized once to the training size (bilinear
image, nearest masks), which is what training does to them anyway. Pseudo labels are
therefore stored at that size, and the pixel shares behind the class weights count labeled
and pseudo-labeled pixels on the same grid. Validation and test slices keep their own size
(evaluation resizes the prediction back, as everywhere in ssanet).

The unlabeled pool (COVID-SemiSeg, :func:`ssanet.data.load_unlabeled`) comes in another
display window than the labeled set: the coronacases slices are mapped onto the labeled
intensities by :func:`ssanet.data.match_intensity`, and lung masks come from the project's
lung step (``UnlabeledSlice.load``).

Run directory
-------------
``state.json`` (written atomically after every round: rounds done, added slice ids in
order, the schedule's RNG state, class-weight history, per-round metrics, best round,
patience counter), ``round_XX/`` (the round's training run with ``best.safetensors``,
``pseudo_labels.npz`` = the uint8 pseudo labels it trained on, keyed by slice id, and
``round.json``), ``rounds.csv`` / ``rounds.json``, ``val_dsc.png``, ``class_weights.png``,
``pseudo_round_XX.png`` and ``best.safetensors`` (an ordinary 3-class ssanet checkpoint).
Rerunning the same command resumes at the first unfinished round and gives the same
state as an uninterrupted run.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import time
from argparse import BooleanOptionalAction as BooleanFlag
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from .cli import EVAL_SPLITS, positive_int
from .data import AUGMENT_PRESETS, UNKNOWN_LABEL
from .losses import class_weights, pixel_counts
from .train import TrainConfig, comparable_training

NUM_CLASSES = 3
CLASS_NAMES = ("background", "ggo", "consolidation")
STATE_FORMAT = "ssanet-semisup/1"
# the paper switches SAD on at epoch 40 of 150; rounds keep that proportion by default
SAD_START_FRACTION = 40 / 150
# options that may change between a run and its resumption without changing its results
RESUMABLE_CHANGES = ("max_rounds", "patience", "pseudo_batch_size", "device")
# what an untrusted pixel's pseudo label is: background (the paper) or unknown (no loss)
UNTRUSTED_CHOICES = ("background", "ignore")


# ------------------------------------------------------------------ configuration

@dataclass
class SemiSupConfig:
    """The loop's settings; ``train`` is the per-round training (``epochs`` = per round)."""

    t: int = 200
    eta: float = 0.95
    max_rounds: int = 12
    patience: int = 2
    reweight: bool = True
    trust: bool = True
    untrusted: str = "background"       # "ignore": untrusted lung pixels carry no loss
    unlabeled_limit: int = 0            # 0 = the whole pool
    pseudo_batch_size: int = 16
    contact_sheet_n: int = 8
    keep_last_checkpoints: bool = False  # last.safetensors/train_state.pt only serve mid-round resume
    init: str = ""                      # M1 = this supervised checkpoint (round 1 is not trained)
    init_member: int = -1               # with an ensemble as init: which of its networks is M1
    warm_start: bool = False            # round r fine-tunes M_{r-1} instead of starting from scratch
    semiseg_renderings: bool = False    # labeled set + validation also in COVID-SemiSeg's rendering
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        if self.t < 1:
            raise ValueError(f"t must be >= 1, got {self.t}")
        if not 0.0 <= self.eta < 1.0:
            raise ValueError(f"eta must be in [0, 1), got {self.eta}")
        if self.untrusted not in UNTRUSTED_CHOICES:
            raise ValueError(f"untrusted must be one of {', '.join(UNTRUSTED_CHOICES)}, "
                             f"got {self.untrusted!r}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds}")
        if self.train.size % 32:
            raise ValueError(f"size must be divisible by 32, got {self.train.size}")
        if self.train.num_classes != NUM_CLASSES:
            raise ValueError("the semi-supervised loop learns GGO and consolidation: "
                             "classes must be 'ggo,consolidation'")

    def to_dict(self) -> dict:
        return asdict(self)


def _comparable(cfg_dict: dict) -> dict:
    # settings added after a run started are compared at their defaults (what the run used)
    d = json.loads(json.dumps({**SemiSupConfig().to_dict(), **cfg_dict}))
    for k in RESUMABLE_CHANGES:
        d.pop(k, None)
    d["train"] = comparable_training(d["train"])
    return d


# ------------------------------------------------------------------- paper pieces

def trust_filter(probs, lung, eta: float = 0.95, untrusted: int = 0) -> np.ndarray:
    """The trust module: argmax class where its probability exceeds ``eta``, else
    ``untrusted`` (the paper: 0, background); background outside the lung.

    ``untrusted=ssanet.data.UNKNOWN_LABEL`` marks the lung pixels the model is unsure of as
    unknown, so that training skips them instead of learning them as background.

    ``probs`` (C, H, W) or (N, C, H, W) with background as channel 0; ``lung`` (H, W) or
    (N, H, W). The comparison is strict: a probability equal to ``eta`` is not trusted.
    """
    probs = np.asarray(probs)
    lung = np.asarray(lung, dtype=bool)
    if probs.ndim not in (3, 4):
        raise ValueError(f"expected probabilities (C, H, W) or (N, C, H, W), got {probs.shape}")
    if lung.shape != probs.shape[:-3] + probs.shape[-2:]:
        raise ValueError(f"lung mask {lung.shape} does not match probabilities {probs.shape}")
    cls = probs.argmax(axis=-3)
    conf = np.take_along_axis(probs, np.expand_dims(cls, -3), axis=-3)[..., 0, :, :]
    out = np.where(conf > eta, cls, untrusted)
    return np.where(lung, out, 0).astype(np.uint8)


def argmax_labels(probs, lung) -> np.ndarray:
    """Pseudo labels without the trust module (ablations S1, S2): argmax inside the lung."""
    probs = np.asarray(probs)
    return np.where(np.asarray(lung, dtype=bool), probs.argmax(axis=-3), 0).astype(np.uint8)


class AdditionSchedule:
    """Which unlabeled slices join the training set each round.

    :meth:`next` draws ``t`` of the slices not yet added, uniformly without replacement
    from a seeded generator; with fewer than ``t`` left it returns all of them (no draw);
    once every slice is added it returns ``[]`` and the loop only renews pseudo labels.
    """

    def __init__(self, pool_ids: Sequence[str], t: int, seed: int = 0):
        if t < 1:
            raise ValueError(f"t must be >= 1, got {t}")
        self.pool_ids = list(pool_ids)
        if len(set(self.pool_ids)) != len(self.pool_ids):
            raise ValueError("unlabeled slice ids must be unique")
        self.t = int(t)
        self.rng = np.random.default_rng([int(seed), 2])
        self.added: list[str] = []

    @property
    def remaining(self) -> list[str]:
        used = set(self.added)
        return [i for i in self.pool_ids if i not in used]

    @property
    def exhausted(self) -> bool:
        return len(self.added) == len(self.pool_ids)

    def next(self) -> list[str]:
        rest = self.remaining
        if len(rest) <= self.t:
            new = rest
        else:
            new = [rest[i] for i in self.rng.choice(len(rest), size=self.t, replace=False)]
        self.added.extend(new)
        return new

    def state_dict(self) -> dict:
        return {"added": list(self.added), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state["added"]) - set(self.pool_ids)
        if unknown:
            raise ValueError(f"saved schedule holds slices not in the pool: {sorted(unknown)[:5]}")
        self.added = list(state["added"])
        self.rng.bit_generator.state = state["rng"]


def reweighting(labels: Iterable[np.ndarray], num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Class weights 1 / (C * P_c) of a training set: labeled plus current pseudo labels."""
    return class_weights(pixel_counts(list(labels), num_classes))


class StopCriterion:
    """Stop once the validation score has not improved for ``patience`` rounds."""

    def __init__(self, patience: int = 2):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = int(patience)
        self.best_score: float | None = None
        self.best_round: int | None = None
        self.counter = 0

    def update(self, round_: int, score: float) -> bool:
        """Record a round's score; True when it is the new best."""
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_round, self.counter = float(score), int(round_), 0
            return True
        self.counter += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.counter >= self.patience

    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "best_round": self.best_round,
                "patience_counter": self.counter}

    def load_state_dict(self, state: dict) -> None:
        self.best_score = state["best_score"]
        self.best_round = state["best_round"]
        self.counter = int(state["patience_counter"])


def pseudo_label_shortfall(labeled_counts, pseudo_counts, ratio: float = 0.25) -> list[dict]:
    """The lesion classes whose share of the pseudo-labeled pixels is below ``ratio`` times
    their share of the labeled pixels. A round trained on many such slices learns that the
    class is rare where the unlabeled slices look unlike the labeled ones, and the next
    round's pseudo labels hold even less of it (the collapse the README's loop runs show)."""
    lab = np.asarray(labeled_counts, dtype=np.float64)
    pse = np.asarray(pseudo_counts, dtype=np.float64)
    if lab.sum() <= 0 or pse.sum() <= 0:
        return []
    lab_share, pse_share = lab / lab.sum(), pse / pse.sum()
    return [{"class": CLASS_NAMES[c], "pseudo_share": float(pse_share[c]),
             "labeled_share": float(lab_share[c])}
            for c in range(1, len(lab)) if pse_share[c] < ratio * lab_share[c]]


def check_labeled_classes(labels: Iterable[np.ndarray], num_classes: int = NUM_CLASSES,
                          where: str = "the labeled training set") -> np.ndarray:
    """Pixel counts per class; ValueError naming every class with no pixels.

    Re-weighting divides by the class shares and the model cannot learn a class it never
    sees, so the loop refuses such a labeled set before training anything.
    """
    counts = pixel_counts(list(labels), num_classes)
    missing = [f"{CLASS_NAMES[c]!r} (label {c})" for c in range(num_classes) if counts[c] == 0]
    if missing:
        raise ValueError(f"{where} has no pixels of class {', '.join(missing)}; the semi-supervised "
                         "loop needs every class (background, GGO, consolidation) in the labeled "
                         "slices. Add slices containing it.")
    return counts


# ---------------------------------------------------------------- pool and slices

def at_size(sample, size: int):
    """The sample resized to ``size`` x ``size`` (bilinear image, nearest lung/label)."""
    from .preprocess import resize_image

    h, w = sample.image.shape[-2:]
    if (h, w) == (size, size):
        return sample
    img = np.clip(np.rint(resize_image(sample.image, (size, size), order=1)), 0, 255).astype(np.uint8)
    lung = resize_image(np.asarray(sample.lung, bool), (size, size), order=0)
    lab = None if sample.label is None else resize_image(np.asarray(sample.label, np.uint8),
                                                         (size, size), order=0)
    sy, sx = sample.spacing
    return dataclasses.replace(sample, image=img, lung=lung, label=lab,
                               spacing=(sy * h / size, sx * w / size),
                               meta={**(sample.meta or {}), "original_shape": [int(h), int(w)]})


class SlicePool(Mapping):
    """Unlabeled slices by id, loaded on first use and kept at the training size.

    ``records``: :class:`ssanet.data.Sample` objects or lazy records with ``.id`` and
    ``.load()`` (what :func:`ssanet.data.load_unlabeled` returns).
    """

    def __init__(self, records, size: int):
        self.size = int(size)
        self._records = {}
        for r in records:
            if r.id in self._records:
                raise ValueError(f"duplicate unlabeled slice id {r.id!r}")
            self._records[r.id] = r
        self._cache = {}

    def __getitem__(self, key):
        if key not in self._cache:
            rec = self._records[key]
            s = rec.load() if hasattr(rec, "load") else rec
            self._cache[key] = at_size(s, self.size)
        return self._cache[key]

    def __iter__(self):
        return iter(self._records)

    def __len__(self):
        return len(self._records)


def prepare_pool(records, size: int, cache_file=None, log=print) -> list:
    """Load lazy unlabeled records once, at the training size, with their lung masks.

    The lung step is the slow part of reading the pool (about 0.3 s a slice on a CPU core);
    with ``cache_file`` the images and masks are stored there (npz) and read back on the
    next call with the same ids and size, so the S1-S4 variants and resumed runs share it.
    """
    records = list(records)
    ids = [r.id for r in records]
    cache = Path(cache_file) if cache_file else None
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if list(z["ids"]) == ids and int(z["size"]) == int(size):
                images, lungs, spacings = z["images"], z["lungs"], z["spacings"]  # read each once
                return [_cached_sample(r, images[i], lungs[i], tuple(spacings[i]))
                        for i, r in enumerate(records)]
        log(f"{cache} holds another pool or size; recomputing it")
    out = []
    t0 = time.time()
    for i, r in enumerate(records):
        s = r.load() if hasattr(r, "load") else r
        out.append(at_size(s, size))
        if (i + 1) % 200 == 0 or i + 1 == len(records):
            log(f"unlabeled pool: {i + 1}/{len(records)} slices read with lung masks "
                f"({time.time() - t0:.0f} s)")
    if cache is not None and out:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".part.npz")
        np.savez_compressed(tmp, ids=np.array(ids), size=np.int64(size),
                            images=np.stack([s.image for s in out]),
                            lungs=np.stack([np.asarray(s.lung, bool) for s in out]),
                            spacings=np.array([s.spacing for s in out], np.float64))
        tmp.replace(cache)
    return out


def _cached_sample(record, image, lung, spacing):
    from .data import Sample

    meta = {"cached": True}
    for k in ("volume", "index"):
        if hasattr(record, k):
            meta[k] = getattr(record, k)
    return Sample(id=record.id, image=image, lung=lung, label=None, spacing=spacing,
                  source=getattr(record, "source", "unlabeled"), meta=meta)


def _predictor_and_meta(model, meta, device, batch_size):
    from . import checkpoint as ckpt
    from .inference import Predictor, select_device

    if isinstance(model, (str, os.PathLike)):
        model, meta = ckpt.load_checkpoint(model)
    if isinstance(model, Predictor):
        return model, meta
    dev = select_device(device) if isinstance(device, str) else device
    return Predictor.for_checkpoint(model, meta, dev, batch_size), meta


def renew_pseudo_labels(model, added_ids: Sequence[str], pool: Mapping, meta: dict | None = None,
                        *, eta: float = 0.95, trust: bool = True, untrusted: str = "background",
                        device="cpu", batch_size: int = 16) -> dict[str, np.ndarray]:
    """Pseudo labels (uint8 0/1/2, lung-restricted) of every slice in ``added_ids``; with
    the trust module and ``untrusted="ignore"`` the lung pixels it does not trust are
    :data:`~ssanet.data.UNKNOWN_LABEL`.

    ``model``: a checkpoint path, an SSANet or a :class:`~ssanet.inference.Predictor`;
    ``meta`` gives the preprocessing (a checkpoint brings its own; default: the slices'
    size, blanked outside the lung). ``pool`` maps id -> Sample. Slices are predicted in
    batches of equal shape with :func:`~ssanet.inference.predict_slices`, so the
    probability arrays held at once stay bounded.
    """
    from .inference import predict_slices

    predictor, meta = _predictor_and_meta(model, meta, device, batch_size)
    ids = list(added_ids)
    out: dict[str, np.ndarray] = {}
    if not ids:
        return out
    if meta is None:
        meta = {"preprocessing": {"size": int(pool[ids[0]].image.shape[-1]), "blank_outside_lung": True}}
    by_shape: dict[tuple, list[str]] = {}
    for i in ids:
        by_shape.setdefault(pool[i].image.shape, []).append(i)
    chunk = max(1, batch_size) * 4
    for group in by_shape.values():
        for k in range(0, len(group), chunk):
            part = group[k:k + chunk]
            images = np.stack([pool[i].image for i in part])
            lungs = np.stack([np.asarray(pool[i].lung, bool) for i in part])
            probs = predict_slices(predictor, images, lungs, meta, batch_size=batch_size)
            labels = (trust_filter(probs, lungs, eta, UNKNOWN_LABEL if untrusted == "ignore" else 0)
                      if trust else argmax_labels(probs, lungs))
            out.update(zip(part, labels))
    return {i: out[i] for i in ids}


def save_pseudo_labels(path, labels: Mapping[str, np.ndarray]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: np.asarray(v, np.uint8) for k, v in labels.items()})
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def load_pseudo_labels(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _digest(samples) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(s.id.encode())
        lab = np.ascontiguousarray(s.label, dtype=np.uint8)
        h.update(str(lab.shape).encode())
        h.update(lab.tobytes())
    return h.hexdigest()


def _write_json(path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _copy_atomic(src, dst) -> None:
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".part")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# ------------------------------------------------------------------------ the loop

def round_dir(out_dir, r: int) -> Path:
    return Path(out_dir) / f"round_{r:02d}"


def round_train_config(cfg: SemiSupConfig, r: int, n_labeled: int, n_pseudo: int,
                       init: str = "") -> TrainConfig:
    """The TrainConfig of round ``r``: the loop's re-weighting switch, a per-round seed,
    no time limit (a cut-short round would count as finished); ``init``: the checkpoint a
    warm-started round fine-tunes (round 1 with ``cfg.init``: the adopted M1)."""
    return dataclasses.replace(
        cfg.train, classes="ggo,consolidation", reweight=cfg.reweight,
        seed=cfg.train.seed + r - 1, time_limit_min=0.0, init=init,
        data_description={"semisup_round": r, "labeled_slices": n_labeled,
                          "pseudo_labeled_slices": n_pseudo})


def select_pool(ids: Sequence[str], limit: int, seed: int) -> list[str]:
    """A seeded subset of ``limit`` ids (all when ``limit`` is 0), in pool order."""
    ids = list(ids)
    if not limit or limit >= len(ids):
        return ids
    keep = np.random.default_rng([int(seed), 1]).choice(len(ids), size=int(limit), replace=False)
    return [ids[i] for i in sorted(keep)]


def _score(val_classes: dict) -> float:
    # the trainer's own model-selection score, so that rounds and epochs are chosen alike
    from .train import _score as selection_score
    return float(selection_score({"classes": val_classes}))


def _fresh_state(cfg: SemiSupConfig, pool_ids, labeled_ids) -> dict:
    return {"format": STATE_FORMAT, "config": cfg.to_dict(), "labeled_ids": list(labeled_ids),
            "pool_ids": list(pool_ids), "round": 0, "added": [], "schedule_rng": None,
            "class_weights": [], "rounds": [], "best_round": None, "best_score": None,
            "patience_counter": 0, "finished": False, "stop_reason": None}


def _load_state(path: Path, cfg: SemiSupConfig, pool_ids, labeled_ids) -> dict | None:
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a semi-supervised run state ({STATE_FORMAT})")
    before, now = _comparable(state["config"]), _comparable(cfg.to_dict())
    if before != now or state["pool_ids"] != list(pool_ids) or state["labeled_ids"] != list(labeled_ids):
        differ = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
                  if before.get(k) != now.get(k)][:4]   # named, as `train` names them
        if state["pool_ids"] != list(pool_ids) or state["labeled_ids"] != list(labeled_ids):
            differ.append("the labeled or unlabeled slices")
        raise ValueError(f"{path.parent} holds a semi-supervised run with other settings or data "
                         f"({'; '.join(differ)}); use a new --out directory (or the same options) to resume")
    state["config"] = cfg.to_dict()
    return state


def _stop_reason(state: dict, cfg: SemiSupConfig) -> str | None:
    if state["round"] >= 1 and state["patience_counter"] >= cfg.patience:
        return f"validation DSC did not improve for {cfg.patience} rounds"
    if state["round"] >= cfg.max_rounds:
        return f"max_rounds={cfg.max_rounds} reached"
    if state["round"] >= 1 and not state["pool_ids"]:
        return "no unlabeled slices"
    return None


def run_semisup(cfg: SemiSupConfig, labeled, val, pool, out_dir, *, log=print,
                train_fn: Callable | None = None,
                on_round_end: Callable[[int, dict], None] | None = None) -> dict:
    """Run (or resume) the loop into ``out_dir``; returns the final state (``state.json``).

    ``labeled``/``val``: labeled Samples; ``pool``: unlabeled Samples or lazy records
    (``.id``, ``.load()``). ``train_fn(cfg, train_samples, val_samples, out_dir)`` defaults
    to :func:`ssanet.train.train`; ``on_round_end(round, state)`` runs after each round's
    state is saved.
    """
    from . import checkpoint as ckpt
    from .inference import select_device

    if train_fn is None:
        from .train import train as train_fn
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labeled, val = list(labeled), list(val)
    if not labeled or not val:
        raise ValueError("the semi-supervised loop needs labeled training and validation slices")
    check_labeled_classes([s.label for s in labeled])
    size = cfg.train.size
    lab = [at_size(s, size) for s in labeled]
    lab_counts = check_labeled_classes([s.label for s in lab],
                                       where=f"the labeled training set at the training size {size}")
    records = list(pool)
    pool_ids = select_pool([r.id for r in records], cfg.unlabeled_limit, cfg.train.seed)
    keep = set(pool_ids)
    slices = SlicePool([r for r in records if r.id in keep], size)
    labeled_ids = [s.id for s in labeled]

    state_path = out / "state.json"
    state = _load_state(state_path, cfg, pool_ids, labeled_ids)
    schedule = AdditionSchedule(pool_ids, cfg.t, cfg.train.seed)
    stop = StopCriterion(cfg.patience)
    if state is None:
        state = _fresh_state(cfg, pool_ids, labeled_ids)
    else:
        if state["round"] >= 1:
            schedule.load_state_dict({"added": state["added"], "rng": state["schedule_rng"]})
        stop.load_state_dict(state)
        log(f"resuming {out} after round {state['round']}")
    device = select_device(cfg.train.device)

    while True:
        reason = _stop_reason(state, cfg)
        if reason:
            if not state["finished"] or state["stop_reason"] != reason:
                state.update(finished=True, stop_reason=reason)
                _write_json(state_path, state)
            log(f"stopped after round {state['round']}: {reason}; best round {state['best_round']} "
                f"(validation DSC {state['best_score']:.3f}) -> {out / 'best.safetensors'}")
            break
        state.update(finished=False, stop_reason=None)
        r = state["round"] + 1
        rdir = round_dir(out, r)
        t0 = time.time()
        new: list[str] = []
        pseudo: dict[str, np.ndarray] = {}
        if r > 1:
            new = schedule.next()
            pseudo = renew_pseudo_labels(round_dir(out, r - 1) / "best.safetensors", schedule.added,
                                         slices, eta=cfg.eta, trust=cfg.trust,
                                         untrusted=cfg.untrusted, device=device,
                                         batch_size=cfg.pseudo_batch_size)
            save_pseudo_labels(rdir / "pseudo_labels.npz", pseudo)
        t_pseudo = time.time() - t0
        added = list(schedule.added)
        train_set = lab + [dataclasses.replace(slices[i], label=pseudo[i]) for i in added]
        counts = pixel_counts([s.label for s in train_set], NUM_CLASSES)
        weights = class_weights(counts)
        pseudo_counts = pixel_counts(list(pseudo.values()), NUM_CLASSES) if pseudo else np.zeros(NUM_CLASSES)
        shortfall = pseudo_label_shortfall(lab_counts, pseudo_counts)
        for short in shortfall:
            log(f"warning: round {r}'s pseudo labels hold {100 * short['pseudo_share']:.2f} % "
                f"{short['class']} pixels against {100 * short['labeled_share']:.2f} % in the "
                f"labeled slices; trained on them the model may stop calling {short['class']} "
                f"(the trust threshold --eta keeps only pixels the previous model is sure of; "
                f"a stronger M1, a lower --eta, --reweight or --untrusted ignore are the levers)")
        if r == 1:
            init = cfg.init
        else:
            init = str(round_dir(out, r - 1) / "best.safetensors") if cfg.warm_start else ""
        tcfg = round_train_config(cfg, r, len(lab), len(added), init)
        digest = _digest(train_set)
        log(f"== round {r}: {len(lab)} labeled + {len(added)} pseudo-labeled ({len(new)} new, "
            f"{len(schedule.remaining)} left), class weights {np.round(weights, 3).tolist()}"
            + ("" if cfg.reweight else " (not applied)"))

        t1 = time.time()
        done = _finished_round(rdir, tcfg, digest)
        if done is None and r == 1 and cfg.init:
            log(f"round 1: M1 is {cfg.init} (not trained here); scoring it on the validation slices")
            adopt_checkpoint(cfg.init, val, rdir / "best.safetensors", device=device,
                             member=cfg.init_member)
            t_train = 0.0
        elif done is None:
            train_fn(tcfg, train_set, val, rdir)
            t_train = time.time() - t1
        else:
            log(f"round {r} was already trained in {rdir}; reusing it")
            t_train = float(done["timing"]["train_s"])
        meta = ckpt.read_meta(rdir / "best.safetensors")
        val_classes = meta.get("val_metrics") or {}
        if not val_classes:
            raise RuntimeError(f"{rdir / 'best.safetensors'} carries no validation metrics")
        score = _score(val_classes)
        improved = stop.update(r, score)
        if improved:
            _copy_atomic(rdir / "best.safetensors", out / "best.safetensors")
        share = counts / counts.sum()
        record = {
            "round": r, "n_labeled": len(lab), "n_pseudo": len(added), "n_new": len(new),
            "pool_remaining": len(schedule.remaining),
            "class_weights": weights.tolist(), "ce_weighted": cfg.reweight,
            "pixel_share": share.tolist(),
            "pseudo_pixel_share": (pseudo_counts / max(1, pseudo_counts.sum())).tolist(),
            "pseudo_shortfall": [x["class"] for x in shortfall],
            "val": val_classes, "val_score": score, "best_epoch": meta.get("training", {}).get("epoch"),
            "improved": improved, "best_round": stop.best_round, "patience_counter": stop.counter,
            "train_set_sha256": digest,
            "timing": {"device": device.type, "pseudo_label_s": round(t_pseudo, 2),
                       "train_s": round(t_train, 2), "total_s": round(time.time() - t0, 2)},
        }
        _write_json(rdir / "round.json", {"train_config": asdict(tcfg), **record})
        if not cfg.keep_last_checkpoints:
            for name in ("last.safetensors", "train_state.pt"):
                (rdir / name).unlink(missing_ok=True)
        sd = schedule.state_dict()
        state.update(round=r, added=sd["added"], schedule_rng=sd["rng"], **stop.state_dict())
        state["class_weights"].append(weights.tolist())
        state["rounds"].append(record)
        _write_json(state_path, state)
        write_reports(out, state)
        if pseudo:
            show = added[:cfg.contact_sheet_n]
            contact_sheet([slices[i] for i in show], [pseudo[i] for i in show],
                          out / f"pseudo_round_{r:02d}.png",
                          f"round {r}: pseudo labels by the round-{r - 1} model "
                          f"({'trust eta=%g' % cfg.eta if cfg.trust else 'argmax'}"
                          f"{'; untrusted: unknown, blue' if cfg.trust and cfg.untrusted == 'ignore' else ''})")
        log(f"round {r}: validation per-slice DSC ggo {val_classes['ggo']['dsc']:.3f} consolidation "
            f"{val_classes['consolidation']['dsc']:.3f}; score (mean pooled DSC, what rounds are chosen by) "
            f"{score:.3f} (best round "
            f"{stop.best_round}, {stop.counter}/{cfg.patience} without improvement) "
            f"in {record['timing']['total_s']:.0f}s")
        if on_round_end is not None:
            on_round_end(r, state)
    return state


def adopt_checkpoint(path, val, dst, device="cpu", member: int = -1) -> dict:
    """Copy a supervised checkpoint to ``dst`` as the loop's M1, with its validation metrics
    measured on ``val`` the way the trainer measures them (its own preprocessing). The loop
    retrains single networks: of an ensemble, network ``member`` becomes M1."""
    from . import checkpoint as ckpt
    from .evaluate import evaluate_samples
    from .inference import Predictor

    model, meta = ckpt.load_checkpoint(path)
    ckpt.require_single_network(meta, "--init", member)
    if meta.get("class_names") != ckpt.default_class_names(NUM_CLASSES):
        raise ckpt.CheckpointError(f"--init {path}: the loop needs a GGO/consolidation model, "
                                   f"this one has classes {meta.get('class_names')}")
    training = dict(meta.get("training") or {})
    adopted = {"name": meta["name"], "sha256": meta["sha256"]}
    if ckpt.is_ensemble(meta):
        model = model.members[member]
        training = dict(training["ensemble_of"][member].get("training") or {})
        adopted["member"] = member
    result = evaluate_samples(Predictor.for_checkpoint(model, meta, device), list(val), meta)
    new_meta = {k: v for k, v in meta.items()
                if k not in ("path", "name", "sha256", "model", "format", "ensemble", "storage_dtype")}
    new_meta["val_metrics"] = result["classes"]
    new_meta["training"] = {**training, "adopted_as_m1": adopted}
    ckpt.save_checkpoint(dst, model, new_meta)
    return result["classes"]


def _finished_round(rdir: Path, tcfg: TrainConfig, digest: str) -> dict | None:
    """The round.json of a round already trained on exactly this data and config."""
    p = rdir / "round.json"
    if not p.is_file() or not (rdir / "best.safetensors").is_file():
        return None
    rec = json.loads(p.read_text())
    same_cfg = comparable_training(rec.get("train_config", {})) == comparable_training(asdict(tcfg))
    return rec if same_cfg and rec.get("train_set_sha256") == digest else None


# ------------------------------------------------------------------------ reports

ROUND_FIELDS = ["round", "n_labeled", "n_pseudo", "n_new", "pool_remaining",
                "w_background", "w_ggo", "w_consolidation", "share_ggo", "share_consolidation",
                "val_ggo_dsc", "val_consolidation_dsc", "val_infection_dsc",
                "val_ggo_dsc_pooled", "val_consolidation_dsc_pooled", "val_score",
                "improved", "best_round", "patience_counter", "seconds_pseudo_label",
                "seconds_train", "seconds_total", "device"]


def write_reports(out_dir, state: dict) -> None:
    """rounds.json, rounds.csv, val_dsc.png and class_weights.png from the state."""
    out = Path(out_dir)
    rounds = state["rounds"]
    _write_json(out / "rounds.json", rounds)
    rows = []
    for rec in rounds:
        w, s, v, tm = rec["class_weights"], rec["pixel_share"], rec["val"], rec["timing"]
        rows.append({
            "round": rec["round"], "n_labeled": rec["n_labeled"], "n_pseudo": rec["n_pseudo"],
            "n_new": rec["n_new"], "pool_remaining": rec["pool_remaining"],
            "w_background": f"{w[0]:.4f}", "w_ggo": f"{w[1]:.4f}", "w_consolidation": f"{w[2]:.4f}",
            "share_ggo": f"{s[1]:.5f}", "share_consolidation": f"{s[2]:.5f}",
            "val_ggo_dsc": f"{v['ggo']['dsc']:.4f}", "val_consolidation_dsc": f"{v['consolidation']['dsc']:.4f}",
            "val_infection_dsc": f"{v['infection']['dsc']:.4f}" if "infection" in v else "",
            **{f"val_{n}_dsc_pooled": f"{v[n]['dsc_pooled']:.4f}" if "dsc_pooled" in v[n] else ""
               for n in ("ggo", "consolidation")},
            "val_score": f"{rec['val_score']:.4f}", "improved": int(rec["improved"]),
            "best_round": rec["best_round"], "patience_counter": rec["patience_counter"],
            "seconds_pseudo_label": tm["pseudo_label_s"], "seconds_train": tm["train_s"],
            "seconds_total": tm["total_s"], "device": tm["device"]})
    tmp = out / "rounds.csv.part"
    with open(tmp, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=ROUND_FIELDS)
        wr.writeheader()
        wr.writerows(rows)
    os.replace(tmp, out / "rounds.csv")
    _plot_rounds(out, state)


def _plot_rounds(out: Path, state: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = state["rounds"]
    if not rounds:
        return
    x = [r["round"] for r in rounds]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("ggo", "consolidation", "infection"):
        if name in rounds[0]["val"]:
            ax.plot(x, [r["val"][name]["dsc"] for r in rounds], marker="o", label=name)
    ax.plot(x, [r["val_score"] for r in rounds], "k--", marker=".", label="selection score")
    if state.get("best_round"):
        ax.axvline(state["best_round"], color="grey", lw=0.8)
    ax.set_xlabel("round"); ax.set_ylabel("validation DSC (mean over slices)"); ax.set_ylim(0, 1)
    ax.set_xticks(x); ax.legend(fontsize=8)
    ax.set_title("validation DSC per class" + (f" (best: round {state['best_round']})"
                                               if state.get("best_round") else ""))
    fig.tight_layout(); fig.savefig(out / "val_dsc.png", dpi=90); plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    w = np.array([r["class_weights"] for r in rounds])
    for c, name in enumerate(CLASS_NAMES):
        ax.plot(x, w[:, c], marker="o", label=name)
    ax.set_yscale("log"); ax.set_xlabel("round"); ax.set_ylabel("weight 1 / (C * P_c)")
    ax.set_xticks(x); ax.legend(fontsize=8)
    applied = state["config"].get("reweight", True)
    ax.set_title("class weights" + ("" if applied else " (computed, not applied: --no-reweight)"))
    fig.tight_layout(); fig.savefig(out / "class_weights.png", dpi=90); plt.close(fig)


def contact_sheet(samples, labels, path, title: str = "", cols: int = 4) -> None:
    """A grid of slices with their pseudo labels (GGO red, consolidation green, unknown
    pixels of ``--untrusted ignore`` blue)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    if not samples:
        return
    cm = ListedColormap([(0, 0, 0, 0), (1, 0.2, 0.2, 0.5), (0.2, 0.9, 0.2, 0.5), (0.2, 0.4, 1, 0.35)])
    rows = math.ceil(len(samples) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, s, lab in zip(axes.ravel(), samples, labels):
        ax.imshow(s.image, cmap="gray", vmin=0, vmax=255)
        lung = np.asarray(s.lung, bool)
        if lung.any() and not lung.all():
            ax.contour(lung.astype(float), levels=[0.5], colors="yellow", linewidths=0.4)
        shown = np.where(np.asarray(lab) == UNKNOWN_LABEL, 3, lab)
        ax.imshow(shown, cmap=cm, vmin=0, vmax=3, interpolation="nearest")
        ax.set_title(s.id[-28:], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------ ablation

# The paper's Table 4.
ABLATION_VARIANTS = {
    "S1": {"reweight": False, "trust": False},   # iteration only
    "S2": {"reweight": True, "trust": False},    # + re-weighting
    "S3": {"reweight": False, "trust": True},    # + trust module
    "S4": {"reweight": True, "trust": True},     # + both
}
METRICS = ("dsc", "hd95_mm", "mae", "nsd_3mm")


def _with_average(classes: dict) -> dict:
    rows = {n: dict(classes[n]) for n in ("ggo", "consolidation")}
    keys = [k for k in rows["ggo"] if k in rows["consolidation"]]
    rows["average"] = {k: float(np.mean([rows["ggo"][k], rows["consolidation"][k]])) for k in keys}
    return rows


def run_ablation(cfg: SemiSupConfig, labeled, val, pool, test, out_dir, *,
                 supervised_checkpoint=None, variants: Sequence[str] | None = None, log=print,
                 train_fn: Callable | None = None) -> dict:
    """S1-S4 with the same seeds and budget, each evaluated on ``test``, next to the
    supervised-only model; writes ``ablation.md`` / ``.json`` / ``.csv`` into ``out_dir``.

    The supervised-only row is ``supervised_checkpoint`` when given, else round 1 of S2
    (SSA-Net with re-weighted CE on the labeled slices alone, same epochs). Round 1
    depends only on the re-weighting switch, so S3 and S4 reuse the round 1 of S1 and S2.
    """
    from . import checkpoint as ckpt
    from .evaluate import evaluate_samples, write_json
    from .inference import Predictor, select_device

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pool = list(pool)
    test = list(test)
    device = select_device(cfg.train.device)
    names = list(variants or ABLATION_VARIANTS)
    table: dict[str, dict] = {}

    def evaluate(path, name, rdir):
        model, meta = ckpt.load_checkpoint(path)
        res = evaluate_samples(Predictor(model, device), test, meta)
        write_json(res, Path(rdir) / "eval_test.json", {"checkpoint": str(path), "variant": name})
        return _with_average(res["classes"])

    for name in names:
        vcfg = dataclasses.replace(cfg, **ABLATION_VARIANTS[name])
        rd = out / name
        for other in names[:names.index(name)]:
            src = round_dir(out / other, 1)
            if ABLATION_VARIANTS[other]["reweight"] == vcfg.reweight and (src / "round.json").is_file() \
                    and not round_dir(rd, 1).exists():
                shutil.copytree(src, round_dir(rd, 1))
                break
        log(f"==== {name}: reweight={vcfg.reweight} trust={vcfg.trust} -> {rd}")
        state = run_semisup(vcfg, labeled, val, pool, rd, log=log, train_fn=train_fn)
        table[name] = {"classes": evaluate(rd / "best.safetensors", name, rd),
                       "best_round": state["best_round"], "rounds": state["round"]}

    if supervised_checkpoint:
        sup_path, sup_note = Path(supervised_checkpoint), f"supervised-only ({Path(supervised_checkpoint).name})"
    else:
        src = next((n for n in ("S2", "S4") if n in names), names[0])
        sup_path = round_dir(out / src, 1) / "best.safetensors"
        sup_note = f"supervised-only (round 1 of {src}, labeled slices only)"
    sup_dir = out / "supervised"
    sup_dir.mkdir(exist_ok=True)
    table = {"supervised": {"classes": evaluate(sup_path, "supervised", sup_dir), "note": sup_note},
             **table}
    write_ablation_table(out, table)
    return table


def write_ablation_table(out_dir, table: dict) -> str:
    out = Path(out_dir)
    pooled = all("dsc_pooled" in m for e in table.values() for m in e["classes"].values())
    cols = list(METRICS) + (["dsc_pooled"] if pooled else [])
    lines = ["| variant | class | DSC | HD95 (mm) | MAE | NSD@3mm |" + (" pooled DSC |" if pooled else ""),
             "|---|---|---|---|---|---|" + ("---|" if pooled else "")]
    csv_rows = []
    for name, entry in table.items():
        for c, m in entry["classes"].items():
            lines.append(f"| {name} | {c} | {m['dsc']:.3f} | {m['hd95_mm']:.2f} | {m['mae']:.4f} "
                         f"| {m['nsd_3mm']:.3f} |" + (f" {m['dsc_pooled']:.3f} |" if pooled else ""))
            csv_rows.append({"variant": name, "class": c, **{k: m[k] for k in cols}})
    notes = [f"- {n}: {e['note']}" if "note" in e else
             f"- {n}: {ABLATION_VARIANTS[n]}, best round {e['best_round']} of {e['rounds']}"
             for n, e in table.items()]
    md = "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
    (out / "ablation.md").write_text(md)
    _write_json(out / "ablation.json", table)
    with open(out / "ablation.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["variant", "class", *cols])
        wr.writeheader()
        wr.writerows(csv_rows)
    return md


# ---------------------------------------------------------------------------- CLI

def _add_args(p) -> None:
    d, t = SemiSupConfig(), TrainConfig()
    p.add_argument("--data", help="data root holding covid-semiseg/ and medseg100/ "
                   "(default: $SSALESIONSEG_DATA)")
    p.add_argument("--out", required=True, help="run directory (rerun the same command to resume)")
    p.add_argument("--t", type=int, default=d.t, help="pseudo-labeled slices added per round")
    p.add_argument("--eta", type=float, default=d.eta, help="trust threshold (probability > eta)")
    p.add_argument("--max-rounds", type=int, default=d.max_rounds)
    p.add_argument("--patience", type=int, default=d.patience,
                   help="stop after this many rounds without a better validation DSC")
    p.add_argument("--reweight", action=BooleanFlag, default=d.reweight,
                   help="class weights 1/(C*P_c) in the cross-entropy (--no-reweight: plain CE)")
    p.add_argument("--trust", action=BooleanFlag, default=d.trust,
                   help="trust module (--no-trust: plain argmax pseudo labels)")
    p.add_argument("--untrusted", default=d.untrusted, choices=UNTRUSTED_CHOICES,
                   help="pseudo label of a lung pixel the trust module does not keep: background "
                        "(the paper) or ignore (no loss there, so unsure lesions are not learnt "
                        "as background)")
    p.add_argument("--size", type=int, default=None,
                   help=f"training slice size (paper: 512; default: the --init checkpoint's size, else {t.size})")
    p.add_argument("--epochs-per-round", type=int, default=t.epochs, dest="epochs",
                   help=f"epochs of each round's training (default {t.epochs})")
    p.add_argument("--batch-size", type=positive_int, default=t.batch_size, help=f"default {t.batch_size}")
    p.add_argument("--steps-per-epoch", type=int, default=t.steps_per_epoch,
                   help="batches per epoch drawn at random (default 0: one pass over the round's "
                        "slices, so later rounds cost more); N fixes every round's budget")
    p.add_argument("--lr", type=float, default=t.lr)
    p.add_argument("--sad-start", type=int, default=None, dest="sad_start_epoch",
                   help="epoch of each round at which SAD starts (default: 40/150 of the epochs)")
    p.add_argument("--no-sad", dest="sad", action="store_false")
    p.add_argument("--val-every", type=int, default=t.val_every)
    p.add_argument("--unlabeled-limit", type=int, default=d.unlabeled_limit,
                   help="use a seeded random subset of this many unlabeled slices (0: all)")
    p.add_argument("--pseudo-batch-size", type=int, default=d.pseudo_batch_size)
    p.add_argument("--init", default=d.init, metavar="CHECKPOINT",
                   help="use this supervised GGO/consolidation checkpoint as M1 (round 1 is "
                        "scored on validation, not trained)")
    p.add_argument("--init-member", type=int, default=d.init_member, metavar="K",
                   help="with an ensemble as --init (e.g. the bundled model): its K-th network is M1")
    p.add_argument("--warm-start", action=BooleanFlag, default=d.warm_start,
                   help="each round fine-tunes the previous round's model (default: from scratch, "
                        "as the paper; warm starts make CPU rounds affordable)")
    p.add_argument("--semiseg-renderings", action="store_true",
                   help="labeled slices (and validation) also in COVID-SemiSeg's own rendering, as "
                        "`train --semiseg-renderings`; the unlabeled pool looks like that rendering")
    p.add_argument("--augment", default=t.augment, choices=sorted(AUGMENT_PRESETS),
                   help="augmentation preset of each round's training (as `train --augment`)")
    p.add_argument("--workers", type=int, default=t.workers, metavar="N",
                   help="augmentation processes per round's training (as `train --workers`)")
    p.add_argument("--seed", type=int, default=t.seed)
    p.add_argument("--device", default=t.device, help="auto | cpu | cuda | mps")


def config_from_args(a) -> SemiSupConfig:
    sad_start = a.sad_start_epoch
    if sad_start is None:
        sad_start = int(round(a.epochs * SAD_START_FRACTION))
    tcfg = TrainConfig(size=a.size, epochs=a.epochs, batch_size=a.batch_size,
                       steps_per_epoch=a.steps_per_epoch, lr=a.lr,
                       sad=a.sad, sad_start_epoch=sad_start, seed=a.seed, device=a.device,
                       val_every=max(1, min(a.val_every, a.epochs)), augment=a.augment,
                       workers=a.workers)
    return SemiSupConfig(t=a.t, eta=a.eta, max_rounds=a.max_rounds, patience=a.patience,
                         reweight=a.reweight, trust=a.trust, untrusted=a.untrusted,
                         unlabeled_limit=a.unlabeled_limit,
                         pseudo_batch_size=a.pseudo_batch_size, init=a.init or "",
                         init_member=a.init_member,
                         warm_start=a.warm_start, semiseg_renderings=a.semiseg_renderings,
                         train=tcfg)


def _load_data(a):
    from . import data
    root = data.data_root(a.data)
    splits = data.default_splits(root)
    if a.semiseg_renderings:
        splits = data.with_semiseg_renderings(splits, root)
    return root, splits, data.load_unlabeled(root)


def _pool_for(a, pool):
    ids = set(select_pool([r.id for r in pool], a.unlabeled_limit, a.seed))
    return prepare_pool([r for r in pool if r.id in ids], a.size,
                        Path(a.out) / f"unlabeled_pool_{a.size}px.npz")


def _check_init(a) -> None:
    """Refuse an --init the loop cannot start from before the pool is read and prepared, and
    settle the slice size (--init's own unless --size says otherwise)."""
    from .cli import resolve_training_size
    if a.init:
        from . import checkpoint as ckpt
        ckpt.require_single_network({**ckpt.read_meta(a.init), "path": a.init}, "--init", a.init_member)
    resolve_training_size(a)


def cmd_semisup(a) -> int:
    _check_init(a)
    _, splits, pool = _load_data(a)
    pool = _pool_for(a, pool)
    state = run_semisup(config_from_args(a), splits["train"], splits["val"], pool, a.out)
    print(json.dumps({"rounds": state["round"], "best_round": state["best_round"],
                      "best_val_dsc": state["best_score"], "stop_reason": state["stop_reason"],
                      "model": str(Path(a.out) / "best.safetensors")}))
    return 0


def cmd_semisup_ablation(a) -> int:
    from . import data
    from .cli import load_split

    _check_init(a)
    root, splits, pool = _load_data(a)
    pool = _pool_for(a, pool)
    test = load_split(data, root, a.eval_dataset, a.eval_split)
    table = run_ablation(config_from_args(a), splits["train"], splits["val"], pool, test, a.out,
                         supervised_checkpoint=a.supervised)
    print((Path(a.out) / "ablation.md").read_text())
    return 0 if table else 1


def add_subcommands(subparsers) -> None:
    """Register ``semisup`` and ``semisup-ablation`` on the ``ssalesionseg`` CLI."""
    s = subparsers.add_parser(
        "semisup", help="semi-supervised few-shot loop: pseudo labels, trust module, "
                        "re-weighting (resumable)",
        description="Labeled/validation slices: ssanet.data.default_splits; unlabeled pool: "
                    "the 1600 COVID-SemiSeg slices (ssanet.data.load_unlabeled).")
    _add_args(s)
    s.set_defaults(func=cmd_semisup)

    ab = subparsers.add_parser(
        "semisup-ablation", help="Table 4: S1 (iteration) .. S4 (+re-weighting +trust) and the "
                                 "supervised-only model on the test split")
    _add_args(ab)
    ab.add_argument("--supervised", help="supervised-only checkpoint for the table "
                    "(default: round 1 of S2, trained on the labeled slices alone)")
    ab.add_argument("--eval-dataset", default="medseg100", choices=["medseg100", "covid-semiseg"],
                    help="medseg100: the COVID-SemiSeg test slices at full size (same GT pixels)")
    ab.add_argument("--eval-split", default="test", choices=EVAL_SPLITS,
                    help="where S1-S4 are scored (default test: Table 4 reports it; compared, never chosen on)")
    ab.set_defaults(func=cmd_semisup_ablation)
