#!/bin/bash
# perf/bench.py's raw runs (tests/perf/bench_pairing_test.py): raw runs
# beside every layout in every round, and the report pairs each layout's
# runs with that raw run only.
#
# Usage: tests/interop/bench_pairing_test.sh BUILD_DIR
TAP_LIB=$(cd "$(dirname "$0")/../support" && pwd)/tap.sh
TEST=$(cd "$(dirname "$0")/../perf" && pwd)/bench_pairing_test.py
set -uo pipefail

. "$TAP_LIB"
tap_setup "${1:-build}" python3
python3 "$TEST"
