#!/bin/bash
# Interop tests of `kvblk check` against `qemu-img check`: exit statuses,
# the human and JSON summaries, the findings on stderr, -r leaks, -r all
# and --help.
#
# Usage: tests/interop/check_test.sh BUILD_DIR   (the CLI is BUILD_DIR/kvblk)
#
# Every check prints "ok - <description>" or "not ok - <description>" (with
# the evidence indented under it); the script exits non-zero if any check
# failed. Images live in a temporary directory that is removed on exit.
TAP_LIB=$(cd "$(dirname "$0")/../support" && pwd)/tap.sh
set -uo pipefail

. "$TAP_LIB"
tap_setup "${1:-build}" qemu-img qemu-io python3

# verdict DESC CONDITION-EXIT-STATUS
verdict() { if [ "$2" -eq 0 ]; then pass "$1"; else fail "$1"; fi; }

# run_tool OUT TOOL ARGS...: runs `TOOL check ARGS...`, stdout to OUT.out,
# stderr to OUT.err, exit status to OUT.rc.
run_tool() {
  local out=$1 tool=$2
  shift 2
  "$tool" check "$@" >"$out.out" 2>"$out.err"
  echo $? >"$out.rc"
}

# same_run DESC IMG ARGS...: kvblk check and qemu-img check, each on its
# own copy of IMG, exit with the same status and print the same stdout.
same_run() {
  local desc=$1 img=$2
  shift 2
  cp "$img" "$T/k.img"
  cp "$img" "$T/q.img"
  run_tool "$T/k" "$KVBLK" "$@" "$T/k.img"
  run_tool "$T/q" qemu-img "$@" "$T/q.img"
  sed -i "s#$T/k.img#IMG#g" "$T/k.out"
  sed -i "s#$T/q.img#IMG#g" "$T/q.out"
  {
    echo "exit: kvblk $(cat "$T/k.rc"), qemu-img $(cat "$T/q.rc")"
    diff "$T/k.out" "$T/q.out"
    echo "kvblk stderr:"
    cat "$T/k.err"
    echo "qemu-img stderr:"
    cat "$T/q.err"
  } >"$T/.evidence"
  [ "$(cat "$T/k.rc")" = "$(cat "$T/q.rc")" ] && cmp -s "$T/k.out" "$T/q.out"
  verdict "$desc" $?
}

# exit_is DESC EXPECTED CMD...: CMD exits with EXPECTED.
exit_is() {
  local desc=$1 want=$2
  shift 2
  "$@" >"$T/.evidence" 2>&1
  local rc=$?
  echo "exit status $rc, expected $want" >>"$T/.evidence"
  [ "$rc" -eq "$want" ]
  verdict "$desc" $?
}

# one_line_error DESC WANT_EXIT CMD...: CMD exits with WANT_EXIT and prints
# exactly one "kvblk check: ..." line on stderr and nothing on stdout.
one_line_error() {
  local desc=$1 want=$2
  shift 2
  "$@" >"$T/.out" 2>"$T/.err"
  local rc=$?
  { echo "exit $rc (want $want)"; cat "$T/.out" "$T/.err"; } >"$T/.evidence"
  [ "$rc" -eq "$want" ] && [ "$(wc -l <"$T/.err")" -eq 1 ] && grep -q '^kvblk check: ' "$T/.err" &&
    [ ! -s "$T/.out" ]
  verdict "$desc" $?
}

# qemu_clean DESC IMG: qemu-img check finds nothing wrong with IMG.
qemu_clean() {
  qemu-img check "$2" >"$T/.evidence" 2>&1
  verdict "$1" $?
}

