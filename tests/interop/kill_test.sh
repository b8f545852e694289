#!/bin/bash
# Process death: `kvblk serve` is killed with SIGKILL at a random moment
# while fio writes through the vhost-user engine (build/perf/fio-vhost-user.so),
# then the image is judged by qemu-img and the data that was flushed before
# the kill is read back.
#
# Usage: tests/interop/kill_test.sh BUILD_DIR
#   KVBLK_KILL_ROUNDS=N   rounds (default 3; `make stress` runs 100)
#   KVBLK_FIO_ENGINE=SO   a prebuilt fio-vhost-user.so (for an ASan build of kvblk)
#   KVBLK_KILL_SEED=N     seed of the random kill moments (default: random;
#                         printed, so a failing run can be replayed)
#
# One round, on a fresh image (cluster size 64 KiB, 4 KiB, or v2 with 64 KiB
# clusters, in turn):
#  1. kvblk serve starts; a clean fio run writes region A1 (8 MiB, crc32c
#     verify headers with a per-round seed) and region A2 (8 MiB, a byte
#     pattern OLD) and ends with a flush (end_fsync=1).
#  2. A second fio run, three jobs on three queues of one connection:
#     - "seq" rewrites A2 front to back with pattern NEW, 64 KiB at a time,
#       iodepth 1, a flush after every write: when block j was issued,
#       blocks 0..j-1 were written and flushed;
#     - "rand" writes 4-64 KiB at random in region C (iodepth 16, a flush
#       every 32 writes): allocation and L2/refcount traffic;
#     - "trim" discards 64 KiB at random in region C.
#     kvblk serve gets SIGKILL 0.3-2.3 s in (then fio, which would wait for
#     the dead back end forever).
#  3. Checks, each one a TAP line:
#     - qemu-img check reports no corruption (exit 0, or 3: leaks only);
#     - A2, read with qemu-img: every sector holds OLD or NEW, and if block
#       j holds any NEW sector, blocks 0..j-1 are NEW throughout (they were
#       flushed before block j was written);
#     - kvblk serve starts again on the killed image, fio verify_only reads
#       A1 through it and finds every block intact; after SIGTERM qemu-img
#       check still reports no corruption;
#     - kvblk check -r all repairs the leaks, after which qemu-img check
#       exits 0.
# At the end a negative control: one sector of A1 is overwritten with
# qemu-io and the same fio verify_only must now fail, so the verification
# demonstrably detects lost data.
TAP_LIB=$(cd "$(dirname "$0")/../support" && pwd)/tap.sh
set -uo pipefail

BUILD=${1:-build}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT" || exit 1
if [ ! -x "$BUILD/kvblk" ]; then
  echo "not ok - $BUILD/kvblk is not built"
  exit 1
fi
KVBLK=$(cd "$BUILD" && pwd)/kvblk
# fio and QEMU's tools come with the guest harness's packages.
tests/guest/deps.sh >/dev/null || { echo "not ok - install fio and qemu-utils"; exit 1; }
# KVBLK_FIO_ENGINE: a prebuilt engine, for sanitizer builds of kvblk (fio
# cannot load an engine built with ASan; the engine only speaks vhost-user).
if [ -n "${KVBLK_FIO_ENGINE:-}" ]; then
  ENGINE=$(cd "$(dirname "$KVBLK_FIO_ENGINE")" && pwd)/$(basename "$KVBLK_FIO_ENGINE")
else
  ENGINE=$(cd "$BUILD" && pwd)/perf/fio-vhost-user.so
  if ! make --no-print-directory -s -f perf/Makefile BUILD="$BUILD" "$BUILD/perf/fio-vhost-user.so" \
    >/dev/null; then
    echo "not ok - build $BUILD/perf/fio-vhost-user.so"
    exit 1
  fi
fi
for tool in fio qemu-img qemu-io python3 timeout setsid; do
  command -v "$tool" >/dev/null || { echo "not ok - $tool is installed"; exit 1; }
done

ROUNDS=${KVBLK_KILL_ROUNDS:-3}
SEED=${KVBLK_KILL_SEED:-$(( $(date +%s%N) % 1000000 ))}
RANDOM=$SEED
echo "# $ROUNDS rounds, KVBLK_KILL_SEED=$SEED"

T=$(mktemp -d /tmp/kvblk-kill.XXXXXX)
SERVE_PID=
FIO_PID=
cleanup() {
  for p in $SERVE_PID $FIO_PID; do kill -KILL -- "-$p" 2>/dev/null; done
  rm -rf "$T"
}
trap cleanup EXIT
export LC_ALL=C
failures=0
checks=0
. "$TAP_LIB"

