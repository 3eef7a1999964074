#!/usr/bin/env bash
# LongMem end to end on a small built-in default, on CPU:
#   1. a whole-book corpus: Jane Austen's six novels from Debian's r-cran-janeaustenr package,
#      split by book (4 train / 1 valid / 1 test), sentencepiece vocabulary of 4000;
#   2. a tiny GPT-2 backbone (gpt2_lm_tiny: 128-d, 4 layers) trained from scratch;
#   3. LongMem (longmem_gpt2_tiny) adapted on top of the frozen backbone, 16k-token memory per stream,
#      one stream per training book (--batch-size 4: a stream is a book, and there are 4);
#   4. fairseq-eval-lm perplexity on the held-out book, with memory and with memory off.
# Run from the repository root after `bash install.sh`:  bash examples/quickstart.sh
# About 8 minutes on 2 idle CPU cores (459 s measured on an Intel Xeon). WORK=DIR chooses the output folder (default ./quickstart);
# a step whose output is already there is skipped, so a second run only re-evaluates.
# DATA=synthetic uses generated documents instead of the books (no Debian package needed);
# UPDATES=N trains each stage for N updates instead of 1000 (a quick check of the pipeline).
#
# Same digits on the same machine: the seeds are fixed (--seed 1; the corpus split and the
# sentencepiece model are deterministic), and examples/cpu_determinism.sh pins the thread count
# (THREADS, default 2) and, on x86 CPUs with AVX2, the AVX2 kernels. Another CPU model can print
# other digits; compare the memory's gain (docs/RESULTS.md, "Quickstart: same digits").
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-$PWD/quickstart}
DATA=${DATA:-austen}
UPDATES=${UPDATES:-1000}
source examples/cpu_determinism.sh
UD=$(python -m fairseq_longmem.user_dir)
mkdir -p "$WORK"
T=128

if [ ! -f "$WORK/data/bin/dict.txt" ]; then
  echo "== 1/4 corpus ($DATA)"
  if [ "$DATA" = synthetic ]; then
    python examples/synthetic_documents.py --out "$WORK/data/raw"
    SRC=(--input-dir "$WORK/data/raw")
  else
    SRC=(--sources austen)
  fi
  python examples/build_book_corpus.py --out "$WORK/data" "${SRC[@]}" \
    --valid-books 1 --test-books 1 --bpe sentencepiece --vocab-size 4000
fi

if [ ! -f "$WORK/backbone/checkpoint_last.pt" ]; then
  echo "== 2/4 backbone: gpt2_lm_tiny from scratch"
  fairseq-train "$WORK/data/bin" --user-dir "$UD" --task language_modeling --arch gpt2_lm_tiny \
    --tokens-per-sample $T --batch-size 16 --optimizer adam --adam-betas '(0.9,0.98)' \
    --lr 3e-3 --lr-scheduler inverse_sqrt --warmup-updates 100 --max-update $UPDATES \
    --dropout 0.0 --attention-dropout 0.0 --cpu --num-workers 0 --disable-validation \
    --no-epoch-checkpoints --save-dir "$WORK/backbone" --log-interval 50 --seed 1
fi

if [ ! -f "$WORK/longmem/checkpoint_last.pt" ]; then
  echo "== 3/4 LongMem: frozen backbone + SideNet + memory"
  fairseq-train "$WORK/data/bin" --user-dir "$UD" --task longmem_lm --arch longmem_gpt2_tiny \
    --criterion longmem_cross_entropy --backbone-path "$WORK/backbone/checkpoint_last.pt" \
    --tokens-per-sample $T --batch-size 4 --memory-size 16384 --chunk-size 4 --retrieved-tokens 32 \
    --optimizer adam --adam-betas '(0.9,0.98)' --lr 1e-3 --weight-decay 0.01 --max-update $UPDATES \
    --cpu --num-workers 0 --disable-validation --no-epoch-checkpoints \
    --save-dir "$WORK/longmem" --log-interval 50 --seed 1
fi

echo "== 4/4 perplexity on the held-out book"
evaluate() {
  fairseq-eval-lm "$WORK/data/bin" --user-dir "$UD" --task longmem_lm \
    --path "$WORK/longmem/checkpoint_last.pt" --gen-subset valid --tokens-per-sample $T \
    --batch-size 1 --cpu --num-workers 0 --model-overrides "$1" 2>&1 | tee "$2" | grep -E "Evaluated|Perplexity"
}
evaluate "{}" "$WORK/eval_memory_on.log"
evaluate "{'disable_memory': True}" "$WORK/eval_memory_off.log"
on=$(grep -o "Perplexity: [0-9.]*" "$WORK/eval_memory_on.log" | cut -d' ' -f2)
off=$(grep -o "Perplexity: [0-9.]*" "$WORK/eval_memory_off.log" | cut -d' ' -f2)
echo "valid perplexity with memory: $on, memory off (same weights): $off"
