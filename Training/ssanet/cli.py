"""``ssalesionseg`` / ``python -m ssanet``: train, evaluate, ablation, info (+ the engine's
segment / stats / bench and the semi-supervised loop when those packages are present)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from .data import AUGMENT_PRESETS
from .train import TrainConfig


EVAL_SPLITS = ["val", "test", "train", "free", "all"]


def _add_data_args(p):
    p.add_argument("--data", help="data root holding covid-semiseg/ and medseg100/ "
                   "(default: $SSALESIONSEG_DATA)")


def _add_train_args(p):
    d = TrainConfig()
    _add_data_args(p)
    p.add_argument("--out", required=True, help="run directory (rerun the same command to resume)")
    p.add_argument("--classes", default=d.classes, choices=["infection", "ggo,consolidation"],
                   help="'ggo,consolidation' (one 3-class model, the default) or 'infection' (binary)")
    p.add_argument("--size", type=int, default=None,
                   help=f"training slice size (paper: 512; default: the --init checkpoint's size, "
                        f"else {d.size})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs} (the paper's)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--steps-per-epoch", type=int, default=d.steps_per_epoch,
                   help="batches per epoch drawn at random (default 0: one pass over the data)")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    p.add_argument("--sad-start", type=int, default=d.sad_start_epoch, dest="sad_start_epoch",
                   help="epoch at which SAD is switched on (paper: 40 of 150)")
    p.add_argument("--no-sad", dest="sad", action="store_false")
    p.add_argument("--no-spatial-conv", dest="spatial_conv", action="store_false")
    p.add_argument("--unbounded-spatial-conv", dest="sc_bound", action="store_false",
                   help="the plain SCNN recursion without the gain cap (blows up in training; "
                        "kept to reproduce models trained before the cap)")
    p.add_argument("--detach-sad-target", action="store_true",
                   help="treat the deeper attention map as a fixed target (Hou et al. 2019)")
    p.add_argument("--reweight", action=argparse.BooleanOptionalAction, default=d.reweight,
                   help="weight the CE term by 1/(C*P_c) (the paper's re-weighting; default off "
                        "for supervised training: with 46 slices it drives over-segmentation)")
    p.add_argument("--keep-outside-lung", dest="blank_outside_lung", action="store_false",
                   help="do not blank the CT channel outside the lung mask")
    p.add_argument("--init", default=d.init, metavar="CHECKPOINT",
                   help="fine-tune: start from this checkpoint's weights (same classes and input)")
    p.add_argument("--init-member", type=int, default=d.init_member, metavar="K",
                   help="with an ensemble checkpoint as --init (e.g. the bundled model): start from its "
                        "K-th network (0-based); fine-tune each and recombine with `ssalesionseg ensemble`")
    p.add_argument("--cases", action="append", metavar="DIR",
                   help="add the CT cases in DIR (images/, labels/, lungs/: the Slicer module's "
                        "'Export as training case' or `ssalesionseg export-case`) to the training slices; "
                        "repeatable")
    p.add_argument("--val-cases", action="append", metavar="DIR",
                   help="choose the best epoch on these exported cases instead of the standard validation "
                        "images; repeatable")
    p.add_argument("--cases-only", action="store_true",
                   help="train on the --cases alone, without the COVID-SemiSeg / MedSeg data (none needed): "
                        "validation on --val-cases, else on whole cases held out from --cases (a fifth, at "
                        "least one)")
    p.add_argument("--semiseg-renderings", action="store_true",
                   help="also train (and validate) on COVID-SemiSeg's own renderings of the training "
                        "slices (the crops, with lung masks from ssanet.lungs), not only MedSeg-100's")
    p.add_argument("--augment", default=d.augment, choices=sorted(AUGMENT_PRESETS),
                   help="augmentation preset: standard (flip, +-10 deg, scale 0.9-1.1, mild "
                        "intensity) or strong (wider ranges, elastic deformation, noise, blur)")
    p.add_argument("--dice-per-slice", action="store_true",
                   help="Dice loss per slice and class, then averaged, as the evaluation averages "
                        "per-slice DSC (default: sums over the whole batch)")
    p.add_argument("--ema", type=float, default=d.ema, metavar="DECAY",
                   help="keep an exponential moving average of the weights with this decay (e.g. "
                        "0.99) and validate / save it instead of the raw weights (default 0: off)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    _add_fold_args(p)
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | mps (default auto: a GPU when present)")
    p.add_argument("--val-every", type=positive_int, default=d.val_every, metavar="N",
                   help=f"validate every N epochs (default {d.val_every})")
    p.add_argument("--workers", type=int, default=d.workers, metavar="N",
                   help="processes that augment the training slices (default -1: none on a CPU, up to 4 "
                        "on a GPU; the batches are the same for any N)")
    p.add_argument("--no-amp", dest="amp", action="store_false",
                   help="train in float32 (default: float16 autocast on CUDA, bfloat16 on CPUs with bf16)")
    p.add_argument("--time-limit-min", type=float, default=0.0,
                   help="stop cleanly after this many minutes (rerun to continue)")


def _add_fold_args(p):
    p.add_argument("--folds", type=int, default=0, metavar="K",
                   help="cross-validation: cut the 50 labeled training slices into K parts (default 0: "
                        "the standard split, 46 train / 6 validation)")
    p.add_argument("--fold", type=int, default=0, metavar="I",
                   help="with --folds: validate on part I (0-based), train on the others")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (batch sizes, intervals)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be 1 or more")
    return v


def resolve_training_size(a) -> None:
    """Fill ``a.size`` (None when --size was not given) from --init or the default, saying so."""
    from .train import training_size
    try:
        a.size, why = training_size(a.size, getattr(a, "init", "") or "")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if why:
        print(why)


def _config_from_args(a) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(a).items() if k in names})


def _describe(cfg: TrainConfig, splits, cases=()) -> TrainConfig:
    def counts(samples):
        n_crops = sum(s.source == "covid-semiseg" for s in samples)
        n_cases = sum(s.source == "volume" for s in samples)
        return len(samples) - n_crops - n_cases, n_crops, n_cases

    n_medseg, n_crops, n_cases = counts(splits["train"])
    parts = ([f"MedSeg-100 train subset, {n_medseg} slices"] if n_medseg or not n_cases else []) \
        + ([f"{n_crops} COVID-SemiSeg renderings of them"] if n_crops else []) \
        + ([f"{n_cases} slices of exported cases"] if n_cases else [])
    cfg.data_description = {"train": " + ".join(parts),
                            "n_train": len(splits["train"]),
                            "val": [s.id for s in splits["val"]]}
    if counts(splits["val"])[2]:
        cfg.data_description["val_cases"] = sorted({str((s.meta or {}).get("path", s.id)) for s in splits["val"]
                                                    if s.source == "volume"})
    if cases:
        from .checkpoint import sha256_of
        cfg.data_description["cases"] = {str(Path(f).absolute()): n for f, n in cases}   # two may share a name
        # by content too, so that `evaluate --cases` knows a copy of a training case elsewhere
        cfg.data_description["case_sha256"] = sorted({sha256_of(p) for p in {s.meta["path"] for s in splits["train"]
                                                                           if s.source == "volume"}})
    return cfg


def _folds_of(a) -> tuple[int, int]:
    """(K, I) of --folds K --fold I; 0, 0 for the standard split. --fold without --folds is
    refused rather than silently ignored."""
    folds, fold = getattr(a, "folds", 0) or 0, getattr(a, "fold", 0) or 0
    if fold and not folds:
        raise ValueError(f"--fold {fold} needs --folds K (the number of parts); without --folds the "
                         "standard split is used and --fold would be ignored")
    return folds, fold


def _training_splits(a) -> tuple[dict, list]:
    """train / val / test as `train` uses them: the default split, plus COVID-SemiSeg's own
    renderings with ``--semiseg-renderings`` and the exported cases of ``--cases`` (added to
    train); ``--val-cases`` replaces the validation images; ``--cases-only`` uses the cases
    alone (validation: ``--val-cases``, else whole cases held out). Also returns
    [(folder, slices added)] for the run's description."""
    from . import data
    folds, fold = _folds_of(a)
    cases_only = getattr(a, "cases_only", False)
    if cases_only:
        if not getattr(a, "cases", None):
            raise SystemExit("--cases-only trains on the exported cases alone: give them with --cases DIR")
        if folds or getattr(a, "semiseg_renderings", False):
            raise SystemExit("--cases-only reads no COVID-SemiSeg / MedSeg data: --folds and --semiseg-renderings "
                             "do not apply (cross-validate cases by exporting them into separate folders)")
        splits = {"train": [], "val": []}
    else:
        try:
            root = data.data_root(a.data)
        except FileNotFoundError as e:
            if getattr(a, "cases", None):
                raise FileNotFoundError(f"{e} To train on your --cases alone, add --cases-only.") from None
            raise
        splits = data.fold_splits(root, folds, fold) if folds else data.default_splits(root)
        if getattr(a, "semiseg_renderings", False):
            splits = data.with_semiseg_renderings(splits, root)

    multiclass = getattr(a, "classes", "ggo,consolidation") != "infection"

    def read_cases(folder):
        extra = data.load_training_cases(folder, TrainConfig().nominal_spacing_mm)
        if not extra:
            raise SystemExit(f"{folder}: no labeled slices with lung found")
        check_case_classes(extra, folder, multiclass)
        for volume in sorted({s.meta.get("volume") for s in extra}):
            if not any(s.label.any() for s in extra if s.meta.get("volume") == volume):
                print(f"note: case {volume} has no lesion pixels: it counts as a lesion-free case "
                      f"({folder}; export it again if the segments were lost)")
        return extra

    cases = []
    for folder in getattr(a, "cases", None) or []:
        extra = read_cases(folder)
        splits["train"] = splits["train"] + extra
        cases.append((folder, len(extra)))
        print(f"{folder}: {len(extra)} slices of {len({s.meta['path'] for s in extra})} case(s)")
    val_dirs = getattr(a, "val_cases", None) or []
    if val_dirs:
        splits["val"] = [s for folder in val_dirs for s in read_cases(folder)]
        print(f"validation: {len(splits['val'])} slices of {len({s.meta['path'] for s in splits['val']})} "
              "exported case(s) (--val-cases)")
    elif cases_only:
        splits["train"], splits["val"] = data.hold_out_cases(splits["train"], seed=getattr(a, "seed", 0))
        held = sorted({s.meta["volume"] for s in splits["val"]})
        print(f"validation: case(s) {', '.join(held)} held out of --cases ({len(splits['val'])} slices; "
              "--val-cases chooses them yourself)")
    if val_dirs or cases_only:
        same = _same_files({s.meta["path"] for s in splits["train"] if s.source == "volume"},
                           {s.meta["path"] for s in splits["val"] if s.source == "volume"})
        if same:
            advice = ("give --val-cases a folder of other cases than --cases" if val_dirs else
                      "remove the copy from --cases, or choose the validation cases with --val-cases")
            raise SystemExit(f"{same[1]} (validation) is the CT of {same[0]} (training): validate on cases not "
                             f"trained on — {advice}")
    for a_, b_ in _duplicate_files({s.meta["path"] for s in splits["train"] if s.source == "volume"}):
        print(f"note: {b_} is the same CT as {a_} (same content): it is trained on twice; remove one copy "
              "unless that is meant", file=sys.stderr)
    if cases:
        print(f"training: {len(splits['train'])} slices")
    return splits, cases


