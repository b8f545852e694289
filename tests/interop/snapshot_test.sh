#!/bin/bash
# Interop tests of `kvblk snapshot` and `kvblk resize` against qemu-img.
#
# Usage: tests/interop/snapshot_test.sh BUILD_DIR   (the CLI is BUILD_DIR/kvblk)
#
# Checks: listings byte-identical to `qemu-img snapshot -l` and `qemu-img
# info` (text and JSON), snapshots made by either tool applied and deleted by
# the other with the data verified by qemu-io, `qemu-img check` clean (no
# leaks) after every change, resize output, error messages and exit codes,
# --help. Prints TAP-like lines; exits non-zero if any check failed.
TAP_LIB=$(cd "$(dirname "$0")/../support" && pwd)/tap.sh
set -uo pipefail

. "$TAP_LIB"
tap_setup "${1:-build}" qemu-img qemu-io python3 md5sum

q() { "$@" >>"$T/.evidence" 2>&1; }

# qcheck DESC IMG: qemu-img check finds no errors and no leaks.
qcheck() {
  if qemu-img check "$2" >"$T/.evidence" 2>&1 && ! grep -q "leaked" "$T/.evidence"; then
    pass "$1"
  else
    fail "$1"
  fi
}

# same_output DESC FILE_A FILE_B: the two files are byte-identical.
same_output() {
  if diff "$2" "$3" >"$T/.evidence" 2>&1; then pass "$1"; else fail "$1"; fi
}

# rejects DESC FILE MESSAGE CMD...: the kvblk command exits 1, prints exactly
# the one line MESSAGE on stderr, nothing on stdout, and FILE is unchanged.
rejects() {
  local desc=$1 file=$2 want=$3 before="" after=""
  shift 3
  [ -f "$file" ] && before=$(md5sum <"$file")
  "$@" >"$T/.out" 2>"$T/.err"
  local rc=$?
  [ -f "$file" ] && after=$(md5sum <"$file")
  {
    echo "exit status $rc; stdout:"
    cat "$T/.out"
    echo "stderr:"
    cat "$T/.err"
    echo "wanted stderr: $want"
  } >"$T/.evidence"
  if [ "$rc" -eq 1 ] && [ "$(cat "$T/.err")" = "$want" ] && [ ! -s "$T/.out" ] &&
    [ "$before" = "$after" ]; then
    pass "$desc"
  else
    fail "$desc"
  fi
}

# reads DESC IMG PATTERN OFFSET LEN: qemu-io reads PATTERN at OFFSET..+LEN.
reads() {
  if qemu-io -f qcow2 -c "read -P $3 $4 $5" "$2" >"$T/.evidence" 2>&1 &&
    ! grep -q "Pattern verification failed" "$T/.evidence"; then
    pass "$1"
  else
    fail "$1"
  fi
}

# ---------------------------------------------------------------------------
echo "# help"

for cmd in snapshot resize; do
  "$KVBLK" $cmd --help >"$T/.out" 2>&1
  rc=$?
  cp "$T/.out" "$T/.evidence"
  if [ $rc -eq 0 ] && grep -q "^usage: kvblk $cmd" "$T/.out"; then
    pass "$cmd --help prints its usage and exits 0"
  else
    fail "$cmd --help prints its usage and exits 0"
  fi
  "$KVBLK" help $cmd >"$T/.out2" 2>&1
  same_output "'kvblk help $cmd' equals '$cmd --help'" "$T/.out" "$T/.out2"
done
"$KVBLK" --help >"$T/.out" 2>&1
cp "$T/.out" "$T/.evidence"
if grep -q "^  snapshot " "$T/.out" && grep -q "^  resize " "$T/.out"; then
  pass "kvblk --help lists snapshot and resize"
else
  fail "kvblk --help lists snapshot and resize"
fi

# ---------------------------------------------------------------------------
echo "# snapshots made by kvblk"

