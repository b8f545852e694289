#!/bin/sh
# Builds and runs the OverlapGuard benchmark; writes perf/results/overlap_guard.md.
#   perf/overlap_guard_bench.sh [BUILD_DIR]      (default: build)
# Takes about a minute; it measures memory and ns per Check(), not a test.
set -e
cd "$(dirname "$0")/.."
build=${1:-build}
make --no-print-directory -f perf/overlap_guard.mk BUILD="$build" overlap-guard-bench
mkdir -p perf/results
out=perf/results/overlap_guard.md
"$build/perf/overlap_guard_bench" > "$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out"