def _content_groups(paths) -> list:
    """The files of ``paths`` that share their content with another, as sorted groups (only
    files of the same size are hashed)."""
    from .checkpoint import sha256_of

    by_size = {}
    for f in sorted(set(paths)):
        by_size.setdefault(os.path.getsize(f), []).append(f)
    groups = {}
    for same_size in (g for g in by_size.values() if len(g) > 1):
        for f in same_size:
            groups.setdefault(sha256_of(f), []).append(f)
    return [g for g in groups.values() if len(g) > 1]


def _duplicate_files(paths) -> list:
    """Pairs (first, copy) of files in ``paths`` with the same content (sorted by name)."""
    return [(g[0], f) for g in _content_groups(paths) for f in g[1:]]


def check_case_classes(samples, folder, multiclass: bool, what: str = "learn from") -> None:
    """Refuse exported cases whose labels are a binary model's (1 = infection, recorded in
    ``labels/<case>.json``) where a GGO / consolidation model is trained or scored."""
    binary = sorted({s.meta["volume"] for s in samples if len(s.meta.get("label_classes") or ()) == 2})
    if multiclass and binary:
        raise SystemExit(f"{folder}: case(s) {', '.join(binary)} hold infection labels (a binary model's "
                         f"result): a GGO / consolidation model cannot {what} them; use --classes infection "
                         "(a binary model), or relabel them as GGO / consolidation and export again")


