#!/bin/bash
# A short, bounded run of every fuzz target (tests/fuzz/*_fuzz.cc; libFuzzer
# with ASan+UBSan, built into build-fuzz/ by `make fuzz-build`), and a replay
# of the inputs that once made a target fail (tests/fuzz/regressions/<target>/;
# inputs under pending/ reproduce bugs not fixed yet and are not replayed).
#
# Usage: tests/interop/fuzz_test.sh [BUILD_DIR]   (BUILD_DIR is not used: the
#   fuzz build always lives in build-fuzz/)
#   FUZZ_TEST_SECONDS=N   fuzzing time per target (default 20)
#
# Per target: "ok - <target>: replays N regression inputs" and
# "ok - <target>: fuzzed S s (E executions), no finding"; a finding is shown
# (sanitizer report) and its input kept in build-fuzz/findings/<target>/.
TAP_LIB=$(cd "$(dirname "$0")/../support" && pwd)/tap.sh
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT" || exit 1
SECONDS_PER_TARGET=${FUZZ_TEST_SECONDS:-20}
FUZZ_BUILD=build-fuzz
TARGETS=(image_fuzz virtqueue_fuzz vhost_user_fuzz)

T=$(mktemp -d /tmp/kvblk-fuzz.XXXXXX)
trap 'rm -rf "$T"' EXIT
failures=0
checks=0
. "$TAP_LIB"

if ! command -v clang++ >/dev/null; then
  echo "not ok - clang++ is installed (make deps)"
  exit 1
fi
if ! make --no-print-directory -s -j2 fuzz-build >"$T/.evidence" 2>&1; then
  fail "build the fuzz targets (make fuzz-build)"
  exit 1
fi

for t in "${TARGETS[@]}"; do
  bin=$FUZZ_BUILD/$t
  reg=tests/fuzz/regressions/$t
  inputs=()
  if [ -d "$reg" ]; then
    while IFS= read -r f; do inputs+=("$f"); done < <(find "$reg" -path "$reg/pending" -prune -o \
      -type f -print | sort)
  fi
  if [ ${#inputs[@]} -gt 0 ]; then
    check "$t: replays ${#inputs[@]} regression inputs" "$bin" -runs=1 "${inputs[@]}"
  else
    pass "$t: no regression inputs to replay"
  fi

  corpus=$FUZZ_BUILD/corpus/$t
  findings=$FUZZ_BUILD/findings/$t
  mkdir -p "$corpus" "$findings"
  extra=()
  if [ -f "tests/fuzz/$t.options" ]; then read -r -a extra <"tests/fuzz/$t.options"; fi
  rc=0
  "$bin" -max_total_time="$SECONDS_PER_TARGET" -print_final_stats=1 \
    -artifact_prefix="$findings/" "${extra[@]}" "$corpus" "$FUZZ_BUILD/seeds/$t" \
    >"$T/$t.log" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$T/$t.log" | tail -1)
  {
    echo "exit status $rc"
    grep -E -A40 '^==[0-9]+==ERROR|runtime error|^SUMMARY|Test unit written' "$T/$t.log" | head -60
    grep -E '^stat::(number_of_executed_units|peak_rss_mb)' "$T/$t.log" | tail -2
  } >"$T/.evidence"
  if [ "$rc" -eq 0 ] && [ "${execs:-0}" -gt 0 ]; then
    pass "$t: fuzzed ${SECONDS_PER_TARGET} s ($execs executions), no finding"
  else
    fail "$t: fuzzed ${SECONDS_PER_TARGET} s (${execs:-0} executions), no finding"
  fi
done

echo "# $checks checks, $failures failed"
[ "$failures" -eq 0 ]
