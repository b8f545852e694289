#!/bin/bash
# Interop tests of images with extended L2 entries (subclusters) against QEMU.
#
# Usage: tests/interop/subcluster_test.sh BUILD_DIR   (the CLI is BUILD_DIR/kvblk)
#
# Checks, for cluster sizes 16k, 64k, 512k and 2M, with and without a backing
# file:
#  (a) images made by qemu-img with extended_l2=on and written by qemu-io
#      (partial subclusters, aligned subclusters, write -z, discard) read the
#      same through `kvblk convert` as through `qemu-img convert`;
#  (b) images written by `kvblk io` (partial and aligned writes, write -z,
#      subcluster-aligned discards, a snapshot followed by writes) pass
#      `qemu-img check` clean and `qemu-img compare` equal to a raw reference
#      written by qemu-io.
# Prints TAP-like lines; exits non-zero if any check failed.
TAP_LIB=$(cd "$(dirname "$0")/../support" && pwd)/tap.sh
set -uo pipefail

. "$TAP_LIB"
tap_setup "${1:-build}" qemu-img qemu-io cmp

# qcheck DESC IMG: qemu-img check finds no errors and no leaks.
qcheck() {
  if qemu-img check "$2" >"$T/.evidence" 2>&1 && ! grep -q "leaked" "$T/.evidence"; then
    pass "$1"
  else
    fail "$1"
  fi
}

# size_of CS: the cluster size in bytes.
size_of() {
  case $1 in
    16k) echo 16384 ;;
    64k) echo 65536 ;;
    512k) echo 524288 ;;
    2M) echo 2097152 ;;
  esac
}

# make_base SIZE: base.raw of SIZE bytes with a different pattern per 4 KiB.
make_base() {
  local size=$1 cmds=() off=0 i=0
  qemu-img create -q -f raw base.raw "$size"
  while [ "$off" -lt "$size" ]; do
    cmds+=(-c "write -q -P $(((i * 37 + 1) % 255 + 1)) $off 4096")
    off=$((off + 4096 * 7))
    i=$((i + 1))
  done
  qemu-io -f raw "${cmds[@]}" base.raw >/dev/null
}

