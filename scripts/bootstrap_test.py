"""How far the per-slice test means can be trusted: bootstrap 95 % intervals over the slices.

    python scripts/bootstrap_test.py EVAL.json [BASE.json] [--metric dsc] [--resamples 10000] [--seed 0]

EVAL.json / BASE.json are `ssalesionseg evaluate --json` outputs on the same slices. For each
class it prints the mean over slices and a percentile interval from resampling the slices
with replacement; with BASE it also prints the paired difference EVAL - BASE (the same
resampled slices for both), which is what a comparison of two models on one split can claim.
"""
import argparse
import json

import numpy as np


def per_slice(result: dict, metric: str) -> tuple[list[str], dict[str, np.ndarray]]:
    rows = result["per_slice"]
    ids = [r["id"] for r in rows]
    return ids, {c: np.array([r[c][metric] for r in rows], float) for c in result["classes"]}


def interval(values: np.ndarray, idx: np.ndarray) -> tuple[float, float]:
    means = np.nanmean(values[idx], axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("eval_json")
    p.add_argument("base_json", nargs="?")
    p.add_argument("--metric", default="dsc", choices=["dsc", "hd95_mm", "mae", "nsd_3mm"])
    p.add_argument("--resamples", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    ids, cand = per_slice(json.load(open(a.eval_json)), a.metric)
    base = None
    if a.base_json:
        base_ids, base = per_slice(json.load(open(a.base_json)), a.metric)
        if sorted(base_ids) != sorted(ids):
            raise SystemExit(f"{a.base_json} and {a.eval_json} were evaluated on different slices")
        order = [base_ids.index(i) for i in ids]
        base = {c: v[order] for c, v in base.items()}
    n = len(ids)
    idx = np.random.default_rng(a.seed).integers(0, n, size=(a.resamples, n))
    print(f"{a.metric}, mean over {n} slices, 95 % bootstrap interval ({a.resamples} resamples)")
    out = {}
    for c, v in cand.items():
        lo, hi = interval(v, idx)
        line = f"{c:<15}{np.nanmean(v):>8.3f}  [{lo:.3f}, {hi:.3f}]"
        out[c] = {"mean": float(np.nanmean(v)), "ci95": [lo, hi]}
        if base is not None:
            d = v - base[c]
            dlo, dhi = interval(d, idx)
            line += f"   minus base {np.nanmean(d):+.3f}  [{dlo:+.3f}, {dhi:+.3f}]"
            out[c]["diff"] = {"mean": float(np.nanmean(d)), "ci95": [dlo, dhi]}
        print(line)
    return out


if __name__ == "__main__":
    main()
