#!/usr/bin/env bash
# What a session with a lent GPU runs first, from the repository root (device tool `run`, timeout_s=600):
#
#     COMMIT=<the commit's sha> bash benchmarks/gpu_session.sh
#
# Stage "check" (the default): is every kernel correct on this GPU? Inside BUDGET_S (540 s), so the
# call ends inside the tool's 600 s whatever happens; each step has a time limit taken from what is
# left, and a step cut by its limit still leaves what it did in the record.
#   versions       GPU, driver, runtime (gVisor or Firecracker), torch, triton, transformers, nvcc, ...
#   build          the CUDA extension for sm_90 only, in the background from the start (nvcc takes
#                  minutes), into the work folder: the tests below run without it
#   tests          the whole test suite except the CUDA extension's tests (and the benchmark, docs and
#                  this script's tests: CPU checks CI runs), xdist workers, a per-test timeout,
#                  junit XML; every failure is named
#   sanitize       benchmarks/sanitize.py: compute-sanitizer (memcheck, initcheck, racecheck,
#                  synccheck) over the Triton cases of benchmarks/sanitize_cases.py, in parallel
#   tests-cuda     once the build is done: tests/test_cuda_extension.py with the extension
#   sanitize-cuda  the CUDA cases, and any Triton check the deadline cut before
#   summary        $OUT/check.json and $OUT/check.md (printed last; commit both under the
#                  benchmarks/results/<gpu>-<date>/ folder it names), logs in $OUT/check-logs.tar.gz
# Stage "bench": the benchmark suites, each SUITE[:TIMEOUT_S[:SIZES]] (default 400 s, --sizes
# headline), into $OUT/bench.tar.gz; it builds the extension first when the check stage did not:
#     STAGES=bench SUITES="adapter:400:headline e2e:120" bash benchmarks/gpu_session.sh
# BENCH_ARGS goes to each suite: BENCH_ARGS="--impls eager,ampfuse-triton,torch.compile" leaves out
# max-autotune (minutes of compiling per shape), the adapters library and the CUDA extension (not built
# then), for a lease too short for them. BENCH_ARGS is split at spaces, so the labels with a space
# ("torch.compile max-autotune", "adapters library") cannot be named there; e2e ignores --impls.
# The adapters library (its baseline rows) pins transformers 4.57: carry it and its pins as wheels in
# .whl (device README); only the benchmark processes see them.
#
# Stage "tune": benchmarks/tune.py, the pipelining-stage A/B of the adapter block (TUNE_ARGS goes to it, e.g.
# TUNE_ARGS="--sizes 4096,16384 --settings 2/3,3/3,4/3"), limited to TUNE_LIMIT_S (default 300 s), its rows
# (tune.jsonl) packed into $OUT/tune.tar.gz:
#     STAGES=tune TUNE_ARGS="--sizes 4096,16384" bash benchmarks/gpu_session.sh
# DRY_RUN=1 (the default where no GPU is visible): the same steps on a CPU in about half a minute
# of CPU time, as CI's smoke test of this script (tests/test_gpu_session.py): no build, a few tests,
# tiny sanitizer cases in Triton's interpreter; a missing tool (nvidia-smi, compute-sanitizer) is
# reported as missing and its step skipped.
# Other knobs: OUT, PYTHON, WORKERS, TESTS, TESTS_CUDA, TEST_TIMEOUT, SANITIZE_CASES, SANITIZE_JOBS.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
# The command as run, for the record: the knobs set in the environment, then the script.
KNOBS="STAGES SUITES BENCH_ARGS TUNE_ARGS TUNE_LIMIT_S BUDGET_S DRY_RUN WORKERS TESTS TESTS_CUDA TEST_TIMEOUT SANITIZE_CASES SANITIZE_JOBS COMMIT"
CMD=$(for v in $KNOBS; do [[ -n "${!v+x}" ]] && printf '%s=%q ' "$v" "${!v}"; done)"bash benchmarks/gpu_session.sh"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/ampfuse-gpu}
W=$(mktemp -d)
mkdir -p "$OUT"
STAGES=${STAGES:-check}
BUDGET_S=${BUDGET_S:-540}
T0=$SECONDS
has() { [[ " $STAGES " == *" $1 "* ]]; }
left() { echo $(( BUDGET_S - (SECONDS - T0) - $1 )); }  # seconds left in the budget, $1 kept for later steps
min() { echo $(( $1 < $2 ? $1 : $2 )); }
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$W/steps.tsv"; }
# step NAME LIMIT_S LOG NOTE COMMAND...: runs COMMAND (output to LOG) under a time limit (INT, then
# KILL 15 s later: pytest writes its junit XML on INT) and records its exit status and duration.
step() {
  local name=$1 limit=$2 log=$3 note=$4 start=$SECONDS rc; shift 4
  if (( limit < 15 )); then
    record "$name" skip 0 "$limit" "no time left in the budget"; echo "== $name: skipped, no time left"; return
  fi
  echo "== $name (limit ${limit} s): $note"
  timeout -s INT -k 15 "$limit" "$@" > "$log" 2>&1; rc=$?
  record "$name" "$rc" $((SECONDS - start)) "$limit" "$note"
  echo "== $name: exit status $rc after $((SECONDS - start)) s"
}

