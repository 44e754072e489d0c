#!/usr/bin/env bash
# The quality evidence on one GPU (issues 14 and 22): train both benchmark models
# side by side, then sweep each, results appended to $WORK/quality_{code,text}.jsonl
# as runs finish (a sweep resumes where its file left off). Per model two stages:
# the small budgets under every algorithm (GPTQ W4A16 and W3A16) and mode, then the
# realistic budgets under GPTQ W4A16 and the modes the default is judged against.
# Meant to be started detached, so it outlives one device command:
#     setsid nohup bash benchmarks/quality_pipeline.sh /tmp/quality > /tmp/quality.log 2>&1 &
# and its files collected by later commands (see benchmarks/README-gpu.md).
# Settings (environment; an empty budget list skips that stage):
#     TEXT_SMALL, CODE_SMALL, TEXT_LARGE, CODE_LARGE   budgets
#     SMALL_MODES, LARGE_MODES, SMALL_ALGORITHMS        what each stage runs
# (retraining gives a slightly different model on another GPU: the runs record its
# perplexity, and `report` keeps runs of different trainings apart).
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/quality}
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1
Q=benchmarks/quality.py
read -ra SMALL_MODES <<< "${SMALL_MODES-routed all default weighted:2,shrink:0}"
read -ra LARGE_MODES <<< "${LARGE_MODES-routed all default}"
read -ra SMALL_ALGORITHMS <<< "${SMALL_ALGORITHMS-gptq gptq_w3}"
read -ra TEXT_SMALL <<< "${TEXT_SMALL-4x512 16x512}"
read -ra CODE_SMALL <<< "${CODE_SMALL-2x64 8x64 32x64}"
read -ra TEXT_LARGE <<< "${TEXT_LARGE-64x2048 256x2048}"
read -ra CODE_LARGE <<< "${CODE_LARGE-64x256 256x256}"

if [[ ! -f "$WORK/code/config.json" ]]; then
    python3 $Q train --kind code --model-dir "$WORK/code" --steps 1500 \
        > "$WORK/train_code.log" 2>&1 &
fi
if [[ ! -f "$WORK/text/config.json" ]]; then
    # GLM-4.5-Air-like: 2048-token windows; weak bias balancing leaves the router skewed
    python3 $Q train --kind text --model-dir "$WORK/text" --steps 500 --batch 8 \
        --seq-len 2048 --bias-rate 2e-4 > "$WORK/train_text.log" 2>&1 &
fi
wait

stages() {  # model jobs small... -- large...
    local model=$1 jobs=$2 small=() large=() part=small
    shift 2
    for budget in "$@"; do
        if [[ $budget == -- ]]; then part=large; continue; fi
        if [[ $part == small ]]; then small+=("$budget"); else large+=("$budget"); fi
    done
    (( ${#small[@]} )) && python3 $Q sweep --model-dir "$WORK/$model" \
        --out "$WORK/quality_$model.jsonl" --jobs "$jobs" \
        --algorithms "${SMALL_ALGORITHMS[@]}" --budgets "${small[@]}" \
        --modes "${SMALL_MODES[@]}" >> "$WORK/sweep_$model.log" 2>&1
    (( ${#large[@]} )) && python3 $Q sweep --model-dir "$WORK/$model" \
        --out "$WORK/quality_$model.jsonl" --jobs "$jobs" --algorithms gptq \
        --budgets "${large[@]}" --modes "${LARGE_MODES[@]}" \
        >> "$WORK/sweep_$model.log" 2>&1
    return 0
}
stages text "${TEXT_JOBS:-8}" "${TEXT_SMALL[@]}" -- "${TEXT_LARGE[@]}" &
stages code "${CODE_JOBS:-6}" "${CODE_SMALL[@]}" -- "${CODE_LARGE[@]}" &
wait
echo "pipeline done"
