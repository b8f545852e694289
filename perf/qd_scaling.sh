#!/bin/bash
# Queue-depth scaling of kvblk's qcow2 layer on one I/O thread (issue 3).
#
# fio drives kvblk's disk layer in-process (build/perf/fio-kvblk.so, one job,
# one thread, O_DIRECT) and, side by side in the same run, a raw file with
# fio's own io_uring engine at the same depths:
#   - 4 KiB random reads of a fully allocated qcow2 image (64 KiB clusters)
#     and of the raw file it was converted from;
#   - 4 KiB random allocating writes into an empty qcow2 image (64 KiB
#     clusters; offsets aligned to 64 KiB, so nearly every write allocates a
#     cluster) and into a sparse raw file, both made fresh for every point.
# Writes perf/results/qd_scaling.md (a table: depth, IOPS, ratio, p99). This
# is a benchmark, not a test: nothing is asserted.
#
# Usage: perf/qd_scaling.sh [--build DIR] [--runtime S] [--depths "1 8 32 128"]
#                           [--tests "read write"] [--iothreads N] [--out FILE]
#   --tests      which tables to measure (default both)
#   --iothreads  the kvblk engine's I/O threads (default 1: the job's own
#                thread, as in the tables' title; see docs/bench.md)
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
build=build
runtime=5
depths="1 8 32 128"
out=perf/results/qd_scaling.md
tests="read write"
iothreads=1
while [ $# -gt 0 ]; do
  case $1 in
    --build) build=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --depths) depths=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --tests) tests=$2; shift 2 ;;
    --iothreads) iothreads=$2; shift 2 ;;
    *) echo "usage: $0 [--build DIR] [--runtime S] [--depths LIST] [--tests LIST]" \
            "[--iothreads N] [--out FILE]" >&2; exit 2 ;;
  esac
done

for tool in fio qemu-img python3; do
  command -v $tool >/dev/null || { echo "qd_scaling: $tool is missing (make deps)" >&2; exit 1; }
done
make --no-print-directory -f perf/Makefile BUILD="$build" perf >/dev/null
engine=$top/$build/perf/fio-kvblk.so

# Images live on the build's file system (O_DIRECT needs a real one).
# Images are moved to $trash and deleted in the background at the end:
# deleting a fragmented image on a file system mounted with `discard` takes
# minutes (one synchronous discard per extent), and must not sit between runs.
work=$top/$build/perf/qd
trash=$top/$build/perf/qd-trash
mkdir -p "$trash"
discard() { for f in "$@"; do [ -e "$f" ] && mv "$f" "$trash/$$.$RANDOM.$(basename "$f")"; done; true; }
[ -d "$work" ] && mv "$work" "$trash/$$.work"
mkdir -p "$work/json"
trap 'discard "$work"/*.raw "$work"/*.qcow2; (nice ionice -c3 rm -rf "$trash"/* &) ' EXIT

read_size=1G
write_size=64G  # virtual; sparse. 64 KiB-aligned offsets: 1M clusters to pick from

# fio_run NAME BACKEND FILE RW DEPTH [extra job lines...]
fio_run() {
  local name=$1 backend=$2 file=$3 rw=$4 depth=$5
  shift 5
  local job=$work/json/$name.fio
  {
    echo "[global]"
    echo "thread=1"
    echo "direct=1"
    echo "norandommap=1"
    echo "randrepeat=1"
    echo "time_based=1"
    echo "runtime=$runtime"
    echo "[$name]"
    if [ "$backend" = raw ]; then
      echo "ioengine=io_uring"
    else
      echo "ioengine=external:$engine"
      echo "format=qcow2"
      echo "cache=none"
      echo "iothreads=$iothreads"
    fi
    echo "filename=$file"
    echo "rw=$rw"
    echo "bs=4k"
    echo "iodepth=$depth"
    for l in "$@"; do echo "$l"; done
  } >"$job"
  fio --output-format=json --output="$work/json/$name.json" "$job" >/dev/null
}

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
want() { case " $tests " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

if want read; then
echo "qd_scaling: preparing a $read_size image to read"
fio --name=fill --filename="$work/read.raw" --size=$read_size --rw=write --bs=1M \
    --direct=1 --ioengine=io_uring --iodepth=8 --refill_buffers=1 >/dev/null
qemu-img convert -f raw -O qcow2 -o cluster_size=64k "$work/read.raw" "$work/read.qcow2"

for d in $depths; do
  echo "qd_scaling: randread depth $d"
  fio_run "randread-raw-qd$d" raw "$work/read.raw" randread "$d"
  fio_run "randread-kvblk-qd$d" kvblk "$work/read.qcow2" randread "$d"
done
fi

if want write; then
for d in $depths; do
  echo "qd_scaling: allocating randwrite depth $d"
  discard "$work/write.raw" "$work/write.qcow2"
  truncate -s $write_size "$work/write.raw"
  fio_run "randwrite-raw-qd$d" raw "$work/write.raw" randwrite "$d" "blockalign=64k"
  qemu-img create -q -f qcow2 -o cluster_size=64k "$work/write.qcow2" $write_size
  fio_run "randwrite-kvblk-qd$d" kvblk "$work/write.qcow2" randwrite "$d" "blockalign=64k"
  # How many of the writes allocated a cluster (the rest hit one already
  # allocated by an earlier write of the run).
  qemu-img check --output=json "$work/write.qcow2" >"$work/json/randwrite-kvblk-qd$d.check" || true
done
fi

mkdir -p "$(dirname "$out")"
python3 perf/qd_scaling.py --json "$work/json" --depths "$depths" --runtime "$runtime" \
    --tests "$tests" --iothreads "$iothreads" \
    --load "$load_before / $(cut -d' ' -f1-3 /proc/loadavg)" >"$out"
echo "qd_scaling: wrote $out"
cat "$out"
