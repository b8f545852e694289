#!/bin/bash
# Builds kvblk and the fio engines, then runs the benchmark matrix side by
# side: fio io_uring on a raw file, kvblk's disk layer in fio, and
# qemu-storage-daemon (and `kvblk serve`, when it exists) behind
# vhost-user-blk. Writes perf/results/<date>.json, perf/results/latest.md
# and a PNG chart. See docs/bench.md.
#
# Usage: perf/bench.sh [--build DIR] [--quick] [--runtime S] [--jobs REGEX]
#                      [--backends raw,kvblk-raw,kvblk,qemu,serve] [--serve-cmd TEMPLATE]
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
build=build
args=()
while [ $# -gt 0 ]; do
  case $1 in
    --build) build=$2; args+=("$1" "$2"); shift 2 ;;
    --build=*) build=${1#--build=}; args+=("$1"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done

# Tools: fio (+ its source, fetched by the perf Makefile), qemu-img,
# qemu-storage-daemon, gnuplot, GNU time.
missing=()
command -v fio >/dev/null || missing+=(fio)
command -v qemu-img >/dev/null || missing+=(qemu-utils)
command -v qemu-storage-daemon >/dev/null || missing+=(qemu-system-common)
command -v gnuplot >/dev/null || missing+=(gnuplot-nox)
[ -x /usr/bin/time ] || missing+=(time)
command -v dpkg-source >/dev/null || missing+=(dpkg-dev)
command -v python3 >/dev/null || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench: installing ${missing[*]}"
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_=sudo
  $sudo_ apt-get update -q -o DPkg::Lock::Timeout=600 >/dev/null
  $sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null
fi

# One compile job at a time: the machines have two cores.
make --no-print-directory BUILD="$build" all
make --no-print-directory -f perf/Makefile BUILD="$build" perf

exec python3 perf/bench.py "${args[@]}"
