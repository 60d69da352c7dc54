#!/usr/bin/env bash
# One GPU call (results/gpu512/RULE.md): measure throughput, train the paper's recipe from
# scratch at 512² with four seeds side by side, validate each run's best checkpoint as it
# would be shipped (float16 storage, flip TTA), and hand back the best one.
#
#   OUT=<folder> scripts/gpu_round.sh
#
# Reads the data from $SSALESIONSEG_DATA (default .devdata/data: medseg100/ and
# covid-semiseg/Dataset/TrainingSet/MultiClassInfection-Train/ are all it needs). Runs with a
# python3 that has PyTorch, NumPy, SciPy, scikit-image and safetensors; ssanet is taken from
# Training/ (no install) and reads MedSeg's NIfTI labels without SimpleITK when it is absent.
# What comes back in $OUT: the chosen candidate in 15 MiB parts (candidate.part.*; join with
# cat), and round.tar.gz (logs, configs, validation JSONs, throughput, SHA-256 of the parts).
# Settings for a dry run on a CPU: DEVICE=cpu SIZE=64 EPOCHS=2 SAD_START=1 SEEDS="0 1".
set -u
start=$(date +%s)
budget=${BUDGET_S:-540}              # seconds from start by which everything must be written
out=${OUT:?set OUT to the folder that comes back}
work=${WORK:-runs/gpu_round}
device=${DEVICE:-cuda}
size=${SIZE:-512}
epochs=${EPOCHS:-150}
sad_start=${SAD_START:-40}
seeds=${SEEDS:-0 1 2 3}
workers=${WORKERS:-3}
batch=${BATCH:-4}
val_every=${VAL_EVERY:-5}
margin=${MARGIN_S:-150}              # seconds kept after training for validation and packing
export PYTHONPATH="$PWD/Training${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH}${PYTHONPATH:+:$PYTHONPATH}"
export SSALESIONSEG_DATA=${SSALESIONSEG_DATA:-$PWD/.devdata/data}
export PYTHONUNBUFFERED=1
mkdir -p "$out" "$work"
log="$work/round.log"
say() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$log"; }

say "device $device, size $size, epochs $epochs, seeds $seeds, workers $workers"
{ nvidia-smi || true; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"; } \
    >"$work/machine.txt" 2>&1
if [ -n "${SKIP_BENCH:-}" ]; then
    echo '{"skipped": true}' >"$work/throughput.log"
elif [ "$size" = 512 ]; then
    python3 scripts/bench_training.py --device "$device" --json "$work/throughput.json" >"$work/throughput.log" 2>&1 \
        || say "throughput benchmark failed (see throughput.log)"
else
    python3 scripts/bench_training.py --device "$device" --size "$size" --batch-sizes 2 --steps 2 \
        --infer-slices 4 --json "$work/throughput.json" >"$work/throughput.log" 2>&1 \
        || say "throughput benchmark failed (see throughput.log)"
fi
say "throughput: $(tail -n 1 "$work/throughput.log")"

# Training stops cleanly (after its epoch in progress) by this many minutes, leaving time
# for the validation of the candidates and the packing.
left=$(( start + budget - $(date +%s) - margin ))
limit=$(python3 -c "print(max(0.5, $left / 60))")
say "training time limit $limit min"
# the runs share the machine's cores: without a cap each would start one thread per core
nruns=$(echo $seeds | wc -w)
threads=$(( $(nproc) / nruns )); [ "$threads" -ge 1 ] || threads=1
pids=()
for s in $seeds; do
    OMP_NUM_THREADS=$threads python3 -m ssanet train --out "$work/s$s" --size "$size" --epochs "$epochs" --sad-start "$sad_start" \
        --batch-size "$batch" --lr 1e-3 --semiseg-renderings --augment strong --val-every "$val_every" --seed "$s" \
        --device "$device" --workers "$workers" --time-limit-min "$limit" >"$work/train_s$s.log" 2>&1 &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || say "a training run failed (pid $p)"; done
say "training done"

pids=()
for s in $seeds; do
    [ -f "$work/s$s/best.safetensors" ] || { say "seed $s: no best.safetensors"; continue; }
    ( python3 scripts/bundle_model.py "$work/s$s/best.safetensors" --out "$work/s$s/candidate.safetensors" \
          --flip-tta \
      && [ -z "${SKIP_EVAL:-}" ] && python3 -m ssanet evaluate --checkpoint "$work/s$s/candidate.safetensors" --split val \
          --semiseg-renderings --device "$device" --json "$work/val_s$s.json" ) >"$work/val_s$s.log" 2>&1 &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || say "a validation failed (pid $p)"; done

best=$(python3 - "$work" $seeds <<'EOF'
import json, sys
from pathlib import Path
from ssanet.train import _score          # the validation score train selects by
work, seeds = Path(sys.argv[1]), sys.argv[2:]
scores = {s: _score(json.loads((work / f"val_s{s}.json").read_text()))
          for s in seeds if (work / f"val_s{s}.json").is_file()}
(work / "val_scores.json").write_text(json.dumps(scores, indent=1))
if not scores and len(seeds) == 1 and (work / f"s{seeds[0]}" / "candidate.safetensors").is_file():
    print(seeds[0])          # SKIP_EVAL with one run: validated after the call
else:
    print(max(scores, key=scores.get) if scores else "")
EOF
)
say "validation scores: $(cat "$work/val_scores.json" 2>/dev/null); chosen seed: ${best:-none}"
if [ -n "$best" ]; then
    split -b 15M "$work/s$best/candidate.safetensors" "$out/candidate.part."
    sha256sum "$work/s$best/candidate.safetensors" >"$work/candidate.sha256"
    echo "$best" >"$work/chosen_seed.txt"
fi
say "packing"
tar -czf "$out/round.tar.gz" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.part' -C "$(dirname "$work")" \
    "$(basename "$work")"
ls -l "$out"
say "done"