# forge IMG PYTHON: runs PYTHON with `q` bound to an object that patches IMG
# (q.l1(i), q.set_l1(i, v), q.l2(i, j), q.set_l2(i, j, v), q.data_cluster(i, j),
# q.set_refcount(cluster, v), q.rt_off, q.set_rt(i, v)).
forge() {
  python3 - "$1" "$2" <<'EOF'
import struct, sys
class Q:
    def __init__(s, path):
        s.f = open(path, "r+b")
        s.cb = s.u32(20); s.cs = 1 << s.cb
        s.l1_off = s.u64(40); s.rt_off = s.u64(48); s.order = s.u32(96)
        s.per_block = s.cs * 8 >> s.order
    def u64(s, o): s.f.seek(o); return struct.unpack(">Q", s.f.read(8))[0]
    def u32(s, o): s.f.seek(o); return struct.unpack(">I", s.f.read(4))[0]
    def w64(s, o, v): s.f.seek(o); s.f.write(struct.pack(">Q", v))
    def l1(s, i): return s.u64(s.l1_off + 8 * i)
    def set_l1(s, i, v): s.w64(s.l1_off + 8 * i, v)
    def l2(s, i, j): return s.u64((s.l1(i) & 0x00fffffffffffe00) + 8 * j)
    def set_l2(s, i, j, v): s.w64((s.l1(i) & 0x00fffffffffffe00) + 8 * j, v)
    def data_cluster(s, i, j): return (s.l2(i, j) & 0x00fffffffffffe00) >> s.cb
    def set_rt(s, i, v): s.w64(s.rt_off + 8 * i, v)
    def set_refcount(s, c, v):
        assert s.order == 4
        block = s.u64(s.rt_off + 8 * (c // s.per_block))
        s.f.seek(block + 2 * (c % s.per_block)); s.f.write(struct.pack(">H", v))
q = Q(sys.argv[1])
exec(sys.argv[2])
EOF
}

# base IMG: 64 MiB image with data in host clusters 5-8.
base() {
  qemu-img create -q -f qcow2 "$1" 64M
  qemu-io -c 'write -P 1 0 192k' -c 'write -P 2 1M 64k' "$1" >/dev/null
}

# ---------------------------------------------------------------------------
echo "# usage and errors"

"$KVBLK" check --help >"$T/.evidence" 2>&1
rc=$?
[ "$rc" -eq 0 ] && grep -q "usage: kvblk check" "$T/.evidence" && grep -q "^Options:" "$T/.evidence" &&
  grep -q -- "-r leaks" "$T/.evidence" && "$KVBLK" help check >/dev/null 2>&1
verdict "check --help and 'help check' print the usage" $?

base clean.qcow2
one_line_error "an unknown repair mode is refused" 1 "$KVBLK" check -r most clean.qcow2
one_line_error "an unknown output format is refused" 1 "$KVBLK" check --output=xml clean.qcow2
one_line_error "an unknown option is refused" 1 "$KVBLK" check --frobnicate clean.qcow2
one_line_error "a missing FILE is refused" 1 "$KVBLK" check
one_line_error "a file that does not exist is refused" 1 "$KVBLK" check nothing.qcow2
qemu-img create -q -f raw plain.raw 1M
one_line_error "a raw image has no checks (exit 63, like qemu-img)" 63 "$KVBLK" check plain.raw
one_line_error "-f raw has no checks (exit 63)" 63 "$KVBLK" check -f raw clean.qcow2
exit_is "qemu-img agrees: exit 63 for raw" 63 qemu-img check plain.raw

# ---------------------------------------------------------------------------
echo "# clean images"

same_run "clean image: same summary and exit status as qemu-img" clean.qcow2
same_run "clean image, JSON: same output" clean.qcow2 --output=json
cp clean.qcow2 snap.qcow2
qemu-img snapshot -c s1 snap.qcow2
qemu-io -c 'write -c -P 3 2M 64k' -c 'write -P 4 0 64k' snap.qcow2 >/dev/null
same_run "image with a snapshot and compressed clusters: same summary" snap.qcow2
same_run "image with a snapshot and compressed clusters: same JSON" snap.qcow2 --output=json
same_run "-q prints nothing" clean.qcow2 -q
"$KVBLK" check -q clean.qcow2 >"$T/.evidence" 2>&1
[ ! -s "$T/.evidence" ]
verdict "-q on a clean image prints nothing at all" $?

# ---------------------------------------------------------------------------
echo "# leaks"

base leak.qcow2
truncate -s $((12 * 65536)) leak.qcow2
forge leak.qcow2 'q.set_refcount(10, 1)'
same_run "leaked cluster: exit 3 and the same summary" leak.qcow2
grep -qx "Leaked cluster 10 refcount=1 reference=0" "$T/k.err"
verdict "the leak is reported on stderr in qemu's words" $?
same_run "leaked cluster, JSON: same output (\"leaks\": 1)" leak.qcow2 --output=json
grep -q '"leaks": 1' "$T/k.out"
verdict "JSON names the leak count" $?
same_run "-r leaks: same report of the repair" leak.qcow2 -r leaks
same_run "-r leaks, JSON: same output (\"leaks-fixed\": 1)" leak.qcow2 -r leaks --output=json
cp leak.qcow2 leak2.qcow2
exit_is "-r leaks exits 0 once the leak is fixed" 0 "$KVBLK" check -r leaks leak2.qcow2
qemu_clean "qemu-img check finds the image clean after -r leaks" leak2.qcow2
same_run "-q keeps the exit status (3)" leak.qcow2 -q

# ---------------------------------------------------------------------------
echo "# corruptions"

base low.qcow2
forge low.qcow2 'q.set_refcount(q.data_cluster(0, 1), 0)'
same_run "refcount too low: exit 2 and the same summary" low.qcow2
grep -qx "ERROR cluster 6 refcount=0 reference=1" "$T/k.err"
verdict "the corruption is reported on stderr in qemu's words" $?
same_run "refcount too low, JSON: same output (\"corruptions\": 2)" low.qcow2 --output=json
same_run "-r leaks cannot fix it: exit 1 like qemu-img" low.qcow2 -r leaks
cp low.qcow2 low2.qcow2
"$KVBLK" check -r all --output=json low2.qcow2 >"$T/.evidence" 2>&1
rc=$?
[ "$rc" -eq 0 ] && grep -q '"corruptions-fixed": 1' "$T/.evidence" &&
  ! grep -q '"corruptions":' "$T/.evidence"
verdict "-r all fixes it (exit 0, \"corruptions-fixed\": 1)" $?
qemu_clean "qemu-img check finds the image clean after -r all" low2.qcow2
"$KVBLK" check -r all low.qcow2 >"$T/.evidence" 2>&1
grep -q "^The following inconsistencies were found and repaired:" "$T/.evidence" &&
  grep -q "^    1 corruptions" "$T/.evidence" &&
  grep -q "^Double checking the fixed image now..." "$T/.evidence" &&
  grep -q "^No errors were found on the image." "$T/.evidence"
verdict "-r all prints qemu-img's repair report" $?

base copied.qcow2
forge copied.qcow2 'q.set_l2(0, 1, q.l2(0, 1) & ~(1 << 63))'
same_run "COPIED flag missing: same summary" copied.qcow2
same_run "COPIED flag missing, -r all: same repair report" copied.qcow2 -r all

base intort.qcow2
forge intort.qcow2 'q.set_l2(0, 1, (q.l2(0, 1) & ~0x00fffffffffffe00) | q.rt_off)'
same_run "L2 entry pointing into the refcount table: same summary" intort.qcow2
same_run "L2 entry pointing into the refcount table: same JSON" intort.qcow2 --output=json
exit_is "-r all repairs it" 0 "$KVBLK" check -r all intort.qcow2
grep -q "guest data at offset 0x10000 is lost" "$T/.evidence"
verdict "-r all reports the guest data it had to drop" $?
qemu_clean "qemu-img check finds the image clean after -r all" intort.qcow2

base rbmis.qcow2
forge rbmis.qcow2 'q.set_rt(0, q.u64(q.rt_off) + 0x200)'
same_run "misaligned refcount block: exit 1 (check errors) and the same summary" rbmis.qcow2
same_run "misaligned refcount block, JSON: same output" rbmis.qcow2 --output=json
exit_is "-r all rebuilds the refcount structure" 0 "$KVBLK" check -r all rbmis.qcow2
grep -q "^Rebuilding refcount structure" "$T/.evidence"
verdict "-r all says it rebuilt the refcount structure" $?
qemu_clean "qemu-img check finds the rebuilt image clean" rbmis.qcow2

qemu-img create -q -f qcow2 -o lazy_refcounts=on dirty.qcow2 64M
qemu-io -c 'write -P 1 0 192k' dirty.qcow2 >/dev/null
forge dirty.qcow2 'q.w64(72, q.u64(72) | 1); q.set_refcount(q.data_cluster(0, 2), 0)'
same_run "dirty image with a stale refcount: same summary" dirty.qcow2
exit_is "-r all repairs the dirty image" 0 "$KVBLK" check -r all dirty.qcow2
qemu-img info dirty.qcow2 >"$T/.evidence" 2>&1
! grep -q "cleanly shut down: no" "$T/.evidence"
verdict "-r all clears the dirty bit" $?
qemu_clean "qemu-img check finds the repaired dirty image clean" dirty.qcow2

# ---------------------------------------------------------------------------
echo "# $checks checks, $failures failed"
[ "$failures" -eq 0 ]
