#!/usr/bin/env bash
# The in-context-learning table on the best model this project can train on a CPU:
#   1. examples/long_context_lm/run.sh's corpus and models, but binarized with GPT-2's BPE
#      (the ICL sets are encoded with it), trained for fewer updates (STOP_AFTER=train);
#   2. examples/icl/run_icl.py for each set: no demonstrations / k in context / k in context +
#      N in memory, seeds 1-6, chunk size 2 at evaluation as in the paper.
# Usage, from the repository root after `bash install.sh`:
#   ICL_DATA=/path/to/LongMem/data/icl/original bash examples/icl/paper_table.sh
# ICL_DATA is the LongMem authors' data/icl/original folder (SST-2/, mr/, ...); without it only
# the PyPI set (Rotten Tomatoes sentences, examples/get_vader_sets.py) is run.
# OUT=DIR (default runs/icl); SETS="sst2 mr rt" chooses sets; SEEDS=1-6; finished runs are reused.
# MODEL_RUN=runs/long_context_lm/cpu skips step 1 and scores that finished run's LongMem model
# with its own dictionary and tokenizer (sentencepiece, or a pretrained backbone's tokenizer.json:
# PRESET=smollm2), segment length from its train_longmem.cmd. MODEL=CKPT scores another LongMem
# checkpoint trained on that run's data instead (e.g. one trained by hand with other options).
# With a pretrained backbone (a run of PRESET=smollm2) and the preset's FREE_READ_LAYERS, the
# table of condition (e) follows in OUT/free/SET/: the frozen backbone reading the same memory
# without training (docs/ICL.md), its "context" row being the backbone's own.
# ICL_T=1024: segment length at evaluation (the prompt's window and the memory's segments);
# ICL_CHUNK=2: chunk size at evaluation; ICL_MEMORY_SIZE=65536: a memory that holds all N
# demonstrations (default: the model's own); TEST_EXAMPLES=100: score only the first 100
# evaluation examples in every run (default: all); ICL_CALIBRATION=content-free: divide out the label
# words' probabilities after content-free queries, in every condition (docs/ICL.md).
# Time on a 2-core CPU: step 1 is slow (GPT-2's 50k-word output layer makes every update costly);
# MODEL_RUN avoids it. With SmolLM2 at ICL_T=1024 a run with 2,000 demonstrations in memory
# takes minutes to write the memory and seconds per example (docs/RESULTS.md).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
cd "$HERE/../.."
OUT=${OUT:-$PWD/runs/icl}
SETS=${SETS:-sst2 mr rt}
SEEDS=${SEEDS:-1-6}
K=${K:-20}
N=${N:-2000}
# the models' context: prompts longer than this lose their oldest demonstrations (counted in the logs)
T=${T:-256}
TOKENIZER=()
BACKBONE=""
if [ -n "${MODEL_RUN:-}" ]; then
  # a finished examples/long_context_lm/run.sh folder: its LongMem model, dictionary and tokenizer
  MODEL=${MODEL:-$MODEL_RUN/longmem/checkpoint_last.pt}
  DICT_DIR="$MODEL_RUN/data/bin"
  [ -f "$MODEL" ] || { echo "error: no LongMem checkpoint $MODEL (run run.sh first, or set MODEL)" >&2; exit 1; }
  if [ -f "$MODEL_RUN/data/spm.model" ]; then
    TOKENIZER=(--sentencepiece-model "$MODEL_RUN/data/spm.model")
  elif [ -f "$MODEL_RUN/smollm2/tokenizer.json" ]; then  # PRESET=smollm2: the backbone's own
    TOKENIZER=(--tokenizer-file "$MODEL_RUN/smollm2/tokenizer.json")
    BACKBONE="$MODEL_RUN/smollm2/checkpoint.pt"
  fi
  T=$(sed -n 's/.*--tokens-per-sample \([0-9]*\).*/\1/p' "$MODEL_RUN/logs/train_longmem.cmd" | head -1)
  T=${T:-256}
  PRESET=${PRESET:-cpu}
  source "examples/long_context_lm/$PRESET.env"  # THREADS of the preset the model was trained with
else
  export BACKBONE_UPDATES=${BACKBONE_UPDATES:-1200} LONGMEM_UPDATES=${LONGMEM_UPDATES:-600} T
  export CORPUS_ARGS=${CORPUS_ARGS:---valid-books 1 --test-books 2 --seed 1993 --bpe gpt2}
  OUT="$OUT/model" STOP_AFTER=train PRESET=cpu bash examples/long_context_lm/run.sh
  MODEL="$OUT/model/longmem/checkpoint_last.pt"
  DICT_DIR="$OUT/model/data/bin"
fi
T=${ICL_T:-$T}
CHUNK=${ICL_CHUNK:-2}
OVERRIDES="'chunk_size': $CHUNK"
[ -n "${ICL_MEMORY_SIZE:-}" ] && OVERRIDES="$OVERRIDES, 'memory_size': $ICL_MEMORY_SIZE"
MORE=()
[ -n "${TEST_EXAMPLES:-}" ] && MORE=(--test-examples "$TEST_EXAMPLES")
SCORING=(--cpu)  # fairseq-generate options of every run
[ -n "${ICL_CALIBRATION:-}" ] && SCORING+=(--nbest 2 --icl-calibration "$ICL_CALIBRATION")
# (e) where the model run has a pretrained backbone and its preset a training-free read
FREE_ARGS=()
if [ -n "$BACKBONE" ] && [ -n "${FREE_READ_LAYERS:-}" ]; then
  FREE_ARGS=(--training-free-memory --free-read-layers "$FREE_READ_LAYERS" --free-chunk-size
             "$CHUNK" --free-retrieved-tokens "${RETRIEVED:-32}"
             --free-memory-size "${ICL_MEMORY_SIZE:-${MEMORY_SIZE:-65536}}")
fi
source examples/cpu_determinism.sh

for set in $SETS; do
  case $set in
    rt|amazon)
      [ -f "$OUT/data/$set/test.tsv" ] || python examples/get_vader_sets.py --out "$OUT/data"
      args=(--dataset tsv --data-dir "$OUT/data/$set" --labels negative,positive) ;;
    *)
      if [ -z "${ICL_DATA:-}" ]; then echo "-- $set: skipped (set ICL_DATA)"; continue; fi
      args=(--dataset "$set" --data-dir "$ICL_DATA") ;;
  esac
  mkdir -p "$OUT/$set"
  python examples/icl/run_icl.py --path "$MODEL" --dict-dir "$DICT_DIR" "${args[@]}" \
    --out "$OUT/$set" --seeds "$SEEDS" --k "$K" --n "$N" --tokens-per-sample "$T" "${TOKENIZER[@]}" \
    "${MORE[@]}" --model-overrides "{$OVERRIDES}" -- "${SCORING[@]}" | tee "$OUT/$set/table.md"
  if [ ${#FREE_ARGS[@]} -gt 0 ]; then
    mkdir -p "$OUT/free/$set"
    python examples/icl/run_icl.py --path "$BACKBONE" --dict-dir "$DICT_DIR" "${args[@]}" \
      --out "$OUT/free/$set" --seeds "$SEEDS" --k "$K" --n "$N" --tokens-per-sample "$T" \
      "${TOKENIZER[@]}" "${MORE[@]}" -- "${SCORING[@]}" "${FREE_ARGS[@]}" | tee "$OUT/free/$set/table.md"
  fi
done