q qemu-img create -f qcow2 k.qcow2 4M
q qemu-io -c 'write -P 0x11 0 256k' k.qcow2
"$KVBLK" snapshot -c first k.qcow2 >"$T/.out" 2>&1
rc=$?
cp "$T/.out" "$T/.evidence"
if [ $rc -eq 0 ] && [ ! -s "$T/.out" ]; then pass "snapshot -c succeeds silently"; else
  fail "snapshot -c succeeds silently"
fi
qcheck "image is clean after snapshot -c" k.qcow2
q qemu-io -c 'write -P 0x22 64k 128k' k.qcow2
"$KVBLK" snapshot -c second k.qcow2 2>"$T/.evidence"
q qemu-io -c 'write -P 0x33 0 64k' k.qcow2
"$KVBLK" snapshot -l k.qcow2 >"$T/.k" 2>&1
qemu-img snapshot -l k.qcow2 >"$T/.q" 2>&1
same_output "snapshot -l equals qemu-img snapshot -l" "$T/.k" "$T/.q"
"$KVBLK" snapshot k.qcow2 >"$T/.k2" 2>&1
same_output "snapshot without an action lists" "$T/.k" "$T/.k2"
"$KVBLK" info k.qcow2 >"$T/.k" 2>&1
qemu-img info k.qcow2 >"$T/.q" 2>&1
same_output "info text with snapshots equals qemu-img info" "$T/.k" "$T/.q"
"$KVBLK" info --output=json k.qcow2 >"$T/.k" 2>&1
qemu-img info --output=json k.qcow2 >"$T/.q" 2>&1
same_output "info JSON with snapshots equals qemu-img info" "$T/.k" "$T/.q"

qemu-img convert -l snapshot.id=1 -O raw k.qcow2 s1.raw 2>"$T/.evidence"
qemu-io -f raw -c 'read -P 0x11 0 256k' -c 'read -P 0 256k 3840k' s1.raw >"$T/.evidence" 2>&1
if ! grep -q "verification failed" "$T/.evidence"; then pass "qemu-img reads kvblk's snapshot 1"; else
  fail "qemu-img reads kvblk's snapshot 1"
fi
q qemu-img snapshot -a first k.qcow2
reads "qemu-img applies kvblk's snapshot" k.qcow2 0x11 0 256k
qcheck "image is clean after qemu-img applied it" k.qcow2
q qemu-img snapshot -d first k.qcow2
qcheck "image is clean after qemu-img deleted kvblk's snapshot" k.qcow2
"$KVBLK" snapshot -a second k.qcow2 2>"$T/.evidence"
reads "kvblk applies its snapshot by name (head)" k.qcow2 0x11 0 64k
reads "kvblk applies its snapshot by name (middle)" k.qcow2 0x22 64k 128k
qcheck "image is clean after snapshot -a" k.qcow2
"$KVBLK" snapshot -d second k.qcow2 2>"$T/.evidence"
qcheck "image is clean after snapshot -d" k.qcow2
"$KVBLK" snapshot -l k.qcow2 >"$T/.k" 2>&1
if [ ! -s "$T/.k" ]; then pass "snapshot -l prints nothing once none is left"; else
  cp "$T/.k" "$T/.evidence"
  fail "snapshot -l prints nothing once none is left"
fi

# ---------------------------------------------------------------------------
echo "# snapshots made by qemu-img"

q qemu-img create -f qcow2 -o cluster_size=4096,refcount_bits=64 qm.qcow2 2M
q qemu-io -c 'write -P 0x41 0 1M' qm.qcow2
q qemu-img snapshot -c qa qm.qcow2
q qemu-io -c 'write -P 0x42 512k 1M' qm.qcow2
q qemu-img snapshot -c qb qm.qcow2
q qemu-img snapshot -c 1 qm.qcow2
"$KVBLK" snapshot -l qm.qcow2 >"$T/.k" 2>&1
qemu-img snapshot -l qm.qcow2 >"$T/.q" 2>&1
same_output "snapshot -l of qemu's snapshots equals qemu-img's" "$T/.k" "$T/.q"
"$KVBLK" snapshot -a 1 qm.qcow2 2>"$T/.evidence"
reads "snapshot -a takes an ID before a name (as qemu-img)" qm.qcow2 0x41 0 1M
qcheck "image is clean after kvblk applied qemu's snapshot" qm.qcow2
"$KVBLK" snapshot -d qb qm.qcow2 2>"$T/.evidence"
qcheck "image is clean after kvblk deleted qemu's snapshot" qm.qcow2
"$KVBLK" snapshot -c kc qm.qcow2 2>"$T/.evidence"
qemu-img snapshot -l qm.qcow2 >"$T/.q" 2>&1
cp "$T/.q" "$T/.evidence"
if grep -q "^4 *kc " "$T/.q"; then pass "a new snapshot gets the largest ID + 1"; else
  fail "a new snapshot gets the largest ID + 1"
