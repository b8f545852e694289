#!/bin/bash
# perf/bench.py's raw-file runs (tests/perf/bench_pairing_test.py): raw,
# and kvblk-raw in the randread QD32 jobs only, run beside every layout in
# every round; the report pairs each layout's runs with those runs only and
# splits kvblk/raw into kvblk/kvblk-raw and kvblk-raw/raw.
#
# Usage: tests/interop/bench_pairing_test.sh BUILD_DIR
TAP_LIB=$(cd "$(dirname "$0")/../support" && pwd)/tap.sh
TEST=$(cd "$(dirname "$0")/../perf" && pwd)/bench_pairing_test.py
set -uo pipefail

. "$TAP_LIB"
tap_setup "${1:-build}" python3
python3 "$TEST"
