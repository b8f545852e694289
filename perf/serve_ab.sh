#!/bin/bash
# A/B of `kvblk serve` builds behind vhost-user-blk, with qemu-storage-daemon
# on the same image as the yardstick: for tuning serve's request path, where
# one run of bench-quick's device job has swung between 1.3x and 2.6x QEMU.
#
#   perf/serve_ab.sh [-r ROUNDS] [-t SECONDS] [-q IODEPTH] [-k pre|falloc]
#                    [-o "SERVE OPTIONS"] [-e ENGINE] [-p BACKEND_CPUS:FIO_CPUS]
#                    A_KVBLK [B_KVBLK]
#
# Each round runs QEMU, A, then B: the back end serves a 1 GiB qcow2 image
# (64 KiB clusters, a covering L2 cache, O_DIRECT) and fio, with
# build/perf/fio-vhost-user.so playing the VMM, reads 4 KiB at random at
# IODEPTH (default 32). The report gives every round's IOPS and the back
# end's CPU time per I/O (user + system, from /proc, in us), then per back
# end the medians, their ratio to QEMU's, and B/A. `pre` images hold data
# (the device-bound job, the default); `falloc` ones read as zeros without
# touching the device (CPU-bound). The images are shared with
# perf/engine_ab.sh under build/perf/ab/. Build the engine with `make perf`;
# -e runs another build of it (both back ends get the same one). -p pins
# every back end (taskset) and fio (cpus_allowed) to the CPU lists given,
# e.g. -p 0:1; unpinned by default.
set -euo pipefail
TOP=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=6 SECS=3 QD=32 KIND=pre SERVE_OPTS="" ENGINE=$TOP/build/perf/fio-vhost-user.so PIN=
usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while getopts "r:t:q:k:o:e:p:h" o; do
  case $o in
    r) ROUNDS=$OPTARG ;; t) SECS=$OPTARG ;; q) QD=$OPTARG ;; k) KIND=$OPTARG ;;
    o) SERVE_OPTS=$OPTARG ;; e) ENGINE=$(realpath "$OPTARG") ;; p) PIN=$OPTARG ;;
    h) usage 0 ;; *) usage ;;
  esac
done
BACKEND_PIN=() FIO_PIN=()
if [ -n "$PIN" ]; then
  [[ $PIN =~ ^[0-9,-]+:[0-9,-]+$ ]] ||
    { echo "serve_ab: -p $PIN: expected BACKEND_CPUS:FIO_CPUS, such as 0:1" >&2; exit 2; }
  BACKEND_PIN=(taskset -c "${PIN%%:*}") FIO_PIN=(--cpus_allowed="${PIN#*:}")
fi
shift $((OPTIND - 1))
[ $# -ge 1 ] && [ $# -le 2 ] || usage
case $KIND in falloc|pre) ;; *) echo "serve_ab: -k $KIND: expected pre or falloc" >&2; exit 2 ;; esac
BINS=()
for b in "$@"; do
  [ -x "$b" ] || { echo "serve_ab: $b: not an executable" >&2; exit 2; }
  BINS+=("$(cd "$(dirname "$b")" && pwd)/$(basename "$b")")
done
[ -f "$ENGINE" ] || { echo "serve_ab: $ENGINE missing (make perf)" >&2; exit 2; }
command -v fio >/dev/null && command -v qemu-img >/dev/null &&
  command -v qemu-storage-daemon >/dev/null ||
  { echo "serve_ab: needs fio, qemu-img and qemu-storage-daemon (make deps)" >&2; exit 2; }

DIR=$TOP/build/perf/ab
mkdir -p "$DIR"
QCOW=$DIR/$KIND-64k.qcow2
if [ ! -f "$QCOW" ]; then
  prealloc=$([ "$KIND" = pre ] && echo full || echo falloc)
  qemu-img create -q -f qcow2 -o preallocation=$prealloc,cluster_size=64k "$QCOW.tmp" 1G &&
    mv "$QCOW.tmp" "$QCOW"
