#!/usr/bin/env bash
# Short LongMem runs that differ in one lever each, scored on a validation split (SPLIT) by
# recurrence distance (longmem_cross_entropy --recurrence-buckets REC) and by where memory reads
# reach (--memory-reach-buckets REC), memory on and off, beside the backbone on the same segments.
#   DATA=DIR BACKBONE=CK WORK=DIR bash examples/long_context_lm/levers.sh NAME "EXTRA ARGS" ...
# Settings are the quickstart's (T=128, 4 streams, msz 16384, csz 4, K 32, lr 1e-3, wd 0.01);
# UPDATES (default 1000) LongMem updates per run. Each run writes WORK/NAME/{train.log,
# on.json, off.json, on.log, off.log}; the backbone WORK/backbone.{json,log}. Then
#   python examples/long_context_lm/levers_table.py WORK NAME ...   prints the table.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${DATA:?DATA=fairseq-preprocess output dir}" "${BACKBONE:?BACKBONE=gpt2_lm checkpoint}"
: "${WORK:?WORK=output dir}"
UPDATES=${UPDATES:-1000}
T=${T:-128}
SPLIT=${SPLIT:-valid}
REC=${REC:-1,4,16,128}  # 128 segments of 128 tokens: the 16k-token memory's span
THREADS=${THREADS:-1}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
UD=$(python -m fairseq_longmem.user_dir)
mkdir -p "$WORK"

score() {  # score CHECKPOINT OUT_PREFIX [extra args]
  local ck=$1 out=$2; shift 2
  python examples/long_context_lm/score_positions.py "$DATA" --user-dir "$UD" --path "$ck" \
    --task longmem_lm --tokens-per-sample $T --batch-size 1 --valid-subset "$SPLIT" --cpu \
    --num-workers 0 --criterion longmem_cross_entropy --recurrence-buckets $REC \
    --results-json "$out.json" "$@" > "$out.log" 2>&1
}

[ -f "$WORK/backbone.json" ] || score "$BACKBONE" "$WORK/backbone"
while [ $# -ge 2 ]; do
  name=$1 extra=$2; shift 2
  dir=$WORK/$name
  mkdir -p "$dir"
  if [ ! -f "$dir/checkpoint_last.pt" ]; then
    # shellcheck disable=SC2086  # EXTRA is a list of options
    fairseq-train "$DATA" --user-dir "$UD" --task longmem_lm --arch longmem_gpt2_tiny \
      --criterion longmem_cross_entropy --backbone-path "$BACKBONE" --tokens-per-sample $T \
      --batch-size 4 --memory-size 16384 --chunk-size 4 --retrieved-tokens 32 \
      --optimizer adam --adam-betas '(0.9,0.98)' --lr 1e-3 --weight-decay 0.01 \
      --max-update "$UPDATES" --cpu --num-workers 0 --disable-validation --no-epoch-checkpoints \
      --save-dir "$dir" --log-interval 50 --seed 1 --log-format simple $extra > "$dir/train.log" 2>&1
  fi
  [ -f "$dir/on.json" ] || score "$dir/checkpoint_last.pt" "$dir/on" \
    --model-overrides "{'memory_reach_buckets': '$REC'}"
  [ -f "$dir/off.json" ] || score "$dir/checkpoint_last.pt" "$dir/off" \
    --model-overrides "{'disable_memory': True}"
  echo "$name done: $(date -u +%H:%M:%S)"
done