def _same_files(first, second):
    """A pair (a, b) of files in ``first`` and ``second`` with the same content, or None:
    the same CT exported twice under two names is one case."""
    both = sorted(set(first) & set(second))
    if both:
        return both[0], both[0]
    for group in _content_groups(set(first) | set(second)):
        a, b = [f for f in group if f in first], [f for f in group if f in second]
        if a and b:
            return a[0], b[0]
    return None


def cmd_train(a):
    resolve_training_size(a)
    cfg = _config_from_args(a)
    if a.init:   # refuse a checkpoint training cannot start from before the data are read
        from .train import check_init
        check_init(cfg)
    splits, cases = _training_splits(a)
    cfg = _describe(cfg, splits, cases)
    best = train_run(cfg, splits, a.out)
    print(json.dumps({"best_epoch": best["epoch"], "best_val_score": best["score"]}))


def train_run(cfg, splits, out):
    from .train import train
    return train(cfg, splits["train"], splits["val"], out)


def cmd_evaluate(a):
    from . import checkpoint, data
    from .evaluate import evaluate_samples, format_table, write_json
    from .inference import Predictor, select_device
    from .train import _score

    named = (a.split, a.dataset) != (None, None)   # --split / --dataset given, even as their defaults
    a.dataset, a.split = a.dataset or "medseg100", a.split or "val"
    as_trained = a.semiseg_renderings or _folds_of(a)[0]
    if as_trained and (a.dataset, a.split) != ("medseg100", "val"):
        raise SystemExit("--semiseg-renderings and --folds go with --split val (the validation images "
                         "`train` selects by with the same options)")
    if a.cases and as_trained:
        raise SystemExit("--cases scores exported cases; it does not combine with --semiseg-renderings or --folds")
    if a.cases and named:
        raise SystemExit("--cases scores the exported cases alone; --split / --dataset choose among the shared "
                         "data instead: give one or the other")
    if a.json and Path(a.json).exists() and not a.overwrite:
        raise SystemExit(f"{a.json} exists; choose another --json (or --overwrite to replace it)")
    if a.overlays and Path(a.overlays).is_dir() and any(Path(a.overlays).glob("*.png")) and not a.overwrite:
        raise SystemExit(f"{a.overlays} already holds overlay PNGs; choose another --overlays folder "
                         "(or --overwrite to replace them)")
    model, meta = checkpoint.load_checkpoint(a.checkpoint)
    per_folder = []   # (folder, number of slices), in the order the slices are scored
    if a.cases:   # held-out corrected cases, placed on the slice grid exactly as `train --cases` places them
        samples = []
        for folder in a.cases:
            found = data.load_training_cases(folder, TrainConfig().nominal_spacing_mm)
            check_case_classes(found, folder, len(meta.get("class_names") or ()) >= 3, what="be scored on")
            samples += found
            per_folder.append((folder, len(found)))
        if not samples:
            raise SystemExit(f"{', '.join(a.cases)}: no labeled slices with lung found")
        from .checkpoint import sha256_of
        described = ((meta.get("training") or {}).get("config") or {}).get("data_description") or {}
        trained_on, trained_sha = set(described.get("cases") or {}), set(described.get("case_sha256") or ())
        start = 0
        for folder, n in per_folder:
            ours = samples[start:start + n]
            start += n
            paths = {s.meta["path"]: s.meta["volume"] for s in ours} if trained_sha else {}
            seen = sorted({v for path, v in paths.items() if sha256_of(path) in trained_sha})
            if seen:
                every = len(seen) == len({s.meta["volume"] for s in ours})
                print(f"note: {'the' if every else f'{len(seen)} of the'} case(s) of {folder} "
                      f"({', '.join(seen[:4])}{', ...' if len(seen) > 4 else ''}) are CTs this model was trained on "
                      "(same content): their score is not a held-out figure", file=sys.stderr)
            elif str(Path(folder).absolute()) in trained_on:
                print(f"note: {folder} is a --cases folder this model was trained on: its score is not a held-out "
                      "figure", file=sys.stderr)
        a.dataset, a.split = "cases", ", ".join(str(f) for f in a.cases)
    else:
        samples = (_training_splits(a)[0]["val"] if as_trained
                   else load_split(data, a.data, a.dataset, a.split))
    predictor = Predictor.for_checkpoint(model, meta, select_device(a.device), a.batch_size, a.flip_tta,
                                         cpu_bf16=a.bf16)
    res = evaluate_samples(predictor, samples, meta, overlay_dir=a.overlays, min_lesion_mm2=a.min_lesion_mm2)
    where = f"cases {a.split}" if a.dataset == "cases" else f"{a.dataset}/{a.split}"
    print(f"{meta['name']} on {where}" + (f" (fold {a.fold} of {a.folds})" if a.folds else "")
          + (" + renderings" if a.semiseg_renderings else "")
          + (" (flip TTA)" if predictor.flip_tta else "")
          + (f" ({predictor.precision})" if predictor.amp_dtype is not None else "")
          + (f" (lesion islands < {res['min_lesion_mm2']:g} mm² removed)" if res["min_lesion_mm2"] else ""))
    print(format_table(res))
    if len(per_folder) > 1:   # several folders pooled above: each one's own per-slice means too
        import numpy as np

        start = 0
        for folder, n in per_folder:
            rows = res["per_slice"][start:start + n]
            start += n
            means = ", ".join(f"{name} {np.nanmean([r[name]['dsc'] for r in rows]):.3f}" for name in res["classes"])
            print(f"  {folder}: {n} slices, per-slice mean DSC {means}")
    if a.split == "val" or a.cases:
        what = "score of the cases" if a.cases else "validation score"
        print(f"{what} (mean pooled DSC, what train selects by): {_score(res):.4f}")
        per_slice = sum(m["dsc"] for m in res["classes"].values()) / len(res["classes"])
        print(f"mean over classes of the per-slice mean DSC: {per_slice:.4f}")
    if a.json:
        scores = ({"val_score": _score(res), "per_slice_mean_dsc": sum(m["dsc"] for m in res["classes"].values())
                   / len(res["classes"])} if a.split == "val" or a.cases else {})   # the two lines printed
        write_json(res, a.json, {"checkpoint": meta["name"], "checkpoint_path": meta.get("path"),
                                 "sha256": meta["sha256"], **scores,
                                 "dataset": a.dataset, "split": a.split, "flip_tta": predictor.flip_tta,
                                 "min_lesion_mm2": res["min_lesion_mm2"], "precision": predictor.precision,
                                 "semiseg_renderings": bool(a.semiseg_renderings),
                                 "fold": [a.fold, a.folds] if a.folds else None})


