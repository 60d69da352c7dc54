"""The scripts that read `ssalesionseg evaluate --json` outputs: the rules' test gate and the
bootstrap intervals."""
import json

import numpy as np
import pytest


def _eval_json(path, dsc_by_class, ids=None):
    n = len(next(iter(dsc_by_class.values())))
    ids = ids or [f"s{i:02d}" for i in range(n)]
    rows = [{"id": ids[i], **{c: {"dsc": v[i], "hd95_mm": 10.0, "mae": 0.01, "nsd_3mm": v[i]}
                             for c, v in dsc_by_class.items()}} for i in range(n)]
    classes = {c: {"dsc": float(np.mean(v)), "hd95_mm": 10.0, "mae": 0.01, "nsd_3mm": float(np.mean(v)),
                   "dsc_pooled": 0.5} for c, v in dsc_by_class.items()}
    path.write_text(json.dumps({"n_slices": n, "classes": classes, "per_slice": rows}))
    return path


def test_bootstrap_intervals_and_paired_difference(tmp_path, capsys, script):
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 1, 48)
    better = np.clip(base + 0.05, 0, 1)                        # the same slices, each a bit better
    b = _eval_json(tmp_path / "b.json", {"infection": base, "consolidation": base})
    c = _eval_json(tmp_path / "c.json", {"infection": better, "consolidation": base})
    out = script("bootstrap_test").main([str(c), str(b), "--resamples", "2000"])
    lo, hi = out["infection"]["ci95"]
    assert lo < out["infection"]["mean"] < hi and hi - lo > 0.05   # 48 spread-out slices: a wide interval
    dlo, dhi = out["infection"]["diff"]["ci95"]
    assert 0 < dlo <= out["infection"]["diff"]["mean"] <= dhi <= 0.05 + 1e-9   # paired: narrow, above 0
    assert out["consolidation"]["diff"] == {"mean": 0.0, "ci95": [0.0, 0.0]}
    assert "minus base" in capsys.readouterr().out
    # the base's slices in another order are matched by id; other slices are refused
    shuffled = _eval_json(tmp_path / "s.json", {"infection": base[::-1], "consolidation": base[::-1]},
                          ids=[f"s{i:02d}" for i in range(48)][::-1])
    again = script("bootstrap_test").main([str(c), str(shuffled), "--resamples", "2000"])
    assert again["infection"]["diff"] == out["infection"]["diff"]
    other = _eval_json(tmp_path / "o.json", {"infection": base, "consolidation": base},
                       ids=[f"x{i}" for i in range(48)])
    with pytest.raises(SystemExit, match="different slices"):
        script("bootstrap_test").main([str(c), str(other)])


def test_compare_test_figures_counts_the_rule(tmp_path, capsys, script):
    base = {"infection": [0.5] * 4, "ggo": [0.5] * 4, "consolidation": [0.5] * 4}
    cand = {"infection": [0.6] * 4, "ggo": [0.4] * 4, "consolidation": [0.6] * 4}
    b = _eval_json(tmp_path / "b.json", base)
    c = _eval_json(tmp_path / "c.json", cand)
    script("compare_test_figures").main([str(b), str(b), str(c), str(c)])
    printed = capsys.readouterr().out
    # DSC and NSD better for 2 of 3 classes on both renderings; HD95 and MAE equal (not better)
    assert "8 of 24 figures better" in printed and "fails the test gate" in printed