fi
qcheck "image is clean after the new snapshot" qm.qcow2

# ---------------------------------------------------------------------------
echo "# snapshot errors"

rejects "a duplicate name is refused" qm.qcow2 \
  "kvblk snapshot: Could not create snapshot 'kc': $T/qm.qcow2: a snapshot named 'kc' already exists (ID 4)" \
  "$KVBLK" snapshot -c kc "$T/qm.qcow2"
rejects "deleting an unknown name fails like qemu-img" qm.qcow2 \
  "kvblk snapshot: Could not delete snapshot 'nope': snapshot not found" \
  "$KVBLK" snapshot -d nope qm.qcow2
rejects "-d takes names only (as qemu-img)" qm.qcow2 \
  "kvblk snapshot: Could not delete snapshot '4': snapshot not found" \
  "$KVBLK" snapshot -d 4 qm.qcow2
rejects "applying an unknown snapshot fails" qm.qcow2 \
  "kvblk snapshot: Could not apply snapshot 'nope': qm.qcow2: no snapshot with ID or name 'nope'" \
  "$KVBLK" snapshot -a nope qm.qcow2
rejects "two actions are refused" qm.qcow2 \
  "kvblk snapshot: Cannot mix '-l', '-a', '-c', '-d'" \
  "$KVBLK" snapshot -l -c x qm.qcow2
rejects "a missing file name is refused" /dev/null \
  "kvblk snapshot: Expecting one image file name" "$KVBLK" snapshot -l
q truncate -s 1M r.raw
rejects "raw images have no snapshots" r.raw \
  "kvblk snapshot: Could not create snapshot 'x': r.raw: raw images have no internal snapshots (only qcow2 has them)" \
  "$KVBLK" snapshot -c x r.raw
q qemu-img create -f qcow2 -o refcount_bits=1 rc1.qcow2 1M
q qemu-io -c 'write 0 64k' rc1.qcow2
"$KVBLK" snapshot -c s rc1.qcow2 >"$T/.out" 2>"$T/.err"
rc=$?
cp "$T/.err" "$T/.evidence"
if [ $rc -eq 1 ] && grep -q "would exceed 1, the largest value of refcount_bits=1" "$T/.err"; then
  pass "refcount_bits=1 refuses a snapshot of allocated data"
else
  fail "refcount_bits=1 refuses a snapshot of allocated data"
fi
qcheck "the refused snapshot leaks nothing" rc1.qcow2

# ---------------------------------------------------------------------------
echo "# resize"

q qemu-img create -f qcow2 -o cluster_size=512 g.qcow2 1M
q qemu-io -c 'write -P 0x5a 0 1M' g.qcow2
"$KVBLK" resize g.qcow2 64M >"$T/.out" 2>&1
cp "$T/.out" "$T/.evidence"
if [ "$(cat "$T/.out")" = "Image resized." ]; then pass "resize prints 'Image resized.'"; else
  fail "resize prints 'Image resized.'"
fi
qemu-img info --output=json g.qcow2 >"$T/.q"
if grep -q '"virtual-size": 67108864' "$T/.q"; then pass "resize grows to 64 MiB (L1 grows)"; else
  cp "$T/.q" "$T/.evidence"
  fail "resize grows to 64 MiB (L1 grows)"
