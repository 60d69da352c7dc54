"""Supervised SSA-Net training: Dice (+ re-weighted CE) + 0.1 * SAD after a warm-up.

A run directory holds: ``config.json``, ``log.csv`` (one row per epoch), ``best.safetensors``
(best validation score), ``last.safetensors`` + ``train_state.pt`` (resume), ``curves.png``;
with ``ema`` the checkpoints hold the averaged weights and ``raw.safetensors`` the trained ones.
Re-running the same command on the same directory resumes where it stopped.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import json
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import checkpoint as ckpt
from .data import AUGMENT_PRESETS
from .evaluate import evaluate_samples
from .inference import Predictor, autocast_dtype, configure_cpu_threads, select_device
from .losses import SSANetLoss, class_weights, pixel_counts
from .model import SSANet
from .preprocess import LUNG_WINDOW_HU


@dataclass
class TrainConfig:
    classes: str = "ggo,consolidation"      # or "infection" (binary, sigmoid)
    size: int = 256
    epochs: int = 150
    batch_size: int = 8
    steps_per_epoch: int = 0                 # 0 = one pass over the data; N = N batches drawn at random
    lr: float = 1e-3
    weight_decay: float = 1e-4
    sad: bool = True
    sad_start_epoch: int = 40
    sad_alpha: float = 0.1
    detach_sad_target: bool = False
    spatial_conv: bool = True
    sc_bound: bool = True                    # cap the spatial convolution's gain (see model.SpatialConv)
    reweight: bool = False                   # paper re-weighting 1/(C*P_c) of the CE term (semi-supervised loop)
    blank_outside_lung: bool = True
    augment: str = "standard"                # a preset of data.AUGMENT_PRESETS ("standard" | "strong")
    seed: int = 0
    device: str = "auto"
    val_every: int = 5
    time_limit_min: float = 0.0              # 0 = no limit; stops cleanly after the epoch in progress
    amp: bool = True                         # float16 autocast on CUDA, bfloat16 on CPUs that support it
    workers: int = -1                        # DataLoader worker processes; -1: 0 on CPU, up to 4 on a GPU
    nominal_spacing_mm: float = 0.7
    init: str = ""                           # fine-tune: start from this checkpoint's weights
    init_member: int = -1                    # with an ensemble as --init: which of its networks
    dice_per_slice: bool = False             # Dice per slice and class, then the mean (default: batch sums)
    ema: float = 0.0                         # 0 = off; else decay of an exponential moving average of
                                             # the weights, which is what is validated and saved
    data_description: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return 1 if self.classes == "infection" else 3


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _meta(cfg: TrainConfig, val: dict | None, epoch: int, init_sha256: str | None = None) -> dict:
    training = {"config": asdict(cfg), "epoch": epoch}
    if init_sha256:
        training["init_sha256"] = init_sha256
    return {
        "class_names": ckpt.default_class_names(cfg.num_classes),
        "preprocessing": {
            "size": cfg.size,
            "window_hu": list(LUNG_WINDOW_HU),
            "blank_outside_lung": cfg.blank_outside_lung,
            "pixel_spacing_mm": cfg.nominal_spacing_mm,
            "fov_px": 512,
            "orientation": "LPS axial slice: rows anterior->posterior, columns patient right->left",
        },
        "training": training,
        "val_metrics": val or {},
    }


def _score(val: dict) -> float:
    """Model-selection score: mean pooled validation Dice over the reported classes.

    Pooled rather than per-slice: with six validation slices the per-slice mean mostly
    counts slices where a class is absent and predicted absent.
    """
    return float(np.mean([m["dsc_pooled"] for m in val["classes"].values()]))


def check_init(cfg: TrainConfig, meta: dict | None = None) -> None:
    """Refuse an ``--init`` checkpoint this training cannot start from (an ensemble without
    a member, other classes, other lung blanking), from its header: callers check before
    reading any data."""
    if meta is None:
        meta = {**ckpt.read_meta(cfg.init), "path": cfg.init}
    ckpt.require_single_network(meta, "--init", cfg.init_member)
    want = ckpt.default_class_names(cfg.num_classes)
    if meta.get("class_names") != want:
        raise ckpt.CheckpointError(
            f"--init {cfg.init}: its classes {meta.get('class_names')} are not {want}; "
            "fine-tune from a checkpoint trained for the same classes")
    blank = (meta.get("preprocessing") or {}).get("blank_outside_lung", True)
    if bool(blank) != cfg.blank_outside_lung:
        raise ckpt.CheckpointError(
            f"--init {cfg.init} was trained with blank_outside_lung={blank}; train with the same "
            "setting (--keep-outside-lung) or start from scratch")


def load_init_weights(model: SSANet, cfg: TrainConfig) -> str:
    """Copy the weights of checkpoint ``cfg.init`` into ``model`` (fine-tuning); returns its
    SHA-256. The checkpoint must be the same network with the same classes and the same
    input (lung blanking); its slice size may differ (the network is fully convolutional)."""
    loaded, meta = ckpt.load_checkpoint(cfg.init)
    check_init(cfg, meta)
    if ckpt.is_ensemble(meta):
        loaded = loaded.members[cfg.init_member]
    try:
        model.load_state_dict(loaded.state_dict())
    except RuntimeError as e:
        raise ckpt.CheckpointError(f"--init {cfg.init} does not fit this network "
                                   f"(spatial convolution / SAD settings differ): {e}") from None
    return meta["sha256"]   # load_checkpoint hashed the file already


def training_size(size: int | None, init: str = "") -> tuple[int, str | None]:
    """The slice size a run trains at, and a line saying why when it is not the plain default.

    ``size`` given: that size (with a note when it differs from the ``init`` checkpoint's own,
    e.g. a deliberate 320 -> 512 stage). Not given: the ``init`` checkpoint's size, so that
    fine-tuning the bundled 512² model stays at 512² (its figures drop at other sizes); with
    no ``init``, ``TrainConfig.size``."""
    own = None
    if init:
        own = (ckpt.read_meta(init).get("preprocessing") or {}).get("size")
    if size is None:
        if own:
            return int(own), f"--size not given: training at {own}², the size --init was trained at"
        return TrainConfig.size, None
    if size < 32 or size % 32:
        raise ValueError(f"--size {size}: use a multiple of 32 (the network halves the slice five "
                         "times), e.g. 256, 320 or 512")
    if own and int(own) != size:
        return size, (f"note: --init was trained at {own}², this run trains at {size}² as asked; "
                      f"its figures at {size}² can be lower (omit --size to keep {own}²)")
    return size, None


class WeightEMA:
    """Exponential moving average of a model's weights and buffers (BatchNorm statistics
    included), updated after every optimizer step with decay ``min(decay, (1+n)/(10+n))``
    so that the first steps do not freeze the starting point in. Validation, ``best`` and
    ``last`` use the averaged weights; the raw weights are kept for resuming."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, m in zip(self.model.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.mul_(d).add_(m.detach(), alpha=1 - d)
            else:
                e.copy_(m)


