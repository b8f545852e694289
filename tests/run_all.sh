#!/bin/bash
# Runs every test: the GoogleTest unit binary, then each interop script in
# tests/interop/ (TAP-like "ok - ..." / "not ok - ..." lines). Prints one
# closing line "N passed, M failed" and exits non-zero if anything failed.
set -uo pipefail
BUILD=${1:-build}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
passed=0
failed=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT

echo "== unit tests ($BUILD/tests/unit_tests)"
if "$BUILD/tests/unit_tests" --gtest_brief=1 >"$log" 2>&1; then urc=0; else urc=$?; fi
tail -n 40 "$log"
p=$(sed -n 's/^\[  PASSED  \] \([0-9]*\) test.*/\1/p' "$log" | tail -1)
# Failed tests are listed by name, one line each.
f=$(grep -E '^\[  FAILED  \] [A-Za-z_]' "$log" | sort -u | wc -l)
total=$(sed -n 's/^\[==========\] \([0-9]*\) tests\? from .* ran.*/\1/p' "$log" | tail -1)
p=${p:-0}
if [ -z "$total" ]; then
  echo "not ok - unit tests did not run to completion (exit status $urc)"
  f=$((f + 1))
elif [ "$urc" -ne 0 ] && [ "$f" -eq 0 ]; then
  echo "not ok - unit tests exited with status $urc"
  f=1
fi
passed=$((passed + p))
failed=$((failed + f))

for script in tests/interop/*.sh tests/guest/guest_test.sh; do
  [ -e "$script" ] || continue
  echo "== $script"
  if bash "$script" "$BUILD" >"$log" 2>&1; then rc=0; else rc=$?; fi
  cat "$log"
  p=$(grep -c '^ok ' "$log" || true)
  f=$(grep -c '^not ok ' "$log" || true)
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
    echo "not ok - $script exited with status $rc"
    f=1
  elif [ "$p" -eq 0 ] && [ "$f" -eq 0 ]; then
    echo "not ok - $script reported no checks"
    f=1
  fi
  passed=$((passed + p))
  failed=$((failed + f))
done

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
