#!/usr/bin/env bash
# The whole method comparison of issue 14 in one command: calibrate both test beds (sao-mini, synthetic seed 0;
# sao-tiny, synthetic seed 1), compare every candidate of the grid with minmax, ModelOpt and ONNX Runtime's own
# quantizer on each, and write the table of both beds (all candidates, all three metrics) as
# OUT/all/comparison.{json,md,png}. Finished calibrations and rows (OUT/cache-*.jsonl) are reused when rerun.
#
#   scripts/compare_all.sh OUT [compare_methods.py options, e.g. --grid full]
#
# Each bed also gets `export.py --auto-precision --size-budget B` for each B in QUADIT_AUTO_BUDGETS (default
# 0.20; empty: none); its recipe.auto.json is evaluated as the row "auto-precision B" on the same prompts.
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
budgets=${QUADIT_AUTO_BUDGETS-0.20}
mkdir -p "$out"
dirs=()
for bed in $beds; do
    model=${bed%%:*}; seed=${bed##*:}
    cal="$out/cal-$model-$seed"
    if [ ! -f "$cal/calibration.json" ]; then
        "$py" "$here/calibrate.py" --model "$model" --synthetic-weights --seed "$seed" --prompts seed \
            --num-prompts 16 --steps 20 --buckets 4 --out "$cal" >/dev/null
    fi
    rows=()
    for budget in $budgets; do
        auto="$out/auto-$model-$seed-$budget"
        if [ ! -f "$auto/recipe.auto.json" ]; then
            "$py" "$here/export.py" --model "$model" --synthetic-weights --seed "$seed" --scheme w8a8 \
                --calibration "$cal" --auto-precision --size-budget "$budget" --report-prompts 0 \
                --out "$auto" >/dev/null
        fi
        rows+=(--recipe-row "auto-precision $budget=$auto/recipe.auto.json")
    done
    "$py" "$here/compare_methods.py" --model "$model" --synthetic-weights --seed "$seed" --calibration "$cal" \
        --grid issue14 --cache "$out/cache-$model-$seed.jsonl" --out "$out/$model-$seed" "${rows[@]}" "$@" >/dev/null
    dirs+=("$out/$model-$seed")
done
"$py" "$here/compare_methods.py" --combine "${dirs[@]}" --out "$out/all"
