# Sourced by examples/quickstart.sh and examples/long_context_lm/run.sh: pins what changes the last
# bits of CPU results, so that a run prints the same digits on the same machine. Measured here
# (docs/RESULTS.md, "Quickstart: same digits"): torch's reductions are split by thread, so the thread count
# (THREADS, default 2) changes them; torch's AVX-512 kernels round differently from its AVX2
# kernels, so on x86 CPUs with AVX2, torch, MKL and oneDNN are held to AVX2 (ARM CPUs compute
# other last bits). Any variable already set in the environment wins.
THREADS=${THREADS:-2}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
  export ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-avx2} MKL_CBWR=${MKL_CBWR:-AVX2}
  export ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-AVX2}
fi
