#!/bin/bash
# Metadata overlap protection: what it costs a write. fio drives kvblk's disk
# layer in-process (BUILD/perf/fio-kvblk.so, one job, one I/O thread,
# O_DIRECT, 4 KiB random writes) with overlap_check=1 (every write checked
# against all metadata: header, active and snapshot L1/L2 tables, refcount
# table and blocks, snapshot table) and overlap_check=0, alternating, on a
# new image each time. Two cases:
#  - allocation: an image with 64 KiB clusters holding data in every L2
#    range and two internal snapshots (so the guard holds active and
#    inactive tables), then a fixed number of writes of which nearly all
#    allocate a cluster;
#  - overwrite: a fully allocated image (preallocation=metadata), writes in
#    place for a fixed time.
# Writes perf/results/overlap_io.md (median IOPS, every sample, ratio).
# Numbers come from one run on a shared machine: read the ratios.
#
# Usage: perf/overlap_io_bench.sh [--build DIR] [--repeat N] [--depth N] [--out FILE]
set -uo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top" || exit 1
build=build
repeat=3
depth=32
out=$top/perf/results/overlap_io.md
while [ $# -gt 0 ]; do
  case $1 in
    --build) build=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    --depth) depth=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "usage: $0 [--build DIR] [--repeat N] [--depth N] [--out FILE]" >&2; exit 2 ;;
  esac
done
for tool in fio qemu-img qemu-io python3; do
  command -v $tool >/dev/null || { echo "overlap_io_bench: $tool is missing (make deps)" >&2; exit 1; }
done
make --no-print-directory -f perf/Makefile BUILD="$build" perf >/dev/null || exit 1
engine=$top/$build/perf/fio-kvblk.so
work=$top/$build/perf/overlap_io
rm -rf "$work"
mkdir -p "$work"
trap 'wait; rm -rf "$work"' EXIT
# Unlinking a fragmented image on a file system mounted with `discard` can
# stall for minutes: old images are deleted in the background, off the
# measurement (see perf/bench.py).
discard_image() { mv "$1" "$1.old.$RANDOM" && { rm -f "$1".old.* & }; }

alloc_size=32G   # 512k clusters: the writes below rarely hit one twice
alloc_ios=40000
over_size=2G

make_alloc_image() {
  local img=$1 cmds=() off
  qemu-img create -q -f qcow2 -o cluster_size=64k "$img" "$alloc_size" || exit 1
  # One cluster in each 512 MiB L2 range: 64 L2 tables, then two snapshots.
  for ((off = 0; off < 32 * 1024; off += 512)); do cmds+=(-c "write -q ${off}M 64k"); done
  qemu-io -f qcow2 "${cmds[@]}" "$img" || exit 1
  qemu-img snapshot -c s1 "$img" && qemu-img snapshot -c s2 "$img" || exit 1
}

# run NAME CHECK(0|1) IMAGE RW-OPTIONS...: prints write IOPS.
run() {
  local name=$1 check=$2 img=$3
  shift 3
  fio --output-format=json --output="$work/$name.json" --name="$name" --thread=1 \
      --ioengine="external:$engine" --format=qcow2 --cache=none --direct=1 \
      --overlap_check="$check" --filename="$img" --rw=randwrite --bs=4k --iodepth="$depth" \
      --norandommap=1 --randrepeat=1 "$@" >/dev/null || exit 1
  python3 -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["jobs"][0]["write"]["iops"]))' \
    "$work/$name.json"
}

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
declare -A samples
for ((r = 1; r <= repeat; r++)); do
  for check in 1 0; do
    echo "overlap_io_bench: allocation, overlap_check=$check (run $r/$repeat)"
    img=$work/alloc-$check.qcow2
    make_alloc_image "$img"
    samples[alloc-$check]="${samples[alloc-$check]:-} $(run alloc "$check" "$img" --number_ios=$alloc_ios)"
    discard_image "$img"
    echo "overlap_io_bench: overwrite, overlap_check=$check (run $r/$repeat)"
    img=$work/over-$check.qcow2
    qemu-img create -q -f qcow2 -o cluster_size=64k,preallocation=metadata "$img" "$over_size" || exit 1
    samples[over-$check]="${samples[over-$check]:-} $(run over "$check" "$img" --time_based=1 --runtime=8)"
    discard_image "$img"
  done
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
median() { python3 -c 'import statistics,sys; print(int(statistics.median(map(int, sys.argv[1:]))))' $1; }

{
  echo "# Overlap protection: cost per write"
  echo
  echo "perf/overlap_io_bench.sh, $(date -u +%Y-%m-%d), one run ($repeat samples per case, on and off"
  echo "alternating). fio with kvblk's in-process engine (fio-kvblk.so, one I/O thread,"
  echo "iodepth=$depth, O_DIRECT), 4 KiB random writes, 64 KiB clusters."
  echo "- allocation: a $alloc_size image with a cluster in each L2 range (64 L2 tables) and two"
  echo "  internal snapshots, then $alloc_ios writes, nearly all the first to their cluster (each"
  echo "  first write to an L2 range also copies the table the snapshots share);"
  echo "- overwrite: a $over_size image with preallocation=metadata, in-place writes for 8 s."
  echo "Load average (1/5/15 min) before: $load_before, after: $load_after; the machine"
  echo "is shared (2 cores): read the ratios."
  echo
  echo "| case | overlap_check | IOPS (median) | IOPS samples |"
  echo "|---|---|---:|---|"
  for c in alloc over; do
    for check in 1 0; do
      label=$([ "$check" = 1 ] && echo "on (all metadata)" || echo off)
      echo "| $([ $c = alloc ] && echo allocation || echo overwrite) | $label | $(median "${samples[$c-$check]}") |${samples[$c-$check]} |"
    done
  done
  echo
  for c in alloc over; do
    on=$(median "${samples[$c-1]}")
    off=$(median "${samples[$c-0]}")
    python3 -c "print(f'- $([ $c = alloc ] && echo allocation || echo overwrite): on/off IOPS = {$on / max(1, $off):.3f}')"
  done
  echo
  echo "The guard's memory and the cost of one check alone, for a 1 TiB image, are in"
  echo "perf/results/overlap_guard.md (perf/overlap_guard_bench.sh)."
} >"$out"
cat "$out"
