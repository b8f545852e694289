#!/bin/bash
# End-to-end live snapshot test through `kvblk serve` (issue 5): while a
# vhost-user-blk client keeps 32 stamped 4 KiB writes in flight, ten
# snapshots are taken and the disk is grown twice through the control
# socket. Then, with the server stopped: `qemu-img check` is clean, qemu-img
# lists the ten snapshots, and each snapshot (read back with qemu-img
# convert -l) holds exactly the writes that completed before it was
# requested, possibly some that were in flight meanwhile, and none that were
# published after its reply; each has the disk size of its moment.
#
# Usage: tests/interop/live_snapshot_test.sh BUILD_DIR
#   (needs BUILD_DIR/kvblk and BUILD_DIR/tests/live_client, see the Makefile)
# Environment: KVBLK_LIVE_SEED (random by default; printed),
#   KVBLK_SERVE_ARGS (extra serve options, e.g. "--iothreads 2").
TAP_LIB=$(cd "$(dirname "$0")/../support" && pwd)/tap.sh
set -uo pipefail

. "$TAP_LIB"
tap_setup "${1:-build}" qemu-img timeout
CLIENT=$(dirname "$KVBLK")/tests/live_client
if [ ! -x "$CLIENT" ]; then
  echo "not ok - $CLIENT is not built (make ${1:-build}/tests/live_client)"
  exit 1
fi
SEED=${KVBLK_LIVE_SEED:-$((RANDOM * 32768 + RANDOM))}
echo "# seed $SEED (KVBLK_LIVE_SEED to repeat)"


IMG=$T/disk.qcow2
qemu-img create -q -f qcow2 -o cluster_size=64k "$IMG" 64M
# Some data from before the server started, so that snapshots share clusters
# the client then overwrites (copy on write under load).
# (zeros written as data: allocated clusters that read as "never written")
if ! qemu-io -f qcow2 -c 'write -P 0 0 32M' "$IMG" >"$T/.evidence" 2>&1; then
  fail "qemu-io writes the first 32 MiB"
fi

# shellcheck disable=SC2086
setsid "$KVBLK" serve --socket "$T/vhost.sock" --control "$T/ctl.sock" ${KVBLK_SERVE_ARGS:-} \
  "$IMG" >"$T/serve.log" 2>&1 &
SERVE=$!
PIDS+=("$SERVE")
if ! wait_for 20 test -S "$T/vhost.sock" || ! wait_for 5 test -S "$T/ctl.sock"; then
  cp "$T/serve.log" "$T/.evidence"
  fail "serve listens on the vhost-user and control sockets"
  exit 1
fi

timeout 300 "$CLIENT" run "$T/vhost.sock" "$T/ctl.sock" "$T/live.log" --snapshots 10 --grows 2 \
  --grow-bytes $((32 << 20)) --depth 32 --seed "$SEED" >"$T/.evidence" 2>&1
rc=$?
cat "$T/.evidence" | sed 's/^/# /'
if [ "$rc" -eq 0 ]; then
  pass "32 writes in flight through serve during 10 snapshots and 2 grows, no request failed"
else
  echo "exit status $rc" >>"$T/.evidence"
  fail "32 writes in flight through serve during 10 snapshots and 2 grows, no request failed"
fi

kill -TERM "$SERVE"
if wait_for 60 sh -c "! kill -0 $SERVE"; then
  wait "$SERVE"
  src=$?
else
  src=timeout
fi
cp "$T/serve.log" "$T/.evidence"
if [ "$src" = 0 ]; then pass "serve exits 0 on SIGTERM"; else fail "serve exits 0 on SIGTERM ($src)"; fi

check "qemu-img check is clean (no errors, no leaks)" qemu-img check "$IMG"

qemu-img snapshot -l "$IMG" >"$T/.evidence" 2>&1
n=$(grep -cE '^[0-9]+ +s[0-9]+ ' "$T/.evidence")
if [ "$n" -eq 10 ] && grep -qE '^10 +s10 ' "$T/.evidence"; then
  pass "qemu-img snapshot -l lists the ten snapshots"
else
  fail "qemu-img snapshot -l lists the ten snapshots"
fi

# Each snapshot is read back by QEMU: applied to a copy of the image with
# `qemu-img snapshot -a` (which also restores the snapshot's disk size; a
# plain `convert -l` would read it at today's size) and converted to raw.
mkdir -p "$T/raw"
: >"$T/.evidence"
ok=1
for i in $(seq 10); do
  cp --sparse=always "$IMG" "$T/copy.qcow2" &&
    qemu-img snapshot -a "s$i" "$T/copy.qcow2" >>"$T/.evidence" 2>&1 &&
    qemu-img convert -O raw "$T/copy.qcow2" "$T/raw/s$i.raw" >>"$T/.evidence" 2>&1 || ok=0
done
qemu-img convert -O raw "$IMG" "$T/raw/active.raw" >>"$T/.evidence" 2>&1 || ok=0
if [ "$ok" = 1 ]; then
  pass "qemu-img applies every snapshot (to a copy) and converts it, and the active image"
else
  fail "qemu-img applies every snapshot (to a copy) and converts it, and the active image"
fi

"$CLIENT" verify "$T/live.log" "$T/raw" >"$T/.evidence" 2>&1
vrc=$?
sed 's/^/# /' "$T/.evidence"
if [ "$vrc" -eq 0 ]; then
  pass "each snapshot holds exactly the writes completed before it was requested, none published after it completed"
else
  fail "each snapshot holds exactly the writes completed before it was requested, none published after it completed"
fi

echo "# $checks checks, $failures failed"
[ "$failures" -eq 0 ]