if [[ -z "${DRY_RUN:-}" ]]; then
  DRY_RUN=1
  if command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then DRY_RUN=0; fi
  (( DRY_RUN )) && echo "no GPU (nvidia-smi missing or failing): DRY_RUN=1, a smoke test of this script"
fi

if has check; then
  if (( DRY_RUN )); then
    record build skip 0 0 "dry run: the CUDA extension is not built (nvcc takes minutes)"
  else
    rm -f ampfuse/_C*.so  # the tests run without the extension until this build replaces it
    BUILD_LIMIT=$(left 110)  # its products are needed by tests-cuda and sanitize-cuda only
    echo "== build (background, limit ${BUILD_LIMIT} s): the CUDA extension for sm_90 only"
    ( start=$SECONDS
      TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=3 timeout "$BUILD_LIMIT" \
        "$PY" setup.py build_ext --build-lib "$W/ext" --build-temp "$W/ext-tmp" > "$W/build.log" 2>&1
      record build $? $((SECONDS - start)) "$BUILD_LIMIT" "sm_90 only, beside the tests" ) &
    BUILD_PID=$!
  fi

  step versions 60 "$W/versions.log" "GPU, driver and package versions" \
    "$PY" -m benchmarks.session_summary versions --out "$W/versions.json"

  # The pytest plugins the stage relies on, and the xdist scheduler: worksteal rebalances the long
  # tests (hypothesis, BERT-width compiles) where plain load scheduling leaves workers idle.
  read -r HAS_XDIST HAS_TIMEOUT DIST <<< "$("$PY" -c '
import importlib.util as u
try:
    import xdist
    steal = tuple(int(x) for x in xdist.__version__.split(".")[:2]) >= (3, 2)
except ImportError:
    steal = False
