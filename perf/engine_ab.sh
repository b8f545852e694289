#!/bin/bash
# A/B of fio-kvblk builds on the CPU-bound read (or the device-bound one),
# with fio's own io_uring engine on a raw file as the yardstick: for tuning
# the read path, where one unpinned run swings by 15 % on these machines.
#
#   perf/engine_ab.sh [-r ROUNDS] [-t SECONDS] [-c CPU] [-k falloc|pre] [-m iops|cpu]
#                     A.so [B.so]
#
# Each round runs raw, A and B (4 KiB random reads, QD32, O_DIRECT, fio
# pinned to CPU unless -c ''), in reverse order every other round; the
# report gives every round and, per engine, the median and its ratio to
# raw (and B/A), and the median of the ratios within each round. -m cpu
# reports fio's CPU time per I/O in ns instead of IOPS (lower is better).
# The images (1 GiB, 64 KiB clusters) are made once under build/perf/ab/:
# `falloc` ones read as zeros without touching the device (CPU only),
# `pre` ones hold data and are read once, whole, before the rounds. Build
# the engine with `make perf`; keep copies of the builds to compare
# (cp build/perf/fio-kvblk.so /tmp/a.so).
set -euo pipefail
ROUNDS=6 SECS=2 CPU=1 KIND=falloc MEASURE=iops
usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while getopts "r:t:c:k:m:h" o; do
  case $o in
    r) ROUNDS=$OPTARG ;; t) SECS=$OPTARG ;; c) CPU=$OPTARG ;; k) KIND=$OPTARG ;;
    m) MEASURE=$OPTARG ;; h) usage 0 ;; *) usage ;;
  esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] && [ $# -le 2 ] || usage
case $KIND in falloc|pre) ;; *) echo "engine_ab: -k $KIND: expected falloc or pre" >&2; exit 2 ;; esac
case $MEASURE in iops|cpu) ;; *) echo "engine_ab: -m $MEASURE: expected iops or cpu" >&2; exit 2 ;; esac
ENGINES=()
for so in "$@"; do
  [ -f "$so" ] || { echo "engine_ab: $so: no such engine" >&2; exit 2; }
  ENGINES+=("$(cd "$(dirname "$so")" && pwd)/$(basename "$so")")
done
command -v fio >/dev/null && command -v qemu-img >/dev/null ||
  { echo "engine_ab: needs fio and qemu-img (make deps)" >&2; exit 2; }

DIR=$(cd "$(dirname "$0")/.." && pwd)/build/perf/ab
mkdir -p "$DIR"
RAW=$DIR/$KIND-raw.img QCOW=$DIR/$KIND-64k.qcow2
if [ ! -f "$QCOW" ]; then
  prealloc=$([ "$KIND" = pre ] && echo full || echo falloc)
  qemu-img create -q -f raw -o preallocation=$prealloc "$RAW.tmp" 1G && mv "$RAW.tmp" "$RAW"
  qemu-img create -q -f qcow2 -o preallocation=$prealloc,cluster_size=64k "$QCOW.tmp" 1G &&
    mv "$QCOW.tmp" "$QCOW"
fi

# This machine's virtual disk reads a block it has not read for a while
# several times slower (the host caches it): an image made or last read
# hours ago starts cold and warms during the rounds, which would favour
# whichever engine runs later. Read both images once, whole, first.
if [ "$KIND" = pre ]; then
  for img in "$RAW" "$QCOW"; do dd if="$img" of=/dev/null bs=1M iflag=direct status=none; done
fi

common=(--name=ab --rw=randread --bs=4k --iodepth=32 --direct=1 --time_based
        --runtime="$SECS" --size=1G --thread --output-format=terse --terse-version=3)
[ -n "$CPU" ] && common+=(--cpus_allowed="$CPU")
# terse v3: field 8 is read IOPS, 88 and 89 user and system CPU (%).
one() {
  fio "${common[@]}" "$@" | awk -F';' -v m="$MEASURE" '{
    if (m == "cpu") { u = $88; s = $89; sub("%", "", u); sub("%", "", s);
                      printf "%d\n", (u + s) * 1e7 / $8 } else print $8 }'
}
results=()
for ((r = 0; r < ROUNDS; r++)); do
  # Odd rounds run the engines in reverse order, so that none always runs
  # first (right after a pause) or last.
  order=($(seq 0 ${#ENGINES[@]}))
  ((r % 2)) && order=($(seq ${#ENGINES[@]} -1 0))
  vals=()
  for i in "${order[@]}"; do
    if ((i == 0)); then
      vals[0]=$(one --ioengine=io_uring --filename="$RAW")
    else
      vals[i]=$(one --ioengine=external:"${ENGINES[i - 1]}" --filename="$QCOW")
    fi
  done
  line="${vals[*]}"
  results+=("$line")
  echo "round $((r + 1))/$ROUNDS: $line" >&2
done
printf '%s\n' "${results[@]}" | python3 -c '
import statistics, sys
measure, names = sys.argv[1], sys.argv[2:]
rows = [list(map(float, l.split())) for l in sys.stdin if l.strip()]
cols = list(zip(*rows))
med = [statistics.median(c) for c in cols]
unit = "IOPS" if measure == "iops" else "CPU ns per I/O"
print("%s, median of %d rounds (%s)" % (unit, len(rows), "higher is better" if measure == "iops" else "lower is better"))
print("  raw  %10.0f" % med[0])
for i, n in enumerate(names, 1):
    print("  %s  %10.0f  /raw %.3f  (rounds %.0f-%.0f)" % ("AB"[i - 1], med[i], med[i] / med[0], min(cols[i]), max(cols[i])))
# The same ratios taken within each round (one engine right after the
# other) and then their median: drift between rounds cancels out.
def paired(i, j):
    r = sorted(a[i] / a[j] for a in rows)
    return "%.3f (rounds %.3f-%.3f)" % (statistics.median(r), r[0], r[-1])
for i in range(1, len(names) + 1):
    print("  %s/raw, median of the rounds\x27 own ratios: %s" % ("AB"[i - 1], paired(i, 0)))
if len(names) == 2:
    print("  B/A  %.3f" % (med[2] / med[1]))
    print("  B/A, median of the rounds\x27 own ratios: %s" % paired(2, 1))
' "$MEASURE" "${ENGINES[@]}"
