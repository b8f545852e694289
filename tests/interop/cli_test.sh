#!/bin/bash
# Interop tests of the kvblk command-line tool against qemu-img and qemu-io.
#
# Usage: tests/interop/cli_test.sh BUILD_DIR   (the CLI is BUILD_DIR/kvblk)
#
# Every check prints "ok - <description>" or "not ok - <description>" (with
# the evidence indented under it); the script exits non-zero if any check
# failed. Images live in a temporary directory that is removed on exit.
TAP_LIB=$(cd "$(dirname "$0")/../support" && pwd)/tap.sh
set -uo pipefail

. "$TAP_LIB"
tap_setup "${1:-build}" qemu-img qemu-io python3 md5sum

# quietly IMG: qemu-img/qemu-io noise goes to the evidence file only.
q() { "$@" >>"$T/.evidence" 2>&1; }

# same_json A B: the JSON documents in files A and B are equal, up to
# whitespace, member order and "./" in file names.
cat >"$T/.same_json.py" <<'EOF'
import json, os, sys

PATH_KEYS = {"filename", "full-backing-filename", "backing-filename"}

def norm(value, key=None):
    if isinstance(value, dict):
        return {k: norm(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [norm(v) for v in value]
    if key in PATH_KEYS and isinstance(value, str):
        return os.path.normpath(value)
    return value

a = norm(json.load(open(sys.argv[1])))
b = norm(json.load(open(sys.argv[2])))
if a != b:
    print("kvblk:   ", json.dumps(a, sort_keys=True))
    print("qemu-img:", json.dumps(b, sort_keys=True))
    sys.exit(1)
EOF
same_json() { python3 "$T/.same_json.py" "$1" "$2"; }

# json_get FILE EXPR: prints the python expression EXPR evaluated on the JSON
# document in FILE (bound to j).
json_get() { python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print($2)" "$1"; }

# expect_field DESC IMG EXPR EXPECTED: qemu-img info's JSON for IMG has EXPR
# equal to EXPECTED.
expect_field() {
  local got
  got=$(qemu-img info --output=json "$2" 2>"$T/.evidence" | python3 -c \
    "import json,sys; j=json.load(sys.stdin); print($3)" 2>>"$T/.evidence")
  if [ "$got" = "$4" ]; then
    pass "$1"
  else
    echo "expected $3 == $4, got '$got'" >>"$T/.evidence"
    fail "$1"
  fi
}

# qcheck DESC IMG: qemu-img check finds no errors and no leaks.
qcheck() {
  if qemu-img check "$2" >"$T/.evidence" 2>&1 && ! grep -q "leaked" "$T/.evidence"; then
    pass "$1"
  else
    fail "$1"
  fi
}

# rejects DESC FILE CMD...: the kvblk command exits non-zero, prints exactly
# one "kvblk ..." line on stderr, and FILE (if it exists) is unchanged.
rejects() {
  local desc=$1 file=$2 before="" after=""
  shift 2
  [ -f "$file" ] && before=$(md5sum <"$file")
  "$@" >"$T/.out" 2>"$T/.err"
  local rc=$?
  [ -f "$file" ] && after=$(md5sum <"$file")
  local lines
  lines=$(wc -l <"$T/.err")
  {
    echo "exit status $rc; stderr:"
    cat "$T/.err"
  } >"$T/.evidence"
  if [ "$rc" -ne 0 ] && [ "$lines" -eq 1 ] && grep -q '^kvblk' "$T/.err" &&
    [ "$before" = "$after" ]; then
    pass "$desc"
  else
    [ "$before" = "$after" ] || echo "file $file changed" >>"$T/.evidence"
    fail "$desc"
  fi
}

# ---------------------------------------------------------------------------
echo "# dispatcher"

out=$("$KVBLK" --version 2>&1)
echo "$out" >"$T/.evidence"
if [ "$out" = "kvblk 0.1.0" ]; then pass "--version prints 'kvblk 0.1.0'"; else fail "--version prints 'kvblk 0.1.0'"; fi

"$KVBLK" >"$T/.out" 2>&1
cp "$T/.out" "$T/.evidence"
if grep -q create "$T/.out" && grep -q info "$T/.out" && grep -q convert "$T/.out" &&
  grep -q ' io ' "$T/.out" && grep -q map "$T/.out"; then
  pass "no arguments lists the commands"
else
  fail "no arguments lists the commands"
fi

for cmd in create info convert io map; do
  if "$KVBLK" "$cmd" --help >"$T/.evidence" 2>&1 && grep -q "usage: kvblk $cmd" "$T/.evidence" &&
    grep -q "^Options:" "$T/.evidence" && "$KVBLK" help "$cmd" >/dev/null 2>&1; then
    pass "$cmd --help and 'help $cmd' print the usage"
  else
    fail "$cmd --help and 'help $cmd' print the usage"
  fi
done
rejects "an unknown command is refused" /dev/null "$KVBLK" frobnicate
rejects "an unknown option is refused" /dev/null "$KVBLK" info --frobnicate x

# ---------------------------------------------------------------------------
echo "# create"

check "create -f raw" "$KVBLK" create -f raw r.raw 16M
expect_field "raw image has the requested size" r.raw 'j["virtual-size"], j["format"]' \
  "16777216 raw"

check "create -f qcow2 (defaults)" "$KVBLK" create -f qcow2 d.qcow2 1G
qcheck "qemu-img check accepts a default qcow2" d.qcow2
expect_field "default qcow2 settings" d.qcow2 \
  'j["virtual-size"], j["cluster-size"], j["format-specific"]["data"]["compat"], j["format-specific"]["data"]["refcount-bits"], j["format-specific"]["data"]["lazy-refcounts"]' \
  "1073741824 65536 1.1 16 False"

"$KVBLK" create -f qcow2 fmt_k.qcow2 1G >"$T/.k" 2>&1
qemu-img create -f qcow2 fmt_q.qcow2 1G >"$T/.q" 2>&1
sed -i 's/fmt_k/X/' "$T/.k"
sed -i 's/fmt_q/X/' "$T/.q"
if diff "$T/.k" "$T/.q" >"$T/.evidence"; then
  pass "the Formatting line matches qemu-img's"
else
  fail "the Formatting line matches qemu-img's"
fi

check "create with cluster_size, refcount_bits, lazy_refcounts, compression_type" \
  "$KVBLK" create -f qcow2 -o cluster_size=128k,refcount_bits=8 \
  -o lazy_refcounts=on,compression_type=zstd o.qcow2 256M
qcheck "qemu-img check accepts the image with options" o.qcow2
expect_field "the options are in the image" o.qcow2 \
  'j["cluster-size"], j["format-specific"]["data"]["refcount-bits"], j["format-specific"]["data"]["lazy-refcounts"], j["format-specific"]["data"]["compression-type"]' \
  "131072 8 True zstd"

check "create -o compat=0.10" "$KVBLK" create -o compat=0.10 v2.qcow2 64M
qcheck "qemu-img check accepts a v2 image" v2.qcow2
expect_field "compat 0.10 image" v2.qcow2 'j["format-specific"]["data"]["compat"]' "0.10"

check "create -o extended_l2=on" "$KVBLK" create -o extended_l2=on,cluster_size=64k x2.qcow2 64M
qcheck "qemu-img check accepts an extended L2 image" x2.qcow2
expect_field "extended L2 is on" x2.qcow2 'j["format-specific"]["data"]["extended-l2"]' "True"

check "create -o preallocation=metadata" "$KVBLK" create -o preallocation=metadata pm.qcow2 16M
qcheck "qemu-img check accepts a metadata-preallocated image" pm.qcow2
qemu-img map --output=json pm.qcow2 >"$T/.evidence" 2>&1
if json_get "$T/.evidence" 'all(e["present"] for e in j)' 2>/dev/null | grep -q True; then
  pass "metadata preallocation allocates every cluster"
else
  fail "metadata preallocation allocates every cluster"
fi

check "create -f raw -o preallocation=full" "$KVBLK" create -f raw -o preallocation=full pf.raw 1M
if [ "$(du -k pf.raw | cut -f1)" -ge 1024 ]; then pass "full preallocation allocates the raw file"; else
  du -k pf.raw >"$T/.evidence"
  fail "full preallocation allocates the raw file"
fi

qemu-img create -q -f qcow2 base.qcow2 128M
q qemu-io -c 'write -P 0x11 0 64k' -c 'write -P 0x22 1M 128k' base.qcow2
check "create -b -F (size taken from the backing file)" "$KVBLK" create -b base.qcow2 -F qcow2 ov.qcow2
qcheck "qemu-img check accepts the overlay" ov.qcow2
expect_field "overlay records its backing file and size" ov.qcow2 \
  'j["backing-filename"], j["backing-filename-format"], j["virtual-size"]' "base.qcow2 qcow2 134217728"
if qemu-io -r -c 'read -P 0x22 1M 128k' ov.qcow2 >"$T/.evidence" 2>&1 &&
  ! grep -q "verification failed" "$T/.evidence"; then
  pass "qemu-io reads backing data through the overlay"
else
  fail "qemu-io reads backing data through the overlay"
fi

if "$KVBLK" create -o help >"$T/.evidence" 2>&1 && grep -q cluster_size "$T/.evidence" &&
  grep -q refcount_bits "$T/.evidence"; then
  pass "create -o help lists the options"
else
  fail "create -o help lists the options"
fi

rejects "create refuses an unknown -o option" new1.qcow2 "$KVBLK" create -o bogus=1 new1.qcow2 1M
if grep -q "'bogus'" "$T/.err"; then pass "the unknown -o option is named in the message"; else
  fail "the unknown -o option is named in the message"
fi
rejects "create refuses a bad cluster size" new2.qcow2 "$KVBLK" create -q -o cluster_size=3000 new2.qcow2 1M
rejects "create refuses a negative size" new3.qcow2 "$KVBLK" create new3.qcow2 -- -1M
rejects "create refuses a missing size" new4.qcow2 "$KVBLK" create new4.qcow2
rejects "create refuses qcow2 options for raw" new5.raw "$KVBLK" create -f raw -o cluster_size=64k new5.raw 1M
rejects "create refuses a missing backing file" new6.qcow2 "$KVBLK" create -b missing.qcow2 new6.qcow2
rejects "create refuses lazy refcounts with compat 0.10" new7.qcow2 \
  "$KVBLK" create -q -o compat=0.10,lazy_refcounts=on new7.qcow2 1M
rejects "create refuses an unknown format" new8.img "$KVBLK" create -f vmdk new8.img 1M

# ---------------------------------------------------------------------------
echo "# io"

qemu-img create -q -f qcow2 io.qcow2 64M
"$KVBLK" io -c 'write -P 0x5a 0 64k' -c 'read -P 0x5a 0 64k' io.qcow2 >"$T/.out" 2>&1
rc=$?
cp "$T/.out" "$T/.evidence"
if [ $rc -eq 0 ] && grep -q '^wrote 65536/65536 bytes at offset 0$' "$T/.out" &&
  grep -q '^read 65536/65536 bytes at offset 0$' "$T/.out" &&
  grep -Eq '^64 KiB, 1 ops; [0-9:.]+ sec \([0-9.]+ (bytes|KiB|MiB|GiB|TiB)/sec and [0-9.]+ ops/sec\)$' \
    "$T/.out"; then
  pass "io write -P / read -P print qemu-io's report"
else
  fail "io write -P / read -P print qemu-io's report"
fi
if qemu-io -r -c 'read -P 0x5a 0 64k' io.qcow2 >"$T/.evidence" 2>&1 &&
  ! grep -q "verification failed" "$T/.evidence"; then
  pass "qemu-io reads what kvblk io wrote"
else
  fail "qemu-io reads what kvblk io wrote"
fi
qcheck "qemu-img check after kvblk io writes" io.qcow2

q qemu-io -c 'write -P 0x33 1M 128k' -c 'write -P 0x44 3M 4k' io.qcow2
check "kvblk io reads what qemu-io wrote" "$KVBLK" io -r -c 'read -P 0x33 1M 128k' -c 'read -P 0x44 3M 4k' io.qcow2

"$KVBLK" io -c 'read -P 0x77 0 64k' io.qcow2 >"$T/.out" 2>&1
rc=$?
cp "$T/.out" "$T/.evidence"
if [ $rc -ne 0 ] && grep -q '^Pattern verification failed at offset 0, 65536 bytes$' "$T/.out"; then
  pass "a pattern mismatch is reported and fails"
else
  fail "a pattern mismatch is reported and fails"
fi

"$KVBLK" io -c 'read -P 0x77 0 4k' -c 'write -P 0x66 8M 4k' io.qcow2 >"$T/.evidence" 2>&1
rc=$?
if [ $rc -ne 0 ] && qemu-io -r -c 'read -P 0x66 8M 4k' io.qcow2 >>"$T/.evidence" 2>&1 &&
  ! grep -q "verification failed at offset 8388608" "$T/.evidence"; then
  pass "commands after a failed one still run, and the exit status is 1"
else
  fail "commands after a failed one still run, and the exit status is 1"
fi

"$KVBLK" io -r -c 'read -v 1048570 40' io.qcow2 >"$T/.k" 2>&1
qemu-io -r -c 'read -v 1048570 40' io.qcow2 >"$T/.q" 2>&1
sed -i '/ops\/sec)$/d' "$T/.k" "$T/.q"
if grep -q '^000ffffa:  ' "$T/.k" && diff "$T/.k" "$T/.q" >"$T/.evidence"; then
  pass "read -v dumps like qemu-io"
else
  fail "read -v dumps like qemu-io"
fi

"$KVBLK" io -c 'write -z 2M 64k' -c 'discard 1M 64k' -c flush -c aio_flush io.qcow2 >"$T/.out" 2>&1
rc=$?
cp "$T/.out" "$T/.evidence"
if [ $rc -eq 0 ] && grep -q '^wrote 65536/65536 bytes at offset 2097152$' "$T/.out" &&
  grep -q '^discard 65536/65536 bytes at offset 1048576$' "$T/.out"; then
  pass "write -z, discard, flush and aio_flush run"
else
  fail "write -z, discard, flush and aio_flush run"
fi
if qemu-io -r -c 'read -P 0 2M 64k' -c 'read -P 0x33 1088k 64k' io.qcow2 >"$T/.evidence" 2>&1 &&
  ! grep -q "verification failed" "$T/.evidence"; then
  pass "qemu-io sees the zeroed range and the data next to the discard"
else
  fail "qemu-io sees the zeroed range and the data next to the discard"
fi
qcheck "qemu-img check after write -z and discard" io.qcow2

"$KVBLK" io -r -c map io.qcow2 >"$T/.k" 2>&1
qemu-io -r -c map io.qcow2 >"$T/.q" 2>&1
if diff "$T/.k" "$T/.q" >"$T/.evidence"; then pass "io map prints what qemu-io map prints"; else
  fail "io map prints what qemu-io map prints"
fi
"$KVBLK" io -r -c map ov.qcow2 >"$T/.k" 2>&1
qemu-io -r -c map ov.qcow2 >"$T/.q" 2>&1
if diff "$T/.k" "$T/.q" >"$T/.evidence"; then pass "io map on an overlay matches qemu-io"; else
  fail "io map on an overlay matches qemu-io"
fi

qemu-img create -q -f qcow2 cz.qcow2 4M
check "write -c writes compressed clusters" "$KVBLK" io -c 'write -c -P 0x3c 0 256k' cz.qcow2
qemu-img check cz.qcow2 >"$T/.evidence" 2>&1
if grep -q "No errors" "$T/.evidence" && ! grep -q " 0.00% compressed" "$T/.evidence"; then
  pass "qemu-img check sees the compressed clusters"
else
  fail "qemu-img check sees the compressed clusters"
fi
if qemu-io -r -c 'read -P 0x3c 0 256k' cz.qcow2 >"$T/.evidence" 2>&1 &&
  ! grep -q "verification failed" "$T/.evidence"; then
  pass "qemu-io reads the compressed clusters"
else
  fail "qemu-io reads the compressed clusters"
fi

check "io on a raw image" "$KVBLK" io -f raw -c 'write -P 0x21 4k 8k' -c 'read -P 0x21 4k 8k' r.raw
if qemu-io -f raw -r -c 'read -P 0x21 4k 8k' -c 'read -P 0 0 4k' r.raw >"$T/.evidence" 2>&1 &&
  ! grep -q "verification failed" "$T/.evidence"; then
  pass "qemu-io reads what kvblk io wrote to raw"
else
  fail "qemu-io reads what kvblk io wrote to raw"
fi

rejects "io refuses a negative offset" io.qcow2 "$KVBLK" io -c 'write -P 1 -512 4k' io.qcow2
rejects "io refuses a negative length" io.qcow2 "$KVBLK" io -c 'write -P 1 0 -4k' io.qcow2
rejects "io refuses an offset past the end" io.qcow2 "$KVBLK" io -c 'write -P 1 64M 4k' io.qcow2
rejects "io refuses a range crossing the end" io.qcow2 "$KVBLK" io -c 'write 63M 2M' io.qcow2
rejects "io checks every command before running any" io.qcow2 \
  "$KVBLK" io -c 'write -P 9 0 4k' -c 'read 1G 4k' io.qcow2
rejects "io refuses an unknown command" io.qcow2 "$KVBLK" io -c 'frobnicate 0 4k' io.qcow2
rejects "io refuses a bad pattern" io.qcow2 "$KVBLK" io -c 'write -P 256 0 4k' io.qcow2
rejects "io -r refuses writes" io.qcow2 "$KVBLK" io -r -c 'write 0 4k' io.qcow2
rejects "io refuses -u without -z" io.qcow2 "$KVBLK" io -c 'write -u 0 4k' io.qcow2
rejects "io on a raw image refuses a range past the end" r.raw "$KVBLK" io -f raw -c 'write 16M 1' r.raw

# ---------------------------------------------------------------------------
echo "# info"

qemu-img create -q -f qcow2 snap.qcow2 32M
q qemu-io -c 'write -P 1 0 64k' snap.qcow2
q qemu-img snapshot -c first snap.qcow2
q qemu-img snapshot -c second snap.qcow2
qemu-img create -q -f qcow2 -b "$T/base.qcow2" -F qcow2 abs.qcow2

for img in d.qcow2 o.qcow2 v2.qcow2 ov.qcow2 abs.qcow2 snap.qcow2 io.qcow2 r.raw; do
  "$KVBLK" info --output=json "$img" >"$T/.k" 2>&1
  qemu-img info --output=json "$img" >"$T/.q" 2>&1
  if same_json "$T/.k" "$T/.q" >"$T/.evidence" 2>&1; then
    pass "info --output=json equals qemu-img's for $img"
  else
    fail "info --output=json equals qemu-img's for $img"
  fi
done
"$KVBLK" info --output=json d.qcow2 >"$T/.k" 2>&1
qemu-img info --output=json d.qcow2 >"$T/.q" 2>&1
if diff "$T/.k" "$T/.q" >"$T/.evidence"; then pass "info --output=json is byte-identical to qemu-img's"; else
  fail "info --output=json is byte-identical to qemu-img's"
fi
"$KVBLK" info --output=json --backing-chain ov.qcow2 >"$T/.k" 2>&1
qemu-img info --output=json --backing-chain ov.qcow2 >"$T/.q" 2>&1
if same_json "$T/.k" "$T/.q" >"$T/.evidence" 2>&1; then
  pass "info --backing-chain --output=json equals qemu-img's"
else
  fail "info --backing-chain --output=json equals qemu-img's"
fi
for img in d.qcow2 v2.qcow2 abs.qcow2 snap.qcow2 r.raw; do
  "$KVBLK" info "$img" >"$T/.k" 2>&1
  qemu-img info "$img" >"$T/.q" 2>&1
  if diff "$T/.k" "$T/.q" >"$T/.evidence"; then pass "info text equals qemu-img's for $img"; else
    fail "info text equals qemu-img's for $img"
  fi
done
"$KVBLK" info --backing-chain abs.qcow2 >"$T/.k" 2>&1
qemu-img info --backing-chain abs.qcow2 >"$T/.q" 2>&1
if diff "$T/.k" "$T/.q" >"$T/.evidence"; then pass "info --backing-chain text equals qemu-img's"; else
  fail "info --backing-chain text equals qemu-img's"
fi

echo "not a disk image" >text.txt
head -c 50 d.qcow2 >trunc.qcow2
mkdir -p adir
rejects "info refuses a missing file" missing.qcow2 "$KVBLK" info missing.qcow2
rejects "info -f qcow2 refuses a file that is not an image" text.txt "$KVBLK" info -f qcow2 text.txt
rejects "info refuses a truncated qcow2 image" trunc.qcow2 "$KVBLK" info trunc.qcow2
rejects "info refuses a directory" adir "$KVBLK" info adir
rejects "info refuses an unknown output format" d.qcow2 "$KVBLK" info --output=xml d.qcow2

# ---------------------------------------------------------------------------
echo "# map"

qemu-img create -q -f qcow2 m.qcow2 64M
q qemu-io -c 'write -P 1 0 64k' -c 'write -P 2 1M 192k' -c 'write -z 4M 64k' \
  -c 'write -c -P 3 8M 64k' -c 'write -P 4 63M 1M' m.qcow2
qemu-img create -q -f qcow2 -b m.qcow2 -F qcow2 mo.qcow2
q qemu-io -c 'write -P 5 64k 64k' -c 'write -z 1M 64k' mo.qcow2
qemu-img create -q -f raw mr.raw 8M
q qemu-io -f raw -c 'write -P 6 1M 64k' mr.raw

for img in m.qcow2 mo.qcow2 io.qcow2 ov.qcow2 pm.qcow2 mr.raw; do
  "$KVBLK" map --output=json "$img" >"$T/.k" 2>&1
  qemu-img map --output=json "$img" >"$T/.q" 2>&1
  if same_json "$T/.k" "$T/.q" >"$T/.evidence" 2>&1 && diff "$T/.k" "$T/.q" >>"$T/.evidence"; then
    pass "map --output=json equals qemu-img's for $img"
  else
    fail "map --output=json equals qemu-img's for $img"
  fi
done
for img in io.qcow2 abs.qcow2; do
  "$KVBLK" map "$img" >"$T/.k" 2>&1
  qemu-img map "$img" >"$T/.q" 2>&1
  if diff "$T/.k" "$T/.q" >"$T/.evidence"; then pass "map text equals qemu-img's for $img"; else
    fail "map text equals qemu-img's for $img"
  fi
done
rejects "map refuses a missing file" missing.qcow2 "$KVBLK" map missing.qcow2
rejects "map refuses a truncated image" trunc.qcow2 "$KVBLK" map trunc.qcow2
rejects "map -f qcow2 refuses a raw file" text.txt "$KVBLK" map -f qcow2 text.txt

# ---------------------------------------------------------------------------
echo "# convert"

# The source: an overlay with data of its own on top of a backing file.
qemu-img create -q -f qcow2 cb.qcow2 32M
q qemu-io -c 'write -P 0x10 0 1M' -c 'write -P 0x11 5M 64k' -c 'write -P 0x12 31M 1M' cb.qcow2
qemu-img create -q -f qcow2 -b cb.qcow2 -F qcow2 co.qcow2
q qemu-io -c 'write -P 0x20 512k 1M' -c 'write -z 31M 64k' co.qcow2

check "convert qcow2 (with backing) -> raw" "$KVBLK" convert -O raw co.qcow2 c.raw
check "qemu-img compare qcow2 -> raw" qemu-img compare co.qcow2 c.raw
if [ "$(du -k c.raw | cut -f1)" -lt 8192 ]; then pass "the raw destination is sparse"; else
  du -k c.raw >"$T/.evidence"
  fail "the raw destination is sparse"
fi
check "convert raw -> qcow2" "$KVBLK" convert -f raw -O qcow2 c.raw c.qcow2
check "qemu-img compare raw -> qcow2" qemu-img compare c.raw c.qcow2
qcheck "qemu-img check accepts the converted qcow2" c.qcow2
expect_field "the converted qcow2 has no backing file and the same size" c.qcow2 \
  '"backing-filename" in j, j["virtual-size"]' "False 33554432"
check "convert -c qcow2 -> compressed qcow2" "$KVBLK" convert -c -O qcow2 co.qcow2 cc.qcow2
check "qemu-img compare compressed" qemu-img compare co.qcow2 cc.qcow2
qemu-img check cc.qcow2 >"$T/.evidence" 2>&1
if grep -q "No errors" "$T/.evidence" && ! grep -q " 0.00% compressed" "$T/.evidence"; then
  pass "qemu-img check sees compressed clusters in the convert -c output"
else
  fail "qemu-img check sees compressed clusters in the convert -c output"
fi
check "convert -O qcow2 -o cluster_size=128k,compat=0.10" \
  "$KVBLK" convert -O qcow2 -o cluster_size=128k,compat=0.10 co.qcow2 c128.qcow2
check "qemu-img compare with -o options" qemu-img compare co.qcow2 c128.qcow2
expect_field "convert applied the -o options" c128.qcow2 \
  'j["cluster-size"], j["format-specific"]["data"]["compat"]' "131072 0.10"

"$KVBLK" convert -p -O raw co.qcow2 cp.raw >"$T/.out" 2>"$T/.err"
rc=$?
cat "$T/.out" "$T/.err" >"$T/.evidence"
if [ $rc -eq 0 ] && grep -q '(100.00/100%)' "$T/.err" && [ ! -s "$T/.out" ]; then
  pass "convert -p reports progress on stderr"
else
  fail "convert -p reports progress on stderr"
fi
"$KVBLK" convert -q -p -O raw co.qcow2 cq.raw >"$T/.out" 2>&1
rc=$?
cp "$T/.out" "$T/.evidence"
if [ $rc -eq 0 ] && [ ! -s "$T/.out" ]; then pass "convert -q prints nothing"; else
  fail "convert -q prints nothing"
fi

qemu-img create -q -f qcow2 big.qcow2 3G
q qemu-io -c 'write -P 0x41 0 64k' -c 'write -P 0x42 2G 64k' -c 'write -P 0x43 3221159936 64k' big.qcow2
check "convert a sparse 3 GiB image" "$KVBLK" convert -O qcow2 big.qcow2 bigc.qcow2
check "qemu-img compare the sparse 3 GiB image" qemu-img compare big.qcow2 bigc.qcow2

rejects "convert -c refuses a raw destination" nc.raw "$KVBLK" convert -c -O raw co.qcow2 nc.raw
[ -e nc.raw ] && fail "convert -c -O raw left a destination behind"
rejects "convert refuses to overwrite its source" co.qcow2 "$KVBLK" convert -O qcow2 co.qcow2 co.qcow2
rejects "convert refuses to overwrite a backing file of its source" cb.qcow2 \
  "$KVBLK" convert -O qcow2 co.qcow2 cb.qcow2
rejects "convert refuses a missing source" nm.raw "$KVBLK" convert missing.qcow2 nm.raw
[ -e nm.raw ] && fail "convert of a missing source left a destination behind"
rejects "convert refuses a truncated source" nt.raw "$KVBLK" convert trunc.qcow2 nt.raw
rejects "convert refuses -o size" ns.qcow2 "$KVBLK" convert -O qcow2 -o size=1M co.qcow2 ns.qcow2

# A source whose L2 entry points at an unaligned host offset: the copy fails
# after the destination was created, and the destination is removed.
qemu-img create -q -f qcow2 bad.qcow2 4M
q qemu-io -c 'write -P 0x55 0 64k' bad.qcow2
python3 - bad.qcow2 <<'EOF'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(40)
    l1_offset = struct.unpack(">Q", f.read(8))[0]
    f.seek(l1_offset)
    l2_offset = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
    f.seek(l2_offset)
    entry = struct.unpack(">Q", f.read(8))[0]
    f.seek(l2_offset)
    f.write(struct.pack(">Q", entry | 0x200))
EOF
rejects "convert of a corrupt source fails" bad.qcow2 "$KVBLK" convert -O raw bad.qcow2 nb.raw
if [ -e nb.raw ]; then
  ls -l nb.raw >"$T/.evidence"
  fail "a failed convert removes the destination it created"
else
  pass "a failed convert removes the destination it created"
fi

# ---------------------------------------------------------------------------
echo "# $checks checks, $failures failed"
[ "$failures" -eq 0 ]
