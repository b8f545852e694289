# Shared by the interop scripts: TAP-like result lines.
# The including script sets T (its temp dir), failures=0 and checks=0; a
# command's output saved in $T/.evidence is shown under a failing line.

pass() {
  checks=$((checks + 1))
  echo "ok - $1"
}

fail() {
  checks=$((checks + 1))
  failures=$((failures + 1))
  echo "not ok - $1"
  if [ -s "$T/.evidence" ]; then sed 's/^/#   /' "$T/.evidence" | head -n 30; fi
}

# check DESC CMD...: CMD succeeds (its output is shown if it does not).
check() {
  local desc=$1
  shift
  if "$@" >"$T/.evidence" 2>&1; then pass "$desc"; else fail "$desc"; fi
}

# wait_for SECONDS CMD...: retries CMD (every 50 ms) until it succeeds;
# fails after SECONDS.
wait_for() {
  local tries=$(($1 * 20))
  shift
  while [ "$tries" -gt 0 ]; do
    if "$@" 2>/dev/null; then return 0; fi
    sleep 0.05
    tries=$((tries - 1))
  done
  return 1
}

# tap_setup BUILD TOOL...: the common start of an interop script. Sets KVBLK
# (BUILD/kvblk, absolute), checks that each TOOL is installed, makes the temp
# dir T (removed on exit, after killing any pid in PIDS), changes into it and
# zeroes the counters. Exits with a "not ok" line when something is missing.
tap_setup() {
  local build=$1 tool
  shift
  if [ ! -x "$build/kvblk" ]; then
    echo "not ok - $build/kvblk is not built"
    exit 1
  fi
  KVBLK=$(cd "$build" && pwd)/kvblk
  for tool in "$@"; do
    if ! command -v "$tool" >/dev/null; then
      echo "not ok - $tool is not installed"
      exit 1
    fi
  done
  T=$(mktemp -d)
  PIDS=()
  trap 'for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done; rm -rf "$T"' EXIT
  cd "$T" || exit 1
  export LC_ALL=C
  failures=0
  checks=0
  : >"$T/.evidence"
}

# tap_engine BUILD: builds BUILD/perf/fio-vhost-user.so (from the repository
# at TOP) if needed and sets ENGINE to its absolute path. KVBLK_FIO_ENGINE
# names a prebuilt engine instead (sanitizer builds: fio cannot load an
# engine linked against an ASan/TSAN libkvblk; the engine only speaks
# vhost-user, so any build of it will do).
tap_engine() {
  local build=$1 dir
  if [ -n "${KVBLK_FIO_ENGINE:-}" ]; then
    # (a relative path is taken from the top of the repository)
    case $KVBLK_FIO_ENGINE in /*) ENGINE=$KVBLK_FIO_ENGINE ;; *) ENGINE=$TOP/$KVBLK_FIO_ENGINE ;; esac
    return 0
  fi
  case $build in /*) dir=$build ;; *) dir=$TOP/$build ;; esac
  if ! (cd "$TOP" && make --no-print-directory -s -f perf/Makefile BUILD="$build" \
          "$build/perf/fio-vhost-user.so") >/dev/null 2>&1; then
    echo "not ok - build $build/perf/fio-vhost-user.so"
    exit 1
  fi
  ENGINE=$dir/perf/fio-vhost-user.so
}
