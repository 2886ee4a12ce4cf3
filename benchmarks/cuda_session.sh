#!/usr/bin/env bash
# One session on a lent GPU machine, in one call (device time is scarce): the environment,
# the CUDA tests, bench_cuda.py (exactness + layer timings) and whole-network training
# steps (STE vs LUT-2D). Run from the repository root with the machine's own python3
# (torch, numba, triton, pytest are on its image; amaranth is not needed):
#     bash benchmarks/cuda_session.sh            # logs under $OUT, else ./cuda_out
# Each stage has its own time limit so that one stuck stage leaves the others' results.
set -u
OUT=${OUT:-cuda_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
t0=$SECONDS
stage() { echo "== $1 ($((SECONDS - t0)) s)"; }

stage environment
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY - <<'EOF'
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
for name in ("numpy", "numba", "triton", "pytest"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # noqa: BLE001
        print(name, "missing:", e)
EOF
} 2>&1 | tee "$OUT/env.txt"

stage "CUDA tests (Triton autotuned)"
timeout 60 $PY -m pytest -q -p no:cacheprovider tests/test_nn_triton_gather.py tests/test_nn_exact_conv.py \
    "tests/test_nn_kernel_choice.py::test_cuda_matches_cpu" 2>&1 | tee "$OUT/tests_triton.txt" | tail -25
stage "CUDA tests (layers; Triton tiles fixed: no autotuning for each of the many small shapes)"
APPMULT_TRITON_AUTOTUNE=0 timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_nn_cuda.py 2>&1 \
    | tee "$OUT/tests_cuda.txt" | tail -40

stage "bench_triton_gather.py"
timeout 90 $PY benchmarks/bench_triton_gather.py 2>&1 | tee "$OUT/bench_triton_gather.txt"

stage "bench_cuda.py"
timeout 200 $PY benchmarks/bench_cuda.py --reps 10 --out "$OUT/bench_cuda.md" 2>&1 | tee "$OUT/bench_cuda.txt"

stage "training steps"
timeout 100 $PY benchmarks/bench_train_step.py --device cuda --models lenet5,resnet20 --luts rank1,gather \
    --grads ste,lut2d --reps 5 2>&1 | tee "$OUT/train_step.txt"
stage done