def loader_workers(cfg: TrainConfig, device: torch.device) -> int:
    """``cfg.workers``, or with -1 (auto): none on a CPU (the augmentation would compete with
    the training step for the same cores), else up to 4 processes so that the augmentation
    (~40 ms per 512² slice with the strong preset) keeps a GPU fed."""
    if cfg.workers >= 0:
        return cfg.workers
    if device.type == "cpu":
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


class _EpochSampler(torch.utils.data.Sampler):
    """Yields ``(epoch, index)`` for the indices of ``base``, with the dataset's epoch read
    in the main process when an epoch's iteration starts: workers that persist from one
    epoch to the next still augment with the right epoch's seed."""

    def __init__(self, base, ds):
        self.base, self.ds = base, ds

    def __iter__(self):
        epoch = getattr(self.ds, "epoch", 0)
        return ((epoch, i) for i in self.base)

    def __len__(self) -> int:
        return len(self.base)


def make_loader(ds, cfg: TrainConfig, gen: torch.Generator, workers: int = 0) -> DataLoader:
    """Shuffled batches: one pass over ``ds`` per epoch, or with ``cfg.steps_per_epoch = N``
    a fixed budget of N batches whatever the set's size (the semi-supervised rounds grow
    from 46 to over 1600 slices), drawn from successive permutations of the set.

    ``workers`` > 0 augments in that many persistent processes; the batches are the same as
    with none, since each item's augmentation is seeded by (seed, epoch, index). Items are
    asked for as ``ds[(epoch, index)]`` when ``ds`` has an epoch (:class:`SliceDataset`)."""
    if cfg.steps_per_epoch > 0:
        base = torch.utils.data.RandomSampler(ds, num_samples=cfg.steps_per_epoch * cfg.batch_size,
                                              generator=gen)
        drop_last = True
    else:
        base = torch.utils.data.RandomSampler(ds, generator=gen)
        drop_last = len(ds) > cfg.batch_size
    sampler = _EpochSampler(base, ds) if hasattr(ds, "set_epoch") else base
    return DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=drop_last,
                      num_workers=workers, persistent_workers=workers > 0)


