#!/bin/bash
# perf/bench.py's image space handling (tests/perf/bench_space_test.py):
# discarded images do not fill the disk during a run, and a disk too full
# for the next image stops the run with what is missing.
#
# Usage: tests/interop/bench_space_test.sh BUILD_DIR
TAP_LIB=$(cd "$(dirname "$0")/../support" && pwd)/tap.sh
TEST=$(cd "$(dirname "$0")/../perf" && pwd)/bench_space_test.py
set -uo pipefail

. "$TAP_LIB"
tap_setup "${1:-build}" qemu-img python3
python3 "$TEST" "$T"