def load_split(data, root, dataset, split):
    root = data.data_root(root)
    if dataset == "medseg100":
        if split in ("train", "val", "test"):
            return data.default_splits(root)[split]
        return data.load_medseg100(root, split)
    if dataset == "covid-semiseg":
        if split not in ("train", "test"):
            raise SystemExit(f"--dataset covid-semiseg has the splits train and test, not {split!r}; its "
                             "held-out validation crops are scored by `--split val --semiseg-renderings`")
        # the crops (lungs' bounding box, nominal 0.7 mm) placed on the model's grid as the
        # pipeline places a CT, not stretched to a square
        return data.on_model_grid(data.load_covid_semiseg(root, split))
    raise SystemExit(f"unknown dataset {dataset!r}")


def add_min_lesion_arg(parser) -> None:
    """``--min-lesion-mm2``, shared by `evaluate` and `segment`."""
    parser.add_argument("--min-lesion-mm2", type=_min_lesion_mm2, default=None, metavar="MM2",
                        help="remove lesion islands smaller than this area in each slice (mm²; "
                             "0 keeps all; default: what the checkpoint records)")


def _min_lesion_mm2(text: str) -> float:
    from .postprocess import check_min_lesion_mm2
    try:
        return check_min_lesion_mm2(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_info(a):
    if a.checkpoint:
        from . import checkpoint
        print(json.dumps(checkpoint.describe(a.checkpoint), indent=2))
        return
    from .model import SSANet, count_flops, count_parameters
    rows = []
    for name, kw in ABLATION_VARIANTS.items():
        m = SSANet(2, a.num_classes, **kw)
        rows.append((name, count_parameters(m), count_flops(m, a.size)))
    print(f"SSA-Net variants, {a.num_classes} output classes, one {a.size}x{a.size} slice")
    print(f"{'variant':<12}{'params (M)':>12}{'GFLOPs':>10}")
    for name, p, f in rows:
        print(f"{name:<12}{p / 1e6:>12.2f}{f / 1e9:>10.2f}")


# The paper's Table 3: SA is a training-time switch, SC an architectural one.
ABLATION_VARIANTS = {
    "backbone": {"spatial_conv": False, "sad": False},
    "+SA": {"spatial_conv": False, "sad": True},
    "+SC": {"spatial_conv": True, "sad": False},
    "+SC+SA": {"spatial_conv": True, "sad": True},
}


def cmd_ablation(a):
    from . import checkpoint, data
    from .evaluate import evaluate_samples, write_json
    from .inference import Predictor, select_device

    resolve_training_size(a)
    splits, cases = _training_splits(a)
    test = load_split(data, a.data, a.eval_dataset, a.eval_split)
    base = _config_from_args(a)
    out = Path(a.out)
    table = {}
    for name, kw in ABLATION_VARIANTS.items():
        cfg = _describe(TrainConfig(**{**vars(base), **kw}), splits, cases)
        run_dir = out / name.replace("+", "plus_")
        print(f"== {name} -> {run_dir}")
        train_run(cfg, splits, run_dir)
        model, meta = checkpoint.load_checkpoint(run_dir / "best.safetensors")
        res = evaluate_samples(Predictor(model, select_device(a.device)), test, meta)
        write_json(res, run_dir / f"eval_{a.eval_split}.json")
        table[name] = res["classes"]
    lines = ["| variant | class | DSC | HD95 (mm) | MAE | NSD@3mm |", "|---|---|---|---|---|---|"]
    for name, classes in table.items():
        for c, m in classes.items():
            lines.append(f"| {name} | {c} | {m['dsc']:.3f} | {m['hd95_mm']:.2f} | {m['mae']:.4f} | {m['nsd_3mm']:.3f} |")
    # what the table was measured on, so a validation table is not read as Table 3's test one
    setting = {"eval_dataset": a.eval_dataset, "eval_split": a.eval_split, "size": base.size, "epochs": base.epochs,
               "sad_start_epoch": base.sad_start_epoch, "seed": base.seed}
    md = (f"Evaluated on {a.eval_dataset}/{a.eval_split}; trained at {base.size}² for {base.epochs} epochs, SAD from "
          f"epoch {base.sad_start_epoch}, seed {base.seed}.\n\n" + "\n".join(lines))
    (out / "ablation.md").write_text(md + "\n")
    (out / "ablation.json").write_text(json.dumps({**table, "settings": setting}, indent=1))
    print(md)


def cmd_average(a):
    from . import checkpoint
    from .evaluate import evaluate_samples
    from .inference import Predictor, select_device
    from .train import _score

    out = Path(a.out)
    if out.exists() and not a.overwrite:
        raise SystemExit(f"{out} exists; choose another --out (or --overwrite)")
    model, meta = checkpoint.average_checkpoints(a.checkpoints)
    val = evaluate_samples(Predictor(model, select_device(a.device)), _training_splits(a)[0]["val"], meta)
    meta["val_metrics"] = val["classes"]     # as train writes them
    sha = checkpoint.save_checkpoint(out, model, meta)
    print(json.dumps({"out": str(out), "sha256": sha, "val_score": round(_score(val), 4),
                      "val_pooled_dsc": {c: round(m["dsc_pooled"], 4) for c, m in val["classes"].items()}}))


def cmd_ensemble(a):
    from . import checkpoint

    out = Path(a.out)
    if out.exists() and not a.overwrite:
        raise SystemExit(f"{out} exists; choose another --out (or --overwrite)")
    model, meta = checkpoint.ensemble_checkpoints(a.checkpoints)
    if a.flip_tta is not None:
        meta["inference"] = {**(meta.get("inference") or {}), "flip_tta": a.flip_tta}
    sha = checkpoint.save_checkpoint(out, model, meta, storage=a.storage)
    print(json.dumps({"out": str(out), "sha256": sha, "members": len(a.checkpoints),
                      "storage": a.storage, "size_mb": round(out.stat().st_size / 1e6, 1),
                      "flip_tta": bool((meta.get("inference") or {}).get("flip_tta", False))}))


def cmd_member(a):
    from . import checkpoint

    out = Path(a.out)
    if out.exists() and not a.overwrite:
        raise SystemExit(f"{out} exists; choose another --out (or --overwrite)")
    model, meta = checkpoint.ensemble_member(a.ensemble, a.index)
    sha = checkpoint.save_checkpoint(out, model, meta, storage=a.storage)
    print(json.dumps({"out": str(out), "sha256": sha, "member": a.index, "of": str(a.ensemble),
                      "storage": a.storage, "size_mb": round(out.stat().st_size / 1e6, 1)}))


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("ssalesionseg")
    except Exception:   # running from a source tree that was not pip-installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssalesionseg", description=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train SSA-Net on the labeled data (resumable)")
    _add_train_args(t)
    t.set_defaults(func=cmd_train)

    av = sub.add_parser("average", help="average the weights of fine-tuned checkpoints (model soup) "
                                        "and report the validation score train selects by")
    _add_data_args(av)
    av.add_argument("checkpoints", nargs="+", help="checkpoints fine-tuned from the same model")
    av.add_argument("--out", required=True, help="the averaged checkpoint (.safetensors)")
    av.add_argument("--semiseg-renderings", action="store_true",
                    help="validate as train --semiseg-renderings does (adds the held-out crops)")
    av.add_argument("--device", default="auto")
    av.add_argument("--overwrite", action="store_true")
    av.set_defaults(func=cmd_average)

    en = sub.add_parser("ensemble", help="combine independently trained checkpoints into one file "
                                         "whose class probabilities are averaged at inference")
    en.add_argument("checkpoints", nargs="+", help="checkpoints of the same network, classes and input")
    en.add_argument("--out", required=True, help="the ensemble checkpoint (.safetensors)")
    en.add_argument("--storage", default="float16", choices=["float32", "float16", "int8"],
                    help="weight storage (int8: kernels with per-channel scales, half of float16)")
    flip = en.add_mutually_exclusive_group()
    flip.add_argument("--flip-tta", dest="flip_tta", action="store_true", default=None,
                      help="record that inference also runs the mirrored slice (default: as the first member)")
    flip.add_argument("--no-flip-tta", dest="flip_tta", action="store_false")
    en.add_argument("--overwrite", action="store_true")
    en.set_defaults(func=cmd_ensemble)

    mb = sub.add_parser("member", help="one network of an ensemble checkpoint (e.g. of the bundled model) "
                                       "as a file of its own, to fine-tune, ship alone or recombine")
    mb.add_argument("ensemble", help="an ensemble checkpoint (`ssalesionseg info --checkpoint` lists its members)")
    mb.add_argument("index", type=int, help="which network (0-based)")
    mb.add_argument("--out", required=True, help="the single-network checkpoint (.safetensors)")
    mb.add_argument("--storage", default="float16", choices=["float32", "float16", "int8"],
                    help="weight storage (default float16)")
    mb.add_argument("--overwrite", action="store_true")
    mb.set_defaults(func=cmd_member)

    e = sub.add_parser("evaluate", help="DSC / HD95 / MAE / NSD per class on a split")
    _add_data_args(e)
    e.add_argument("--checkpoint", help="model file (default: the bundled default model)")
    e.add_argument("--dataset", default=None, choices=["medseg100", "covid-semiseg"],
                   help="medseg100 (default): the COVID-SemiSeg slices at full 512² with lung mask "
                        "(same GT pixels); covid-semiseg: the original crops (their own rendering, "
                        "lung masks from ssanet.lungs), on the model's grid")
    e.add_argument("--split", default=None, choices=EVAL_SPLITS,
                   help="val (default: the 6 held-out MedSeg slices, what `train` selects by), test (the "
                        "48 COVID-SemiSeg test slices: final evaluation only, never for choosing), "
                        "train (the 46 training slices), free (MedSeg slices 23 and 49), all (MedSeg's 100)")
    e.add_argument("--cases", metavar="DIR", action="append",
                   help="score exported training cases instead of a split (images/, labels/, lungs/ as the "
                        "Slicer module's 'Export as training case' writes them), e.g. held-out corrected cases; "
                        "repeatable")
    e.add_argument("--semiseg-renderings", action="store_true",
                   help="with --split val: add the COVID-SemiSeg renderings of the validation "
                        "slices, as `train --semiseg-renderings` validates")
    _add_fold_args(e)
    e.add_argument("--json", help="write the results as JSON here")
    e.add_argument("--overlays", help="write prediction-vs-GT PNGs into this folder")
    e.add_argument("--overwrite", action="store_true",
                   help="replace an existing --json file / the PNGs in an existing --overlays folder")
    e.add_argument("--device", default="auto", help="auto (default: a GPU when present) | cpu | cuda | mps")
    e.add_argument("--batch-size", type=positive_int, default=None,
                   help="slices per forward pass (default 4 on a CPU, 16 on a GPU)")
    e.add_argument("--flip-tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average with the left-right mirrored prediction (default: what the "
                        "checkpoint records, off unless it says so)")
    e.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                   help="bfloat16 autocast on a CPU with native bf16, as `segment` runs there "
                        "(default off: the figures of record are float32 on every CPU)")
    add_min_lesion_arg(e)
    e.set_defaults(func=cmd_evaluate)

    i = sub.add_parser("info", help="what a checkpoint is (--checkpoint: members, classes, size, storage, "
                                    "metrics), else parameter count and FLOPs of the Table-3 variants")
    i.add_argument("--checkpoint", help="describe this model file (its header; nothing is run)")
    i.add_argument("--size", type=int, default=512, help="input size the FLOPs are counted at (default 512)")
    i.add_argument("--num-classes", type=int, default=3,
                   help="3 (background, GGO, consolidation; default) or 1 (binary infection)")
    i.set_defaults(func=cmd_info)

    ab = sub.add_parser("ablation", help="train + evaluate the four Table-3 variants")
    _add_train_args(ab)
    ab.add_argument("--eval-dataset", default="medseg100", choices=["medseg100", "covid-semiseg"])
    ab.add_argument("--eval-split", default="test", choices=EVAL_SPLITS,
                    help="where the four trained variants are scored (default test: Table 3 reports "
                         "the test split; the variants are compared, never chosen, on it)")
    ab.set_defaults(func=cmd_ablation)

    for modname in ("ssalesionseg.cli", "ssanet.semisup"):
        try:
            mod = __import__(modname, fromlist=["add_subcommands"])
        except ImportError:
            continue
        if hasattr(mod, "add_subcommands"):
            mod.add_subcommands(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    try:
        rc = args.func(args)
    except (CheckpointError, OSError, ValueError, RuntimeError) as e:   # OSError: missing, existing, unreadable files
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:   # a refusal with its reason: said as every other error is
        if not isinstance(e.code, str):
            raise   # argparse's usage errors and explicit exit codes
        print(f"error: {e.code.removeprefix('error: ')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # Ctrl-C: what is finished stays (cases written, epochs saved)
        print(f"\ninterrupted: {INTERRUPTED.get(args.command, 'nothing was written')}", file=sys.stderr)
        return 130
    return int(rc or 0)


# what a rerun of the same command finds after Ctrl-C
INTERRUPTED = {
    "segment": "finished cases are kept (the same command without --overwrite skips them and segments the rest)",
    "evaluate": "no scores were written (overlays drawn so far are kept)",
    "demo": "the same command again segments the sample",
    "train": "the epochs saved are kept; the same command again resumes the run",
    "semisup": "the rounds and epochs saved are kept; the same command again resumes the loop",
    "ablation": "the epochs saved are kept; the same command again resumes the variants",
    "semisup-ablation": "the rounds and epochs saved are kept; the same command again resumes the variants",
}


if __name__ == "__main__":
    sys.exit(main())