for cs in 16k 64k 512k 2M; do
  C=$(size_of "$cs")
  S=$((C / 32))
  DISK=$((8 * C))
  for backing in none raw; do
    name="cluster_size=$cs backing=$backing"
    rm -f base.raw a.qcow2 b.qcow2 ref.raw k.raw q.raw
    bopt=()
    if [ "$backing" = raw ]; then
      make_base "$DISK"
      bopt=(-b "$T/base.raw" -F raw)
    fi

    # (a) qemu writes, kvblk reads.
    qemu-img create -q -f qcow2 -o "extended_l2=on,cluster_size=$C" "${bopt[@]}" a.qcow2 "$DISK"
    qemu-io -f qcow2 \
      -c "write -q -P 0x21 $((S / 2)) 1000" \
      -c "write -q -P 0x22 $((3 * S)) $((2 * S))" \
      -c "write -q -P 0x23 $((C + 5 * S + 100)) $((3 * S))" \
      -c "write -q -P 0x24 $((C + 20 * S)) 512" \
      -c "write -q -z $((2 * C + 4 * S)) $((4 * S))" \
      -c "write -q -z $((3 * C)) $C" \
      -c "write -q -P 0x25 $((4 * C)) $C" \
      -c "discard -q $((4 * C)) $C" \
      -c "write -q -P 0x26 $((5 * C - 100)) 300" \
      -c "write -q -P 0x27 $((6 * C + 7 * S)) $((S + 512))" \
      -c "write -q -z $((6 * C + 7 * S + 1024)) $((2 * S))" \
      a.qcow2 >"$T/.evidence" 2>&1
    if "$KVBLK" convert -O raw a.qcow2 k.raw >"$T/.evidence" 2>&1 &&
      qemu-img convert -O raw a.qcow2 q.raw >>"$T/.evidence" 2>&1 &&
      cmp k.raw q.raw >>"$T/.evidence" 2>&1; then
      pass "$name: kvblk reads what qemu-io wrote like qemu-img convert"
    else
      fail "$name: kvblk reads what qemu-io wrote like qemu-img convert"
    fi
    if "$KVBLK" io -r -c "read -P 0x23 $((C + 5 * S + 100)) $((3 * S))" \
      -c "read -P 0 $((2 * C + 4 * S)) $((4 * S))" a.qcow2 >"$T/.evidence" 2>&1 &&
      ! grep -q "Pattern verification failed" "$T/.evidence"; then
      pass "$name: kvblk io reads qemu's partial writes and zeroed subclusters"
    else
      fail "$name: kvblk io reads qemu's partial writes and zeroed subclusters"
    fi

    # (b) kvblk writes, qemu judges. The raw reference gets the same data;
    # subcluster-aligned discards read back as zeros in both.
    "$KVBLK" create -q -f qcow2 -o "extended_l2=on,cluster_size=$C" "${bopt[@]}" b.qcow2 "$DISK" \
      >"$T/.evidence" 2>&1
    if [ "$backing" = raw ]; then cp base.raw ref.raw; else qemu-img create -q -f raw ref.raw "$DISK"; fi
    writes=(
      -c "write -q -P 0x31 $((S / 2)) 1000"
      -c "write -q -P 0x32 $((4 * S)) $((2 * S))"
      -c "write -q -P 0x33 $((C + 5 * S + 100)) $((3 * S))"
      -c "write -q -P 0x34 $((C + 20 * S)) 512"
      -c "write -q -z $((2 * C + 4 * S)) $((4 * S))"
      -c "write -q -z $((3 * C)) $C"
      -c "write -q -P 0x35 $((4 * C)) $C"
      -c "write -q -P 0x36 $((5 * C - 100)) 300"
      -c "write -q -P 0x37 $((6 * C + 7 * S)) $((S + 512))"
      -c "write -q -z $((6 * C + 7 * S + 1024)) $((2 * S))"
      -c "write -q -P 0x38 $((7 * C + 1000)) $((C - 2000))"
    )
    discards=(-c "discard -q $((4 * C + 2 * S)) $((3 * S))" -c "discard -q $((7 * C)) $C")
    as_zeros=(-c "write -q -z $((4 * C + 2 * S)) $((3 * S))" -c "write -q -z $((7 * C)) $C")
    "$KVBLK" io "${writes[@]}" "${discards[@]}" b.qcow2 >"$T/.evidence" 2>&1
    qemu-io -f raw "${writes[@]}" "${as_zeros[@]}" ref.raw >/dev/null 2>&1
    qcheck "$name: image written by kvblk io checks clean" b.qcow2
    if qemu-img compare -f qcow2 -F raw b.qcow2 ref.raw >"$T/.evidence" 2>&1; then
      pass "$name: image written by kvblk io matches the raw reference"
    else
      fail "$name: image written by kvblk io matches the raw reference"
    fi
    # The first write allocated subclusters 0 .. (S/2 + 999) / S only: the
    # map goes to the layer below right after them.
    first_len=$((((S / 2 + 999) / S + 1) * S))
    if [ "$backing" = raw ]; then
      below="\"start\": $first_len, \"length\": [0-9]*, \"depth\": 1,"
    else
      below="\"start\": $first_len, \"length\": $((4 * S - first_len)), \"depth\": 0, \"present\": false"
    fi
    if qemu-img map --output=json b.qcow2 >"$T/.evidence" 2>&1 &&
      grep -q "\"start\": 0, \"length\": [0-9]*, \"depth\": 0, \"present\": true" "$T/.evidence" &&
      grep -q "$below" "$T/.evidence"; then
      pass "$name: kvblk allocated single subclusters (qemu-img map)"
    else
      fail "$name: kvblk allocated single subclusters (qemu-img map)"
    fi

    # A snapshot, then writes that must copy shared clusters.
    "$KVBLK" snapshot -q -c s1 b.qcow2 >"$T/.evidence" 2>&1
    cp ref.raw ref1.raw
    more=(-c "write -q -P 0x41 $((3 * S + 10)) 20" -c "write -q -P 0x42 $((C + 30 * S)) $S"
      -c "write -q -z $((C + 5 * S)) $S")
    "$KVBLK" io "${more[@]}" b.qcow2 >"$T/.evidence" 2>&1
    qemu-io -f raw "${more[@]}" ref.raw >/dev/null 2>&1
    qcheck "$name: writes after a snapshot check clean" b.qcow2
    if qemu-img compare -f qcow2 -F raw b.qcow2 ref.raw >"$T/.evidence" 2>&1; then
      pass "$name: writes after a snapshot read back"
    else
      fail "$name: writes after a snapshot read back"
    fi
    "$KVBLK" snapshot -q -a s1 b.qcow2 >"$T/.evidence" 2>&1
    if qemu-img compare -f qcow2 -F raw b.qcow2 ref1.raw >>"$T/.evidence" 2>&1; then
      pass "$name: the snapshot kept the old subclusters"
    else
      fail "$name: the snapshot kept the old subclusters"
    fi
    rm -f ref1.raw
  done
done

# ---------------------------------------------------------------------------
echo "# $checks checks, $failures failed"
[ "$failures" -eq 0 ]
