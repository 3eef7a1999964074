#!/usr/bin/env bash
# The memory search and step-overhead measurements on a GPU machine, in one call.
#
#   bash examples/benchmarks/gpu_device.sh prepare   # on a machine with PyPI: wheels for a
#                                                     # Python 3.12 GPU machine -> .cache/device/wh
#   bash examples/benchmarks/gpu_device.sh run       # on the GPU machine, from the repository root:
#                                                     # offline install, tests, benchmarks -> $OUT
#
# The GPU machine is assumed to have Python 3.12 with a CUDA build of torch (which ships triton),
# numpy and pytest, and no package registry: `prepare` downloads fairseq (ve-fairseq, --no-deps)
# and the small packages the tests and benchmarks need (about 35 MB); carry .cache/device to it.
# `run` writes everything under $OUT (default ./gpu_results): the test log, the search tables
# (paper shapes: B=8, H=16, T=1024, hd=64, csz=4, k=64, msz 65,536 and 262,144; fp16 and bf16;
# every backend checked against matmul + topk) and the memory on/off step overheads of GPT-2
# small and medium (bf16 autocast, B=8, T=1024, msz=65,536) for auto, matmul (the search before
# the two-stage one) and triton; and the same overheads for a Llama of SmolLM2-135M's sizes
# (random weights, r = 5, msz 16,384 and 65,536). Not run yet: no GPU was lent to this project's sessions.
set -euo pipefail
cd "$(dirname "$0")/../.."
WH=.cache/device/wh

case "${1:-}" in
prepare)
    mkdir -p "$WH"
    plat=(--python-version 3.12 --only-binary=:all: --no-deps --platform manylinux2014_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64
          --platform manylinux_2_28_x86_64 --platform any)
    pip download -q "${plat[@]}" -d "$WH" ve-fairseq==0.12.3 bitarray cffi pycparser \
        hydra-core==1.3.8 omegaconf==2.3.1 PyYAML regex sacrebleu portalocker tabulate colorama \
        lxml sentencepiece tqdm safetensors pygments hypothesis sortedcontainers attrs
    # antlr4-python3-runtime 4.9.3 (hydra's pin) is an sdist only: build its pure-Python wheel
    pip wheel -q --no-deps -w "$WH" antlr4-python3-runtime==4.9.3
    du -sh "$WH"
    ;;
run)
    OUT=${OUT:-gpu_results}
    mkdir -p "$OUT"
    python -m pip install -q --no-index --find-links "$WH" hydra-core omegaconf bitarray regex \
        sacrebleu sentencepiece tqdm safetensors cffi pygments hypothesis
    python -m pip install -q --no-index --no-deps "$WH"/ve_fairseq-*.whl
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
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
*)
    echo "usage: bash $0 prepare|run" >&2
    exit 2
    ;;
esac
