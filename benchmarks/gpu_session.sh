#!/usr/bin/env bash
# What a session with a lent GPU runs (device tool, from the repository root; results under $OUT):
# the GPU test suite, then every benchmark suite. Copy $OUT/bench/* into benchmarks/results/ and commit.
# Carry the adapters library as wheels (.whl, see the device README) for its baseline rows.
set -uo pipefail
OUT=${OUT:-/tmp/ampfuse-gpu}
mkdir -p "$OUT/bench"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -x -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest-gpu.log" | tail -5
# memcheck and racecheck on small cases of every fused kernel (Triton and CUDA)
for tool in memcheck racecheck; do
  compute-sanitizer --tool "$tool" --error-exitcode 9 python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_adapter_block.py::test_triton_launch_counts tests/test_gmu.py::test_triton_ragged_tokens_and_k1 \
    tests/test_fusion.py::test_triton_launch_counts "tests/test_cuda_extension.py::test_cuda_placements_and_activations" \
    2>&1 | tail -3 | tee "$OUT/sanitizer-$tool.log"
done
python3 -m benchmarks.run --suite "${SUITE:-all}" ${QUICK:+--quick} --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | tail -40