fi
# A block this machine's disk has not read for a while reads several times
# slower; read the image once, whole, so no back end gets it cold (as
# perf/engine_ab.sh -k pre does).
[ "$KIND" = pre ] && dd if="$QCOW" of=/dev/null bs=1M iflag=direct status=none
SOCK=$(mktemp -u /tmp/serve_ab.XXXXXX.sock)
LOG=$(mktemp /tmp/serve_ab.XXXXXX.log)
PID=
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
  rm -f "$SOCK" "$LOG"
}
trap cleanup EXIT

# Starts back end $1 ("qemu" or a kvblk binary) on $QCOW at $SOCK.
start() {
  rm -f "$SOCK"
  if [ "$1" = qemu ]; then
    "${BACKEND_PIN[@]}" qemu-storage-daemon \
      --blockdev driver=file,node-name=f,filename="$QCOW",aio=io_uring,cache.direct=on \
      --blockdev driver=qcow2,node-name=q,file=f,cache.direct=on,l2-cache-size=1048576 \
      --export type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path="$SOCK",writable=on,num-queues=1 \
      >"$LOG" 2>&1 &
  else
    # shellcheck disable=SC2086  # SERVE_OPTS is a list of options
    "${BACKEND_PIN[@]}" "$1" serve --socket="$SOCK" --cache=none -f qcow2 $SERVE_OPTS "$QCOW" >"$LOG" 2>&1 &
  fi
  PID=$!
  for _ in $(seq 200); do
    [ -S "$SOCK" ] && return 0
    kill -0 "$PID" 2>/dev/null || break
    sleep 0.05
  done
  echo "serve_ab: $1 did not start:" >&2
  cat "$LOG" >&2
  exit 1
}
stop() {
  kill "$PID" 2>/dev/null || true
  wait "$PID" 2>/dev/null || true
  PID=
}
# CPU ticks (user + system) the back end used so far, all its threads.
ticks() { awk '{ print $14 + $15 }' "/proc/$PID/stat"; }

# One run: prints "IOPS CPU-us-per-I/O".
one() {
  start "$1"
  local t0 t1 iops
  t0=$(ticks)
  iops=$(fio --name=ab --ioengine=external:"$ENGINE" --filename="$SOCK" --rw=randread --bs=4k \
    --iodepth="$QD" --direct=1 --time_based --runtime="$SECS" --thread "${FIO_PIN[@]}" \
    --output-format=terse --terse-version=3 | awk -F';' '{ print $8 }')
  t1=$(ticks)
  stop
  local hz
  hz=$(getconf CLK_TCK)
  awk -v i="$iops" -v d=$((t1 - t0)) -v hz="$hz" -v s="$SECS" \
    'BEGIN { printf "%d %.2f\n", i, (i > 0 ? d / hz * 1e6 / (i * s) : 0) }'
}

NAMES=(qemu)
for b in "${BINS[@]}"; do NAMES+=("$b"); done
results=()
for ((r = 0; r < ROUNDS; r++)); do
  line=""
  for n in "${NAMES[@]}"; do line="$line $(one "$n")"; done
  results+=("$line")
  echo "round $((r + 1)):$line" >&2
done

printf '%s\n' "${results[@]}" | python3 -c '
import statistics, sys
names = sys.argv[1:]
rows = [list(map(float, l.split())) for l in sys.stdin if l.strip()]
iops = [[r[2 * i] for r in rows] for i in range(len(names))]
cpu = [[r[2 * i + 1] for r in rows] for i in range(len(names))]
mi = [statistics.median(x) for x in iops]
mc = [statistics.median(x) for x in cpu]
print("%-40s %10s %8s %12s %8s" % ("back end", "IOPS", "/QEMU", "CPU us/IO", "/QEMU"))
for i, n in enumerate(names):
    print("%-40s %10d %8.2f %12.2f %8.2f" % (n[-40:], mi[i], mi[i] / mi[0], mc[i], mc[i] / mc[0]))
if len(names) == 3:
    print("B/A: IOPS %.3f, CPU per I/O %.3f" % (mi[2] / mi[1], mc[2] / mc[1]))
' "${NAMES[@]}"
