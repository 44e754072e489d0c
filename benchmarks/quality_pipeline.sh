#!/usr/bin/env bash
# Issue 14's quality evidence on one GPU: train both benchmark models side by side,
# then sweep every mode x budget x 3 seeds on each, results appended to
# $WORK/quality_{code,text}.jsonl as runs finish (a sweep resumes where its file
# left off). Meant to be started detached, so it outlives one device command:
#     setsid nohup bash benchmarks/quality_pipeline.sh /tmp/quality > /tmp/quality.log 2>&1 &
# and its files collected by later commands (see benchmarks/README-gpu.md).
# To finish a sweep on a new machine, name only the budgets left, e.g.
#     TEXT_BUDGETS="256x2048" CODE_BUDGETS="256x256" bash ... /tmp/quality
# (an empty list skips that model's sweep)
# (retraining gives a slightly different model on a GPU: the runs record its
# perplexity, and `report` keeps runs of different trainings apart).
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/quality}
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1
Q=benchmarks/quality.py
MODES=(routed all affinity:0.1+floor:16 weighted:1 weighted:2)
read -ra TEXT_BUDGETS <<< "${TEXT_BUDGETS-16x512 64x2048 256x2048}"
read -ra CODE_BUDGETS <<< "${CODE_BUDGETS-2x64 32x64 64x256 256x256}"

python3 $Q train --kind code --model-dir "$WORK/code" --steps 1500 \
    > "$WORK/train_code.log" 2>&1 &
# GLM-4.5-Air-like: 2048-token windows; weak bias balancing leaves the router skewed
python3 $Q train --kind text --model-dir "$WORK/text" --steps 500 --batch 8 \
    --seq-len 2048 --bias-rate 2e-4 > "$WORK/train_text.log" 2>&1 &
wait
(( ${#TEXT_BUDGETS[@]} )) && python3 $Q sweep --model-dir "$WORK/text" --out "$WORK/quality_text.jsonl" \
    --jobs "${TEXT_JOBS:-8}" --algorithms gptq --budgets "${TEXT_BUDGETS[@]}" --modes "${MODES[@]}" \
    > "$WORK/sweep_text.log" 2>&1 &
(( ${#CODE_BUDGETS[@]} )) && python3 $Q sweep --model-dir "$WORK/code" --out "$WORK/quality_code.jsonl" \
    --jobs "${CODE_JOBS:-6}" --algorithms gptq --budgets "${CODE_BUDGETS[@]}" --modes "${MODES[@]}" \
    > "$WORK/sweep_code.log" 2>&1 &
wait
echo "pipeline done"
