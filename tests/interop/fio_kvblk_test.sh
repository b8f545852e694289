#!/bin/bash
# The disk-layer fio engine (build/perf/fio-kvblk.so), the one `make bench`
# measures, must return the right data: fio jobs with crc32c verification
# on qcow2 images, buffered and O_DIRECT, on one and on two I/O threads, and
# a re-read of an image qemu-img wrote. qemu-img check judges the images.
# Arg: build dir. Prints ok/not ok lines; exits non-zero on failure.
set -uo pipefail
build=${1:-build}
cd "$(dirname "$0")/../.."
tests/guest/deps.sh >/dev/null || { echo "not ok - install fio and qemu-img"; exit 1; }
engine=$build/perf/fio-kvblk.so
# A sanitizer build of kvblk (make asan, make tsan) gets an engine built with
# the same sanitizer, so that the disk layer runs checked inside fio; fio
# itself is not built with it, so the sanitizer's runtime is preloaded.
# (grep reads all of nm's output: with -q, nm's SIGPIPE would fail the
# pipeline under pipefail.)
sanitize=
san_symbols=$(nm -A "$build/libkvblk.a" 2>/dev/null | grep -E -o ' U __(asan|tsan)_' | sort -u)
case $san_symbols in
  *__asan_*) sanitize=address,undefined ;;
  *__tsan_*) sanitize=thread ;;
esac
if ! make --no-print-directory -s -f perf/Makefile BUILD="$build" ${sanitize:+SANITIZE=$sanitize} \
       "$engine" >/dev/null; then
  echo "not ok - build $engine"
  exit 1
fi
preload=
if [ -n "$sanitize" ]; then
  preload=$(ldd "$engine" | awk '/lib(asan|ubsan|tsan)\.so/ {printf "%s ", $3}')
  [ -n "$preload" ] || { echo "not ok - find the $sanitize runtime of $engine"; exit 1; }
  echo "# $sanitize build: fio runs with LD_PRELOAD=$preload"
fi
tmp=$(mktemp -d /tmp/kvblk-fio-kvblk.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
if [ "$sanitize" = thread ]; then
  # fio's own threads share its option and semaphore memory, ordered by
  # sleeps TSAN cannot see (its status thread's get_all_io_list against
  # options_free and fio_sem_remove at exit): fio's races, not kvblk's.
  { cat tests/tsan.supp; printf 'race:options_free\nrace:fio_sem_remove\nrace:get_all_io_list\n'; } \
    >"$tmp/tsan.supp"
  export TSAN_OPTIONS="${TSAN_OPTIONS:-} suppressions=$tmp/tsan.supp"
fi
failures=0
ok() { echo "ok - $*"; }
not_ok() { echo "not ok - $*"; failures=$((failures + 1)); }

# The lines of a fio log that say what went wrong.
why() { grep -m3 -E 'verify: bad|fio-kvblk:|fio: |err=|Sanitizer|runtime error' "$1" | tr '\n' ' '; }

# fio with the engine loadable: "${fio_kvblk[@]}" ARGS... (the sanitizer's
# runtime first, if any; fio's own allocations are not kvblk's to answer
# for: no leak report).
fio_kvblk=(env ASAN_OPTIONS=detect_leaks=0)
[ -n "$preload" ] && fio_kvblk+=(LD_PRELOAD="$preload")
fio_kvblk+=(fio)

# fio_job WHAT IMAGE ARGS...: runs fio on IMAGE through the engine; ok when
# fio exits 0 and reports no error.
fio_job() {
  local what=$1 image=$2
  shift 2
  if timeout 300 "${fio_kvblk[@]}" --name=t --ioengine=external:"$engine" --filename="$image" \
       --thread --bs=4k --size=32M "$@" >"$tmp/fio.log" 2>&1 &&
     grep -q 'err= 0' "$tmp/fio.log" && ! grep -q 'verify: bad' "$tmp/fio.log"; then
    ok "$what"
  else
    not_ok "$what: $(why "$tmp/fio.log")"
  fi
}

check_image() {
  if qemu-img check -q "$1" >"$tmp/check.log" 2>&1; then
    ok "qemu-img check $(basename "$1")"
  else
    not_ok "qemu-img check $(basename "$1"): $(tail -3 "$tmp/check.log")"
  fi
}

for iothreads in 1 2; do
  for direct in 0 1; do
    img=$tmp/rw-$iothreads-$direct.qcow2
    qemu-img create -q -f qcow2 "$img" 64M
    fio_job "randrw QD32 crc32c verify, iothreads=$iothreads direct=$direct" "$img" \
      --rw=randrw --iodepth=32 --direct=$direct --iothreads=$iothreads \
      --verify=crc32c --do_verify=1
    # Write the whole range, then verify it with random reads at QD32 in a
    # second run: the reads of allocated clusters with cached tables take
    # the read fast path.
    fio_job "write 32M with crc32c headers, direct=$direct" "$img" \
      --rw=write --iodepth=8 --direct=$direct --verify=crc32c --do_verify=0
    fio_job "verify-only randread QD32, iothreads=$iothreads direct=$direct" "$img" \
      --rw=write --iodepth=32 --direct=$direct --iothreads=$iothreads \
      --verify=crc32c --verify_only=1
    check_image "$img"
  done
done

# An image qemu-img wrote reads back right: fio (its own io_uring engine)
# writes a raw file in random order with crc32c headers, qemu-img convert
# makes it a qcow2 image, and the engine re-reads it in the same order at
# QD32 (direct=1) and checks every block.
raw=$tmp/src.raw
img=$tmp/converted.qcow2
common=(--name=t --thread --bs=4k --size=32M --rw=randwrite --verify=crc32c)
if timeout 120 fio "${common[@]}" --ioengine=io_uring --filename="$raw" --iodepth=8 \
     --do_verify=0 >"$tmp/raw.log" 2>&1 &&
   qemu-img convert -f raw -O qcow2 "$raw" "$img" >"$tmp/convert.log" 2>&1; then
  if timeout 120 "${fio_kvblk[@]}" "${common[@]}" --ioengine=external:"$engine" --filename="$img" \
       --iodepth=32 --direct=1 --verify_only=1 >"$tmp/fio.log" 2>&1 &&
     grep -q 'err= 0' "$tmp/fio.log" && ! grep -q 'verify: bad' "$tmp/fio.log"; then
    ok "QD32 random re-read of a qcow2 image made by qemu-img convert, direct=1"
  else
    not_ok "QD32 random re-read of a qemu-img converted image: $(why "$tmp/fio.log")"
  fi
else
  not_ok "fio raw write and qemu-img convert: $(tail -3 "$tmp/raw.log" "$tmp/convert.log")"
fi

[ "$failures" -eq 0 ]