print(int(bool(u.find_spec("xdist"))), int(bool(u.find_spec("pytest_timeout"))), "worksteal" if steal else "load")')"
  if (( DRY_RUN )); then
    # No xdist (its workers would each import torch: seconds that CI pays for nothing here).
    WORKERS=${WORKERS:-0}; TEST_TIMEOUT=${TEST_TIMEOUT:-60}; TINY=--tiny
    TESTS=${TESTS:-tests/test_gmu.py::test_masked_mean_ignores_padding tests/test_fusion.py::test_bad_input_names_the_argument}
    TESTS_CUDA=${TESTS_CUDA:-tests/test_cuda_extension.py::test_info_says_why_cuda_is_unavailable}
    SANITIZE_CASES=${SANITIZE_CASES:-adapter-triton-fp32,adapter-cuda-fp32}
    # Nothing is built in a dry run; unless an earlier in-place build is there, the extension's
    # tests must expect none.
    ls ampfuse/_C*.so > /dev/null 2>&1 || export AMPFUSE_NO_CUDA=1
  else
    # -3: the build (three kernel translation units at once) runs beside the tests. Per-test timeout
    # 150 s: a test's first calls compile its Triton kernels (BERT widths take tens of seconds); the
    # thread method also ends a test hung in a kernel (the worker exits and xdist names the test as
    # crashed).
    WORKERS=${WORKERS:-$(( $(nproc) - 3 ))}; TEST_TIMEOUT=${TEST_TIMEOUT:-150}; TINY=
    # What a GPU has nothing to add to: the benchmark smoke test and the sm_90 compile report
    # (test_benchmarks.py: the bench stage measures at real sizes; CI compiles), README/CI
    # consistency (test_docs.py), and this script's own tests (test_gpu_session.py).
    TESTS=${TESTS:-tests $(for f in cuda_extension benchmarks docs gpu_session; do printf -- '--ignore=tests/test_%s.py ' $f; done)}
    TESTS_CUDA=${TESTS_CUDA:-tests/test_cuda_extension.py}
    SANITIZE_CASES=${SANITIZE_CASES:-all}
  fi
  SANITIZE_JOBS=${SANITIZE_JOBS:-$(( $(nproc) > 4 ? $(nproc) - 4 : 1 ))}
  # Many processes share the CPUs (xdist workers, parallel sanitizer runs): one CPU thread each for
  # the float64 references (threads spinning against each other cost more than they give), and
  # torch.compile's inductor compiling in its worker rather than in a pool of its own per worker.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-1}
  # pyproject.toml's addopts ask for xdist workers (-n auto), which this script chooses itself (and the GPU
  # machine may lack xdist): replaced here by what else they hold.
  PYTEST=("$PY" -m pytest -o "addopts=--import-mode=importlib" -p no:cacheprovider -v --tb=short -rfE
          -o junit_family=xunit1)
  if (( HAS_TIMEOUT )); then PYTEST+=(--timeout "$TEST_TIMEOUT" --timeout-method thread); else
    echo "pytest-timeout is missing: no per-test timeout"; fi
  xdist() { (( HAS_XDIST && $1 > 1 )) && echo "-n $1 --dist $DIST"; }

  # tests: at most 330 s; 170 s stay for sanitize (60), tests-cuda (40), sanitize-cuda (50), summary (20)
  # shellcheck disable=SC2046,SC2086  # TESTS and the xdist options are word lists
  step tests "$(min 330 "$(left 170)")" "$W/pytest-tests.log" "$TESTS ($WORKERS workers)" \
    "${PYTEST[@]}" $(xdist "$WORKERS") --junitxml "$W/junit-tests.xml" $TESTS
  grep -E "^(FAILED|ERROR) |^=+ .*(passed|failed|error)" "$W/pytest-tests.log" | tail -40

  limit=$(left 110)
  step sanitize "$limit" "$W/sanitize.log" "compute-sanitizer over the Triton cases ($SANITIZE_JOBS jobs)" \
    "$PY" -m benchmarks.sanitize --out "$W/sanitizer" --cases "$SANITIZE_CASES" --exclude '*-cuda-*' \
      --jobs "$SANITIZE_JOBS" --deadline-s $(( limit - 20 )) $TINY
  tail -n +2 "$W/sanitize.log" | grep -v " clean \| skipped \| ok " | head -30

  if [[ -n "${BUILD_PID:-}" ]]; then
    echo "== waiting for the build"
    wait "$BUILD_PID"
    if cp "$W"/ext/ampfuse/_C*.so ampfuse/ 2> /dev/null; then echo "built: $(ls ampfuse/_C*.so)"; else
      echo "no extension built:"; tail -5 "$W/build.log"; fi
    grep -E "error|warning: .*(spill|stack)" "$W/build.log" | head -10
  fi

  # shellcheck disable=SC2046,SC2086  # TESTS_CUDA and the xdist options are word lists
  step tests-cuda "$(min 120 "$(left 70)")" "$W/pytest-tests-cuda.log" "$TESTS_CUDA" \
    "${PYTEST[@]}" $(xdist "$(min 8 "$WORKERS")") --junitxml "$W/junit-tests-cuda.xml" $TESTS_CUDA
  grep -E "^(FAILED|ERROR) |^=+ .*(passed|failed|error)" "$W/pytest-tests-cuda.log" | tail -20

  limit=$(left 25)
  step sanitize-cuda "$limit" "$W/sanitize-cuda.log" "the CUDA cases, and what the deadline cut before" \
    "$PY" -m benchmarks.sanitize --out "$W/sanitizer" --cases "$SANITIZE_CASES" --jobs "$SANITIZE_JOBS" \
      --deadline-s $(( limit - 15 )) $TINY

  "$PY" -m benchmarks.session_summary summarize --work "$W" --out "$OUT" --command "$CMD" --budget-s "$BUDGET_S" \
    --elapsed-s $((SECONDS - T0)) > "$W/summary.log" 2>&1 || { echo "summary failed:"; tail -20 "$W/summary.log"; }
  tar -czf "$OUT/check-logs.tar.gz" -C "$W" --exclude=./ext --exclude=./ext-tmp . && echo "packed $OUT/check-logs.tar.gz"
