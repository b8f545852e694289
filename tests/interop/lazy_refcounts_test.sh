#!/bin/bash
# Lazy refcounts (qcow2 compatible bit 0) against QEMU's tools (issue 6):
#  - kvblk writes a lazy_refcounts=on image and closes it: not dirty,
#    `qemu-img check` clean, data as written;
#  - `kvblk serve` killed with SIGKILL while fio allocates: the image is left
#    dirty; the next writable open by kvblk rebuilds the refcounts, after
#    which `qemu-img check` is clean, the dirty bit is gone and the data
#    flushed before the kill is intact;
#  - an image left dirty by qemu-io (its `abort` command) is repaired the
#    same way when kvblk opens it for writing;
#  - a read-only open of a dirty image reads it and leaves it as it was.
#
# Usage: tests/interop/lazy_refcounts_test.sh BUILD_DIR
TAP_LIB=$(cd "$(dirname "$0")/../support" && pwd)/tap.sh
TOP=$(cd "$(dirname "$0")/../.." && pwd)
set -uo pipefail

. "$TAP_LIB"
tap_setup "${1:-build}" qemu-img qemu-io fio timeout setsid
tap_engine "${1:-build}"

# is_dirty IMG [qemu-img info options]: the image's dirty bit is set.
is_dirty() { qemu-img info "${@:2}" "$1" 2>/dev/null | grep -q 'cleanly shut down: no'; }

# 1. A clean close.
qemu-img create -q -f qcow2 -o lazy_refcounts=on clean.qcow2 64M
check "kvblk io writes a lazy-refcount image" \
  "$KVBLK" io -c 'write -P 0x21 0 1M' -c 'write -P 0x22 5M 64k' -c flush -c 'write -P 0x23 9M 4k' clean.qcow2
if is_dirty clean.qcow2; then
  qemu-img info clean.qcow2 >"$T/.evidence" 2>&1
  fail "a clean close leaves the image not dirty"
else
  pass "a clean close leaves the image not dirty"
fi
check "qemu-img check is clean after a clean close" qemu-img check clean.qcow2
check "qemu-io reads the data back" qemu-io -f qcow2 -c 'read -P 0x21 0 1M' \
  -c 'read -P 0x22 5M 64k' -c 'read -P 0x23 9M 4k' clean.qcow2

# 2. kvblk serve killed while fio allocates.
qemu-img create -q -f qcow2 -o lazy_refcounts=on killed.qcow2 256M
qemu-io -f qcow2 -c 'write -P 0x5a 0 4M' killed.qcow2 >/dev/null
setsid "$KVBLK" serve --socket "$T/v.sock" killed.qcow2 >"$T/serve.log" 2>&1 &
SERVE=$!
PIDS+=("$SERVE")
if wait_for 20 test -S "$T/v.sock"; then
  setsid timeout 60 fio --name=alloc --ioengine=external:"$ENGINE" --filename="$T/v.sock" \
    --thread=1 --rw=randwrite --bs=4k --iodepth=16 --offset=8M --size=200M --fsync=64 \
    --time_based --runtime=30 >"$T/fio.log" 2>&1 &
  FIO=$!
  PIDS+=("$FIO")
  # The kill comes once the image is marked dirty (at the first L2 table
  # write-back, i.e. fio's first fsync), read while serve holds it (-U).
  if wait_for 60 is_dirty killed.qcow2 -U; then
    pass "the image is marked dirty while serve allocates"
  else
    tail -3 "$T/fio.log" >"$T/.evidence"
    fail "the image is marked dirty while serve allocates"
  fi
  sleep 0.$((RANDOM % 10))
  kill -KILL "$SERVE"
  wait "$SERVE" 2>/dev/null
  kill -KILL -- "-$FIO" 2>/dev/null
  wait "$FIO" 2>/dev/null
  qemu-img info killed.qcow2 >"$T/.evidence" 2>&1
  if is_dirty killed.qcow2; then
    pass "a killed serve leaves the lazy-refcount image dirty"
  else
    fail "a killed serve leaves the lazy-refcount image dirty"
  fi
  qemu-img check killed.qcow2 >"$T/before.txt" 2>&1
  echo "# qemu-img check of the dirty image: exit $? ($(grep -c ERROR "$T/before.txt") refcount errors)"
  check "a read-only open of the dirty image reads the old data" \
    "$KVBLK" io -r -c 'read -P 0x5a 0 4M' killed.qcow2
  if is_dirty killed.qcow2; then
    pass "a read-only open leaves the image dirty (nothing written)"
  else
    fail "a read-only open leaves the image dirty (nothing written)"
  fi
  check "a writable open repairs it and writes" \
    "$KVBLK" io -c 'read -P 0x5a 0 4M' -c 'write -P 0x66 4M 64k' killed.qcow2
  if is_dirty killed.qcow2; then
    qemu-img info killed.qcow2 >"$T/.evidence" 2>&1
    fail "after the repair the image is no longer dirty"
  else
    pass "after the repair the image is no longer dirty"
  fi
  check "qemu-img check is clean after kvblk's repair on open" qemu-img check killed.qcow2
  check "the data written before the kill and after the repair reads back" \
    qemu-io -f qcow2 -c 'read -P 0x5a 0 4M' -c 'read -P 0x66 4M 64k' killed.qcow2
else
  cp "$T/serve.log" "$T/.evidence"
  fail "kvblk serve starts on the lazy-refcount image"
fi

# 3. Left dirty by qemu-io.
qemu-img create -q -f qcow2 -o lazy_refcounts=on qemu.qcow2 64M
# (in a subshell: its SIGABRT is expected, the shell's notice of it is not)
(qemu-io -f qcow2 -c 'write -P 0x31 0 3M' -c 'write -P 0x32 10M 128k' -c abort qemu.qcow2 \
  >/dev/null 2>&1) 2>/dev/null
qemu-img info qemu.qcow2 >"$T/.evidence" 2>&1
if is_dirty qemu.qcow2; then
  pass "qemu-io abort leaves a dirty lazy-refcount image"
else
  fail "qemu-io abort leaves a dirty lazy-refcount image"
fi
qemu-img check qemu.qcow2 >"$T/.evidence" 2>&1
rc=$?
if [ "$rc" -ne 0 ] && grep -q 'refcount=0 reference=1' "$T/.evidence"; then
  pass "qemu-img check sees the refcounts behind (exit $rc): the repair has work to do"
else
  fail "qemu-img check sees the refcounts behind (exit $rc): the repair has work to do"
fi
check "kvblk opens it writable (repairing) and writes" \
  "$KVBLK" io -c 'write -P 0x33 20M 64k' qemu.qcow2
check "qemu-img check is clean after kvblk repaired qemu's dirty image" qemu-img check qemu.qcow2
check "qemu-io reads everything back" qemu-io -f qcow2 -c 'read -P 0x31 0 3M' \
  -c 'read -P 0x32 10M 128k' -c 'read -P 0x33 20M 64k' qemu.qcow2
if is_dirty qemu.qcow2; then fail "the repaired image is not dirty"; else pass "the repaired image is not dirty"; fi

echo "# $checks checks, $failures failed"
[ "$failures" -eq 0 ]
