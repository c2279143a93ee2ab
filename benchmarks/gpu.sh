#!/usr/bin/env bash
# The prepared device check for a CUDA machine: the GPU tests (fast-path pins, estimator, cache),
# then the GPU configurations of the benchmark (fp32, then TF32 matmuls), then the 1-GPU case of
# data-parallel training under torchrun (NCCL), results in $OUT.
# Needs a CUDA build of torch in the environment that runs it.  About 5-8 minutes on an H100.
set -euo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PY=${PY:-python}
$PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/gpu_device.txt"
# Every GPU test (fast-path pins, estimator, cache, metrics), then the device-placement tests that
# CI runs on its virtual device, here next to the real one.  A failing test does not stop the
# benchmark: the status is printed at the end.
set +e
$PY -m pytest -q -m gpu tests/test_fast_paths.py tests/test_gpu.py tests/test_metrics.py tests/test_dask_sweep.py 2>&1 | tee "$OUT/gpu_tests.txt"
tests_status=${PIPESTATUS[0]}
$PY -m pytest -q tests/test_device_placement.py tests/test_virtual_device.py 2>&1 | tee -a "$OUT/gpu_tests.txt"
placement_status=${PIPESTATUS[0]}
set -e
$PY benchmarks/run.py --configs pythia70m pythia410m --naive-tokens 1 \
    --out "$OUT/gpu_fp32.json" 2>&1 | tee "$OUT/gpu_fp32.txt"
$PY benchmarks/run.py --configs pythia70m pythia410m --naive-tokens 0 --skip-inference --skip-train \
    --matmul-precision high --out "$OUT/gpu_tf32.json" 2>&1 | tee "$OUT/gpu_tf32.txt"
# Data-parallel training, the 1-GPU case: torchrun --nproc-per-node 1 with NCCL (explicit
# all-reduce and DDP) against a one-process fit on the same GPU (docs/scaling.rst).
set +e
$PY benchmarks/scaling_out.py --device cuda --ranks 1 --skip-sweep --repeats 1 \
    --out "$OUT/gpu_scaling_out.json" 2>&1 | tee "$OUT/gpu_scaling_out.txt"
scaling_status=${PIPESTATUS[0]}
set -e
echo "GPU tests exit status: $tests_status; device-placement tests: $placement_status; 1-GPU data-parallel: $scaling_status" \
    | tee -a "$OUT/gpu_tests.txt"
test "$tests_status" = 0 && test "$placement_status" = 0 && test "$scaling_status" = 0