fi
reads "data survives the L1 growth" g.qcow2 0x5a 0 1M
reads "the new area reads as zeros" g.qcow2 0 1M 63M
qcheck "image is clean after growth" g.qcow2
"$KVBLK" resize -q g.qcow2 +1M >"$T/.out" 2>&1
if [ ! -s "$T/.out" ]; then pass "resize -q is quiet"; else fail "resize -q is quiet"; fi
rejects "shrinking needs --shrink" g.qcow2 \
  "kvblk resize: Use the --shrink option to perform a shrink operation (shrinking deletes all data past the new end)" \
  "$KVBLK" resize g.qcow2 512K
rejects "a size that is not a multiple of 512 is refused" g.qcow2 \
  "kvblk resize: The new size must be a multiple of 512" "$KVBLK" resize g.qcow2 +1000
rejects "a relative size below zero is refused" g.qcow2 \
  "kvblk resize: New image size must be positive" "$KVBLK" resize --shrink g.qcow2 -1G
rejects "a malformed size is refused" g.qcow2 \
  "kvblk resize: Parameter 'size' expects a non-negative number below 2^64; optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta- and exabytes, respectively" \
  "$KVBLK" resize g.qcow2 abc
rejects "a missing size is refused" g.qcow2 \
  "kvblk resize: Not enough arguments (see 'kvblk resize --help')" "$KVBLK" resize g.qcow2
"$KVBLK" resize --shrink g.qcow2 -- -64M >"$T/.out" 2>"$T/.evidence"
qemu-img info --output=json g.qcow2 >"$T/.q"
if grep -q '"virtual-size": 1048576' "$T/.q"; then pass "resize --shrink -- -64M shrinks to 1 MiB"; else
  cp "$T/.q" "$T/.evidence"
  fail "resize --shrink -- -64M shrinks to 1 MiB"
fi
reads "data before the new end survives the shrink" g.qcow2 0x5a 0 1M
qcheck "image is clean after the shrink" g.qcow2

q qemu-img create -f qcow2 sn.qcow2 4M
q qemu-io -c 'write -P 0x66 0 4M' sn.qcow2
"$KVBLK" snapshot -c big sn.qcow2 2>"$T/.evidence"
"$KVBLK" resize --shrink sn.qcow2 1M >"$T/.evidence" 2>&1
qcheck "shrinking an image with a snapshot leaves it clean" sn.qcow2
"$KVBLK" snapshot -a big sn.qcow2 2>"$T/.evidence"
reads "applying the snapshot restores its size and data" sn.qcow2 0x66 0 4M
qcheck "image is clean after applying the bigger snapshot" sn.qcow2

q qemu-img create -f qcow2 -o compat=0.10 v2.qcow2 1M
q qemu-img snapshot -c s v2.qcow2
rejects "a v2 image with snapshots cannot be resized (as qemu-img)" v2.qcow2 \
  "kvblk resize: v2.qcow2: cannot resize a version 2 (compat=0.10) image that has snapshots" \
  "$KVBLK" resize v2.qcow2 2M

q truncate -s 1M raw.img
"$KVBLK" resize -f raw raw.img 3M >"$T/.out" 2>"$T/.evidence"
if [ "$(stat -c %s raw.img)" = 3145728 ] && [ "$(cat "$T/.out")" = "Image resized." ]; then
  pass "raw images grow"
else
  fail "raw images grow"
fi
rejects "raw images shrink only with --shrink" raw.img \
  "kvblk resize: Use the --shrink option to perform a shrink operation (shrinking deletes all data past the new end)" \
  "$KVBLK" resize -f raw raw.img 1M
"$KVBLK" resize --shrink raw.img 1M >"$T/.out" 2>"$T/.evidence"
if [ "$(stat -c %s raw.img)" = 1048576 ]; then pass "raw images shrink with --shrink"; else
  fail "raw images shrink with --shrink"
fi

# ---------------------------------------------------------------------------
echo "# $checks checks, $failures failed"
[ "$failures" -eq 0 ]
