#!/usr/bin/env bash
# What a session with a lent GPU runs (device tool, from the repository root; results under $OUT):
#   STAGES="build tests sanitizer bench" SUITES="adapter:400:headline e2e:120" bash benchmarks/gpu_session.sh
# build: the CUDA extension in place (sm_90 only, to keep the lease short); tests: the whole suite
# on the GPU (14 workers); sanitizer: memcheck and racecheck on small cases of every fused kernel;
# bench: each suite SUITE[:TIMEOUT_S[:SIZES]] (default 400 s, --sizes headline). Logs and reports are written to a work folder and packed
# into $OUT/session.tar.gz at the end (the device tool returns at most 8 files); stage timeouts
# keep the whole script inside one 10-minute call.
# The adapters library (its baseline rows) pins transformers 4.57: carry it and its pins as wheels
# in .whl (device README); only the benchmark processes see them, the tests run on the machine's
# own transformers.
set -uo pipefail
OUT=${OUT:-/tmp/ampfuse-gpu}
W=$(mktemp -d)
STAGES=${STAGES:-build tests sanitizer bench}
SUITES=${SUITES:-adapter gmu fusion e2e}
mkdir -p "$W/bench" "$OUT"
export PYTHONUNBUFFERED=1
has() { [[ " $STAGES " == *" $1 "* ]]; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
} 2>&1 | tee "$W/gpu.txt"
if has build; then
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} timeout 240 python3 setup.py -q build_ext --inplace \
    > "$W/build.log" 2>&1; echo "build rc=$?"; grep -E "error|warning: .*(spill|stack)" "$W/build.log" | head -20
fi
if has tests; then
  # -v: xdist prints each test's outcome as it finishes, so a run cut by the time limit still names
  # its failures (with -q they are only listed in the summary, which a killed run never prints)
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -v -n 14 -p no:cacheprovider --timeout 90 --tb=line -rfE \
    ${TESTS:-tests --ignore=tests/test_benchmarks.py --ignore=tests/test_docs.py} > "$W/pytest-gpu.log" 2>&1
  echo "pytest rc=$?"; grep -E " (FAILED|ERROR) |^(FAILED|ERROR)| passed| failed" "$W/pytest-gpu.log" | tail -40
fi
if has sanitizer; then
  for tool in memcheck racecheck; do
    timeout 150 compute-sanitizer --tool "$tool" --error-exitcode 9 python3 -m pytest -q -x -p no:cacheprovider \
      tests/test_adapter_block.py::test_triton_launch_counts tests/test_gmu.py::test_triton_ragged_tokens_and_k1 \
      tests/test_fusion.py::test_triton_launch_counts tests/test_cuda_extension.py \
      > "$W/sanitizer-$tool.log" 2>&1
    echo "sanitizer $tool rc=$?"; tail -3 "$W/sanitizer-$tool.log"
  done
fi
if has bench; then
  site=()
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && site=(env PYTHONPATH=/tmp/site)
  fi
  for spec in $SUITES; do
    IFS=: read -r suite limit sizes <<< "$spec"
    timeout "${limit:-400}" "${site[@]}" python3 -m benchmarks.run --suite "$suite" --sizes "${sizes:-headline}" \
      ${BENCH_ARGS:-} --out "$W/bench/$suite" > "$W/bench-$suite.log" 2>&1
    echo "bench $suite rc=$?"; grep -E "^  " "$W/bench-$suite.log" | grep -v skipped | cut -c1-120
  done
fi
tar -czf "$OUT/session.tar.gz" -C "$W" . && echo "packed $OUT/session.tar.gz"