MIB=$((1 << 20))
A1_OFF=0
A1_LEN=$((8 * MIB))
A2_OFF=$((8 * MIB))
A2_LEN=$((8 * MIB))
C_OFF=$((16 * MIB))
C_LEN=$((40 * MIB))
DISK=64M
BLOCK=$((64 * 1024))
SOCK=$T/vhost.sock
FIO_COMMON=(--ioengine=external:"$ENGINE" --filename="$SOCK" --thread=1)

# start_serve IMG LOG: runs kvblk serve (its own process group) and waits
# for its socket; sets SERVE_PID. Fails if the socket never appears.
start_serve() {
  rm -f "$SOCK"
  setsid "$KVBLK" serve --num-queues 3 --socket "$SOCK" "$1" >"$2" 2>&1 &
  SERVE_PID=$!
  local i
  for i in $(seq 200); do
    [ -S "$SOCK" ] && return 0
    kill -0 "$SERVE_PID" 2>/dev/null || break
    sleep 0.05
  done
  cp "$2" "$T/.evidence"
  return 1
}

# stop_serve: SIGTERM and wait (SIGKILL after 20 s); the exit status in RC.
stop_serve() {
  kill -TERM "$SERVE_PID" 2>/dev/null
  local i
  for i in $(seq 400); do
    kill -0 "$SERVE_PID" 2>/dev/null || break
    sleep 0.05
  done
  kill -KILL "$SERVE_PID" 2>/dev/null
  wait "$SERVE_PID"
  RC=$?
  SERVE_PID=
}

# The A1 job: sequential 64 KiB writes with crc32c headers seeded per round.
a1_job() {
  echo --name=a1 --rw=write --bs=64k --offset=$A1_OFF --size=$A1_LEN --iodepth=8 \
    --verify=crc32c --verify_fatal=1 --randseed="$1"
}

# qemu_check_no_corruption IMG: qemu-img check exits 0 (clean) or 3 (leaks
# only), not 2 (corruption) or anything else; the status is left in CHECK_RC.
qemu_check_no_corruption() {
  CHECK_RC=0
  qemu-img check "$1" >"$T/.evidence" 2>&1 || CHECK_RC=$?
  echo "exit status $CHECK_RC" >>"$T/.evidence"
  [ "$CHECK_RC" -eq 0 ] || [ "$CHECK_RC" -eq 3 ]
}