@contextlib.contextmanager
def _saving_uninterrupted():
    """Ctrl-C during the block takes effect when it ends: an epoch's log row, weights and
    training state are saved together, so a resume never pairs one epoch's weights with
    another's optimizer state (or logs an epoch twice)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    except ValueError:   # not the main interpreter (e.g. embedded): nothing to defer
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def train_step(model, x, y, loss_fn, opt, scaler, epoch: int, amp_dtype) -> dict:
    """One optimizer step on the batch (x, y) (already on the model's device): forward under
    autocast with ``amp_dtype`` (None: float32), loss in float32, scaled backward, step.
    Returns the loss terms. `train` runs this; scripts/bench_training.py times it."""
    with torch.autocast(device_type=x.device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None):
        logits, stages = model(x, return_attention=True)
    terms = loss_fn(logits.float(), y, [s.float() for s in stages], epoch)
    opt.zero_grad(set_to_none=True)
    scaler.scale(terms["total"]).backward()
    scaler.step(opt)
    scaler.update()
    return terms


# settings that may change when a run is resumed (they do not change what is learned)
_RUN_ONLY = ("time_limit_min", "device", "workers")


def comparable_training(config: dict) -> dict:
    """A TrainConfig as written to JSON, in the form two runs are compared in: settings added
    after it was written take their defaults (what that run used), ``_RUN_ONLY`` is dropped."""
    d = json.loads(json.dumps({**asdict(TrainConfig()), **config}))
    desc = d.get("data_description")
    if isinstance(desc, dict) and isinstance(desc.get("train"), str):
        # the "train" line is for people and its wording changes; the slice count is compared
        # (runs written before n_train led their line with it)
        text = desc.pop("train")
        if "n_train" not in desc:
            found = re.search(r"(\d+) slices", text)
            desc["n_train"] = int(found.group(1)) if found else text
    if isinstance(desc, dict) and isinstance(desc.get("cases"), dict):
        # where the case folders are (names before 2026-12, full paths since) is not what the
        # run trains on; their slice counts are
        desc["cases"] = sorted(desc["cases"].values())
    if isinstance(desc, dict):
        desc.pop("case_sha256", None)   # for `evaluate --cases`; runs before it was recorded resume alike
    if isinstance(desc, dict) and isinstance(desc.get("val_cases"), list):
        # the validation cases by file name: the folder may be spelt another way on resume
        desc["val_cases"] = sorted(os.path.basename(str(v)) for v in desc["val_cases"])
    return {k: v for k, v in d.items() if k not in _RUN_ONLY}


def train(cfg: TrainConfig, train_samples, val_samples, out_dir, log=print) -> dict:
    """Train (or resume) into ``out_dir``; returns the best validation result."""
    from .data import SliceDataset

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _seed_all(cfg.seed)
    device = select_device(cfg.device)
    if device.type == "cpu":
        configure_cpu_threads()
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True    # fixed slice size: let cuDNN pick its fastest kernels
    model = SSANet(2, cfg.num_classes, spatial_conv=cfg.spatial_conv, sad=cfg.sad,
                   sc_bound=cfg.sc_bound).to(device)
    init_sha = load_init_weights(model, cfg) if cfg.init else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp_dtype = autocast_dtype(device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    weights = None
    if cfg.num_classes > 1 and cfg.reweight:
        weights = class_weights(pixel_counts([s.label for s in train_samples], cfg.num_classes)).tolist()
    loss_fn = SSANetLoss(alpha=cfg.sad_alpha, sad_start_epoch=cfg.sad_start_epoch, use_sad=cfg.sad,
                         detach_target=cfg.detach_sad_target, ce_weights=weights,
                         dice_per_slice=cfg.dice_per_slice)

    if cfg.sad and cfg.sad_start_epoch >= cfg.epochs:
        log(f"note: SAD starts at epoch {cfg.sad_start_epoch} (--sad-start) and this run has {cfg.epochs}: it never "
            "switches on, so the network trains as the backbone would (give a smaller --sad-start)")
    start_epoch, best = 0, {"score": -1.0, "epoch": -1, "val": None}
    ema = None
    state_path = out / "train_state.pt"
    if state_path.is_file() and (out / "last.safetensors").is_file():
        before, now = comparable_training(json.loads((out / "config.json").read_text())), comparable_training(asdict(cfg))
        if before != now:
            differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            shown = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in differ[:4] if k != "data_description")
            if "data_description" in differ:
                shown = "; ".join(x for x in (shown, "the training or validation data") if x)
            raise SystemExit(f"{out} holds a run with another configuration ({shown}); use a new --out "
                             "directory (or the same options) to resume")
        last, _ = ckpt.load_checkpoint(out / "last.safetensors")
        st = ckpt.load_state_for_resume(state_path)
        if cfg.ema:   # last holds the averaged weights, raw the ones the optimizer moves
            ema = WeightEMA(last, cfg.ema)
            ema.updates = int(st.get("ema_updates", 0))
            last, _ = ckpt.load_checkpoint(out / "raw.safetensors")
        model.load_state_dict(last.state_dict())
        opt.load_state_dict(st["optimizer"])
        buffers = dict(model.named_buffers())
        for name, value in st.get("power_iteration", {}).items():   # the spatial conv's running vectors
            buffers[name].copy_(value)
        start_epoch = int(st["epoch"]) + 1
        best = {"score": float(st["best_score"]), "epoch": int(st["best_epoch"]), "val": None}
        torch.set_rng_state(st["torch_rng"])
        log(f"resuming {out} after epoch {start_epoch} of {cfg.epochs}" if start_epoch < cfg.epochs else
            f"{out} has finished its {cfg.epochs} epochs (best: epoch {best['epoch']}); nothing to do — "
            "a new --out trains again")
    elif init_sha:
        member = f" (network {cfg.init_member} of the ensemble)" if cfg.init_member >= 0 else ""
        log(f"starting from the weights of {cfg.init}{member} (sha256 {init_sha[:12]}…)")
    if cfg.ema and ema is None:
        ema = WeightEMA(model, cfg.ema)
    ema_model = ema.model.to(device) if ema else model   # what is validated and saved
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))

    ds = SliceDataset(train_samples, size=cfg.size, augment=True, seed=cfg.seed,
                      num_classes=cfg.num_classes, blank_outside_lung=cfg.blank_outside_lung,
                      augment_config=AUGMENT_PRESETS[cfg.augment])
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = make_loader(ds, cfg, gen, loader_workers(cfg, device))
    steps_per_epoch = max(1, len(loader))
    total_steps = cfg.epochs * steps_per_epoch

    def lr_at(step):  # linear warm-up (1 epoch) then cosine decay
        if step < steps_per_epoch:
            return cfg.lr * (step + 1) / steps_per_epoch
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * step / total_steps))

    log_path = out / "log.csv"
    fields = ["epoch", "loss", "dice", "ce", "sad", "lr", "seconds", "val_infection", "val_ggo",
              "val_consolidation", "val_score"]
    if start_epoch == 0 or not log_path.is_file():
        with open(log_path, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=fields).writeheader()

    t_start = time.time()
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; keep training usable without it in Slicer
        tqdm = None
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        model.train()
        ds.set_epoch(epoch)
        gen.manual_seed(cfg.seed * 1000003 + epoch)
        sums = {"total": 0.0, "dice": 0.0, "ce": 0.0, "sad": 0.0}
        it = loader if tqdm is None else tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
        for step, (x, y) in enumerate(it):
            for g in opt.param_groups:
                g["lr"] = lr_at(epoch * steps_per_epoch + step)
            terms = train_step(model, x.to(device), y.to(device), loss_fn, opt, scaler, epoch, amp_dtype)
            if ema:
                ema.update(model)
            for k in sums:
                if k in terms:
                    sums[k] += float(terms[k].detach())
        row = {"epoch": epoch + 1, "loss": sums["total"] / steps_per_epoch,
               "dice": sums["dice"] / steps_per_epoch, "ce": sums["ce"] / steps_per_epoch,
               "sad": sums["sad"] / steps_per_epoch, "lr": opt.param_groups[0]["lr"]}
        last_epoch = epoch == cfg.epochs - 1
        out_of_time = cfg.time_limit_min > 0 and (time.time() - t_start) / 60 > cfg.time_limit_min
        if (epoch + 1) % cfg.val_every == 0 or last_epoch or out_of_time:
            val = evaluate_samples(Predictor(ema_model, device), val_samples, _meta(cfg, None, epoch))
            # the Predictor lays a CPU model out channels_last for inference; training goes on in the
            # layout a resumed run starts with, so that a resume computes what the whole run did
            ema_model.to(memory_format=torch.contiguous_format)
            model.train()
            score = _score(val)
            row.update(val_score=score, **{f"val_{k}": v["dsc"] for k, v in val["classes"].items()})
            if score > best["score"]:
                best = {"score": score, "epoch": epoch + 1, "val": val["classes"]}
                ckpt.save_checkpoint(out / "best.safetensors", ema_model,
                                     _meta(cfg, val["classes"], epoch + 1, init_sha))
        row["seconds"] = time.time() - t0
        with _saving_uninterrupted():   # the log row, weights and state of an epoch go together
            with open(log_path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=fields).writerow(row)
            ckpt.save_checkpoint(out / "last.safetensors", ema_model, _meta(cfg, None, epoch + 1, init_sha))
            if ema:
                ckpt.save_checkpoint(out / "raw.safetensors", model, _meta(cfg, None, epoch + 1, init_sha))
            torch.save({"optimizer": opt.state_dict(), "epoch": epoch, "best_score": best["score"],
                        "best_epoch": best["epoch"], "torch_rng": torch.get_rng_state(),
                        "ema_updates": ema.updates if ema else 0,
                        # not in the checkpoint (not weights) but part of the run: a resume without
                        # them caps the spatial conv with a fresh estimate of sigma and diverges
                        "power_iteration": {n: b.detach().clone() for n, b in model.named_buffers()
                                            if n.rsplit(".", 1)[-1].startswith("_u_")}},
                       out / "train_state.pt.part")
            (out / "train_state.pt.part").replace(state_path)
        msg = f"epoch {epoch + 1}/{cfg.epochs} loss {row['loss']:.4f} ({row['seconds']:.0f}s)"
        if "val_score" in row:
            msg += f"  val {row['val_score']:.3f} (best {best['score']:.3f} @ {best['epoch']})"
        log(msg)
        if out_of_time and not last_epoch:
            log(f"time limit of {cfg.time_limit_min} min reached; stopping (rerun to continue)")
            break
    plot_curves(log_path, out / "curves.png")
    return best


def plot_curves(log_path, png_path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    ep = [int(r["epoch"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for k in ("loss", "dice", "ce", "sad"):
        vals = [float(r[k]) if r.get(k) else np.nan for r in rows]
        if not np.all(np.isnan(vals)) and np.nanmax(vals) > 0:
            a.plot(ep, vals, label=k)
    a.set_xlabel("epoch"); a.set_ylabel("training loss"); a.set_yscale("log"); a.legend()
    for k in ("val_infection", "val_ggo", "val_consolidation"):
        pts = [(int(r["epoch"]), float(r[k])) for r in rows if r.get(k)]
        if pts:
            b.plot(*zip(*pts), marker="o", label=k[4:])
    b.set_xlabel("epoch"); b.set_ylabel("validation DSC"); b.set_ylim(0, 1); b.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
