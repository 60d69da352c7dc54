#!/usr/bin/env bash
# Short real-data experiment: is the deeper SAD attention map a detached target (Hou et al.
# 2019) or not (official SSA-Net code)? Same seed/budget, SAD on early; compares validation
# Dice (never the test split). Usage: Testing/benchmarks/sad_detach_experiment.sh [OUT]
set -euo pipefail
OUT=${1:-runs/sad_detach}
COMMON="--size 128 --epochs 40 --sad-start 8 --batch-size 4 --val-every 5 --seed 0"
for seed in 0 1; do
  ssalesionseg train --out "$OUT/no_detach_s$seed" $COMMON --seed $seed
  ssalesionseg train --out "$OUT/detach_s$seed" $COMMON --seed $seed --detach-sad-target
done
python - "$OUT" <<'PY'
import csv, sys, pathlib
for run in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    rows = [r for r in csv.DictReader(open(run / "log.csv")) if r["val_score"]]
    best = max(rows, key=lambda r: float(r["val_score"]))
    print(f"{run.name:<16} best pooled val DSC {float(best['val_score']):.3f} @ epoch {best['epoch']}, "
          f"final {float(rows[-1]['val_score']):.3f}")
PY