# check_a2 IMG OLD NEW: the prefix rule on region A2 (see the top).
check_a2() {
  qemu-img convert -f qcow2 -O raw "$1" "$T/disk.raw" >"$T/.evidence" 2>&1 || return 1
  python3 - "$T/disk.raw" "$2" "$3" "$BLOCK" "$A2_OFF" "$A2_LEN" >"$T/.evidence" 2>&1 <<'EOF'
import sys
path = sys.argv[1]
old, new, block, off, length = (int(a) for a in sys.argv[2:7])
with open(path, "rb") as f:
    f.seek(off)
    data = f.read(length)
if len(data) != length:
    sys.exit("the image is shorter than region A2")
old_sec, new_sec = bytes([old]) * 512, bytes([new]) * 512
states = []  # per block: "old", "new" or "mixed"
for b in range(len(data) // block):
    kinds = set()
    for s in range(b * block, (b + 1) * block, 512):
        sec = data[s:s + 512]
        if sec == old_sec:
            kinds.add("old")
        elif sec == new_sec:
            kinds.add("new")
        else:
            sys.exit("block %d sector %d holds neither 0x%02x nor 0x%02x (first byte 0x%02x)"
                     % (b, (s % block) // 512, old, new, sec[0]))
    states.append(kinds.pop() if len(kinds) == 1 else "mixed")
last = max((b for b, k in enumerate(states) if k != "old"), default=-1)
for b in range(last):
    if states[b] != "new":
        sys.exit("block %d is %s although block %d was written after its flush"
                 % (b, states[b], last))
print("%d of %d blocks rewritten before the kill" % (last + 1, len(states)))
EOF
}

formats=("cluster_size=65536" "cluster_size=4096" "compat=0.10,cluster_size=65536")
total_rewritten=0
for round in $(seq 1 "$ROUNDS"); do
  fmt=${formats[$(((round - 1) % ${#formats[@]}))]}
  img=$T/r$round.qcow2
  old=$(((round * 2) % 250 + 1))
  new=$((old + 1))
  seed=$((SEED + round))
  delay_ms=$((300 + RANDOM % 2000))
  tag="round $round ($fmt, kill after ${delay_ms} ms)"
  qemu-img create -q -f qcow2 -o "$fmt" "$img" $DISK

  if ! start_serve "$img" "$T/serve.log"; then
    fail "$tag: kvblk serve starts"
    continue
  fi
  # shellcheck disable=SC2046  # a1_job's words are options
  if ! timeout 120 fio "${FIO_COMMON[@]}" --num_queues=2 --end_fsync=1 \
    $(a1_job "$seed") \
    --name=a2 --rw=write --bs=64k --offset=$A2_OFF --size=$A2_LEN --iodepth=8 \
    --buffer_pattern="$old" >"$T/.evidence" 2>&1; then
    fail "$tag: phase 1 (A1 with crc32c headers, A2 with 0x$(printf %02x $old), flushed)"
    stop_serve
    continue
  fi

  # Phase 2, killed. time_based keeps it writing until the kill.
  setsid fio "${FIO_COMMON[@]}" --num_queues=3 --time_based=1 --runtime=60 \
    --name=seq --rw=write --bs=64k --offset=$A2_OFF --size=$A2_LEN --iodepth=1 \
    --fsync=1 --buffer_pattern="$new" --loops=1 \
    --name=rand --rw=randwrite --bsrange=4k-64k --offset=$C_OFF --size=$C_LEN \
    --iodepth=16 --fsync=32 --randseed="$seed" \
    --name=trim --rw=randtrim --bs=64k --offset=$C_OFF --size=$C_LEN --iodepth=2 \
    >"$T/fio2.log" 2>&1 &
  FIO_PID=$!
  sleep "$(printf '%d.%03d' $((delay_ms / 1000)) $((delay_ms % 1000)))"
  if ! kill -0 "$SERVE_PID" 2>/dev/null; then
    cp "$T/serve.log" "$T/.evidence"
    fail "$tag: kvblk serve was still running when the kill came"
  fi
  kill -KILL "$SERVE_PID" 2>/dev/null
  wait "$SERVE_PID" 2>/dev/null
  SERVE_PID=
  kill -KILL -- "-$FIO_PID" 2>/dev/null
  wait "$FIO_PID" 2>/dev/null
  FIO_PID=

  if qemu_check_no_corruption "$img"; then
    pass "$tag: qemu-img check finds no corruption after the kill (exit $CHECK_RC)"
  else
    fail "$tag: qemu-img check finds no corruption after the kill"
  fi
  if check_a2 "$img" "$old" "$new"; then
    pass "$tag: A2 holds every flushed rewrite ($(cat "$T/.evidence"))"
    total_rewritten=$((total_rewritten + $(awk '{print $1}' "$T/.evidence")))
  else
    fail "$tag: A2 holds every flushed rewrite"
  fi

  # Restart on the killed image and read A1 back through kvblk.
  if start_serve "$img" "$T/serve2.log"; then
    # shellcheck disable=SC2046
    check "$tag: restarted kvblk serve reads A1 intact (fio verify_only)" \
      timeout 120 fio "${FIO_COMMON[@]}" $(a1_job "$seed") --verify_only=1
    stop_serve
    echo "exit status $RC" >"$T/.evidence"
    cat "$T/serve2.log" >>"$T/.evidence"
    if [ "$RC" -eq 0 ] && qemu_check_no_corruption "$img"; then
      pass "$tag: the restarted server shuts down cleanly, no corruption"
    else
      fail "$tag: the restarted server shuts down cleanly, no corruption"
    fi
  else
    fail "$tag: kvblk serve starts on the killed image"
  fi
  "$KVBLK" check -r all "$img" >"$T/.evidence" 2>&1
  check "$tag: after kvblk check -r all, qemu-img check is clean" qemu-img check "$img"
  last_img=$img
  last_seed=$seed
  last_old=$old
  last_new=$new
  [ "$round" -lt "$ROUNDS" ] && rm -f "$img"
done
echo "# $total_rewritten blocks of A2 were rewritten before the kills, over $ROUNDS rounds"

# Negative control: a lost write in A1 must be noticed.
if [ -n "${last_img:-}" ] && [ -e "$last_img" ]; then
  qemu-io -f qcow2 -c "write -P 0x77 $((A1_OFF + 3 * BLOCK + 4096)) 512" "$last_img" >/dev/null
  if start_serve "$last_img" "$T/serve3.log"; then
    # shellcheck disable=SC2046
    if timeout 120 fio "${FIO_COMMON[@]}" $(a1_job "$last_seed") --verify_only=1 \
      >"$T/.evidence" 2>&1; then
      fail "the verification notices one overwritten sector of A1"
    else
      pass "the verification notices one overwritten sector of A1"
    fi
    stop_serve
  else
    fail "kvblk serve starts for the negative control"
  fi
  # Block 0 of A2 back to OLD and the last block NEW: a flushed write lost.
  n=$((A2_LEN / BLOCK))
  qemu-io -f qcow2 -c "write -P $last_old $A2_OFF $BLOCK" \
    -c "write -P $last_new $((A2_OFF + (n - 1) * BLOCK)) $BLOCK" "$last_img" >/dev/null
  if check_a2 "$last_img" "$last_old" "$last_new"; then
    fail "the A2 check notices a lost flushed rewrite"
  else
    pass "the A2 check notices a lost flushed rewrite ($(tail -1 "$T/.evidence"))"
  fi
fi

echo "# $checks checks, $failures failed"
[ "$failures" -eq 0 ]
