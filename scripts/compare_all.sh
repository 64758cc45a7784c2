#!/usr/bin/env bash
# The whole method comparison of issue 14 in one command: calibrate both test beds (sao-mini, synthetic seed 0;
# sao-tiny, synthetic seed 1), compare every candidate of the grid with minmax, ModelOpt and ONNX Runtime's own
# quantizer on each, and write the table of both beds (all candidates, all three metrics) as
# OUT/all/comparison.{json,md,png}. Finished calibrations and rows (OUT/cache-*.jsonl) are reused when rerun.
#
#   scripts/compare_all.sh OUT [compare_methods.py options, e.g. --grid full]
#
# PYTHON names the interpreter (default: python). Beds: QUADIT_BEDS="model:seed model:seed" to change them.
set -euo pipefail
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
    echo "error: usage: scripts/compare_all.sh OUT [compare_methods.py options]" >&2
    exit 2
fi
out=$1; shift
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python}
beds=${QUADIT_BEDS:-"sao-mini:0 sao-tiny:1"}
mkdir -p "$out"
dirs=()
for bed in $beds; do
    model=${bed%%:*}; seed=${bed##*:}
    cal="$out/cal-$model-$seed"
    if [ ! -f "$cal/calibration.json" ]; then
        "$py" "$here/calibrate.py" --model "$model" --synthetic-weights --seed "$seed" --prompts seed \
            --num-prompts 16 --steps 20 --buckets 4 --out "$cal" >/dev/null
    fi
    "$py" "$here/compare_methods.py" --model "$model" --synthetic-weights --seed "$seed" --calibration "$cal" \
        --grid issue14 --cache "$out/cache-$model-$seed.jsonl" --out "$out/$model-$seed" "$@" >/dev/null
    dirs+=("$out/$model-$seed")
done
"$py" "$here/compare_methods.py" --combine "${dirs[@]}" --out "$out/all"