fi

if has bench; then
  # the extension is built unless it is there or BENCH_ARGS' --impls leaves ampfuse-cuda out
  if ! ls ampfuse/_C*.so > /dev/null 2>&1 && [[ "${BENCH_ARGS:-}" != *--impls* || "${BENCH_ARGS:-}" == *ampfuse-cuda* ]]; then
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} timeout 400 "$PY" setup.py -q build_ext --inplace \
      > "$W/build-bench.log" 2>&1
    echo "build rc=$?"; grep -E "error|warning: .*(spill|stack)" "$W/build-bench.log" | head
  fi
  SUITES=${SUITES:-adapter gmu fusion e2e}
  mkdir -p "$W/bench"
  site=()
  if ls .whl/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
      site=(env "PYTHONPATH=/tmp/site:$PYTHONPATH")
  fi
  for spec in $SUITES; do
    IFS=: read -r suite limit sizes <<< "$spec"
    # shellcheck disable=SC2086  # BENCH_ARGS is a word list
    timeout "${limit:-400}" "${site[@]}" "$PY" -m benchmarks.run --suite "$suite" --sizes "${sizes:-headline}" \
      ${BENCH_ARGS:-} --out "$W/bench/$suite" > "$W/bench-$suite.log" 2>&1
    echo "bench $suite rc=$?"; grep -E "^  " "$W/bench-$suite.log" | grep -v skipped | cut -c1-120
  done
  tar -czf "$OUT/bench.tar.gz" -C "$W" --exclude=./ext --exclude=./ext-tmp . && echo "packed $OUT/bench.tar.gz"
fi

if has tune; then
  mkdir -p "$W/tune"
  tune=("$PY" -m benchmarks.tune)
  (( DRY_RUN )) && tune=(env TRITON_INTERPRET=1 "${tune[@]}" --quick)  # a smoke test in the interpreter
  # shellcheck disable=SC2086  # TUNE_ARGS is a word list
  timeout "${TUNE_LIMIT_S:-300}" "${tune[@]}" --out "$W/tune" ${TUNE_ARGS:-} > "$W/tune.log" 2>&1
  echo "tune rc=$?"; grep -E "^  " "$W/tune.log" | cut -c1-120
  tar -czf "$OUT/tune.tar.gz" -C "$W" tune tune.log && echo "packed $OUT/tune.tar.gz"
fi

# Last, so that the device tool's output tail (its last 12,000 characters) holds the whole record.
if has check; then cat "$OUT/check.md" 2> /dev/null; fi
